"""Speaks the /dev/fuse protocol for a filesystem holding one file, `volume`.

No coroutine framework: the C DataPath (mirror/_fastpath.c) reads requests into
one preallocated buffer from the worker's epoll loop and handles plain reads and
writes itself; every other request (and a read or write it may not take alone)
comes to slow() here, is parsed from the same buffer and handed to the
MirrorCore. Replies from Python go through reply().
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import cast

from . import fuse_proto as F
from . import wire
from .core import MirrorCore
from .spec import FrontendTuning

log = logging.getLogger(__name__)

# the file changes size only when the control plane grows it, and then grow() tells the
# kernel to drop what it cached
ATTR_VALID_S = 3600


class FuseServer:
    def __init__(self, fuse_fd: int, size_bytes: int, tuning: FrontendTuning):
        self.fd = fuse_fd
        self.size = size_bytes
        self.t = tuning
        self.core: MirrorCore | None = None
        self.buf = bytearray(tuning.max_write_bytes + 2 * 4096)
        self.mv = memoryview(self.buf)
        self._destroyed = False
        self.now = int(time.time())
        self._hdr = F.OUT_HEADER.pack

    @property
    def destroyed(self) -> bool:
        return self._destroyed or (self.core is not None and self.core.dp.destroyed)

    @destroyed.setter
    def destroyed(self, value: bool) -> None:
        self._destroyed = value

    def attach(self, core: MirrorCore) -> None:
        """From now on the core's DataPath reads requests (after INIT)."""
        self.core = core
        core.dp.set_fuse(self.fd, self.buf, self.slow)

    # --- replies -------------------------------------------------------------
    def reply(self, unique: int, err: int, payload: object) -> None:
        try:
            if payload is None:
                os.write(self.fd, self._hdr(16, err, unique))
            elif isinstance(payload, int):  # bytes written
                os.write(self.fd, self._hdr(24, 0, unique) + F.WRITE_OUT.pack(payload, 0))
            else:
                data = cast("bytes | bytearray | memoryview", payload)
                os.writev(self.fd, [self._hdr(16 + len(data), err, unique), data])
        except OSError as e:
            if e.errno == errno.ENOENT:  # the request was interrupted meanwhile
                return
            if e.errno == errno.ENODEV:
                self.destroyed = True
                return
            raise

    # --- INIT ------------------------------------------------------------------
    def handshake(self) -> dict:
        """Blocking: read INIT, answer it. Returns what was negotiated."""
        os.set_blocking(self.fd, True)
        try:
            while True:
                n = os.readv(self.fd, [self.buf])
                _, opcode, unique = F.IN_HEADER.unpack_from(self.buf)[:3]
                if opcode == F.INIT:
                    break
                self.reply(unique, -errno.EIO, None)
        finally:
            os.set_blocking(self.fd, False)
        major, minor, max_readahead, flags = F.INIT_IN.unpack_from(self.buf, 40)
        flags2 = int.from_bytes(self.buf[56:60], "little") if n >= 60 and flags & F.INIT_EXT else 0
        offered = flags | (flags2 << 32)
        want = F.ASYNC_READ | F.BIG_WRITES | F.ASYNC_DIO | F.MAX_PAGES | F.INIT_EXT | F.HAS_RESEND
        got = offered & want  # never WRITEBACK_CACHE: it would ack before the replicas have it
        out = F.INIT_OUT.pack(
            F.KERNEL_MAJOR, min(minor, F.KERNEL_MINOR), max_readahead, got & 0xFFFFFFFF,
            self.t.max_background, self.t.max_background * 3 // 4,
            self.t.max_write_bytes, 1, self.t.max_write_bytes // 4096, 0, got >> 32,
            0, 0, 0, 0, 0, 0, 0)
        self.reply(unique, 0, out)
        info = {"minor": min(minor, F.KERNEL_MINOR), "flags": got,
                "resend": bool(got & F.HAS_RESEND)}
        log.info("FUSE INIT 7.%d, flags %#x", info["minor"], got)
        return info

    def grow(self, size_bytes: int) -> None:
        """The volume grew: answer the new size from now on, and have the kernel forget the
        attributes it cached (its next stat asks again, and updates the file's size)."""
        self.size = size_bytes
        try:
            os.write(self.fd, F.OUT_HEADER.pack(16 + F.NOTIFY_INVAL_INODE_OUT.size,
                                                F.NOTIFY_INVAL_INODE, 0)
                     + F.NOTIFY_INVAL_INODE_OUT.pack(F.FILE_ID, -1, 0))
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: never looked up, so nothing cached
                raise

    def resend(self) -> None:
        """Ask the kernel to queue again what a dead worker had read but not answered."""
        os.write(self.fd, F.OUT_HEADER.pack(16, F.NOTIFY_RESEND, 0))

    # --- requests --------------------------------------------------------------
    def slow(self, n: int) -> None:
        """One request of n bytes in self.buf that the C side did not take. A request this
        code cannot handle fails alone (EIO): it never takes the volume's data path down."""
        try:
            self._slow(n)
        except Exception:
            unique = F.IN_HEADER.unpack_from(self.buf)[2]
            log.exception("FUSE request %d failed", unique)
            try:
                self.reply(unique, -errno.EIO, None)
            except OSError:  # it had been answered before the failure: the kernel says so
                pass

    def _slow(self, n: int) -> None:
        core = self.core
        assert core is not None
        buf = self.buf
        length, opcode, unique, nodeid = F.IN_HEADER.unpack_from(buf)[:4]
        if opcode == F.WRITE:
            if n < 80:
                self.reply(unique, -errno.EINVAL, None)
                return
            _, off, size = F.RW_IN.unpack_from(buf, 40)[:3]
            if n - 80 < size:  # shorter than it says
                self.reply(unique, -errno.EINVAL, None)
                return
            core.submit_write(unique, wire.WRITE, off, size, self.mv[80:80 + size])
        elif opcode == F.READ:
            if n < 80:
                self.reply(unique, -errno.EINVAL, None)
                return
            _, off, size = F.RW_IN.unpack_from(buf, 40)[:3]
            if off >= self.size:
                self.reply(unique, 0, b"")
            else:
                core.submit_read(unique, off, min(size, self.size - off))
        elif opcode == F.FSYNC:
            core.submit_sync(unique)
        else:
            self._other(opcode, unique, nodeid, n)

    def _attr(self, nodeid: int) -> bytes:
        if nodeid == F.ROOT_ID:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o600, self.size, 1
        t = self.now
        return F.ATTR.pack(nodeid, size, size // 512, t, t, t, 0, 0, 0, mode, nlink, 0, 0, 0,
                           4096, 0)

    def _other(self, opcode: int, unique: int, nodeid: int, n: int) -> None:
        core = self.core
        assert core is not None
        r = self.reply
        if opcode in (F.FORGET, F.BATCH_FORGET, F.INTERRUPT):
            return  # no reply expected
        if opcode == F.LOOKUP:
            name = bytes(self.buf[40:n]).rstrip(b"\0")
            if nodeid == F.ROOT_ID and name == F.FILE_NAME:
                r(unique, 0, F.ENTRY_OUT.pack(F.FILE_ID, 1, ATTR_VALID_S, ATTR_VALID_S, 0, 0)
                  + self._attr(F.FILE_ID))
            else:
                r(unique, -errno.ENOENT, None)
        elif opcode == F.GETATTR:
            if nodeid not in (F.ROOT_ID, F.FILE_ID):
                r(unique, -errno.ENOENT, None)
            else:
                r(unique, 0, F.ATTR_OUT.pack(ATTR_VALID_S, 0, 0) + self._attr(nodeid))
        elif opcode == F.SETATTR:
            valid = F.SETATTR_IN.unpack_from(self.buf, 40)[0]
            size = F.SETATTR_IN.unpack_from(self.buf, 40)[3]
            if valid & F.FATTR_SIZE and size != self.size:
                r(unique, -errno.EPERM, None)  # a mirrored volume is resized by the control plane
            else:
                r(unique, 0, F.ATTR_OUT.pack(ATTR_VALID_S, 0, 0) + self._attr(nodeid))
        elif opcode == F.OPEN:
            # direct I/O with a shared inode lock: concurrent writes from the loop device
            # reach us in parallel instead of one at a time through the page-cache path
            r(unique, 0, F.OPEN_OUT.pack(1, F.FOPEN_DIRECT_IO | F.FOPEN_PARALLEL_DIRECT_WRITES, 0))
        elif opcode == F.OPENDIR:
            r(unique, 0, F.OPEN_OUT.pack(1, 0, 0))
        elif opcode in (F.FLUSH, F.RELEASE, F.RELEASEDIR, F.FSYNCDIR, F.ACCESS):
            r(unique, 0, None)
        elif opcode == F.FALLOCATE:
            _, off, length, mode, _ = F.FALLOCATE_IN.unpack_from(self.buf, 40)
            if mode & F.FALLOC_FL_PUNCH_HOLE:
                core.submit_write(unique, wire.DISCARD, off, length, None)
            elif mode & F.FALLOC_FL_ZERO_RANGE:
                core.submit_write(unique, wire.WRITE_ZEROES, off, length, None)
            elif mode & ~F.FALLOC_FL_KEEP_SIZE == 0 and off + length <= self.size:
                # preallocation inside the fixed size: space is the replicas' business
                r(unique, 0, None)
            else:
                r(unique, -errno.EOPNOTSUPP, None)  # refused explicitly, never silently dropped
        elif opcode == F.READDIR:
            off = F.RW_IN.unpack_from(self.buf, 40)[1]
            out = b""
            entries = ((1, b".", 4), (1, b"..", 4), (F.FILE_ID, F.FILE_NAME, 8))
            for i, (ino, name, typ) in enumerate(entries):
                if i < off:
                    continue
                ent = F.DIRENT.pack(ino, i + 1, len(name), typ) + name
                out += ent + b"\0" * (-len(ent) % 8)
            r(unique, 0, out)
        elif opcode == F.STATFS:
            blocks = self.size // 4096
            r(unique, 0,
              F.STATFS_OUT.pack(blocks, 0, 0, 2, 0, 4096, 255, 4096, 0, 0, 0, 0, 0, 0, 0))
        elif opcode == F.DESTROY:
            r(unique, 0, None)
            self.destroyed = True
        else:
            r(unique, -errno.ENOSYS, None)
