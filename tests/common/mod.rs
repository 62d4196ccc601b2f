//! Helpers shared by the integration tests.

#![allow(dead_code)]

pub mod rng;

use std::sync::atomic::{AtomicU64, Ordering};

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
