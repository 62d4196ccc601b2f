//! `SlotTable`: the KVM [`AddressSpaceBackend`]. It mirrors what the mm core
//! installs into a host virtual reservation (`host_va = base + gpa`, one
//! `mmap(MAP_SHARED|MAP_FIXED)` of the memfd per install) and into KVM
//! memory slots.
//!
//! # Slot policy
//!
//! Slots are exactly the maximal runs of installed memory with the same
//! writability: GPA-adjacent installs merge into one slot (delete the old
//! slots, add the merged one), `write_protect` and `remove` split them.
//! Because a slot covers host virtual addresses, not file pages, replacing
//! the pages under an existing run (a copy-on-write break that keeps the
//! writability) needs only the `mmap`, no slot change.
//!
//! That is [`MergePolicy::Eager`]. Deleting a slot makes KVM drop its
//! mappings of every page in it, so the guest's next access to a page it
//! had touched before a merge faults again inside KVM (no exit to
//! userspace, ~5 µs per 4 KiB page nested); merging a large, well-used run
//! is therefore not free, and a sequential stream that merges each new
//! window into its run re-faults everything it touched so far.
//!
//! The default, [`MergePolicy::Lazy`], gives an install that only extends
//! a run (replaces nothing) a slot of its own while the table holds fewer
//! than its budget (`max_slots`). Fault-around windows grow geometrically
//! along a sequential stream, so a run of size S needs O(log S) slots (a
//! 1 GiB sequential touch: about 10) and a stream deletes no slot until the
//! budget is reached. At the budget, room is made by merging the *cheapest*
//! pair of GPA-adjacent same-writability slots (the new install counting as
//! one): the smallest pair, whose merge zaps the fewest of KVM's mappings —
//! with geometric windows, the small early windows of a run, not the large
//! hot one the guest is streaming through. Where nothing is adjacent (a
//! sparse guest), the install gets its own slot beyond the budget: the
//! budget is soft, the table's limit is not. Under `Lazy`, slots tile what
//! is installed (each with one writability) without having to be maximal.

//! # No gaps
//!
//! KVM cannot resize a slot, so a merge, a split or a change of writability
//! deletes slots and adds others; between the two ioctls the memory they
//! cover is installed but has no slot. A plan whose deletes and adds overlap
//! therefore runs with the VM's run gate closed (`kvm/gate.rs`): every
//! vCPU is out of `KVM_RUN` until the new slots are in, so no vCPU ever
//! observes installed memory without a slot. A plan that only adds, or only
//! deletes what is removed for good, needs no pause.
//!
//! Every change also bumps a generation counter
//! ([`SlotTable::generation`]): the emulation path compares it across a
//! `KVM_RUN` to tell a transient (memory changed while the vCPU ran) from
//! a failure.
//!
//! Every change is planned before anything is touched: an install that would
//! need more slots than the limit fails with [`BackendError::OutOfSlots`] and
//! changes nothing. `remove` and `write_protect` never fail for lack of
//! slots: if splitting would exceed the limit they remove the whole affected
//! runs instead (the guest faults them back in), which is always safe.
//!
//! # Copy-on-write and the dirty log
//!
//! Two mechanisms ride on the slots, each in a child module of this one.
//! With a userfaultfd ([`SlotTable::set_userfaultfd`], the VM's
//! [`CowMode::UserfaultfdWp`](super::CowMode)), copy-on-write installs of
//! shmem pages are *writable* extents whose host pages are write-protected
//! page by page (`kvm/slots/wp.rs`); other copy-on-write installs are
//! read-only slots. While the address space tracks dirty pages
//! ([`AddressSpaceBackend::start_dirty_log`]), every writable slot carries
//! `KVM_MEM_LOG_DIRTY_PAGES` and is harvested before it is deleted
//! (`kvm/slots/dirty_log.rs`). In either mode every plan that deletes a
//! slot closes the run gate: a vCPU blocked on a protected page holds
//! KVM's SRCU read lock, which a deletion waits for, and a guest write
//! between a slot's last harvest and its deletion would be lost.
//!
//! Lock: `state` sits below `AddressSpace.active` (the mm core calls in with
//! it held) and above `MemoryFile.inner` and the dirty sink (a leaf).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

