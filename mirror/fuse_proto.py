"""The /dev/fuse kernel protocol: just the opcodes and structs we speak (7.40+)."""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 41  # we need FUSE_NOTIFY_RESEND (7.40); the kernel answers with min(ours, its)

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, GETXATTR, LISTXATTR, FLUSH, INIT = 20, 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 34, 36, 38, 42, 43
READDIRPLUS, LSEEK, SYNCFS, STATX = 44, 46, 50, 52

# notify codes (written with unique=0, error=code)
NOTIFY_INVAL_INODE = 2
NOTIFY_RESEND = 7
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # nodeid, offset (< 0: attributes only), length

# INIT flags (flags | flags2 << 32)
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
HAS_RESEND = 1 << 39
WRITEBACK_CACHE = 1 << 16  # never: it would acknowledge before the replicas have the data

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# fallocate modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

ROOT_ID = 1
FILE_ID = 2
FILE_NAME = b"volume"

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (+ flags2 with INIT_EXT)
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")  # ... flags2, unused[7]
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs (+ ATTR)
ATTR_OUT = struct.Struct("<QII")  # attr_valid, nsec, dummy (+ ATTR)
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
RW_IN = struct.Struct("<QQIIQII")  # fh, offset, size, flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
STATFS_OUT = struct.Struct("<QQQQQIIII6I")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
FATTR_SIZE = 1 << 3
