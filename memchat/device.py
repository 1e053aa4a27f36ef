"""Where models run and in what precision: the one place Mem_Chat decides.

Every module that loads weights asks here (``get_device``, ``get_dtype``) instead
of probing ``torch.cuda`` itself, so a later switch (another accelerator, a
serving engine such as vLLM) changes one file.

Rules:
  device   MEMCHAT_DEVICE if set ("cpu", "cuda", "cuda:1", "mps"); else cuda > mps > cpu.
  dtype    MEMCHAT_DTYPE if set ("float32", "bfloat16", "float16"; "auto" = the rules below).
           cpu: bfloat16 where the CPU has bf16 instructions (AVX512-BF16 or AMX: Zen 4, Sapphire
             Rapids and newer), else float32 (without them bf16 matmuls are emulated and slower than
             fp32; fp16 has no CPU kernels worth using). Measured on a 2-core Zen 4 with the bundled
             SmolLM2-135M: extraction 1.59 -> 0.83 s per chunk (bench/generate.py), a RAG answer's p50
             0.73 -> 0.41 s with squad2 F1 53.2 -> 52.9 and covid 34.6 -> 34.7 (bench/rag_quality.py).
           cuda: bfloat16 where the GPU supports it (Ampere+), else float16.
           mps: float16.
           Scores (log-probabilities) are taken in float32 from whatever dtype the logits come in.
  training Weights are kept in float32 everywhere (the optimizer needs fp32 master
           weights); speed comes from mixed precision instead, see ``mixed_precision``.

Also which process of a multi-process launch is the main one (``is_main_process``).

Deliberately not here: thread tuning, multi-GPU placement, quantisation.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from memchat.errors import MemChatError

if TYPE_CHECKING:  # torch is imported lazily: `memchat.config` users should not pay for it
    import torch

DEVICE_ENV = "MEMCHAT_DEVICE"
DTYPE_ENV = "MEMCHAT_DTYPE"
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an `accelerate launch` / `torchrun` job (their RANK variable, set
    before any process group exists). Shared folders are set up and cleaned by the main process only."""
    return int(os.environ.get("RANK", "0")) == 0


def get_device() -> "torch.device":
    """The device models run on: MEMCHAT_DEVICE if set, else cuda > mps > cpu."""
    import torch

    wanted = os.environ.get(DEVICE_ENV, "").strip().lower()
    if wanted and wanted != "auto":
        try:
            device = torch.device(wanted)
        except RuntimeError as exc:
            raise MemChatError(
                f"{DEVICE_ENV}={wanted!r} is not a device torch knows. Use cpu, cuda, cuda:N or mps."
            ) from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MemChatError(
                f"{DEVICE_ENV}={wanted} but this torch sees no CUDA GPU "
                f"(torch {torch.__version__}). Unset {DEVICE_ENV} or set it to cpu."
            )
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise MemChatError(
                f"{DEVICE_ENV}={wanted} but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
        if device.type == "mps" and not _mps_available():
            raise MemChatError(f"{DEVICE_ENV}=mps but MPS is not available here. Unset {DEVICE_ENV} or set it to cpu.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_dtype(device: "torch.device | str | None" = None, training: bool = False) -> "torch.dtype":
    """Weight dtype for ``device`` (default: ``get_device()``).

    Inference: MEMCHAT_DTYPE if set; else cpu bfloat16 with native bf16 instructions, float32 without;
    cuda bfloat16 if supported else float16; mps float16.
    Training: float32 weights on every device (pair with ``mixed_precision``).
    """
    import torch

    device = _as_device(device)
    if training:
        return torch.float32
    wanted = os.environ.get(DTYPE_ENV, "").strip().lower()
    if wanted and wanted != "auto":
        if wanted not in _DTYPE_NAMES:
            raise MemChatError(f"{DTYPE_ENV}={wanted!r} is not a dtype Mem_Chat runs models in. "
                               f"Use float32, bfloat16, float16 or auto.")
        return getattr(torch, _DTYPE_NAMES[wanted])
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def mixed_precision(device: "torch.device | str | None" = None) -> str | None:
    """Autocast precision for training on ``device``: "bf16", "fp16" or None (plain fp32).

    Maps onto ``TrainingArguments(bf16=..., fp16=...)``; cpu trains in plain fp32.
    """
    device = _as_device(device)
    if device.type == "cuda":
        return "bf16" if _cuda_bf16(device) else "fp16"
    return None


def describe(device: "torch.device | str | None" = None) -> str:
    """One line for logs and the apps, e.g. "cpu (float32, 2 threads)"."""
    import torch

    device = _as_device(device)
    dtype = str(get_dtype(device)).removeprefix("torch.")
    if device.type == "cpu":
        return f"cpu ({dtype}, {torch.get_num_threads()} threads)"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)} ({dtype})"
    return f"{device} ({dtype})"


def _as_device(device) -> "torch.device":
    import torch

    if device is None:
        return get_device()
    return device if isinstance(device, torch.device) else torch.device(device)


def _cuda_bf16(device: "torch.device") -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _minor = torch.cuda.get_device_capability(index)
    return major >= 8  # Ampere and newer have bf16 tensor cores


def cpu_has_bf16() -> bool:
    """True where this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX tiles), as torch's oneDNN sees it."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:  # a torch built without the probe's backend
            continue
    return False


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
