"""Test isolation: nothing touches the working directory, the user's files or the network."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Derived artefacts (ONNX exports, dequantised GGUF) are rebuilt on demand: keep them in the repo, not ~.
os.environ.setdefault(
    "MEMCHAT_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "memchat")
)

pytest_plugins = ["tests.tiny_models"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Point every Mem_Chat path at a fresh tmp folder and run from there."""
    home = tmp_path / "home"
    home.mkdir()
    # Nothing of the user's own settings leaks in: keys, servers, answer mode, caps, passwords, models.
    for name in [n for n in os.environ if n.startswith("MEMCHAT_") and n != "MEMCHAT_CACHE_DIR"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEMCHAT_HOME", str(home))
    monkeypatch.chdir(home)
    return home
