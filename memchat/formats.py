"""The files Mem_Chat writes for fine-tuning, and their versions: one owner per format.

- ``training_data/faiss_training_data.json``: the dataset (``DATASET_FORMAT`` v2): records of
  kinds ``document`` (a chunk's own text, for plain language-model loss), ``original``
  (a generated question and its answer), ``variation`` (a paraphrase of an original, same
  answer) and the generator-free restatements ``cloze``, ``wh``, ``about`` and ``facts``
  (``memchat.restatements``). Each record has a ``split`` (train / validation) and a
  ``family`` (the original question it belongs to, for QA kinds).
- ``training_data/training_stats.json``: counts per document and kind (``STATS_FORMAT``).
- ``training_data/extract_progress.jsonl``: finished chunk results, one line each.
- ``training_data/train.jsonl`` / ``validation.jsonl``: the QA kinds in the ``messages``
  form (``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``) that TRL,
  Axolotl and LLaMA-Factory load with ``load_dataset("json", ...)``; ``documents.jsonl``:
  the chunks as ``{"text": ...}`` (continued pre-training form).
- ``finetuned_model/memchat_model_meta.json``: the model meta (``MODEL_META_FORMAT``), and
  ``finetuned_model/README.md``, the model card written from it (``model_card``).

Every file here goes through ``memchat.fsperm`` (0700 folders, 0600 files). With
``encrypt`` on (opt-in: ``extract_faiss_data.py --encrypt``), the files of ``training_data/``
are Fernet tokens made with the store's key (one token per progress line), and every
reader here opens both kinds. Deliberately left out: what the records mean for training
(``memchat.training_data``) and for generation (``memchat.extraction``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from . import config, fsperm
from .errors import DatasetError, MemChatError

DATASET_FORMAT = "memchat-training-data"
DATASET_FORMAT_VERSION = 2  # v2: document / restatement kinds, question families, the family split
STATS_FORMAT = "memchat-training-stats"
STATS_FORMAT_VERSION = 2
PROGRESS_FORMAT = "memchat-extract-progress"
MODEL_META_FORMAT = "memchat-finetuned-model"
MODEL_META_VERSION = 1  # v1 plus added keys (mix, knowledge curve, default_system_prompt_dropped): old readers ignore them

PROGRESS_FILENAME = "extract_progress.jsonl"
TRAIN_JSONL = "train.jsonl"
VALIDATION_JSONL = "validation.jsonl"
DOCUMENTS_JSONL = "documents.jsonl"
MODEL_CARD_FILENAME = "README.md"

QA_KINDS = ("original", "variation")  # (b) and (c) of the mix
RESTATEMENT_KINDS = ("cloze", "wh", "about", "facts")  # (d): made from the sentences, no generator
DOCUMENT_KIND = "document"  # (a): plain text, loss on every token
KINDS = (DOCUMENT_KIND,) + QA_KINDS + RESTATEMENT_KINDS
VALIDATION_KINDS = QA_KINDS + ("wh",)  # held out: the question families, and the span probes (wh, family "p...")

EXTRACT_HINT = "Make it with: python extract_faiss_data.py"
REMAKE_HINT = "Make it again: python extract_faiss_data.py --restart"

_FERNET_PREFIX = b"gAAAAA"  # every Fernet token starts with version byte 0x80 + timestamp: base64 "gAAAAA"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Optional encryption of training_data/
# ---------------------------------------------------------------------------
@dataclass
class Codec:
    """Bytes on disk <-> bytes in memory: plain, or Fernet tokens with the store's key."""

    cipher: object | None = None  # memchat.crypto.Cipher; None = plain files

    @property
    def encrypted(self) -> bool:
        return self.cipher is not None

    def encode(self, data: bytes) -> bytes:
        return self.cipher.encrypt(data) if self.cipher is not None else data

    def decode(self, data: bytes, path: Path | str = "") -> bytes:
        if not data.startswith(_FERNET_PREFIX):
            return data
        cipher = self.cipher
        if cipher is None:
            cipher = _store_cipher(None)
            self.cipher = cipher
        try:
            return cipher.decrypt(data)
        except MemChatError as exc:
            raise DatasetError(f"{path} is encrypted and the store's key does not open it ({exc}).") from None


def _store_cipher(storage_dir: Path | None):
    from .crypto import load_or_create_cipher

    storage = Path(storage_dir) if storage_dir is not None else config.storage_dir()
    try:
        return load_or_create_cipher(storage, create=False)
    except MemChatError as exc:
        raise DatasetError(
            f"Encrypted training data needs the store's key ({storage}/key.key, MEMCHAT_KEY or MEMCHAT_PASSPHRASE): {exc}"
        ) from None


def codec(encrypt: bool, storage_dir: Path | str | None = None) -> Codec:
    """The codec for writing training_data/: the store's key when ``encrypt``, else plain."""
    return Codec(_store_cipher(Path(storage_dir) if storage_dir else None) if encrypt else None)


