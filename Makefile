# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: main test setup lint ui

setup:
	./.ci/setup-env.sh

main: setup
	.venv/bin/lqlora run

test: setup
	.venv/bin/python -m pytest -q -n logical --dist loadfile tests

lint: setup
	.venv/bin/ruff check lqlora_dagster assets resources tests bench

ui: setup
	.venv/bin/lqlora ui
