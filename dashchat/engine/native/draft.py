"""Speculative decoding with a draft model: a smaller model of the same vocabulary proposes the
next K tokens, the target checks them in one step (speculative.py, Sampler.verify).

The draft runs in the engine's step thread on its own ModelRunner and its own paged KV cache
(its own BlockManager, prefix caching included). Each speculating sequence has a shadow Sequence
there: the same tokens, the draft's block table. Per step the draft

1. catches up: the shadow takes the target's tokens; where they differ from what the draft last
   saw (its rejected proposals), the draft's KV is rolled back to the common prefix and the blocks
   past it go back. The tokens still without draft KV (usually the last one or two; a whole prompt
   the first time, in chunks of at most the engine's step token budget) run as one forward for all
   sequences, whose last logits give each sequence's first proposal;
2. runs one decode forward per further proposal position, batched over the sequences still
   proposing.

Greedy requests get the draft's argmax; sampled ones a draw from the draft's distribution q
(temperature, top-k/p, min-p as the request asks), and the target accepts a proposal with
probability min(1, p/q), else draws from norm(max(0, p - q)): every kept token is distributed as
the target's p. A preempted or finished sequence's draft state is dropped (and rebuilt from the
draft's prefix cache if it comes back).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from ...models.config import ModelConfig
from ...tokenizer import Tokenizer
from .block_manager import BlockManager
from .model_runner import ModelRunner, resolve_dtype
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence

if TYPE_CHECKING:
    from ..args import EngineArgs
    from .speculative import SpeculativeConfig

log = logging.getLogger(__name__)

# Texts whose token ids must be the same under both tokenizers (with the vocabulary size and the
# special tokens): code, prose, whitespace runs, non-Latin script, digits, a chat turn.
_PROBES = (
    "def main(argv: list[str]) -> int:\n    return 0\n",
    "The quick brown fox jumps over the lazy dog.",
    "    \t  x = {'a': [1, 2, 3]}  # 12345.678",
    "日本語のテキストと Ünïcödé",
    "<|im_start|>user\nhi<|im_end|>\n",
)


def check_vocabulary(target: Tokenizer, draft: Tokenizer) -> None:
    """ValueError unless the draft's token ids mean what the target's mean."""
    problems = []
    if len(target) != len(draft):
        problems.append(f"vocabulary size {len(draft)} (target: {len(target)})")
    if target.eos_token_ids != draft.eos_token_ids or target.bos_token_id != draft.bos_token_id:
        problems.append(f"end/begin tokens {sorted(draft.eos_token_ids)}/{draft.bos_token_id} "
                        f"(target: {sorted(target.eos_token_ids)}/{target.bos_token_id})")
    if sorted(target.special_tokens) != sorted(draft.special_tokens):
        problems.append("other special tokens")
    differ = [text for text in _PROBES if target.encode(text) != draft.encode(text)]
    if differ:
        problems.append(f"token ids of {len(differ)} of {len(_PROBES)} probe texts (e.g. {differ[0]!r})")
    if problems:
        raise ValueError("--speculative-config: the draft model's vocabulary is not the target's: it differs in "
                         + "; ".join(problems) + ". A draft must use the target's tokenizer.")


def _weights(cfg: ModelConfig) -> int:
    """Weights a forward reads, roughly (attention, MLP, output head), to compare two models."""
    h = cfg.hidden_size
    attention = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * h
    mlp = 3 * h * (cfg.moe.intermediate_size * cfg.moe.num_experts_per_tok if cfg.moe else cfg.intermediate_size)
    return cfg.num_layers * (attention + mlp) + cfg.vocab_size * h


class _TruncatedRunner(ModelRunner):
    """The first `keep` decoder layers of a model (its own output norm and head after them): a
    cheap self-draft from the target's own weights."""

    def __init__(self, *args, keep: int, **kw) -> None:
        self._keep = keep
        super().__init__(*args, **kw)

    def _load_model(self, model_dir: str, quantization: str) -> torch.nn.Module:
        model = super()._load_model(model_dir, quantization)
        model.layers = model.layers[: self._keep]
        types = self.cfg.layer_types[: self._keep] if self.cfg.layer_types else None
        self.cfg = dataclasses.replace(self.cfg, num_layers=self._keep, layer_types=types)
        return model


