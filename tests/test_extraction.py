"""FAISSDataExtractor and extract_faiss_data.py: files, lineage, split, resume, incremental runs, errors."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memchat import config, formats, qa, restatements, text
from memchat.config import ExtractConfig
from memchat.extraction import PROGRESS_FILENAME, FAISSDataExtractor
from memchat.knowledge import KnowledgeBase
from tests.fakes import FakeEmbedder
from tests.qa_fakes import ScriptedGenerator

REPO = Path(__file__).resolve().parents[1]
QA_PDFS = sorted((REPO.parent / "shared" / "data" / "qa_dev" / "pdfs").glob("*.pdf"))
SCRIPT = REPO / "extract_faiss_data.py"


def make_kb(pdfs=QA_PDFS[:2]) -> KnowledgeBase:
    k = KnowledgeBase(embedder=FakeEmbedder())
    if pdfs:
        assert all(r.status in ("added", "updated") for r in k.add_documents(pdfs))
    return k


def extractor(k, gen=None, out=None, **cfg) -> FAISSDataExtractor:
    cfg.setdefault("batch_size", 3)
    return FAISSDataExtractor(k, gen or ScriptedGenerator(), embedder=k._embedder, output_dir=out,
                              extract_config=ExtractConfig(**cfg), progress=False)


def load(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def question_prompts(gen: ScriptedGenerator) -> list[str]:
    """The chunk texts the generator was asked for questions about."""
    return [m[-1]["content"].split('"""')[1].strip() for m in gen.prompts if m[0]["content"] == qa.QUESTION_SYSTEM]


