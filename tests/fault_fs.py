"""A fault-injecting passthrough filesystem for tests, spoken to the kernel's FUSE
directly.

``FaultFS(backing, mountpoint)`` mounts a filesystem at ``mountpoint`` that passes
every operation through to the directory ``backing``, and on the test's command
fails some of them with an errno (``fail_reads``, ``fail_writes``, ``fail``) or holds
them unanswered (``hang``) until ``release``; ``heal`` ends every fault. Paths are
matched relative to the mount's root with ``fnmatch`` (``*`` crosses ``/``). The
caller of a held operation waits in the kernel as it would on a disk that stopped
answering, and every other request is answered meanwhile.

There is no libfuse here: the module opens ``/dev/fuse``, mounts it with mount(2)
and answers the kernel's requests (the structures of ``include/uapi/linux/fuse.h``,
protocol 7.31) in threads of its own. Files are opened with direct I/O, so every
read and write reaches this process (nothing is answered from the page cache past
a fault), and attributes and names are never cached by the kernel. Needs root (or
CAP_SYS_ADMIN) and ``/dev/fuse``: ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import fnmatch
import os
import select
import stat
import struct
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- the kernel's protocol (include/uapi/linux/fuse.h) --------------------------------

_MAJOR, _MINOR = 7, 31
_ROOT = 1
_MAX_WRITE = 1 << 20
_MAX_PAGES = _MAX_WRITE // 4096
_BUFFER = _MAX_WRITE + 64 * 1024  # a WRITE's data plus its headers

LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 34, 35, 36, 38, 42, 43
RENAME2, LSEEK, COPY_FILE_RANGE = 45, 46, 47

# What the tests call each operation (the names fault rules take).
OPERATIONS = {
    LOOKUP: "lookup",
    GETATTR: "getattr",
    SETATTR: "setattr",
    READLINK: "readlink",
    SYMLINK: "symlink",
    MKNOD: "mknod",
    MKDIR: "mkdir",
    UNLINK: "unlink",
    RMDIR: "rmdir",
    RENAME: "rename",
    RENAME2: "rename",
    LINK: "link",
    OPEN: "open",
    CREATE: "create",
    READ: "read",
    WRITE: "write",
    STATFS: "statfs",
    FLUSH: "flush",
    FSYNC: "fsync",
    OPENDIR: "opendir",
    READDIR: "readdir",
    FALLOCATE: "fallocate",
    COPY_FILE_RANGE: "copy_file_range",
    LSEEK: "lseek",
}

_IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
_OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
_ENTRY = struct.Struct("=QQQQII")  # nodeid, generation, entry/attr valid (+ nsec)
_ATTR_OUT = struct.Struct("=QII")  # attr valid, nsec, dummy
_INIT_IN = struct.Struct("=IIII")  # major, minor, max_readahead, flags
_INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
_OPEN_IN = struct.Struct("=II")
_CREATE_IN = struct.Struct("=IIII")  # flags, mode, umask, open_flags
_OPEN_OUT = struct.Struct("=QII")
_RW_IN = struct.Struct("=QQIIQII")  # fh, offset, size, flags, lock owner, flags, padding
_WRITE_OUT = struct.Struct("=II")
_RELEASE_IN = struct.Struct("=QIIQ")
_FSYNC_IN = struct.Struct("=QII")
_GETATTR_IN = struct.Struct("=IIQ")
_SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
_MKDIR_IN = struct.Struct("=II")
_MKNOD_IN = struct.Struct("=IIII")
_RENAME_IN = struct.Struct("=Q")
_RENAME2_IN = struct.Struct("=QII")
_LINK_IN = struct.Struct("=Q")
_STATFS_OUT = struct.Struct("=QQQQQIIII24x")
_FALLOCATE_IN = struct.Struct("=QQQII")
_DIRENT = struct.Struct("=QQII")
_FORGET_IN = struct.Struct("=Q")
_BATCH_FORGET_IN = struct.Struct("=II")
_FORGET_ONE = struct.Struct("=QQ")
_COPY_IN = struct.Struct("=QQQQQQQ")  # fh in, off in, nodeid out, fh out, off out, len, flags
_LSEEK_IN = struct.Struct("=QQII")
_INTERRUPT_IN = struct.Struct("=Q")

_ASYNC_READ, _ATOMIC_O_TRUNC, _BIG_WRITES = 1 << 0, 1 << 3, 1 << 5
_PARALLEL_DIROPS, _MAX_PAGES_FLAG = 1 << 18, 1 << 22
_WANTED = _ASYNC_READ | _ATOMIC_O_TRUNC | _BIG_WRITES | _PARALLEL_DIROPS | _MAX_PAGES_FLAG
_DIRECT_IO = 1 << 0  # FOPEN_DIRECT_IO
_FATTR_MODE, _FATTR_UID, _FATTR_GID, _FATTR_SIZE = 1, 2, 4, 8
_FATTR_ATIME, _FATTR_MTIME, _FATTR_FH = 16, 32, 64
_FATTR_ATIME_NOW, _FATTR_MTIME_NOW = 128, 256
_RENAME_NOREPLACE = 1
_FSYNC_FDATASYNC = 1
# Open flags passed on to the backing file; O_APPEND is not: the kernel sends offsets.
_OPEN_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC

_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2


def unavailable() -> str | None:
    """Why a FaultFS cannot be mounted here (for ``pytest.skip``), or None."""
    if sys.platform != "linux":
        return "FUSE fault injection needs Linux"
    if os.geteuid() != 0:
        return "mounting a FUSE filesystem needs root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: the kernel has no FUSE device here"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse cannot be opened for reading and writing"
    return None


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


@dataclass
class Rule:
    """Operations that fail with ``error``, or hang when ``error`` is None.

    ``offset``/``length`` narrow reads and writes to those touching that byte range;
    ``inode`` to those of one file (a bad sector belongs to a file, not to its name);
    ``times`` counts down the failures left (None: until healed).
    """

    operations: frozenset[str]
    pattern: str
    error: int | None
    offset: int = 0
    length: int | None = None
    times: int | None = None
    inode: int | None = None

    def matches(self, operation: str, target: _Target) -> bool:
        if operation not in self.operations or self.times == 0:
            return False
        if not any(fnmatch.fnmatchcase(p, self.pattern) for p in target.paths):
            return False
        if self.inode is not None and target.inode != self.inode:
            return False
        span = target.span
        if span is None:
            return True
        start, end = span
        return end > self.offset and (self.length is None or start < self.offset + self.length)


@dataclass(frozen=True)
class _Target:
    """What a request touches: its paths, and for a read or write the byte range and
    the file's inode."""

    paths: tuple[str, ...] = ()
    span: tuple[int, int] | None = None
    inode: int | None = None


