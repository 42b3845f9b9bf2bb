"""Speculative decoding (n-gram lookup): the same greedy tokens as without it on the CPU GGUF path,
bit for bit, on both embedded models; sampling by the rejection rule keeps the model's
distribution; processors (grammars), penalties, stop ids, logprobs, n > 1 and preemption see only
the tokens that were kept."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from engine_helpers import collect, greedy_tokens

from dashchat.engine.args import EngineArgs
from dashchat.engine.cpu.kernels import kernel_library
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.native.sampler import Sampler
from dashchat.engine.native.sequence import Sequence
from dashchat.engine.native.speculative import AnswerHistory, NgramIndex, SpeculativeConfig, Speculator
from dashchat.engine.types import SamplingParams
from dashchat.models.resolve import resolve_model
from dashchat.server.plumbing.metrics import Metrics
from tiny_models import save_tiny, save_word_tokenizer

NGRAM = '{"method": "ngram"}'
_CODE = "\n".join(f"def area_{i}(width, height):\n    return width * height + {i}" for i in range(8))
# A code edit: most of the answer repeats the prompt, so most proposals are right.
EDIT = (f"<|im_start|>user\nHere is my code:\n```python\n{_CODE}\n```\nAdd a docstring to every function and "
        "give me all of the code back.<|im_end|>\n<|im_start|>assistant\n")
CHAT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _engine(model: str, spec: str | None, **kw) -> AsyncLLMEngine:
    path = str(resolve_model(model).path)
    kw.setdefault("max_model_len", 1024)
    return AsyncLLMEngine.from_args(EngineArgs(model_dir=path, quantization="gguf", speculative_config=spec, **kw))


@pytest.fixture(scope="module")
def smol():
    """SmolLM2's GGUF: (without speculation, with it)."""
    if kernel_library() is None:
        pytest.skip("no C compiler: the GGUF kernels are what speculation is exact on")
    plain, spec = _engine("smollm2-135m-instruct", None), _engine("smollm2-135m-instruct", NGRAM)
    yield plain, spec
    plain.shutdown()
    spec.shutdown()


def run(engine: AsyncLLMEngine, text: str, params: SamplingParams):
    return asyncio.run(collect(engine, engine.tokenizer.encode(text), params))


# ---- config and proposals ---------------------------------------------------------------


def test_config_defaults_and_errors():
    assert SpeculativeConfig.parse(NGRAM) == SpeculativeConfig()
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (3, 2, 5)
    for bad, says in (("[1]", "JSON object"), ("{", "not JSON"), ('{"method": "eagle"}', "not one of"),
                      ('{"k": 1}', "unknown key"), ('{"num_speculative_tokens": 0}', "positive"),
                      ('{"prompt_lookup_min": 5, "prompt_lookup_max": 3}', "must not exceed")):
        with pytest.raises(ValueError, match=says):
            SpeculativeConfig.parse(bad)


def test_ngram_lookup_continues_the_longest_match():
    index = NgramIndex(2, 3)
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 1, 2, 3]
    assert index.propose(tokens, 3) == [4, 9, 2]  # "1 2 3" continued with 4: longer than "2 3"
    # of the two "2 3", the one after "1" (as the text's own) is continued, though not the latest
    assert NgramIndex(2, 2).propose(tokens, 3) == [4, 9, 2]
    assert NgramIndex(2, 2).propose([8, 2, 3, 4, 8, 2, 3, 5, 8, 2, 3], 2) == [5, 8]  # equal context: the latest
    assert index.propose(tokens + [8], 3) == []  # "3 8" never occurred
    assert NgramIndex(2, 2).propose([5, 5, 5], 4) == [5]  # the suffix itself is no match


