//! `Vm`: a KVM VM whose RAM is a guestmm address space, shown to the guest
//! through a [`SlotTable`], with the run gate its vCPUs pass through (see
//! `kvm/gate.rs`): pause, stop, the watchdog, and the filler thread
//! ([`VmOptions::fill_dense`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::cow_wp::{CowMode, CowStats, FaultThread};
use super::gate::{install_kick_handler, Closed, RunGate};
use super::slots::{MergePolicy, SlotStats, SlotTable};
use crate::memfile::MemoryFile;
use crate::mm::{AddressSpace, AddressSpaceOptions, MmError, DEFAULT_FILL_PERIOD};
use crate::range::GuestRange;

mod error;
mod threads;

pub use error::{StopCause, VmError};
use threads::{spawn_filler, spawn_watchdog, FillerControl, WatchdogControl};

/// `KVM_CAP_EXIT_ON_EMULATION_FAILURE`: emulation failures exit to
/// userspace at any CPL instead of injecting #UD.
const CAP_EXIT_ON_EMULATION_FAILURE: u32 = 204;

/// Opens `/dev/kvm` and checks that it answers as KVM does (API version
/// 12), so a missing, inaccessible or impostor device is one clear error
/// instead of a failure at the first VM ioctl.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|source| VmError::Kvm {
        op: "open /dev/kvm",
        source,
    })?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::Kvm {
            op: "KVM_GET_API_VERSION",
            source: kvm_ioctls::Error::new(libc::ENOTTY),
        });
    }
    Ok(kvm)
}

/// Options of a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The address space (its `size` is also the host reservation's size).
    pub space: AddressSpaceOptions,
    /// Lower the memslot limit below what KVM offers.
    pub max_slots: Option<usize>,
    /// When adjacent installs share a memslot.
    pub slot_merge: MergePolicy,
    /// The signal that kicks vCPUs out of `KVM_RUN`, as an offset from
    /// `SIGRTMIN` (default 0). guestmm installs a handler that does
    /// nothing; vCPU threads must not block it (see `kvm/gate.rs`).
    pub kick_signal: i32,
    /// Kick a vCPU that has been inside `KVM_RUN` this long, and populate
    /// what its current instruction needs: KVM's emulator hangs without
    /// an exit on a few instructions whose memory operand has no slot
    /// (`sgdt`/`sidt` at CPL3 on PVM hosts). A busy vCPU costs one exit per
    /// period. `None` turns it off (a VMM may call [`Vm::kick_overdue`]
    /// from its own timer instead).
    pub watchdog: Option<Duration>,
    /// Run a filler thread that calls
    /// [`AddressSpace::fill_dense`] (fills installed windows once they
    /// prove dense; see [`Prefill::Dense`](crate::mm::Prefill::Dense)):
    /// every period while the windows it watches grow denser, backing off
    /// to once a second while they do not, asleep while none is recorded
    /// (a fault that records one wakes it). Each call fills at most
    /// [`DEFAULT_FILL_MAX_BYTES`](crate::mm::DEFAULT_FILL_MAX_BYTES). `None` turns it off (a VMM may call
    /// `fill_dense` itself). Default [`DEFAULT_FILL_PERIOD`] (5 ms).
    pub fill_dense: Option<Duration>,
    /// How guest writes to copy-on-write memory are trapped (see
    /// [`CowMode`]); the mode chosen is in [`VmStats::cow_mode`].
    pub cow: CowMode,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            space: AddressSpaceOptions {
                size: 1 << 40,
                ..AddressSpaceOptions::default()
            },
            max_slots: None,
            slot_merge: MergePolicy::default(),
            kick_signal: 0,
            watchdog: Some(Duration::from_secs(1)),
            fill_dense: Some(DEFAULT_FILL_PERIOD),
            cow: CowMode::default(),
        }
    }
}

/// Exit counters of a [`Vm`] (all vCPUs).
#[derive(Debug, Default)]
pub(crate) struct ExitCounters {
    pub exits: AtomicU64,
    pub memory_exits: AtomicU64,
    pub emulation_failures: AtomicU64,
    pub emulation_shutdowns: AtomicU64,
    pub violations: AtomicU64,
    pub device_exits: AtomicU64,
    pub native_reruns: AtomicU64,
    pub mmu_resets: AtomicU64,
    pub watchdog_kicks: AtomicU64,
    pub watchdog_populated: AtomicU64,
}

