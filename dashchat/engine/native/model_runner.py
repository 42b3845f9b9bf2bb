"""Owns the model and its KV cache; runs one scheduled batch as a single forward pass."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ...models.config import ModelConfig
from ...models.registry import build_model
from ...models.layers import materialize_rotary
from ...models.parallel import SINGLE, ShardPlan, TensorParallel
from ...models.weights import iter_weight_slices
from ...tokenizer import Tokenizer
from . import pooling
from .attention import PagedAttention, PrefillSpan, StepAttentionMetadata
from ..cpu.linear import pack_linears
from ..cpu.ops import use_cpu_kernels
from ..cuda.graphs import PaddedDecode
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .step_inputs import HEARTBEAT, STOP, StepInputs, receive_step, send_command, send_step

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


class ModelRunner:
    def __init__(
        self, model_dir: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
        num_kv_blocks: int, block_size: int, quantization: str = "none", tokenizer: Tokenizer | None = None,
        compile_decode: bool = False, cuda_graphs: bool = False, max_num_seqs: int = 1, max_model_len: int = 0,
        group=None,
    ) -> None:
        """`group`: this rank's tensor-parallel ParallelGroup (dashchat/distributed/group.py), or None
        for one device. Every rank builds a runner the same way; rank 0 then calls run() per step
        and the others serve_steps()."""
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.group = group
        self.tp: TensorParallel = group.tensor_parallel() if group is not None else SINGLE
        start = time.perf_counter()
        # what the KV cache will take once the weights are in: a GGUF load checks both fit the memory
        self._kv_bytes = num_kv_blocks * block_size * self.kv_bytes_per_token(cfg, dtype, self.tp.size)
        self.model = self._load_model(model_dir, quantization)
        self.vision = hasattr(self.model, "embed_images")  # images and M-RoPE positions (Qwen2-VL)
        self._quantize(quantization, model_dir, tokenizer)
        self._use_cpu_kernels()
        if self.device.type == "cuda" and cfg.moe is not None:
            from ..cuda.moe import use_grouped_experts

            use_grouped_experts(self.model)  # sorted tokens, one grouped GEMM for all experts
        log.info("model loaded in %.1fs (%s, %s)", time.perf_counter() - start, device, dtype)
        self._allocate_kv_cache(num_kv_blocks)
        # Collectives inside captured CUDA graphs are a known source of hangs: several ranks decode eagerly.
        # A mixture of experts picks its experts on the host (a sync a layer), which a graph cannot hold.
        cuda_graphs = cuda_graphs and self.tp.size == 1 and cfg.moe is None
        self._prepare_decode(compile_decode, cuda_graphs, max_num_seqs, max_model_len, num_kv_blocks)

    def _load_model(self, model_dir: str, quantization: str) -> torch.nn.Module:
        """Build the model on the meta device, then load its weights straight into place: from the
        GGUF file's blocks in gguf mode, else from the folder's float weights."""
        cfg, device = self.cfg, self.device
        with torch.device("meta"):
            model = build_model(cfg, self.tp)
        source = self._gguf_source(model_dir) if quantization == "gguf" else None
        if source is not None:
            from ..quantization.gguf_loading import load_gguf_model

            counts = load_gguf_model(model, source, cfg, ShardPlan(cfg, self.tp.rank, self.tp.size), device,
                                     other_bytes=self._kv_bytes)
            log.info("GGUF weights as shipped: %d linear layers, %d kept as float; embedding %s", counts["gguf"],
                     counts["float"], "as shipped" if counts["embedding"] else "float")
        else:
            model = model.to_empty(device=device).to(self.dtype)
            if cfg.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
            model.load_weights(iter_weight_slices(model_dir))  # a rank reads only its slices
        # RoPE tables are buffers computed at build time: rebuild them on the real device.
        materialize_rotary(model, device)
        return model.eval()

    def _gguf_source(self, model_dir: str) -> Path | None:
        """The GGUF file `--quantization gguf` reads, or None where the float weights serve instead
        (no C compiler: they are then written from the GGUF once, on demand)."""
        from ..cpu.kernels import kernel_library
        from ..quantization.gguf_loading import gguf_source

        if not (self.device.type == "cpu" and self.dtype == torch.float32):
            raise ValueError("--quantization gguf is a CPU float32 path; on CUDA use --dtype bfloat16")
        source = gguf_source(model_dir)
        if source is None:
            raise ValueError("--quantization gguf needs a GGUF model (a .gguf file or an embedded model)")
        if kernel_library() is None:
            log.warning("--quantization gguf needs the C kernels; serving the dequantized float32 weights")
            return None
        return source

    def _quantize(self, quantization: str, model_dir: str, tokenizer: Tokenizer | None) -> None:
        """Swap the linears for int8 / int4 ones, or pack float32 ones for oneDNN (CPU). (GGUF
        layers are built at load.)"""
        cpu_float32 = self.device.type == "cpu" and self.dtype == torch.float32
        if quantization == "int8":
            from ...paths import cache_dir
            from ..quantization.int8 import load_or_quantize_int8

            if not cpu_float32:
                raise ValueError("--quantization int8 is a CPU float32 path; on CUDA use --dtype bfloat16")
            shard = f"tp{self.tp.rank}of{self.tp.size}" if self.tp.size > 1 else ""
            load_or_quantize_int8(self.model, tokenizer, model_dir, cache_dir(), shard)
        elif quantization == "int4":
            from ..quantization.int4 import quantize_linears_int4

            if not cpu_float32:
                raise ValueError("--quantization int4 is a CPU float32 path; on CUDA use --dtype bfloat16")
            quantize_linears_int4(self.model)
        elif quantization not in ("none", "gguf"):
            raise ValueError(f"unsupported quantization {quantization!r}; choose none, gguf, int8 or int4")
        elif cpu_float32 and torch.backends.mkldnn.is_available():
            pack_linears(self.model)  # in gguf mode: the layers left as float

    def _use_cpu_kernels(self) -> None:
        if self.device.type == "cpu" and self.dtype == torch.float32:
            use_cpu_kernels(self.model)  # after any quantization: int8 folds scales into the norms

    def _allocate_kv_cache(self, num_kv_blocks: int) -> None:
        cfg = self.cfg
        # One block past those the block manager hands out: padded CUDA-graph rows write there.
        kv_heads = ShardPlan(cfg, self.tp.rank, self.tp.size).num_kv_heads
        shape = ((num_kv_blocks + 1) * self.block_size, kv_heads, cfg.head_dim)
        self.kv_cache = [(_zeros(shape, self.dtype, self.device), _zeros(shape, self.dtype, self.device))
                         for _ in range(cfg.num_layers)]
        self.attention = PagedAttention(self.kv_cache, self.block_size, cfg.attention_scale, windows=cfg.layer_windows)

    def _prepare_decode(
        self, compile_decode: bool, cuda_graphs: bool, max_num_seqs: int, max_model_len: int, num_kv_blocks: int
    ) -> None:
        """Decode-only steps (the steady state of serving) run as one compiled graph: eager PyTorch
        spends more time dispatching the small decode ops than computing them. Prefill stays eager.
        On CUDA the decode step is then replayed from captured CUDA graphs."""
        self._decode = self._decode_eager
        self.compile_decode = compile_decode
        # GGUF models on one CPU: the decoder layers of a decode step in one C call (no Python per layer)
        self.fused_decode = None
        if self.device.type == "cpu" and not compile_decode:
            from ..cpu.decode_step import FusedDecode

            self.fused_decode = FusedDecode.build(self.model, self.kv_cache, self.block_size, self.cfg.attention_scale)
            if self.fused_decode is not None:
                log.info("decode steps run the decoder layers in one C call")
        self.compiled_decode_steps = 0
        if compile_decode:
            # Float constants (norm eps, attention scale) are constants: tracing them as dynamic
            # makes dynamo trace the whole model twice.
            torch._dynamo.config.specialize_float = True
            self._decode = torch.compile(self._decode_eager, dynamic=True)
            self._warm_up_decode()
        if cuda_graphs and self.device.type == "cuda":
            block_size = self.block_size
            max_width = -(-max(max_model_len, block_size) // block_size)
            self._decode = PaddedDecode(self._decode, self.device, max_num_seqs, max_width, num_kv_blocks, block_size,
                                        use_graphs=True)

    @staticmethod
    def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, tp_size: int = 1) -> int:
        """KV bytes per token on one rank (its share of the KV heads)."""
        kv_heads = ShardPlan(cfg, 0, tp_size).num_kv_heads
        return 2 * cfg.num_layers * kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, sampling: list[Sequence]) -> torch.Tensor:
        """Forward the batch; return logits [rows, vocab] for the sequences that sample: one row
        each, 1 + len(proposal) for a decode with proposals.

        `sampling` lists, in batch order, the decodes and the prefills that reach their last token.
        Under tensor parallelism this is rank 0: the other ranks get the same inputs and run along.
        """
        step = self._prepare(batch)
        if self.group is not None:
            send_step(self.group, step)
        logits = self._execute(step)
        if self._hidden is not None and any(seq.pooling is not None for seq, _ in batch.prefills):
            pooling.collect(batch.prefills, step.spans, self._hidden)
        self._hidden = None
        return logits

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """A tensor-parallel rank other than 0: run every step rank 0 sends, until it says stop."""
        while True:
            step = receive_step(self.group, self.device, self.cfg.hidden_size, self.dtype)
            if step == STOP:
                self.group.acknowledge_stop()
                return
            if isinstance(step, StepInputs):
                self._execute(step)

    def send_heartbeat(self) -> None:
        send_command(self.group, HEARTBEAT, self.device)

    def send_stop(self) -> None:
        send_command(self.group, STOP, self.device)
        self.group.acknowledge_stop()  # returns once every rank has the STOP

    def _prepare(self, batch: ScheduledBatch) -> StepInputs:
        dev = self.device
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []  # [3, n] each on a vision model (t, h, w), else [n]
        slots: list[int] = []
        logits_rows: list[int] = []
        mrope = self.vision
        for seq in batch.decodes:
            # the last token, then any proposals after it: one decode row each, at consecutive positions
            pos = seq.num_tokens - 1
            rows = 1 + len(seq.proposal)
            input_ids.append(seq.token_ids[pos])
            input_ids.extend(seq.proposal)
            positions.append(_text_positions(pos + seq.mrope_delta, rows, mrope))
            slots.extend(self._slots(seq, pos, pos + rows))
            logits_rows.extend(range(len(input_ids) - rows, len(input_ids)))
        spans: list[PrefillSpan] = []
        mm_rows: list[int] = []
        mm_embeds: list[torch.Tensor] = []
        if mrope:
            self._embed_images(batch.prefills)
        for seq, chunk in batch.prefills:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk
            spans.append(
                PrefillSpan(len(input_ids), chunk, end, torch.tensor(seq.block_table, dtype=torch.long, device=dev))
            )
            if seq.image_embeds:
                _splice_images(seq, start, end, len(input_ids), mm_rows, mm_embeds)
            input_ids.extend(seq.token_ids[start:end])
            positions.append(_prefill_positions(seq, start, end) if mrope else _text_positions(start, chunk, False))
            slots.extend(self._slots(seq, start, end))
            if end == seq.num_tokens and (seq.pooling is None or seq.pooling.wants_logits):
                logits_rows.append(len(input_ids) - 1)

        decode_tables = decode_lens = None
        if batch.decodes:
            decode_tables, decode_lens = self._decode_tables(batch.decodes)
        pos = torch.cat(positions, dim=-1)
        if mrope and bool((pos == pos[0]).all()):
            pos = pos[0]  # text only: t = h = w, ordinary RoPE (the decode paths take one row)
        step = StepInputs(
            torch.tensor(input_ids, dtype=torch.long, device=dev), pos.to(dev),
            torch.tensor(slots, dtype=torch.long, device=dev), decode_tables, decode_lens, spans, logits_rows,
        )
        if mm_rows:
            step.mm_rows = torch.tensor(mm_rows, dtype=torch.long, device=dev)
            step.mm_embeds = torch.cat(mm_embeds).to(dev)
        return step

    def _embed_images(self, prefills: list[tuple[Sequence, int]]) -> None:
        """Run the vision tower, once per image and in one call for the step, on the images whose
        span a prefill chunk of this step reaches and whose embeddings are not at hand yet (a
        chunk may cover part of an image: the rest waits on the sequence for the next chunks)."""
        wanted: list[tuple[Sequence, int]] = []
        for seq, chunk in prefills:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk
            for i, img in enumerate(seq.params.images):
                if img.offset < end and img.offset + img.length > start and i not in seq.image_embeds:
                    wanted.append((seq, i))
        if not wanted:
            return
        images = [seq.params.images[i] for seq, i in wanted]
        embeds = self.model.embed_images([img.pixel_values for img in images], [img.grid for img in images])
        for (seq, i), emb in zip(wanted, embeds):
            seq.image_embeds[i] = emb

    def _execute(self, step: StepInputs) -> torch.Tensor:
        self._hidden = None
        if not step.spans:
            self.compiled_decode_steps += self.compile_decode
            return self._decode(step.input_ids, step.positions, step.slots, step.decode_tables, step.decode_lens)
        self.attention.begin_step(StepAttentionMetadata(
            step.slots, step.num_decodes, step.decode_tables, step.decode_lens, step.spans))
        if step.mm_rows is not None:
            hidden = self.model(step.input_ids, step.positions, self.attention, step.mm_rows, step.mm_embeds)
        else:
            hidden = self.model(step.input_ids, step.positions, self.attention)
        self._hidden = hidden  # the final hidden states: pooling requests read their rows (run())
        if not step.logits_rows:
            return torch.empty(0, self.cfg.vocab_size)
        hidden = hidden[torch.tensor(step.logits_rows, dtype=torch.long, device=self.device)]
        return self.model.compute_logits(hidden)

    def _decode_tables(self, decodes: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per decode row: block tables padded to a common width (at least 2 blocks, so a compiled
        graph never specializes on a width of 1) and context lengths, the row's token included (a
        sequence's proposal rows share its table, each seeing one key more than the row before)."""
        width = max(2, -(-max(s.num_tokens + len(s.proposal) for s in decodes) // self.block_size))
        tables, lens = [], []
        for s in decodes:
            table = s.block_table[:width] + [0] * (width - len(s.block_table[:width]))
            for j in range(1 + len(s.proposal)):
                tables.append(table)
                lens.append(s.num_tokens + j)
        return (torch.tensor(tables, dtype=torch.long, device=self.device),
                torch.tensor(lens, dtype=torch.long, device=self.device))

    def _decode_eager(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        block_tables: torch.Tensor, context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """One token per sequence: logits [N, vocab]. Everything here is a tensor shape, so one
        compiled graph serves every batch size (beyond 1) and context length."""
        fused = self.fused_decode
        if fused is not None and fused.runs(len(input_ids)) and not torch.compiler.is_compiling():
            model = self.model
            x = model.embed_tokens(input_ids).contiguous()  # a fresh tensor: the layers write into it
            cos, sin = model.rotary(positions, x.dtype)
            fused(x, slots, cos, sin, block_tables, context_lens)
            return model.compute_logits(model.norm(x))
        self.attention.begin_step(StepAttentionMetadata(slots, len(input_ids), block_tables, context_lens, []))
        return self.model.compute_logits(self.model(input_ids, positions, self.attention))

    @torch.inference_mode()
    def _warm_up_decode(self) -> None:
        """Compile before serving: batch size 1 is its own graph, 2 and up share a dynamic one;
        both are dynamic in the block-table width. Widths differ from batch sizes here, or dynamo
        would give equal sizes one symbol and guard on their equality."""
        start = time.perf_counter()
        for n, width in ((1, 3), (2, 4), (3, 5)):
            # distinct tensors: aliased inputs would add a guard too
            flat = [torch.zeros(n, dtype=torch.long, device=self.device) for _ in range(3)]
            tables = torch.zeros(n, width, dtype=torch.long, device=self.device)
            lens = torch.ones(n, dtype=torch.long, device=self.device)
            torch._dynamo.mark_dynamic(tables, 1)
            if n > 1:
                for t in (*flat, tables, lens):
                    torch._dynamo.mark_dynamic(t, 0)
            # Block 0 is scratch here: nothing is allocated before the engine starts serving.
            self._decode(*flat, tables, lens)
        log.info("decode step compiled in %.1fs", time.perf_counter() - start)


def _text_positions(start: int, n: int, mrope: bool) -> torch.Tensor:
    pos = torch.arange(start, start + n, dtype=torch.long)
    return pos.expand(3, n) if mrope else pos


def _prefill_positions(seq: Sequence, start: int, end: int) -> torch.Tensor:
    """[3, end - start] M-RoPE positions of a chunk: the prompt's own, then index + delta."""
    table = seq.mrope_positions
    if table is None:
        return _text_positions(start, end - start, True)
    inside = table[:, start : min(end, table.shape[1])]
    after = max(start, table.shape[1])  # generated tokens (recomputed after a preemption)
    return torch.cat((inside, _text_positions(after + seq.mrope_delta, max(0, end - after), True)), dim=1)


def _splice_images(seq: Sequence, start: int, end: int, row0: int, rows: list[int], embeds: list[torch.Tensor]
                   ) -> None:  # fmt: skip
    """The image embedding rows of chunk [start, end), placed at flat-batch row row0 on; an image
    whose span ends within the chunk is done with and dropped from the sequence."""
    for i, img in enumerate(seq.params.images):
        lo, hi = max(start, img.offset), min(end, img.offset + img.length)
        if lo >= hi or i not in seq.image_embeds:
            continue
        embeds.append(seq.image_embeds[i][lo - img.offset : hi - img.offset])
        rows.extend(range(row0 + lo - start, row0 + hi - start))
        if img.offset + img.length <= end:
            del seq.image_embeds[i]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU its pages come from calloc and are the kernel's shared zero page
    until first written: a KV cache costs resident memory only as far as requests have filled it
    (torch.zeros writes, so touches, every page of the whole budget at start)."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float16):
        return torch.from_numpy(np.zeros(shape, dtype=np.float32 if dtype == torch.float32 else np.float16))
    return torch.zeros(shape, dtype=dtype, device=device)


_DEFAULT_KV_GB = {"cpu": 2.0, "cuda": 8.0}  # per device (per rank under tensor parallelism)


def build_runner(args, cfg: ModelConfig, tokenizer: Tokenizer, device: torch.device, max_model_len: int,
                 group=None) -> tuple[ModelRunner, int, float]:
    """Size the KV cache and build the runner: the same on every tensor-parallel rank, so each one
    arrives at the same number of blocks. Returns (runner, KV blocks, KV GiB per rank)."""
    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype, args.device)
    per_token = ModelRunner.kv_bytes_per_token(cfg, dtype, group.size if group is not None else 1)
    budget = args.kv_cache_memory_gb
    if budget is None:
        wanted = args.max_num_seqs * max_model_len * per_token
        budget = min(wanted / 2**30, _DEFAULT_KV_GB[args.device])
    num_blocks = int(budget * 2**30) // (per_token * args.block_size)
    if num_blocks * args.block_size < max_model_len:
        raise ValueError(
            f"KV cache of {budget:.2f} GiB holds {num_blocks * args.block_size} tokens, less than "
            f"max_model_len {max_model_len}: raise the KV memory or lower --max-model-len"
        )
    runner = ModelRunner(
        args.model_dir, cfg, device, dtype, num_blocks, args.block_size, args.quantization, tokenizer,
        compile_decode=args.compile, cuda_graphs=not args.enforce_eager, max_num_seqs=args.max_num_seqs,
        max_model_len=max_model_len, group=group,
    )
    return runner, num_blocks, budget
