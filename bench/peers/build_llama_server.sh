#!/usr/bin/env bash
# llama.cpp's `llama-server`, the CPU serving peer of bench.serving, built from the
# llama.cpp that the `llama-cpp-python` sdist on PyPI vendors (no other source is
# reachable from these machines). Built into a cache folder, never into the repository.
#
#   bash bench/peers/build_llama_server.sh        # ~15 min on 2 cores, once
#
# Puts the binary at $LLAMA_PEER_DIR/bin/llama-server (default ~/.cache/balansis-peers/llama.cpp),
# where bench.serving looks for it (or pass --llama-server PATH). Needs cmake and a C++ compiler
# (Debian: cmake g++). Native CPU flags (AVX-512, VNNI here), no GPU, no curl.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${LLAMA_PEER_DIR:-$HOME/.cache/balansis-peers/llama.cpp}"
JOBS="${JOBS:-$(nproc)}"
PIP="${PIP:-python3 -m pip}"
if [ -x "$DIR/bin/llama-server" ]; then
  echo "already built: $DIR/bin/llama-server"; exit 0
fi
mkdir -p "$DIR/src"
if [ ! -d "$DIR/src/llama_cpp_python-$VERSION" ]; then
  $PIP download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/src"
  tar -C "$DIR/src" -xzf "$DIR/src/llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF
cmake --build "$DIR/build" --target llama-server -j "$JOBS"
mkdir -p "$DIR/bin"
cp "$DIR/build/bin/llama-server" "$DIR/bin/llama-server"
echo "built: $DIR/bin/llama-server ($("$DIR/bin/llama-server" --version 2>&1 | head -1))"
