//! Clone: `fork()` of an address space with 1 GiB of populated private
//! memory (time and bookkeeping bytes), the first write to a page shared
//! with the fork (copy-on-write break), and a write after the fork is gone
//! (ownership takeover, no copy). No KVM: `NoopBackend`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{AddressSpace, AddressSpaceOptions, MapOpts, NoopBackend};
use guestmm::{Access, Perms};

use crate::common::{median, median_us, Table, Target};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1024 * MIB;
const BASE: u64 = 1 << 30;
/// Distance between the addresses one repetition writes: far enough apart
/// that the fault-around policy sees no sequential stream.
const STRIDE: u64 = 64 * MIB;

fn populated_space() -> Arc<AddressSpace> {
    let memfile =
        Arc::new(MemoryFile::new("clone", MemoryFileOptions::default()).expect("memfile"));
    let space = AddressSpace::new(
        memfile,
        Arc::new(NoopBackend),
        AddressSpaceOptions::default(),
    )
    .expect("space");
    space
        .map(
            MapOpts::anonymous(SIZE)
                .fixed(BASE)
                .perms(Perms::READ_WRITE)
                .name("ram"),
        )
        .expect("map");
    let chunk = vec![0x5au8; 16 * MIB as usize];
    for off in (0..SIZE).step_by(chunk.len()) {
        space.write(BASE + off, &chunk).expect("populate");
    }
    let st = space.stats();
    assert_eq!(st.private_bytes, SIZE, "1 GiB of private pages populated");
    space
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

pub fn run(table: &mut Table) {
    let space = populated_space();
    let reps = crate::reps().clamp(5, (SIZE / STRIDE / 2) as usize);
    let mut fork_t = Vec::new();
    let mut meta_parent = Vec::new();
    let mut meta_child = Vec::new();
    let (mut cow_write, mut cow_fault, mut own_write, mut own_fault) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut copied = Vec::new();
    for r in 0..reps as u64 {
        let shared_at = BASE + 2 * r * STRIDE;
        let owned_at = shared_at + STRIDE;
        let (child, t) = timed(|| space.fork(Arc::new(NoopBackend)).expect("fork"));
        fork_t.push(t);
        meta_parent.push(space.metadata_bytes() as f64);
        meta_child.push(child.metadata_bytes() as f64);

        let before = space.stats().cow_copied_bytes;
        let (_, t) = timed(|| space.write(shared_at, &[1u8; 8]).expect("write"));
        cow_write.push(t);
        let (p, t) = timed(|| {
            space
                .handle_fault(shared_at + STRIDE / 2, Access::Write)
                .expect("fault")
        });
        cow_fault.push(t);
        assert!(p.cow_copied > 0, "the fault copied: {p:?}");
        copied.push((space.stats().cow_copied_bytes - before) as f64);

        drop(child);
        let takeovers = space.stats().cow_takeovers;
        let (_, t) = timed(|| space.write(owned_at, &[1u8; 8]).expect("write"));
        own_write.push(t);
        let (p, t) = timed(|| {
            space
                .handle_fault(owned_at + STRIDE / 2, Access::Write)
                .expect("fault")
        });
        own_fault.push(t);
        assert_eq!(p.cow_copied, 0, "sole owner takes over: {p:?}");
        assert!(space.stats().cow_takeovers > takeovers);
    }
    let how = "1 GiB anonymous private, populated by host writes, NoopBackend";
    let f = table.bench(
        "fork-1g",
        median_us(&fork_t) / 1e3,
        "ms",
        &format!("{how}: AddressSpace::fork"),
    );
    f.target(Target::AtMost(5.0));
    let f = table.bench(
        "fork-1g-metadata",
        median(&meta_child) / 1024.0,
        "KiB",
        "child's AddressSpace::metadata_bytes after the fork (vma, pma, protection, private-refcount entries)",
    );
    f.target(Target::AtMost(64.0));
    table.bench(
        "fork-1g-metadata-parent",
        median(&meta_parent) / 1024.0,
        "KiB",
        "parent's metadata_bytes after the fork (earlier rounds' COW breaks split its pmas)",
    );
    table.bench(
        "cow-break-write-4k",
        median_us(&cow_write),
        "µs",
        "first host write (8 bytes) to a page shared with the fork: copies that page",
    );
    table.bench(
        "cow-break-fault-2m",
        median_us(&cow_fault),
        "µs",
        "first write fault on a shared page: copies the 2 MiB fault-around window",
    );
    table.bench(
        "cow-break-copied",
        median(&copied) / 1024.0,
        "KiB",
        "bytes copied by the host write and the write fault together",
    );
    table.bench(
        "cow-takeover-write-4k",
        median_us(&own_write),
        "µs",
        "host write to a COW page after the fork is dropped: takes the page over, no copy",
    );
    table.bench(
        "cow-takeover-fault-2m",
        median_us(&own_fault),
        "µs",
        "write fault after the fork is dropped: takes the 2 MiB window over, no copy",
    );
}
