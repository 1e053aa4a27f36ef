"""Does the fine-tuned model know the documents? The training mix, row by row, against base and RAG.

    .venv/bin/python bench/knowledge.py                                  # qa_dev: 4 PDFs, 49 questions
    .venv/bin/python bench/knowledge.py --set qa_dev_squad2              # 14 PDFs, 182 questions (hours on 2 cores)
    .venv/bin/python bench/knowledge.py --rows base,qa,full --epochs 8   # a subset
    .venv/bin/python bench/knowledge.py --home /tmp/k9 --reuse           # keep the store, data and models made before

One command, the way a user would run the pipeline, in a scratch MEMCHAT_HOME:

  1. ``main.py add`` the set's PDFs;
  2. ``extract_faiss_data.py`` once, with every part of the mix (the generator stages are
     the bundled SmolLM2 offline);
  3. ``train_conversational.py`` once per row, the same data with the mix switches:
       qa        (b) the generated questions only
       qa_para   (b) + (c) their paraphrases
       full      (a) documents + (b) + (c) + (d) restatements (the default recipe)
       no_gen    (a) + (d): what needs no generator at all
  4. ``test_finetuned_model.py --eval`` on the set's questions, closed-book for base and
     the fine-tuned rows (answers capped at --max-new-tokens, 32 by default), and rag /
     hybrid with the full-mix model. The set's questions are never trained on.

Columns: closed-book contains / F1 / EM (SQuAD metrics, ``memchat.evaluate``), the best
epoch the knowledge probe chose, training minutes, and the training records by kind.
A timing table says where the time of one whole loop (extract + train + eval) goes.
Timings depend on what else runs on the machine: compare rows within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PY = sys.executable

ROWS = {  # name -> train_conversational.py mix flags (None: not a trained row)
    "base": None,
    "qa": ["--no-mix-documents", "--no-mix-paraphrases", "--no-mix-restatements"],
    "qa_para": ["--no-mix-documents", "--no-mix-restatements"],
    "full": [],
    "no_gen": ["--no-mix-qa", "--no-mix-paraphrases"],
    "rag": None,
    "hybrid": None,
}
DEFAULT_ROWS = "base,qa,qa_para,full,no_gen,rag,hybrid"


def run(cmd: list[str], env: dict, log: Path) -> float:
    """Run one pipeline step (niced), its output to ``log``; seconds it took. Exits on failure."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(["nice", "-n", "10", *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"bench: step failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def eval_rows(home: Path, env: dict, log: Path, questions: Path, systems: str, model_dir: Path, out: Path,
              max_new_tokens: int) -> tuple[dict, float]:
    secs = run([PY, "test_finetuned_model.py", "--eval", str(questions), "--systems", systems, "--model-dir",
                str(model_dir), "--max-new-tokens", str(max_new_tokens), "--batch-size", "16", "--out", str(out)],
               env, log)
    report = json.loads(out.with_name(out.name + ".json").read_text())
    return {name: s["metrics"] for name, s in report["systems"].items()}, secs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/knowledge.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="qa_dev", help="a folder of ../shared/data with pdfs/ and qa.jsonl (default qa_dev)")
    p.add_argument("--home", default="/tmp/memchat-knowledge-bench", help="scratch MEMCHAT_HOME")
    p.add_argument("--reuse", action="store_true", help="keep what an earlier run made in --home (store, data, models)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from {','.join(ROWS)}")
    p.add_argument("--epochs", type=float, default=None, help="training epochs (default: the guide's 15)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="closed-book answer cap (default 32)")
    p.add_argument("--train-flags", default="--no-gradient-checkpointing --batch-size 8 --grad-accum 2",
                   help="extra train_conversational.py flags for every row (CPU-friendly default)")
    p.add_argument("--extract-flags", default="", help="extra extract_faiss_data.py flags (e.g. --spans-per-sentence 1)")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"bench: unknown rows {unknown}; choose from {','.join(ROWS)}")
    data = DATA / args.set
    questions, pdfs = data / "qa.jsonl", sorted((data / "pdfs").glob("*.pdf"))
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    log = home / "bench.log"
    env = dict(os.environ, MEMCHAT_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"bench: {args.set} ({len(pdfs)} PDFs, {sum(1 for _ in open(questions))} questions), home {home}, "
          f"commit {commit}, log {log}", flush=True)

    timing: dict[str, float] = {}
    if not (args.reuse and (home / "encrypted_faiss_storage").exists()):
        timing["add PDFs"] = run([PY, "main.py", "add", *map(str, pdfs)], env, log)
    timing["extract"] = run([PY, "extract_faiss_data.py", "--quiet", *args.extract_flags.split()], env, log)
    stats = json.loads((home / "training_data" / "training_stats.json").read_text())
    by_kind = stats["overall"]["records_by_kind"]
    gen = stats["run"]
    print(f"extract: {timing['extract'] / 60:.1f} min ({gen['chunks_generated']} chunks generated, "
          f"{gen['chunks_reused']} reused); records by kind {by_kind}", flush=True)

    results: dict[str, dict] = {}
    models, evals = home / "models", home / "eval"
    trained = [r for r in rows if ROWS[r] is not None]
    partial = home / "bench_results.jsonl"  # one line per finished row: a long run reports as it goes
    for n, row in enumerate(trained):  # train, then ask closed-book at once (base with the first)
        out = models / row
        cmd = [PY, "train_conversational.py", "--output-dir", str(out), "--quiet", *args.train_flags.split(), *ROWS[row]]
        if args.epochs:
            cmd += ["--epochs", f"{args.epochs:g}"]
        if args.reuse and (out / "memchat_model_meta.json").exists():
            secs = json.loads((out / "memchat_model_meta.json").read_text())["results"]["runtime_s"]
        else:
            secs = run(cmd, env, log)
        timing[f"train {row}"] = secs
        meta = json.loads((out / "memchat_model_meta.json").read_text())
        results[row] = {"best_epoch": meta["results"]["best_epoch"], "train_min": secs / 60,
                        "kinds": meta["mix"]["records_by_kind"], "curve": meta["results"].get("curve")}
        systems = "base,finetuned" if n == 0 and "base" in rows else "finetuned"
        metrics, esecs = eval_rows(home, env, log, questions, systems, out, evals / row, args.max_new_tokens)
        timing[f"eval {row}"] = esecs
        if "base" in metrics:
            results["base"] = {"metrics": metrics["base"]}
        results[row]["metrics"] = metrics["finetuned"]
        with open(partial, "a", encoding="utf-8") as f:
            f.write(json.dumps({"row": row, **results[row], "base": results.get("base")}) + "\n")
        m = metrics["finetuned"]
        print(f"{row}: trained {secs / 60:.1f} min, best epoch {meta['results']['best_epoch']}; closed-book contains "
              f"{100 * m['contains']:.1f} F1 {100 * m['f1']:.1f}; kinds {meta['mix']['records_by_kind']}", flush=True)
    open_book = [r for r in ("rag", "hybrid") if r in rows]
    if open_book:
        if not trained:
            sys.exit("bench: rag/hybrid rows need a trained row (the hybrid's fine-tuned model)")
        model = models / ("full" if "full" in trained else trained[-1])
        metrics, secs = eval_rows(home, env, log, questions, ",".join(open_book), model, evals / "open_book",
                                  args.max_new_tokens)
        timing["eval rag/hybrid"] = secs
        for r in open_book:
            results[r] = {"metrics": metrics[r]}

    head = ["row", "contains", "F1", "EM", "best epoch", "train min", "records by kind"]
    table = []
    for row in rows:
        r = results.get(row, {})
        m = r.get("metrics") or {}
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
        kinds = ", ".join(f"{k} {v}" for k, v in (r.get("kinds") or {}).items()) or "-"
        table.append([row, pct(m.get("contains")), pct(m.get("f1")), pct(m.get("exact_match")),
                      "-" if r.get("best_epoch") is None else f"{r['best_epoch']:.0f}",
                      "-" if r.get("train_min") is None else f"{r['train_min']:.1f}", kinds])
    widths = [max(len(x[i]) for x in [head, *table]) for i in range(len(head))]
    fmt = lambda x: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))  # noqa: E731
    print()
    print(f"closed-book on {args.set} (answers <= {args.max_new_tokens} new tokens); rag/hybrid open-book; commit {commit}")
    print(fmt(head))
    print(fmt(["-" * w for w in widths]))
    for x in table:
        print(fmt(x))
    print()
    total = sum(timing.values())
    print("where the time went:")
    for step, secs in timing.items():
        print(f"  {step:<18} {secs / 60:6.1f} min  {100 * secs / total:5.1f}%")
    print(f"  {'total':<18} {total / 60:6.1f} min")
    loop = timing.get("add PDFs", 0) + timing["extract"] + timing.get("train full", 0) + timing.get("eval full", 0)
    if "train full" in timing:
        print(f"one whole loop (add + extract + train full + eval full): {loop / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"set": args.set, "commit": commit, "results": results,
                                               "timing_s": timing, "records_by_kind": by_kind}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
