#!/usr/bin/env bash
# Creates the git-ignored .venv with the pinned Python tools of tools/requirements.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv"
"$root/.venv/bin/pip" install -q -r "$root/tools/requirements.txt" ${EXTRA_REQUIREMENTS:+-r "$EXTRA_REQUIREMENTS"}
echo "$root/.venv ready"
