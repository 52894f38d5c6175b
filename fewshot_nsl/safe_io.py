"""File I/O in one place: reading user-supplied files safely, and writing results atomically.

Writing: :func:`atomic_write` (and :func:`atomic_write_text`, :func:`atomic_write_json`; torch
checkpoints go through it in :func:`fewshot_nsl.training.atomic_torch_save`) writes a temporary
sibling, fsyncs and renames, removing the temporary file when anything fails;
:func:`remove_stale_tmp` clears the ones that killed processes left; :func:`locked` is the
exclusive file lock (leaderboard updates, pretraining cache misses); :func:`check_writable`
proves an output folder takes files; :func:`check_log_file` refuses a ``--log-file`` that would
append to a file the suite manages or is not a regular file.

Temporary files are named ``.fewshot-nsl.tmp-<pid>-<thread id>-<target name>`` (:func:`tmp_path`):
a dedicated prefix, so nothing a user creates (``data.tmp123``, a folder ``x.tmp1``) is taken for
one, and the writer's process *and* thread, so two threads of one process (``benchmark()`` from a
thread pool) never write the same temporary file. Only regular files of that form whose process
is gone are ever deleted by :func:`remove_stale_tmp`.

Reading user-supplied files without hanging, recursing without bound or exhausting memory:

Every file the suite reads on the user's word (configs, grid files, episode lists, dataset files)
goes through :func:`check_regular_file` first: a FIFO would block ``open`` forever, a device or
socket is not data, and a symlink loop never resolves. JSON and YAML documents are parsed with a
size cap, deep nesting is refused (:class:`RecursionError` from the parsers, or more than
:data:`MAX_DEPTH` levels), and YAML aliases are refused when they would expand a document past
:data:`MAX_NODES` values (the "billion laughs" alias bomb). Each refusal is one
:class:`~fewshot_nsl.errors.FewShotError` line naming the file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Type

from .errors import ConfigError, FewShotError

#: Largest JSON/YAML document read (bytes): a 600-episode list is ~0.1 MB, a config a few kB.
MAX_DOCUMENT_BYTES = 64 * 2**20
#: Deepest nesting accepted in a JSON/YAML document.
MAX_DEPTH = 64
#: Most values a YAML document may expand to through aliases.
MAX_NODES = 1_000_000


def check_regular_file(path: Path, what: str, error: Type[FewShotError] = ConfigError) -> Path:
    """``path`` if it is (a symlink to) a regular file; else one line saying what it is.

    Uses ``os.stat`` (which never blocks, unlike ``open`` on a FIFO).

    Raises:
        ``error``: missing, a symlink loop, a folder, FIFO, socket or device.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {path} is a symlink loop; point it at a real file") from None
        if exc.errno == errno.ENOENT:
            if os.path.islink(path):
                raise error(f"{what} {path} is a broken symlink; point it at an existing file") from None
            raise error(f"{what} {path} does not exist; check the path") from None
        raise error(f"cannot read {what} {path} ({exc.strerror}); check the path and its permissions") from None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    raise error(f"{what} {path} is {kind}, not a regular file; pass a file")


def read_document(path: Path, what: str, error: Type[FewShotError] = ConfigError,
                  max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """The UTF-8 text of a (checked, size-capped) JSON/YAML document."""
    path = check_regular_file(path, what, error)
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{what} {path} is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB accepted; "
                    f"is it the right file?")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte offset {exc.start}); pass a text file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror}); check its permissions") from None


def check_shape(obj: Any, path: Path, what: str, error: Type[FewShotError] = ConfigError) -> Any:
    """Refuse a parsed document nested deeper than :data:`MAX_DEPTH` or expanding to more than
    :data:`MAX_NODES` values (shared YAML aliases counted every time they are used). Iterative and
    stopped at the first excess, so an alias bomb is refused in milliseconds and constant memory."""
    count = 0
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise error(f"{what} {path} expands to more than {MAX_NODES:,} values (YAML aliases?); simplify it")
        if depth > MAX_DEPTH:
            raise error(f"{what} {path} is nested more than {MAX_DEPTH} levels deep; simplify it")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return obj


