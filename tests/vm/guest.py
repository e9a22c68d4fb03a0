"""Run one command in a QEMU guest with a Debian kernel and the host's root filesystem.

    from tests.vm import guest
    result = guest.run([sys.executable, "-m", "tests.vm.qos_v2_guest"], cwd=REPO)
    result.returncode, result.output, result.console

What the guest is:
- the newest Debian kernel under /boot whose modules (/lib/modules/<version>) have virtio-9p
  (package linux-image-amd64; the host itself may run another kernel);
- an initramfs built here, at first use, from busybox-static and those kernel modules, and kept
  in /var/cache/tandem-vm (keyed by kernel, busybox and init script);
- optional scratch virtio disks: sparse files that live as long as the run;
- optionally QEMU's emulated NVMe: one subsystem (`nvme-subsys`, its NQN given), one
  controller in it, and namespaces backed by sparse files, attached or detached at start
  (`NvmeSetup`); the guest loads nvme-core and nvme;
- the host's `/` shared read-only over virtio-9p (no daemon) and used as the guest's root, so
  python, fio and losetup are the host's own; tmpfs on /tmp, /run, /var/tmp, /dev/shm, and
  cgroup2 on /sys/fs/cgroup (nothing else: no v1 hierarchies, no systemd);
- a second, writable 9p share (a temporary directory here) that carries the job in and its
  output and exit code out; the serial console (kernel messages) goes to a file;
- no network device at all;
- KVM when /dev/kvm is backed by VT-x or AMD-V, else TCG. This machine's /dev/kvm is kvm_pvm,
  which only boots PVM guest kernels, so here it is TCG: the kernel is up in ~3 s (guest
  uptime), a trivial command takes ~9 s from QEMU's start to its exit. TANDEM_VM_ACCEL=tcg
  (or kvm) overrides the choice;
- `poweroff -f` when the command ends. QEMU is killed and the temporary directory removed
  whatever happens.

Host paths the guest's tmpfs mounts would hide (a checkout under /tmp, say) are shared too,
read-only, at the same path: `cwd` automatically, others through `share`.

Errors: `GuestUnavailable` when the guest cannot be built or booted (missing package, no
kernel with 9p, QEMU failure, boot timeout), with the reason and the console's tail; a command
that fails is not an error: see `GuestResult.returncode`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

CACHE_DIR = "/var/cache/tandem-vm"
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
# Loaded in this order after their dependencies (modules.dep); those built in are skipped.
# ext4 looks its checksum up by name (crc32c) and no modprobe runs here to load it then;
# xfs (reflink) holds the loop-backend pool of the NVMe benchmark.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_blk", "loop", "nvme_core", "nvme",
           "crc32c_generic", "ext4", "xfs")
# Where the guest mounts a fresh tmpfs over the host's directory.
GUEST_TMPFS = ("/tmp", "/run", "/var/tmp")
JOB_MOUNT = "/run/tandem-job"
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C",
    "TMPDIR": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",  # the root is read-only
    "TANDEM_IN_GUEST": "1",
}
KVM_BOOT_TIMEOUT_S = 30.0
TCG_BOOT_TIMEOUT_S = 120.0
TCG_SLOWDOWN = 3.0  # run()'s timeout_s is stretched by this much without KVM
STALE_INITRAMFS_S = 7 * 24 * 3600.0  # an initramfs of another key unused this long goes

_VERSION_PART = re.compile(r"(\d+)")


class GuestUnavailable(Exception):
    """The guest could not be built or booted; the message says why."""


@dataclass(frozen=True)
class GuestKernel:
    version: str
    vmlinuz: str
    modules_dir: str


@dataclass(frozen=True)
class NvmeSetup:
    """QEMU's emulated NVMe for one run: a subsystem with one controller and namespaces
    NSID 1..n of these sizes (sparse files here), detached from the controller at start
    unless `attached` says otherwise."""

    nqn: str
    namespaces_mib: tuple[int, ...]
    serial: str = "tandem-nvme0"
    attached: tuple[bool, ...] = ()  # per namespace; default: all detached

    def qemu_args(self, image_dir: str) -> list[str]:
        args = ["-device", f"nvme-subsys,id=nvmesubsys0,nqn={_opt(self.nqn)}",
                "-device", f"nvme,serial={_opt(self.serial)},subsys=nvmesubsys0"]
        for i, size_mib in enumerate(self.namespaces_mib):
            image = os.path.join(image_dir, f"nvme-ns{i + 1}.img")
            with open(image, "wb") as f:
                f.truncate(size_mib * 1024 * 1024)
            attached = self.attached[i] if i < len(self.attached) else False
            args += [
                "-drive", f"file={_opt(image)},format=raw,if=none,id=nvmens{i + 1},"
                          "cache=unsafe,aio=threads",
                "-device", f"nvme-ns,drive=nvmens{i + 1},nsid={i + 1},"
                           f"detached={'off' if attached else 'on'},shared=on",
            ]  # fmt: skip
        return args


@dataclass(frozen=True)
class GuestResult:
    returncode: int
    output: str  # the command's stdout and stderr, interleaved
    console: str  # the serial console: kernel messages and the init's own lines
    accel: str  # "kvm" or "tcg"
    kernel: str  # the guest kernel's version
    boot_s: float  # guest uptime when the command started
    wall_s: float  # QEMU start to exit, as seen from the host


# --- what the guest is made of -----------------------------------------------------------


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in _VERSION_PART.split(version)]


def find_kernel(boot_dir: str = "/boot", modules_root: str = "/lib/modules") -> GuestKernel:
    """The newest kernel under boot_dir whose modules include virtio-9p."""
    found = []
    for vmlinuz in glob.glob(os.path.join(boot_dir, "vmlinuz-*")):
        version = os.path.basename(vmlinuz)[len("vmlinuz-") :]
        mdir = os.path.join(modules_root, version)
        if os.path.isfile(os.path.join(mdir, "modules.dep")) and (
            _module_path(mdir, "9pnet_virtio") or _builtin(mdir, "9pnet_virtio")
        ):
            found.append(GuestKernel(version, vmlinuz, mdir))
    if not found:
        raise GuestUnavailable(
            f"no kernel in {boot_dir} with virtio-9p modules in {modules_root}: "
            "install linux-image-amd64 (scripts/install.sh does)"
        )
    return max(found, key=lambda k: _version_key(k.version))


def _module_deps(modules_dir: str) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    with open(os.path.join(modules_dir, "modules.dep"), encoding="utf-8") as f:
        for line in f:
            if ":" in line:
                mod, rest = line.split(":", 1)
                deps[mod.strip()] = rest.split()
    return deps


def _module_name(rel_path: str) -> str:
    base = os.path.basename(rel_path)
    return base.split(".ko", 1)[0].replace("-", "_")


def _module_path(modules_dir: str, name: str) -> str | None:
    for rel in _module_deps(modules_dir):
        if _module_name(rel) == name.replace("-", "_"):
            return rel
    return None


def _builtin(modules_dir: str, name: str) -> bool:
    try:
        with open(os.path.join(modules_dir, "modules.builtin"), encoding="utf-8") as f:
            return any(_module_name(line.strip()) == name.replace("-", "_") for line in f)
    except FileNotFoundError:
        return False


def module_load_order(modules_dir: str, wanted: Iterable[str] = MODULES) -> list[str]:
    """Relative paths of the wanted modules and their dependencies, dependencies first."""
    deps = _module_deps(modules_dir)
    by_name = {_module_name(rel): rel for rel in deps}
    order: list[str] = []

    def visit(rel: str) -> None:
        if rel in order:
            return
        for dep in deps.get(rel, []):
            visit(dep)
        order.append(rel)

    for name in wanted:
        rel = by_name.get(name.replace("-", "_"))
        if rel is not None:
            visit(rel)
        elif not _builtin(modules_dir, name):
            raise GuestUnavailable(f"kernel module {name} is neither in {modules_dir} nor built in")
    return order


def _is_static_elf(path: str) -> bool:
    """True for an ELF64 executable without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


