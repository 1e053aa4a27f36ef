"""RAG vs fine-tuned vs hybrid (vs the base model) on a question set with gold answers.

One run answers every question with every system and reports, per system:

  EM         SQuAD exact match: normalised prediction == a normalised gold answer
  F1         SQuAD token F1, the best over the gold answers
  contains   a normalised gold answer appears, whole words, in the prediction
             (generative models answer in sentences: EM undercounts them)
  hit@k      the gold document is among the k retrieved (systems that retrieve,
             questions whose file names a ``doc``)
  passage    passage recall@k: a gold answer is inside the k retrieved chunks' text
  evidence   evidence recall: a gold answer is inside the passage shown as evidence
             (the best sentence with its neighbours)
  abstain    share of questions where the system said it does not know (or that the
             documents do not answer clearly) instead of answering
  wrong+conf wrong and confident: answered (not abstained) with token F1 < 0.2
  unans.     on questions marked unanswerable (their answer is not in the store):
             the share abstained on, which is what a system should do there
  MC acc     multiple choice by answer log-likelihood, no sampling (Ovadia et al.
             2023, "Fine-Tuning or Retrieval?"): for questions with ``options``, the
             option the system's model finds most likely after its own prompt
             (summed token log-probs, as lm-evaluation-harness's "acc")
  p50/p95    seconds per answer. With batch size 1 (the default) each question is
             timed alone, as a user waits for it; with a larger batch it is the
             batch's time divided by its questions (throughput, labelled so).

Systems: ``base`` (the model the fine-tuned one started from, same prompt),
``finetuned``, ``rag`` (``memchat.rag``), ``hybrid`` (``memchat.hybrid``). Answers are
greedy, so a rerun gives the same numbers.

Question files: JSON Lines ``{"question", "answers": [...], "doc"?, "options"?, "id"?}``,
or the extraction's ``faiss_training_data.json`` (its validation split; each record's
document is its ``doc``). Output: a table (``Report.table``), a JSON file with every
prediction, and a PNG chart (matplotlib, Agg backend: no display needed).

Deliberately left out: LLM-as-judge scoring (neither reproducible nor cheap) and
printing (``test_finetuned_model.py --eval`` prints).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import __version__, config
from .errors import DatasetError, MemChatError, NoStoreError

log = logging.getLogger(__name__)

REPORT_FORMAT = "memchat-eval"
REPORT_FORMAT_VERSION = 1
SYSTEMS = ("base", "finetuned", "rag", "hybrid")
RESULTS_DIRNAME = "eval_results"


@dataclass
class EvalConfig:
    systems: tuple[str, ...] = SYSTEMS
    top_k: int = config.RAGConfig.top_k  # chunks retrieved, as RAG does: hit@k and passage recall@k use this k
    max_new_tokens: int = 64  # gold answers are short; long answers only cost time
    rag_max_new_tokens: int = 64  # same cap for RAG, so latencies compare like for like
    batch_size: int = 1  # 1 = true per-question latency; >1 = faster runs, amortised latency
    hybrid_strategy: str = "verify"  # memchat.hybrid's default, chosen by this very evaluation
    limit: int = 0  # 0 = every question; else the first N (quick trials)
    rag_mode: str | None = None  # RAG answer mode (auto/extractive/generative); None = RAGConfig's
    unanswerable: bool = False  # every question is asked of a store that lacks its answer (abstention test)


# ---------------------------------------------------------------------------
# Metrics (pure functions: every number in a report can be checked by hand)
# ---------------------------------------------------------------------------
# The SQuAD metrics live with the other text helpers (the reader and the training probe use them too).
from .text import contains_gold, exact_match, normalize_answer, token_f1  # noqa: E402,F401  (re-exported)


WRONG_F1 = 0.2  # an answer with token F1 below this shares almost nothing with any gold answer


def hit_at_k(retrieved_documents: Sequence[str], gold_document: str, k: int) -> float:
    return float(gold_document in list(retrieved_documents)[:k])


def percentile(values: Iterable[float], q: float) -> float:
    """q in [0, 100], linear interpolation between closest ranks (numpy's default); NaN if empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def gold_option(options: Sequence[str], answers: Sequence[str]) -> int | None:
    """Index of the option that is a gold answer (normalised), or None."""
    golds = {normalize_answer(a) for a in answers}
    return next((i for i, o in enumerate(options) if normalize_answer(o) in golds), None)


# ---------------------------------------------------------------------------
# Question files
# ---------------------------------------------------------------------------
@dataclass
class Question:
    id: str
    question: str
    answers: list[str]
    doc: str | None = None
    options: list[str] | None = None
    unanswerable: bool = False  # the store lacks the answer: the right response is to abstain


def load_questions(path: str | Path, limit: int = 0, unanswerable: bool = False) -> list[Question]:
    """A JSONL question file, or the extraction's dataset JSON (validation split)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"No question file at {path}. Give a JSONL file: one {{\"question\", \"answers\": [...]}} per line.")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("{") and '"records"' in text[:100_000] and _is_single_json(stripped):
        questions = _from_dataset(json.loads(stripped), path)
    else:
        questions = _from_jsonl(text, path)
    if not questions:
        raise DatasetError(f"{path} holds no questions.")
    if unanswerable:
        for q in questions:
            q.unanswerable = True
    return questions[:limit] if limit else questions


def _is_single_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _from_jsonl(text: str, path: Path) -> list[Question]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}, line {number}: not JSON ({exc.msg}).") from exc
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise DatasetError(f'{path}, line {number}: needs a "question" string.')
        answers = row.get("answers", row.get("answer"))
        answers = [answers] if isinstance(answers, str) else answers
        unanswerable = bool(row.get("unanswerable", False))
        if unanswerable and not answers:
            answers = []
        elif not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DatasetError(f'{path}, line {number}: needs "answers", a non-empty list of strings.')
        options = row.get("options")
        if options is not None and (not isinstance(options, list) or len(options) < 2
                                    or not all(isinstance(o, str) for o in options)):
            raise DatasetError(f'{path}, line {number}: "options" must be a list of at least 2 strings.')
        if options is not None and gold_option(options, answers) is None:
            raise DatasetError(f'{path}, line {number}: none of the "options" is one of the "answers".')
        out.append(Question(str(row.get("id", number)), row["question"].strip(), answers, row.get("doc"), options,
                            unanswerable))
    return out


def _from_dataset(doc: dict, path: Path) -> list[Question]:
    records = doc.get("records")
    if not isinstance(records, list):
        raise DatasetError(f'{path} has no "records" list.')
    out, seen = [], set()
    for number, r in enumerate(records, 1):
        if not isinstance(r, dict) or r.get("split") != "validation":
            continue
        q, a = r.get("question"), r.get("answer")
        if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
            continue
        key = normalize_answer(q)
        if key in seen:  # variations of one question: count it once
            continue
        seen.add(key)
        out.append(Question(str(r.get("id", number)), q.strip(), [a.strip()], r.get("document")))
    if not out:
        raise DatasetError(f"{path} has no validation records. Extract with a validation split: python extract_faiss_data.py")
    return out


# ---------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------
@dataclass
class Prediction:
    text: str
    seconds: float
    documents: list[str] | None = None  # retrieved documents, best first; None = no retrieval
    citations: list[str] = field(default_factory=list)
    route: str | None = None  # hybrid: what produced the text
    draft: str | None = None  # hybrid: the fine-tuned model's draft
    abstained: bool = False  # the system said it does not know instead of answering
    passages: list[str] | None = None  # retrieved chunks' text (passage recall); None = no retrieval
    evidence: str | None = None  # the passage shown as evidence
    relevance: float | None = None  # RAG: the abstention gate's score (rag.relevance); None = no gate


class System:
    """One way of answering. ``answer_many`` in input order; ``option_scores`` for multiple choice."""

    name = "?"
    retrieves = False

    @property
    def model(self) -> str:
        raise NotImplementedError

    def answer_many(self, questions: Sequence[str], batch_size: int) -> list[Prediction]:
        raise NotImplementedError

    def option_scores(self, question: str, options: Sequence[str]) -> list[float]:
        raise NotImplementedError


class ChatSystem(System):
    """A ``finetuned.ChatModel`` alone: the base model or the fine-tuned one."""

    def __init__(self, name: str, chat, max_new_tokens: int):
        self.name, self.chat, self.max_new_tokens = name, chat, max_new_tokens

    @property
    def model(self) -> str:
        return self.chat.display_name

    def answer_many(self, questions, batch_size):
        texts = self.chat.answer_many(questions, max_new_tokens=self.max_new_tokens, batch_size=batch_size)
        return [Prediction(t, 0.0) for t in texts]

    def option_scores(self, question, options):
        return self.chat.loglikelihoods(question, options)


def _from_answer(a) -> Prediction:
    best = a.evidence[0].sentence if a.evidence else None
    return Prediction(a.text, a.seconds, [h.document for h in a.hits], a.citations, getattr(a, "route", None) or None,
                      getattr(a, "draft", None) or None, abstained=bool(getattr(a, "abstained", False)),
                      passages=[h.text for h in a.hits], evidence=getattr(a, "passage", "") or best,
                      relevance=getattr(a, "relevance", None))


class RAGSystem(System):
    name = "rag"
    retrieves = True

    def __init__(self, rag):
        self.rag = rag

    @property
    def model(self) -> str:
        if self.rag.resolved_mode() == "extractive":
            scorer = self.rag.reader.scorer
            return (f"extractive reader + {self.rag.generator.resolved.display_name} span scores" if scorer
                    else "extractive reader (no LM)")
        return f"{self.rag.generator.resolved.display_name} (generative + verification)"

    def answer_many(self, questions, batch_size):
        return [_from_answer(a) for a in self.rag.answer_many(list(questions), batch_size=batch_size)]

    def option_scores(self, question, options):
        evidence = self.rag.select_evidence(question, self.rag.retrieve(question))
        messages = self.rag.build_messages(question, evidence)
        return self.rag.generator.loglikelihoods([(messages, o.strip()) for o in options])


class HybridSystem(System):
    name = "hybrid"
    retrieves = True

    def __init__(self, hybrid):
        self.hybrid = hybrid

    @property
    def model(self) -> str:
        return self.hybrid.display_name

    def answer_many(self, questions, batch_size):
        return [_from_answer(a) for a in self.hybrid.answer_many(list(questions), batch_size=batch_size)]

    def option_scores(self, question, options):
        generator, messages = self.hybrid.scorer(question)
        return generator.loglikelihoods([(messages, o.strip()) for o in options])


# ---------------------------------------------------------------------------
# Running and scoring
# ---------------------------------------------------------------------------
ProgressFn = Callable[[str, int, int], None]  # (system, done, total)


def run_system(system: System, questions: Sequence[Question], cfg: EvalConfig,
               progress: ProgressFn | None = None) -> list[Prediction]:
    preds: list[Prediction] = []
    step = max(1, cfg.batch_size)
    for start in range(0, len(questions), step):
        batch = questions[start : start + step]
        t0 = time.perf_counter()
        out = system.answer_many([q.question for q in batch], batch_size=step)
        per = (time.perf_counter() - t0) / len(batch)
        for p in out:
            p.seconds = per  # wall time around the call: model, retrieval and prompt building included
        preds.extend(out)
        if progress:
            progress(system.name, len(preds), len(questions))
    return preds


def score_system(system: System, questions: Sequence[Question], preds: Sequence[Prediction], k: int,
                 with_mc: bool = True, progress: ProgressFn | None = None) -> tuple[dict, list[dict]]:
    """Per-question rows and the system's metrics. Multiple choice runs the model here (one
    forward pass per option), with its own progress line."""
    rows = []
    n_mc = sum(1 for q in questions if q.options) if with_mc else 0
    em, f1, cont, hits, mc, secs, words = [], [], [], [], [], [], []
    passage, evidence, abstain, wrong, unans = [], [], [], [], []
    for q, p in zip(questions, preds):
        row = {"text": p.text, "seconds": round(p.seconds, 4), "abstained": p.abstained}
        if p.relevance is not None:
            row["relevance"] = round(p.relevance, 4)
        secs.append(p.seconds)
        if q.unanswerable:  # no gold in the store: only whether it abstained counts
            unans.append(float(p.abstained))
            rows.append(row)
            continue
        row["em"] = exact_match(p.text, q.answers)
        row["f1"] = round(token_f1(p.text, q.answers), 4)
        row["contains"] = contains_gold(p.text, q.answers)
        em.append(row["em"]), f1.append(row["f1"]), cont.append(row["contains"])
        abstain.append(float(p.abstained))
        wrong.append(float(not p.abstained and row["f1"] < WRONG_F1))
        if not p.abstained:
            words.append(len(p.text.split()))
        if p.passages is not None:
            row["passage_recall"] = contains_gold(" ".join(p.passages), q.answers)
            passage.append(row["passage_recall"])
        if p.evidence is not None:
            row["evidence_recall"] = contains_gold(p.evidence, q.answers)
            evidence.append(row["evidence_recall"])
        if p.documents is not None:
            row["documents"] = p.documents
            row["citations"] = p.citations
            if q.doc:
                row["hit"] = hit_at_k(p.documents, q.doc, k)
                hits.append(row["hit"])
        if p.route:
            row["route"] = p.route
        if p.draft:
            row["draft"] = p.draft
        if with_mc and q.options:
            scores = system.option_scores(q.question, q.options)
            choice = max(range(len(scores)), key=scores.__getitem__)
            row["mc_scores"] = [round(s, 4) for s in scores]
            row["mc_choice"] = q.options[choice]
            row["mc_correct"] = float(choice == gold_option(q.options, q.answers))
            mc.append(row["mc_correct"])
            if progress:
                progress(f"{system.name} (options)", len(mc), n_mc)
        rows.append(row)
    metrics = {
        "questions": len(rows),
        "unanswerable_questions": len(unans),
        "exact_match": _mean(em),
        "f1": _mean(f1),
        "contains": _mean(cont),
        "hit_at_k": _mean(hits) if system.retrieves else None,
        "hit_questions": len(hits) if system.retrieves else 0,
        "mc_accuracy": _mean(mc),
        "mc_questions": len(mc),
        "latency_p50_s": percentile(secs, 50),
        "latency_p95_s": percentile(secs, 95),
        "mean_answer_words": _mean(words),
        "passage_recall": _mean(passage) if system.retrieves else None,
        "evidence_recall": _mean(evidence) if system.retrieves else None,
        "abstention_rate": _mean(abstain),
        "wrong_and_confident": _mean(wrong),
        "unanswerable_abstained": _mean(unans),
    }
    if any(p.route for p in preds):
        metrics["routes"] = dict(Counter(p.route for p in preds if p.route))
    return metrics, rows


@dataclass
class Report:
    questions_file: str
    questions: list[Question]
    cfg: EvalConfig
    systems: dict  # name -> {"model": str, "metrics": {...}}
    rows: dict  # name -> per-question rows
    notices: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    seconds: float = 0.0

    @property
    def latency_label(self) -> str:
        b = self.cfg.batch_size
        return "per question" if b <= 1 else f"amortised over batches of {b}"

    def to_dict(self) -> dict:
        preds = []
        for i, q in enumerate(self.questions):
            item = asdict(q)
            for name, rows in self.rows.items():
                item[name] = rows[i]
            preds.append(item)
        return {
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            "memchat_version": __version__,
            "created": self.created,
            "questions_file": self.questions_file,
            "settings": asdict(self.cfg),
            "latency": self.latency_label,
            "runtime_s": round(self.seconds, 1),
            "notices": self.notices,
            "systems": self.systems,
            "predictions": preds,
        }

    def table(self) -> str:
        k = self.cfg.top_k
        head = ["system", "model", "EM", "F1", "contains", f"hit@{k}", f"passage@{k}", "evidence", "abstain",
                "wrong+conf", "unans. abst.", "MC acc", "p50 s", "p95 s", "words"]
        lines = []
        for name, s in self.systems.items():
            m = s["metrics"]
            lines.append([name, _short(s["model"], 44), _pct(m["exact_match"]), _pct(m["f1"]), _pct(m["contains"]),
                          _pct(m["hit_at_k"]), _pct(m.get("passage_recall")), _pct(m.get("evidence_recall")),
                          _pct(m.get("abstention_rate")), _pct(m.get("wrong_and_confident")),
                          _pct(m.get("unanswerable_abstained")), _pct(m["mc_accuracy"]), _secs(m["latency_p50_s"]),
                          _secs(m["latency_p95_s"]), f"{m['mean_answer_words']:.1f}" if m["mean_answer_words"] is not None else "-"])
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        n = len(self.questions)
        n_doc = sum(1 for q in self.questions if q.doc)
        n_mc = sum(1 for q in self.questions if q.options)
        n_un = sum(1 for q in self.questions if q.unanswerable)
        foot = (f"{n} questions ({n_doc} with a gold document, {n_mc} with options, {n_un} unanswerable); "
                f"latency {self.latency_label}; hit@{k}, passage@{k} and evidence only for systems that retrieve; "
                f"MC acc only for questions with options; wrong+conf = answered with F1 < {WRONG_F1}; "
                "unans. abst. = abstained on the unanswerable questions.")
        return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines), "", foot])

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        from .fsperm import write_private  # 0600 in a 0700 eval_results/: it holds the answers

        return write_private(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_json_default))

    def save_chart(self, path: str | Path) -> Path:
        from .fsperm import private_dir, tighten_tree

        private_dir(Path(path).parent)
        path = save_chart(self, path)
        tighten_tree(path)  # matplotlib writes 0644
        return path


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _secs(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def save_chart(report: Report, path: str | Path) -> Path:
    """Quality metrics (grouped bars, %) beside latency p50/p95 (s), one colour per system."""
    import matplotlib

    matplotlib.use("Agg")  # no display: works on servers and in tests
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(report.systems)
    metrics = [("exact_match", "EM"), ("f1", "F1"), ("contains", "contains"), ("hit_at_k", f"hit@{report.cfg.top_k}"),
               ("mc_accuracy", "MC acc")]
    shown = [(key, label) for key, label in metrics
             if any(report.systems[n]["metrics"].get(key) is not None for n in names)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        m = report.systems[name]["metrics"]
        values = [100 * (m.get(key) or 0.0) for key, _ in shown]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(shown))]
        bars = ax1.bar(xs, values, width, label=name, color=f"C{i}")
        for bar, (key, _), v in zip(bars, shown, values):
            if m.get(key) is not None:
                ax1.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(range(len(shown)), [label for _, label in shown])
    ax1.set_ylabel("% of questions")
    ax1.set_ylim(0, 105)
    ax1.set_title(f"Answer quality ({len(report.questions)} questions)")
    ax1.legend(fontsize=8)
    for i, name in enumerate(names):
        m = report.systems[name]["metrics"]
        p50, p95 = m["latency_p50_s"], m["latency_p95_s"]
        ax2.bar(i, p95, 0.6, color=f"C{i}", alpha=0.35)
        ax2.bar(i, p50, 0.6, color=f"C{i}")
    ax2.set_xticks(range(len(names)), names, rotation=20)
    ax2.set_ylabel("seconds per answer")
    ax2.set_title(f"Latency: p50 (solid), p95 (light)\n{report.latency_label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(questions: Sequence[Question], systems: Sequence[System], cfg: EvalConfig, *,
             questions_file: str = "", notices: Sequence[str] = (), progress: ProgressFn | None = None) -> Report:
    """Answer and score every question with every system (the models are already built)."""
    t0 = time.perf_counter()
    meta, rows = {}, {}
    for system in systems:
        preds = run_system(system, questions, cfg, progress)
        metrics, rows[system.name] = score_system(system, questions, preds, cfg.top_k, progress=progress)
        meta[system.name] = {"model": system.model, "metrics": metrics}
    return Report(questions_file, list(questions), cfg, meta, rows, list(notices), seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------
# Building the systems from what is on disk
# ---------------------------------------------------------------------------
def build_systems(
    cfg: EvalConfig,
    *,
    kb=None,
    model_dir: str | Path | None = None,
    rag_model: str | None = None,
    base_model: str | None = None,
) -> tuple[list[System], list[str], list[str]]:
    """The requested systems, failing fast (before any model loads) when one cannot be built.

    Returns (systems, notices, warnings): notices are the models' fallback lines (already
    logged by ``memchat.models``), warnings are for the user to see (a fine-tuned model
    older than the knowledge base). Both go into the report.

    ``kb``: a ``KnowledgeBase`` (tests pass one with a fake embedder); default: the store's.
    Models are shared where two systems use the same one (e.g. the bundled SmolLM2 as
    both the fine-tuning base and the RAG model offline).
    """
    from .config import GenerationConfig, RAGConfig

    unknown = [s for s in cfg.systems if s not in SYSTEMS]
    if unknown:
        raise MemChatError(f"Unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}.")
    if not cfg.systems:
        raise MemChatError(f"No system to evaluate; choose from {', '.join(SYSTEMS)}.")
    wants = set(cfg.systems)
    notices: list[str] = []
    warnings: list[str] = []
    model_dir = Path(model_dir) if model_dir else config.finetuned_dir()

    # -- fail fast: what is missing, before loading anything slow
    if wants & {"rag", "hybrid"}:
        if kb is None:
            from .knowledge import KnowledgeBase

            kb = KnowledgeBase()
        if not kb.documents():  # raises WrongKeyError / StoreError for a store that does not open
            raise NoStoreError(
                f"No documents in the knowledge base ({kb.store.dir}/), which rag and hybrid need. "
                "Add PDFs first: python main.py add FILE.pdf (or leave them out: --systems base,finetuned)"
            )
    meta = {}
    if wants & {"finetuned", "hybrid"} or ("base" in wants and not base_model):
        from .finetuned import check_model_dir, read_meta

        check_model_dir(model_dir)
        meta = read_meta(model_dir)
    if "base" in wants and not base_model:
        b = meta.get("base_model") or {}
        base_model = b.get("resolved") or b.get("requested")
        if not base_model:
            raise MemChatError(f"{model_dir}/ does not say which model it was fine-tuned from; give --base-model NAME.")

    from .finetuned import ChatModel, FineTunedChat
    from .generation import Generator
    from .models import resolve_model

    generators: dict[str, object] = {}

    def generator(name: str):
        resolved = resolve_model(name)
        key = resolved.model_id
        if key not in generators:
            generators[key] = Generator(name, resolved=resolved)
            if generators[key].notice:
                notices.append(generators[key].notice)
        return generators[key]

    systems: list[System] = []
    finetuned = None
    if wants & {"finetuned", "hybrid"}:
        finetuned = FineTunedChat(model_dir)
        if finetuned.notice:
            notices.append(finetuned.notice)
        stale = finetuned.staleness(kb=kb)
        if stale:
            warnings.append(stale)
    rag = None
    if wants & {"rag", "hybrid"}:
        from .rag import RAGPipeline

        name = rag_model or GenerationConfig.model_name
        rag_cfg = RAGConfig(top_k=cfg.top_k)
        if cfg.rag_mode:
            rag_cfg.mode = cfg.rag_mode
        rag = RAGPipeline(kb, generator(name), rag=rag_cfg,
                          generation=GenerationConfig(model_name=name, max_new_tokens=cfg.rag_max_new_tokens))
    for s in cfg.systems:  # in the order asked
        if s == "base":
            systems.append(ChatSystem("base", ChatModel(base_model, generator=generator(base_model)), cfg.max_new_tokens))
        elif s == "finetuned":
            systems.append(ChatSystem("finetuned", finetuned, cfg.max_new_tokens))
        elif s == "rag":
            systems.append(RAGSystem(rag))
        elif s == "hybrid":
            from .hybrid import HybridPipeline

            systems.append(HybridSystem(HybridPipeline(rag, finetuned, strategy=cfg.hybrid_strategy)))
    return systems, list(dict.fromkeys(notices)), warnings


def default_output(questions_path: str | Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return config.home() / RESULTS_DIRNAME / f"{Path(questions_path).stem}-{stamp}"


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """The report's JSON and chart paths for ``--out``: a stem gets .json and .png; a name that already ends in
    one of them (``--out results.json``) keeps its stem, so nothing is written as ``results.json.json``."""
    out = Path(out)
    if out.suffix.lower() in (".json", ".png"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
