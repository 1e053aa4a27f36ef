"""The encrypted store and the knowledge base on top of it (fake embedder, real PDFs)."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memchat import config
from memchat.errors import EmbeddingMismatchError, MemChatError, NoStoreError, StoreError, WrongKeyError
from memchat.knowledge import KnowledgeBase
from memchat.store import EncryptedStore
from tests.fakes import FakeEmbedder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QA_PDFS = sorted((DATA / "qa_dev" / "pdfs").glob("*.pdf"))
BAD = DATA / "pdfs" / "bad"


def kb(**kw) -> KnowledgeBase:
    return KnowledgeBase(embedder=FakeEmbedder(), **kw)


def store_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".lock"}


def assert_consistent(k: KnowledgeBase) -> None:
    """Index ids == metadata ids and each document's chunks are of its current version."""
    state, idx = k._loaded()  # raises StoreError on any mismatch
    docs = state.versions["documents"]
    by_doc: dict[str, set] = {}
    for c in state.metadata["chunks"].values():
        assert c["version"] == docs[c["document"]]["version"]
        by_doc.setdefault(c["document"], set()).add(c["id"])
    assert {d: len(ids) for d, ids in by_doc.items()} == {n: d["chunks"] for n, d in docs.items()}
    assert idx.ntotal == len(state.metadata["chunks"])


def test_roundtrip_files_and_key_mode():
    k = kb()
    res = k.add_documents(QA_PDFS[:2])
    assert [r.status for r in res] == ["added", "added"]
    d = config.storage_dir()
    for name in (config.KEY_FILENAME, config.INDEX_FILENAME, config.METADATA_FILENAME, config.VERSIONS_FILENAME):
        assert (d / name).exists(), name
    assert stat.S_IMODE((d / config.KEY_FILENAME).stat().st_mode) == 0o600
    # encrypted: no chunk text in the clear
    needle = k.chunks()[0]["text"][:30].encode()
    assert all(needle not in b for b in store_files(d).values())
    meta = k.state().metadata
    assert meta["format_version"] == config.STORE_FORMAT_VERSION
    assert meta["embedding"] == {"model": "sentence-transformers/all-MiniLM-L6-v2", "backend": "fake", "dim": 64}
    c = k.chunks()[0]
    assert {"id", "document", "version", "page_start", "page_end", "text", "hash"} <= set(c)
    docs = {x["name"]: x for x in k.documents()}
    assert set(docs) == {p.name for p in QA_PDFS[:2]}
    assert all(x["version"] == 1 and x["pages"] >= 1 and x["chunks"] >= 1 and len(x["sha256"]) == 64 for x in docs.values())
    assert_consistent(k)
    # a fresh object (another process, say) sees the same and searches
    hits = KnowledgeBase(embedder=FakeEmbedder()).search(k.chunks()[0]["text"], k=3)
    assert hits[0].chunk_id == k.chunks()[0]["id"]


def test_readd_same_is_noop_new_version_replaces_chunks_and_remove(tmp_path):
    k = kb()
    pdf = QA_PDFS[0]
    k.add_documents([pdf])
    gen = k.state().generation
    emb = k._embedder
    before = emb.texts_embedded
    assert k.add_documents([pdf])[0].status == "unchanged"
    assert k.state().generation == gen  # nothing rewritten
    assert emb.texts_embedded == before  # nothing re-embedded
    # a changed file under the same name -> version 2, old chunks gone
    other = QA_PDFS[1].read_bytes()
    r = k.add_documents([(pdf.name, other)])[0]
    assert (r.status, r.version) == ("updated", 2)
    doc = k.documents()[0]
    assert doc["version"] == 2 and [h["version"] for h in doc["history"]] == [1]
    assert all(c["version"] == 2 for c in k.chunks())
    assert_consistent(k)
    k.add_documents([QA_PDFS[2]])
    k.remove(pdf.name)
    assert [d["name"] for d in k.documents()] == [QA_PDFS[2].name]
    assert {c["document"] for c in k.chunks()} == {QA_PDFS[2].name}
    assert_consistent(k)
    with pytest.raises(MemChatError, match="No document named"):
        k.remove("nope.pdf")


def test_hnsw_past_threshold_and_back():
    from memchat.config import IndexConfig
    from memchat import index as fi

    cfg = IndexConfig(approximate_threshold=5)
    k = kb(index=cfg)
    k.add_documents(QA_PDFS)
    assert len(k.chunks()) > 5
    assert k.state().metadata["index"]["kind"] == "hnsw"
    assert fi.kind_of(k._loaded()[1]) == "hnsw"
    assert_consistent(k)
    target = k.chunks()[-1]
    assert k.search(target["text"], k=1)[0].chunk_id == target["id"]
    for p in QA_PDFS[1:]:
        k.remove(p.name)  # removal from HNSW rebuilds
        assert_consistent(k)
    if len(k.chunks()) < 3:
        assert k.state().metadata["index"]["kind"] == "flat"


