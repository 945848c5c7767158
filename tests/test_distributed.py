"""The host-side exchanges of torchrun processes (sit_fast.distributed), with 2 gloo processes."""
import os
import socket
import tempfile
import time
from datetime import timedelta

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

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))
    info = init_distributed()  # joins the group made above, and makes the host group
    try:
        start = time.perf_counter()
        path = on_main(lambda: time.sleep(WORK_S) or "downloaded.pt", info)  # rank 0 downloads, rank 1 waits
        waited = time.perf_counter() - start
        if rank == 1:
            time.sleep(WORK_S)  # rank 1's last batch is slow: rank 0 waits at the barrier
        barrier()
        torch.save({"path": path, "waited": waited}, os.path.join(out_dir, f"rank{rank}.pt"))
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
