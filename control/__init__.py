"""Tandem's control plane: cluster records in a versioned store (SQLite or etcd), leases
and leader election, the node API, placement, and the controller logic behind the CSI
Controller service.

Arrows: csi/ -> control/ -> node API (control/node_api.py). control/ may import engine/'s
leaf modules (domain errors, QoS specs, locks) and, in control/local_node.py only, the
engine itself (the node side of the node API); never csi/. engine/ and mirror/ never
import control/.
"""
