"""Tiny REAL models with random weights, built on the fly (a pytest plugin; see conftest).

Fixtures (session-scoped; each returns a ``pathlib.Path`` to a folder that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and
``memchat.models.resolve_model`` accept as a local model):

  tiny_qwen_dir   Qwen2ForCausalLM, 2 layers, hidden 64, ~600-token byte-level BPE.
                  Chat model: ChatML template (``<|im_start|>role\\n...<|im_end|>\\n``),
                  eos = ``<|im_end|>``, pad = ``<|endoftext|>``, generation_config eos =
                  [<|im_end|>, <|endoftext|>] like Qwen2.5-Instruct. The template marks
                  assistant text with ``{% generation %}`` so
                  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` works.
  tiny_gpt2_dir   GPT2LMHeadModel, 2 layers, hidden 64, same kind of tokenizer, shaped
                  like microsoft/DialoGPT-small: NO chat template, bos = eos = unk =
                  ``<|endoftext|>``, NO pad token (code must set pad = eos itself).

Both tokenizers are byte-level: any text (PDF noise, accents, emoji) encodes
without <unk> and decodes back exactly. Weights are random (seeded: the same
every run), so outputs are gibberish but deterministic; use them to exercise
loading, batching, generation, training and saving, not answer quality. Both
build together in well under a second.

``torch_single_thread`` (function-scoped) runs a test with one torch thread and
restores the count after: tiny matrices gain nothing from a second thread, and on
a busy shared 2-core machine OpenMP spinning made tiny generation ~10x slower.

The folders are shared by the whole session: treat them as read-only. A test that
writes into a model folder should copy it first (``shutil.copytree``) or call
``build_tiny_qwen(path)`` / ``build_tiny_gpt2(path)`` into its own ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_SPECIALS = ["<|endoftext|>"]
# With tied embeddings and the usual 0.02, a 2-layer random model just repeats its last
# input token (greedy output is "\n\n\n..." or an instant eos). 0.1 lets attention and
# MLP outweigh the embedding: varied gibberish, and well separated logits, so greedy
# decoding is stable against float noise from padding.
INIT_RANGE = 0.1

# ChatML, as Qwen2.5 writes it minus the default system prompt and tools.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A few hundred words of ordinary English (plus the odd digit and accent) to learn merges from.
_CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
What is the capital of France? Paris is the capital and largest city of France.
Question: What does the document say about the budget? Answer: The budget was approved in March.
A knowledge base stores chunks of text from documents, and a retriever finds the chunks that answer a question.
Machine learning models learn patterns from data. A language model predicts the next token in a sequence.
Fine-tuning adapts a pretrained model to a new task with a small dataset and a few epochs of training.
The report describes revenue, costs, employees, customers, products and the plan for next year.
Encryption keeps private files safe: only the holder of the key can read them.
Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside green leaves.
The river flows north through the valley, past the old mill and the stone bridge, into the lake.
In 2023 the company hired 120 people, opened 3 offices and grew sales by 15 percent.
Please summarise the main points of the meeting, the decisions taken and the next steps.
You are a helpful assistant. Answer the question using only the context. If unsure, say you do not know.
Café, naïve, résumé and façade keep their accents; numbers like 3.14 and 42 keep their digits.
user assistant system context question answer source page document chunk version
""".strip().splitlines()


def _corpus() -> list[str]:
    words = " ".join(_CORPUS).split()
    # Add shuffled word sequences so merges cover words in many contexts (deterministic).
    extra = [" ".join(words[(i * 7) % len(words) :: 5][:12]) for i in range(60)]
    return _CORPUS + extra


def build_byte_level_tokenizer(specials: list[str], vocab_size: int = 600):
    """A trained byte-level BPE ``tokenizers.Tokenizer`` with ``specials`` as ids 0..n-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever <unk>
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def build_tiny_qwen(path: Path | str, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 chat model + tokenizer to ``path``; returns it."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_byte_level_tokenizer(QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the real Qwen2.5
        max_position_embeddings=512,
        tie_word_embeddings=True,  # as in Qwen2.5-0.5B/1.5B, SmolLM2 and DialoGPT: save/load must cope
        initializer_range=INIT_RANGE,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_gpt2(path: Path | str, seed: int = 0) -> Path:
    """Write a tiny random DialoGPT-like GPT-2 (no chat template, no pad token) to ``path``."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = Path(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_byte_level_tokenizer(GPT2_SPECIALS),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        initializer_range=INIT_RANGE,
        bos_token_id=endoftext,
        eos_token_id=endoftext,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=endoftext)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """Folder of a tiny random Qwen2 chat model (read-only; see the module docstring)."""
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """Folder of a tiny random DialoGPT-like GPT-2 (read-only; see the module docstring)."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture
def torch_single_thread():
    """One torch thread for the test (tiny models), the previous count restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
