#!/bin/sh
# Runs a tests/k8s Python test with the test venv's Python (PyYAML, kubernetes-validate from
# tools/requirements-test.txt): $EXPERTMESH_TEST_PYTHON, else the repository's .venv-test.
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${EXPERTMESH_TEST_PYTHON:-$root/.venv-test/bin/python}
if [ ! -x "$python" ]; then
  echo "$python is missing: create it from tools/requirements-test.txt (tools/test.sh does)" >&2
  exit 1
fi
exec "$python" "$@"
