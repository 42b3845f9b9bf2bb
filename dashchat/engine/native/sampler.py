"""Turn a step's logits rows into tokens, one row per sampling sequence.

Order, as OpenAI/vLLM users expect: logits processors (grammar) -> logit_bias ->
penalties -> min_tokens / ignore_eos masks -> logprobs (of this processed
distribution, before temperature) -> greedy, or temperature / top-k / top-p / min-p and a draw.
A request with a seed draws from its own generator, so other requests in the batch
never change its text. A sequence whose processor raises NotReady gets no token this step
(its result is None); the engine asks again on a later step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence
from ..types import NotReady, TokenLogprob


_MIN_LOGPROB = -9999.0


@dataclass
class SampleResult:
    token_id: int
    logprob: TokenLogprob | None


def _is_plain(seq: Sequence) -> bool:
    p = seq.params
    return (
        not seq.logits_processors
        and not p.logit_bias
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and p.repetition_penalty == 1.0
        and not p.min_tokens
    )


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = sorted(eos_token_ids)

    def _process_row(self, seq: Sequence, row: torch.Tensor) -> torch.Tensor:
        p = seq.params
        output = seq.output_token_ids
        dev = row.device
        for processor in seq.logits_processors:
            row = processor(output, row)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=dev)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=dev)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=dev)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output:
            ids, counts = torch.tensor(output, dtype=torch.long, device=dev).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
        if len(output) < p.min_tokens and p.stop_token_ids:  # eos: banned for the whole batch in sample()
            row[torch.tensor(p.stop_token_ids, dtype=torch.long, device=dev)] = float("-inf")
        return row

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SampleResult | None]:
        """logits: [len(seqs), vocab] on any device; never modified. Processors, logit_bias and
        penalties edit a copy, so a caller that samples again from the same logits (the engine's
        row-by-row retry when one request's processor raises) applies every edit exactly once."""
        edited = [i for i, seq in enumerate(seqs) if not _is_plain(seq)]
        # ignore_eos and min_tokens ban eos: one indexed write for all such rows (ignore_eos is common
        # in benchmarks, and a write per row cost a kernel launch and a copy each on a GPU)
        no_eos = [i for i, s in enumerate(seqs) if s.params.ignore_eos or s.num_output_tokens < s.params.min_tokens]
        if (edited or no_eos) and logits.dtype == torch.float32:
            logits = logits.clone()  # only batches that edit pay for the copy
        else:
            logits = logits.float()
        deferred: set[int] = set()
        for i in edited:
            try:
                logits[i] = self._process_row(seqs[i], logits[i])
            except NotReady:
                deferred.add(i)  # its row is sampled below like any other, and the token dropped
        if no_eos and self.eos_token_ids:
            rows = torch.tensor(no_eos, dtype=torch.long, device=logits.device)
            cols = torch.tensor(self.eos_token_ids, dtype=torch.long, device=logits.device)
            logits[rows[:, None], cols[None, :]] = float("-inf")
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = self._filtered_probs(logits[rows], [seqs[i] for i in random_rows])
            drawn = self._draw(probs, [seqs[i] for i in random_rows])
            tokens[rows] = drawn
        token_list = tokens.tolist()

        results: list[SampleResult | None] = []
        for i, (seq, tok) in enumerate(zip(seqs, token_list)):
            if i in deferred:
                results.append(None)
                continue
            lp = None
            k = seq.params.logprobs
            if k is not None:
                row = logprobs[i]
                top: list[tuple[int, float]] = []
                if k > 0:
                    vals, ids = row.topk(k)
                    # masked tokens (grammar, bans) have -inf, which JSON cannot carry
                    top = list(zip(ids.tolist(), vals.clamp(min=_MIN_LOGPROB).tolist()))
                lp = TokenLogprob(tok, max(float(row[tok]), _MIN_LOGPROB), top)
            results.append(SampleResult(tok, lp))
        return results

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([s.params.temperature for s in seqs], device=dev).unsqueeze(1)
        logits = logits / temps
        top_ks = [s.params.top_k for s in seqs]
        if any(k > 0 for k in top_ks):
            vocab = logits.shape[1]
            ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=dev)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (ks - 1).clamp(max=vocab - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_ps = torch.tensor([s.params.top_p for s in seqs], device=dev)
        if (top_ps < 1.0).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # drop tokens once the mass before them already reaches top_p (the best token always stays)
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_ps.unsqueeze(1)
            drop[:, 0] = False  # the best token stays, also when a tiny top_p underflows to 0
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        min_ps = torch.tensor([s.params.min_p for s in seqs], device=dev)
        if (min_ps > 0).any():
            threshold = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        # Extreme parameters (penalties far out, everything banned) can leave no finite mass:
        # such a row falls back to its best logit instead of failing the draw.
        probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
        dead = probs.sum(dim=-1) <= 0
        if dead.any():
            fallback = torch.nan_to_num(logits[dead], nan=float("-inf")).argmax(dim=-1)
            probs[dead] = torch.nn.functional.one_hot(fallback, probs.shape[1]).to(probs.dtype)
        return probs

    @staticmethod
    def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        out = torch.empty(len(seqs), dtype=torch.long, device=probs.device)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=probs.device)
            out[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                row = probs[i].cpu()
                out[i] = torch.multinomial(row, 1, generator=s.generator).item()
        return out
