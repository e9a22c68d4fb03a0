from engine.mounts import parse_mountinfo

SAMPLE = (
    "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    "100 29 0:5 /loop7 /tmp/t/target ro,relatime shared:2 - devtmpfs udev rw,size=10k\n"
    "garbage line\n"
)


def test_parse_mountinfo():
    a, b = parse_mountinfo(SAMPLE)
    assert a.target == "/mnt/with space"
    assert (a.major, a.minor) == (98, 0)
    assert a.root == "/mnt1" and a.fs_type == "ext3" and a.source == "/dev/root"
    assert not a.read_only
    assert b.read_only and b.root == "/loop7" and b.fs_type == "devtmpfs"
