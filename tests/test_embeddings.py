"""The embedding backends on the bundled all-MiniLM-L6-v2: shapes, order, agreement, the export cache.

The ONNX exports live in the shared test cache (conftest's MEMCHAT_CACHE_DIR), so
only the first run pays for them; the cache tests export into their own tmp folder.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import memchat.embeddings as emb
from memchat.config import DEFAULT_EMBEDDING_MODEL
from memchat.embeddings import Embedder
from memchat.errors import MemChatError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

PAIRS = [  # (query, the passage that answers it); every query's own passage must rank first
    ("How do I read a CSV file into R?", "Use read.csv('data.csv') to load a comma-separated file into an R data frame."),
    ("What is the boiling point of water?", "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit)."),
    ("Who wrote the play Hamlet?", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("How are igneous rocks formed?", "Igneous rock forms when magma or lava cools and crystallises."),
    ("What does a Fernet key encrypt?", "Fernet uses a symmetric key to encrypt and authenticate messages."),
]
TEXTS = [  # deliberately unsorted lengths, so length-sorting has to be undone
    "short",
    "A much longer sentence about plotting histograms with base R graphics and the hist() function. " * 6,
    "",
    "Mean pooling averages the token vectors under the attention mask.",
    "x " * 400,  # past the 256-token window: truncated
    "Tectonic plates move over the asthenosphere.",
]
ALL_TEXTS = TEXTS + [text for pair in PAIRS for text in pair]


@pytest.fixture(scope="module")
def embedders():
    return {backend: Embedder(backend=backend, batch_size=2) for backend in emb.BACKENDS}


@pytest.fixture(scope="module")
def torch_vectors(embedders):
    """Reference vectors of ALL_TEXTS from sentence-transformers (computed once: torch is the slow one)."""
    return embedders["torch"].encode(ALL_TEXTS)


def cos(a, b):
    return (a * b).sum(-1)


@pytest.mark.parametrize("backend", emb.BACKENDS)
def test_shape_dtype_and_unit_norm(embedders, backend):
    e = embedders[backend]
    assert e.backend == backend, e.fallback_reason
    vectors = e.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    query = e.encode_query("hello")
    assert query.shape == (384,) and query.dtype == np.float32


@pytest.mark.parametrize("backend", emb.BACKENDS)
def test_empty_input(embedders, backend):
    out = embedders[backend].encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_the_same_query_twice_is_embedded_once(embedders, monkeypatch):
    e = embedders["onnx"]
    first = e.encode_query("who discovered oxygen?")
    calls = []
    real = e.encode
    monkeypatch.setattr(e, "encode", lambda texts, progress=False: calls.append(list(texts)) or real(texts))
    first[:] = 0.0  # a caller scribbling on its vector must not change the kept one
    again = e.encode_query("who discovered oxygen?")
    assert calls == [] and abs(float(np.linalg.norm(again)) - 1.0) < 1e-5
    other = e.encode_query("who discovered penicillin?")
    assert calls == [["who discovered penicillin?"]] and float(other @ again) < 0.999


def test_encode_refuses_a_bare_string(embedders):
    with pytest.raises(TypeError, match="encode_query"):
        embedders["onnx"].encode("one text")


@pytest.mark.parametrize("backend,floor", [("onnx", 0.9999), ("onnx-int8", 0.95)])  # torch: ST sorts itself
def test_order_preserved_despite_length_sorting(embedders, backend, floor):
    # int8 scales activations per batch, so a text's vector moves with its batch-mates and their padding (cos 0.97-0.999)
    e = embedders[backend]
    batched = e.encode(TEXTS)
    alone = np.stack([e.encode_query(t) for t in TEXTS])
    assert cos(batched, alone).min() > floor
    assert np.argmax(batched @ alone.T, axis=1).tolist() == list(range(len(TEXTS)))


def test_onnx_fp32_matches_torch(embedders, torch_vectors):
    c = cos(embedders["onnx"].encode(ALL_TEXTS), torch_vectors)
    assert c.min() > 0.999, c  # measured: > 0.99999


def test_int8_close_to_fp32(embedders, torch_vectors):
    c = cos(embedders["onnx-int8"].encode(ALL_TEXTS), torch_vectors)
    # Honest bounds: on 495 real 1000-char chunks, mean 0.993 and min 0.973 (per-channel MatMul int8)
    assert c.mean() > 0.98 and c.min() > 0.95, c


@pytest.mark.parametrize("backend", emb.BACKENDS)
def test_relevant_passage_ranks_first(embedders, backend):
    e = embedders[backend]
    passages = e.encode([p for _, p in PAIRS])
    for i, (query, _) in enumerate(PAIRS):
        scores = passages @ e.encode_query(query)
        assert int(np.argmax(scores)) == i, (query, scores)


def test_spec_names_the_canonical_model(embedders):
    e = embedders["onnx-int8"]
    assert e.spec == {"model": DEFAULT_EMBEDDING_MODEL, "backend": "onnx-int8", "dim": 384}
    assert e.notice is None  # the bundled copy *is* the default model: no fallback notice
    assert Embedder("minilm", backend="onnx").model_name == DEFAULT_EMBEDDING_MODEL


def test_fast_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    folder = Path(emb._local_folder(emb.resolve_model(DEFAULT_EMBEDDING_MODEL, kind="embedding").path))
    ours = emb._FastTokenizer(folder, 256)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    assert ours.encode(TEXTS) == theirs(TEXTS, truncation=True, max_length=256)["input_ids"]


def test_unknown_backend_says_which_exist():
    with pytest.raises(MemChatError, match="onnx-int8"):
        Embedder(backend="tensorrt")


def test_export_once_then_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    onnx_cache = tmp_path / "cache" / "onnx"
    stale = onnx_cache / f"{emb._sanitise(DEFAULT_EMBEDDING_MODEL)}-0123456789abcdef"  # older weights or recipe
    other = onnx_cache / "someone_else-0123456789abcdef"
    for folder in (stale, other):
        folder.mkdir(parents=True)
        (folder / emb.FP32_FILENAME).write_bytes(b"old")
    before = emb.export_count
    first = Embedder(backend="onnx")
    assert not stale.exists() and other.exists()  # a fresh export prunes only its own model's old folders
    assert first.exported and emb.export_count == before + 1
    fp32 = first.onnx_path
    assert fp32.parent.parent == onnx_cache
    mtime = fp32.stat().st_mtime_ns

    second = Embedder(backend="onnx")
    assert not second.exported and emb.export_count == before + 1
    assert second.onnx_path == fp32 and fp32.stat().st_mtime_ns == mtime

    int8 = Embedder(backend="onnx-int8")  # quantises the cached fp32 export, does not re-export it
    assert int8.exported and emb.export_count == before + 2
    assert fp32.stat().st_mtime_ns == mtime
    assert not Embedder(backend="onnx-int8").exported and emb.export_count == before + 2
    leftovers = [p.name for p in fp32.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # temp files were renamed into place
    assert (fp32.parent / emb.META_FILENAME).is_file()


def test_failed_export_falls_back_to_torch_loudly(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MEMCHAT_CACHE_DIR", str(tmp_path / "cache"))

    def broken(*args, **kwargs):
        raise emb.OnnxExportError("simulated exporter failure")

    monkeypatch.setattr(emb, "_export_fp32", broken)
    with caplog.at_level(logging.WARNING, logger="memchat.embeddings"):
        e = Embedder(backend="onnx-int8")
    assert e.backend == "torch" and e.spec["backend"] == "torch"
    assert "simulated exporter failure" in caplog.text and "using torch" in caplog.text
    assert e.encode(["still works"]).shape == (1, 384)


def test_warm_onnx_start_does_not_import_torch(embedders):
    # embedders has already made the exports in the shared cache
    code = (
        "import sys; from memchat.embeddings import Embedder; e = Embedder(backend='onnx-int8'); "
        "e.encode(['hi']); assert not e.exported; print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
