"""The conformance suite's tests on mirrored volumes (`replicas: 3`, see conftest.py), in
mount and block mode: the same selection as tests/conformance/cluster/, which runs them on
local volumes."""

from tests.conformance.cluster.test_on_cluster import *  # noqa: F403
