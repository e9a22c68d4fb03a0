#!/usr/bin/env python3
"""Make proto/etcd/*.proto from etcd's own .proto files (Go annotations removed).

etcd's API protos import gogoproto and google.api annotations, which only matter to
Go code and the HTTP gateway. This strips them and points the imports at proto/etcd/,
leaving messages, fields and services exactly as etcd defines them (the wire format).

    apt-get download golang-etcd-server-dev && dpkg -x golang-etcd-server-dev_*.deb x
    scripts/trim_etcd_proto.py x/usr/share/gocode/src/go.etcd.io/etcd 3.4.23
    make proto
"""

from __future__ import annotations

import os
import re
import sys

# etcd source path -> our file name
SOURCES = {
    "mvcc/mvccpb/kv.proto": "kv.proto",
    "auth/authpb/auth.proto": "auth.proto",
    "etcdserver/etcdserverpb/rpc.proto": "rpc.proto",
}
IMPORTS = {
    "etcd/mvcc/mvccpb/kv.proto": "proto/etcd/kv.proto",
    "etcd/auth/authpb/auth.proto": "proto/etcd/auth.proto",
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trim(text: str) -> str:
    text = re.sub(r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', "", text,
                  flags=re.M)
    text = text.replace("// for grpc-gateway\n", "")
    for old, new in IMPORTS.items():
        text = text.replace(f'import "{old}";', f'import "{new}";')
    text = re.sub(r"^option \(gogoproto\.[^;]*;\n", "", text, flags=re.M)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    # rpc X(A) returns (B) { option (google.api.http) = {...}; }  ->  rpc X(A) returns (B) {}
    # (one level of nested braces: additional_bindings { ... })
    text = re.sub(r"\{\s*option \(google\.api\.http\) = \{(?:[^{}]|\{[^{}]*\})*\};\s*\}", "{}",
                  text)
    if "gogoproto" in text or "google.api" in text:
        raise SystemExit("an annotation survived trimming: update scripts/trim_etcd_proto.py")
    return re.sub(r"\n{3,}", "\n\n", text)


def main() -> None:
    src, version = sys.argv[1], sys.argv[2]
    for path, name in SOURCES.items():
        with open(os.path.join(src, path)) as f:
            text = trim(f.read())
        header = (f"// From etcd v{version} ({path}), Apache License 2.0, Copyright The etcd\n"
                  "// Authors. Go annotations removed by scripts/trim_etcd_proto.py; "
                  "do not edit.\n")
        with open(os.path.join(REPO, "proto", "etcd", name), "w") as f:
            f.write(header + text)


if __name__ == "__main__":
    main()
