"""Study: decoding constrained to copy the evidence, as the answer and as a reader column. On a candidates dump.

    .venv/bin/python bench/fit_reader.py --train squad2 --lm-rerank 24 --dump /tmp/dump.json   # once, < 8 min
    .venv/bin/python bench/reader_copy.py --dump /tmp/dump.json                                # ~30 min (greedy ~6)

Issue 8 names this way of picking the span: let the model write the answer, but allow at each step only the tokens
that keep what it wrote a substring of the evidence (the reader's 3 sentences), and the end token once it stands on
a word boundary. The prompt is the reader's own (``reader.reader_messages``: the system prompt, the worked examples,
the evidence, the question). The check is on characters, so a span is allowed however the tokenizer splits it;
each step takes the most likely allowed token among the model's top ``--top`` (greedy), or keeps the ``--beams``
best partial answers by summed log-probability.

Rows: the copied answer alone (against the reader's candidates' best, the oracle, and the LM column alone: the
argmax of ``lm`` among the reranked spans), then ``copy_f1`` (each candidate's token F1 with the copied answer)
added to the shipped features and refitted exactly as bench/fit_reader.py does (fitted on squad2, 7 folds of its
articles held out, qa_dev and covid held out).

Not used by the reader unless the table says so (bench/README, "Stop 32").
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _boundary(evidence: str, start: int, end: int) -> bool:
    """The substring evidence[start:end] begins and ends on word boundaries."""
    before = evidence[start - 1] if start > 0 else " "
    after = evidence[end] if end < len(evidence) else " "
    return not (before.isalnum() and evidence[start].isalnum()) and not (after.isalnum() and evidence[end - 1].isalnum())


def _starts(evidence: str, text: str) -> list[int]:
    """Every position where ``text`` occurs in ``evidence`` at a word start."""
    out, at = [], evidence.find(text)
    while at >= 0:
        if at == 0 or not (evidence[at - 1].isalnum() and evidence[at].isalnum()):
            out.append(at)
        at = evidence.find(text, at + 1)
    return out


def copy_decode(gen, messages, evidence: str, *, max_tokens: int = 16, top: int = 64, beams: int = 1) -> str:
    """The model's answer, every prefix of it a substring of ``evidence`` starting at a word (see the docstring)."""
    import torch

    from memchat.generation import cache_keyword, eval_mode

    tok, model = gen.tokenizer, gen.model
    end_id = gen.eos_ids[0]
    ids = gen.encode(gen.format_prompt(messages))
    cache_kw = cache_keyword(model)
    pieces = {}

    def piece(t: int) -> str:
        if t not in pieces:
            pieces[t] = tok.decode([t])
        return pieces[t]

    with eval_mode(model), torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=gen.device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        # A beam: (summed log p, token ids, text, cache, log-probs of its next token); finished: (score, text)
        live = [(0.0, [], "", out.past_key_values, first)]
        done: list[tuple[float, str]] = []
        for _ in range(max_tokens):
            grown = []
            for score, toks, text, cache, lp in live:
                vals, idx = torch.topk(lp, top)
                for v, t in zip(vals.tolist(), idx.tolist()):
                    if t == end_id:
                        stripped = text.strip()
                        if stripped and any(_boundary(evidence, s, s + len(stripped))
                                            for s in _starts(evidence, stripped)):
                            done.append((score + v, stripped))
                        continue
                    new = (text + piece(t)) if text else piece(t).lstrip()
                    if not new or not _starts(evidence, new):
                        continue
                    grown.append((score + v, toks + [t], new, cache))
            if not grown:
                break
            grown.sort(key=lambda b: -b[0])
            live = []
            for score, toks, text, cache in grown[:beams]:
                c = cache if beams == 1 else copy.deepcopy(cache)  # a forward pass grows the cache in place
                o = model(input_ids=torch.tensor([[toks[-1]]], device=gen.device), use_cache=True,
                          **{cache_kw: c})
                live.append((score, toks, text, o.past_key_values, torch.log_softmax(o.logits[0, -1].float(), -1)))
            if done and max(s for s, _ in done) > max(s for s, *_ in live):
                break  # every live beam already scores below a finished answer: adding tokens only lowers it
        if not done:
            done = [(s, text.strip()) for s, _, text, *_ in live if text.strip()]
    return max(done)[1] if done else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", required=True, help="bench/fit_reader.py --dump output")
    p.add_argument("--beams", default="1,4", help="comma-separated beam widths, each a row")
    p.add_argument("--top", type=int, default=64, help="tokens looked at per step")
    p.add_argument("--limit", type=int, default=0, help="first N questions per set (0 = all)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fit_reader import load_dump, refit_header, refit_row, with_columns

    from memchat.config import GenerationConfig
    from memchat.evaluate import contains_gold, token_f1
    from memchat.generation import Generator
    from memchat.reader import FEATURES, reader_messages

    rows = load_dump(args.dump)
    if args.limit:
        rows = [r for s in {r["set"]: 0 for r in rows} for r in [r for r in rows if r["set"] == s][: args.limit]]
    gen = Generator(GenerationConfig.model_name)
    lm = FEATURES.index("lm")
    sets = ("qa_dev", "squad2", "covid")

    def alone(label, answers):
        cells = []
        for s in sets:
            part = [(r, a) for r, a in zip(rows, answers) if r["set"] == s]
            f1 = 100 * np.mean([token_f1(a, r["answers"]) for r, a in part])
            co = 100 * np.mean([contains_gold(a, r["answers"]) for r, a in part])
            cells.append(f"{f1:.1f} / {co:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    def best(r, column):
        return r["cands"][int(np.argmax(column))] if len(r["f1"]) else ""

    print("alone: F1 / contains")
    print("| answer | qa_dev | squad2 | covid |")
    print("|---|---|---|---|")
    alone("the best candidate (oracle)", [best(r, r["f1"]) for r in rows])
    alone("the LM column alone (argmax of lm)", [best(r, r["X"][:, lm]) for r in rows])
    copies = {}
    for b in [int(x) for x in args.beams.split(",")]:
        t0 = time.perf_counter()
        copies[b] = [copy_decode(gen, reader_messages(r["q"], r["sents"]), "\n".join(r["sents"]), top=args.top,
                                 beams=b) if r["sents"] else "" for r in rows]
        alone(f"copied, beam {b} ({(time.perf_counter() - t0) / len(rows):.2f} s/question)", copies[b])
        for r, a in list(zip(rows, copies[b]))[:12]:
            print(f"    {a!r:40.40} gold {r['answers'][0]!r:30.30} {r['q'][:60]}", file=sys.stderr)

    for b, answers in copies.items():
        for r, a in zip(rows, answers):
            r[f"copy{b}"] = np.array([token_f1(c, [a]) if a else 0.0 for c in r["cands"]])
    print("\nrefitted with the copy column: F1 / contains (squad2 by article: F1)")
    print(refit_header(by_document=7))
    print(refit_row(rows, "shipped", with_columns(), by_document=7)[0], flush=True)
    for b in copies:
        print(refit_row(rows, f"+ copy_f1, beam {b}", with_columns(f"copy{b}"), by_document=7)[0], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
