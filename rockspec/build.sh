#!/bin/sh
# Builds the native core for the interpreter luarocks targets ($1) and puts
# it where the rockspec's install table expects it.
set -eu
lua=${1:?usage: build.sh LUA_INTERPRETER}
version=$("$lua" -e 'io.write(jit and "luajit" or _VERSION:sub(5))')
case "$version" in
  luajit) feature=luajit ;;
  5.1|5.2|5.3|5.4) feature="lua$(echo "$version" | tr -d .)" ;;
  *) echo "build.sh: unsupported Lua version '$version'" >&2; exit 1 ;;
esac
# One target dir per Lua version, so that switching versions rebuilds nothing.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/$feature}"
cargo build --release --features "$feature"
mkdir -p build/rock
cp "$CARGO_TARGET_DIR/release/libcorowatch_core.so" build/rock/core.so
