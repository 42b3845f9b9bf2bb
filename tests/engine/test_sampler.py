"""The sampler's masks on one mixed batch: ignore_eos, min_tokens (eos and stop ids) and plain rows."""

from __future__ import annotations

import pytest
import torch

from dashchat.engine.native.sampler import Sampler
from dashchat.engine.native.sequence import Sequence
from dashchat.engine.types import SamplingParams


def _seq(params: SamplingParams, generated: int) -> Sequence:
    prompt = [1, 2, 3]
    return Sequence(request_id="r", index=0, token_ids=prompt + [4] * generated, num_prompt_tokens=len(prompt),
                    params=params, arrival=0.0)


def test_eos_and_stop_bans_apply_to_their_rows_only():
    eos, stop = 7, 5
    seqs = [
        _seq(SamplingParams(max_tokens=8, temperature=0.0), 0),  # plain: eos may win
        _seq(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), 0),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2, stop_token_ids=[stop]), 1),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2, stop_token_ids=[stop]), 2),  # reached
    ]
    logits = torch.zeros(len(seqs), 10)
    logits[:, eos] = 5.0  # eos is everyone's best token
    logits[:, stop] = 4.0  # then the stop id
    logits[:, 9] = 3.0
    tokens = [r.token_id for r in Sampler({eos}).sample(seqs, logits)]
    assert tokens == [eos, stop, 9, eos]


def test_sample_never_edits_the_callers_logits():
    """The engine re-samples row by row from the same logits when one request's processor raises:
    bias, penalties and bans already written into them would then count twice."""
    seqs = [
        _seq(SamplingParams(max_tokens=8, temperature=0.0, logit_bias={2: 5.0}, repetition_penalty=1.5), 1),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5), 2),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), 0),
    ]
    logits = torch.randn(len(seqs), 10, generator=torch.Generator().manual_seed(0))
    pristine = logits.clone()
    first = Sampler({7}).sample(seqs, logits)
    assert torch.equal(logits, pristine)
    again = [Sampler({7}).sample([s], logits[i : i + 1])[0] for i, s in enumerate(seqs)]
    assert [r.token_id for r in again] == [r.token_id for r in first]


def test_plain_greedy_rows_take_the_masked_argmax():
    """Greedy rows without edits but a logit_bias skip the masked copy: their tokens stay those of
    the masked and biased logits, ties (first maximum), an eos maximum under ignore_eos and a bias
    on or past the maximum included."""
    eos = [3, 7]
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        logits = torch.randint(0, 4, (4, 10), generator=gen).float()  # many ties
        ignore = [bool((trial + i) % 2) for i in range(4)]
        biases = [None if (trial + i) % 3 == 0 or trial % 4 == 0 else
                  {int(t): float(b) for t, b in zip(torch.randint(0, 10, (2,), generator=gen),
                                                    torch.randint(-2, 3, (2,), generator=gen))}
                  for i in range(4)]  # fmt: skip
        seqs = [_seq(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=flag, logit_bias=bias), 0)
                for flag, bias in zip(ignore, biases)]  # fmt: skip
        expected = logits.clone()
        for i, (flag, bias) in enumerate(zip(ignore, biases)):
            for t, b in (bias or {}).items():
                expected[i, t] += b
            if flag:
                expected[i, eos] = float("-inf")
        tokens = [r.token_id for r in Sampler(set(eos)).sample(seqs, logits)]
        assert tokens == expected.argmax(dim=-1).tolist()

# ---- the arithmetic against a plain reference (float64, one token at a time) ---------------------

import math  # noqa: E402

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VOCAB = 12


def reference_logits(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    """logit_bias, then repetition penalty over prompt + output, then presence/frequency over output."""
    x = list(logits)
    for tok, bias in (p.logit_bias or {}).items():
        x[tok] += bias
    for tok in set(prompt + output):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(output):
        x[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
    return x


def reference_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """temperature, top-k (ties at the k-th value kept), softmax, top-p (a token stays while the mass
    before it is below top_p; the best always stays), min-p (relative to the best), renormalized."""
    x = [v / p.temperature for v in logits]
    if p.top_k > 0:
        kth = sorted(x, reverse=True)[min(p.top_k, len(x)) - 1]
        x = [v if v >= kth else -math.inf for v in x]
    top = max(x)
    e = [math.exp(v - top) for v in x]
    probs = [v / sum(e) for v in e]
    if p.top_p < 1.0:
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        before, keep = 0.0, set()
        for rank, i in enumerate(order):
            assume(abs(before - p.top_p) > 1e-4)  # float32 vs float64 may round either way on the edge
            if rank == 0 or before < p.top_p:
                keep.add(i)
            before += probs[i]
        probs = [v if i in keep else 0.0 for i, v in enumerate(probs)]
    if p.min_p > 0:
        threshold = max(probs) * p.min_p
        assume(all(abs(v - threshold) > 1e-6 for v in probs))
        probs = [v if v >= threshold else 0.0 for v in probs]
    total = sum(probs)
    return [v / total for v in probs]


params_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 3, 5, VOCAB + 3]),
    top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5, 0.2]),
    min_p=st.sampled_from([0.0, 0.05, 0.2]),
    presence_penalty=st.sampled_from([0.0, 0.5, -1.0, 2.0]),
    frequency_penalty=st.sampled_from([0.0, 0.3, -0.5, 1.5]),
    repetition_penalty=st.sampled_from([1.0, 1.2, 0.8, 2.0]),
    logit_bias=st.none() | st.dictionaries(st.integers(0, VOCAB - 1), st.sampled_from([-5.0, -1.0, 2.5, 8.0]),
                                           max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(p=params_st,
       logits=st.lists(st.integers(-40, 40).map(lambda v: v / 8), min_size=VOCAB, max_size=VOCAB),
       prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
       output=st.lists(st.integers(0, VOCAB - 1), max_size=6))
def test_processing_and_filtering_match_the_reference(p, logits, prompt, output):
    seq = Sequence(request_id="r", index=0, token_ids=prompt + output, num_prompt_tokens=len(prompt),
                   params=p, arrival=0.0)
    row = torch.tensor(logits, dtype=torch.float32)
    processed = Sampler(set())._process_row(seq, row.clone())
    expected = reference_logits(logits, prompt, output, p)
    assert processed.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)

    probs = Sampler._filtered_probs(processed.unsqueeze(0), [seq])[0]
    got = (probs / probs.sum()).tolist()
    assert got == pytest.approx(reference_probs(processed.double().tolist(), p), rel=1e-4, abs=1e-6)
