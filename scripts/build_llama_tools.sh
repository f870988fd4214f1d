#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize from the llama.cpp source vendored in
# llama-cpp-python's sdist, for AVX2 (not -march=native: ggml's AMX path crashes on this CI's Xeon),
# into a cache folder; prints the bin folder. Skips the build when the binaries are already there.
# Usage: scripts/build_llama_tools.sh [SDIST_TARBALL]
# Without a tarball it downloads the sdist of the installed llama-cpp-python with pip.
set -euo pipefail
version="$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
cache="${EDGEKD_LLAMA_TOOLS_CACHE:-$HOME/.cache/edgekd/llama-tools}/$version"
bin="$cache/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-quantize" ]; then
  echo "$bin"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sdist="${1:-}"
if [ -z "$sdist" ]; then
  python -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work/dl" >&2
  sdist="$(ls "$work"/dl/llama_cpp_python-*.tar.gz)"
fi
tar -xzf "$sdist" -C "$work"
src="$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$work/build" --target llama-bench llama-quantize -j2 >&2
mkdir -p "$bin"
cp "$work/build/bin/llama-bench" "$work/build/bin/llama-quantize" "$bin/"
echo "$bin"