use super::gate::RunGate;
use super::sys::Reservation;
use crate::dirty::DirtyLog;
use crate::mm::backend::{AddressSpaceBackend, BackendError, Installed};
use crate::range::{GuestRange, Range};
use crate::segment::{SegmentSet, SegmentValue};
use crate::uffd::Userfaultfd;

mod dirty_log;
mod wp;

use wp::{shmem_backed, Protected};

/// A KVM memory slot: its id and writability (its range is the set key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    id: u32,
    writable: bool,
}

impl SegmentValue for Slot {
    /// Slots are KVM objects; the table merges them itself, never the set.
    fn merge(&self, _: Range, _: &Self, _: Range) -> Option<Self> {
        None
    }
    fn split(&self, _: Range, _: u64) -> (Self, Self) {
        (*self, *self)
    }
}

/// When GPA-adjacent installs with the same writability share a slot (see
/// the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergePolicy {
    /// Every install merges with the slots it touches: slots are always the
    /// maximal same-writability runs of what is installed.
    Eager,
    /// An install that replaces nothing becomes a slot of its own while
    /// fewer than `max_slots` slots are live (capped by the table's limit);
    /// at that count the cheapest GPA-adjacent same-writability pair (the
    /// new install included) is merged to make room, and where no pair is
    /// adjacent the install still gets its own slot (the table's limit
    /// permitting). Installs that replace or re-protect installed memory
    /// merge like `Eager`, except that a same-writability replacement
    /// inside one slot changes no slot. The default, with
    /// [`DEFAULT_SLOT_BUDGET`].
    Lazy {
        /// The slot budget: live slots (all kinds) below which extending a
        /// run adds a slot.
        max_slots: usize,
    },
}

/// The slot budget of the default [`MergePolicy`].
pub const DEFAULT_SLOT_BUDGET: usize = 32;

impl Default for MergePolicy {
    fn default() -> Self {
        MergePolicy::Lazy {
            max_slots: DEFAULT_SLOT_BUDGET,
        }
    }
}

/// Counters of a [`SlotTable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Slots added (`KVM_SET_USER_MEMORY_REGION` with a size).
    pub adds: u64,
    /// Slots deleted.
    pub deletes: u64,
    /// Slots live now.
    pub live: u64,
    /// Most slots live at once.
    pub max_live: u64,
    /// `mmap`s of file pages into the reservation.
    pub maps: u64,
    /// Installs that found exactly that already installed.
    pub redundant_installs: u64,
    /// Copy-on-write installs write-protected through userfaultfd.
    pub wp_installs: u64,
    /// Writable ranges write-protected again (forks).
    pub wp_reprotects: u64,
    /// `UFFDIO_WAKE`s after protected pages were replaced or removed.
    pub wp_wakes: u64,
    /// `KVM_GET_DIRTY_LOG` calls (harvests of one slot).
    pub dirty_harvests: u64,
    /// Harvests of a slot just before its deletion.
    pub dirty_harvests_on_delete: u64,
}

struct SlotState {
    /// What is installed: GPA → file pages and writability.
    extents: SegmentSet<Installed>,
    /// KVM slots: the maximal same-writability runs of `extents`.
    slots: SegmentSet<Slot>,
    /// GPA ranges whose host pages are write-protected through the
    /// userfaultfd (registered, copy-on-write).
    wp: SegmentSet<Protected>,
    free_ids: Vec<u32>,
    next_id: u32,
    limit: usize,
    policy: MergePolicy,
    stats: SlotStats,
    /// The dirty sink while logging (see the module docs).
    dirty: Option<Arc<DirtyLog>>,
}

/// The slot changes one operation needs, computed before anything changes.
struct Plan {
    delete: Vec<(GuestRange, Slot)>,
    add: Vec<(GuestRange, bool)>,
}

impl Plan {
    /// True if some memory is covered by a deleted slot and by an added
    /// one: it would be without a slot between the two.
    fn opens_a_gap(&self) -> bool {
        self.delete
            .iter()
            .any(|(d, _)| self.add.iter().any(|(a, _)| a.overlaps(*d)))
    }
}

