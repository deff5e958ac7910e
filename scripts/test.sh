#!/usr/bin/env bash
# The whole test suite: installs what a fresh machine lacks (the package with
# its test extras, which builds the Rust extension), then Rust checks and
# tests, Python lint, type checks and pytest. Used by the README and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== install (editable, with test extras)"
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

echo "== cargo fmt / clippy / test"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --release --quiet -p squant-core -p squant-io -p squant-cli -p squant-py
cargo build --release --quiet -p squant-cli   # the `squant` binary tests/test_rust_cli.py compares

echo "== ruff / mypy / stubtest"
python3 -m ruff check python tests benches
python3 -m ruff format --check python tests benches
python3 -m mypy python/squant_rs
python3 -m mypy.stubtest squant_rs._squant_rs

echo "== pytest"
python3 -m pytest -q
