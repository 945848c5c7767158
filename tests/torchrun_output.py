"""What torchrun and its workers print by themselves, by torch release."""

from torch.distributed.elastic.multiprocessing.api import SubprocessContext

# Whether torchrun's summary lists the workers it stopped once one failed (SIGTERM: exit code 143) beside that
# one, as it does where its process context records them after stopping them (torch 2.11 and 2.14 do); before
# (torch 2.8, 2.9), it names the first failure alone, then "<NO_OTHER_FAILURES>".
LISTS_STOPPED_WORKERS = hasattr(SubprocessContext, "_capture_process_failures")


def says_the_others_were_stopped(stderr: str) -> bool:
    """Whether torchrun's summary in `stderr` is this torch's for a job whose other workers it stopped."""
    return "exitcode  : 143" in stderr if LISTS_STOPPED_WORKERS else "<NO_OTHER_FAILURES>" in stderr


def without_gloo_lines(stdout: str) -> str:
    """A worker's stdout less the lines Gloo prints there itself in torch 2.8 and 2.9 ("[Gloo] Rank 1 is
    connected to 1 peer ranks. ...")."""
    return "".join(line for line in stdout.splitlines(keepends=True) if not line.startswith("[Gloo] Rank "))
