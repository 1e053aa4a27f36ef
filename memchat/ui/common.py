"""What the three Streamlit apps share: the login gate, error translation, safe text, cached models.

- ``require_login()`` first thing in every app: with an app password configured
  (``memchat.auth``) nothing but a password form is shown until it is given;
  without one, an app served on a non-loopback address shows one error and stops.
- ``errors_shown()`` wraps every action: a ``MemChatError`` becomes ``st.error`` + ``st.stop``.
- ``md_escape`` / ``show_text`` / ``stream_text``: PDF text and model output are
  shown as text, never as live Markdown (a link or remote image in a PDF would
  otherwise reach the browser: an exfiltration channel for a prompt-injected document).
- ``get_generator`` / ``get_embedder``: models loaded once per server.

Deliberately left out: each app's layout (``rag_app``, ``hybrid_app``, ``finetuned_app``).
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import streamlit as st
from streamlit import config as st_config

from memchat.auth import AuthError, configured_verifier, is_loopback
from memchat.config import AppConfig
from memchat.errors import MemChatError
from memchat.names import escape_controls

_AUTH_KEY = "_memchat_logged_in"  # per-session flag; the password itself is never kept
_login_lock = threading.Lock()  # wrong guesses wait one at a time: parallel sessions do not multiply the rate


# ---------------------------------------------------------------------------
# Login gate
# ---------------------------------------------------------------------------
def served_address() -> str | None:
    """The address Streamlit listens on (None: every interface, Streamlit's default)."""
    return st_config.get_option("server.address") or None


def _exposed() -> bool:
    address = served_address()
    if address is None and st_config.get_option("global.appTest"):
        return False  # AppTest: no server, nothing listens
    return not is_loopback(address)


def require_login(title: str = "Mem_Chat") -> None:
    """Stop the script here unless this session may see the app."""
    try:
        verifier = configured_verifier()
    except AuthError as exc:  # malformed hash, empty or short password: fail closed
        st.error(str(exc))
        st.stop()
    if verifier is None:
        if _exposed():
            st.error(f"This app is served on {served_address() or 'every interface'} without a password. "
                     "Set MEMCHAT_APP_PASSWORD (or MEMCHAT_APP_PASSWORD_HASH) and restart, or serve on 127.0.0.1.")
            st.stop()
        return
    if st.session_state.get(_AUTH_KEY) is True:
        if st.sidebar.button("Log out", key="_memchat_logout"):
            st.session_state[_AUTH_KEY] = False
            st.rerun()
        return
    st.title(f"🔒 {title}")
    with st.form("memchat_login", clear_on_submit=True):  # clear: the typed password leaves session state
        guess = st.text_input("Password", type="password", key="_memchat_password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        st.session_state.pop("_memchat_password", None)  # the typed password does not outlive this run
        if verifier.check(guess):
            st.session_state[_AUTH_KEY] = True
            st.rerun()
        with _login_lock:
            time.sleep(AppConfig.login_failure_delay_s)
        st.error("Wrong password.")
    st.stop()


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
@contextmanager
def errors_shown(container=None) -> Iterator[None]:
    """A MemChatError inside becomes one ``st.error`` (in ``container``, default the main area) and stops the run."""
    try:
        yield
    except MemChatError as exc:
        (container or st).error(escape_controls(str(exc)))
        st.stop()


# ---------------------------------------------------------------------------
# Text from documents and models, shown as text
# ---------------------------------------------------------------------------
# The Markdown constructs that fetch or link: [links](..), ![images](..), <autolinks>, <html>,
# :color[directives], $\href{..}$ (KaTeX), and GFM's bare http:// / www. autolinks.
_ACTIVE = re.compile(r"([\\\[\]<>$])")
_AUTOLINK = re.compile(r"(?i)(?<=[a-z0-9+.-])(:)(?=//)|(?<=\bwww)(\.)")


def md_escape(text: str) -> str:
    """``text`` as inert Markdown: every link, image, HTML and autolink construct escaped; control chars shown."""
    text = "\n".join(escape_controls(line) for line in str(text or "").split("\n"))  # keep line breaks
    text = _ACTIVE.sub(r"\\\1", text)
    return _AUTOLINK.sub(lambda m: "\\" + (m.group(1) or m.group(2)), text)


def chat_question(placeholder: str) -> str | None:
    """The question typed into the chat box, or None: nothing sent, or only blanks (a blank message asks nothing)."""
    prompt = st.chat_input(placeholder)
    return prompt if prompt and prompt.strip() else None


def show_text(text: str, container=None) -> None:
    """Document or model text in a chat bubble: reads like prose, renders nothing."""
    (container or st).markdown(md_escape(text))


def stream_text(pieces: Iterable[str], container=None) -> str:
    """Stream ``pieces`` as inert Markdown (re-escaped whole each time: a link may span pieces). Returns the text."""
    slot = (container or st).empty()
    text = ""
    for piece in pieces:
        text += piece
        slot.markdown(md_escape(text) + " ▌")
    slot.markdown(md_escape(text))
    return text


def show_sources(answer) -> None:
    """Evidence line, citations and retrieved passages under an answer, all as text."""
    if getattr(answer, "note", ""):
        st.caption(md_escape(answer.note))
    if answer.evidence_line:
        st.caption(md_escape(answer.evidence_line))
    if answer.hits:
        st.markdown("**Sources:** " + "; ".join(md_escape(c) for c in answer.citations))
        with st.expander(f"Retrieved passages ({len(answer.hits)})"):
            for h in answer.hits:
                st.markdown(f"**{md_escape(h.citation)}** · similarity {h.score:.2f}")
                st.text(h.text)


# ---------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------
def split_oversized(uploads) -> tuple[list, list[str]]:
    """(uploads within ingestion's per-file byte cap, one line per upload over it)."""
    from memchat.cli import max_file_bytes

    cap = max_file_bytes()  # Streamlit's maxUploadSize is the same cap in whole MB: this is the exact check
    ok, refused = [], []
    for u in uploads:
        if u.size > cap:
            refused.append(f"{md_escape(escape_controls(u.name))}: {u.size:,} bytes, over the {cap:,}-byte limit per "
                           "file; raise MEMCHAT_MAX_FILE_BYTES if you trust it")
        else:
            ok.append(u)
    return ok, refused


# ---------------------------------------------------------------------------
# Models, once per server
# ---------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the language model (once per server)...")
def get_generator(model_name: str):
    from memchat.generation import Generator

    return Generator(model_name)


@st.cache_resource(show_spinner="Loading the embedding model (once per server)...")
def get_embedder(model_name: str, backend: str):
    from memchat.embeddings import Embedder

    return Embedder(model_name, backend=backend)


def attach_embedder(kb):
    """Give the knowledge base the cached embedder of the model it was built with."""
    spec = kb.embedding_spec() or {}
    kb.attach_embedder(get_embedder(spec.get("model", kb.embed_cfg.model_name), spec.get("backend", kb.embed_cfg.backend)))
    return kb


@st.cache_resource(show_spinner=False)
def _knowledge_base_for(storage: str):
    from memchat.knowledge import KnowledgeBase

    return KnowledgeBase(storage)


@st.cache_resource(show_spinner=False)
def _rag_pipeline_for(_kb, _generator, kb_id: int, generator_id: int, model_name: str, mode: str | None):
    from memchat.config import GenerationConfig
    from memchat.rag import RAGPipeline

    return RAGPipeline(_kb, _generator, generation=GenerationConfig(model_name=model_name), mode=mode)


def shared_rag_pipeline(kb, generator, model_name: str, mode: str | None = None):
    """One RAGPipeline per server, knowledge base, model and mode, like the models themselves: the chunks'
    sentence vectors and the reader's encoded prompt prefix outlive a rerun instead of being redone per question.
    (Keyed by the ids of the cached kb and generator, which the pipeline holds, so the ids stay theirs.)"""
    return _rag_pipeline_for(kb, generator, id(kb), id(generator), model_name, mode)


def shared_knowledge_base():
    """One KnowledgeBase per server and store folder: its decrypted state is reused across reruns and
    sessions, and re-read only when the store's files change (a commit by anyone: app, CLI, API)."""
    from memchat import config

    kb = _knowledge_base_for(str(config.storage_dir()))
    if kb.embedding_spec() is not None:  # a new store loads the configured embedder itself, once (kb is cached)
        attach_embedder(kb)
    return kb


# ---------------------------------------------------------------------------
# The fine-tuned model (the fine-tuned and hybrid apps)
# ---------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the fine-tuned model (once per server)...")
def _finetuned(model_dir: str, stamp: float):
    from memchat.finetuned import FineTunedChat

    return FineTunedChat(model_dir)


def load_finetuned(model_dir=None):
    """The cached model of ``model_dir`` (default finetuned_model/). Raises MemChatError."""
    from pathlib import Path

    from memchat import config

    model_dir = Path(model_dir) if model_dir else config.finetuned_dir()
    files = [model_dir / "config.json", model_dir / config.FINETUNED_META_FILENAME]
    stamp = max((f.stat().st_mtime for f in files if f.exists()), default=0.0)  # retraining -> a new key
    return _finetuned(str(model_dir), stamp)


def model_summary(chat) -> str:
    meta = chat.meta
    if not meta:
        return f"{chat.model_dir} (no Mem_Chat metadata)"
    results, records = meta.get("results") or {}, ((meta.get("dataset") or {}).get("records") or {})
    loss = results.get("eval_loss") if results.get("eval_loss") is not None else results.get("train_loss")
    docs = len((meta.get("lineage") or {}).get("documents") or [])
    parts = [chat.display_name, f"trained {str(meta.get('created', '?'))[:16].replace('T', ' ')}",
             f"{records.get('train', '?')} training pairs from {docs} documents"]
    if loss is not None:
        parts.append(f"{'validation' if results.get('eval_loss') is not None else 'training'} loss {loss:.3f}")
    return md_escape(" · ".join(parts))


def generation_settings(container=None) -> dict:
    """The guide's generate_response settings, adjustable."""
    container = container or st.sidebar
    container.subheader("Fine-tuned model")
    sample = container.toggle("Sample (off = greedy, reproducible)", value=True, key="ft_sample")
    temperature = container.slider("Temperature", 0.1, 1.5, 0.7, 0.1, disabled=not sample, key="ft_temperature")
    max_length = container.slider("Max length (prompt + answer tokens)", 64, 1024, 512, 32, key="ft_max_length")
    return dict(max_length=max_length, temperature=temperature, do_sample=sample)
