//! The vCPU side of a run: [`GuestHandler`], the VMM end of the hypercall
//! ABI (`vmm/hypercall.rs`), writing into the run's [`Shared`] state, and
//! [`run_vcpus`], which runs every vCPU on its own thread under a timeout.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kvm::{Action, EmulationFailure, ExitHandler, MemoryViolation, Vcpu, VcpuStop};
use crate::mm::{HostFile, MapOpts, Mappable};
use crate::vmm::hypercall::{self, Hypercall};

/// Shared per-run state the vCPU handlers write into.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) console: String,
    pub(super) marks: Vec<(u32, u32, Duration)>,
    pub(super) violations: Vec<MemoryViolation>,
    pub(super) errors: Vec<String>,
}

/// The VMM side of the hypercall ABI for one vCPU.
struct GuestHandler {
    shared: Arc<Mutex<Shared>>,
    start: Instant,
    exit_code: Option<u32>,
    template: Option<Arc<HostFile>>,
}

impl GuestHandler {
    fn fail(&self, what: String) -> Action {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .errors
            .push(what);
        Action::Stop
    }
}

impl ExitHandler for GuestHandler {
    fn io_out(&mut self, vcpu: &Vcpu, port: u16, data: &[u8]) -> Action {
        let index = vcpu.index();
        let regs = if hypercall::needs_regs(port) {
            match vcpu.fd().get_regs() {
                Ok(r) => r,
                Err(e) => return self.fail(format!("get_regs: {e}")),
            }
        } else {
            Default::default()
        };
        let call = match hypercall::decode(port, data, &regs) {
            Ok(c) => c,
            Err(e) => return self.fail(format!("vcpu {index}: {e}")),
        };
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        match call {
            Hypercall::Console(b) => shared.console.push(char::from(b)),
            Hypercall::Mark(n) => shared.marks.push((index, n, self.start.elapsed())),
            Hypercall::Exit(code) => {
                self.exit_code = Some(code);
                return Action::Stop;
            }
            Hypercall::Protect { gpa, len, perms } => {
                if let Err(e) = vcpu.vm().space().protect(gpa, len, perms) {
                    shared
                        .errors
                        .push(format!("vcpu {index}: protect {gpa:#x}+{len:#x}: {e}"));
                    return Action::Stop;
                }
            }
            Hypercall::MapTemplate { gpa, len } => {
                let Some(t) = &self.template else {
                    shared
                        .errors
                        .push(format!("vcpu {index}: MAP_TEMPLATE without a template"));
                    return Action::Stop;
                };
                let opts = MapOpts::object(t.clone() as Arc<dyn Mappable>, 0, len)
                    .fixed_replace(gpa)
                    .name("template");
                if let Err(e) = vcpu.vm().space().map(opts) {
                    shared
                        .errors
                        .push(format!("vcpu {index}: map template at {gpa:#x}: {e}"));
                    return Action::Stop;
                }
            }
            Hypercall::SetCr3 { cr3 } => {
                drop(shared);
                let fd = vcpu.fd();
                let set = fd.get_sregs().and_then(|mut s| {
                    s.cr3 = cr3;
                    fd.set_sregs(&s)
                });
                if let Err(e) = set {
                    return self.fail(format!("vcpu {index}: set cr3: {e}"));
                }
            }
        }
        Action::Continue
    }

    fn violation(&mut self, _vcpu: &Vcpu, v: &MemoryViolation) -> Action {
        log::info!("violation: {v}");
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .violations
            .push(v.clone());
        Action::Continue
    }

    fn emulation_failure(&mut self, _vcpu: &Vcpu, f: &EmulationFailure) -> Action {
        log::info!("emulation failure: {f}");
        if let Some(v) = &f.violation {
            self.shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .violations
                .push(v.clone());
        }
        Action::Stop
    }

    fn hlt(&mut self, vcpu: &Vcpu) -> Action {
        self.fail(format!("vcpu {}: hlt", vcpu.index()))
    }

    fn shutdown(&mut self, vcpu: &Vcpu) -> Action {
        let rip = vcpu.fd().get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        self.fail(format!(
            "vcpu {}: shutdown (triple fault) at rip {rip:#x}",
            vcpu.index()
        ))
    }

    fn unhandled(&mut self, index: u32, reason: u32, _run: &mut kvm_bindings::kvm_run) -> Action {
        self.fail(format!(
            "vcpu {index}: unexpected exit (exit_reason {reason})"
        ))
    }
}

/// What each vCPU thread ended with: its EXIT code and how `run_with`
/// returned (errors as text).
pub(super) type VcpuResult = (Option<u32>, Result<VcpuStop, String>);

/// Runs every vCPU on its own thread until each stops, or until `timeout`:
/// then the VM is stopped and each vCPU's RIP is reported (second value);
/// a vCPU that does not leave `KVM_RUN` even then is reported and its thread
/// left behind, so a hung guest never hangs the runner.
pub(super) fn run_vcpus(
    vcpus: Vec<Vcpu>,
    shared: &Arc<Mutex<Shared>>,
    start: Instant,
    template: Option<Arc<HostFile>>,
    timeout: Duration,
) -> (Vec<VcpuResult>, Vec<String>) {
    let n = vcpus.len();
    let vm = vcpus.first().map(|v| v.vm().clone());
    let (tx, rx) = mpsc::channel();
    for mut vcpu in vcpus {
        let tx = tx.clone();
        let mut h = GuestHandler {
            shared: shared.clone(),
            start,
            exit_code: None,
            template: template.clone(),
        };
        std::thread::spawn(move || {
            let r = vcpu.run_with(&mut h).map_err(|e| e.to_string());
            let rip = vcpu.fd().get_regs().map_or(u64::MAX, |r| r.rip);
            let _ = tx.send((vcpu.index(), (h.exit_code, r), rip));
        });
    }
    drop(tx);
    let mut results: Vec<Option<VcpuResult>> = (0..n).map(|_| None).collect();
    let mut rips = vec![0; n];
    let mut late = vec![false; n];
    let deadline = start + timeout;
    let mut timed_out = false;
    let mut received = 0;
    while received < n {
        let wait = if timed_out {
            Duration::from_secs(5)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match rx.recv_timeout(wait) {
            Ok((i, result, rip)) => {
                results[i as usize] = Some(result);
                rips[i as usize] = rip;
                late[i as usize] = timed_out;
                received += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !timed_out => {
                timed_out = true;
                if let Some(vm) = &vm {
                    vm.stop();
                }
            }
            Err(_) => break,
        }
    }
    let mut stuck = Vec::new();
    if timed_out {
        for (i, r) in results.iter().enumerate() {
            match r {
                Some(_) if late[i] => stuck.push(format!("vcpu {i} at rip {:#x}", rips[i])),
                Some(_) => {}
                None => stuck.push(format!("vcpu {i} never left KVM_RUN")),
            }
        }
    }
    let results = results
        .into_iter()
        .map(|r| r.unwrap_or((None, Err("vcpu thread did not return".into()))))
        .collect();
    (results, stuck)
}