def run_script(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# ---------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------
def test_dataset_and_stats_files():
    k = make_kb()
    gen = ScriptedGenerator()
    ex = extractor(k, gen)
    path = ex.create_training_dataset(max_pairs_per_chunk=3, augment=True)
    assert path == config.training_dir() / config.DATASET_FILENAME
    doc = load(path)
    assert doc["format"] == "memchat-training-data" and doc["format_version"] == formats.DATASET_FORMAT_VERSION
    assert doc["generator_model"] == "tests/scripted-model" and doc["created"]
    assert doc["settings"]["max_pairs_per_chunk"] == 3 and doc["settings"]["augment"] is True
    state = k.state()
    assert doc["lineage"]["store_generation"] == state.generation
    assert {d["name"]: (d["version"], d["sha256"]) for d in doc["lineage"]["documents"]} == {
        d["name"]: (d["version"], d["sha256"]) for d in k.documents()
    }
    chunks = {c["id"]: c for c in k.chunks()}
    every = doc["records"]
    assert every and len({r["id"] for r in every}) == len(every)
    by_kind = {}
    for r in every:
        by_kind.setdefault(r["kind"], []).append(r)
    assert set(by_kind) <= set(formats.KINDS) and {"document", "original", "variation", "wh", "cloze", "about"} <= set(by_kind)
    # (a) one document record per chunk, its own text, in training
    assert sorted(r["chunk_id"] for r in by_kind["document"]) == sorted(chunks)
    for r in by_kind["document"]:
        assert r["text"] == qa.flatten(chunks[r["chunk_id"]]["text"]) and r["split"] == "train"
    # (d) restatements: a short span of the chunk's text; the wh question no longer holds it
    for r in by_kind["wh"] + by_kind["cloze"]:
        # in training, but for the span probes (validation wh questions, family "p...")
        assert r["answer"] in " ".join(chunks[r["chunk_id"]]["text"].split())
        assert r["split"] == ("validation" if r.get("family", "").startswith("p") else "train")
        assert r["answer_kind"] in ("date", "number", "name", "phrase") and len(r["answer"].split()) <= 8
    for r in by_kind["cloze"]:
        assert "___" in r["question"]
    records = [r for r in every if r["kind"] in ("original", "variation")]
    fields = {"id", "question", "answer", "kind", "source_question_id", "split", "document", "doc_version",
              "page_start", "page_end", "chunk_id", "chunk_hash", "family"}
    originals = {r["source_question_id"]: r for r in records if r["kind"] == "original"}
    for r in records:
        assert fields <= set(r)
        c = chunks[r["chunk_id"]]
        assert (r["document"], r["doc_version"], r["page_start"], r["page_end"], r["chunk_hash"]) == (
            c["document"], c["version"], c["page_start"], c["page_end"], c["hash"])
        assert r["kind"] in ("original", "variation") and r["split"] in ("train", "validation")
        assert r["question"].endswith("?") and r["answer"].strip()
        src = originals[r["source_question_id"]]
        assert src["answer"] == r["answer"] and src["chunk_id"] == r["chunk_id"]
    # the scripted model's made-up answers were repaired from the text, and counted
    assert {r["answer_source"] for r in records} == {"model", "extractive"}
    for r in records:
        if r["answer_source"] == "extractive":
            assert r["answer"] in chunks[r["chunk_id"]]["text"].replace("\n", " ") or r["answer"][:40] in " ".join(
                chunks[r["chunk_id"]]["text"].split())

    stats = load(config.training_dir() / config.STATS_FILENAME)
    o = stats["overall"]
    assert o["chunks"] == len(chunks) and o["records"] == len(every)
    assert o["records_by_kind"] == {k: len(v) for k, v in sorted(by_kind.items())}
    assert sum(o["span_answers_by_kind"].values()) == len(by_kind["wh"]) + len(by_kind["cloze"])
    assert o["questions_kept"] == len(originals) and o["variations_kept"] == len(records) - len(originals)
    assert o["answers"]["model"] + o["answers"]["extractive"] >= o["questions_kept"]
    assert o["answers"]["extractive"] >= 1 and o["dropped"]["answers_parse"]["not_grounded"] >= 1
    assert o["dropped"]["questions"]["about_the_text"] >= 1  # "What does the text say?"
    assert o["retry_prompts"] >= 1 and o["questions_from_retry"] >= 1
    assert o["repaired"]["questions"]["label_removed"] >= 1
    assert set(stats["documents"]) == {p.name for p in QA_PDFS[:2]}
    assert sum(d["records"] for d in stats["documents"].values()) == len(every)
    run = stats["run"]
    assert run["chunks_generated"] == len({c["hash"] for c in chunks.values()}) and run["chunks_reused"] == 0
    assert run["generated_tokens"] == gen.stats.new_tokens > 0 and run["tokens_per_s"] > 0
    # few generate calls: at most one per stage (questions, retry, answers, paraphrases) per group of chunks
    groups = -(-len(chunks) // 3)
    assert gen.calls == run["generate_calls"] <= 4 * groups
    # the two files, the progress file and the exports for other trainers; all owner-only
    folder = config.training_dir()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        [config.DATASET_FILENAME, config.STATS_FILENAME, PROGRESS_FILENAME, "train.jsonl", "validation.jsonl",
         "documents.jsonl"])
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir() if not p.name.startswith("."))


def test_no_augment_and_pairs_limit():
    k = make_kb(QA_PDFS[:1])
    ex = extractor(k)
    doc = load(ex.create_training_dataset(max_pairs_per_chunk=1, augment=False))
    assert {r["kind"] for r in doc["records"]} & {"original", "variation"} == {"original"}
    per_chunk = {}
    for r in doc["records"]:
        if r["kind"] != "original":
            continue
        per_chunk[r["chunk_id"]] = per_chunk.get(r["chunk_id"], 0) + 1
    assert max(per_chunk.values()) == 1
    with pytest.raises(Exception, match="1 to 5"):
        extractor(k).create_training_dataset(max_pairs_per_chunk=6)