def test_ngram_lookup_falls_back_on_earlier_answers_of_the_same_salt():
    history = AnswerHistory(3, max_tokens=20)
    history.add(None, [40, 41, 42, 43, 44, 45, 46])
    history.add("alice", [50, 51, 52, 53, 54])
    assert NgramIndex(2, 3, history).propose([7, 41, 42, 43], 3) == [44, 45, 46]
    assert NgramIndex(2, 3, history, "bob").propose([7, 41, 42, 43], 3) == []  # another salt's answers
    assert NgramIndex(2, 3, history, "alice").propose([51, 52, 53], 3) == [54]
    history.add(None, list(range(100, 115)))  # 26 tokens held > 20: the oldest answer goes
    assert NgramIndex(2, 3, history).propose([7, 41, 42, 43], 3) == []
    assert NgramIndex(2, 3, history).propose([101, 102, 103], 2) == [104, 105]


def test_a_long_copied_match_gets_a_long_proposal_a_fresh_one_a_short_one():
    """The proposal length follows how long the text has been copying its source: one sequence
    copying a long run proposes more than two 8-row blocks' worth at once (up to 48 rows); the same
    source matched only by its last few tokens proposes a few; a batch of 48 proposes nothing."""
    source = list(range(1000, 1200))  # 200 distinct tokens
    speculator = Speculator(SpeculativeConfig(), max_model_len=4096)

    def planned(tokens: list[int], streams: int = 1) -> list[int]:
        seqs = [Sequence(f"r{i}", 0, list(tokens), len(tokens), greedy(500), 0.0) for i in range(streams)]
        plans = speculator.plan(seqs)
        return plans[0][1] if plans else []

    copying = source + [7] + source[:100]  # the answer has copied 100 tokens of the prompt so far
    long = planned(copying)
    assert 16 < len(long) <= 47 and long == source[100 : 100 + len(long)]
    fresh = source + [7, 8, 9] + source[100:104]  # only its last 4 tokens match the source
    assert 1 <= len(planned(fresh)) <= 7 and planned(fresh) == source[104 : 104 + len(planned(fresh))]
    assert planned(copying, streams=48) == []  # 48 rows already: nothing left for proposals
    assert 0 < len(planned(copying, streams=8)) <= 40


# ---- greedy: token for token what decoding without speculation gives ------------------


def test_greedy_is_identical_on_smollm2(smol):
    plain, spec = smol
    proposed = []
    record = spec.speculator.record
    spec.speculator.record = lambda seq, k, accepted: (proposed.append(k), record(seq, k, accepted))
    try:
        for text, n in ((EDIT, 300), (CHAT, 200)):
            want, got = run(plain, text, greedy(n))[0], run(spec, text, greedy(n))[0]
            assert got.token_ids == want.token_ids
            assert got.finish_reason == want.finish_reason
    finally:
        spec.speculator.record = record
    assert max(proposed) > 16  # steps of more than two 8-row blocks were verified too
    stats = spec.stats()
    assert stats.spec_accepted_tokens > 50 and stats.spec_drafts > 0
    assert stats.kv_blocks_used == 0  # rejected positions' blocks all came back
    text = Metrics(spec).render().decode()
    assert f"dashchat_spec_decode_num_accepted_tokens_total {float(stats.spec_accepted_tokens)}" in text
    rate = stats.spec_accepted_tokens / stats.spec_draft_tokens
    assert f"dashchat_spec_decode_acceptance_rate {rate}" in text


def test_greedy_is_identical_with_a_gguf_self_draft(smol):
    """SmolLM2's GGUF drafting for itself (a second copy, its own KV cache), proposing at every
    step: the target's own text, and nearly every proposal kept."""
    plain, _ = smol
    want = run(plain, EDIT, greedy(100))[0].token_ids
    engine = _engine("smollm2-135m-instruct", '{"method": "draft_model", "model": "smollm2-135m-instruct"}')
    try:
        engine.speculator.draft_cost = 0.0  # propose although the draft costs what the target does
        assert run(engine, EDIT, greedy(100))[0].token_ids == want
        stats = engine.stats()
        assert stats.spec_draft_tokens > 30 and stats.spec_accepted_tokens >= 0.9 * stats.spec_draft_tokens
        assert engine.speculator.draft.blocks.num_used == 0
    finally:
        engine.shutdown()


