"""The control plane: cluster state (store), leases and leader election.

Layering: control/ may import engine/ (its domain errors) but never csi/; engine/ and
mirror/ never import control/.
"""
