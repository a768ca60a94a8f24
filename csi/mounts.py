"""Read-only bind mounts of views at kubelet's target paths, through mount(2).

The mount is made in two steps, as the kernel requires: a bind, then a remount of
that bind read-only, nosuid and nodev. ``/proc/self/mountinfo`` says whether a path
is a mount point, so unpublishing and restart checks ask the kernel, not a record.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def bind_read_only(source: Path, target: Path) -> None:
    """Mount ``source`` at ``target``, read-only, nosuid, nodev."""
    _check(
        _libc.mount(bytes(source), bytes(target), None, MS_BIND, None),
        f"bind mount of {source} at {target}",
    )
    try:
        _check(
            _libc.mount(
                None,
                bytes(target),
                None,
                MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
                None,
            ),
            f"read-only remount of {target}",
        )
    except OSError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Unmount ``target``; a mount still in use is detached (it goes when released)."""
    if _libc.umount2(bytes(target), 0) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EBUSY:
        _check(_libc.umount2(bytes(target), MNT_DETACH), f"lazy unmount of {target}")
        return
    if code in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
        return
    raise OSError(code, f"unmount of {target}: {os.strerror(code)}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def is_mount_point(target: Path) -> bool:
    wanted = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        return any(
            len(fields) > 4 and _unescape(fields[4]) == wanted
            for fields in (line.split(" ") for line in f)
        )


def shows(target: Path, source: Path) -> bool:
    """Whether ``target`` is a mount point showing the directory ``source``."""
    try:
        seen, expected = os.stat(target), os.stat(source)
    except OSError:
        return False
    same = (seen.st_dev, seen.st_ino) == (expected.st_dev, expected.st_ino)
    return same and is_mount_point(target)
