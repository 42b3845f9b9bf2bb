"""The tensor-parallel process group (torch.distributed: gloo on CPU, NCCL on CUDA) and the
collectives the model and the engine use.

Two groups with different timeouts: loading (and compiling) may take minutes on one rank while
the others wait in their first collective, but once serving, a collective that does not finish
within `step_timeout_s` means a rank is gone, and must end in an error, not a hang.

Under torch.compile the collectives run as custom ops (opaque to dynamo, so a compiled decode
step has no graph break and no traced process-group object).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time

import torch
import torch.distributed as dist

from ..models.parallel import TensorParallel

log = logging.getLogger(__name__)

# The one group of this process (a process is one rank); the custom ops below look it up.
_ACTIVE: ParallelGroup | None = None


class ParallelGroup:
    def __init__(
        self, rank: int, size: int, device: torch.device, master_addr: str, master_port: int,
        load_timeout_s: float = 1800.0, from_env: bool = False, listen_socket: socket.socket | None = None,
        loopback: bool = False,
    ) -> None:
        """from_env: torchrun started the ranks; its agent already serves the rendezvous store.
        listen_socket: rank 0's bound, listening socket for the store (launch.open_rendezvous); None
        lets the store open its own, on every interface (tests that start ranks themselves).
        loopback: every rank is on this machine, so the backend's own connections stay on `lo` too."""
        global _ACTIVE
        self.rank, self.size, self.device = rank, size, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=load_timeout_s)
        if loopback:
            # gloo and NCCL otherwise listen on the address the host name resolves to
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
        if from_env:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size, timeout=timeout, **kwargs)
        else:
            store = _rendezvous(rank, size, master_addr, master_port, listen_socket, load_timeout_s)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout, **kwargs)
        self.group = dist.group.WORLD
        self.collective_seconds = 0.0  # host time spent in collectives (on CUDA: launch and waits)
        _ACTIVE = self

    def start_serving(self, step_timeout_s: float) -> None:
        """All ranks have loaded: from now on a collective that hangs for step_timeout_s fails."""
        self.group = dist.new_group(list(range(self.size)), timeout=datetime.timedelta(seconds=step_timeout_s))

    def tensor_parallel(self) -> TensorParallel:
        return TensorParallel(self.rank, self.size, self.all_reduce, self.gather_vocab)

    # -- collectives ---------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place, eagerly)."""
        if torch.compiler.is_compiling():
            return torch.ops.dashchat.tp_all_reduce(x)
        start = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.collective_seconds += time.perf_counter() - start
        return x

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor:
        """[N, V/size] on every rank -> [N, V] (the ranks' slices side by side)."""
        if torch.compiler.is_compiling():
            return torch.ops.dashchat.tp_gather_vocab(x)
        start = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        self.collective_seconds += time.perf_counter() - start
        return torch.cat(parts, dim=1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into `x` on every rank."""
        start = time.perf_counter()
        dist.broadcast(x, src=0, group=self.group)
        self.collective_seconds += time.perf_counter() - start
        return x

    def acknowledge_stop(self) -> None:
        """Every rank, after rank 0's STOP: one last all-reduce. Rank 0 tears the group down only once it
        completes, i.e. once every rank has its STOP: closing the connections while a rank was still
        reading it could fail that read, and the rank (and a headless node) then exited 1. On CUDA the
        collectives only enqueue work: reading the sum waits for it."""
        try:
            done = torch.ones(1, device=self.device)
            dist.all_reduce(done, group=self.group)
            done.item()
        except (RuntimeError, dist.DistError):
            if self.rank == 0:
                raise
            log.debug("rank %d: the stop acknowledgment failed after the stop arrived", self.rank, exc_info=True)

    def destroy(self) -> None:
        global _ACTIVE
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tear down cleanly
            log.debug("process group teardown failed", exc_info=True)
        _ACTIVE = None


def _rendezvous(rank: int, size: int, host: str, port: int, listen_socket: socket.socket | None,
                timeout_s: float) -> dist.TCPStore:
    """The store the ranks meet through: rank 0 serves it (on its bound socket), the others connect
    and say they are in. Rank 0 waits for all of them and names the ones that never came."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        fd = listen_socket.detach() if listen_socket is not None else None
        store = dist.TCPStore(host, port, size, True, timeout, wait_for_workers=False, master_listen_fd=fd)
        _wait_for_ranks(store, size, f"{host}:{port}", timeout_s)
        return store
    try:
        store = dist.TCPStore(host, port, size, False, timeout)
    except dist.DistStoreError as exc:
        raise RuntimeError(f"rank {rank} could not reach node 0's rendezvous at {host}:{port} within {timeout_s:g} s "
                           f"(--distributed-load-timeout); is node 0 started, and is that its address?") from exc
    store.set(f"{_JOINED}{rank}", "1")
    return store


_JOINED = "dashchat/joined/"


def _wait_for_ranks(store: dist.TCPStore, size: int, where: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    missing = list(range(1, size))
    while missing:
        missing = [r for r in missing if not store.check([f"{_JOINED}{r}"])]
        if not missing:
            return
        if time.monotonic() >= deadline:
            ranks = ", ".join(map(str, missing))
            raise RuntimeError(
                f"tensor-parallel rank{'s' if len(missing) > 1 else ''} {ranks} did not join the rendezvous at "
                f"{where} within {timeout_s:g} s (--distributed-load-timeout): is every other node started "
                f"(--headless, the same --nnodes, --master-addr and --master-port, its own --node-rank) and can it "
                f"reach that address?"
            )
        time.sleep(0.1)


@torch.library.custom_op("dashchat::tp_all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    _ACTIVE.all_reduce(y)
    return y


@_all_reduce_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("dashchat::tp_gather_vocab", mutates_args=())
def _gather_vocab_op(x: torch.Tensor) -> torch.Tensor:
    return _ACTIVE.gather_vocab(x)


@_gather_vocab_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] * _ACTIVE.size)
