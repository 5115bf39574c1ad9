#!/bin/sh
# Build Tidings from a source tree and install it into a new virtual environment:
#
#     install.sh SOURCE_DIR VENV_DIR
#
# The Dockerfile runs exactly this, and tests/server/test_deploy_files.py runs it into a
# temporary directory, so that what the image installs is tested without an image.
# pip takes its options from the environment as usual (PIP_INDEX_URL, PIP_NO_DEPS, ...);
# PYTHON names the interpreter (default python3).
set -eu
src="$1"
venv="$2"
python="${PYTHON:-python3}"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$python" -m pip wheel --no-deps --no-cache-dir --wheel-dir "$wheels" "$src"
"$python" -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir "$wheels"/tidings-*.whl
"$venv/bin/tidings" --version
