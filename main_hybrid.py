"""Mem_Chat hybrid app: RAG, the fine-tuned model, the hybrid of both, or all three side by side.

    streamlit run main_hybrid.py        # the app
    python main_hybrid.py [--port N]    # the same: starts Streamlit on 127.0.0.1
    python main_hybrid.py --host 0.0.0.0   # reachable from other machines: needs MEMCHAT_APP_PASSWORD

Needs encrypted_faiss_storage/ (python main.py) for the RAG and hybrid modes, and
finetuned_model/ (python train_conversational.py) for the fine-tuned and hybrid
modes; whatever is missing is disabled in the app, with the command that makes it.
MEMCHAT_LLM overrides the RAG generation model.
"""

from __future__ import annotations

import argparse



def build_parser() -> argparse.ArgumentParser:
    from memchat.cli import add_app_flags
    from memchat.config import AppConfig

    p = argparse.ArgumentParser(prog="main_hybrid.py", description="Mem_Chat: RAG vs fine-tuned vs hybrid, in Streamlit.")
    add_app_flags(p, AppConfig.hybrid_port)
    return p


def main(argv: list[str] | None = None) -> int:
    from memchat.cli import launch_streamlit, run

    args = build_parser().parse_args(argv)
    return run(launch_streamlit, __file__, args.host, args.port)  # 127.0.0.1 unless --host (and a password)


from memchat.ui import running_under_streamlit  # noqa: E402

if running_under_streamlit():
    from memchat.ui.hybrid_app import render

    render()
elif __name__ == "__main__":
    raise SystemExit(main())
