#!/usr/bin/env bash
# Releases VERSION in one step: sets it in Cargo.toml (and Cargo.lock), the
# one source of truth; moves CHANGELOG.md's "Unreleased" entries under it;
# writes the release rockspec rockspec/<rock>-VERSION-1.rockspec from the scm
# rockspec (rockspec/release.lua, which removes the previous one); commits
# "Release VERSION" and tags it vVERSION, the tag the rockspec's source names.
# Pushing and uploading are left to you (it prints the commands).
# Usage: rockspec/bump.sh VERSION   (MAJOR.MINOR.PATCH, not below Cargo.toml's)
set -euo pipefail
die() { echo "bump.sh: $*" >&2; exit 1; }
new=${1:-}
[[ $new =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "usage: rockspec/bump.sh MAJOR.MINOR.PATCH"
cd "$(dirname "$0")/.."
lua=${LUA:-$(command -v lua5.4 || command -v lua5.3 || command -v lua5.1 || command -v lua)}

git diff --quiet && git diff --cached --quiet || die "the tree has uncommitted changes"
git rev-parse -q --verify "refs/tags/v$new" > /dev/null && die "tag v$new exists"
old=$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$old" ] || die "no version in Cargo.toml's [package]"
[ "$(printf '%s\n%s\n' "$old" "$new" | sort -V | head -1)" = "$old" ] \
  || die "$new is below Cargo.toml's $old"
grep -q '^## Unreleased$' CHANGELOG.md || die "CHANGELOG.md has no '## Unreleased' section"
entries=$(awk '/^## Unreleased$/ { on = 1; next } /^## / { on = 0 } on && NF' CHANGELOG.md)
[ -n "$entries" ] || die "CHANGELOG.md's Unreleased section is empty: say what changed"

sed -i '/^\[package\]/,/^\[/s/^version = ".*"$/version = "'"$new"'"/' Cargo.toml
cargo update --workspace --offline --quiet # Cargo.lock's own entry only
sed -i "s/^## Unreleased\$/## Unreleased\n\n## $new - $(date -u +%Y-%m-%d)/" CHANGELOG.md
rockspec=$("$lua" rockspec/release.lua)
"$lua" rockspec/release.lua --check

git add -A Cargo.toml Cargo.lock CHANGELOG.md rockspec
git commit -q -m "Release $new"
git tag -a "v$new" -m "Release $new"
echo "Released $new: $(git rev-parse --short HEAD), tag v$new, $rockspec"
echo "Next: git push && git push origin v$new"
echo "      luarocks upload $rockspec   (it packs the source rock from the pushed tag)"
