"""The embedding model: texts -> L2-normalised float32 vectors, batched.

Three backends give the same model (the bundled all-MiniLM-L6-v2 by default):

  torch      sentence-transformers as is, on ``memchat.device``'s device.
  onnx       an fp32 ONNX export made locally with ``torch.onnx.export``, run by
             ONNX Runtime on the CPU: the same vectors as torch (cosine > 0.9999),
             ~20% less CPU per chunk, and a warm start never imports torch
             (ready in ~0.5 s instead of ~5 s).
  onnx-int8  that export with its MatMul weights dynamically quantised to int8,
             per output channel, the first FFN down-projection kept fp32: ~1.8x
             less CPU again, cosine ~0.995 to fp32 (per-tensor int8: ~0.92), same
             retrieval hits on qa_dev (bench/embed_quality.py).
             Activations are quantised per batch, so a text's int8 vector moves a
             little with its batch-mates (cosine 0.97-0.999 between batchings).

Exports are derived artefacts: made once per model (weights + config hash) under
``config.cache_dir()/onnx/<model>-<hash>/``, each file written to a temp name and
renamed into place, so two processes never see half a file. Every fresh export is
checked against torch before use; if exporting fails, the embedder falls back to
torch with a logged warning and reports ``backend == "torch"`` (vectors are never
silently wrong).

Texts are tokenised once, sorted by length (longest first) and batched, so a
batch pads to its own longest text instead of the corpus's; results come back in
input order.

Deliberately not here: chunking (``memchat.chunking``), the index
(``memchat.index``), checking a store's model against ours (the store compares
``Embedder.spec``), GPU ONNX providers (on a GPU machine use "torch").
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from memchat import config
from memchat.config import DEFAULT_EMBEDDING_MODEL
from memchat.errors import MemChatError, ModelUnavailableError
from memchat.models import log_notice, resolve_model

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")
EXPORT_FORMAT_VERSION = 2  # bump when the export recipe changes: old cache folders are then ignored
ONNX_OPSET = 17
FP32_FILENAME = "model.onnx"
INT8_FILENAME = "model-int8.onnx"
META_FILENAME = "memchat_onnx.json"
_ONNX_POOLING = ("mean", "cls")  # what the numpy pooling reproduces; anything else runs on torch
_ST_SIMPLE_MODULES = {"Transformer", "Pooling", "Normalize"}  # ST pipelines the ONNX path can mirror

export_count = 0  # ONNX files this process has written (tests count re-exports with it)
_fingerprints: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: hash 90 MB once per process


class OnnxExportError(MemChatError):
    """The ONNX export could not be made or does not reproduce the torch model."""


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # the cores this process may use (containers)
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class Embedder:
    """Embed texts with a sentence-transformers model; see the module docstring for backends.

    ``model_name`` is the canonical name recorded in the store (the bundled MiniLM
    reports its hub id); ``notice`` is resolve_model's fallback line, if any.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_EMBEDDING_MODEL,
        backend: str = "onnx-int8",
        batch_size: int = 32,
        max_seq_length: int = 256,
    ):
        if backend not in BACKENDS:
            raise MemChatError(f"Unknown embedding backend {backend!r}. Choose one of: {', '.join(BACKENDS)}.")
        if batch_size < 1 or max_seq_length < 2:
            raise MemChatError("Embedding batch_size must be >= 1 and max_seq_length >= 2.")
        resolved = resolve_model(model_name, kind="embedding")
        log_notice(resolved)
        self.requested = model_name
        self.model_name: str = resolved.model_id
        self.notice: str | None = resolved.notice
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.backend: str = backend
        self.exported = False  # True when this instance had to make the ONNX export
        self.onnx_path: Path | None = None
        self.fallback_reason: str | None = None
        self._last_query: tuple[str, np.ndarray] | None = None  # (text, vector) of the last encode_query
        self._model_dir = _local_folder(resolved.path)

        start = time.perf_counter()
        if backend != "torch":
            try:
                self._load_onnx(quantized=backend == "onnx-int8")
            except Exception as exc:  # noqa: BLE001 - any export/runtime failure means "use torch", said out loud
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "ONNX backend %r unavailable for %s (%s); using torch instead.",
                    backend, self.model_name, self.fallback_reason,
                )
                self.backend = "torch"
        if self.backend == "torch":
            self._load_torch()
        log.info(
            "Embedder %s [%s, dim %d] ready in %.1f s", self.model_name, self.backend, self.dim, time.perf_counter() - start
        )

    # ------------------------------------------------------------------ public
    @property
    def spec(self) -> dict:
        """What a store records; a store refuses queries from an embedder with another model."""
        return {"model": self.model_name, "backend": self.backend, "dim": self.dim}

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """(N, dim) float32, rows L2-normalised, in the order of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("Embedder.encode takes a list of texts; use encode_query for a single text.")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "torch":
            vectors = self._st.encode(
                texts,
                batch_size=self.batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )  # sentence-transformers sorts by length itself and restores the order
            return np.ascontiguousarray(vectors, dtype=np.float32)
        return self._encode_onnx(texts, progress)

    def encode_query(self, text: str) -> np.ndarray:
        """(dim,) float32, L2-normalised.

        One answer embeds its question twice (chunk search, then evidence ranking): the last query's vector is
        kept, so the second costs nothing. A copy is returned, so a caller cannot change the kept one.
        """
        last = self._last_query  # one read: another thread may replace the pair, never half of it
        if last is not None and last[0] == text:
            return last[1].copy()
        vector = self.encode([text])[0]
        self._last_query = (text, vector.copy())
        return vector

    def __repr__(self) -> str:
        return f"Embedder({self.model_name!r}, backend={self.backend!r}, dim={self.dim})"

    # ------------------------------------------------------------------- torch
    def _load_torch(self) -> None:
        from sentence_transformers import SentenceTransformer

        try:
            from memchat.device import get_device

            device = str(get_device())
        except ImportError:
            device = "cpu"
        try:
            model = SentenceTransformer(str(self._model_dir), device=device)
        except (OSError, ValueError) as exc:
            raise ModelUnavailableError(
                f"Could not load embedding model '{self.requested}' from {self._model_dir}: {exc}"
            ) from exc
        # Same window as the ONNX path: what was asked for, capped by the position table (not by
        # sentence_bert_config's value, which is only a default).
        auto_model = getattr(model[0], "auto_model", None)
        positions = getattr(getattr(auto_model, "config", None), "max_position_embeddings", None)
        self.max_seq_length = min(self.max_seq_length, positions or self.max_seq_length)
        model.max_seq_length = self.max_seq_length
        model.eval()
        self._st = model
        self.dim = int(model.get_embedding_dimension())

    # -------------------------------------------------------------------- onnx
    def _load_onnx(self, quantized: bool) -> None:
        import onnxruntime as ort

        ort.disable_telemetry_events()  # no usage events (Windows ETW) about what we embed
        layout = _onnx_layout(self._model_dir)  # raises OnnxExportError for pipelines we cannot mirror
        self._pooling = layout["pooling"]
        self.dim = layout["dim"]
        self.max_seq_length = min(self.max_seq_length, layout["max_positions"])
        self._tokenizer = _FastTokenizer(layout["hf_dir"], self.max_seq_length)

        folder = _export_dir(self.model_name, layout["hf_dir"])
        fp32 = folder / FP32_FILENAME
        if not fp32.is_file():
            log.info("Exporting %s to ONNX once (a few seconds); cached in %s", self.model_name, folder)
            _export_fp32(layout["hf_dir"], fp32, self._tokenizer, self._pooling)
            self.exported = True
        path = fp32
        if quantized:
            path = folder / INT8_FILENAME
            if not path.is_file():
                if not self.exported:
                    log.info("Quantising the ONNX export of %s to int8 once; cached in %s", self.model_name, folder)
                try:
                    _quantize_int8(fp32, path, self._tokenizer, self._pooling)
                    self.exported = True
                except Exception as exc:  # noqa: BLE001 - the fp32 export is fine: use it, say so
                    self.fallback_reason = f"{type(exc).__name__}: {exc}"
                    log.warning("int8 quantisation of %s failed (%s); using fp32 ONNX.", self.model_name, self.fallback_reason)
                    self.backend, path = "onnx", fp32
        if self.exported:
            _write_meta(folder, self.model_name, layout)
            _prune_stale_exports(folder)

        options = ort.SessionOptions()
        options.intra_op_num_threads = _cpu_count()
        options.inter_op_num_threads = 1  # one graph at a time; parallelism is inside the matmuls
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input_names = [i.name for i in self._session.get_inputs()]
        self.onnx_path = path

    def _encode_onnx(self, texts: list[str], progress: bool) -> np.ndarray:
        ids = self._tokenizer.encode(texts)  # list of int lists, truncated, with [CLS]/[SEP]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")  # longest first: a too-big batch fails at once, not at the end
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Embedding", unit="batch")
        for start in starts:
            rows = order[start : start + self.batch_size]
            feed, mask = self._tokenizer.pad([ids[i] for i in rows])
            hidden = self._session.run(None, {k: v for k, v in feed.items() if k in self._input_names})[0]  # (B, T, D)
            out[rows] = _pool(hidden, mask, self._pooling)
        return out


# ---------------------------------------------------------------------------
# Pooling and tokenisation (numpy only: a warm ONNX start never imports torch)
# ---------------------------------------------------------------------------
def _pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """(B, T, D) hidden states + (B, T) mask -> (B, D) L2-normalised."""
    if mode == "cls":
        pooled = hidden[:, 0]
    else:  # mean over real tokens; padded positions hold garbage and must not count
        m = mask.astype(np.float32)
        pooled = np.einsum("btd,bt->bd", hidden, m) / np.clip(m.sum(1, keepdims=True), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32, copy=False)


class _FastTokenizer:
    """The model's fast (Rust) tokenizer with our truncation, padding done in numpy.

    Uses ``tokenizer.json`` through the ``tokenizers`` library directly (no torch
    import); the file's own truncation/padding settings (MiniLM ships 128, fixed)
    are replaced by ``max_len`` and per-batch padding. Folders without a
    tokenizer.json go through transformers' AutoTokenizer.
    """

    def __init__(self, hf_dir: Path, max_len: int):
        self.max_len = max_len
        self._hf = None
        tok_file = hf_dir / "tokenizer.json"
        special = _read_json(hf_dir / "special_tokens_map.json") or {}
        tok_config = _read_json(hf_dir / "tokenizer_config.json") or {}
        pad_token = _token_str(special.get("pad_token") or tok_config.get("pad_token"))
        if tok_file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            tok.no_padding()
            tok.enable_truncation(max_length=max_len)
            self._tok = tok
            self.pad_id = tok.token_to_id(pad_token) if pad_token else None
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(hf_dir))
            self.pad_id = self._hf.pad_token_id
        if self.pad_id is None:
            self.pad_id = 0  # padded positions are masked out of attention and pooling; any id works

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return self._hf(texts, truncation=True, max_length=self.max_len)["input_ids"]
        return [e.ids for e in self._tok.encode_batch(texts)]

    def pad(self, batch: list[list[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Right-pad to the batch's longest: ({input_ids, attention_mask, token_type_ids}, mask), int64 (B, T)."""
        width = max(len(x) for x in batch)
        input_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return feed, mask