@dataclasses.dataclass
class DraftState:
    """A sequence's draft-side state (held in its SpecState)."""

    shadow: Sequence  # the target's tokens as the draft last saw them (+ its proposals); its own blocks
    synced: int  # target tokens up to here equal the shadow's
    probs: torch.Tensor | None = None  # this step's q rows [k, vocab] (sampled requests), None: greedy


class DraftModel:
    def __init__(self, config: "SpeculativeConfig", args: "EngineArgs", tokenizer: Tokenizer, target_cfg: ModelConfig,
                 device: torch.device, max_model_len: int, num_blocks: int, step_tokens: int) -> None:
        """`step_tokens`: prompt tokens one step's draft forward catches up on at most (a long prompt
        takes several steps, as the target's prefill does, its sequence decoding without proposals
        meanwhile)."""
        from ...models.resolve import ModelResolveError, resolve_model
        from ..quantization.gguf_loading import gguf_source

        try:
            path = str(resolve_model(config.model).path)
        except ModelResolveError as exc:
            raise ValueError(f"--speculative-config: draft model: {exc}") from None
        check_vocabulary(tokenizer, Tokenizer.from_dir(path))
        cfg = ModelConfig.from_dir(path)
        keep = config.draft_layers
        if keep is not None and keep > cfg.num_layers:
            raise ValueError(f"--speculative-config: draft_layers {keep}: the draft has {cfg.num_layers} layers")
        dtype = resolve_dtype(args.dtype, args.device)
        quantization = "gguf" if (device.type == "cpu" and dtype == torch.float32 and gguf_source(path)) else "none"
        self.vocab_size = target_cfg.vocab_size
        runner_args = (path, cfg, device, dtype, num_blocks, args.block_size, quantization, None)
        runner_kw = dict(max_num_seqs=args.max_num_seqs, max_model_len=max_model_len)
        if keep is not None and keep < cfg.num_layers:
            self.runner: ModelRunner = _TruncatedRunner(*runner_args, keep=keep, **runner_kw)
        else:
            self.runner = ModelRunner(*runner_args, **runner_kw)
        self.blocks = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.eos_token_ids = set(tokenizer.eos_token_ids)
        self.step_tokens = step_tokens
        # a draft forward's cost in target decode steps of one row (weights read)
        self.relative_cost = _weights(self.runner.cfg) / _weights(target_cfg)
        self.forwards = 0  # draft forward passes run (for benchmarks)
        log.info("draft model %s: %d layers, %s, ~%.2f of a target step per forward", config.model,
                 self.runner.cfg.num_layers, quantization, self.relative_cost)

    # ---- per-sequence state ----------------------------------------------------------

    def _sync(self, seq: Sequence, state: DraftState | None) -> DraftState:
        """The shadow takes the target's tokens; the draft's KV past their common prefix is dropped."""
        if state is None:
            shadow = Sequence(seq.request_id, seq.index, list(seq.token_ids), seq.num_prompt_tokens, seq.params,
                              seq.arrival)
            shadow.num_computed_tokens = self.blocks.reuse_cached_prefix(shadow)
            return DraftState(shadow, seq.num_tokens)
        shadow, target = state.shadow, seq.token_ids
        common, end = state.synced, min(shadow.num_tokens, len(target))
        while common < end and shadow.token_ids[common] == target[common]:
            common += 1
        del shadow.token_ids[common:]
        shadow.token_ids.extend(target[common:])
        # the last token always runs: its logits give the first proposal
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, common, shadow.num_tokens - 1)
        self.blocks.trim(shadow, shadow.num_tokens)
        # blocks of kept tokens only: a block with rejected proposals in it is rewritten later
        self.blocks.register_full_blocks(shadow)
        state.synced = len(target)
        return state

    def release(self, state: DraftState | None) -> None:
        if state is not None:
            self.blocks.free_seq(state.shadow)

    # ---- proposing -------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, wants: list[tuple[Sequence, int, DraftState | None]]) -> list[tuple[Sequence, list[int], DraftState | None]]:
        """For each (sequence, k, its draft state): up to k proposed tokens (q rows in the state for
        sampled requests), and the updated state (None: dropped, the draft's cache is full). On an
        exception every state of `wants` is dropped (its blocks freed) before it propagates."""
        touched: list[DraftState] = [state for _, _, state in wants if state is not None]
        try:
            return self._propose(wants, touched)
        except BaseException:
            for state in touched:
                self.release(state)
            raise

    def _propose(self, wants, touched: list[DraftState]) -> list[tuple[Sequence, list[int], DraftState | None]]:
        out: list[tuple[Sequence, list[int], DraftState | None]] = []
        active: list[tuple[Sequence, int, DraftState]] = []
        for seq, k, state in wants:
            if state is None:
                state = self._sync(seq, None)
                touched.append(state)
            else:
                self._sync(seq, state)
            state.probs = None
            # the KV of every input token: the sequence's own and all proposals but the last
            if not self.blocks.allocate(state.shadow, seq.num_tokens + k - 1):
                self.release(state)
                out.append((seq, [], None))
                continue
            active.append((seq, k, state))
        # first forward: catch up, and the first proposal of every sequence that caught up
        decodes, prefills, budget, proposing = [], [], self.step_tokens, []
        for seq, k, state in active:
            shadow = state.shadow
            behind = shadow.num_tokens - shadow.num_computed_tokens
            if behind == 1:
                decodes.append(shadow)
            elif budget > 0:
                prefills.append((shadow, min(behind, budget)))
                budget -= prefills[-1][1]
            else:
                out.append((seq, [], state))
                continue
            if behind == 1 or prefills[-1][1] == behind:
                proposing.append((seq, k, state))
            else:
                out.append((seq, [], state))  # still catching up on its prompt
        proposing.sort(key=lambda item: item[2].shadow.num_tokens - item[2].shadow.num_computed_tokens > 1)
        proposals: dict[Sequence, list[int]] = {seq: [] for seq, _, _ in proposing}
        probs: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq, _, _ in proposing}
        logits = self._forward(decodes, prefills)
        left = proposing
        while left:
            for (seq, k, state), row in zip(left, logits):
                token, q = self._choose(seq, row)
                state.shadow.token_ids.append(token)
                proposals[seq].append(token)
                if q is not None:
                    probs[seq].append(q)
            # a proposal that ends the sequence is the last one worth checking
            left = [(seq, k, state) for seq, k, state in left
                    if len(proposals[seq]) < k and not self._ends(seq, proposals[seq][-1])]
            if left:
                logits = self._forward([state.shadow for _, _, state in left], [])
        for seq, _, state in proposing:
            state.probs = torch.stack(probs[seq]) if probs[seq] else None
            out.append((seq, proposals[seq], state))
        return out

    def _forward(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One draft forward; logits rows for the decodes, then the prefills that reach their end."""
        for shadow in decodes:
            shadow.proposal = []
        logits = self.runner.run(ScheduledBatch(decodes, prefills), [])
        self.forwards += 1
        for shadow in decodes:
            shadow.num_computed_tokens = shadow.num_tokens
        for shadow, chunk in prefills:
            shadow.num_computed_tokens += chunk
        vocab = logits.shape[1]
        if vocab > self.vocab_size:  # padding rows of a larger embedding: never proposed
            logits = logits[:, : self.vocab_size]
        elif vocab < self.vocab_size:
            pad = logits.new_full((logits.shape[0], self.vocab_size - vocab), float("-inf"))
            logits = torch.cat([logits, pad], dim=1)
        return logits

    def _choose(self, seq: Sequence, row: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if seq.params.greedy:
            return int(row.argmax()), None
        q = Sampler._filtered_probs(row.float()[None], [seq])
        token = int(Sampler._draw(q, [seq])[0])
        return token, q[0]

    def _ends(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        return (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids
