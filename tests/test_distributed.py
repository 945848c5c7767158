"""The host-side exchanges of torchrun processes (sit_fast.distributed), with 2 gloo processes."""
import os
import signal
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 2.0  # the default group's timeout here; rank 0's work below outlasts it
WORK_S = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slow_rank_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from sit_fast.distributed import barrier, cleanup, init_distributed, on_main

    # The store waits for both processes as long as their start takes (a busy machine: seconds), then holds
    # the default group's timeout, as the env:// rendezvous leaves it.
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))
    store.set_timeout(timedelta(seconds=DEFAULT_TIMEOUT_S))
    info = init_distributed()  # joins the group made above, and makes the host group
    try:
        start = time.perf_counter()
        path = on_main(lambda: time.sleep(WORK_S) or "downloaded.pt", info)  # rank 0 downloads, rank 1 waits
        waited = time.perf_counter() - start
        last_batch = os.path.join(out_dir, "rank1 done")
        if rank == 1:
            time.sleep(WORK_S)  # rank 1's last batch is slow: rank 0 waits at the barrier
            open(last_batch, "w").close()
        barrier()
        torch.save({"path": path, "waited": waited, "after rank 1": os.path.exists(last_batch)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def test_host_exchanges_outlast_the_default_groups_timeout():
    """Rank 0's work before on_main answers (a checkpoint download), and a slow rank before a barrier,
    may take longer than the process group's timeout (NCCL's is 10 minutes): the host-side exchanges
    wait for them."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_slow_rank_worker, args=(free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    assert [r["path"] for r in results] == ["downloaded.pt"] * 2
    assert results[1]["waited"] > DEFAULT_TIMEOUT_S  # rank 1 did wait past the default timeout
    assert results[0]["after rank 1"]  # rank 0 left the barrier after rank 1's last batch


def _shared_path_worker(rank: int, port: int, root: str) -> None:
    """Rank 0 uses ROOT/a; rank 1, case by case, the same folder, or ROOT/b: a folder of the same name
    on another node's own disk, empty, left by an earlier job, or where the token shows up late."""
    import contextlib
    import glob
    import shutil
    import threading
    from unittest import mock

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sit_fast.distributed import (SHARED_CHECK, check_same_file, check_shared_path, cleanup, gather_object,
                                      init_distributed)
    from sit_fast.errors import UserError

    info = init_distributed()
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    outcomes = {}
    # case: (rank 1 on another node: by host name, or by torchrun's node rank alone; the type of its
    # folder's filesystem there; seconds it may wait)
    cases = {"shared": (False, None, 30.0), "own disk": (False, None, 30.0),
             "left by an earlier job": (False, None, 30.0), "rank 0 cannot write": (False, None, 30.0),
             "shown late": ("host", "nfs4", 3.0), "not shown on another node": ("host", "nfs4", 1.0),
             "own disk of another node": ("host", "ext4", 30.0),
             "another node of the same host name": ("GROUP_RANK", "nfs4", 1.0)}
    try:
        for case, (elsewhere, fs_type, wait_s) in cases.items():
            folder = a if rank == 0 or case == "shared" else b
            if rank == 0 and case == "rank 0 cannot write":
                folder = os.path.join(root, "gone")
            late = None
            if rank == 1 and case == "left by an earlier job":
                open(os.path.join(b, SHARED_CHECK + "0123456789abcdef"), "w").close()
            if rank == 1 and case == "shown late":  # rank 0's file reaches rank 1's view of the folder later
                late = threading.Timer(1.0, lambda: [shutil.copy(f, b) for f in glob.glob(f"{a}/{SHARED_CHECK}*")])
                late.start()
            with contextlib.ExitStack() as stack:
                if elsewhere == "GROUP_RANK":  # torchrun's node rank tells the nodes apart
                    stack.enter_context(mock.patch.dict(os.environ, GROUP_RANK=str(rank)))
                if rank == 1 and elsewhere == "host":
                    stack.enter_context(mock.patch("socket.gethostname", return_value="node1"))
                if rank == 1 and elsewhere:
                    stack.enter_context(mock.patch("sit_fast.distributed.filesystem_type", return_value=fs_type))
                start = time.monotonic()
                try:
                    check_shared_path(folder, "--out x", info, wait_s=wait_s)
                    outcomes[case] = "ok"
                except UserError as err:
                    outcomes[case] = str(err)
                outcomes[case, "rank 1 waited (s)"] = gather_object(time.monotonic() - start)[1]
            if late is not None:
                late.join()
            if rank == 1:
                for f in glob.glob(f"{b}/{SHARED_CHECK}*"):
                    os.remove(f)
        if rank == 0:  # (rank 1 may look before rank 0 has removed it)
            outcomes["token left behind"] = bool(glob.glob(f"{a}/{SHARED_CHECK}*"))
        from sit_fast.distributed import on_main

        try:
            on_main(lambda: 1 / 0, info)  # not a UserError: rank 0 raises it, the others hear of it
        except UserError as err:
            outcomes["on_main"] = str(err) if rank else "rank 0 got a UserError"
        except ZeroDivisionError:  # on rank 0, what rank 1 should have been told
            outcomes["on_main"] = "rank 0 failed: ZeroDivisionError: division by zero" if rank == 0 else "raised"
        for case, name in (("same file", "same.pt"), ("another file", "other.pt"), ("no file", "none.pt")):
            try:
                check_same_file(os.path.join(a if rank == 0 or case == "same file" else b, name), "--resume", info)
                outcomes[case] = "ok"
            except UserError as err:
                outcomes[case] = str(err)
    finally:
        cleanup()
    torch.save(outcomes, os.path.join(root, f"rank{rank}.pt"))


def test_a_folder_on_each_nodes_own_disk_is_refused_on_every_rank():
    """check_shared_path and check_same_file: a folder every process sees passes; one of the same name
    on another node's own disk, empty or holding an earlier job's files, fails on every rank with the
    same message naming the rank that does not see it; a token a shared filesystem shows late passes."""
    with tempfile.TemporaryDirectory() as root:
        a, b = os.path.join(root, "a"), os.path.join(root, "b")
        os.makedirs(a)
        os.makedirs(b)
        torch.save({"weight": torch.zeros(4)}, os.path.join(a, "same.pt"))
        torch.save({"weight": torch.zeros(4)}, os.path.join(a, "other.pt"))
        torch.save({"weight": torch.ones(4)}, os.path.join(b, "other.pt"))  # same name and size, other values
        torch.save({"weight": torch.zeros(4)}, os.path.join(a, "none.pt"))  # none at rank 1's b/none.pt
        mp.spawn(_shared_path_worker, args=(free_port(), root), nprocs=2, join=True)
        results = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    outcomes = results[0]
    assert outcomes.pop("token left behind") is False
    assert outcomes == results[1]
    assert outcomes["shared"] == outcomes["shown late"] == outcomes["same file"] == "ok", outcomes
    assert outcomes["on_main"] == "rank 0 failed: ZeroDivisionError: division by zero"  # rank 1's line too
    for case, host in (("own disk", socket.gethostname()), ("left by an earlier job", socket.gethostname()),
                       ("not shown on another node", "node1"), ("own disk of another node", "node1")):
        assert outcomes[case].startswith(f"--out x: rank 1 (on {host}) does not see what rank 0 "
                                         f"wrote in {a} (a folder of that name on each node's own disk?)"), outcomes
    # Rank 1 waits for the file only on another node, and there only where it could show up late.
    waited = {key[0]: seconds for key, seconds in outcomes.items() if isinstance(key, tuple)}
    # (waits measured in seconds: "shown late" was found, "ok", long before the 30 s it may wait)
    assert waited["shown late"] >= 1.0 and waited["not shown on another node"] >= 1.0, waited
    assert waited["another node of the same host name"] >= 1.0, waited
    assert outcomes["another node of the same host name"].startswith(f"--out x: rank 1 (on {socket.gethostname()}) "
                                                                      "does not see"), outcomes
    assert all(waited[case] < 10.0
               for case in ("own disk", "left by an earlier job", "own disk of another node")), waited
    assert outcomes["rank 0 cannot write"] == (f"--out x: cannot write in {os.path.join(root, 'gone')} (No such file "
                                               f"or directory): make room, or make it writable")
    for case, name in (("another file", "other.pt"), ("no file", "none.pt")):
        assert outcomes[case].startswith(f"--resume: rank 1 (on {socket.gethostname()}) reads another file at "
                                         f"{os.path.join(a, name)} than rank 0 does, or none"), outcomes


def _node_fetch_worker(rank: int, port: int, root: str) -> None:
    """local_path_on_main_first where rank 0's file is not on rank 1's node and rank 1's own fetch
    fails (offline, say): the outcome of each rank into ROOT/rankN.txt."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sit_fast.distributed import cleanup, init_distributed, local_path_on_main_first
    from sit_fast.errors import UserError

    def fetch():
        if rank == 1:
            raise UserError("cannot download the release (offline)")
        return os.path.join(root, "on_node_0.pt")  # not there: as seen from another node

    info = init_distributed()
    try:
        outcome = local_path_on_main_first(fetch, info)
    except UserError as err:
        outcome = f"{type(err).__name__}: {err}"
    finally:
        cleanup()
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


def test_a_node_whose_own_fetch_fails_ends_every_rank_with_one_line():
    """Rank 1 looks for the release itself (rank 0's path is not on its node) and fails: rank 0 hears
    of it there, with rank 1's line (it went on alone, to meet the failure later as gloo's error)."""
    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_node_fetch_worker, args=(free_port(), root), nprocs=2, join=True)
        outcomes = [open(os.path.join(root, f"rank{r}.txt")).read() for r in range(2)]
    assert outcomes[1] == "UserError: cannot download the release (offline)", outcomes
    assert outcomes[0] == (f"PeerFailed: rank 1 (on {socket.gethostname()}) failed: cannot download the release "
                           f"(offline)"), outcomes


def test_filesystem_type_is_that_of_the_longest_mount_point_above_the_path(tmp_path):
    """filesystem_type reads the mount table: the deepest mount holding the path wins (of two on one
    point, the later), a mount point with a space in it (written \\040) is read back, optional fields
    before "-" are skipped."""
    from sit_fast.distributed import filesystem_type

    table = tmp_path / "mountinfo"
    table.write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
                     "40 22 0:50 / /shared rw,relatime shared:7 master:2 - nfs4 server:/export rw,vers=4.2\n"
                     "41 40 0:51 / /shared/scratch\\040space rw - lustre 10.0.0.1@tcp:/fs rw\n"
                     "42 22 0:52 / /sharedx rw - tmpfs tmpfs rw\n"
                     "43 22 8:2 / /scratch rw - xfs /dev/sdb1 rw\n"
                     "44 43 0:53 / /scratch rw - nfs4 server:/scratch rw\n")  # mounted over the xfs
    assert filesystem_type("/shared/runs/exp1", str(table)) == "nfs4"
    assert filesystem_type("/shared", str(table)) == "nfs4"
    assert filesystem_type("/shared/scratch space/a", str(table)) == "lustre"
    assert filesystem_type("/sharedx/a", str(table)) == "tmpfs"  # not under /shared
    assert filesystem_type("/sharedxy/a", str(table)) == "ext4"  # under neither /shared nor /sharedx
    assert filesystem_type("/home/me", str(table)) == "ext4"
    assert filesystem_type("/scratch/run", str(table)) == "nfs4"  # the later mount on a point is the one seen
    (tmp_path / "link").symlink_to("/shared/runs")
    assert filesystem_type(str(tmp_path / "link" / "exp1"), str(table)) == "nfs4"  # where a link leads
    assert filesystem_type("/home/me", str(tmp_path / "none")) is None  # no mount table (not Linux)


def test_more_processes_on_a_node_than_its_gpus_is_one_line(monkeypatch):
    """torchrun --nproc_per_node=8 on a node showing 4 GPUs put two processes on one GPU, which NCCL
    refuses with a traceback on every rank: refused first, in one line."""
    from sit_fast.distributed import init_distributed
    from sit_fast.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set before the check"))
    for name, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "5")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"^LOCAL_RANK 5 on a node whose processes see 4 GPUs: start at most 4 "
                                        r"processes per node \(torchrun --nproc_per_node=4\)$"):
        init_distributed()
    # A launcher that sets no LOCAL_RANK: rank 5 of a second 4-GPU node is that node's GPU 1
    monkeypatch.delenv("LOCAL_RANK")
    chosen = []

    class Chosen(Exception):  # stops before the NCCL group this machine cannot make
        pass

    def set_device(device):
        chosen.append(device)
        raise Chosen

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(Chosen):
        init_distributed()
    assert chosen == [torch.device("cuda", 1)]
    # A launcher that gives each process its own GPU (CUDA_VISIBLE_DEVICES) leaves one in sight: LOCAL_RANK 3
    # takes that one, GPU 0, rather than being refused as a fourth process on one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(Chosen):
        init_distributed()
    assert chosen[1:] == [torch.device("cuda", 0)]


def test_fingerprints_tell_apart_files_of_one_size_that_are_no_zip_archives(tmp_path):
    """Two .safetensors of one model at other steps have one size: the fingerprint of a file that is
    no zip archive was its size, so a node's stale copy passed for rank 0's."""
    from safetensors.torch import save_file

    from sit_fast.distributed import file_fingerprint

    for name, value in (("a", 0.0), ("b", 1.0), ("c", 0.0)):
        save_file({"w": torch.full((300_000,), value)}, str(tmp_path / f"{name}.safetensors"))
    a, b, c = (file_fingerprint(str(tmp_path / f"{n}.safetensors")) for n in "abc")
    assert a[0] == b[0] and a != b and a == c
    assert file_fingerprint(str(tmp_path / "missing")) is None


def test_the_main_process_is_global_rank_0_not_each_nodes_first(monkeypatch):
    """Rank 0 alone logs and writes: on a second node, local rank 0 is not the main process."""
    from sit_fast import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "host_group", lambda: None)
    for (rank, local), main in (((4, 0), False), ((0, 0), True)):
        for name, value in (("RANK", rank), ("WORLD_SIZE", 8), ("LOCAL_RANK", local)):
            monkeypatch.setenv(name, str(value))
        info = distributed.init_distributed()
        assert (info.rank, info.local_rank, info.world_size, info.is_main) == (rank, local, 8, main)


def test_local_rank_equal_to_the_gpu_count_is_refused(monkeypatch):
    """LOCAL_RANK 4 of 4 GPUs would share GPU 0 with LOCAL_RANK 0: refused before a device is set."""
    from sit_fast.distributed import init_distributed
    from sit_fast.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set {device} before the check"))
    for name, value in (("RANK", "4"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "4")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"^LOCAL_RANK 4 on a node whose processes see 4 GPUs"):
        init_distributed()


def test_on_main_tells_rank_0s_crash_from_its_user_error(monkeypatch):
    """The other ranks raise PeerFailed for rank 0's crash (torchrun names rank 0 as the root cause)
    and rank 0's own UserError for a user error (one line on every rank)."""
    from sit_fast import distributed
    from sit_fast.errors import PeerFailed, UserError

    other = distributed.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), is_main=False)

    def not_here():
        pytest.fail("fn runs on rank 0 only")

    monkeypatch.setattr(distributed, "broadcast_object",
                        lambda obj, src=0: (None, "rank 0 failed: ZeroDivisionError: division by zero", True))
    with pytest.raises(PeerFailed, match="^rank 0 failed: ZeroDivisionError"):
        distributed.on_main(not_here, other)
    monkeypatch.setattr(distributed, "broadcast_object",
                        lambda obj, src=0: (None, "--data-path x: no such folder", False))
    with pytest.raises(UserError, match="^--data-path x: no such folder$") as caught:
        distributed.on_main(not_here, other)
    assert type(caught.value) is UserError


def test_fingerprints_tell_apart_files_that_differ_only_past_their_first_blocks(tmp_path):
    from sit_fast.distributed import file_fingerprint

    head = os.urandom(1 << 20)
    (tmp_path / "a.bin").write_bytes(head + bytes(1 << 20))
    (tmp_path / "b.bin").write_bytes(head + b"\x01" * (1 << 20))
    assert file_fingerprint(str(tmp_path / "a.bin")) != file_fingerprint(str(tmp_path / "b.bin"))


def test_torchrun_variables_set_empty_or_in_part_are_a_single_process(monkeypatch):
    """RANK and WORLD_SIZE both make a torchrun process; an empty one (a launcher's `RANK=`) is unset,
    and RANK without WORLD_SIZE is no process group to join: one process, rank 0 of 1."""
    from sit_fast import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # a group would be joined as is
    monkeypatch.setattr(distributed, "host_group", lambda: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for values in ({"RANK": "", "WORLD_SIZE": "", "LOCAL_RANK": ""}, {"RANK": "3", "LOCAL_RANK": "1"}):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        info = distributed.init_distributed()
        assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True), values
        assert info.device == torch.device("cpu")


def test_a_process_group_left_and_joined_again_has_a_host_group_of_its_own(monkeypatch):
    """cleanup() forgets the host group with the process group: one joined again afterwards in the
    same process (a second run from one notebook) exchanges on a group of its own, not the gone one's."""
    from sit_fast import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    groups = []
    for _ in range(2):
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        info = distributed.init_distributed()
        try:
            assert info.world_size == 1 and distributed.is_distributed()
            groups.append(distributed.host_group())
            distributed.barrier()
            assert distributed.broadcast_object("x") == "x" and distributed.gather_object(5) == [5]
        finally:
            distributed.cleanup()
        assert not distributed.is_distributed() and distributed.host_group() is None
    assert groups[0] is not None and groups[1] is not None and groups[0] is not groups[1]


def test_gloos_words_for_a_peer_that_ended_are_told_from_other_errors():
    """Each of gloo's (and the store's) ways of saying another process ended is a peer's end, said in
    its first sentence, without gloo's source line or its advice; a timeout or another error is not."""
    from sit_fast.distributed import peer_ended, peer_failed

    ended = {
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:29500":
            "Connection closed by peer [10.0.0.2]:29500",
        "[gloo/transport/tcp/pair.cc:598] Connection reset by peer. This is typically caused by a remote worker "
        "crashing. Check the logs of the remote workers.": "Connection reset by peer",
        "remote process exited or there was a network error": "remote process exited or there was a network error",
        "[pair.cc:589] Read error [10.0.0.2]:29500: Failed to recv, got 0 bytes. Connection was likely closed.":
            "Read error [10.0.0.2]:29500: Failed to recv, got 0 bytes",
    }
    for text, words in ended.items():
        err = RuntimeError(text)
        assert peer_ended(err), text
        expected = f"another process of the job ended at step 7 ({words}); resume"
        assert str(peer_failed(err, " at step 7", "resume")) == expected
    assert not peer_ended(RuntimeError("[gloo] Timed out waiting 21600000ms for recv operation"))
    assert not peer_ended(ValueError("Connection closed by peer"))  # not gloo's


def test_failing_ranks_are_named_in_runs_per_host_and_counted_past_three_hosts():
    from sit_fast.distributed import _which

    assert _which([(3, "a")]) == "rank 3 (on a)"
    assert _which([(0, "a"), (1, "a"), (2, "a"), (5, "a")]) == "ranks 0-2, 5 (on a)"
    failing = [(r, "b") for r in range(8, 16)] + [(17, "c"), (19, "d"), (21, "d")] + [(r, "e") for r in range(40)]
    assert _which(failing) == "ranks 8-15 (on b), rank 17 (on c), ranks 19, 21 (on d) and 40 more"


def test_fingerprints_of_a_large_file_sample_all_of_it(tmp_path):
    """Two large files alike but for their last megabyte (a checkpoint's final tensors) differ."""
    from sit_fast.distributed import SAMPLED_BLOCKS, file_fingerprint

    head = os.urandom(SAMPLED_BLOCKS << 17)  # twice what SAMPLED_BLOCKS blocks of 64 KiB read
    (tmp_path / "a.bin").write_bytes(head + bytes(1 << 20))
    (tmp_path / "b.bin").write_bytes(head + b"\x01" * (1 << 20))
    a, b = file_fingerprint(str(tmp_path / "a.bin")), file_fingerprint(str(tmp_path / "b.bin"))
    assert a[0] == b[0] and a != b


def test_on_main_gives_rank_0s_user_error_to_every_rank_as_it_is(monkeypatch):
    """Rank 0's UserError goes to the others word for word (its message is the fix), and rank 0 raises
    it as a UserError too."""
    from sit_fast import distributed
    from sit_fast.errors import UserError

    main = distributed.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    sent = []
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: sent.append(obj) or obj)

    def fails():
        raise UserError("--data-path x: no such folder")

    with pytest.raises(UserError, match=r"^--data-path x: no such folder$") as caught:
        distributed.on_main(fails, main)
    assert type(caught.value) is UserError
    assert sent == [(None, "--data-path x: no such folder", False)]


def test_agree_names_the_failing_rank_with_its_error_on_one_line(monkeypatch):
    from sit_fast import distributed
    from sit_fast.errors import PeerFailed

    info = distributed.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    monkeypatch.setattr(distributed, "gather_object", lambda obj: [obj, (1, "b", "cannot read x.pt:\n  disk  error\n")])
    with pytest.raises(PeerFailed, match=r"^rank 1 \(on b\) failed: cannot read x.pt: disk error$"):
        distributed.agree(lambda: "fine here", info)
    monkeypatch.setattr(distributed, "gather_object", lambda obj: [obj, (1, "b", None)])
    assert distributed.agree(lambda: "fine here", info) == "fine here"
    # several failing: all named, with the lowest rank's error
    monkeypatch.setattr(distributed, "gather_object", lambda obj: [obj, (1, "b", "out of memory"), (2, "b", "other")])
    with pytest.raises(PeerFailed, match=r"^ranks 1-2 \(on b\) failed: out of memory$"):
        distributed.agree(lambda: "fine here", info)


def test_a_single_process_has_no_folder_to_share(tmp_path):
    """Without other processes there is nobody to see the folder otherwise: nothing is written in it
    (it may not exist yet)."""
    from sit_fast.distributed import DistInfo, check_same_file, check_shared_path, unshared_path

    alone = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    assert unshared_path(str(tmp_path / "not yet"), "--results-dir", alone) is None
    check_shared_path(str(tmp_path / "not yet"), "--results-dir", alone)
    check_same_file(str(tmp_path / "none.pt"), "--resume", alone)
    assert os.listdir(tmp_path) == []


def test_a_gpu_process_joins_the_nccl_group_on_its_own_gpu(monkeypatch):
    """On CUDA the process group is NCCL's, bound to the process's GPU (device_id), with torchrun's rank and
    world size."""
    from sit_fast import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "host_group", lambda: None)
    joined = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.device) == (3, 4, 1, torch.device("cuda", 1))
    assert joined == [{"backend": "nccl", "init_method": "env://", "rank": 3, "world_size": 4,
                       "device_id": torch.device("cuda", 1)}]


def test_every_host_side_exchange_runs_on_one_host_group_made_once(monkeypatch):
    """barrier, broadcast_object (from the rank given) and gather_object use the gloo group of HOST_TIMEOUT,
    made at the first exchange and kept."""
    from sit_fast import distributed

    made, calls = [], []
    monkeypatch.setattr(distributed, "_host_group", None)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kwargs: made.append(kwargs) or object())
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "barrier", lambda group: calls.append(("barrier", group)))
    monkeypatch.setattr(distributed.dist, "broadcast_object_list",
                        lambda box, src, group: calls.append(("broadcast", src, group)))

    def all_gather_object(box, obj, group):
        calls.append(("gather", group))
        box[:] = [obj, "theirs"]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    group = distributed.host_group()
    distributed.barrier()
    assert distributed.broadcast_object("x", src=1) == "x"
    assert distributed.gather_object("mine") == ["mine", "theirs"]
    assert distributed.host_group() is group
    assert made == [{"backend": "gloo", "timeout": distributed.HOST_TIMEOUT}]
    assert calls == [("barrier", group), ("broadcast", 1, group), ("gather", group)]


def test_a_release_is_fetched_once_by_rank_0_and_again_only_on_a_node_that_lacks_it(tmp_path, monkeypatch):
    """local_path_on_main_first: rank 0 runs fn once, whatever it returned; another rank takes rank 0's path
    where its node sees that file (a shared cache), and runs fn itself only where it does not."""
    from sit_fast import distributed

    monkeypatch.setattr(distributed, "gather_object", lambda obj: [obj])
    shared, elsewhere = tmp_path / "shared.pt", str(tmp_path / "on node 0 only.pt")
    shared.write_bytes(b"")
    calls = []

    def fetch(path):
        calls.append(path)
        return path

    main = distributed.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: obj)
    assert distributed.local_path_on_main_first(lambda: fetch(elsewhere), main) == elsewhere
    assert calls == [elsewhere]
    other = distributed.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), is_main=False)
    for rank_0s, own in ((str(shared), None), (elsewhere, str(tmp_path / "own.pt"))):
        calls.clear()
        monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0, path=rank_0s: (path, None, False))
        assert distributed.local_path_on_main_first(lambda: fetch(own), other) == (own or rank_0s)
        assert calls == ([] if own is None else [own])


