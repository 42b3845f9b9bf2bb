"""Speculative decoding: propose a few next tokens cheaply, let the model check them in one step.

A decoding sequence with proposals d1..dk runs k + 1 rows in the step instead of one: its last
token and the proposals, at consecutive positions on its own paged KV blocks (each row a decode
row with its own context length, so row j sees the keys of rows before it). The logits of row j
decide the token after it (Sampler.verify): the proposals are kept while they match what the
model itself picks, the first mismatch is replaced by the model's own token, and everything after
it is dropped (its KV slots are overwritten later, its blocks freed). One step thus yields 1 to
k + 1 tokens, and the text is the model's own.

Proposals come from n-gram lookup in the sequence's own tokens (prompt and answer so far): the
longest suffix that occurred before is continued as it continued then (of several earlier
occurrences, the one whose preceding tokens match the text's for longest), and failing that, as it
continued in an earlier sequence's prompt or answer (`AnswerHistory`). Answers that repeat their
prompt (code edits, quotes, summaries) are mostly such continuations. Or they come from a draft
model (draft.py).

On the CPU GGUF path greedy output is bit for bit the output without speculation, because the
kernels are batch invariant (gguf_kernels.c): a row's sums are formed the same way whatever else is
in its step, so a verify row gives the logits the row would have given decoded alone. A step holds at
most `MAX_VERIFY_ROWS` decode rows with proposals; how many each sequence proposes follows the
step's cost (`Speculator.cost`), so a batch that is already wide proposes little or nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from .sequence import Sequence

log = logging.getLogger(__name__)

# Decode rows (one per sequence plus its proposals) a step may hold when it speculates: six of the
# kernels' 8-row activation blocks. A copied text keeps most of a long proposal, and each further
# block costs well under its rows' worth of one-row steps.
MAX_VERIFY_ROWS = 48


@dataclass(frozen=True)
class SpeculativeConfig:
    """`--speculative-config`, as vLLM spells it."""

    method: str = "ngram"
    num_speculative_tokens: int = 47  # at most (the batch and acceptance shrink it): 47 + 1 rows fill 6 kernel blocks
    prompt_lookup_min: int = 2  # shortest suffix n-gram looked up
    prompt_lookup_max: int = 4  # longest suffix n-gram looked up (longest first)
    model: str | None = None  # draft_model: the draft (anything dashchat loads)
    draft_layers: int | None = None  # draft_model: run only the draft's first layers

    @classmethod
    def parse(cls, text: str) -> "SpeculativeConfig":
        """From the flag's JSON; ValueError with a reader-facing message for anything wrong."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--speculative-config: not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("--speculative-config: must be a JSON object")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model", "draft_layers"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"--speculative-config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        method = raw.get("method", "ngram" if "model" not in raw else "draft_model")
        method = {"draft": "draft_model"}.get(method, method)  # vLLM's older name
        if method not in ("ngram", "draft_model"):
            raise ValueError(f"--speculative-config: method {method!r} is not one of: ngram, draft_model")
        model = raw.get("model")
        if method == "draft_model" and (not isinstance(model, str) or not model.strip()):
            raise ValueError("--speculative-config: method draft_model needs \"model\": the draft's path or name")
        if method == "ngram" and ("model" in raw or "draft_layers" in raw):
            raise ValueError("--speculative-config: model and draft_layers are draft_model keys")
        ints = {k: raw[k] for k in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "draft_layers")
                if k in raw}
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--speculative-config: {key} must be a positive integer")
        # vLLM's rule: one bound given means both
        if "prompt_lookup_min" in ints and "prompt_lookup_max" not in ints:
            ints["prompt_lookup_max"] = max(ints["prompt_lookup_min"], cls.prompt_lookup_max)
        if "prompt_lookup_max" in ints and "prompt_lookup_min" not in ints:
            ints["prompt_lookup_min"] = min(ints["prompt_lookup_max"], cls.prompt_lookup_min)
        config = cls(method=method, model=model, **ints)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError("--speculative-config: prompt_lookup_min must not exceed prompt_lookup_max")
        return config


# Earlier occurrences of an n-gram remembered per sequence (the latest ones), and how far back a
# candidate's context is compared with the text's own to pick among them.
_CANDIDATES = 8
_CONTEXT = 64


