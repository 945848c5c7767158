"""Process-group setup for torchrun (several processes) and plain `python` (one process).

Under torchrun the environment holds RANK, WORLD_SIZE and LOCAL_RANK; the group uses nccl on CUDA and
gloo on the CPU, and each process takes GPU `LOCAL_RANK` modulo the GPUs it sees (GPU 0 where a
launcher gives each process one of its own). Without those variables nothing is
initialised and every helper here is a no-op, so the same code runs in both settings.

The host-side exchanges (barrier, broadcast_object, on_main) run on a gloo group of their own with a
timeout of hours: while rank 0 downloads a checkpoint or scans a folder, or a slow rank finishes its
last batch, the others wait there, where NCCL's default timeout (10 minutes) would end the job.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import signal
import socket
import threading
import time
import zipfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sit_fast.errors import PeerFailed, UserError, first_line
from sit_fast.interrupts import stop_signals_noted, what_stopped

HOST_TIMEOUT = timedelta(hours=6)  # how long a host-side exchange waits for the slowest rank
_host_group = None
# Every process of the job, in rank order, as it joined: (node_id(), host name, local rank, process id); and
# this process's rank. Empty without a process group; kept once it is left, until the next init_distributed.
_joined: list[tuple[str, str, int, int]] = []
_rank = 0
PEER_SEEN_ENDED_S = 1.0  # how long gloo's word of a peer's end waits for a process of this node to be seen ended
HEARTBEAT_S = 5.0  # how often a process at work that the main process waits for says so (heartbeat)
PEER_SILENT_S = 300.0  # how long the main process waits for a heartbeat that has stopped before it takes its end
_HEARTBEAT, _DONE = "sit_fast/heartbeat/", "sit_fast/done/"  # + a rank: the keys of heartbeat in the group's store


@dataclass
class DistInfo:
    rank: int
    """Global rank of this process (0 without torchrun)."""
    world_size: int
    """Number of processes in the job (1 without torchrun)."""
    local_rank: int
    """Rank on this node (the global rank where LOCAL_RANK is not set)."""
    device: torch.device
    """Where this process computes: cuda:<local_rank modulo the GPUs this process sees> when CUDA is
    available, else cpu."""
    is_main: bool
    """rank == 0: the process that logs and writes files."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_distributed() -> DistInfo:
    """Join the torchrun process group if there is one; return who and where this process is."""
    global _joined, _rank
    _joined, _rank = [], 0  # an earlier group's, left (a second run in one process)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    use_cuda = torch.cuda.is_available()
    if rank is None or world_size is None:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)

    given_local_rank = local_rank is not None
    local_rank = rank if local_rank is None else local_rank
    if use_cuda:
        count = torch.cuda.device_count()
        # One GPU seen: a launcher that gives each process its own (CUDA_VISIBLE_DEVICES); several, and
        # a LOCAL_RANK past them: more processes on the node than GPUs, which NCCL refuses with a
        # traceback on every rank (two processes on one device). Without LOCAL_RANK, the global rank
        # modulo the GPUs seen stands in for it (nodes alike).
        if given_local_rank and count > 1 and local_rank >= count:
            raise UserError(f"LOCAL_RANK {local_rank} on a node whose processes see {count} GPUs: start at most "
                            f"{count} processes per node (torchrun --nproc_per_node={count})")
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if use_cuda else {}
        with interrupt_ends_at_once():  # the wait for the other processes (a launcher other than torchrun's)
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                    **kwargs)
    if host_group() is not None:  # made now, by every rank at the same point, as groups must be
        # who runs where: a process whose node's rank 0 was killed speaks in its place (stop_words, speaks_for)
        _joined, _rank = gather_object((node_id(), socket.gethostname(), local_rank, os.getpid())), rank
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