def write_json(path: Path, obj, codec_: Codec | None = None) -> Path:
    data = (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    return fsperm.write_private(path, (codec_ or Codec()).encode(data))


def read_bytes(path: Path, codec_: Codec | None = None) -> bytes:
    return (codec_ or Codec()).decode(Path(path).read_bytes(), path)


def write_jsonl(path: Path, rows: Iterable[dict], codec_: Codec | None = None) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    return fsperm.write_private(path, (codec_ or Codec()).encode(data))


def read_jsonl(path: Path, codec_: Codec | None = None) -> list[dict]:
    text = read_bytes(path, codec_).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# The progress file
# ---------------------------------------------------------------------------
class Progress:
    """``extract_progress.jsonl``: finished chunk results, one JSON line each (one token each, encrypted).

    Line: {"hash", "key", "result"}. Lines with another settings key are ignored
    (their chunks are regenerated); a torn last line from a killed run is dropped.
    """

    def __init__(self, path: Path, key: str, codec_: Codec | None = None):
        self.path = path
        self.key = key
        self.codec = codec_ or Codec()
        self.results: dict[str, dict] = {}  # chunk hash -> result
        self.stale = 0  # lines made with other settings
        self.torn = 0

    def _line(self, h: str, result: dict) -> str:
        raw = json.dumps({"hash": h, "key": self.key, "result": result}, ensure_ascii=False).encode("utf-8")
        return self.codec.encode(raw).decode("ascii") if self.codec.encrypted else raw.decode("utf-8")

    def load(self) -> "Progress":
        if not self.path.exists():
            return self
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    line = json.loads(self.codec.decode(raw.strip(), self.path))
                except (json.JSONDecodeError, UnicodeDecodeError, DatasetError):
                    self.torn += 1
                    continue
                if not isinstance(line, dict) or "hash" not in line or "result" not in line:
                    self.torn += 1
                elif line.get("key") != self.key:
                    self.stale += 1
                else:
                    self.results[line["hash"]] = line["result"]
        return self

    def rewrite(self, keep: set[str] | None = None) -> None:
        """Rewrite atomically with only this key's lines (of ``keep`` hashes, when given)."""
        lines = [self._line(h, r) + "\n" for h, r in self.results.items() if keep is None or h in keep]
        fsperm.write_private(self.path, "".join(lines))
        if keep is not None:
            self.results = {h: r for h, r in self.results.items() if h in keep}

    def append(self, items: list[tuple[str, dict]]) -> None:
        """Add finished chunks durably (one write + fsync per group)."""
        data = "".join(self._line(h, r) + "\n" for h, r in items)
        with fsperm.open_private_append(self.path) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.results.update(items)


# ---------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------
def dataset_document(*, generator_model: str, settings: dict, lineage: dict, records: list[dict]) -> dict:
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "created": now_iso(),
        "generator_model": generator_model,
        "settings": settings,
        "lineage": lineage,
        "records": records,
    }


def read_dataset_bytes(path: str | os.PathLike | None = None) -> tuple[Path, bytes, dict]:
    """(path, decoded bytes, parsed document) of a dataset written here; DatasetError (one line) if wrong."""
    path = Path(path) if path is not None else config.training_dir() / config.DATASET_FILENAME
    if path.is_dir():
        path = path / config.DATASET_FILENAME
    if not path.exists():
        raise DatasetError(f"No training data at {path}. {EXTRACT_HINT}")
    raw = read_bytes(path)
    if not raw.strip():
        raise DatasetError(f"{path} is empty. {REMAKE_HINT}")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). {REMAKE_HINT}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text. {REMAKE_HINT}") from exc
    if not isinstance(doc, dict) or doc.get("format") != DATASET_FORMAT:
        raise DatasetError(f'{path} is not Mem_Chat training data (no "format": "{DATASET_FORMAT}"). {REMAKE_HINT}')
    if doc.get("format_version") != DATASET_FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {doc.get('format_version')}; this Mem_Chat reads version "
            f"{DATASET_FORMAT_VERSION}. {REMAKE_HINT}"
        )
    return path, raw, doc


def read_dataset(path: str | os.PathLike | None = None) -> dict:
    """Load a dataset file written here, checking its format and version (DatasetError if wrong)."""
    return read_dataset_bytes(path)[2]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def messages_row(record: dict) -> dict:
    """A QA-kind record as a ``messages`` conversation (+ its kind and id, which loaders ignore)."""
    return {
        "messages": [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": record["answer"]},
        ],
        "kind": record.get("kind", "original"),
        "id": record.get("id"),
    }