/// The KVM backend: memslots over a host reservation. See the module docs.
pub struct SlotTable {
    vm: Arc<VmFd>,
    reservation: Reservation,
    state: Mutex<SlotState>,
    ioctl_errors: AtomicU64,
    /// Bumped by every change of what the guest sees.
    generation: AtomicU64,
    /// The VM's run gate, closed around changes that would open a gap
    /// (`None`: no vCPU runs against this table).
    gate: Option<Arc<RunGate>>,
    /// Changes that closed the gate.
    pauses: AtomicU64,
    /// The userfaultfd trapping writes to copy-on-write pages, if any.
    uffd: Option<Arc<Userfaultfd>>,
}

impl std::fmt::Debug for SlotTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotTable")
            .field("stats", &self.stats())
            .finish()
    }
}

impl SlotTable {
    /// A table for a guest-physical space of `size` bytes using at most
    /// `limit` slots (the caller takes the minimum of `KVM_CAP_NR_MEMSLOTS`
    /// and its own configuration).
    pub fn new(vm: Arc<VmFd>, size: u64, limit: usize) -> Result<SlotTable, BackendError> {
        Self::with_policy(vm, size, limit, MergePolicy::Eager)
    }

    /// [`new`](Self::new) with a merge policy.
    pub fn with_policy(
        vm: Arc<VmFd>,
        size: u64,
        limit: usize,
        policy: MergePolicy,
    ) -> Result<SlotTable, BackendError> {
        Self::build(vm, size, limit, policy, None)
    }

    /// A table whose gap-opening changes close `gate` (see the module docs).
    pub(crate) fn with_gate(
        vm: Arc<VmFd>,
        size: u64,
        limit: usize,
        policy: MergePolicy,
        gate: Arc<RunGate>,
    ) -> Result<SlotTable, BackendError> {
        Self::build(vm, size, limit, policy, Some(gate))
    }

    fn build(
        vm: Arc<VmFd>,
        size: u64,
        limit: usize,
        policy: MergePolicy,
        gate: Option<Arc<RunGate>>,
    ) -> Result<SlotTable, BackendError> {
        if limit == 0 {
            return Err(BackendError::NoSlots);
        }
        let reservation = Reservation::new(size).map_err(|source| BackendError::Host {
            op: "mmap(reservation)",
            source,
        })?;
        Ok(SlotTable {
            vm,
            reservation,
            state: Mutex::new(SlotState {
                extents: SegmentSet::new(),
                slots: SegmentSet::new(),
                wp: SegmentSet::new(),
                free_ids: Vec::new(),
                next_id: 0,
                limit,
                policy,
                stats: SlotStats::default(),
                dirty: None,
            }),
            ioctl_errors: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            gate,
            pauses: AtomicU64::new(0),
            uffd: None,
        })
    }

    /// Makes copy-on-write installs writable slots with write-protected
    /// host pages, trapped through `uffd` (opened with
    /// [`Features::SHMEM_WP`](crate::uffd::Features::SHMEM_WP)); see the
    /// module docs. Whoever reads `uffd`'s events must break copy-on-write
    /// for each page (the VM's fault thread). Call before anything is
    /// installed.
    pub fn set_userfaultfd(&mut self, uffd: Arc<Userfaultfd>) {
        self.uffd = Some(uffd);
    }

    /// The guest-physical address of host address `addr` inside the
    /// reservation, or `None` if it lies outside.
    pub fn gpa_of_host(&self, addr: u64) -> Option<u64> {
        let base = self.reservation.host_addr(0);
        addr.checked_sub(base)
            .filter(|&gpa| gpa < self.reservation.len())
    }

    /// A counter bumped by every change of what the guest sees (slots added
    /// or deleted, pages mapped or unmapped under a slot): equal values
    /// read before and after a `KVM_RUN` mean KVM saw today's memory.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Changes that paused the vCPUs (closed the run gate) to avoid a gap.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Counters.
    pub fn stats(&self) -> SlotStats {
        self.lock().stats
    }

    /// The slot limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Live slots as `(range, writable)`, in address order.
    pub fn slots(&self) -> Vec<(GuestRange, bool)> {
        self.lock()
            .slots
            .iter()
            .map(|(r, s)| (r, s.writable))
            .collect()
    }

