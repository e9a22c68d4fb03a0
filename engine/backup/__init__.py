"""Backups to S3-compatible object storage: format, client, upload and restore jobs.

Imports engine/ (domain errors, extent maps, the node store) and never csi/, control/ or
grpc: the node runs the jobs, the control plane (control/backups.py) drives them.
"""
