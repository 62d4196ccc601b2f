//! The run gate: every `KVM_RUN` of a guestmm vCPU passes through it, so
//! the VM knows which vCPUs are inside the guest and can get them out.
//!
//! Three things need that:
//! - **slot changes without gaps.** KVM cannot grow a memslot, so merging
//!   slots or changing a slot's writability deletes a slot and adds
//!   another; between the two ioctls the memory is installed but has no
//!   slot. A vCPU that touched it then would exit into KVM's instruction
//!   emulator (wrong results for some instructions, locked instructions no
//!   longer atomic) or, for a page-table or CR3 page, be shut down.
//!   [`SlotTable`](super::SlotTable) therefore [`close`](RunGate::close)s the
//!   gate around such a change: every vCPU inside `KVM_RUN` is kicked out
//!   and waits at the gate until the change is complete. No vCPU observes
//!   installed memory without a slot.
//! - **kicks and pauses** for the VMM ([`VcpuKicker`](super::VcpuKicker),
//!   [`Vm::pause`](super::Vm::pause), [`Vm::stop`](super::Vm::stop)).
//! - **the watchdog**: how long each vCPU has been inside `KVM_RUN`.
//!
//! # How a vCPU is kicked out
//!
//! The kicker sets `kvm_run.immediate_exit` (so a vCPU about to enter
//! `KVM_RUN` returns at once) and sends the vCPU's thread the kick signal
//! (so a vCPU inside `KVM_RUN` returns `EINTR`), both under the gate's lock
//! while the vCPU is marked as running; the vCPU clears `immediate_exit`
//! under the same lock when it leaves. The signal's handler does nothing:
//! its delivery is the point. See [`install_kick_handler`].
//!
//! # Lock order
//!
//! The gate's mutex is a leaf: it is taken below `SlotTable.state` (a slot
//! change closes the gate with the slot table locked) and never held while
//! another lock is taken. A vCPU waiting at the gate holds no lock.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

/// Why a vCPU was asked to leave `KVM_RUN` and come back to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KickReason {
    /// The VMM's [`VcpuKicker::kick`](super::VcpuKicker::kick).
    Vmm,
    /// The watchdog found it inside `KVM_RUN` for too long.
    Watchdog,
}

/// What [`RunGate::enter`] returns instead of letting the vCPU in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A kick is pending for this vCPU (consumed).
    Kicked(KickReason),
    /// The VM was stopped.
    Stopped,
}

/// The `kvm_run` mapping of a vCPU, where `immediate_exit` lives.
#[derive(Clone, Copy)]
struct RunPage(*mut kvm_run);

// SAFETY: the pointer is only dereferenced under the gate's mutex while
// the vCPU is registered, and a vCPU unregisters before its fd (and with it
// the mapping) is dropped (see `Vcpu`'s Drop).
unsafe impl Send for RunPage {}

impl RunPage {
    fn set_immediate_exit(self, value: u8) {
        // SAFETY: see `Send`: the mapping is alive while registered. The
        // kernel reads the byte at `KVM_RUN` entry; a volatile write keeps
        // the store from being elided.
        unsafe { std::ptr::addr_of_mut!((*self.0).immediate_exit).write_volatile(value) }
    }
}

struct Entry {
    run: RunPage,
    /// The thread inside `KVM_RUN` and since when, if it is inside.
    inside: Option<(libc::pthread_t, Instant)>,
    /// A kick the vCPU has not seen yet.
    kick: Option<KickReason>,
}

#[derive(Default)]
struct GateState {
    /// Registered vCPUs by gate id (`None`: a free id).
    vcpus: Vec<Option<Entry>>,
    /// Open closes (slot changes, pauses); vCPUs wait while > 0.
    closers: u32,
    /// Set once by [`RunGate::stop`].
    stopped: bool,
    /// vCPUs inside `KVM_RUN`.
    inside: u32,
}

/// The gate. See the module docs.
pub(crate) struct RunGate {
    state: Mutex<GateState>,
    changed: Condvar,
    signal: libc::c_int,
}

/// How long a close waits before kicking again (a signal can be lost to a
/// thread that was between the check and the ioctl; `immediate_exit`
/// covers that, this covers anything else).
const REKICK: Duration = Duration::from_millis(50);
/// How long a close waits for vCPUs to leave before it gives up and goes
/// ahead (a vCPU stuck inside KVM: better a gap than a hung VM).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

