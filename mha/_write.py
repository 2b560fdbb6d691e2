"""The one way this project writes a file: checked first, then a temporary file renamed over the target.

:func:`check_writable` says, before any work, whether a write to a path can succeed: the folder exists
and takes new files, the name fits the folder's limit (``NAME_MAX``, bytes), and an existing file is
one ``open(path, "w")`` would open (a read-only file is refused, as ``open()`` refuses it; a privileged
user, whom ``open()`` lets through, is let through alike). :func:`atomic_write` checks the same, writes
to a temporary file beside the target and renames it over the target, so that a reader never sees half
a file and a failed write leaves the old one.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

_SUFFIX_BYTES = len(b"..0123abcd.tmp")  # what a temporary name adds to the target's: "." name "." hex ".tmp"


def _target(path: Path) -> Path:
    """The file a write to ``path`` lands in: ``path`` itself, or the file its symlink (chain) names."""
    if not os.path.islink(path):
        return path
    target = Path(os.path.realpath(path))
    if os.path.islink(target):
        raise OSError(errno.ELOOP, "symlink loop", str(path))
    return target


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the common limit
        return 255


def _temp_name(target: Path, limit: int) -> bytes:
    """A fresh hidden name beside ``target``, at most ``limit`` bytes: the target's name is cut (bytewise)
    where the whole would be longer, so a name of up to ``limit`` bytes still gets a temporary one."""
    name = os.fsencode(target.name)[: max(1, limit - _SUFFIX_BYTES)]
    return b"." + name + b"." + secrets.token_hex(4).encode() + b".tmp"


def _refuse(path, why: str) -> ValueError:
    return ValueError(f"cannot write {str(path)!r}: {why}")


def check_writable(path) -> Path:
    """Check, before any work, that ``path`` can be written as a file by :func:`atomic_write`.

    Returns the file a write lands in (``path``, or the file a symlink at ``path`` names). Raises
    ``ValueError`` naming ``path`` when it is a folder, its folder is missing or takes no new file (the
    temporary file is created and removed to find out), its name is longer than the folder allows, or
    it is an existing file that ``open(path, "w")`` would refuse (read-only); ``TypeError`` when
    ``path`` is not a str or path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    try:
        target = _target(path)
    except OSError as err:
        raise _refuse(path, err.strerror) from None
    folder = target.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise _refuse(path, f"the folder {str(folder)!r} {what}")
    limit = _name_max(folder)
    size = len(os.fsencode(target.name))
    if size > limit:
        raise _refuse(path, f"the name is {size} bytes, longer than the {limit} a name may have in {str(folder)!r}")
    if target.is_dir():
        raise _refuse(path, "it is a folder; give a file name")
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):  # a device or pipe: written in place
        if not os.access(target, os.W_OK):
            raise _refuse(path, f"permission denied (mode {stat.S_IMODE(st.st_mode):04o})")
        return target
    if st is not None:
        _check_opens(path, target, st)
    fd, tmp = _create_temp(target, path, limit)  # the folder takes a new file of the temporary name
    os.close(fd)
    os.unlink(tmp)
    return target


def _check_opens(path: Path, target: Path, st) -> None:
    """Open the existing regular file ``target`` for writing (no truncation) and close it: the refusal of
    ``open(path, "w")``, without its effect."""
    try:
        fd = os.open(target, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except PermissionError:
        raise _refuse(path, f"permission denied: the file is read-only to this user (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); open(path, 'w') refuses it too") from None
    except OSError as err:
        raise _refuse(path, err.strerror or str(err)) from None
    os.close(fd)


def _create_temp(target: Path, path: Path, limit: int) -> tuple[int, bytes]:
    """Create a new hidden file beside ``target`` with the mode ``open()`` gives (0o666 less the umask);
    returns (fd, its path as bytes). Errors name ``path``, the file asked for, never the temporary one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    folder = os.fsencode(target.parent)
    for _ in range(100):
        tmp = os.path.join(folder, _temp_name(target, limit))
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except PermissionError:
            raise _refuse(path, f"the folder {str(target.parent)!r} is not writable (a save writes a temporary "
                                f"file beside the target and renames it)") from None
        except OSError as err:
            raise _refuse(path, err.strerror or str(err)) from None
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside the target and rename it over the target.

    Everything :func:`check_writable` checks is checked first (``ValueError`` before ``write`` runs).
    The target is ``path``, or the file a symlink at ``path`` names (the link stays, even a dangling
    one or one into another folder). A new file gets the permissions ``open(path, "w")`` would give
    (0o666 less the umask); a replaced file keeps its permissions (and, where allowed, its owner). A
    device or pipe (``/dev/stdout``) cannot be renamed over and is written in place.
    """
    target = check_writable(path)
    path = Path(path)
    st = os.stat(target) if os.path.exists(target) else None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(target, "wb") as f:
            write(f)
        return
    fd, tmp = _create_temp(target, path, _name_max(target.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            if st is not None:
                _keep_mode_and_owner(f.fileno(), tmp, st)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _keep_mode_and_owner(fd: int, tmp: bytes, st) -> None:
    os.chmod(fd if os.chmod in os.supports_fd else tmp, stat.S_IMODE(st.st_mode))
    if hasattr(os, "chown") and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        try:  # a privileged user replacing another's file leaves it theirs, as open(path, "w") would
            os.chown(fd if os.chown in os.supports_fd else tmp, st.st_uid, st.st_gid)
        except OSError:
            pass
