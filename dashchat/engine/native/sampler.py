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


def _is_plain(seq: Sequence, bias_allowed: bool = False) -> bool:
    """No edit of its logits row (`bias_allowed`: none but a logit_bias)."""
    p = seq.params
    return (
        not seq.logits_processors
        and (bias_allowed or not p.logit_bias)
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and p.repetition_penalty == 1.0
        and not p.min_tokens
    )


def _bias_tensors(bias: dict[int, float], row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A logit_bias as the ids it names and the values added to `row` there (row's dtype)."""
    ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=row.device)
    return ids, torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device)


def _bias_keeps(row: torch.Tensor, token: int, bias: dict[int, float]) -> bool:
    """Whether `token`, the row's first maximum, stays its first maximum once `bias` is added as
    Sampler._process_row adds it (the same float32 sums)."""
    if token in bias:
        return False
    ids, values = _bias_tensors(bias, row)
    biased = row[ids] + values
    top = row[token]
    return bool(((biased < top) | ((biased == top) & (ids > token))).all())


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = sorted(eos_token_ids)

    def _process_row(self, seq: Sequence, row: torch.Tensor, token_ids: list[int] | None = None) -> torch.Tensor:
        """`token_ids`: the sequence's tokens this row follows (default: all of them so far)."""
        p = seq.params
        token_ids = seq.token_ids if token_ids is None else token_ids
        output = token_ids[seq.num_prompt_tokens :]
        dev = row.device
        for processor in seq.logits_processors:
            row = processor(output, row)
        if p.logit_bias:
            ids, values = _bias_tensors(p.logit_bias, row)
            row[ids] += values
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=dev)
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
        # ignore_eos and min_tokens ban eos: one indexed write for all such rows (ignore_eos is common
        # in benchmarks, and a write per row cost a kernel launch and a copy each on a GPU)
        no_eos = [i for i, s in enumerate(seqs) if s.params.ignore_eos or s.num_output_tokens < s.params.min_tokens]
        if all(_is_plain(seq, bias_allowed=True) for seq in seqs):
            fast = self._plain_greedy(seqs, logits, no_eos)
            if fast is not None:
                return fast
        edited = [i for i, seq in enumerate(seqs) if not _is_plain(seq)]
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
            lp = None if seq.params.logprobs is None else _token_logprob(logprobs[i], tok, seq.params.logprobs)
            results.append(SampleResult(tok, lp))
        return results

    def _plain_greedy(self, seqs: list[Sequence], logits: torch.Tensor, no_eos: list[int]
                      ) -> list[SampleResult | None] | None:  # fmt: skip
        """Greedy rows without logprobs or edits but a logit_bias: the argmax of the logits as they
        are, or None where the full path must run. A row that bans eos takes it unless its argmax is
        an eos id, one with a bias unless the bias moves its first maximum: masking or biasing
        values other than the first maximum, none reaching it, leaves it first (a one-stream decode
        step then skips the copy of a vocabulary-wide row and the indexed writes)."""
        if any(not s.params.greedy or s.params.logprobs is not None for s in seqs):
            return None
        if logits.dtype != torch.float32 and any(s.params.logit_bias for s in seqs):
            return None  # the full path adds the bias in float32
        tokens = logits.argmax(dim=-1).tolist()
        if any(tokens[i] in self.eos_token_ids for i in no_eos):
            return None
        for i, seq in enumerate(seqs):
            if seq.params.logit_bias and not _bias_keeps(logits[i], tokens[i], seq.params.logit_bias):
                return None
        return [SampleResult(tok, None) for tok in tokens]

    def verify(self, seq: Sequence, logits: torch.Tensor, proposal: list[int],
               draft_probs: torch.Tensor | None = None) -> tuple[list[SampleResult], int]:
        """Speculative decoding: logits [len(proposal) + 1, vocab], row j the model's view after the
        sequence's tokens and proposal[:j]. Returns the tokens to append (the accepted proposals, then
        the model's own next token) and how many proposals were accepted. `draft_probs` [len(proposal),
        vocab]: the distributions the proposals were drawn from (a draft model's); None: each proposal
        was given with certainty (n-gram lookup, or a greedy draft).

        Row j is processed as sample() would process it with proposal[:j] appended (grammar,
        penalties and bans see exactly the tokens before it), so a proposal the grammar forbids has
        probability 0 and is never accepted. Greedy: a proposal is kept while it is the argmax.
        Sampled: proposal t drawn from q is kept with probability min(1, p(t) / q(t)), else the token
        is drawn from max(0, p - q) renormalised (for a certain proposal, q one-hot: kept with
        probability p(t), else drawn from p without t): the rejection rule, which leaves every token
        distributed exactly as p. A processor that is not ready stops the walk there (no
        token for that row; the tokens before it stand)."""
        tokens = list(seq.token_ids)
        results: list[SampleResult] = []
        accepted = 0
        for j in range(len(proposal) + 1):
            try:
                row = self._prepared_row(seq, logits[j], tokens)
            except NotReady:
                break
            draft = proposal[j] if j < len(proposal) else None
            q = draft_probs[j] if draft_probs is not None and draft is not None else None
            tok = self._choose(seq, row, draft, q)
            k = seq.params.logprobs
            lp = None if k is None else _token_logprob(torch.log_softmax(row, dim=-1), tok, k)
            results.append(SampleResult(tok, lp))
            if tok != draft:
                break
            accepted += 1
            tokens.append(tok)
            if self._ends(seq, tok):
                break
        return results, accepted

    def _prepared_row(self, seq: Sequence, row: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """One row as sample() edits it, for a sequence whose tokens are `token_ids`."""
        row = row.float().clone()
        if not _is_plain(seq):
            row = self._process_row(seq, row, token_ids)
        p = seq.params
        if (p.ignore_eos or len(token_ids) - seq.num_prompt_tokens < p.min_tokens) and self.eos_token_ids:
            row[torch.tensor(self.eos_token_ids, dtype=torch.long, device=row.device)] = float("-inf")
        return row

    def _choose(self, seq: Sequence, row: torch.Tensor, draft: int | None, q: torch.Tensor | None = None) -> int:
        if seq.params.greedy:
            return int(row.argmax())
        probs = self._filtered_probs(row[None], [seq])
        if draft is not None:
            u = torch.rand(1, generator=seq.generator).item()
            if u * (1.0 if q is None else float(q[draft])) < float(probs[0, draft]):
                return draft
            if q is None:
                probs[0, draft] = 0.0
            else:
                probs = (probs - q.to(probs.device, probs.dtype)[None]).clamp_(min=0.0)
            if float(probs.sum()) <= 0.0:  # p was q (or p(draft) was 1) up to rounding
                return draft
        return int(self._draw(probs, [seq])[0])

    def _ends(self, seq: Sequence, token: int) -> bool:
        """The token ends the sequence (the engine finishes it): nothing after it is verified."""
        p = seq.params
        return (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids

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


def _token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The chosen token's logprob and the top k of a row's log-softmax."""
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = logprobs.topk(k)
        # masked tokens (grammar, bans) have -inf, which JSON cannot carry
        top = list(zip(ids.tolist(), vals.clamp(min=_MIN_LOGPROB).tolist()))
    return TokenLogprob(token, max(float(logprobs[token]), _MIN_LOGPROB), top)
