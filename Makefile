PY ?= python3

.PHONY: proto lint test bench

proto:
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. proto/csi.proto

lint:
	$(PY) -m ruff check csi engine mirror tests
	$(PY) -m mypy csi engine mirror

test:
	scripts/test.sh

bench:
	$(PY) -m tests.bench.control
