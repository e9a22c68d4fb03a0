"""Per-volume I/O tiers on the node: cgroup limits, admission of minima, squeeze loop.

Modules have one job each (see docs/qos.md); import them directly, e.g.
`from engine.qos.throttle import QosEnforcer`. Nothing here imports grpc or csi/.
"""
