#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (unit, integration,
# conformance) as root. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TANDEM_VENV:-/opt/tandem/venv}"
scripts/install.sh --dev
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
