"""Speculative decoding with a draft model, on tiny random Qwen2 checkpoints (float32 CPU path):
greedy output is the target's own whatever the draft, a draft identical to the target has every
proposal accepted, a draft of another vocabulary is refused at start, and sampled output follows
the target's distribution (rejection sampling against the draft's q)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import collect

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.draft import check_vocabulary
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.native.sampler import Sampler
from dashchat.engine.native.sequence import Sequence
from dashchat.engine.native.speculative import SpeculativeConfig
from dashchat.engine.types import SamplingParams
from dashchat.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import _COMMON, save_word_tokenizer  # noqa: E402

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 3-layer random Qwen2 with weights large enough that its greedy text varies (a default
    initialisation repeats one token forever, which any draft predicts)."""
    import transformers

    path = tmp_path_factory.mktemp("draft-target")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**_COMMON, "num_hidden_layers": 3, "initializer_range": 0.3,
                                         "tie_word_embeddings": True})
    transformers.Qwen2ForCausalLM(config).eval().save_pretrained(path)
    save_word_tokenizer(path)
    return path


def _engine(target: Path, draft: dict | None, **kw) -> AsyncLLMEngine:
    spec = None if draft is None else json.dumps({"method": "draft_model", "model": str(target), **draft})
    kw.setdefault("max_model_len", 256)
    return AsyncLLMEngine.from_args(EngineArgs(model_dir=str(target), speculative_config=spec, **kw))


def _always_propose(engine: AsyncLLMEngine) -> None:
    """Tests check what proposals do, so every step proposes: a tiny draft's forward is nearly as
    dear as the target's, and the cost model would rightly decline most of them."""
    engine.speculator.draft_cost = 0.0
    engine.speculator.cost = lambda rows: 1.0


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _run(engine, prompts, params):
    async def all_of():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    return [r[0] for r in asyncio.run(asyncio.wait_for(all_of(), timeout=300))]


def test_config():
    c = SpeculativeConfig.parse('{"method": "draft_model", "model": "m.gguf", "num_speculative_tokens": 3}')
    assert (c.method, c.model, c.num_speculative_tokens, c.draft_layers) == ("draft_model", "m.gguf", 3, None)
    assert SpeculativeConfig.parse('{"method": "draft", "model": "m", "draft_layers": 2}').draft_layers == 2
    for bad, says in (('{"method": "draft_model"}', "needs"), ('{"method": "ngram", "model": "m"}', "draft_model keys"),
                      ('{"method": "draft_model", "model": "m", "draft_layers": 0}', "positive")):
        with pytest.raises(ValueError, match=says):
            SpeculativeConfig.parse(bad)


def test_greedy_is_the_targets_and_a_self_draft_is_always_right(tiny):
    """Three streams at once, a long prompt prefilled in chunks (the draft catches up in chunks
    too), then the same prompts again (the draft's prefix cache serves them)."""
    prompts = [PROMPT, [3, 1, 4, 1, 5, 9, 2, 6] * 12, list(range(20, 60))]
    plain = _engine(tiny, None, max_num_batched_tokens=48)
    try:
        want = [r.token_ids for r in _run(plain, prompts, greedy(48))]
    finally:
        plain.shutdown()
    assert len(set(want[0])) > 20  # a varied text, not one token repeated
    for draft, all_right in (({}, True), ({"draft_layers": 1, "num_speculative_tokens": 3}, False)):
        engine = _engine(tiny, draft, max_num_batched_tokens=48)
        try:
            _always_propose(engine)
            for _ in range(2):
                assert [r.token_ids for r in _run(engine, prompts, greedy(48))] == want
            stats, cache = engine.stats(), engine.speculator.draft.blocks
            assert stats.spec_draft_tokens > 60
            if all_right:
                assert stats.spec_accepted_tokens == stats.spec_draft_tokens
            assert stats.kv_blocks_used == 0 and cache.num_used == 0  # both caches gave every block back
            assert cache.prefix_hits > 0
        finally:
            engine.shutdown()


def test_preemption_drops_and_rebuilds_the_draft(tiny):
    # 10 blocks of 16 tokens: two 24-token prompts with 60-token answers (6 blocks each) do not fit at once
    per_token = 2 * 3 * 2 * 16 * 4  # layers, KV heads, head dim, float32
    prompts = [PROMPT, PROMPT[::-1], [7] + PROMPT[1:]]
    plain = _engine(tiny, None, max_model_len=96)
    try:
        want = [r.token_ids for r in _run(plain, prompts, greedy(60))]
    finally:
        plain.shutdown()
    engine = _engine(tiny, {}, kv_cache_memory_gb=10 * 16 * per_token / 2**30, max_model_len=96)
    try:
        _always_propose(engine)
        assert [r.token_ids for r in _run(engine, prompts, greedy(60))] == want
        stats = engine.stats()
        assert stats.num_preemptions > 0 and stats.spec_accepted_tokens > 0
        assert stats.kv_blocks_used == 0 and engine.speculator.draft.blocks.num_used == 0
    finally:
        engine.shutdown()


