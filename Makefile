# Thin wrappers over dev.py, which needs nothing but Python and pip.
.PHONY: setup demo test test-slow bench
setup:
	python3 dev.py setup
demo:
	python3 dev.py demo
test:
	python3 dev.py test
test-slow:
	python3 dev.py test --slow
bench: setup
	.venv/bin/python benchmarks/bench_loop_overhead.py