def _context_match(tokens: list[int], end: int, source: list[int], at: int) -> int:
    """How many tokens before `end` in `tokens` equal those before `at` in `source` (at most _CONTEXT)."""
    i = 0
    while i < _CONTEXT and i < end and i < at and tokens[end - 1 - i] == source[at - 1 - i]:
        i += 1
    return i


class NgramIndex:
    """One sequence's n-grams -> where each ended (its latest _CANDIDATES times), grown as its
    tokens grow.

    Of the earlier occurrences of the text's suffix n-gram, the one whose preceding tokens match the
    text's for longest is continued (the latest among equals): in code a short n-gram such as
    "    return" occurs many times, and the occurrence in the same function is the one to copy. With
    no match of the longest n-gram in the sequence's own text, the earlier sequences' texts
    (`history`) are looked up for it before shorter n-grams are.
    """

    def __init__(self, n_min: int, n_max: int, history: "AnswerHistory | None" = None, salt: str | None = None) -> None:
        self.sizes = range(n_max, n_min - 1, -1)  # longest first
        self.ends: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending at positions <= this are in `ends`
        self.history = history
        self.salt = salt

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the best earlier occurrence of the longest suffix n-gram."""
        return self.lookup(tokens, k)[0]

    def lookup(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """`propose`'s tokens, and how many tokens before them match where they came from (the
        n-gram and the context before it): a long match is a text being copied."""
        last = len(tokens) - 1  # n-grams ending before the suffix's own end
        for end in range(self.indexed + 1, last + 1):
            for n in self.sizes:
                if end >= n:
                    ends = self.ends[n].setdefault(tuple(tokens[end - n : end]), [])
                    ends.append(end)
                    if len(ends) > _CANDIDATES:
                        del ends[0]
        self.indexed = max(self.indexed, last)
        for n in self.sizes:
            if len(tokens) < n:
                continue
            ends = self.ends[n].get(tuple(tokens[-n:]))  # the suffix's own occurrence is not indexed
            if ends:
                here = len(tokens) - n
                best, context = max(((e, _context_match(tokens, here, tokens, e - n)) for e in reversed(ends)),
                                    key=lambda c: c[1])
                return tokens[best : best + k], n + context
            if self.history is not None and n == self.history.n:  # a longer match elsewhere beats a short one here
                proposal, match = self.history.lookup(self.salt, tokens, k)
                if proposal:
                    return proposal, match
        return [], 0


class AnswerHistory:
    """The tokens (prompt and answer) of recently finished sequences, indexed by their n-grams: a
    new answer that repeats an earlier one (the same file edited again, a question asked twice)
    gets proposals from it. Bounded to the latest `max_tokens` tokens; sequences with different
    cache salts never see each other's (as in the prefix cache)."""

    def __init__(self, n: int, max_tokens: int = 1 << 16) -> None:
        self.n = n
        self.max_tokens = max_tokens
        self.held: list[tuple[str | None, list[int]]] = []  # oldest first
        self.size = 0
        self.index: dict[tuple, tuple[list[int], int]] = {}  # (salt, n-gram) -> (tokens, end)

    def add(self, salt: str | None, tokens: list[int]) -> None:
        tokens = tokens[-self.max_tokens :]
        n = self.n
        for end in range(n, len(tokens)):
            self.index[(salt, *tokens[end - n : end])] = (tokens, end)
        self.held.append((salt, tokens))
        self.size += len(tokens)
        while self.size > self.max_tokens:
            old_salt, old = self.held.pop(0)
            self.size -= len(old)
            for end in range(n, len(old)):
                key = (old_salt, *old[end - n : end])
                if self.index.get(key, (None,))[0] is old:
                    del self.index[key]

    def propose(self, salt: str | None, tokens: list[int], k: int) -> list[int]:
        return self.lookup(salt, tokens, k)[0]

    def lookup(self, salt: str | None, tokens: list[int], k: int) -> tuple[list[int], int]:
        """Proposed tokens and the length of the match behind them (as NgramIndex.lookup)."""
        if len(tokens) < self.n:
            return [], 0
        found = self.index.get((salt, *tokens[-self.n :]))
        if found is None:
            return [], 0
        source, end = found
        return source[end : end + k], self.n + _context_match(tokens, len(tokens) - self.n, source, end - self.n)


