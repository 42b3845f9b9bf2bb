"""`python -m dashchat.openai_server`: resolve the model, start the engine, serve the OpenAI API.

Usage mirrors the seed quick-start (`--model-path`, `--use-modelscope`, `--device`,
`--device-list`, `--host`, `--port`); `--help` lists the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("dashchat")


def _device_ids(values: Sequence[str]) -> tuple[int, ...]:
    ids: list[int] = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            if not part.isdigit():
                raise argparse.ArgumentTypeError(f"device ids are integers; got {part!r}")
            ids.append(int(part))
    return tuple(ids) or (0,)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dashchat.openai_server",
        description="OpenAI-compatible chat server (POST /v1/chat/completions, /v1/completions; "
                    "GET /v1/models, /health, /version, /metrics) on dashchat's own inference engine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model-path", action="append", default=None,
                   help="Local Hugging Face-style folder, a .gguf file, a hub id (e.g. Qwen/Qwen2.5-7B-Instruct), "
                        "or an embedded name (qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct). "
                        "Give it several times to serve several models (loaded on first use). "
                        "Omitted (and no --models-dir / --models-config): the embedded default, "
                        "qwen2.5-coder-0.5b-instruct.")
    m.add_argument("--use-modelscope", action="store_true",
                   help="Download hub ids through ModelScope (honours its cache and offline mode) "
                        "instead of Hugging Face.")
    m.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="Name(s) clients pass as 'model' (one model only; several: per model in --models-config). "
                        "Default: the last part of the model path, e.g. Qwen2.5-7B-Instruct.")
    m.add_argument("--task", choices=["auto", "generate", "embed", "score"], default="auto",
                   help="What the model is served for: generate (chat, completions), embed (/v1/embeddings), "
                   "score (/v1/rerank, /score with a decoder reranker such as Qwen3-Reranker). auto: embed where "
                   "the folder declares sentence-transformers pooling or has no LM head, score where its config "
                   "says it is a reranker, else generate.")
    m.add_argument("--chat-template", default=None,
                   help="Jinja chat template: a file path, or the template text itself. "
                        "Default: the model's own (tokenizer_config.json or GGUF metadata).")
    m.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="How the model marks its thinking: qwen3, deepseek_r1 (both <think>...</think>), or "
                        "none (thinking stays in content). Default: detected from the chat template.")
    m.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                   help='Chat template variables for every request, e.g. \'{"enable_thinking": false}\'; '
                        "a request's chat_template_kwargs override them.")
    mm = p.add_argument_group("several models (README: Several models)")
    mm.add_argument("--models-dir", default=None, metavar="DIR",
                    help="Serve every model in DIR: each folder with config.json and weights (or one GGUF model) "
                         "and each .gguf file (not mmproj projectors; a split GGUF once), named after the "
                         "folder or file.")
    mm.add_argument("--models-config", default=None, metavar="FILE",
                    help="A YAML or JSON file listing models with their own settings: {\"models\": [{\"path\": "
                         "..., \"served_model_name\": [...], \"keep_alive\": SECONDS, \"args\": {flag: value}}]}; "
                         "args are this group's flags spelled with underscores (quantization, max_model_len, "
                         "chat_template, device_list, speculative_config, ...).")
    mm.add_argument("--keep-alive", type=_seconds, default=None, metavar="SECONDS",
                    help="How long a model stays loaded once idle (a number of seconds or a duration such as 5m; "
                         "negative: forever). Default: forever with one model, 300 with several. An Ollama "
                         "request's keep_alive sets it for that model.")
    mm.add_argument("--max-loaded-models", type=int, default=0, metavar="N",
                    help="Models loaded at once; loading one more unloads the least recently used idle one. "
                         "0: no limit.")
    mm.add_argument("--max-memory-gb", type=float, default=0.0, metavar="GB",
                    help="Memory the loaded models may take, by their estimate (weight files as served plus "
                         "the KV cache budget); past it the least recently used idle ones unload. 0: no limit.")
    mm.add_argument("--allow-client-unload", action="store_true",
                    help="Let an Ollama client's keep_alive 0 unload a model that other requests use (it "
                         "unloads once they end). Without it, such a request unloads the model only when no "
                         "other uses it.")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=["native", "dashinfer"], default="native",
                   help="Inference engine: dashchat's own PyTorch engine, or DashInfer (needs the "
                        "'dashinfer' extra).")
    e.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="Where to run the model. Default: cuda when a GPU is visible, else cpu.")
    e.add_argument("--device-list", nargs="+", default=["0"], metavar="ID",
                   help="This node's device ids. Several run one model over them with tensor parallelism "
                        "(one process per device). On CPU an id names a group of cores: a NUMA node where "
                        "there are several, else an equal share of the cores.")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="Weight and activation dtype; auto = float32 on CPU, bfloat16 on CUDA.")
    e.add_argument("--quantization", choices=["gguf", "none", "int8", "int4", "auto"], default=None,
                   help="Linear-layer quantization, CPU only; what decoding a token reads per weight is in "
                        "brackets. gguf: a GGUF model's own blocks as the file ships them [0.5-1 byte: 4.5-8.5 "
                        "bits], int8 activations per 32 values as llama.cpp (the default for GGUF models on "
                        "CPU). none: the model's own precision, a GGUF dequantized to float32 [4 bytes] (the "
                        "default for other models; keeps greedy output identical to the float model). int8: "
                        "int8 weights and per-token int8 activations [1 byte], fast under concurrent load. "
                        "int4: 4-bit weights in groups of 32 [~0.6 byte] with bfloat16 activations. int8 and "
                        "int4 re-quantize, and drift a little from float32 (see bench/README.md). auto: gguf for "
                        "GGUF models, else int8, for the native engine on CPU in float32; else none.")
    e.add_argument("--compile", action="store_true",
                   help="Native engine: compile the decode step with torch.compile before serving. "
                        "About 2x faster decoding on CPU; start-up takes ~20 s more (a few minutes the "
                        "very first time, while the compiled kernels are cached).")
    e.add_argument("--enforce-eager", action="store_true",
                   help="Native engine on CUDA: run decode steps eagerly instead of replaying captured "
                        "CUDA graphs (graphs are captured per batch-size and context bucket on first use).")
    e.add_argument("--speculative-config", default="auto", metavar="JSON",
                   help="Native engine: speculative decoding, as vLLM spells it. '{\"method\": \"ngram\"}' "
                        "proposes the tokens that followed an earlier occurrence of the text's last "
                        "2-4 tokens (in the prompt and answer so far, or in recent requests), and the model checks up to "
                        "num_speculative_tokens (at most; default 47, fewer unless the text is being copied) of them in one step. Pays for answers that repeat "
                        "the prompt (code edits, quotes) where a few extra rows of a step cost little; plain "
                        "chat gains little (README: Speculative decoding). '{\"method\": "
                        "\"draft_model\", \"model\": PATH}' has a smaller model of the same tokenizer (GGUF "
                        "file, folder or embedded name) propose them instead (draft_layers: N runs only its "
                        "first N layers). Greedy output is unchanged; sampled output keeps the model's "
                        "distribution. Keys: method, num_speculative_tokens, prompt_lookup_min (2), "
                        "prompt_lookup_max (4), model, draft_layers. 'off' for none. Default: auto = n-gram "
                        "lookup where greedy output stays bit for bit (a GGUF run as shipped on one CPU "
                        "rank, without --compile), else off.")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="Context length (prompt + completion). Default: the model's, at most 8192.")
    e.add_argument("--max-num-seqs", type=int, default=32, help="Sequences generated at once.")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="Token budget per engine step (long prompts are prefilled in chunks). "
                        "Default: 512 on CPU, 2048 on CUDA.")
    e.add_argument("--kv-cache-memory", type=float, default=None, metavar="GB",
                   help="Memory for the KV cache in GiB. Default: enough for max-num-seqs full contexts, "
                        "capped.")
    e.add_argument("--max-queue", type=int, default=256,
                   help="Requests allowed to wait beyond the running ones; more get 429 with Retry-After.")
    e.add_argument("--threads", type=int, default=None, help="CPU threads. Default: physical cores.")
    e.add_argument("--seed", type=int, default=0, help="Engine seed for requests without one.")
    d = p.add_argument_group("distributed (tensor parallelism over torch.distributed: gloo on CPU, NCCL on CUDA)")
    d.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="Ranks that share the model. Default: --nnodes x the length of --device-list "
                        "(WORLD_SIZE under torchrun). Several ranks on CUDA decode eagerly (no CUDA graphs: "
                        "collectives inside captured graphs are a known source of hangs). KV cache memory "
                        "is per rank.")
    d.add_argument("--nnodes", type=int, default=1, help="Machines the ranks run on.")
    d.add_argument("--node-rank", type=int, default=0,
                   help="This machine's index: node 0 serves HTTP and holds rank 0; the others run --headless.")
    d.add_argument("--master-addr", default="127.0.0.1",
                   help="Node 0's address, where the ranks meet (torch.distributed's rendezvous); node 0 listens "
                        "on this address only. One node: loopback only. Several nodes: an address on the network "
                        "the nodes share, whose port only they can reach (whoever reaches it can pose as a rank).")
    d.add_argument("--master-port", type=int, default=None,
                   help="A free port on node 0 for the rendezvous. Default on one node: any free port; "
                        "required with several nodes.")
    d.add_argument("--allow-wildcard-master-addr", action="store_true",
                   help="Let node 0 of several take --master-addr 0.0.0.0 (or ::) and listen for the "
                        "rendezvous on every interface. Refused without this flag.")
    d.add_argument("--headless", action="store_true",
                   help="Run this node's ranks only, no HTTP server (every node but node 0). Exits when "
                        "node 0 does.")
    d.add_argument("--distributed-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="A collective that takes longer while serving means a rank is lost: in-flight "
                        "requests fail and the server exits non-zero.")
    d.add_argument("--distributed-load-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="How long the ranks wait for each other to join the rendezvous and to load the model. "
                        "Node 0 then exits naming the ranks that never joined.")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: all interfaces).")
    s.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    s.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="Require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on every route but the chat "
                        "page, /health, /version and /metrics. Several keys: each is a tenant (its stored "
                        "responses and prompt cache are its own). Also read from DASHCHAT_API_KEY "
                        "(comma-separated). An empty key is refused.")
    s.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="Enable CORS for these origins ('*' for any). Default: CORS off.")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="Log level (access logs are at info).")
    s.add_argument("--log-prompts", action="store_true",
                   help="Log rendered prompts (off by default: prompts may be private).")
    s.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                   help="Do not serve the browser chat page at / (the API is unchanged).")
    s.add_argument("--enable-docs", action="store_true",
                   help="Serve Swagger UI at /docs (the OpenAPI description at /openapi.json is always "
                        "served). Off by default: the Swagger page loads its scripts from a CDN, on the "
                        "same origin as the chat page's remembered key.")
    s.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="Let chat messages' text become special tokens (a user's '<|im_end|>' ends the "
                        "turn). Off by default: such text is encoded as ordinary tokens.")
    med = p.add_argument_group("media (image URLs in requests)")
    med.add_argument("--allowed-media-domains", default=None, metavar="HOSTS",
                     help="Comma list of hosts whose http(s) image URLs the server fetches: exact names or "
                          "'*.example.com' for its subdomains. Default: none (only data: URLs).")
    med.add_argument("--media-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="Longest time one image fetch may take, redirects included.")
    med.add_argument("--media-max-bytes", type=int, default=20 * 1024 * 1024, metavar="BYTES",
                     help="Largest image the server fetches or decodes.")
    med.add_argument("--allow-private-media-addresses", action="store_true",
                     help="Let hosts listed by exact name in --allowed-media-domains resolve to private, "
                          "loopback or link-local addresses (refused by default: SSRF).")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024,
                     help="Largest request body; bigger ones get 413.")
    lim.add_argument("--max-messages", type=int, default=1024, help="Most messages in one chat request.")
    lim.add_argument("--max-tools", type=int, default=128, help="Most tools/functions in one request.")
    lim.add_argument("--max-n", type=int, default=16, help="Largest 'n' (choices per request).")
    lim.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="A generation running longer is aborted (408, or an error event mid-stream). "
                          "0: no limit.")
    lim.add_argument("--grammar-compile-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="A request waits this long for its JSON schema or forced tool call grammar to "
                          "compile; past it, 400 (schema too complex). The compile itself cannot be stopped: "
                          "it finishes on the compile threads and is cached.")
    lim.add_argument("--grammar-compile-threads", type=int, default=1, metavar="N",
                     help="Threads that compile grammars, run at a lower CPU priority than decoding.")
    lim.add_argument("--grammar-cache-mb", type=int, default=256, metavar="MIB",
                     help="Compiled grammars kept for reuse, least recently used out first.")
    lim.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                     help="On SIGTERM/SIGINT, how long running requests may finish before they are aborted.")
    lim.add_argument("--engine-failure-grace", type=float, default=3.0, metavar="SECONDS",
                     help="Once the engine has failed for good (a lost tensor-parallel rank, a dead step "
                          "thread), keep answering 503 this long, then exit with code 1 so a supervisor "
                          "restarts the server.")
    img = p.add_argument_group("images (vision models: Qwen2-VL, Qwen2.5-VL)")
    img.add_argument("--limit-mm-per-prompt", default=None, metavar="JSON",
                     help='Most items per request by modality, as vLLM: \'{"image": 4}\' (the default).')
    img.add_argument("--mm-min-pixels", type=int, default=None, metavar="PIXELS",
                     help="Smallest area an image is resized to (default: the model's preprocessor_config.json, "
                          "else 3136 = 56x56).")
    img.add_argument("--mm-max-pixels", type=int, default=None, metavar="PIXELS",
                     help="Largest area an image is resized to; each 28x28 pixels is one token (default: the "
                          "model's preprocessor_config.json, else 1003520 = 1280 tokens).")
    return p


def _limit_mm(value: str | None) -> dict[str, int]:
    if value is None:
        return {"image": 4}
    try:
        limits = json.loads(value)
    except ValueError:
        raise _ArgError(f"--limit-mm-per-prompt: not JSON: {value!r}") from None
    if not isinstance(limits, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in limits.values()):
        raise _ArgError('--limit-mm-per-prompt takes a JSON object of counts, e.g. \'{"image": 4}\'')
    return {"image": 4, **limits}


class _ArgError(Exception):
    pass


def _seconds(value: str) -> float:
    from dashchat.server.model_pool import parse_keep_alive

    try:
        seconds = parse_keep_alive(float(value) if value.lstrip("+-").replace(".", "", 1).isdigit() else value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert seconds is not None
    return seconds


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(value) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise _ArgError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


def _template_kwargs(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        kwargs = json.loads(value)
    except ValueError as exc:
        raise _ArgError(f"--default-chat-template-kwargs: not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise _ArgError("--default-chat-template-kwargs: must be a JSON object")
    return kwargs


def _reasoning_parser(value: str | None) -> str | None:
    from dashchat.server.text.reasoning import FORMATS

    if value is not None and value != "none" and value not in FORMATS:
        raise _ArgError(f"--reasoning-parser: {value!r} is not one of: none, {', '.join(FORMATS)}")
    return value


def _api_keys(values: list[str] | None) -> list[str]:
    """The keys from --api-key and DASHCHAT_API_KEY. An empty one (`--api-key "$UNSET"`) is refused:
    it would leave the server open while the command line looks guarded."""
    keys = list(values or [])
    if any(not k.strip() for k in keys):
        raise _ArgError("--api-key: an empty key (an unset variable?) would turn authentication off; "
                        "give a real key or leave the flag out")
    env = os.environ.get("DASHCHAT_API_KEY")
    if env is not None:
        from_env = [k.strip() for k in env.split(",") if k.strip()]
        if not from_env:
            raise _ArgError("DASHCHAT_API_KEY is set but holds no key; unset it or give a real key")
        keys += from_env
    return [k.strip() for k in keys]


def _image_fetch_policy(args: argparse.Namespace) -> Any:
    from dashchat.server.media.image_fetch import ImageFetchPolicy, parse_allowed_hosts

    try:
        hosts = parse_allowed_hosts(args.allowed_media_domains or "")
    except ValueError as exc:
        raise _ArgError(f"--allowed-media-domains: {exc}") from None
    if args.media_fetch_timeout <= 0 or args.media_max_bytes <= 0:
        raise _ArgError("--media-fetch-timeout and --media-max-bytes must be positive")
    return ImageFetchPolicy(allowed_hosts=hosts, max_bytes=args.media_max_bytes,
                            timeout_s=args.media_fetch_timeout,
                            allow_private_addresses=args.allow_private_media_addresses)


def _speculative_config(args: argparse.Namespace, device: str, quantization: str) -> str | None:
    """The engine's speculative config: 'auto' is n-gram lookup where the kernels make verification
    exact and a measured win (bench/README.md: never below 0.97x at 1-32 streams), else none."""
    value = args.speculative_config
    if value is None or value.strip().lower() in ("off", "none", ""):
        return None
    if value.strip().lower() != "auto":
        return value
    one_rank = (args.tensor_parallel_size or int(os.environ.get("WORLD_SIZE", 0))
                or args.nnodes * len(args.device_ids or (0,))) == 1
    exact = (args.engine == "native" and device == "cpu" and quantization == "gguf" and not args.compile
             and one_rank)
    return '{"method": "ngram"}' if exact else None


def _engine_args(args: argparse.Namespace, model_dir: str) -> Any:
    from dashchat.engine.args import EngineArgs

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = args.quantization
    native_cpu_fp32 = args.engine == "native" and device == "cpu" and args.dtype in ("auto", "float32")
    if quantization in (None, "auto"):
        from dashchat.engine.quantization.gguf_loading import gguf_source

        if native_cpu_fp32 and gguf_source(model_dir) is not None:
            quantization = "gguf"  # run the file as shipped
        else:
            quantization = "int8" if quantization == "auto" and native_cpu_fp32 else "none"
    speculative_config = _speculative_config(args, device, quantization)
    if speculative_config is not None:
        from dashchat.engine.native.speculative import SpeculativeConfig

        if args.engine != "native":
            raise _ArgError("--speculative-config: only the native engine speculates")
        try:
            SpeculativeConfig.parse(speculative_config)
        except ValueError as exc:
            raise _ArgError(str(exc)) from None
    eargs = EngineArgs(
        model_dir=model_dir, device=device, device_ids=args.device_ids, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_gb=args.kv_cache_memory,
        num_threads=args.threads, max_queue=args.max_queue, quantization=quantization, seed=args.seed,
        compile=args.compile, speculative_config=speculative_config,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size, nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port, distributed_timeout_s=args.distributed_timeout,
        distributed_load_timeout_s=args.distributed_load_timeout,
        allow_wildcard_master_addr=args.allow_wildcard_master_addr,
    )
    return eargs


def _build_engine(args: argparse.Namespace, eargs: Any) -> Any:
    if args.engine == "dashinfer":
        try:
            from dashchat.engine.dashinfer.engine import DashInferEngine
        except ImportError as exc:
            raise _ArgError(f"--engine dashinfer needs the 'dashinfer' extra (pip install -e '.[dashinfer]'): {exc}")
        return DashInferEngine.from_args(eargs)
    from dashchat.engine.native.llm_engine import AsyncLLMEngine

    return AsyncLLMEngine.from_args(eargs)


def _serve(app: Any, state: Any, args: argparse.Namespace) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn with a drain phase: stop accepting, let running requests finish within the
        grace period, abort the rest with a clean error, then exit 0."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Unlike uvicorn, do not re-raise the signal after shutdown: a drained exit is exit 0.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            for server in self.servers:
                server.close()
            state.draining = True
            if state.inflight:
                log.info("draining %d request(s) for up to %gs", state.inflight, args.shutdown_grace)
                if not await state.wait_idle(args.shutdown_grace):
                    log.warning("grace period over: aborting %d request(s)", state.inflight)
                    state.abort_all.set()
                    await state.wait_idle(5.0)
            await super().shutdown(sockets)

        async def on_tick(self, counter: int) -> bool:
            # An engine that died (or lost a tensor-parallel rank) cannot serve again: let the failed
            # requests send their errors (and /health its 503) for a moment, then exit non-zero so
            # that a supervisor restarts the server.
            if not self.should_exit and not state.engine_healthy():
                now = time.monotonic()
                if self.dead_since is None:
                    self.dead_since = now
                    log.error("the engine has failed: exiting in %gs", args.engine_failure_grace)
                elif now - self.dead_since >= args.engine_failure_grace:
                    self.exit_code = 1
                    self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5, log_level=args.log_level)
    server = Server(config)
    server.dead_since, server.exit_code = None, 0
    server.run()
    return server.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.device_ids = _device_ids(args.device_list)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--device-list: {exc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        args.headless = True  # torchrun started every rank with one command line: only rank 0 serves HTTP
    if args.headless and args.engine != "native":
        parser.error("--headless runs ranks of dashchat's native engine; DashInfer runs its own devices")
    try:
        api_keys = _api_keys(args.api_key)
        image_fetch = _image_fetch_policy(args)
    except _ArgError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    debug = args.log_level == "debug"
    try:
        from dashchat.server.app import build_app, server_state
        from dashchat.server.config import ServerConfig
        from dashchat.server.model_pool import ModelPool

        limit_mm = _limit_mm(args.limit_mm_per_prompt)
        if any(v is not None and v < 1 for v in (args.mm_min_pixels, args.mm_max_pixels)) or (
                args.mm_min_pixels and args.mm_max_pixels and args.mm_min_pixels > args.mm_max_pixels):
            raise _ArgError("--mm-min-pixels and --mm-max-pixels must be positive, the min at most the max")
        cfg = ServerConfig(
            served_model_names=["-"],  # each model's own, below
            api_keys=api_keys,
            allowed_origins=args.allowed_origins or [],
            max_request_bytes=args.max_request_bytes,
            max_messages=args.max_messages,
            max_tools=args.max_tools,
            max_n=args.max_n,
            request_timeout_s=args.request_timeout,
            shutdown_grace_s=args.shutdown_grace,
            log_prompts=args.log_prompts,
            web_ui=args.web_ui,
            enable_docs=args.enable_docs,
            engine_name=args.engine,
            grammar_compile_timeout_s=args.grammar_compile_timeout,
            grammar_compile_threads=args.grammar_compile_threads,
            grammar_cache_bytes=args.grammar_cache_mb * 1024 * 1024,
            allow_special_tokens_in_content=args.allow_special_tokens_in_content,
            limit_mm_per_prompt=limit_mm,
            mm_min_pixels=args.mm_min_pixels,
            mm_max_pixels=args.mm_max_pixels,
            image_fetch=image_fetch,
        )
        entries, several = _model_entries(args)
        specs = [spec for e in entries if (spec := _model_spec(parser, args, cfg, e, several)) is not None]
        _check_several(args, specs, several)
        if args.headless:
            from dashchat.distributed.headless import run_headless

            return run_headless(specs[0].engine_args)
        pool = ModelPool(specs, max_loaded=args.max_loaded_models,
                         max_memory_bytes=int(args.max_memory_gb * 2**30), allow_client_unload=args.allow_client_unload)
        if not several:  # one model: loaded before serving, as a server of one model always was
            pool.load_now(specs[0].names[0])
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, not a traceback wall (unless --log-level debug)
        if debug:
            log.exception("start-up failed")
        print(f"dashchat: error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1
    cfg.served_model_names = pool.names
    app = build_app(pool, cfg)
    try:
        return _serve(app, server_state(app), args)
    finally:
        pool.shutdown()


def _model_entries(args: argparse.Namespace) -> tuple[list[Any], bool]:
    """The models to serve, and whether they are several (served from a pool, loaded on first use)."""
    from dashchat.models.catalog import ModelEntry, read_models_file, scan_models_dir

    entries = [ModelEntry(p) for p in args.model_path or []]
    if args.models_config:
        entries += read_models_file(args.models_config)
    if args.models_dir:
        entries += [ModelEntry(e.path, e.names, from_dir=True) for e in scan_models_dir(args.models_dir)]
    several = bool(args.models_dir or args.models_config or len(entries) > 1)
    if several and args.served_model_name:
        raise _ArgError("--served-model-name names the one model; with several, name them in --models-config "
                        "(served_model_name); each is otherwise served as its folder's or file's name")
    return entries or [ModelEntry(None)], several


# The flags a models file may set per model (`args`): how a model is read, run and templated.
_PER_MODEL = ("task", "chat_template", "reasoning_parser", "default_chat_template_kwargs", "engine", "device", "device_list",
              "dtype", "quantization", "compile", "enforce_eager", "speculative_config", "max_model_len",
              "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "max_queue", "threads", "seed",
              "tensor_parallel_size")


def _model_args(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: dict[str, Any],
                where: str) -> argparse.Namespace:
    """The server's flags with one model's `args` from the models file over them, checked as the
    command line checks them."""
    import copy

    actions = {a.dest: a for a in parser._actions if a.dest in _PER_MODEL}
    ns = copy.copy(args)
    argv: list[str] = []
    for key, value in overrides.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise _ArgError(f"{where}: {key!r} is not a per-model setting; those are: {', '.join(_PER_MODEL)}")
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise _ArgError(f"{where}: {key} is true or false")
            setattr(ns, action.dest, value if action.const is True else not value)
            continue
        values = value if isinstance(value, list) else [value]
        argv += [action.option_strings[0], *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]

    def error(message: str) -> None:
        raise _ArgError(f"{where}: {message}")

    sub = build_parser()
    sub.error = error  # type: ignore[method-assign]
    sub.parse_args(argv, namespace=ns)
    return ns


def _model_spec(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: Any, entry: Any,
                several: bool) -> Any:
    """One model's ModelSpec: resolved (downloaded, GGUF converted), its engine arguments and settings
    checked, its memory estimated; the engine is built when the pool loads it. None: a models-folder
    entry that cannot be served (logged)."""
    import dataclasses
    import functools

    from dashchat.models.pooling import serving
    from dashchat.models.resolve import ModelResolveError, resolve_model
    from dashchat.server.model_pool import FOREVER, ModelSpec
    from dashchat.server.model_specs import ModelOutline, outline

    where = f"model {entry.path}" if several else "model"
    margs = _model_args(parser, args, entry.args, where) if entry.args else args
    try:
        margs.device_ids = _device_ids(margs.device_list)
    except argparse.ArgumentTypeError as exc:
        raise _ArgError(f"{where}: --device-list: {exc}") from None
    try:
        resolved = resolve_model(entry.path, use_modelscope=args.use_modelscope)
    except ModelResolveError as exc:
        if entry.from_dir:  # one unusable file in a models folder does not stop the others
            log.warning("skipping %s: %s", entry.path, exc)
            return None
        raise
    log.info("model: %s (%s)", resolved.name, resolved.path)
    serving(margs.task, resolved.path, None)  # a folder that cannot serve the task fails here, in one line
    names = entry.names or args.served_model_name or [resolved.name]
    eargs = _engine_args(margs, str(resolved.path))
    mcfg = dataclasses.replace(cfg, served_model_names=list(names), chat_template=_read_template(margs.chat_template),
                               reasoning_parser=_reasoning_parser(margs.reasoning_parser),
                               default_chat_template_kwargs=_template_kwargs(margs.default_chat_template_kwargs),
                               engine_name=margs.engine, task=margs.task)
    facts = outline(eargs) if several and margs.engine == "native" else ModelOutline(None, None, 0)
    keep_alive = next(k for k in (entry.keep_alive, args.keep_alive, 300.0 if several else FOREVER) if k is not None)
    memory = int(entry.memory_gb * 2**30) if entry.memory_gb is not None else facts.memory_bytes
    return ModelSpec(list(names), mcfg, functools.partial(_build_engine, margs, eargs), memory_bytes=memory,
                     keep_alive=keep_alive, max_model_len=facts.max_model_len, architecture=facts.architecture,
                     path=str(resolved.path), engine_args=eargs)


def _check_several(args: argparse.Namespace, specs: list[Any], several: bool) -> None:
    if not specs:
        raise _ArgError(f"--models-dir {args.models_dir}: none of its models can be served (see the warnings)")
    if not several:
        return
    if args.headless or args.nnodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise _ArgError("several models are served from one machine: tensor parallelism over several nodes "
                        "(--nnodes, --headless, torchrun) serves one model")
    ranked = [s.names[0] for s in specs if (s.engine_args.tensor_parallel_size or len(s.engine_args.device_ids)) > 1]
    if len(ranked) > 1 and args.master_port is not None:
        raise _ArgError(f"--master-port: the tensor-parallel models ({', '.join(ranked)}) each meet at their own "
                        "rendezvous port; leave --master-port out and each takes a free one")

if __name__ == "__main__":
    sys.exit(main())
