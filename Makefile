# guestmm: `make run` runs the test guests, `make test` runs every test.
CARGO ?= cargo

.PHONY: all run test bench lint guests clean

all: test

## Build the test guests (build.rs assembles guest/*.S) and tinyvmm, run them all.
run:
	$(CARGO) build --release --bin tinyvmm
	./target/release/tinyvmm all

## Every test: unit, property, memfile, mm, and KVM tests (skipped with one line without /dev/kvm).
test:
	$(CARGO) test --all-targets --no-fail-fast
	$(CARGO) test --doc

## Criterion benches and the side-by-side comparison runner (figures on
## stdout as `bench NAME: VALUE UNIT` / `ratio NAME: VALUE`, table in
## target/bench-report.md; about 3 minutes).
bench:
	$(CARGO) bench

## Formatting, clippy and rustdoc, warnings are errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

## Copy the guest flat binaries (built by build.rs) to guest/build/.
guests:
	$(CARGO) build
	mkdir -p guest/build
	cp "$$(ls -td target/debug/build/guestmm-*/out | head -n 1)"/*.bin guest/build/

clean:
	$(CARGO) clean