@dataclass
class SpecState:
    """Per sequence: its proposer's state and how often its proposals have been right lately."""

    index: NgramIndex | None  # n-gram lookup
    draft: Any = None  # draft model: draft.DraftState, None until it first proposes
    hits: float = 0.0  # proposed tokens kept (decayed)
    trials: float = 0.0  # proposed tokens judged: the kept ones and the first rejected one (decayed)
    idle: int = 0  # steps since it last proposed

    @property
    def acceptance(self) -> float:
        """Estimated chance that the next proposed token is kept (the prior counts as 2 trials)."""
        return (self.hits + 2 * _PRIOR_ACCEPTANCE) / (self.trials + 2)


_PRIOR_ACCEPTANCE = 0.75
_DECAY = 0.7  # per verification: recent ones count most (an answer copies in runs)
_PROBE_EVERY = 32  # steps: a sequence that stopped proposing tries one token again
# A proposal whose n-gram and the context before it match for `match` tokens counts as kept with
# chance at least 1 - _MATCH_SCALE / match, from _MATCH_MIN tokens on (0.875 at 12, 0.97 at 50).
_MATCH_MIN = 12
_MATCH_SCALE = 1.5
_SHORT_MATCH_ACCEPTANCE = 0.9  # at most, for a shorter match: proposals of up to 7 tokens
# Cost of a decode step of m rows over one row's, m = 1..8, on the CPU GGUF path (CPU time of a step,
# Qwen2.5-Coder-0.5B Q4_K_M, 2 threads): 1-4 rows take per-row tiles, 5-8 one interleaved 8-row
# block (measured 2.45 at 3 rows, above 4 rows' 2.32: taken as 4's). Each further block of 8 rows
# adds 1.4 (16 rows measured 4.25).
_CPU_ROW_COST = (1.0, 1.55, 2.32, 2.32, 2.9, 2.9, 2.9, 2.9)
_CPU_BLOCK_COST = 1.4


