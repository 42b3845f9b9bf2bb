"""`--headless`: a node that holds tensor-parallel ranks and serves no HTTP.

It starts one worker process per local rank and waits. When node 0 exits, the ranks' collectives
fail (or time out), they exit, and so does this process: with code 0 when they were told to stop,
else 1. SIGTERM / SIGINT stop the node's ranks too.
"""

from __future__ import annotations

import logging
import signal
import time

from ..engine.args import EngineArgs
from .launch import plan_world, start_workers, stop_workers

log = logging.getLogger("dashchat.headless")


def run_headless(args: EngineArgs) -> int:
    world = plan_world(args)
    if world.size == 1:
        raise ValueError("--headless holds ranks of a tensor-parallel world, but this one has a single rank")
    if world.node_rank == 0:
        raise ValueError("node 0 holds rank 0 and serves HTTP: start it without --headless")
    places = world.local_ranks(args.device_ids)
    if world.external:  # torchrun started this process as exactly one rank
        from .worker import run_rank

        run_rank(args, world, places[0])
        return 0
    workers = start_workers(args, world, places)
    log.info("node %d: ranks %s started; waiting for node 0 at %s:%d", world.node_rank,
             [p.rank for p in places], world.master_addr, world.master_port)
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            w.proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while any(w.proc.poll() is None for w in workers):
        failed = [w for w in workers if w.proc.returncode not in (None, 0)]
        if failed and not stopping:
            log.error("rank %d failed: %s", failed[0].place.rank, failed[0].error_text())
            code = 1
            stop(None, None)
        time.sleep(0.2)
    if any(w.proc.returncode != 0 for w in workers) and not stopping:
        code = 1
    stop_workers(workers)
    return code
