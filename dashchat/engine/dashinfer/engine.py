"""DashInfer's AllSpark engine behind dashchat's engine interface (`--engine dashinfer`).

The HF-style model folder is converted once to DashInfer's format (convert.py), loaded
into an `allspark.Engine`, and each request streams from DashInfer's per-request result queue in a
thread of its own (the queue's blocking `Get()` releases the GIL) into the request's asyncio queue.

DashInfer 1.x decides eos, sampling and penalties itself; dashchat adds what it lacks or gets
wrong: stop ids are matched here (its stop_words_ids check also looks at the prompt's tail), every
request gets a seed (its default one is fixed), n > 1 runs n requests, and what it cannot do
faithfully is refused with `UnsupportedFeature` (see `_unsupported`). One difference is kept:
its presence_penalty also counts the prompt's tokens (the native engine: generated tokens only).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ...models.config import ModelConfig
from ...tokenizer import Tokenizer
from ..args import EngineArgs
from .convert import convert, dashinfer_model_type, load_hf_config
from ..types import (
    CompletionDelta,
    EngineError,
    EngineOverloaded,
    EngineStats,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    UnsupportedFeature,
    check_prompt,
)

# Its glog prints several INFO lines per request; keep warnings and errors unless the user chose.
os.environ.setdefault("GLOG_minloglevel", "2")
try:
    from dashinfer import allspark
except ImportError as exc:  # the server turns this into "install the extra"
    raise ImportError("the dashinfer engine needs the dashinfer package: pip install -e '.[dashinfer]'") from exc

log = logging.getLogger(__name__)

_MAX_DEFAULT_LEN = 4096  # DashInfer warms up with one max-length prompt at start: keep that short on CPU
_MAX_TOP_LOGPROBS = 10  # DashInfer refuses more
_BAN = -100.0  # OpenAI: a logit_bias of -100 bans the token, which DashInfer can do (bad_words_ids)


@dataclass(eq=False)
class _Sub:
    """One DashInfer request: choice `index` of a dashchat request."""

    index: int
    handle: Any = None
    queue: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False
    stopping: bool = False  # stop_request sent


@dataclass(eq=False)
class _Request:
    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    stop_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    subs: list[_Sub] = field(default_factory=list)


class DashInferEngine:
    name = "dashinfer"
    # DashInfer samples inside its own step: no per-token hook for grammar (logits processors).
    # The server can leave optional ones out (tool_choice auto then works by parsing alone).
    supports_logits_processors = False

    def __init__(self, args: EngineArgs) -> None:
        if args.quantization != "none":
            raise ValueError(f"the dashinfer engine runs unquantized weights; --quantization {args.quantization} "
                             "is for the native engine")
        if args.compile:
            raise ValueError("--compile compiles the native engine's decode step; DashInfer runs its own kernels")
        if args.nnodes > 1 or (args.tensor_parallel_size or len(args.device_ids)) != len(args.device_ids):
            raise ValueError("--engine dashinfer runs on one machine over its --device-list; --nnodes and a "
                             "--tensor-parallel-size other than the list's length are the native engine's")
        if args.device == "cpu" and len(args.device_ids) > 1:
            raise ValueError("--engine dashinfer on CPU runs on one device here (its multi-NUMA mode needs an "
                             "MPI launch); for several CPU ranks use the native engine")
        cfg = load_hf_config(args.model_dir)
        dashinfer_model_type(cfg)  # unsupported architectures fail before anything is loaded
        compute_unit, data_type = _device(args)
        self.args = args
        self.tokenizer = Tokenizer.from_dir(args.model_dir)
        model_cfg = ModelConfig.from_dict(cfg)
        self.vocab_size = model_cfg.vocab_size
        self.max_model_len = args.max_model_len or min(model_cfg.max_position_embeddings, _MAX_DEFAULT_LEN)

        multinode = args.device == "cuda" and len(args.device_ids) > 1  # tensor parallel over the device list
        model = convert(args.model_dir, data_type=data_type, multinode=multinode)
        self._model_name = f"dashchat-{id(self):x}"
        as_cfg = allspark.AsModelConfig(
            model_name=self._model_name, model_path=str(model.model_path), weights_path=str(model.weights_path),
            # DashInfer refuses prompts longer than engine_max_length - 2; +1 lets a prompt of
            # max_model_len - 1 tokens still get its one token, as with the native engine.
            engine_max_length=self.max_model_len + 1, engine_max_batch=args.max_num_seqs,
        )
        as_cfg.compute_unit = compute_unit
        if args.device == "cpu":
            from ..cpu.threads import physical_cores

            as_cfg.num_threads = args.num_threads or physical_cores()
            as_cfg.matmul_precision = "highest"  # lower precisions need AVX512-BF16 and drift from fp32
        self._as = allspark.Engine()
        log.info("dashinfer: loading %s on %s (warms up with a %d-token prompt)", model.dir, compute_unit,
                 self.max_model_len - 1)
        self._as.build_model_from_config_struct(as_cfg)
        status = self._as.start_model(self._model_name)
        if status != allspark.AsStatus.ALLSPARK_SUCCESS:
            raise EngineError(f"dashinfer could not start the model: {status}")
        self._requests: dict[str, _Request] = {}
        self._live: set[_Sub] = set()  # started and not yet released
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopped = False
        # Exiting with the model loaded crashes in DashInfer's destructors: stop it first.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    @classmethod
    def from_args(cls, args: EngineArgs) -> DashInferEngine:
        return cls(args)

    # ---- async front -------------------------------------------------------------------

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self._stopped:
            raise EngineError("the engine is shut down")
        self._check(prompt_token_ids, params)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.eos_token_ids
        request = _Request(request_id, params, len(prompt_token_ids), frozenset(stop_ids),
                           asyncio.get_running_loop(), asyncio.Queue())
        configs = [self._generate_config(prompt_token_ids, params, i) for i in range(params.n)]
        self._requests[request_id] = request
        finished = False
        done: set[int] = set()
        try:
            self._start(request, prompt_token_ids, configs)
            while True:
                items = [await request.queue.get()]
                while not request.queue.empty():  # one output for everything that arrived meanwhile
                    items.append(request.queue.get_nowait())
                deltas: dict[int, CompletionDelta] = {}
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    _merge(deltas, item)
                    if item.finish_reason is not None:
                        done.add(item.index)
                finished = len(done) == params.n
                yield RequestOutput(request_id, request.num_prompt_tokens, 0,
                                    [deltas[i] for i in sorted(deltas)], finished)
                if finished:
                    return
        finally:
            if self._requests.get(request_id) is request:
                del self._requests[request_id]
            if not finished:  # the consumer left early (client gone) or failed: stop generating now
                self._stop_subs(request)

    async def abort(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is not None:
            self._stop_subs(request)

    def stats(self) -> EngineStats:
        with self._lock:
            live = len(self._live)
        waiting = 0
        if live and not self._stopped:
            waiting = min(live, int(self._as.get_as_engine_stat(self._model_name).pendding_request))
        return EngineStats(num_running=live - waiting, num_waiting=waiting)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with self._lock:
            live, threads = list(self._live), list(self._threads)
        for sub in live:
            self._stop_sub(sub)
        for t in threads:
            t.join(timeout=10)
        self._as.stop_model(self._model_name)
        self._as.release_model(self._model_name)

    # ---- request admission -------------------------------------------------------------

    def _check(self, prompt: list[int], p: SamplingParams) -> None:
        check_prompt(prompt, p.max_tokens, self.max_model_len, self.vocab_size)
        unsupported = _unsupported(p, self._min_tokens_stop_ids(p))
        if unsupported:
            raise UnsupportedFeature(f"{unsupported} is not supported by the dashinfer engine")
        with self._lock:
            live = len(self._live)
        if live + p.n > self.args.max_num_seqs + self.args.max_queue:
            raise EngineOverloaded("the server is busy: too many requests are waiting")

    def _min_tokens_stop_ids(self, p: SamplingParams) -> set[int]:
        """Ids min_tokens must hold back: DashInfer's min_length holds back its one eos id only."""
        ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            ids |= self.tokenizer.eos_token_ids
        return ids - {self._eos_id(p)}

    def _eos_id(self, p: SamplingParams) -> int:
        eos = self.tokenizer.eos_token_id
        return -1 if p.ignore_eos or eos is None else eos

    def _generate_config(self, prompt: list[int], p: SamplingParams, index: int) -> dict[str, Any]:
        n_prompt = len(prompt)
        if p.seed is not None:
            seed = p.seed + index  # as the native engine seeds choice i
        else:
            seed = random.getrandbits(31)  # DashInfer's default seed is fixed: every request would draw alike
        cfg: dict[str, Any] = {
            "max_length": n_prompt + max(p.max_tokens, 1),
            "eos_token_id": self._eos_id(p),
            "seed": seed,
            "repetition_penalty": float(p.repetition_penalty),
            "presence_penalty": float(p.presence_penalty),
        }
        if p.greedy:
            cfg.update(top_k=1, top_p=1.0, temperature=1.0)  # it refuses temperature 0
        else:
            cfg.update(top_k=max(p.top_k, 0), top_p=float(p.top_p), temperature=float(p.temperature))
        if p.min_tokens:
            cfg["min_length"] = n_prompt + p.min_tokens
        banned = [[t] for t, b in (p.logit_bias or {}).items() if b <= _BAN]
        if p.ignore_eos:
            banned += [[t] for t in sorted(self.tokenizer.eos_token_ids)]
        if banned:
            cfg["bad_words_ids"] = banned
        if p.logprobs is not None:
            cfg.update(logprobs=True, top_logprobs=p.logprobs)
        return cfg

    def _start(self, request: _Request, prompt: list[int], configs: list[dict[str, Any]]) -> None:
        import torch

        for i, gen_cfg in enumerate(configs):
            sub = _Sub(i)
            ids = torch.tensor([prompt], dtype=torch.int64)
            status, sub.handle, sub.queue = self._as.start_request(
                self._model_name, {"input_ids": torch.utils.dlpack.to_dlpack(ids)}, gen_cfg
            )
            if status != allspark.AsStatus.ALLSPARK_SUCCESS or sub.queue is None:
                self._stop_subs(request)
                raise EngineError(f"dashinfer refused the request ({status}); see its log")
            request.subs.append(sub)
            thread = threading.Thread(target=self._read, args=(request, sub), name="dashchat-dashinfer",
                                      daemon=True)
            with self._lock:
                self._live.add(sub)
                self._threads.add(thread)
            thread.start()

    def _stop_subs(self, request: _Request) -> None:
        for sub in request.subs:
            self._stop_sub(sub)

    def _stop_sub(self, sub: _Sub) -> None:
        with sub.lock:  # never stop a released handle: DashInfer frees it on release
            if not sub.released and not sub.stopping:
                sub.stopping = True
                self._as.stop_request(self._model_name, sub.handle)

    # ---- reader threads ----------------------------------------------------------------

    def _read(self, request: _Request, sub: _Sub) -> None:
        """Stream one DashInfer request into the asyncio queue until it ends; then release it."""
        p = request.params
        count = 0
        reason = None
        try:
            started = self._wait_started(sub)
            while reason is None:
                element = sub.queue.Get() if started else None  # Get() blocks without the GIL
                if element is None:  # DashInfer ended it: max_length, its eos (seen below), or a stop
                    if self._stopped:
                        raise EngineError("the engine is shutting down")
                    if not sub.stopping and count < p.max_tokens:
                        raise EngineError(f"dashinfer ended the request early ({sub.queue.GenerateStatus()})")
                    reason = "abort" if sub.stopping else "length"
                    self._post(request, CompletionDelta(sub.index, [], [] if p.logprobs is not None else None,
                                                        reason))
                    return
                tokens = list(element.ids_from_generate)
                logprobs = _logprobs(element, tokens, p.logprobs)
                for j, tok in enumerate(tokens):
                    count += 1
                    if tok in request.stop_ids and count > p.min_tokens:
                        reason = "stop"
                    elif count >= p.max_tokens:
                        reason = "length"
                    if reason:
                        tokens = tokens[: j + 1]
                        logprobs = logprobs[: j + 1] if logprobs is not None else None
                        break
                self._post(request, CompletionDelta(sub.index, tokens, logprobs, reason))
            # Done before DashInfer noticed (a stop id it does not know): stop it, let it wind down.
            if sub.queue.GenerateStatus() != allspark.GenerateRequestStatus.GenerateFinished:
                self._stop_sub(sub)
            while sub.queue.Get() is not None:
                pass
        except Exception as exc:  # never let a reader die silently
            if not isinstance(exc, EngineError):
                log.exception("dashinfer request %s failed", request.request_id)
                exc = EngineError(f"dashinfer failed: {exc}")
            self._post(request, exc)
        finally:
            with sub.lock:
                sub.released = True
                self._as.release_request(self._model_name, sub.handle)
            with self._lock:
                self._live.discard(sub)
                self._threads.discard(threading.current_thread())

    @staticmethod
    def _wait_started(sub: _Sub) -> bool:
        """Wait until DashInfer schedules the request; False if it was stopped while still queued.

        A request stopped while queued stays in Init and its Get() never returns, so poll instead.
        """
        delay = 0.0005
        while sub.queue.GenerateStatus() == allspark.GenerateRequestStatus.Init:
            if sub.stopping:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.005)  # bounds the delay this adds to the first token
        return True

    @staticmethod
    def _post(request: _Request, item: CompletionDelta | BaseException) -> None:
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening
            pass