/// A snapshot of a VM's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Every exit from `KVM_RUN`.
    pub exits: u64,
    /// Exits resolved as memory faults (MMIO on guest RAM, memory faults).
    pub memory_exits: u64,
    /// Emulation failures (internal errors and shutdowns) resolved by
    /// populating the pages the instruction needs.
    pub emulation_failures: u64,
    /// Of those, the ones that came back as `KVM_EXIT_SHUTDOWN`.
    pub emulation_shutdowns: u64,
    /// Violations reported to the handler.
    pub violations: u64,
    /// Exits forwarded to device handlers.
    pub device_exits: u64,
    /// Instructions KVM's emulator computes wrongly that were rewound and
    /// re-run natively once their page was installed (see `kvm/native.rs`).
    pub native_reruns: u64,
    /// MMU context resets (a shutdown that populating did not cure).
    pub mmu_resets: u64,
    /// Watchdog kicks of vCPUs long inside `KVM_RUN`.
    pub watchdog_kicks: u64,
    /// Of those, the ones that found something to populate (a hang cured).
    pub watchdog_populated: u64,
    /// Memslot changes that paused the vCPUs to avoid a gap.
    pub slot_pauses: u64,
    /// Memslot counters.
    pub slots: SlotStats,
    /// The copy-on-write mode in use (never `Auto`).
    pub cow_mode: CowMode,
    /// The copy-on-write fault thread's counters (zero in
    /// [`CowMode::ReadOnlySlots`]).
    pub cow: CowStats,
}

/// A VM whose guest-physical memory is a guestmm address space.
///
/// Several vCPUs may run on their own threads against one `Arc<Vm>`.
pub struct Vm {
    /// The options the VM was created with (a clone inherits them).
    opts: VmOptions,
    vm_fd: Arc<VmFd>,
    slots: Arc<SlotTable>,
    space: Arc<AddressSpace>,
    devices: RwLock<Vec<GuestRange>>,
    pub(crate) counters: ExitCounters,
    emulation_failure_exits: bool,
    pub(crate) gate: Arc<RunGate>,
    stop_cause: Mutex<Option<StopCause>>,
    watchdog: Option<Arc<WatchdogControl>>,
    /// The filler thread ([`VmOptions::fill_dense`]), joined on drop.
    filler: Option<(Arc<FillerControl>, JoinHandle<()>)>,
    /// Whether what host I/O populated before the first `KVM_RUN` was
    /// installed (see [`Vm::install_host_writes`]).
    host_writes_installed: AtomicBool,
    /// The copy-on-write mode in use (resolved, never `Auto`).
    cow_mode: CowMode,
    /// The copy-on-write fault thread (`UserfaultfdWp` only).
    cow_thread: Mutex<Option<FaultThread>>,
    /// vCPUs created and not dropped.
    pub(crate) live_vcpus: AtomicU32,
    /// The base of diff snapshots (see `kvm/lifecycle.rs`).
    pub(crate) diff_base: Mutex<Option<super::lifecycle::DiffBase>>,
}

/// A pause of every vCPU of a [`Vm`] (see [`Vm::pause`]); they resume when
/// it drops.
#[must_use = "the vCPUs resume when the pause is dropped"]
pub struct Paused<'a> {
    _closed: Closed<'a>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("space", &self.space)
            .field("slots", &self.slots)
            .finish()
    }
}

impl Vm {
    /// Creates a VM with an empty address space over `memfile`.
    ///
    /// Errors: bad options (`max_slots` of 0, a watchdog period of 0, a kick
    /// signal beyond `SIGRTMAX`), KVM refusing the VM, or the address space
    /// options (see [`AddressSpace::new`]).
    pub fn new(kvm: &Kvm, memfile: Arc<MemoryFile>, opts: VmOptions) -> Result<Arc<Vm>, VmError> {
        let space_opts = opts.space.clone();
        Self::build(kvm, opts, move |slots| {
            AddressSpace::new(memfile, slots, space_opts)
        })
    }