def _token_str(token) -> str | None:
    if isinstance(token, dict):  # {"content": "[PAD]", ...} in newer tokenizer files
        return token.get("content")
    return token


# ---------------------------------------------------------------------------
# The model folder: what the ONNX path must reproduce
# ---------------------------------------------------------------------------
def _local_folder(path: str) -> Path:
    """resolve_model gives a folder, or a hub id when online and not yet cached: download it then."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types; all mean "not available"
        raise ModelUnavailableError(f"Could not download embedding model '{path}': {exc}") from exc


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _onnx_layout(model_dir: Path) -> dict:
    """Transformer folder, pooling, dim and window of a sentence-transformers folder (or plain HF folder)."""
    modules = _read_json(model_dir / "modules.json")
    hf_dir, pooling_dir = model_dir, None
    if isinstance(modules, list):
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in _ST_SIMPLE_MODULES:
                raise OnnxExportError(f"its sentence-transformers pipeline has a {kind} module the ONNX path does not mirror")
            if kind == "Transformer":
                hf_dir = model_dir / module.get("path", "")
            elif kind == "Pooling":
                pooling_dir = model_dir / module.get("path", "")
    pooling = "mean"  # sentence-transformers' default for a plain HF folder
    pool_cfg = _read_json(pooling_dir / "config.json") if pooling_dir else None
    if isinstance(pool_cfg, dict):
        if pool_cfg.get("pooling_mode"):
            pooling = str(pool_cfg["pooling_mode"])
        else:
            flags = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v is True]
            names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
            if len(flags) != 1 or flags[0] not in names:
                raise OnnxExportError(f"pooling {flags} is not one the ONNX path reproduces ({', '.join(_ONNX_POOLING)})")
            pooling = names[flags[0]]
    if pooling not in _ONNX_POOLING:
        raise OnnxExportError(f"pooling {pooling!r} is not one the ONNX path reproduces ({', '.join(_ONNX_POOLING)})")
    cfg = _read_json(hf_dir / "config.json")
    if not isinstance(cfg, dict) or "hidden_size" not in cfg:
        raise OnnxExportError(f"no transformer config.json with hidden_size in {hf_dir}")
    return {
        "hf_dir": hf_dir,
        "pooling": pooling,
        "dim": int(cfg["hidden_size"]),
        "max_positions": int(cfg.get("max_position_embeddings", 512)),
    }


def _fingerprint(hf_dir: Path) -> str:
    """sha256 of the weights and config: a retrained or replaced model gets a new export."""
    h = hashlib.sha256(f"memchat-onnx-v{EXPORT_FORMAT_VERSION}-opset{ONNX_OPSET}".encode())
    weights = [p for p in ("model.safetensors", "pytorch_model.bin") if (hf_dir / p).is_file()]
    for name in ["config.json", *weights[:1]]:
        path = (hf_dir / name).resolve()  # hub cache files are symlinks into blobs/
        if not path.is_file():
            continue
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _fingerprints:
            with open(path, "rb") as f:
                _fingerprints[key] = hashlib.file_digest(f, "sha256").hexdigest()
        h.update(name.encode() + b"\0" + _fingerprints[key].encode())
    return h.hexdigest()[:16]


def _sanitise(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return safe[-60:] or "model"


def _export_dir(model_name: str, hf_dir: Path) -> Path:
    folder = config.cache_dir() / "onnx" / f"{_sanitise(model_name)}-{_fingerprint(hf_dir)}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _temp_path(final: Path) -> Path:
    """A unique sibling of ``final``: written there, then os.replace'd (atomic on one filesystem)."""
    for stale in final.parent.glob(".*.tmp.onnx"):  # left by a killed process an hour or more ago
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
        except OSError:
            pass  # another process is cleaning up too
    fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp.onnx", dir=final.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes 0600; the cache holds nothing secret
    return Path(name)


