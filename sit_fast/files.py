"""Folders the command lines write into, and files written whole or not at all (atomic_write)."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time

from sit_fast.errors import UserError, amount

# A write failing so is the place's fault (full, over quota, read-only, not ours, past a file size limit): the
# user's to fix.
WRITE_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def hidden_name(name: str, suffix: str) -> str:
    """.NAME + suffix, a file beside NAME (a temporary file, a lock), NAME shortened where the whole would
    pass a name's 255 bytes (which NAME itself fits)."""
    while len(os.fsencode(f".{name}{suffix}")) > 255 and name:
        name = name[:-1]
    return f".{name}{suffix}"


def refusal(err: OSError) -> str:
    """Why a write (or a read) failed, for a message: the filesystem's own words; for a file grown past a size limit,
    which limits there are ("File too large" alone says neither); for an error that is not a refusal (not
    of WRITE_REFUSED: a failing disk's EIO, say), its errno's name too."""
    said = err.strerror or (os.strerror(err.errno) if err.errno is not None else str(err))
    if err.errno == errno.EFBIG:
        return f"{said}: past the file size limit of the process (`ulimit -f`) or of the filesystem (FAT32's 4 GiB)"
    if err.errno is not None and err.errno not in WRITE_REFUSED and (code := errno.errorcode.get(err.errno)):
        return f"{said}, {code}"
    return said


def make_room(err: OSError) -> str:
    """What lets a failed write succeed, for a message: room or permission for a write the filesystem
    refused (an error of WRITE_REFUSED), a disk mended (or another) for one that failed otherwise (EIO)."""
    if err.errno == errno.EFBIG:
        return "raise the file size limit (or write onto another filesystem)"
    if err.errno in WRITE_REFUSED:
        return "make room (or make the folder writable)"
    return "fix the disk (the system log says what failed), or write onto another filesystem"


def write_failed(path: str, err: OSError, kept: str, again: str) -> UserError:
    """The one line for an output that could not be written (any OSError of a write: refused, or a
    failing disk's): the file, why (refusal), what is kept (`kept`: "the 3 images written are kept",
    "nothing was written yet"; "" for nothing to say), what to do (make_room), then `again` ("run the
    same command again"). An OSError without an errno (not the OS's word: a library's own) is raised
    itself, as a fault of the program."""
    return _failed("write", path, err, kept, make_room, again)


def _failed(verb: str, path: str, err: OSError, kept: str, fix, again: str) -> UserError:
    """write_failed's and read_failed's line: "cannot VERB PATH (why): KEPT: FIX and AGAIN" (fix: the
    function that says it for err); err itself raised where it has no errno."""
    if err.errno is None:
        raise err
    return UserError(f"cannot {verb} {path} ({refusal(err)}): {f'{kept}: ' if kept else ''}{fix(err)} and {again}")


