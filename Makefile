# guestmm Makefile. The lead owns the other targets.

.PHONY: guests
# Test guests: build.rs assembles guest/*.S into flat binaries (linked at
# CODE_GPA); this also copies the newest ones to guest/build/.
guests:
	cargo build
	mkdir -p guest/build
	cp "$$(ls -td target/debug/build/guestmm-*/out | head -n 1)"/*.bin guest/build/
