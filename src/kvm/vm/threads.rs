//! The helper threads of a [`Vm`]: the filler
//! ([`VmOptions::fill_dense`](super::VmOptions::fill_dense)) and the
//! watchdog ([`VmOptions::watchdog`](super::VmOptions::watchdog)). Each
//! ends when the VM drops (`Vm`'s `Drop` signals their controls).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Vm, VmError};
use crate::mm::{AddressSpace, DEFAULT_FILL_MAX_BYTES};

/// Tells the watchdog thread to end.
#[derive(Default)]
pub(super) struct WatchdogControl {
    pub(super) ended: Mutex<bool>,
    pub(super) wake: Condvar,
}

/// Tells the filler thread to end.
#[derive(Default)]
pub(super) struct FillerControl {
    pub(super) ended: AtomicBool,
}

/// The longest the filler thread waits between calls while recorded
/// windows exist but do not grow denser.
const FILLER_IDLE_MAX: Duration = Duration::from_secs(1);

/// How long the filler thread waits while nothing is recorded (a fault
/// that records a window wakes it sooner).
const FILLER_ASLEEP: Duration = Duration::from_secs(3600);

/// Starts the filler thread of a VM (see
/// [`VmOptions::fill_dense`](super::VmOptions::fill_dense)): it calls
/// [`AddressSpace::fill_dense`], at most once per `period`; then waits
/// `period` while the recorded windows grow denser (or something was
/// filled), twice as long as last time while they do not (up to
/// [`FILLER_IDLE_MAX`]), and until a fault records a window while none is.
/// It holds the address space, not the VM, and ends when the VM drops
/// (which joins it).
pub(super) fn spawn_filler(
    space: Arc<AddressSpace>,
    period: Duration,
    control: Arc<FillerControl>,
) -> Result<JoinHandle<()>, VmError> {
    let ended = move || control.ended.load(Ordering::Acquire);
    std::thread::Builder::new()
        .name("guestmm-filler".into())
        .spawn(move || {
            let mut idle = period;
            loop {
                let seen = space.fill_generation();
                let report = space.fill_dense(DEFAULT_FILL_MAX_BYTES);
                idle = if report.pending == 0 {
                    FILLER_ASLEEP
                } else if report.filled_bytes > 0 || report.progress {
                    period
                } else {
                    (idle * 2).min(FILLER_IDLE_MAX)
                };
                // At least `period` between calls, then the rest of the
                // idle time unless a fault records a window.
                std::thread::sleep(period);
                if ended() {
                    return;
                }
                if idle > period {
                    space.wait_fill_work(seen, idle - period);
                }
                if ended() {
                    return;
                }
            }
        })
        .map_err(|source| VmError::BadOption {
            option: "fill_dense",
            why: format!("cannot start its thread: {source}"),
        })
}

/// Starts the watchdog thread of a VM: every half `period` it kicks the
/// vCPUs inside `KVM_RUN` for longer than `period`. It ends when the VM
/// drops.
pub(super) fn spawn_watchdog(
    vm: Weak<Vm>,
    period: Duration,
    control: Arc<WatchdogControl>,
) -> Result<(), VmError> {
    std::thread::Builder::new()
        .name("guestmm-watchdog".into())
        .spawn(move || loop {
            let ended = control.ended.lock().unwrap_or_else(|e| e.into_inner());
            let (ended, _) = control
                .wake
                .wait_timeout_while(ended, period / 2, |ended| !*ended)
                .unwrap_or_else(|e| e.into_inner());
            if *ended {
                return;
            }
            drop(ended);
            let Some(vm) = vm.upgrade() else { return };
            vm.kick_overdue(period);
        })
        .map(|_| ())
        .map_err(|source| VmError::BadOption {
            option: "watchdog",
            why: format!("cannot start its thread: {source}"),
        })
}