def test_family_split_trains_every_chunk_and_never_leaks_a_family():
    k = make_kb(QA_PDFS)
    doc = load(extractor(k, validation_families_per_chunk=1).create_training_dataset())
    records = doc["records"]
    qa_records = [r for r in records if r["kind"] in ("original", "variation")]
    by_family = {}
    for r in qa_records:
        by_family.setdefault(r["family"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_family.values())  # a question and all its paraphrases: one side
    # every chunk is trained on (its text at least), validation chunks included
    chunk_hashes = {c["hash"] for c in k.chunks()}
    assert {r["chunk_hash"] for r in records if r["split"] == "train"} == chunk_hashes
    val = [r for r in qa_records if r["split"] == "validation"]
    assert val and {r["chunk_hash"] for r in val} <= {r["chunk_hash"] for r in records if r["kind"] == "original"
                                                      and r["split"] == "train"}
    # one family per chunk with two or more, exactly
    families = {}
    for r in qa_records:
        if r["kind"] == "original":
            families.setdefault(r["chunk_hash"], []).append(r["split"])
    for h, splits in families.items():
        assert splits.count("validation") == (1 if len(splits) >= 2 else 0), (h, splits)
    # no validation question (or paraphrase) appears in training in any kind
    train_q = {qa.normalize(r["question"]) for r in records if r["split"] == "train" and "question" in r}
    assert not any(qa.normalize(r["question"]) in train_q for r in val)
    # the messages exports load with datasets, in the split the dataset says
    from datasets import load_dataset

    folder = config.training_dir()
    ds = load_dataset("json", data_files={"train": str(folder / "train.jsonl"),
                                          "validation": str(folder / "validation.jsonl")})
    assert len(ds["validation"]) == sum(1 for r in records if r["split"] == "validation")
    assert len(ds["train"]) == sum(1 for r in records if r["split"] == "train" and r["kind"] != "document")
    row = ds["validation"][0]["messages"]
    assert [m["role"] for m in row] == ["user", "assistant"] and row[0]["content"] == val[0]["question"]
    # the same split on a second run, and with two families per chunk the first stays validation
    again = load(extractor(k, validation_families_per_chunk=1).create_training_dataset())
    assert [(r["id"], r["split"]) for r in again["records"]] == [(r["id"], r["split"]) for r in records]
    two = load(extractor(k, validation_families_per_chunk=2).create_training_dataset())
    val2 = {r["id"] for r in two["records"] if r["split"] == "validation"}
    assert {r["id"] for r in val} <= val2


def test_without_a_generator_documents_and_restatements_only():
    k = make_kb(QA_PDFS[:1])
    gen = ScriptedGenerator()
    ex = extractor(k, gen, generate_questions=False)
    doc = load(ex.create_training_dataset())
    assert gen.calls == 0
    kinds = {r["kind"] for r in doc["records"]}
    assert "document" in kinds and kinds <= {"document", "wh", "cloze", "about", "facts"}
    val = [r for r in doc["records"] if r["split"] == "validation"]
    assert val and all(r["kind"] == "wh" and r["family"].startswith("p") for r in val)  # the span probes only


def test_span_probes_are_held_out_questions_and_take_nothing_from_training():
    k = make_kb(QA_PDFS)
    with_probes = load(extractor(k, probe_questions_per_chunk=2).create_training_dataset())["records"]
    without = load(extractor(k, probe_questions_per_chunk=0).create_training_dataset())["records"]
    probes = [r for r in with_probes if r.get("family", "").startswith("p")]
    assert probes and all(r["split"] == "validation" and r["kind"] == "wh" for r in probes)
    assert not any(r.get("family", "").startswith("p") for r in without)
    # the same training records either way: nothing is taken out of training for the probes
    assert [r for r in with_probes if r["split"] == "train"] == [r for r in without if r["split"] == "train"]
    per_chunk = {}
    for r in probes:
        per_chunk[r["chunk_hash"]] = per_chunk.get(r["chunk_hash"], 0) + 1
    assert max(per_chunk.values()) <= 2
    assert len({qa.normalize(r["question"]) for r in probes}) == len(probes)  # overlapping chunks: asked once
    train = [r for r in with_probes if r["split"] == "train"]
    train_q = {qa.normalize(r["question"]) for r in train if "question" in r}
    for p in probes:
        assert qa.normalize(p["question"]) not in train_q
        # no trained item asks for this answer in this sentence: a trained cloze's sentence, asked the probe's way
        for r in train:
            if r["kind"] == "cloze" and r["answer"] == p["answer"] and r["chunk_hash"] == p["chunk_hash"]:
                sentence = r["question"].removeprefix("Fill in the blank: ").replace("___", r["answer"], 1)
                start = r["question"].removeprefix("Fill in the blank: ").index("___")
                span = next(sp for sp in text.answer_spans(sentence) if sp.start == start and sp.text == r["answer"])
                assert restatements.wh_question(sentence, span) != p["question"]
        # its chunk is trained on
        assert any(r["kind"] == "document" and r["chunk_hash"] == p["chunk_hash"] for r in train)
    again = load(extractor(k, probe_questions_per_chunk=2).create_training_dataset())["records"]
    # the trainer reads them as validation, beside the families
    from memchat.training_data import load_training_data

    assert {r["id"] for r in probes} <= {r["id"] for r in load_training_data(config.training_dir()).validation}
    assert [r["id"] for r in again if r["split"] == "validation"] == [r["id"] for r in with_probes if r["split"] == "validation"]


def test_paraphrases_fill_up_with_framings_when_the_generator_writes_too_few():
    k = make_kb(QA_PDFS[:1])
    doc = load(extractor(k, variations_per_question=4).create_training_dataset())
    var = [r for r in doc["records"] if r["kind"] == "variation"]
    sources = {r["paraphrase_source"] for r in var}
    assert sources == {"model", "template"}  # the scripted model writes 3 candidates; framings make up 4
    per_family = {}
    for r in var:
        per_family[r["family"]] = per_family.get(r["family"], 0) + 1
    assert set(per_family.values()) == {4}
    originals = {r["family"]: r for r in doc["records"] if r["kind"] == "original"}
    for r in var:
        assert r["split"] == originals[r["family"]]["split"] and r["answer"] == originals[r["family"]]["answer"]
    off = load(extractor(k, variations_per_question=4, template_paraphrases=False).create_training_dataset())
    assert all(r.get("paraphrase_source") == "model" for r in off["records"] if r["kind"] == "variation")


def test_encrypted_training_data_round_trips(tmp_path):
    from memchat.training_data import load_training_data

    k = make_kb(QA_PDFS[:1])
    path = extractor(k, encrypt=True).create_training_dataset()
    raw = path.read_bytes()
    assert raw.startswith(b"gAAAAA") and b"question" not in raw
    for name in ("train.jsonl", "training_stats.json", PROGRESS_FILENAME):
        assert b"question" not in (config.training_dir() / name).read_bytes()
    data = load_training_data(path)  # the trainer reads it with the store's key
    assert data.train and all(r.get("question") or r.get("text") for r in data.train)
    # resuming reads the encrypted progress file: nothing is generated again
    gen = ScriptedGenerator()
    extractor(k, gen, encrypt=True).create_training_dataset()
    assert gen.calls == 0


# ---------------------------------------------------------------------------
# Resume and incremental runs
# ---------------------------------------------------------------------------
def _strip(doc: dict) -> list[dict]:
    return doc["records"]


def _no_split(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "split"} for r in records]


