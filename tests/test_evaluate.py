"""The comparison: metrics against hand-computed values, question files, reports, and
``test_finetuned_model.py --eval`` end to end on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memchat.errors import DatasetError, MemChatError, NoStoreError
from memchat.evaluate import (
    EvalConfig,
    Prediction,
    Question,
    System,
    build_systems,
    contains_gold,
    evaluate,
    exact_match,
    gold_option,
    hit_at_k,
    load_questions,
    normalize_answer,
    percentile,
    score_system,
    token_f1,
)
from tests.test_finetuned import QA_PDFS, fake_embedder, lineage_of, make_finetuned, make_kb, run_script


# ---------------------------------------------------------------------------
# Metrics, by hand
# ---------------------------------------------------------------------------
def test_normalize_answer_is_squads():
    assert normalize_answer("The  Cat's hat!") == "cats hat"
    assert normalize_answer("An apple, a pear & the end.") == "apple pear end"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match_and_f1():
    assert exact_match("The Metamorphic rock.", ["metamorphic rock", "x"]) == 1.0
    assert exact_match("metamorphic", ["metamorphic rock"]) == 0.0
    # pred {big, red, dog} vs gold {red, dog, barked}: 2 shared, P = R = 2/3, F1 = 2/3
    assert token_f1("the big red dog", ["red dog barked"]) == pytest.approx(2 / 3)
    # max over gold answers: "red dog" -> P = 2/3, R = 1, F1 = 0.8
    assert token_f1("the big red dog", ["red dog barked", "red dog"]) == pytest.approx(0.8)
    # repeated tokens count once per occurrence: pred [a1 x x] gold [x] -> P 1/3... (a1 is not an article)
    assert token_f1("a1 x x", ["x"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("nothing shared", ["gold"]) == 0.0
    assert token_f1("", [""]) == 1.0 and token_f1("", ["x"]) == 0.0


def test_contains_gold_whole_words():
    assert contains_gold("It crystallizes from melt (magma and/or lava).", ["melt"]) == 1.0
    assert contains_gold("Igneously.", ["igneous"]) == 0.0
    assert contains_gold("anything", ["", "the"]) == 0.0  # a gold that normalises to nothing never matches


def test_hit_at_k_and_percentiles():
    assert hit_at_k(["a.pdf", "b.pdf", "c.pdf"], "c.pdf", 3) == 1.0
    assert hit_at_k(["a.pdf", "b.pdf", "c.pdf"], "c.pdf", 2) == 0.0
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)  # 1 + 0.95 * 3 = position 3.85
    assert percentile([7], 95) == 7 and math.isnan(percentile([], 50))


def test_gold_option():
    assert gold_option(["Paris", "The Berlin"], ["berlin"]) == 1
    assert gold_option(["Paris"], ["Rome"]) is None


class FixedSystem(System):
    """Answers from a dict, scores options by their length: countable and exact."""

    def __init__(self, name, answers, documents=None):
        self.name, self.answers, self.documents = name, answers, documents
        self.retrieves = documents is not None
        self.asked = []

    @property
    def model(self):
        return "fixed"

    def answer_many(self, questions, batch_size):
        self.asked.append(len(questions))
        return [Prediction(self.answers[q], 0.0, self.documents and self.documents[q]) for q in questions]

    def option_scores(self, question, options):
        return [-len(o) for o in options]  # the shortest option wins


QS = [
    Question("1", "q1", ["red dog"], "a.pdf", ["red dog", "a very long wrong option"]),
    Question("2", "q2", ["paris"], "b.pdf"),
    Question("3", "q3", ["seven"], None, ["seven", "six"]),
    Question("4", "q4", ["blue"], "b.pdf"),
]


def test_scores_by_hand():
    answers = {"q1": "The red dog.", "q2": "It is Paris, France", "q3": "seven", "q4": "green"}
    docs = {"q1": ["a.pdf"], "q2": ["c.pdf", "b.pdf"], "q3": ["a.pdf"], "q4": ["a.pdf"]}
    system = FixedSystem("rag", answers, docs)
    metrics, rows = score_system(system, QS, system.answer_many([q.question for q in QS], 4), k=1)
    assert metrics["exact_match"] == pytest.approx(2 / 4)  # q1, q3
    # F1: q1 1, q2 {it,is,paris,france} vs {paris} -> P 1/4 R 1 -> 0.4, q3 1, q4 0
    assert metrics["f1"] == pytest.approx((1 + 0.4 + 1 + 0) / 4)
    assert metrics["contains"] == pytest.approx(3 / 4)
    assert metrics["hit_at_k"] == pytest.approx(1 / 3) and metrics["hit_questions"] == 3  # q3 has no doc; k=1
    assert metrics["mc_accuracy"] == pytest.approx(1 / 2) and metrics["mc_questions"] == 2  # shortest: right, wrong
    assert rows[2]["mc_choice"] == "six" and rows[0]["mc_correct"] == 1.0
    assert metrics["mean_answer_words"] == pytest.approx((3 + 4 + 1 + 1) / 4)
    chat = FixedSystem("finetuned", answers)
    m2, _ = score_system(chat, QS, chat.answer_many([q.question for q in QS], 4), k=1)
    assert m2["hit_at_k"] is None and m2["hit_questions"] == 0


def test_abstention_passage_recall_and_wrong_and_confident_by_hand():
    qs = [Question("1", "q1", ["red dog"]), Question("2", "q2", ["paris"]), Question("3", "q3", ["seven"]),
          Question("4", "q4", ["x"], unanswerable=True), Question("5", "q5", ["y"], unanswerable=True)]
    preds = [
        Prediction("the red dog", 0.1, ["a.pdf"], passages=["a red dog ran"], evidence="a red dog ran"),
        Prediction("London", 0.1, ["a.pdf"], passages=["paris is big"], evidence="london calling"),  # wrong, confident
        Prediction("I don't know", 0.1, ["a.pdf"], abstained=True, passages=["nothing"], evidence="nothing"),
        Prediction("I don't know", 0.1, ["a.pdf"], abstained=True, passages=[], evidence=""),
        Prediction("something", 0.1, ["a.pdf"], passages=[], evidence="", relevance=0.71234),
    ]
    system = FixedSystem("rag", {}, {})
    m, rows = score_system(system, qs, preds, k=4)
    assert m["questions"] == 5 and m["unanswerable_questions"] == 2
    assert m["passage_recall"] == pytest.approx(2 / 3)  # q1, q2 have the gold in their chunks
    assert m["evidence_recall"] == pytest.approx(1 / 3)
    assert m["abstention_rate"] == pytest.approx(1 / 3)
    assert m["wrong_and_confident"] == pytest.approx(1 / 3)  # q2 only: q3 abstained
    assert m["unanswerable_abstained"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(1 / 3)  # unanswerable questions are not scored against their gold
    assert m["mean_answer_words"] == pytest.approx((3 + 1) / 2)  # answered questions only
    assert rows[3] == {"text": "I don't know", "seconds": 0.1, "abstained": True}
    assert rows[4]["relevance"] == 0.7123  # the gate's score, kept for unanswerable questions too (bench/rag_quality)


def test_unanswerable_flag_and_field(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "a?", "answers": ["b"]}) + "\n"
                 + json.dumps({"question": "c?", "unanswerable": True}) + "\n")
    qs = load_questions(f)
    assert [q.unanswerable for q in qs] == [False, True] and qs[1].answers == []
    assert all(q.unanswerable for q in load_questions(f, unanswerable=True))


def test_report_table_json_and_chart(tmp_path):
    answers = {q.question: q.answers[0] for q in QS}
    a = FixedSystem("rag", answers, {q.question: ["a.pdf"] for q in QS})
    b = FixedSystem("finetuned", {q.question: "no" for q in QS})
    report = evaluate(QS, [a, b], EvalConfig(batch_size=3, top_k=1), questions_file="qs.jsonl")
    assert a.asked == [3, 1]  # batches of 3
    table = report.table()
    assert "rag" in table and "100.0%" in table and "hit@1" in table and "amortised over batches of 3" in table
    data = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert data["format"] == "memchat-eval" and data["systems"]["rag"]["metrics"]["exact_match"] == 1.0
    assert data["systems"]["finetuned"]["metrics"]["hit_at_k"] is None
    assert data["predictions"][0]["rag"]["text"] == "red dog" and data["predictions"][0]["question"] == "q1"
    png = report.save_chart(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# Question files
# ---------------------------------------------------------------------------
def test_the_shared_dev_set_loads():
    qs = load_questions(QA_PDFS[0].parents[1] / "qa.jsonl")
    assert len(qs) == 49 and all(q.answers and q.doc for q in qs)
    assert len(load_questions(QA_PDFS[0].parents[1] / "qa.jsonl", limit=5)) == 5


def test_the_extractions_validation_split_loads(tmp_path):
    records = [
        {"id": "1", "question": "Q one?", "answer": "A1", "split": "validation", "document": "a.pdf"},
        {"id": "2", "question": "q ONE", "answer": "A1", "split": "validation", "document": "a.pdf"},  # variation
        {"id": "3", "question": "Q two?", "answer": "A2", "split": "train", "document": "a.pdf"},
    ]
    path = tmp_path / "faiss_training_data.json"
    path.write_text(json.dumps({"format": "memchat-training-data", "format_version": 1, "records": records}))
    qs = load_questions(path)
    assert [(q.question, q.answers, q.doc) for q in qs] == [("Q one?", ["A1"], "a.pdf")]
    path.write_text(json.dumps({"format": "memchat-training-data", "format_version": 1, "records": records[2:]}))
    with pytest.raises(DatasetError, match="no validation records"):
        load_questions(path)


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not JSON"),
    ('{"answers": ["x"]}', 'needs a "question"'),
    ('{"question": "q", "answers": []}', 'needs "answers"'),
    ('{"question": "q", "answers": ["x"], "options": ["y", "z"]}', 'none of the "options"'),
])
def test_bad_question_files(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError, match=message):
        load_questions(path)
    with pytest.raises(DatasetError, match="No question file"):
        load_questions(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------
# Building systems fails fast, before loading models
# ---------------------------------------------------------------------------
def test_build_fails_fast_with_the_fix():
    with pytest.raises(NoStoreError, match="python main.py add FILE.pdf"):
        build_systems(EvalConfig(systems=("rag",)))
    with pytest.raises(MemChatError, match="No fine-tuned model"):
        build_systems(EvalConfig(systems=("finetuned",)))
    with pytest.raises(MemChatError, match="Unknown system"):
        build_systems(EvalConfig(systems=("oracle",)))


# ---------------------------------------------------------------------------
# The command, end to end, as a user runs it
# ---------------------------------------------------------------------------
def test_eval_command_end_to_end(tmp_path, monkeypatch, capsys, tiny_gpt2_dir, tiny_qwen_dir):
    fake_embedder(monkeypatch)
    kb = make_kb(QA_PDFS[:2])
    make_finetuned(tiny_gpt2_dir, documents=lineage_of(kb)[:1])  # trained before the second document
    qfile = tmp_path / "qs.jsonl"
    rows = [
        {"question": "An igneous rock is a rock that crystallizes from what?", "answers": ["melt"],
         "doc": QA_PDFS[0].name, "options": ["melt", "ice", "salt water"]},
        {"question": "What is a prime number?", "answers": ["a natural number greater than 1"], "doc": QA_PDFS[1].name},
        {"question": "Who wrote the report?", "answers": ["nobody"]},
    ]
    qfile.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out" / "run"
    code, stdout, stderr = run_script(monkeypatch, capsys, "--eval", str(qfile), "--rag-model", str(tiny_qwen_dir),
                                      "--max-new-tokens", "6", "--out", str(out))
    assert code == 0, stderr
    assert "older than the knowledge base" in stderr  # the staleness notice reaches the user
    for name in ("base", "finetuned", "rag", "hybrid"):
        assert f"\n{name} " in stdout
    assert "3 questions (2 with a gold document, 1 with options, 0 unanswerable)" in stdout
    data = json.loads((tmp_path / "out" / "run.json").read_text())
    assert list(data["systems"]) == ["base", "finetuned", "rag", "hybrid"]
    for name, s in data["systems"].items():
        m = s["metrics"]
        assert m["questions"] == 3 and m["mc_questions"] == 1 and m["latency_p50_s"] > 0
        assert (m["hit_at_k"] is None) == (name in ("base", "finetuned"))
    # the same tiny model as base and fine-tuned (random weights, same prompt): same answers
    assert [p["base"]["text"] for p in data["predictions"]] == [p["finetuned"]["text"] for p in data["predictions"]]
    assert all(p["rag"]["citations"] for p in data["predictions"])
    for p in data["predictions"]:  # the abstention gate's score: on the RAG and hybrid rows, not closed-book ones
        assert isinstance(p["rag"]["relevance"], float) and isinstance(p["hybrid"]["relevance"], float)
        assert "relevance" not in p["base"] and "relevance" not in p["finetuned"]
    assert (tmp_path / "out" / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_out_with_or_without_an_extension_names_one_json_and_one_png(tmp_path):
    from memchat.evaluate import output_paths

    for given in ("run", "run.json", "run.PNG"):
        assert output_paths(tmp_path / given) == (tmp_path / "run.json", tmp_path / "run.png")
    assert output_paths("a/v1.2") == (Path("a/v1.2.json"), Path("a/v1.2.png"))  # a dot in the name is kept


def test_eval_command_without_store_is_one_line(tmp_path, monkeypatch, capsys):
    qfile = tmp_path / "qs.jsonl"
    qfile.write_text('{"question": "q", "answers": ["a"]}\n')
    code, stdout, stderr = run_script(monkeypatch, capsys, "--eval", str(qfile), "--systems", "rag")
    assert code == 1 and stderr.count("\n") == 2  # the settings line, then the error line
    assert stderr.splitlines()[-1].startswith("error: No documents in the knowledge base")
