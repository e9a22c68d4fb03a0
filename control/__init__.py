"""Tandem's control plane: cluster records in a versioned store, the node API, placement,
and the controller logic behind the CSI Controller service.

Arrows: csi/ -> control/ -> node API (control/node_api.py). The engine is reached only
through the node API (control/local_node.py in-process, a gRPC client in a cluster).
engine/ and mirror/ never import this package.
"""
