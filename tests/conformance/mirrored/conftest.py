"""The conformance suite's lifecycle tests on mirrored volumes: the cluster of
tests/conformance/cluster/ with its nodes serving replicas and frontends, and every
volume the suite makes asked for with `replicas: 3` (one per zone). Node calls go to the
test's home node: it is in a zone of every volume."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from proto import csi_pb2
from tests.cluster import RETRIED_BY_THE_PROVISIONER, running
from tests.conformance.cluster.conftest import ClusterCO, driver  # noqa: F401 (fixture)
from tests.conformance.helpers import SNW


@pytest.fixture(scope="package")
def cluster(request):
    with running(request, "tdm-conf-mirrored-", mirror=True) as c:
        yield c


class MirroredCO(ClusterCO):
    """Asks for `replicas: 3`, and stages and publishes as a CO with the attacher does:
    ControllerPublish to the home node first (the new generation that fences older
    frontends), its publish_context and the volume's context in every node call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the devices a mirrored volume is used through are the frontends' (their loop
        # devices on the FUSE files under the home node's frontends dir), not the pool's
        self.pool_dir = os.path.realpath(os.path.join(self.driver.home.state_dir,
                                                      "frontends"))
        self.volume_contexts: dict[str, dict[str, str]] = {}
        self.publish_contexts: dict[str, dict[str, str]] = {}

    def create_request(self, *args, **kwargs) -> csi_pb2.CreateVolumeRequest:
        req = super().create_request(*args, **kwargs)
        req.parameters.setdefault("replicas", "3")
        return req

    def create(self, *args, **kwargs) -> csi_pb2.Volume:
        vol = super().create(*args, **kwargs)
        self.volume_contexts[vol.volume_id] = dict(vol.volume_context)
        return vol

    def _contexts(self, volume_id: str, access_type: str,
                  mode: int) -> tuple[dict[str, str], dict[str, str]]:
        if volume_id not in self.volume_contexts:  # a volume nobody made: as asked
            return {}, {}
        if volume_id not in self.publish_contexts:
            rsp = self.controller_publish(volume_id, access_type, mode=mode)
            self.publish_contexts[volume_id] = dict(rsp.publish_context)
        return self.volume_contexts[volume_id], self.publish_contexts[volume_id]

    def stage_request(self, volume_id, staging, access_type, mode=SNW, fs_type=""):
        req = super().stage_request(volume_id, staging, access_type, mode, fs_type)
        volume_context, publish_context = self._contexts(volume_id, access_type, mode)
        req.volume_context.update(volume_context)
        req.publish_context.update(publish_context)
        return req

    def publish_request(self, volume_id, staging, target, access_type, *, readonly=False,
                        mode=SNW, fs_type=""):
        req = super().publish_request(volume_id, staging, target, access_type,
                                      readonly=readonly, mode=mode, fs_type=fs_type)
        volume_context, publish_context = self._contexts(volume_id, access_type, mode)
        req.volume_context.update(volume_context)
        req.publish_context.update(publish_context)
        return req

    def cleanup(self) -> list[str]:
        # As the provisioner does: a DeleteVolume right after NodeUnstage may find a
        # replica its stopping frontend still holds; it is retried until it goes.
        for made in list(self.made.values()):
            for target in made.targets:
                self._retry(self.stubs.node.NodeUnpublishVolume,
                            csi_pb2.NodeUnpublishVolumeRequest(volume_id=made.volume_id,
                                                               target_path=target))
            for staging in made.stagings:
                self._retry(self.stubs.node.NodeUnstageVolume,
                            csi_pb2.NodeUnstageVolumeRequest(volume_id=made.volume_id,
                                                             staging_target_path=staging))
            for node_id in made.published_to:
                self._retry(self.stubs.controller.ControllerUnpublishVolume,
                            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=made.volume_id,
                                                                     node_id=node_id))
            self._retry(self.stubs.controller.DeleteVolume,
                        csi_pb2.DeleteVolumeRequest(volume_id=made.volume_id))
        return super().cleanup()

    @staticmethod
    def _retry(method, request, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                method(request)
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return
                if e.code() not in RETRIED_BY_THE_PROVISIONER \
                        or time.monotonic() > deadline:
                    return  # the suite's own cleanup reports it
                time.sleep(0.2)


@pytest.fixture
def co(driver, test_root):  # noqa: F811 (the imported fixture)
    orchestrator = MirroredCO(driver, test_root)
    yield orchestrator
    errors = orchestrator.cleanup()
    assert not errors, "the sanity-style cleanup after the test failed:\n" + "\n".join(errors)
