# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
.PHONY: setup build demo test bench clean-cache

CARGO ?= cargo
BIN := target/release/specforge-rs

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release

demo: build
	@scripts/demo.sh

# One intra-op thread per test process: cargo runs tests in parallel, and OpenMP teams
# oversubscribing the cores run ~10x slower than single-threaded ones.
test: setup
	OMP_NUM_THREADS=1 $(CARGO) test --no-fail-fast
	@cat target/reliability-summary.txt 2>/dev/null || true

bench: build
	@scripts/bench.sh

clean-cache:
	rm -rf .cache
