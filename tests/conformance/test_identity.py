"""Identity service: plugin info, plugin capabilities, Probe."""

import re

from proto import csi_pb2
from tests.conformance.helpers import OK, call, ok

PluginCap = csi_pb2.PluginCapability
# What csi-sanity's identity spec accepts; anything else (UNKNOWN included) fails it.
KNOWN_SERVICES = {
    PluginCap.Service.CONTROLLER_SERVICE,
    PluginCap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    PluginCap.Service.GROUP_CONTROLLER_SERVICE,
    PluginCap.Service.SNAPSHOT_METADATA_SERVICE,
}
KNOWN_EXPANSION = {PluginCap.VolumeExpansion.ONLINE, PluginCap.VolumeExpansion.OFFLINE}


def test_plugin_info_name_is_valid(stubs):
    info = ok(stubs.identity.GetPluginInfo, csi_pb2.GetPluginInfoRequest())
    assert 0 < len(info.name) <= 63
    assert re.fullmatch(r"[a-zA-Z][A-Za-z0-9-._]{0,61}[a-zA-Z]", info.name), info.name
    assert info.vendor_version


def test_plugin_capabilities_are_all_known(stubs):
    caps = ok(stubs.identity.GetPluginCapabilities,
              csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = set()
    for cap in caps:
        kind = cap.WhichOneof("type")
        assert kind in ("service", "volume_expansion"), cap
        if kind == "service":
            assert cap.service.type in KNOWN_SERVICES, cap
            services.add(cap.service.type)
        else:
            assert cap.volume_expansion.type in KNOWN_EXPANSION, cap
    # Without these the sanity suite skips its controller and topology checks.
    assert PluginCap.Service.CONTROLLER_SERVICE in services
    assert PluginCap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in services


def test_probe_is_ok_and_ready(stubs):
    rsp = ok(stubs.identity.Probe, csi_pb2.ProbeRequest(), repeat=3)
    assert rsp.HasField("ready") and rsp.ready.value


def test_probe_when_not_ready_is_still_ok(driver, stubs):
    driver.driver.ready.clear()  # as during start-up or shutdown
    try:
        code, rsp, details = call(stubs.identity.Probe, csi_pb2.ProbeRequest())
        assert code == OK, f"Probe must not fail when not ready: {code.name}: {details}"
        assert rsp.HasField("ready") and not rsp.ready.value
    finally:
        driver.driver.ready.set()
    assert ok(stubs.identity.Probe, csi_pb2.ProbeRequest()).ready.value
