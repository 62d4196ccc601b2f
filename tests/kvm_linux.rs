//! An unmodified Linux kernel (Debian's cloud kernel, fetched by
//! `.ci/fetch-kernel`) boots on guestmm memory until `setup_arch` prints its
//! zone ranges, once on lazy RAM and once on eager RAM, with the same console
//! output. Skips with one line without /dev/kvm or without the kernel.

mod common;
use common::kvm_or_skip;

use std::path::{Path, PathBuf};
use std::time::Duration;

use guestmm::vmm::linux::{boot_linux, LinuxEnd, LinuxOptions, LinuxReport};

/// A line `setup_arch` prints (from `zone_sizes_init`).
const STOP_AT: &str = "Zone ranges";

fn kernel_or_skip() -> Option<PathBuf> {
    let path = std::env::var_os("GUESTMM_VMLINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/linux/vmlinux"));
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipping: no kernel at {} (run .ci/fetch-kernel or set GUESTMM_VMLINUX)",
            path.display()
        );
        None
    }
}

fn boot(kvm: &kvm_ioctls::Kvm, kernel: &Path, eager: bool) -> LinuxReport {
    common::log_from_env();
    let opts = LinuxOptions {
        kernel: kernel.to_path_buf(),
        eager,
        stop_at: Some(STOP_AT.into()),
        timeout: Duration::from_secs(600),
        ..LinuxOptions::default()
    };
    let r = boot_linux(kvm, &opts).expect("boot");
    eprintln!(
        "linux {}: {:?} after {:.1} s, faults {}, memory exits {}, slot adds {}, populated {} MiB",
        if eager { "eager" } else { "lazy" },
        r.end,
        r.elapsed.as_secs_f64(),
        r.mm.faults,
        r.vm.memory_exits,
        r.vm.slots.adds,
        r.populated_bytes >> 20
    );
    assert_eq!(r.end, LinuxEnd::Reached, "console so far:\n{}", r.console);
    r
}

/// The console up to and including the stop line, as lines without their
/// printk timestamps, less the one line that carries a measurement
/// (`kvm-clock: using sched offset of N cycles`, the TSC at boot). That
/// is all that differs between two boots of the same kernel.
fn until_stop(console: &str) -> Vec<String> {
    let end = console.find(STOP_AT).expect("stop line") + STOP_AT.len();
    console[..end]
        .lines()
        .map(|line| match line.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map_or(line, |(_, text)| text),
            None => line,
        })
        .filter(|line| !line.contains("using sched offset"))
        .map(str::to_string)
        .collect()
}

#[test]
fn debian_kernel_boots_the_same_on_lazy_and_eager_memory() {
    let Some(kvm) = kvm_or_skip() else { return };
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    let lazy = boot(&kvm, &kernel, false);
    assert!(
        lazy.console.contains("Linux version"),
        "the kernel printed its banner"
    );
    let eager = boot(&kvm, &kernel, true);
    assert_eq!(
        until_stop(&lazy.console),
        until_stop(&eager.console),
        "lazy and eager boots print the same lines"
    );
    // Lazy memory populated on demand: far less than the 256 MiB of RAM.
    assert!(
        lazy.populated_bytes < eager.populated_bytes,
        "lazy populated {} MiB, eager {} MiB",
        lazy.populated_bytes >> 20,
        eager.populated_bytes >> 20
    );
    assert!(lazy.mm.faults > 0, "lazy RAM faulted in");
    assert!(
        until_stop(&lazy.console).len() > 10,
        "the comparison covers the boot: {:?}",
        until_stop(&lazy.console)
    );
}