    /// Whether a live slot covers `gpa`: `Some(writable)`, or `None`.
    pub fn slot_at(&self, gpa: u64) -> Option<bool> {
        self.lock().slots.find_segment(gpa).map(|(_, s)| s.writable)
    }

    /// Host virtual address of `gpa` inside the reservation, or `None` if
    /// `gpa` lies beyond it.
    ///
    /// For diagnostics, not for writing guest memory: the reservation maps
    /// whatever is installed, which may be copy-on-write pages shared with
    /// a fork, a clone or a snapshot's page cache (a read-only slot does
    /// not make the host mapping read-only). Write guest memory through the
    /// address space (`write_with`, `SpaceMemory`, the region view), which
    /// copies first.
    pub fn host_addr(&self, gpa: u64) -> Option<u64> {
        (gpa < self.reservation.len()).then(|| self.reservation.host_addr(gpa))
    }

    /// Checks that slots tile what is installed, each slot over extents
    /// of its own writability (and, under [`MergePolicy::Eager`], that they
    /// are exactly the maximal same-writability runs), with unique ids under
    /// the limit.
    pub fn check_invariants(&self) -> Result<(), String> {
        let st = self.lock();
        st.extents.check_invariants()?;
        st.slots.check_invariants()?;
        let slots: Vec<(GuestRange, bool)> =
            st.slots.iter().map(|(r, s)| (r, s.writable)).collect();
        if st.policy == MergePolicy::Eager {
            let runs = runs_of(st.extents.iter().map(|(r, e)| (r, e.writable)));
            if runs != slots {
                return Err(format!(
                    "slots {slots:?} are not the runs {runs:?} of what is installed"
                ));
            }
        }
        for &(r, w) in &slots {
            if st.extents.span_range(r) != r.len()
                || st.extents.iter_range(r).any(|(_, e)| e.writable != w)
            {
                return Err(format!(
                    "slot {r} (writable {w}) is not fully installed with that writability"
                ));
            }
        }
        let covered: u64 = slots.iter().map(|(r, _)| r.len()).sum();
        if covered != st.extents.span() {
            return Err(format!(
                "slots cover {covered:#x} bytes, {:#x} are installed",
                st.extents.span()
            ));
        }
        let mut ids: Vec<u32> = st.slots.iter().map(|(_, s)| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != st.slots.len() || ids.last().is_some_and(|&id| id as usize >= st.limit) {
            return Err(format!(
                "slot ids {ids:?} duplicated or beyond the limit {}",
                st.limit
            ));
        }
        if st.stats.live != st.slots.len() as u64 {
            return Err(format!(
                "live counter {} != {} slots",
                st.stats.live,
                st.slots.len()
            ));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, range: GuestRange) -> Result<(), BackendError> {
        if range.end() > self.reservation.len() {
            return Err(BackendError::OutOfRange {
                range,
                limit: self.reservation.len(),
            });
        }
        Ok(())
    }

    /// Plans replacing what is installed in `range` with `change` (`None`:
    /// nothing, `Some(w)`: all of it with writability `w`).
    ///
    /// # Preconditions
    /// - `st` is the locked state.
    fn plan_locked(st: &SlotState, range: GuestRange, change: Option<bool>) -> Plan {
        // The window: `range` plus every slot overlapping or touching it.
        let probe = Range::new_unchecked(
            range.start().saturating_sub(1),
            range.end().saturating_add(1),
        );
        let old: Vec<(GuestRange, Slot)> =
            st.slots.iter_range(probe).map(|(r, s)| (r, *s)).collect();
        let start = old
            .first()
            .map_or(range.start(), |(r, _)| r.start().min(range.start()));
        let end = old
            .last()
            .map_or(range.end(), |(r, _)| r.end().max(range.end()));
        let window = Range::new_unchecked(start, end);
        let mut pieces: Vec<(GuestRange, bool)> = Vec::new();
        for (r, e) in st.extents.iter_range(window) {
            let r = r.intersect(window);
            if r.start() < range.start() {
                pieces.push((
                    Range::new_unchecked(r.start(), r.end().min(range.start())),
                    e.writable,
                ));
            }
            if r.end() > range.end() {
                pieces.push((
                    Range::new_unchecked(r.start().max(range.end()), r.end()),
                    e.writable,
                ));
            }
        }
        if let Some(w) = change {
            pieces.push((range, w));
        }
        pieces.sort_by_key(|(r, _)| r.start());
        let new = runs_of(pieces.into_iter());
        let delete = old
            .iter()
            .filter(|(r, s)| !new.contains(&(*r, s.writable)))
            .copied()
            .collect();
        let add = new
            .into_iter()
            .filter(|(r, w)| !old.iter().any(|(or, os)| or == r && os.writable == *w))
            .collect();
        Plan { delete, add }
    }

    /// Plans an install of `range` with writability `writable` under the
    /// table's policy (see [`MergePolicy`]).
    ///
    /// # Preconditions
    /// - `st` is the locked state.
    fn plan_install_locked(st: &SlotState, range: GuestRange, writable: bool) -> Plan {
        if let MergePolicy::Lazy { max_slots } = st.policy {
            let mut overlapping = st.slots.iter_range(range);
            match (overlapping.next(), overlapping.next()) {
                (None, _) if st.slots.len() < max_slots.min(st.limit) => {
                    return Plan {
                        delete: Vec::new(),
                        add: vec![(range, writable)],
                    };
                }
                (Some((r, s)), None) if r.is_superset_of(range) && s.writable == writable => {
                    return Plan {
                        delete: Vec::new(),
                        add: Vec::new(),
                    };
                }
                (None, _) => return Self::plan_budget_merge_locked(st, range, writable),
                _ => {}
            }
        }
        Self::plan_locked(st, range, Some(writable))
    }

    /// At the slot budget: installs `range` (which overlaps no slot) after
    /// merging the cheapest GPA-adjacent same-writability pair among the
    /// slots and `range` itself (smallest combined size: the fewest KVM
    /// mappings zapped), or, with no such pair, as a slot of its own.
    ///
    /// # Preconditions
    /// - `st` is the locked state; no slot overlaps `range`.
    fn plan_budget_merge_locked(st: &SlotState, range: GuestRange, writable: bool) -> Plan {
        // Slots and the new range in address order; `None` marks the range.
        let mut items: Vec<(GuestRange, Option<Slot>, bool)> = st
            .slots
            .iter()
            .map(|(r, s)| (r, Some(*s), s.writable))
            .collect();
        let at = items.partition_point(|(r, _, _)| r.start() < range.start());
        items.insert(at, (range, None, writable));
        let cheapest = items
            .windows(2)
            .filter(|w| w[0].0.end() == w[1].0.start() && w[0].2 == w[1].2)
            .min_by_key(|w| w[0].0.len() + w[1].0.len());
        let Some(pair) = cheapest else {
            return Plan {
                delete: Vec::new(),
                add: vec![(range, writable)],
            };
        };
        let merged = Range::new_unchecked(pair[0].0.start(), pair[1].0.end());
        let delete = pair
            .iter()
            .filter_map(|(r, slot, _)| slot.map(|s| (*r, s)))
            .collect();
        let mut add = vec![(merged, pair[0].2)];
        if !merged.is_superset_of(range) {
            add.push((range, writable));
        }
        Plan { delete, add }
    }

    /// True if `plan` fits under the slot limit.
    /// The plan of installing `want` over `range` (`protected`: as
    /// write-protected copy-on-write memory), or `None` if the table already
    /// shows exactly that (counted as a redundant install).
    ///
    /// Errors: [`BackendError::OutOfSlots`] if the plan needs more slots
    /// than the limit (nothing changed).
    ///
    /// # Preconditions
    /// - `st` is the locked state.
    fn plan_new_install_locked(
        st: &mut SlotState,
        range: GuestRange,
        want: &Installed,
        protected: bool,
    ) -> Result<Option<Plan>, BackendError> {
        if shows_locked(st, range, want, protected) {
            st.stats.redundant_installs += 1;
            return Ok(None);
        }
        let plan = Self::plan_install_locked(st, range, want.writable);
        if !Self::fits(st, &plan) {
            return Err(BackendError::OutOfSlots { limit: st.limit });
        }
        Ok(Some(plan))
    }

    fn fits(st: &SlotState, plan: &Plan) -> bool {
        st.slots.len() - plan.delete.len() + plan.add.len() <= st.limit
    }

    /// Maps `want`'s pages (`fd` at `want.file_offset`) over `range` in
    /// the reservation, host-writable or not, and records them.
    ///
    /// # Preconditions
    /// - `st` is the locked state.
    fn map_locked(
        &self,
        st: &mut SlotState,
        range: GuestRange,
        fd: BorrowedFd<'_>,
        want: Installed,
        host_writable: bool,
    ) -> Result<(), BackendError> {
        self.reservation
            .map_fd(
                range.start(),
                range.len(),
                fd,
                want.file_offset,
                host_writable,
            )
            .map_err(|source| BackendError::Host {
                op: "mmap(MAP_FIXED)",
                source,
            })?;
        st.stats.maps += 1;
        self.bump();
        st.extents.remove_range(range);
        st.extents.insert(range, want).expect("range just cleared");
        Ok(())
    }

    /// Applies the slot changes of `plan`: deletes first (KVM refuses
    /// overlapping slots), then adds; with the vCPUs paused if that would
    /// leave installed memory without a slot in between.
    ///
    /// # Preconditions
    /// - `st` is the locked state; `plan` fits under the limit.
    fn apply_locked(&self, st: &mut SlotState, plan: Plan) -> Result<(), BackendError> {
        if plan.delete.is_empty() && plan.add.is_empty() {
            return Ok(());
        }
        self.bump();
        // Deletions pause the vCPUs in userfaultfd mode (SRCU, see the
        // module docs) and while logging (nothing may be written between a
        // slot's last harvest and its deletion).
        let deletes = !plan.delete.is_empty() && (self.uffd.is_some() || st.dirty.is_some());
        let _paused = match &self.gate {
            Some(gate) if plan.opens_a_gap() || deletes => {
                self.pauses.fetch_add(1, Ordering::Relaxed);
                Some(gate.close())
            }
            _ => None,
        };
        let log = st.dirty.is_some();
        for (r, slot) in plan.delete {
            if let Err(e) = self.harvest_slot_locked(st, r, slot, true) {
                // Never lose a page: report the whole slot instead.
                log::error!("harvesting slot {} at {r} before deleting it: {e}", slot.id);
                if let Some(sink) = &st.dirty {
                    sink.mark(r);
                }
            }
            self.set_region(slot.id, r, slot.writable, log, true)?;
            st.slots.remove(r.start());
            st.free_ids.push(slot.id);
            st.stats.deletes += 1;
        }
        for (r, writable) in plan.add {
            let id = st.free_ids.pop().unwrap_or_else(|| {
                st.next_id += 1;
                st.next_id - 1
            });
            if let Err(e) = self.set_region(id, r, writable, log, false) {
                st.free_ids.push(id);
                return Err(e);
            }
            st.slots
                .insert_without_merging(r, Slot { id, writable })
                .expect("planned slots do not overlap");
            st.stats.adds += 1;
        }
        st.stats.live = st.slots.len() as u64;
        st.stats.max_live = st.stats.max_live.max(st.stats.live);
        Ok(())
    }

    /// `KVM_SET_USER_MEMORY_REGION` for slot `id` over `r`: adds it (or
    /// changes its flags, if it exists with the same range), with the
    /// dirty log if `log` and `writable`; or deletes it.
    fn set_region(
        &self,
        id: u32,
        r: GuestRange,
        writable: bool,
        log: bool,
        delete: bool,
    ) -> Result<(), BackendError> {
        let flags = match (writable, log) {
            (false, _) => KVM_MEM_READONLY,
            (true, true) => KVM_MEM_LOG_DIRTY_PAGES,
            (true, false) => 0,
        };
        let region = kvm_userspace_memory_region {
            slot: id,
            flags,
            guest_phys_addr: r.start(),
            memory_size: if delete { 0 } else { r.len() },
            userspace_addr: self.reservation.host_addr(r.start()),
        };
        // SAFETY: the region points into our reservation, which outlives
        // every slot (slots are deleted before it is unmapped, see Drop), and
        // whatever is mapped there is memory KVM may access.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| {
            self.ioctl_errors.fetch_add(1, Ordering::Relaxed);
            BackendError::Host {
                op: "KVM_SET_USER_MEMORY_REGION",
                source: std::io::Error::from_raw_os_error(e.errno()),
            }
        })
    }

