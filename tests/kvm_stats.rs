//! KVM's own counters (`KVM_GET_STATS_FD`) around a real guest: the `touch`
//! guest writes every page of fresh lazy RAM, and KVM must have counted page
//! faults for it, per vCPU and summed through the runner's report, and
//! `tinyvmm --stats`/`--json` must show them.

mod common;

use std::process::Command;
use std::sync::Arc;

use guestmm::kvm::{KvmStatsError, KvmStatsFd, Vm, VmOptions};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::vmm::guests;
use guestmm::vmm::runner::{run_guest, RunOptions};

#[test]
fn touch_guest_shows_kvm_page_faults() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("touch").expect("touch guest");
    let opts = RunOptions {
        ram_size: 16 << 20,
        ..RunOptions::default()
    };
    let r = run_guest(&kvm, guest, &opts).expect("run_guest");
    assert!(r.passed, "{}", r.summary_line());
    let Some(k) = r.kvm else {
        // Only a kernel without binary stats may leave this empty.
        let vm = kvm.create_vm().expect("create_vm");
        match KvmStatsFd::open(&vm) {
            Err(KvmStatsError::Unsupported(e)) => {
                eprintln!("skipping: KVM_GET_STATS_FD unsupported here ({e})");
                return;
            }
            other => panic!("no KVM stats in the report, but the fd opens: {other:?}"),
        }
    };
    assert_eq!(k.vcpu_count, 1);
    let pages = (16u64 << 20) / 4096;
    let taken = k.pf_taken().expect("pf_taken on x86");
    let fixed = k.pf_fixed().expect("pf_fixed on x86");
    // Every one of the 4096 fresh pages must get into KVM's page tables
    // through a fault (prefetch may map a few neighbours per fault).
    assert!(taken > 0 && fixed > 0, "pf_taken {taken} pf_fixed {fixed}");
    assert!(
        taken * 16 >= pages,
        "pf_taken {taken} too small for {pages} fresh pages"
    );
    let exits = k.exits().expect("exits");
    assert!(
        exits >= r.vm.exits,
        "KVM counts {exits} exits, the VMM saw {} return from KVM_RUN",
        r.vm.exits
    );
    assert!(k.vm.id.starts_with("kvm-"), "vm id {:?}", k.vm.id);
}

#[test]
fn a_vcpu_of_a_fresh_vm_has_no_faults_yet() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let vm = kvm.create_vm().expect("create_vm");
    let vcpu = vm.create_vcpu(0).expect("create_vcpu");
    let fd = match KvmStatsFd::open(&vcpu) {
        Ok(fd) => fd,
        Err(KvmStatsError::Unsupported(e)) => {
            eprintln!("skipping: KVM_GET_STATS_FD unsupported here ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let s = fd.read().expect("read");
    assert_eq!(s.get("pf_taken"), Some(0));
    assert_eq!(s.get("exits"), Some(0));
    assert!(s.stats.len() > 10, "only {} vCPU stats", s.stats.len());
}

#[test]
fn vm_and_vcpu_accessors_read_and_sum() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let memfile = Arc::new(MemoryFile::new("kvm-stats", MemoryFileOptions::default()).unwrap());
    let vm = Vm::new(&kvm, memfile, VmOptions::default()).unwrap();
    let (a, b) = (vm.create_vcpu(0).unwrap(), vm.create_vcpu(1).unwrap());
    let one = match a.kvm_stats() {
        Ok(s) => s,
        Err(KvmStatsError::Unsupported(e)) => {
            eprintln!("skipping: KVM_GET_STATS_FD unsupported here ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert!(one.id.ends_with("vcpu-0"), "vcpu id {:?}", one.id);
    let both = vm.kvm_stats(&[&a, &b]).expect("kvm_stats");
    assert_eq!(both.vcpu_count, 2);
    assert!(both.vm.id.starts_with("kvm-") && !both.vm.id.contains("vcpu"));
    assert_eq!(both.pf_taken(), Some(0), "no vCPU has run");
    assert!(both.vm.get("remote_tlb_flush").is_some());
    // Every vCPU statistic appears once in the sum, VM ones in `vm`.
    assert_eq!(both.vcpus.stats.len(), one.stats.len());
    assert_eq!(vm.kvm_stats(&[]).expect("vm only").vcpu_count, 0);
}

#[test]
fn tinyvmm_prints_kvm_stats() {
    if common::kvm_or_skip().is_none() {
        return;
    }
    let run = |flag: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tinyvmm"))
            .args([flag, "--ram-mib", "8", "touch"])
            .output()
            .expect("run tinyvmm");
        assert!(out.status.success(), "tinyvmm {flag} touch failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stats = run("--stats");
    if stats.contains("kvm: no binary statistics") {
        eprintln!("skipping: no KVM binary statistics on this kernel");
        return;
    }
    let line = stats
        .lines()
        .find(|l| l.trim_start().starts_with("kvm vcpus (1 summed):"))
        .unwrap_or_else(|| panic!("no kvm vcpus line in {stats}"));
    let taken: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pf_taken="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pf_taken in {line}"));
    assert!(taken > 0, "{line}");
    let json = run("--json");
    let kvm = json
        .split("\"kvm\":{")
        .nth(1)
        .unwrap_or_else(|| panic!("no kvm object in {json}"));
    let taken: u64 = kvm
        .split("\"pf_taken\":")
        .nth(1)
        .and_then(|v| v.split([',', '}']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pf_taken in {kvm}"));
    assert!(taken > 0, "{kvm}");
    assert!(kvm.contains("\"vcpus\":1"), "{kvm}");
}

#[test]
fn sparse_guest_faults_once_per_touched_page_at_least() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("sparse").expect("sparse guest");
    let ram = 64u64 << 20;
    let r = run_guest(
        &kvm,
        guest,
        &RunOptions {
            ram_size: ram,
            ..RunOptions::default()
        },
    )
    .expect("run_guest");
    assert!(r.passed, "{}", r.summary_line());
    let touched = ram / (2 << 20);
    assert!(
        r.mm.committed_bytes >= touched * 4096,
        "committed {} < {touched} touched pages",
        r.mm.committed_bytes
    );
    if let Some(k) = r.kvm {
        // Touched pages are 2 MiB apart: no prefetch can cover two of them.
        let taken = k.pf_taken().expect("pf_taken");
        assert!(
            taken >= touched,
            "pf_taken {taken} < {touched} touched pages"
        );
    }
}
