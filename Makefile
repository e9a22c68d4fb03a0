PY ?= python3
ETCD_PROTOS = proto/etcd/kv.proto proto/etcd/auth.proto proto/etcd/rpc.proto

.PHONY: proto lint test bench

proto:
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. proto/csi.proto
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. proto/agent.proto
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. $(ETCD_PROTOS)

lint:
	$(PY) -m ruff check csi engine mirror control tests
	$(PY) -m mypy csi engine mirror control

test:
	scripts/test.sh

bench:
	$(PY) -m tests.bench.control
