"""Study: a MiniLM span reader trained on rule-made wh questions, as one more column of the extractive reader.

    .venv/bin/python bench/reader_trained.py data /tmp/qa.jsonl                     # 17,744 questions, ~1 min
    .venv/bin/python bench/reader_trained.py train /tmp/qa.jsonl /tmp/qa_model 700  # 700 steps of 16, 35 min
    .venv/bin/python bench/reader_trained.py eval /tmp/qa_model /tmp/dump.json      # a fit_reader --dump; ~1 min

"A reader trained on the user's own data" is one of issue 8's candidates, and no QA reader ships on PyPI. This
trains one without labels, as unsupervised QA does (Lewis et al. 2019, "Unsupervised Question Answering by Cloze
Translation"): each sentence of English PDFs that no dev set uses (``PDFS``) becomes wh questions by
``memchat.restatements`` (a span replaced by its question word), 70% of them noised (10% of words dropped,
neighbours swapped) so that the model cannot just match the sentence; the context is the sentence with 0 to 2
neighbours each side. The bundled MiniLM gets a start/end head (``AutoModelForQuestionAnswering``) and one pass.

``eval`` scores every candidate of a ``bench/fit_reader.py --dump`` by the model's log p(start) + log p(end) over
the reader's sentences, prints the model's own best span and its pick among the reader's candidates, and refits
the reader with the column added, as the other reader studies do. Not used by the reader (bench/README "Stop 31").
"""
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import numpy as np
import torch

PDFS = ["large/freeculture.pdf", "manuals/R-intro.pdf", "papers_tables/TAMReview.pdf", "papers_tables/tracemonkey.pdf",
        "papers_tables/federal-register-2020-17221.pdf", "manuals/reportlab-userguide.pdf"]
MAXLEN = 256


def minilm():
    from memchat.models import resolve_model

    return resolve_model("sentence-transformers/all-MiniLM-L6-v2", kind="embedding").path


def noisy(q: str, rng) -> str:
    words = q.rstrip("?").split()
    wh = {"what", "who", "when", "where", "which", "how", "whom"}
    out = [w for w in words if w.lower() in wh or rng.random() > 0.1]  # drop 10% of words
    for i in range(len(out) - 1):  # local swaps
        if rng.random() < 0.1:
            out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out) + "?"


def make_data(out: str):
    from memchat.pdf import extract_pdf_file
    from memchat.chunking import split_sentences
    from memchat.restatements import MIN_SENTENCE_WORDS, choose_spans, wh_question
    from memchat.text import english_share

    rng = random.Random(0)
    n = 0
    with open(out, "w") as f:
        for rel in PDFS:
            doc = extract_pdf_file(REPO.parent / "shared" / "data" / "pdfs" / rel)
            text = " ".join(p.text for p in doc.pages)
            sents = [" ".join(s.split()) for s in split_sentences(text)]  # white space collapsed, as RAG's evidence
            sents = [s for s in sents if MIN_SENTENCE_WORDS <= len(s.split()) <= 60]
            k = 0
            for i, s in enumerate(sents):
                if english_share(s) < 0.15:
                    continue
                for span in choose_spans(s, 2):
                    lo, hi = max(0, i - rng.randint(0, 2)), min(len(sents), i + 1 + rng.randint(0, 2))
                    ctx_s = sents[lo:hi]
                    off = sum(len(x) + 1 for x in ctx_s[: i - lo])
                    ctx = " ".join(ctx_s)
                    q = wh_question(s, span)
                    if rng.random() < 0.7:
                        q = noisy(q, rng)
                    a0 = off + span.start
                    assert ctx[a0:a0 + len(span.text)] == span.text, (ctx[a0:a0 + 30], span.text)
                    f.write(json.dumps({"q": q, "c": ctx, "a": a0, "t": span.text}) + "\n")
                    n += 1
                    k += 1
            print(rel, len(sents), "sentences", k, "questions", flush=True)
    print("total", n)


def encode(tok, qs, cs, ans=None):
    enc = tok(qs, cs, truncation="only_second", max_length=MAXLEN, padding=True, return_offsets_mapping=True,
              return_tensors="pt")
    if ans is None:
        return enc
    starts, ends = [], []
    for b, (a0, t) in enumerate(ans):  # the answer's first and last character's tokens; (0, 0) when truncated away
        s = enc.char_to_token(b, a0, sequence_index=1)
        e = enc.char_to_token(b, a0 + len(t) - 1, sequence_index=1)
        starts.append(s if s is not None and e is not None else 0)
        ends.append(e if s is not None and e is not None else 0)
    return enc, torch.tensor(starts), torch.tensor(ends)


