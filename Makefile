# guestmm: `make run` runs the test guests, `make test` runs every test.
CARGO ?= cargo
# tinyvmm, the guests and their tests live behind the `vmm` feature (see Cargo.toml).
FEATURES ?= --features vmm

.PHONY: all run test stress bench lint guests embed-check linux clean

all: test

## Build the test guests (build.rs assembles guest/*.S) and tinyvmm, run them all.
run:
	$(CARGO) build --release $(FEATURES) --bin tinyvmm
	./target/release/tinyvmm all

## Every test: unit, property, memfile, mm, and KVM tests (skipped with one line
## without /dev/kvm), plus a crate that links the library without the guest toolchain.
test: embed-check
	$(CARGO) test $(FEATURES) --all-targets --no-fail-fast
	$(CARGO) test $(FEATURES) --doc

## The adversarial guests' stress loops: every multi-vCPU guest 20 times in a
## row lazily and with 4 KiB windows, W4 for the AVX memset too (a few minutes).
stress:
	GUESTMM_STRESS_RUNS=20 $(CARGO) test $(FEATURES) --release --test kvm_adversarial -- --nocapture --test-threads 1

## A scratch crate depending on guestmm (default features) builds with `as`
## and `objcopy` made to fail: the library needs no guest toolchain.
embed-check:
	./.ci/embed-check

## Boot Debian's cloud kernel (fetched by .ci/fetch-kernel) on lazy memory
## until setup_arch prints its zone ranges (about a minute here; not in `make run`).
linux:
	./.ci/fetch-kernel
	$(CARGO) build --release $(FEATURES) --bin tinyvmm
	./target/release/tinyvmm --kernel target/linux/vmlinux --stop-at "Zone ranges"

## Criterion benches and the side-by-side comparison runner (figures on
## stdout as `bench NAME: VALUE UNIT` / `ratio NAME: VALUE`, table in
## target/bench-report.md; about 10 minutes here).
bench:
	$(CARGO) bench $(FEATURES)

## Formatting, clippy (with and without the vmm feature) and rustdoc, warnings are errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets $(FEATURES) -- -D warnings
	$(CARGO) clippy --lib -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps $(FEATURES)

## Copy the guest flat binaries (built by build.rs) to guest/build/.
guests:
	$(CARGO) build $(FEATURES)
	mkdir -p guest/build
	cp "$$(ls -td target/debug/build/guestmm-*/out | head -n 1)"/*.bin guest/build/

clean:
	$(CARGO) clean
