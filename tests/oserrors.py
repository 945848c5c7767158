"""Folders that cannot be listed and files whose open waits, for the tests of what a run says of them."""
import contextlib
import os
import threading


def fail_listing(monkeypatch, folder, code: int, call: str = "scandir") -> None:
    """os.scandir (or os.listdir: `call`) raising the OSError of errno `code` for `folder` alone, as a folder
    another user keeps to himself, or a failing disk's, would (the tests run as root, whom chmod does not
    stop); any other path is listed as usual. Called again, the new folder and code replace the old."""
    real = getattr(os, call)
    real = getattr(real, "unpatched", real)
    folder = os.path.abspath(folder)

    def failing(path="."):
        if os.path.abspath(path) == folder:
            raise OSError(code, os.strerror(code), path)  # PermissionError for EACCES, FileNotFoundError for ENOENT
        return real(path)

    failing.unpatched = real
    monkeypatch.setattr(os, call, failing)


def errors_of_a_read_of_a_pipe(read, pipe, error_type) -> list[str]:
    """The messages of the `error_type` errors read() raises, run in a thread of its own: a read that opens
    the named pipe `pipe` waits for a writer, so after 10 s one is opened and closed to let it go on (the
    list then holds what it raised after, or nothing), rather than the test waiting for ever."""
    outcome = []

    def run():
        try:
            read()
        except error_type as err:
            outcome.append(str(err))

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # waiting in open: a writer's open and close let it go on
        with contextlib.suppress(OSError):  # ENXIO where no reader has it open
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(60)
    return outcome
