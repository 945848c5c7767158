"""Folders that cannot be listed, for the tests of what a run says of them."""
import os


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
