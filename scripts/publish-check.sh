#!/usr/bin/env bash
# What crates.io would refuse, checked without uploading: every crate meant for crates.io has the
# metadata it needs (description, license, repository, readme, rust-version, 1-5 keywords and
# categories), `cargo publish --workspace --dry-run` packages and builds each one from its .crate
# alone (against the others as packaged, so a file left outside a crate or a path dependency without
# a version fails here), and every .crate is under crates.io's 10 MiB limit (ctxalign-cli carries
# the default model). Each crate is built from its unpacked .crate, whose manifest has no
# [patch.crates-io]: on stock candle-core 0.11.1, as a dependent builds it (README, "Without the
# candle-core patch"), not on vendor/candle-core.
# Compiles the workspace's crates twice more, in debug (as packaged, and as the others' registry
# dependency): about 3 minutes on 2 cores with the dependencies already built in debug; a first run
# compiles every dependency in debug too (candle, tokenizers, image: several times longer).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "publish-check: needs jq (to read cargo metadata)" >&2; exit 1; }

limit=$((10 * 1024 * 1024))
meta=$(cargo metadata --format-version 1 --no-deps)
target=$(jq -r '.target_directory' <<<"$meta")
# `publish = false` shows as an empty registry list; null means any registry.
publishable=$(jq -r '.packages[] | select(.publish == null) | "\(.name) \(.version)"' <<<"$meta")
[ -n "$publishable" ] || { echo "publish-check: no crate of the workspace is publishable" >&2; exit 1; }

missing=$(jq -r '.packages[] | select(.publish == null) | . as $p
  | [ (if (.description // "") == "" then "description" else empty end),
      (if (.license // "") == "" then "license" else empty end),
      (if (.repository // "") == "" then "repository" else empty end),
      (if (.readme // "") == "" then "readme" else empty end),
      (if (.rust_version // "") == "" then "rust-version" else empty end),
      (if (.keywords | length) == 0 or (.keywords | length) > 5 then "keywords (1-5)" else empty end),
      (.keywords[] | select(test("^[A-Za-z][A-Za-z0-9_-]{0,19}$") | not)
        | "keyword \"\(.)\" (a letter, then letters, digits, - or _; 20 at most)"),
      (if (.categories | length) == 0 or (.categories | length) > 5 then "categories (1-5)" else empty end) ]
  | select(length > 0) | "\($p.name): \(join(", "))"' <<<"$meta")
if [ -n "$missing" ]; then
  echo "publish-check: crates.io needs these in [package]:" >&2
  echo "$missing" >&2
  exit 1
fi

# The dry run puts the packaged crates in a local registry (<target>/package/tmp-registry) and
# builds each crate against the others from there, as crates.io versions. Cargo takes a registry
# version to be immutable: it does not unpack one again that is already under
# $CARGO_HOME/registry/src/-<hash>/ (a registry with no host), nor rebuild one it has built, so a
# crate changed since the last run would be verified against its dependencies as they were then.
# Both are removed first: the unpacked copies of this workspace's crates, and every build unit in
# <target>/debug compiled from such a copy (found by its dep-info file naming the source). Builds
# of the workspace itself are left alone.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
while read -r name version; do
  rm -rf "$cargo_home"/registry/src/-*/"$name-$version"
done <<<"$publishable"
names=$(cut -d' ' -f1 <<<"$publishable" | paste -sd'|')
if [ -d "$target/debug" ]; then
  grep -lE "/registry/src/-[^/]*/($names)-[0-9][^/]*/" "$target"/debug/deps/*.d "$target"/debug/build/*/*.d 2>/dev/null |
    while read -r depinfo; do
      hash=${depinfo%.d}
      hash=${hash##*-}
      rm -rf "$target"/debug/deps/*-"$hash" "$target"/debug/deps/*-"$hash".* \
        "$target"/debug/.fingerprint/*-"$hash" "$target"/debug/build/*-"$hash"
    done
fi

cargo publish --workspace --dry-run --allow-dirty

# The dry run keeps its .crate files in a folder of cargo's own; `cargo package` writes the same
# files where cargo documents them (<target>/package), without building again. Old ones are removed
# first, so that only this run's are measured.
out="$target/package"
rm -f "$out"/*.crate
packages=()
while read -r name _; do packages+=(-p "$name"); done <<<"$publishable"
cargo package --no-verify --allow-dirty "${packages[@]}"

status=0
while read -r name version; do
  file="$out/$name-$version.crate"
  if [ ! -f "$file" ]; then
    echo "publish-check: cargo package did not write $file" >&2
    status=1
    continue
  fi
  size=$(wc -c <"$file")
  if [ "$size" -ge "$limit" ]; then
    echo "publish-check: $name-$version.crate is $size bytes, over crates.io's 10 MiB limit ($limit bytes)" >&2
    status=1
  else
    echo "publish-check: $name-$version.crate is $size bytes (crates.io takes up to $limit)"
  fi
done <<<"$publishable"
exit $status