def test_prefix_cache_holds_only_kept_tokens(smol):
    """An answer's blocks written by verification steps serve a later prompt that quotes it, as
    the blocks written by plain decode steps do: same hits, same continuation."""
    plain, spec = smol
    answer = run(plain, EDIT, greedy(120))[0].token_ids
    run(spec, EDIT, greedy(120))
    follow_up = plain.tokenizer.encode(EDIT) + answer[:100]
    got = []
    for engine in (plain, spec):
        hits = engine.stats().prefix_cache_hits
        got.append(asyncio.run(collect(engine, follow_up, greedy(30)))[0].token_ids)
        got.append(engine.stats().prefix_cache_hits - hits)
    assert got[0] == got[2] and got[1] == got[3] and got[3] >= len(follow_up) - 32


def test_greedy_is_identical_on_qwen_coder():
    if kernel_library() is None:
        pytest.skip("no C compiler")
    results = []
    for spec in (None, NGRAM):
        engine = _engine("qwen2.5-coder-0.5b-instruct", spec)
        try:
            results.append(run(engine, EDIT, greedy(120))[0].token_ids)
            stats = engine.stats()
        finally:
            engine.shutdown()
    assert results[1] == results[0]
    assert stats.spec_accepted_tokens >= 15  # proposals were made and kept


def test_greedy_streams_together_are_identical(smol):
    """Three streams at once share the step's rows (fewer than 8 in all, as decoding alone has)."""
    plain, spec = smol

    async def three(engine):
        prompts = [EDIT, CHAT, EDIT.replace("docstring", "type hints")]
        return await asyncio.gather(*(collect(engine, engine.tokenizer.encode(p), greedy(120)) for p in prompts))

    want, got = asyncio.run(three(plain)), asyncio.run(three(spec))
    assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]


def test_logprobs_penalties_and_stop_ids_see_only_kept_tokens(smol):
    plain, spec = smol
    params = dict(logprobs=3, repetition_penalty=1.2, frequency_penalty=0.1)
    want, got = run(plain, EDIT, greedy(120, **params))[0], run(spec, EDIT, greedy(120, **params))[0]
    assert got.token_ids == want.token_ids
    assert [(lp.token_id, lp.logprob, lp.top) for lp in got.logprobs] == \
           [(lp.token_id, lp.logprob, lp.top) for lp in want.logprobs]
    stop = want.token_ids[60]
    got = run(spec, EDIT, greedy(120, **params, stop_token_ids=[stop]))[0]
    assert got.token_ids == want.token_ids[: want.token_ids.index(stop) + 1] and got.finish_reason == "stop"


def test_a_processor_never_lets_a_banned_proposal_through(smol):
    """A grammar-like processor bans a token the answer would repeat from the prompt: it is never
    emitted, and the text is what decoding without speculation gives under the same ban."""
    plain, spec = smol
    banned = plain.tokenizer.encode(" height")
    assert banned

    class Ban:
        def __call__(self, output, logits):
            logits[banned] = float("-inf")
            return logits

    params = greedy(150, logits_processor_factories=[Ban])
    want, got = run(plain, EDIT, params)[0], run(spec, EDIT, params)[0]
    assert got.token_ids == want.token_ids
    assert not set(banned) & set(got.token_ids)


def test_sampling_with_seeds_and_n_choices(smol):
    _, spec = smol
    params = SamplingParams(max_tokens=60, temperature=0.7, top_p=0.95, seed=7, n=2)
    first, again = run(spec, EDIT, params), run(spec, EDIT, params)
    assert sorted(first) == [0, 1]
    assert [first[i].token_ids for i in (0, 1)] == [again[i].token_ids for i in (0, 1)]
    assert all(len(first[i].token_ids) == 60 or first[i].finish_reason == "stop" for i in (0, 1))


