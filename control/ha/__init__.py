"""The HA controller: moves pods off a node whose mirror frontends lost their etcd leases.

decide.py   the decision, a pure function (store view + Kubernetes objects -> actions)
tracker.py  follows `frontend/` in etcd: which frontends vanished while serving
kube.py     reads the Kubernetes objects and applies actions (idempotent, with retries)
main.py     `tandem-ha`: the process (both replicas watch, the etcd-elected leader acts)
"""