def read_fix(err: OSError) -> str:
    """What lets a failed read succeed, for a message: permission for one refused, the file for one gone,
    a disk mended for one that failed otherwise (EIO)."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return "make it readable"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return "put it back"
    return "fix the disk (the system log says what failed)"


def read_failed(path: str, err: OSError, kept: str, again: str) -> UserError:
    """The one line for an input that could not be read (write_failed's for a read): the file, why
    (refusal), what is kept (`kept`; "" for nothing to say), what to do (read_fix), then `again`. An
    OSError without an errno (a library's own) is raised itself, as a fault of the program."""
    return _failed("read", path, err, kept, read_fix, again)


def written_kept(count: int, noun: str, nouns: str | None = None) -> str:
    """What a failed write leaves, for write_failed: "the 3 images written are kept", "the 1 image
    written is kept" (nouns: the plural, where not noun + "s"), or, before the first, "nothing was
    written yet"."""
    if not count:
        return "nothing was written yet"
    return f"the {count} {noun if count == 1 else nouns or noun + 's'} written {'is' if count == 1 else 'are'} kept"


def is_inside(path: str, folder: str, resolved: bool = False) -> bool:
    """Whether `path` is `folder` or lies under it, both taken as they are on disk (links resolved;
    resolved: both are already, as os.path.realpath gives them)."""
    if not resolved:
        path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def make_folder(path: str, flag: str) -> None:
    """os.makedirs(path), or a UserError naming `flag` (a file in the way, no permission, ...)."""
    missing = first_missing_folder(path)
    existing = os.path.dirname(missing) if missing is not None else os.path.abspath(path)
    if not os.path.isdir(existing):
        kind = "a file" if os.path.isfile(existing) else "not a folder"
        raise UserError(f"{flag}: {existing} is {kind}: pass a folder")
    if missing is not None and os.path.islink(missing):  # there, yet leading nowhere: makedirs says "File exists"
        raise UserError(f"{flag}: {broken_link(missing)}: pass a folder, or make the link lead to one")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        failed = err.filename or path  # the folder that could not be made: `path` or a parent of it
        raise UserError(f"{flag}: cannot create the folder {failed} ({err.strerror or err}): pass a folder "
                        f"that can be written") from None


def broken_link(path: str) -> str:
    """What is wrong with the link `path`, which leads to nothing: a loop, a target not there, or one
    that cannot be reached (a folder on its way without permission)."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path} is a link in a loop of links"
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"{path} is a link to {os.readlink(path)}, which cannot be reached ({err.strerror})"
    return f"{path} is a link to {os.readlink(path)}, which does not exist"


def first_missing_folder(path: str) -> str | None:
    """The outermost of `path` and its parents that does not exist yet (what os.makedirs(path) would
    create first), or None when `path` exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path, missing = os.path.dirname(path), path
    return missing


def remove_empty_folders(path: str, up_to: str) -> None:
    """Remove `path`, then its parents up to and including `up_to`, for as long as each is empty (the
    folders a run created and left nothing in)."""
    path, up_to = os.path.abspath(path), os.path.abspath(up_to)
    while path == up_to or path.startswith(up_to + os.sep):
        try:
            os.rmdir(path)
        except OSError:  # not empty, or gone already
            if os.path.exists(path):
                return
        path = os.path.dirname(path)


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


def atomic_torch_save(obj, path: str) -> None:
    """torch.save(obj) onto `path` by atomic_write. A failed write (a full disk) raises its OSError,
    and a stop signal's handler raising in a write (Stopped, Ctrl-C's KeyboardInterrupt) that stop,
    which torch.save's writer would turn into a RuntimeError that names only its own position."""
    import torch

    def save(f):
        stream = _KeepWriteError(f)
        try:
            torch.save(obj, stream)
        except RuntimeError as err:
            if stream.error is not None:
                raise stream.error from None
            if isinstance(err.__context__, KeyboardInterrupt):  # the handler ran as write() was entered, before its try
                raise err.__context__ from None
            raise

    atomic_write(path, save)


class _KeepWriteError:
    """A file whose write keeps the exception it raises (for atomic_torch_save): an OSError, or a stop
    signal's, which its handler raises where the main thread is."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as err:
            self.error = err
            raise

    def __getattr__(self, name):  # flush, tell, ...: the file's own
        return getattr(self.f, name)


def atomic_write(path: str, write) -> None:
    """write(f) to a temporary file in the same directory, fsync, then os.replace onto `path`.

    A crash at any point leaves either the old file or the complete new one, never a partial file
    under `path`; the temporary file is removed when the write fails, and an OS error that names no
    file (a full disk) is given `path`. A file replaced keeps its permission bits (one made private
    stays private); a new one has the umask's. A symbolic link at `path` is written through: the file
    it names gets the new contents (in that file's folder), and the link stays.
    """
    if os.path.islink(path):  # os.replace onto the link would put a file in its place, the target left stale
        path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # unfinished_writes does not name a leftover whose name was shortened
    tmp = os.path.join(directory, hidden_name(os.path.basename(path), f".tmp-{os.getpid()}"))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:  # a new file
            pass
        os.replace(tmp, path)
    except BaseException as err:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:  # a failing disk: the write's own error is the one to say (unfinished_writes finds it)
            pass
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            err.filename = path  # a failed write (a full disk) names no file, or the temporary one: this one
        raise
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unfinished_writes(folder: str, name: str, what: str, by: str, lock: FolderLock | None = None) -> str | None:
    """A line naming the temporary files of atomic_write that a writer killed mid-write left in
    `folder` (hidden `.<final name>.tmp-PID` files; `name`: a regex of the final names), with their
    size, or None. They are never read, only their space is lost. Where `lock` is held (the lock of
    the job whose outputs they are, taken before its work begins: no other job writes them now, and
    this one has not started) they are removed, and the line says so; otherwise they are kept, since
    another process may be writing one now, and the line is a warning. what: "checkpoint", "shard";
    by: who was killed ("a run")."""
    if not os.path.isdir(folder):
        return None
    pattern = re.compile(rf"\.{name}\.tmp-\d+")
    names = sorted(n for n in os.listdir(folder) if pattern.fullmatch(n))
    if not names:
        return None

    def writes(names: list[str]) -> str:
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n)))
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{len(names)} unfinished {what} write{'s' if len(names) > 1 else ''} ({listed}; {amount(size)})"

    if lock is not None and lock.fd is not None:
        removed = writes(names)
        try:
            for n in names:
                os.remove(os.path.join(folder, n))
            return f"removed {removed} from {folder}, left by {by} killed while writing"
        except OSError:  # a read-only folder, say: those left named for the user to delete, as without the lock
            names = [n for n in names if os.path.lexists(os.path.join(folder, n))]
    return (f"{folder} holds {writes(names)}, left by {by} killed while writing: delete them unless another run is "
            f"writing there now")


class FolderLock:
    """An exclusive lock on a folder a job writes its outputs into (the FID job's PNGs, the latent
    cache's shards), so that a second job started on the same folder is refused instead of mixing its
    outputs, and its settings record, with the first one's. The lock is flock(2) on FOLDER/.lock,
    which the kernel drops when the process ends, however it ends; a file system that cannot lock
    (some network mounts) costs the check, with a warning, not the job. acquire() once the folder
    exists; release() when the job is done (a no-op when not held), or release_all() for every lock
    this process holds; `with FolderLock(...) as lock:` releases it when the block ends."""

    NAME = ".lock"
    _held: set[FolderLock] = set()

    def __init__(self, folder: str, flag: str):
        self.folder, self.flag = folder, flag
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, wait: bool = False) -> None:
        """wait: wait for the holder to let go, not refuse (a lock held for moments only)."""
        if self.fd is not None:  # held already
            return
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return
        path = self.lock_path()
        looks = BUSY_LOOKS
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"{self.flag} {self.target()}: cannot write {path} ({err.strerror or err}): pass a "
                                f"folder that can be written") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                busy = err.errno in _BUSY
                holder = _holder(fd, path) if busy else ""
                os.close(fd)
                if busy and looks:  # held for an instant by a reader seeing who holds it (holder): look again
                    looks -= 1
                    time.sleep(BUSY_PAUSE_S)
                    continue
                if busy:
                    raise UserError(f"another job is writing {self.written()} now ({holder}): "
                                    f"wait for it to end, or pass another {self.flag}") from None
                logging.getLogger("sit_fast").warning(
                    f"cannot lock {path} ({err.strerror or err}): a second job started on {self.target()} while "
                    f"this one runs would not be noticed")
                return
            if self.still_there(fd, path):
                break
            os.close(fd)  # removed by the job that held it as it ended, after this open: the new file is the lock
            if not os.path.isdir(self.folder):  # the folder too (a run that did not start, OUT.parts/ once used)
                raise UserError(f"{self.flag} {self.target()}: the job that held {path} removed {self.folder} as it "
                                f"ended, as this job started on it: run this job again")
        self.fd = fd
        FolderLock._held.add(self)
        try:  # who holds it, for the message of a job refused (written before the old text is cut off, so
            # that a reader finds a line at any moment): a full disk only costs that
            holder = f"process {os.getpid()} on {socket.gethostname()}\n".encode()
            os.pwrite(fd, holder, 0)
            os.ftruncate(fd, len(holder))
        except OSError:
            pass

    def lock_path(self) -> str:
        return os.path.join(self.folder, self.NAME)

    def target(self) -> str:
        """What the lock guards, as the flag names it."""
        return self.folder

    def written(self) -> str:
        return f"into {self.folder}"

    def still_there(self, fd: int, path: str) -> bool:
        """Whether the file locked through `fd` is the lock file at `path` still: a holder removes it,
        holding the lock, as it ends (FileLock's release; remove_locked_folder), and a job that opened it
        just before and took the lock then would hold a lock no later job sees."""
        try:
            now, locked = os.stat(path), os.fstat(fd)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino)

    @classmethod
    def holder(cls, folder: str) -> str | None:
        """Who holds the lock of `folder` now ("process PID on HOST", or the lock file's path where the
        holder wrote nothing), or None: not held, or not to be told (no lock file there, not a POSIX
        system, a file system that cannot lock). For a reader of the folder's outputs, or a job choosing
        a folder, to tell a job at work there from one that ended. A lock held by this process under
        another FolderLock counts as held. The lock is taken shared for an instant to see."""
        try:
            import fcntl
        except ImportError:
            return None
        path = os.path.join(folder, cls.NAME)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            return _holder(fd, path) if err.errno in _BUSY else None
        finally:
            os.close(fd)  # closing drops the shared lock, if it was taken
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None
        FolderLock._held.discard(self)

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held):
            lock.release()


class FileLock(FolderLock):
    """The lock of one file a job writes (sample.py's --out, written at the job's end), so that a second
    job given the same file is refused instead of overwriting the first one's, whatever folders their
    other outputs go to: flock(2) on .NAME.lock beside the file. The lock file is removed as the lock is
    released (a job that opened it just before finds it gone once it has the lock, and takes the new one).
    guards: what the messages name as the flag's value, where that is not the file (a folder's lock of
    its own, as train.py's RESULTS_DIR/.runs.lock for --results-dir)."""

    def __init__(self, path: str, flag: str, guards: str | None = None):
        folder, name = os.path.split(os.path.abspath(path))
        super().__init__(folder, flag)
        self.path = path
        self.guards = path if guards is None else guards
        self.name = hidden_name(name, ".lock")

    def lock_path(self) -> str:
        return os.path.join(self.folder, self.name)

    def target(self) -> str:
        return self.guards

    def written(self) -> str:
        return self.guards

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # removed while held: no job takes the old file after it
                os.remove(self.lock_path())
        super().release()


def remove_locked_folder(folder: str) -> None:
    """Remove `folder`, a job's outputs whose FolderLock this process holds, its lock file last: a job
    started meanwhile finds the lock held, or (once the file is gone) no outputs left. (shutil.rmtree
    goes in the folder's listing order: where the lock file went first, a job took a new lock beside
    outputs still being removed, and was refused for them, or counted them as done.) What cannot be
    removed is left, without an error."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name != FolderLock.NAME:
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
    for remove, path in ((os.remove, os.path.join(folder, FolderLock.NAME)), (os.rmdir, folder)):
        with contextlib.suppress(OSError):
            remove(path)


def _leave_locks_to_the_parent() -> None:
    """In a process forked by a lock's holder (a data loader's worker): its copies of the locks' files
    closed, so that the lock is the holder's alone. Shared, it lasted until the last such process ended
    too, seconds after the holder was killed, and a job started then was refused in the dead holder's
    name. (Closing a copy does not drop the lock: the holder's own file stays open.)"""
    for lock in list(FolderLock._held):
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None
    FolderLock._held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_leave_locks_to_the_parent)

_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # flock's errors for a lock that another holds
# A lock found held is looked at again BUSY_LOOKS times, BUSY_PAUSE_S apart, before the job is refused:
# FolderLock.holder takes it shared for an instant, and a job refused then would name the last holder,
# perhaps one long ended.
BUSY_LOOKS, BUSY_PAUSE_S = 2, 0.05


def _holder(fd: int, path: str) -> str:
    """The line the holder of the lock file `path` (open as `fd`) wrote: who it is; its path where there is none."""
    try:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split("\n")[0].strip()
    except OSError:
        holder = ""
    return holder or f"it holds {path}"
