"""Which epoch knows the documents? Every kept checkpoint of one run, on the probe and on the set's questions.

    MEMCHAT_HOME=/tmp/k9 .venv/bin/python train_conversational.py --epochs 6 --keep-checkpoints --save-total-limit 99
    .venv/bin/python bench/epochs.py --home /tmp/k9 --questions ../shared/data/qa_dev/qa.jsonl

For the base model (the baseline, first row) and each checkpoint in ``<model>/checkpoints`` (the run must keep
them: ``--keep-checkpoints --save-total-limit`` at least the epochs), answers greedily, as the trainer's knowledge
probe does (``memchat.probe.KnowledgeProbe.answer``, fp32, answers capped at 32 new tokens):

  - the validation question families and the span probes of the run's training data, each scored apart;
  - the set's questions, closed-book, scored against their gold answers (SQuAD F1 and contains-gold,
    ``memchat.evaluate``), the figure the probe stands in for.

Next to them: each epoch's answer-token loss and the probe's knowledge F1 as the trainer logged them (the meta
file's curve), and which epoch the trainer kept. The set's questions are never trained on. Where the probe's
columns rise and fall with the set's, the probe picks the epoch people's questions would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", required=True, help="the run's MEMCHAT_HOME (training_data/ and the model)")
    p.add_argument("--questions", required=True, help="the set's qa.jsonl (question, answers)")
    p.add_argument("--model-dir", help="the fine-tuned folder (default: <home>/finetuned_model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    os.environ["MEMCHAT_HOME"] = args.home

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar, once per checkpoint
    transformers.logging.set_verbosity_error()

    from memchat import config, formats
    from memchat.models import load_causal_lm
    from memchat.probe import KnowledgeProbe, ProbeQuestion
    from memchat.training import CHECKPOINTS_DIRNAME
    from memchat.training_data import load_training_data

    model_dir = Path(args.model_dir or config.finetuned_dir())
    meta = formats.read_model_meta(model_dir)
    data = load_training_data(meta["dataset"]["path"])
    families = KnowledgeProbe.from_records([r for r in data.validation if r.get("kind") == "original"],
                                           max_new_tokens=args.max_new_tokens)
    spans = KnowledgeProbe.from_records([r for r in data.validation if r.get("kind") == "wh"],
                                        max_new_tokens=args.max_new_tokens)
    rows = [json.loads(line) for line in Path(args.questions).read_text().splitlines() if line.strip()]
    real = KnowledgeProbe([ProbeQuestion(r["question"], list(r["answers"])) for r in rows],
                          max_new_tokens=args.max_new_tokens)
    curve = {c["step"]: c for c in meta["results"].get("curve") or []}  # a checkpoint's step -> its evaluation
    kept = meta["results"].get("best_epoch")
    checkpoints = sorted((model_dir / CHECKPOINTS_DIRNAME).glob("checkpoint-*"),
                         key=lambda c: int(c.name.rsplit("-", 1)[1]))
    if not checkpoints:
        sys.exit(f"bench: no checkpoints in {model_dir / CHECKPOINTS_DIRNAME}; train with --keep-checkpoints "
                 "--save-total-limit N (N >= the epochs)")

    def score(probe, predictions) -> str:
        if not probe.questions:
            return "-"
        s = probe.score(predictions)  # the trainer's own scoring
        return f"{s['knowledge_f1']:.1f} / {s['knowledge_contains']:.1f}"

    print(f"{model_dir}: {len(checkpoints)} checkpoints; probe: {len(families.questions)} families, "
          f"{len(spans.questions)} span probes; {len(real.questions)} questions of {args.questions}", flush=True)
    header = ("epoch", "eval loss", "logged probe F1", "families F1 / contains", "span probes F1 / contains",
              "the set's questions F1 / contains")
    print(" | ".join(header))
    base_model, base_tok, _ = load_causal_lm(meta["base_model"]["resolved"], training=True)  # fp32, as trained
    torch.set_num_threads(os.cpu_count() or 1)
    models = [("base", base_model, base_tok)] + [(c, None, None) for c in checkpoints]
    for name, model, tok in models:
        if model is None:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        logged = {} if name == "base" else curve.get(int(Path(name).name.rsplit("-", 1)[1]), {})
        epoch = 0 if name == "base" else round(logged.get("epoch") or 0)
        cells = (
            f"{epoch}{' (base)' if name == 'base' else ''}{' (kept)' if epoch == kept else ''}",
            f"{logged['eval_loss']:.4f}" if logged.get("eval_loss") is not None else "-",
            f"{logged['knowledge_f1']:.1f}" if logged.get("knowledge_f1") is not None else "-",
            score(families, families.answer(model, tok)),
            score(spans, spans.answer(model, tok)),
            score(real, real.answer(model, tok)),
        )
        print(" | ".join(cells), flush=True)
        del model


if __name__ == "__main__":
    main()
