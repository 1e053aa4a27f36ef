"""The dataset contract of fine-tuning: which records a run trains on, and their token ids.

Reads ``training_data/faiss_training_data.json`` (plain or encrypted, ``memchat.formats``)
or a user's own JSON / JSON Lines file of ``{"question", "answer"}``,
``{"instruction", "input"?, "output"}`` or ``{"messages": [...]}`` records (all
training, no validation). Chooses the records of the training mix, each part a switch:

  (a) ``document``   a chunk's text, a plain language-model example: loss on every token
  (b) ``original``   the generated questions with their answers: loss on the answer only
  (c) ``variation``  their paraphrases: loss on the answer only
  (d) restatements   wh / cloze / about / facts items made from the sentences: answer only

and encodes them (``memchat.prompting``) without padding: the collator pads per batch.
Deliberately left out: the trainer (``memchat.training``) and generating anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import formats
from .errors import DatasetError
from .formats import DOCUMENT_KIND, QA_KINDS, RESTATEMENT_KINDS
from .prompting import encode_pairs, encode_text

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy ignore_index)
MIX_PARTS = ("documents", "qa", "paraphrases", "restatements")
USER_FORMS = '{"question", "answer"}, {"instruction", "output"} or {"messages": [...]}'


def part_of(kind: str) -> str:
    """The mix part a record kind belongs to."""
    if kind == DOCUMENT_KIND:
        return "documents"
    if kind == "variation":
        return "paraphrases"
    if kind in RESTATEMENT_KINDS:
        return "restatements"
    return "qa"  # "original" and a user's own pairs


@dataclass
class TrainingData:
    """The checked contents of a training data file."""

    path: Path
    sha256: str  # of the file's (decoded) bytes: the fine-tuned model records which data it saw
    train: list[dict]
    validation: list[dict]
    lineage: dict  # {"documents": [{"name", "version", "sha256"}], "store_generation": ...}
    generator_model: str | None = None
    created: str | None = None
    source: str = "memchat"  # "memchat" (extract_faiss_data.py) or "user" (a file of the user's own)
    excluded: dict = field(default_factory=dict)  # part -> records left out by the mix switches

    @property
    def counts(self) -> dict:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "total": len(self.train) + len(self.validation),
        }

    def kinds(self, split: str = "train") -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.train if split == "train" else self.validation:
            out[r.get("kind", "original")] = out.get(r.get("kind", "original"), 0) + 1
        return dict(sorted(out.items()))

    def select(self, mix: dict[str, bool]) -> "TrainingData":
        """Only the training records of the mix parts switched on (validation is kept whole)."""
        unknown = set(mix) - set(MIX_PARTS)
        if unknown:
            raise DatasetError(f"Unknown mix part(s) {', '.join(sorted(unknown))}; known: {', '.join(MIX_PARTS)}.")
        keep, excluded = [], {}
        for r in self.train:
            part = part_of(r.get("kind", "original"))
            if mix.get(part, True):
                keep.append(r)
            else:
                excluded[part] = excluded.get(part, 0) + 1
        if not keep:
            raise DatasetError(f"The mix {mix} leaves no training record of {self.path}. Switch a part back on.")
        self.train, self.excluded = keep, excluded
        return self


def load_training_data(path: str | Path) -> TrainingData:
    """Read and check a training data file; every problem is one ``DatasetError`` line."""
    path = Path(path)
    if path.is_dir():
        from .config import DATASET_FILENAME

        path = path / DATASET_FILENAME
    if not path.exists():
        raise DatasetError(f"No training data at {path}. {formats.EXTRACT_HINT}")
    raw = formats.read_bytes(path)
    if not raw.strip():
        raise DatasetError(f"{path} is empty. {formats.REMAKE_HINT}")
    text = _text(raw, path)
    doc = None
    stripped = text.lstrip()
    if stripped.startswith("{") and '"format"' in stripped[:200]:
        _, _, doc = formats.read_dataset_bytes(path)
    if doc is None:
        return _user_data(path, raw, text)
    records = doc.get("records")
    if not isinstance(records, list):
        raise DatasetError(f'{path} has no "records" list. {formats.REMAKE_HINT}')
    if not records:
        raise DatasetError(f"{path} holds no records. Add PDFs, then: python extract_faiss_data.py")
    train: list[dict] = []
    validation: list[dict] = []
    for number, record in enumerate(records, start=1):
        where = f"{path}: record {number}"
        if not isinstance(record, dict):
            raise DatasetError(f"{where} is not a JSON object. {formats.REMAKE_HINT}")
        if record.get("id") is not None:
            where += f" (id {record['id']!r})"
        kind = record.get("kind", "original")
        if kind not in formats.KINDS:
            raise DatasetError(f"{where} has kind {kind!r}; known: {', '.join(formats.KINDS)}. {formats.REMAKE_HINT}")
        keys = ("text",) if kind == DOCUMENT_KIND else ("question", "answer")
        for key in keys:
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(f"{where} has no {key}. {formats.REMAKE_HINT}")
        split = record.get("split", "train")
        if split == "train":
            train.append(record)
        elif split == "validation" and kind in formats.VALIDATION_KINDS:
            validation.append(record)
        else:
            raise DatasetError(f'{where} has split {split!r}; expected "train" or "validation". {formats.REMAKE_HINT}')
    if not train:
        raise DatasetError(f"{path} has no training records (all {len(validation)} are validation). "
                           "Add documents, then: python extract_faiss_data.py")
    lineage = doc.get("lineage") if isinstance(doc.get("lineage"), dict) else {}
    return TrainingData(path=path, sha256=formats.sha256(raw), train=train, validation=validation, lineage=lineage,
                        generator_model=doc.get("generator_model"), created=doc.get("created"))


def _text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text. {formats.REMAKE_HINT}") from None


def _user_data(path: Path, raw: bytes, text: str) -> TrainingData:
    """A user's own JSON list or JSON Lines of question/answer records (all training)."""
    rows: list[Any]
    try:
        loaded = json.loads(text)
        rows = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path} is not valid JSON ({exc.msg} at line {number}, column {exc.colno}). "
                    f"Give Mem_Chat's dataset, or a JSON list or JSON Lines of {USER_FORMS}."
                ) from None
    records = []
    for number, row in enumerate(rows, start=1):
        for q, a in _pairs_of(row, path, number):
            records.append({"id": f"u{number}-{len(records)}", "question": q, "answer": a, "kind": "original",
                            "split": "train"})
    if not records:
        raise DatasetError(f"{path} holds no records. Give a JSON list or JSON Lines of {USER_FORMS}.")
    return TrainingData(path=path, sha256=formats.sha256(raw), train=records, validation=[], lineage={}, source="user")


