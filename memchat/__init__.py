"""Mem_Chat: turn your own PDFs into a private assistant (RAG and fine-tuning).

Importing this package is cheap: it imports neither torch, transformers nor streamlit.
"""

__version__ = "0.1.0"
