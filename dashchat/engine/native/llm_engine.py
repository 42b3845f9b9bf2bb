"""The native engine: a step loop in its own thread behind an asyncio front.

`generate()` registers a request and yields `RequestOutput`s that the step thread
pushes into the request's asyncio queue. Requests join and leave the running batch
between steps. An exception inside a step fails the requests of that step with
`EngineError`, the engine itself keeps serving. Anything else that would end the step
thread (a scheduling bug, a failed allocation, a failure while reporting a failure)
makes the engine dead, and so does losing a tensor-parallel rank (or a forward that
fails part-way over several ranks, which leaves them out of step): every pending and
running request fails with `EngineDead` at once, new requests fail the same way,
`check_health()` raises, and the cause is logged.
An event loop that closed with requests in flight only aborts those requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from ...distributed import launch
from ...models.config import ModelConfig
from ...models.parallel import check_tensor_parallel
from ...models.qwen2_vl import image_problem, mrope_positions, vision_config
from ...tokenizer import Tokenizer
from ..args import EngineArgs
from ..cpu.threads import physical_cores
from .block_manager import BlockManager
from . import pooling
from .model_runner import build_runner
from .pooling import PoolState
from .sampler import Sampler
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SeqStatus
from .speculative import MAX_VERIFY_ROWS, SpeculativeConfig, Speculator
from ..types import (
    CompletionDelta,
    EngineDead,
    EngineError,
    EngineOverloaded,
    EngineStats,
    PoolingOutput,
    PoolingParams,
    RequestOutput,
    SamplingParams,
    UnsupportedFeature,
    check_prompt,
)

log = logging.getLogger(__name__)

# Tokens per step: on CPU a 512-token chunk already runs the GEMMs at peak and keeps running
# streams moving; a GPU step of 2048 tokens costs little more than one of 512 (vLLM's default too).
_DEFAULT_STEP_TOKENS = {"cpu": 512, "cuda": 2048}
_MAX_DEFAULT_LEN = 8192
_HEARTBEAT_S = 1.0  # idle tensor-parallel ranks hear from rank 0 this often (well inside their timeout)


def default_max_model_len(args: EngineArgs, cfg: ModelConfig) -> int:
    return args.max_model_len or min(cfg.max_position_embeddings, _MAX_DEFAULT_LEN)


class _RanksOutOfStep(Exception):
    """A tensor-parallel forward failed part-way: the ranks can no longer run steps together."""


@dataclass(eq=False)
class Request:
    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class AsyncLLMEngine:
    name = "native"
    # What ended the step thread, set once (see _die); from then on every request fails at once.
    failure: BaseException | None = None

    def __init__(self, args: EngineArgs) -> None:
        if args.device == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda, but no CUDA device is visible to PyTorch")
            if max(args.device_ids) >= torch.cuda.device_count():
                raise ValueError(f"--device-list {' '.join(map(str, args.device_ids))}: "
                                 f"{torch.cuda.device_count()} CUDA device(s) visible")
        elif args.device != "cpu":
            raise ValueError(f"unsupported device {args.device!r}; choose cpu or cuda")
        self.args = args
        self.tokenizer = Tokenizer.from_dir(args.model_dir)
        self.model_config = cfg = ModelConfig.from_dir(args.model_dir)
        self.vocab_size = cfg.vocab_size
        self.max_model_len = default_max_model_len(args, cfg)
        self.sampler = Sampler(self.tokenizer.eos_token_ids)
        # Tensor parallelism: this engine is rank 0; the node's other ranks are worker processes.
        self.world = launch.plan_world(args)
        self.tensor_parallel_size = self.world.size
        check_tensor_parallel(cfg, self.world.size)
        if self.world.size > 1 and self.world.node_rank != 0:
            raise ValueError(f"node {self.world.node_rank} serves no HTTP: start it with --headless")
        self._place = self.world.local_ranks(args.device_ids)[0]
        self.group = None
        self._workers: list[launch.WorkerProcess] = []

        self._requests: dict[str, Request] = {}
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        # The model is built, compiled and run by the step thread alone: when a second thread also
        # runs OpenMP regions, each thread gets its own OpenMP team and the steps ran ~2x slower.
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self._rendezvous = None
        if self.world.size > 1 and not self.world.external:
            self._rendezvous, self.world = launch.open_rendezvous(self.world)
            self._workers = launch.start_workers(args, self.world, self.world.local_ranks(args.device_ids)[1:])
        self._thread = threading.Thread(target=self._run, name="dashchat-engine", daemon=True)
        self._thread.start()
        # A worker that dies while loading ends the start with its own error (rank 0 may be waiting
        # in a collective for it).
        while not self._ready.wait(0.2):
            lost = self._lost_worker()
            if lost is not None:
                self._init_error = lost
                break
        if self._init_error is not None:
            self._kill_workers()
            launch.stop_workers(self._workers, timeout=5)
            raise self._init_error
        if self._workers:
            threading.Thread(target=self._watch_workers, name="dashchat-rank-watch", daemon=True).start()

    def _build(self) -> None:
        args, cfg = self.args, self.model_config
        if self.world.size > 1:
            from ...distributed.group import ParallelGroup

            device = launch.prepare_rank_device(args.device, self._place, launch.core_groups(args.device_ids),
                                                args.num_threads)
            self.group = ParallelGroup(0, self.world.size, device, self.world.master_addr, self.world.master_port,
                                       args.distributed_load_timeout_s, from_env=self.world.external,
                                       listen_socket=self._rendezvous, loopback=self.world.on_one_node)
        elif args.device == "cpu":
            device = torch.device("cpu")
            torch.set_num_threads(args.num_threads or physical_cores())
        else:
            device = torch.device("cuda", args.device_ids[0])
            torch.cuda.set_device(device)
        self.runner, num_blocks, budget = build_runner(args, cfg, self.tokenizer, device, self.max_model_len,
                                                       self.group)
        if self.group is not None:
            self.group.start_serving(args.distributed_timeout_s)
        self.blocks = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        # Decodes take one token each: leave room for prefill chunks beside a full batch.
        step_tokens = args.max_num_batched_tokens or _DEFAULT_STEP_TOKENS[args.device]
        step_budget = max(step_tokens, args.max_num_seqs + args.block_size)
        self.speculator = None
        if args.speculative_config:
            # CUDA graphs hold max_num_seqs decode rows
            rows = MAX_VERIFY_ROWS if args.device == "cpu" else min(MAX_VERIFY_ROWS, args.max_num_seqs)
            spec_config = SpeculativeConfig.parse(args.speculative_config)
            draft = None
            if spec_config.method == "draft_model":
                from .draft import DraftModel

                if self.world.size > 1:
                    raise ValueError("--speculative-config: a draft model runs on one device (no tensor parallelism)")
                draft = DraftModel(spec_config, args, self.tokenizer, cfg, device, self.max_model_len, num_blocks,
                                   step_budget)
            self.speculator = Speculator(spec_config, self.max_model_len, rows, args.device, draft)
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, step_budget, self.speculator)
        per_rank = f" per rank, {self.world.size} ranks" if self.world.size > 1 else ""
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB%s)", num_blocks, args.block_size, budget, per_rank)

    def _run(self) -> None:
        try:
            self._build()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor, which raises it
            self._init_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    @classmethod
    def from_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        return cls(args)

    # ---- async front -------------------------------------------------------------------

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        request = self._admit(prompt_token_ids, params, request_id)
        finished = False
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer left early (client gone) or failed: free the KV now
                self._abort_soon(request_id)

    async def pool(self, prompt_token_ids: list[int], params: PoolingParams, request_id: str) -> PoolingOutput:
        """A prefill-only request (pooling.py): the prompt's pooled final hidden state."""
        if params.pooling not in PoolingParams.POOLINGS:
            raise UnsupportedFeature(f"pooling must be one of {', '.join(PoolingParams.POOLINGS)}")
        sampling = SamplingParams(max_tokens=0, cache_salt=params.cache_salt)
        request = self._admit(prompt_token_ids, sampling, request_id, PoolState(params))
        finished = False
        try:
            item = await request.queue.get()
            if isinstance(item, BaseException):
                raise item
            finished = True
            return item
        finally:
            if not finished:
                self._abort_soon(request_id)

    def _admit(self, prompt: list[int], params: SamplingParams, request_id: str,
               pooling: PoolState | None = None) -> Request:
        """The admission checks, then the request joins the step thread's inbox."""
        if self._stopped:
            raise EngineError("the engine is shut down")
        self.check_health()
        check_prompt(prompt, params.max_tokens, self.max_model_len, self.vocab_size)
        if params.images and (problem := image_problem(self.model_config, prompt, params.images)):
            raise UnsupportedFeature(problem)
        if len(self.scheduler.waiting) + len(self._inbox) >= self.args.max_queue:
            raise EngineOverloaded("the server is busy: too many requests are waiting")
        request = self._make_request(prompt, params, request_id)
        request.seqs[0].pooling = pooling
        with self._lock:  # _die sets `failure` under this lock: a request is failed by it or refused here
            self.check_health()
            self._requests[request_id] = request
            self._inbox.append(request)
        self._wake.set()
        return request

    async def abort(self, request_id: str) -> None:
        self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def check_health(self) -> None:
        """Raise EngineDead once the step thread has died (the server's /health then answers 503)."""
        if self.failure is not None:
            raise EngineDead("the engine stopped after an internal error and serves no more requests")

    def stats(self) -> EngineStats:
        spec = self.speculator
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._inbox),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            tensor_parallel_size=self.world.size,
            collective_seconds=self.group.collective_seconds if self.group is not None else 0.0,
            spec_drafts=spec.num_drafts if spec else 0,
            spec_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_accepted_tokens=spec.num_accepted_tokens if spec else 0,
        )

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        launch.stop_workers(self._workers)  # told to stop by the step thread; killed if they did not

    # ---- tensor-parallel ranks ---------------------------------------------------------

    def _lost_worker(self) -> EngineError | None:
        for w in self._workers:
            if w.proc.poll() is not None:
                return EngineError(f"tensor-parallel rank {w.place.rank} failed: {w.error_text()}")
        return None

    def _kill_workers(self) -> bool:
        for w in self._workers:
            if w.proc.poll() is None:
                w.proc.kill()
        return bool(self._workers)

    def _watch_workers(self) -> None:
        while not self._stopped and self.failure is None:
            lost = self._lost_worker()
            if lost is not None:
                self._die(lost, on_step_thread=False)
                return
            time.sleep(0.25)

    def _make_request(self, prompt: list[int], params: SamplingParams, request_id: str) -> Request:
        loop = asyncio.get_running_loop()
        request = Request(request_id, params, len(prompt), loop, asyncio.Queue())
        now = time.monotonic()
        mrope, delta = None, 0
        if params.images:
            mrope, delta = mrope_positions(len(prompt), params.images, vision_config(self.model_config).merge_size)
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator().manual_seed(params.seed + i)
            seq = Sequence(
                request_id=request_id, index=i, token_ids=list(prompt), num_prompt_tokens=len(prompt),
                params=params, arrival=now, generator=gen,
                logits_processors=[make() for make in params.logits_processor_factories],
                mrope_positions=mrope, mrope_delta=delta,
            )
            if i > 0:
                seq.blocked_on = request.seqs[0]
            request.seqs.append(seq)
        return request

    # ---- step thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except _RanksOutOfStep as exc:  # a forward failed part-way: the ranks cannot run together again
            self._die(self._lost_worker() or exc.__cause__ or exc)
        except BaseException as exc:  # noqa: BLE001 - the thread is ending: nobody else will answer
            self._die(exc)
        if self.group is not None:
            if self.failure is None:
                try:
                    self.runner.send_stop()
                except Exception:  # noqa: BLE001 - the ranks are exiting anyway
                    log.debug("could not tell the ranks to stop", exc_info=True)
            self.group.destroy()
        if self.failure is None:
            self._fail_all(EngineError("the engine is shutting down"))

    def _serve(self) -> None:
        last_contact = time.monotonic()
        while not self._stopped and self.failure is None:
            self._drain_inbox()
            if not self.scheduler.has_work():
                self._wake.wait(timeout=_HEARTBEAT_S / 2 if self.group is not None else 0.5)
                self._wake.clear()
                if self.group is not None and time.monotonic() - last_contact >= _HEARTBEAT_S:
                    self.runner.send_heartbeat()  # raises if a rank is gone
                    last_contact = time.monotonic()
                continue
            batch = self.scheduler.schedule()
            if batch.empty:
                # Nothing fits (should not happen: the KV holds max_model_len); back off briefly.
                time.sleep(0.001)
                continue
            last_contact = time.monotonic()
            try:
                if not self._step(batch):
                    time.sleep(0.002)  # every sequence waits on a grammar compile: let the compile run
            except _RanksOutOfStep:
                raise
            except Exception:  # noqa: BLE001 - a step's failure fails that step's requests only
                log.exception("engine step failed")
                failed = {s.request_id for s in batch.decodes} | {s.request_id for s, _ in batch.prefills}
                for request_id in failed:
                    if (request := self._requests.get(request_id)) is not None:
                        self._fail(request, EngineError("the engine failed while computing this request"))

    def _die(self, cause: BaseException, on_step_thread: bool = True) -> None:
        """The engine cannot go on (its step thread died, or it lost a tensor-parallel rank): fail
        everything now, refuse what comes, say why in the log. Off the step thread (the rank watcher)
        the scheduler is left alone: the step thread sees `failure` and stops."""
        with self._lock:
            if self.failure is not None or self._stopped:
                return
            self.failure = cause
            self._inbox = []
        what = "the engine's step thread died" if on_step_thread else "the engine lost a tensor-parallel rank"
        log.critical("%s; failing %d request(s), and every new one, until restart", what, len(self._requests),
                     exc_info=cause)
        self._kill_workers()
        error = EngineDead("the engine stopped after an internal error and serves no more requests")
        if on_step_thread:
            self._fail_all(error)
            return
        with self._lock:
            requests = list(self._requests.values())
            self._requests.clear()
        for request in requests:
            try:
                request.loop.call_soon_threadsafe(request.queue.put_nowait, error)
            except RuntimeError:  # its event loop is closed: nobody waits for it
                pass
        self._wake.set()

    def _fail_all(self, error: EngineError) -> None:
        for request in list(self._requests.values()):
            try:
                self._fail(request, error)
            except BaseException:  # noqa: BLE001 - scheduler state may be what broke: still tell the client
                log.exception("failing request %s cleanly failed; delivering the error directly", request.request_id)
                self._requests.pop(request.request_id, None)
                self._post(request.loop, request.queue.put_nowait, error)

    def _drain_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for request in new:
            for seq in request.seqs:
                self.scheduler.add(seq)
        for request_id in aborts:
            request = self._requests.pop(request_id, None)
            if request is not None:
                for seq in request.seqs:
                    self.scheduler.finish(seq, "abort")

    def _fail(self, request: Request, error: BaseException) -> None:
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")
        if self._requests.pop(request.request_id, None) is not None:
            self._post(request.loop, request.queue.put_nowait, error)

    def _post(self, loop: asyncio.AbstractEventLoop, callback, *args) -> bool:
        """`call_soon_threadsafe`, except that a closed loop is not an engine failure: nobody can
        read its requests' results any more, so they are aborted. False when it was closed."""
        try:
            loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:
            if not loop.is_closed():
                raise
        orphans = [r for r in self._requests.values() if r.loop is loop]
        log.warning("an event loop closed with %d request(s) in flight; aborting them", len(orphans))
        for request in orphans:
            self._requests.pop(request.request_id, None)
            for seq in request.seqs:
                self.scheduler.finish(seq, "abort")
        return False

    @torch.inference_mode()
    def _step(self, batch: ScheduledBatch) -> bool:
        """One forward and sample; False when it moved nothing on (all its samples were deferred).

        A sequence whose logits processor is not ready (NotReady: its grammar still compiles) gets
        no token: it stays where it is, and the next step recomputes its last position (the same
        KV slot, rewritten with the same values) and asks again, while the others go on. A decode
        with proposals (speculative decoding) gets the proposals the model accepts and one token of
        its own; the KV of the rejected ones is left behind (rewritten before anything reads it)."""
        finishing = [s for s, chunk in batch.prefills if s.num_computed_tokens + chunk == s.num_tokens]
        sampling = list(batch.decodes) + [s for s in finishing if s.pooling is None]
        try:
            logits = self.runner.run(batch, sampling)
        except Exception as exc:
            if self.group is not None:  # some ranks may be inside a collective of this step
                raise _RanksOutOfStep() from exc
            raise
        pooled = [s for s in finishing if s.pooling is not None]
        if pooled:
            logits = pooling.take_logits(batch.decodes, finishing, logits)
        for seq in batch.decodes:
            seq.num_computed_tokens = seq.num_tokens
        for seq, chunk in batch.prefills:
            seq.num_computed_tokens += chunk
        for seq in batch.decodes + [s for s, _ in batch.prefills]:
            self.blocks.register_full_blocks(seq)

        for seq in pooled:
            self._finish_pooling(seq)

        proposals = {seq: seq.proposal for seq in batch.decodes if seq.proposal}
        for seq in batch.decodes:
            seq.proposal = []
        results = self._sample_all(sampling, logits, proposals)
        progress = bool(batch.prefills) or any(r is not None and r[0] for r in results)
        touched: dict[str, Request] = {}
        for seq, result in zip(sampling, results):
            if seq.is_finished or result is None:
                continue
            request = self._requests.get(seq.request_id)
            if request is None:
                continue
            tokens, accepted = result
            if seq in proposals:
                self.speculator.record(seq, len(proposals[seq]), accepted)
            if not tokens:  # its processor was not ready: the proposals' blocks go back
                if seq in proposals:
                    self.blocks.trim(seq, seq.num_tokens)
                continue
            touched[seq.request_id] = request
            first = seq.num_output_tokens == 0
            for sample in tokens:
                self._append_token(seq, sample.token_id, sample.logprob)
                if seq.is_finished:
                    break
            if seq.index == 0 and first:
                for child in request.seqs[1:]:  # parent's prompt KV is now cached
                    child.blocked_on = None
            if seq in proposals and not seq.is_finished:
                self._keep_accepted(seq, accepted)
        self._publish(touched.values())
        return progress

    def _finish_pooling(self, seq: Sequence) -> None:
        """Its last position is computed: hand back the pooled state, free its blocks (the full ones
        stay in the prefix cache)."""
        self.scheduler.finish(seq, "stop")
        request = self._requests.pop(seq.request_id, None)
        if request is None:
            return
        output = PoolingOutput(request.request_id, request.num_prompt_tokens, seq.num_cached_tokens,
                               seq.pooling.result(seq.num_tokens), seq.pooling.logits)
        self._post(request.loop, request.queue.put_nowait, output)

    def _keep_accepted(self, seq: Sequence, accepted: int) -> None:
        """The accepted proposals' KV is the sequence's own now (their full blocks cacheable); the
        blocks past its tokens, which held only rejected positions, go back."""
        seq.num_computed_tokens += accepted
        self.blocks.register_full_blocks(seq)
        self.blocks.trim(seq, seq.num_tokens)

    def _sample_all(self, seqs: list[Sequence], logits: torch.Tensor,
                    proposals: dict[Sequence, list[int]]) -> list[tuple[list, int] | None]:
        """Per sequence (tokens to append, proposals accepted), or None (deferred, or failed).
        Rows: one a sequence, 1 + len(proposal) for one with proposals."""
        starts, row = [], 0
        for seq in seqs:
            starts.append(row)
            row += 1 + len(proposals.get(seq, ()))
        plain = [i for i, seq in enumerate(seqs) if seq not in proposals]
        out: list[tuple[list, int] | None] = [None] * len(seqs)
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[[starts[i] for i in plain]]
            for i, result in zip(plain, self._sample_safely([seqs[i] for i in plain], rows)):
                out[i] = None if result is None else ([result], 0)
        for i, seq in enumerate(seqs):
            if seq in proposals:
                k = len(proposals[seq])
                try:
                    out[i] = self.sampler.verify(seq, logits[starts[i] : starts[i] + k + 1], proposals[seq],
                                                 self.speculator.draft_probs(seq))
                except Exception:  # noqa: BLE001 - one request's own processors fail only that request
                    log.exception("sampling failed for request %s", seq.request_id)
                    if (request := self._requests.get(seq.request_id)) is not None:
                        self._fail(request, EngineError("sampling failed for this request"))
        return out

    def _sample_safely(self, seqs: list[Sequence], logits: torch.Tensor) -> list:
        """Sample; a failure caused by one request's own processors fails only that request."""
        try:
            return self.sampler.sample(seqs, logits)
        except Exception:  # noqa: BLE001
            if len(seqs) == 1:
                raise
        results = []
        for i, seq in enumerate(seqs):
            try:
                results.append(self.sampler.sample([seq], logits[i : i + 1])[0])
            except Exception:  # noqa: BLE001
                log.exception("sampling failed for request %s", seq.request_id)
                if (request := self._requests.get(seq.request_id)) is not None:
                    self._fail(request, EngineError("sampling failed for this request"))
                results.append(None)
        return results

    def _append_token(self, seq: Sequence, token: int, logprob) -> None:
        p = seq.params
        seq.token_ids.append(token)
        seq.pending_token_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        reason = None
        if not p.ignore_eos and token in self.sampler.eos_token_ids:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)

    def _publish(self, requests) -> None:
        batch: list[tuple[Request, RequestOutput]] = []
        for request in requests:
            if request.request_id not in self._requests:
                continue  # aborted or failed meanwhile
            deltas = []
            for seq in request.seqs:
                if seq.pending_token_ids or (seq.is_finished and not seq.finish_reported):
                    deltas.append(
                        CompletionDelta(
                            seq.index, seq.pending_token_ids,
                            seq.pending_logprobs if seq.params.logprobs is not None else None,
                            seq.finish_reason if seq.is_finished else None,
                        )
                    )
                    seq.pending_token_ids, seq.pending_logprobs = [], []
                    seq.finish_reported = seq.is_finished
            if not deltas:
                continue
            finished = request.finished
            if finished:
                del self._requests[request.request_id]
            output = RequestOutput(
                request.request_id, request.num_prompt_tokens, request.seqs[0].num_cached_tokens, deltas, finished
            )
            batch.append((request, output))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, RequestOutput]]] = {}
        for item in batch:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():  # one wake-up per event loop per step
            self._post(loop, _deliver, items)


def _deliver(batch: list[tuple[Request, RequestOutput]]) -> None:
    for request, output in batch:
        request.queue.put_nowait(output)