def test_a_process_on_rank_0s_node_that_does_not_see_its_file_says_so_at_once_and_writes_nothing(tmp_path,
                                                                                                  monkeypatch):
    """On rank 0's node the file rank 0 made is there at once, on any filesystem: a process there that does
    not see it does not wait for it, and no process but rank 0 writes in the folder."""
    from sit_fast import distributed
    from sit_fast.errors import UserError

    other = distributed.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), is_main=False)
    listed = []
    monkeypatch.setattr(distributed, "node_id", lambda: "node 0")
    monkeypatch.setattr(distributed, "filesystem_type", lambda folder: "nfs4")
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: listed.append(os.listdir(tmp_path)) or (
        distributed.SHARED_CHECK + "0123456789abcdef", str(tmp_path), "node 0", None))
    monkeypatch.setattr(distributed, "gather_object", lambda obj: [(0, "a", True), obj])
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: pytest.fail("waited on rank 0's node"))
    with pytest.raises(UserError) as caught:
        distributed.check_shared_path(str(tmp_path), "--out x", other, wait_s=30.0)
    assert str(caught.value) == (f"--out x: rank 1 (on {socket.gethostname()}) does not see what rank 0 wrote in "
                                 f"{tmp_path} (a folder of that name on each node's own disk?): pass one on a "
                                 f"filesystem every node shares")
    assert listed == [[]] and os.listdir(tmp_path) == []


