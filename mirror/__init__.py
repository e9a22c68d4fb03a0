"""Synchronous mirroring across zones: replica service, FUSE frontend, resync.

See docs/mirror.md. The public entry points are ReplicaService (one per node),
Frontend (one per mirrored volume on the node that uses it) and the Arbiter
interface (compare-and-set on the control plane).
"""
