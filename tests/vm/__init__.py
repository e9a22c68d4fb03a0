"""A throw-away QEMU guest for tests that need a kernel this machine does not have.

See guest.py: a Debian kernel (package linux-image-amd64) boots in a few seconds with the
host's root filesystem shared read-only over virtio-9p, runs one command and powers off.
"""