# The guest's PID 1 (busybox ash). The job share carries `mounts` (extra 9p shares: tag and
# path), `job.sh` (run chrooted in the host's root), and receives `booted`, `output`, `rc`.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "tandem-guest: $*"; }
die() { say "FAILED: $*"; poweroff -f; sleep 5; reboot -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
  insmod "/lib/modules/$m" || die "insmod $m"
done < /etc/tandem-modules
p9=trans=virtio,version=9p2000.L,msize=262144
mount9p() {  # tag dir options: the virtio device may still be probing, so a few tries
  i=0
  until mount -t 9p -o "$p9,$3" "$1" "$2" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -ge 50 ] && die "mount 9p $1 on $2"; sleep 0.1
  done
}
R=/newroot
mkdir -p $R
mount9p hostroot $R ro,cache=loose
for d in /tmp /run /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs $R$d || die "tmpfs $d"; done
mount -t proc proc $R/proc || die "proc"
mount -t sysfs sysfs $R/sys || die "sysfs"
mount -t devtmpfs devtmpfs $R/dev || die "devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || die "cgroup2"
J=$R@JOB@
mkdir -p $J
mount9p job $J rw,cache=none
while read -r tag path; do
  [ -n "$tag" ] || continue
  mkdir -p "$R$path" && mount9p "$tag" "$R$path" ro,cache=loose
