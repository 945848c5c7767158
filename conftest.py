"""Test-wide setup, loaded before any test module imports triton.

Without CUDA, Triton kernels run through the Triton interpreter, which must be switched on
before triton is first imported. Set TRITON_INTERPRET=0 explicitly to opt out.
"""
import os
import signal

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _processes_side_by_side() -> int:
    """How many test processes share the machine: pytest-xdist's workers (`make test`), or the
    shards of SIT_FAST_TEST_SHARD=I/N."""
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
        return max(1, int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    count = os.environ.get("SIT_FAST_TEST_SHARD", "").partition("/")[2]
    return max(1, int(count)) if count.isdigit() else 1


# Each process's share of the cores for torch's CPU threads, and for the processes its tests start
# (they inherit OMP_NUM_THREADS): with every process taking all the cores, OpenMP's waiting threads
# spin on cores the others need (on 2 cores, two workers ran some training tests 10 times slower).
if "OMP_NUM_THREADS" not in os.environ and _processes_side_by_side() > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // _processes_side_by_side()))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The stop-signal tests start from the usual dispositions, which their processes inherit. A suite
# started under nohup, or in the background of a non-interactive shell, would ignore SIGHUP or
# SIGINT, and the runs it starts (rightly) keep ignoring them.
for _name in ("SIGHUP", "SIGINT", "SIGTERM", "SIGUSR1"):
    _signum = getattr(signal, _name, None)
    if _signum is not None and signal.getsignal(_signum) == signal.SIG_IGN:
        signal.signal(_signum, signal.default_int_handler if _name == "SIGINT" else signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Every test starts from a seed of its own, from the OS, on every device: CUDA's default
    generator starts from a fixed seed in each process (the CPU's from a random one), and a test
    that seeds the global generators for itself would leave the tests after it the same numbers
    every run. The seed is printed, so a failure's report shows it."""
    seed = int.from_bytes(os.urandom(6), "little")
    torch.manual_seed(seed)  # CPU and every CUDA device
    print(f"torch seed {seed}")


# Roughly the seconds each file's tests take in `make test` on 2 cores (`--durations=0`, summed,
# 2026-12-07; only their order is used). `make test` deals whole files out to its processes in
# collection order (--dist loadfile --no-loadscope-reorder), each process holding two at a time: the
# longest go first, so that none starts last and runs alone at the end (test_train.py, collected late
# among them, could: the suite once took 18 minutes where the files' times shared out to 16).
FILE_SECONDS = {"test_train.py": 620, "test_benchmark_suites.py": 315, "test_sample.py": 220,
                "test_fast_path.py": 170, "test_kernels.py": 125, "test_benchmarks_dry_run.py": 120,
                "test_transport.py": 65, "test_distributed.py": 55, "test_models.py": 35, "test_upstream_parity.py": 25}


@pytest.hookimpl(trylast=True)  # after the -m/-k deselection, so the shards split what is left
def pytest_collection_modifyitems(config, items):
    """SIT_FAST_TEST_SHARD=I/N keeps the I-th of N shares of the collected tests (0 <= I < N): N
    processes, one per shard, run the whole selection side by side (benchmarks/gpu_session.sh on
    the GPU machine). The tests marked `spread` (each costly on its
    own: a torch.compile, a CUDA graph capture) are dealt out in turn and run first; the others go
    in contiguous, near-equal runs, which keep a test's cases together, so each Triton kernel's
    compilation tends to happen in one shard.

    Before that, the items are put in order: first the tests named one by one on the command line
    (FILE::TEST, gpu_session.sh's quick ones, which a timeout must not cut), in the order given; then
    FILE_SECONDS order: the longest files first, each file's tests in their order, the other files
    after them as collected. In shards, the tests named are dealt out in turn and run first."""
    named = [_named(item, config) for item in items]
    order = {id(item): (0, position) if position is not None else (1, -FILE_SECONDS.get(
        os.path.basename(str(getattr(item, "path", ""))), 0)) for item, position in zip(items, named)}
    items.sort(key=lambda item: order[id(item)])
    shard = os.environ.get("SIT_FAST_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"SIT_FAST_TEST_SHARD={shard!r}: expected I/N with 0 <= I < N, e.g. 0/4") from None
    first = [item for item in items if order[id(item)][0] == 0]
    spread = [item for item in items if order[id(item)][0] == 1 and _marked_spread(item)]
    rest = [item for item in items if order[id(item)][0] == 1 and not _marked_spread(item)]
    start, stop = index * len(rest) // count, (index + 1) * len(rest) // count
    kept = first[index::count] + spread[index::count] + rest[start:stop]
    kept_ids = {id(item) for item in kept}
    dropped = [item for item in items if id(item) not in kept_ids]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def _named(item, config) -> int | None:
    """The position among the command line's arguments of the FILE::TEST that names `item` (its
    parametrised cases too), or None."""
    test = getattr(item, "nodeid", "").partition("::")[2]
    for position, arg in enumerate(getattr(config, "args", [])):
        path, _, name = arg.partition("::")
        if name and os.path.basename(path) == os.path.basename(str(getattr(item, "path", ""))) and (
                test == name or test.startswith(name + "[")):
            return position
    return None


def _marked_spread(item) -> bool:
    return getattr(item, "get_closest_marker", lambda name: None)("spread") is not None


class Stop:
    """One way to stop a job mid-way: Ctrl-C (KeyboardInterrupt, where stop() is called) or a stop
    signal sent to this process; `status` and `words` are what the job should end with."""

    def __init__(self, how: str):
        self.how = how
        self.signum = signal.SIGINT if how == "Ctrl-C" else getattr(signal, how)
        self.status = 128 + self.signum
        self.words = "interrupted" if how == "Ctrl-C" else f"stopped by {how}"

    def __call__(self) -> None:
        if self.how == "Ctrl-C":
            raise KeyboardInterrupt
        os.kill(os.getpid(), self.signum)


@pytest.fixture(params=["Ctrl-C", "SIGTERM", "SIGHUP"])
def stop(request):
    """A Stop; a stop signal the job leaves unhandled fails the test rather than killing pytest."""
    def unhandled(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the test: the job did not handle it")

    saved = {signum: signal.signal(signum, unhandled) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield Stop(request.param)
    for signum, handler in saved.items():
        signal.signal(signum, handler)
