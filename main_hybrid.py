"""Mem_Chat hybrid app: RAG, the fine-tuned model, the hybrid of both, or all three side by side.

    streamlit run main_hybrid.py        # the app
    python main_hybrid.py [--port N]    # the same: starts Streamlit

Needs encrypted_faiss_storage/ (python main.py) for the RAG and hybrid modes, and
finetuned_model/ (python train_conversational.py) for the fine-tuned and hybrid
modes; whatever is missing is disabled in the app, with the command that makes it.
MEMCHAT_LLM overrides the RAG generation model.
"""

from __future__ import annotations

import argparse
import os
import sys



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main_hybrid.py", description="Mem_Chat: RAG vs fine-tuned vs hybrid, in Streamlit.")
    p.add_argument("--port", type=int, default=8503, help="port for the app (default 8503)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = [sys.executable, "-m", "streamlit", "run", os.path.abspath(__file__), "--server.port", str(args.port),
           "--browser.gatherUsageStats", "false"]
    os.execv(sys.executable, cmd)  # replaces this process: Ctrl-C reaches Streamlit directly
    return 0  # not reached


from memchat.ui import running_under_streamlit  # noqa: E402

if running_under_streamlit():
    from memchat.ui.hybrid_app import render

    render()
elif __name__ == "__main__":
    raise SystemExit(main())
