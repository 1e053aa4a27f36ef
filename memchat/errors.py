"""Mem_Chat's error hierarchy.

Library code raises these; only the edges (scripts, Streamlit apps) translate them
into one line on stderr + exit code 1, or ``st.error`` + ``st.stop``. Every message
says what went wrong and, where there is one, the fix.
"""


class MemChatError(Exception):
    """Base class for every error Mem_Chat reports to a user."""


class StoreError(MemChatError):
    """The encrypted store is missing, damaged, inconsistent or locked."""


class NoStoreError(StoreError):
    """There is no knowledge base yet."""


class WrongKeyError(StoreError):
    """The key (key.key, MEMCHAT_KEY or MEMCHAT_PASSPHRASE) does not open the store."""


class BadDocumentError(MemChatError):
    """A document could not be ingested (not a PDF, corrupt, encrypted, no text...)."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")


class LimitError(BadDocumentError):
    """A document is over an ingestion cap (``config.IngestConfig``); the reason names the variable to raise."""


class ConfigError(MemChatError):
    """A setting (an environment variable) has a value that cannot be used."""


class ModelUnavailableError(MemChatError):
    """A model could not be loaded and no fallback applies."""


class EmbeddingMismatchError(StoreError):
    """The store was built with another embedding model than the one asked for."""


class DatasetError(MemChatError):
    """Training data is missing, empty or malformed."""


class LLMServerError(ModelUnavailableError):
    """The external OpenAI-compatible generation server is unreachable or refused a request."""


class TrainingOutOfMemoryError(MemChatError):
    """The accelerator ran out of memory during training."""