def train(data: str, out: str, steps: int, bs: int = 16, lr: float = 1e-4):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(0)
    path = minilm()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForQuestionAnswering.from_pretrained(path)
    rows = [json.loads(x) for x in open(data)]
    random.Random(1).shuffle(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, steps // 10, steps)
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = [rows[(step * bs + i) % len(rows)] for i in range(bs)]
        enc, s, e = encode(tok, [r["q"] for r in batch], [r["c"] for r in batch], [(r["a"], r["t"]) for r in batch])
        enc.pop("offset_mapping")
        loss = model(**enc, start_positions=s, end_positions=e).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def span_scores(model, tok, question, sents, cands, sis):
    ctx = " ".join(sents)
    offs = np.cumsum([0] + [len(s) + 1 for s in sents])
    enc = encode(tok, [question], [ctx])
    om = enc.pop("offset_mapping")[0].tolist()
    seq = enc.sequence_ids(0)
    with torch.no_grad():
        out = model(**enc)
    ls = torch.log_softmax(out.start_logits[0], -1).numpy()
    le = torch.log_softmax(out.end_logits[0], -1).numpy()
    ctx_tok = [j for j, sid in enumerate(seq) if sid == 1]
    scores = []
    for c, si in zip(cands, sis):
        pos = sents[si].find(c)
        if pos < 0:
            scores.append(-30.0)
            continue
        a0 = offs[si] + pos
        a1 = a0 + len(c)
        toks = [j for j in ctx_tok if om[j][0] < a1 and om[j][1] > a0]
        scores.append(float(ls[toks[0]] + le[toks[-1]]) if toks else -30.0)
    # the model's own best span (<= 15 tokens) for a standalone figure
    best, bs_ = -1e9, (0, 0)
    for i in ctx_tok:
        for j in ctx_tok:
            if i <= j < i + 15 and ls[i] + le[j] > best:
                best, bs_ = ls[i] + le[j], (om[i][0], om[j][1])
    return np.array(scores), ctx[bs_[0]:bs_[1]]


def evaluate(model_dir: str, dump: str):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from fit_reader import load_dump, refit_header, refit_row, with_columns
    from memchat.text import contains_gold, token_f1

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    rows = load_dump(dump)
    alone = {}
    t0 = time.time()
    for r in rows:
        if not len(r["f1"]):
            r["qa"] = np.zeros(0)
            continue
        sc, own = span_scores(model, tok, r["q"], r["sents"], r["cands"], r["si"])
        r["qa"] = sc - sc.max()
        alone.setdefault(r["set"], []).append((token_f1(own, r["answers"]), contains_gold(own, r["answers"]),
                                               r["f1"][int(np.argmax(sc))]))
    print(f"scored in {time.time() - t0:.0f}s")
    for s, v in alone.items():
        a = np.array(v)
        print(f"{s}: QA model's own span F1 {100 * a[:, 0].mean():.1f} contains {100 * a[:, 1].mean():.1f}; "
              f"its pick among the reader's candidates F1 {100 * a[:, 2].mean():.1f}")

    print(refit_header(by_document=7))
    print(refit_row(rows, "shipped", with_columns(), by_document=7)[0])
    row, w = refit_row(rows, "+ qa", with_columns("qa"), by_document=7)
    print(row)
    print(f"the qa column's fitted weight: {w[-1]:.3f}")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the questions made from PDFS")
    d.add_argument("out", help="JSONL to write: question, context, answer start, answer text")
    t = sub.add_parser("train", help="fine-tune the bundled MiniLM with a start/end head on those questions")
    t.add_argument("data", help="the data command's JSONL")
    t.add_argument("model", help="folder to save the model in")
    t.add_argument("steps", type=int, nargs="?", default=700, help="optimizer steps of 16 questions (default 700)")
    e = sub.add_parser("eval", help="score a fit_reader dump's candidates and refit the reader with the column")
    e.add_argument("model", help="the train command's folder")
    e.add_argument("dump", help="bench/fit_reader.py --dump output")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.cmd == "data":
        make_data(args.out)
    elif args.cmd == "train":
        train(args.data, args.model, args.steps)
    else:
        evaluate(args.model, args.dump)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
