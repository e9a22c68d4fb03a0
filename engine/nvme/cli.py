"""nvme-cli, the one way the NVMe backend talks to a controller's admin queue.

Machine-readable output (`-o json`) where nvme-cli has it; the few commands that only
print a line (create-ns, attach-ns) are parsed from that line. Every failure becomes the
domain error its NVMe status means (engine/nvme/status.py). The runner is injectable:
unit tests replay real nvme-cli outputs and exit statuses recorded from QEMU's emulated
controller and from drives with Namespace Management.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from engine import command
from engine.errors import CommandFailed, InvalidSpec
from engine.nvme import status as st

Runner = Callable[..., "subprocess.CompletedProcess[str]"]
ALL_NAMESPACES = 0xFFFFFFFF  # never a namespace of ours: delete-ns with it deletes them all
NS_MANAGEMENT_OACS_BIT = 1 << 3
FORMAT_OACS_BIT = 1 << 1
_CREATED = re.compile(r"created nsid:\s*(\d+)")


@dataclass(frozen=True)
class LbaFormat:
    index: int
    data_bytes: int
    metadata_bytes: int


@dataclass(frozen=True)
class ControllerInfo:
    cntlid: int
    subnqn: str
    oacs: int
    namespaces_max: int  # NN: the highest NSID the controller supports
    namespaces_allowed: int  # MNAN (0: not reported, NN applies)
    total_bytes: int  # TNVMCAP (0 where the drive does not report it)
    unallocated_bytes: int  # UNVMCAP
    model: str
    serial: str

    @property
    def advertises_ns_management(self) -> bool:
        return bool(self.oacs & NS_MANAGEMENT_OACS_BIT)

    @property
    def namespace_limit(self) -> int:
        return min(self.namespaces_max, self.namespaces_allowed or self.namespaces_max)


@dataclass(frozen=True)
class NamespaceInfo:
    nsid: int
    size_blocks: int  # NSZE
    capacity_blocks: int  # NCAP
    lba_format: int  # the FLBAS index in use
    lba_formats: tuple[LbaFormat, ...]
    nguid: str  # hex; all zeroes when the drive gives none
    eui64: str
    shareable: bool  # NMIC bit 0

    @property
    def block_bytes(self) -> int:
        for f in self.lba_formats:
            if f.index == self.lba_format:
                return f.data_bytes
        return 0

    @property
    def size_bytes(self) -> int:
        return self.size_blocks * self.block_bytes

    @property
    def exists(self) -> bool:
        return self.size_blocks > 0


def _int(value: object) -> int:
    """nvme-cli prints 128-bit fields (TNVMCAP, UNVMCAP) as decimal strings."""
    return int(str(value), 0) if value not in (None, "") else 0


def parse_id_ctrl(text: str) -> ControllerInfo:
    doc = json.loads(text)
    return ControllerInfo(
        cntlid=_int(doc.get("cntlid", 0)), subnqn=str(doc.get("subnqn", "")).strip(),
        oacs=_int(doc.get("oacs", 0)), namespaces_max=_int(doc.get("nn", 0)),
        namespaces_allowed=_int(doc.get("mnan", 0)), total_bytes=_int(doc.get("tnvmcap", 0)),
        unallocated_bytes=_int(doc.get("unvmcap", 0)), model=str(doc.get("mn", "")).strip(),
        serial=str(doc.get("sn", "")).strip())


def parse_id_ns(text: str, nsid: int) -> NamespaceInfo:
    doc = json.loads(text)
    formats = tuple(LbaFormat(i, 1 << _int(f.get("ds", 0)) if _int(f.get("ds", 0)) else 0,
                              _int(f.get("ms", 0)))
                    for i, f in enumerate(doc.get("lbafs", [])))
    return NamespaceInfo(
        nsid=nsid, size_blocks=_int(doc.get("nsze", 0)), capacity_blocks=_int(doc.get("ncap", 0)),
        lba_format=_int(doc.get("flbas", 0)) & 0xF, lba_formats=formats,
        nguid=str(doc.get("nguid", "")).lower(), eui64=str(doc.get("eui64", "")).lower(),
        shareable=bool(_int(doc.get("nmic", 0)) & 1))


def parse_nsid_list(text: str) -> list[int]:
    return [_int(e["nsid"]) for e in json.loads(text).get("nsid_list", [])]


class NvmeCli:
    """Admin commands to one controller, through its character device (/dev/nvmeN)."""

    def __init__(self, controller_dev: str, *, runner: Runner = command.run,
                 timeout_s: float = 60.0):
        self.dev = controller_dev
        self.runner = runner
        self.timeout_s = timeout_s

    def _run(self, what: str, args: list[str]) -> str:
        argv = ["nvme", what, self.dev, *args]
        try:
            proc = self.runner(argv, timeout_s=self.timeout_s, check=False)
        except CommandFailed as e:  # timed out, or nvme-cli missing
            raise st.classify(what, argv, e.returncode, e.stdout, e.stderr) from None
        if proc.returncode != 0:
            raise st.classify(what, argv, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    # --- reading ---------------------------------------------------------------------
    def id_ctrl(self) -> ControllerInfo:
        return parse_id_ctrl(self._run("id-ctrl", ["--output-format=json"]))

    def id_ns(self, nsid: int) -> NamespaceInfo:
        """An allocated namespace, attached or not (--force: Identify CNS 11h)."""
        _check_nsid(nsid)
        return parse_id_ns(self._run("id-ns", [f"--namespace-id={nsid}", "--force",
                                               "--output-format=json"]), nsid)

    def id_ns_common(self) -> NamespaceInfo:
        """The capabilities common to all namespaces (NSID FFFFFFFFh): the LBA formats a
        new namespace may have. Not every controller answers it (QEMU's does not)."""
        return parse_id_ns(self._run("id-ns", [f"--namespace-id={ALL_NAMESPACES}",
                                               "--output-format=json"]), ALL_NAMESPACES)

    def attached_nsids(self) -> list[int]:
        return parse_nsid_list(self._run("list-ns", ["--output-format=json"]))

    def allocated_nsids(self) -> list[int]:
        return parse_nsid_list(self._run("list-ns", ["--all", "--output-format=json"]))

    def probe_ns_management(self) -> st.NvmeStatus | None:
        """Send a Namespace Management command with a reserved SEL value: a controller that
        implements the command answers Invalid Field (nothing is created or deleted), one
        that does not answers Invalid Command Opcode. Returns the status (None: accepted,
        which no controller should)."""
        try:
            self._run("admin-passthru", ["--opcode=0x0d", "--cdw10=0xf"])
        except st.NvmeFailed as e:
            if e.status is None:
                raise
            return e.status
        return None

    # --- changing --------------------------------------------------------------------
    def create_ns(self, size_blocks: int, lba_format: int, shared: bool = True) -> int:
        """A new namespace of size_blocks logical blocks (fully provisioned); its NSID."""
        out = self._run("create-ns", [
            f"--nsze={size_blocks}", f"--ncap={size_blocks}", f"--flbas={lba_format}",
            "--dps=0", f"--nmic={1 if shared else 0}"])
        m = _CREATED.search(out)
        if m is None:
            raise InvalidSpec(f"nvme create-ns printed no namespace ID: {out.strip()!r}")
        return int(m.group(1))

    def delete_ns(self, nsid: int) -> None:
        _check_nsid(nsid)
        self._run("delete-ns", [f"--namespace-id={nsid}"])

    def attach_ns(self, nsid: int, cntlid: int) -> bool:
        """Attach; False when it already was (0x4118), True when this call attached it."""
        _check_nsid(nsid)
        try:
            self._run("attach-ns", [f"--namespace-id={nsid}", f"--controllers={cntlid}"])
        except st.NvmeFailed as e:
            if e.status is not None and e.status.key == st.NS_ALREADY_ATTACHED:
                return False
            raise
        return True

    def detach_ns(self, nsid: int, cntlid: int) -> bool:
        """Detach; False when it was not attached (0x411a)."""
        _check_nsid(nsid)
        try:
            self._run("detach-ns", [f"--namespace-id={nsid}", f"--controllers={cntlid}"])
        except st.NvmeFailed as e:
            if e.status is not None and e.status.key == st.NS_NOT_ATTACHED:
                return False
            raise
        return True

    def rescan(self) -> None:
        self._run("ns-rescan", [])

    def format_ns(self, nsid: int, lba_format: int, user_data_erase: bool = True) -> None:
        """Format (Secure Erase Setting 1: user data erase), keeping the LBA format."""
        _check_nsid(nsid)
        self._run("format", [f"--namespace-id={nsid}", f"--lbaf={lba_format}",
                             f"--ses={1 if user_data_erase else 0}", "--force"])


def _check_nsid(nsid: int) -> None:
    """NSID 0 and FFFFFFFFh address no namespace or all of them: never sent."""
    if not 0 < nsid < ALL_NAMESPACES:
        raise InvalidSpec(f"namespace ID {nsid} addresses no single namespace")
