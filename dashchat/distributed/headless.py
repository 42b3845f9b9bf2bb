"""`--headless`: a node that holds tensor-parallel ranks and serves no HTTP.

It starts one worker process per local rank and waits. When node 0 stops it tells the ranks, they
exit 0, and so does this process; when node 0 dies, the ranks' collectives fail (or time out), and
they and this process exit 1, as when any rank fails. SIGTERM / SIGINT kill the node's ranks (which
ignore those signals themselves) and exit 0.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from ..engine.args import EngineArgs
from .launch import WorkerProcess, plan_world, start_workers, stop_workers

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
    signalled: list[int] = []  # a plain list: a handler that took a lock the main thread holds would hang
    signal.signal(signal.SIGTERM, lambda signum, _frame: signalled.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: signalled.append(signum))
    return watch_ranks(workers, lambda: bool(signalled))


def watch_ranks(workers: list[WorkerProcess], stop: Callable[[], bool], poll_s: float = 0.2) -> int:
    """Wait for this node's ranks; every one is polled each round, so a failure of any is seen at
    once. 0: they all exited 0 (node 0 told them to stop), or `stop()` turned true (this node was
    told to stop). 1: a rank failed. Ranks still running then are killed (they ignore SIGTERM, and
    without one of them the world cannot go on)."""
    code = 0
    while True:
        codes = [w.proc.poll() for w in workers]
        if stop():
            break
        failed = [w for w, rc in zip(workers, codes) if rc not in (None, 0)]
        if failed:
            for w in failed:
                log.error("rank %d failed: %s", w.place.rank, w.error_text())
            code = 1
            break
        if None not in codes:
            break
        time.sleep(poll_s)
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
    stop_workers(workers)
    return code
