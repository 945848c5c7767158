"""Folders the command lines write into."""
from __future__ import annotations

import errno
import os
import tempfile

from sit_fast.errors import UserError

# A write failing so is the place's fault (full, over quota, read-only, not ours): the user's to fix.
WRITE_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def make_folder(path: str, flag: str) -> None:
    """os.makedirs(path), or a UserError naming `flag` (a file in the way, no permission, ...)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag}: {existing} is a file: pass a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag}: cannot create the folder {path} ({err.strerror or err}): pass a folder "
                        f"that can be written") from None


def make_writable_folder(path: str, flag: str) -> None:
    """make_folder(path), then a file created and removed in it: a folder the run cannot write into
    (read-only, no permission) is a UserError naming `flag` before any work, not a traceback after it."""
    make_folder(path, flag)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag}: cannot write into the folder {path} ({err.strerror or err}): pass a folder "
                        f"that can be written") from None
