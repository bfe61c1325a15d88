# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: main test test-fast setup lint ui

setup:
	./.ci/setup-env.sh

main: setup
	.venv/bin/lqlora run

test: setup
	.venv/bin/python -m pytest -q -n logical --dist loadfile tests

# Method and pipeline units: no real model, no subprocess, no browser, no graph run.
# tests/tiers.py marks each test by what it uses; `make test` (CI) still runs them all.
test-fast: setup
	.venv/bin/python -m pytest -q -n logical --dist loadfile -m "not (real_model or subprocess or browser or graph)" tests

lint: setup
	.venv/bin/ruff check lqlora_dagster assets resources tests bench

ui: setup
	.venv/bin/lqlora ui
