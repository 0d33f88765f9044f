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

test: setup
	$(CARGO) test --no-fail-fast

bench: build
	@scripts/bench.sh

clean-cache:
	rm -rf .cache
