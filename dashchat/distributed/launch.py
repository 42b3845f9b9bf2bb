"""Where the ranks of a tensor-parallel world run, and starting the ones this process owns.

One process per rank. On node 0 the server's engine is rank 0 (its step thread), and the other
ranks of that node are worker processes it starts (`python -m dashchat.distributed.worker`). On
every other node `--headless` starts that node's ranks and serves no HTTP. Under `torchrun` each
process is already exactly one rank (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so
nothing is started here.

On CPU a device id names a group of cores (a NUMA node where there are several, else an equal
share of the cores this process may use): each rank pins itself there and runs that many threads,
so ranks never fight over cores.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..engine.args import EngineArgs

WORKER_SPEC_ENV = "DASHCHAT_WORKER_SPEC"


@dataclass(frozen=True)
class RankPlace:
    rank: int
    local_index: int  # index into this node's --device-list
    device_id: int


@dataclass(frozen=True)
class World:
    size: int
    nnodes: int
    node_rank: int
    ranks_per_node: int
    master_addr: str
    master_port: int
    external: bool  # ranks started by torchrun: this process is exactly one rank
    first_local_index: int = 0  # under torchrun: LOCAL_RANK, this process's index into --device-list

    @property
    def on_one_node(self) -> bool:
        """Every rank on this machine, started by dashchat (torchrun's own rendezvous is its business)."""
        return self.nnodes == 1 and not self.external

    def local_ranks(self, device_ids: tuple[int, ...]) -> list[RankPlace]:
        """The ranks this node (under torchrun: this process) holds, rank order."""
        first = self.node_rank * self.ranks_per_node
        local = [self.first_local_index + i for i in range(self.ranks_per_node)]
        return [RankPlace(first + i, li, device_ids[li]) for i, li in enumerate(local)]


def tensor_parallel_size(args: EngineArgs) -> int:
    """--tensor-parallel-size, default: nodes x this node's device list (or WORLD_SIZE under torchrun)."""
    if args.tensor_parallel_size:
        return args.tensor_parallel_size
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return args.nnodes * len(args.device_ids)


def plan_world(args: EngineArgs) -> World:
    """Check the flags against each other and say which ranks live on this node."""
    size = tensor_parallel_size(args)
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and size > 1:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if world != size:
            raise ValueError(f"--tensor-parallel-size {size} but torchrun's WORLD_SIZE is {world}")
        local_rank = int(env.get("LOCAL_RANK", "0"))
        if local_rank >= len(args.device_ids):
            raise ValueError(f"LOCAL_RANK {local_rank} but --device-list names {len(args.device_ids)} device(s)")
        # Each process is one "node" of one rank here: rank r is node r of WORLD_SIZE.
        return World(size, world, rank, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                     int(env.get("MASTER_PORT", "29500")), external=True, first_local_index=local_rank)
    if size % args.nnodes:
        raise ValueError(f"--tensor-parallel-size {size} does not divide over --nnodes {args.nnodes}")
    per_node = size // args.nnodes
    if per_node > len(args.device_ids):
        raise ValueError(
            f"--tensor-parallel-size {size} over {args.nnodes} node(s) needs {per_node} devices per node, but "
            f"--device-list names {len(args.device_ids)} ({' '.join(map(str, args.device_ids))})"
        )
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    if args.nnodes > 1 and not args.master_port:
        raise ValueError("several nodes need --master-addr and --master-port (node 0's address and a free port)")
    if args.nnodes == 1 and size > 1 and not is_loopback(args.master_addr):
        raise ValueError(f"--master-addr {args.master_addr}: on one node the ranks meet on loopback only "
                         f"(127.0.0.1, the default); a network address is for several nodes (--nnodes)")
    if args.nnodes > 1 and args.node_rank == 0 and is_wildcard(args.master_addr) \
            and not args.allow_wildcard_master_addr:
        raise ValueError(f"--master-addr {args.master_addr} would let every network this machine is on reach the "
                         f"rendezvous port, where anyone can pose as a rank: name node 0's address on the network "
                         f"the nodes share (or pass --allow-wildcard-master-addr)")
    # port 0 on one node: open_rendezvous picks a free one and keeps it open (no window to lose it)
    return World(size, args.nnodes, args.node_rank, per_node, args.master_addr, args.master_port or 0,
                 external=False)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(socket.getaddrinfo(host or "0.0.0.0", None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, ValueError, IndexError):
        return None


def is_loopback(host: str) -> bool:
    address = _address(host)
    return address is not None and address.is_loopback


def is_wildcard(host: str) -> bool:
    """0.0.0.0, ::, or an empty host: every interface."""
    address = _address(host)
    return host == "" or (address is not None and address.is_unspecified)


def open_rendezvous(world: World) -> tuple[socket.socket, World]:
    """Node 0: the listening socket of the rendezvous store, bound to --master-addr only (torch's
    TCPStore, left to itself, listens on every interface whatever host it is given). Rank 0 hands it
    to the store; it is open before any worker starts, so the port cannot be taken in between.
    Returns the socket and the world with the address and port it is bound to."""
    family, _, _, _, address = socket.getaddrinfo(world.master_addr or "0.0.0.0", world.master_port,
                                                  type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ValueError(f"--master-port {world.master_port} on {world.master_addr} is not free ({exc.strerror}); "
                         f"choose another") from exc
    host, port = sock.getsockname()[:2]
    return sock, replace(world, master_addr=host, master_port=int(port))


def free_port(host: str) -> int:
    """A port free now (tests that start ranks themselves; the server keeps its socket instead)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- CPU cores ---------------------------------------------------------------------------


def _parse_cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def numa_nodes() -> list[set[int]]:
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"), key=lambda p: int(p.name[4:]))
    out = []
    for node in nodes:
        try:
            out.append(_parse_cpulist((node / "cpulist").read_text()))
        except OSError:
            continue
    return out


def cpu_topology(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """Logical CPU -> (package, core): the physical core it runs on. A CPU whose topology cannot be
    read counts as a core of its own."""
    root = Path("/sys/devices/system/cpu")
    out = {}
    for cpu in cpus:
        try:
            topo = root / f"cpu{cpu}" / "topology"
            out[cpu] = (int((topo / "physical_package_id").read_text()), int((topo / "core_id").read_text()))
        except (OSError, ValueError):
            out[cpu] = (-1, cpu)
    return out


def group_by_core(allowed: list[int], topology: dict[int, tuple[int, int]], num_groups: int) -> list[list[int]]:
    """Split the allowed CPUs into `num_groups` groups of whole physical cores (a core's SMT siblings
    always land in the same group). Linux often numbers all cores' first threads before their second
    ones (cpu N and N + cores are siblings), so halving the logical ids would give one rank the other's
    siblings: two ranks on the same cores, each at half speed."""
    cores: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(allowed):
        cores.setdefault(topology.get(cpu, (-1, cpu)), []).append(cpu)
    ordered = sorted(cores.values(), key=lambda siblings: (topology.get(siblings[0], (-1, 0))[0], siblings[0]))
    share = len(ordered) // num_groups
    if share == 0:
        raise ValueError(f"{num_groups} CPU ranks but only {len(ordered)} physical cores to share between them")
    return [sorted(c for siblings in ordered[g * share : (g + 1) * share] for c in siblings)
            for g in range(num_groups)]


def cpu_core_group(device_id: int, num_groups: int) -> list[int]:
    """The cores a CPU rank with this device id runs on: a NUMA node where there are enough, else an
    equal share of the physical cores this process may use (with their SMT siblings)."""
    allowed = sorted(os.sched_getaffinity(0))
    nodes = [sorted(n & set(allowed)) for n in numa_nodes()]
    nodes = [n for n in nodes if n]
    if len(nodes) >= max(num_groups, device_id + 1) and len(nodes) > 1:
        return nodes[device_id]
    if device_id >= num_groups:
        raise ValueError(f"CPU device id {device_id}: there are {num_groups} core groups (ids 0..{num_groups - 1})")
    return group_by_core(allowed, cpu_topology(allowed), num_groups)[device_id]


def pin_to_cores(cores: list[int]) -> None:
    """Pin the calling thread (and the OpenMP threads it starts later) to these cores."""
    os.sched_setaffinity(0, cores)


def die_with_parent(parent: int) -> bool:
    """Linux: the kernel kills this process when the process that started it (pid `parent`) dies: no
    orphans. False when that process is already gone: it died before the request was made, so the
    kernel will not send the signal, and this process must end by itself."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent


# -- worker processes --------------------------------------------------------------------


@dataclass
class WorkerProcess:
    place: RankPlace
    proc: subprocess.Popen
    error_file: Path

    def error_text(self) -> str:
        try:
            text = self.error_file.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return text or f"exited with code {self.proc.returncode}"


def start_workers(args: EngineArgs, world: World, places: list[RankPlace]) -> list[WorkerProcess]:
    """Start one worker process per rank in `places`; they inherit stdout/stderr (one log)."""
    workers = []
    for place in places:
        fd, error_file = tempfile.mkstemp(prefix=f"dashchat-rank{place.rank}-", suffix=".err")
        os.close(fd)
        spec = {"args": asdict(args), "world": asdict(world), "place": asdict(place), "error_file": error_file,
                "parent": os.getpid()}
        env = {**os.environ, WORKER_SPEC_ENV: json.dumps(spec)}
        # torchrun's variables would make the worker think it is another rank.
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(name, None)
        # Its own session: Ctrl-C at a terminal or a signal to the server's process group reaches the
        # server alone, which drains its requests and then tells the ranks to stop.
        proc = subprocess.Popen([sys.executable, "-m", "dashchat.distributed.worker"], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        workers.append(WorkerProcess(place, proc, Path(error_file)))
    return workers


def stop_workers(workers: list[WorkerProcess], timeout: float = 10.0) -> None:
    """Wait for workers that were told to stop; kill what is left; remove their error files."""
    for w in workers:
        try:
            w.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        w.error_file.unlink(missing_ok=True)


def core_groups(device_ids: tuple[int, ...]) -> int:
    return max(len(device_ids), max(device_ids) + 1)


def prepare_rank_device(device_type: str, place: RankPlace, num_groups: int, num_threads: int | None):
    """Select this rank's device; on CPU pin the calling thread to its cores and size its thread team.
    Called on the thread that will run the rank's tensor code, before any of it runs."""
    import torch

    from ..engine.cpu.threads import physical_cores

    if device_type == "cuda":
        device = torch.device("cuda", place.device_id)
        torch.cuda.set_device(device)
        return device
    cores = cpu_core_group(place.device_id, num_groups)
    pin_to_cores(cores)
    torch.set_num_threads(num_threads or physical_cores())
    return torch.device("cpu")