@dataclass
class _Node:
    path: str | None  # relative to the root ("" is the root); None once unlinked
    lookups: int = 0
    fds: set[int] = field(default_factory=set)


@dataclass
class _Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    body: memoryview


@dataclass(frozen=True)
class Held:
    """A request the filesystem holds unanswered (``hang``)."""

    operation: str
    path: str
    unique: int


class FaultFS:
    """A passthrough FUSE mount of ``backing`` at ``mountpoint`` that fails or hangs
    operations on command. Use as a context manager, or ``mount()`` then ``close()``."""

    def __init__(self, backing: Path, mountpoint: Path, threads: int = 4) -> None:
        self.backing = Path(backing).resolve()
        self.mountpoint = Path(mountpoint).resolve()
        self._threads_wanted = threads
        self._lock = threading.Lock()
        self._nodes: dict[int, _Node] = {_ROOT: _Node("", lookups=1)}
        self._by_path: dict[str, int] = {"": _ROOT}
        self._next_node = _ROOT + 1
        self._files: dict[int, tuple[int, int]] = {}  # fh -> (backing fd, nodeid)
        self._dirs: dict[int, list[tuple[bytes, int, int]]] = {}  # fh -> entries
        self._next_dir = 1
        self._rules: list[Rule] = []
        self._held: dict[int, tuple[_Request, Held]] = {}
        self._held_changed = threading.Condition(self._lock)
        self.injected: Counter[str] = Counter()  # faults injected, by operation
        self.served: Counter[str] = Counter()  # requests answered, by operation
        self.internal_errors: list[str] = []  # handler bugs (answered EIO)
        self._fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._workers: list[threading.Thread] = []
        self._ready = threading.Event()
        self._mounted = False

    # -- mounting ----------------------------------------------------------------

    def __enter__(self) -> FaultFS:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mount(self) -> FaultFS:
        reason = unavailable()
        if reason is not None:
            raise OSError(errno.EPERM, reason)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        root_mode = stat.S_IFMT(os.stat(self.backing).st_mode)
        options = (
            f"fd={self._fd},rootmode={root_mode:o},user_id={os.getuid()},"
            f"group_id={os.getgid()},allow_other,default_permissions,max_read={_MAX_WRITE}"
        )
        libc = _libc()
        if (
            libc.mount(
                b"faultfs",
                os.fsencode(self.mountpoint),
                b"fuse",
                _MS_NOSUID | _MS_NODEV,
                options.encode(),
            )
            != 0
        ):
            code = ctypes.get_errno()
            os.close(self._fd)
            self._fd = -1
            raise OSError(code, f"mount of a FUSE filesystem failed: {os.strerror(code)}")
        self._mounted = True
        _LIVE.add(self)
        self._wake_r, self._wake_w = os.pipe()
        for number in range(self._threads_wanted):
            worker = threading.Thread(target=self._serve, name=f"faultfs-{number}", daemon=True)
            worker.start()
            self._workers.append(worker)
        if not self._ready.wait(10):
            self.close()
            raise OSError(errno.ETIMEDOUT, "the kernel sent no FUSE INIT request")
        return self

    def close(self) -> None:
        """Answer every held request, unmount (lazily if busy), stop the threads."""
        if not self._mounted:
            return
        self.heal()
        libc = _libc()
        target = os.fsencode(self.mountpoint)
        if libc.umount2(target, 0) != 0:
            libc.umount2(target, _MNT_DETACH)
        self._mounted = False
        os.write(self._wake_w, b"x")
        for worker in self._workers:
            worker.join(10)
        self._workers.clear()
        os.close(self._fd)  # the last reference: the kernel aborts the connection
        self._fd = -1
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        with self._lock:
            for fd, _node in self._files.values():
                os.close(fd)
            self._files.clear()
        _LIVE.discard(self)

    # -- the test's commands -----------------------------------------------------

    def fail(
        self,
        pattern: str = "*",
        operations: Iterable[str] = ("read",),
        error: int = errno.EIO,
        times: int | None = None,
        offset: int = 0,
        length: int | None = None,
        inode: int | None = None,
    ) -> Rule:
        """Fail ``operations`` on paths matching ``pattern`` with ``error``."""
        rule = Rule(frozenset(operations), pattern, error, offset, length, times, inode)
        return self._add(rule)

    def fail_reads(
        self,
        pattern: str = "*",
        error: int = errno.EIO,
        times: int | None = None,
        offset: int = 0,
        length: int | None = None,
        inode: int | None = None,
    ) -> Rule:
        """Fail reads of matching files (those touching [offset, offset + length))."""
        return self.fail(pattern, ("read",), error, times, offset, length, inode)

    def fail_writes(
        self,
        pattern: str = "*",
        error: int = errno.EIO,
        times: int | None = None,
        offset: int = 0,
        length: int | None = None,
        inode: int | None = None,
    ) -> Rule:
        """Fail writes (and fsync, fallocate) of matching files."""
        operations = ("write", "fsync", "fallocate")
        return self.fail(pattern, operations, error, times, offset, length, inode)

    def hang(self, pattern: str = "*", operations: Iterable[str] = ("read",)) -> Rule:
        """Hold ``operations`` on matching paths unanswered until ``release``."""
        return self._add(Rule(frozenset(operations), pattern, None))

    def release(self) -> None:
        """Stop holding new requests and answer the held ones (as if never held)."""
        with self._lock:
            self._rules = [rule for rule in self._rules if rule.error is not None]
            held = list(self._held.values())
            self._held.clear()
            self._held_changed.notify_all()
        for request, _held in held:
            self._answer(request)

    def heal(self) -> None:
        """End every fault: no more failures, held requests answered."""
        with self._lock:
            self._rules = [rule for rule in self._rules if rule.error is None]
        self.release()

    def held(self) -> list[Held]:
        """The requests held right now."""
        with self._lock:
            return [held for _request, held in self._held.values()]

    def wait_held(self, count: int = 1, timeout: float = 30.0) -> list[Held]:
        """Wait until at least ``count`` requests are held; fail at the deadline."""
        with self._lock:
            if not self._held_changed.wait_for(lambda: len(self._held) >= count, timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {count} held request(s); "
                    f"{len(self._held)} held"
                )
            return [held for _request, held in self._held.values()]

    def _add(self, rule: Rule) -> Rule:
        unknown = set(rule.operations) - set(OPERATIONS.values())
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}: {sorted(OPERATIONS.values())}")
        with self._lock:
            self._rules.append(rule)
        return rule

    def _fault(self, operation: str, target: _Target) -> Rule | None:
        """The rule that applies (a failure's count taken), or None."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(operation, target):
                    if rule.error is not None:
                        if rule.times is not None:
                            rule.times -= 1
                        self.injected[operation] += 1
                    return rule
        return None

    # -- serving -----------------------------------------------------------------

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            try:
                raw = os.read(self._fd, _BUFFER)
            except BlockingIOError:
                continue  # another thread took it
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                return  # ENODEV: unmounted, the connection is gone
            length, opcode, unique, nodeid, uid, gid, _pid, _ext, _pad = _IN_HEADER.unpack_from(raw)
            body = memoryview(raw)[_IN_HEADER.size : length]
            self._dispatch(_Request(opcode, unique, nodeid, uid, gid, body))

    def _dispatch(self, request: _Request) -> None:
        if request.opcode in (FORGET, BATCH_FORGET):
            self._forget(request)
            return
        if request.opcode == INTERRUPT:
            self._interrupt(request)
            return
        operation = OPERATIONS.get(request.opcode)
        if operation is not None:
            target = self._target(request)
            rule = self._fault(operation, target)
            if rule is not None and rule.error is None:
                with self._lock:
                    self._held[request.unique] = (
                        request,
                        Held(operation, next(iter(target.paths), ""), request.unique),
                    )
                    self._held_changed.notify_all()
                return
            if rule is not None:
                self._reply_error(request.unique, rule.error or errno.EIO)
                return
        self._answer(request)

    def _answer(self, request: _Request) -> None:
        handler = _HANDLERS.get(request.opcode)
        if handler is None:
            self._reply_error(request.unique, errno.ENOSYS)
            return
        try:
            payload = handler(self, request)
        except OSError as exc:
            self._reply_error(request.unique, exc.errno or errno.EIO)
            return
        except Exception:
            self.internal_errors.append(traceback.format_exc())
            self._reply_error(request.unique, errno.EIO)
            return
        if payload is None:
            return  # no reply (INIT answers itself; DESTROY)
        operation = OPERATIONS.get(request.opcode)
        if operation is not None:
            with self._lock:
                self.served[operation] += 1
        self._reply(request.unique, payload)

    def _reply(self, unique: int, payload: bytes) -> None:
        self._write(_OUT_HEADER.pack(_OUT_HEADER.size + len(payload), 0, unique) + payload)

    def _reply_error(self, unique: int, code: int) -> None:
        self._write(_OUT_HEADER.pack(_OUT_HEADER.size, -code, unique))

    def _write(self, message: bytes) -> None:
        try:
            os.write(self._fd, message)
        except OSError as exc:  # the caller was interrupted, or the mount went away
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    def _forget(self, request: _Request) -> None:
        if request.opcode == FORGET:
            pairs = [(request.nodeid, _FORGET_IN.unpack_from(request.body)[0])]
        else:
            count, _ = _BATCH_FORGET_IN.unpack_from(request.body)
            pairs = [
                _FORGET_ONE.unpack_from(request.body, _BATCH_FORGET_IN.size + i * _FORGET_ONE.size)
                for i in range(count)
            ]
        with self._lock:
            for nodeid, lookups in pairs:
                node = self._nodes.get(nodeid)
                if node is None or nodeid == _ROOT:
                    continue
                node.lookups -= lookups
                if node.lookups <= 0 and not node.fds:
                    del self._nodes[nodeid]
                    if node.path is not None and self._by_path.get(node.path) == nodeid:
                        del self._by_path[node.path]

    def _interrupt(self, request: _Request) -> None:
        (unique,) = _INTERRUPT_IN.unpack_from(request.body)
        with self._lock:
            held = self._held.pop(unique, None)
            self._held_changed.notify_all()
        if held is not None:  # a signalled caller of a held request: let it go
            self._reply_error(unique, errno.EINTR)

    # -- paths and nodes ---------------------------------------------------------

    def _path(self, nodeid: int) -> str:
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or node.path is None:
                raise OSError(errno.ENOENT, "no such node")
            return node.path

    def _real(self, path: str) -> str:
        return str(self.backing / path) if path else str(self.backing)

    @staticmethod
    def _child(parent: str, name: bytes) -> str:
        text = os.fsdecode(name)
        if not text or "/" in text or text in (".", ".."):
            raise OSError(errno.EINVAL, "bad name")
        return f"{parent}/{text}" if parent else text

    def _target(self, request: _Request) -> _Target:
        """The paths a request names; for a read or write, its byte range and inode."""
        op, body = request.opcode, request.body
        try:
            if op in (LOOKUP, MKDIR, MKNOD, UNLINK, RMDIR, CREATE, SYMLINK, LINK):
                skip = {MKDIR: _MKDIR_IN.size, MKNOD: _MKNOD_IN.size, CREATE: _CREATE_IN.size}
                skip[LINK] = _LINK_IN.size
                name = _names(body[skip.get(op, 0) :])[0]
                return _Target((self._child(self._path(request.nodeid), name),))
            if op in (RENAME, RENAME2):
                header = _RENAME_IN if op == RENAME else _RENAME2_IN
                (newdir,) = _RENAME_IN.unpack_from(body)
                old, new = _names(body[header.size :])[:2]
                return _Target(
                    (
                        self._child(self._path(request.nodeid), old),
                        self._child(self._path(newdir), new),
                    )
                )
            if op in (READ, WRITE):
                fh, offset, size, *_ = _RW_IN.unpack_from(body)
                return self._file_target(fh, (offset, offset + size))
            if op == COPY_FILE_RANGE:
                fh_in, off_in, _node_out, _fh_out, _off_out, size, _f = _COPY_IN.unpack_from(body)
                return self._file_target(fh_in, (off_in, off_in + size))
            return _Target((self._path(request.nodeid),))
        except (OSError, KeyError, struct.error, IndexError):
            return _Target()

    def _file_target(self, fh: int, span: tuple[int, int]) -> _Target:
        return _Target((self._file_path(fh),), span, os.fstat(self._fd_of(fh)).st_ino)

    def _file_path(self, fh: int) -> str:
        with self._lock:
            _fd, nodeid = self._files[fh]
            node = self._nodes.get(nodeid)
            return (node.path if node is not None else None) or ""

    def _entry(self, path: str) -> bytes:
        """A fuse_entry_out for ``path``: its node (made or found), looked up once more."""
        st = os.lstat(self._real(path))
        with self._lock:
            nodeid = self._by_path.get(path)
            if nodeid is None:
                nodeid = self._next_node
                self._next_node += 1
                self._nodes[nodeid] = _Node(path)
                self._by_path[path] = nodeid
            self._nodes[nodeid].lookups += 1
        return _ENTRY.pack(nodeid, 0, 0, 0, 0, 0) + _attr(st)

    def _stat_node(self, nodeid: int, fh: int | None = None) -> os.stat_result:
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None:
                raise OSError(errno.ENOENT, "no such node")
            fds = [self._files[fh][0]] if fh in self._files else []
            fds += [self._files[h][0] for h in node.fds if h in self._files]
            path = node.path
        if path is not None:
            try:
                return os.lstat(self._real(path))
            except FileNotFoundError:
                if not fds:
                    raise
        if not fds:
            raise OSError(errno.ENOENT, "no such node")
        return os.fstat(fds[0])

    def _moved(self, old: str, new: str) -> None:
        """After a rename: every node at or below ``old`` is now below ``new``."""
        with self._lock:
            replaced = self._by_path.pop(new, None)
            if replaced is not None:
                self._nodes[replaced].path = None
            prefix = old + "/"
            for path in [p for p in self._by_path if p == old or p.startswith(prefix)]:
                nodeid = self._by_path.pop(path)
                moved = new + path[len(old) :]
                self._nodes[nodeid].path = moved
                self._by_path[moved] = nodeid

    def _removed(self, path: str) -> None:
        with self._lock:
            nodeid = self._by_path.pop(path, None)
            if nodeid is not None:
                self._nodes[nodeid].path = None

    def _fd_of(self, fh: int) -> int:
        with self._lock:
            return self._files[fh][0]

    def _owned(self, path: str, request: _Request) -> None:
        """Give a new file to the caller, as a disk would (we run as root)."""
        if (request.uid, request.gid) != (os.getuid(), os.getgid()):
            os.lchown(self._real(path), request.uid, request.gid)

    # -- operations ----------------------------------------------------------------

    def _init(self, request: _Request) -> None:
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(request.body)
        if major != _MAJOR:
            self._reply(request.unique, _INIT_OUT.pack(_MAJOR, _MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            return None
        reply = _INIT_OUT.pack(
            _MAJOR,
            min(minor, _MINOR),
            max_readahead,
            flags & _WANTED,
            16,  # max_background
            12,  # congestion_threshold
            _MAX_WRITE,
            1,  # time_gran (ns)
            _MAX_PAGES,
            0,
            0,
        )
        self._reply(request.unique, reply)
        self._ready.set()
        return None

    def _lookup(self, request: _Request) -> bytes:
        name = _names(request.body)[0]
        return self._entry(self._child(self._path(request.nodeid), name))

    def _getattr(self, request: _Request) -> bytes:
        flags, _dummy, fh = _GETATTR_IN.unpack_from(request.body)
        st = self._stat_node(request.nodeid, fh if flags & 1 else None)
        return _ATTR_OUT.pack(0, 0, 0) + _attr(st)

    def _setattr(self, request: _Request) -> bytes:
        fields = _SETATTR_IN.unpack_from(request.body)
        valid, _pad, fh, size, _owner, atime, mtime, _ctime = fields[:8]
        atimensec, mtimensec, _ctimensec, mode, _u4, uid, gid, _u5 = fields[8:]
        fd = self._fd_of(fh) if valid & _FATTR_FH and fh in self._files else None
        target: int | str = fd if fd is not None else self._real(self._path(request.nodeid))
        if valid & _FATTR_MODE:
            os.chmod(target, stat.S_IMODE(mode))
        if valid & (_FATTR_UID | _FATTR_GID):
            owner = uid if valid & _FATTR_UID else -1
            group = gid if valid & _FATTR_GID else -1
            if isinstance(target, int):
                os.fchown(target, owner, group)
            else:
                os.lchown(target, owner, group)
        if valid & _FATTR_SIZE:
            os.truncate(target, size)
        if valid & (_FATTR_ATIME | _FATTR_MTIME | _FATTR_ATIME_NOW | _FATTR_MTIME_NOW):
            st = os.stat(target)
            now = time.time_ns()
            a = now if valid & _FATTR_ATIME_NOW else atime * 10**9 + atimensec
            m = now if valid & _FATTR_MTIME_NOW else mtime * 10**9 + mtimensec
            if not valid & (_FATTR_ATIME | _FATTR_ATIME_NOW):
                a = st.st_atime_ns
            if not valid & (_FATTR_MTIME | _FATTR_MTIME_NOW):
                m = st.st_mtime_ns
            os.utime(target, ns=(a, m))
        st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        return _ATTR_OUT.pack(0, 0, 0) + _attr(st)

    def _mkdir(self, request: _Request) -> bytes:
        mode, _umask = _MKDIR_IN.unpack_from(request.body)
        path = self._child(self._path(request.nodeid), _names(request.body[_MKDIR_IN.size :])[0])
        os.mkdir(self._real(path), stat.S_IMODE(mode))
        os.chmod(self._real(path), stat.S_IMODE(mode))
        self._owned(path, request)
        return self._entry(path)

    def _mknod(self, request: _Request) -> bytes:
        mode, rdev, _umask, _pad = _MKNOD_IN.unpack_from(request.body)
        path = self._child(self._path(request.nodeid), _names(request.body[_MKNOD_IN.size :])[0])
        os.mknod(self._real(path), mode, rdev)
        self._owned(path, request)
        return self._entry(path)

    def _symlink(self, request: _Request) -> bytes:
        name, target = _names(request.body)[:2]
        path = self._child(self._path(request.nodeid), name)
        os.symlink(target, self._real(path))
        self._owned(path, request)
        return self._entry(path)

    def _readlink(self, request: _Request) -> bytes:
        return os.fsencode(os.readlink(self._real(self._path(request.nodeid))))

    def _unlink(self, request: _Request) -> bytes:
        path = self._child(self._path(request.nodeid), _names(request.body)[0])
        os.unlink(self._real(path))
        self._removed(path)
        return b""

    def _rmdir(self, request: _Request) -> bytes:
        path = self._child(self._path(request.nodeid), _names(request.body)[0])
        os.rmdir(self._real(path))
        self._removed(path)
        return b""

    def _rename(self, request: _Request) -> bytes:
        flags = 0
        if request.opcode == RENAME2:
            newdir, flags, _pad = _RENAME2_IN.unpack_from(request.body)
            names = _names(request.body[_RENAME2_IN.size :])
        else:
            (newdir,) = _RENAME_IN.unpack_from(request.body)
            names = _names(request.body[_RENAME_IN.size :])
        old = self._child(self._path(request.nodeid), names[0])
        new = self._child(self._path(newdir), names[1])
        if flags & ~_RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "only RENAME_NOREPLACE is passed through")
        if flags & _RENAME_NOREPLACE and os.path.lexists(self._real(new)):
            raise OSError(errno.EEXIST, "exists")
        os.rename(self._real(old), self._real(new))
        self._moved(old, new)
        return b""

    def _link(self, request: _Request) -> bytes:
        (old_node,) = _LINK_IN.unpack_from(request.body)
        path = self._child(self._path(request.nodeid), _names(request.body[_LINK_IN.size :])[0])
        os.link(self._real(self._path(old_node)), self._real(path))
        return self._entry(path)

    def _opened(self, fd: int, nodeid: int) -> bytes:
        with self._lock:
            fh = fd  # backing fds are unique while open
            self._files[fh] = (fd, nodeid)
            self._nodes[nodeid].fds.add(fh)
        return _OPEN_OUT.pack(fh, _DIRECT_IO, 0)

    def _open(self, request: _Request) -> bytes:
        flags, _open_flags = _OPEN_IN.unpack_from(request.body)
        path = self._path(request.nodeid)
        fd = os.open(self._real(path), (flags & _OPEN_FLAGS) | os.O_CLOEXEC)
        return self._opened(fd, request.nodeid)

    def _create(self, request: _Request) -> bytes:
        flags, mode, _umask, _open_flags = _CREATE_IN.unpack_from(request.body)
        path = self._child(self._path(request.nodeid), _names(request.body[_CREATE_IN.size :])[0])
        open_flags = (flags & (_OPEN_FLAGS | os.O_EXCL)) | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self._real(path), open_flags, stat.S_IMODE(mode))
        try:
            os.fchmod(fd, stat.S_IMODE(mode))
            self._owned(path, request)
            entry = self._entry(path)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            nodeid = self._by_path[path]
        return entry + self._opened(fd, nodeid)

    def _read(self, request: _Request) -> bytes:
        fh, offset, size, *_ = _RW_IN.unpack_from(request.body)
        return os.pread(self._fd_of(fh), size, offset)

    def _write_data(self, request: _Request) -> bytes:
        fh, offset, size, *_ = _RW_IN.unpack_from(request.body)
        data = request.body[_RW_IN.size : _RW_IN.size + size]
        written = os.pwrite(self._fd_of(fh), data, offset)
        return _WRITE_OUT.pack(written, 0)

    def _fsync(self, request: _Request) -> bytes:
        fh, flags, _pad = _FSYNC_IN.unpack_from(request.body)
        fd = self._fd_of(fh)
        if flags & _FSYNC_FDATASYNC:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        return b""

    def _flush(self, request: _Request) -> bytes:
        return b""

    def _release(self, request: _Request) -> bytes:
        fh, *_ = _RELEASE_IN.unpack_from(request.body)
        with self._lock:
            entry = self._files.pop(fh, None)
            if entry is not None:
                node = self._nodes.get(entry[1])
                if node is not None:
                    node.fds.discard(fh)
        if entry is not None:
            os.close(entry[0])
        return b""

    def _fallocate(self, request: _Request) -> bytes:
        fh, offset, length, mode, _pad = _FALLOCATE_IN.unpack_from(request.body)
        if mode != 0:
            raise OSError(errno.EOPNOTSUPP, "only plain fallocate is passed through")
        os.posix_fallocate(self._fd_of(fh), offset, length)
        return b""

    def _copy_file_range(self, request: _Request) -> bytes:
        fh_in, off_in, _node_out, fh_out, off_out, size, _flags = _COPY_IN.unpack_from(request.body)
        for operation, target in (
            ("read", self._file_target(fh_in, (off_in, off_in + size))),
            ("write", self._file_target(fh_out, (off_out, off_out + size))),
        ):
            rule = self._fault(operation, target)
            if rule is not None and rule.error is not None:  # (a copy is never held)
                raise OSError(rule.error, f"{operation} fault in a copy")
        copied = os.copy_file_range(self._fd_of(fh_in), self._fd_of(fh_out), size, off_in, off_out)
        return _WRITE_OUT.pack(copied, 0)

    def _lseek(self, request: _Request) -> bytes:
        fh, offset, whence, _pad = _LSEEK_IN.unpack_from(request.body)
        return struct.pack("=Q", os.lseek(self._fd_of(fh), offset, whence))

    def _statfs(self, request: _Request) -> bytes:
        st = os.statvfs(self.backing)
        return _STATFS_OUT.pack(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize,
            st.f_namemax,
            st.f_frsize,
            0,
        )

    def _opendir(self, request: _Request) -> bytes:
        path = self._path(request.nodeid)
        real = self._real(path)
        st = os.stat(real)
        entries = [(b".", st.st_ino, stat.S_IFDIR), (b"..", st.st_ino, stat.S_IFDIR)]
        with os.scandir(real) as listing:
            for item in listing:
                mode = item.stat(follow_symlinks=False).st_mode
                entries.append((os.fsencode(item.name), item.inode(), stat.S_IFMT(mode)))
        with self._lock:
            fh = self._next_dir
            self._next_dir += 1
            self._dirs[fh] = entries
        return _OPEN_OUT.pack(fh, 0, 0)

    def _readdir(self, request: _Request) -> bytes:
        fh, offset, size, *_ = _RW_IN.unpack_from(request.body)
        with self._lock:
            entries = self._dirs.get(fh, [])
        out = bytearray()
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            record = _DIRENT.pack(ino, index + 1, len(name), kind >> 12) + name
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def _releasedir(self, request: _Request) -> bytes:
        fh, *_ = _RELEASE_IN.unpack_from(request.body)
        with self._lock:
            self._dirs.pop(fh, None)
        return b""

    def _no_xattrs(self, request: _Request) -> bytes:
        raise OSError(errno.ENOSYS, "no extended attributes")

    def _access(self, request: _Request) -> bytes:
        return b""

    def _destroy(self, request: _Request) -> None:
        return None


def _names(body: memoryview) -> list[bytes]:
    """The NUL-terminated names at the start of a request's body."""
    return bytes(body).split(b"\0")[:-1] or [b""]


