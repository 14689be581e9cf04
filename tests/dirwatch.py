"""What was created in one directory while it was watched, from the kernel's inotify queue.

The leak check's record of the runs a test session made: it comes from the kernel, not from
the code under test, so a run the package forgets to record is still seen.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_libc = ctypes.CDLL(None, use_errno=True)


class DirectoryWatch:
    """Collects the names created in (or moved into) ``path``; ``created()`` drains the queue."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._names: set[str] = set()
        self._overflowed = False
        self._fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        _check(_libc.inotify_add_watch(self._fd, str(path).encode(), IN_CREATE | IN_MOVED_TO), "inotify_add_watch")

    def created(self) -> set[str]:
        """Every name created in the directory since the watch began."""
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                break
            self._parse(data)
        if self._overflowed:
            raise AssertionError(f"the inotify queue of {self.path} overflowed: raise fs.inotify.max_queued_events")
        return set(self._names)

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset : offset + length].rstrip(b"\0").decode(errors="replace")
            offset += length
            if mask & IN_Q_OVERFLOW:
                self._overflowed = True
            elif name:
                self._names.add(name)

    def close(self) -> None:
        os.close(self._fd)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code) or errno.errorcode.get(code, code)}")
    return result
