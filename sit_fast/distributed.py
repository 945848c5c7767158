"""Process-group setup for torchrun (several processes) and plain `python` (one process).

Under torchrun the environment holds RANK, WORLD_SIZE and LOCAL_RANK; the group uses nccl on CUDA and
gloo on the CPU, and each process takes GPU `LOCAL_RANK`. Without those variables nothing is
initialised and every helper here is a no-op, so the same code runs in both settings.

The host-side exchanges (barrier, broadcast_object, on_main) run on a gloo group of their own with a
timeout of hours: while rank 0 downloads a checkpoint or scans a folder, or a slow rank finishes its
last batch, the others wait there, where NCCL's default timeout (10 minutes) would end the job.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
import zipfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sit_fast.errors import UserError

HOST_TIMEOUT = timedelta(hours=6)  # how long a host-side exchange waits for the slowest rank
_host_group = None


@dataclass
class DistInfo:
    rank: int
    """Global rank of this process (0 without torchrun)."""
    world_size: int
    """Number of processes in the job (1 without torchrun)."""
    local_rank: int
    """Rank on this node; the CUDA device index on a GPU machine."""
    device: torch.device
    """Where this process computes: cuda:<local_rank> when CUDA is available, else cpu."""
    is_main: bool
    """rank == 0: the process that logs and writes files."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_distributed() -> DistInfo:
    """Join the torchrun process group if there is one; return who and where this process is."""
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    use_cuda = torch.cuda.is_available()
    if rank is None or world_size is None:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)

    local_rank = rank if local_rank is None else local_rank
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    host_group()  # made now, by every rank at the same point, as groups must be
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def host_group():
    """The gloo group of the host-side exchanges, timing out after HOST_TIMEOUT (None without a
    process group)."""
    global _host_group
    if _host_group is None and is_distributed():
        _host_group = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
    return _host_group


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    global _host_group
    if is_distributed():
        dist.destroy_process_group()
    _host_group = None


def barrier() -> None:
    """Wait for every rank, for up to HOST_TIMEOUT (no-op without a process group)."""
    if is_distributed():
        dist.barrier(group=host_group())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over ranks in place and return it (unchanged without a process group)."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (the object itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=host_group())
    return box[0]


def on_main(fn, info: DistInfo):
    """Run fn on rank 0 only and hand its result (or its UserError) to every rank."""
    if info.world_size == 1:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result


def local_path_on_main_first(fn, info: DistInfo) -> str:
    """fn() -> a path on this machine (a release found or downloaded into a cache): rank 0 runs it
    first, so a folder the ranks share gets one download; a rank on another node, where rank 0's path
    does not exist (a node-local cache), then runs fn itself. Rank 0's UserError stops every rank."""
    path = on_main(fn, info)
    if info.is_main or os.path.exists(path):
        return path
    return fn()


SHARED_CHECK = ".shared-check"  # the file check_shared_path writes, for a moment, in the folder it checks


def gather_object(obj) -> list:
    """Every rank's obj, in rank order, on every rank ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj, group=host_group())
    return box


def _where(info: DistInfo) -> str:
    return f"rank {info.rank} (on {socket.gethostname()})"


def check_shared_path(folder: str, flag: str, info: DistInfo, wait_s: float = 30.0) -> None:
    """That every process sees `folder` as rank 0 does, not a folder of the same name on its node's
    own disk. Rank 0 writes a token new to this call into it, and every other process waits up to
    wait_s seconds (a shared filesystem may show a new file late) to read that token there: a folder
    an earlier job left on another node, the same files in it, holds none or another. Called by every
    process together; all raise the same UserError, naming the processes that did not see it and
    `flag`, the flag that picks the folder. Without other processes, a no-op."""
    if info.world_size == 1:
        return
    path = os.path.join(folder, SHARED_CHECK)
    token = None
    if info.is_main:
        token = secrets.token_hex(16)
        with open(path, "w") as f:
            f.write(token)
    token, shown = broadcast_object((token, folder))  # the folder's name as rank 0 has it, for the message
    seen = True
    if not info.is_main:
        deadline = time.monotonic() + wait_s
        while not (seen := _read_text(path) == token) and time.monotonic() < deadline:
            time.sleep(0.5)
    blind = [where for where, ok in gather_object((_where(info), seen)) if not ok]
    if info.is_main:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if blind:
        raise UserError(f"{flag}: {', '.join(blind)} does not see what rank 0 wrote in {shown} (a folder "
                        f"of that name on each node's own disk?): pass one on a filesystem every node shares")


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def file_fingerprint(path: str):
    """What a file holds, cheaply: a zip archive's (torch.save's format) entries with their CRC-32s,
    read from its index; else its size; None if it cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return tuple((i.filename, i.CRC, i.file_size) for i in archive.infolist())
    except (OSError, zipfile.BadZipFile):
        try:
            return os.path.getsize(path)
        except OSError:
            return None


def check_same_file(path: str, flag: str, info: DistInfo) -> None:
    """That every process reads at `path` the file rank 0 does (file_fingerprint), not another of the
    same name on its node's own disk, or none. Called by every process together, as check_shared_path."""
    if info.world_size == 1:
        return
    prints = gather_object((_where(info), path, file_fingerprint(path)))
    other = [where for where, _, fingerprint in prints[1:] if fingerprint != prints[0][2]]
    if other:
        raise UserError(f"{flag}: {', '.join(other)} reads another file at {prints[0][1]} than rank 0 does, or none "
                        f"(a folder on each node's own disk?): pass one on a filesystem every node shares")
