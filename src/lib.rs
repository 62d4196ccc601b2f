//! # guestmm
//!
//! Lazily populated guest-physical memory for KVM micro-VMs.
//!
//! A VMM embeds guestmm to own its guest's RAM. Memory is carved from one
//! memfd by a page allocator ([`memfile::MemoryFile`]); an address space
//! ([`mm`]) records what the guest-physical space maps (vmas), what is
//! populated (pmas) and per-mapping protections; a guest touch of an
//! unpopulated page makes KVM exit, and the exit becomes a fault that
//! populates a window of pages and shows it to the guest through KVM memory
//! slots ([`kvm`]).
//!
//! ## Layers
//!
//! Data flows one way, bottom up; no layer names one above it.
//!
//! ```text
//!  range, perms, segment    half-open ranges; an ordered map of non-overlapping ranges
//!  dirty                    sparse per-page dirty sets and the shared sink (names range)
//!  uffd                     userfaultfd (write-protect mode) wrapper; names no other layer
//!        │
//!  memfile                  one memfd: allocate / inc_ref / dec_ref / decommit / usage
//!        │
//!  mm                       vmas + protection ranges, pmas (COW aware), mappables,
//!        │                  the fault path, host-side I/O, fork; talks to KVM only
//!        │                  through the AddressSpaceBackend trait
//!  snapshot                 the sparse snapshot file (header, layout, opaque vCPU/VM
//!        │                  blobs, memory by GPA) and the working-set record; reads
//!        │                  memory through mm without populating or committing it
//!  kvm                      memslots (the backend), exit decoding, vCPU run loop,
//!        │                  emulation failures (software page-table walk, iced-x86
//!        │                  decode, fault in what the instruction needs)
//!        │
//!  vmm, bin/tinyvmm         boot setup, hypercall ABI and runner for the guests in
//!                           guest/, and the small VMM that runs them (feature `vmm`)
//! ```
//!
//! ## Features
//!
//! The library itself (everything but [`vmm`]) builds with a Rust toolchain
//! alone. The `vmm` feature adds `tinyvmm`, its test guests, their boot code
//! and runner; it assembles `guest/*.S` at build time and so also needs gcc,
//! as, ld and objcopy. `make run`, `make test` and `make bench` turn it on.
//!
//! ## Glossary
//!
//! - **vma** (virtual memory area): a guest-physical range mapped to one
//!   thing: anonymous memory or a [`Mappable`](mm::Mappable) at an offset, private or
//!   shared, with maximum permissions and a name. Created by `map`, cut by
//!   `unmap`.
//! - **pma** (physical memory area): a populated guest-physical range and the
//!   file pages that back it, with the permissions it is installed with and
//!   whether a write must first copy it (copy-on-write).
//! - **protection range**: a sub-range of a vma with its own current
//!   permissions (Zircon's `MappingProtectionRanges`). Changing protections
//!   never splits a vma.
//! - **memslot**: a KVM `kvm_userspace_memory_region` that makes a host
//!   virtual range visible to the guest at a guest-physical address.
//!   guestmm registers only populated memory, so a touch of anything else
//!   exits to userspace.
//! - **fault-around**: a fault populates an aligned window around the
//!   faulting address, not one page, because exits and slot updates cost far
//!   more than allocating memory that is never touched. Windows double
//!   along a sequential stream, up to 1 GiB by default.
//! - **prefill**: filling the host page tables of a window just installed
//!   (`MADV_POPULATE_WRITE`), so KVM maps its pages without a host page
//!   fault each.
//!
//! ## Prefill and copy-on-write granularity
//!
//! A fault-around window is mapped, not filled: without more, each 4 KiB
//! page still costs a host page fault inside KVM on first touch. The fault
//! path fills a window's host page tables when the memory beside it (the
//! stream's previous window, or its neighbours) proved dense, so a
//! sequential guest gets its windows filled while a sparse one commits
//! only the pages it touches; [`mm::Prefill`] (an
//! [`AddressSpaceOptions`](mm::AddressSpaceOptions) field) chooses
//! `Dense` (default), `Always` or `Never` and caps what one fault fills.
//! The fill runs with no lock held.
//!
//! A guest that touches pages in a random order installs every window
//! while the memory beside it is still empty, so no fault sees evidence.
//! Under `Dense` the fault path records each window it installs without a
//! fill, and [`mm::AddressSpace::fill_dense`], called off the fault path,
//! fills a recorded window once it is itself `later_percent` (default
//! 10 %) committed: the `scatter` guest gets its windows filled after
//! touching a tenth of them, a guest touching a page or two per window
//! never does. A [`kvm::Vm`] runs it on its filler thread
//! ([`kvm::VmOptions::fill_dense`]).
//!
//! Independently, a write fault on
//! copy-on-write memory copies at most the 2 MiB chunk around it
//! ([`mm::COW_CHUNK`]), however large the window; see [`mm::fault`].
//!
//! ## Copy-on-write modes
//!
//! A [`kvm::Vm`] traps the guest's writes to copy-on-write memory in one of
//! two ways, chosen at [`kvm::Vm::new`] ([`kvm::VmOptions::cow`],
//! [`kvm::CowMode`]) and reported in [`kvm::VmStats::cow_mode`]:
//!
//! - **read-only slots** (works everywhere; what `Auto`, the default,
//!   falls back to where userfaultfd is unavailable): copy-on-write
//!   memory sits in read-only memslots; a write exits and the fault copies
//!   the 2 MiB chunk around it. A locked read-modify-write whose write
//!   hits such a page is emulated by KVM and is not atomic against other
//!   vCPUs (README, "Atomicity").
//! - **userfaultfd write protection** (`/dev/userfaultfd` or privileged
//!   `userfaultfd(2)`, memfd/tmpfs pages; what `Auto` picks where it can
//!   be opened): copy-on-write memory sits in
//!   *writable* memslots with its host pages write-protected; a write
//!   blocks inside KVM while the VM's fault thread copies that one 4 KiB
//!   page ([`mm::AddressSpace::break_cow_page`]) and wakes it; the
//!   instruction then runs natively, so locked instructions stay atomic,
//!   a write copies its page only and copy-on-write adds no memslot. A
//!   2 MiB chunk with [`mm::pma::COW_COLLAPSE_PAGES`] broken pages is
//!   copied whole at the next break (bounded fragmentation), and so is one
//!   written in order ([`mm::pma::COW_COLLAPSE_RUN_PAGES`] broken pages
//!   right below the faulting one: a sequential writer). Pages of
//!   files userfaultfd cannot protect (a regular file on disk mapped
//!   privately) keep read-only slots and chunk-granular copies, as in the
//!   other mode.
//!
//! ## Dirty tracking
//!
//! [`mm::AddressSpace::start_dirty_tracking`] /
//! [`take_dirty`](mm::AddressSpace::take_dirty) (and the same on
//! [`kvm::Vm`]) report which 4 KiB pages changed since the last take, as a
//! sparse [`dirty::DirtyPages`]. Host-side changes (writes, zeroing, pins
//! for write, copy-on-write page breaks, pages dropped by decommit, unmap
//! or truncation) mark a shared [`dirty::DirtyLog`] as they happen; the
//! guest's writes are KVM's dirty bitmap on writable memslots, harvested
//! into the same log by each take and, so that no bit dies with its slot,
//! before every slot deletion (merges, splits, write protection, removal).
//! A take needs no pause; while tracking, slot deletions pause the vCPUs.
//!
//! ## Snapshots, restores and clones
//!
//! [`kvm::Vm::snapshot`] pauses the VM and writes a [`snapshot`] file: the
//! vCPUs' and the VM's KVM state ([`kvm::VcpuState`], [`kvm::VmState`]),
//! the layout, and the memory by guest-physical address, read through the
//! files behind it without populating or committing anything (a diff:
//! only the pages dirty since its base). [`kvm::Vm::restore`] maps the
//! file privately into a new VM (the guest runs before any of it is read)
//! and can record, then prefetch, the windows its guest faults in
//! ([`kvm::WorkingSetMode`]; [`mm::AddressSpace::prefetch`]).
//! [`kvm::Vm::clone_vm`] forks the address space into a new KVM VM with
//! the same vCPU state ([`mm::ParentProtection`] chooses how the parent
//! traps its writes afterwards).
//!
//! ## Memslots
//!
//! Each window is installed as its own memslot while the VM holds fewer
//! than a budget ([`kvm::DEFAULT_SLOT_BUDGET`]); with doubling windows a
//! run of S bytes needs O(log S) slots, and a stream deletes none, so KVM
//! keeps the mappings it built. At the budget the smallest adjacent pair
//! of slots merges (the fewest mappings zapped). [`kvm::MergePolicy`]
//! also offers `Eager` (slots are always the maximal runs); see
//! `kvm/slots.rs`.
//!
//! ## Lock order
//!
//! Locks are taken top to bottom; a thread holding one never waits for a lock
//! above it. Siblings are never held together.
//!
//! ```text
//! AddressSpace dirty control      Mutex: serializes start / take / stop of dirty
//!   │                             tracking; taken first, by nothing else
//! AddressSpace.mapping            RwLock: vmas + protection ranges. Faults and host I/O
//!   │                             read it; map / unmap / protect / fork write it.
//!   └─ AddressSpace.active        Mutex: pmas, fault-around streams, pins.
//!        ├─ PrivateRefs           owner counts of private pages (shared by forks)
//!        ├─ SharedMemory.state    an object's pages and mappers (translate)
//!        ├─ HostFile refs/mappers
//!        ├─ SlotTable.state       memslots, the host reservation and its userfaultfd
//!        │    │                   write protection (backend calls)
//!        │    └─ RunGate          which vCPUs are in KVM_RUN (a leaf: slot changes
//!        │                        close the gate with the slot table locked)
//!        ├─ SpaceRegion.shown     the pages a region view has mapped (a leaf)
//!        ├─ MemoryFile.inner      allocation map, refcounts, internal mappings
//!        └─ DirtyLog              the dirty sink (a leaf): host writes mark it
//!                                 under `active`, the slot table under its
//!                                 `state`, a take empties it holding nothing
//!
//! AddressSpace.fill_signal        Mutex: the fill-work generation (a leaf, held
//!                                 alone: the fault path bumps it after releasing
//!                                 `active`; the filler thread waits on it)
//! Vm.diff_base                    Mutex: the last full snapshot and its layout (a
//!                                 leaf, held alone; the pages dirty since it live
//!                                 under the address space's dirty-tracking control)
//! ```
//!
//! Exceptions, written out:
//! - `SharedMemory::decommit` and `truncate` collect the affected mappers
//!   under the object's lock, release it, and only then call each address
//!   space: `invalidate` (decommit) takes `active`, `truncated` takes
//!   `mapping` (read) and then `active`. An object lock is never held while
//!   an address space lock is taken.
//! - `map` calls `Mappable::add_mapping` with `mapping` held and `active`
//!   not held; that takes only the object's own lock.
//! - `fork` holds the parent's `mapping` (read) and `active`, then takes the
//!   child's, which no other thread can see yet.
//! - `fill_dense` reads `mapping` and locks `active` to judge recorded
//!   windows (their residency: `MemoryFile.inner`), releases both, and
//!   only then fills (`MADV_POPULATE_WRITE` on the slot table's
//!   reservation, no guestmm lock held), as the fault path's prefill does.
//! - The copy-on-write fault thread (`kvm/cow_wp.rs`, one per VM in
//!   userfaultfd mode) holds nothing between events; for each one it calls
//!   `AddressSpace::break_cow_page`, which takes `mapping` (read), `active`
//!   and, through the backend, `SlotTable.state`, like any fault, then wakes
//!   the page. A vCPU blocked on a write-protected page sits inside
//!   `KVM_RUN` holding KVM's SRCU read lock, which deleting a memslot
//!   waits for; the thread that deletes one may hold `active`, which the
//!   fault thread needs. So in this mode every slot deletion closes the run
//!   gate first: the kick ends the blocked fault (`EINTR`), the vCPU
//!   leaves `KVM_RUN` and retries after the change. The thread is stopped
//!   and joined when the `Vm` drops, before the slot table and the
//!   userfaultfd (whose close wakes anything still blocked).
//! - Dirty tracking: `start_dirty_tracking` and `stop_dirty_tracking` take
//!   the control lock, then `active`, then (backend calls) `SlotTable.state`;
//!   `take_dirty` takes the control lock, then `SlotTable.state` (the
//!   harvest, `active` not held: faults go on), then the `DirtyLog`.
//! - `kvm::emulate` holds no lock of its own: it calls `read_with`,
//!   `handle_fault` and `SlotTable::slot_at` one at a time, each taking and
//!   releasing its locks in this order.
//! - `snapshot::save` holds no lock of its own either: it calls
//!   `AddressSpace::layout` (`mapping`, read) and `extents` (`mapping`,
//!   `active`) one at a time, then, with no address-space lock held,
//!   translates objects (their own lock alone) and takes and drops file
//!   references (`MemoryFile.inner`) around each read.
//!
//! ## Threads
//!
//! guestmm starts two threads per [`kvm::Vm`], both optional
//! ([`kvm::VmOptions`]) and both ended when the `Vm` drops:
//! - the watchdog (`watchdog`): every half period it kicks vCPUs inside
//!   `KVM_RUN` for longer than the period; it holds a weak reference to
//!   the `Vm` and ends within half a period of its drop;
//! - the filler (`fill_dense`): calls
//!   [`AddressSpace::fill_dense`](mm::AddressSpace::fill_dense) every
//!   period while the recorded windows grow denser, backs off to once a
//!   second while they do not, and sleeps on the fill-work generation
//!   while none is recorded (a fault that records one wakes it). It holds
//!   the address space, not the `Vm`; the `Vm`'s drop wakes and joins it.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod dirty;
pub mod kvm;
pub mod memfile;
pub mod mm;
pub mod perms;
pub mod range;
pub mod segment;
pub mod snapshot;
pub mod uffd;
#[cfg(feature = "vmm")]
pub mod vmm;

pub use perms::{Access, Perms};
pub use range::{FileRange, GuestRange, Range, RangeError, PAGE_SIZE};