    /// Removes `range` (or, if slots run short, the whole runs it touches)
    /// from extents and slots.
    ///
    /// # Preconditions
    /// - `st` is the locked state.
    fn remove_locked(&self, st: &mut SlotState, range: GuestRange) -> Result<(), BackendError> {
        let mut range = range;
        let mut plan = Self::plan_locked(st, range, None);
        if !Self::fits(st, &plan) {
            range = widen_to_slots(st, range);
            plan = Self::plan_locked(st, range, None);
        }
        self.apply_locked(st, plan)?;
        self.bump();
        st.extents.remove_range(range);
        let unmapped = self
            .reservation
            .unmap(range.start(), range.len())
            .map_err(|source| BackendError::Host {
                op: "mmap(PROT_NONE)",
                source,
            });
        self.unprotected_locked(st, range);
        unmapped
    }
}

impl AddressSpaceBackend for SlotTable {
    fn install(
        &self,
        range: GuestRange,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> Result<(), BackendError> {
        self.check_range(range)?;
        let mut st = self.lock();
        let want = Installed {
            fd: fd.as_raw_fd(),
            file_offset,
            writable,
        };
        let Some(plan) = Self::plan_new_install_locked(&mut st, range, &want, false)? else {
            return Ok(());
        };
        self.map_locked(&mut st, range, fd, want, writable)?;
        // The new mapping is unprotected: wake writers blocked on the old.
        self.unprotected_locked(&mut st, range);
        self.apply_locked(&mut st, plan)
    }

    fn install_cow(
        &self,
        range: GuestRange,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), BackendError> {
        match &self.uffd {
            Some(uffd) if shmem_backed(fd) => self.install_protected(uffd, range, fd, file_offset),
            // Write protection covers shmem (memfd, tmpfs) pages only:
            // other files' copy-on-write stays a read-only slot.
            _ => self.install(range, fd, file_offset, false),
        }
    }

    fn write_protect_cow(&self, range: GuestRange) -> Result<(), BackendError> {
        match &self.uffd {
            Some(uffd) => self.reprotect_writable(uffd, range),
            None => self.write_protect(range),
        }
    }

    fn page_granular_cow(&self) -> bool {
        self.uffd.is_some()
    }

    fn page_granular_cow_for(&self, fd: BorrowedFd<'_>) -> bool {
        self.uffd.is_some() && shmem_backed(fd)
    }

    fn remove(&self, range: GuestRange) -> Result<(), BackendError> {
        self.check_range(range)?;
        let mut st = self.lock();
        if st.extents.is_empty_range(range) {
            return Ok(());
        }
        self.remove_locked(&mut st, range)
    }

    fn write_protect(&self, range: GuestRange) -> Result<(), BackendError> {
        self.check_range(range)?;
        let mut st = self.lock();
        // One writable piece at a time: a fallback removal may take later
        // pieces with it.
        loop {
            let next = st
                .extents
                .iter_range(range)
                .find(|(_, e)| e.writable)
                .map(|(r, _)| r.intersect(range));
            let Some(part) = next else {
                return Ok(());
            };
            // Plan as if the part were replaced with read-only memory.
            let plan = Self::plan_locked(&st, part, Some(false));
            if !Self::fits(&st, &plan) {
                let whole = widen_to_slots(&st, part);
                self.remove_locked(&mut st, whole)?;
                continue;
            }
            self.apply_locked(&mut st, plan)?;
            st.extents
                .apply_contiguous(part, |_, e| e.writable = false)
                .expect("part is installed");
            st.extents.merge_range(part);
            self.bump();
            // The host mapping stays read-write: the read-only slot is what
            // keeps the guest from writing (KVM maps a read-only slot
            // read-only whatever the host page tables say), nothing else
            // writes through the reservation, and updating every present
            // page-table entry is what a fork of a large guest would pay for
            // (~200 ns per 4 KiB page on this project's nested hosts: 26 ms
            // per 512 MiB). A later install of the range maps it afresh.
            // Writers blocked on protected pages retry against the
            // read-only slot (an exit, then a violation).
            if let Some(uffd) = &self.uffd {
                if !st.wp.is_empty_range(part) {
                    st.stats.wp_wakes += 1;
                    let _ = uffd.wake(self.reservation.host_addr(part.start()), part.len());
                }
            }
        }
    }

    /// Turns on `KVM_MEM_LOG_DIRTY_PAGES` on every writable slot (see the
    /// module docs); on failure the slots flagged so far are cleared again.
    fn start_dirty_log(&self, sink: Arc<DirtyLog>) -> Result<(), BackendError> {
        self.start_logging(sink)
    }

    /// `KVM_GET_DIRTY_LOG` on every writable slot into the sink, under the
    /// table's lock (no slot changes meanwhile; vCPUs keep running).
    fn harvest_dirty(&self) -> Result<(), BackendError> {
        self.harvest_all()
    }

    /// Clears `KVM_MEM_LOG_DIRTY_PAGES` on every slot and forgets the sink
    /// (failures are logged: a slot left logging costs only KVM's work).
    fn stop_dirty_log(&self) {
        self.stop_logging()
    }

    /// Populates the reservation over `range` (`MADV_POPULATE_WRITE`, or
    /// `_READ` for read-only installs), without the table's lock: KVM then
    /// finds the host pages present. A concurrent `remove` leaves
    /// `PROT_NONE` reservation there, which the kernel refuses to populate
    /// (an error, nothing resurrected).
    fn prefill(&self, range: GuestRange, writable: bool) -> Result<u64, BackendError> {
        self.check_range(range)?;
        super::prefill::populate(
            self.reservation.host_addr(range.start()),
            range.len(),
            writable,
        )
        .map_err(|source| BackendError::Host {
            op: if writable {
                "madvise(MADV_POPULATE_WRITE)"
            } else {
                "madvise(MADV_POPULATE_READ)"
            },
            source,
        })?;
        Ok(range.len())
    }
}

impl Drop for SlotTable {
    fn drop(&mut self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let slots: Vec<(GuestRange, Slot)> = st.slots.iter().map(|(r, s)| (r, *s)).collect();
        let log = st.dirty.is_some();
        for (r, s) in slots {
            // Nobody runs the guest any more; the sink may outlive us.
            if let Err(e) = self.harvest_slot_locked(st, r, s, true) {
                log::error!("harvesting slot {} at {r} on drop: {e}", s.id);
                if let Some(sink) = &st.dirty {
                    sink.mark(r);
                }
            }
            if let Err(e) = self.set_region(s.id, r, s.writable, log, true) {
                log::error!("deleting slot {} at {r} on drop: {e}", s.id);
            }
        }
    }
}

/// True if `range` already shows exactly `want` (file, offset,
/// writability), write-protected all over (`protected`) or nowhere.
fn shows_locked(st: &SlotState, range: GuestRange, want: &Installed, protected: bool) -> bool {
    st.extents
        .find_segment(range.start())
        .is_some_and(|(r, e)| {
            r.is_superset_of(range)
                && e.fd == want.fd
                && e.writable == want.writable
                && e.file_offset + (range.start() - r.start()) == want.file_offset
                && if protected {
                    st.wp.span_range(range) == range.len()
                } else {
                    st.wp.is_empty_range(range)
                }
        })
}

/// `range` widened to the slots it overlaps.
fn widen_to_slots(st: &SlotState, range: GuestRange) -> GuestRange {
    st.slots.iter_range(range).fold(range, |acc, (r, _)| {
        Range::new_unchecked(acc.start().min(r.start()), acc.end().max(r.end()))
    })
}

/// Maximal runs of GPA-contiguous pieces with equal writability.
///
/// Preconditions: `pieces` are sorted and do not overlap.
fn runs_of(pieces: impl Iterator<Item = (GuestRange, bool)>) -> Vec<(GuestRange, bool)> {
    let mut runs: Vec<(GuestRange, bool)> = Vec::new();
    for (r, w) in pieces {
        if r.is_empty() {
            continue;
        }
        match runs.last_mut() {
            Some((last, lw)) if last.end() == r.start() && *lw == w => {
                *last = Range::new_unchecked(last.start(), r.end())
            }
            _ => runs.push((r, w)),
        }
    }
    runs
}
