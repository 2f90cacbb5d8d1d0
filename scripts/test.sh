#!/usr/bin/env bash
# The project's test command (README): formatting and lints, unit tests, then
# the end-to-end tests that boot stock Linux guests in the nested rig.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== guest artifacts (guests/build.sh)"
guests/build.sh
echo "== unit and rig tests"
PLATTER_RIG_TESTS=1 cargo test --workspace --release -- --test-threads=1
