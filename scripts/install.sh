#!/usr/bin/env bash
# Install Tandem and what it needs on a Debian (bookworm or later) machine, as root.
#   scripts/install.sh          the driver, into $TANDEM_VENV (default /opt/tandem/venv),
#                               with `tandem-csi` linked into /usr/local/bin
#   scripts/install.sh --dev    the same, editable, with the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TANDEM_VENV:-/opt/tandem/venv}"
dev=0
[ "${1:-}" = "--dev" ] && dev=1

# the driver: Python and a compiler (the mirror's C fast path), filesystems, loop devices,
# fio (measures the pool's IOPS once), FUSE (the mirror's frontend)
packages=(python3 python3-venv python3-pip python3-dev gcc libc6-dev xfsprogs e2fsprogs btrfs-progs
          util-linux mount fio fuse3 kmod iproute2)
if [ "$dev" = 1 ]; then
  # the tests: namespaces and firewall rules for zones; the QEMU guest of tests/vm (cgroup v2
  # io.max): a Debian kernel with 9p, busybox for its initramfs; tiny-initramfs satisfies the
  # kernel's initramfs dependency without udev/systemd; etcd members for the cluster store's
  # tests, and openssl for their certificates; a one-node Ceph (monitor, memstore OSD,
  # radosgw) on loopback: the real S3 server the backup tests run against
  packages+=(iptables qemu-system-x86 linux-image-amd64 tiny-initramfs busybox-static cpio nvme-cli
             etcd-server openssl ceph-mon ceph-osd radosgw)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no recommends: the QEMU and kernel packages would pull in a desktop stack
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
if [ "$dev" = 1 ]; then
  "$venv/bin/python" -m pip install -q -e ".[dev]"
else
  "$venv/bin/python" -m pip install -q .
  ln -sf "$venv/bin/tandem-csi" /usr/local/bin/tandem-csi
fi
modprobe loop 2>/dev/null || true
echo "installed tandem-csi into $venv"
