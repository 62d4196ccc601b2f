//! KVM's own counters (`KVM_GET_STATS_FD`) around a real guest: the `touch`
//! guest writes every page of fresh lazy RAM, and KVM must have counted page
//! faults for it, per vCPU and summed through the runner's report.

mod common;

use guestmm::kvm::{KvmStatsError, KvmStatsFd};
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
