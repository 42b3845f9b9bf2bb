"""A tensor-parallel rank other than 0: load this rank's shard, then run every step rank 0 sends.

Started by the engine on node 0 and by `--headless` on the other nodes, one process per rank,
with its spec (engine arguments, world, place, the starting process) in $DASHCHAT_WORKER_SPEC. A
failure is written to the spec's error file, which rank 0 reads to say why the rank is gone, and
ends the process with exit code 1. It ignores SIGTERM and SIGINT: it stops when rank 0 says so, or
dies with the process that started it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback

from ..engine.args import EngineArgs
from .launch import WORKER_SPEC_ENV, RankPlace, World, core_groups, die_with_parent, prepare_rank_device

log = logging.getLogger("dashchat.worker")


def run_rank(args: EngineArgs, world: World, place: RankPlace) -> None:
    from ..engine.native.llm_engine import default_max_model_len
    from ..engine.native.model_runner import build_runner
    from ..models.config import ModelConfig
    from ..tokenizer import Tokenizer
    from .group import ParallelGroup

    cfg = ModelConfig.from_dir(args.model_dir)
    tokenizer = Tokenizer.from_dir(args.model_dir)  # int8 calibration encodes its text on every rank
    device = prepare_rank_device(args.device, place, core_groups(args.device_ids), args.num_threads)
    group = ParallelGroup(place.rank, world.size, device, world.master_addr, world.master_port,
                          args.distributed_load_timeout_s, from_env=world.external, loopback=world.on_one_node)
    try:
        runner, _, _ = build_runner(args, cfg, tokenizer, device, default_max_model_len(args, cfg), group)
        group.start_serving(args.distributed_timeout_s)
        log.info("rank %d of %d ready on %s", place.rank, world.size, device)
        runner.serve_steps()
    finally:
        group.destroy()


def main() -> int:
    # Rank 0 says when to stop (after draining its requests) or dies, and then so does this rank: a
    # SIGTERM or SIGINT sent to every process (a service manager's stop, Ctrl-C) must not end it first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = json.loads(os.environ[WORKER_SPEC_ENV])
    if not die_with_parent(spec["parent"]):
        print(f"dashchat worker: the process that started it ({spec['parent']}) is gone", file=sys.stderr)
        return 1
    raw = spec["args"]
    raw["device_ids"] = tuple(raw["device_ids"])
    args, world, place = EngineArgs(**raw), World(**spec["world"]), RankPlace(**spec["place"])
    logging.basicConfig(level=os.environ.get("DASHCHAT_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s rank{place.rank} %(name)s: %(message)s")
    try:
        run_rank(args, world, place)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0 through the error file, then exit 1
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.error("rank %d failed: %s\n%s", place.rank, text, traceback.format_exc())
        try:
            with open(spec["error_file"], "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