done < $J/mounts
hostname tandem-guest
ip link set lo up 2>/dev/null
cut -d' ' -f1 /proc/uptime > $J/booted
say "running job (uptime $(cat $J/booted) s)"
chroot $R /bin/sh @JOB@/job.sh > $J/output 2>&1 < /dev/null
echo $? > $J/rc
say "job exited $(cat $J/rc)"
sync
poweroff -f
sleep 5
reboot -f
"""


def _init_script() -> str:
    return INIT_SCRIPT.replace("@JOB@", JOB_MOUNT)


def build_initramfs(kernel: GuestKernel, cache_dir: str = CACHE_DIR) -> str:
    """The initramfs (uncompressed newc cpio) for `kernel`, built once and cached."""
    if not os.path.isfile(BUSYBOX) or not _is_static_elf(BUSYBOX):
        raise GuestUnavailable(
            f"{BUSYBOX} missing or not statically linked: install busybox-static "
            "(scripts/install.sh does)"
        )
    if shutil.which("cpio") is None:
        raise GuestUnavailable("cpio missing: install cpio (scripts/install.sh does)")
    modules = module_load_order(kernel.modules_dir)
    bb = os.stat(BUSYBOX)
    key = hashlib.sha256(
        "\n".join(
            [kernel.version, str(bb.st_size), str(bb.st_mtime_ns), _init_script(), *modules]
        ).encode()
    ).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"initramfs-{kernel.version}-{key}.cpio")
    if os.path.isfile(target):
        return target
    stage = tempfile.mkdtemp(prefix="tandem-vm-initramfs-")
    try:
        for d in ("bin", "dev", "etc", "proc", "sys", "newroot", "lib/modules"):
            os.makedirs(os.path.join(stage, d), exist_ok=True)
        shutil.copy2(BUSYBOX, os.path.join(stage, "bin/busybox"))
        for rel in modules:
            dest = os.path.join(stage, "lib/modules", rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(os.path.join(kernel.modules_dir, rel), dest)
        with open(os.path.join(stage, "etc/tandem-modules"), "w", encoding="ascii") as f:
            f.write("".join(rel + "\n" for rel in modules))
        init = os.path.join(stage, "init")
        with open(init, "w", encoding="ascii") as f:
            f.write(_init_script())
        os.chmod(init, 0o755)
        names = subprocess.run(
            ["find", ".", "-mindepth", "1"], cwd=stage, check=True, capture_output=True
        ).stdout
        tmp = target + f".tmp{os.getpid()}"
        with open(tmp, "wb") as out:
            subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                cwd=stage,
                input=names,
                stdout=out,
                check=True,
                timeout=60,
            )
        os.replace(tmp, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for old in glob.glob(os.path.join(cache_dir, "initramfs-*.cpio")):
        # built for another kernel, busybox, init script or module list; another checkout
        # on this machine may be booting it right now, so only stale ones go
        if old != target:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(old).st_mtime > STALE_INITRAMFS_S:
                    os.unlink(old)
    return target


def kvm_usable(sys_module: str = "/sys/module") -> bool:
    """Can KVM run an ordinary kernel here? It needs /dev/kvm backed by VT-x or AMD-V
    (kvm_intel, kvm_amd). Some cloud machines offer /dev/kvm through kvm_pvm instead, which
    only boots kernels built as PVM guests: a Debian kernel hangs there after the real-mode
    setup, so such a /dev/kvm counts as unusable and the guest runs under TCG."""
    if not any(os.path.isdir(os.path.join(sys_module, m)) for m in ("kvm_intel", "kvm_amd")):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _accel() -> str:
    forced = os.environ.get("TANDEM_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    return "kvm" if kvm_usable() else "tcg"


def _opt(value: str) -> str:
    """A value inside a QEMU option list, where a comma is written twice."""
    return value.replace(",", ",,")


def _hidden_in_guest(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in GUEST_TMPFS)


def _job_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    lines = ["# generated by tests/vm/guest.py", f"cd {shlex.quote(cwd)} || exit 125"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ""
    return data[-chars:].decode("utf-8", "replace")


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def run(
    argv: Sequence[str],
    *,
    cwd: str = "/",
    env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
    share: Iterable[str] = (),
    scratch_disks_mib: Sequence[int] = (),
    nvme: NvmeSetup | None = None,
    memory_mib: int = 1024,
    cpus: int = 2,
) -> GuestResult:
    """Boot the guest, run argv there (in cwd, with GUEST_ENV plus env), power off.

    scratch_disks_mib: sparse files of these sizes, made here for this run only, are the
    guest's virtio disks /dev/vda, /dev/vdb, ... (no filesystem on them).
    nvme: QEMU's emulated NVMe subsystem with namespaces (see NvmeSetup).

    timeout_s bounds the command (stretched TCG_SLOWDOWN times without KVM); booting has its
    own bound. On timeout the guest is killed and GuestUnavailable says how far it got.
    """
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise GuestUnavailable(f"{QEMU} missing: install qemu-system-x86 (scripts/install.sh does)")
    kernel = find_kernel()
    initramfs = build_initramfs(kernel)
    accel = _accel()
    boot_timeout = KVM_BOOT_TIMEOUT_S if accel == "kvm" else TCG_BOOT_TIMEOUT_S
    job_timeout = timeout_s if accel == "kvm" else timeout_s * TCG_SLOWDOWN
    cwd = os.path.abspath(cwd)
    # Only what the guest's tmpfs mounts hide needs a share of its own.
    wanted = [cwd, *(os.path.abspath(p) for p in share)]
    shares = list(dict.fromkeys(p for p in wanted if _hidden_in_guest(p)))

    tmp = tempfile.mkdtemp(prefix="tandem-vm-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        job_dir = os.path.join(tmp, "job")
        os.mkdir(job_dir)
        with open(os.path.join(job_dir, "job.sh"), "w", encoding="utf-8") as f:
            f.write(_job_script(argv, cwd, {**GUEST_ENV, **(env or {})}))
        with open(os.path.join(job_dir, "mounts"), "w", encoding="utf-8") as f:
            f.writelines(f"share{i} {path}\n" for i, path in enumerate(shares))
        console = os.path.join(tmp, "console.log")
        qemu_log = os.path.join(tmp, "qemu.log")
        cmd = [
            qemu,
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-monitor", "none",
            "-no-reboot",
            "-machine", "q35",
            "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(cpus),
            "-m", f"{memory_mib}M",
            "-kernel", kernel.vmlinuz,
            "-initrd", _opt(initramfs),
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init 8250.nr_uarts=1 tsc=reliable",
            "-serial", f"file:{_opt(console)}",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=job,path={_opt(job_dir)},security_model=none",
            "-device", "virtio-9p-pci,fsdev=job,mount_tag=job",
        ]  # fmt: skip
        for i, size_mib in enumerate(scratch_disks_mib):
            disk = os.path.join(tmp, f"disk{i}.img")
            with open(disk, "wb") as f:
                f.truncate(size_mib * 1024 * 1024)
            cmd += [
                "-drive",
                f"file={_opt(disk)},format=raw,if=none,id=disk{i},cache=unsafe,aio=threads",
                "-device", f"virtio-blk-pci,drive=disk{i},serial=tandem-scratch{i}",
            ]  # fmt: skip
        if nvme is not None:
            cmd += nvme.qemu_args(tmp)
        for i, path in enumerate(shares):
            cmd += [
                "-fsdev", f"local,id=share{i},path={_opt(path)},security_model=none,readonly=on",
                "-device", f"virtio-9p-pci,fsdev=share{i},mount_tag=share{i}",
            ]  # fmt: skip
        booted = os.path.join(job_dir, "booted")
        rc_file = os.path.join(job_dir, "rc")
        t0 = time.monotonic()
        with open(qemu_log, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = t0 + boot_timeout
        started = False
        while proc.poll() is None:
            if not started and os.path.exists(booted):
                started = True
                deadline = time.monotonic() + job_timeout
            if time.monotonic() > deadline:
                what = "the command" if started else "booting"
                limit = job_timeout if started else boot_timeout
                _kill(proc)
                raise GuestUnavailable(
                    f"guest ({accel}) timed out after {limit:.0f} s {what}; console:\n"
                    f"{_tail(console)}\noutput:\n{_tail(os.path.join(job_dir, 'output'))}"
                )
            time.sleep(0.05)
        wall = time.monotonic() - t0
        if not os.path.exists(rc_file):
            raise GuestUnavailable(
                f"guest ({accel}, kernel {kernel.version}) ended (QEMU exit {proc.returncode}) "
                f"without running the command to its end; QEMU said:\n{_tail(qemu_log)}\n"
                f"console:\n{_tail(console)}\noutput:\n{_tail(os.path.join(job_dir, 'output'))}"
            )
        with open(rc_file, encoding="ascii") as f:
            returncode = int(f.read().strip())
        with open(booted, encoding="ascii") as f:
            boot_s = float(f.read().strip())
        return GuestResult(
            returncode=returncode,
            output=_read_text(os.path.join(job_dir, "output")),
            console=_read_text(console),
            accel=accel,
            kernel=kernel.version,
            boot_s=boot_s,
            wall_s=wall,
        )
    finally:
        if proc is not None:
            _kill(proc)
        shutil.rmtree(tmp, ignore_errors=True)
