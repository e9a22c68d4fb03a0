"""Data through published volumes: it survives unpublish, unstage and a new stage, and a
read-only publish refuses writes in the kernel (not only by convention)."""

from __future__ import annotations

import errno
import os

from tests.conformance.helpers import SMALL, loops_left_under

PATTERN = os.urandom(256 * 1024)
END = SMALL - len(PATTERN)  # the block device's last bytes


def write_pattern(access_type: str, target: str) -> None:
    if access_type == "mount":
        with open(os.path.join(target, "pattern.bin"), "wb") as f:
            f.write(PATTERN)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        return
    fd = os.open(target, os.O_RDWR)
    try:
        assert os.pwrite(fd, PATTERN, 0) == len(PATTERN)
        assert os.pwrite(fd, PATTERN, END) == len(PATTERN)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pattern(access_type: str, target: str) -> list[bytes]:
    if access_type == "mount":
        with open(os.path.join(target, "pattern.bin"), "rb") as f:
            return [f.read()]
    fd = os.open(target, os.O_RDONLY)
    try:
        return [os.pread(fd, len(PATTERN), 0), os.pread(fd, len(PATTERN), END)]
    finally:
        os.close(fd)


def test_data_survives_unstage_and_restage(co, access_type):
    vol = co.create(access_type=access_type)
    staging = co.stage(vol.volume_id, access_type)
    target = co.publish(vol.volume_id, access_type, staging)
    write_pattern(access_type, target)
    co.unpublish(vol.volume_id, target)
    co.unstage(vol.volume_id, staging)
    assert loops_left_under(co.pool_dir) == []  # all of it reached the file

    staging = co.stage(vol.volume_id, access_type, staging)
    target = co.publish(vol.volume_id, access_type, staging)  # a new target
    assert all(chunk == PATTERN for chunk in read_pattern(access_type, target))


def test_read_only_publish_refuses_writes(co, access_type):
    vol = co.create(access_type=access_type)
    staging = co.stage(vol.volume_id, access_type)
    rw = co.publish(vol.volume_id, access_type, staging)
    write_pattern(access_type, rw)
    ro = co.publish(vol.volume_id, access_type, staging, readonly=True)
    assert all(chunk == PATTERN for chunk in read_pattern(access_type, ro))

    if access_type == "mount":
        for path, mode in [(os.path.join(ro, "new.bin"), "wb"),
                           (os.path.join(ro, "pattern.bin"), "r+b")]:
            try:
                with open(path, mode) as f:
                    f.write(b"must not land")
                raise AssertionError(f"writing {path} through a read-only publish worked")
            except OSError as e:
                assert e.errno == errno.EROFS, e
    else:
        try:
            fd = os.open(ro, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\0" * len(PATTERN), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            raise AssertionError("writing through a read-only block publish worked")
        except OSError as e:
            assert e.errno in (errno.EROFS, errno.EPERM), e
    assert all(chunk == PATTERN for chunk in read_pattern(access_type, rw))