    /// Creates a VM whose address space `make_space` builds over the VM's
    /// slot table (a new empty space, or a fork of another VM's).
    pub(crate) fn build(
        kvm: &Kvm,
        opts: VmOptions,
        make_space: impl FnOnce(Arc<SlotTable>) -> Result<Arc<AddressSpace>, MmError>,
    ) -> Result<Arc<Vm>, VmError> {
        if opts.max_slots == Some(0) {
            return Err(VmError::BadOption {
                option: "max_slots",
                why: "0 slots leave no room for guest memory".into(),
            });
        }
        if opts.fill_dense == Some(Duration::ZERO) {
            return Err(VmError::BadOption {
                option: "fill_dense",
                why: "a period of 0 would scan continuously".into(),
            });
        }
        if opts.watchdog == Some(Duration::ZERO) {
            return Err(VmError::BadOption {
                option: "watchdog",
                why: "a period of 0 would kick vCPUs continuously".into(),
            });
        }
        let signal =
            install_kick_handler(opts.kick_signal).map_err(|source| VmError::KickSignal {
                offset: opts.kick_signal,
                source,
            })?;
        let gate = Arc::new(RunGate::new(signal));
        let vm_fd = Arc::new(kvm.create_vm().map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VM",
            source,
        })?);
        let emulation_failure_exits =
            kvm.check_extension_raw(CAP_EXIT_ON_EMULATION_FAILURE.into()) > 0 && {
                let cap = kvm_enable_cap {
                    cap: CAP_EXIT_ON_EMULATION_FAILURE,
                    args: [1, 0, 0, 0],
                    ..Default::default()
                };
                vm_fd.enable_cap(&cap).is_ok()
            };
        if !emulation_failure_exits {
            log::warn!("KVM_CAP_EXIT_ON_EMULATION_FAILURE unavailable: failed emulation at CPL3 may raise #UD in the guest");
        }
        let kvm_limit = kvm.get_nr_memslots();
        let limit = opts.max_slots.map_or(kvm_limit, |m| m.min(kvm_limit));
        let mut table = SlotTable::with_gate(
            vm_fd.clone(),
            opts.space.size,
            limit,
            opts.slot_merge,
            gate.clone(),
        )?;
        let uffd = super::cow_wp::resolve(opts.cow)?;
        if let Some(u) = &uffd {
            table.set_userfaultfd(u.clone());
        }
        let cow_mode = if uffd.is_some() {
            CowMode::UserfaultfdWp
        } else {
            CowMode::ReadOnlySlots
        };
        let slots = Arc::new(table);
        let space = make_space(slots.clone())?;
        let watchdog = opts.watchdog.map(|_| Arc::new(WatchdogControl::default()));
        let filler = match opts.fill_dense {
            Some(period) => {
                let control = Arc::new(FillerControl::default());
                let handle = spawn_filler(space.clone(), period, control.clone())?;
                Some((control, handle))
            }
            None => None,
        };
        let vm = Arc::new(Vm {
            opts: opts.clone(),
            vm_fd,
            slots,
            space,
            devices: RwLock::new(Vec::new()),
            counters: ExitCounters::default(),
            emulation_failure_exits,
            gate,
            stop_cause: Mutex::new(None),
            watchdog: watchdog.clone(),
            filler,
            host_writes_installed: AtomicBool::new(false),
            cow_mode,
            cow_thread: Mutex::new(None),
            live_vcpus: AtomicU32::new(0),
            diff_base: Mutex::new(None),
        });
        if let Some(uffd) = uffd {
            let weak = Arc::downgrade(&vm);
            let thread = FaultThread::spawn(
                uffd,
                Arc::downgrade(&vm.slots),
                Arc::downgrade(&vm.space),
                Box::new(move |error| {
                    log::error!("{error}");
                    if let Some(vm) = weak.upgrade() {
                        vm.stop_with(StopCause::CopyOnWrite { error });
                    }
                }),
            )
            .map_err(|source| VmError::BadOption {
                option: "cow",
                why: format!("cannot start the copy-on-write thread: {source}"),
            })?;
            *vm.cow_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        }
        if let (Some(period), Some(control)) = (opts.watchdog, watchdog) {
            spawn_watchdog(Arc::downgrade(&vm), period, control)?;
        }
        Ok(vm)
    }

    /// Installs everything populated in the address space
    /// ([`AddressSpace::install_populated`]): memory the VMM wrote before
    /// starting the guest (a loader, a restored snapshot) then costs no
    /// exits. The first [`Vcpu::run`](super::Vcpu::run) of the VM does it
    /// once by itself; call it again after writing more memory from the
    /// host. Returns the bytes handed to the memslots.
    ///
    /// Errors: out of memslots ([`VmError::Mm`]); what was installed stays.
    pub fn install_host_writes(&self) -> Result<u64, VmError> {
        let whole =
            GuestRange::new(0, self.space.options().size).map_err(|e| VmError::Mm(e.into()))?;
        let bytes = self.space.install_populated(whole)?;
        self.host_writes_installed.store(true, Ordering::Release);
        log::debug!("installed {bytes} bytes populated by host I/O");
        Ok(bytes)
    }

    /// [`install_host_writes`](Self::install_host_writes) unless it ran.
    pub(crate) fn install_host_writes_once(&self) -> Result<(), VmError> {
        // vCPUs starting together may both install: harmless (installing
        // what is installed changes nothing).
        if self.host_writes_installed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.install_host_writes().map(|_| ())
    }

    /// Pauses every vCPU: returns once none is inside `KVM_RUN`; vCPUs that
    /// try to enter wait (inside [`Vcpu::run`](super::Vcpu::run)) until the
    /// returned guard drops. Pauses nest (with each other and with the
    /// short pauses memslot changes take).
    ///
    /// Errors: [`VmError::VcpusStuck`] if a vCPU did not leave `KVM_RUN`
    /// within 2 s (the pause is then not taken).
    pub fn pause(&self) -> Result<Paused<'_>, VmError> {
        let closed = self.gate.close();
        match closed.stuck() {
            0 => Ok(Paused { _closed: closed }),
            stuck => Err(VmError::VcpusStuck { stuck }),
        }
    }

    /// Stops the VM: every vCPU leaves `KVM_RUN`, and every
    /// [`Vcpu::run`](super::Vcpu::run) returns [`Exit::Stopped`](super::Exit::Stopped)
    /// from now on. Irreversible.
    pub fn stop(&self) {
        self.stop_with(StopCause::Requested);
    }

    /// Stops the VM for `cause` (the first cause is kept).
    pub(crate) fn stop_with(&self, cause: StopCause) {
        self.stop_cause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(cause);
        self.gate.stop();
    }

    /// Why the VM was stopped, if it was.
    pub fn stop_cause(&self) -> Option<StopCause> {
        self.stop_cause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Kicks every vCPU that has been inside `KVM_RUN` longer than
    /// `threshold` and makes it populate what its current instruction needs
    /// before it re-enters (what the [`VmOptions::watchdog`] thread does);
    /// returns how many were kicked.
    pub fn kick_overdue(&self, threshold: Duration) -> usize {
        let n = self.gate.kick_overdue(threshold);
        self.counters
            .watchdog_kicks
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// The guest-physical address space.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// vCPUs created ([`Vm::create_vcpu`]) and not yet dropped.
    pub fn vcpu_count(&self) -> u32 {
        self.live_vcpus.load(Ordering::Acquire)
    }

    /// The options the VM was created with.
    pub fn options(&self) -> &VmOptions {
        &self.opts
    }

    /// The device ranges ([`add_device_range`](Self::add_device_range)).
    pub fn device_ranges(&self) -> Vec<GuestRange> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The memslot table.
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// True if emulation failures exit to userspace at every CPL.
    pub fn emulation_failure_exits(&self) -> bool {
        self.emulation_failure_exits
    }

    /// Creates the KVM vCPU with id `id` (a raw fd, for VMMs that drive it
    /// themselves; [`Vm::create_vcpu`] gives one that guestmm's run loop,
    /// kicks and pauses know).
    pub(crate) fn create_vcpu_fd(&self, id: u64) -> Result<VcpuFd, VmError> {
        self.vm_fd.create_vcpu(id).map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VCPU",
            source,
        })
    }

    /// Declares `range` a device range: guest accesses there that no vma
    /// covers go to the VMM as MMIO exits instead of being violations.
    ///
    /// Errors ([`VmError::DeviceRange`], nothing registered): an empty range,
    /// one that overlaps another device range, or one that overlaps a vma
    /// (a vma there would silently win).
    pub fn add_device_range(&self, range: GuestRange) -> Result<(), VmError> {
        let refuse = |why: String| Err(VmError::DeviceRange { range, why });
        if range.is_empty() {
            return refuse("it is empty".into());
        }
        if let Some(vma) = self
            .space
            .maps()
            .into_iter()
            .find(|m| m.range.overlaps(range))
        {
            return refuse(format!("it overlaps the vma at {}", vma.range));
        }
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = devices.iter().find(|d| d.overlaps(range)) {
            return refuse(format!("it overlaps device range {other}"));
        }
        devices.push(range);
        Ok(())
    }

    pub(crate) fn is_device(&self, gpa: u64) -> bool {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|r| r.contains(gpa))
    }

    /// Counters of exits and memslots.
    pub fn stats(&self) -> VmStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        VmStats {
            exits: load(&c.exits),
            memory_exits: load(&c.memory_exits),
            emulation_failures: load(&c.emulation_failures),
            emulation_shutdowns: load(&c.emulation_shutdowns),
            violations: load(&c.violations),
            device_exits: load(&c.device_exits),
            native_reruns: load(&c.native_reruns),
            mmu_resets: load(&c.mmu_resets),
            watchdog_kicks: load(&c.watchdog_kicks),
            watchdog_populated: load(&c.watchdog_populated),
            slot_pauses: self.slots.pauses(),
            slots: self.slots.stats(),
            cow_mode: self.cow_mode,
            cow: self
                .cow_thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(FaultThread::stats)
                .unwrap_or_default(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let thread = self.cow_thread.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(mut t) = thread.take() {
            t.stop();
        }
        if let Some(control) = &self.watchdog {
            *control.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
            control.wake.notify_all();
        }
        if let Some((control, handle)) = self.filler.take() {
            control.ended.store(true, Ordering::Release);
            self.space.wake_fill_waiters();
            if handle.join().is_err() {
                log::error!("the filler thread panicked");
            }
        }
    }
}
