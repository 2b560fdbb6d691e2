"""Files the way mha-twin writes them, for tools built on it (the CLI uses these).

- :func:`atomic_write`: write through a temporary file renamed over the target, so a reader never sees
  half a file and a failed write leaves the old one; a new file gets the permissions ``open()`` would
  give (the umask), a replaced one keeps its own; a symlink is written through (the link stays); a pipe
  or device is written in place.
- :func:`check_writable`: that a path can be written, checked before any work, with a ``ValueError``
  naming it: the folder exists and takes a new file, the name fits the folder's limit (NAME_MAX bytes;
  the temporary name is cut to fit), and an existing file is one ``open(path, "w")`` would open (a
  read-only file is refused as ``open()`` refuses it). See docs/robustness.md.
"""

from ._write import atomic_write, check_writable

__all__ = ["atomic_write", "check_writable"]
