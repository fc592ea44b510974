#!/usr/bin/env bash
# Builds `peer_floodgate` at an earlier commit, for an interleaved A/B of two
# builds of the engine in one `bench/compare.sh` run (its `baseline_handler`
# rows):
#
#   bench/baseline.sh f6eb96b            # prints the directory it built into
#   bench/compare.sh --baseline-dir target/baseline-f6eb96b \
#       --scenarios saturated,c64 --servers floodgate_handler,baseline_handler
#
# The commit is checked out in a temporary worktree; the binary lands in
# target/baseline-<commit>/. Nothing of the current checkout changes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: bench/baseline.sh COMMIT" >&2; exit 2; }
commit=$(git rev-parse --short "$1^{commit}")
out=target/baseline-$commit
if [ -x "$out/peer_floodgate" ]; then
    echo "$out"
    exit 0
fi
wt=$(mktemp -d)
trap 'git worktree remove --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"' EXIT
git worktree add --detach "$wt" "$commit" >/dev/null
CARGO_TARGET_DIR="$PWD/target/baseline-build" \
    cargo build --release -q --manifest-path "$wt/Cargo.toml" -p floodgate-bench --bin peer_floodgate
mkdir -p "$out"
cp target/baseline-build/release/peer_floodgate "$out/"
echo "$out"