@contextlib.contextmanager
def interrupt_ends_at_once():
    """Ctrl-C's default action, the process's end, within the block (main thread only): the store's wait
    for the other processes runs in C++, where Python's handler would run only once they came, up to its
    timeout later, and then as a traceback. Started out ignoring SIGINT (`train.py &`), it goes on so."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    """Leave the process group (no-op without one). Who ran where (_joined) is kept, for the error said
    once the group is left, until the next init_distributed."""
    global _host_group
    if is_distributed():
        dist.destroy_process_group()
    _host_group = None


def barrier() -> None:
    """Wait for every rank, for up to HOST_TIMEOUT (no-op without a process group)."""
    if is_distributed():
        dist.barrier(group=host_group())


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (the object itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=host_group())
    return box[0]


def peer_ended(err: BaseException) -> bool:
    """Whether err is gloo's (or the store's) word that another process of the job has ended."""
    return isinstance(err, RuntimeError) and re.search(
        r"Connection (closed|reset) by peer|remote process exited|Failed to recv", str(err)) is not None


def peer_ended_words(err: BaseException) -> str:
    """The first sentence of gloo's error, without its source file and line ("[.../pair.cc:534] ") or
    the advice after it ("This is typically caused by a remote worker crashing. ...")."""
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line(err)).split(". ", 1)[0]


def peer_failed(err: BaseException, when: str = "",
                then: str = "its error is in the torchrun summary of its node") -> PeerFailed:
    """The one line for gloo's word (peer_ended) that another process ended: "rank 3 (on a) ended{when}
    (gloo's words); {then}", naming the processes of this node seen ended within PEER_SEEN_ENDED_S (one
    killed is gone a moment after gloo's word of it), else "another process of the job ended ...".
    A stop signal in that wait (torchrun ending this process too) ends the wait and is noted on the
    error (stop_noted), which cli_entry then takes as the signal it waits for: raised here, within the
    caller's `except` of gloo's error, it would escape as a stop in place of the line."""
    deadline = time.monotonic() + (PEER_SEEN_ENDED_S if _joined else 0.0)
    with stop_signals_noted() as noted:
        while not (ended := ended_here()) and not noted and time.monotonic() < deadline:
            time.sleep(0.05)
    who = _named(ended) if ended else "another process of the job"
    failed = PeerFailed(f"{who} ended{when} ({peer_ended_words(err)}); {then}")
    failed.stop_noted = bool(noted)
    return failed


def _process_ended(pid: int) -> bool:
    """Whether process `pid` has ended: gone, or a zombie its parent (torchrun) has not yet waited for."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X", "x")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc (not Linux): whether the process id is still taken
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def ended_here() -> list[int]:
    """The ranks of the other processes of this node that have ended (killed, or ended by an error of their
    own), in rank order; [] without a process group. Those of other nodes cannot be seen from here."""
    if not _joined:
        return []
    node = _joined[_rank][0]
    return [rank for rank, (where, _, _, pid) in enumerate(_joined)
            if where == node and rank != _rank and _process_ended(pid)]


def _named(ranks: list[int]) -> str:
    """"rank 0 (on a)", "ranks 0-1 (on a)": the ranks with their host names, as joined."""
    return _which([(rank, _joined[rank][1]) for rank in ranks])