def _shutdown_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


def _device(args: EngineArgs) -> tuple[str, str]:
    """DashInfer's compute unit and weight data type for the CLI's --device / --device-list / --dtype."""
    if args.device == "cpu":
        if args.dtype not in ("auto", "float32"):
            raise ValueError(f"dashinfer on CPU runs float32 weights here; --dtype {args.dtype} is unsupported")
        return "CPU:0", "float32"
    if args.device == "cuda":  # DashInfer 2.x builds; the CPU-only 1.x wheel fails at load
        dtype = "bfloat16" if args.dtype == "auto" else args.dtype
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unsupported --dtype {args.dtype!r} for dashinfer")
        return "CUDA:" + ",".join(str(i) for i in args.device_ids), dtype
    raise ValueError(f"unsupported device {args.device!r}; choose cpu or cuda")


def _unsupported(p: SamplingParams, min_tokens_stop_ids: set[int]) -> str | None:
    """What in `p` DashInfer cannot do faithfully (named for the 400 message), or None."""
    if p.logits_processor_factories:
        return "grammar-constrained decoding (tool_choice required/named, response_format)"
    if p.frequency_penalty:
        return "frequency_penalty"
    if p.min_p:
        return "min_p"
    if p.logit_bias and any(b > _BAN for b in p.logit_bias.values()):
        return "logit_bias other than -100 (a ban)"
    if p.logprobs is not None and p.logprobs > _MAX_TOP_LOGPROBS:
        return f"top_logprobs above {_MAX_TOP_LOGPROBS}"
    if p.min_tokens and min_tokens_stop_ids:
        return "min_tokens together with stop token ids other than the model's eos"
    return None


def _logprobs(element: Any, tokens: list[int], k: int | None) -> list[TokenLogprob] | None:
    if k is None:
        return None
    tops = list(element.log_probs_list)
    chosen = list(element.token_logprobs_list)
    return [
        TokenLogprob(tok, float(chosen[j]), [(int(t), float(v)) for t, v in tops[j][:k]])
        for j, tok in enumerate(tokens)
    ]


def _merge(deltas: dict[int, CompletionDelta], d: CompletionDelta) -> None:
    acc = deltas.get(d.index)
    if acc is None:
        deltas[d.index] = CompletionDelta(d.index, list(d.token_ids),
                                          list(d.logprobs) if d.logprobs is not None else None, d.finish_reason)
        return
    acc.token_ids += d.token_ids
    if d.logprobs is not None:
        acc.logprobs = (acc.logprobs or []) + d.logprobs
    acc.finish_reason = d.finish_reason or acc.finish_reason