def _pairs_of(row: Any, path: Path, number: int) -> list[tuple[str, str]]:
    where = f"{path}: record {number}"

    def text(value) -> str | None:
        return value.strip() if isinstance(value, str) and value.strip() else None

    if isinstance(row, dict):
        if text(row.get("question")) and text(row.get("answer")):
            return [(text(row["question"]), text(row["answer"]))]
        if text(row.get("instruction")) and text(row.get("output")):
            extra = text(row.get("input"))
            return [(text(row["instruction"]) + (f"\n\n{extra}" if extra else ""), text(row["output"]))]
        messages = row.get("messages")
        if isinstance(messages, list) and messages:
            pairs, last_user = [], None
            for m in messages:
                if not isinstance(m, dict) or not text(m.get("content")) or m.get("role") not in ("system", "user", "assistant"):
                    raise DatasetError(f'{where}: every message needs a "role" (system/user/assistant) and a "content".')
                if m["role"] == "user":
                    last_user = text(m["content"])
                elif m["role"] == "assistant" and last_user:
                    pairs.append((last_user, text(m["content"])))
                    last_user = None
            if pairs:
                return pairs
            raise DatasetError(f"{where}: its messages hold no user turn followed by an assistant turn.")
    keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
    raise DatasetError(f"{where} ({keys}) is none of {USER_FORMS}.")


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------
@dataclass
class EncodedSplit:
    """One split ready for the trainer, with what encoding it cost."""

    dataset: Any  # datasets.Dataset: input_ids, labels, length (tokens)
    records: int
    truncated: int = 0  # answer cut to fit max_length
    skipped: int = 0  # the prompt alone filled max_length: nothing left to learn
    tokens: int = 0  # non-padding tokens
    answer_tokens: int = 0  # tokens that carry a label
    by_part: dict = field(default_factory=dict)  # part -> examples

    def summary(self) -> dict:
        return {
            "records": self.records,
            "examples": len(self.dataset),
            "truncated": self.truncated,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "answer_tokens": self.answer_tokens,
            "examples_by_part": dict(sorted(self.by_part.items())),
        }


def build_dataset(records: Sequence[dict], tokenizer, max_length: int, *, sort_by_length: bool = False) -> EncodedSplit:
    """Records -> ``datasets.Dataset`` of input_ids, labels and length (no padding here).

    QA kinds: labels IGNORE_INDEX on the prompt, the answer's ids after it. Documents: labels =
    input_ids (loss on every token); a document longer than ``max_length`` becomes several
    windows of it.
    """
    from datasets import Dataset

    docs = [r for r in records if r.get("kind") == DOCUMENT_KIND]
    pairs_src = [r for r in records if r.get("kind") != DOCUMENT_KIND]
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    split = EncodedSplit(dataset=None, records=len(records))

    def add(ids: list[int], labels: list[int], part: str) -> None:
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns["length"].append(len(ids))
        split.tokens += len(ids)
        split.answer_tokens += sum(1 for x in labels if x != IGNORE_INDEX)
        split.by_part[part] = split.by_part.get(part, 0) + 1

    for ids in encode_text(tokenizer, [r["text"] for r in docs]) if docs else []:
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if len(window) > 1:
                add(window, list(window), "documents")
    pairs = encode_pairs(tokenizer, [r["question"] for r in pairs_src], [r["answer"] for r in pairs_src]) if pairs_src else []
    for r, (prompt, answer) in zip(pairs_src, pairs):
        if len(prompt) >= max_length:
            split.skipped += 1
            continue
        if len(prompt) + len(answer) > max_length:
            answer = answer[: max_length - len(prompt)]
            split.truncated += 1
        add(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, part_of(r.get("kind", "original")))
    if sort_by_length:  # evaluation: neighbours of similar length pad little
        order = sorted(range(len(columns["length"])), key=columns["length"].__getitem__, reverse=True)
        columns = {k: [v[i] for i in order] for k, v in columns.items()}
    split.dataset = Dataset.from_dict(columns)
    return split


@dataclass
class AnswerOnlyCollator:
    """Pads a batch to its own longest example, never to max_length: tensors of shape (B, T_batch).

    Padding is on the right with attention_mask 0 and label IGNORE_INDEX, so it changes
    neither the attention nor the loss.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None  # 8 on CUDA: tensor-core friendly shapes for a few pad tokens

    def __call__(self, features: list[dict]) -> dict:
        import math

        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
