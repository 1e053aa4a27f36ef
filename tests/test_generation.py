"""Batched generation, streaming and scoring on tiny real models (plus one real-model check)."""

import threading

import pytest
import torch

from memchat.generation import GenerationResult, Generator, format_chat

QUESTIONS = [
    "What is the capital of France?",
    "Summarise the report in one sentence, please, and name the decisions taken at the meeting.",
    "hello",
    "Which river flows north through the valley past the old mill?",
    "What did the company do in 2023?",
    "Café or tea?",
    "Explain photosynthesis to a child in three short sentences using simple words only.",
]


@pytest.fixture(autouse=True)
def _tiny_models_single_threaded(request):
    """Tiny-model tests run ~10x faster on one thread on a busy 2-core box; slow tests keep all."""
    if request.node.get_closest_marker("slow") is None:
        request.getfixturevalue("torch_single_thread")


def conversation(question, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}]


@pytest.fixture(scope="module", params=["qwen", "gpt2"])
def generator(request, tiny_qwen_dir, tiny_gpt2_dir):
    """A Generator over each tiny model: ChatML template (Qwen2) and none (DialoGPT-like GPT-2).

    Loaded in float32 whatever this CPU would pick: the layouts compared below (batched, padded, cached) give
    equal greedy tokens in float32; bf16 rounding can flip a near-tie of a random tiny model between two layouts.
    """
    folder = tiny_qwen_dir if request.param == "qwen" else tiny_gpt2_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMCHAT_DTYPE", "float32")
        return Generator(str(folder))


