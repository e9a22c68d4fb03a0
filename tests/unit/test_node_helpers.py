"""Small pieces of the node path that need no root: the kernel's device-number format of
LOOP_GET_STATUS64, and the roll-back of a failed call."""

import os

import pytest

from engine.loopdev import _decode_huge_dev
from engine.rollback import Rollback


def huge_encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev() (include/linux/kdev_t.h), as lo_device carries it."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@pytest.mark.parametrize("major, minor", [(254, 0), (0, 45), (8, 17), (259, 300), (0, 1048575)])
def test_lo_device_decodes_to_the_st_dev_of_the_file(major, minor):
    assert _decode_huge_dev(huge_encode_dev(major, minor)) == os.makedev(major, minor)


def test_rollback_undoes_newest_first_only_on_failure_and_keeps_the_error():
    done = []
    with Rollback() as undo:
        undo.add("a", done.append, "a")
    assert done == []  # success: nothing undone

    def broken():
        raise OSError("undo step failed")

    with pytest.raises(KeyError), Rollback() as undo:
        undo.add("a", done.append, "a")
        undo.add("broken", broken)
        undo.add("b", done.append, "b")
        raise KeyError("the call failed")
    assert done == ["b", "a"]  # every step ran, newest first, despite one failing


def test_a_loop_device_detached_while_listed_is_skipped(tmp_path, monkeypatch):
    """Another process detaches a loop device while all() reads its attributes: sysfs
    answers ENODEV; the device is gone, not an error (seen once in the suite, breaking a
    driver's start-up)."""
    import errno as _errno

    from engine.loopdev import LoopDevices

    for name in ("loop0", "loop1"):
        d = tmp_path / "block" / name
        (d / "loop").mkdir(parents=True)
        (d / "queue").mkdir()
        (d / "loop" / "backing_file").write_text(f"/pool/{name}.img\n")
        (d / "dev").write_text(f"7:{name[-1]}\n")
        (d / "ro").write_text("0\n")
        (d / "loop" / "dio").write_text("1\n")
        (d / "queue" / "logical_block_size").write_text("4096\n")
        (d / "size").write_text("8\n")
    loops = LoopDevices(sys_root=str(tmp_path))
    real = loops._read

    def vanishing(name, rel):
        if name == "loop0" and rel == "loop/dio":
            raise OSError(_errno.ENODEV, "No such device")
        return real(name, rel)

    monkeypatch.setattr(loops, "_read", vanishing)
    assert [d.name for d in loops.all()] == ["loop1"]
def test_a_loop_device_detached_while_it_is_read_is_not_bound(tmp_path, monkeypatch):
    """sysfs answers ENODEV for a device another process detaches as we read it (seen with
    three node processes and other tests attaching side by side): "not bound", not an
    error that fails the caller's whole call (a stage, a pool's start)."""
    import errno

    from engine.loopdev import LoopDevices

    for name, backing in (("loop0", "/pool/a"), ("loop1", "/pool/b")):
        base = tmp_path / "block" / name
        (base / "loop").mkdir(parents=True)
        (base / "queue").mkdir()
        (base / "loop" / "backing_file").write_text(backing + "\n")
        (base / "loop" / "dio").write_text("1\n")
        (base / "dev").write_text("7:0\n")
        (base / "ro").write_text("0\n")
        (base / "size").write_text("2048\n")
        (base / "queue" / "logical_block_size").write_text("4096\n")
    import os

    real_open, real_read, real_close = os.open, os.read, os.close
    gone: set[int] = set()  # fds of the file that goes away (numbers are reused: see close)

    def sysfs_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if str(path).endswith("loop1/loop/backing_file"):
            gone.add(fd)
        return fd

    def sysfs_read(fd, n):
        if fd in gone:
            raise OSError(errno.ENODEV, "No such device")
        return real_read(fd, n)

    def sysfs_close(fd):
        gone.discard(fd)
        real_close(fd)

    monkeypatch.setattr("engine.loopdev.os.open", sysfs_open)
    monkeypatch.setattr("engine.loopdev.os.read", sysfs_read)
    monkeypatch.setattr("engine.loopdev.os.close", sysfs_close)
    loops = LoopDevices(sys_root=str(tmp_path), dev_root=str(tmp_path / "dev"))
    assert loops.get("loop1") is None
    assert [d.name for d in loops.all()] == ["loop0"]
    assert loops.identified({"b"}) == []