def speaks_for(info: DistInfo | None = None, per_node: bool = False) -> list[int] | None:
    """Whether this process says what stopped the job on the console: [] where it is the one that does,
    rank 0 (per_node: its node's local rank 0, for what each node says of its own processes); the ranks
    that ended, that one first, where it speaks in its place, it having ended (killed, it says nothing)
    with every process of lower local rank on this node, so that the lowest one still running says it,
    once (a lower one may have ended its work normally: stop_words names the one spoken for); None
    where another process does, or may (rank 0 on another node, where its end cannot be seen from here), or
    did (one of those ended left word, mark_said), and where that cannot be known (not under torchrun).
    info: this process's (without it, RANK and LOCAL_RANK say who it is where no process group was joined)."""
    if not _joined:
        rank = info.rank if info is not None else int(os.environ.get("RANK") or 0)
        local_rank = info.local_rank if info is not None else int(os.environ.get("LOCAL_RANK") or rank)
        return [] if (local_rank if per_node else rank) == 0 else None
    node, _, local_rank, _ = _joined[_rank]
    if (_rank == 0 if not per_node else local_rank == 0):
        return []
    if not per_node and _joined[0][0] != node:
        return None
    lower = [rank for rank, (where, _, local, _) in enumerate(_joined) if where == node and local < local_rank]
    ended = ended_here()
    speaker = 0 if not per_node else next((rank for rank in lower if _joined[rank][2] == 0), None)
    if speaker not in ended or not set(lower) <= set(ended):
        return None
    folders = [_torchrun_folder(_joined[rank][2]) for rank in lower]
    # one of them said it itself before it ended (the speaker, or one that spoke in its place)
    if None in folders or any(os.path.exists(os.path.join(folder, SAID)) for folder in folders):
        return None
    return [speaker, *(rank for rank in lower if rank != speaker)]  # the one spoken for first


SAID = "said"  # the empty file a process leaves in its torchrun folder once it has said what stopped the job


