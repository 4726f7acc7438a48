#!/usr/bin/env bash
# Installs the LLVM 23 that `cargo build --release --features cuda` links against, where burn's
# CUDA backend looks for it, from PyPI (no GitHub download needed).
#
# burn 0.22.1's CUDA backend (cubecl-cuda 0.11.3) always links LLVM 23 with the NVPTX target
# (cubecl-llvm -> llvm-sys 231). Its build dependency tracel-llvm-bundler would download a bundle
# from GitHub releases into $XDG_DATA_HOME/tracel/tracel-llvm-23.1.0-4 (default
# ~/.local/share/...) unless that folder already holds `.tracel-llvm-installed`. PyPI has the
# same LLVM as static libraries with an `llvm-config`: mlc-llvm-static (+ -extra-targets for
# NVPTX). This script unpacks both there and writes the marker. Idempotent; ~1 minute.
#
#   scripts/setup-cuda-build.sh && cargo build --release --features cuda
#
# Needs python3 with pip (the installed llvm-config is a Python script, run at build time).
set -euo pipefail
VERSION="23.1.1.post0"
PYTHON="${PYTHON:-python3}"
DEST="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
MARKER="$DEST/.tracel-llvm-installed"

if [ -f "$MARKER" ] && "$DEST/bin/llvm-config" --version 2>/dev/null | grep -q '^23\.' \
   && "$DEST/bin/llvm-config" --targets-built | grep -qw NVPTX; then
  echo "LLVM $("$DEST/bin/llvm-config" --version) with NVPTX is already in $DEST"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading mlc-llvm-static $VERSION (+ extra targets) from PyPI" >&2
"$PYTHON" -m pip download --quiet --no-deps -d "$tmp/wheels" \
  "mlc-llvm-static==$VERSION" "mlc-llvm-static-extra-targets==$VERSION"
for w in "$tmp"/wheels/*.whl; do
  "$PYTHON" -m zipfile -e "$w" "$tmp/unpacked"
done
src="$tmp/unpacked/mlc_llvm_static/static"
chmod +x "$src/bin/llvm-config"
version=$("$src/bin/llvm-config" --version)
case "$version" in
  23.*) ;;
  *) echo "error: the wheels hold LLVM $version, not 23" >&2; exit 1 ;;
esac
"$src/bin/llvm-config" --targets-built | grep -qw NVPTX \
  || { echo "error: the unpacked LLVM has no NVPTX target" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$src" "$DEST"
touch "$MARKER"
echo "installed LLVM $version (NVPTX) in $DEST"
