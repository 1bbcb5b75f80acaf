#!/usr/bin/env bash
# Writes dist/<rock>-<version>-1.src.rock from the checked-out tree, offline,
# with `luarocks pack` itself: the rock holds the release rockspec as it is in
# the repository (the real repository URL and tag) and the source tree that
# `luarocks pack` clones from that URL. Here git is told to clone a snapshot
# of the checked-out tree (rockspec/snapshot.sh), tagged as the rockspec
# says, instead of the URL: nothing is fetched.
# Usage: rockspec/pack.sh   (LUA=... picks the interpreter for the helpers)
set -euo pipefail
cd "$(dirname "$0")/.."
lua=${LUA:-$(command -v lua5.4 || command -v lua5.3 || command -v lua5.1 || command -v lua)}
"$lua" rockspec/release.lua --check
{ read -r rockspec; read -r url; read -r tag; } < <("$lua" rockspec/release.lua --info)
url=${url#git+} # what luarocks hands to git clone

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rockspec/snapshot.sh "$tmp/repo"
git -C "$tmp/repo" tag "$tag"
mkdir -p dist
rock=dist/$(basename "$rockspec" .rockspec).src.rock
rm -f "$rock"
(
  cd dist
  export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="url.$tmp/repo.insteadOf" GIT_CONFIG_VALUE_0="$url"
  luarocks pack "../$rockspec" > "$tmp/pack.log" 2>&1 || { cat "$tmp/pack.log"; exit 1; }
)
[ -f "$rock" ] || { echo "pack.sh: luarocks pack wrote no $rock" >&2; exit 1; }
echo "$rock"