impl RunGate {
    /// A gate whose kicks use signal `signal`.
    pub(crate) fn new(signal: libc::c_int) -> RunGate {
        RunGate {
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
            signal,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a vCPU whose `kvm_run` mapping is `run`; returns its id.
    ///
    /// # Preconditions
    /// - `run` stays mapped until [`unregister`](Self::unregister).
    pub(crate) fn register(&self, run: *mut kvm_run) -> usize {
        let mut st = self.lock();
        let entry = Entry {
            run: RunPage(run),
            inside: None,
            kick: None,
        };
        match st.vcpus.iter().position(Option::is_none) {
            Some(id) => {
                st.vcpus[id] = Some(entry);
                id
            }
            None => {
                st.vcpus.push(Some(entry));
                st.vcpus.len() - 1
            }
        }
    }

    /// Forgets vCPU `id` (it is not inside `KVM_RUN`: its owner is dropping it).
    pub(crate) fn unregister(&self, id: usize) {
        let mut st = self.lock();
        debug_assert!(st.vcpus[id].as_ref().is_some_and(|e| e.inside.is_none()));
        st.vcpus[id] = None;
    }

    /// Lets vCPU `id` into `KVM_RUN` once the gate is open, or refuses: a
    /// pending kick (consumed) or a stopped VM.
    pub(crate) fn enter(&self, id: usize) -> Result<(), Refused> {
        let mut st = self.lock();
        loop {
            if st.stopped {
                return Err(Refused::Stopped);
            }
            let entry = st.vcpus[id].as_mut().expect("registered vCPU");
            if let Some(reason) = entry.kick.take() {
                return Err(Refused::Kicked(reason));
            }
            if st.closers == 0 {
                break;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        st.vcpus[id].as_mut().expect("registered vCPU").inside = Some((me, Instant::now()));
        st.inside += 1;
        Ok(())
    }

    /// vCPU `id` is back from `KVM_RUN`.
    pub(crate) fn leave(&self, id: usize) {
        let mut st = self.lock();
        let entry = st.vcpus[id].as_mut().expect("registered vCPU");
        debug_assert!(entry.inside.is_some());
        entry.inside = None;
        entry.run.set_immediate_exit(0);
        st.inside -= 1;
        if st.closers > 0 && st.inside == 0 {
            self.changed.notify_all();
        }
    }

    /// The kick signal.
    pub(crate) fn signal(&self) -> libc::c_int {
        self.signal
    }

    /// Consumes vCPU `id`'s pending kick, if any.
    pub(crate) fn take_kick(&self, id: usize) -> Option<KickReason> {
        self.lock().vcpus[id].as_mut().and_then(|e| e.kick.take())
    }

    /// Makes vCPU `id` leave `KVM_RUN` (if it is inside) and refuses its
    /// next [`enter`](Self::enter) with `reason`.
    pub(crate) fn kick(&self, id: usize, reason: KickReason) {
        let mut st = self.lock();
        let Some(entry) = st.vcpus.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        entry.kick = Some(reason);
        self.interrupt(entry);
        self.changed.notify_all();
    }

    /// Gets a vCPU that is inside `KVM_RUN` out of it.
    ///
    /// # Preconditions
    /// - the gate's lock is held (`entry` comes from the locked state).
    fn interrupt(&self, entry: &Entry) {
        if let Some((thread, _)) = entry.inside {
            entry.run.set_immediate_exit(1);
            // SAFETY: `thread` is inside `Vcpu::run` (marked under this
            // lock, unmarked under it before the thread can end), so it is
            // alive; the kick signal's handler is installed and does nothing.
            let r = unsafe { libc::pthread_kill(thread, self.signal) };
            if r != 0 {
                log::warn!("kicking a vCPU thread failed: errno {r}");
            }
        }
    }

    /// Closes the gate: every vCPU inside `KVM_RUN` is kicked out, and
    /// none enters until the returned guard drops. Waits until no vCPU is
    /// inside (at most [`CLOSE_TIMEOUT`], then goes ahead with a warning;
    /// [`Closed::all_out`] tells).
    pub(crate) fn close(&self) -> Closed<'_> {
        let mut st = self.lock();
        st.closers += 1;
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while st.inside > 0 && !st.stopped {
            for entry in st.vcpus.iter().flatten() {
                self.interrupt(entry);
            }
            let now = Instant::now();
            if now >= deadline {
                log::warn!(
                    "{} vCPU(s) did not leave KVM_RUN within {CLOSE_TIMEOUT:?}; going ahead",
                    st.inside
                );
                return Closed {
                    gate: self,
                    stuck: st.inside,
                };
            }
            st = self
                .changed
                .wait_timeout(st, REKICK.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Closed {
            gate: self,
            stuck: 0,
        }
    }

    /// Stops the VM: every vCPU leaves `KVM_RUN` and is refused from now on.
    pub(crate) fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        for entry in st.vcpus.iter().flatten() {
            self.interrupt(entry);
        }
        self.changed.notify_all();
    }

    /// True once [`stop`](Self::stop) was called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Kicks, with [`KickReason::Watchdog`], every vCPU inside `KVM_RUN`
    /// for longer than `threshold`; returns how many.
    pub(crate) fn kick_overdue(&self, threshold: Duration) -> usize {
        let mut st = self.lock();
        let now = Instant::now();
        let mut n = 0;
        for entry in st.vcpus.iter_mut().flatten() {
            if entry
                .inside
                .is_some_and(|(_, since)| now.duration_since(since) > threshold)
            {
                entry.kick.get_or_insert(KickReason::Watchdog);
                self.interrupt(entry);
                n += 1;
            }
        }
        n
    }
}

/// An open close of the gate (see [`RunGate::close`]); reopens on drop.
pub(crate) struct Closed<'a> {
    gate: &'a RunGate,
    /// vCPUs still inside `KVM_RUN` when the close gave up waiting.
    stuck: u32,
}

impl Closed<'_> {
    /// vCPUs that did not leave `KVM_RUN` in time (0: every vCPU is out).
    pub(crate) fn stuck(&self) -> u32 {
        self.stuck
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.closers -= 1;
        if st.closers == 0 {
            self.gate.changed.notify_all();
        }
    }
}

/// Installs the kick signal's handler (once per signal number; it does
/// nothing, the signal only interrupts `KVM_RUN`). `offset` is added to
/// `SIGRTMIN`.
///
/// A VMM that already uses that signal for its own vCPU kicks with a
/// handler that does nothing loses nothing: the handler is replaced by an
/// equivalent one.
pub(crate) fn install_kick_handler(offset: i32) -> Result<libc::c_int, std::io::Error> {
    static INSTALLED: Mutex<Vec<libc::c_int>> = Mutex::new(Vec::new());

    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    let signal = vmm_sys_util::signal::SIGRTMIN() + offset;
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if !installed.contains(&signal) {
        vmm_sys_util::signal::register_signal_handler(signal, on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        installed.push(signal);
    }
    Ok(signal)
}
