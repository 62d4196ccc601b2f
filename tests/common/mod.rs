//! Helpers shared by the integration tests.

#![allow(dead_code)]

#[cfg(feature = "vmm")]
pub mod guest_vm;
pub mod host_mem;
pub mod rng;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{AddressSpace, AddressSpaceOptions, RecordingBackend};

/// A memory file with default options.
pub fn memfile(name: &str) -> Arc<MemoryFile> {
    Arc::new(MemoryFile::new(name, MemoryFileOptions::default()).unwrap())
}

/// A default address space over `mf`, with its recording backend.
pub fn space_over(mf: &Arc<MemoryFile>) -> (Arc<RecordingBackend>, Arc<AddressSpace>) {
    let be = Arc::new(RecordingBackend::new());
    let space = AddressSpace::new(mf.clone(), be.clone(), AddressSpaceOptions::default()).unwrap();
    (be, space)
}

/// A fresh memory file and a default address space over it.
pub fn setup(name: &str) -> (Arc<MemoryFile>, Arc<RecordingBackend>, Arc<AddressSpace>) {
    let mf = memfile(name);
    let (be, space) = space_over(&mf);
    (mf, be, space)
}

/// A fresh, empty, already-unlinked read-write file (for `HostFile`s).
pub fn tempfile(tag: &str) -> std::fs::File {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "guestmm-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    std::fs::remove_file(&path).unwrap();
    f
}

/// KVM, or `None` when it is unavailable. The first test of a binary that
/// skips says so in one line on stderr, written past the test harness's
/// output capture so `make test` shows it.
pub fn kvm_or_skip() -> Option<kvm_ioctls::Kvm> {
    static SAID: std::sync::Once = std::sync::Once::new();
    match guestmm::kvm::open_kvm() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            SAID.call_once(|| {
                use std::io::Write;
                let exe = std::env::args().next().unwrap_or_default();
                let name = exe.rsplit('/').next().unwrap_or_default().to_string();
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping: /dev/kvm not available ({e}); KVM tests in {name} skip"
                );
            });
            None
        }
    }
}

/// Logs the library's records to stderr when `GUESTMM_LOG` is set (to
/// `debug` or `trace`), for debugging a test: `GUESTMM_LOG=debug cargo test ...`.
pub fn log_from_env() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            eprintln!("{:5} {}: {}", r.level(), r.target(), r.args());
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    if let Ok(level) = std::env::var("GUESTMM_LOG") {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(level.parse().unwrap_or(log::LevelFilter::Debug));
        }
    }
}