def _prune_stale_exports(current: Path) -> None:
    """Remove exports of the same model name made from other weights or an older recipe (~150 MB each)."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    for folder in current.parent.iterdir():
        stale = folder.is_dir() and folder != current and folder.name.startswith(prefix)
        if stale and re.fullmatch(r"[0-9a-f]{16}", folder.name[len(prefix):]):
            log.info("Removing stale ONNX export %s", folder)
            shutil.rmtree(folder, ignore_errors=True)  # a process still using it keeps its open files (POSIX)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished file into place; losing a race to an identical file is fine."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_file():  # Windows refuses to replace a file another process has open
            raise


def _write_meta(folder: Path, model_name: str, layout: dict) -> None:
    import onnxruntime

    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model": model_name,
        "source": str(layout["hf_dir"]),
        "opset": ONNX_OPSET,
        "pooling": layout["pooling"],
        "dim": layout["dim"],
        "onnxruntime": onnxruntime.__version__,
        "int8": "dynamic, MatMul weights only, per-channel QInt8, layer 0 FFN output kept fp32" if (folder / INT8_FILENAME).exists() else None,
    }
    tmp = folder / f".{META_FILENAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / META_FILENAME)


# ---------------------------------------------------------------------------
# Export, check, quantise
# ---------------------------------------------------------------------------
_PROBES = [  # different lengths, so the check exercises padding and the dynamic axes
    "How do I install a package in R?",
    "Seafloor spreading showed that the lithosphere is split into tectonic plates that move over the asthenosphere.",
    "ok",
]


def _export_fp32(hf_dir: Path, final: Path, tokenizer: _FastTokenizer, pooling: str) -> None:
    """torch.onnx.export (TorchScript exporter) of the HF model with dynamic batch and sequence axes."""
    global export_count
    import torch
    from transformers import AutoModel

    start = time.perf_counter()
    model = AutoModel.from_pretrained(str(hf_dir), attn_implementation="eager").eval()  # sdpa does not trace cleanly
    accepts = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepts]

    class _LastHidden(torch.nn.Module):  # keyword call: BertModel.forward's positional order shifts across versions
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).last_hidden_state

    feed, _ = tokenizer.pad(tokenizer.encode(_PROBES[:2]))  # (2, T) with real padding in row 0
    args = tuple(torch.from_numpy(feed[n]) for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    tmp = _temp_path(final)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about python ints in the mask code: checked below
            torch.onnx.export(
                _LastHidden(model).eval(), args, str(tmp),  # a train()-mode wrapper would be restored to train(): dropout on
                input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False,
            )
        model.eval()
        _check_against_torch(tmp, model, names, tokenizer, pooling)
        _publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    export_count += 1
    log.debug("Exported %s in %.1f s", final, time.perf_counter() - start)


def _check_against_torch(path: Path, model, names: list[str], tokenizer: _FastTokenizer, pooling: str) -> None:
    """Refuse an export whose vectors differ from torch's on other shapes than the traced one."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed, mask = tokenizer.pad(tokenizer.encode(_PROBES))  # batch 3, another length than the trace
    got = _pool(session.run(None, {n: feed[n] for n in names})[0], mask, pooling)
    with torch.no_grad():
        hidden = model(**{n: torch.from_numpy(feed[n]) for n in names}).last_hidden_state.numpy()
    want = _pool(hidden, mask, pooling)
    cosine = float((got * want).sum(1).min())
    if cosine < 0.9999:
        raise OnnxExportError(f"the export does not reproduce the torch model (min cosine {cosine:.5f})")