def write_exports(folder: Path, records: list[dict], codec_: Codec | None = None) -> dict[str, Path]:
    """train.jsonl + validation.jsonl (messages) and documents.jsonl (text) beside the dataset."""
    folder = Path(folder)
    qa = [r for r in records if r.get("kind") != DOCUMENT_KIND]
    docs = [r for r in records if r.get("kind") == DOCUMENT_KIND]
    return {
        "train": write_jsonl(folder / TRAIN_JSONL, (messages_row(r) for r in qa if r["split"] == "train"), codec_),
        "validation": write_jsonl(folder / VALIDATION_JSONL,
                                  (messages_row(r) for r in qa if r["split"] == "validation"), codec_),
        "documents": write_jsonl(folder / DOCUMENTS_JSONL, ({"text": r["text"], "id": r.get("id")} for r in docs), codec_),
    }


# ---------------------------------------------------------------------------
# The model meta
# ---------------------------------------------------------------------------
def read_model_meta(folder: str | Path) -> dict:
    """memchat_model_meta.json of a fine-tuned model folder, checked for format and version."""
    path = Path(folder) / config.FINETUNED_META_FILENAME
    if not path.exists():
        raise MemChatError(f"{folder} has no {config.FINETUNED_META_FILENAME}. Train one: python train_conversational.py")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemChatError(f"{path} is damaged ({exc}). Train again: python train_conversational.py") from exc
    if meta.get("format") != MODEL_META_FORMAT or meta.get("format_version") != MODEL_META_VERSION:
        raise MemChatError(
            f"{path} has format {meta.get('format')!r} version {meta.get('format_version')}; "
            f"this Mem_Chat reads {MODEL_META_FORMAT} version {MODEL_META_VERSION}. Train again."
        )
    return meta


def model_card(meta: dict) -> str:
    """finetuned_model/README.md: what the model is, what it saw, how it was trained and how it scored."""
    base = meta["base_model"]
    ds = meta["dataset"]
    res = meta["results"]
    mix = meta.get("mix", {})
    settings = meta["settings"]
    docs = [d.get("name") for d in (meta.get("lineage") or {}).get("documents") or []]
    curve = res.get("curve") or []
    lines = [
        "---",
        f"base_model: {base.get('resolved') or base.get('requested')}",
        "library_name: transformers",
        "tags: [mem-chat, sft, trl, private]",
        "---",
        "",
        f"# Mem_Chat fine-tuned model ({base.get('display_name')})",
        "",
        f"Fine-tuned by Mem_Chat {meta.get('memchat_version')} on {meta.get('created')} from "
        f"`{base.get('resolved')}` on question/answer data extracted from {len(docs)} private document(s).",
        "",
        "## Privacy",
        "",
        "This model has learned the content of your documents and can repeat it. Treat the folder like the "
        "documents themselves: do not publish it or share it with anyone who may not read them.",
        "",
        "## Data",
        "",
        f"- dataset: `{Path(ds['path']).name}` (sha256 {ds['sha256'][:12]}), {ds['records']['train']} training and "
        f"{ds['records']['validation']} validation records; generator {ds.get('generator_model')}",
        "- training records by kind: " + ", ".join(f"{k} {v}" for k, v in (mix.get("records_by_kind") or {}).items()),
        "- mix: " + ", ".join(f"{k} {'on' if mix.get(k) else 'off'}" for k in ("documents", "qa", "paraphrases", "restatements")),
        f"- documents: {', '.join(docs) if docs else 'not recorded'}",
        "",
        "## Training",
        "",
        f"- prompt format: {meta.get('prompt_format')} (a model without a chat template was given one that "
        "writes `question<eos>answer<eos>`)"
        + ("; the base template's default system prompt emptied, in training and in the saved template"
           if meta.get("default_system_prompt_dropped") else ""),
        f"- {settings['num_train_epochs']:g} epochs max, batch {settings['per_device_train_batch_size']} x "
        f"{settings['gradient_accumulation_steps']}, lr {settings['learning_rate']:g} {settings['lr_scheduler_type']}, "
        f"max length {settings['max_length']}, {'LoRA r ' + str(settings['lora_r']) + ' (merged)' if settings.get('lora') else 'all weights'}",
        f"- best epoch {res.get('best_epoch')} by {res.get('metric_for_best')} = {res.get('best_metric')}; "
        f"stopped early: {res.get('stopped_early')}; {res.get('global_step')} steps in {res.get('runtime_s')} s",
        "",
        "## Validation (held-out question families, answered greedily each epoch)",
        "",
        "| epoch | answer-token loss | knowledge F1 | knowledge contains |",
        "|---|---|---|---|",
    ]
    for row in curve:
        loss = row.get("eval_loss")
        lines.append(f"| {row.get('epoch') or 0:.0f} | {'' if loss is None else f'{loss:.4f}'} | "
                     f"{row.get('knowledge_f1', '')} | {row.get('knowledge_contains', '')} |")
    lines += ["", "Load it with `transformers` (`AutoModelForCausalLM.from_pretrained(folder)`), or chat with it: "
              "`python test_finetuned_model.py`.", ""]
    return "\n".join(lines)