def test_wrong_key_is_clear_and_changes_nothing(monkeypatch):
    k = kb()
    k.add_documents(QA_PDFS[:1])
    d = config.storage_dir()
    before = store_files(d)
    from cryptography.fernet import Fernet

    (d / config.KEY_FILENAME).chmod(0o600)
    (d / config.KEY_FILENAME).write_bytes(Fernet.generate_key())
    with pytest.raises(WrongKeyError, match="key.key"):
        kb().documents()
    with pytest.raises(WrongKeyError):
        kb().add_documents(QA_PDFS[1:2])
    after = store_files(d)
    after.pop(config.KEY_FILENAME), before.pop(config.KEY_FILENAME)
    assert after == before


@pytest.mark.parametrize("victim", [config.INDEX_FILENAME, config.METADATA_FILENAME, config.VERSIONS_FILENAME])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_file_named_and_nothing_overwritten(victim, damage):
    k = kb()
    k.add_documents(QA_PDFS[:1])
    d = config.storage_dir()
    data = bytearray((d / victim).read_bytes())
    if damage == "flip":
        i = random.Random(victim).randrange(len(data))
        data[i] ^= 0x01
    else:
        data = data[: len(data) // 2]
    (d / victim).write_bytes(bytes(data))
    before = store_files(d)
    with pytest.raises(StoreError, match=victim) as e:
        kb().documents()
    assert not isinstance(e.value, WrongKeyError)
    with pytest.raises(StoreError, match=victim):
        kb().add_documents(QA_PDFS[1:2])
    with pytest.raises(StoreError, match=victim):
        kb().remove(QA_PDFS[0].name)
    assert store_files(d) == before


def test_mixed_generations_refused():
    k = kb()
    k.add_documents(QA_PDFS[:1])
    d = config.storage_dir()
    old_meta = (d / config.METADATA_FILENAME).read_bytes()
    k.add_documents(QA_PDFS[1:2])
    (d / config.METADATA_FILENAME).write_bytes(old_meta)
    with pytest.raises(StoreError, match="different saves"):
        kb().documents()


def test_env_key_and_passphrase_write_no_key_file(monkeypatch):
    from cryptography.fernet import Fernet

    monkeypatch.setenv("MEMCHAT_KEY", Fernet.generate_key().decode())
    kb().add_documents(QA_PDFS[:1])
    d = config.storage_dir()
    assert not (d / config.KEY_FILENAME).exists()
    assert len(kb().documents()) == 1
    monkeypatch.setenv("MEMCHAT_KEY", Fernet.generate_key().decode())
    with pytest.raises(WrongKeyError, match="MEMCHAT_KEY"):
        kb().documents()

    monkeypatch.delenv("MEMCHAT_KEY")
    monkeypatch.setenv("MEMCHAT_STORAGE_DIR", str(d.parent / "pp"))
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", "correct horse battery staple")
    kb().add_documents(QA_PDFS[:1])
    assert not (d.parent / "pp" / config.KEY_FILENAME).exists()
    assert (d.parent / "pp" / "kdf.json").exists()
    assert len(kb().documents()) == 1
    monkeypatch.setenv("MEMCHAT_PASSPHRASE", "wrong")
    with pytest.raises(WrongKeyError, match="MEMCHAT_PASSPHRASE"):
        kb().documents()


def test_embedding_model_mismatch_refused():
    kb().add_documents(QA_PDFS[:1])
    other = KnowledgeBase(embedder=FakeEmbedder(model_name="BAAI/bge-small-en"))
    with pytest.raises(EmbeddingMismatchError, match="all-MiniLM-L6-v2"):
        other.add_documents(QA_PDFS[1:2])
    from memchat.config import EmbeddingConfig

    with pytest.raises(EmbeddingMismatchError, match="all-MiniLM-L6-v2"):
        KnowledgeBase(embedding=EmbeddingConfig(model_name="BAAI/bge-small-en")).search("rhine")


def test_no_store_message():
    with pytest.raises(NoStoreError, match="python main.py add"):
        kb().search("anything")
    assert kb().documents() == []


@pytest.mark.parametrize("bad", sorted(p.name for p in BAD.glob("*.pdf")))
def test_bad_pdfs_clear_error_rest_of_batch_goes_in(bad):
    from memchat.pdf import extract_pdf_file
    from memchat.errors import BadDocumentError

    k = kb()
    k.add_documents(QA_PDFS[:1])
    d = config.storage_dir()
    before = store_files(d)
    try:
        extract_pdf_file(BAD / bad)
        should_fail = False
    except BadDocumentError:
        should_fail = True
    results = k.add_documents([BAD / bad, QA_PDFS[1]])
    assert results[1].status == "added"
    if should_fail:
        assert results[0].status == "error" and bad in results[0].message and results[0].error
        assert {x["name"] for x in k.documents()} == {QA_PDFS[0].name, QA_PDFS[1].name}
    else:
        assert results[0].status == "added"
    assert_consistent(k)
    # and alone, a bad file leaves the store byte-for-byte unchanged
    if should_fail:
        k2 = kb()
        k2.remove(QA_PDFS[1].name)
        before = store_files(d)
        assert k2.add_documents([BAD / bad])[0].status == "error"
        assert store_files(d) == before


_WRITER = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, {repo!r})
    from memchat.knowledge import KnowledgeBase
    from tests.fakes import FakeEmbedder
    pdfs = {pdfs!r}
    mode = sys.argv[1]
    k = KnowledgeBase(embedder=FakeEmbedder())
    if mode == "commit-loop":
        from memchat.store import EncryptedStore
        store = EncryptedStore()
        i = 0
        while True:  # nothing but saves: most kills land inside one
            with store.transaction() as state:
                state.versions["counter"] = i
                store.commit(state)
            i += 1
            print(i, flush=True)
    elif mode == "loop":
        i = 0
        while True:  # add/remove forever; the test kills us at random moments
            p = pdfs[i % len(pdfs)]
            k.add_documents([p])
            if i % 2:
                k.remove(os.path.basename(p))
            i += 1
            print(i, flush=True)
    else:
        k.add_documents([mode])
    """
)


def _writer_script(tmp_path: Path) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(repo=str(REPO), pdfs=[str(p) for p in QA_PDFS]))
    return script


def test_sigkill_during_saves_leaves_loadable_store(tmp_path):
    script = _writer_script(tmp_path)
    kb().add_documents(QA_PDFS[:1])
    rng = random.Random(1234)
    env = dict(os.environ)
    for trial in range(8):
        proc = subprocess.Popen([sys.executable, str(script), "loop"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # let it get past start-up (first line printed), then kill at a random moment
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        k = kb()
        assert_consistent(k)  # loadable, whole, consistent
        leftovers = [p.name for p in config.storage_dir().iterdir() if p.name.startswith((".staging", ".commit"))]
        assert leftovers == []


def test_sigkill_inside_commits_recovers(tmp_path):
    """Kill a process that does nothing but commit: kills land mid-save, and every time
    the store opens whole (staging discarded, or a decided commit rolled forward)."""
    script = _writer_script(tmp_path)
    kb().add_documents(QA_PDFS[:2])
    rng = random.Random(99)
    interrupted, last_counter = 0, -1
    for trial in range(12):
        proc = subprocess.Popen([sys.executable, str(script), "commit-loop"], stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        d = config.storage_dir()
        interrupted += any(p.name.startswith((".staging", ".commit")) for p in d.iterdir())
        state = EncryptedStore().read()  # recovers, then loads a whole state
        assert_consistent(kb())
        assert state.versions["counter"] >= 0
        assert {x["name"] for x in kb().documents()} == {p.name for p in QA_PDFS[:2]}
    assert interrupted >= 1, "no kill landed inside a save: the test proved nothing"


def test_two_processes_adding_at_once_both_survive(tmp_path):
    script = _writer_script(tmp_path)
    kb().add_documents(QA_PDFS[:1])  # store and key exist
    procs = [subprocess.Popen([sys.executable, str(script), str(p)]) for p in QA_PDFS[1:]]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert {d["name"] for d in kb().documents()} == {p.name for p in QA_PDFS}
    assert_consistent(kb())


def test_interrupted_commit_rolls_forward():
    """A crash after the commit point: the next open finishes the save."""
    k = kb()
    k.add_documents(QA_PDFS[:1])
    store = EncryptedStore()
    state = store.read()
    state.versions["documents"][QA_PDFS[0].name]["note"] = "new"
    # emulate a kill between 'rename staging -> commit' and moving the files in
    real_replace = os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    os.replace = dying_replace
    try:
        with pytest.raises(KeyboardInterrupt):
            with store.lock():
                store.commit(state)
    finally:
        os.replace = real_replace
    assert list(config.storage_dir().glob(".commit-*"))
    fresh = EncryptedStore().read()
    assert fresh.versions["documents"][QA_PDFS[0].name]["note"] == "new"
    assert not list(config.storage_dir().glob(".commit-*"))


def test_search_reuses_state_until_a_commit_lands(monkeypatch):
    """Queries must not decrypt the store each time, yet must see another writer's commit."""
    k = kb()
    k.add_documents(QA_PDFS[:1])
    reads = {"n": 0}
    real_read = EncryptedStore.read

    def counting_read(self):
        reads["n"] += 1
        return real_read(self)

    monkeypatch.setattr(EncryptedStore, "read", counting_read)
    reader = kb()
    for _ in range(5):
        reader.search("rocks", k=2)
    assert reads["n"] == 1
    kb().add_documents(QA_PDFS[1:2])  # another writer commits
    hits = reader.search(kb().chunks()[-1]["text"], k=1)
    assert reads["n"] >= 2 and hits[0].document == QA_PDFS[1].name