def test_tiny_kv_cache_preempts_and_frees_everything():
    if kernel_library() is None:
        pytest.skip("no C compiler")
    # 10 blocks of 16 tokens: three answers of 40 tokens after ~20-token prompts do not fit at once
    engine = _engine("smollm2-135m-instruct", NGRAM, kv_cache_memory_gb=10 * 16 * 46080 / 2**30, max_model_len=160)
    try:
        prompts = [f"<|im_start|>user\nCount from {i} to {i + 40}, one number a line.<|im_end|>\n<|im_start|>assistant\n"
                   for i in range(3)]

        async def all_three():
            return await asyncio.gather(*(collect(engine, engine.tokenizer.encode(p), greedy(40, ignore_eos=True))
                                          for p in prompts))

        results = asyncio.run(asyncio.wait_for(all_three(), timeout=300))
        assert all(len(r[0].token_ids) == 40 for r in results)
        stats = engine.stats()
        assert stats.num_preemptions > 0 and stats.kv_blocks_used == 0 and stats.spec_accepted_tokens > 0
    finally:
        engine.shutdown()


# ---- sampling: the rejection rule keeps the model's distribution ----------------------


def test_rejection_sampling_follows_the_target_distribution():
    """Two rows of a 6-token vocabulary and proposals for both: over many draws, the first token
    is distributed as row 0's softmax, and after an accepted first proposal the second as row 1's
    (temperature and top-k applied as without speculation)."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.8, 0.0], [0.1, 0.2, 2.2, 0.4, -0.5, 1.0], [0.0] * 6])
    sampler = Sampler(set())
    seq = Sequence("r", 0, [1, 2], 2, SamplingParams(temperature=0.8, top_k=5), 0.0)
    draws = 5000
    first = torch.zeros(6)
    second = torch.zeros(6)
    for _ in range(draws):
        results, accepted = sampler.verify(seq, logits, [1, 2])
        first[results[0].token_id] += 1
        if accepted >= 1:
            second[results[1].token_id] += 1
    probs = []
    for row in (0, 1):
        scaled = logits[row] / 0.8
        scaled[scaled.argmin()] = float("-inf")  # top_k=5 of 6
        probs.append(torch.softmax(scaled, dim=0))
    for p, counts in zip(probs, (first, second)):
        expected = p * counts.sum()
        mask = expected > 0
        assert counts[~mask].sum() == 0  # never a token outside the top k
        chi2 = float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())
        assert chi2 < 25.0, (counts.tolist(), expected.tolist())  # 4 degrees of freedom: p ~ 5e-5
    # the first proposal is kept exactly as often as the model would have picked it
    kept = float(probs[0][1])
    assert abs(float(second.sum()) / draws - kept) < 4 * math.sqrt(kept * (1 - kept) / draws)


def test_compiled_float_model_with_speculation_matches_transformers(tmp_path):
    """--compile on a float checkpoint with n-gram speculation asked for explicitly (auto picks none
    there): plain decode steps replay the compiled graph, verify steps run the eager model, and the
    greedy tokens are still transformers' own."""
    ref = save_tiny("llama3-rope-scaling", tmp_path)
    save_word_tokenizer(tmp_path, eos="t2")
    loop = [11, 57, 203, 96, 140, 33, 78, 260]
    prompts = [loop * 4 + loop[:3], [(5 * j) % 300 + 7 for j in range(20)] + loop * 3]
    new_tokens = [40, 32]
    expected = greedy_tokens(ref, prompts, new_tokens)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=256, compile=True,
                                                 speculative_config=NGRAM))
    try:
        async def run() -> list[list[int]]:
            outs = await asyncio.gather(*(collect(engine, p, greedy(n, ignore_eos=True))
                                          for p, n in zip(prompts, new_tokens)))
            return [o[0].token_ids for o in outs]

        assert asyncio.run(run()) == expected
        stats = engine.stats()
        assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens > 0  # verify steps ran
        assert engine.runner.compiled_decode_steps > 0  # and so did the compiled graph
    finally:
        engine.shutdown()