def load_json(path: Path, what: str, error: Type[FewShotError] = ConfigError) -> Any:
    """Parse a JSON document with the checks above.

    Raises:
        ``error``: not a regular file, too large, not UTF-8, not JSON, too deep.
    """
    text = read_document(path, what, error)
    try:
        obj = json.loads(text)
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to read; simplify it") from None
    except ValueError as exc:
        raise error(f"{what} {path} is malformed (not valid JSON: {exc}); fix or regenerate it") from None
    return check_shape(obj, path, what, error)


# ----------------------------------------------------------------------------- output folders
#: Free space below which a results or cache folder counts as full (bytes).
MIN_FREE_BYTES = 64 * 2**20
#: Prefix of every temporary file the suite writes (see the module docstring).
TMP_PREFIX = ".fewshot-nsl.tmp-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-(\d+)-")
#: Longest file name written (bytes; most file systems allow 255).
_MAX_NAME_BYTES = 255


def tmp_path(path: Path) -> Path:
    """The temporary sibling through which ``path`` is written by this process and thread:
    ``.fewshot-nsl.tmp-<pid>-<native thread id>-<name>`` (the name shortened to keep the file
    name within 255 bytes)."""
    path = Path(path)
    head = f"{TMP_PREFIX}{os.getpid()}-{threading.get_native_id()}-"
    room = _MAX_NAME_BYTES - len(head.encode())
    name = path.name.encode()[:room].decode("utf-8", "ignore")
    return path.with_name(head + name)


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file name written by :func:`tmp_path`."""
    return _TMP_NAME.match(name) is not None


def check_writable(folder: Path, what: str) -> Path:
    """Create ``folder`` if needed and prove it takes a file (written, fsync'ed, removed) and has
    at least :data:`MIN_FREE_BYTES` free, so an unwritable, read-only or full results or cache
    folder is one line before any training instead of a traceback after it.

    Raises:
        ConfigError: naming the folder, the reason and the fix.
    """
    folder = Path(folder)
    fix = f"pass another {'--results-dir' if what == 'results folder' else '--cache-dir'} or free/allow it"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tmp_path(folder / "write-test")
        try:
            with open(probe, "wb") as f:
                f.write(b"fewshot-nsl write test\n")
                f.flush()
                os.fsync(f.fileno())
        finally:
            if probe.exists():
                probe.unlink()
    except OSError as exc:
        reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.ENOSPC: "no space left", errno.ENOTDIR: "a part of the path is a file",
                  errno.EEXIST: "a file of that name exists"}.get(exc.errno, exc.strerror or type(exc).__name__)
        raise ConfigError(f"{what} {folder} is not writable ({reason}); {fix}") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"{what} {folder} is full ({free / 2**20:.0f} MiB free, at least "
                          f"{MIN_FREE_BYTES / 2**20:.0f} MiB needed); {fix}")
    return folder


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (resolved, symlinks followed) is ``folder`` or lies under it."""
    try:
        return path == folder or path.is_relative_to(folder)
    except ValueError:
        return False


def check_log_file(path: Path, results_dir: Optional[Path], cache_dir: Optional[Path],
                   inputs: Sequence[Path] = ()) -> Path:
    """``path`` if it can take ``--log-file`` lines without harming anything.

    Refused: a path inside the results folder or the cache folder (the suite owns everything there:
    ``leaderboard.csv``, ``table6.md``, ``runs/...``; log lines appended to them break every later
    run), inside or equal to one of ``inputs`` (data root, config files: what a run reads), a
    (hard) link to a file directly in the results folder, and anything that is not a regular file
    or a new name: a folder, a FIFO (``open`` would block forever), a socket, a character or block
    device. Symlinks are followed, so a link into the results folder is refused too. Uses
    ``os.stat`` only (never blocks).

    Args:
        path: the ``--log-file`` value.
        results_dir: the results folder (``--results-dir``; None: not known yet).
        cache_dir: the cache folder (``--cache-dir``; None: not known yet).
        inputs: further files or folders a run reads.

    Raises:
        ConfigError: one line naming the path, the reason and the fix.
    """
    path = Path(path)
    fix = "pass a log file outside the results and cache folders, e.g. --log-file run.log"
    try:
        st: Optional[os.stat_result] = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # a new file (or a bad folder: opening it says so)
        st = None
    except OSError as exc:
        raise ConfigError(f"cannot write the log file {path} ({exc.strerror or exc}); "
                          f"pass a writable path to --log-file") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise ConfigError(f"log file {path} is {kind}, not a regular file; {fix}")
    where = Path(os.path.realpath(path))
    owned = [(d, what) for d, what in ((results_dir, "results folder"), (cache_dir, "cache folder")) if d is not None]
    for folder, what in owned:
        if _inside(where, Path(os.path.realpath(folder))):
            raise ConfigError(f"log file {path} is inside the {what} {folder}, whose files the suite manages "
                              f"(leaderboard, tables, run folders, caches); {fix}")
    for item in inputs:
        if _inside(where, Path(os.path.realpath(item))):
            raise ConfigError(f"log file {path} is (inside) {item}, which the run reads; {fix}")
    if st is not None and st.st_nlink > 1 and results_dir is not None:
        try:
            managed = [e for e in os.scandir(results_dir) if e.is_file(follow_symlinks=False)]
        except OSError:
            managed = []
        for e in managed:
            if os.path.samestat(st, e.stat(follow_symlinks=False)):
                raise ConfigError(f"log file {path} is a hard link to {e.path}, a file the suite manages; {fix}")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder: Path) -> int:
    """Delete the temporary files (:func:`tmp_path` names) that processes no longer alive left in
    ``folder`` (killed mid-write); returns how many.

    Only regular files named ``.fewshot-nsl.tmp-<pid>-<tid>-*`` are candidates: folders, symlinks and
    every other name (a user's ``data.tmp123``) are never touched, nor are the files of this process
    (another thread may be writing) or of any live process.
    """
    n = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        m = _TMP_NAME.match(e.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            os.unlink(e.path)
            n += 1
        except OSError:
            pass
    return n


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Write ``path`` through a temporary sibling (:func:`tmp_path`: ``write(file)``), fsync, rename;
    the temporary file is removed if anything fails, so a failed write leaves neither half a file nor
    a temporary one. Safe from several threads at once (each writes its own temporary file)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """:func:`atomic_write` of a text."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: Path, obj: Any, indent: int = 1) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (non-JSON values written with ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


def _is_file_at(f: Any, name: str) -> bool:
    """Whether the open file ``f`` is still the file at path ``name``."""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(name))
    except FileNotFoundError:
        return False


@contextmanager
def locked(path: Path, remove: bool = False) -> Iterator[None]:
    """Exclusive advisory lock on ``path``.lock for the duration of the block (``fcntl.flock``:
    released by the kernel if the holder dies).

    With ``remove``, the lock file is deleted when the block ends, so a folder keeps no trace of the
    lock (the dataset caches); a waiter that then holds the lock on a deleted file tries again on the
    file now at that path, so two processes never hold the lock at once.

    Raises:
        OSError: the lock file cannot be created (e.g. a read-only folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = str(path) + ".lock"
    while True:
        lock = open(name, "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except BaseException:
            lock.close()
            raise
        if not remove or _is_file_at(lock, name):
            break
        lock.close()  # the holder before us removed this file: lock the one at the path now
    try:
        yield
    finally:
        if remove:
            try:
                os.unlink(name)
            except OSError:
                pass
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
