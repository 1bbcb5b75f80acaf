#!/usr/bin/env bash
# Makes DEST a new git repository whose one commit holds the checked-out
# tree as it is now: the files git tracks (with uncommitted changes) and new
# files that are not ignored. rockspec/pack.sh packs from it; spec/rock_spec.lua
# tries rockspec/bump.sh on it.
# Usage: rockspec/snapshot.sh DEST
set -euo pipefail
dest=${1:?usage: rockspec/snapshot.sh DEST}
cd "$(dirname "$0")/.."
git rev-parse --git-dir > /dev/null # a git checkout, or stop here
mkdir -p "$dest"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' file; do
      [ -e "$file" ] || [ -L "$file" ] && printf '%s\0' "$file" # not deleted
    done \
  | tar --null --files-from=- -cf - | tar -xf - -C "$dest"
described=$(git describe --always --dirty)
git() { command git -C "$dest" -c user.name=snapshot -c user.email=snapshot@localhost \
  -c commit.gpgSign=false -c tag.gpgSign=false "$@"; }
git init -q
git add -A -f
git commit -q -m "snapshot of $described"
