"""Where ranks run and how they are started, watched and stopped: CPU core groups from a given
topology, the rendezvous address checks and socket, the headless node's watch over its ranks and a
worker's parent check (real processes), the STOP handshake (gloo ranks on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dashchat.distributed.headless import watch_ranks
from dashchat.distributed.launch import (
    WORKER_SPEC_ENV, RankPlace, WorkerProcess, group_by_core, open_rendezvous, plan_world,
)
from dashchat.engine.args import EngineArgs

# 4 cores with 2 threads each, numbered as Linux often does: cpu N and N + 4 are siblings.
SPLIT_SIBLINGS = {cpu: (0, cpu % 4) for cpu in range(8)}
# the same, with siblings adjacent: cpu 2k and 2k + 1
ADJACENT_SIBLINGS = {cpu: (0, cpu // 2) for cpu in range(8)}


def test_core_groups_keep_a_cores_siblings_together():
    # halving the logical ids would give rank 0 cpus 0-3 and rank 1 their siblings 4-7
    assert group_by_core(list(range(8)), SPLIT_SIBLINGS, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert group_by_core(list(range(8)), ADJACENT_SIBLINGS, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_by_core(list(range(8)), SPLIT_SIBLINGS, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_core_groups_of_two_packages_and_a_partial_affinity():
    # two sockets, core ids restart in each; this process may use 6 of the 8 cpus
    topology = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)}
    assert group_by_core([0, 1, 2, 3, 4, 6], topology, 2) == [[0, 1, 4], [2, 3, 6]]


def test_fewer_physical_cores_than_ranks_is_refused():
    with pytest.raises(ValueError, match="2 CPU ranks but only 1 physical cores"):
        group_by_core([0, 4], SPLIT_SIBLINGS, 2)


# -- the rendezvous address ---------------------------------------------------------------


def engine_args(**flags) -> EngineArgs:
    return EngineArgs(model_dir="/model", device_ids=(0,), **flags)


def test_a_wildcard_master_addr_of_several_nodes_needs_the_flag():
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="--allow-wildcard-master-addr"):
            plan_world(engine_args(nnodes=2, master_addr=wildcard, master_port=29500))
        world = plan_world(engine_args(nnodes=2, master_addr=wildcard, master_port=29500,
                                       allow_wildcard_master_addr=True))
        assert world.master_addr == wildcard
    # the other nodes name node 0's address; they listen for no rendezvous
    assert plan_world(engine_args(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)).size == 2


def test_one_node_meets_on_loopback_only():
    with pytest.raises(ValueError, match="on one node the ranks meet on loopback only"):
        plan_world(EngineArgs(model_dir="/model", device_ids=(0, 1), master_addr="0.0.0.0"))
    world = plan_world(EngineArgs(model_dir="/model", device_ids=(0, 1), master_addr="localhost"))
    assert world.on_one_node and world.master_port == 0  # the port is picked when the socket opens


def test_the_rendezvous_socket_is_bound_to_the_named_address_and_held():
    world = plan_world(EngineArgs(model_dir="/model", device_ids=(0, 1)))
    sock, bound = open_rendezvous(world)
    with sock:
        assert sock.getsockname() == ("127.0.0.1", bound.master_port) and bound.master_port > 0
        assert bound.master_addr == "127.0.0.1"
        with pytest.raises(ValueError, match=f"--master-port {bound.master_port} on 127.0.0.1 is not free"):
            open_rendezvous(bound)  # held from now until rank 0's store takes it over: nothing can race for it


# -- starting and watching worker processes -----------------------------------------------


def python_process(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_headless_node_sees_any_of_its_ranks_fail(tmp_path):
    """The ranks are polled each round, all of them: a later rank's failure is seen while an earlier
    one still runs, and the running one is killed (it ignores SIGTERM)."""
    error_file = tmp_path / "rank3.err"
    error_file.write_text("RuntimeError: the collective failed")
    sleeper = WorkerProcess(RankPlace(2, 0, 0), python_process("import time; time.sleep(120)"), tmp_path / "rank2.err")
    failing = WorkerProcess(RankPlace(3, 1, 1), python_process("raise SystemExit(1)"), error_file)
    assert watch_ranks([sleeper, failing], stop=lambda: False, poll_s=0.05) == 1
    assert sleeper.proc.returncode == -signal.SIGKILL and failing.proc.returncode == 1
    assert not error_file.exists()  # cleaned up


def test_a_headless_node_exits_0_when_its_ranks_were_told_to_stop(tmp_path):
    workers = [WorkerProcess(RankPlace(r, r, r), python_process("import time; time.sleep(0.3)"), tmp_path / f"{r}")
               for r in (1, 2)]
    assert watch_ranks(workers, stop=lambda: False, poll_s=0.05) == 0
    assert [w.proc.returncode for w in workers] == [0, 0]


def test_a_worker_whose_starter_is_gone_does_not_run():
    """PR_SET_PDEATHSIG only fires for a parent that dies after the request: a worker checks that
    its parent is still the process that started it."""
    spec = {"parent": os.getpid() + 10**6}  # not this worker's parent
    env = {**os.environ, WORKER_SPEC_ENV: json.dumps(spec)}
    done = subprocess.run([sys.executable, "-m", "dashchat.distributed.worker"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert f"the process that started it ({spec['parent']}) is gone" in done.stderr
