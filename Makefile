.PHONY: test-fast test bench-quick format lint

# The fast tier: unit tests, no end-to-end training; about 2 minutes on 2 cores.
test-fast:
	pytest -m "not slow"

# The whole suite, as CI runs it; about 20 minutes on 2 cores.
test:
	pytest

# Every benchmark part at its smallest sizes (a smoke test of the harness, not figures to quote).
bench-quick:
	python -m benchmarks --quick --output /tmp/vlm-recipes-benchmark-quick.json

format:
	ruff check --fix src scripts tests benchmarks
	ruff format src scripts tests benchmarks

lint:
	ruff check src scripts tests benchmarks
	ruff format --check src scripts tests benchmarks