def match_acceptance(match: int) -> float:
    """The chance that a proposal is kept token after token when the `match` tokens before it agree
    with the text it continues (0: no telling): llama.cpp looks 12 tokens up before it proposes."""
    return 0.0 if match < _MATCH_MIN else 1.0 - _MATCH_SCALE / match


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step yields for a sequence with k proposals: 1 + a + a^2 + ... + a^k."""
    return sum(acceptance**i for i in range(k + 1))


class Speculator:
    """Chooses each step's proposals and learns from what the model accepted.

    A proposal costs rows; each extra row costs a share of a step (`_CPU_ROW_COST` on CPU, where the
    kernels are compute-bound; little on a GPU). Per step the proposals are chosen to maximise the
    expected tokens per unit of step cost, given each sequence's recent acceptance: a sequence whose
    proposals keep failing stops proposing (probing one token now and then), and one that is copying
    its prompt proposes several. The choice depends only on the tokens, never on timings, so a seeded
    request stays reproducible.
    """

    def __init__(self, config: SpeculativeConfig, max_model_len: int, max_rows: int = MAX_VERIFY_ROWS,
                 device: str = "cpu", draft=None) -> None:
        """`draft`: a draft.DraftModel that proposes (method draft_model), else n-gram lookup."""
        self.config = config
        self.draft = draft
        # finished sequences' tokens, for n-gram proposals from earlier answers
        self.history = AnswerHistory(config.prompt_lookup_max) if draft is None else None
        # a draft forward per proposal position, in one-row target steps (0: proposals cost rows only)
        self.draft_cost = draft.relative_cost if draft is not None else 0.0
        self.max_model_len = max_model_len
        self.max_rows = max_rows
        self.device = device
        # counters for stats (vLLM's names: drafts, draft tokens, accepted tokens)
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def _state(self, seq: Sequence) -> SpecState:
        if seq.spec is None:
            c = self.config
            index = None
            if self.draft is None:
                # A seeded sample depends on the proposals it was verified against (the draws it
                # took), so a seeded request's proposals come from its own text only: other requests'
                # would make it depend on what ran before.
                history = self.history if seq.generator is None else None
                index = NgramIndex(c.prompt_lookup_min, c.prompt_lookup_max, history, seq.params.cache_salt)
            seq.spec = SpecState(index)
        return seq.spec

    def release(self, seq: Sequence, finished: bool = False) -> None:
        """The sequence left the running batch (finished, aborted, preempted): its draft KV goes; a
        finished one's tokens join the history n-gram lookup draws on."""
        if finished and self.history is not None and seq.num_output_tokens > 0:
            self.history.add(seq.params.cache_salt, seq.token_ids)
        if self.draft is not None and seq.spec is not None and seq.spec.draft is not None:
            self.draft.release(seq.spec.draft)
            seq.spec.draft = None

    def draft_probs(self, seq: Sequence):
        """The draft's distributions of this step's proposals ([k, vocab]), None for point masses."""
        if seq.spec is None or seq.spec.draft is None:
            return None
        return seq.spec.draft.probs

    def rows_for(self, num_decodes: int) -> int:
        """Extra rows a step of `num_decodes` decoding sequences may spend on proposals."""
        return max(0, self.max_rows - num_decodes)

    def cost(self, rows: int) -> float:
        if self.device == "cpu":
            if rows <= len(_CPU_ROW_COST):
                return _CPU_ROW_COST[rows - 1]
            return _CPU_ROW_COST[-1] + _CPU_BLOCK_COST * -(-(rows - len(_CPU_ROW_COST)) // 8)
        return 1.0 + 0.02 * (rows - 1)

    def plan(self, decodes: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """This step's proposals: (sequence, proposed tokens) for those that get any."""
        room = self.rows_for(len(decodes))
        if room <= 0:
            return []
        rows, tokens, depth = len(decodes), float(len(decodes)), 0
        plans, wants = [], []
        for seq in decodes:
            state = self._state(seq)
            p = seq.params
            # the step's own token comes on top of the proposals
            left = min(p.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
            limit = min(self.config.num_speculative_tokens, len(decodes) + room - rows, left)
            if limit <= 0:
                continue
            acceptance, proposal = state.acceptance, None
            if self.draft is None:
                proposal, match = state.index.lookup(seq.token_ids, limit)
                if not proposal:
                    continue
                # A text being copied for many tokens goes on being copied, whatever came before; a
                # short match (the answer just left the text it copied) is no long run yet.
                acceptance = (max(acceptance, match_acceptance(match)) if match >= _MATCH_MIN
                              else min(acceptance, _SHORT_MATCH_ACCEPTANCE))
                limit = len(proposal)
            k = self._best_k(acceptance, rows, tokens, limit, depth)
            if k == 0:
                state.idle += 1
                if state.idle < _PROBE_EVERY:
                    continue
                k = 1  # now and then, so that a sequence that starts copying is noticed
            if proposal is None:
                wants.append((seq, k, state.draft))
                depth = max(depth, k)
            else:
                plans.append((seq, proposal[:k]))
            state.idle = 0
            rows += k
            tokens += expected_tokens(acceptance, k) - 1
        if wants:
            try:
                drafted = self.draft.propose(wants)
            except Exception:  # noqa: BLE001 - a failing draft costs its proposals, never the requests
                log.exception("the draft model failed; this step decodes without proposals")
                for seq, _, _ in wants:
                    seq.spec.draft = None  # the draft freed its blocks: rebuilt next time
                return []
            for seq, proposal, draft_state in drafted:
                seq.spec.draft = draft_state
                if proposal:
                    plans.append((seq, proposal))
        return plans

    def _best_k(self, acceptance: float, rows: int, tokens: float, limit: int, depth: int = 0) -> int:
        """`depth`: draft forwards the step runs already (they serve every sequence at once)."""
        best, best_rate = 0, tokens / (self.cost(rows) + self.draft_cost * depth)
        for k in range(1, limit + 1):
            cost = self.cost(rows + k) + self.draft_cost * max(depth, k)
            rate = (tokens + expected_tokens(acceptance, k) - 1) / cost
            if rate > best_rate * 1.001:
                best, best_rate = k, rate
        return best

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        state = self._state(seq)
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        state.hits = _DECAY * state.hits + accepted
        state.trials = _DECAY * state.trials + accepted + (accepted < proposed)
