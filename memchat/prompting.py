"""The prompt format shared by fine-tuning and inference: one definition, imported by both.

A model with a chat template sees its own template (user = question, assistant =
answer); a model without one (DialoGPT) sees ``question<eos>answer<eos>``.
``prompt_ids`` is exactly what a fine-tuned model is given before it answers, and
``encode_pairs`` is what it was trained on: ``prompt_ids + answer_ids``, the loss on
the answer ids only. ``encode_text`` is a plain language-model example (a document's
text + eos, the loss on every token).

The trailing newline: chat templates of the ChatML family write ``<|im_end|>\\n`` after
each turn. The answer ids end at ``<|im_end|>`` (the model learns to stop there, and
generation stops there); the ``\\n`` after it is never generated, so it is not trained
on. TRL's own prompt/completion tokenization keeps that one extra token; apart from it
the ids and labels are the same (``tests/test_training.py`` checks both facts).

``EOS_CHAT_TEMPLATE`` is written into a template-less model's tokenizer when it is
saved, so ``apply_chat_template`` users (vLLM, TGI) prompt it exactly as it was
trained. Deliberately left out: generation itself (``memchat.generation``) and the
training data's records (``memchat.training_data``).
"""

from __future__ import annotations

from typing import Sequence

from .errors import MemChatError

# question<eos>answer<eos>...: each turn's text then eos; nothing more for the generation prompt.
EOS_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def uses_chat_template(tokenizer) -> bool:
    """True when the model has a chat template; else the DialoGPT format question<eos>answer<eos>."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_format(tokenizer) -> str:
    return "chat_template" if uses_chat_template(tokenizer) else "eos_separated"


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise MemChatError(
            "This tokenizer has neither a chat template nor an end-of-sequence token, so question and "
            "answer cannot be told apart. Choose another base model (--model)."
        )
    return int(tokenizer.eos_token_id)


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids a model fine-tuned here expects before it writes the answer."""
    question = question.strip()
    if uses_chat_template(tokenizer):
        return list(tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"])
    return list(tokenizer(question, add_special_tokens=False)["input_ids"]) + [eos_id(tokenizer)]


def encode_pairs(tokenizer, questions: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per pair; the model sees both, the loss covers the answer ids only.

    The two halves are tokenized apart, so the prompt's ids are exactly ``prompt_ids(question)``.
    """
    questions = [q.strip() for q in questions]
    answers = [a.strip() for a in answers]
    if uses_chat_template(tokenizer):
        prompts, completions = [], []
        for question, answer in zip(questions, answers):
            prompt = chat_prompt(tokenizer, question)
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                tokenize=False,
            )
            if not full.startswith(prompt):
                raise MemChatError(
                    "This model's chat template writes the answer turn differently from the prompt it "
                    "generates from, so the answer cannot be masked reliably. Choose another base model (--model)."
                )
            prompts.append(prompt)
            # The answer plus the end-of-turn marker (the model learns to stop); the newline
            # after the marker is never generated, so it is not trained on (module docstring).
            completions.append(full[len(prompt):].rstrip())
        prompt_tok = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        answer_tok = tokenizer(completions, add_special_tokens=False)["input_ids"]
        return [(list(p), list(a)) for p, a in zip(prompt_tok, answer_tok)]
    eos = eos_id(tokenizer)
    prompt_tok = tokenizer(questions, add_special_tokens=False)["input_ids"]
    answer_tok = tokenizer(answers, add_special_tokens=False)["input_ids"]
    return [(list(p) + [eos], list(a) + [eos]) for p, a in zip(prompt_tok, answer_tok)]


def encode_text(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """A document's text as one language-model example: its ids + eos (the loss on all of them)."""
    eos = eos_id(tokenizer)
    return [list(ids) + [eos] for ids in tokenizer([t.strip() for t in texts], add_special_tokens=False)["input_ids"]]


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template writes when the messages bring none (SmolLM2: "You are a helpful AI
    assistant named SmolLM, ..."; Qwen2.5: "You are Qwen, ..."), or None when it writes none (or no template)."""
    if not uses_chat_template(tokenizer):
        return None
    question, system = "\x00q\x00", "\x00s\x00"
    try:
        plain = chat_prompt(tokenizer, question)
        given = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                              tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a system turn has no default one either
        return None
    if given.count(system) != 1:
        return None
    before, after = given.split(system)
    if plain == given.replace(system, "") or not (plain.startswith(before) and plain.endswith(after)):
        return None  # no system turn by default, or one we cannot read off
    default = plain[len(before): len(plain) - len(after)]
    return default or None


def drop_default_system_prompt(tokenizer) -> str | None:
    """Make the template's default system prompt empty, in this tokenizer's template (edited in place).

    A fine-tuned model answers the user's documents; the base model's name-and-maker line in every training
    example is a fifth of the tokens of a short question/answer pair (21 of ~80 for SmolLM2) and teaches
    nothing. The edit replaces the default text in the template source by "", so the saved template still
    writes an (empty) system turn when none is given: the model is prompted at inference, by us or by
    ``apply_chat_template`` users (vLLM, TGI), exactly as it was trained. Returns the text dropped, or None
    where the template has no default or the edit would not render as intended (then nothing changes).
    """
    default = default_system_prompt(tokenizer)
    if not default or default not in tokenizer.chat_template:
        return None
    original = tokenizer.chat_template
    question = "\x00q\x00"
    want = tokenizer.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = original.replace(default, "")
    try:
        ok = chat_prompt(tokenizer, question) == want
    except Exception:
        ok = False
    if not ok:
        tokenizer.chat_template = original
        return None
    return default


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer ``EOS_CHAT_TEMPLATE`` (before saving); True when one was added."""
    if uses_chat_template(tokenizer):
        return False
    tokenizer.chat_template = EOS_CHAT_TEMPLATE
    return True
