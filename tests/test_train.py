"""train.py: DDP agreement, exact resume, crash-safe checkpoints, one-line user errors, latent cache.

Everything trains SiT-T/4 on scikit-learn's bundled 8x8 digits in pixel space (no download), fp32 on
the CPU, on a machine with a GPU too; DDP cases run 2 gloo processes with torch.multiprocessing. The
tests marked `any_device` train where train.py would: on CUDA where there is a GPU (bf16, the Triton
kernels compiled, fused AdamW), so that its CUDA paths are run when one is at hand; they train on a
folder of random images they write, as the GPU machine's Python may have no scikit-learn.
"""
import contextlib
import datetime
import errno
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, UnidentifiedImageError

from sit_fast import interrupts
from sit_fast.errors import UserError, cli_entry
from sit_fast.training import checkpointing
from sit_fast.training.checkpointing import checkpoint_path, list_checkpoints
from sit_fast.training.loop import main as train_main
from tests.oserrors import fail_listing
from tests.torchrun_output import says_the_others_were_stopped, without_gloo_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The costlier variants of a parametrized case, run with -m slow (make test-all): the default run keeps
# one of each, to keep its time down on two cores.
SLOW = pytest.mark.slow
BASE = [
    "--dataset", "digits", "--image-size", "8", "--vae", "none", "--model", "SiT-T/4", "--global-batch-size", "64",
    "--num-workers", "0", "--fused-kernels", "off", "--no-progress", "--lr", "1e-3", "--ema-decay", "0.9",
    "--sample-every", "100000", "--log-every", "8",
]


# Tests whose CPU runs use the fused kernels through the Triton interpreter, which the tests switch on
# only where there is no GPU (conftest.py)
INTERPRETED = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's fused kernels need the Triton "
                                 "interpreter, on only without CUDA; the any_device tests run them on the GPU")


@pytest.fixture(autouse=True)
def _train_on_the_cpu(request, monkeypatch):
    """train.py, and the processes a test starts, see no GPU: the messages, figures and tolerances here
    are the CPU's. Tests marked any_device are left to train where train.py would."""
    if request.node.get_closest_marker("any_device") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def torchrun_env(tmp_path) -> dict:
    """The environment for a torchrun child: its processes on the reference ops (no interpreter), and
    torchrun's log folder and error files in the test's own temporary folder, not left in /tmp."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TMPDIR"] = str(tmp_path)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str], out_dir: str,
                compile_backend: str | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if compile_backend is not None:  # --compile's torch.compile with another backend than Inductor
        import functools

        torch.compile = functools.partial(torch.compile, backend=compile_backend)
    from sit_fast.distributed import cleanup, init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    args, explicit = parse_args(argv)
    info = init_distributed()
    try:
        trainer = Trainer(args, explicit, info)
        summary = trainer.run()
        assert not any(p.requires_grad or p.grad_fn is not None for p in trainer.ema.parameters())
        torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "step": summary["step"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def run_ddp(argv: list[str], out_dir: str, world_size: int = 2, compile_backend: str | None = None) -> list[dict]:
    """Train with `world_size` gloo processes; returns each rank's final model and EMA state_dicts."""
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_ddp_worker, args=(world_size, free_port(), argv, out_dir, compile_backend), nprocs=world_size,
             join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]


def logged_losses(exp_dir: str) -> list[float]:
    with open(os.path.join(exp_dir, "log.txt")) as f:
        return [float(line.split("Train Loss: ")[1].split(",")[0]) for line in f if "Train Loss: " in line]


def load_ckpt(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_ranks_identical(ranks: list[dict]) -> None:
    for key in ("model", "ema"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"rank 1 {key}[{name}] differs from rank 0"


def assert_states_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}[{key}]: {m}")


# How long the runs that one rank's failure ends may take, all their processes together, before a test takes them
# as deadlocked (ranks waiting for each other in two different collectives, for the host group's 6 hours). Their
# processes each import torch and the package, then train: on a loaded 2-core machine, nearly 2 minutes before
# rank 0 wrote its outcome, past which a bound of 120 s failed a run that was ending well.
DEADLOCK_S = 600


def join_ranks(context) -> list:
    """The exit codes of an mp.spawn(join=False) run's processes, joined one by one (spawn's own join would end
    the others (SIGTERM) as soon as one exits) within DEADLOCK_S in all; one still running then fails the test,
    and is killed."""
    deadline = time.monotonic() + DEADLOCK_S
    try:
        for process in context.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        running = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
        assert not running, f"ranks {running} still running after {DEADLOCK_S} s: deadlocked?"
        return [process.exitcode for process in context.processes]
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _node_local_worker(rank: int, port: int, root: str, argv: list[str]) -> None:
    """A rank of a run whose relative paths lead each rank to a folder of its own: ROOT/node<rank>,
    as on two nodes' own disks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sit_fast.distributed import cleanup, init_distributed
    from sit_fast.errors import UserError
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    os.chdir(os.path.join(root, f"node{rank}"))
    args, explicit = parse_args(argv)
    info = init_distributed()
    try:
        Trainer(args, explicit, info)
        outcome = "built"
    except UserError as err:
        outcome = str(err)
    finally:
        cleanup()
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.slow  # four runs; test_distributed.py's node-local folder and file checks run by default
def test_folders_on_each_nodes_own_disk(tmp_path, digits_checkpoint):
    """An experiment folder each node has on its own disk serves a run (rank 0 alone writes there), with
    a warning that resuming needs the checkpoint on every node; a --resume file that differs between
    nodes (another run's of the same name) stops every rank with one line, before training; the same
    checkpoint copied to each node resumes."""
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    other = train_main(BASE + ["--exp-dir", str(tmp_path / "other"), "--max-steps", "1", "--ckpt-every", "1",
                               "--global-seed", "5"])["last_checkpoint"]
    shutil.copy(digits_checkpoint, tmp_path / "node0" / "start.pt")
    shutil.copy(other, tmp_path / "node1" / "start.pt")  # same name, another run's
    shutil.copy(digits_checkpoint, tmp_path / "node0" / "copied.pt")
    shutil.copy(digits_checkpoint, tmp_path / "node1" / "copied.pt")
    cases = {
        "results folder": (["--results-dir", "results"], "built"),
        "resume file": (["--exp-dir", str(tmp_path / "shared"), "--resume", "start.pt"],
                        "--resume start.pt: rank 1 (on {host}) reads another file at start.pt than rank 0 does"),
        "resume file copied": (["--exp-dir", str(tmp_path / "shared2"), "--resume", "copied.pt"], "built"),
    }
    for name, (flags, expected) in cases.items():
        mp.spawn(_node_local_worker, args=(free_port(), str(tmp_path), BASE + flags + ["--max-steps", "2"]),
                 nprocs=2, join=True)
        outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
        assert outcomes[0] == outcomes[1] and outcomes[0].startswith(expected.format(host=socket.gethostname())), \
            (name, outcomes)
    (run,) = os.listdir(tmp_path / "node0" / "results")
    assert not (tmp_path / "node1" / "results").exists()
    log = (tmp_path / "node0" / "results" / run / "log.txt").read_text()
    assert (f"--results-dir results: rank 1 (on {socket.gethostname()}) does not see what rank 0 wrote in "
            f"results/{run} (a folder of that name on each node's own disk?): checkpoints, sample grids and "
            f"log.txt are written on rank 0's node ({socket.gethostname()}) only; to resume") in log, log


@pytest.mark.parametrize("init", [False, pytest.param(True, marks=SLOW)])
def test_setup_failing_on_one_node_only_ends_every_rank_with_one_line(tmp_path, init):
    """The data is on node 0's disk only: rank 1 stops with its own error, and rank 0, before DDP's
    first collective (in which, on NCCL, it would wait for rank 1 until the timeout), with one line
    naming rank 1 and that error (on gloo it was 'Connection closed by peer'). init: a new run from
    --ckpt, whose file rank 0 finds first (a collective, kept out of the setup every rank runs alone:
    inside it, the ranks waited for each other in two different collectives, for 6 hours)."""
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    make_image_folder(tmp_path / "node0" / "images", classes=2, per_class=2)
    data = ["--dataset", "imagefolder", "--data-path", str(tmp_path / "node0" / "images"), "--global-batch-size", "4"]
    init_flags = []
    if init:
        first = train_main(BASE + data + ["--exp-dir", str(tmp_path / "first"), "--max-steps", "1",
                                          "--ckpt-every", "1"])
        init_flags = ["--ckpt", first["last_checkpoint"]]
    argv = BASE + data[:3] + ["images"] + data[4:] + init_flags + ["--exp-dir", str(tmp_path / "shared"),
                                                                   "--max-steps", "2"]
    context = mp.spawn(_node_local_worker, args=(free_port(), str(tmp_path), argv), nprocs=2, join=False)
    assert join_ranks(context) == [0, 0]  # a deadlock fails here, not after the host group's 6 hours
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[1].startswith("--data-path images"), outcomes
    assert outcomes[0] == f"rank 1 (on {socket.gethostname()}) failed: {outcomes[1]}", outcomes


def test_a_node_whose_copy_of_the_data_differs_is_refused(tmp_path):
    """Each node reads its own copy of --data-path: identical copies train; a copy with one image fewer
    (which trained on other images under the same indices, or planned other steps per epoch and failed
    at a collective) stops every rank with one line, naming what differs, before training. A copy at
    another --data-path is the same data."""
    from sit_fast.data import ImageFolderDataset, data_fingerprint

    for node in ("node0", "node1"):
        make_image_folder(tmp_path / node / "images", classes=2, per_class=3)
    argv = BASE + ["--dataset", "imagefolder", "--data-path", "images", "--global-batch-size", "4",
                   "--max-steps", "2"]
    outcomes = {}
    for case in ("identical copies", "an image fewer"):
        if case == "an image fewer":
            os.remove(tmp_path / "node1" / "images" / "class1" / "2.png")
        flags = ["--exp-dir", str(tmp_path / case.replace(" ", "_"))]
        mp.spawn(_node_local_worker, args=(free_port(), str(tmp_path), argv + flags), nprocs=2, join=True)
        outcomes[case] = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes["identical copies"] == ["built", "built"]
    shutil.copytree(tmp_path / "node0" / "images", tmp_path / "elsewhere" / "images")
    assert data_fingerprint(ImageFolderDataset(str(tmp_path / "node0" / "images"), 8)) == data_fingerprint(
        ImageFolderDataset(os.path.join(str(tmp_path / "elsewhere"), ".", "images") + os.sep, 8))
    zero, one = outcomes["an image fewer"]
    assert one == ("--data-path images holds other data on this node than on rank 0's (5 samples in 2 classes here, 6 "
                   "in 2 there, or other names, labels or order): every process must read the same data (a shared "
                   "filesystem, or identical copies)"), one
    assert zero == f"rank 1 (on {socket.gethostname()}) failed: {one}", zero


def _failing_rank_worker(rank: int, port: int, root: str, failure: str) -> None:
    """A rank of a 2-process run in which one rank fails: its outcome (the run's summary step, or the
    error line, or the exception's type) into ROOT/rankN.txt."""

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sit_fast import images
    from sit_fast.errors import UserError
    from sit_fast.training import loop

    if failure == "checkpoint, disk full" and rank == 0:
        def full(obj, path):
            raise OSError(errno.ENOSPC, "No space left on device")
        loop.atomic_torch_save = full
    if failure == "sample grid, disk full" and rank == 0:
        def full_grid(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        images.save_image_grid = full_grid
    if failure == "sample grid, an error" and rank == 0:
        def failing_grid(*args, **kwargs):
            raise RuntimeError("boom")
        images.save_image_grid = failing_grid
    if failure == "a peer ends" and rank == 1:
        real = loop.Trainer.train_step

        def train_step(self, batch):
            if self.step == 2:
                os._exit(3)  # as a rank killed by a data error or out of memory would end
            return real(self, batch)
        loop.Trainer.train_step = train_step
    every = "3" if failure == "sample grid, an error" else "2"  # a grid after a step with no checkpoint
    argv = BASE + ["--exp-dir", os.path.join(root, "exp"), "--max-steps", "4", "--ckpt-every", "2",
                   "--sample-every", every, "--num-sample-images", "2", "--sample-steps", "2"]
    try:
        outcome = f"step {loop.main(argv)['step']}"
    except UserError as err:
        outcome = str(err)
    except BaseException as err:  # noqa: BLE001 -- what the test looks at
        outcome = f"{type(err).__name__}: {err}"
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.parametrize("failure", ["checkpoint, disk full", pytest.param("sample grid, disk full", marks=SLOW),
                                     "sample grid, an error", "a peer ends"])
def test_a_rank_that_fails_ends_every_rank_with_one_line(tmp_path, failure):
    """Rank 0 alone writes checkpoints and grids: its full disk reached the others as gloo's 'Connection
    closed by peer' traceback (or, for a grid, a crash); a peer that ended did the same to rank 0. A
    grid that fails otherwise ends the run, every rank, after a checkpoint of the step."""
    context = mp.spawn(_failing_rank_worker, args=(free_port(), str(tmp_path), failure), nprocs=2, join=False)
    assert join_ranks(context) == [0, 3 if failure == "a peer ends" else 0]
    outcomes = {r: (tmp_path / f"rank{r}.txt").read_text() for r in range(2) if (tmp_path / f"rank{r}.txt").exists()}
    if failure == "checkpoint, disk full":
        assert outcomes[0] == outcomes[1] and outcomes[0].startswith(
            "step 2: cannot write checkpoint ") and "(No space left on device)" in outcomes[0], outcomes
    elif failure == "sample grid, an error":
        assert outcomes == {0: "RuntimeError: boom",
                            1: "rank 0 failed sampling the EMA grid after step 3: RuntimeError: boom"}, outcomes
        assert list_checkpoints(str(tmp_path / "exp" / "checkpoints"))[0].endswith("0000003.pt")
    elif failure == "sample grid, disk full":
        assert outcomes == {0: "step 4", 1: "step 4"}, outcomes  # the grids are skipped, with a warning
        with open(tmp_path / "exp" / "log.txt") as f:
            grid = tmp_path / "exp" / "samples" / "0000002.png"
            assert f"step 2: the sample grid is skipped: cannot write {grid} (No space left on device)" in f.read()
    else:
        last = tmp_path / "exp" / "checkpoints" / "0000002.pt"
        # rank 1, of this node, seen ended: named
        assert list(outcomes) == [0] and re.fullmatch(
            rf"rank 1 \(on {re.escape(socket.gethostname())}\) ended at step 2 \((Connection|Read error|[A-Z]).*\); "
            rf"its error is in the torchrun summary of its node; last checkpoint: {re.escape(str(last))}",
            outcomes[0]), outcomes


# ----------------------------------------------------------------------------- DDP and exact resume

@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory):
    """48 steps with 2 ranks (28 steps per epoch: crosses an epoch), checkpoints every 24."""
    root = tmp_path_factory.mktemp("ddp")
    exp = str(root / "straight")
    ranks = run_ddp(BASE + ["--exp-dir", exp, "--max-steps", "48", "--ckpt-every", "24"], str(root / "out_straight"))
    return root, exp, ranks


def test_ddp_loss_decreases_and_ranks_agree(ddp_straight):
    _, exp, ranks = ddp_straight
    assert ranks[0]["step"] == ranks[1]["step"] == 48
    assert_ranks_identical(ranks)
    losses = logged_losses(exp)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], f"loss did not decrease: {losses}"
    checkpoint = load_ckpt(os.path.join(exp, "checkpoints", "0000048.pt"))  # loads with weights_only=True
    assert checkpoint["step"] == 48 and checkpoint["epoch"] == 1 and checkpoint["step_in_epoch"] == 20
    assert len(checkpoint["rng"]) == 2 and isinstance(checkpoint["args"], dict)
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])  # per-rank seeds


def test_exact_resume_ddp(ddp_straight):
    """24 steps, stop; --resume auto to 48 == 48 straight: model, EMA, optimizer, position, RNG."""
    root, straight, _ = ddp_straight
    split = str(root / "split")
    run_ddp(BASE + ["--exp-dir", split, "--max-steps", "24", "--ckpt-every", "24"], str(root / "out_a"))
    run_ddp(BASE + ["--exp-dir", split, "--max-steps", "48", "--ckpt-every", "24", "--resume", "auto"],
            str(root / "out_b"))
    with open(os.path.join(split, "log.txt")) as f:
        assert "--resume auto: resuming from" in f.read()
    a = load_ckpt(os.path.join(straight, "checkpoints", "0000048.pt"))
    b = load_ckpt(os.path.join(split, "checkpoints", "0000048.pt"))
    assert (a["step"], a["epoch"], a["step_in_epoch"]) == (b["step"], b["epoch"], b["step_in_epoch"])
    assert_states_close(a["model"], b["model"], "model")
    assert_states_close(a["ema"], b["ema"], "ema")
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    for index, state in a["opt"]["state"].items():
        assert_states_close(state, b["opt"]["state"][index], f"opt.state[{index}]")
    for rank in range(2):
        assert torch.equal(a["rng"][rank]["torch"], b["rng"][rank]["torch"])


@pytest.mark.slow  # two ranks' exact resume is test_exact_resume_ddp
def test_exact_resume_with_three_ranks_is_bit_for_bit(tmp_path):
    """With 3 ranks the order of a gradient's sum over the ranks shows in its rounding: DDP's bucket layout,
    which it changes after its first backward, is the same in the resumed run's first step as in the straight
    run's steps after its first, and the parameters, EMA and AdamW moments end bit for bit equal."""
    argv = BASE + ["--global-batch-size", "24", "--ckpt-every", "2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_ddp(argv + ["--exp-dir", straight, "--max-steps", "4"], str(tmp_path / "out_straight"), world_size=3)
    middle = os.path.join(straight, "checkpoints", "0000002.pt")
    run_ddp(argv + ["--exp-dir", split, "--max-steps", "4", "--resume", middle], str(tmp_path / "out_b"), world_size=3)
    with open(os.path.join(split, "log.txt")) as f:
        assert "resumed at step 2 (epoch 0, step 2 in it): exact" in f.read()
    a = load_ckpt(os.path.join(straight, "checkpoints", "0000004.pt"))
    b = load_ckpt(os.path.join(split, "checkpoints", "0000004.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    for index, state in a["opt"]["state"].items():
        assert all(torch.equal(value, b["opt"]["state"][index][name]) for name, value in state.items()), index


@INTERPRETED
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_ddp_with_the_fast_options_keeps_ranks_identical(tmp_path, backend):
    """2 ranks with --fused-kernels on, --compile (with DDP's graph splitting) and --grad-accum-steps 2
    (no_sync in the first micro-batch): the run goes through, the ranks agree. aot_eager captures and splits
    the graphs as Inductor would (the kernels' fake and autograd registrations included); Inductor's code
    generation, in each of the two processes, takes more than a minute here (the slow case)."""
    exp = str(tmp_path / "fast")
    argv = [a for a in BASE if a not in ("--fused-kernels", "off")] + [
        "--fused-kernels", "on", "--compile", "--grad-accum-steps", "2", "--global-batch-size", "8",
        "--max-steps", "3", "--log-every", "1", "--exp-dir", exp]
    ranks = run_ddp(argv, str(tmp_path / "out"), compile_backend=backend)
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert_ranks_identical(ranks)
    losses = logged_losses(exp)
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_ddp_gradient_accumulation_keeps_ranks_identical(tmp_path):
    """no_sync in all but the last micro-batch: the last backward must still all-reduce everything."""
    exp = str(tmp_path / "accum")
    ranks = run_ddp(BASE + ["--exp-dir", exp, "--max-steps", "8", "--ckpt-every", "8", "--grad-accum-steps", "4"],
                    str(tmp_path / "out"))
    assert ranks[0]["step"] == ranks[1]["step"] == 8
    assert_ranks_identical(ranks)
    with open(os.path.join(exp, "log.txt")) as f:
        assert "gradient accumulation: 4 micro-batches of 8 per rank per step (global batch 64)" in f.read()
    losses = logged_losses(exp)
    assert len(losses) == 1 and all(np.isfinite(losses)), losses  # --log-every 8: the line of step 8
    # Resumed in one process, the run keeps its micro-batch of 8 (its memory per GPU), not its 4 parts;
    # given explicitly, another count is used, and the log does not call the resume exact.
    checkpoint = os.path.join(exp, "checkpoints", "0000008.pt")
    one = str(tmp_path / "one")
    train_main(["--exp-dir", one, "--resume", checkpoint, "--max-steps", "9", "--num-workers", "0", "--no-progress"])
    with open(os.path.join(one, "log.txt")) as f:
        log = f.read()
    assert ("--grad-accum-steps 8: the run's micro-batch of 8 per rank (the run had 4 micro-batch(es) per step, a "
            "global batch of 64 on 2 rank(s); now 64 on 1)") in log
    assert "gradient accumulation: 8 micro-batches of 8 per rank per step (global batch 64)" in log
    # 1797 digits in steps of 64 on 2 ranks or 1: the same 28 global batches an epoch
    assert ("with world size 2 -> 1 (the run's, now): each step's samples are the run's (the same global "
            "batches, dealt out to the ranks otherwise); the noise and time draws are not") in log, log
    other = str(tmp_path / "other")
    train_main(["--exp-dir", other, "--resume", checkpoint, "--max-steps", "9", "--num-workers", "0", "--no-progress",
                "--grad-accum-steps", "2"])
    with open(os.path.join(other, "log.txt")) as f:
        assert "gradient accumulation: 2 micro-batches of 32 per rank" in f.read()


@pytest.mark.parametrize("saved,now,expected", [
    ((64, 2, 4), (1, 64), 8),  # micro-batch 8 kept: 8 parts of 8
    ((256, 8, 2), (4, 64), 4),  # micro-batch 16 kept
    ((240, 8, 2), (6, 40), 4),  # micro-batch 15 does not divide 40: 4 parts of 10, not 2 of 20
    ((64, 2, 1), (4, 16), 1),  # micro-batch 32: a batch of 16 fits in one part
    ((63, 1, 1), (9, 7), 1),
    ((64, 1, 4), (1, 66), 6),  # another --global-batch-size: micro-batch 16 does not divide 66, 6 parts of 11
    ((64, 1, 4), (1, 128), 8),  # micro-batch 16 kept
])
def test_resume_with_another_per_rank_batch_keeps_the_micro_batch_or_a_smaller_one(saved, now, expected,
                                                                                   monkeypatch):
    """keep_micro_batch, on another world size or --global-batch-size: (global batch, world size, parts)
    saved; (world size, per-rank batch) now."""
    import argparse
    import types

    from sit_fast.training import loop
    from sit_fast.training.loop import Trainer

    lines = []
    monkeypatch.setattr(loop.logger, "info", lines.append)

    (saved_batch, saved_world, saved_parts), (world, local) = saved, now
    trainer = types.SimpleNamespace(dist_info=types.SimpleNamespace(world_size=world), local_batch_size=local)
    args = argparse.Namespace(grad_accum_steps=1)
    ckpt = {"data": {"world_size": saved_world},
            "args": {"global_batch_size": saved_batch, "grad_accum_steps": saved_parts}}
    Trainer.keep_micro_batch(trainer, args, ckpt)
    assert args.grad_accum_steps == expected
    micro = saved_batch // (saved_world * saved_parts)
    assert local % expected == 0 and local // expected <= micro
    if expected > 1 and local // expected < micro:
        assert f"micro-batches of {local // expected} per rank, the largest that divides" in lines[0], lines

@pytest.mark.parametrize("num_samples,batch,saved_world,world", [(1797, 48, 1, 4), (1797, 48, 3, 2), (95, 32, 1, 32),
                                                                  (100, 20, 5, 4), (7, 6, 3, 2)])
def test_a_world_size_change_keeps_the_global_batches_where_it_says_so(num_samples, batch, saved_world, world):
    """_same_global_batches against the batches EpochSampler deals out: only where every step of the
    epoch holds the same samples on the old world size as on the new."""
    import types

    from sit_fast.data import EpochSampler
    from sit_fast.training.loop import Trainer

    def global_batches(w):
        ranks = [EpochSampler(num_samples, batch // w, r, w, seed=3, flip=True).batches(epoch=1) for r in range(w)]
        return [sorted(key for rank in ranks for key in rank[s]) for s in range(len(ranks[0]))]

    sampler = EpochSampler(num_samples, batch // world, 0, world, seed=3, flip=True)
    args = types.SimpleNamespace(global_batch_size=batch, global_seed=3, latent_cache=None, dataset="digits")
    trainer = types.SimpleNamespace(dist_info=types.SimpleNamespace(world_size=world), sampler=sampler, args=args,
                                    dataset=[None] * num_samples)
    data = {"world_size": saved_world, "global_batch_size": batch, "num_samples": num_samples, "seed": 3,
            "source": "--dataset digits"}
    claimed = Trainer._same_global_batches(trainer, data)
    assert claimed == (global_batches(saved_world) == global_batches(world))
    assert not Trainer._same_global_batches(trainer, {**data, "seed": 4})
    assert not Trainer._same_global_batches(trainer, {**data, "source": "ImageFolder /other"})  # the same size


def test_a_global_batch_not_divisible_by_the_world_size_names_the_multiples_near_it():
    from sit_fast.distributed import DistInfo
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    for batch, near in (("63", "62 or 64"), ("1", "2")):
        args, explicit = parse_args(BASE + ["--global-batch-size", batch, "--max-steps", "1"])
        trainer = Trainer.__new__(Trainer)  # rank 0 of 2: _build_data runs no collective
        trainer.dist_info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
        trainer.device = trainer.dist_info.device
        with pytest.raises(UserError) as err:
            trainer._build_data(args, explicit, None, None)
        assert str(err.value) == (f"--global-batch-size {batch} is not divisible by the world size 2 (the number of "
                                  f"processes): pass a multiple of 2, such as {near}")
        assert not hasattr(trainer, "dataset")


def test_a_resume_in_another_layout_on_data_elsewhere_says_so(monkeypatch):
    """Resumed on another world size from data at another path (a copy moved, or other data of the same
    size), the log names the data's change with the others, and says the global batches are the run's
    only if that is the same data (it said the data order was not the run's, and nothing of the data)."""
    import types

    from sit_fast.data import EpochSampler
    from sit_fast.training import loop
    from sit_fast.training.loop import Trainer

    lines = []
    args = types.SimpleNamespace(global_batch_size=64, global_seed=0, latent_cache=None, dataset="imagefolder",
                                 data_path="/data/b", grad_accum_steps=1)
    trainer = types.SimpleNamespace(dist_info=types.SimpleNamespace(world_size=1, rank=0), args=args,
                                    dataset=[None] * 1797, sampler=EpochSampler(1797, 64, 0, 1, seed=0, flip=True))
    trainer._same_global_batches = types.MethodType(Trainer._same_global_batches, trainer)
    ckpt = {"step": 100, "epoch": 3, "step_in_epoch": 5, "args": {}, "rng": [{}, {}],
            "data": {"world_size": 2, "global_batch_size": 64, "num_samples": 1797, "seed": 0,
                     "source": "ImageFolder /data/a"}}
    monkeypatch.setattr(loop.logger, "warning", lines.append)
    monkeypatch.setattr(loop, "seed_everything", lambda seed: None)
    Trainer.restore_position(trainer, ckpt, "0000100.pt")
    assert lines == ["resumed at step 100 with world size 2 -> 1, data ImageFolder /data/a -> ImageFolder /data/b (the "
                     "run's, now): each step's samples are the run's if that is the same data, moved (the same global "
                     "batches, dealt out to the ranks otherwise); the noise and time draws are not those of the "
                     "original run"], lines


def test_a_resume_in_another_layout_seeds_each_rank_apart():
    """Resumed with another world size, batch or data, the saved random states do not fit the ranks:
    each is seeded anew from --global-seed, its rank and the step, so that the ranks' noise and time
    draws differ (as upstream's per-rank seeds make them) and a repeat of the resume draws the same."""
    import random
    import types

    from sit_fast.training.loop import Trainer

    def draws(rank, step):
        args = types.SimpleNamespace(global_batch_size=8, global_seed=3)
        trainer = types.SimpleNamespace(dist_info=types.SimpleNamespace(world_size=2, rank=rank), args=args,
                                        dataset=[None] * 100, sampler=types.SimpleNamespace(steps_per_epoch=12),
                                        _same_global_batches=lambda data: False)
        ckpt = {"step": step, "epoch": 0, "step_in_epoch": step, "args": {}, "rng": [{}],
                "data": {"world_size": 1, "global_batch_size": 8, "num_samples": 100, "seed": 3}}
        Trainer.restore_position(trainer, ckpt, "0000006.pt")
        assert (trainer.step, trainer.step_in_epoch) == (step, step)
        return torch.rand(4), np.random.rand(), random.random()

    states = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            rank0, rank1, again, later = draws(0, 6), draws(1, 6), draws(0, 6), draws(0, 7)
        finally:
            np.random.set_state(states[0])
            random.setstate(states[1])
    assert torch.equal(rank0[0], again[0]) and rank0[1:] == again[1:]
    for other in (rank1, later):
        assert not torch.equal(rank0[0], other[0]) and rank0[1] != other[1] and rank0[2] != other[2]


def test_a_resume_with_another_global_batch_goes_on_after_the_images_seen():
    """Resumed with another --global-batch-size, the position in the epoch is the images the run saw
    there over the new batch (11 steps of 64: 5 of 128), past the epoch's end the next epoch's start."""
    import random
    import types

    from sit_fast.training.loop import Trainer

    def resumed(step_in_epoch, batch, steps_per_epoch):
        args = types.SimpleNamespace(global_batch_size=batch, global_seed=0)
        trainer = types.SimpleNamespace(dist_info=types.SimpleNamespace(world_size=1, rank=0), args=args,
                                        dataset=[None] * 1797,
                                        sampler=types.SimpleNamespace(steps_per_epoch=steps_per_epoch),
                                        _same_global_batches=lambda data: False)
        ckpt = {"step": 100, "epoch": 3, "step_in_epoch": step_in_epoch, "args": {}, "rng": [{}],
                "data": {"world_size": 1, "global_batch_size": 64, "num_samples": 1797, "seed": 0}}
        Trainer.restore_position(trainer, ckpt, "0000100.pt")
        return trainer.step, trainer.epoch, trainer.step_in_epoch

    states = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            assert resumed(11, 128, 14) == (100, 3, 5)
            assert resumed(11, 32, 56) == (100, 3, 22)
            assert resumed(27, 96, 18) == (100, 4, 0)
        finally:
            np.random.set_state(states[0])
            random.setstate(states[1])


def test_resume_with_another_accumulation_count_is_not_called_exact(tmp_path):
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2", "--grad-accum-steps", "2"])
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "3", "--grad-accum-steps", "4"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert "with --grad-accum-steps 4, the run had 2: the data order is exact, the noise" in log
    assert "in it): exact" not in log


def test_resume_with_another_global_seed_says_the_order_is_not_the_runs(tmp_path):
    """--global-seed given anew on resume changes the data order (the epochs' permutations) and the ranks'
    seeds: the saved random states are not restored, and the log names the change instead of "exact"."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    seed = str(int(torch.randint(1, 1000, ())))
    train_main(BASE + ["--exp-dir", exp, "--resume", "auto", "--max-steps", "3", "--global-seed", seed])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert (f"resumed at step 2 with --global-seed 0 -> {seed} (the run's, now): the data order and random streams "
            f"are not those of the original run") in log, log
    assert "in it): exact" not in log


def test_resume_with_other_arithmetic_is_not_called_exact(tmp_path, monkeypatch):
    """Another attention backend, precision, kernels or compilation keeps the data order and random
    states, not the rounding (nor, compiled, the label-dropout masks)."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2", "--attn-backend", "sdpa"])
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "3", "--attn-backend", "math"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert ("in it): the data order and random states are the run's; attention sdpa -> math changes the "
            "rounding, so the steps are not bit for bit the original run's") in log, log
    assert "in it): exact" not in log
    # the values the flags resolve to are compared: on the CPU, --precision auto is fp32
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "4", "--precision", "fp32"])
    with open(os.path.join(exp, "log.txt")) as f:
        assert f.read().rstrip().count("resumed at step 3 (epoch 0, step 3 in it): exact") == 1
    # under sdpa, the kernel SIT_FAST_SDPA_BACKEND forces is part of it
    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", "math")
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "5", "--attn-backend", "sdpa"])
    monkeypatch.delenv("SIT_FAST_SDPA_BACKEND")
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "6", "--attn-backend", "sdpa"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert ("resumed at step 5 (epoch 0, step 5 in it): the data order and random states are the run's; "
            "SIT_FAST_SDPA_BACKEND math -> unset changes the rounding") in log, log


def test_a_checkpoint_without_the_arithmetic_entry_resumes_comparing_the_flags(tmp_path):
    """An older checkpoint kept the flags, not what they resolved to: those are compared."""
    exp = tmp_path / "run"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "2", "--ckpt-every", "1"])
    for step in (1, 2):
        path = exp / "checkpoints" / f"000000{step}.pt"
        checkpoint = load_ckpt(path)
        del checkpoint["arithmetic"]
        torch.save(checkpoint, path)
    assert train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "3", "--resume", "auto"])["step"] == 3
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "2", "--resume", str(exp / "checkpoints" / "0000001.pt"),
                       "--attn-backend", "math"])
    with open(exp / "log.txt") as f:
        log = f.read()
    assert "resumed at step 2 (epoch 0, step 2 in it): exact" in log, log
    assert ("resumed at step 1 (epoch 0, step 1 in it): the data order and random states are the run's; --attn-backend "
            "auto -> math changes the rounding, so the steps are not bit for bit the original run's") in log, log


def test_a_recorded_backend_that_cannot_run_here_is_named_as_the_checkpoints(tmp_path, monkeypatch):
    """A run trained with --attn-backend flash_attn (or --fused-kernels on) on a GPU, resumed where it cannot
    run, without the flag: the error says the value came from the checkpoint, not the command line."""
    from sit_fast.errors import UserError

    exp = tmp_path / "run"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--ckpt-every", "1"])
    path = exp / "checkpoints" / "0000001.pt"
    checkpoint = load_ckpt(path)
    checkpoint["args"]["attn_backend"] = "flash_attn"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=r"^--attn-backend flash_attn \(the checkpoint's\): attention backend "
                                        r"'flash_attn' cannot run here: .*; usable: "):
        train_main(["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "2"])
    with pytest.raises(UserError, match=r"^--attn-backend flash_attn: attention backend"):  # given now
        train_main(["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "2", "--attn-backend", "flash_attn"])
    checkpoint["args"].update(attn_backend="auto", fused_kernels="on")
    torch.save(checkpoint, path)
    monkeypatch.setattr("sit_fast.models._TRITON_INTERPRET", False)  # as a CPU without the interpreter
    with pytest.raises(UserError, match=r"^--fused-kernels on \(the checkpoint's\): "):
        train_main(["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "2"])


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_the_cpu():
    """--precision auto resolves by device (the value checkpoints keep in "arithmetic"); a given one is kept."""
    from sit_fast.training.loop import resolve_precision

    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    for given in ("fp32", "tf32", "bf16"):
        for device in (torch.device("cuda", 0), torch.device("cpu")):
            assert resolve_precision(given, device) == given


def test_help_and_errors_name_the_command_that_was_run(monkeypatch):
    """train.py and `python -m sit_fast.training` (what a non-editable install has) take the same flags;
    --help and the errors name the one that ran."""
    from sit_fast.training.args import parse_args

    for argv0, name in (("/x/train.py", "train.py"), ("/x/pytest/__main__.py", "train.py"),  # python -m pytest
                        ("/x/sit_fast/training/__main__.py", "python -m sit_fast.training")):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(UserError, match=re.escape(f"--bogus (see {name} --help)")):
            parse_args(["--bogus"])


def test_python_m_sit_fast_training_is_train_py(tmp_path):
    """The package's __main__ (what the demo's torchrun starts, and a non-editable install has in place of
    train.py) runs train.py's command line: its errors are one line naming it, and a run trains."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "sit_fast.training"]
    result = subprocess.run(command + ["--bogus"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: unrecognized arguments: --bogus (see python -m sit_fast.training --help)\n"
    exp = str(tmp_path / "exp")
    result = subprocess.run(command + BASE + ["--exp-dir", exp, "--max-steps", "1"], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list_checkpoints(os.path.join(exp, "checkpoints")) == [os.path.join(exp, "checkpoints", "0000001.pt")]


def test_precision_bf16_trains_under_autocast_with_fp32_weights(tmp_path):
    """--precision bf16: the model's forward computes in bf16 (autocast), the weights, their gradients and
    the EMA stay fp32; fp32 computes in fp32."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / precision), "--precision", precision])
        trainer = Trainer(args, explicit, init_distributed())
        seen = []
        layer = trainer.model.final_layer.linear
        hook = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        loss, applied = trainer.train_step(batch)
        hook.remove()
        assert seen == [dtype] and applied and torch.isfinite(loss), precision
        for p in trainer.model_params + trainer.ema_params:
            assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), precision


def test_resume_with_other_update_flags_says_so(tmp_path):
    """--lr, --ema-decay, --grad-clip, --skip-nonfinite or --vae-precision given on resume win over the
    checkpoint's, and the log names each change (the resume is then not called exact)."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "3", "--lr", "5e-4", "--ema-decay", "0.5",
                "--grad-clip", "0.01"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert ("resumed with --lr 0.001 -> 0.0005, --ema-decay 0.9 -> 0.5, --grad-clip None -> 0.01 (given now; the run "
            "had the former): the updates from step 2 on may not be those the run would have made") in log, log
    assert "resumed at step 2 (epoch 0, step 2 in it): the data order and random states are the run's (the" in log
    assert "in it): exact" not in log
    assert load_ckpt(os.path.join(exp, "checkpoints", "0000003.pt"))["args"]["lr"] == 5e-4


def test_a_resume_with_another_vae_precision_and_no_vae_encoding_the_batches_is_exact(tmp_path):
    """--vae-precision changes the updates only where a VAE encodes the batches: in pixel space (or from a
    latent cache, where it decodes the grids alone) the resume is still exact, not said to steer the updates."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "1", "--ckpt-every", "1"])
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "2", "--vae-precision", "bf16"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert "resumed at step 1 (epoch 0, step 1 in it): exact" in log and "--vae-precision" not in log, log
    assert load_ckpt(os.path.join(exp, "checkpoints", "0000002.pt"))["args"]["vae_precision"] == "bf16"
    _, _, cache = _built_cache(tmp_path)
    exp = str(tmp_path / "cached")
    train_main(["--latent-cache", cache, "--model", "SiT-T/4", "--global-batch-size", "2", "--max-steps", "1",
                "--sample-every", "none", "--exp-dir", exp, "--num-workers", "0", "--fused-kernels", "off",
                "--no-progress"])
    train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "2", "--vae-precision", "bf16"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert "resumed at step 1 (epoch 0, step 1 in it): exact" in log and "--vae-precision" not in log, log


def test_gradient_accumulation_gives_the_whole_batch_gradient(tmp_path):
    """K micro-batches: the same loss and gradients as the whole batch at once (to fp32 round-off).
    The transport's random draws are replaced by a per-sample function, so both see the same loss."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    def per_sample_losses(model, x, model_kwargs):
        t = torch.sigmoid(x.flatten(1).mean(1))  # a time per sample, not per position in the batch
        return {"loss": ((model(x, t, **model_kwargs) - x) ** 2).flatten(1).mean(1)}

    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    results = {}
    for parts in (1, 4):
        args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / f"k{parts}"), "--grad-accum-steps", str(parts)])
        trainer = Trainer(args, explicit, init_distributed())
        trainer.transport.training_losses = per_sample_losses
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        loss, applied = trainer.train_step(batch)
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results[parts] = (before, loss, grads)
    (before_1, loss_1, grads_1), (before_4, loss_4, grads_4) = results[1], results[4]
    assert all(torch.equal(before_1[k], before_4[k]) for k in before_1)  # the same start
    torch.testing.assert_close(loss_4, loss_1, rtol=1e-6, atol=1e-7)
    assert grads_1.keys() == grads_4.keys() and len(grads_1) > 10
    for name in grads_1:
        torch.testing.assert_close(grads_4[name], grads_1[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_the_ema_follows_the_weights_by_its_decay(tmp_path):
    """ema <- decay * ema + (1 - decay) * weights after each applied step, from a copy of the initial
    weights (upstream's update_ema): checked against that formula in float64 over two steps. The other
    tests compare EMAs with EMAs (ranks, resumes), which a swapped decay passes."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run"), "--ema-decay", "0.75"])
    trainer = Trainer(args, explicit, init_distributed())
    ema = {k: v.double() for k, v in trainer.ema.state_dict().items()}
    assert all(torch.equal(trainer.ema.state_dict()[k], v) for k, v in trainer.model.state_dict().items())
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        batch = (torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,), generator=generator))
        assert trainer.train_step(batch)[1]
        weights = {k: v.double() for k, v in trainer.model.state_dict().items()}
        ema = {k: 0.75 * ema[k] + 0.25 * weights[k] for k in ema}
        now = trainer.ema.state_dict()
        for name, expected in ema.items():
            torch.testing.assert_close(now[name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    moved = [k for k in ema if not torch.equal(now[k].double(), weights[k])]
    assert len(moved) > 10  # the EMA is not the weights themselves
    saved = load_ckpt(trainer.save_checkpoint())  # the checkpoint keeps each under its own name
    weights = trainer.model.state_dict()
    for name, value in trainer.ema.state_dict().items():
        assert torch.equal(saved["ema"][name], value) and torch.equal(saved["model"][name], weights[name])
    # upstream's optimizer: AdamW(lr, weight_decay=0), torch's betas and eps
    group = trainer.opt.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"], group["lr"]) == (0, (0.9, 0.999), 1e-8, 1e-3)


def test_upstream_defaults_of_the_learning_rate_and_the_ema():
    from sit_fast.training.args import parse_args

    args, _ = parse_args(["--data-path", "images"])
    assert (args.lr, args.ema_decay, args.global_batch_size, args.image_size) == (1e-4, 0.9999, 256, 256)


def test_the_sample_grids_are_16_images_of_a_16_step_heun_ode_by_default():
    """As the README says; the arithmetic, attention and kernels are those of the device unless given."""
    from sit_fast.training.args import parse_args

    args, _ = parse_args(["--data-path", "images"])
    assert (args.num_sample_images, args.sample_steps, args.sample_method) == (16, 16, "heun")
    assert (args.precision, args.attn_backend, args.fused_kernels) == ("auto", "auto", "auto")


def test_each_batch_is_a_fresh_draw_from_the_vae_posterior(tmp_path):
    """Latents are mean + std * noise, drawn anew for every batch (upstream's latent_dist.sample()),
    from a latent cache's stored (mean, std) and from the VAE's encoding alike."""
    import types

    from sit_fast.data import LatentCacheDataset
    from sit_fast.distributed import init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run")])
    trainer = Trainer(args, explicit, init_distributed())
    mean, std = torch.full((256, 4, 8, 8), 3.0), torch.full((256, 4, 8, 8), 2.0)
    y = torch.zeros(256, dtype=torch.long)
    trainer.dataset = LatentCacheDataset.__new__(LatentCacheDataset)
    first, labels = trainer.batch_to_latents((mean, std, y))
    second, _ = trainer.batch_to_latents((mean, std, y))
    for draw in (first, second):
        assert abs(float(draw.mean()) - 3.0) < 0.05 and abs(float(draw.std()) - 2.0) < 0.05
    assert not torch.equal(first, second) and torch.equal(labels, y)
    trainer.dataset = None
    trainer.codec = types.SimpleNamespace(encode=lambda x: (mean, std))
    draw, _ = trainer.batch_to_latents((torch.zeros(256, 3, 64, 64), y))
    assert abs(float(draw.mean()) - 3.0) < 0.05 and abs(float(draw.std()) - 2.0) < 0.05


def test_a_pause_waits_for_the_windows_gpu_work_before_its_clock_starts(monkeypatch):
    """Steps queued on a GPU finish inside the first host read of a checkpoint or grid: without a sync
    first, that time was taken off the window with the pause, and images/s and MFU read high."""
    from sit_fast.training.loop import LogWindow

    clock, events = [0.0], []
    monkeypatch.setattr("sit_fast.training.loop.time.perf_counter", lambda: clock[0])

    def synchronize(device):
        events.append(("sync", clock[0]))
        clock[0] += 5.0  # the queued steps: the window's time

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    window = LogWindow(torch.device("cpu"))
    window.device = torch.device("cuda")  # the clock's view of a GPU run; the tensors stay here
    with window.paused():
        clock[0] += 2.0  # the checkpoint itself
    assert events == [("sync", 0.0)] and clock[0] == 7.0
    assert window.start == 2.0  # 2 s of pause taken off; the 5 s of queued steps stay in the window


def test_the_log_line_has_the_mean_gradient_norm_before_clipping(tmp_path, monkeypatch):
    import dataclasses

    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    norms = {}
    for clip in ("none", "1e-3"):
        args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / clip), "--grad-clip", clip])
        trainer = Trainer(args, explicit, init_distributed())
        trainer.train_step(batch)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model_params
                                                      if p.grad is not None]))
        norms[clip] = (float(trainer.window.grad_norm_sum), trainer.window.applied, float(after))
    (unclipped, count, after), (before_clip, _, after_clip) = norms["none"], norms["1e-3"]
    assert count == 1 and unclipped > 0.01
    assert unclipped == pytest.approx(after, rel=1e-6)  # no clipping: the gradients' own norm
    assert before_clip == pytest.approx(unclipped, rel=1e-5)  # the same step, reported before clipping
    assert after_clip == pytest.approx(1e-3, rel=1e-3)

    # under DDP every rank has the same norm and the all-reduce sums them: the line divides by the ranks
    ops = []

    def two_ranks_summed(t, op=None):
        if t.dtype == torch.float64:  # the window's loss and norm sums
            ops.append(op)
            t.mul_(2)
        return t

    monkeypatch.setattr(loop, "all_reduce", two_ranks_summed)
    trainer.dist_info = dataclasses.replace(trainer.dist_info, world_size=2)
    trainer.window.restart()
    trainer.window.add_step(torch.tensor(1.5), torch.tensor(1.0), True)
    trainer.window.add_step(torch.tensor(9.0), torch.tensor(9.0), False)  # skipped: neither counts
    trainer.window.add_step(torch.tensor(2.5), torch.tensor(2.0), True)
    record = trainer.log(None)
    assert (record["loss"], record["grad_norm"]) == (2.0, 1.5)  # 4 * 2 / 2 ranks / 2 steps; 3 * 2 / 2 / 2
    assert ops in ([None], [torch.distributed.ReduceOp.SUM])  # a sum (all_reduce's default), not a max
    window = trainer.window  # the next window starts afresh
    assert (float(window.loss_sum), float(window.grad_norm_sum), window.applied, window.steps) == (0, 0, 0, 0)
    monkeypatch.undo()

    steps = []  # each step's norm, as train_step computes it
    norm = loop.total_grad_norm

    def recorded(params):
        value = norm(params)
        steps.append(float(value))
        return value

    monkeypatch.setattr(loop, "total_grad_norm", recorded)
    exp = tmp_path / "run"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "4", "--log-every", "2"])
    # upstream's "Train Loss: X, Train Steps/Sec: Y" first, as scripts reading its logs parse it
    logged = re.findall(r"\(step=\d{7}\) Train Loss: [0-9.]+, Train Steps/Sec: [0-9.]+, Grad Norm: ([0-9.]+), ",
                        (exp / "log.txt").read_text())
    assert len(steps) == 4 and logged == [f"{(steps[0] + steps[1]) / 2:.4f}", f"{(steps[2] + steps[3]) / 2:.4f}"]
    # the log file's progress (no bar there): the step of the total, and the time left until the last
    progress = re.findall(r"\(step=(\d{7})\) .*, Step: (\d+)/(\d+)(, ETA: \S+)?$", (exp / "log.txt").read_text(), re.M)
    assert [entry[:3] for entry in progress] == [("0000002", "2", "4"), ("0000004", "4", "4")], progress
    assert re.fullmatch(r", ETA: (\d+s|\d+m\d\ds|\d+h\d\dm)", progress[0][3]) and not progress[1][3], progress


def test_a_log_window_sums_the_loss_and_norm_of_applied_steps_only():
    """A step skipped on the device (a False flag tensor: fused AdamW's skip) adds neither its loss nor its
    gradient norm to the window, as a step skipped on the host (False) does not; `steps` counts all."""
    from sit_fast.training.loop import LogWindow

    window = LogWindow(torch.device("cpu"))
    losses, norms = torch.rand(6) + 0.5, torch.rand(6) + 2.0
    flags = [torch.tensor(True), torch.tensor(False), True, False, torch.tensor(True), True]
    for index, flag in enumerate(flags):
        if flag is False or (isinstance(flag, torch.Tensor) and not flag):  # what a skipped step brings
            losses[index], norms[index] = float("nan"), float("inf")
        window.add_step(losses[index], norms[index], flag)
    applied = [0, 2, 4, 5]
    assert window.steps == 6 and window.applied_steps() == 4
    assert float(window.loss_sum) == pytest.approx(float(losses[applied].double().sum()), rel=1e-12)
    assert float(window.grad_norm_sum) == pytest.approx(float(norms[applied].double().sum()), rel=1e-12)
    window.restart()  # the next log line's window: nothing of these steps, the device's count included
    assert (window.steps, window.applied_steps(), float(window.loss_sum), float(window.grad_norm_sum)) == (0, 0, 0, 0)


def test_the_step_that_compiles_the_model_is_left_out_of_the_throughput(tmp_path, monkeypatch, capsys):
    """--compile: the first step's minutes of compilation would make the first log line's steps/s, images/s
    and MFU a fraction of the run's; it is left out, its time said on a line of its own. A window of that
    step alone shows its own figure, compilation and all."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # what compiling costs is the clock's
    clock = [100.0]
    monkeypatch.setattr("sit_fast.training.loop.time.perf_counter", lambda: clock[0])
    real_step = loop.Trainer._train_step

    def step(self, batch, **kwargs):
        clock[0] += 30.0 if kwargs.get("pause_priming") is False else 1.0  # the compiling step, then 1 s each
        return real_step(self, batch, **kwargs)

    monkeypatch.setattr(loop.Trainer, "_train_step", step)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run"), "--compile"])
    trainer = loop.Trainer(args, explicit, init_distributed())
    trainer.window.restart()
    capsys.readouterr()
    trainer.train_step(batch)
    assert "step 1 compiled the model (--compile) and ran in 30.0 s, left out of the log's throughput" in \
        capsys.readouterr().err
    assert trainer.log(None)["steps_per_sec"] == pytest.approx(1 / 30)  # that step alone: its own figure
    line = capsys.readouterr().err
    assert ", Step: 0/" in line and "ETA" not in line, line  # no time left from a compile's rate
    trainer.step = 1
    trainer.compile_pending = True  # a window with the compiling step and two more
    for _ in range(3):
        trainer.train_step(batch)
    assert trainer.log(None)["steps_per_sec"] == pytest.approx(1.0)  # 2 steps in 2 s; with it, 3 in 32 s
    assert re.search(r", Step: 1/\d+, ETA: \S+$", capsys.readouterr().err, re.M)


def test_the_log_lines_throughput_counts_every_step_and_the_global_batch(tmp_path, monkeypatch):
    """Steps/s counts every step of the window, skipped ones too, and images/s is steps/s times the
    global batch (all ranks' images), not one rank's share of it."""
    import dataclasses

    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args

    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run")])
    trainer = loop.Trainer(args, explicit, init_distributed())
    trainer.dist_info = dataclasses.replace(trainer.dist_info, world_size=2)  # rank 0 of 2, 32 images each
    trainer.local_batch_size = 32
    monkeypatch.setattr(loop, "all_reduce", lambda t, op=None: t.mul_(2) if t.dtype == torch.float64 else t)
    clock = [100.0]
    monkeypatch.setattr("sit_fast.training.loop.time.perf_counter", lambda: clock[0])
    trainer.window.restart()
    for applied in (True, False, True, True):
        trainer.window.add_step(torch.tensor(1.0), torch.tensor(1.0), applied)
    clock[0] += 2.0
    record = trainer.log(None)
    assert (record["steps_per_sec"], record["images_per_sec"]) == (2.0, 128.0)
    assert record["loss"] == 1.0


@INTERPRETED
@pytest.mark.spread
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_fast_options_train_as_the_plain_model_does(tmp_path, monkeypatch, backend):
    """--fused-kernels on (the interpreted Triton kernels here), --grad-checkpointing and --compile
    together, through the Trainer: the same losses and, after 2 AdamW steps, the same weights as the
    plain eager model, each option in effect. aot_eager traces what Inductor would compile (graph
    capture, the kernels' fake and autograd registrations) without Inductor's code generation, which
    takes most of a minute here. Compiled code draws its random numbers (the label dropout) its own
    way unless told to fall back to eager's, so the comparison asks that of it."""
    import functools

    import torch._inductor.config as inductor_config

    from sit_fast.models import SiT_models

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    plain = [a for a in BASE if a not in ("--fused-kernels", "off")] + [
        "--global-batch-size", "4", "--max-steps", "2", "--log-every", "1", "--attn-backend", "sdpa"]
    train_main(plain + ["--fused-kernels", "off", "--exp-dir", str(tmp_path / "plain")])
    fused_op = importlib.import_module("kernels.gated_residual_layernorm_modulate")  # the module, not the op
    calls = []
    forward = fused_op.gated_residual_layernorm_modulate_forward
    monkeypatch.setattr(fused_op, "gated_residual_layernorm_modulate_forward",
                        lambda *args: calls.append(args[0].shape) or forward(*args))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with inductor_config.patch(fallback_random=True):
            train_main(plain + ["--fused-kernels", "on", "--grad-checkpointing", "--compile",
                                "--exp-dir", str(tmp_path / "fast")])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    # the fused op runs twice per block per forward, and each block again in backward (checkpointing)
    depth = SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=10).depth
    assert len(calls) == 2 * 2 * 2 * depth, len(calls)  # 2 steps
    assert graphs >= 1  # compiled
    losses = {name: logged_losses(str(tmp_path / name)) for name in ("plain", "fast")}
    assert len(losses["plain"]) == 2
    np.testing.assert_allclose(losses["fast"], losses["plain"], rtol=1e-5)
    a, b = (load_ckpt(tmp_path / name / "checkpoints" / "0000002.pt") for name in ("plain", "fast"))
    assert b["args"]["compile"] and b["args"]["grad_checkpointing"] and b["args"]["fused_kernels"] == "on"
    assert_states_close(a["model"], b["model"], "model")
    assert_states_close(a["ema"], b["ema"], "ema")


def test_exact_resume_with_compile(tmp_path):
    """Under --compile the label dropout draws from Inductor's generator, seeded from torch's global
    one, which the checkpoint keeps: 2 steps + resume + 2 == 4 straight, as in eager mode."""
    argv = BASE + ["--compile", "--ckpt-every", "2", "--log-every", "1"]
    try:
        train_main(argv + ["--exp-dir", str(tmp_path / "straight"), "--max-steps", "4"])
        train_main(argv + ["--exp-dir", str(tmp_path / "split"), "--max-steps", "2"])
        train_main(["--exp-dir", str(tmp_path / "split"), "--resume", "auto", "--max-steps", "4"])
    finally:
        torch._dynamo.reset()
    assert logged_losses(str(tmp_path / "split")) == logged_losses(str(tmp_path / "straight"))
    a, b = (load_ckpt(tmp_path / name / "checkpoints" / "0000004.pt") for name in ("straight", "split"))
    assert_states_close(a["model"], b["model"], "model")
    assert_states_close(a["ema"], b["ema"], "ema")


def _weights(path) -> torch.Tensor:
    """A checkpoint's model weights, as one flat float64 vector."""
    return torch.cat([v.double().flatten() for v in load_ckpt(path)["model"].values()])


def on_images(argv: list[str], root) -> list[str]:
    """argv with a folder of 64 random RGB images (4 classes), written at root, in place of the digits:
    the any_device tests run on the GPU machine too, whose Python may have no scikit-learn."""
    at = argv.index("--dataset")
    return argv[:at] + ["--data-path", make_image_folder(root, classes=4, per_class=16, size=8)] + argv[at + 2:]


@pytest.fixture
def no_sklearn(monkeypatch):
    """scikit-learn made unimportable, as on a machine without it."""
    for name in {"sklearn", *(name for name in sys.modules if name.startswith("sklearn."))}:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.any_device
def test_a_bf16_run_resumes_as_its_straight_run_on_the_gpu_too(tmp_path, no_sklearn):
    """bf16 autocast, with the fused kernels (--fused-kernels auto: on a GPU, compiled Triton; off on the
    CPU, where the interpreter would take minutes), SDPA, and on a GPU fused AdamW and the CUDA
    generator kept in checkpoints: 3 steps + resume + 3 train as 6 straight do. A GPU's atomics may
    leave two straight runs apart: the resumed run must be no further from the straight one than a
    second straight run is (4x, plus 2% of how far 3 steps move the weights; a resume that lost the
    noise generator's state lands about as far away as those 3 steps move them)."""
    on_cuda = torch.cuda.is_available()
    argv = [a for a in on_images(BASE, tmp_path / "images") if a not in ("--fused-kernels", "off")] + [
        "--fused-kernels", "auto", "--precision", "bf16", "--global-batch-size", "16", "--ckpt-every", "3",
        "--log-every", "1"]
    for name in ("straight", "again"):
        train_main(argv + ["--exp-dir", str(tmp_path / name), "--max-steps", "6"])
    train_main(argv + ["--exp-dir", str(tmp_path / "split"), "--max-steps", "3"])
    train_main(["--exp-dir", str(tmp_path / "split"), "--resume", "auto", "--max-steps", "6", "--num-workers", "0",
                "--no-progress"])
    final = {name: _weights(tmp_path / name / "checkpoints" / "0000006.pt") for name in ("straight", "again", "split")}
    moved = (final["straight"] - _weights(tmp_path / "straight" / "checkpoints" / "0000003.pt")).abs().mean()
    apart = (final["again"] - final["straight"]).abs().mean()
    resumed = (final["split"] - final["straight"]).abs().mean()
    assert moved > 0 and torch.isfinite(final["split"]).all()
    assert resumed <= 4 * apart + 0.02 * moved, (resumed, apart, moved)
    checkpoint = load_ckpt(tmp_path / "split" / "checkpoints" / "0000006.pt")
    assert checkpoint["arithmetic"]["precision"] == "bf16" and checkpoint["arithmetic"]["fused kernels"] is on_cuda
    assert isinstance(checkpoint["rng"][0]["cuda"], torch.Tensor) == on_cuda
    assert checkpoint["opt"]["param_groups"][0].get("fused") is (True if on_cuda else None)
    log = (tmp_path / "split" / "log.txt").read_text()
    assert "resuming" in log and all(np.isfinite(logged_losses(str(tmp_path / "split"))))
    if on_cuda:  # the log line's GPU figures
        assert re.search(r"\(step=0000006\) .*, TFLOP/s/GPU: [0-9.]+", log), log


@pytest.mark.any_device
def test_skip_nonfinite_skips_on_the_device_where_the_run_trains(tmp_path, monkeypatch, no_sklearn):
    """--skip-nonfinite with fused AdamW (CUDA's own on a GPU; on the CPU, its CPU version): a batch
    of NaNs at step 3 is skipped on the device, counted at the next log line and in the checkpoint,
    and the weights stay finite."""
    from sit_fast.training import loop

    if not torch.cuda.is_available():
        monkeypatch.setattr(loop, "fused_adamw", lambda device: True)
    poison_batch(monkeypatch, call=3)
    exp = tmp_path / "run"
    summary = train_main(on_images(BASE, tmp_path / "images") + ["--exp-dir", str(exp), "--max-steps", "6",
                                                                  "--ckpt-every", "6", "--log-every", "2",
                                                                  "--skip-nonfinite"])
    assert summary["nonfinite_skipped"] == 1 and np.isfinite(summary["loss"])
    log = (exp / "log.txt").read_text()
    assert "1 step(s) up to step 4: non-finite gradients, skipped (1 so far)" in log, log
    checkpoint = load_ckpt(exp / "checkpoints" / "0000006.pt")
    assert checkpoint["nonfinite_skipped"] == 1 and checkpoint["opt"]["param_groups"][0]["fused"]
    assert all(torch.isfinite(v).all() for v in [*checkpoint["model"].values(), *checkpoint["ema"].values()])


# ----------------------------------------------------------------------------- single process

def test_seed_is_global_seed_as_in_sample_py():
    """train.py takes --seed for --global-seed (sample.py takes both); given, it is an explicit flag."""
    from sit_fast.training.args import parse_args

    args, explicit = parse_args(["--seed", "3"])
    assert args.global_seed == 3 and "global_seed" in explicit
    assert parse_args(["--global-seed", "3"])[0].global_seed == 3
    with pytest.raises(UserError, match=r"^--global-seed and --seed are two names of one flag: give it once"):
        parse_args(["--global-seed", "3", "--seed", "4"])
    with pytest.raises(UserError, match=r"--global-seed/--seed: must be an integer between -\(2\*\*63 - 1\) and "
                                        r"2\*\*63 - 1, got 18446744073709551616"):  # torch would take it as seed 0
        parse_args(["--global-seed", str(2**64)])


@pytest.mark.parametrize("flag", ["--data-path", "--latent-cache", "--vae", "--ckpt", "--results-dir", "--exp-dir",
                                  "--resume"])
def test_an_empty_path_is_refused_not_read_as_the_flag_not_given(flag):
    """`--exp-dir "$EXP"` with EXP unset: refused, where it was taken as no --exp-dir."""
    from sit_fast.training.args import parse_args

    with pytest.raises(UserError, match=rf"^argument {flag}: must be a path or a name(?: or none)?, got an empty "):
        parse_args(BASE + [flag, ""])


def test_single_process_resume_flags_win_and_identity_kept(tmp_path):
    exp = str(tmp_path / "run")
    summary = train_main(BASE + ["--exp-dir", exp, "--max-steps", "6", "--ckpt-every", "3"])
    assert summary["step"] == 6 and summary["last_checkpoint"].endswith("0000006.pt")
    # Flags given on resume win (max-steps, intervals), the rest comes from the checkpoint.
    summary = train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "8", "--ckpt-every", "100",
                          "--no-progress", "--fused-kernels", "off"])
    assert summary["step"] == 8
    ckpt = load_ckpt(os.path.join(exp, "checkpoints", "0000008.pt"))
    assert ckpt["args"]["model"] == "SiT-T/4" and ckpt["args"]["ckpt_every"] == 100
    assert ckpt["args"]["dataset"] == "digits" and ckpt["args"]["global_batch_size"] == 64


def test_ckpt_keep_deletes_the_older_checkpoints_but_the_milestones(tmp_path, monkeypatch):
    """--ckpt-keep N deletes a run's older checkpoints past the newest N once a newer one is written,
    keeping the multiples of --ckpt-keep-every; a resume inherits both; one that cannot be deleted is a
    warning, and the run goes on; without --ckpt-keep, every checkpoint is kept."""
    exp = tmp_path / "run"
    names = lambda: sorted(os.listdir(exp / "checkpoints"))  # noqa: E731
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "6", "--ckpt-every", "1", "--ckpt-keep", "2",
                       "--ckpt-keep-every", "4"])
    assert names() == ["0000004.pt", "0000005.pt", "0000006.pt"]
    log = (exp / "log.txt").read_text()
    assert f"deleted checkpoint {exp / 'checkpoints' / '0000003.pt'} (--ckpt-keep 2)" in log, log
    assert load_ckpt(str(exp / "checkpoints" / "0000006.pt"))["args"]["ckpt_keep"] == 2

    removing = os.remove

    def refuse(path):
        if os.path.basename(path) == "0000005.pt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        removing(path)

    monkeypatch.setattr(os, "remove", refuse)
    summary = train_main(BASE + ["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "8"])
    assert summary["step"] == 8
    assert names() == ["0000004.pt", "0000005.pt", "0000007.pt", "0000008.pt"]
    log = (exp / "log.txt").read_text()
    assert (f"--ckpt-keep 2: cannot delete {exp / 'checkpoints' / '0000005.pt'} (Permission denied); "
            f"it is kept") in log, log
    monkeypatch.setattr(os, "remove", removing)

    train_main(BASE + ["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "10", "--ckpt-keep", "none",
                       "--ckpt-keep-every", "2"])
    assert names() == ["0000004.pt", "0000005.pt", "0000007.pt", "0000008.pt", "0000009.pt", "0000010.pt"]
    assert "--ckpt-keep-every 2 has no effect without --ckpt-keep: every checkpoint is kept" in (
        exp / "log.txt").read_text()

    assert "is not a multiple" not in log
    other = tmp_path / "other"
    train_main(BASE + ["--exp-dir", str(other), "--max-steps", "1", "--ckpt-every", "3", "--ckpt-keep", "1",
                       "--ckpt-keep-every", "2"])
    assert ("--ckpt-keep-every 2 is not a multiple of --ckpt-every 3: the milestones kept are the checkpoints at "
            "the multiples of both, step 6, 12, ...") in (other / "log.txt").read_text()


def test_ckpt_keep_leaves_later_steps_and_other_files_alone(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ["0000002.pt", "0000004.pt", "0000006.pt", "0000008.pt", "0000009.pt", "notes.pt", "0000003.pt.bak"]:
        (folder / name).write_bytes(b"")
    paths = lambda *steps: [str(folder / f"{s:07d}.pt") for s in steps]  # noqa: E731
    assert checkpointing.checkpoints_past_keep(str(folder), 6, 1) == paths(4, 2)
    assert checkpointing.checkpoints_past_keep(str(folder), 6, 2, keep_every=4) == paths(2)
    assert checkpointing.checkpoints_past_keep(str(folder), 9, 3) == paths(4, 2)
    assert checkpointing.checkpoints_past_keep(str(folder), 9, 5) == []
    assert checkpointing.checkpoints_past_keep(str(tmp_path / "none"), 9, 1) == []
    (folder / "9.pt").write_bytes(b"")  # a copy of step 9 under another name: neither is deleted at step 9
    assert checkpointing.checkpoints_past_keep(str(folder), 9, 1) == paths(8, 6, 4, 2)
    from sit_fast.training.args import parse_args
    with pytest.raises(UserError, match=r"^argument --ckpt-keep: must be a positive integer or none, got 0 "):
        parse_args(BASE + ["--ckpt-keep", "0"])


def test_switches_and_optional_values_can_be_unset_on_resume(tmp_path):
    """What a run set is inherited by its resume unless given again: --no-X turns a switch off and
    `none` unsets --grad-clip and --max-steps."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2", "--skip-nonfinite",
                       "--grad-clip", "1"])
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "3", "--resume", "auto"])
    inherited = load_ckpt(os.path.join(exp, "checkpoints", "0000003.pt"))["args"]
    assert (inherited["skip_nonfinite"], inherited["grad_clip"]) == (True, 1.0)
    summary = train_main(BASE + ["--exp-dir", exp, "--resume", "auto", "--no-skip-nonfinite", "--grad-clip", "none",
                                 "--max-steps", "none", "--epochs", "1"])
    unset = load_ckpt(summary["last_checkpoint"])["args"]
    assert (unset["skip_nonfinite"], unset["grad_clip"], unset["max_steps"]) == (False, None, None)
    assert summary["step"] == 28  # the end of the first epoch (1797 digits in batches of 64)


def test_sample_every_none_makes_no_grids(tmp_path):
    """--sample-every none turns the EMA sample grids off, also on a resume of a run that made them;
    0 is refused in one line that names the way to turn them off."""
    exp = tmp_path / "run"
    grids = ["--num-sample-images", "2", "--sample-steps", "1"]
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "2", "--sample-every", "1", *grids])
    assert sorted(os.listdir(exp / "samples")) == ["0000001.png", "0000002.png"]
    summary = train_main(["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "4", "--no-progress",
                          "--fused-kernels", "off", "--sample-every", "none"])
    assert summary["step"] == 4 and sorted(os.listdir(exp / "samples")) == ["0000001.png", "0000002.png"]
    assert load_ckpt(summary["last_checkpoint"])["args"]["sample_every"] is None
    with pytest.raises(UserError) as error:
        train_main(BASE + ["--exp-dir", str(tmp_path / "other"), "--sample-every", "0"])
    assert str(error.value) == ("argument --sample-every: must be a positive integer or none, got 0 "
                                "(see train.py --help)")


def test_a_train_eps_that_changes_nothing_is_said(tmp_path):
    """Linear and GVP velocity models train on all of [0, 1] whatever --train-eps is (as upstream): given,
    the log says so; a noise model keeps it from the ends, and nothing is said."""
    train_main(BASE + ["--exp-dir", str(tmp_path / "velocity"), "--max-steps", "1", "--train-eps", "0.01"])
    assert ("--train-eps 0.01 has no effect: a Linear velocity model trains on all of [0, 1] whatever it is"
            in (tmp_path / "velocity" / "log.txt").read_text())
    train_main(BASE + ["--exp-dir", str(tmp_path / "noise"), "--max-steps", "1", "--train-eps", "0.01",
                       "--prediction", "noise"])
    assert "has no effect" not in (tmp_path / "noise" / "log.txt").read_text()


def test_grid_flags_with_no_grids_are_said_to_change_nothing(tmp_path):
    """--sample-every none makes no sample grids: the grids' flags given with it are named in the log as
    having no effect; with grids, nothing is said."""
    grid = ["--cfg-scale", "2", "--sample-steps", "4", "--max-steps", "1"]
    train_main(BASE + ["--exp-dir", str(tmp_path / "none"), "--sample-every", "none", *grid])
    assert ("--cfg-scale, --sample-steps have no effect with --sample-every none: there are no sample grids"
            in (tmp_path / "none" / "log.txt").read_text())
    train_main(BASE + ["--exp-dir", str(tmp_path / "grids"), *grid])
    assert "no effect with --sample-every none" not in (tmp_path / "grids" / "log.txt").read_text()


def test_a_loss_weight_that_changes_nothing_is_said(tmp_path):
    """A velocity model's loss is unweighted whatever --loss-weight is (as upstream): given, the log
    says so; a score model's is weighted, and nothing is said."""
    train_main(BASE + ["--exp-dir", str(tmp_path / "velocity"), "--max-steps", "1", "--loss-weight", "likelihood"])
    assert ("--loss-weight likelihood has no effect: a velocity model's loss is unweighted (as upstream); it weights "
            "--prediction score or noise" in (tmp_path / "velocity" / "log.txt").read_text())
    train_main(BASE + ["--exp-dir", str(tmp_path / "score"), "--max-steps", "1", "--loss-weight", "likelihood",
                       "--prediction", "score", "--path-type", "GVP"])
    assert "has no effect" not in (tmp_path / "score" / "log.txt").read_text()


@pytest.mark.parametrize("flags,start", [
    (["--prediction", "noise", "--loss-weight", "velocity", "--train-eps", "0"], "error: --train-eps must be > 0 "
     "here: the Linear path with a noise model has a velocity loss weight that is infinite or undefined"),
    (["--prediction", "noise", "--sample-eps", "0", "--sample-every", "5"], "error: --sample-eps must be > 0 "
     "here: the Linear path with a noise model is singular at t = 0 and t = 1")])
def test_an_eps_that_leaves_a_singular_end_is_refused_before_the_run_starts(tmp_path, capsys, flags, start):
    """An eps of 0 that puts a singular end of the path in the training interval, or in the sample grids'
    (when there are grids), is one line naming the flag before the first step, with no run folder left;
    without grids --sample-eps 0 is not used, and the run goes on."""
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "1", *flags]) == 2
    line, _ = the_error_line(capsys)
    assert line.startswith(start), line
    assert not (tmp_path / "exp").exists(), "a run that never started left its folder behind"
    if "--sample-eps" in flags:
        assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "1", "--prediction", "noise",
                               "--sample-eps", "0", "--sample-every", "none"]) == 0


def test_digits_train_in_pixel_space_unless_a_vae_is_given(tmp_path):
    """--dataset digits (grayscale, which the SD VAEs cannot encode) picks --vae none by itself and
    says so; an explicit VAE is refused in one line that names the fix."""
    argv = [a for a in BASE if a not in ("--vae", "none")]
    assert len(argv) == len(BASE) - 2
    summary = train_main(argv + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert load_ckpt(summary["last_checkpoint"])["args"]["vae"] == "none"
    assert "--dataset digits: pixel space (--vae none" in (tmp_path / "run" / "log.txt").read_text()
    with pytest.raises(UserError) as error:
        train_main(argv + ["--exp-dir", str(tmp_path / "other"), "--max-steps", "1", "--vae", "ema"])
    assert str(error.value) == "--dataset digits has 1-channel images; the VAE needs RGB: use --vae none"


def fail_second_checkpoint_write(monkeypatch, error: OSError):
    """The second checkpoint's torch.save writes half of the file, then raises `error`; returns the real save."""
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", failing_save)
    return real_save


def test_a_resume_runs_adamw_as_this_device_does_not_as_the_checkpoints(tmp_path, monkeypatch):
    """The saved param groups replaced the constructor's: a checkpoint of a CUDA run (fused=True, step
    counts in float32) resumed on the CPU ran fused, and a CPU one on CUDA unfused."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2"])
    path = os.path.join(exp, "checkpoints", "0000002.pt")
    ckpt = load_ckpt(path)
    for group in ckpt["opt"]["param_groups"]:
        group["fused"] = True
    for state in ckpt["opt"]["state"].values():
        state["step"] = state["step"].float()
    torch.save(ckpt, path)
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append({group.get("fused") for group in self.param_groups})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert train_main(BASE + ["--exp-dir", exp, "--max-steps", "4", "--resume", "auto"])["step"] == 4
    assert seen == [{None}, {None}]  # as a new CPU run's AdamW(fused=None)


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    exp = str(tmp_path / "run")
    real_save = fail_second_checkpoint_write(monkeypatch, OSError("simulated crash while writing"))
    with pytest.raises(OSError, match="simulated crash"):
        train_main(BASE + ["--exp-dir", exp, "--max-steps", "8", "--ckpt-every", "4"])
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    ckpt_dir = os.path.join(exp, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["0000004.pt"], "a partial file or a temporary file was left behind"
    assert load_ckpt(os.path.join(ckpt_dir, "0000004.pt"))["step"] == 4
    # A damaged newer file (say, a copy cut short) is skipped by --resume auto with a warning.
    with open(os.path.join(ckpt_dir, "0000006.pt"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    summary = train_main(BASE + ["--exp-dir", exp, "--max-steps", "8", "--ckpt-every", "4", "--resume", "auto"])
    assert summary["step"] == 8
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert "skipping" in log and "0000006.pt" in log
    assert "--resume auto: resuming from" in log and "0000004.pt (the latest valid checkpoint)" in log


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_naming_the_kept_one(tmp_path, monkeypatch):

    exp = str(tmp_path / "run")
    fail_second_checkpoint_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(UserError) as info:
        train_main(BASE + ["--exp-dir", exp, "--max-steps", "4", "--ckpt-every", "2"])
    first = os.path.join(exp, "checkpoints", "0000002.pt")
    assert str(info.value) == (
        f"step 4: cannot write checkpoint {os.path.join(exp, 'checkpoints', '0000004.pt')} (No space left on "
        f"device); the last checkpoint, {first}, is kept: continue from it with --resume auto once the folder has "
        f"room and can be written")
    assert os.listdir(os.path.join(exp, "checkpoints")) == ["0000002.pt"]
    with open(os.path.join(exp, "log.txt")) as f:
        assert "error: step 4: cannot write checkpoint" in f.read()
    # the checkpoints folder deleted while the run went on: said so, not a traceback of the temporary file
    from sit_fast.training import loop

    real_save = loop.atomic_torch_save

    def deleted(obj, path):
        shutil.rmtree(os.path.join(tmp_path / "gone", "checkpoints"))
        return real_save(obj, path)

    monkeypatch.setattr(loop, "atomic_torch_save", deleted)
    with pytest.raises(UserError, match=r"^step 2: cannot write checkpoint .*0000002\.pt: the folder .*checkpoints is "
                                        r"gone \(deleted while the run went on\?\); put it back and continue with "
                                        r"--resume auto, or start again$"):
        train_main(BASE + ["--exp-dir", str(tmp_path / "gone"), "--max-steps", "2", "--ckpt-every", "2"])
    monkeypatch.setattr(loop, "atomic_torch_save", real_save)
    # the first checkpoint's write: nothing to continue from, so the advice is to run again
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", full)
    with pytest.raises(UserError) as info:
        train_main(BASE + ["--exp-dir", str(tmp_path / "other"), "--max-steps", "4", "--ckpt-every", "4"])
    assert str(info.value).endswith("(No space left on device); no checkpoint was written yet: run again once the "
                                    "folder has room and can be written"), info.value


def test_a_failing_disk_while_writing_a_checkpoint_is_one_line_naming_the_kept_one(tmp_path, monkeypatch, capsys):
    """An I/O error writing a checkpoint (a failing disk's EIO, not a write the filesystem refused) ended
    the run in a traceback: one line naming the file, the OS's error and the checkpoint kept, and no
    temporary file left."""
    exp = str(tmp_path / "run")
    fail_second_checkpoint_write(monkeypatch, OSError(errno.EIO, os.strerror(errno.EIO)))
    assert run_cli(BASE + ["--exp-dir", exp, "--max-steps", "4", "--ckpt-every", "2"]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    first = os.path.join(exp, "checkpoints", "0000002.pt")
    assert stderr.strip().splitlines()[-1] == (
        f"error: step 4: cannot write checkpoint {os.path.join(exp, 'checkpoints', '0000004.pt')} (Input/output "
        f"error, EIO); the last checkpoint, {first}, is kept: continue from it with --resume auto once the disk is "
        f"fixed (the system log says what failed)")
    assert os.listdir(os.path.join(exp, "checkpoints")) == ["0000002.pt"]


@pytest.mark.slow  # a full disk's checkpoint is test_a_rank_that_fails_ends_every_rank_with_one_line
def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_the_run_resumes_from_the_last(tmp_path):
    """A checkpoint grown past the process's file size limit (`ulimit -f`, a job scheduler's; a filesystem's,
    FAT32's 4 GiB) fails with EFBIG (Python ignores SIGXFSZ), which was not taken for a write the filesystem
    refused: the run ended in a traceback, where a full disk is one line. A real limit here (setrlimit, in the
    process started): one line naming the limit and the checkpoint kept, no temporary file left, and the run
    resumes from that checkpoint once the limit is gone."""
    import resource

    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    kept = os.path.join(exp, "checkpoints", "0000002.pt")
    assert os.path.getsize(kept) > 2**20

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    command = [sys.executable, os.path.join(REPO, "train.py")] + BASE + [
        "--exp-dir", exp, "--max-steps", "4", "--ckpt-every", "2", "--resume", "auto"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, preexec_fn=limit, timeout=240,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"error: step 4: cannot write checkpoint {os.path.join(exp, 'checkpoints', '0000004.pt')} (File too large: "
        f"past the file size limit of the process (`ulimit -f`) or of the filesystem (FAT32's 4 GiB)); the last "
        f"checkpoint, {kept}, is kept: continue from it with --resume auto once the file size limit is raised")
    assert os.listdir(os.path.join(exp, "checkpoints")) == ["0000002.pt"]  # no partial file, no temporary one
    summary = train_main(BASE + ["--exp-dir", exp, "--max-steps", "4", "--ckpt-every", "2", "--resume", "auto"])
    assert summary["step"] == 4
    assert sorted(os.listdir(os.path.join(exp, "checkpoints"))) == ["0000002.pt", "0000004.pt"]


def report_free_space(monkeypatch, tmp_path, free):
    """shutil.disk_usage says `free` bytes are free on tmp_path's filesystem (free: a count, or an
    OSError to raise); elsewhere, the real figures. Returns the list of the paths asked about there."""
    real, asked = shutil.disk_usage, []

    def disk_usage(path):
        if not os.path.realpath(path).startswith(os.path.realpath(tmp_path)):
            return real(path)
        asked.append(str(path))
        if isinstance(free, OSError):
            raise free
        return real(path)._replace(free=free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def test_a_checkpoint_folder_without_room_for_a_checkpoint_is_warned_of_at_the_start_and_after_each(
        tmp_path, monkeypatch):
    """A checkpoint that the disk has no room for stops the run with the steps since the last one lost:
    the free space is compared with a checkpoint's size (the tensors' estimate in a new run, the file
    resumed or just written) as training starts and after each checkpoint but the last, and a warning
    names the folder, both figures, the step of the next checkpoint and what to do. The run goes on."""
    from sit_fast.files import amount
    from sit_fast.training import loop

    estimates = []
    real_estimate = checkpointing.checkpoint_bytes

    def estimate(*args):
        estimates.append(real_estimate(*args))
        return estimates[-1]

    monkeypatch.setattr(loop, "checkpoint_bytes", estimate)
    report_free_space(monkeypatch, tmp_path, 2**20)
    summary = train_main(BASE + ["--results-dir", str(tmp_path / "results"), "--max-steps", "4", "--ckpt-every", "2"])
    exp = summary["exp_dir"]
    ckpts = os.path.join(exp, "checkpoints")
    second = checkpoint_path(ckpts, 2)
    size = os.path.getsize(second)
    log = Path(exp, "log.txt").read_text()
    assert log.count("will not fit") == 2, log  # at the start and after step 2; none after the last checkpoint
    assert len(estimates) == 1 and size <= estimates[0] <= 1.1 * size + 2**21, (estimates, size)
    start = (f"{ckpts} has 1 MiB free, less than a checkpoint of this run takes ({amount(estimates[0])}): the first, "
             f"at step 2, will not fit, and the run would stop there with its steps lost; make room there, or pass "
             f"another --results-dir\n")
    after = (f"step 2: {ckpts} has 1 MiB free left, less than a checkpoint of this run takes ({amount(size)}): the "
             f"next, at step 4, will not fit, and the run would stop there with the steps since step 2 lost; make room "
             f"there before then, or stop the run and resume {second} into another --exp-dir\n")
    assert start in log and after in log, log
    assert log.index("training from step 0") < log.index(start) < log.index(f"saved checkpoint {second}")
    # a resume: the size of the checkpoint resumed, and the next checkpoint the end of the run (--max-steps 5)
    summary = train_main(BASE + ["--exp-dir", exp, "--resume", "auto", "--max-steps", "5", "--ckpt-every", "2"])
    assert summary["step"] == 5 and len(estimates) == 1
    log = Path(exp, "log.txt").read_text()
    resumed = (f"{ckpts} has 1 MiB free, less than a checkpoint of this run takes "
               f"({amount(os.path.getsize(checkpoint_path(ckpts, 4)))}): the next, at step 5, will not fit, and the "
               f"run would stop there with the steps since step 4 lost; make room there, or resume into another "
               f"--exp-dir\n")
    assert resumed in log and log.count("will not fit") == 3, log


def test_a_checkpoint_folder_with_room_or_whose_free_space_cannot_be_read_is_not_warned_of(tmp_path, monkeypatch):
    """The free space is asked for as training starts and after each checkpoint but the last; with room
    for a checkpoint nothing is said, and a filesystem that cannot say (an OSError) costs the check, not
    the run."""
    for name, free in (("room", 10 * 2**30), ("unknown", OSError(errno.ENOSYS, "Function not implemented"))):
        asked = report_free_space(monkeypatch, tmp_path, free)
        exp = tmp_path / name
        summary = train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "2", "--ckpt-every", "1"])
        assert summary["step"] == 2 and os.path.basename(summary["last_checkpoint"]) == "0000002.pt"
        assert asked == [str(exp / "checkpoints")] * 2, asked  # at the start and after step 1
        log = (exp / "log.txt").read_text()
        assert "saved checkpoint" in log and "will not fit" not in log, log


def test_a_data_error_mid_run_saves_the_steps_taken_and_names_the_checkpoint(tmp_path, monkeypatch):
    """An unreadable image in batch 4 (--ckpt-every far off) stopped the run with the 3 steps taken
    unsaved; they are saved first, and a resume once the data reads goes on as if nothing happened."""
    from sit_fast.data import DataError, DigitsDataset

    real, calls = DigitsDataset.__getitems__, {"n": 0}

    def failing(self, key):
        calls["n"] += 1
        if calls["n"] == 4:
            raise DataError("cannot read image somewhere/3.png (damaged): remove or replace it")
        return real(self, key)

    exp, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    monkeypatch.setattr(DigitsDataset, "__getitems__", failing)
    with pytest.raises(DataError) as info:
        train_main(BASE + ["--exp-dir", exp, "--max-steps", "6"])
    saved = os.path.join(exp, "checkpoints", "0000003.pt")
    assert str(info.value) == (f"cannot read image somewhere/3.png (damaged): remove or replace it (stopped before "
                               f"step 4; last checkpoint {saved}: fix the data, then continue with --resume {saved} "
                               f"(or --resume auto))")
    monkeypatch.setattr(DigitsDataset, "__getitems__", real)
    assert train_main(BASE + ["--exp-dir", exp, "--max-steps", "6", "--resume", "auto"])["step"] == 6
    train_main(BASE + ["--exp-dir", straight, "--max-steps", "6"])
    resumed, whole = (load_ckpt(os.path.join(d, "checkpoints", "0000006.pt")) for d in (exp, straight))
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][name], whole[key][name]) for name in whole[key]), key


def test_a_data_error_before_the_first_step_says_nothing_was_saved(tmp_path, monkeypatch):
    from sit_fast.data import DataError, DigitsDataset

    def failing(self, key):
        raise DataError("cannot read image x.png (damaged): remove or replace it")

    monkeypatch.setattr(DigitsDataset, "__getitems__", failing)
    with pytest.raises(DataError, match=r"remove or replace it \(stopped before step 1; no checkpoint written yet\)$"):
        train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "6"])
    assert list_checkpoints(str(tmp_path / "run" / "checkpoints")) == []


def poison_batch(monkeypatch, call: int) -> None:
    """Make the `call`-th training batch NaN."""
    from sit_fast.training import loop

    real = loop.Trainer.batch_to_latents
    calls = {"n": 0}

    def poisoned(self, batch):
        x, y = real(self, batch)
        calls["n"] += 1
        return (x * float("nan") if calls["n"] == call else x), y

    monkeypatch.setattr(loop.Trainer, "batch_to_latents", poisoned)


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, capsys, monkeypatch):
    exp = str(tmp_path / "run")
    poison_batch(monkeypatch, call=6)
    code = run_cli(BASE + ["--exp-dir", exp, "--max-steps", "16", "--ckpt-every", "4", "--log-every", "100"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert "non-finite at step 6 (noticed at step 8)" in err and "last good checkpoint" in err, err
    assert "0000004.pt" in err
    assert sorted(os.listdir(os.path.join(exp, "checkpoints"))) == ["0000004.pt"]  # no NaN checkpoint written
    with open(os.path.join(exp, "log.txt")) as f:
        assert "error: the loss became non-finite at step 6" in f.read()  # the log keeps why the run stopped


def test_skip_nonfinite_counts(tmp_path, monkeypatch):
    """The skipped step is counted, and the count is carried on by a resumed run."""
    poison_batch(monkeypatch, call=3)
    summary = train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "6", "--ckpt-every", "6",
                                 "--skip-nonfinite"])
    assert summary["nonfinite_skipped"] == 1 and np.isfinite(summary["loss"])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "step 3: non-finite gradients, step skipped (1 so far)" in log, log
    assert re.search(r"\(step=0000006\) Train Loss: [0-9.]+, .*, skipped non-finite steps: 1, Step: 6/6\n", log)
    resumed = train_main(["--exp-dir", str(tmp_path / "run"), "--resume", "auto", "--max-steps", "8",
                          "--num-workers", "0", "--no-progress"])
    assert resumed["nonfinite_skipped"] == 1 and np.isfinite(resumed["loss"])


@pytest.mark.parametrize("fused", [False, True])
def test_skip_nonfinite_stops_a_run_whose_every_step_is_skipped(tmp_path, monkeypatch, fused):
    """Skipped steps in a row across whole log windows, up to the limit (4 here), stop the run in one line
    naming the first of them and the last checkpoint; a window with a step applied starts the count over."""
    from sit_fast.training import loop

    monkeypatch.setattr(loop, "SKIPPED_IN_A_ROW_LIMIT", 4)
    monkeypatch.setattr(loop, "fused_adamw", lambda device: fused)
    real, calls = loop.Trainer.batch_to_latents, []

    def poisoned(self, batch):  # steps 3 and 4, then from step 6 on
        x, y = real(self, batch)
        calls.append(1)
        return (x * float("nan") if len(calls) in (3, 4) or len(calls) >= 6 else x), y

    monkeypatch.setattr(loop.Trainer, "batch_to_latents", poisoned)
    exp = tmp_path / "run"
    assert run_cli(BASE + ["--exp-dir", str(exp), "--max-steps", "20", "--ckpt-every", "2", "--log-every", "2",
                           "--skip-nonfinite"]) == 2
    log = (exp / "log.txt").read_text()
    assert (f"error: every step from step 7 to step 10 had non-finite gradients and was skipped (--skip-nonfinite): "
            f"the run has diverged; last checkpoint: {exp / 'checkpoints' / '0000008.pt'}; resume from one from "
            f"before the divergence with a lower --lr or --grad-clip") in log, log
    assert len(calls) == 10


def test_skip_nonfinite_skips_a_step_whose_gradients_overflow_with_a_finite_loss(tmp_path, monkeypatch):
    """--skip-nonfinite tests the gradients, not the loss: a step with a finite loss whose gradients are
    not finite (an overflow in the backward pass; step 2 here) is skipped and counted, and the weights
    stay finite to the checkpoint."""
    from sit_fast.training import loop

    norm, calls = loop.total_grad_norm, []

    def overflowing(params):
        calls.append(1)
        if len(calls) == 2:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("inf")
        return norm(params)

    monkeypatch.setattr(loop, "total_grad_norm", overflowing)
    summary = train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "3", "--ckpt-every", "3",
                                 "--skip-nonfinite"])
    assert len(calls) == 3 and summary["nonfinite_skipped"] == 1 and np.isfinite(summary["loss"])


def test_skip_nonfinite_with_fused_adamw_skips_on_the_device(tmp_path, monkeypatch):
    """With fused AdamW (CUDA's; here on the CPU) a step with non-finite gradients is skipped on the
    device: train_step returns a device flag, no bool; the parameters, the EMA and AdamW's state are
    left as they were; the skip is counted at the next log step."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args

    monkeypatch.setattr(loop, "fused_adamw", lambda device: True)
    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run"), "--skip-nonfinite"])
    trainer = loop.Trainer(args, explicit, init_distributed())
    assert trainer.opt.param_groups[0]["fused"]
    trainer.batch_to_latents = lambda batch: batch  # train_step's batches: latents and labels as given
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, trainer.channels, trainer.latent_size, trainer.latent_size, generator=generator)
    y = torch.randint(0, args.num_classes, (8,), generator=generator)
    good = (x, y)
    loss, applied = trainer.train_step(good)
    assert isinstance(applied, torch.Tensor) and bool(applied)
    before = [t.clone() for t in trainer.model_params + trainer.ema_params]
    weight = next(p for p in trainer.model_params if p.requires_grad)
    state = {k: v.clone() for k, v in trainer.opt.state[weight].items()}
    loss, applied = trainer.train_step((x * float("nan"), y))
    assert isinstance(applied, torch.Tensor) and not bool(applied)
    for old, new in zip(before, trainer.model_params + trainer.ema_params):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    for key, value in trainer.opt.state[weight].items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    trainer.train_step(good)  # a good step after it is applied, to the model and the EMA
    changed = [not torch.equal(old, new) for old, new in zip(before, trainer.model_params + trainer.ema_params)]
    n = len(trainer.model_params)
    assert any(changed[:n]) and any(changed[n:])

    poison_batch(monkeypatch, call=3)
    summary = train_main(BASE + ["--exp-dir", str(tmp_path / "run2"), "--max-steps", "6", "--ckpt-every", "6",
                                 "--log-every", "2", "--skip-nonfinite"])
    assert summary["nonfinite_skipped"] == 1 and np.isfinite(summary["loss"])
    log = (tmp_path / "run2" / "log.txt").read_text()
    assert "1 step(s) up to step 4: non-finite gradients, skipped (1 so far)" in log, log
    ckpt = torch.load(tmp_path / "run2" / "checkpoints" / "0000006.pt", weights_only=True)
    assert ckpt["nonfinite_skipped"] == 1


def test_a_checkpoint_between_log_lines_counts_the_steps_skipped_on_the_device(tmp_path, monkeypatch):
    """With fused AdamW the skips are counted on the device and read at log and checkpoint steps: a
    checkpoint before the next log line records the step skipped since the last one, so that a run
    resumed from it carries the count on."""
    from sit_fast.training import loop

    monkeypatch.setattr(loop, "fused_adamw", lambda device: True)
    poison_batch(monkeypatch, call=3)
    exp = tmp_path / "run"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "5", "--ckpt-every", "4", "--log-every", "100",
                       "--skip-nonfinite"])
    assert load_ckpt(exp / "checkpoints" / "0000004.pt")["nonfinite_skipped"] == 1


def test_steps_skipped_on_the_device_are_said_per_log_line_with_the_runs_total(tmp_path, monkeypatch):
    """With fused AdamW each log line's warning counts the steps skipped since the previous line, then
    the run's total so far, which the log line itself ends with."""
    from sit_fast.training import loop

    monkeypatch.setattr(loop, "fused_adamw", lambda device: True)
    real, calls = loop.Trainer.batch_to_latents, []

    def poisoned(self, batch):
        x, y = real(self, batch)
        calls.append(1)
        return (x * float("nan") if len(calls) in (1, 3, 4) else x), y

    monkeypatch.setattr(loop.Trainer, "batch_to_latents", poisoned)
    exp = tmp_path / "run"
    summary = train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "4", "--ckpt-every", "4", "--log-every", "2",
                                 "--skip-nonfinite"])
    assert summary["nonfinite_skipped"] == 3
    log = (exp / "log.txt").read_text()
    assert "1 step(s) up to step 2: non-finite gradients, skipped (1 so far)" in log, log
    assert "2 step(s) up to step 4: non-finite gradients, skipped (3 so far)" in log, log
    assert re.search(r"\(step=0000002\) .*, skipped non-finite steps: 1, Step: 2/4, ETA: ", log), log
    assert re.search(r"\(step=0000004\) .*, skipped non-finite steps: 3, Step: 4/4\n", log), log


def test_a_nonfinite_loss_stops_the_run_at_the_next_log_line(tmp_path, monkeypatch):
    """The log line reads the loss: a non-finite one stops the run there, not at the next checkpoint,
    which may be thousands of steps later."""
    from sit_fast.training.loop import NonFiniteLossError

    poison_batch(monkeypatch, call=3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 3 \(noticed at step 4\); no checkpoint written"):
        train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "12", "--ckpt-every", "100",
                           "--log-every", "4"])


def test_a_resumed_run_names_its_checkpoint_as_the_last_good_one(tmp_path, monkeypatch):
    """A loss that turns non-finite before a resumed run writes a checkpoint of its own names the one it
    resumed from as the one to go back to, not "no checkpoint written yet"."""
    from sit_fast.training.loop import NonFiniteLossError

    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    poison_batch(monkeypatch, call=1)
    with pytest.raises(NonFiniteLossError) as info:
        train_main(BASE + ["--exp-dir", exp, "--resume", "auto", "--max-steps", "4", "--ckpt-every", "100"])
    resumed = os.path.join(exp, "checkpoints", "0000002.pt")
    assert f"non-finite at step 3 (noticed at step 4); last good checkpoint: {resumed};" in str(info.value)


# ----------------------------------------------------------------------------- user errors

def run_cli(argv: list[str]) -> int:
    try:
        cli_entry(train_main)(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_image_folder_images_are_scaled_to_minus_one_one_and_flipped_by_their_key(tmp_path):
    """Pixels 0 and 255 become -1 and 1 (upstream's Normalize(0.5, 0.5)); flip 1 mirrors left-right."""
    from sit_fast.data import ImageFolderDataset

    os.makedirs(tmp_path / "a")
    array = np.zeros((16, 16, 3), dtype=np.uint8)
    array[:, :5] = 255  # the left columns white
    Image.fromarray(array).save(tmp_path / "a" / "0.png")
    dataset = ImageFolderDataset(str(tmp_path), 16)
    image, flipped = dataset.load(0, 0), dataset.load(0, 1)
    assert image.shape == (3, 16, 16) and float(image.min()) == -1.0 and float(image.max()) == 1.0
    assert (image[:, :, :5] == 1).all() and (image[:, :, 5:] == -1).all()
    assert torch.equal(flipped, image.flip(-1))
    for flip, expected in ((0, image), (1, flipped)):  # as the loader reads them: (image, label) by key
        got, label = dataset[(0, flip)]
        assert torch.equal(got, expected) and label == 0


def test_epoch_sampler_flips_half_the_images():
    from sit_fast.data import EpochSampler

    flips = [flip for batch in EpochSampler(2000, 100, 0, 1, seed=0, flip=True).batches(0) for _, flip in batch]
    assert len(flips) == 2000 and 0.45 < sum(flips) / len(flips) < 0.55
    assert not any(flip for batch in EpochSampler(2000, 100, 0, 1, seed=0, flip=False).batches(0) for _, flip in batch)


def make_image_folder(root, classes=2, per_class=3, size=20) -> str:
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(array).save(os.path.join(root, f"class{c}", f"{i}.png"))
    return str(root)


def test_run_batches_after_a_mid_epoch_resume_start_the_next_epoch_at_its_first_step():
    """A run resumed at step 3 of epoch 1 takes the rest of epoch 1, then every epoch after it whole
    (from step 0): no sample skipped in the epochs that follow a mid-epoch resume."""
    from sit_fast.data import EpochSampler, RunBatches

    sampler = EpochSampler(10, 2, rank=0, world_size=1, seed=5, flip=True)  # 5 steps per epoch
    run = RunBatches(sampler, epoch=1, step_in_epoch=3, num_steps=9)
    batches = list(run)
    assert len(run) == 9 and batches == sampler.batches(1)[3:] + sampler.batches(2) + sampler.batches(3)[:2]
    assert sorted(index for batch in batches[2:7] for index, _ in batch) == list(range(10))  # epoch 2: each once


def test_run_batches_past_the_runs_last_step_are_none():
    from sit_fast.data import EpochSampler, RunBatches

    sampler = EpochSampler(10, 2, rank=0, world_size=1, seed=5, flip=True)
    for num_steps in (0, -3):  # a resume at or past --max-steps
        run = RunBatches(sampler, epoch=2, step_in_epoch=1, num_steps=num_steps)
        assert len(run) == 0 and list(run) == []


def test_digits_are_scikit_learns_in_minus_one_one_with_their_labels():
    """DigitsDataset: sklearn's 17 levels 0..16 as k / 8 - 1, each image with its own label, by
    __getitems__ (the loader's) and __getitem__ alike."""
    from sklearn.datasets import load_digits

    from sit_fast.data import DigitsDataset

    digits, dataset = load_digits(), DigitsDataset(8)
    keys = [(0, 0), (7, 1), (1796, 0)]
    images, labels = dataset.__getitems__(keys)
    rows = [index for index, _ in keys]
    expected = torch.from_numpy(digits.images[rows]).float().unsqueeze(1) / 8 - 1
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    assert labels.tolist() == digits.target[rows].tolist()
    assert float(dataset.images.min()) == -1.0 and float(dataset.images.max()) == 1.0
    for key, image, label in zip(keys, images, labels):
        got_image, got_label = dataset[key]
        assert torch.equal(got_image, image) and int(got_label) == int(label)
    # another --image-size: the 8x8 images upsampled bilinearly (no corner alignment), kept in [-1, 1]
    resized = torch.nn.functional.interpolate(dataset.images, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(DigitsDataset(12).images, resized.clamp(-1, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_samples,world_size", [(10, 3), (2, 8), (1, 3), (5, 16), (5, 2)])
def test_epoch_sampler_gives_every_rank_distributed_samplers_indices(num_samples, world_size):
    """As torch's DistributedSampler (shuffle, seed + epoch), whatever the padding: a dataset smaller
    than half the ranks still gives every rank full batches (no empty batch on the last ranks)."""
    from sit_fast.data import EpochSampler

    for rank in range(world_size):
        sampler = EpochSampler(num_samples, 1, rank, world_size, seed=7, flip=False)
        reference = torch.utils.data.DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank,
                                                        shuffle=True, seed=7)
        reference.set_epoch(2)
        assert [key[0] for batch in sampler.batches(2) for key in batch] == list(reference)


def test_one_loader_serves_every_epoch_in_the_samplers_order(tmp_path, monkeypatch):
    """Loader workers start once per run, not once per epoch (seconds each under spawn or
    forkserver); its batches are the sampler's, epoch after epoch, resumed mid-epoch or at an epoch's end."""
    from sit_fast.data import EpochSampler
    from sit_fast.training import loop

    loaders, make_loader = [], loop.make_loader

    def recording_make_loader(dataset, batches, *args, **kwargs):
        loaders.append([[tuple(key) for key in batch] for batch in batches])
        return make_loader(dataset, batches, *args, **kwargs)

    monkeypatch.setattr(loop, "make_loader", recording_make_loader)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=16)  # 3 steps per epoch
    exp = str(tmp_path / "run")
    argv = ["--data-path", images, "--vae", "none", "--image-size", "16", "--model", "SiT-T/4",
            "--global-batch-size", "2", "--num-workers", "1", "--fused-kernels", "off", "--no-progress",
            "--sample-every", "100000", "--log-every", "100", "--global-seed", "3", "--exp-dir", exp]
    train_main(argv + ["--max-steps", "7"])
    sampler = EpochSampler(6, 2, rank=0, world_size=1, seed=3, flip=True)
    order = [[tuple(key) for key in batch] for epoch in range(4) for batch in sampler.batches(epoch)]
    assert loaders == [order[:7]]
    train_main(argv + ["--max-steps", "9", "--resume", "auto", "--ckpt-every", "1"])  # from step 7: epoch 2, step 1
    assert loaders[1] == order[7:9]
    train_main(argv + ["--max-steps", "11", "--resume", "auto"])  # from step 9: the end of epoch 2
    assert loaders[2] == order[9:11]


def test_a_folder_of_gray_images_trains_a_gray_model_with_in_channels_1(tmp_path, capsys):
    """--vae none --in-channels 1: the folder's images, gray as stored or as RGB with equal channels, are
    one channel (it was read as RGB and refused as "the data, which has 3 channels"); one in colour is
    named in one line."""
    from sit_fast.data import ImageFolderDataset

    root = tmp_path / "gray"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            gray = rng.integers(0, 256, (12, 12), dtype=np.uint8)
            image = Image.fromarray(gray) if i == 0 else Image.fromarray(np.stack([gray] * 3, -1))  # "L", "RGB"
            image.save(root / f"class{c}" / f"{i}.png")
    dataset = ImageFolderDataset(str(root), 8, channels=1)
    x, label = dataset[(1, 0)]
    assert x.shape == (1, 8, 8) and label == 0 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(ImageFolderDataset(str(root), 8)[(1, 0)][0], x.expand(3, 8, 8))  # RGB's three copies of it
    argv = ["--data-path", str(root), "--vae", "none", "--in-channels", "1", "--image-size", "8", "--model", "SiT-T/4",
            "--global-batch-size", "2", "--num-workers", "0", "--fused-kernels", "off", "--no-progress",
            "--sample-every", "100000", "--max-steps", "2", "--exp-dir", str(tmp_path / "run")]
    train_main(argv)
    assert "model input 1x8x8" in capsys.readouterr().err
    weights = str(tmp_path / "run" / "checkpoints" / "0000002.pt")
    without = [a for a in argv if a not in ("--in-channels", "1")][:-1] + [str(tmp_path / "run2"), "--ckpt", weights]
    with pytest.raises(UserError) as info:  # its weights on the same folder: the flag that reads it so is named
        train_main(without)
    assert str(info.value) == (f"--ckpt {weights} takes 1-channel inputs, the data here has 3 (images): pass "
                               f"--in-channels 1 (an image folder is then read as gray)")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / "class1" / "2.png")
    with pytest.raises(UserError) as info:
        ImageFolderDataset(str(root), 8, channels=1)[(4, 0)]
    assert str(info.value) == (f"image {root / 'class1' / '2.png'} is in colour; --in-channels 1 trains on gray "
                               f"images: convert them to gray first, or leave --in-channels out")


def test_image_folder_order_and_labels_are_torchvisions(tmp_path):
    """Nested folders: torchvision's ImageFolder sorts each class's (folder, files) by folder path, so
    b/sub-x (with '-' before '/') comes before b/sub/deep."""
    from sit_fast.data import ImageFolderDataset

    files = ["a/1.png", "b/8.tiff", "b/sub/6.webp", "b/sub/deep/7.bmp", "b/sub-x/5.JPG", "b/notes.txt"]
    for name in files:
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        Image.new("RGB", (5, 3)).save(tmp_path / name, format="PNG")
    # an empty class keeps the label class_to_idx gives it (with a warning; torchvision's ImageFolder refuses it)
    os.makedirs(tmp_path / "c")
    dataset = ImageFolderDataset(str(tmp_path), 4)
    assert dataset.classes == ["a", "b", "c"] and dataset.num_classes == 3
    assert [(os.path.relpath(path, tmp_path), label) for path, label in dataset.samples] == [
        ("a/1.png", 0), ("b/8.tiff", 1), ("b/sub/6.webp", 1), ("b/sub-x/5.JPG", 1), ("b/sub/deep/7.bmp", 1)]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grayscale_images_are_scaled_to_eight_bits(tmp_path, mode):
    """PIL's convert to RGB clips a 16-bit image's values at 255 (a white image, silently): read_image
    scales 0..65535 to 0..255, in every channel; a floating-point image is refused, naming it."""
    from sit_fast.data import DataError, read_image

    rng = np.random.default_rng()
    values = rng.integers(0, 65536, size=(6, 6)).astype(np.uint16)
    if mode == "I;16":  # a 16-bit grayscale PNG
        path = str(tmp_path / "g.png")
        Image.fromarray(values).save(path)
    else:  # 32-bit integers (a TIFF)
        path = str(tmp_path / "g.tiff")
        Image.fromarray(values.astype(np.int32), "I").save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode, opened.mode
    rgb = np.asarray(read_image(path, 6))
    assert rgb.shape == (6, 6, 3) and rgb.dtype == np.uint8
    expected = np.rint(values / 257.0)
    assert all((rgb[..., c] == expected).all() for c in range(3)), (rgb[..., 0], expected)
    np.testing.assert_array_equal(np.asarray(read_image(path, 6, "L")), expected)

    # 32-bit integers past either end of the 16-bit range: black below 0, white above 65535
    wide = np.array([[-5, 0, 65535, 65536, 2**31 - 1, 70000]] * 6, dtype=np.int32)
    Image.fromarray(wide, "I").save(tmp_path / "wide.tiff")
    assert np.asarray(read_image(str(tmp_path / "wide.tiff"), 6, "L"))[0].tolist() == [0, 0, 255, 255, 255, 255]

    Image.fromarray(rng.random((6, 6)).astype(np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f\.tiff holds floating-point pixels"):
        read_image(str(tmp_path / "f.tiff"), 6)


def test_twelve_bit_grayscale_tiffs_are_scaled_from_their_own_range(tmp_path):
    """PIL reads a 12-bit grayscale TIFF as "I;16" holding 0..4095: 4095 is white, not 16 (nearly black)."""
    import struct

    from sit_fast.data import read_image

    values = np.array([[0, 4095, 2048, 265, 1, 4000]] * 6, dtype=np.uint16)  # 265: 17 (16 from 0..4096)
    bits = "".join(f"{v:012b}" for v in values.ravel())  # 6 samples a row: whole bytes, no row padding
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    tags = [(256, 6), (257, 6), (258, 12), (259, 1), (262, 1), (273, 0), (277, 1), (278, 6), (279, len(data))]
    start = 8 + 2 + 12 * len(tags) + 4  # the pixels, after the header and the one directory
    header = b"II*\0" + struct.pack("<IH", 8, len(tags)) + b"".join(
        struct.pack("<HHII", tag, 4, 1, start if tag == 273 else value) for tag, value in tags)
    (tmp_path / "g.tif").write_bytes(header + struct.pack("<I", 0) + data)
    with Image.open(tmp_path / "g.tif") as opened:
        assert opened.mode == "I;16" and np.asarray(opened).max() == 4095
    expected = np.rint(values * (255 / 4095))
    np.testing.assert_array_equal(np.asarray(read_image(str(tmp_path / "g.tif"), 6, "L")), expected)
    assert np.asarray(read_image(str(tmp_path / "g.tif"), 6, "L"))[0].tolist() == [0, 255, 128, 17, 0, 249]


def test_gray_tiffs_with_premultiplied_alpha_are_read_as_rgbas_are(tmp_path):
    """A gray TIFF with associated (premultiplied) alpha, which PIL opens as mode "La" and converts to neither
    "L" nor "RGB", was refused as unreadable: now its gray values are divided by their alpha, as PIL's "RGBa"
    (the colour TIFF's like) to "RGB" divides, and the alpha dropped."""
    import struct

    from sit_fast.data import read_image

    gray = np.array([[[g, a] for g in (0, 60, 100)] * 2 for a in (255, 128)] * 3, dtype=np.uint8)
    Image.fromarray(gray, "LA").save(tmp_path / "la.tiff")
    data = bytearray((tmp_path / "la.tiff").read_bytes())
    entry = data.find(struct.pack("<HHI", 338, 3, 1))  # ExtraSamples: 2 (unassociated alpha) to 1 (associated)
    assert entry > 0 and data[entry + 8] == 2
    data[entry + 8] = 1
    (tmp_path / "la.tiff").write_bytes(data)
    try:
        with Image.open(tmp_path / "la.tiff") as opened:
            assert opened.mode == "La"
    except UnidentifiedImageError:  # Pillow 12 opens no such file (13 does): read_image says it cannot read it
        pytest.skip("this Pillow does not open a gray TIFF with associated alpha")
    color = np.stack([gray[..., 0]] * 3 + [gray[..., 1]], axis=-1)
    expected = np.asarray(Image.fromarray(color, "RGBa").convert("RGB"))
    assert expected[1, 1, 0] == 119  # 60 at alpha 128: 60 * 255 / 128
    np.testing.assert_array_equal(np.asarray(read_image(str(tmp_path / "la.tiff"), 6)), expected)
    np.testing.assert_array_equal(np.asarray(read_image(str(tmp_path / "la.tiff"), 6, "L")), expected[..., 0])


def test_cielab_tiffs_are_read_in_gray_as_in_colour(tmp_path):
    """A CIELAB TIFF (PIL mode "LAB") read in "L", for a gray model, was refused as unreadable: PIL converts
    "LAB" to "RGB" alone. Now it is read through "RGB", in both."""
    from sit_fast.data import read_image

    lab = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(lab, "LAB").save(tmp_path / "lab.tiff")
    rgb = Image.fromarray(lab, "LAB").convert("RGB")
    np.testing.assert_array_equal(np.asarray(read_image(str(tmp_path / "lab.tiff"), 6)), np.asarray(rgb))
    np.testing.assert_array_equal(np.asarray(read_image(str(tmp_path / "lab.tiff"), 6, "L")),
                                  np.asarray(rgb.convert("L")))


@pytest.mark.parametrize("transparency", [bytes([255, 0, 128, 255]), 2], ids=["alpha_per_entry", "one_entry"])
def test_palette_images_with_transparency_are_read_as_their_colours_without_a_warning(tmp_path, transparency):
    """A palette PNG with transparency reads as its palette's colours (alpha dropped), in RGB and L, and
    without PIL's warning about per-entry alpha, which would name no file."""
    import warnings

    from sit_fast.data import read_image
    from sit_fast.images import center_crop_arr

    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 99, 199]
    indices = np.random.default_rng(0).integers(0, 4, size=(6, 8)).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    path = str(tmp_path / "p.png")
    image.save(path, transparency=transparency)
    colours = np.array(palette, dtype=np.uint8).reshape(4, 3)[indices]
    for mode in ("RGB", "L"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read = np.asarray(read_image(path, 6, mode))
        expected = center_crop_arr(Image.fromarray(colours).convert(mode), 6)
        np.testing.assert_array_equal(read, np.asarray(expected))


def test_resume_names_unfinished_checkpoint_writes_and_removes_them(tmp_path):
    """A writer killed mid-write (SIGKILL) leaves its temporary file: the next run in the folder, holding
    its lock, removes it and says so, with its size."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    leftover = os.path.join(exp, "checkpoints", ".0000004.pt.tmp-4242")
    with open(leftover, "wb") as f:
        f.write(b"\0" * 2**20)
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "3", "--ckpt-every", "2", "--resume", "auto"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert (f"removed 1 unfinished checkpoint write (.0000004.pt.tmp-4242; 1 MiB) from {os.path.dirname(leftover)}, "
            f"left by a run killed while writing") in log, log
    assert not os.path.exists(leftover)


def test_a_class_folder_without_images_is_named_in_a_warning(tmp_path, caplog):
    from sit_fast.data import find_images

    make_image_folder(tmp_path / "data", classes=2, per_class=1)
    os.makedirs(tmp_path / "data" / "a_cache")  # say, an --out put in the data folder
    (tmp_path / "data" / "a_cache" / "shard-00000.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        samples, classes = find_images(str(tmp_path / "data"))
    assert classes == ["a_cache", "class0", "class1"] and [label for _, label in samples] == [1, 2]  # as torchvision
    assert [r.getMessage() for r in caplog.records] == [
        f"--data-path {tmp_path / 'data'}: 1 class folder (a_cache) holds no images (.jpg, .jpeg, .png, .ppm, .bmp, "
        ".pgm, .tif, .tiff, .webp) but count as classes, shifting the labels after them; torchvision's ImageFolder "
        "refuses such folders: remove them unless they are meant as classes"]


def test_a_latent_cache_given_as_the_data_path_is_named_as_one(tmp_path):
    """--data-path pointed at a latent cache (its shards and index.json, no class folders): the flag it
    belongs to, not ImageFolder's layout. An index.json beside class folders is the image folder's own."""
    from sit_fast.data import CACHE_INDEX, DataError, find_images

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shard-00000.pt").write_bytes(b"")
    (cache / CACHE_INDEX).write_text("{}")
    with pytest.raises(DataError, match=f"^--data-path {re.escape(str(cache))} is a latent cache .*: train.py reads "
                                        f"it with --latent-cache {re.escape(str(cache))}$"):
        find_images(str(cache))
    os.remove(cache / CACHE_INDEX)
    with pytest.raises(DataError, match="has no class sub-folders"):
        find_images(str(cache))
    make_image_folder(tmp_path / "data", classes=2, per_class=1)
    (tmp_path / "data" / CACHE_INDEX).write_text("{}")  # an image folder's own index file beside its classes
    samples, classes = find_images(str(tmp_path / "data"))
    assert classes == ["class0", "class1"] and [label for _, label in samples] == [0, 1]


def test_hidden_files_with_an_image_extension_are_left_out_with_a_warning(tmp_path, caplog):
    """macOS's ._NAME files of metadata beside copied images end in .jpg but are no images: taken (as
    torchvision's ImageFolder takes them), reading one would stop the run or the cache mid-way."""
    from sit_fast.data import find_images

    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    (tmp_path / "data" / "class1" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        samples, classes = find_images(root)
    assert [os.path.basename(path) for path, _ in samples] == ["0.png", "0.png"] and classes == ["class0", "class1"]
    assert [r.getMessage() for r in caplog.records] == [
        f"--data-path {root}: 1 hidden file with an image extension ({os.path.join(root, 'class1', '._0.png')}) left "
        f"out (macOS writes ._NAME files of metadata beside copied images); torchvision's ImageFolder would take them"]


def test_hidden_folders_holding_images_are_skipped_with_a_warning_in_the_log(tmp_path, capsys):
    """The warning comes from sit_fast.data, outside the training module: it still reaches log.txt."""
    for name in ["a/1.png", ".extra/deep/2.png", "b/3.png"]:
        os.makedirs(tmp_path / "data" / os.path.dirname(name), exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name)
    os.makedirs(tmp_path / "data" / ".cache")  # no images: nothing to say
    exp = str(tmp_path / "exp")
    train_main(BASE[:1] + ["imagefolder", "--data-path", str(tmp_path / "data")] + BASE[2:] + [
        "--exp-dir", exp, "--max-steps", "1", "--global-batch-size", "2"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert log.count("hidden folders (.extra) hold images but are not taken as classes") == 1, log
    assert "dataset: 2 samples, 2 classes" in log, log


def test_dot_files_and_dot_folders_of_images_are_left_out_with_warnings(tmp_path, caplog):
    """Any name starting with a dot is hidden, not ._NAME alone; a hidden folder is named when it holds
    images, whatever the case of their extensions."""
    from sit_fast.data import find_images

    root = make_image_folder(tmp_path / "data", classes=1, per_class=1)
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "class0" / ".thumb.png")
    os.makedirs(tmp_path / "data" / ".trash")
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / ".trash" / "OLD.PNG")
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        samples, classes = find_images(root)
    assert [os.path.relpath(path, root) for path, _ in samples] == ["class0/0.png"] and classes == ["class0"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "hidden folders (.trash) hold images but are not taken as classes" in messages[0]
    assert f"1 hidden file with an image extension ({os.path.join(root, 'class0', '.thumb.png')}) left" in messages[1]


def test_a_hidden_data_path_folder_that_cannot_be_listed_is_no_error(tmp_path, monkeypatch, caplog):
    """The root's hidden folders are no classes, never walked for images: one that cannot be read (another
    user's .Trash-1000) is neither an error nor named (whether it holds images cannot be seen)."""
    from sit_fast.data import find_images

    root = make_image_folder(tmp_path / "data", classes=1, per_class=1)
    os.makedirs(os.path.join(root, ".Trash-1000"))
    Image.new("RGB", (4, 4)).save(os.path.join(root, ".Trash-1000", "x.png"))
    fail_listing(monkeypatch, os.path.join(root, ".Trash-1000"), errno.EACCES)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        samples, classes = find_images(root)
    assert [os.path.relpath(path, root) for path, _ in samples] == ["class0/0.png"] and classes == ["class0"]
    assert caplog.records == []


def test_image_folder_files_come_sorted_by_name_and_linked_folders_are_followed(tmp_path, monkeypatch):
    """Whatever order the file system lists them in, each folder's files are taken by name; a symbolic
    link to a folder inside a class folder is followed (as torchvision's ImageFolder does)."""
    from sit_fast.data import find_images

    root = make_image_folder(tmp_path / "data", classes=1, per_class=3)
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=1, per_class=2)
    os.symlink(os.path.join(elsewhere, "class0"), os.path.join(root, "class0", "linked"))
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top, **kwargs: (
        (folder, sub, sorted(names, reverse=True)) for folder, sub, names in real_walk(top, **kwargs)))
    samples, _ = find_images(root)
    assert [os.path.relpath(path, root) for path, _ in samples] == [
        "class0/0.png", "class0/1.png", "class0/2.png", "class0/linked/0.png", "class0/linked/1.png"]


def test_linked_folders_back_to_the_root_a_class_or_a_walked_folder_are_left_out_with_a_warning(tmp_path, caplog):
    """A link loop (class0/up -> the root) would take every image again at each level, up to the system's
    link limit, and class1's under class0's label; a link to another class's folder, or a second link to a
    folder walked already, would take its images twice. Each is left out, named once in one warning; a
    linked folder reached once is still taken."""
    from sit_fast.data import find_images

    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=1, per_class=1)
    linked = os.path.join(elsewhere, "class0")
    for target, name in ((root, "up"), (os.path.join(root, "class1"), "other"), (linked, "a"), (linked, "b")):
        os.symlink(target, os.path.join(root, "class0", name))
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        samples, classes = find_images(root)
    assert [(os.path.relpath(path, root), label) for path, label in samples] == [
        ("class0/0.png", 0), ("class0/a/0.png", 0), ("class1/0.png", 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(
        f"--data-path {root}: 3 linked folders ({os.path.join(root, 'class0', 'b')} and more) left out: a link back "
        "to the root or into another class's folder"), messages


@pytest.mark.parametrize("layout", ["class links to a class", "link into another class's sub-folder",
                                    "class links to another class's sub-folder", "link from the first class"])
def test_a_folder_in_one_class_is_never_taken_under_another_through_a_link(tmp_path, caplog, layout):
    """Each image once, under the class whose folder holds it on disk, whichever way a link reaches it:
    a class folder that is a link to another class (its images took both labels), a link inside a class
    to a sub-folder of another (both labels too), a class folder linked to another's sub-folder (the
    sub-folder was left out of its own class and its images took the link's label)."""
    from sit_fast.data import find_images

    root = tmp_path / "data"
    for path in ("k1/a.png", "k1/sub/b.png", "k2/sub/c.png"):
        os.makedirs(root / os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / path)
    links = {"class links to a class": ("k1", "k3"), "link into another class's sub-folder": ("k1/sub", "k2/link"),
             "class links to another class's sub-folder": ("k1/sub", "k3"),
             "link from the first class": ("k2/sub", "k1/link")}
    target, name = links[layout]
    os.symlink(root / target, root / name)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        samples, classes = find_images(str(root))
    taken = {os.path.basename(path): classes[label] for path, label in samples}
    assert len(samples) == 3 and taken == {"a.png": "k1", "b.png": "k1", "c.png": "k2"}, (samples, classes)
    assert f"linked folder ({root / name}) left out" in caplog.text, caplog.text


def test_a_root_of_linked_class_folders_keeps_each_image_in_the_class_that_holds_it(tmp_path, caplog):
    """A root whose class folders are links to a store (a common layout), the store's first class linking
    into the second's sub-folder: its images stay the second's (taken under the first, the class that
    sorted first, they left the second empty)."""
    from sit_fast.data import find_images

    store, root = tmp_path / "store", tmp_path / "data"
    for path in ("k1/a.png", "k2/sub/c.png"):
        os.makedirs(store / os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (4, 4)).save(store / path)
    os.symlink(store / "k2" / "sub", store / "k1" / "link")
    root.mkdir()
    for name in ("k1", "k2"):
        os.symlink(store / name, root / name)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        samples, classes = find_images(str(root))
    assert {os.path.basename(path): classes[label] for path, label in samples} == {"a.png": "k1", "c.png": "k2"}
    assert len(samples) == 2 and f"linked folder ({root / 'k1' / 'link'}) left out" in caplog.text, caplog.text


def test_class_folders_without_images_are_refused_when_all_are_empty_and_counted_otherwise(tmp_path, caplog):
    from sit_fast.data import DataError, find_images

    os.makedirs(tmp_path / "none" / "a" / "sub")
    (tmp_path / "none" / "a" / "notes.txt").write_text("")
    with pytest.raises(DataError) as info:
        find_images(str(tmp_path / "none"))
    assert str(info.value) == (f"--data-path {tmp_path / 'none'} holds no images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, "
                               ".tif, .tiff, .webp) in its class sub-folders")
    root = make_image_folder(tmp_path / "data", classes=1, per_class=1)
    for count, listed in ((2, "empty0, empty1"), (7, "empty0, empty1, empty2, empty3, empty4 and 2 more")):
        for i in range(count):
            os.makedirs(os.path.join(root, f"empty{i}"), exist_ok=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sit_fast"):
            find_images(root)
        assert [r.getMessage() for r in caplog.records][0].startswith(
            f"--data-path {root}: {count} class folders ({listed}) hold no images (.jpg,")


def test_an_image_damaged_past_its_header_is_a_data_error(tmp_path):
    """A PNG whose header reads but whose second data chunk is garbage: PIL raises SyntaxError, no OSError,
    when the pixels are read."""
    from sit_fast.data import DataError, ImageFolderDataset

    root = tmp_path / "images"
    os.makedirs(root / "class0")
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "class0" / "0.png")
    data = bytearray((root / "class0" / "0.png").read_bytes())
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)  # PIL writes 64 KiB a chunk: a second one exists
    data[second: second + 4] = b"\x00\x01\x02\x03"
    (root / "class0" / "0.png").write_bytes(bytes(data))
    dataset = ImageFolderDataset(str(root), 16)
    with pytest.raises(DataError, match=r"cannot read image \S+0.png \(broken PNG file .*\): remove or replace it"):
        dataset.load(0, 0)


def test_an_image_past_pils_pixel_limit_is_a_data_error(tmp_path, monkeypatch):
    """As a damaged header claiming a huge size: PIL's DecompressionBombError is no OSError."""
    from sit_fast.data import DataError, ImageFolderDataset

    dataset = ImageFolderDataset(make_image_folder(tmp_path / "images", classes=1, per_class=1), 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 20x24 image is past twice the limit
    with pytest.raises(DataError, match=r"cannot read image \S+0.png \(Image size \(480 pixels\) exceeds .*\): "
                                        r"remove or replace it"):
        dataset.load(0, 0)


def test_an_image_within_twice_pils_pixel_limit_is_read_and_named_in_the_warning(tmp_path, monkeypatch):
    """PIL reads it, warning with a DecompressionBombWarning that names no file: said again naming it,
    once (not at every epoch)."""
    from sit_fast.data import ImageFolderDataset

    dataset = ImageFolderDataset(make_image_folder(tmp_path / "images", classes=1, per_class=1), 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the 20x24 image is past the limit, within twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = dataset.load(0, 0)
        dataset.load(0, 1)
    assert image.shape == (3, 16, 16)
    said = [str(w.message) for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    named = [line for line in said if "0.png" in line]
    assert len(named) == 1 and re.fullmatch(r"image \S+0\.png has 480 pixels, past PIL's limit of 300 \(.*\): read "
                                            r"all the same; PIL refuses an image past twice the limit", named[0]), said


def test_an_image_pil_refuses_with_a_value_error_is_a_data_error(tmp_path):
    """PIL raises ValueError, no OSError, for a PNG whose metadata (an XMP packet, say) inflates past its
    1 MiB limit and for a PPM whose header holds no number: named in one line, as a damaged image is."""
    from PIL import PngImagePlugin

    from sit_fast.data import DataError, ImageFolderDataset

    os.makedirs(tmp_path / "a")
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "0.png", pnginfo=info)
    (tmp_path / "a" / "1.ppm").write_bytes(b"P6\n2x 4\n255\n" + bytes(24))
    dataset = ImageFolderDataset(str(tmp_path), 4)
    with pytest.raises(DataError, match=r"^cannot read image \S+0.png \(Decompressed data too large for "
                                        r"PngImagePlugin.MAX_TEXT_CHUNK\): remove or replace it$"):
        dataset.load(0, 0)
    with pytest.raises(DataError, match=r"^cannot read image \S+1.ppm \(invalid literal .*\): remove or replace it$"):
        dataset.load(1, 0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_named_pipe_with_an_image_name_is_a_data_error_not_a_read_that_waits_for_ever(tmp_path):
    """Opening a named pipe for reading waits for a writer: a pipe named 1.png is refused, naming it, before."""
    from sit_fast.data import DataError, ImageFolderDataset
    from tests.oserrors import errors_of_a_read_of_a_pipe

    make_image_folder(tmp_path / "images", classes=1, per_class=1)
    pipe = str(tmp_path / "images" / "class0" / "1.png")
    os.mkfifo(pipe)
    dataset = ImageFolderDataset(str(tmp_path / "images"), 16)
    assert [os.path.basename(path) for path, _ in dataset.samples] == ["0.png", "1.png"]
    outcome = errors_of_a_read_of_a_pipe(lambda: dataset.load(1, 0), pipe, DataError)
    assert outcome == [f"cannot read image {pipe} (not a regular file: a named pipe, a socket or a device): remove or "
                       f"replace it"]
    assert dataset.load(0, 0).shape == (3, 16, 16)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    exp = str(tmp_path_factory.mktemp("ckpt") / "run")
    return train_main(BASE + ["--exp-dir", exp, "--max-steps", "1", "--ckpt-every", "1"])["last_checkpoint"]


def error_cases(tmp_path, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cut = tmp_path / "cut.pt"
    with open(checkpoint, "rb") as f:
        cut.write_bytes(f.read(4096))  # a copy cut short
    images = make_image_folder(tmp_path / "images")
    exp = ["--exp-dir", str(tmp_path / "exp"), "--no-progress"]
    return {
        "missing data path": (["--data-path", str(tmp_path / "nope")] + exp, "does not exist"),
        "empty data path": (["--data-path", str(empty)] + exp, "no class sub-folders"),
        "run inside the images": (["--data-path", images, "--exp-dir", f"{images}/class0/../run", "--no-progress"],
                                  f"--exp-dir {images}/class0/../run is inside --data-path {images}: put the run "
                                  f"elsewhere"),
        "results inside the images": (["--data-path", images, "--results-dir", images, "--no-progress"],
                                      f"--results-dir {images} is inside --data-path {images}"),
        "no data path": (exp, "--data-path is required"),
        "image size not divisible by 8": (["--data-path", images, "--image-size", "100"] + exp, "not divisible by 8"),
        "image size not divisible by patch": (
            BASE + ["--image-size", "10"] + exp, "not divisible by the patch size 4"),
        "unknown model": (BASE + ["--model", "SiT-Q/2"] + exp, "invalid choice"),
        "unknown flag": (BASE + ["--learning-rate", "1"] + exp, "unrecognized arguments"),
        "mistyped flag": (BASE + ["--global-batchsize", "8"] + exp, "(did you mean --global-batch-size? see "),
        "corrupt checkpoint": (BASE + ["--resume", str(corrupt)] + exp, "corrupt or truncated"),
        "checkpoint cut short": (BASE + ["--resume", str(cut)] + exp, "without the index at its end: truncated"),
        "checkpoint of another model (resume)": (
            BASE + ["--model", "SiT-T/2", "--resume", checkpoint] + exp, "--model SiT-T/2 differs"),
        "checkpoint of another model (--ckpt)": (BASE + ["--model", "SiT-T/2", "--ckpt", checkpoint] + exp,
                                                 "is a SiT-T/4 (depth 4, hidden 128, patch 4), not a SiT-T/2: "
                                                 "pass --model SiT-T/4"),
        "checkpoint of another transport": (
            BASE + ["--path-type", "GVP", "--resume", checkpoint] + exp, "--path-type GVP differs"),
        "checkpoint of another loss weight": (  # the run had none (None): a weight is another objective
            BASE + ["--loss-weight", "likelihood", "--resume", checkpoint] + exp, "--loss-weight likelihood differs"),
        "vae not found": (["--data-path", images, "--image-size", "16", "--vae", str(tmp_path / "no_vae")] + exp,
                          "--vae none"),
        "batch larger than the dataset": (BASE + ["--global-batch-size", "4000"] + exp, "fewer than one local batch"),
        "accumulation steps not dividing the batch": (BASE + ["--grad-accum-steps", "3"] + exp,
                                                      "pick a divisor of 64"),
        # a negative clip norm would flip the gradients' sign (clip_grad_norm_ scales by max_norm / norm)
        "negative --grad-clip": (BASE + ["--grad-clip", "-1"] + exp, "--grad-clip: must be a positive number"),
        "zero --grad-clip": (BASE + ["--grad-clip", "0"] + exp, "--grad-clip: must be a positive number"),
        "negative --lr": (BASE + ["--lr", "-0.0001"] + exp, "--lr: must be a positive number"),
        "--ema-decay above 1": (BASE + ["--ema-decay", "1.5"] + exp, "--ema-decay: must be in [0, 1]"),
    }


@pytest.mark.parametrize("key,value", [
    ("args", None), ("args", [1]), ("step", "seven"), ("rng", None), ("rng", [{"torch": torch.zeros(3)}]),
    ("opt", {}), ("data", [1]), ("model", [1]), ("step", -1), ("step_in_epoch", -3), ("epoch", -1),
    ("args", {"grad_accum_steps": 0}), ("step", True), ("args", {"lr": "fast"}), ("args", {"global_batch_size": -1}),
    ("ema", [1]), ("opt", {"state": {}}), ("model", {"w": 1}),
])
def test_a_damaged_training_checkpoint_is_refused_in_one_line(tmp_path, digits_checkpoint, key, value):
    from sit_fast.checkpoint import CheckpointError
    from sit_fast.training.checkpointing import load_training_checkpoint

    checkpoint = load_ckpt(digits_checkpoint)
    checkpoint[key] = value
    torch.save(checkpoint, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match=rf"not a resumable train.py checkpoint: damaged {key} "):
        load_training_checkpoint(str(tmp_path / "damaged.pt"))


def test_a_file_holding_no_dict_is_not_a_training_checkpoint(tmp_path):
    from sit_fast.checkpoint import CheckpointError
    from sit_fast.training.checkpointing import load_training_checkpoint

    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list.pt is not a train.py checkpoint \(it holds a list\)$"):
        load_training_checkpoint(str(tmp_path / "list.pt"))


@pytest.mark.parametrize("key", ["model", "ema", "opt", "args", "step", "epoch", "step_in_epoch", "rng"])
def test_a_training_checkpoint_missing_an_entry_is_refused_in_one_line(tmp_path, digits_checkpoint, key):
    from sit_fast.checkpoint import CheckpointError
    from sit_fast.training.checkpointing import load_training_checkpoint

    checkpoint = load_ckpt(digits_checkpoint)
    del checkpoint[key]
    torch.save(checkpoint, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=rf"not a resumable train.py checkpoint: no {key} "):
        load_training_checkpoint(str(tmp_path / "partial.pt"))


def test_list_checkpoints_orders_by_step_and_takes_only_checkpoint_names(tmp_path):
    """Newest = highest step as a number (past 9,999,999 steps the names grow a digit), and only
    NNN.pt itself: a user's backup 0000020.pt.bak, an editor's 0000030.pt~ are not checkpoints."""
    for name in ("9999999.pt", "10000000.pt", "0000005.pt", "0000020.pt.bak", "0000030.pt~", "x0000040.pt",
                 ".0000050.pt.tmp-7"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["10000000.pt", "9999999.pt",
                                                                              "0000005.pt"]


def test_a_checkpoint_folder_not_made_yet_holds_no_checkpoint(tmp_path):
    from sit_fast.training.checkpointing import find_latest_valid

    assert list_checkpoints(str(tmp_path / "checkpoints")) == []
    assert find_latest_valid(str(tmp_path / "checkpoints")) is None


def test_experiment_folders_are_listed_newest_number_first_and_only_folders(tmp_path):
    """NNN-<suffix> folders by number, not by name (1000 after 999); a file of that name, another
    suffix and a name without a number are not runs; a results folder's name is not a pattern."""
    from sit_fast.training.checkpointing import experiment_dirs

    results = tmp_path / "results [a]"
    for name in ("000-SiT-T-4", "999-SiT-T-4", "1000-SiT-T-4", "001-SiT-S-2", "new-SiT-T-4"):
        (results / name).mkdir(parents=True)
    (results / "1001-SiT-T-4").write_text("a file")
    assert experiment_dirs(str(results), "SiT-T-4") == [str(results / n) for n in ("1000-SiT-T-4", "999-SiT-T-4",
                                                                                    "000-SiT-T-4")]


def test_the_first_stop_signal_is_the_one_that_ends_the_run():
    """SLURM's SIGUSR1 warning, then its SIGTERM: the run stopped for the first (exit 128 + SIGUSR1)."""
    import signal

    from sit_fast.training.checkpointing import StopRequest

    stop = StopRequest()
    assert stop.agreed() is None
    stop._handle(signal.SIGUSR1, None)
    stop._handle(signal.SIGTERM, None)
    assert stop.agreed() == "SIGUSR1"


def test_a_stop_request_of_a_process_group_of_one_stops_after_the_step_it_came_in(monkeypatch):
    """torchrun with one process: no ranks to agree with, so no group of its own, and no step's wait."""
    import signal

    import torch.distributed as dist

    from sit_fast.training.checkpointing import StopRequest

    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        stop = StopRequest()
        stop.connect()
        assert stop.group is None
        stop._handle(signal.SIGTERM, None)
        assert stop.agreed() == "SIGTERM"
    finally:
        dist.destroy_process_group()


def test_every_flag_of_upstream_sit_train_keeps_its_default():
    """Upstream SiT train.py's argparse defaults (lr: its AdamW's; the transport group's)."""
    from sit_fast.training.args import parse_args

    args, explicit = parse_args(["--data-path", "images"])
    upstream = {"results_dir": "results", "model": "SiT-XL/2", "image_size": 256, "epochs": 1400,
                "global_batch_size": 256, "global_seed": 0, "vae": "ema", "log_every": 100, "ckpt_every": 50_000,
                "sample_every": 10_000, "cfg_scale": 4.0, "wandb": False, "ckpt": None, "lr": 1e-4,
                "path_type": "Linear", "prediction": "velocity", "loss_weight": None}
    assert {key: getattr(args, key) for key in upstream} == upstream
    assert explicit == {"data_path"}


def test_a_resume_keeps_the_runs_model_and_transport_and_takes_the_flags_given_now():
    """merge_resumed_args: the checkpoint's arguments where none is given now; an identity flag given
    with another value is refused naming the run's (None there: not recorded, so not compared, but for
    --loss-weight, where None is no weighting, and --train-eps, the path's default); keys the parser no
    longer has are dropped."""
    from sit_fast.training.args import merge_resumed_args, parse_args

    args, explicit = parse_args(["--model", "SiT-T/4", "--num-classes", "10", "--lr", "0.001", "--resume", "auto"])
    saved = dict(vars(args), model="SiT-T/4", num_classes=None, lr=0.5, ckpt_every=7, an_old_flag=1)
    merged = merge_resumed_args(args, explicit, saved, "x.pt")
    assert (merged.lr, merged.ckpt_every, merged.num_classes) == (0.001, 7, 10)
    assert not hasattr(merged, "an_old_flag")
    for flags, key, was, message in (
            (["--model", "SiT-T/2"], "model", "SiT-T/4",
             "--model SiT-T/2 differs from the run being resumed (x.pt: SiT-T/4); a resumed run keeps its model and "
             "transport"),
            (["--loss-weight", "velocity"], "loss_weight", None, "--loss-weight velocity differs from the run being "
                                                                 "resumed (x.pt: None)"),
            (["--train-eps", "0.001"], "train_eps", None, "--train-eps 0.001 differs from the run being resumed (x.pt: "
                                                          "not given: the path's default)"),
            (["--train-eps", "0.001"], "train_eps", 0.0, "--train-eps 0.001 differs from the run being resumed "
                                                         "(x.pt: 0.0)")):
        args, explicit = parse_args(flags + ["--resume", "auto"])
        with pytest.raises(UserError, match=re.escape(message)):
            merge_resumed_args(args, explicit, dict(vars(args), **{key: was}), "x.pt")
    args, explicit = parse_args(["--train-eps", "0.001", "--resume", "auto"])
    assert merge_resumed_args(args, explicit, dict(vars(args), train_eps=0.001), "x.pt").train_eps == 0.001


def test_a_resume_refuses_another_value_of_every_flag_of_the_model_and_the_transport():
    from sit_fast.training.args import merge_resumed_args, parse_args

    saved = dict(vars(parse_args(["--resume", "auto"])[0]), num_classes=10, in_channels=4, train_eps=0.0)
    for flag, value in (("--model", "SiT-S/2"), ("--image-size", "64"), ("--num-classes", "7"), ("--in-channels", "3"),
                        ("--path-type", "GVP"), ("--prediction", "noise"), ("--loss-weight", "likelihood"),
                        ("--train-eps", "0.01")):
        args, explicit = parse_args([flag, value, "--resume", "auto"])
        with pytest.raises(UserError, match=f"^{re.escape(f'{flag} {value}')} differs from the run being resumed"):
            merge_resumed_args(args, explicit, saved, "x.pt")


def test_the_long_names_of_the_accumulation_and_seed_flags_are_the_short_ones():
    from sit_fast.training.args import parse_args

    args, explicit = parse_args(["--gradient-accumulation-steps", "4", "--seed", "3"])
    assert (args.grad_accum_steps, args.global_seed) == (4, 3) and explicit == {"grad_accum_steps", "global_seed"}


def test_a_resume_never_takes_this_machines_own_settings_from_the_checkpoint():
    from sit_fast.training.args import NOT_INHERITED, merge_resumed_args, parse_args

    args, explicit = parse_args(["--resume", "auto"])
    saved = dict(vars(args), num_workers=args.num_workers + 7, exp_dir="elsewhere", ckpt="w.pt", use_raw=True,
                 no_progress=True, ckpt_every=7)
    merged = merge_resumed_args(args, explicit, saved, "x.pt")
    assert merged.ckpt_every == 7
    assert {key: getattr(merged, key) for key in NOT_INHERITED} == {key: getattr(args, key) for key in NOT_INHERITED}
    assert merged.num_workers == args.num_workers


@pytest.mark.parametrize("path_type,prediction,eps", [
    ("Linear", "velocity", 0.0), ("GVP", "velocity", 0.0), ("VP", "velocity", 1e-5), ("GVP", "noise", 1e-5),
    ("Linear", "score", 1e-5)])
def test_a_new_runs_train_eps_is_upstream_create_transports(path_type, prediction, eps):
    from sit_fast.training.args import train_eps_of_a_new_run

    assert train_eps_of_a_new_run(path_type, prediction) == eps


def test_resume_auto_skips_a_checkpoint_it_cannot_read(tmp_path, digits_checkpoint, monkeypatch, caplog):
    """An unreadable newest checkpoint (another user's copy, a bad sector) was a PermissionError's
    traceback; now it is skipped as a damaged one is, naming why, and --resume PATH says it in one line."""
    import builtins

    from sit_fast import checkpoint as checkpoint_module
    from sit_fast.checkpoint import CheckpointError
    from sit_fast.training.checkpointing import find_latest_valid

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(digits_checkpoint, folder / "0000002.pt")
    shutil.copy(digits_checkpoint, folder / "0000004.pt")
    unreadable = str(folder / "0000004.pt")

    def refusing_open(path, *args, **kwargs):
        if os.fspath(path) == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", unreadable)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", refusing_open, raising=False)
    with caplog.at_level("WARNING", logger="sit_fast"):
        found = find_latest_valid(str(folder))
    assert found is not None and found[0] == str(folder / "0000002.pt")
    assert f"skipping {unreadable}: cannot read {unreadable} (Permission denied)" in caplog.text
    with pytest.raises(CheckpointError, match=r"cannot read .*0000004\.pt \(Permission denied\)"):
        checkpoint_module.check_checkpoint_file(unreadable)


def test_runs_started_together_take_numbered_folders_of_their_own(tmp_path, monkeypatch):
    """Two runs listing the results folder before either made its folder chose one number and wrote
    into one folder; the folder is now made by a call that fails where it exists, and the next taken."""
    import types

    from sit_fast.training import loop

    args = types.SimpleNamespace(exp_dir=None, results_dir=str(tmp_path), model="SiT-T/4", path_type="Linear",
                                 prediction="velocity", loss_weight=None)
    first = loop.new_experiment_dir(args)
    assert os.path.basename(first) == "000-SiT-T-4-Linear-velocity-None" and os.path.isdir(first)
    real_listdir = os.listdir
    monkeypatch.setattr(loop.os, "listdir", lambda path: [] if path == str(tmp_path) else real_listdir(path))
    second = loop.new_experiment_dir(args)  # listed before the first run's folder was there
    assert os.path.basename(second) == "001-SiT-T-4-Linear-velocity-None" and os.path.isdir(second)


def test_resuming_a_safetensors_file_says_it_holds_weights_alone(tmp_path):
    """An exported .safetensors file is not a damaged checkpoint: it has no optimizer or position to resume."""
    from safetensors.torch import save_file

    from sit_fast.checkpoint import CheckpointError
    from sit_fast.training.checkpointing import load_training_checkpoint

    save_file({"pos_embed": torch.zeros(1, 4, 8)}, str(tmp_path / "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors is a \.safetensors file of weights alone, not a "
                                              r"resumable train\.py checkpoint \(use --ckpt") as err:
        load_training_checkpoint(str(tmp_path / "ema.safetensors"))
    assert "corrupt" not in str(err.value)


def test_ckpt_takes_the_ema_weights_or_with_use_raw_the_raw_ones(tmp_path, digits_checkpoint):
    """A new run from a training checkpoint starts from its EMA weights, as sample.py samples them;
    --use-raw takes the raw weights (the model the optimizer was stepping); the EMA starts as a copy."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    saved = load_ckpt(digits_checkpoint)
    assert any(not torch.equal(saved["model"][k], saved["ema"][k]) for k in saved["model"])
    for flags, weights in (([], "ema"), (["--use-raw"], "model")):
        args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / weights), "--ckpt", digits_checkpoint, *flags])
        trainer = Trainer(args, explicit, init_distributed())
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(value, saved[weights][name]), (weights, name)
            assert torch.equal(trainer.ema.state_dict()[name], value), (weights, name)
    # parsed alone: a run it let through would train for real
    with pytest.raises(UserError, match="--use-raw picks the raw weights of --ckpt's checkpoint: pass --ckpt too"):
        parse_args(BASE + ["--exp-dir", str(tmp_path / "none"), "--use-raw"])


def test_ckpt_of_a_training_run_says_it_is_not_a_resume(tmp_path, digits_checkpoint):
    """Upstream's --ckpt was meant to resume; here it starts a new run: the log says so, and how to resume."""
    exp = tmp_path / "exp"
    summary = train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--ckpt", digits_checkpoint])
    assert summary["step"] == 1
    log = (exp / "log.txt").read_text()
    assert f"--ckpt {digits_checkpoint} is a training checkpoint (step 1): this is a new run" in log
    assert f"pass --resume {digits_checkpoint}" in log
    assert f"initialised from {digits_checkpoint} (its EMA weights)" in log
    train_main(BASE + ["--exp-dir", str(tmp_path / "raw"), "--max-steps", "1", "--ckpt", digits_checkpoint,
                       "--use-raw"])
    assert f"initialised from {digits_checkpoint} (its raw weights, not the EMA's)" in (
        tmp_path / "raw" / "log.txt").read_text()
    # upstream train.py's checkpoint: model, ema, opt and args (an argparse.Namespace), no step
    import argparse

    ours = load_ckpt(digits_checkpoint)
    upstream = str(tmp_path / "0050000.pt")
    torch.save({"model": ours["model"], "ema": ours["ema"], "opt": ours["opt"],
                "args": argparse.Namespace(**ours["args"])}, upstream)
    exp = tmp_path / "exp2"
    assert train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--ckpt", upstream])["step"] == 1
    assert (f"--ckpt {upstream} is a training checkpoint with an optimizer state: this is a new run from its ema "
            f"weights at step 0") in (exp / "log.txt").read_text()


def test_ckpt_of_another_transport_warns_with_its_flags(tmp_path, digits_checkpoint):
    """--ckpt weights trained as a VP score model, fine-tuned with the default Linear velocity flags:
    the log names the flags it was trained with (upstream's --ckpt restored them)."""
    checkpoint = load_ckpt(digits_checkpoint)
    checkpoint["args"] = {**checkpoint["args"], "path_type": "VP", "prediction": "score"}
    torch.save(checkpoint, tmp_path / "vp.pt")
    exp = tmp_path / "exp"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--ckpt", str(tmp_path / "vp.pt")])
    assert (f"--ckpt {tmp_path / 'vp.pt'} was trained with --path-type VP (this run: Linear), --prediction score "
            f"(this run: velocity); pass the same") in (exp / "log.txt").read_text()


def test_ckpt_without_learned_sigma_starts_and_resumes_a_run_without_it(tmp_path, digits_checkpoint):
    """Weights of a learn_sigma=False model (half the final layer's outputs) start a run of that model;
    its checkpoints record it, and resuming rebuilds the same model."""
    from sit_fast.checkpoint import infer_config

    ema = load_ckpt(digits_checkpoint)["ema"]
    channels = ema["final_layer.linear.weight"].shape[0] // 2
    ema["final_layer.linear.weight"] = ema["final_layer.linear.weight"][:channels]
    ema["final_layer.linear.bias"] = ema["final_layer.linear.bias"][:channels]
    torch.save(ema, tmp_path / "no_sigma.pt")
    exp = tmp_path / "exp"
    argv = BASE + ["--exp-dir", str(exp), "--ckpt-every", "1", "--ckpt", str(tmp_path / "no_sigma.pt")]
    first = train_main(argv + ["--max-steps", "1"])
    saved = load_ckpt(first["last_checkpoint"])
    assert saved["model_config"]["learn_sigma"] is False and not infer_config(saved["ema"])["learn_sigma"]
    assert saved["ema"]["final_layer.linear.weight"].shape[0] == channels
    assert "learn_sigma=False, as the weights of --ckpt" in (exp / "log.txt").read_text()
    assert train_main(BASE + ["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "2"])["step"] == 2


def test_ckpt_names_the_release_as_upstream(tmp_path, monkeypatch):
    """--ckpt SiT-XL-2-256x256.pt with no such file here: the release from ./pretrained_models, where
    upstream's download puts it (a tiny stand-in of the digits' shapes here)."""
    from sit_fast.models import SiT_models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "pretrained_models").mkdir()
    torch.manual_seed(0)
    weights = SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=10).state_dict()
    torch.save(weights, tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt")
    exp = tmp_path / "exp"
    summary = train_main(BASE + ["--exp-dir", str(exp), "--ckpt", "SiT-XL-2-256x256.pt", "--max-steps", "1"])
    assert "initialised from SiT-XL-2-256x256.pt (a plain state_dict)" in (exp / "log.txt").read_text()
    trained = load_ckpt(summary["last_checkpoint"])["model"]  # one AdamW step (lr 1e-3) from those weights
    torch.testing.assert_close(trained["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"],
                               rtol=0, atol=1.1e-3)


def the_error_line(capsys) -> tuple[str, str]:
    """stderr's one `error: ...` line (asserted: one, no traceback) and the whole of stderr."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0], err


@pytest.mark.parametrize("space,fix", [(None, "--vae it was trained with"), ("stabilityai/sd-vae-ft-ema",
                                                                             "--vae stabilityai/sd-vae-ft-ema")])
def test_ckpt_of_another_latent_space_names_the_flag(tmp_path, capsys, space, fix):
    """--ckpt weights of 4-channel latents on 1-channel digits: the flag that fixes it, not a constructor argument."""
    from sit_fast.models import SiT_models

    weights = SiT_models["SiT-T/4"](input_size=8, in_channels=4, num_classes=10).state_dict()
    path = str(tmp_path / "latents.pt")
    torch.save(weights if space is None else {"model": weights, "ema": weights,
                                              "model_config": {"latent_space": space}}, path)
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--ckpt", path]) == 2
    line, err = the_error_line(capsys)
    assert f"--ckpt {path} takes 4-channel inputs, the data here has 1" in line and fix in line, line
    assert "build the model with" not in line


@pytest.mark.parametrize("space", ["/vaes/gray-vae", "pixels"])
def test_ckpt_of_another_latent_space_of_the_same_channels_is_warned_of(tmp_path, space):
    """--ckpt weights trained on another VAE's latents of the data's channel count load (a fine-tune may
    mean it), with a warning naming the flag that keeps its latent space, as a resume warns of it; none
    for the same latent space."""
    from sit_fast.models import SiT_models

    weights = SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=10).state_dict()
    path = str(tmp_path / "gray.pt")
    torch.save({"model": weights, "ema": weights, "model_config": {"latent_space": space}}, path)
    exp = tmp_path / "exp"
    assert train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--ckpt", path])["step"] == 1
    log = (exp / "log.txt").read_text()
    warned = (f"--ckpt {path} was trained in the latent space of /vaes/gray-vae; this run trains in that of pixels: "
              f"unless the two VAEs share an encoder, its weights start from another latent space (pass --vae "
              f"/vaes/gray-vae to keep its own)")
    assert (warned in log) == (space != "pixels") and (space != "pixels") == ("latent space of" in log), log


@pytest.mark.parametrize("space", ["stabilityai/sd-vae-ft-mse", ["not", "a", "spec"], ""])
def test_ckpt_of_the_same_encoder_or_an_unreadable_space_is_not_warned_of(tmp_path, monkeypatch, space):
    """--ckpt weights of SD's mse VAE in a run on ema's latents (one encoder), or of a latent_space that is
    no spec: no latent-space warning."""
    from sit_fast.models import SiT_models
    from sit_fast.training.loop import Trainer

    monkeypatch.setattr(Trainer, "latent_space", lambda self: "stabilityai/sd-vae-ft-ema")
    weights = SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=10).state_dict()
    path = str(tmp_path / "sd.pt")
    torch.save({"model": weights, "ema": weights, "model_config": {"latent_space": space}}, path)
    exp = tmp_path / "exp"
    assert train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--ckpt", path])["step"] == 1
    log = (exp / "log.txt").read_text()
    assert "initialised from" in log and "latent space of" not in log, log


def test_ckpt_of_pixel_space_into_a_vaes_latents_of_its_channels_names_vae_none(tmp_path):
    """Pixel-space --ckpt weights of 4 channels, trained on with a VAE of 4 latent channels: the warning's
    flag that keeps its space is --vae none (not --vae pixels)."""
    from sit_fast.models import SiT_models
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    weights = SiT_models["SiT-T/2"](input_size=6, in_channels=4).state_dict()
    path = str(tmp_path / "pixels.pt")
    torch.save({"model": weights, "ema": weights, "model_config": {"latent_space": "pixels"}}, path)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    exp = tmp_path / "exp"
    train_main(["--data-path", images, "--vae", vae_dir, "--image-size", "12", "--model", "SiT-T/2", "--ckpt", path,
                "--global-batch-size", "2", "--num-workers", "0", "--fused-kernels", "off", "--no-progress",
                "--sample-every", "none", "--exp-dir", str(exp), "--max-steps", "1"])
    log = (exp / "log.txt").read_text()
    assert (f"--ckpt {path} was trained in the latent space of pixels; this run trains in that of "
            f"{os.path.abspath(vae_dir)}: unless the two VAEs share an encoder, its weights start from another latent "
            f"space (pass --vae none to keep its own)") in log, log


@pytest.mark.parametrize("depth,hidden,patch,fix", [(4, 128, 2, "pass --model SiT-T/2"),
                                                    (3, 64, 4, "no registry model has its shapes")])
def test_ckpt_of_another_model_names_the_flag(tmp_path, capsys, depth, hidden, patch, fix):
    """--ckpt weights of another architecture than --model: which one it is and the --model to pass,
    not a list of missing and unexpected keys."""
    from sit_fast.models import SiT

    weights = SiT(input_size=8, patch_size=patch, in_channels=1, hidden_size=hidden, depth=depth, num_heads=2,
                  num_classes=10).state_dict()
    path = str(tmp_path / "other.pt")
    torch.save(weights, path)
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--ckpt", path]) == 2
    line, err = the_error_line(capsys)
    assert (f"--ckpt {path} is a " in line
            and f"(depth {depth}, hidden {hidden}, patch {patch}), not a SiT-T/4: {fix}" in line)
    assert "missing" not in err


def test_ckpt_of_another_image_size_names_the_image_size_to_pass(tmp_path, capsys):
    """--ckpt weights of the model at another input size (16 here, 8 px digits in pixel space): the
    --image-size that fits them, in this run's space, not a shape list and a VAE's size."""
    from sit_fast.models import SiT_models

    path = str(tmp_path / "at16.pt")
    torch.save(SiT_models["SiT-T/4"](input_size=16, in_channels=1, num_classes=10).state_dict(), path)
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--ckpt", path]) == 2
    line, err = the_error_line(capsys)
    assert line.endswith(f"--ckpt {path} was trained at model input size 16, i.e. 16px images here, not 8px: "
                         f"pass --image-size 16"), line
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--ckpt", path, "--image-size", "16",
                           "--max-steps", "1"]) == 0


def test_user_errors_are_one_line(tmp_path, capsys, digits_checkpoint):
    for name, (argv, expected) in error_cases(tmp_path, digits_checkpoint).items():
        code = run_cli(argv)
        err = capsys.readouterr().err.strip()
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, f"{name}: exit status {code}, stderr: {err}"
        assert len(lines) == 1 and expected in lines[0], f"{name}: {err!r}"
        assert "Traceback" not in err, f"{name}: {err}"
        assert not (tmp_path / "exp").exists(), f"{name}: a run that never started left {tmp_path / 'exp'} behind"


def test_bad_sdpa_backend_variable_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", "bogus")
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--attn-backend", "sdpa"]) == 2
    line, err = the_error_line(capsys)
    assert line.startswith("error: --attn-backend sdpa: SIT_FAST_SDPA_BACKEND=bogus: choose one of"), err


def test_bad_peak_variable_is_one_line(tmp_path, capsys, monkeypatch):
    """SIT_FAST_PEAK_TFLOPS is read for MFU on a GPU; a malformed one fails the start on any device."""
    monkeypatch.setenv("SIT_FAST_PEAK_TFLOPS", "989 TFLOPS")
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "1"]) == 2
    line, err = the_error_line(capsys)
    assert line.startswith("error: SIT_FAST_PEAK_TFLOPS=989 TFLOPS: give the GPU's dense peak"), err
    assert not (tmp_path / "exp").exists(), "a run that never started left its folder behind"


@pytest.mark.any_device
def test_bad_kernel_launch_variable_is_one_line(tmp_path, capsys, monkeypatch, no_sklearn):
    """A malformed SIT_FAST_KERNEL_LAUNCH stops a run that uses the fused kernels before it starts."""
    monkeypatch.setenv("SIT_FAST_KERNEL_LAUNCH", "fwd_num_warps=3")
    argv = [a for a in on_images(BASE, tmp_path / "images") if a not in ("--fused-kernels", "off")] + [
        "--fused-kernels", "on", "--exp-dir", str(tmp_path / "exp")]
    assert run_cli(argv) == 2
    line, err = the_error_line(capsys)
    assert line.startswith("error: --fused-kernels on: SIT_FAST_KERNEL_LAUNCH") and "power of two" in err, err
    assert not (tmp_path / "exp").exists(), "a run that never started left its folder behind"


@pytest.mark.parametrize("setting,said", [
    (["--fused-kernels", "on"], "error: --fused-kernels on: SIT_FAST_KERNEL_LAUNCH"),
    (["--attn-backend", "flash_attn"], "error: --attn-backend flash_attn: "),
])
def test_a_setting_that_cannot_run_is_said_before_the_data_is_read(tmp_path, capsys, monkeypatch, setting, said):
    """Refused before the data: an image folder's scan can take minutes (here the folder is missing, an
    error of its own, said only once the settings can run)."""
    monkeypatch.setenv("SIT_FAST_KERNEL_LAUNCH", "fwd_num_warps=3")
    argv = [a for a in on_images(BASE, tmp_path / "images") if a not in ("--fused-kernels", "off")]
    argv[argv.index("--data-path") + 1] = str(tmp_path / "missing")
    assert run_cli(argv + setting + ["--exp-dir", str(tmp_path / "exp")]) == 2
    line, err = the_error_line(capsys)
    assert line.startswith(said), err
    assert run_cli(argv + ["--fused-kernels", "off", "--exp-dir", str(tmp_path / "exp")]) == 2
    line, err = the_error_line(capsys)
    assert "--data-path" in line and str(tmp_path / "missing") in line, err


@pytest.mark.parametrize("flag,sub", [("--results-dir", ""), ("--exp-dir", ""), ("--exp-dir", "run")])
def test_a_file_where_the_run_folder_goes_is_a_one_line_error(tmp_path, capsys, flag, sub):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run_cli(BASE + [flag, str(blocker / sub) if sub else str(blocker), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} " in err and f": {blocker} is a file: pass a folder" in err and "Traceback" not in err, err


def test_new_runs_are_numbered_after_the_highest_number(tmp_path):
    """Upstream counts the folders; with 000 removed from 000, 001 that count (1) would name the next
    run 001-..., into the folder of a run that exists."""
    results = tmp_path / "results"
    for name in ("000-SiT-T-4-Linear-velocity-None", "001-SiT-T-4-Linear-velocity-None", "notes"):
        (results / name).mkdir(parents=True)
    (results / "000-SiT-T-4-Linear-velocity-None").rmdir()
    summary = train_main(BASE + ["--results-dir", str(results), "--max-steps", "1"])
    assert os.path.basename(summary["exp_dir"]) == "002-SiT-T-4-Linear-velocity-None"
    assert os.listdir(results / "001-SiT-T-4-Linear-velocity-None") == []


def test_resume_auto_with_no_matching_run_names_the_other_runs(tmp_path):
    """--resume auto looks for runs of this --model and transport only; when it finds none, the new
    run's log names the runs with checkpoints that it did not look at (another --model, say)."""
    results = str(tmp_path / "results")
    first = train_main(BASE + ["--results-dir", results, "--max-steps", "1"])["exp_dir"]
    summary = train_main(BASE + ["--results-dir", results, "--max-steps", "1", "--resume", "auto",
                                 "--path-type", "GVP"])
    assert os.path.basename(summary["exp_dir"]) == "001-SiT-T-4-GVP-velocity-None"
    with open(os.path.join(summary["exp_dir"], "log.txt")) as f:
        log = f.read()
    assert (f"({results} holds other runs with checkpoints: {os.path.basename(first)}; to continue one, pass its "
            f"--model and transport flags, or --exp-dir)") in log, log

def test_resume_auto_continues_the_newest_run_only(tmp_path):
    """--resume auto takes the newest run of this --model and transport. Where that one has no valid
    checkpoint (it failed before its first), a new run starts, naming the older ones to continue with
    --exp-dir: an older run may be finished, or another experiment's, and is not taken over."""
    results = str(tmp_path / "results")
    first = train_main(BASE + ["--results-dir", results, "--max-steps", "1"])["exp_dir"]
    failed = os.path.join(results, "001-SiT-T-4-Linear-velocity-None")
    os.makedirs(os.path.join(failed, "checkpoints"))
    summary = train_main(BASE + ["--results-dir", results, "--max-steps", "2", "--resume", "auto"])
    exp = summary["exp_dir"]
    assert os.path.basename(exp) == "002-SiT-T-4-Linear-velocity-None" and summary["step"] == 2
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert (f"--resume auto: no valid checkpoint of the newest SiT-T-4-Linear-velocity-None run in {results}, "
            f"001-SiT-T-4-Linear-velocity-None; new run in {exp} (older runs of it hold checkpoints: "
            f"{os.path.basename(first)}; to continue one, pass its folder as --exp-dir with --resume auto)") in log, log
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(first, "checkpoints"))] == ["0000001.pt"]
    summary = train_main(BASE + ["--results-dir", results, "--max-steps", "3", "--resume", "auto"])
    assert summary["exp_dir"] == exp and summary["step"] == 3


def test_resume_auto_leaves_another_experiments_run_alone(tmp_path):
    """Without --exp-dir, --resume auto continues only a run that recorded the --dataset,
    --global-batch-size, --global-seed, --lr, --ema-decay and --grad-clip given: a second experiment of
    the same --model and transport (another lr and seed) starts its own run, and a requeue of the first
    passes over the second's newer runs, one without a checkpoint yet (its experiment.json) included.
    A command that gives none of them continues the newest run."""
    results = str(tmp_path / "results")
    first = train_main(BASE + ["--results-dir", results, "--max-steps", "1", "--resume", "auto"])["exp_dir"]
    with open(os.path.join(first, "experiment.json")) as f:
        assert json.load(f) == {"dataset": "digits", "global_batch_size": 64, "global_seed": 0, "lr": 1e-3,
                                "ema_decay": 0.9, "grad_clip": None}
    other = ["--lr", "3e-4", "--global-seed", "7"]
    second = train_main(BASE + ["--results-dir", results, "--max-steps", "1", "--resume", "auto", *other])
    assert second["exp_dir"] != first and second["step"] == 1
    with open(os.path.join(second["exp_dir"], "log.txt")) as f:
        log = f.read()
    assert (f"--resume auto: no valid checkpoint of a SiT-T-4-Linear-velocity-None run of this experiment in "
            f"{results} (newer runs of other experiments, left alone: {os.path.basename(first)} (--global-seed 0 "
            f"(this command: 7), --lr 0.001 (this command: 0.0003)); to continue one with this command's flags, pass "
            f"its folder as --exp-dir with --resume auto); new run in {second['exp_dir']}") in log, log
    # the second experiment's next run, stopped before its first checkpoint
    third = os.path.join(results, "002-SiT-T-4-Linear-velocity-None")
    os.makedirs(os.path.join(third, "checkpoints"))
    shutil.copy(os.path.join(second["exp_dir"], "experiment.json"), third)
    again = train_main(BASE + ["--results-dir", results, "--max-steps", "2", "--resume", "auto"])
    assert again["exp_dir"] == first and again["step"] == 2
    with open(os.path.join(first, "log.txt")) as f:
        assert (f"(the latest valid checkpoint; newer runs of other experiments left alone: 002-SiT-T-4-Linear-"
                f"velocity-None (--lr 0.0003 (this command: 0.001); no checkpoint yet); "
                f"{os.path.basename(second['exp_dir'])} (--lr 0.0003 (this command: 0.001)))") in f.read()
    shutil.rmtree(third)
    short = train_main(["--results-dir", results, "--max-steps", "2", "--resume", "auto", "--model", "SiT-T/4",
                        "--num-workers", "0", "--no-progress"])
    assert short["exp_dir"] == second["exp_dir"] and short["step"] == 2
    # the folder given: its run, the flags given winning
    summary = train_main(BASE + ["--exp-dir", second["exp_dir"], "--max-steps", "2", "--resume", "auto",
                                 "--lr", "1e-4"])
    assert summary["exp_dir"] == second["exp_dir"] and summary["step"] == 2


def test_a_run_whose_experiment_record_cannot_be_written_goes_on(tmp_path, monkeypatch):
    """EXP/experiment.json only helps --resume auto before the first checkpoint: a failed write is a warning."""
    from sit_fast.training import loop

    def refuse(path, write):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(loop, "atomic_write", refuse)
    exp = tmp_path / "run"
    summary = train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1"])
    assert summary["step"] == 1 and not (exp / "experiment.json").exists()
    record = exp / "experiment.json"
    assert (f"{record} not written ([Errno 28] No space left on device: '{record}'): until its first checkpoint, "
            f"--resume auto cannot tell this run's experiment") in (exp / "log.txt").read_text()


def test_resuming_a_file_outside_a_run_folder_goes_on_in_a_new_one(tmp_path):
    """A copied or downloaded checkpoint: the run goes on in a new numbered folder of --results-dir, named
    by the checkpoint's model and transport, not beside the file; a refused resume leaves no folder."""
    first = train_main(BASE + ["--exp-dir", str(tmp_path / "first"), "--max-steps", "1", "--path-type", "GVP"])
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(first["last_checkpoint"], downloads / "colleague.pt")
    results = tmp_path / "results"
    with pytest.raises(UserError, match="--model SiT-S/4 differs from the run being resumed"):
        train_main(BASE + ["--results-dir", str(results), "--resume", str(downloads / "colleague.pt"),
                           "--model", "SiT-S/4"])
    assert not results.exists() or os.listdir(results) == []
    summary = train_main(BASE + ["--results-dir", str(results), "--resume", str(downloads / "colleague.pt"),
                                 "--max-steps", "2"])
    assert summary["exp_dir"] == str(results / "000-SiT-T-4-GVP-velocity-None") and summary["step"] == 2
    assert os.listdir(downloads) == ["colleague.pt"]
    with open(os.path.join(summary["exp_dir"], "log.txt")) as f:
        assert (f"resuming from {downloads / 'colleague.pt'}, a checkpoint outside a run folder: the run goes on "
                f"in {summary['exp_dir']}") in f.read()


def test_a_file_outside_a_run_folder_with_no_step_left_leaves_no_new_folder(tmp_path, capsys):
    """A copied checkpoint resumed at its end: nothing to train, said so, and the numbered folder made for
    it removed (as for a run that fails before it starts), not left with a log.txt and no checkpoint; a
    folder that was there before the run is kept."""
    first = train_main(BASE + ["--exp-dir", str(tmp_path / "first"), "--max-steps", "1"])
    shutil.copy(first["last_checkpoint"], tmp_path / "copy.pt")
    results = tmp_path / "results"
    summary = train_main(BASE + ["--results-dir", str(results), "--resume", str(tmp_path / "copy.pt")])
    assert summary["step"] == 1
    assert not results.exists()
    out = capsys.readouterr()
    assert "nothing to do: step 1 is at or past the end of the run" in out.out + out.err
    results.mkdir()  # a --results-dir that was there: the numbered folder goes, the results dir stays
    train_main(BASE + ["--results-dir", str(results), "--resume", str(tmp_path / "copy.pt")])
    assert os.listdir(results) == []
    mine = tmp_path / "mine"  # an --exp-dir that was there is not this run's to remove
    mine.mkdir()
    train_main(BASE + ["--exp-dir", str(mine), "--resume", str(tmp_path / "copy.pt")])
    assert mine.is_dir() and "log.txt" in os.listdir(mine)


def test_resume_auto_refuses_a_run_whose_checkpoints_all_fail_to_load(tmp_path):
    """A read error of the moment (or damage) on every checkpoint of the run --resume auto would continue:
    one line, nothing written, the files where they were; not a new run from step 0 (which, in the same
    --exp-dir, would overwrite them as it went)."""
    from sit_fast.checkpoint import CheckpointError

    results = str(tmp_path / "results")
    exp = train_main(BASE + ["--results-dir", results, "--max-steps", "1"])["exp_dir"]
    path = os.path.join(exp, "checkpoints", "0000001.pt")
    with open(path, "r+b") as f:
        f.truncate(4096)
    for where in (["--results-dir", results], ["--exp-dir", exp]):
        logging.getLogger("sit_fast.train").handlers.clear()
        with pytest.raises(CheckpointError, match=rf"^--resume auto: no checkpoint of {re.escape(exp)} loads \(1 "
                                                  r"found; see the warnings above\): mend or move them aside"):
            train_main(BASE + where + ["--max-steps", "2", "--resume", "auto"])
        assert os.listdir(os.path.join(exp, "checkpoints")) == ["0000001.pt"] and os.path.getsize(path) == 4096
        assert sorted(os.listdir(results)) == [os.path.basename(exp)]


def test_a_new_branch_sets_aside_by_step_whatever_the_paths_spelling(tmp_path, monkeypatch):
    """The resumed checkpoint reached through a link to the run's folder, or as a copy of another name in
    it: the checkpoints of later steps are still set aside, so the new branch does not mix with the old.
    Two branches in one second: two folders."""
    import time

    strftime = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *when: "superseded-20261205-000000"
                        if fmt.startswith("superseded-") else strftime(fmt, *when))
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "4", "--ckpt-every", "1"])
    ckpt_dir = os.path.join(exp, "checkpoints")
    os.symlink(tmp_path, tmp_path / "link")
    train_main(BASE + ["--exp-dir", exp, "--resume", str(tmp_path / "link" / "run" / "checkpoints" / "0000003.pt"),
                       "--max-steps", "4"])
    aside = [name for name in os.listdir(ckpt_dir) if name.startswith("superseded-")]
    assert len(aside) == 1 and os.listdir(os.path.join(ckpt_dir, aside[0])) == ["0000004.pt"]
    shutil.copy(os.path.join(ckpt_dir, "0000001.pt"), os.path.join(ckpt_dir, "first.pt"))
    logging.getLogger("sit_fast.train").handlers.clear()
    train_main(BASE + ["--exp-dir", exp, "--resume", os.path.join(ckpt_dir, "first.pt"), "--max-steps", "2"])
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)] == ["0000002.pt", "0000001.pt"]
    assert aside == ["superseded-20261205-000000"]
    later = os.path.join(ckpt_dir, "superseded-20261205-000000-2")
    assert sorted(os.listdir(later)) == ["0000002.pt", "0000003.pt", "0000004.pt"]


@pytest.mark.parametrize("killed_after", range(6))
def test_a_branch_set_aside_by_a_process_killed_midway_keeps_every_old_file(tmp_path, monkeypatch, killed_after):
    """The process dies after `killed_after` of the six moves (three grids, then three checkpoints) and
    the same resume runs again: the old branch's later grids and checkpoints are all kept aside (its
    grids were left in samples/ for the new branch to overwrite, once its checkpoints had moved)."""
    from sit_fast.training.loop import set_aside_later_checkpoints

    class Killed(BaseException):
        pass

    ckpt_dir, samples = tmp_path / "checkpoints", tmp_path / "samples"
    ckpt_dir.mkdir(), samples.mkdir()
    for step in (3, 6, 9, 12):
        (ckpt_dir / f"{step:07d}.pt").write_text(f"checkpoint {step}")
        (samples / f"{step:07d}.png").write_text(f"grid {step}")
    moves, replace = [], os.replace

    def dying_replace(src, dst):
        if len(moves) == killed_after:
            raise Killed
        moves.append(dst)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        set_aside_later_checkpoints(str(ckpt_dir / "0000003.pt"), 3, str(ckpt_dir))
    monkeypatch.setattr(os, "replace", replace)
    set_aside_later_checkpoints(str(ckpt_dir / "0000003.pt"), 3, str(ckpt_dir))
    assert sorted(os.listdir(samples)) == ["0000003.png"] + sorted(n for n in os.listdir(samples) if "superseded" in n)
    assert [p.name for p in ckpt_dir.glob("*.pt")] == ["0000003.pt"]
    kept = {p.name: p.read_text() for p in tmp_path.glob("*/superseded-*/*")}
    assert kept == {**{f"{step:07d}.png": f"grid {step}" for step in (6, 9, 12)},
                    **{f"{step:07d}.pt": f"checkpoint {step}" for step in (6, 9, 12)}}


def test_a_run_folder_in_use_is_refused(tmp_path, capsys):
    """A second job training into a run folder while another does (the same job started twice, two
    jobs resuming one run) is refused in one line naming the first, which holds the folder's lock."""
    from sit_fast.files import FolderLock

    exp = str(tmp_path / "run")
    assert train_main(BASE + ["--exp-dir", exp, "--max-steps", "1"])["step"] == 1  # its lock released at the end
    other = FolderLock(exp, "--exp-dir")  # held here as another process would hold it
    other.acquire()
    capsys.readouterr()
    try:
        assert run_cli(BASE + ["--exp-dir", exp, "--max-steps", "2", "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: another job is writing into {exp} now (process {os.getpid()} on "), err
        assert err.rstrip().endswith("wait for it to end, or pass another --exp-dir"), err
    finally:
        other.release()
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(exp, "checkpoints"))] == ["0000001.pt"]
    assert train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--resume", "auto"])["step"] == 2


# train.py whose --results-dir listing (--resume auto's look for a run) says "listed" (MARK.listed) and then waits
# for GO to exist before the run folder is chosen: a job slowed there, as on a busy node
LISTED_THEN_WAIT = """
import os, sys, time
from sit_fast.errors import cli_entry
from sit_fast.training import loop
real = loop.experiment_dirs

def listed(*args):
    runs = real(*args)
    open(sys.argv[1] + ".listed", "w").close()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    return runs

loop.experiment_dirs = listed
open(sys.argv[1] + ".started", "w").close()
cli_entry(loop.main)(sys.argv[3:])
"""


def test_two_resume_auto_jobs_started_together_do_not_both_start_a_new_run(tmp_path):
    """Two `--resume auto` jobs started at once in a fresh --results-dir (the same job started twice) both
    started a new run where the second listed the folder before the first had made its run folder: the
    run folder is chosen under a lock of the results folder, for which the second waits; it then finds
    the first's run, and is refused while the first trains there (or resumes it once it has ended)."""
    results, go = tmp_path / "results", tmp_path / "go"
    argv = BASE + ["--results-dir", str(results), "--max-steps", "2", "--resume", "auto"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")

    def start(mark, go_path):
        return subprocess.Popen([sys.executable, "-c", LISTED_THEN_WAIT, str(tmp_path / mark), str(go_path), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)

    first = start("a", go)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "a.listed").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "a.listed").exists(), first.communicate()
        second = start("b", tmp_path)  # not slowed
        deadline = time.monotonic() + 120
        while not (tmp_path / "b.started").exists() and second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + 5  # its libraries loaded, the time to list the folder where nothing waits
        while not (tmp_path / "b.listed").exists() and second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        go.touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    out, err = second.communicate(timeout=300)
    runs = sorted(name for name in os.listdir(results) if not name.startswith("."))
    assert runs == ["000-SiT-T-4-Linear-velocity-None"], (runs, err)
    assert os.listdir(results) == runs  # the lock's file goes with it
    if second.returncode:  # refused while the first trained
        assert err.startswith("error: --resume auto: the newest SiT-T-4-Linear-velocity-None run in "), err
        assert "has no checkpoint yet and another job is training into it now (process " in err, err


def test_the_results_folders_lock_is_said_as_the_results_folder(tmp_path, caplog):
    """The lock a run folder is chosen under (RESULTS_DIR/.runs.lock) speaks of --results-dir as given,
    not of a file RESULTS_DIR/runs no one named (here: where the file system cannot lock)."""
    import fcntl
    import types

    from sit_fast.training import loop

    results = tmp_path / "results"
    args = types.SimpleNamespace(exp_dir=None, resume="auto", results_dir=str(results))
    real_flock = fcntl.flock

    def cannot_lock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    fcntl.flock = cannot_lock
    try:
        with caplog.at_level(logging.WARNING), loop.choosing_a_run_folder(args):
            pass
    finally:
        fcntl.flock = real_flock
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot lock {results}/.runs.lock (No locks available): a second job started on {results} while this one "
        f"runs would not be noticed"]


@pytest.mark.parametrize("resume", [[], ["--resume", "checkpoints/0000001.pt"]])
def test_a_run_folder_in_use_is_refused_before_its_checkpoints_are_judged(tmp_path, capsys, resume):
    """A new run, or a checkpoint resumed, into an --exp-dir a job trains into now was refused for the
    checkpoints there, with advice (--resume auto, --resume auto --exp-dir) that the folder's lock then
    refused: the job at work is named first, as for a resume."""
    from sit_fast.files import FolderLock

    exp = str(tmp_path / "run")
    assert train_main(BASE + ["--exp-dir", exp, "--max-steps", "1"])["step"] == 1
    copy = str(tmp_path / "checkpoints" / "0000001.pt")
    os.makedirs(os.path.dirname(copy))
    shutil.copy(os.path.join(exp, "checkpoints", "0000001.pt"), copy)
    other = FolderLock(exp, "--exp-dir")  # held here as another process would hold it
    other.acquire()
    capsys.readouterr()
    try:
        argv = BASE + ["--exp-dir", exp, "--max-steps", "2"] + [str(tmp_path / a) if a.endswith(".pt") else a
                                                                 for a in resume]
        assert run_cli(argv) == 2
        assert capsys.readouterr().err == (f"error: another job is writing into {exp} now (process {os.getpid()} on "
                                           f"{socket.gethostname()}): wait for it to end, or pass another --exp-dir\n")
    finally:
        other.release()


def test_resume_auto_refuses_a_run_a_job_trains_into_before_its_first_checkpoint(tmp_path, capsys):
    """--resume auto took the newest run without a checkpoint for one that failed before its first, and
    started a new run beside it; while another job trains into it (the same job started twice), that new
    run would train the experiment twice, and --resume auto follow the copy: refused in one line naming
    the job. Once the job has ended, the run without a checkpoint means a new run, as before."""
    from sit_fast.files import FolderLock

    results = tmp_path / "results"
    run = results / "000-SiT-T-4-Linear-velocity-None"
    os.makedirs(run / "checkpoints")
    other = FolderLock(str(run), "--exp-dir")  # held here as another process would hold it
    other.acquire()
    argv = BASE + ["--results-dir", str(results), "--max-steps", "1", "--resume", "auto"]
    capsys.readouterr()
    try:
        assert run_cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --resume auto: the newest SiT-T-4-Linear-velocity-None run in {results}, "
                              f"{run.name}, has no checkpoint yet and another job is training into it now (process "
                              f"{os.getpid()} on "), err
        assert err.rstrip().endswith("wait for that job to end, or start a run of its own without --resume"), err
        assert sorted(os.listdir(results)) == [run.name]  # no second run
    finally:
        other.release()
    assert train_main(argv)["step"] == 1  # the lock file left there is no lock: a new run
    assert sorted(os.listdir(results)) == [run.name, "001-SiT-T-4-Linear-velocity-None"]


def test_a_sample_grid_out_of_memory_saves_the_step_first(tmp_path, monkeypatch):
    """The sample grid ran out of memory after step 3, with the last checkpoint at step 0's start:
    the weights are whole, so step 3 is saved before the run ends, and the error names it."""
    from sit_fast import images

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(images, "save_image_grid", out_of_memory)
    exp = str(tmp_path / "run")
    with pytest.raises(UserError) as info:
        train_main(BASE + ["--exp-dir", exp, "--max-steps", "6", "--sample-every", "3", "--num-sample-images", "2",
                           "--sample-steps", "2"])
    saved = os.path.join(exp, "checkpoints", "0000003.pt")
    assert str(info.value).startswith("out of GPU memory after step 3 on cpu sampling the EMA grid of "
                                      "--num-sample-images 2: lower it"), info.value
    assert str(info.value).endswith(f"; last checkpoint: {saved}") and os.path.exists(saved), info.value
    monkeypatch.undo()
    assert train_main(BASE + ["--exp-dir", exp, "--max-steps", "4", "--resume", "auto"])["step"] == 4


def test_a_sample_grid_and_its_checkpoint_both_failing_raise_the_grids_error(tmp_path, monkeypatch):
    """The checkpoint saved after a failed grid cannot be written either (a full disk): that is said in
    the log, and the run ends with the grid's error (out of memory), which is what to fix."""
    from sit_fast import images
    from sit_fast.training import loop

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images, "save_image_grid", out_of_memory)
    monkeypatch.setattr(loop, "atomic_torch_save", full_disk)
    exp = tmp_path / "run"
    with pytest.raises(UserError, match=r"^out of GPU memory after step 2 .* sampling the EMA grid"):
        train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "4", "--sample-every", "2", "--num-sample-images",
                           "2", "--sample-steps", "2"])
    assert ("the sample grid failed, and the checkpoint of step 2 too: step 2: cannot write checkpoint "
            in (exp / "log.txt").read_text())


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_grid_with_samples_that_are_not_finite_says_so(tmp_path, monkeypatch, value):
    """An EMA sample with a NaN or an inf (weights that overflowed) is drawn black or clamped in the grid,
    and the log says how many samples were."""
    from sit_fast.training import loop

    real = loop.Sampler

    class Overflowing(real):
        def sample_ode(self, **kwargs):
            sample = super().sample_ode(**kwargs)

            def first_sample_nan(z, model_fn, **more):
                states = sample(z, model_fn, **more)
                states[-1][0, 0, 0, 0] = float(value)
                return states
            return first_sample_nan

    monkeypatch.setattr(loop, "Sampler", Overflowing)
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--sample-every", "2", "--num-sample-images", "3",
                       "--sample-steps", "2"])
    assert os.path.exists(os.path.join(exp, "samples", "0000002.png"))
    with open(os.path.join(exp, "log.txt")) as f:
        assert "step 2: 1 of the 3 EMA samples in the grid are not finite (NaN pixels drawn black" in f.read()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_sample_grid_that_cannot_be_written_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, code):
    """A grid is disposable, the checkpoints are not: a grid the disk refuses (or fails to write: EIO) is
    skipped with a warning naming it and the OS's error, and the run goes on to its last checkpoint."""
    from sit_fast import files

    real_open = open

    def failing(path, mode="r", *args, **kwargs):
        if "w" in mode and ".png.tmp-" in os.path.basename(path):
            raise OSError(code, os.strerror(code))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", failing, raising=False)
    exp = tmp_path / "run"
    summary = train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "2", "--sample-every", "1",
                                 "--num-sample-images", "2", "--sample-steps", "2"])
    assert summary["step"] == 2 and os.path.basename(summary["last_checkpoint"]) == "0000002.pt"
    log = (exp / "log.txt").read_text()
    said = {errno.ENOSPC: "No space left on device", errno.EIO: "Input/output error, EIO"}[code]
    for step in (1, 2):
        grid = exp / "samples" / f"{step:07d}.png"
        assert f"step {step}: the sample grid is skipped: cannot write {grid} ({said})" in log, log
    assert not [name for name in os.listdir(exp / "samples") if ".tmp-" in name]


def test_a_run_that_did_not_start_holds_its_lock_while_its_folder_is_removed(tmp_path, monkeypatch):
    """The folder of a run that never started was removed after its lock was released: a job started on
    it then (the same --exp-dir) took the lock, and lost the folder it was about to train into. The
    lock is held until its file goes, last."""
    from sit_fast.files import FolderLock

    exp = tmp_path / "run"
    seen = []  # each file of the run removed, and whether the lock was held then
    unlink, remove = os.unlink, os.remove

    def watched(real):
        def removing(path, *args, **kwargs):
            name = os.path.basename(path)
            if name in ("log.txt", "experiment.json", FolderLock.NAME) and (exp / name).exists():
                seen.append((name, FolderLock.holder(str(exp)) is not None))
            real(path, *args, **kwargs)
        return removing

    monkeypatch.setattr(os, "unlink", watched(unlink))
    monkeypatch.setattr(os, "remove", watched(remove))
    assert run_cli(BASE + ["--exp-dir", str(exp), "--image-size", "10"]) == 2  # fails before its first step
    assert not exp.exists()
    assert sorted(seen) == [(".lock", True), ("experiment.json", True), ("log.txt", True)]
    assert seen[-1][0] == FolderLock.NAME


def test_failed_start_keeps_existing_folders(tmp_path, capsys):
    """A run that never starts removes the folders it created (a new --results-dir, an --exp-dir and its
    new parents) and keeps those that were there before it."""
    results = tmp_path / "results"
    kept = tmp_path / "mine"
    kept.mkdir()
    assert run_cli(BASE + ["--results-dir", str(results), "--image-size", "10"]) == 2
    err = capsys.readouterr().err
    created = os.path.join(str(results), "000-SiT-T-4-Linear-velocity-None")
    assert f"new run in {created}" in err and f"removed {created}: the run did not start" in err, err
    assert not results.exists(), "a --results-dir created by a run that never started was left behind"
    results.mkdir()
    assert run_cli(BASE + ["--results-dir", str(results), "--image-size", "10"]) == 2
    assert "the run did not start" in capsys.readouterr().err
    assert os.listdir(results) == [], "a numbered experiment folder was left by a run that never started"
    assert run_cli(BASE + ["--exp-dir", str(kept), "--image-size", "10"]) == 2
    assert "removed" not in capsys.readouterr().err
    assert kept.is_dir(), "--exp-dir that existed before the run must be kept"
    assert run_cli(BASE + ["--exp-dir", str(kept / "new" / "run"), "--image-size", "10"]) == 2
    assert "the run did not start" in capsys.readouterr().err
    assert not (kept / "new").exists(), "the parents an --exp-dir created were left behind"


def test_user_error_from_the_real_cli(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data-path", str(tmp_path / "nope"),
                             "--exp-dir", str(tmp_path / "exp")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --data-path")
    assert "Traceback" not in result.stderr


def test_user_error_under_torchrun_is_printed_once_and_named_in_the_summary(tmp_path):
    """Each process writes the line to torchrun's error file; only rank 0 prints it on stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train.py"), "--data-path", str(tmp_path / "nope"),
               "--exp-dir", str(tmp_path / "exp")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=torchrun_env(tmp_path), timeout=240)
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).splitlines()
    assert sum(line.startswith("error: --data-path") for line in lines) == 1, result.stderr[-3000:]
    assert any(line.strip().startswith("traceback : error: --data-path") for line in lines), result.stderr[-3000:]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_user_error_goes_to_the_torchrun_error_file(tmp_path, capsys, monkeypatch, rank):
    from sit_fast.errors import UserError

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def main():
        raise UserError("--data-path /x\n   does not exist")

    with pytest.raises(SystemExit) as exit_info:
        cli_entry(main)()
    assert exit_info.value.code == 2
    assert json.loads(error_file.read_text())["message"]["message"] == "error: --data-path /x does not exist"
    assert capsys.readouterr().err == ("error: --data-path /x does not exist\n" if rank == "0" else "")


def test_a_user_error_that_cannot_go_to_the_torchrun_error_file_is_said_on_every_rank(tmp_path, capsys, monkeypatch):
    """Rank 1 leaves stderr to rank 0 only when torchrun's summary shows its error from the file."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "no_such_folder" / "error.json"))

    def main():
        raise UserError("--data-path /x does not exist")

    with pytest.raises(SystemExit) as exit_info:
        cli_entry(main)()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --data-path /x does not exist\n"


def test_a_peers_failure_is_dated_after_it_in_the_torchrun_error_file(tmp_path, monkeypatch):
    """torchrun names the earliest error (whole seconds, ties to the lowest rank) the root cause: a
    process that stops because another ended dates its error later, so the other's is named."""
    import time

    from sit_fast.errors import PEER_FAILED_LATER_S, PeerFailed, UserError

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert PEER_FAILED_LATER_S >= 1
    for error, later in ((UserError("--data-path /x does not exist"), 0),
                         (PeerFailed("another process ended"), PEER_FAILED_LATER_S)):
        def main():
            raise error

        before = int(time.time())
        with pytest.raises(SystemExit):
            cli_entry(main)()
        stamp = int(json.loads(error_file.read_text())["message"]["extraInfo"]["timestamp"])
        assert before + later <= stamp <= int(time.time()) + later, (error, stamp)


def test_a_process_whose_error_ends_the_job_lets_the_others_say_so_first(tmp_path, monkeypatch):
    """Under torchrun with other processes, a process's own error waits LINGER_S after its error file
    is written: torchrun ends the others once one exits, and one ended before writing its own word
    would be dated the same second and, as the lower rank, named the root cause. One that stops for
    another's failure waits longer (PEER_LINGER_S), so that the failed one ends first: the torchrun
    of torch 2.9 names only processes that ended by themselves."""
    import time

    from sit_fast import errors

    import types

    assert errors.LINGER_S >= 1 and errors.PEER_LINGER_S >= errors.LINGER_S + 1
    clock = types.SimpleNamespace(now=0.0)  # the linger's own clock, advanced by its sleeps: no wall time

    def sleep(seconds):
        clock.now += seconds

    monkeypatch.setattr(errors, "time", types.SimpleNamespace(monotonic=lambda: clock.now, sleep=sleep,
                                                              time=time.time))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    stopped_meanwhile = errors.PeerFailed("another process ended")
    stopped_meanwhile.stop_noted = True  # torchrun's SIGTERM came as peer_failed waited: no wait for it now
    for error, world_size, linger in ((errors.UserError("x"), "2", errors.LINGER_S),
                                      (errors.PeerFailed("another process ended"), "2", errors.PEER_LINGER_S),
                                      (stopped_meanwhile, "2", 0.0),
                                      (errors.UserError("x"), "1", 0.0),
                                      (errors.PeerFailed("another process ended"), "1", 0.0)):
        def main():
            raise error

        monkeypatch.setenv("WORLD_SIZE", world_size)
        start = clock.now
        with pytest.raises(SystemExit):
            cli_entry(main)()
        took = clock.now - start
        assert linger <= took < linger + 0.1, (error, world_size, took)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_lingering_ends_the_process_quietly(tmp_path, signum):
    """Ctrl-C passed on by torchrun, or torchrun ending the process, during the linger: exit status 2,
    the error said once, no traceback (a KeyboardInterrupt out of time.sleep was one)."""
    import signal
    import time

    error_file = tmp_path / "error.json"
    script = ("from sit_fast.errors import UserError, cli_entry\n"
              "def main():\n"
              "    raise UserError('--data-path /x does not exist')\n"
              "cli_entry(main)()\n")
    env = dict(os.environ, PYTHONPATH=REPO, TORCHELASTIC_ERROR_FILE=str(error_file), WORLD_SIZE="2", RANK="0")
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not error_file.exists() and time.monotonic() < deadline:  # written just before the linger
        time.sleep(0.02)
    process.send_signal(getattr(signal, signum))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    assert err == "error: --data-path /x does not exist\n", err


@pytest.mark.parametrize("phase", ["train", "compiling", "samples"])
def test_out_of_gpu_memory_names_the_flags_that_fit(tmp_path, capsys, monkeypatch, phase):
    """Raised where a GPU would raise it (the CPU build has the same exception type); "compiling":
    wrapped in another exception, as torch.compile's backend reports one (that was a traceback)."""
    from sit_fast.training.loop import Trainer

    calls = []
    original = Trainer.train_step

    def train_step(self, batch):
        calls.append(1)
        if phase != "samples" and len(calls) == 3:
            oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if phase == "train":
                raise oom
            raise RuntimeError("backend='inductor' raised: the error above") from oom
        return original(self, batch)

    def save_samples(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "save_samples", save_samples)
    exp = tmp_path / "exp"
    argv = BASE + ["--exp-dir", str(exp), "--max-steps", "6", "--ckpt-every", "2", "--sample-every", "4"]
    assert run_cli(argv) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: out of GPU memory") and "Traceback" not in stderr
    err = lines[0]
    if phase != "samples":
        assert "at step 3" in err and "a batch of 64 per GPU" in err
        assert "--grad-accum-steps 2 (the same global batch, micro-batches of 32)" in err
        assert "--precision bf16" in err and "--grad-checkpointing" in err
        assert "--vae-precision" not in err  # pixel space: no VAE in the loop
        assert err.endswith(f"last checkpoint: {exp / 'checkpoints' / '0000002.pt'}")
    else:
        assert "after step 4" in err and "--num-sample-images 16" in err
    assert err in (exp / "log.txt").read_text()


def test_a_steps_grid_is_drawn_before_its_checkpoint_is_written(tmp_path, monkeypatch):
    """At a step that is both a grid's and a checkpoint's, the grid comes first: a run killed between
    the two resumes from the checkpoint before and draws it again, where a grid after the checkpoint
    was lost for good (the resumed run starts after its step; the last step's relaunch has nothing to do)."""
    from sit_fast.training.loop import Trainer

    seen, original = [], Trainer.save_checkpoint

    def save_checkpoint(self):
        seen.append((self.step, sorted(os.listdir(os.path.join(self.exp_dir, "samples")))))
        return original(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    exp = tmp_path / "exp"
    argv = [*BASE, "--exp-dir", str(exp), "--max-steps", "4", "--ckpt-every", "2", "--sample-every", "2",
            "--num-sample-images", "2", "--sample-steps", "1"]
    assert run_cli(argv) == 0
    assert seen == [(2, ["0000002.png"]), (4, ["0000002.png", "0000004.png"])]


def test_out_of_gpu_memory_in_a_step_after_a_sample_grid_is_advised_as_trainings(tmp_path, capsys, monkeypatch):
    """The sampling phase ends with its grid: a step after it that runs out of memory gets the training
    advice (the batch and the flags that fit it), not the grid's."""
    from sit_fast.training.loop import Trainer

    original = Trainer.train_step

    def train_step(self, batch):
        if self.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "save_samples", lambda self: None)
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "6", "--sample-every", "1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: out of GPU memory at step 3 on cpu training SiT-T/4 "
                                                   "with a batch of 64 per GPU"), lines


def test_out_of_gpu_memory_before_the_first_step_is_one_line(tmp_path, capsys, monkeypatch):
    from sit_fast.training.loop import Trainer

    def build(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "done"), "--max-steps", "1"]) == 0
    monkeypatch.setattr(Trainer, "_build_model", build)  # the model moved to the GPU
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "2"]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: out of GPU memory on cpu setting up SiT-T/4 before its first step: a smaller --model, or a GPU "
        "with more free memory (USAGE.md, Memory)")
    # A resume (no --model given: the run's, not the default): its model named, no other --model suggested
    assert run_cli(["--exp-dir", str(tmp_path / "done"), "--resume", "auto", "--max-steps", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: out of GPU memory on cpu setting up SiT-T/4 (the run being resumed) before its first step: a GPU "
        "with more free memory (USAGE.md, Memory)")


def test_an_image_size_past_all_memory_is_one_line_naming_it_and_leaves_no_run_folder(tmp_path, capsys):
    """--image-size 1000000 asks for more memory than the machine has (the digits resized: 6.5 PB):
    one line naming the size flags, not an allocator's traceback, and no run folder left."""
    argv = [arg if arg != "8" else "1000000" for arg in BASE]
    assert run_cli(argv + ["--results-dir", str(tmp_path / "results"), "--max-steps", "2"]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert re.fullmatch(r"error: out of memory on cpu: one allocation asked for \d+\.\d TiB, more than the [\d.]+ "
                        r"[GT]iB it has in all: a size given is far too large \(check --image-size 1000000, "
                        r"--global-batch-size 64, --sample-steps 16, --num-sample-images 16\)",
                        stderr.strip().splitlines()[-1]), stderr
    assert not (tmp_path / "results").exists()  # made by the run, removed with its folder


def test_a_grid_past_all_memory_names_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """A grid that asks for more than the machine has (--sample-steps far too large) after a checkpoint
    is one line naming the size flags and the last checkpoint."""
    from sit_fast.training.loop import Trainer

    def save_samples(self):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           f"{2**60} bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Trainer, "save_samples", save_samples)
    exp = tmp_path / "exp"
    argv = BASE + ["--exp-dir", str(exp), "--max-steps", "4", "--ckpt-every", "2", "--sample-every", "3"]
    assert run_cli(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: out of memory on cpu: one allocation asked for 1048576.0 TiB, more than the ")
    assert line.endswith("(check --image-size 8, --global-batch-size 64, --sample-steps 16, --num-sample-images 16); "
                         f"last checkpoint: {exp / 'checkpoints' / '0000003.pt'}")  # saved before the grid


def test_the_cpus_running_out_of_memory_in_a_step_is_advised_as_memory_not_gpu_memory(tmp_path, capsys, monkeypatch):
    from sit_fast.training.loop import Trainer

    def train_step(self, batch):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes.")

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: out of memory at step 1 on cpu training SiT-T/4 with a batch of 64 per GPU: fit it "
                           "with --grad-accum-steps 2"), line


def test_out_of_gpu_memory_advice_leaves_out_the_flags_already_in_use(tmp_path):
    """The training advice names only the flags that would change something, and the batch as it is
    split; the grid's advice suggests --cfg-scale 1 only under guidance, and names the last checkpoint."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args

    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run")])
    trainer = loop.Trainer(args, explicit, init_distributed())
    trainer.step, trainer.precision, device = 5, "fp32", trainer.device
    assert trainer.out_of_memory_advice() == (
        f"out of GPU memory at step 6 on {device} training SiT-T/4 with a batch of 64 per GPU: fit it with "
        "--grad-accum-steps 2 (the same global batch, micro-batches of 32), --precision bf16, --grad-checkpointing "
        "or a smaller --global-batch-size (USAGE.md, Memory)")
    trainer.precision, args.grad_checkpointing, args.grad_accum_steps = "bf16", True, 2
    trainer.last_checkpoint = "run/checkpoints/0000004.pt"
    assert trainer.out_of_memory_advice() == (
        f"out of GPU memory at step 6 on {device} training SiT-T/4 with a batch of 64 per GPU in micro-batches of 32: "
        "fit it with --grad-accum-steps 4 (the same global batch, micro-batches of 16) or a smaller "
        "--global-batch-size (USAGE.md, Memory); last checkpoint: run/checkpoints/0000004.pt")
    trainer.phase = "samples"
    assert trainer.out_of_memory_advice() == (
        f"out of GPU memory after step 5 on {device} sampling the EMA grid of --num-sample-images 16: lower it or "
        "--cfg-scale 1; last checkpoint: run/checkpoints/0000004.pt")
    args.cfg_scale, trainer.last_checkpoint = 1.0, None
    assert trainer.out_of_memory_advice() == (
        f"out of GPU memory after step 5 on {device} sampling the EMA grid of --num-sample-images 16: lower it")


def test_trackers_get_the_scalars_and_the_sample_grids(tmp_path, monkeypatch):
    """--wandb and --tensorboard, through stand-ins for their packages (neither is installed here)."""
    import types

    logged = {"wandb": [], "scalars": [], "images": [], "axes": {}, "log_dir": [], "init": []}

    class Run:  # a resumed run logs steps its wandb run has seen: the step is a value, not log(step=)
        def define_metric(self, name, step_metric=None):
            logged["axes"][name] = step_metric

        def log(self, data):
            logged["wandb"].append(data)

        def finish(self):
            pass

    class Writer:
        def __init__(self, log_dir):
            logged["log_dir"].append(log_dir)

        def add_scalar(self, tag, value, step):
            logged["scalars"].append((tag, step))

        def add_image(self, tag, array, step, dataformats):
            logged["images"].append((tag, array.shape, array.dtype, step, dataformats))

        def close(self):
            pass

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: logged["init"].append(kwargs) or Run()
    wandb.Image = lambda path: ("image", path)
    monkeypatch.delenv("PROJECT", raising=False)
    monkeypatch.delenv("ENTITY", raising=False)
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    exp = tmp_path / "exp"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "4", "--log-every", "2", "--sample-every", "4",
                       "--num-sample-images", "4", "--sample-steps", "2", "--wandb", "--tensorboard"])
    grid = str(exp / "samples" / "0000004.png")
    assert {"samples": ("image", grid), "train/step": 4} in logged["wandb"]
    assert logged["axes"] == {"train/step": None, "train/*": "train/step", "samples": "train/step"}
    height, width = np.asarray(Image.open(grid)).shape[:2]
    assert logged["images"] == [("samples", (height, width, 3), np.uint8, 4, "HWC")]
    assert ("train/loss", 2) in logged["scalars"] and ("train/loss", 4) in logged["scalars"]
    assert any(data["train/step"] == 2 and "train/loss" in data for data in logged["wandb"])
    assert logged["log_dir"] == [str(exp / "tensorboard")]
    (init,) = logged["init"]  # named by the run folder, in the default project, with the run's flags
    assert (init["name"], init["project"], init["entity"]) == ("exp", "sit_fast", None)
    assert init["config"]["max_steps"] == 4 and init["config"]["model"] == "SiT-T/4"


def test_tensorboard_alone_gets_the_sample_grids(tmp_path, monkeypatch):
    import types

    images = []

    class Writer:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, tag, value, step):
            pass

        def add_image(self, tag, array, step, dataformats):
            images.append((tag, step))

        def close(self):
            pass

    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    train_main(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "2", "--sample-every", "2",
                       "--num-sample-images", "2", "--sample-steps", "2", "--tensorboard"])
    assert images == [("samples", 2)]


def test_a_resumed_run_goes_on_in_its_wandb_run(tmp_path, monkeypatch):
    import types

    calls = []

    class Run:
        def define_metric(self, name, step_metric=None):
            pass

        def log(self, data):
            pass

        def finish(self):
            pass

    def init(**kwargs):
        calls.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=None))
    exp = str(tmp_path / "exp")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2", "--wandb"])
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "3", "--resume", "auto", "--wandb"])
    train_main(BASE + ["--exp-dir", str(tmp_path / "other"), "--max-steps", "1", "--wandb"])
    # a branch: the run's checkpoint resumed into another folder, while the run may go on in its own
    branch = str(tmp_path / "branch")
    train_main(["--exp-dir", branch, "--resume", os.path.join(exp, "checkpoints", "0000002.pt"), "--max-steps", "3"])
    ids = [kwargs["id"] for kwargs in calls]
    assert ids[0] == ids[1] != ids[2] and all(kwargs["resume"] == "allow" for kwargs in calls), calls
    assert len(set(ids)) == len(ids) - 1 == 3, ids
    assert load_ckpt(os.path.join(exp, "checkpoints", "0000003.pt"))["wandb_id"] == ids[0]
    assert load_ckpt(os.path.join(branch, "checkpoints", "0000003.pt"))["wandb_id"] == ids[3]


def test_trackers_are_closed_when_the_run_fails(tmp_path, monkeypatch):
    """A run stopped by an error still closes TensorBoard's writer (which holds the latest scalars
    until then) and finishes the wandb run as failed."""
    import types

    from sit_fast.training.loop import NonFiniteLossError

    closed = {"tensorboard": False, "wandb": None}

    class Run:
        def define_metric(self, name, step_metric=None):
            pass

        def log(self, data):
            pass

        def finish(self, exit_code=None):
            closed["wandb"] = exit_code

    class Writer:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, tag, value, step):
            pass

        def close(self):
            closed["tensorboard"] = True

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: Run()
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    poison_batch(monkeypatch, call=2)
    with pytest.raises(NonFiniteLossError):
        train_main(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "4", "--log-every", "1", "--wandb",
                           "--tensorboard"])
    assert closed == {"tensorboard": True, "wandb": 1}


def test_a_vae_with_another_downsampling_takes_sizes_it_divides(tmp_path):
    """The tiny test VAE halves the size: 12 px images make 6x6 latents, whatever 12 % 8 is."""
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    summary = train_main(["--data-path", images, "--vae", vae_dir, "--image-size", "12", "--model", "SiT-T/2",
                          "--global-batch-size", "2", "--num-workers", "0", "--fused-kernels", "off", "--no-progress",
                          "--exp-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert load_ckpt(summary["last_checkpoint"])["model_config"]["input_size"] == 6
    # resumed with another VAE of the same shapes: it goes on, and the log says the latent space changed
    other = str(tmp_path / "other_vae")
    save_tiny_vae(other)
    resumed = train_main(["--vae", other, "--exp-dir", str(tmp_path / "run"), "--resume", "auto", "--max-steps", "2",
                          "--no-progress"])
    assert resumed["step"] == 2
    log = (tmp_path / "run" / "log.txt").read_text()
    assert (f"trained in the latent space of {os.path.abspath(vae_dir)}; it continues in that of "
            f"{os.path.abspath(other)}") in log
    assert ("resumed at step 1 (epoch 0, step 1 in it): the data order and random states are the run's; the latents "
            "are another VAE's (above), so the steps are not the original run's") in log and ": exact" not in log


def test_vae_precision_bf16_encodes_under_autocast_and_gives_fp32_latents(tmp_path):
    """--vae-precision bf16: the VAE's layers compute in bf16, the latents come back fp32 and close to
    fp32 encoding's; the default stays fp32, as upstream."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    common = ["--data-path", images, "--vae", vae_dir, "--image-size", "16", "--model", "SiT-T/2",
              "--global-batch-size", "2", "--num-workers", "0", "--fused-kernels", "off", "--no-progress"]
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = {}
    for precision in ("fp32", "bf16"):
        flags = [] if precision == "fp32" else ["--vae-precision", "bf16"]
        args, explicit = parse_args(common + flags + ["--exp-dir", str(tmp_path / precision)])
        assert args.vae_precision == precision
        trainer = Trainer(args, explicit, init_distributed())
        codec = trainer.codec
        # out of memory, the flag is among the ways to fit (the VAE encodes every batch), unless in use
        assert ("--vae-precision bf16" in trainer.out_of_memory_advice()) == (precision == "fp32")
        seen = []
        codec.vae.encoder.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        latents[precision] = codec.encode(pixels)[0]
        assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
        assert latents[precision].dtype == torch.float32
    assert not torch.equal(latents["bf16"], latents["fp32"])
    torch.testing.assert_close(latents["bf16"], latents["fp32"], atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- latent cache

def test_latent_cache_round_trip_and_training(tmp_path):
    from sit_fast import latent_cache
    from sit_fast.data import ImageFolderDataset, LatentCacheDataset
    from sit_fast.vae import load_vae
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    out = str(tmp_path / "cache")
    latent_cache.main(["--data-path", images, "--image-size", "16", "--vae", vae_dir, "--out", out,
                       "--shard-size", "4", "--batch-size", "2", "--num-workers", "0", "--dtype", "float32"])
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["num_images"] == 6 and [s["count"] for s in index["shards"]] == [4, 2]
    assert index["latent_channels"] == 4 and index["latent_size"] == 8 and index["num_classes"] == 2

    cache = LatentCacheDataset(out)
    assert len(cache) == 6 and cache.num_classes == 2  # every image, whatever the shards
    source = ImageFolderDataset(images, 16)
    codec = load_vae(vae_dir, "cpu")
    keys = [(5, 0), (1, 1), (4, 1)]  # across both shards, as is and mirrored
    mean, std, labels = cache.__getitems__(keys)
    pixels = torch.stack([source.load(i, flip) for i, flip in keys])
    expected_mean, expected_std = codec.encode(pixels)
    torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, expected_std, atol=1e-5, rtol=1e-4)
    assert labels.tolist() == [source.samples[i][1] for i, _ in keys]
    # Pickled for workers that are not forked (spawn, or forkserver: Python 3.14's default), the
    # opened shard maps stay behind: a worker maps them itself rather than receiving copies
    import pickle

    pickled = pickle.dumps(cache)
    assert cache._shards is not None and len(pickled) < 8192, len(pickled)
    copy = pickle.loads(pickled)
    assert copy._shards is None
    for got, expected in zip(copy.__getitems__(keys), (mean, std, labels)):
        assert torch.equal(got, expected)

    exp = str(tmp_path / "exp")
    summary = train_main(["--latent-cache", out, "--model", "SiT-T/4", "--global-batch-size", "2", "--max-steps", "3",
                          "--ckpt-every", "3", "--sample-every", "3", "--num-sample-images", "2", "--exp-dir", exp,
                          "--num-workers", "1", "--fused-kernels", "off", "--no-progress", "--log-every", "1",
                          "--dataset", "digits", "--data-path", images])  # both unused: the cache holds the data
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    assert os.path.isfile(os.path.join(exp, "samples", "0000003.png"))  # decoded with the cache's VAE
    with pytest.raises(UserError, match=r"^--image-size 32 differs from the latent cache's 16: leave --image-size out "
                                        r"\(the cache's is taken\) or pass 16$"):
        train_main(["--latent-cache", out, "--image-size", "32", "--exp-dir", str(tmp_path / "exp32")])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert f"--data-path {images} is not used with --latent-cache" in log
    assert "--dataset digits is not used with --latent-cache (the cache holds the data)" in log
    assert load_ckpt(list_checkpoints(os.path.join(exp, "checkpoints"))[0])["args"]["in_channels"] == 4
    # --vae with a cache decodes the grids: another VAE's is said at the start, and one whose latents have
    # other channels skips the grids (the run goes on) rather than ending the run at its first grid
    other_vae, other_exp = str(tmp_path / "vae8"), str(tmp_path / "exp8")
    save_tiny_vae(other_vae, latent_channels=8)
    summary = train_main(["--latent-cache", out, "--vae", other_vae, "--model", "SiT-T/4", "--global-batch-size",
                          "2", "--max-steps", "1", "--sample-every", "1", "--num-sample-images", "2", "--exp-dir",
                          other_exp, "--num-workers", "0", "--fused-kernels", "off", "--no-progress"])
    assert summary["step"] == 1 and not os.path.exists(os.path.join(other_exp, "samples", "0000001.png"))
    with open(os.path.join(other_exp, "log.txt")) as f:
        log = f.read()
    assert f"the sample grids are decoded with --vae {other_vae}; the latent cache {out} was encoded with" in log
    assert f"sample grids are skipped: the VAE {other_vae} decodes 8-channel latents; the latent cache's have 4" in log
    # with no grids, --vae has nothing to do: said so, rather than compared with the cache's
    train_main(["--latent-cache", out, "--vae", other_vae, "--model", "SiT-T/4", "--global-batch-size", "2",
                "--max-steps", "1", "--sample-every", "none", "--exp-dir", str(tmp_path / "exp_no_grids"),
                "--num-workers", "0", "--fused-kernels", "off", "--no-progress"])
    with open(tmp_path / "exp_no_grids" / "log.txt") as f:
        log = f.read()
    assert (f"--vae {other_vae} is not used with --latent-cache and --sample-every none (with a cache, the VAE only "
            "decodes the sample grids)") in log and "the sample grids are decoded with" not in log, log
    # --vae none cannot make the cache's latents pixels: the grids are the cache VAE's, and that is said
    train_main(["--latent-cache", out, "--vae", "none", "--model", "SiT-T/4", "--global-batch-size", "2",
                "--max-steps", "1", "--sample-every", "1", "--num-sample-images", "2", "--exp-dir",
                str(tmp_path / "exp_none"), "--num-workers", "0", "--fused-kernels", "off", "--no-progress"])
    assert os.path.isfile(tmp_path / "exp_none" / "samples" / "0000001.png")
    with open(tmp_path / "exp_none" / "log.txt") as f:
        assert (f"--vae none is not used with --latent-cache: the sample grids are decoded with the VAE the cache "
                f"records ({vae_dir}); --sample-every none for no grids") in f.read()
    # --latent-cache none on resume: the run goes on from the images, encoded each step by the VAE of the
    # latent space it trained in (not the default --vae, which the cache run recorded but never used)
    summary = train_main(["--exp-dir", exp, "--resume", "auto", "--max-steps", "4", "--latent-cache", "none",
                          "--dataset", "imagefolder", "--data-path", images, "--image-size", "16"])
    assert summary["step"] == 4 and np.isfinite(summary["loss"])
    with open(os.path.join(exp, "log.txt")) as f:
        assert f"using --vae {vae_dir}: the latent space recorded in the checkpoint" in f.read()
    saved = load_ckpt(list_checkpoints(os.path.join(exp, "checkpoints"))[0])["args"]
    assert saved["latent_cache"] is None and saved["data_path"] == images and saved["vae"] == vae_dir


def test_a_latent_cache_whose_vae_cannot_be_loaded_skips_the_grids_with_a_warning(tmp_path):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out))
    shutil.rmtree(vae_dir)
    exp = tmp_path / "exp"
    summary = train_main(["--latent-cache", out, "--model", "SiT-T/4", "--global-batch-size", "2", "--max-steps", "2",
                          "--ckpt-every", "2", "--sample-every", "1", "--num-sample-images", "2", "--exp-dir",
                          str(exp), "--num-workers", "0", "--fused-kernels", "off", "--no-progress"])
    assert summary["step"] == 2 and summary["last_checkpoint"] == str(exp / "checkpoints" / "0000002.pt")
    assert not (exp / "samples").exists() or not os.listdir(exp / "samples")
    with open(exp / "log.txt") as f:
        warnings = [line for line in f if "sample grids are skipped: " in line]
    assert len(warnings) == 1 and vae_dir in warnings[0], warnings  # said once, not at every grid


def test_training_from_a_latent_cache_is_training_from_its_images(tmp_path):
    """The same seed trains the same from a (float32) latent cache as from the images through the VAE:
    the same losses, weights within the cache's rounding. The VAE's encoding came out channels-last on
    the CPU, and the training noise drawn like it (randn_like, as upstream) fell on other elements."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    out = str(tmp_path / "cache")
    latent_cache.main(["--data-path", images, "--image-size", "16", "--vae", vae_dir, "--out", out,
                       "--num-workers", "0", "--dtype", "float32", "--no-progress"])
    common = ["--model", "SiT-T/4", "--global-batch-size", "2", "--max-steps", "3", "--ckpt-every", "3",
              "--sample-every", "none", "--num-workers", "0", "--fused-kernels", "off", "--no-progress",
              "--log-every", "1", "--global-seed", "7"]
    runs = {}
    for name, data in (("cache", ["--latent-cache", out]),
                       ("images", ["--data-path", images, "--image-size", "16", "--vae", vae_dir])):
        summary = train_main(common + data + ["--exp-dir", str(tmp_path / f"run_{name}")])
        log = (tmp_path / f"run_{name}" / "log.txt").read_text()
        runs[name] = (re.findall(r"Train Loss: ([0-9.]+)", log), load_ckpt(summary["last_checkpoint"])["model"])
    assert runs["cache"][0] == runs["images"][0] and len(runs["cache"][0]) == 3, runs
    for key, value in runs["cache"][1].items():
        torch.testing.assert_close(value, runs["images"][1][key], atol=1e-5, rtol=1e-5)


def _cache_args(images, vae_dir, out, *extra):
    return ["--data-path", images, "--image-size", "16", "--vae", vae_dir, "--out", out, "--shard-size", "2",
            "--batch-size", "2", "--num-workers", "0", "--dtype", "float32", "--no-progress", *extra]


def _built_cache(tmp_path) -> tuple[str, str, str]:
    """A tiny VAE, a folder of 2 x 3 images and their cache (_cache_args': 3 shards of 2): the paths of
    the images, the VAE and the cache."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out))
    return images, vae_dir, out


def test_ckpt_of_another_latent_space_names_the_cache_to_train_on_under_a_latent_cache(tmp_path, capsys):
    """Under --latent-cache the cache's VAE sets the latent space (--vae decodes the grids alone): --ckpt
    weights of another latent space are told of with the cache to build, not a --vae to pass."""
    from sit_fast.models import SiT_models

    _, vae_dir, cache = _built_cache(tmp_path)
    args = ["--latent-cache", cache, "--model", "SiT-T/4", "--global-batch-size", "2", "--max-steps", "1",
            "--sample-every", "none", "--num-workers", "0", "--fused-kernels", "off", "--no-progress"]
    weights = SiT_models["SiT-T/4"](input_size=8, in_channels=4, num_classes=2).state_dict()
    path = str(tmp_path / "other.pt")
    torch.save({"model": weights, "ema": weights, "model_config": {"latent_space": "/vaes/other"}}, path)
    exp = tmp_path / "exp"
    assert train_main(args + ["--exp-dir", str(exp), "--ckpt", path])["step"] == 1
    assert ("its weights start from another latent space (train on a latent cache built with --vae /vaes/other to "
            "keep its own)") in (exp / "log.txt").read_text()
    weights = SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=2).state_dict()
    torch.save({"model": weights, "ema": weights, "model_config": {"latent_space": "pixels"}}, path)
    assert run_cli(args + ["--exp-dir", str(tmp_path / "exp2"), "--ckpt", path]) == 2
    line, _ = the_error_line(capsys)
    assert line.endswith("train on the images with --vae none, not on a latent cache (it was trained in pixel "
                         "space)"), line


def test_latent_cache_resumes_only_missing_shards_and_refuses_other_settings(tmp_path, capsys):
    from sit_fast import latent_cache

    images, vae_dir, out = _built_cache(tmp_path)
    shard = lambda k: os.path.join(out, latent_cache.shard_name(k))  # noqa: E731
    first = torch.load(shard(1), weights_only=True)
    os.remove(shard(1))  # as a run killed before writing it would leave the folder
    stamps = {k: os.stat(shard(k)).st_mtime_ns for k in (0, 2)}
    capsys.readouterr()
    latent_cache.main(_cache_args(images, vae_dir, out))
    assert "4 of 6 images already in" in capsys.readouterr().out
    assert {k: os.stat(shard(k)).st_mtime_ns for k in (0, 2)} == stamps  # not re-encoded
    again = torch.load(shard(1), weights_only=True)
    for key in ("mean", "std", "labels"):
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)
    # a shard cut short after it was written whole (a copy that failed, a damaged disk) is encoded again
    with open(shard(1), "r+b") as f:
        f.truncate(os.path.getsize(shard(1)) // 2)
    capsys.readouterr()
    latent_cache.main(_cache_args(images, vae_dir, out))
    captured = capsys.readouterr()
    assert "4 of 6 images already in" in captured.out
    assert f"--out {out}: 1 shard(s) cut short or damaged ({latent_cache.shard_name(1)}): encoded again" in captured.err
    assert torch.equal(torch.load(shard(1), weights_only=True)["mean"], first["mean"])

    def refused(extra):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            latent_cache.main(_cache_args(images, vae_dir, out) + extra)
        return capsys.readouterr().err

    os.remove(shard(1))
    real_save = latent_cache.atomic_torch_save
    try:  # written where this process does not see it (another node's own disk): no index of it
        latent_cache.atomic_torch_save = lambda obj, path: None
        assert refused([]) == (f"error: --out {out}: 1 shard(s) written by this job are missing (shard-00001.pt): is "
                               f"the folder on a filesystem every process sees? The same command encodes them again\n")
    finally:
        latent_cache.atomic_torch_save = real_save
    latent_cache.main(_cache_args(images, vae_dir, out))

    for extra, named in ((["--dtype", "float16"], "--dtype"), (["--image-size", "8"], "--image-size")):
        assert re.fullmatch(rf"error: \S+ holds latents made with other settings \({named}: .*pass another --out, "
                            r"or delete it to start over\n", refused(extra))
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(os.path.join(images, "class1", "9.png"))  # the data changed
    assert "num_images: 6 there, 7 now" in refused([])
    with open(os.path.join(out, "settings.json"), "w") as f:
        f.write("{bad")
    assert re.fullmatch(r"error: cannot read \S+settings.json \(.*\): it records the settings of the latents in "
                        r"\S+; restore it, or pass another --out\n", refused([]))
    (tmp_path / "a_file").write_text("")
    assert (refused(["--out", str(tmp_path / "a_file")])
            == f"error: --out {tmp_path / 'a_file'} is a file: pass a folder\n")
    os.remove(os.path.join(out, "settings.json"))  # the record lost: the shards' settings are unknown
    assert refused([]) == (f"error: {out} holds latents (3 files like shard-00000.pt) but no settings.json, so what "
                           "made them is unknown: pass another --out, or delete them to start over\n")
    # Another job encoding into the folder now (its lock held here as another process holds it)
    from sit_fast.files import FolderLock

    other = FolderLock(out, "--out")
    other.acquire()
    try:
        assert refused([]).startswith(f"error: another job is writing into {out} now (process {os.getpid()} on ")
    finally:
        other.release()


def test_a_latent_cache_build_into_a_folder_another_builds_is_refused_before_the_scan(tmp_path, monkeypatch, capsys):
    """A second build started on an --out another is writing was refused only at the settings' check,
    after the dataset's scan (minutes for ImageNet) and the VAE's load: it is refused before either."""
    from sit_fast import latent_cache
    from sit_fast.files import FolderLock

    out = str(tmp_path / "cache")
    os.makedirs(out)

    def not_yet(*args, **kwargs):
        raise AssertionError("the dataset scanned, or the VAE loaded, before the refusal")

    monkeypatch.setattr(latent_cache, "ImageFolderDataset", not_yet)
    monkeypatch.setattr(latent_cache, "load_vae", not_yet)
    other = FolderLock(out, "--out")  # held here as the other build's process would hold it
    other.acquire()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit):
            latent_cache.main(_cache_args(str(tmp_path / "images"), str(tmp_path / "vae"), out))
        assert capsys.readouterr().err == (f"error: another job is writing into {out} now (process {os.getpid()} "
                                           f"on {socket.gethostname()}): wait for it to end, or pass another --out\n")
    finally:
        other.release()


def test_latent_cache_verify_refuses_encoding_flags_other_than_the_caches(tmp_path, capsys):
    """--verify with the build's own flags checks the cache; an encoding flag given with another value
    (the cache is not the one meant) is refused in one line naming both, not left unread."""
    from sit_fast import latent_cache

    images, vae_dir, out = _built_cache(tmp_path)
    capsys.readouterr()
    assert latent_cache.main(_cache_args(images, vae_dir, out, "--verify"))["num_images"] == 6
    for flag, value, built in (("--image-size", "32", "16"), ("--dtype", "float16", "float32"),
                               ("--shard-size", "4096", "2"), ("--vae-precision", "bf16", "fp32")):
        with pytest.raises(SystemExit) as stopped:
            latent_cache.main(["--verify", "--out", out, "--no-progress", flag, value])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.strip() == (f"error: {flag} {value}: the cache in --out {out} was encoded "
                                                   f"with {flag} {built}; --verify checks it as it was built: drop "
                                                   f"{flag}")
    with pytest.raises(SystemExit):
        latent_cache.main(["--verify", "--out", out, "--no-progress", "--vae", "mse"])
    assert capsys.readouterr().err.strip().startswith("error: --vae mse: the cache in --out")


def test_latent_cache_verify_reads_every_shard_whole_and_names_the_ones_changed_since(tmp_path, capsys):
    """--verify: a shard whose bytes a disk or a copy changed (still a readable archive, which training
    would read as it is) is named, with the command that encodes it again; so are non-finite values
    and labels out of range; a whole cache is said to be whole."""
    import zipfile

    from sit_fast import latent_cache

    images, vae_dir, out = _built_cache(tmp_path)
    shard = lambda k: os.path.join(out, latent_cache.shard_name(k))  # noqa: E731
    verify = ["--verify", "--out", out, "--no-progress"]
    capsys.readouterr()
    assert latent_cache.main(verify)["num_images"] == 6
    assert capsys.readouterr().out == (f"latent cache {out}: 3 shard(s), 6 images x 2 flips: every byte as written, "
                                       f"shapes as indexed, values finite, labels in range; the images in "
                                       f"{os.path.abspath(images)} are still those encoded (names and classes)\n")
    hidden = os.path.join(images, sorted(os.listdir(images))[0], "._x.png")  # macOS's metadata beside an image
    open(hidden, "wb").close()
    logging.getLogger("sit_fast").handlers.clear()  # as in a process of its own: the build above set them
    assert latent_cache.main(verify)["num_images"] == 6
    assert capsys.readouterr().err.startswith(f"warning: --data-path {os.path.abspath(images)}: 1 hidden file ")
    os.remove(hidden)

    def refused():
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            latent_cache.main(verify)
        assert stop.value.code == 2
        return capsys.readouterr().err

    whole = open(shard(1), "rb").read()
    with zipfile.ZipFile(shard(1)) as archive:  # one bit of the mean's storage flipped
        record = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    with open(shard(1), "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
        where = record.header_offset + 30 + name_length + extra_length + 5
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x10]))
    assert latent_cache.whole_archive(shard(1))  # the build's own check (the archive's directory) passes it
    again = (f"delete them, then python -m sit_fast.latent_cache --data-path {os.path.abspath(images)} --out {out} "
             f"--image-size 16 --vae {os.path.abspath(vae_dir)} --vae-precision fp32 --dtype float32 --shard-size 2 "
             f"encodes them again\n")
    assert refused() == (f"error: --out {out}: 1 of 3 shard(s) damaged (shard-00001.pt: its bytes changed since it "
                         f"was written (record {record.filename} fails its CRC-32)): {again}")
    with open(shard(1), "wb") as f:
        f.write(whole)
    data = torch.load(shard(0), weights_only=True)
    data["mean"][1, 1, 0, 0, 0] = float("nan")
    torch.save(data, shard(0))
    data = torch.load(shard(2), weights_only=True)
    data["labels"][0] = 2
    torch.save(data, shard(2))
    assert refused() == (f"error: --out {out}: 2 of 3 shard(s) damaged (shard-00000.pt: non-finite means; "
                         f"shard-00002.pt: labels outside 0..1): {again}")
    os.remove(shard(0))
    os.remove(shard(2))
    assert "2 of 3 shard(s) damaged (shard-00000.pt: missing; shard-00002.pt: missing)" in refused()
    latent_cache.main(_cache_args(images, vae_dir, out))  # as the message says
    assert latent_cache.main(verify)["num_images"] == 6
    # the image folder's list, as recorded or where --data-path says it now is, against the one encoded
    os.rename(images, str(tmp_path / "moved"))
    assert latent_cache.main(verify)["num_images"] == 6
    assert capsys.readouterr().out.endswith(f"; images not compared ({os.path.abspath(images)} not found: "
                                            f"--data-path says where they are now)\n")
    assert latent_cache.main(verify + ["--data-path", str(tmp_path / "moved")])["num_images"] == 6
    assert "the images in" in capsys.readouterr().out
    moved = str(tmp_path / "moved")
    shutil.copy(os.path.join(moved, "class0", os.listdir(os.path.join(moved, "class0"))[0]),
                os.path.join(moved, "class1", "added.png"))
    with pytest.raises(SystemExit):
        latent_cache.main(verify + ["--data-path", moved])
    assert capsys.readouterr().err == (f"error: --out {out}: its shards are whole, but the images in {moved} are no "
                                       f"longer those encoded (7 there now, 6 in the cache, or other names or "
                                       f"classes): encode them into a new --out to train on them\n")
    # --out that holds no finished cache: said as --out (not train.py's --latent-cache)
    for folder, what in ((tmp_path / "none", "does not exist"), (tmp_path, "has no index.json")):
        with pytest.raises(SystemExit):
            latent_cache.main(["--verify", "--out", str(folder)])
        assert capsys.readouterr().err.startswith(f"error: --out {folder} {what}; build it with"), what
    # --data-path stays required to build
    with pytest.raises(SystemExit) as stop:
        latent_cache.main(["--out", out])
    assert stop.value.code == 2 and "required: --data-path" in capsys.readouterr().err


def test_latent_cache_stores_the_dtype_asked_for_and_float16_by_default(tmp_path, monkeypatch):
    """--dtype is the shards' storage (float16 unless asked): the float32 encoding rounded once, both
    flips; the index records it, the VAE's own scaling factor and the data's absolute path."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir, scaling_factor=0.5)
    make_image_folder(tmp_path / "images", classes=2, per_class=2)
    monkeypatch.chdir(tmp_path)
    stored = {}
    for dtype in (None, "bfloat16", "float32"):
        out = f"cache-{dtype}"
        flags = [] if dtype is None else ["--dtype", dtype]
        index = latent_cache.main(["--data-path", "images", "--image-size", "16", "--vae", vae_dir, "--out", out,
                                   "--num-workers", "0", "--no-progress", *flags])
        assert index["dtype"] == (dtype or "float16") and index["scaling_factor"] == 0.5
        assert index["data_path"] == str(tmp_path / "images")
        stored[dtype] = torch.load(os.path.join(out, latent_cache.shard_name(0)), weights_only=True)
    for dtype, torch_dtype in ((None, torch.float16), ("bfloat16", torch.bfloat16)):
        for key in ("mean", "std"):
            assert stored[dtype][key].dtype == torch_dtype
            assert torch.equal(stored[dtype][key], stored["float32"][key].to(torch_dtype))
        assert torch.equal(stored[dtype]["labels"], stored["float32"]["labels"])
    assert stored["float32"]["mean"].dtype == torch.float32


def test_latent_cache_vae_precision_bf16_encodes_under_autocast(tmp_path, monkeypatch):
    """--vae-precision bf16 reaches the encoder of the cache, as it does train.py's (and is recorded)."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    seen, load_vae = [], latent_cache.load_vae

    def recording_load_vae(*args, **kwargs):
        codec = load_vae(*args, **kwargs)
        codec.vae.encoder.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        return codec

    monkeypatch.setattr(latent_cache, "load_vae", recording_load_vae)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out, "--vae-precision", "bf16"))
    assert seen and set(seen) == {torch.bfloat16}
    with open(os.path.join(out, "settings.json")) as f:
        assert json.load(f)["vae_precision"] == "bf16"
    stored = torch.load(os.path.join(out, latent_cache.shard_name(0)), weights_only=True)
    assert stored["mean"].dtype == torch.float32  # --dtype float32: the bf16 encoding stored as float32


@pytest.mark.parametrize("extra,named", [
    (["--shard-size", "3"], "--shard-size"), (["--vae-precision", "bf16"], "--vae-precision"), (["--vae"], "--vae"),
])
def test_latent_cache_refuses_to_resume_with_another_shard_size_or_vae(tmp_path, capsys, extra, named):
    """The shards present were cut and encoded with the settings recorded: another shard size would index
    them by other bounds, another VAE or precision would mix two latent spaces in one cache."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    if extra == ["--vae"]:
        save_tiny_vae(tmp_path / "other_vae")
        extra = ["--vae", str(tmp_path / "other_vae")]
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out))
    os.remove(os.path.join(out, latent_cache.shard_name(2)))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        latent_cache.main(_cache_args(images, vae_dir, out) + extra)
    assert re.fullmatch(rf"error: \S+ holds latents made with other settings \({named}: .*pass another --out, "
                        r"or delete it to start over\n", capsys.readouterr().err)
    assert not os.path.exists(os.path.join(out, latent_cache.shard_name(2)))


def test_latent_cache_resumes_from_its_images_moved_or_named_by_another_path(tmp_path, monkeypatch, capsys):
    """The dataset's fingerprint is of the paths relative to --data-path: the same images moved (or
    named relative to the working directory) resume the cache."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out))
    os.remove(os.path.join(out, latent_cache.shard_name(1)))
    os.rename(images, tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    index = latent_cache.main(_cache_args("moved", vae_dir, out))
    assert "4 of 6 images already in" in capsys.readouterr().out
    assert index["data_path"] == str(tmp_path / "moved") and [s["count"] for s in index["shards"]] == [2, 2, 2]


def test_latent_cache_refuses_images_whose_labels_changed_under_the_same_names(tmp_path, capsys):
    """An empty class folder renamed to sort first shifts every label while no image path changes: the
    shards written hold the old labels, so the folder is refused rather than resumed."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    os.makedirs(os.path.join(images, "zz_empty"))
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out))
    os.remove(os.path.join(out, latent_cache.shard_name(1)))
    os.rename(os.path.join(images, "zz_empty"), os.path.join(images, "aa_empty"))  # class0, class1: 0, 1 -> 1, 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        latent_cache.main(_cache_args(images, vae_dir, out))
    assert re.fullmatch(r"error: \S+ holds latents made with other settings \(dataset_sha256: .*pass another "
                        r"--out, or delete it to start over\n", capsys.readouterr().err.splitlines(True)[-1])


@pytest.mark.parametrize("flag,value,needle", [
    ("--shard-size", "0", "must be a positive integer, got 0"),
    ("--batch-size", "-4", "must be a positive integer, got -4"),
    ("--num-workers", "-1", "must be 0 or more, got -1"),
])
def test_latent_cache_refuses_out_of_range_values_in_one_line(tmp_path, capsys, flag, value, needle):
    from sit_fast import latent_cache

    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(["--data-path", str(tmp_path), "--out", str(tmp_path / "cache"), flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: argument {flag}: {needle} "
                                       "(see python -m sit_fast.latent_cache --help)\n")
    assert not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("module,argv,flag", [
    ("latent_cache", ["--data-path", "images", "--out", "cache", "--image", "16"], "--image"),  # --image-size
    ("demo", ["--glob", "8"], "--glob"),  # --global-batch-size
    ("export", ["a.pt", "--weigh", "ema"], "--weigh"),  # --weights
])
def test_a_shortened_flag_is_refused_by_every_command(tmp_path, capsys, module, argv, flag):
    """As train.py and sample.py: a flag is taken spelled out, never as the one it begins."""
    main = importlib.import_module(f"sit_fast.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(main)([str(tmp_path / a) if a in ("images", "cache") else a for a in argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: unrecognized arguments: {flag} "), flag
    assert not os.path.exists(tmp_path / "cache")


def test_latent_cache_without_a_vae_is_refused_before_the_data_is_read(tmp_path, capsys):
    from sit_fast import latent_cache

    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(["--data-path", str(tmp_path / "missing"), "--out", str(tmp_path / "cache"),
                                      "--vae", "none"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: a latent cache holds VAE latents: pass --vae ema, mse, a hub id or a "
                                       "local diffusers AutoencoderKL folder (to train in pixel space, --vae none in "
                                       "train.py, no cache is needed)\n")


def test_latent_cache_refuses_an_out_inside_the_data_or_a_file_before_the_data_is_read(tmp_path, capsys,
                                                                                       monkeypatch):
    """--out inside --data-path would be scanned as a class folder of the dataset the next time (and
    the cache refused as made from other files): refused, as a file as --out is, before the dataset's
    scan and the VAE's load."""
    from sit_fast import latent_cache

    def scanned(*args, **kwargs):
        raise AssertionError("the dataset was scanned")

    monkeypatch.setattr(latent_cache, "ImageFolderDataset", scanned)
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "a_file").write_text("")
    for out, line in ((images / "cache", f"--out {images / 'cache'} is inside --data-path {images}: put the cache "
                                         f"elsewhere (in the dataset's folder it would be read as images of a class "
                                         f"the next time)"),
                      (images, f"--out {images} is inside --data-path {images}: put"),
                      (tmp_path / "a_file", f"--out {tmp_path / 'a_file'} is a file: pass a folder")):
        with pytest.raises(SystemExit) as exit_info:
            cli_entry(latent_cache.main)(["--data-path", str(images), "--out", str(out), "--vae", "ema"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {line}")
    assert not (images / "cache").exists()


def test_latent_cache_names_an_unreadable_image_and_how_to_keep_the_shards_only_where_there_are_some(tmp_path,
                                                                                                      capsys):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    images, vae_dir = make_image_folder(tmp_path / "images", classes=1, per_class=4), str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    for damaged, out in (("0.png", tmp_path / "first"), ("3.png", tmp_path / "later")):
        path = os.path.join(images, "class0", damaged)
        with open(path, "r+b") as f:
            f.truncate(40)
        with pytest.raises(SystemExit) as exit_info:
            cli_entry(latent_cache.main)(_cache_args(images, vae_dir, str(out)))
        assert exit_info.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"error: cannot read image {path} (") and "remove or replace it" in line, line
        kept = "to keep the shards written, replace it with a readable image of the same name"
        assert (kept in line) == (damaged == "3.png"), line  # the first shard is written before 3.png is read
        make_image_folder(tmp_path / "images", classes=1, per_class=4)  # whole again


def test_latent_cache_reads_file_names_that_are_not_utf8(tmp_path):
    """An archive unpacked from another system can hold names that are not UTF-8: the file list's
    fingerprint takes their bytes (a valid name's fingerprint is unchanged)."""
    from sit_fast.data import ImageFolderDataset, data_fingerprint

    images = make_image_folder(tmp_path / "images", classes=1, per_class=1)
    before = data_fingerprint(ImageFolderDataset(images, 16))
    expected = hashlib.sha256(f"{os.path.join('class0', '0.png')}\t0\n".encode()).hexdigest()
    assert before == expected
    os.rename(os.path.join(images, "class0", "0.png"), os.path.join(images, "class0", b"\xff\xfe.png".decode(
        "utf-8", "surrogateescape")))
    odd = data_fingerprint(ImageFolderDataset(images, 16))
    assert odd == hashlib.sha256(os.path.join(b"class0", b"\xff\xfe.png") + b"\t0\n").hexdigest()


def test_latent_cache_out_of_memory_is_one_line_naming_the_batch_size(tmp_path, capsys, monkeypatch):
    """Running out of memory encoding keeps the shards written and names the smaller batch to run
    with; an allocation past the whole device names the size flags."""
    from sit_fast import latent_cache
    from sit_fast.vae import LatentCodec as VAECodec
    from tests.test_vae import save_tiny_vae

    images, vae_dir, out = make_image_folder(tmp_path / "images"), str(tmp_path / "vae"), str(tmp_path / "cache")
    save_tiny_vae(vae_dir)
    calls = []
    encode = VAECodec.encode

    def short_of_memory(self, x):
        calls.append(len(x))
        if len(calls) > 2:  # the first shard's two batches are written
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes.")
        return encode(self, x)

    monkeypatch.setattr(VAECodec, "encode", short_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out, "--shard-size", "4"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: out of memory on cpu encoding batches of 2 image(s) (x 2 flips) at --image-size 16: run the same "
        "command with --batch-size 1 (the 1 shard written is kept)")
    assert sorted(name for name in os.listdir(out) if name.startswith("shard")) == ["shard-00000.pt"]
    monkeypatch.setattr(VAECodec, "encode", lambda self, x: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out, "--shard-size", "4", "--batch-size", "1"))
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "at --image-size 16: the VAE does not fit this device at that size")
    past = RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {2**60} bytes.")
    monkeypatch.setattr(VAECodec, "encode", lambda self, x: (_ for _ in ()).throw(past))
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out, "--shard-size", "4"))
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "a size given is far too large (check --image-size 16, --batch-size 2)")


def test_resuming_with_a_latent_cache_of_another_image_size_is_refused_in_one_line(tmp_path, capsys):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    small, large = str(tmp_path / "cache16"), str(tmp_path / "cache32")
    latent_cache.main(_cache_args(images, vae_dir, small))
    latent_cache.main(_cache_args(images, vae_dir, large, "--image-size", "32"))
    run = ["--model", "SiT-T/4", "--global-batch-size", "2", "--num-workers", "0", "--fused-kernels", "off",
           "--no-progress", "--sample-every", "100", "--exp-dir", str(tmp_path / "run")]
    train_main(["--latent-cache", small, "--max-steps", "1"] + run)
    capsys.readouterr()
    assert run_cli(["--latent-cache", large, "--max-steps", "2", "--resume", "auto"] + run) == 2
    assert re.fullmatch(rf"error: the latent cache {re.escape(large)} holds 32px images; the run being resumed "
                        r"\(\S+0000001.pt\) trained on 16px: resume it with a cache of that size, or start a new run",
                        capsys.readouterr().err.splitlines()[-1])  # after the log's lines


def test_a_latent_cache_that_is_not_there_says_so(tmp_path):
    from sit_fast.data import CACHE_FORMAT, DataError, read_cache_index

    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    for name, what in (("nope", "does not exist"), ("empty", "has no index.json"), ("file", "is a file, not a folder")):
        with pytest.raises(DataError) as info:
            read_cache_index(str(tmp_path / name))
        assert str(info.value) == (f"--latent-cache {tmp_path / name} {what}; build it with python -m "
                                   f"sit_fast.latent_cache")
    (tmp_path / "run").mkdir()  # a settings.json, but not a latent cache's: not called unfinished
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"global_seed": 0}))
    with pytest.raises(DataError, match=r"run has no index\.json; build it"):
        read_cache_index(str(tmp_path / "run"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({"format": CACHE_FORMAT, "version": 0}))
    with pytest.raises(DataError, match=r"old/index\.json is not a version-1 sit_fast latent cache; rebuild it"):
        read_cache_index(str(tmp_path / "old"))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "index.json").write_text('{"format": ')
    with pytest.raises(DataError, match=r"^cannot read \S+cut/index\.json \(Expecting value: line 1 column 12 "
                                        r"\(char 11\)\); delete it and run python -m sit_fast\.latent_cache again"):
        read_cache_index(str(tmp_path / "cut"))


def test_a_missing_or_damaged_cache_shard_names_the_fix(tmp_path):
    from sit_fast import latent_cache
    from sit_fast.data import DataError, LatentCacheDataset, make_loader, worker_error
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(make_image_folder(tmp_path / "images", classes=1, per_class=2), vae_dir, out))
    shard = os.path.join(out, latent_cache.shard_name(0))
    os.remove(shard)
    with pytest.raises(DataError) as info:
        LatentCacheDataset(out).shards()
    assert str(info.value) == (f"latent cache shard {shard} is missing; run python -m sit_fast.latent_cache again "
                               "with the same flags (it encodes only the missing shards)")
    with open(shard, "wb") as f:
        f.write(b"damaged")
    with pytest.raises(DataError, match=r"cannot be read \(.*\); delete it and run python -m sit_fast.latent_cache"):
        LatentCacheDataset(out).shards()
    # torch.load's refusal of a pickle it does not trust runs over many lines: one line of it is quoted,
    # also through a loader worker (worker_error), where the traceback's last line was all that was kept.
    torch.save({"mean": datetime.datetime(2026, 1, 1)}, shard)
    with pytest.raises(DataError) as info:
        LatentCacheDataset(out).shards()
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value), str(info.value)
    assert str(info.value).startswith(f"latent cache shard {shard} cannot be read (")
    loader = make_loader(LatentCacheDataset(out), [[(0, 0)]], num_workers=1, pin_memory=False, seed=0)
    with pytest.raises(DataError) as caught:
        next(loader)
    assert str(worker_error(caught.value)) == str(info.value)
    # Latents of another shape than the index's (a shard of another cache copied in): named, not an
    # indexing error deep in a loader worker.
    channels, size = LatentCacheDataset(out).channels, LatentCacheDataset(out).latent_size
    odd = torch.zeros(2, 2, channels, size + 1, size + 1)
    torch.save({"mean": odd, "std": odd, "labels": torch.zeros(2, dtype=torch.int64)}, shard)
    with pytest.raises(DataError) as info:
        LatentCacheDataset(out).shards()
    assert str(info.value) == (
        f"latent cache shard {shard} holds latents of shape {tuple(odd.shape)} (std {tuple(odd.shape)}, labels "
        f"(2,)), the index says {(2, 2, channels, size, size)}; delete it and run python -m sit_fast.latent_cache "
        f"again with the same flags (it encodes only the missing shards)"), info.value
    torch.save(odd, shard)  # a tensor, not the dict of a shard
    with pytest.raises(DataError) as info:
        LatentCacheDataset(out).shards()
    assert str(info.value).startswith(f"latent cache shard {shard} does not hold mean, std and labels; delete it and "
                                      f"run python -m sit_fast.latent_cache again"), info.value
    # A shard of another shard size (copied from a cache cut otherwise): its image count is named
    one = torch.zeros(1, 2, channels, size, size)
    torch.save({"mean": one, "std": one, "labels": torch.zeros(1, dtype=torch.int64)}, shard)
    with pytest.raises(DataError) as info:
        LatentCacheDataset(out).shards()
    assert str(info.value).startswith(f"latent cache shard {shard} holds 1 images, the index says 2; delete it"), \
        info.value
    # labels of another count than the latents'
    two = torch.zeros(2, 2, channels, size, size)
    torch.save({"mean": two, "std": two, "labels": torch.zeros(3, dtype=torch.int64)}, shard)
    with pytest.raises(DataError, match=r"holds latents of shape .* labels \(3,\)\), the index says"):
        LatentCacheDataset(out).shards()


def test_a_loader_workers_error_keeps_its_whole_message():
    from sit_fast.data import DataError, worker_error

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\n"
                        "Original Traceback (most recent call last):\n"
                        '  File "x.py", line 1, in <module>\nsit_fast.data.DataError: cannot read a.png (one: two)\n'
                        "the rest of it\n")
    assert str(worker_error(wrapped)) == "cannot read a.png (one: two)\nthe rest of it"
    assert str(worker_error(DataError("a plain one"))) == "a plain one"
    assert str(worker_error(DataError("Caught up: not a worker's"))) == "Caught up: not a worker's"
    header = "Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
    chained = DataError(header + "sit_fast.data.DataError: the first\n\nDuring handling of the above exception, "
                        "another exception occurred:\n\nTraceback (most recent call last):\n"
                        "sit_fast.data.DataError: the second\n")
    assert str(worker_error(chained)) == "the second"  # the error raised, not one it was raised from
    # no entry under the error's own name (raised under another): the last line's message, or the line
    assert str(worker_error(DataError(header + "other.module.Error: its message\n"))) == "its message"
    assert str(worker_error(DataError(header + "KeyboardInterrupt\n"))) == "KeyboardInterrupt"


class _PidDataset(torch.utils.data.Dataset):
    """Each item is the id of the process that read it."""

    in_memory = True

    def __len__(self):
        return 4

    def __getitem__(self, key):
        return torch.tensor(os.getpid())


def test_an_in_memory_dataset_is_read_in_the_main_process_whatever_the_workers():
    from sit_fast.data import close_loader, make_loader

    loader = make_loader(_PidDataset(), [[(0, 0), (1, 1)], [(2, 0)]], num_workers=2, pin_memory=False, seed=0)
    try:
        assert [batch.tolist() for batch in loader] == [[os.getpid()] * 2, [os.getpid()]]
    finally:
        close_loader(loader)


def test_a_rebuilt_latent_cache_is_unfinished_until_its_new_index_is_written(tmp_path):
    """A cache whose shards were deleted and are being encoded again (with other settings, say) loses
    its old index at once: stopped before the new one, it is unfinished, not read with the old one."""
    from sit_fast import latent_cache
    from sit_fast.data import DataError, LatentCacheDataset
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out))
    for name in os.listdir(out):
        if name.startswith("shard-"):
            os.remove(os.path.join(out, name))
    real_write = latent_cache.atomic_write
    try:  # the process is killed as it writes the new index
        latent_cache.atomic_write = lambda path, write: (_ for _ in ()).throw(KeyboardInterrupt())
        with pytest.raises(SystemExit):
            latent_cache.main(_cache_args(images, vae_dir, out, "--dtype", "float16"))
    finally:
        latent_cache.atomic_write = real_write
    with pytest.raises(DataError, match="is unfinished"):
        LatentCacheDataset(out)


def test_resuming_a_pixel_space_run_with_a_latent_cache_names_the_run_not_a_flag(tmp_path, capsys):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    cache = str(tmp_path / "cache")
    latent_cache.main(_cache_args(make_image_folder(tmp_path / "images", classes=1, per_class=2), vae_dir, cache,
                                  "--image-size", "8"))
    exp = ["--exp-dir", str(tmp_path / "run")]
    train_main(BASE + exp + ["--max-steps", "1"])  # 1-channel digits, 8 px
    capsys.readouterr()
    assert run_cli(["--latent-cache", cache, "--resume", "auto", "--max-steps", "2", "--no-progress"] + exp) == 2
    assert re.fullmatch(r"error: the run being resumed \(\S+0000001.pt\) has 1 input channels, the data 4: resume "
                        r"it on data of its latent space \(--vae, --latent-cache\), or start a new run",
                        capsys.readouterr().err.splitlines()[-1])


def test_latent_cache_batch_size_bounds_each_encoder_call(tmp_path, monkeypatch):
    """--batch-size is the encoder's batch (the knob for its memory), mirror images included."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    calls, load_vae = [], latent_cache.load_vae

    def recording_load_vae(*args, **kwargs):
        codec = load_vae(*args, **kwargs)
        encode = codec.vae.encode
        codec.vae.encode = lambda x: calls.append(len(x)) or encode(x)
        return codec

    monkeypatch.setattr(latent_cache, "load_vae", recording_load_vae)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=5)
    latent_cache.main(_cache_args(images, vae_dir, str(tmp_path / "cache"), "--shard-size", "5", "--batch-size", "3"))
    assert calls == [3, 3, 3, 1]  # 3 images, their mirrors; the last 2 and theirs, in chunks of 3


def test_latent_cache_reads_all_its_shards_through_one_loader(tmp_path, monkeypatch):
    """One DataLoader (workers started once) for a process's shards, its batches cut at each shard's
    end: 7 images in shards of 3 and batches of 2 are read as [0 1] [2] [3 4] [5] [6], in 3 shards."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    loaders, make_loader = [], latent_cache.make_loader

    def recording_make_loader(dataset, batches, *args, **kwargs):
        loaders.append([[index for index, _ in batch] for batch in batches])
        return make_loader(dataset, batches, *args, **kwargs)

    monkeypatch.setattr(latent_cache, "make_loader", recording_make_loader)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=7)
    out = str(tmp_path / "cache")
    index = latent_cache.main(_cache_args(images, vae_dir, out, "--shard-size", "3", "--batch-size", "2",
                                          "--num-workers", "1"))
    assert loaders == [[[0, 1], [2], [3, 4], [5], [6]]]
    assert [shard["count"] for shard in index["shards"]] == [3, 3, 1]
    for shard in index["shards"]:
        stored = torch.load(os.path.join(out, shard["file"]), weights_only=True)
        assert stored["mean"].shape[0] == stored["labels"].shape[0] == shard["count"]

def test_latent_cache_stopped_or_failed_before_its_first_shard_says_none_is_kept(tmp_path, monkeypatch, capsys):
    """Out of memory, stopped or left by another process before the first shard was written: the line says
    that no shard was written yet (the same command encodes every image), not that the shards written are kept."""
    from sit_fast import latent_cache
    from sit_fast.vae import LatentCodec as VAECodec
    from tests.test_vae import save_tiny_vae

    images, vae_dir = make_image_folder(tmp_path / "images", classes=1, per_class=4), str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    out = str(tmp_path / "cache")
    monkeypatch.setattr(VAECodec, "encode", lambda self, x: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "run the same command with --batch-size 1 (no shard was written yet)")
    monkeypatch.setattr(VAECodec, "encode", lambda self, x: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as exit_info:
        latent_cache.main(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.endswith(f"interrupted; no shard was written yet: run the same command again to "
                                            f"encode every image into {out}\n")
    monkeypatch.undo()

    def gone():
        raise torch.distributed.DistBackendError("Connection closed by peer [10.0.0.2]:29500")

    monkeypatch.setattr(latent_cache, "atomic_torch_save", lambda *args, **kwargs: None)  # this process has none
    monkeypatch.setattr(latent_cache, "barrier", gone)
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: another process of the job ended before its shards were written (Connection closed by peer "
        "[10.0.0.2]:29500); no shard was written yet: run the same command again to encode every image")
    assert latent_cache.again_words(out) == (
        f"interrupted again, stopping at once: no shard was written yet (a shard is written whole or left under a "
        f"temporary name, which the next run removes): run the same command again to encode every image into {out}")


def test_latent_cache_interrupted_keeps_whole_shards_and_says_how_to_finish(tmp_path, monkeypatch, capsys, stop):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    load_vae = latent_cache.load_vae

    def interrupting_load_vae(*args, **kwargs):  # Ctrl-C or a stop signal in the second shard's encoder call
        codec = load_vae(*args, **kwargs)
        encode, calls = codec.vae.encode, []

        def encode_once(x):
            calls.append(len(x))
            if len(calls) > 1:
                stop()
            return encode(x)

        codec.vae.encode = encode_once
        return codec

    monkeypatch.setattr(latent_cache, "load_vae", interrupting_load_vae)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=4)
    out = str(tmp_path / "cache")
    with pytest.raises(SystemExit) as exit_info:
        latent_cache.main(_cache_args(images, vae_dir, out, "--shard-size", "2", "--batch-size", "4"))
    assert exit_info.value.code == stop.status
    assert capsys.readouterr().err.endswith(f"{stop.words}; the 1 shard written is kept: run the same command "
                                            f"again to encode the rest into {out}\n")
    assert sorted(f for f in os.listdir(out) if f not in ("settings.json", ".lock")) == [latent_cache.shard_name(0)]
    from sit_fast.data import DataError, LatentCacheDataset

    with pytest.raises(DataError) as info:  # trained on before it is finished: how to finish it
        LatentCacheDataset(out)
    assert str(info.value) == (f"--latent-cache {out} is unfinished (no index.json yet, the last file written): to "
                               f"finish it, run python -m sit_fast.latent_cache again with the same flags (it encodes "
                               f"only the missing shards)")


@pytest.mark.parametrize("during", ["teardown", "summary"])
def test_a_second_ctrl_c_counts_the_shards_kept_when_it_comes(during, tmp_path, monkeypatch, capfd):
    """The second Ctrl-C's line counts the shards there at that Ctrl-C, one another node's process finished
    while this one wound down among them, not those there at the first: in the loader's teardown, or as
    main() says what stopped the build (stop_words, which may wait for word of the other processes)."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    load_vae, images, out = latent_cache.load_vae, make_image_folder(tmp_path / "images", classes=1, per_class=4), \
        str(tmp_path / "cache")

    def interrupting_load_vae(*args, **kwargs):  # Ctrl-C in the second shard's encoder call
        codec = load_vae(*args, **kwargs)
        encode, calls = codec.vae.encode, []

        def encode_once(x):
            calls.append(len(x))
            if len(calls) > 1:
                raise KeyboardInterrupt
            return encode(x)

        codec.vae.encode = encode_once
        return codec

    class Ended(BaseException):
        pass

    def again(*args):  # a shard finished elsewhere meanwhile, then Ctrl-C again
        shutil.copy(os.path.join(out, latent_cache.shard_name(0)), os.path.join(out, latent_cache.shard_name(1)))
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(latent_cache, "load_vae", interrupting_load_vae)
    monkeypatch.setattr(latent_cache, "close_loader" if during == "teardown" else "stop_words", again)
    monkeypatch.setattr(os, "_exit", lambda status: (_ for _ in ()).throw(Ended(status)))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(Ended) as ended:
        latent_cache.main(_cache_args(images, vae_dir, out, "--shard-size", "2", "--batch-size", "4"))
    assert ended.value.args == (130,)
    assert capfd.readouterr().err.splitlines()[-1] == (
        f"interrupted again, stopping at once: the 2 shards written are kept (a shard is written whole or left under "
        f"a temporary name, which the next run removes): run the same command again to encode the rest into {out}")


# Each encoder call "encoding", then 30 s, which the first Ctrl-C cuts short (however late it comes, no shard is
# written before it); "teardown" as a stopped build stops its loader's workers, 30 s before it does.
SLOW_CACHE_TEARDOWN = """
import sys, time
from sit_fast import latent_cache
real_close, real_load_vae = latent_cache.close_loader, latent_cache.load_vae

def close_loader(loader):
    print("teardown", file=sys.stderr, flush=True)
    time.sleep(30)
    real_close(loader)

def load_vae(*args, **kwargs):
    codec = real_load_vae(*args, **kwargs)
    encode = codec.vae.encode

    def slow(x):
        print("encoding", file=sys.stderr, flush=True)
        time.sleep(30)
        return encode(x)

    codec.vae.encode = slow
    return codec

latent_cache.close_loader, latent_cache.load_vae = close_loader, load_vae
sys.argv[0] = "python -m sit_fast.latent_cache"
latent_cache.main()
"""


def test_a_second_ctrl_c_while_a_stopped_latent_cache_winds_down_ends_it_saying_what_is_kept(tmp_path):
    """Ctrl-C, then Ctrl-C again while the stopped build stops its loader's workers: it ends at once,
    exit 130, with one line on what is kept (the shards written whole) and on a shard cut short (left
    under a temporary name, which the next run removes), as sample.py's jobs do; the same command then
    finishes the cache."""
    from sit_fast import latent_cache
    from tests.test_interrupts import signalled_child
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=6)
    out = str(tmp_path / "cache")
    argv = _cache_args(images, vae_dir, out, "--num-workers", "1")
    status, err, after = signalled_child(SLOW_CACHE_TEARDOWN, argv,
                                         {"encoding": signal.SIGINT, "teardown": signal.SIGINT})
    assert status == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"interrupted again, stopping at once: no shard was written yet (a shard is "
                                    f"written whole or left under a temporary name, which the next run removes): run "
                                    f"the same command again to encode every image into {out}"), err
    assert after < 20, f"{after:.1f} s from the second Ctrl-C to the exit"  # the teardown takes 30 s
    assert not [name for name in os.listdir(out) if name.startswith("shard-")], os.listdir(out)
    index = latent_cache.main(argv)
    assert [shard["count"] for shard in index["shards"]] == [2, 2, 2]


def test_a_latent_cache_being_built_now_is_not_said_to_need_building_again(tmp_path):
    """Trained on (or --verify'd) while a build is writing it, a cache without its index was said to be
    unfinished, to be finished by running the build again, which the build's lock then refused: the
    build at work is named, and the wait for its end said. Once it has ended, the advice is as before."""
    from sit_fast.data import DataError, LatentCacheDataset, read_cache_index
    from sit_fast.files import FolderLock

    out = tmp_path / "cache"
    os.makedirs(out)
    (out / "settings.json").write_text(json.dumps({"dataset_sha256": "0" * 64}))  # the build's first file
    build = FolderLock(str(out), "--out")  # held here as the building process would hold it
    build.acquire()
    try:
        for flag, read in (("--latent-cache", lambda: LatentCacheDataset(str(out))),
                           ("--out", lambda: read_cache_index(str(out), "--out"))):
            with pytest.raises(DataError) as info:
                read()
            assert str(info.value) == (f"{flag} {out} is being built now (process {os.getpid()} on "
                                       f"{socket.gethostname()}; index.json, the last file written, is not there "
                                       f"yet): wait for that build to end, then run this again")
    finally:
        build.release()
    with pytest.raises(DataError) as info:  # the lock file left by the build is no lock
        LatentCacheDataset(str(out))
    assert "is unfinished (no index.json yet, the last file written): to finish it, run python -m" in str(info.value)


def test_latent_cache_outlives_its_console(tmp_path, monkeypatch):
    from sit_fast import latent_cache
    from tests.test_interrupts import Gone
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=3)
    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.setattr(sys, "stderr", Gone())
    index = latent_cache.main(_cache_args(images, vae_dir, str(tmp_path / "cache")))
    assert index["num_images"] == 3 and len(index["shards"]) == 2


def test_latent_cache_names_the_temporary_files_of_a_killed_writer(tmp_path, capsys):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out, "--shard-size", "1"))
    os.remove(os.path.join(out, latent_cache.shard_name(1)))
    with open(os.path.join(out, ".shard-00001.pt.tmp-4321"), "wb") as f:  # a writer killed (SIGKILL) mid-write
        f.write(bytes(3 * 2**20))
    capsys.readouterr()
    latent_cache.main(_cache_args(images, vae_dir, out, "--shard-size", "1"))
    assert capsys.readouterr().err == (f"warning: removed 1 unfinished shard write (.shard-00001.pt.tmp-4321; 3 MiB) "
                                       f"from {out}, left by a process killed while writing\n")
    assert not os.path.exists(os.path.join(out, ".shard-00001.pt.tmp-4321"))


def test_latent_cache_reading_from_a_failing_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """An I/O error reading an image or listing --out (a failing disk's EIO) was a traceback, or for an image
    a line quoting the path twice and saying only to remove it: one line naming the file, the OS's error and
    the disk to fix."""
    from sit_fast import data, latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=4)
    out = str(tmp_path / "cache")
    failing, real_open = os.path.join(images, "class0", "0.png"), data.Image.open

    def failing_image(path, *args, **kwargs):
        if path == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(data.Image, "open", failing_image)
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot read image {failing} (Input/output error, EIO): fix the disk (the system log says what "
        f"failed), or remove or replace it")
    monkeypatch.undo()
    fail_listing(monkeypatch, out, errno.EIO, "listdir")
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot read {out} (Input/output error, EIO): fix the disk (the system "
                                       f"log says what failed) and run the same command again to encode the rest\n")


def test_latent_cache_reading_refused_is_said_a_read_not_a_write(tmp_path, monkeypatch, capsys):
    """A read refused (EACCES, EPERM: errors a refused write meets too) was said "cannot write ...: make room
    (or make the folder writable)": --out's listing, or an input's read, is said a read, with its fix."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=4)
    out = str(tmp_path / "cache")
    fail_listing(monkeypatch, out, errno.EACCES, "listdir")
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert capsys.readouterr().err.startswith(f"error: cannot read {out} (Permission denied): make it readable and ")
    monkeypatch.undo()
    failing = os.path.join(images, "class0")

    def refused_input(*args, **kwargs):  # a read of the inputs not said where it failed
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), failing)

    monkeypatch.setattr(latent_cache, "ImageFolderDataset", refused_input)
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert capsys.readouterr().err == (f"error: cannot read {failing} (Operation not permitted): no shard was written "
                                       f"yet: make it readable and run the same command again to encode every image\n")
    monkeypatch.undo()
    real_remove = os.remove

    def refused_removal(path):  # a write in --out refused: said a write, as before
        if os.path.basename(path) == "index.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_remove(path)

    with open(os.path.join(out, "index.json"), "w") as f:  # an earlier build's index, removed before encoding
        f.write("{}")
    monkeypatch.setattr(os, "remove", refused_removal)
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert capsys.readouterr().err.startswith(f"error: cannot write {os.path.join(out, 'index.json')} (Permission "
                                              f"denied): ")


def test_latent_cache_on_a_failing_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """An I/O error writing a shard (a failing disk's EIO, not a write the filesystem refused) was a
    traceback. One line naming the shard, the OS's error, what is kept (no shard, for shard 0, where the same
    command encodes every image, not "the rest"; the shards before, for a later one) and what to do; the
    temporary file is removed."""
    from sit_fast import files, latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=4)
    out = str(tmp_path / "cache")
    real_open = open
    for k, kept, rest in ((0, "no shard was written yet", "every image"),
                          (1, "the 1 shard written is kept", "the rest")):

        def failing_disk(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if "w" in mode and os.path.basename(path).startswith(f".{latent_cache.shard_name(k)}.tmp-"):
                f.write(b"part")  # a partial file, then the disk fails
                f.close()
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return f

        monkeypatch.setattr(files, "open", failing_disk, raising=False)
        with pytest.raises(SystemExit) as exit_info:
            cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
        assert exit_info.value.code == 2
        shard = os.path.join(out, latent_cache.shard_name(k))
        assert capsys.readouterr().err == (
            f"error: cannot write {shard} (Input/output error, EIO): {kept}: fix the disk (the system log says what "
            f"failed), or write onto another filesystem and run the same command again to encode {rest}\n")
        assert not [name for name in os.listdir(out) if ".tmp-" in name]
        assert sorted(name for name in os.listdir(out) if name.startswith("shard-")) == [
            latent_cache.shard_name(i) for i in range(k)]

    def failing_index(path, mode="r", *args, **kwargs):  # every shard written, then the index's write fails
        if "w" in mode and os.path.basename(path).startswith(".index.json.tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", failing_index, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: cannot write {os.path.join(out, 'index.json')} (Input/output error, EIO): all 2 shard(s) are written: "
        f"fix the disk (the system log says what failed), or write onto another filesystem and run the same command "
        f"again to write the index\n")
    assert not os.path.exists(os.path.join(out, "index.json"))
    assert not [name for name in os.listdir(out) if ".tmp-" in name]
    monkeypatch.undo()
    assert cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))["num_images"] == 4


def test_latent_cache_on_a_full_disk_is_one_line_and_keeps_the_shards_written(tmp_path, monkeypatch, capsys):
    """The disk fills up in the second shard's write: torch.save's writer meets the OSError (and would
    turn it into a RuntimeError naming only its own position); the user gets the full disk, in one line."""
    import io

    from sit_fast import files, latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=4)
    out = str(tmp_path / "cache")
    opened = []

    class FullDisk(io.FileIO):  # the second shard opened for writing takes 100 bytes, then the disk is full
        def write(self, data):
            if len([p for p in opened if ".shard-" in p]) > 1 and self.tell() + len(data) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def open_on_a_small_disk(path, mode="r", *args, **kwargs):
        opened.append(path)
        return io.BufferedWriter(FullDisk(path, mode))

    monkeypatch.setattr(files, "open", open_on_a_small_disk, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 2
    shard = os.path.join(out, latent_cache.shard_name(1))
    assert capsys.readouterr().err == (f"error: cannot write {shard} (No space left on device): the 1 shard written "
                                       f"is kept: make room (or make the folder writable) and run the same command "
                                       f"again to encode the rest\n")
    assert sorted(f for f in os.listdir(out) if f not in ("settings.json", ".lock")) == [latent_cache.shard_name(0)]
    # The last file, index.json, on a full disk: one line too
    monkeypatch.undo()
    real_open = open

    def full_for(name):  # the write of `name` (atomic_write's temporary .NAME.tmp-PID) refused
        def refused(path, mode="r", *args, **kwargs):
            if "w" in mode and os.path.basename(path).startswith(f".{name}"):
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return real_open(path, mode, *args, **kwargs)

        return refused

    monkeypatch.setattr(files, "open", full_for("index.json"), raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 2
    # every shard is written: the same command writes the index (not "encode the rest")
    assert capsys.readouterr().err == (f"error: cannot write {os.path.join(out, 'index.json')} (No space left on "
                                       f"device): all 2 shard(s) are written: make room (or make the folder "
                                       f"writable) and run the same command again to write the index\n")
    assert not os.path.exists(os.path.join(out, "index.json"))
    # settings.json, the first file, on a full disk: no shard is written yet (not "the shards written are kept")
    monkeypatch.undo()
    monkeypatch.setattr(files, "open", full_for("settings.json"), raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, str(tmp_path / "new")))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot write {tmp_path / 'new' / 'settings.json'} (No space left on "
                                       f"device): nothing was computed yet: make room (or make the folder writable) "
                                       f"and run the same command again\n")
    # A shard past the file size limit (`ulimit -f`, FAT32's 4 GiB): one line too, not a traceback
    monkeypatch.undo()

    def past_the_limit(path, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(path).startswith(".shard-"):
            raise OSError(errno.EFBIG, "File too large")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", past_the_limit, raising=False)
    shutil.rmtree(out)
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: cannot write {os.path.join(out, latent_cache.shard_name(0))} (File too large: past the file size "
        f"limit of the process (`ulimit -f`) or of the filesystem (FAT32's 4 GiB)): no shard was written yet: "
        f"raise the file size limit (or write onto another filesystem) and run the same command again to encode "
        f"every image\n")
    # Finished, then run again on a disk where nothing can be written: nothing to write, no error
    monkeypatch.undo()
    cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    monkeypatch.setattr(files, "open", lambda path, mode="r", *args, **kwargs: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", path)) if "w" in mode else open(path, mode, *args, **kwargs),
        raising=False)
    monkeypatch.setattr(latent_cache, "atomic_torch_save", lambda *a, **k: pytest.fail("a shard written again"))
    capsys.readouterr()
    assert cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))["num_images"] == 4
    assert capsys.readouterr().out.splitlines()[0] == f"latent cache: all 4 images already in {out}: nothing to encode"


def test_latent_cache_image_size_for_the_sd_vae_is_checked_before_loading_it(tmp_path, monkeypatch, capsys):
    from sit_fast import latent_cache

    monkeypatch.setattr(latent_cache, "load_vae", lambda *a, **k: pytest.fail("the VAE was loaded"))
    images = make_image_folder(tmp_path / "images", classes=1, per_class=1)
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(["--data-path", images, "--vae", "ema", "--image-size", "20",
                                      "--out", str(tmp_path / "cache")])
    assert capsys.readouterr().err == ("error: --image-size 20 is not divisible by 8 (the VAE's downsampling); "
                                       "use e.g. 16\n")


def test_latent_cache_warnings_are_one_line_each(tmp_path, capsys):
    from sit_fast import latent_cache

    images = make_image_folder(tmp_path / "images", classes=1, per_class=1)
    make_image_folder(tmp_path / "images" / ".extra", classes=1, per_class=1)
    with pytest.raises(SystemExit):  # stops at the VAE's size check, after the data's warning
        cli_entry(latent_cache.main)(["--data-path", images, "--vae", "ema", "--image-size", "20",
                                      "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"warning: --data-path {images}: hidden folders (.extra) hold images")
    assert err[1].startswith("error: --image-size 20"), err


def test_latent_cache_reports_a_damaged_image_read_by_a_worker_in_one_line(tmp_path, capsys):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    damaged = os.path.join(images, "class0", "1.png")
    with open(damaged, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, str(tmp_path / "cache"), "--num-workers", "1"))
    # no shard written yet: nothing to keep, so no advice on keeping them
    assert re.fullmatch(rf"error: cannot read image {re.escape(damaged)} \(.*\): remove or replace it\n",
                        capsys.readouterr().err)


def _cache_node_worker(rank: int, port: int, root: str, argv: list[str]) -> None:
    """A process of a two-node latent cache job, whose relative --data-path is its node's own copy."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import contextlib
    import io

    from sit_fast import latent_cache

    os.chdir(os.path.join(root, f"node{rank}"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            latent_cache.main(argv)  # cli_entry: a UserError is its line on stderr and exit status 2
        outcome = "built"
    except SystemExit as exit_:
        outcome = f"{exit_.code}: {err.getvalue().strip()}"
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


def test_latent_cache_refuses_nodes_whose_datasets_differ(tmp_path):
    """Each process indexes its own --data-path (a node's local copy): one copy with an extra image
    would encode its shards by other indices, mislabelled for good; every process stops first."""
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    make_image_folder(tmp_path / "node0" / "images", classes=2, per_class=2)
    make_image_folder(tmp_path / "node1" / "images", classes=2, per_class=3)
    out = str(tmp_path / "cache")
    argv = _cache_args("images", vae_dir, out)
    mp.spawn(_cache_node_worker, args=(free_port(), str(tmp_path), argv), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    mine = ("--data-path images holds other files on this node than on rank 0's (6 images here, 4 there, or other "
            "names or classes): every process must see the same dataset (a shared filesystem, or identical copies)")
    assert outcomes[1] == f"2: error: {mine}" and outcomes[0].startswith("2: error: rank 1 ") and \
        outcomes[0].endswith(mine), outcomes
    assert not [name for name in os.listdir(out) if name.startswith("shard-")] if os.path.isdir(out) else True


def test_latent_cache_whose_peer_ended_in_its_setup_is_one_line(tmp_path, monkeypatch, capsys):
    """A process of another node that failed setting up (its dataset or VAE unreadable there) ends; the
    others meet gloo's error at their first collective: one line (was gloo's traceback)."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)

    def gone(fn, info):
        raise torch.distributed.DistBackendError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                                                 "closed by peer [10.0.0.2]:29500")

    monkeypatch.setattr(latent_cache, "on_main", gone)
    monkeypatch.setattr(latent_cache, "is_distributed", lambda: True)
    with pytest.raises(SystemExit):
        latent_cache.main(_cache_args(images, vae_dir, str(tmp_path / "cache")))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: another process of the job ended (Connection closed by peer [10.0.0.2]:29500); its error is in "
        "the torchrun summary of its node")


def test_latent_cache_whose_peer_ended_before_the_shards_were_written_keeps_them_in_one_line(tmp_path, monkeypatch,
                                                                                              capsys):
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    out = tmp_path / "cache"

    def gone():
        raise torch.distributed.DistBackendError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                                                 "closed by peer [10.0.0.2]:29500")

    monkeypatch.setattr(latent_cache, "barrier", gone)
    with pytest.raises(SystemExit) as exit_info:
        latent_cache.main(_cache_args(images, vae_dir, str(out)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: another process of the job ended before its shards were written (Connection closed by peer "
        "[10.0.0.2]:29500); the 1 shard written is kept: run the same command again to encode the rest")
    assert sorted(os.listdir(out)) == [".lock", "settings.json", latent_cache.shard_name(0)]


def test_latent_cache_errors_of_a_collective_that_are_not_a_peers_end_are_raised_as_they_are(tmp_path, monkeypatch):
    """A failure of a collective that is not another process's end is not said to be one: it is raised
    itself, the shards written before it kept (an I/O error writing a shard is one line: see
    test_latent_cache_on_a_failing_disk_is_one_line_and_leaves_no_temporary_file)."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=4)
    out = tmp_path / "cache"

    def timed_out():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms "
                           "for recv operation to complete")

    monkeypatch.setattr(latent_cache, "barrier", timed_out)
    with pytest.raises(RuntimeError, match="^\\[.*Timed out waiting 1800000ms for recv"):
        latent_cache.main(_cache_args(images, vae_dir, str(out)))
    assert sorted(os.listdir(out)) == [".lock", "settings.json"] + [latent_cache.shard_name(k) for k in (0, 1)]


def test_latent_cache_shares_missing_shards_among_torchrun_processes(tmp_path):
    """Resumed under torchrun, the missing shards 0 and 2 go one to each process (round robin over all
    shards would give both to rank 0), and come out as the single-process run wrote them."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    out = str(tmp_path / "cache")
    latent_cache.main(_cache_args(images, vae_dir, out))
    written = {k: torch.load(os.path.join(out, latent_cache.shard_name(k)), weights_only=True) for k in (0, 2)}
    for k in written:
        os.remove(os.path.join(out, latent_cache.shard_name(k)))
    os.remove(os.path.join(out, "index.json"))
    env = torchrun_env(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "sit_fast.latent_cache", *_cache_args(images, vae_dir, out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoding 4 (x 2 flips) in 2 shard(s) on 2 process(es)" in result.stdout, result.stdout
    assert "shard-00000.pt" in result.stdout and "shard-00002.pt" not in result.stdout  # rank 0 wrote only 0
    for k, expected in written.items():  # the same up to round-off (torchrun runs 1 thread per process)
        again = torch.load(os.path.join(out, latent_cache.shard_name(k)), weights_only=True)
        for key in ("mean", "std", "labels"):
            torch.testing.assert_close(again[key], expected[key], rtol=1e-5, atol=1e-6)
    with open(os.path.join(out, "index.json")) as f:
        assert [s["count"] for s in json.load(f)["shards"]] == [2, 2, 2]


def _rank_0_killed(tmp_path, name: str, body: str) -> str:
    """A script whose rank 0 is killed (SIGKILL) where `body` says (it patches the modules, then runs)."""
    script = tmp_path / name
    script.write_text(f"import os, runpy, signal, sys, time\nsys.path.insert(0, {REPO!r})\n{body}")
    return str(script)


@pytest.mark.slow  # training's case runs by default (test_training_whose_rank_0_was_killed_...)
def test_latent_cache_whose_rank_0_was_killed_says_so_once_from_the_process_left(tmp_path):
    """Rank 0 killed after its first shard: torchrun stops rank 1 (SIGTERM), which says in rank 0's place,
    once, that rank 0 ended and the shards written are kept (it exited 143 without a word)."""
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=20)
    out = str(tmp_path / "cache")
    script = _rank_0_killed(tmp_path, "cache.py", (
        "from sit_fast import latent_cache\n"
        "real = latent_cache.atomic_torch_save\n"
        "def save(*args, **kwargs):\n"
        "    real(*args, **kwargs)\n"
        "    if os.environ['RANK'] == '0':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    time.sleep(0.3)  # rank 1 is still at work when torchrun stops it\n"
        "latent_cache.atomic_torch_save = save\n"
        "latent_cache.main()\n"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *_cache_args(images, vae_dir, out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=torchrun_env(tmp_path), timeout=240)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if re.search(r"written (is|are) kept", line)]
    assert len(said) == 1 and re.fullmatch(  # rank 0's shard, and those rank 1 wrote meanwhile
        re.escape(f"rank 0 (on {socket.gethostname()}) ended (its node's torchrun summary says how), and the others "
                  f"were stopped by SIGTERM; the ") + r"(1 shard written is|\d+ shards written are)" + re.escape(
                      f" kept: run the same command again to encode the rest into {out}"), said[0]), \
        result.stderr[-3000:]
    assert says_the_others_were_stopped(result.stderr), result.stderr[-3000:]  # rank 1, stopped by torchrun
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]  # torchrun's own


def test_training_whose_rank_0_was_killed_says_so_once_from_the_process_left(tmp_path):
    """Rank 0 killed at step 2: rank 1 meets its end in a collective, and prints the line itself (it left
    stderr to rank 0, which was gone: the line was in torchrun's summary only), naming rank 0 and the last
    checkpoint."""
    exp = str(tmp_path / "run")
    script = _rank_0_killed(tmp_path, "train_killed.py", (
        "from sit_fast.training import loop\n"
        "real = loop.Trainer.train_step\n"
        "def train_step(self, batch):\n"
        "    if self.step == 2 and os.environ['RANK'] == '0':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, batch)\n"
        "loop.Trainer.train_step = train_step\n"
        f"runpy.run_path({os.path.join(REPO, 'train.py')!r}, run_name='__main__')\n"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *BASE, "--exp-dir", exp, "--max-steps", "16", "--ckpt-every", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=torchrun_env(tmp_path), timeout=240)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1, result.stderr[-3000:]
    assert re.fullmatch(rf"error: rank 0 \(on {re.escape(socket.gethostname())}\) ended at step 2 \(.*\); its error is "
                        rf"in the torchrun summary of its node; last checkpoint: "
                        rf"{re.escape(os.path.join(exp, 'checkpoints', '0000002.pt'))}", said[0]), said
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]  # torchrun's own


# ----------------------------------------------------------------------------- the real launchers

def test_torchrun_cli_two_processes(tmp_path):
    exp = str(tmp_path / "run")
    env = torchrun_env(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train.py"), *BASE, "--exp-dir", exp, "--max-steps", "16", "--ckpt-every", "16"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in open(os.path.join(exp, "log.txt")).read()
    assert len(load_ckpt(os.path.join(exp, "checkpoints", "0000016.pt"))["rng"]) == 2


@pytest.mark.slow
def test_two_torchrun_nodes_with_c10d_rendezvous_train_alike(tmp_path):
    """README's multi-node command, two nodes simulated here: two torchrun launchers (--nnodes=2, one process
    each) meeting at one c10d endpoint. The ranks end with the same weights, each drew from its own seed,
    and the log lines and the checkpoint come from rank 0 alone."""
    exp, out = str(tmp_path / "run"), tmp_path / "ranks"
    out.mkdir()
    script = tmp_path / "train_ranks.py"  # train.py, each rank then saving its weights and its RNG's state
    script.write_text(
        f"import os, runpy, sys, torch\nsys.path.insert(0, {REPO!r})\nfrom sit_fast.training import loop\n"
        "run = loop.Trainer.run\n"
        "def run_and_save(self):\n"
        "    summary = run(self)\n"
        "    state = {'model': self.model.state_dict(), 'ema': self.ema.state_dict(), 'rng': torch.get_rng_state()}\n"
        f"    torch.save(state, os.path.join({str(out)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n"
        "    return summary\n"
        "loop.Trainer.run = run_and_save\n"
        f"sys.argv[0] = {os.path.join(REPO, 'train.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_id=sit", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{free_port()}"]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, str(script), *BASE, "--exp-dir", exp,
               "--max-steps", "4", "--ckpt-every", "4", "--log-every", "2"]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=torchrun_env(tmp_path)) for _ in range(2)]
    try:
        said = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], said
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert_ranks_identical(ranks)
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])  # seeds global_seed * world_size + rank
    assert os.listdir(os.path.join(exp, "checkpoints")) == ["0000004.pt"]
    log = open(os.path.join(exp, "log.txt")).read()
    assert "world size 2" in log and log.count("(step=0000004)") == log.count("saved checkpoint") == 1, log
    # the node that holds rank 0 prints the log lines; the other prints nothing of its own
    lines = [sum(line.count("(step=0000004)") for line in stderr.splitlines()) for _, stderr in said]
    assert sorted(lines) == [0, 1], said
    assert all(not without_gloo_lines(stdout) for stdout, _ in said), said


@pytest.mark.slow
def test_demo_learns_digits(tmp_path):
    """`make demo` as it runs: >= 80% of 500 generated digits classified as the requested class."""
    out = str(tmp_path / "demo")
    result = subprocess.run([sys.executable, "-m", "sit_fast.demo", "--out", out], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["ODE"]["accuracy"] >= 0.8 and results["SDE"]["accuracy"] >= 0.8
    assert os.path.isfile(os.path.join(out, "samples_ode.png")) and os.path.isfile(os.path.join(out, "samples_sde.png"))


def test_demo_refuses_a_sample_count_it_would_round_down(tmp_path, capsys, monkeypatch):
    """25 digits cannot be as many of each class: refused before training, not silently scored on 20;
    the count suggested is the nearest one it takes."""
    from sit_fast import demo

    def train(*args, **kwargs):
        raise AssertionError("the demo went on to train")

    monkeypatch.setattr(demo.subprocess, "run", train)
    for given, suggested in (("25", "20"), ("5", "10")):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--num-samples", given, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert f"--num-samples {given}: give a multiple of 10 (as many digits of each class), e.g. {suggested}\n" \
            in capsys.readouterr().err
        assert not os.listdir(tmp_path)


def test_demo_trains_afresh_with_torchrun_and_its_flags(tmp_path, monkeypatch, capsys):
    """The demo's training run: torchrun with 2 processes on the CPU, the demo's flags passed on, a log line
    every tenth of the steps (at least every step), one checkpoint and grid at the end; a run left in OUT
    by an earlier demo is removed first; a failed run is one line naming its log."""
    from sit_fast import demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "out"
    (out / "train" / "checkpoints").mkdir(parents=True)
    (out / "train" / "checkpoints" / "0000900.pt").write_bytes(b"an earlier run's")
    runs = []

    def run(command, env):
        runs.append((command, env))
        (out / "train").mkdir()
        (out / "train" / "log.txt").write_text("the run's log\n")
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(demo.subprocess, "run", run)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(out), "--steps", "7", "--lr", "0.002", "--ema-decay", "0.5", "--seed", "3",
                   "--cfg-scale", "1.5"])
    assert exit_info.value.code == 2
    exp_dir = os.path.join(str(out), "train")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: training failed with exit status 3 (see the log above and {exp_dir}/log.txt)")
    assert not os.path.exists(os.path.join(exp_dir, "checkpoints"))  # the earlier run is gone
    (command, env), = runs
    assert command[1:4] == ["-m", "torch.distributed.run", "--log-dir"]
    flags = command[command.index("--standalone"):]
    assert flags[:4] == ["--standalone", "--nproc_per_node=2", "-m", "sit_fast.training"]  # not a train.py near by
    given = dict(zip(flags[4::2], flags[5::2]))
    assert {key: given[key] for key in ("--dataset", "--image-size", "--vae", "--model", "--max-steps", "--lr",
                                        "--ema-decay", "--global-seed", "--log-every", "--ckpt-every",
                                        "--sample-every", "--cfg-scale", "--fused-kernels", "--exp-dir")} == {
        "--dataset": "digits", "--image-size": "8", "--vae": "none", "--model": "SiT-T/4", "--max-steps": "7",
        "--lr": "0.002", "--ema-decay": "0.5", "--global-seed": "3", "--log-every": "1", "--ckpt-every": "7",
        "--sample-every": "7", "--cfg-scale": "1.5", "--fused-kernels": "off", "--exp-dir": exp_dir}
    assert "TRITON_INTERPRET" not in env
    assert env["OMP_NUM_THREADS"] == "4"  # the CPUs shared by the 2 processes


@pytest.mark.parametrize("failing", ["samples_ode.png", "results.json"])
def test_demo_on_a_full_disk_is_one_line_and_keeps_the_run_trained(failing, tmp_path, monkeypatch, capsys):
    """The demo's sample grids and results.json on a full disk ended it in a traceback, after its training;
    results.json was written in place, so a write cut short left part of it. One line now, naming what to
    do (--skip-training evaluates the run kept), no file left in part, and the run again writes them."""
    import builtins

    from sit_fast import demo, files

    out = tmp_path / "demo"
    train_main(BASE + ["--exp-dir", str(out / "train"), "--max-steps", "1"])
    real_open = builtins.open

    def full_disk_for(path, mode="r", *args, **kwargs):
        if os.path.basename(path).startswith(f".{failing}.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", full_disk_for, raising=False)
    argv = ["--out", str(out), "--skip-training", "--num-samples", "10", "--min-accuracy", "0"]
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {out / failing} (No space left on device): the run trained is kept: make room (or "
        f"make the folder writable) and run the demo again with --skip-training to evaluate it")
    assert not (out / "results.json").exists() and not [n for n in os.listdir(out) if ".tmp-" in n]
    monkeypatch.setattr(files, "open", real_open, raising=False)
    demo.main(argv)
    assert json.loads((out / "results.json").read_text())["num_samples"] == 10


def test_demo_removes_only_an_earlier_training_run_and_checks_its_flags_first(tmp_path, monkeypatch, capsys):
    """OUT/train is removed only where it holds what a training run writes: --out pointed at a dataset
    (OUT/train/<class>/...) or a link there is refused, not deleted; an unknown --model and an SDE of
    one step are refused before anything is touched or trained; a run that failed before writing its
    log is not sent to a log.txt that is not there. A --nproc that does not divide the global batch is
    refused before training too."""
    from sit_fast import demo

    runs = []

    def run(command, env):
        runs.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(demo.subprocess, "run", run)

    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    dataset = tmp_path / "imagenet"
    (dataset / "train" / "n01440764").mkdir(parents=True)
    (dataset / "train" / "n01440764" / "a.JPEG").write_bytes(b"an image")
    assert error(["--out", str(dataset)]) == (
        f"error: --out: {dataset / 'train'}, where the demo trains afresh, holds what no training run writes "
        "(n01440764): pass another --out (the demo removes its earlier run there, and would remove these)")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "train").symlink_to(dataset / "train")
    assert error(["--out", str(linked)]).startswith(f"error: --out: {linked / 'train'}, where the demo trains, is a "
                                                    "link")
    assert error(["--out", str(dataset), "--model", "SiT-Q/2"]).startswith("error: argument --model: invalid choice")
    assert error(["--out", str(dataset), "--sde-steps", "1"]) == (
        "error: --sde-steps 1: give 2 or more (the SDE sampler's count includes its last, noise-free step)")
    assert error(["--out", str(dataset), "--nproc", "3"]) == (
        "error: --global-batch-size 256 is not divisible by --nproc 3 (the training processes' equal shares): pass "
        "--global-batch-size 255, say")
    assert error(["--out", str(dataset), "--nproc", "3", "--skip-training"]).startswith(  # no training: not used
        "error: no checkpoint in ")
    assert (dataset / "train" / "n01440764" / "a.JPEG").exists() and not runs
    run_dir = tmp_path / "out" / "train"
    for entry in ("checkpoints", "samples"):
        (run_dir / entry).mkdir(parents=True)
    (run_dir / "log.txt").write_text("an earlier demo's\n")
    assert error(["--out", str(tmp_path / "out")]) == "error: training failed with exit status 1 (see the log above)"
    assert len(runs) == 1 and not run_dir.exists()


def test_demo_on_gpus_trains_one_process_per_gpu_up_to_two(tmp_path, monkeypatch):
    """With CUDA: min(2, GPUs) training processes, with the fused kernels as train.py resolves them there."""
    from sit_fast import demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    commands = []
    monkeypatch.setattr(demo.subprocess, "run", lambda command, env: commands.append(command) or
                        subprocess.CompletedProcess(command, 3))
    for gpus, nproc in ((4, 2), (1, 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        with pytest.raises(SystemExit):
            demo.main(["--out", str(tmp_path / "out"), "--steps", "7"])
        command = commands.pop()
        assert f"--nproc_per_node={nproc}" in command
        assert command[command.index("--fused-kernels") + 1] == "auto"


def test_demo_scores_the_newest_checkpoint_and_fails_below_the_accuracy_asked_for(tmp_path, monkeypatch, capsys):
    """--skip-training evaluates the run in OUT (one line if there is none); results.json is written, and the
    exit status is 1 when either sampler's share of correct digits is below --min-accuracy."""
    from sit_fast import demo

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(out), "--skip-training"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: no checkpoint in {out}/train/checkpoints: run the demo without --skip-training")
    folder = out / "train" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (5, 10):
        (folder / f"{step:07d}.pt").write_bytes(b"")
    evaluated = []

    def evaluate(args, checkpoint, accuracies=None):
        evaluated.append(checkpoint)
        return {"classifier_held_out_accuracy": 0.98, "ODE": {"accuracy": accuracies[0]},
                "SDE": {"accuracy": accuracies[1]}}

    for accuracies, status in (((0.9, 0.85), None), ((0.9, 0.75), 1), ((0.7, 0.95), 1), ((0.8, 0.8), None)):
        monkeypatch.setattr(demo, "evaluate", lambda args, checkpoint, a=accuracies: evaluate(args, checkpoint, a))
        if status is None:
            assert demo.main(["--out", str(out), "--skip-training"])["SDE"]["accuracy"] == accuracies[1]
        else:
            with pytest.raises(SystemExit) as exit_info:
                demo.main(["--out", str(out), "--skip-training"])
            assert exit_info.value.code == status
            assert f"demo FAILED: {100 * min(accuracies):.1f}% < 80%" in capsys.readouterr().err
        with open(out / "results.json") as f:
            assert json.load(f)["ODE"]["accuracy"] == accuracies[0]
    assert evaluated == [str(folder / "0000010.pt")] * 4


def test_demo_evaluation_scores_each_sampler_on_the_classifiers_pixel_scale(tmp_path, digits_checkpoint,
                                                                            monkeypatch):
    """The generated digits in [-1, 1] reach the classifier as the real ones' 0..16 pixels, in the order of
    the labels asked for (one class after another); each sampler's share of correct digits, and its grid:
    the first ten digits of each class, a row per class. The model is guided at --cfg-scale, in every channel,
    against the null class, and the samples do not depend on the random state they were drawn in."""
    import numpy as np

    from sit_fast import demo, images, models

    seen, grids, guided = [], [], []
    real_forward_with_cfg = models.SiT.forward_with_cfg

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        guided.append((cfg_scale, cfg_channels, y.tolist()))
        return real_forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels)

    monkeypatch.setattr(models.SiT, "forward_with_cfg", forward_with_cfg)

    class Recording:
        def predict(self, pixels):
            seen.append(pixels)
            return np.repeat(np.arange(10), len(pixels) // 10)  # every digit as asked for

    rows = []

    def save_image_grid(grid, path, nrow, scale):
        grids.append(grid)
        rows.append(nrow)
        return path

    monkeypatch.setattr(demo, "digit_classifier", lambda: (Recording(), 0.97))
    monkeypatch.setattr(images, "save_image_grid", save_image_grid)
    args = demo.build_parser().parse_args(["--out", str(tmp_path), "--num-samples", "120", "--ode-steps", "2",
                                           "--sde-steps", "2", "--cfg-scale", "3.5"])
    torch.manual_seed(123)
    results = demo.evaluate(args, digits_checkpoint)
    assert [pixels.shape for pixels in seen] == [(120, 64)] * 2
    assert all(pixels.min() >= 0 and pixels.max() <= 16 and pixels.max() > 8 for pixels in seen)
    for pixels, grid in zip(seen, grids):
        first_ten = pixels.reshape(10, 12, 64)[:, :10].reshape(100, 64)
        np.testing.assert_allclose(((grid + 1) * 8).reshape(100, 64).numpy(), first_ten, rtol=0, atol=1e-5)
    assert results["classifier_held_out_accuracy"] == 0.97 and results["num_samples"] == 120
    for name in ("ODE", "SDE"):
        assert results[name]["accuracy"] == 1.0
        assert results[name]["grid"] == os.path.join(str(tmp_path), f"samples_{name.lower()}.png")
    assert results["cfg_scale"] == 3.5 and rows == [10, 10]  # a class a row
    labels = [digit for digit in range(10) for _ in range(12)] + [10] * 120  # 10: the null class of 10 classes
    assert guided and all(call == (3.5, "all", labels) for call in guided)
    torch.manual_seed(456)
    demo.evaluate(args, digits_checkpoint)
    np.testing.assert_array_equal(seen[2], seen[0])
    np.testing.assert_array_equal(seen[3], seen[1])
    args.num_samples = 50  # 5 of each class: a class a row still, 5 wide
    demo.evaluate(args, digits_checkpoint)
    assert rows[-2:] == [5, 5] and [tuple(grid.shape) for grid in grids[-2:]] == [(50, 1, 8, 8)] * 2


def test_demo_classifier_is_judged_on_digits_it_never_saw():
    """The printed accuracy is that of the classifier that scores the samples, on the held-out quarter."""
    from sit_fast.demo import digit_classifier

    classifier, held_out = digit_classifier()
    assert 0.95 < held_out < 1.0
    assert classifier.shape_fit_ == (1347, 64)  # 3/4 of the 1797 digits


# ----------------------------------------------------------------------------- stop signals

def _start_and_signal(command, log, signum, env=None, min_step=5, whole_group=False, ignoring=None):
    """Start `command`, wait until log.txt shows step >= min_step, send `signum` (to every process of
    the job with whole_group, as a scheduler does); (returncode, output). ignoring: a signal the
    process starts out ignoring (as under nohup), sent first: it must still be running a second later."""
    import signal as signals
    import time

    preexec = (lambda: signals.signal(getattr(signals, ignoring), signals.SIG_IGN)) if ignoring else None
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                               start_new_session=whole_group, preexec_fn=preexec)
    with killed_if_left(process, whole_group):
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            text = Path(log).read_text() if os.path.isfile(log) else ""
            steps = re.findall(r"\(step=(\d+)\)", text)
            if (min_step is None and text) or (steps and int(steps[-1]) >= (min_step or 0)):
                break
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[0][-3000:]
        if ignoring:
            process.send_signal(getattr(signals, ignoring))
            time.sleep(1.0)
            assert process.poll() is None, process.communicate()[0][-3000:]
        if whole_group:
            os.killpg(process.pid, getattr(signals, signum))
        else:
            process.send_signal(getattr(signals, signum))
        output, _ = process.communicate(timeout=120)
    return process.returncode, output


@contextlib.contextmanager
def killed_if_left(process, whole_group=False):
    """A run that a failed test leaves behind (a timeout, an assertion) is killed, its process group
    with whole_group, rather than training on and slowing every test after it."""
    import signal as signals

    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if whole_group:
                    os.killpg(process.pid, signals.SIGKILL)
                else:
                    process.kill()
            process.communicate()


def _stop_request_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import signal as signals

    from sit_fast.distributed import cleanup, init_distributed
    from sit_fast.training.checkpointing import StopRequest

    init_distributed()
    try:
        stop = StopRequest()
        stop.connect()
        stopped = None
        for step in range(1, 11):
            if rank == 1 and step == 3:
                stop._handle(signals.SIGTERM, None)  # only rank 1 got the signal
            name = stop.agreed()
            if name:
                stopped = (step, name)
                break
        stop.restore()
        torch.save(stopped, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def test_stop_request_is_agreed_by_every_rank():
    """A signal seen by one rank only stops every rank, after the same step (one step later)."""
    import tempfile

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_stop_request_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        stopped = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    assert stopped == [(4, "SIGTERM"), (4, "SIGTERM")]


@pytest.mark.parametrize("signum", ["SIGTERM", pytest.param("SIGUSR1", marks=SLOW)])
def test_stop_signal_writes_a_checkpoint_that_resumes_exactly(tmp_path, signum):
    """A preemption (SIGTERM) or SLURM's warning (SIGUSR1) stops after the current step with a
    checkpoint; resuming it to step S + 2 equals 2 straight runs' S + 2 (Ctrl-C's stop is the same
    stop: test_ctrl_c_stops_with_a_checkpoint_and_says_where_to_resume)."""
    import signal as signals

    exp = str(tmp_path / "stopped")
    argv = BASE + ["--log-every", "1", "--ckpt-every", "100000"]
    code, output = _start_and_signal([sys.executable, os.path.join(REPO, "train.py"), *argv, "--exp-dir", exp,
                                      "--max-steps", "100000"], os.path.join(exp, "log.txt"), signum)
    assert code == 128 + getattr(signals, signum), output[-3000:]
    (stop_ckpt,) = list_checkpoints(os.path.join(exp, "checkpoints"))
    step = load_ckpt(stop_ckpt)["step"]
    assert f"stopped by {signum} after step {step}; checkpoint {stop_ckpt}: continue with --resume" in output
    train_main(["--exp-dir", exp, "--resume", stop_ckpt, "--max-steps", str(step + 2), "--ckpt-every", "100000"])
    straight = str(tmp_path / "straight")
    train_main(argv + ["--exp-dir", straight, "--max-steps", str(step + 2)])
    a = load_ckpt(checkpoint_path(os.path.join(straight, "checkpoints"), step + 2))
    b = load_ckpt(checkpoint_path(os.path.join(exp, "checkpoints"), step + 2))
    assert_states_close(a["model"], b["model"], "model")
    assert_states_close(a["ema"], b["ema"], "ema")


def test_a_stop_between_log_lines_logs_the_steps_since_the_last_and_saves_them(tmp_path, monkeypatch):
    """A stop signal during step 3 of a run logging every 8 steps: the log line of steps 1 to 3 is written
    (the scalars of the steps taken are not lost) and the checkpoint of step 3 saved, as the stop says."""
    import signal

    from sit_fast.training import loop

    step = loop.Trainer.train_step

    def signalled_in_step_three(self, batch):
        if self.step == 2:
            self.stop._handle(signal.SIGTERM, None)
        return step(self, batch)

    monkeypatch.setattr(loop.Trainer, "train_step", signalled_in_step_three)
    exp = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "100", "--ckpt-every", "100"])
    assert exit_.value.code == 128 + signal.SIGTERM
    log = (exp / "log.txt").read_text()
    assert len(re.findall(r"\(step=0000003\) Train Loss: [0-9.]+,", log)) == 1 and "(step=0000004)" not in log
    saved = checkpoint_path(str(exp / "checkpoints"), 3)
    assert list_checkpoints(str(exp / "checkpoints")) == [saved]
    assert f"stopped by SIGTERM after step 3; checkpoint {saved}: continue with --resume" in log


@pytest.mark.parametrize("again_in", ["close_trackers", "cleanup"])
def test_a_stop_signal_sent_again_while_the_run_ends_is_noted_not_its_default_action(tmp_path, monkeypatch,
                                                                                     again_in):
    """SIGTERM, then SIGTERM again while the stopped run closes its trackers, or as it leaves the process
    group at the very end (SLURM signals every process and torchrun passes it on): the second is noted by
    the run's handler, not handed to the one from before the run (by default the process's end, before the
    line saying where to resume, or with the run folder's lock and the process group not left); the run
    ends with the first's status and line, and the handlers are restored as it ends."""
    import signal

    from sit_fast.training import loop

    step, close = loop.Trainer.train_step, loop.Trainer.close_trackers

    def signalled_in_step_two(self, batch):
        if self.step == 1:
            self.stop._handle(signal.SIGTERM, None)
        return step(self, batch)

    def signalled_again():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here
        left.append(again_in)

    def closing_signalled_again(self, failed=False):
        signalled_again()
        return close(self, failed)

    def leaving_signalled_again():
        signalled_again()
        cleanup()

    left, cleanup = [], loop.cleanup
    monkeypatch.setattr(loop.Trainer, "train_step", signalled_in_step_two)
    if again_in == "close_trackers":
        monkeypatch.setattr(loop.Trainer, "close_trackers", closing_signalled_again)
    else:
        monkeypatch.setattr(loop, "cleanup", leaving_signalled_again)
    before_the_run = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: before_the_run.append(signum))
    try:
        with pytest.raises(SystemExit) as exit_:
            train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "100", "--ckpt-every", "100"])
        assert signal.getsignal(signal.SIGTERM) is not None and not before_the_run
        os.kill(os.getpid(), signal.SIGTERM)  # after the run: the handler from before it again
        time.sleep(0.2)
        assert before_the_run == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_.value.code == 128 + signal.SIGTERM and left == [again_in]
    assert "stopped by SIGTERM after step 2; checkpoint " in (tmp_path / "run" / "log.txt").read_text()


def test_a_hangup_stops_with_a_checkpoint_unless_the_run_ignores_it(tmp_path):
    """SIGHUP (the terminal closed) stops after the step with a checkpoint, exit 129; a run started
    ignoring it (nohup) goes on, and stops at the SIGTERM that follows."""

    def command(exp):
        return [sys.executable, os.path.join(REPO, "train.py"), *BASE, "--exp-dir", exp, "--max-steps", "100000",
                "--log-every", "1", "--ckpt-every", "100000"]

    exp = str(tmp_path / "hangup")
    code, output = _start_and_signal(command(exp), os.path.join(exp, "log.txt"), "SIGHUP", min_step=2)
    assert code == 129, output[-3000:]
    (stop_ckpt,) = list_checkpoints(os.path.join(exp, "checkpoints"))
    assert f"stopped by SIGHUP after step {load_ckpt(stop_ckpt)['step']}" in output

    exp = str(tmp_path / "nohup")
    code, output = _start_and_signal(command(exp), os.path.join(exp, "log.txt"), "SIGTERM", min_step=2,
                                     ignoring="SIGHUP")
    assert code == 143 and "stopped by SIGTERM after step" in output, output[-3000:]


def test_sigterm_during_startup_stops_after_the_first_step(tmp_path):
    """Caught from the moment the run has a log (before the model is built): a checkpoint, not a kill."""
    exp = str(tmp_path / "early")
    command = [sys.executable, os.path.join(REPO, "train.py"), *BASE, "--exp-dir", exp, "--max-steps", "100000",
               "--log-every", "1"]
    code, output = _start_and_signal(command, os.path.join(exp, "log.txt"), "SIGTERM", min_step=None)
    assert code == 143, output[-3000:]
    (stop_ckpt,) = list_checkpoints(os.path.join(exp, "checkpoints"))
    assert f"stopped by SIGTERM after step {load_ckpt(stop_ckpt)['step']}" in output


def _sigterm_before_ignoring(worker_id):
    """A worker_init_fn that is signalled before it gets to ignore the stop signals (the race of a
    scheduler signalling the job while a loader starts its workers), then ignores them."""
    import signal as signals
    import time

    os.kill(os.getpid(), signals.SIGTERM)
    time.sleep(0.2)
    interrupts.ignore_stop_signals(worker_id)


_HELD_AND_UNHELD = """
import multiprocessing, sys
multiprocessing.set_start_method(sys.argv[1])
from sit_fast import interrupts
from sit_fast.data import make_loader
from tests.test_train import _sigterm_before_ignoring

batches = [[0, 1], [2, 3], [4, 5]]

def run():
    loader = make_loader(list(range(6)), batches, num_workers=1, pin_memory=False, seed=0,
                         worker_init_fn=_sigterm_before_ignoring)
    return [b.tolist() for b in loader]

with interrupts.stop_signals_held():
    print("held:", "ok" if run() == batches else "wrong batches")
try:
    print("unheld:", "ok" if run() == batches else "wrong batches")
except RuntimeError as err:
    print("unheld:", err)
"""


@pytest.mark.parametrize("method", ["fork", pytest.param("forkserver", marks=SLOW)])
def test_workers_started_holding_the_stop_signals_survive_an_early_sigterm(method):
    """In a fresh process for each start method. fork: a worker inherits the hold, and without it
    torch's worker handler kills the worker before it ignores the signal. forkserver (Python 3.14's
    default): workers come from the fork server, which holds the signals for life when the first
    loader, under the hold, started it; so later workers are safe even started unheld."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _HELD_AND_UNHELD, method], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == "held: ok", result.stdout + result.stderr[-3000:]
    if method == "fork":
        assert re.match(r"unheld: DataLoader worker .*(killed by signal|exited unexpectedly)", lines[1]), lines
    else:
        assert lines[1] == "unheld: ok", lines


class _SlowList(list):
    """Picklable (by reference) for workers started by spawn or forkserver."""

    def __getitem__(self, index):
        import time

        time.sleep(0.01)
        return super().__getitem__(index)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_data_loader_workers_outlive_a_stop_signal_of_their_own(signum):
    """A Ctrl-C reaches a terminal's whole process group, a scheduler's signal every process of the
    job: a worker that died of it would fail the batches the main process still reads."""
    import signal as signals

    from sit_fast.data import close_loader, make_loader

    batches = [[i] for i in range(30)]
    loader = make_loader(_SlowList(range(30)), batches, num_workers=1, pin_memory=False, seed=0,
                         worker_init_fn=interrupts.ignore_stop_signals)
    try:
        got = [next(loader).tolist()]
        os.kill(loader._workers[0].pid, getattr(signals, signum))
        got += [batch.tolist() for batch in loader]
    finally:
        close_loader(loader)
    assert got == batches


def test_sigterm_to_every_process_spares_the_data_loader_workers(tmp_path):
    """A scheduler signals the whole job, data loader workers included: they ignore it, so the main
    process still gets the batch it needs to reach the agreed step and writes its checkpoint."""
    exp = str(tmp_path / "folder")
    images = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", images, "--vae", "none",
               "--image-size", "16", "--model", "SiT-T/4", "--global-batch-size", "4", "--num-workers", "2",
               "--fused-kernels", "off", "--no-progress", "--log-every", "1", "--sample-every", "100000",
               "--exp-dir", exp, "--max-steps", "100000"]
    code, output = _start_and_signal(command, os.path.join(exp, "log.txt"), "SIGTERM", whole_group=True)
    assert code == 143, output[-3000:]
    assert len(list_checkpoints(os.path.join(exp, "checkpoints"))) == 1


@pytest.mark.slow  # Python 3.14's start method; a hangup: test_a_hangup_stops_with_a_checkpoint_unless_...
def test_sighup_to_every_process_under_forkserver_stops_cleanly(tmp_path):
    """Python 3.14 starts loader workers by forkserver on Linux, and with it multiprocessing's resource
    tracker, another process of the job. A SIGHUP to all of them (a closed terminal) stops the run at
    a checkpoint; the tracker holds it (killed, the one started in its place printed a traceback for
    each lock it never knew)."""
    exp = str(tmp_path / "folder")
    images = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    wrapper = tmp_path / "forkserver_train.py"  # train.py as Python 3.14 runs it
    wrapper.write_text("import multiprocessing, runpy, sys\n"
                       "multiprocessing.set_start_method('forkserver')\n"
                       "sys.argv = sys.argv[1:]\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(wrapper), os.path.join(REPO, "train.py"), "--data-path", images, "--vae", "none",
               "--image-size", "16", "--model", "SiT-T/4", "--global-batch-size", "4", "--num-workers", "2",
               "--fused-kernels", "off", "--no-progress", "--log-every", "1", "--sample-every", "100000",
               "--exp-dir", exp, "--max-steps", "100000"]
    code, output = _start_and_signal(command, os.path.join(exp, "log.txt"), "SIGHUP", env=env, whole_group=True)
    assert code == 129 and "stopped by SIGHUP" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert len(list_checkpoints(os.path.join(exp, "checkpoints"))) == 1


def test_starting_the_resource_tracker_leaves_the_start_method_unset():
    """A library caller may still choose the start method after training (set_start_method fails once
    it is fixed)."""
    code = ("import multiprocessing\n"
            "from sit_fast.interrupts import start_resource_tracker\n"
            "start_resource_tracker()\n"
            "print(multiprocessing.get_start_method(allow_none=True))\n"
            "multiprocessing.set_start_method('forkserver')\n"
            "start_resource_tracker()\n"
            "print(multiprocessing.resource_tracker._resource_tracker._pid is not None)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["None", "True"], result.stdout


@pytest.mark.parametrize("num_workers", [pytest.param("0", marks=SLOW), "2"])
def test_a_damaged_image_is_a_one_line_error_and_the_run_exits(tmp_path, num_workers):
    """Raised in a loader worker (which ignores SIGTERM), the error must still end the process: the
    workers are shut down, not left for the interpreter's exit to wait on."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    (tmp_path / "images" / "class0" / "3.png").write_text("not a png")
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", images, "--vae", "none",
               "--image-size", "16", "--model", "SiT-T/4", "--global-batch-size", "16", "--num-workers", num_workers,
               "--fused-kernels", "off", "--no-progress", "--max-steps", "4", "--exp-dir", str(tmp_path / "exp")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (lines[0].startswith("error: cannot read image ") and "3.png" in lines[0]
            and "remove or replace it" in lines[0])


@pytest.mark.parametrize("signum, whole_group", [pytest.param("SIGTERM", False, marks=SLOW), ("SIGINT", True)],
                         ids=["SIGTERM", "ctrl-c"])
def test_stop_signal_to_torchrun_stops_every_rank_after_the_same_step(tmp_path, signum, whole_group):
    """torchrun passes SIGTERM on to its workers, which see it at slightly different moments: they
    agree on one step, write one checkpoint with both ranks' RNG states, and exit. A Ctrl-C (SIGINT
    to the terminal's process group) reaches torchrun, which passes it on to each worker's own
    process group, loader workers included: the same stop, which the loader workers survive."""
    exp = str(tmp_path / "ddp")
    env = torchrun_env(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train.py"), *BASE, "--log-every", "1", "--num-workers", "1", "--exp-dir", exp,
               "--max-steps", "100000"]
    code, output = _start_and_signal(command, os.path.join(exp, "log.txt"), signum, env=env, whole_group=whole_group)
    assert code != 0
    (stop_ckpt,) = list_checkpoints(os.path.join(exp, "checkpoints"))
    checkpoint = load_ckpt(stop_ckpt)
    assert len(checkpoint["rng"]) == 2
    with open(os.path.join(exp, "log.txt")) as f:
        assert (f"stopped by {signum} after step {checkpoint['step']}; checkpoint {stop_ckpt}"
                in f.read()), output[-3000:]
    assert "interrupted at step" not in output, output[-3000:]


# ----------------------------------------------------------------------------- run boundaries

def test_resume_from_an_older_checkpoint_sets_later_ones_aside(tmp_path):
    """Resuming from step 2 of a run that reached step 6 starts a new branch: the old 4 and 6 are moved
    aside (kept), so the new branch's 4 does not overwrite the old one and --resume auto finds the new;
    so are the old sample grids of steps 3 and 6."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "6", "--ckpt-every", "2", "--sample-every", "3"])
    ckpt_dir = os.path.join(exp, "checkpoints")
    old_four = load_ckpt(os.path.join(ckpt_dir, "0000004.pt"))["model"]
    for refused in (["--model", "SiT-S/4"], ["--grad-accum-steps", "3"]):  # a resume that never runs moves nothing
        logging.getLogger("sit_fast.train").handlers.clear()  # a fresh process: no log file open yet
        with pytest.raises(UserError) as err:
            train_main(BASE + ["--exp-dir", exp, "--resume", os.path.join(ckpt_dir, "0000002.pt"), *refused])
        assert sorted(os.listdir(ckpt_dir)) == ["0000002.pt", "0000004.pt", "0000006.pt"]
        with open(os.path.join(exp, "log.txt")) as f:  # the run's log says why it did not continue
            assert f.read().splitlines()[-1].endswith(f"error: {str(err.value)}")
    train_main(BASE + ["--exp-dir", exp, "--resume", os.path.join(ckpt_dir, "0000002.pt"), "--max-steps", "4",
                       "--lr", "1e-2"])
    aside = [name for name in os.listdir(ckpt_dir) if name.startswith("superseded-")]
    assert len(aside) == 1 and sorted(os.listdir(os.path.join(ckpt_dir, aside[0]))) == ["0000004.pt", "0000006.pt"]
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)] == ["0000004.pt", "0000002.pt"]
    new_four = load_ckpt(os.path.join(ckpt_dir, "0000004.pt"))["model"]
    assert not torch.equal(new_four["final_layer.linear.weight"], old_four["final_layer.linear.weight"])
    with open(os.path.join(exp, "log.txt")) as f:
        assert "0000004.pt, 0000006.pt) are moved to" in f.read()
    samples = os.path.join(exp, "samples")
    assert os.listdir(samples) == [aside[0]]  # BASE's --sample-every 100000 wins on the new branch
    assert sorted(os.listdir(os.path.join(samples, aside[0]))) == ["0000003.png", "0000006.png"]
    # A set-aside checkpoint belongs to the run's folder, whose current branch it would overwrite: refused.
    set_aside = os.path.join(ckpt_dir, aside[0], "0000006.pt")
    logging.getLogger("sit_fast.train").handlers.clear()
    with pytest.raises(UserError, match=f"that checkpoint is of a branch set aside in {exp}, whose current "
                                        f"checkpoints \\(the latest: 0000004.pt\\) would be overwritten"):
        train_main(BASE + ["--resume", set_aside, "--max-steps", "8"])
    assert sorted(os.listdir(os.path.join(ckpt_dir, aside[0]))) == ["0000004.pt", "0000006.pt"]
    # Resumed into another --exp-dir, the source run's files stay where they are.
    train_main(BASE + ["--exp-dir", str(tmp_path / "other"), "--resume", os.path.join(ckpt_dir, "0000002.pt"),
                       "--max-steps", "4"])
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)] == ["0000004.pt", "0000002.pt"]
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "other" / "checkpoints"))] == ["0000004.pt"]


def test_a_resume_with_no_step_left_moves_no_checkpoint_aside(tmp_path):
    """Resuming step 1 of a run that reached step 2 with --max-steps 1 trains nothing: no new branch,
    so the run's later checkpoint stays where --resume auto finds it."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "1"])
    ckpt_dir = os.path.join(exp, "checkpoints")
    summary = train_main(BASE + ["--exp-dir", exp, "--resume", os.path.join(ckpt_dir, "0000001.pt"),
                                 "--max-steps", "1"])
    assert summary["step"] == 1
    assert sorted(os.listdir(ckpt_dir)) == ["0000001.pt", "0000002.pt"]


def test_checkpoints_that_cannot_be_set_aside_are_one_line_and_stay_where_they_were(tmp_path, capsys, monkeypatch):
    exp = tmp_path / "run"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "2", "--ckpt-every", "1"])
    ckpt_dir = exp / "checkpoints"

    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    capsys.readouterr()
    resumed = ckpt_dir / "0000001.pt"
    assert run_cli(BASE + ["--exp-dir", str(exp), "--resume", str(resumed), "--max-steps", "3"]) == 2
    line, _ = the_error_line(capsys)
    assert line == (f"error: cannot move the checkpoints after {resumed} aside (No space left on device): make room "
                    f"(or make {ckpt_dir} writable) and resume again")
    assert [os.path.basename(p) for p in list_checkpoints(str(ckpt_dir))] == ["0000002.pt", "0000001.pt"]
    assert not [name for name in os.listdir(ckpt_dir) if name.startswith("superseded-")]  # no empty folder left
    monkeypatch.undo()
    assert train_main(BASE + ["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "3"])["step"] == 3


def test_resume_of_a_run_folder_continues_its_latest_valid_checkpoint_there(tmp_path):
    """--resume EXP (or EXP/checkpoints) takes the newest checkpoint that loads, skipping a damaged one,
    and the run goes on in EXP; a folder with no checkpoint is refused in one line, nothing written."""
    from sit_fast.checkpoint import CheckpointError

    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "1"])
    ckpt_dir = os.path.join(exp, "checkpoints")
    with open(os.path.join(ckpt_dir, "0000002.pt"), "r+b") as f:
        f.truncate(4096)
    logging.getLogger("sit_fast.train").handlers.clear()
    summary = train_main(BASE + ["--resume", exp, "--max-steps", "2", "--ckpt-every", "1"])
    assert summary["step"] == 2 and summary["exp_dir"] == exp
    with open(os.path.join(exp, "log.txt")) as f:
        assert f"resuming from {os.path.join(ckpt_dir, '0000001.pt')}" in f.read()
    assert load_ckpt(os.path.join(ckpt_dir, "0000002.pt"))["step"] == 2
    logging.getLogger("sit_fast.train").handlers.clear()
    assert train_main(BASE + ["--resume", ckpt_dir, "--max-steps", "3"])["step"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    logging.getLogger("sit_fast.train").handlers.clear()
    with pytest.raises(CheckpointError, match=rf"^--resume {re.escape(str(empty))}: no valid checkpoint in "
                                              rf"{re.escape(str(empty))} \(it holds no NNNNNNN.pt file\): pass "
                                              r"another checkpoint or run folder"):
        train_main(BASE + ["--resume", str(empty), "--max-steps", "1"])
    assert os.listdir(empty) == []


def test_nothing_to_do_names_the_limit_that_ended_the_run(tmp_path):
    """The digits' 3 steps per epoch (1797 // 512): a run ended by --epochs 1 and resumed with a larger
    --max-steps says that the checkpoint's --epochs holds it."""
    exp, batch = str(tmp_path / "run"), ["--global-batch-size", "512"]
    train_main(BASE + batch + ["--exp-dir", exp, "--epochs", "1", "--max-steps", "30"])
    assert train_main(BASE + batch + ["--exp-dir", exp, "--max-steps", "40", "--resume", "auto"])["step"] == 3
    with open(os.path.join(exp, "log.txt")) as f:
        assert ("nothing to do: step 3 is at or past the end of the run, the end of epoch 1 (--epochs 1, the "
                "checkpoint's): pass a larger --epochs to train further") in f.read()


def test_a_run_with_no_step_left_says_so_and_starts_no_tracker(tmp_path, monkeypatch):
    import types

    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs)))
    summary = train_main(BASE + ["--exp-dir", exp, "--resume", "auto", "--max-steps", "2", "--wandb"])
    assert summary["step"] == 2 and summary["stopped_by"] is None and not calls
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert ("nothing to do: step 2 is at or past the end of the run, --max-steps 2: pass a larger --max-steps to "
            "train further") in log
    assert "training from step 2" not in log
    train_main(["--exp-dir", exp, "--resume", "auto", "--num-workers", "0", "--no-progress"])
    with open(os.path.join(exp, "log.txt")) as f:
        assert ("nothing to do: step 2 is at or past the end of the run, --max-steps 2 (the checkpoint's): pass a "
                "larger --max-steps to train further") in f.read()


def test_in_channels_other_than_the_datas_are_refused_in_one_line(tmp_path, capsys):
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--in-channels", "3"]) == 2
    line, _ = the_error_line(capsys)
    assert line == "error: --in-channels 3 does not match the data, which has 1 channel"
    assert not (tmp_path / "exp").exists()


def test_fewer_classes_than_the_datas_are_refused_in_one_line(tmp_path, capsys):
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--num-classes", "9", "--max-steps", "1"]) == 2
    line, _ = the_error_line(capsys)
    assert line == ("error: --num-classes 9 is smaller than the dataset's 10 classes: pass --num-classes 10 or more, "
                    "or leave it out to take the dataset's")
    assert not (tmp_path / "exp").exists()


def test_a_run_resumed_on_data_with_more_classes_than_it_has_is_refused_in_one_line(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=8)
    exp = tmp_path / "run"
    argv = ["--data-path", images, "--image-size", "8", "--vae", "none", "--model", "SiT-T/4", "--global-batch-size",
            "2", "--num-workers", "0", "--fused-kernels", "off", "--no-progress", "--exp-dir", str(exp)]
    train_main(argv + ["--max-steps", "1", "--ckpt-every", "1"])
    make_image_folder(tmp_path / "images", classes=3, per_class=2, size=8)
    capsys.readouterr()
    assert run_cli(argv + ["--max-steps", "2", "--resume", "auto"]) == 2
    line, _ = the_error_line(capsys)
    resumed = exp / "checkpoints" / "0000001.pt"
    assert line == (f"error: the run being resumed ({resumed}) has 2 classes, the data 3: resume it on its own data, "
                    f"or start a new run (--ckpt {resumed} to start from its weights)")
    assert os.listdir(exp / "checkpoints") == ["0000001.pt"]


@pytest.mark.parametrize("given,data,message", [
    (["--num-classes", "2"], ["--data-path", "more"], "has 2 classes, the data 3: resume it on its own data"),
    (["--in-channels", "3"], ["--dataset", "digits"], "has 3 input channels, the data 1: resume it on data of its")])
def test_a_resume_given_the_runs_own_model_flag_on_other_data_names_the_run_not_the_flag(tmp_path, capsys, given, data,
                                                                                          message):
    """--num-classes or --in-channels given with the run's own value, on data that does not fit: the run is
    what does not fit (the advice for a new run, to pass another value, would be refused as a change)."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=8)
    make_image_folder(tmp_path / "more", classes=3, per_class=2, size=8)
    exp = tmp_path / "run"
    argv = ["--data-path", images, "--image-size", "8", "--vae", "none", "--model", "SiT-T/4", "--global-batch-size",
            "2", "--num-workers", "0", "--fused-kernels", "off", "--no-progress", "--exp-dir", str(exp)]
    train_main(argv + ["--max-steps", "1", "--ckpt-every", "1"])
    capsys.readouterr()
    data = [str(tmp_path / value) if value == "more" else value for value in data]
    assert run_cli(argv + data + given + ["--max-steps", "2", "--resume", "auto"]) == 2
    line, _ = the_error_line(capsys)
    assert line.startswith(f"error: the run being resumed ({exp / 'checkpoints' / '0000001.pt'}) {message}"), line


def test_a_pixel_space_run_resumed_with_a_vae_is_refused_before_the_vae_loads(tmp_path, capsys, monkeypatch):
    """A pixel-space model cannot take a VAE's latents: said at once, not after loading the VAE (a download,
    or a failure to reach the hub that says nothing of the run)."""
    from sit_fast import vae
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    exp = tmp_path / "run"
    argv = ["--data-path", make_image_folder(tmp_path / "images", classes=2, per_class=2, size=8), "--image-size", "8",
            "--model", "SiT-T/4", "--global-batch-size", "2", "--num-workers", "0", "--fused-kernels", "off",
            "--no-progress", "--exp-dir", str(exp), "--sample-every", "none"]
    train_main(argv + ["--vae", "none", "--max-steps", "1"])
    loaded = []
    monkeypatch.setattr(vae, "load_vae", lambda *a, **k: loaded.append(a))
    capsys.readouterr()
    assert run_cli(argv + ["--vae", vae_dir, "--max-steps", "2", "--resume", "auto"]) == 2
    line, _ = the_error_line(capsys)
    assert line == (f"error: --vae {vae_dir}: the run being resumed ({exp / 'checkpoints' / '0000001.pt'}) trains in "
                    f"pixel space, which a resumed run keeps: leave --vae out (or pass --vae none)")
    assert loaded == []


def test_a_tracker_package_missing_for_a_resumed_runs_own_flag_says_it_is_the_runs(monkeypatch):
    """--tensorboard / --wandb taken from the run being resumed (not given now), whose package is not
    installed here: the error says the flag is the run's and how to go on without it."""
    import argparse

    from sit_fast.training.loop import check_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    args = argparse.Namespace(tensorboard=False, wandb=True)
    with pytest.raises(UserError, match=r"^the run being resumed \(x\.pt\) logs with --wandb, which needs the wandb "
                                        r"package \(.*\): pip install wandb, or pass --no-wandb to go on without it$"):
        check_trackers(args, "x.pt", set())
    with pytest.raises(UserError, match=r"^--wandb needs the wandb package \(.*\): pip install wandb$"):
        check_trackers(args, "x.pt", {"wandb"})
    with pytest.raises(UserError, match=r"^--wandb needs the wandb package"):
        check_trackers(args)


def test_a_run_with_wandb_resumed_where_wandb_is_missing_says_the_flag_is_the_runs(tmp_path, capsys, monkeypatch):
    """train.py --resume of a run that logged with --wandb, where wandb is not installed: one line that names
    the flag as the run's and --no-wandb, nothing written; given now, the flag is named as the command's."""
    import types

    class Run:
        def define_metric(self, name, step_metric=None):
            pass

        def log(self, data):
            pass

        def finish(self, exit_code=0):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: Run(), Image=None))
    exp = tmp_path / "exp"
    train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--ckpt-every", "1", "--wandb"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    capsys.readouterr()
    assert run_cli(["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "2"]) == 2
    line, _ = the_error_line(capsys)
    resumed = exp / "checkpoints" / "0000001.pt"
    assert line.startswith(f"error: the run being resumed ({resumed}) logs with --wandb, which needs the wandb "
                           f"package ("), line
    assert line.endswith(": pip install wandb, or pass --no-wandb to go on without it"), line
    assert run_cli(["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "2", "--wandb"]) == 2
    line, _ = the_error_line(capsys)
    assert line.startswith("error: --wandb needs the wandb package (") and line.endswith(": pip install wandb"), line
    assert os.listdir(exp / "checkpoints") == ["0000001.pt"]


def test_a_new_run_refuses_an_exp_dir_holding_checkpoints(tmp_path, capsys):
    """The same --exp-dir without --resume would overwrite the run's checkpoints of the same steps and
    leave its later ones for --resume auto to mix in: refused in one line, nothing touched."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "1", "--ckpt-every", "1"])
    before = load_ckpt(os.path.join(exp, "checkpoints", "0000001.pt"))["model"]
    assert run_cli(BASE + ["--exp-dir", exp, "--max-steps", "1", "--lr", "1e-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --exp-dir {exp} holds the checkpoints of a run") and "--resume auto" in err, err
    assert os.listdir(os.path.join(exp, "checkpoints")) == ["0000001.pt"]
    after = load_ckpt(os.path.join(exp, "checkpoints", "0000001.pt"))["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_resume_refuses_an_exp_dir_holding_other_checkpoints(tmp_path, capsys):
    """A checkpoint resumed into an --exp-dir that holds other checkpoints would overwrite those of the
    same steps: refused in one line; into its own run's folder it is a new branch (see above)."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train_main(BASE + ["--exp-dir", first, "--max-steps", "1", "--ckpt-every", "1"])
    train_main(BASE + ["--exp-dir", second, "--max-steps", "1", "--ckpt-every", "1", "--lr", "1e-2"])
    before = load_ckpt(os.path.join(second, "checkpoints", "0000001.pt"))["model"]
    resumed = os.path.join(first, "checkpoints", "0000001.pt")
    assert run_cli(["--exp-dir", second, "--resume", resumed, "--max-steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --resume {resumed}: the run goes on in {second}, whose checkpoints"), err
    assert os.listdir(os.path.join(second, "checkpoints")) == ["0000001.pt"]
    after = load_ckpt(os.path.join(second, "checkpoints", "0000001.pt"))["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_on_other_data_is_not_called_exact(tmp_path):
    argv = ["--vae", "none", "--model", "SiT-T/4", "--image-size", "16", "--global-batch-size", "2",
            "--num-workers", "0", "--fused-kernels", "off", "--no-progress", "--sample-every", "100000"]
    first, second = make_image_folder(tmp_path / "a"), make_image_folder(tmp_path / "b")
    exp = str(tmp_path / "run")
    train_main(argv + ["--data-path", first, "--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    train_main(argv + ["--data-path", second, "--exp-dir", exp, "--max-steps", "3", "--resume", "auto"])
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert "on other data: the run was trained on ImageFolder" in log and first in log and second in log, log
    assert "in it): exact" not in log


def test_resume_from_another_working_directory_reads_the_same_relative_data_path(tmp_path, monkeypatch):
    argv = ["--vae", "none", "--model", "SiT-T/4", "--image-size", "16", "--global-batch-size", "2",
            "--num-workers", "0", "--fused-kernels", "off", "--no-progress", "--sample-every", "100000"]
    make_image_folder(tmp_path / "job" / "data")
    os.makedirs(tmp_path / "elsewhere")
    exp = str(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "job")
    train_main(argv + ["--data-path", "data", "--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train_main(argv + ["--exp-dir", exp, "--max-steps", "3", "--resume", "auto"])["step"] == 3
    with open(os.path.join(exp, "log.txt")) as f:
        assert "other data" not in f.read()


def test_resume_with_a_larger_batch_past_the_new_epoch_end_starts_the_next_epoch(tmp_path):
    """27 of 28 steps of 64 digits' epoch done, resumed at batch 96 (18 steps an epoch): the 1728 images
    seen fill the new epoch, so training goes on in the next one (it used to spin without a step); the
    log names the setting that changed."""
    exp = str(tmp_path / "run")
    train_main(BASE + ["--exp-dir", exp, "--max-steps", "27", "--ckpt-every", "100"])
    argv = [a if a != "64" else "96" for a in BASE]
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *argv, "--exp-dir", exp,
                             "--max-steps", "30", "--resume", "auto"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_ckpt(os.path.join(exp, "checkpoints", "0000030.pt"))
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (1, 3)
    with open(os.path.join(exp, "log.txt")) as f:  # what changed, old to new
        assert "resumed at step 27 with --global-batch-size 64 -> 96 (the run's, now): the data order" in f.read()


def test_a_resume_at_the_end_of_an_epoch_starts_the_next_one_at_its_first_step(tmp_path):
    """The digits' 3 steps per epoch at batch 512: a checkpoint that says step 3 of epoch 0 (the epoch
    done) goes on as the run went on, in epoch 1 from its step 0."""
    batch = ["--global-batch-size", "512"]
    straight = train_main(BASE + batch + ["--exp-dir", str(tmp_path / "straight"), "--max-steps", "4"])
    exp = tmp_path / "run"
    train_main(BASE + batch + ["--exp-dir", str(exp), "--max-steps", "3", "--ckpt-every", "3"])
    path = exp / "checkpoints" / "0000003.pt"
    checkpoint = load_ckpt(path)
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (1, 0)
    checkpoint["epoch"], checkpoint["step_in_epoch"] = 0, 3
    torch.save(checkpoint, path)
    resumed = train_main(BASE + batch + ["--exp-dir", str(exp), "--max-steps", "4", "--resume", "auto"])
    a, b = load_ckpt(straight["last_checkpoint"]), load_ckpt(resumed["last_checkpoint"])
    assert (b["epoch"], b["step_in_epoch"]) == (a["epoch"], a["step_in_epoch"]) == (1, 1)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_epochs_end_before_max_steps_with_a_final_checkpoint(tmp_path):
    """--epochs 1 with --max-steps 100: the run ends after the 28 steps of one epoch of digits (1797
    images, batch 64) and saves there; without --image-size the digits keep their 8x8 size."""
    exp = str(tmp_path / "run")
    i = BASE.index("--image-size")
    argv = BASE[:i] + BASE[i + 2:]
    summary = train_main(argv + ["--exp-dir", exp, "--epochs", "1", "--max-steps", "100", "--ckpt-every", "50"])
    assert summary["step"] == 28 and summary["last_checkpoint"].endswith("0000028.pt")
    assert load_ckpt(summary["last_checkpoint"])["args"]["image_size"] == 8
    with open(os.path.join(exp, "log.txt")) as f:
        assert "to step 28 (the end of epoch 1, --epochs, before --max-steps 100)" in f.read()


def test_a_digits_run_at_another_size_resumes_at_that_size(tmp_path):
    """The digits' own 8x8 is the default of a new run only: a resumed run keeps its recorded size."""
    exp = str(tmp_path / "run")
    i = BASE.index("--image-size")
    argv = BASE[:i] + BASE[i + 2:]
    train_main(argv + ["--image-size", "16", "--exp-dir", exp, "--max-steps", "2", "--ckpt-every", "2"])
    summary = train_main(argv + ["--exp-dir", exp, "--max-steps", "3", "--resume", "auto"])
    assert summary["step"] == 3 and load_ckpt(summary["last_checkpoint"])["args"]["image_size"] == 16


def test_weights_made_non_finite_by_a_finite_loss_step_are_never_checkpointed(tmp_path, monkeypatch):
    """Step 4's loss is finite but its gradients overflow: the checkpoint due at step 4 is refused, and
    the error names the last good one (step 2)."""
    from sit_fast.training.loop import NonFiniteLossError

    real_step, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            param = next(p for p in self.param_groups[0]["params"] if p.grad is not None)
            param.grad.view(-1)[0] = float("inf")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    exp = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as info:
        train_main(BASE + ["--exp-dir", exp, "--max-steps", "20", "--ckpt-every", "2", "--log-every", "100"])
    last_good = os.path.join(exp, "checkpoints", "0000002.pt")
    assert "the weights became non-finite by step 4" in str(info.value) and last_good in str(info.value)
    assert os.listdir(os.path.join(exp, "checkpoints")) == ["0000002.pt"]


def test_huge_finite_weights_are_finite_and_the_advice_fits_the_run(tmp_path):
    """check_weights tests finiteness element by element (the 2-norm of weights of 1e30 overflows);
    with --skip-nonfinite on, non-finite weights came from an overflowing update, and the advice
    does not suggest the flag the run already has."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import NonFiniteLossError, Trainer

    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run"), "--skip-nonfinite"])
    trainer = Trainer(args, explicit, init_distributed())
    with torch.no_grad():
        trainer.model_params[0].fill_(1e30)
        assert not torch.isfinite(trainer.model_params[0].norm())
        trainer.check_weights()  # finite: no error
        trainer.ema_params[-1].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"\(an update overflowed\) .* with a lower --lr or --grad-clip$"):
        trainer.check_weights()


def test_every_step_skipped_logs_no_loss(tmp_path, monkeypatch):
    from sit_fast.training import loop

    real = loop.Trainer.batch_to_latents
    monkeypatch.setattr(loop.Trainer, "batch_to_latents", lambda self, batch: (lambda x, y: (x * float("nan"), y))(
        *real(self, batch)))
    summary = train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "3", "--ckpt-every", "3",
                                 "--skip-nonfinite"])
    assert summary["nonfinite_skipped"] == 3 and np.isnan(summary["loss"])


@pytest.mark.parametrize("seed", [10**12, 2**63 - 1, -(2**63 - 1)])
def test_any_integer_global_seed_trains_and_samples(tmp_path, seed):
    """Seeds at the ends of their range, which go past 64 bits in the seeds derived from them (the
    data loader's, the ranks'), train as the others do."""
    exp = tmp_path / "run"
    summary = train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "1", "--global-batch-size", "16",
                                 "--global-seed", str(seed), "--sample-every", "1", "--sample-steps", "1",
                                 "--num-sample-images", "2"])
    assert summary["step"] == 1 and (exp / "samples" / "0000001.png").exists()


def test_missing_tracker_package_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert run_cli(BASE + ["--results-dir", str(tmp_path / "results"), "--wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --wandb needs the wandb package") and err[-1].endswith(": pip install wandb"), err
    assert not (tmp_path / "results").exists(), "the run left the --results-dir it created"


def test_missing_tensorboard_is_one_line_and_removes_the_new_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import raises ImportError
    exp = tmp_path / "exp"
    assert run_cli(BASE + ["--exp-dir", str(exp), "--tensorboard", "--max-steps", "1"]) == 2
    line, _ = the_error_line(capsys)
    assert line.startswith("error: --tensorboard needs the tensorboard package (") and line.endswith(
        "): pip install tensorboard"), line
    assert not exp.exists(), "the run left the --exp-dir it created"


def test_wandb_that_cannot_start_is_one_line(tmp_path, capsys, monkeypatch):
    import types

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    closed = []

    class Writer:  # opened before wandb: closed by the failure
        def __init__(self, log_dir):
            pass

        def close(self):
            closed.append(True)

    wandb = types.ModuleType("wandb")
    wandb.init = init
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    assert run_cli(BASE + ["--exp-dir", str(tmp_path / "exp"), "--max-steps", "1", "--wandb", "--tensorboard"]) == 2
    assert closed == [True]
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == ("error: --wandb: wandb.init failed: api_key not configured (no-tty). call "
                                    "wandb.login(key=[your_api_key]) (wandb login, or WANDB_MODE=offline; $ENTITY "
                                    "and $PROJECT name the entity and project)"), err


def test_ctrl_c_stops_with_a_checkpoint_and_says_where_to_resume(tmp_path):
    """Ctrl-C: exit status 130, no traceback, a checkpoint at the step it stopped after, named (here
    and in log.txt). Checkpoints every 2 steps, so the signal often lands in the middle of a write."""
    import signal
    import time

    exp = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *BASE, "--exp-dir", str(exp),
                             "--max-steps", "100000", "--ckpt-every", "2", "--log-every", "1"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    with killed_if_left(proc):
        deadline = time.time() + 120
        while time.time() < deadline and not list((exp / "checkpoints").glob("*.pt")):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Ctrl-C: stopping after this step with a checkpoint" in err, err
    match = re.search(r"stopped by SIGINT after step (\d+); checkpoint (\S+): continue with --resume", err)
    assert match, err
    assert match.group(0) in (exp / "log.txt").read_text()
    assert load_ckpt(match.group(2))["step"] == int(match.group(1))


def test_ctrl_c_before_training_starts_exits_with_130_saying_so(tmp_path, monkeypatch, capsys):
    from sit_fast.training import loop

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "__init__", interrupted)
    with pytest.raises(SystemExit) as info:
        train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "2"])
    assert info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted before training started"


def test_a_second_ctrl_c_stops_at_once_naming_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The second Ctrl-C (KeyboardInterrupt in a step): exit status 130, no checkpoint of its own,
    the step and the last checkpoint named, here and in log.txt."""
    from sit_fast.training import loop

    step = loop.Trainer.train_step

    def interrupted_at_five(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupted_at_five)
    exp = tmp_path / "run"
    try:
        with pytest.raises(SystemExit) as exit_:
            train_main(BASE + ["--exp-dir", str(exp), "--max-steps", "100", "--ckpt-every", "2"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt came out of train.py's main instead of an exit status")
    assert exit_.value.code == 130
    last = checkpoint_path(str(exp / "checkpoints"), 4)
    message = f"interrupted at step 4; last checkpoint: {last}; continue with --resume {last} (or --resume auto)"
    assert message in capsys.readouterr().err
    assert message in (exp / "log.txt").read_text()
    assert list_checkpoints(str(exp / "checkpoints"))[0] == last  # the newest: none written for step 5


def test_ctrl_c_presses_count_by_when_they_came():
    """The first Ctrl-C asks for a stop; another within INTERRUPT_GRACE is the same press (a double
    press); one later stops at once. Presses held while a checkpoint is written reach the handler
    after the write, each with the time it came: one alone asks for the stop, two a grace apart
    during one long write are a second Ctrl-C. Presses are made by calling the handler installed,
    as a signal would, so each has a known time."""
    import signal as signals

    now = [0.0]
    grace = checkpointing.INTERRUPT_GRACE

    def press():
        signals.getsignal(signals.SIGINT)(signals.SIGINT, None)

    @contextlib.contextmanager
    def stop_request():
        now[0] = 0.0
        stop = checkpointing.StopRequest()
        stop.clock = lambda: now[0]
        stop.catch_interrupt()
        assert signals.getsignal(signals.SIGINT) == stop._interrupt
        try:
            yield stop
        finally:
            stop.restore()

    try:
        with stop_request() as stop:
            press()
            now[0] += 0.01
            press()  # the same press
            assert stop.agreed() == "SIGINT"
            now[0] += grace
            with pytest.raises(KeyboardInterrupt):
                press()

        with stop_request() as stop:
            with checkpointing.interrupt_after():
                press()  # held: the write goes on to its end
                written = True
            assert written and stop.agreed() == "SIGINT"  # then a stop, not KeyboardInterrupt
            now[0] += grace
            with pytest.raises(KeyboardInterrupt):
                press()

        with stop_request(), pytest.raises(KeyboardInterrupt):
            with checkpointing.interrupt_after():
                press()
                now[0] += grace
                press()  # the second Ctrl-C, during the same long write
                written = False
                now[0] += 10  # the write ends long after both
                written = True
        assert written

        assert signals.getsignal(signals.SIGINT) is signals.default_int_handler
        with pytest.raises(KeyboardInterrupt):  # no handler of its own: the default's KeyboardInterrupt
            with checkpointing.interrupt_after():
                os.kill(os.getpid(), signals.SIGINT)  # a real signal this time
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C that should have been held or counted as a stop request raised KeyboardInterrupt")


def test_the_first_ctrl_c_says_once_per_machine_what_a_second_one_does(monkeypatch, capfd):
    """Outside torchrun a second Ctrl-C stops at once; under torchrun, which passes Ctrl-C on once and ends
    its workers 30 s later, that is said instead, by local rank 0 alone."""
    torchrun = "torchrun ends the workers 30 s after its Ctrl-C"
    for env, said in (({}, "Ctrl-C again to stop at once"), ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0"}, torchrun),
                      ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "1"}, None)):
        for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capfd.readouterr()
        stop = checkpointing.StopRequest()
        stop.interrupt_at(0.0)
        assert stop.agreed() == "SIGINT"
        expected = f"\nCtrl-C: stopping after this step with a checkpoint ({said})\n" if said else ""
        assert capfd.readouterr().err == expected, env


def test_a_checkpoint_write_without_a_ctrl_c_calls_no_handler():
    import signal as signals

    called = []
    previous = signals.signal(signals.SIGINT, lambda signum, frame: called.append(signum))
    try:
        with checkpointing.interrupt_after():
            written = True
        assert written and called == []
        with checkpointing.interrupt_after():
            os.kill(os.getpid(), signals.SIGINT)
        assert called == [signals.SIGINT]  # the press held, handed on after the write
        signals.signal(signals.SIGINT, signals.default_int_handler)
        with checkpointing.interrupt_after():  # no KeyboardInterrupt without a press
            written = True
    finally:
        signals.signal(signals.SIGINT, previous)


def test_an_ignored_ctrl_c_stays_ignored():
    """A shell script's `train.py &` starts with SIGINT ignored: training does not start catching it."""
    import signal as signals

    previous = signals.signal(signals.SIGINT, signals.SIG_IGN)
    try:
        stop = checkpointing.StopRequest()
        stop.catch_interrupt()
        assert signals.getsignal(signals.SIGINT) == signals.SIG_IGN
        stop.restore()
        assert signals.getsignal(signals.SIGINT) == signals.SIG_IGN
        with checkpointing.interrupt_after():  # one held during a checkpoint write is dropped after it
            os.kill(os.getpid(), signals.SIGINT)
        assert signals.getsignal(signals.SIGINT) == signals.SIG_IGN
    finally:
        signals.signal(signals.SIGINT, previous)



def test_help_shows_each_default_once():
    """--help: a flag's default once, none for flags whose default is None or False (train.py's
    --num-classes said "(default: the dataset's class count) (default: None)"); 0 is shown."""
    from sit_fast.training.args import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: the dataset's class count)" in text and "--global-seed GLOBAL_SEED" in text
    assert "(default: 0)" in text  # --global-seed


@pytest.mark.parametrize("name", ["log.txt", "samples"])
def test_a_run_folders_log_or_grids_of_the_wrong_kind_are_refused_at_the_start(tmp_path, capsys, name):
    """EXP/log.txt a folder, or EXP/samples a file: one line before the run starts (a traceback at the
    start, or at the first grid after the first checkpoint)."""
    exp = tmp_path / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    os.makedirs(exp / name) if name == "log.txt" else (exp / name).write_text("")
    assert run_cli(BASE + ["--exp-dir", str(exp), "--max-steps", "2", "--sample-every", "1"]) == 2
    line, _ = the_error_line(capsys)
    kind, what = ("folder", "log") if name == "log.txt" else ("file", "sample grids")
    assert line == f"error: {exp / name} is a {kind}, where the run keeps its {what}: move it aside, or pass another " \
                   f"--exp-dir", line


def test_a_log_file_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """log.txt on a full disk: one warning on the console, not logging's traceback for each line (nor one
    from closing the file at the end, which hid the run's own last line); the run's lines stay on the
    console."""
    from sit_fast.training import loop

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = loop.LogFile._open
    monkeypatch.setattr(loop.LogFile, "_open", lambda self: (
        real_open(self).close(), io.TextIOWrapper(io.BufferedWriter(Full(), 64), encoding="utf-8"))[1])
    exp = str(tmp_path / "run")
    summary = train_main(BASE + ["--exp-dir", exp, "--max-steps", "4", "--log-every", "2", "--ckpt-every", "4"])
    err = capsys.readouterr().err
    assert summary["step"] == 4 and "Logging error" not in err and "Traceback" not in err, err
    assert err.count(f"warning: cannot write {os.path.join(exp, 'log.txt')} (No space left on device): the run's "
                     f"lines go to the console alone") == 1, err
    assert "(step=0000004) Train Loss" in err and "done: step 4" in err, err


def test_a_console_that_went_away_does_not_stop_the_run(tmp_path, monkeypatch):
    """stderr closed (train.py ... 2>&1 | head): the console line fails there only; the run goes on
    to its end, and log.txt has every line."""
    import io

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(logging, "raiseExceptions", False)  # logging's own stderr report is moot here
    monkeypatch.setattr(sys, "stderr", Closed())
    exp = str(tmp_path / "run")
    summary = train_main(BASE + ["--exp-dir", exp, "--max-steps", "4", "--log-every", "2", "--ckpt-every", "4"])
    monkeypatch.undo()
    assert summary["step"] == 4 and os.path.basename(summary["last_checkpoint"]) == "0000004.pt"
    with open(os.path.join(exp, "log.txt")) as f:
        log = f.read()
    assert "(step=0000002) Train Loss" in log, log
    # no grid drawn (--sample-every 100000): no folder of them is named
    assert log.rstrip().endswith(f"done: step 4, last checkpoint {summary['last_checkpoint']}; no sample grids, "
                                 f"this log in {os.path.join(exp, 'log.txt')}"), log
    exp = str(tmp_path / "grids")
    summary = train_main(BASE + ["--exp-dir", exp, "--max-steps", "2", "--sample-every", "2",
                                 "--num-sample-images", "2"])
    with open(os.path.join(exp, "log.txt")) as f:
        assert f.read().rstrip().endswith(f"last checkpoint {summary['last_checkpoint']}; sample grids in "
                                          f"{os.path.join(exp, 'samples')}, this log in {os.path.join(exp, 'log.txt')}")


def test_the_progress_bar_on_a_terminal_goes_from_the_resumed_step_with_the_log_lines_figures(tmp_path, monkeypatch):
    """On a terminal (stderr) a progress bar counts the run's steps from the step it resumed at, shows
    the last log line's loss and images/s, and the log lines are written above it on stderr."""
    import io

    import tqdm

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bars, written = [], []

    class Bar:
        def __init__(self, **kwargs):
            self.kwargs, self.updates, self.postfix = kwargs, 0, None
            bars.append(self)

        def update(self, n):
            self.updates += n

        def set_postfix(self, **fields):
            self.postfix = fields

        def close(self):
            pass

        @staticmethod
        def write(line, file=None):
            written.append((line, file))

    argv = [arg for arg in BASE if arg != "--no-progress"] + ["--exp-dir", str(tmp_path / "run"), "--log-every", "2"]
    train_main(argv + ["--max-steps", "2", "--no-progress"])
    terminal = Terminal()
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(sys, "stderr", terminal)
    summary = train_main(argv + ["--max-steps", "5", "--resume", "auto"])
    monkeypatch.undo()
    (bar,) = bars
    assert (bar.kwargs["total"], bar.kwargs["initial"], bar.updates) == (5, 2, 3)
    shown = {key: bar.postfix[key] for key in ("loss", "img_s")}
    assert shown == {"loss": f"{summary['loss']:.4f}", "img_s": f"{summary['images_per_sec']:.0f}"}
    assert any("(step=0000004) Train Loss" in line for line, _ in written)
    assert {file for _, file in written} == {terminal}


def test_an_unreadable_data_path_is_a_read_error_not_a_write_one(tmp_path, monkeypatch, capsys):
    """The latent cache turns a refused write into "cannot write ..."; a --data-path this user may not
    read (EACCES, as a write refused) is said to be unreadable."""
    from sit_fast import latent_cache

    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    fail_listing(monkeypatch, images, errno.EACCES)
    with pytest.raises(SystemExit):
        latent_cache.main(_cache_args(images, str(tmp_path / "vae"), str(tmp_path / "cache")))
    assert capsys.readouterr().err == f"error: cannot read --data-path {images} (Permission denied): make it readable\n"


def test_a_data_path_folder_that_cannot_be_listed_is_named_not_left_out(tmp_path, monkeypatch, capsys):
    """A class folder (or one under it) that cannot be listed, refused (EACCES) or failing (EIO), was left
    out unsaid by os.walk: its images dropped out of the dataset and of its fingerprint. One line naming
    the folder, why, and what to do; the latent cache, which reads the same list, says the same."""
    from sit_fast import latent_cache
    from sit_fast.data import DataError, find_images

    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    nested = os.path.join(images, "class0", "more")
    os.makedirs(nested)
    Image.new("RGB", (20, 20)).save(os.path.join(nested, "x.png"))
    assert len(find_images(images)[0]) == 5
    for folder, code, said in ((os.path.join(images, "class1"), errno.EACCES, "Permission denied: make it readable"),
                               (nested, errno.EIO, "Input/output error, EIO: fix the disk (the system log says "
                                                   "what failed)")):
        fail_listing(monkeypatch, folder, code)
        line = (f"cannot read the folder {folder} ({said.split(': ')[0]}), whose images would be left out: "
                f"{said.split(': ', 1)[1]}, or move it out of --data-path")
        with pytest.raises(DataError) as info:
            find_images(images)
        assert str(info.value) == line
        capsys.readouterr()
        with pytest.raises(SystemExit):
            latent_cache.main(_cache_args(images, str(tmp_path / "vae"), str(tmp_path / "cache")))
        assert capsys.readouterr().err == f"error: {line}\n"


def test_rng_state_round_trip_keeps_the_cuda_generator(monkeypatch):
    """A checkpoint's RNG state holds the CUDA generator's (x0 and t are drawn on the GPU there) and
    a resume sets it back, on the same device, with torch's, numpy's and Python's (torch.cuda's two
    calls stand in for a GPU here)."""
    import random

    from sit_fast.training.checkpointing import capture_rng_state, restore_rng_state

    device = torch.device("cuda", 1)
    saved_cuda, calls = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda dev: calls.append(("get", dev)) or saved_cuda.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, dev: calls.append(("set", state, dev)))
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    state = capture_rng_state(device)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(6), np.random.seed(6), random.seed(6)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert calls[0] == ("get", device) and calls[1][0] == "set" and calls[1][2] == device
    assert torch.equal(calls[1][1], saved_cuda)
    calls.clear()
    restore_rng_state(capture_rng_state(torch.device("cpu")), torch.device("cpu"))
    assert calls == []  # the CPU's checkpoints hold no CUDA state, and set none
    restore_rng_state(state, torch.device("cpu"))
    assert calls == []  # a GPU run's checkpoint resumed on the CPU: no CUDA state to set


def test_rng_state_round_trip_keeps_the_normal_draw_held_for_the_next_call():
    """Python's random.gauss and numpy's legacy normal draw two values at a time and hold the second:
    a resume gives that held value next, as the run would have."""
    import random

    from sit_fast.training.checkpointing import capture_rng_state, restore_rng_state

    cpu = torch.device("cpu")
    np.random.seed(5), random.seed(5)
    np.random.standard_normal(), random.gauss(0.0, 1.0), np.random.rand(3)  # a normal value held by each
    state = capture_rng_state(cpu)
    expected = np.random.standard_normal(4), [random.gauss(0.0, 1.0) for _ in range(3)]
    np.random.seed(6), random.seed(6)
    restore_rng_state(state, cpu)
    assert np.array_equal(np.random.standard_normal(4), expected[0])
    assert [random.gauss(0.0, 1.0) for _ in range(3)] == expected[1]


@pytest.mark.parametrize("flags, expected", [
    ([], ("Linear", "velocity", None, 0.0, None)),
    # upstream train.py's --train-eps 1e-5, where its create_transport does not replace it by 0
    (["--path-type", "GVP", "--prediction", "noise", "--loss-weight", "likelihood"],
     ("GVP", "noise", "likelihood", 1e-5, None)),
    (["--prediction", "score"], ("Linear", "score", None, 1e-5, None)),
    (["--path-type", "VP"], ("VP", "velocity", None, 1e-5, None)),
    (["--path-type", "VP", "--prediction", "score", "--loss-weight", "velocity", "--train-eps", "1e-3",
      "--sample-eps", "2e-3"], ("VP", "score", "velocity", 1e-3, 2e-3)),
])
def test_training_uses_the_transport_of_its_flags(tmp_path, flags, expected):
    """--path-type, --prediction, --loss-weight and the eps flags build the transport a train step
    minimises: its loss equals that of create_transport with the same settings on the same draws."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args
    from sit_fast.transport import create_transport

    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run")] + flags)
    trainer = loop.Trainer(args, explicit, init_distributed())
    reference = create_transport(*expected)
    x = torch.randn(8, trainer.channels, trainer.latent_size, trainer.latent_size)
    y = torch.randint(0, args.num_classes, (8,))
    losses = []
    for transport in (trainer.transport, reference):
        torch.manual_seed(3)
        with torch.no_grad():
            losses.append(transport.training_losses(trainer.model, x, dict(y=y))["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert (trainer.transport.train_eps, trainer.transport.sample_eps) == (reference.train_eps, reference.sample_eps)


def test_a_run_whose_checkpoint_left_train_eps_unresolved_resumes_with_what_it_trained_with(tmp_path):
    """A new run records upstream train.py's --train-eps (1e-5 for a Linear score model); a checkpoint
    recording None (runs begun before it was resolved) trained with create_transport's default for the
    path, 1e-3, and a resume keeps it."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args

    exp = tmp_path / "run"
    summary = train_main(BASE + ["--exp-dir", str(exp), "--prediction", "score", "--max-steps", "1",
                                 "--ckpt-every", "1"])
    ckpt = load_ckpt(summary["last_checkpoint"])
    assert ckpt["args"]["train_eps"] == 1e-5
    ckpt["args"]["train_eps"] = None
    torch.save(ckpt, summary["last_checkpoint"])
    args, explicit = parse_args(BASE + ["--exp-dir", str(exp), "--resume", "auto", "--max-steps", "2"])
    trainer = loop.Trainer(args, explicit, init_distributed())
    assert trainer.args.prediction == "score" and trainer.args.train_eps is None
    assert trainer.transport.train_eps == 1e-3
    loop.release_run_lock()


def test_each_rank_is_seeded_as_upstream_seeds_it(monkeypatch):
    """global_seed * world_size + rank, as upstream: rank 1 of 2 with --global-seed 3 draws from seed 7
    (the DDP runs here use seed 0, where global_seed + rank would pass as well)."""
    from sit_fast.distributed import DistInfo
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args

    class Seeded(Exception):
        pass

    seeds = []

    def record(seed):
        seeds.append(seed)
        raise Seeded  # the seed is what this test is after: setting up the rest is for the DDP tests

    monkeypatch.setattr(loop, "seed_everything", record)
    args, explicit = parse_args(["--dataset", "digits", "--model", "SiT-T/4", "--global-batch-size", "4",
                                 "--global-seed", "3", "--max-steps", "1", "--fused-kernels", "off"])
    trainer = loop.Trainer.__new__(loop.Trainer)  # _build_data alone: it runs no collective
    trainer.device = torch.device("cpu")
    trainer.dist_info = DistInfo(rank=1, world_size=2, local_rank=1, device=trainer.device, is_main=False)
    with pytest.raises(Seeded):
        trainer._build_data(args, explicit, None, None)
    assert seeds == [7]


@pytest.mark.parametrize("cfg", ["4", "0.5"])
def test_the_sample_grid_is_drawn_by_the_ema_with_the_null_label_for_guidance(tmp_path, monkeypatch, cfg):
    """save_samples' own guided batch (not the sampler's): every model call is the EMA's, its second
    half labelled num_classes (the null row); the grid is written. A scale below 1 guides too, as in
    sample.py."""
    from sit_fast.distributed import init_distributed
    from sit_fast.models import SiT
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "run"), "--cfg-scale", cfg,
                                        "--num-sample-images", "3", "--sample-steps", "2"])
    trainer = Trainer(args, explicit, init_distributed())
    calls, forward = [], SiT.forward

    def spy(self, x, t, y, *rest, **kwargs):
        calls.append((self, y.clone()))
        return forward(self, x, t, y, *rest, **kwargs)

    monkeypatch.setattr(SiT, "forward", spy)
    path = trainer.save_samples()
    assert path is not None and os.path.isfile(path) and len(calls) >= 2
    for model, y in calls:
        assert model is trainer.ema
        assert y.shape == (6,) and (y[3:] == 10).all() and (y[:3] < 10).all()


def test_every_sample_grid_is_the_emas_in_eval_mode_from_the_same_noise_and_labels(tmp_path, monkeypatch):
    """As upstream's train.py, which draws the grid's noise and labels once before the loop: grids of two
    steps from the same EMA are the same images, --num-sample-images of them (a guided batch's null half
    is not drawn), with and without guidance; every model call is the EMA's, in eval mode (no label
    dropout)."""
    from sit_fast import images
    from sit_fast.distributed import init_distributed
    from sit_fast.models import SiT
    from sit_fast.training.args import parse_args
    from sit_fast.training.loop import Trainer

    calls, forward = [], SiT.forward

    def spy(self, *args, **kwargs):
        calls.append((self, self.training))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SiT, "forward", spy)
    for cfg in ("1", "4"):
        args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / cfg), "--cfg-scale", cfg,
                                            "--num-sample-images", "3", "--sample-steps", "1"])
        trainer = Trainer(args, explicit, init_distributed())
        with torch.no_grad():  # the weights trained apart from the EMA, which alone draws
            for p in trainer.model_params:
                p.add_(torch.randn_like(p))
        grids, calls[:] = [], []
        monkeypatch.setattr(images, "save_image_grid", lambda grid, path, *a, **k: grids.append(grid) or str(path))
        trainer.save_samples()
        trainer.step = 7
        trainer.save_samples()
        assert len(grids) == 2 and grids[0].shape == (3, 1, 8, 8) and torch.equal(grids[0], grids[1]), cfg
        assert calls and all(model is trainer.ema and not training for model, training in calls), cfg


def test_a_data_path_folder_gone_meanwhile_is_left_out_not_said_unreadable(tmp_path, monkeypatch):
    """A folder removed while the walk lists its parent (ENOENT as it is listed) holds no images to leave out:
    the walk goes on without it, as it does for one whose folder_id is gone."""
    from sit_fast.data import find_images

    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    gone = os.path.join(images, "class0", "gone")
    os.makedirs(gone)
    fail_listing(monkeypatch, gone, errno.ENOENT)
    assert len(find_images(images)[0]) == 4


def test_an_image_gone_or_unreadable_is_named_with_the_fix_that_fits():
    """unreadable_image: an image the OS refuses says to make it readable, one gone says only to remove or
    replace it (putting back a file that is gone is its replacing), a damaged one (PIL's error) likewise."""
    from sit_fast.data import unreadable_image

    for err, said in ((PermissionError(errno.EACCES, "Permission denied"), "(Permission denied): make it readable, or "
                                                                           "remove or replace it"),
                      (FileNotFoundError(errno.ENOENT, "No such file or directory"),
                       "(No such file or directory, ENOENT): remove or replace it"),
                      (OSError("image file is truncated"), "(image file is truncated): remove or replace it")):
        assert str(unreadable_image("in/x.png", err)) == f"cannot read image in/x.png {said}"


def test_latent_cache_whose_out_cannot_be_listed_still_says_what_is_kept_on_a_stop(tmp_path, monkeypatch):
    """A stop, a second Ctrl-C or an out-of-memory line while --out cannot be listed (no count of its shards)
    says that the shards written are kept, not an empty phrase; a failed write's line says nothing of them."""
    from sit_fast import latent_cache

    out = str(tmp_path / "cache")
    os.makedirs(out)
    fail_listing(monkeypatch, out, errno.EIO, "listdir")
    assert latent_cache.shards_kept(out) == ("the shards written are kept", "the rest")
    assert latent_cache.again_words(out).startswith("interrupted again, stopping at once: the shards written are kept ")
    line = latent_cache.write_refused("x", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), out)
    assert str(line) == ("cannot write x (No space left on device): make room (or make the folder writable) and run "
                         "the same command again to encode the rest")


def test_latent_cache_tells_a_refused_read_from_a_refused_write(tmp_path):
    """refused_read: EACCES or EPERM on a folder (a listing) or on a path outside --out (every write of the
    build is in --out: an input's) is a read; on a file in --out, or with no path, a write; another errno
    is no refusal."""
    from sit_fast.latent_cache import refused_read

    out, images = tmp_path / "cache", tmp_path / "images"
    for folder in (out, images):
        folder.mkdir()
    (images / "x.png").write_bytes(b"")

    def refused(code, path):
        return refused_read(OSError(code, os.strerror(code), None if path is None else str(path)), str(out))

    assert refused(errno.EACCES, images / "x.png") and refused(errno.EPERM, images) and refused(errno.EACCES, out)
    assert not refused(errno.EACCES, out / "index.json") and not refused(errno.EPERM, None)
    assert not refused(errno.ENOSPC, images / "x.png")


def test_latent_cache_write_failing_otherwise_than_refused_is_said_a_write(tmp_path, monkeypatch, capsys):
    """An error of a write in --out that is no refusal (a failing disk's EIO removing an earlier build's
    index.json, a file gone meanwhile) was said "cannot read ...": a write, with its fix; --out's own
    listing, even with --out gone, stays a read."""
    from sit_fast import latent_cache
    from tests.test_vae import save_tiny_vae

    vae_dir = str(tmp_path / "vae")
    save_tiny_vae(vae_dir)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    out = str(tmp_path / "cache")
    index = os.path.join(out, "index.json")
    os.makedirs(out)
    with open(index, "w") as f:  # an earlier build's index, removed before encoding
        f.write("{}")
    real_remove = os.remove

    def failing_removal(path):
        if path == index:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real_remove(path)

    monkeypatch.setattr(os, "remove", failing_removal)
    with pytest.raises(SystemExit):
        cli_entry(latent_cache.main)(_cache_args(images, vae_dir, out))
    assert capsys.readouterr().err == (f"error: cannot write {index} (Input/output error, EIO): no shard was written "
                                       f"yet: fix the disk (the system log says what failed), or write onto another "
                                       f"filesystem and run the same command again to encode every image\n")

    def failed(code, path):
        return latent_cache.failed_write(OSError(code, os.strerror(code), str(path)), out)

    assert failed(errno.ENOENT, index) and failed(errno.EIO, os.path.join(out, ".shard-00000.pt.tmp-1"))
    assert not failed(errno.EIO, out) and not failed(errno.EIO, images) and not failed(errno.ENOENT, images + "/x")
    assert not latent_cache.failed_write(OSError(errno.ENOENT, "gone", str(tmp_path / "gone")), str(tmp_path / "gone"))


def test_latent_cache_os_error_naming_no_file_is_not_said_a_read_of_none(tmp_path, monkeypatch, capsys):
    """An OS error of no file (no path to name) that is no refused write is raised as it is, not said
    "cannot read None"."""
    from sit_fast import latent_cache

    own = OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(latent_cache, "build_cache", lambda args: (_ for _ in ()).throw(own))
    with pytest.raises(OSError) as raised:
        latent_cache.main(_cache_args(str(tmp_path / "images"), str(tmp_path / "vae"), str(tmp_path / "cache")))
    assert raised.value is own


def test_a_failed_run_keeps_the_stop_signals_caught_until_main_ends(tmp_path, monkeypatch):
    """A run whose step fails (under torchrun, a peer's end, which torchrun follows at once with a SIGTERM to
    every process) keeps the stop signals caught while main() says why: SIGTERM's default action ended the
    process that outlived the peer before its line. Ctrl-C's handler is put back as the step loop ends, the
    stop signals' as main() ends."""
    from sit_fast.training import loop

    def failing_step(self, batch):
        raise RuntimeError("a step that fails")

    seen = []
    real = loop.is_out_of_memory
    monkeypatch.setattr(loop.Trainer, "train_step", failing_step)
    monkeypatch.setattr(loop, "is_out_of_memory", lambda err: seen.append(
        (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))) or real(err))
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    with pytest.raises(RuntimeError, match="a step that fails"):
        train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "2"])
    assert len(seen) == 1 and seen[0][0] not in (signal.SIG_DFL, before[0]), seen  # caught: noted, not the end
    assert seen[0][1] == before[1], seen
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_run_puts_the_stop_signals_back_as_it_ends_unless_main_holds_them(tmp_path, monkeypatch):
    """Trainer.run called on its own (no main() to put them back later): failed, its handlers are put back as it
    ends. Under main(), a run that ends well puts them back too (the stop signals' default action, not a
    handler that notes a signal no step will read); only a failure keeps them caught until main() ends."""
    from sit_fast.distributed import init_distributed
    from sit_fast.training import loop
    from sit_fast.training.args import parse_args

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    real_step = loop.Trainer.train_step

    def failing_step(self, batch):
        raise RuntimeError("a step that fails")

    monkeypatch.setattr(loop.Trainer, "train_step", failing_step)
    args, explicit = parse_args(BASE + ["--exp-dir", str(tmp_path / "alone"), "--max-steps", "2"])
    trainer = loop.Trainer(args, explicit, init_distributed())
    try:
        with pytest.raises(RuntimeError, match="a step that fails"):
            trainer.run()
    finally:
        loop.release_run_lock()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    seen = []
    real_close = loop.Trainer.close_trackers
    monkeypatch.setattr(loop.Trainer, "close_trackers", lambda self, failed: seen.append(
        (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))) or real_close(self, failed))
    assert train_main(BASE + ["--exp-dir", str(tmp_path / "run"), "--max-steps", "1"])["step"] == 1
    assert seen == [before] and (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