def _attr(st: os.stat_result) -> bytes:
    return _ATTR.pack(
        st.st_ino,
        st.st_size,
        st.st_blocks,
        int(st.st_atime),
        int(st.st_mtime),
        int(st.st_ctime),
        st.st_atime_ns % 10**9,
        st.st_mtime_ns % 10**9,
        st.st_ctime_ns % 10**9,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_blksize,
        0,
    )


_HANDLERS: dict[int, Callable[[FaultFS, _Request], bytes | None]] = {
    INIT: FaultFS._init,
    DESTROY: FaultFS._destroy,
    LOOKUP: FaultFS._lookup,
    GETATTR: FaultFS._getattr,
    SETATTR: FaultFS._setattr,
    READLINK: FaultFS._readlink,
    SYMLINK: FaultFS._symlink,
    MKNOD: FaultFS._mknod,
    MKDIR: FaultFS._mkdir,
    UNLINK: FaultFS._unlink,
    RMDIR: FaultFS._rmdir,
    RENAME: FaultFS._rename,
    RENAME2: FaultFS._rename,
    LINK: FaultFS._link,
    OPEN: FaultFS._open,
    CREATE: FaultFS._create,
    READ: FaultFS._read,
    WRITE: FaultFS._write_data,
    STATFS: FaultFS._statfs,
    RELEASE: FaultFS._release,
    FSYNC: FaultFS._fsync,
    FLUSH: FaultFS._flush,
    OPENDIR: FaultFS._opendir,
    READDIR: FaultFS._readdir,
    RELEASEDIR: FaultFS._releasedir,
    FSYNCDIR: FaultFS._flush,
    ACCESS: FaultFS._access,
    FALLOCATE: FaultFS._fallocate,
    COPY_FILE_RANGE: FaultFS._copy_file_range,
    LSEEK: FaultFS._lseek,
    SETXATTR: FaultFS._no_xattrs,
    GETXATTR: FaultFS._no_xattrs,
    LISTXATTR: FaultFS._no_xattrs,
    REMOVEXATTR: FaultFS._no_xattrs,
}

_LIVE: set[FaultFS] = set()


@atexit.register
def _unmount_all() -> None:
    """A test run that ends without closing a mount leaves none behind."""
    for fs in list(_LIVE):
        fs.close()