def test_resume_after_a_crash_redoes_nothing_and_matches(tmp_path):
    k = make_kb(QA_PDFS[:3])
    clean = load(extractor(k, out=tmp_path / "clean").create_training_dataset())

    crashing = ScriptedGenerator(fail_after_calls=5)  # mid-way through the second group
    with pytest.raises(RuntimeError, match="injected"):
        extractor(k, crashing).create_training_dataset()
    progress_file = config.training_dir() / PROGRESS_FILENAME
    done = [json.loads(line)["hash"] for line in progress_file.read_text().splitlines()]
    assert 0 < len(done) < len({c["hash"] for c in k.chunks()})
    assert not (config.training_dir() / config.DATASET_FILENAME).exists()

    again = ScriptedGenerator()
    ex = extractor(k, again)
    resumed = load(ex.create_training_dataset())
    asked = question_prompts(again)
    texts_done = {qa.flatten(c["text"]) for c in k.chunks() if c["hash"] in done}
    assert not texts_done & set(asked)  # finished chunks were not asked again
    assert ex.report.chunks_reused == len(done)
    assert _strip(resumed) == _strip(clean)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    k = make_kb(QA_PDFS[:3])
    driver = textwrap.dedent(
        """
        import sys
        from memchat.config import ExtractConfig
        from memchat.extraction import FAISSDataExtractor
        from memchat.knowledge import KnowledgeBase
        from tests.fakes import FakeEmbedder
        from tests.qa_fakes import ScriptedGenerator
        emb = FakeEmbedder()
        ex = FAISSDataExtractor(KnowledgeBase(embedder=emb), ScriptedGenerator(delay=0.15), embedder=emb,
                                extract_config=ExtractConfig(batch_size=3), progress=False,
                                on_group_done=lambda n, _: print("group", n, flush=True))
        ex.create_training_dataset()
        print("finished", flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", driver], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("group 1"), (line, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(0.2)  # somewhere inside the second group
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    progress_file = config.training_dir() / PROGRESS_FILENAME
    done = {json.loads(line)["hash"] for line in progress_file.read_text().splitlines() if line.strip()}
    assert 0 < len(done) < len({c["hash"] for c in k.chunks()})

    gen = ScriptedGenerator()
    ex = extractor(k, gen)
    resumed = load(ex.create_training_dataset())
    assert len(question_prompts(gen)) == len({c["hash"] for c in k.chunks()}) - len(done)
    clean = load(extractor(k, out=tmp_path / "clean").create_training_dataset())
    assert _strip(resumed) == _strip(clean)


def test_incremental_runs_touch_only_changed_chunks():
    k = make_kb(QA_PDFS[:2])
    first = load(extractor(k).create_training_dataset())
    old_hashes = {c["hash"] for c in k.chunks()}

    # nothing changed: no generation at all, same records
    gen = ScriptedGenerator()
    ex = extractor(k, gen)
    assert _strip(load(ex.create_training_dataset())) == _strip(first)
    assert gen.calls == 0 and ex.report.chunks_generated == 0

    # a new document: only its chunks are generated; earlier records are kept as they were
    k.add_documents(QA_PDFS[2:3])
    gen = ScriptedGenerator()
    second = load(extractor(k, gen).create_training_dataset())
    new_chunks = [c for c in k.chunks() if c["document"] == QA_PDFS[2].name]
    assert sorted(question_prompts(gen)) == sorted({qa.flatten(c["text"]) for c in new_chunks if c["hash"] not in old_hashes})
    old_records = [r for r in second["records"] if r["document"] != QA_PDFS[2].name]
    # (the split may move only through the "at least one validation chunk" rule of a tiny store)
    assert _no_split(old_records) == _no_split(first["records"])
    assert any(r["document"] == QA_PDFS[2].name for r in second["records"])

    # a changed document (new version, other content): its new chunks only; old version's records gone
    k.add_documents([(QA_PDFS[0].name, QA_PDFS[3].read_bytes())])
    gen = ScriptedGenerator()
    third = load(extractor(k, gen).create_training_dataset())
    v2 = [c for c in k.chunks() if c["document"] == QA_PDFS[0].name]
    assert {c["version"] for c in v2} == {2}
    known = {json.loads(x)["hash"] for x in (config.training_dir() / PROGRESS_FILENAME).read_text().splitlines()}
    assert len(question_prompts(gen)) <= len(v2)
    assert all(r["doc_version"] == 2 for r in third["records"] if r["document"] == QA_PDFS[0].name)
    assert {r["chunk_id"] for r in third["records"]} <= {c["id"] for c in k.chunks()}

    # a removed document: no generation; its records and its progress lines are gone
    removed_hashes = {c["hash"] for c in k.chunks() if c["document"] == QA_PDFS[1].name}
    k.remove(QA_PDFS[1].name)
    gen = ScriptedGenerator()
    fourth = load(extractor(k, gen).create_training_dataset())
    assert gen.calls == 0
    assert not any(r["document"] == QA_PDFS[1].name for r in fourth["records"])
    assert QA_PDFS[1].name not in {d["name"] for d in fourth["lineage"]["documents"]}
    known = {json.loads(x)["hash"] for x in (config.training_dir() / PROGRESS_FILENAME).read_text().splitlines()}
    assert not (removed_hashes - {c["hash"] for c in k.chunks()}) & known


def test_settings_change_regenerates_and_restart_starts_over():
    k = make_kb(QA_PDFS[:1])
    n_chunks = len({c["hash"] for c in k.chunks()})
    extractor(k).create_training_dataset()
    gen = ScriptedGenerator()
    extractor(k, gen).create_training_dataset(max_pairs_per_chunk=2)  # other settings: other results
    assert len(question_prompts(gen)) == n_chunks
    gen = ScriptedGenerator()
    extractor(k, gen).create_training_dataset(max_pairs_per_chunk=2, restart=True)
    assert len(question_prompts(gen)) == n_chunks
    gen = ScriptedGenerator()
    ex = extractor(k, gen)
    ex.create_training_dataset(max_pairs_per_chunk=2, max_chunks=1)
    assert gen.calls == 0 and ex.report.chunks_selected == 1 and ex.report.records > 0


def test_max_chunks_limits_the_work():
    k = make_kb(QA_PDFS[:2])
    gen = ScriptedGenerator()
    ex = extractor(k, gen)
    doc = load(ex.create_training_dataset(max_chunks=2))
    first_two = [c["id"] for c in k.chunks()[:2]]
    assert {r["chunk_id"] for r in doc["records"]} <= set(first_two)
    assert len(question_prompts(gen)) == 2
    # the rest later, reusing those two
    gen = ScriptedGenerator()
    ex = extractor(k, gen)
    ex.create_training_dataset()
    assert ex.report.chunks_reused == 2 and len(question_prompts(gen)) == len({c["hash"] for c in k.chunks()}) - 2


def test_reader_answers_the_questions_without_generating():
    """answer_writer="reader": each answer is a span of its chunk, no answer prompt is generated, and no
    question the model-written path keeps is lost."""
    k = make_kb(QA_PDFS[:1])
    chunks = {c["id"]: " ".join(c["text"].split()) for c in k.chunks()}
    model_gen, reader_gen = ScriptedGenerator(), ScriptedGenerator()
    written = extractor(k, model_gen, out=config.training_dir() / "model", answer_writer="model")
    written.create_training_dataset()
    ex = extractor(k, reader_gen, out=config.training_dir() / "reader", answer_writer="reader")
    doc = load(ex.create_training_dataset())
    assert any(m[0]["content"] == qa.ANSWER_SYSTEM for m in model_gen.prompts)
    assert not any(m[0]["content"] == qa.ANSWER_SYSTEM for m in reader_gen.prompts)
    originals = [r for r in doc["records"] if r["kind"] == "original"]
    assert originals and all(r["answer_source"] in ("reader", "extractive") for r in originals)
    read = [r for r in originals if r["answer_source"] == "reader"]
    assert len(read) >= len(originals) / 2
    for r in read:
        assert r["answer"] in chunks[r["chunk_id"]] and len(r["answer"].split()) < 20
    o, run = ex.report.stats["overall"], ex.report.stats["run"]
    assert o["answers"]["reader"] == len(read) and o["answers"]["model"] == 0
    assert o["questions_kept"] >= written.report.stats["overall"]["questions_kept"]
    assert "reading" in run["stage_seconds"] and "answering" not in run["stage_seconds"]
    assert "answering" in written.report.stats["run"]["stage_seconds"]
    assert run["generate_calls"] < written.report.stats["run"]["generate_calls"]


def test_sentence_answers_are_the_repair_without_an_answer_stage():
    """answer_writer="sentence": every answer is the chunk sentence a failed written answer would get, with no
    answer prompt; the questions are the model path's."""
    k = make_kb(QA_PDFS[:1])
    model_gen, gen = ScriptedGenerator(), ScriptedGenerator()
    written = extractor(k, model_gen, out=config.training_dir() / "model", answer_writer="model")
    before = load(written.create_training_dataset())
    ex = extractor(k, gen, out=config.training_dir() / "sentence", answer_writer="sentence")
    doc = load(ex.create_training_dataset())
    assert not any(m[0]["content"] == qa.ANSWER_SYSTEM for m in gen.prompts)
    originals = [r for r in doc["records"] if r["kind"] == "original"]
    assert originals and {r["answer_source"] for r in originals} == {"extractive"}
    repaired = {r["question"]: r["answer"] for r in before["records"]
                if r["kind"] == "original" and r["answer_source"] == "extractive"}
    assert repaired and all(r["answer"] == repaired[r["question"]] for r in originals if r["question"] in repaired)
    assert {r["question"] for r in originals} == {r["question"] for r in before["records"] if r["kind"] == "original"}
    assert "picking" in ex.report.stats["run"]["stage_seconds"]


def test_template_paraphrases_need_no_paraphrase_stage():
    k = make_kb(QA_PDFS[:1])
    gen = ScriptedGenerator()
    ex = extractor(k, gen, paraphrase_writer="template", variations_per_question=2)
    doc = load(ex.create_training_dataset())
    assert not any(m[-1]["content"].startswith("Rewrite the question below") for m in gen.prompts)
    variations = [r for r in doc["records"] if r["kind"] == "variation"]
    originals = [r for r in doc["records"] if r["kind"] == "original"]
    assert len(variations) == 2 * len(originals) > 0  # framings make up both
    assert {r["paraphrase_source"] for r in variations} == {"template"}
    assert "paraphrasing" not in ex.report.stats["run"]["stage_seconds"]


def test_answer_writer_auto_and_its_progress_key(tiny_gpt2_dir, torch_single_thread):
    """auto: the reader for a small in-process model, the model for one without local weights (an engine,
    here the scripted stand-in); the writer is part of the progress key, so switching regenerates."""
    from memchat.generation import Generator

    k = make_kb(QA_PDFS[:1])
    small, engine = extractor(k, Generator(str(tiny_gpt2_dir))), extractor(k, ScriptedGenerator())
    assert (small.answer_writer(), small.paraphrase_writer()) == ("sentence", "template")
    assert (engine.answer_writer(), engine.paraphrase_writer()) == ("model", "model")
    with pytest.raises(Exception, match="answer_writer must be one of"):
        extractor(k, answer_writer="nobody").create_training_dataset()
    n_chunks = len({c["hash"] for c in k.chunks()})
    extractor(k, answer_writer="model").create_training_dataset()
    gen = ScriptedGenerator()
    extractor(k, gen, answer_writer="model").create_training_dataset()
    assert gen.calls == 0  # same settings: all reused
    extractor(k, gen, answer_writer="reader").create_training_dataset()
    assert len(question_prompts(gen)) == n_chunks


def test_real_generator_tiny_qwen_never_crashes(tiny_qwen_dir, torch_single_thread):
    """The real batched Generator on a random tiny model: gibberish in, counted drops out."""
    from memchat.generation import Generator

    k = make_kb(QA_PDFS[:1])
    gen = Generator(str(tiny_qwen_dir))
    cfg = dict(batch_size=4, max_new_tokens=24, answer_max_new_tokens=24, max_pairs_per_chunk=2, variations_per_question=1)
    ex = extractor(k, gen, **cfg)
    ex.create_training_dataset(max_chunks=2)
    run = ex.report.stats["run"]
    assert 1 <= gen.stats.calls and run["generate_calls"] <= 4
    assert run["generated_tokens"] > 0
    o = ex.report.stats["overall"]
    assert o["records"] == ex.report.records
    assert sum(o["dropped_total"].values()) > 0  # gibberish is dropped, by cause


# ---------------------------------------------------------------------------
# The script's errors
# ---------------------------------------------------------------------------
def test_script_without_store(monkeypatch, capsys):
    code, out, err = run_script(monkeypatch, capsys, "--quiet")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "python main.py add FILE.pdf" in lines[0]
    assert not (config.training_dir() / config.DATASET_FILENAME).exists()


def test_script_with_empty_store(monkeypatch, capsys):
    k = make_kb(QA_PDFS[:1])
    k.remove(QA_PDFS[0].name)
    code, out, err = run_script(monkeypatch, capsys, "--quiet")
    assert code == 1
    assert "no documents" in err and "python main.py add FILE.pdf" in err and len(err.strip().splitlines()) == 1


def test_script_with_wrong_key(monkeypatch, capsys):
    from cryptography.fernet import Fernet

    make_kb(QA_PDFS[:1])
    monkeypatch.setenv("MEMCHAT_KEY", Fernet.generate_key().decode())
    code, out, err = run_script(monkeypatch, capsys, "--quiet")
    assert code == 1
    assert "does not open the store" in err and len(err.strip().splitlines()) == 1


def test_script_help_lists_grouped_flags(monkeypatch, capsys):
    code, out, _ = run_script(monkeypatch, capsys, "--help")
    assert code == 0
    for flag in ("--model", "--pairs-per-chunk", "--no-augment", "--batch-size", "--max-chunks", "--output-dir",
                 "--resume", "--restart"):
        assert flag in out
    assert "what to generate" in out and "output and resuming" in out


@pytest.mark.slow
def test_end_to_end_bundled_model_via_script(monkeypatch, capsys, torch_single_thread):
    """A user's run: a real PDF, the real embedder, the bundled SmolLM2 (offline fallback), two chunks."""
    KnowledgeBase().add_documents(QA_PDFS[:1])
    code, out, err = run_script(monkeypatch, capsys, "--max-chunks", "2", "--pairs-per-chunk", "1", "--variations", "1",
                                "--quiet")
    assert code == 0, err
    assert "SmolLM2-135M-Instruct" in err  # the one visible fallback notice
    doc = load(config.training_dir() / config.DATASET_FILENAME)
    stats = load(config.training_dir() / config.STATS_FILENAME)
    assert doc["generator_model"] == config.BUNDLED_LLM_NAME
    assert stats["run"]["chunks_generated"] == 2 and stats["run"]["generated_tokens"] > 0
    assert doc["records"], stats["overall"]
    chunk_words = {c["id"]: qa.content_words(c["text"]) for c in KnowledgeBase().chunks()}
    for r in (r for r in doc["records"] if r["kind"] in ("original", "variation")):
        assert r["question"].endswith("?") and r["answer"]
        assert r["document"] == QA_PDFS[0].name and r["chunk_id"] in chunk_words
        assert qa.share_in(r["answer"], chunk_words[r["chunk_id"]]) >= 0.4  # grounded in its chunk
    # auto: the bundled 135M model writes the questions only; each answer is the chunk's best sentence
    assert {r["answer_source"] for r in doc["records"] if r["kind"] == "original"} == {"extractive"}
    assert stats["overall"]["answers"]["model"] == 0 and "picking" in stats["run"]["stage_seconds"]
    assert "records:" in out and "not encrypted" in out


class _RetryOnly(ScriptedGenerator):
    """Writes no question from a whole chunk; every stricter one-sentence retry gives one."""

    def _questions(self, user: str) -> str:
        return "I am not sure what you want."


@pytest.mark.parametrize("spare", [0, 1])
def test_the_retry_asks_spare_sentences_but_keeps_only_what_was_asked(spare):
    k = make_kb(QA_PDFS[:1])
    gen = _RetryOnly()
    ex = extractor(k, gen, max_pairs_per_chunk=2, retry_spare_sentences=spare, augment=False)
    ex.create_training_dataset(max_pairs_per_chunk=2, augment=False)
    retries = [m for m in gen.prompts if m[-1]["content"].startswith("Sentence:")]
    stats = load(config.training_dir() / config.STATS_FILENAME)["overall"]
    chunks = stats["chunks"]
    assert len(retries) == stats["retry_prompts"] == (2 + spare) * chunks  # every chunk here has 3+ long sentences
    assert stats["questions_kept"] == 2 * chunks  # the spare's question is dropped, never a third per chunk
    assert stats["dropped"]["questions"].get("over_limit", 0) == spare * chunks