def test_format_prompt_chat_template(tiny_qwen_dir):
    gen = Generator(str(tiny_qwen_dir))
    prompt = gen.format_prompt(conversation("Hi?", system="Be brief."))
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_format_prompt_dialogpt_convention(tiny_gpt2_dir):
    gen = Generator(str(tiny_gpt2_dir))
    assert gen.format_prompt(conversation("Hi?")) == "Hi?<|endoftext|>"
    history = [
        {"role": "system", "content": "Context."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert format_chat(gen.tokenizer, history) == "Context.\nQ1<|endoftext|>A1<|endoftext|>Q2<|endoftext|>"
    with pytest.raises(ValueError):
        gen.format_prompt([])


def test_batched_equals_one_at_a_time_in_input_order(generator):
    """Left padding, length sorting and batching must not change a greedy answer or its place."""
    batch = [conversation(q) for q in QUESTIONS]
    batched = generator.generate(batch, max_new_tokens=12, batch_size=3)  # 3 batches, the last partial
    single = [generator.generate([m], max_new_tokens=12)[0] for m in batch]
    assert batched == single
    assert len({r.prompt_tokens for r in batched}) > 3  # the prompts really differ in length
    assert all(r.new_tokens == 12 and r.finish_reason == "length" for r in batched)
    assert any(r.text for r in batched)


def test_eos_mid_batch(generator):
    """Rows that end early (eos) stay correct while the others go on; counts include the eos."""
    batch = [conversation(q) for q in QUESTIONS[:4]]
    free = generator.generate(batch, max_new_tokens=10)
    # Declare the 3rd token of the first answer an end-of-sequence token.
    first = generator.tokenizer(generator.format_prompt(batch[0]), add_special_tokens=False)["input_ids"]
    out = generator.model.generate(
        input_ids=torch.tensor([first]), attention_mask=torch.ones(1, len(first), dtype=torch.long),
        max_new_tokens=3, do_sample=False, repetition_penalty=1.1, pad_token_id=generator.pad_id,
    )
    saved = list(generator.eos_ids)
    generator.eos_ids = saved + [int(out[0, -1])]
    try:
        batched = generator.generate(batch, max_new_tokens=10, batch_size=4)
        single = [generator.generate([m], max_new_tokens=10)[0] for m in batch]
    finally:
        generator.eos_ids = saved
    assert batched == single
    assert batched[0].finish_reason == "eos" and batched[0].new_tokens <= 3
    assert free[0].text.startswith(batched[0].text)


def test_stream_pieces_concatenate_to_generate(generator):
    for question in QUESTIONS[:3]:
        messages = conversation(question)
        expected = generator.generate([messages], max_new_tokens=16)[0].text
        pieces = list(generator.stream(messages, max_new_tokens=16))
        assert "".join(pieces) == expected
        assert all(pieces)  # no empty pieces


def test_stop_strings_cut_generate_and_stream(generator):
    messages = conversation(QUESTIONS[0])
    full = generator.generate([messages], max_new_tokens=24)[0]
    assert len(full.text) > 6
    stop = full.text[len(full.text) // 2 :][:3]  # something the model does write, mid-answer
    cut = generator.generate([messages], max_new_tokens=24, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)].strip()
    assert cut.new_tokens < full.new_tokens
    assert "".join(generator.stream(messages, max_new_tokens=24, stop=[stop])) == cut.text
    # In a batch, the stopped row does not disturb the others.
    batch = [messages, conversation(QUESTIONS[1])]
    both = generator.generate(batch, max_new_tokens=24, stop=[stop])
    assert both[0] == cut
    other = generator.generate([batch[1]], max_new_tokens=24, stop=[stop])[0]
    assert both[1] == other


def test_stream_closed_early_stops_the_thread(tiny_qwen_dir):
    gen = Generator(str(tiny_qwen_dir))
    before = set(threading.enumerate())
    pieces = gen.stream(conversation(QUESTIONS[1]), max_new_tokens=200)
    next(pieces)
    started = set(threading.enumerate()) - before
    pieces.close()  # what a Streamlit rerun does to an abandoned generator
    # only the threads stream() started: unrelated background threads may come and go
    assert not any(t.is_alive() for t in started)
    assert gen.stats.new_tokens < 200


def test_loglikelihood_matches_manual_computation(generator):
    context = conversation(QUESTIONS[0])
    continuation = " Paris is the capital"
    score = generator.loglikelihood(context, continuation)

    tok = generator.tokenizer
    prompt = generator.format_prompt(context)
    special = not tok.chat_template
    ctx = tok(prompt, add_special_tokens=special)["input_ids"]
    full = tok(prompt + continuation, add_special_tokens=special)["input_ids"]
    assert full[: len(ctx)] == ctx
    with torch.no_grad():
        logits = generator.model(torch.tensor([full])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    manual = sum(float(logprobs[t - 1, full[t]]) for t in range(len(ctx), len(full)))
    assert score == pytest.approx(manual, abs=1e-4)
    assert score < 0


def test_loglikelihood_prefers_the_greedy_token_and_batches(generator):
    context = conversation(QUESTIONS[3])
    tok = generator.tokenizer
    ids = tok(generator.format_prompt(context), add_special_tokens=not tok.chat_template)["input_ids"]
    with torch.no_grad():
        logits = generator.model(torch.tensor([ids])).logits[0, -1]
    # Tokens ranked by the model, keeping those whose text encodes back to that one token.
    ranked = [
        int(i) for i in torch.argsort(logits, descending=True)
        if int(i) not in tok.all_special_ids and tok(tok.decode([int(i)]), add_special_tokens=False)["input_ids"] == [int(i)]
    ]
    best, worse = tok.decode([ranked[0]]), tok.decode([ranked[50]])
    scores = generator.loglikelihoods([(context, best), (context, worse), (context, "")])
    assert scores[0] > scores[1]
    assert scores[2] == 0.0
    assert scores[0] == pytest.approx(generator.loglikelihood(context, best), abs=1e-4)


@pytest.mark.parametrize("model", ["tiny_qwen_dir", "tiny_gpt2_dir"])
def test_prompt_logprobs_sum_to_loglikelihood(model, request):
    """The server side of prompt_logprobs: the tail after the context is the continuation's score."""
    gen = Generator(str(request.getfixturevalue(model)))
    context = conversation(QUESTIONS[0], system="Answer briefly.")
    for continuation in ("Paris", " Paris is the capital"):
        ids, logprobs = gen.prompt_logprobs(context + [{"role": "assistant", "content": continuation}],
                                            continue_final_message=True)
        context_ids, _ = gen.prompt_logprobs(context)
        assert logprobs[0] is None and len(ids) == len(logprobs) and ids[: len(context_ids)] == context_ids
        assert sum(logprobs[len(context_ids):]) == pytest.approx(gen.loglikelihood(context, continuation), abs=1e-4)
    with pytest.raises(ValueError, match="assistant"):
        gen.prompt_logprobs(context, continue_final_message=True)


def test_sampling_and_stats(tiny_qwen_dir):
    gen = Generator(str(tiny_qwen_dir))
    torch.manual_seed(0)
    results = gen.generate([conversation(q) for q in QUESTIONS[:3]], max_new_tokens=8, temperature=0.9, top_p=0.95)
    assert len(results) == 3 and all(isinstance(r, GenerationResult) for r in results)
    assert gen.stats.new_tokens == sum(r.new_tokens for r in results)
    assert gen.stats.prompts == 3 and gen.stats.seconds > 0 and gen.stats.tokens_per_s > 0
    assert "tokens/s" in str(gen.stats)
    assert gen.generate([]) == []


def test_progress_bar(tiny_gpt2_dir, capsys):
    gen = Generator(str(tiny_gpt2_dir))
    gen.generate([conversation(q) for q in QUESTIONS[:4]], max_new_tokens=4, batch_size=2, progress=True)
    assert "4/4" in capsys.readouterr().err


def test_given_model_keeps_its_training_mode(tiny_gpt2_dir):
    from memchat.models import load_causal_lm

    model, tokenizer, resolved = load_causal_lm(str(tiny_gpt2_dir), training=True)
    gen = Generator(model=model, tokenizer=tokenizer)
    assert gen.resolved.source == "local"
    a = gen.generate([conversation("hello")], max_new_tokens=6)[0]
    b = gen.generate([conversation("hello")], max_new_tokens=6)[0]
    assert a == b  # eval() during generation: no dropout noise
    assert model.training
    with pytest.raises(ValueError):
        Generator(model=model)


def test_overlong_prompt_is_cut_to_fit(tiny_gpt2_dir):
    gen = Generator(str(tiny_gpt2_dir))  # 512 positions
    long_question = " ".join(["budget"] * 700)
    result = gen.generate([conversation(long_question)], max_new_tokens=8)[0]
    assert result.prompt_tokens == 512 - 8
    assert result.new_tokens == 8


@pytest.mark.slow
def test_bundled_smollm2_knows_paris(monkeypatch):
    monkeypatch.setenv("MEMCHAT_DEVICE", "cpu")
    gen = Generator("bundled")
    assert gen.notice is None and gen.resolved.source == "bundled"
    messages = conversation("What is the capital of France?")
    answer = gen.generate([messages], max_new_tokens=32)[0]
    assert "Paris" in answer.text
    assert "".join(gen.stream(messages, max_new_tokens=32)) == answer.text


@pytest.mark.parametrize("model", ["tiny_qwen_dir", "tiny_gpt2_dir"])
def test_shared_prefix_gives_the_same_answers(model, request):
    """share_prefix=True: each chunk's text is prefilled once for all its questions; same greedy answers.

    In float64: a random tiny model's logits are near ties, and the two paths' different matmul shapes round
    differently in float32, enough on some CPUs (AVX-512/AMX kernels) to flip a greedy pick."""
    import torch

    gen = Generator(str(request.getfixturevalue(model)))
    gen.model.to(torch.float64)
    chunks = [" ".join(QUESTIONS[:4]) * 2, " ".join(QUESTIONS[3:]) * 2]
    asks = ["Where?", "What did the company do?", "Why is the sky blue?"]
    batch = [conversation(f"Text: {c}\n\nQuestion: {q}", system="Answer from the text.") for c in chunks for q in asks]
    batch.append(conversation("hello"))  # shares nothing past the template: a group of its own
    plain = gen.generate(batch, max_new_tokens=10, batch_size=16)
    gen.stats.reset()
    shared = gen.generate(batch, max_new_tokens=10, batch_size=16, share_prefix=True)
    assert [r.text for r in shared] == [r.text for r in plain]
    assert [(r.prompt_tokens, r.new_tokens, r.finish_reason) for r in shared] == \
        [(r.prompt_tokens, r.new_tokens, r.finish_reason) for r in plain]
    assert gen.stats.calls == 1 and gen.stats.shared_prefix_tokens > 2 * 2 * 40  # (3 - 1) rows x 2 chunks x ~chunk
    stop = [plain[0].text[3:5]] if len(plain[0].text) > 5 else ["\n"]
    assert [r.text for r in gen.generate(batch[:3], max_new_tokens=10, stop=stop, share_prefix=True)] == \
        [r.text for r in gen.generate(batch[:3], max_new_tokens=10, stop=stop)]
    assert [r.text for r in gen.generate(batch, max_new_tokens=6, batch_size=2, share_prefix=True)] == \
        [r.text for r in gen.generate(batch, max_new_tokens=6, batch_size=2)]


def test_bf16_generates_and_scores_like_float32(tiny_qwen_dir, monkeypatch):
    """MEMCHAT_DTYPE=bfloat16 (what memchat.device picks on a CPU with bf16 instructions) loads bf16 weights, writes
    an answer, and scores in float32 from the bf16 logits: close to the float32 model's scores, never bf16-rounded."""
    monkeypatch.setenv("MEMCHAT_DTYPE", "float32")
    exact = Generator(str(tiny_qwen_dir))
    monkeypatch.setenv("MEMCHAT_DTYPE", "bfloat16")
    half = Generator(str(tiny_qwen_dir))
    assert exact.model.dtype == torch.float32 and half.model.dtype == torch.bfloat16
    batch = [conversation(q) for q in QUESTIONS[:3]]
    out = half.generate(batch, max_new_tokens=6)
    assert all(r.new_tokens == 6 for r in out) and any(r.text for r in out)
    requests = [(conversation(q), " the answer is seven") for q in QUESTIONS[:3]]
    a, b = exact.loglikelihoods(requests), half.loglikelihoods(requests)
    assert all(isinstance(x, float) and x < 0 for x in b)
    assert b == pytest.approx(a, rel=0.005)  # measured ~0.05% apart; bf16 logits keep ~3 significant digits
    assert any(float(torch.tensor(x, dtype=torch.bfloat16)) != x for x in b)  # a float32 sum, not a bf16 one