def test_a_draft_of_another_vocabulary_is_refused(tiny, tmp_path):
    other = tmp_path / "other-eos"
    shutil.copytree(tiny, other)
    save_word_tokenizer(other, eos="t2")
    with pytest.raises(ValueError, match="vocabulary is not the target's.*end/begin tokens"):
        AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tiny), max_model_len=256, speculative_config=json.dumps(
            {"method": "draft_model", "model": str(other)})))
    from dashchat.models.resolve import resolve_model

    qwen, smol = (Tokenizer.from_dir(resolve_model(m).path) for m in ("qwen2.5-coder-0.5b-instruct",
                                                                      "smollm2-135m-instruct"))
    with pytest.raises(ValueError, match="vocabulary size 49152.*probe texts"):
        check_vocabulary(qwen, smol)
    check_vocabulary(qwen, qwen)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0  # never a token the target gives no probability
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum()), int(mask.sum()) - 1


def test_rejection_sampling_against_a_draft_distribution():
    """Proposals drawn from a draft's q (here far from p): the first token is distributed as row
    0's p, the second (after an accepted first) as row 1's, and the first is kept as often as the
    rule says: sum over t of min(p(t), q(t))."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.8, 0.0], [0.1, 0.2, 2.2, 0.4, -0.5, 1.0], [0.0] * 6])
    q = torch.tensor([[0.05, 0.5, 0.05, 0.2, 0.1, 0.1], [0.3, 0.1, 0.1, 0.3, 0.1, 0.1]])
    sampler = Sampler(set())
    seq = Sequence("r", 0, [1, 2], 2, SamplingParams(temperature=0.8, top_k=5), 0.0)
    gen = torch.Generator().manual_seed(1)
    draws, kept = 6000, 0
    first, second = torch.zeros(6), torch.zeros(6)
    for _ in range(draws):
        proposal = [int(torch.multinomial(q[j], 1, generator=gen)) for j in (0, 1)]
        results, accepted = sampler.verify(seq, logits, proposal, q)
        first[results[0].token_id] += 1
        kept += accepted >= 1
        if accepted >= 1:
            second[results[1].token_id] += 1
    probs = []
    for row in (0, 1):
        scaled = logits[row] / 0.8
        scaled[scaled.argmin()] = float("-inf")  # top_k=5 of 6
        probs.append(torch.softmax(scaled, dim=0))
    for p, counts in zip(probs, (first, second)):
        chi2, dof = _chi2(counts, p)
        assert dof == 4 and chi2 < 25.0, (counts.tolist(), p.tolist())  # p ~ 5e-5
    rate = float(torch.minimum(probs[0], q[0]).sum())
    assert abs(kept / draws - rate) < 4 * math.sqrt(rate * (1 - rate) / draws)


def test_sampled_text_follows_the_target_with_a_different_draft(tiny):
    """The engine end to end: a 1-layer draft of the 3-layer target (another distribution), the
    first two tokens sampled; their joint counts match the target's own probabilities
    (transformers' forward of the same checkpoint, temperature and top-k applied)."""
    import transformers

    temperature, top_k, requests = 1.0, 4, 900
    model = transformers.Qwen2ForCausalLM.from_pretrained(tiny).eval()

    def probs(tokens):
        with torch.no_grad():
            row = model(torch.tensor([tokens])).logits[0, -1] / temperature
        kth = row.topk(top_k).values[-1]
        return torch.softmax(row.masked_fill(row < kth, float("-inf")), dim=0)

    first = probs(PROMPT)
    joint = torch.zeros(_COMMON["vocab_size"] ** 2)
    for t in first.nonzero().flatten().tolist():
        joint[t * _COMMON["vocab_size"] : (t + 1) * _COMMON["vocab_size"]] = first[t] * probs(PROMPT + [t])
    engine = _engine(tiny, {"draft_layers": 1, "num_speculative_tokens": 2})
    try:
        _always_propose(engine)
        counts = torch.zeros_like(joint)
        for start in range(0, requests, 3):  # 3 streams and their proposals fit a step's 7 rows
            # seeded: the test's outcome is the same every run
            params = [SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, ignore_eos=True, seed=s)
                      for s in range(start, start + 3)]

            async def three():
                return await asyncio.gather(*(collect(engine, PROMPT, p) for p in params))

            for r in asyncio.run(three()):
                counts[r[0].token_ids[0] * _COMMON["vocab_size"] + r[0].token_ids[1]] += 1
        stats = engine.stats()
        assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # some kept, some redrawn
        assert stats.spec_drafts >= requests * 0.9
    finally:
        engine.shutdown()
    chi2, dof = _chi2(counts, joint)
    assert dof == top_k * top_k - 1, dof
    # 15 degrees of freedom: p ~ 5e-4 (accepting with p(t) instead of p(t)/q(t) gives ~110)
    assert chi2 < 40.0, counts[joint > 0].tolist()


def test_a_failing_draft_costs_proposals_not_requests(tiny, caplog):
    """A draft forward that raises (here: its second one) drops that step's proposals and the draft
    states; the request goes on, same text, and the draft rebuilds its state on the next step."""
    plain = _engine(tiny, None)
    try:
        want = _run(plain, [PROMPT], greedy(30))[0].token_ids
    finally:
        plain.shutdown()
    engine = _engine(tiny, {})
    try:
        _always_propose(engine)
        draft = engine.speculator.draft
        run, calls = draft.runner.run, []

        def fails_once(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("draft forward failed")
            return run(*args, **kw)

        draft.runner.run = fails_once
        assert _run(engine, [PROMPT], greedy(30))[0].token_ids == want
        assert "the draft model failed" in caplog.text and len(calls) > 3
        assert engine.stats().spec_accepted_tokens > 0 and draft.blocks.num_used == 0
    finally:
        engine.shutdown()