def _torchrun_folder(local_rank: int) -> str | None:
    """The folder torchrun gave the process of `local_rank` on this node for its error file
    (LOG_DIR/RUN/attempt_N/LOCAL_RANK/error.json): where a process that says what stopped the job leaves
    word of it (mark_said). None without torchrun's error file, or where its folder is not named so."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file or not _joined:
        return None
    own = os.path.dirname(os.path.abspath(error_file))
    if os.path.basename(own) != str(_joined[_rank][2]):
        return None
    return os.path.join(os.path.dirname(own), str(local_rank))


def mark_said() -> None:
    """Leave word (SAID) that this process says what stopped the job: a process of its node that torchrun
    stops once this one has ended then leaves it at that, rather than speak in its place (speaks_for)."""
    folder = _torchrun_folder(_joined[_rank][2]) if _joined else None
    if folder is not None:
        with contextlib.suppress(OSError):
            open(os.path.join(folder, SAID), "w").close()


def stop_words(err: KeyboardInterrupt, info: DistInfo | None = None, per_node: bool = False) -> str | None:
    """What this process says of a Ctrl-C or stop signal that stopped it (what_stopped: "stopped by
    SIGTERM"), or None where another process says it (speaks_for). Where it speaks in place of processes
    that ended first, it names them: torchrun stops the others once one has ended ("rank 0 (on a) ended,
    and the others were stopped by SIGTERM")."""
    ended = speaks_for(info, per_node)
    if ended is None:
        return None
    mark_said()
    if not ended:
        return what_stopped(err)
    # the process spoken for alone: one of lower rank on the node may have ended its work normally (the
    # --likelihood ranks but the main one leave as soon as their batches are done)
    return f"{_named(ended[:1])} ended (its node's torchrun summary says how), and the others were {what_stopped(err)}"


def _store():
    """The default process group's store (torchrun's, at its rendezvous endpoint, or MASTER_ADDR's); None
    without a group."""
    return dist.distributed_c10d._get_default_store() if is_distributed() else None


@contextlib.contextmanager
def heartbeat(info: DistInfo):
    """Within the block, a process other than the main one says it is alive: a daemon thread adds 1 to its rank's count
    in the process group's store every HEARTBEAT_S, stopped and joined at the block's end (for at most HEARTBEAT_S).
    The block gets done(), which leaves a mark that the process finished its share: the main process, waiting for the
    others' results without a collective (a folder it polls), then takes its silence as no end (Liveness). A process
    killed on another node (SIGKILL, its node gone) leaves no other word there. A no-op on the main process and
    without a process group."""
    store = _store() if info.world_size > 1 and not info.is_main else None
    if store is None:
        yield lambda: None
        return
    stop = threading.Event()

    def beat():
        try:
            while True:
                store.add(f"{_HEARTBEAT}{info.rank}", 1)
                if stop.wait(HEARTBEAT_S):
                    return
        except RuntimeError:  # the store's host gone: a main process left hears of it from its store (Liveness)
            return

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()

    def done():
        with contextlib.suppress(RuntimeError):
            store.add(f"{_DONE}{info.rank}", 1)

    try:
        yield done
    finally:
        stop.set()
        thread.join(HEARTBEAT_S)  # a daemon: one held in the store's add (its host unreachable) is not waited for


class Liveness:
    """What the main process knows of the others' heartbeats, read at each look (ended) of a wait that
    runs no collective: a process whose count has not moved for PEER_SILENT_S, and that left no mark that it
    finished (heartbeat's done), is taken as ended; a store that cannot be reached (its host gone) ends the
    wait too. Without a process group, or on another process, nothing is read and none ends."""

    def __init__(self, info: DistInfo):
        self.store = _store() if info.world_size > 1 and info.is_main else None
        self.left = list(range(1, info.world_size)) if self.store is not None else []
        self.seen: dict[int, tuple[int, float]] = {}  # rank -> (its count, when that count was first read)

    def ended(self) -> str | None:
        """None while every other process works on or has finished; else what ended, as a PeerFailed
        begins: "rank 1 (on b) ended without a word (no heartbeat for 300 s: killed, or its node lost?)"."""
        now, silent = time.monotonic(), []
        try:
            for rank in list(self.left):
                count = self.store.add(f"{_HEARTBEAT}{rank}", 0)  # 0 added: read, made 0 where none is there
                if self.seen.get(rank, (None,))[0] != count:
                    self.seen[rank] = (count, now)
                elif self.store.add(f"{_DONE}{rank}", 0):
                    self.left.remove(rank)
                elif now - self.seen[rank][1] >= PEER_SILENT_S:
                    silent.append(rank)
        except RuntimeError as err:  # its host (torchrun's on the rendezvous endpoint's node) gone
            return f"the job's store (torchrun's, on the rendezvous endpoint's node) cannot be reached " \
                   f"({peer_ended_words(err)})"
        if not silent:
            return None
        who = _named(silent) if _joined else f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}"
        return f"{who} ended without a word (no heartbeat for {PEER_SILENT_S:g} s: killed, or its node lost?)"


def on_main(fn, info: DistInfo):
    """Run fn on rank 0 only and hand its result (or its UserError) to every rank. Another exception
    is raised on rank 0 as it is, and on the others as a PeerFailed saying rank 0 failed, so none
    waits for an answer that never comes."""
    if info.world_size == 1:
        return fn()
    result, error, failure = None, None, None
    if info.is_main:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 -- rank 0 re-raises it below, after telling the others
            failure = err
            error = f"rank 0 failed: {type(err).__name__}: {first_line(err)}"
    result, error, failed = broadcast_object((result, error, failure is not None))
    if failure is not None:
        raise failure
    if error is not None:
        raise PeerFailed(error) if failed else UserError(error)
    return result


def agree(fn, info: DistInfo):
    """fn() on every rank, then word of how it went from every rank to every rank: fn's result where
    it went well everywhere. A rank where fn raised raises that; the others raise a PeerFailed naming
    it (ranks grouped by host) with its error's first line. So a failure on some nodes only (their
    data or checkpoint unreadable, their GPU full) ends every rank with one line before a collective
    in which the others would wait for it (NCCL's, until its timeout). fn must run no collective: a
    rank that failed before it would wait in this one's gather, the others in fn's."""
    if info.world_size == 1:
        return fn()
    result, error, line = None, None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 -- raised below, after telling the others
        error = err
        line = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {first_line(err)}"
    outcomes = gather_object((info.rank, socket.gethostname(), line))
    if error is not None:
        raise error
    failed = [(rank, host) for rank, host, said in outcomes if said is not None]
    if failed:
        first = next(said for _, _, said in outcomes if said is not None)
        raise PeerFailed(f"{_which(failed)} failed: {' '.join(first.split())}")
    return result


def local_path_on_main_first(fn, info: DistInfo) -> str:
    """fn() -> a path on this machine (a release found or downloaded into a cache): rank 0 runs it
    first, so a folder the ranks share gets one download; on a node where rank 0's path does not exist
    (a node-local cache), the first process that lacks it runs fn next, and then the node's others (which
    find the file it fetched), so that each node downloads it once. Rank 0's UserError stops every rank,
    and so does another node's (agree)."""
    path = on_main(fn, info)
    if info.world_size == 1:
        return path
    node, lacks = node_id(), not info.is_main and not os.path.exists(path)
    seen = gather_object((info.rank, node, lacks))
    first = min((rank for rank, where, lacking in seen if lacking and where == node), default=None)
    fetched = agree(lambda: fn() if first == info.rank else None, info)  # one process per node that lacks it
    return agree(lambda: path if not lacks else fetched if fetched is not None else fn(), info)


SHARED_CHECK = ".shared-check-"  # + a token: the empty file check_shared_path makes, for a moment, in the folder


def gather_object(obj) -> list:
    """Every rank's obj, in rank order, on every rank ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj, group=host_group())
    return box


def _which(failing: list[tuple[int, str]]) -> str:
    """(rank, host) pairs -> "rank 3 (on a)" or "ranks 8-15 (on b), rank 17 (on c) and 40 more"."""
    by_host: dict[str, list[int]] = {}
    for rank, host in failing:
        by_host.setdefault(host, []).append(rank)
    parts = []
    for host, ranks in list(by_host.items())[:3]:
        runs, start = [], ranks[0]
        for previous, rank in zip(ranks, ranks[1:] + [None]):  # runs of consecutive ranks: 8-15
            if rank is None or rank != previous + 1:
                runs.append(str(start) if start == previous else f"{start}-{previous}")
                start = rank
        parts.append(f"{'ranks' if len(ranks) > 1 else 'rank'} {', '.join(runs)} (on {host})")
    left = sum(len(ranks) for ranks in list(by_host.values())[3:])
    return ", ".join(parts) + (f" and {left} more" if left else "")


# Filesystems a node keeps to itself: a file another node makes cannot show up on one of these, so
# there is nothing to wait for. Any other (nfs, lustre, gpfs, fuse.*, virtiofs, an unknown one) may
# show it late.
OWN_DISK_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "tmpfs", "ramfs",
                            "overlay", "vfat", "exfat", "ntfs", "ntfs3"})


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem that holds `path` ("ext4", "nfs4", ...), from the mount table: that of
    the longest mount point above it, the last mounted there. None where there is no mount table to
    read (not Linux)."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, kind = -1, None
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt/point rw,noatime master:1 - ext3 /dev/root rw": the mount point is field 5
        # (spaces in it written \040), the type is the first field after "-".
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        # >=: of two mounts on one point the later (listed after) is the one seen
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= best:
            best, kind = len(point), fields[fields.index("-", 6) + 1]
    return kind


def node_id() -> str:
    """Which node this process runs on: torchrun's node rank (GROUP_RANK) where it set one (containers
    on several nodes may share a host name), else the host name."""
    group = os.environ.get("GROUP_RANK")
    return f"node {group}" if group is not None else socket.gethostname()


def check_shared_path(folder: str, flag: str, info: DistInfo, wait_s: float = 30.0) -> None:
    """That every process sees `folder` as rank 0 does (see unshared_path): every process raises the
    same UserError if one does not."""
    problem = unshared_path(folder, flag, info, wait_s)
    if problem is not None:
        raise UserError(f"{problem}: pass one on a filesystem every node shares")


def unshared_path(folder: str, flag: str, info: DistInfo, wait_s: float = 30.0) -> str | None:
    """Whether every process sees `folder` as rank 0 does, not a folder of the same name on its node's
    own disk: None if so, else the same line on every process, naming the processes that did not see
    it and `flag`, the flag that picks the folder. Rank 0 makes a file of a name new to this call in
    it (removed when the check ends, whatever ends it), and every other process looks for it there: a
    folder an earlier job left on another node, the same files in it, has no such file. A process on
    another node waits up to wait_s seconds for it (a shared filesystem may show a new file late),
    unless its folder is on a filesystem of its node's own (OWN_DISK_TYPES), where it cannot show up.
    Called by every process together; all raise the same UserError when rank 0 cannot write there.
    Without other processes, None."""
    if info.world_size == 1:
        return None
    name = error = None
    if info.is_main:
        name = SHARED_CHECK + secrets.token_hex(8)
        try:
            open(os.path.join(folder, name), "x").close()
        except OSError as err:
            name, error = None, (f"{flag}: cannot write in {folder} ({err.strerror or err}): "
                                 "make room, or make it writable")
    try:
        # the folder as rank 0 names it, and rank 0's node
        name_seen, shown, main_node, error = broadcast_object((name, folder, node_id(), error))
        if error is not None:
            raise UserError(error)
        seen = True
        if not info.is_main:
            # On rank 0's node the file is there at once (one kernel's view of the folder).
            may_show_late = node_id() != main_node and filesystem_type(folder) not in OWN_DISK_TYPES
            deadline = time.monotonic() + (wait_s if may_show_late else 0.0)
            while not (seen := os.path.exists(os.path.join(folder, name_seen))) and time.monotonic() < deadline:
                time.sleep(0.5)
        blind = [(rank, host) for rank, host, ok in gather_object((info.rank, socket.gethostname(), seen)) if not ok]
    finally:
        if name is not None:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
    if not blind:
        return None
    return (f"{flag}: {_which(blind)} {'does' if len(blind) == 1 else 'do'} not see what rank 0 wrote in {shown} "
            f"(a folder of that name on each node's own disk?)")


SAMPLED_BLOCKS = 32  # of 64 KiB, spread over a file that is no zip archive, for its fingerprint


def file_fingerprint(path: str):
    """What a file holds, cheaply: a zip archive's (torch.save's format) entries with their CRC-32s,
    read from its index; else its size and a digest of SAMPLED_BLOCKS blocks spread over it (two
    .safetensors of one model at other steps differ in all of them); None if it cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return tuple((i.filename, i.CRC, i.file_size) for i in archive.infolist())
    except (OSError, zipfile.BadZipFile):
        try:
            size = os.path.getsize(path)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for k in range(SAMPLED_BLOCKS):
                    f.seek(size * k // SAMPLED_BLOCKS)
                    digest.update(f.read(1 << 16))
            return size, digest.hexdigest()
        except OSError:
            return None


def unlike_rank_0(value, info: DistInfo, shown=None) -> tuple[list[tuple[int, str, object]], object, object]:
    """(rank, host, value) of the processes whose `value` differs from rank 0's, rank 0's value and its
    `shown` (what a message names, not compared: its path as given, say): every process gets them all
    (one gather, by every process together)."""
    if info.world_size == 1:
        return [], value, shown
    values = gather_object((info.rank, socket.gethostname(), value, shown))
    return [(rank, host, v) for rank, host, v, _ in values[1:] if v != values[0][2]], values[0][2], values[0][3]


def check_same_file(path: str, flag: str, info: DistInfo) -> None:
    """That every process reads at `path` the file rank 0 does (file_fingerprint), not another of the
    same name on its node's own disk, or none. Called by every process together, as check_shared_path."""
    if info.world_size == 1:
        return
    other, _, main_path = unlike_rank_0(file_fingerprint(path), info, shown=path)
    if other:
        which, verb = _which([(rank, host) for rank, host, _ in other]), "reads" if len(other) == 1 else "read"
        raise UserError(f"{flag}: {which} {verb} another file at {main_path} than rank 0 does, or none (a folder "
                        f"on each node's own disk?): copy rank 0's there on every node, or pass one on a filesystem "
                        f"every node shares")