_KEEP_FP32 = re.compile(r"layer\.0/output/dense/MatMul$")  # BERT-style names, as our export writes them


def _int8_keep_fp32(fp32: Path) -> list[str]:
    """MatMuls left in fp32: the first layer's FFN down-projection (1536 -> 384).

    Its input (GELU outputs) is quantised per tensor and suffers most: measured on
    MiniLM, keeping this one matmul in fp32 lifts the worst chunk's cosine to fp32
    from 0.973 to 0.990 (mean 0.993 -> 0.995) for ~6% more CPU time. Models with
    other node names simply get every MatMul quantised.
    """
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and _KEEP_FP32.search(n.name)]


def _quantize_int8(fp32: Path, final: Path, tokenizer: _FastTokenizer, pooling: str) -> None:
    """Dynamic int8: MatMul weights only, one scale per output channel (cosine ~0.993 vs ~0.92 per-tensor)."""
    global export_count
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = _temp_path(final)
    root = logging.getLogger()
    root_level = root.level
    try:
        root.setLevel(max(root_level, logging.ERROR))  # the quantiser logs ~40 INFO lines and a WARNING on the root logger
        try:
            quantize_dynamic(
                str(fp32), str(tmp),
                op_types_to_quantize=["MatMul"],  # Gather (the embedding table) stays fp32: costs quality, saves no time
                per_channel=True,  # one scale per output column: cosine ~0.993 to fp32 (per-tensor: ~0.92)
                weight_type=QuantType.QInt8,  # signed weights: QUInt8 ran ~2x slower in ORT's CPU kernels here
                nodes_to_exclude=_int8_keep_fp32(fp32),
            )
        finally:
            root.setLevel(root_level)
        feed, mask = tokenizer.pad(tokenizer.encode(_PROBES))
        vectors = []
        for p in (fp32, tmp):
            session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            vectors.append(_pool(session.run(None, {k: v for k, v in feed.items() if k in names})[0], mask, pooling))
        cosine = float((vectors[0] * vectors[1]).sum(1).min())
        if cosine < 0.95:
            raise OnnxExportError(f"int8 quantisation changed the vectors too much (min cosine {cosine:.3f}); use backend 'onnx'")
        _publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    export_count += 1
