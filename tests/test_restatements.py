"""memchat.restatements: generator-free training items from a chunk's sentences."""

from __future__ import annotations

from memchat import restatements as R

TEXT = [
    "In 1867, James Clerk Maxwell proposed the theory of electromagnetism at King's College.",
    "The river is 1,230 km long and passes through six countries.",
    "Maxwell later moved to Cambridge where he founded the Cavendish Laboratory.",
    "Maxwell also wrote a treatise on electricity that James Clerk Maxwell revised in 1873.",
    "of the basin, which continues south.",  # the tail of a sentence cut at a chunk's start
    "Short line.",
]


def test_wh_and_cloze_items_ask_for_one_span_of_the_sentence():
    items = R.restate(TEXT)
    wh = [i for i in items if i.kind == "wh"]
    cloze = [i for i in items if i.kind == "cloze"]
    assert wh and len(wh) == len(cloze)
    for i in wh + cloze:
        assert i.answer_kind in ("date", "number", "name", "phrase") and len(i.answer.split()) <= 8
        words = set(" ".join(TEXT).replace(",", " ").replace(".", " ").split())
        asked = set(i.question.replace("?", " ").replace(",", " ").replace(".", " ").replace("___", " ").split())
        assert asked - words <= {"When", "Who", "What", "How", "many", "when", "who", "what", "how", "Fill", "blank:"}
    pairs = {(i.question, i.answer) for i in wh}
    assert ("When James Clerk Maxwell proposed the theory of electromagnetism at King's College?", "1867") in pairs
    assert ("The river is 1,230 km long and passes through how many countries?", "six") in pairs
    assert any(i.question == "Fill in the blank: In ___, James Clerk Maxwell proposed the theory of electromagnetism "
               "at King's College." and i.answer == "1867" for i in cloze)
    # a name inside a sentence is asked with "what" (a place or a body as often as a person)
    assert any(i.question.endswith("founded the what?") and i.answer == "Cavendish Laboratory" for i in wh)


def test_about_and_fact_list_items_answer_with_sentences():
    items = R.restate(TEXT)
    about = [i for i in items if i.kind == "about"]
    assert about and all(i.question.startswith("What does the document say about ") and i.answer in TEXT for i in about)
    facts = [i for i in items if i.kind == "facts"]
    (jcm,) = [i for i in facts if "James Clerk Maxwell" in i.question]
    assert jcm.answer.splitlines() == ["- " + TEXT[0], "- " + TEXT[3]]  # every sentence naming him, as a list
    assert not R.restate(TEXT, fact_lists=False) or all(i.kind != "facts" for i in R.restate(TEXT, fact_lists=False))


def test_fragments_and_short_pieces_give_nothing_and_questions_are_unique():
    items = R.restate(TEXT)
    assert not any("basin" in i.question or "Short line" in i.question for i in items)
    keys = [R.normalize(i.question) for i in items]
    assert len(keys) == len(set(keys))
    assert len([i for i in R.restate(TEXT, spans_per_sentence=1) if i.kind == "wh"]) < len(
        [i for i in items if i.kind == "wh"])
    assert R.restate([]) == []


def test_template_paraphrases_are_deterministic_framings():
    q = "What is the capital of France?"
    a = R.template_paraphrases(q, 2)
    assert a == R.template_paraphrases(q, 2) and len(set(a)) == 2
    assert all("capital of France" in v and v != q for v in a)
    assert R.template_paraphrases(q, 0) == [] and len(R.template_paraphrases(q, 99)) == 5


def test_probe_items_ask_for_the_spans_no_training_item_asks_for():
    trained = R.restate(TEXT, spans_per_sentence=2)
    probes = R.probe_items(TEXT, spans_per_sentence=2)
    pairs = {(p.question, p.answer) for p in probes}
    # the trained items of "In 1867, James Clerk Maxwell proposed ..." ask for 1867 and the name; the probes
    # ask for the rest of that sentence
    assert ("In 1867, James Clerk Maxwell proposed the theory of electromagnetism at what?", "King's College") in pairs
    assert ("The what is 1,230 km long and passes through six countries?", "river") in pairs
    asked = {(R.normalize(t.question), t.answer) for t in trained}
    assert all(p.kind == "wh" and p.answer_kind for p in probes)
    assert not any(R.normalize(p.question) in {q for q, _ in asked} for p in probes)
    assert not {a for _, a in asked if a in ("1867", "1,230 km", "six")} & {p.answer for p in probes}
    # every span trained: nothing left to probe; fragments give nothing
    assert R.probe_items(TEXT, spans_per_sentence=99) == []
    assert not any("basin" in p.question for p in probes)
    # one more trained span per sentence: those spans leave the probes
    fewer = R.probe_items(TEXT, spans_per_sentence=3)
    assert {p.question for p in fewer} < {p.question for p in probes}