def test_fingerprints_of_a_file_of_up_to_32_blocks_read_every_byte(tmp_path):
    """A file of at most SAMPLED_BLOCKS blocks of 64 KiB is read whole: one byte changed anywhere in it, the
    last included, changes its fingerprint."""
    from sit_fast.distributed import SAMPLED_BLOCKS, file_fingerprint

    for size in (1000, SAMPLED_BLOCKS << 16):
        data = bytearray(os.urandom(size))
        (tmp_path / "a.bin").write_bytes(data)
        for where in (size // 3, size - 1):
            changed = bytearray(data)
            changed[where] ^= 1
            (tmp_path / "b.bin").write_bytes(changed)
            assert file_fingerprint(str(tmp_path / "a.bin")) != file_fingerprint(str(tmp_path / "b.bin")), (size, where)


def test_ctrl_c_while_waiting_for_the_other_processes_ends_the_process_at_once():
    """A launcher other than torchrun (srun, RANK and WORLD_SIZE set by hand) with a peer that never comes:
    Ctrl-C during the wait ends the process at once, by SIGINT's default action, with no traceback (the
    store's wait runs in C++, where Python's handler would have run only once the peer came)."""
    import signal
    import subprocess
    import sys

    # 'waiting' once the block is entered (not before: a signal then, on a loaded machine still in imports, would
    # be Python's KeyboardInterrupt, a traceback this test is not about)
    code = ("import contextlib; from sit_fast import distributed\n"
            "entered = distributed.interrupt_ends_at_once\n"
            "@contextlib.contextmanager\n"
            "def noted():\n"
            "    with entered():\n"
            "        print('waiting', flush=True); yield\n"
            "distributed.interrupt_ends_at_once = noted; distributed.init_distributed()\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "waiting\n"
        time.sleep(0.5)  # into the store's wait
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT and "Traceback" not in stderr, (proc.returncode, stderr[-2000:])


def test_the_lowest_process_still_running_on_rank_0s_node_speaks_in_its_place(tmp_path, monkeypatch):
    """torchrun stops the other processes (SIGTERM) once one has ended: where rank 0, which says what
    stopped the job, was killed, the lowest process still running on its node says it, naming it, once;
    not where rank 0 (or one before it in its place) said it before it ended, nor on another node."""
    import signal
    import subprocess
    import sys

    from sit_fast import distributed
    from sit_fast.interrupts import Stopped

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # an ended process's id
    running = os.getpid()
    host = socket.gethostname()
    attempt = tmp_path / "run" / "attempt_0"
    for local_rank in range(4):
        (attempt / str(local_rank)).mkdir(parents=True)
    monkeypatch.setattr(distributed, "PEER_SEEN_ENDED_S", 0.0)

    def joined(rank, pids, local_rank_of=lambda rank: rank, nodes=None):
        monkeypatch.setattr(distributed, "_joined", [((nodes or {}).get(r, "node 0"), host, local_rank_of(r), pid)
                                                     for r, pid in enumerate(pids)])
        monkeypatch.setattr(distributed, "_rank", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / str(local_rank_of(rank)) / "error.json"))

    stop = Stopped(signal.SIGTERM)
    joined(1, [gone.pid, running, running])  # rank 0 killed
    assert distributed.speaks_for() == [0] and distributed.speaks_for(per_node=True) == [0]
    assert distributed.stop_words(stop) == (f"rank 0 (on {host}) ended (its node's torchrun summary says how), and "
                                            f"the others were stopped by SIGTERM")
    assert distributed.ended_here() == [0]
    assert str(distributed.peer_failed(RuntimeError("Connection closed by peer [127.0.0.1]:29500"), " at step 7",
                                       "resume")) == (f"rank 0 (on {host}) ended at step 7 (Connection closed by "
                                                      f"peer [127.0.0.1]:29500); resume")
    joined(2, [gone.pid, running, running])  # rank 1 speaks, not 2
    assert distributed.speaks_for() is None and distributed.stop_words(stop) is None
    joined(2, [gone.pid, gone.pid, running])  # rank 1 ended too, having said it (its stop_words above)
    assert (attempt / "1" / distributed.SAID).exists() and distributed.speaks_for() is None
    (attempt / "1" / distributed.SAID).unlink()  # ... or without a word (or its work done): rank 2 speaks
    assert distributed.stop_words(stop).startswith(f"rank 0 (on {host}) ended (its")  # rank 0's end alone
    (attempt / "2" / distributed.SAID).unlink()
    joined(1, [gone.pid, running, running])
    (attempt / "0" / distributed.SAID).touch()  # rank 0 said what stopped it, then ended
    assert distributed.speaks_for() is None and distributed.stop_words(stop) is None
    (attempt / "0" / distributed.SAID).unlink()
    joined(1, [running, running])  # rank 0 still running: it says it
    assert distributed.speaks_for() is None and distributed.ended_here() == []
    joined(0, [running, running])
    assert distributed.stop_words(stop) == "stopped by SIGTERM"
    assert (attempt / "0" / distributed.SAID).exists()  # word for the others
    # Two nodes, rank 0 killed on node 0: its local rank 1 speaks; on node 1, local rank 0 for its node only
    nodes = {2: "node 1", 3: "node 1"}
    joined(3, [gone.pid, running, running, running], lambda rank: rank % 2, nodes)
    assert distributed.speaks_for() is None and distributed.speaks_for(per_node=True) is None
    joined(2, [gone.pid, running, running, running], lambda rank: rank % 2, nodes)
    assert distributed.speaks_for() is None and distributed.speaks_for(per_node=True) == []
    # Not under torchrun (no error file to leave word beside): as before, rank 0's line or none
    joined(1, [gone.pid, running])
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    assert distributed.speaks_for() is None
    monkeypatch.setattr(distributed, "_joined", [])  # no process group: rank 0 speaks
    monkeypatch.setenv("RANK", "0")
    assert distributed.speaks_for() == [] and distributed.stop_words(KeyboardInterrupt()) == "interrupted"


def test_a_stop_signal_while_the_peer_failed_line_waits_is_noted_on_it_not_raised(monkeypatch):
    """peer_failed waits a moment for the ended process to be seen: torchrun's SIGTERM then (it ends
    every process once one has) is noted on the error, which cli_entry takes as the signal it waits
    for; raised, it escaped the caller's `except` of gloo's error as a stop, in place of the line."""
    import threading
    import time

    from sit_fast import distributed
    from sit_fast.interrupts import stop_signals_raise

    host = socket.gethostname()
    monkeypatch.setattr(distributed, "_joined", [("node 0", host, 0, os.getpid()), ("node 1", host, 0, os.getpid())])
    monkeypatch.setattr(distributed, "_rank", 1)  # rank 0 on another node: its end is not seen from here
    monkeypatch.setattr(distributed, "PEER_SEEN_ENDED_S", 30.0)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    with stop_signals_raise():
        start = time.monotonic()
        timer.start()
        try:
            failed = distributed.peer_failed(RuntimeError("Connection closed by peer [127.0.0.1]:29500"))
        finally:
            timer.cancel()
        took = time.monotonic() - start
    assert failed.stop_noted and 0.1 < took < 25, took  # cut short by the signal, not the 30 s wait's end
    assert str(failed) == ("another process of the job ended (Connection closed by peer [127.0.0.1]:29500); its "
                           "error is in the torchrun summary of its node")
    monkeypatch.setattr(distributed, "PEER_SEEN_ENDED_S", 0.1)
    without_stop = distributed.peer_failed(RuntimeError("Connection closed by peer"))
    assert not without_stop.stop_noted


FETCH_S = 2.0  # how long a fetch takes below: a second process of the node starting one meanwhile would miss the file


def _node_cache_worker(rank: int, port: int, root: str) -> None:
    """local_path_on_main_first with rank 0 on node 0 and ranks 1-2 on node 1, each node's cache a relative path
    from a folder of its own (ROOT/nodeN, as a node's own disk): each fetch that finds nothing in its node's
    cache leaves ROOT/fetched-RANK."""
    node, local_rank = (0, 0) if rank == 0 else (1, rank - 1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(local_rank), GROUP_RANK=str(node),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sit_fast.distributed import cleanup, init_distributed, local_path_on_main_first

    os.makedirs(os.path.join(root, f"node{node}"), exist_ok=True)
    os.chdir(os.path.join(root, f"node{node}"))
    cache = os.path.join("cache", "release.pt")

    def fetch():
        if not os.path.exists(cache):  # a download into this node's cache
            open(os.path.join(root, f"fetched-{rank}"), "w").close()
            time.sleep(FETCH_S)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            open(cache, "w").close()
        return cache

    info = init_distributed()
    try:
        path = local_path_on_main_first(fetch, info)
    finally:
        cleanup()
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(path)


def test_a_node_without_rank_0s_file_fetches_its_own_once():
    """A node whose cache lacks rank 0's file (its own disk) fetches the file once, by its first process;
    its other processes find it there then, rather than each downloading it at the same time."""
    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_node_cache_worker, args=(free_port(), root), nprocs=3, join=True)
        fetched = sorted(name for name in os.listdir(root) if name.startswith("fetched-"))
        paths = [open(os.path.join(root, f"rank{r}.txt")).read() for r in range(3)]
    assert fetched == ["fetched-0", "fetched-1"], fetched
    assert paths == [os.path.join("cache", "release.pt")] * 3


def test_each_node_without_rank_0s_file_has_its_own_first_process_fetch_it(monkeypatch, tmp_path):
    """Two nodes lacking rank 0's file (each its own disk): on each, the node's first process that lacks it
    fetches it in the first round, and the node's others only after, finding it there; not only the job's
    first such process, which would leave the other node's processes all fetching at once."""
    from sit_fast import distributed
    from sit_fast.distributed import DistInfo

    cache = str(tmp_path / "cache" / "release.pt")  # not on these nodes
    seen = [(0, "node 0", False), (1, "node 1", True), (2, "node 2", True), (3, "node 2", True)]
    monkeypatch.setattr(distributed, "on_main", lambda fn, info: cache)
    monkeypatch.setattr(distributed, "gather_object", lambda obj: seen)
    monkeypatch.setattr(distributed, "node_id", lambda: "node 2")
    for rank, fetched_in in ((2, [1]), (3, [2])):
        rounds, fetches = [], []

        def agree(fn, info):
            rounds.append(fn)
            return fn()

        def fetch():
            fetches.append(len(rounds))
            return cache

        monkeypatch.setattr(distributed, "agree", agree)
        info = DistInfo(rank=rank, world_size=4, local_rank=rank - 2, device=torch.device("cpu"), is_main=False)
        assert distributed.local_path_on_main_first(fetch, info) == cache
        assert fetches == fetched_in, (rank, fetches)


def test_the_main_process_takes_a_heartbeat_stopped_without_a_done_mark_as_an_end(monkeypatch):
    """Liveness, read by rank 0 while it polls for the others' results: a rank whose count in the store has
    not moved for PEER_SILENT_S is named as ended, unless it left its done mark (heartbeat's done); a count
    that moves again is alive again; a store that cannot be reached (its host gone) is an end too. The
    heartbeat's thread is joined at its block's end."""
    import threading

    import torch.distributed as dist

    from sit_fast import distributed
    from sit_fast.distributed import DistInfo

    store = dist.HashStore()
    monkeypatch.setattr(distributed, "_store", lambda: store)
    monkeypatch.setattr(distributed, "PEER_SILENT_S", 0.2)
    # The block's end joins the heartbeat's thread for at most HEARTBEAT_S: long enough for the thread, woken,
    # to end on a loaded machine (10 ms was not, now and then)
    monkeypatch.setattr(distributed, "HEARTBEAT_S", 0.5)
    info = {r: DistInfo(rank=r, world_size=3, local_rank=r, device=torch.device("cpu"), is_main=r == 0)
            for r in range(3)}
    alive = distributed.Liveness(info[0])
    with distributed.heartbeat(info[1]) as done:  # rank 1 beats, then finishes its share
        while store.add("sit_fast/heartbeat/1", 0) < 3:
            time.sleep(0.05)
        done()
    assert "heartbeat" not in [thread.name for thread in threading.enumerate()]
    with distributed.heartbeat(info[0]) as done:  # the main process: no heartbeat
        done()
    assert store.add("sit_fast/heartbeat/0", 0) == 0 and store.add("sit_fast/done/0", 0) == 0
    assert alive.ended() is None  # the first look
    time.sleep(0.3)
    said = "rank 2 ended without a word (no heartbeat for 0.2 s: killed, or its node lost?)"
    assert alive.ended() == said  # rank 1, silent too, left its done mark
    store.add("sit_fast/heartbeat/2", 1)
    assert alive.ended() is None
    time.sleep(0.3)
    assert alive.ended() == said

    class Gone:
        def add(self, key, amount):
            raise RuntimeError("[../third_party/gloo/tcp/pair.cc:534] Connection reset by peer. This is typical...")

    monkeypatch.setattr(distributed, "_store", lambda: Gone())
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)  # a thread's error, said on stderr
    assert distributed.Liveness(info[0]).ended() == ("the job's store (torchrun's, on the rendezvous endpoint's "
                                                     "node) cannot be reached (Connection reset by peer)")
    with distributed.heartbeat(info[1]) as done:  # a rank whose store is gone: its thread ends, quietly
        done()
    assert not raised, raised
    assert distributed.Liveness(info[0]).left == [1, 2]
    assert distributed.Liveness(DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                         is_main=True)).ended() is None
