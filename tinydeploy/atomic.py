"""Atomic writes: a file is written to a temporary name in the same directory, then renamed; a whole
directory is built beside its target, then swapped in (``replace_directory``).

Files get the usual mode of a new file, 0666 minus the umask (0644 under the common 022), like
``open(path, "w")``: the temporary file is created with that mode (not ``mkstemp``'s private 0600,
which the rename would carry onto the published file), and given it again before the rename, since
some writers (safetensors) replace the file they are handed with one of mode 0600."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(final)
    mode = stat.S_IMODE(os.stat(tmp_path).st_mode)  # 0666 minus the umask
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_file(final: Path) -> Path:
    """Create an empty, not yet existing file beside ``final`` with mode 0666 minus the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        candidate = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(candidate, flags, 0o666))
            return candidate
        except FileExistsError:
            continue


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_tree(directory: str | os.PathLike[str]) -> None:
    """Flush every regular file under ``directory``, then the directories themselves, to disk."""
    for root, _dirs, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make new entries of the directory ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap the entries ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or the filesystem cannot do it (the caller then falls back to two
    renames); raises OSError on other failures.
    """
    import ctypes
    import errno

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def replace_directory(new: str | os.PathLike[str], target: str | os.PathLike[str], trash: str | os.PathLike[str]) -> None:
    """Put the complete directory ``new`` at ``target``, replacing any directory there, so that a reader
    sees either the whole old or the whole new directory at every instant; then delete the old one.

    ``new`` (and ``trash``, used only where no atomic exchange exists) must be on ``target``'s
    filesystem, in the same parent directory. With an exchange there is no instant without ``target``;
    the two-rename fallback has one instant where ``target`` is absent, never one where it is mixed.
    """
    new, target, trash = Path(new), Path(target), Path(trash)
    fsync_tree(new)
    if not target.exists():
        os.rename(new, target)
    elif exchange(new, target):
        shutil.rmtree(new)  # ``new`` now holds the old directory
    else:
        os.rename(target, trash)
        os.rename(new, target)
        shutil.rmtree(trash)
    fsync_dir(target.parent)
