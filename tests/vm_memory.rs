//! vm-memory's `GuestMemory` / `Bytes<GuestAddress>` over an address space
//! ([`SpaceMemory`]): lazy population, copy-on-write, errors, `check_range`.

mod common;
use common::tempfile;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{
    check_file_refs, AddressSpace, AddressSpaceOptions, HostFile, IoOpts, MapOpts,
    RecordingBackend, SpaceMemory,
};
use guestmm::Perms;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

const MIB: u64 = 1 << 20;
const BASE: u64 = 1 << 30;

/// A space whose MemoryFile has 2 MiB chunks, so guest ranges easily span
/// several internal mappings.
fn setup() -> (Arc<MemoryFile>, Arc<RecordingBackend>, Arc<AddressSpace>) {
    let mf = Arc::new(
        MemoryFile::new(
            "vm-memory-test",
            MemoryFileOptions {
                chunk_size: 2 * MIB,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let be = Arc::new(RecordingBackend::new());
    let space = AddressSpace::new(mf.clone(), be.clone(), AddressSpaceOptions::default()).unwrap();
    (mf, be, space)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn tempfile_with(byte: u8, len: u64) -> std::fs::File {
    let mut f = tempfile("vmmem");
    f.write_all(&vec![byte; len as usize]).unwrap();
    f
}

fn no_writable_install(be: &RecordingBackend, start: u64, end: u64) -> Result<(), String> {
    for (range, inst) in be.installed() {
        if range.start() < end && start < range.end() && inst.writable {
            return Err(format!(
                "got a writable install over {range}, want none over [{start:#x}, {end:#x})"
            ));
        }
    }
    Ok(())
}

#[test]
fn round_trips_across_pages_chunks_and_vmas_on_lazy_memory() {
    let (mf, _be, space) = setup();
    // Two adjacent vmas that do not merge (different names).
    space
        .map(MapOpts::anonymous(4 * MIB).fixed(BASE).name("a"))
        .unwrap();
    space
        .map(MapOpts::anonymous(4 * MIB).fixed(BASE + 4 * MIB).name("b"))
        .unwrap();
    assert_eq!(space.maps().len(), 2);
    let mem = SpaceMemory::new(space.clone());
    assert_eq!(space.stats().populated_bytes, 0, "nothing populated yet");

    // (start, len): inside a page; across a page; across the 2 MiB chunk
    // boundary; across the vma boundary; a large run over all of it.
    let cases: &[(u64, usize)] = &[
        (BASE + 100, 50),
        (BASE + 4096 - 7, 20),
        (BASE + 2 * MIB - 3000, 9000),
        (BASE + 4 * MIB - 5, 10),
        (BASE + MIB + 123, 5 * MIB as usize),
    ];
    for (i, &(gpa, len)) in cases.iter().enumerate() {
        let data = pattern(len, i as u8);
        mem.write_slice(&data, GuestAddress(gpa)).unwrap();
        let mut back = vec![0u8; len];
        mem.read_slice(&mut back, GuestAddress(gpa)).unwrap();
        assert!(back == data, "case {i}: read_slice differs from write");
        // The same bytes through the mm's own copy path.
        let mut via_space = vec![0u8; len];
        space.read(gpa, &mut via_space).unwrap();
        assert!(via_space == data, "case {i}: AddressSpace::read differs");
        assert_eq!(mem.write(&data, GuestAddress(gpa)).unwrap(), len);
        assert_eq!(mem.read(&mut back, GuestAddress(gpa)).unwrap(), len);
    }

    // Objects straddling a page, a chunk and the vma boundary.
    for gpa in [BASE + 4096 - 3, BASE + 2 * MIB - 2, BASE + 4 * MIB - 6] {
        let v = 0x1122_3344_5566_7788_u64 ^ gpa;
        mem.write_obj(v, GuestAddress(gpa)).unwrap();
        let got: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
        assert_eq!(got, v, "read_obj at {gpa:#x}: got {got:#x} want {v:#x}");
    }

    // Several slices when a range crosses internal mappings or vmas; their
    // lengths add up.
    let slices: Vec<_> = mem
        .get_slices(
            GuestAddress(BASE + MIB),
            6 * MIB as usize,
            Permissions::Read,
        )
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(slices.len() > 1, "got {} slice(s)", slices.len());
    assert_eq!(
        slices.iter().map(|s| s.len()).sum::<usize>(),
        6 * MIB as usize
    );
    drop(slices);

    // Aligned atomics (virtio rings use them).
    mem.store(0xabcd_u16, GuestAddress(BASE + 0x1002), Ordering::Release)
        .unwrap();
    let idx: u16 = mem
        .load(GuestAddress(BASE + 0x1002), Ordering::Acquire)
        .unwrap();
    assert_eq!(idx, 0xabcd);

    // Zero-length accesses succeed anywhere and populate nothing.
    assert_eq!(mem.write(&[], GuestAddress(0)).unwrap(), 0);

    space.check_invariants().unwrap();
    check_file_refs(&mf, &[&space], &[]).unwrap();
    drop(mem);
    drop(space);
    assert_eq!(mf.allocated_bytes(), 0, "teardown frees everything");
}

#[test]
fn write_through_the_trait_breaks_cow_of_a_private_host_file() {
    let (mf, be, space) = setup();
    // A read-only host file: writable slices must never point into it.
    let f = tempfile_with(0xAB, 2 * MIB);
    let hf = HostFile::new(f.try_clone().unwrap(), false).unwrap();
    space
        .map(MapOpts::object(hf.clone(), 0, 2 * MIB).fixed(BASE))
        .unwrap();
    let mem = SpaceMemory::new(space.clone());

    let before: u32 = mem.read_obj(GuestAddress(BASE + 4096)).unwrap();
    assert_eq!(before, 0xABAB_ABAB);
    no_writable_install(&be, BASE, BASE + 2 * MIB).unwrap();
    assert_eq!(space.stats().cow_copies, 0, "a read copies nothing");

    mem.write_obj(0x0102_0304_u32, GuestAddress(BASE + 4094))
        .unwrap();
    let after: u32 = mem.read_obj(GuestAddress(BASE + 4094)).unwrap();
    assert_eq!(after, 0x0102_0304);
    assert!(space.stats().cow_copies >= 1, "the write copied");

    let mut on_disk = vec![0u8; 8192];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 0).unwrap();
    assert!(
        on_disk.iter().all(|&b| b == 0xAB),
        "the host file is unchanged"
    );
    space.check_invariants().unwrap();
    check_file_refs(&mf, &[&space], &[]).unwrap();
}

#[test]
fn write_through_the_trait_after_fork_leaves_the_sibling_alone() {
    let (mf, parent_be, parent) = setup();
    parent.map(MapOpts::anonymous(4 * MIB).fixed(BASE)).unwrap();
    let pmem = SpaceMemory::new(parent.clone());
    pmem.write_slice(b"parent data", GuestAddress(BASE + 10))
        .unwrap();

    let child_be = Arc::new(RecordingBackend::new());
    let child = parent.fork(child_be.clone()).unwrap();
    let cmem = SpaceMemory::new(child.clone());

    // Reads on both sides keep the pages shared and read-only.
    let mut buf = [0u8; 11];
    cmem.read_slice(&mut buf, GuestAddress(BASE + 10)).unwrap();
    assert_eq!(&buf, b"parent data");
    pmem.read_slice(&mut buf, GuestAddress(BASE + 10)).unwrap();
    no_writable_install(&parent_be, BASE, BASE + 4 * MIB).unwrap();
    no_writable_install(&child_be, BASE, BASE + 4 * MIB).unwrap();
    assert_eq!(child.stats().cow_copies + parent.stats().cow_copies, 0);

    cmem.write_slice(b"child! data", GuestAddress(BASE + 10))
        .unwrap();
    assert!(child.stats().cow_copies >= 1, "the child's write copied");
    pmem.read_slice(&mut buf, GuestAddress(BASE + 10)).unwrap();
    assert_eq!(&buf, b"parent data", "the parent keeps its data");
    cmem.read_slice(&mut buf, GuestAddress(BASE + 10)).unwrap();
    assert_eq!(&buf, b"child! data");

    parent.check_invariants().unwrap();
    child.check_invariants().unwrap();
    check_file_refs(&mf, &[&parent, &child], &[]).unwrap();
}

#[test]
fn unmapped_and_forbidden_accesses_are_errors_not_panics() {
    let (_mf, _be, space) = setup();
    space.map(MapOpts::anonymous(2 * MIB).fixed(BASE)).unwrap();
    space
        .map(
            MapOpts::anonymous(2 * MIB)
                .fixed(BASE + 4 * MIB)
                .perms(Perms::READ)
                .max_perms(Perms::READ_WRITE),
        )
        .unwrap();
    let mem = SpaceMemory::new(space.clone());
    let mut buf = [0u8; 16];

    match mem.read_slice(&mut buf, GuestAddress(BASE - 4096)) {
        Err(GuestMemoryError::InvalidGuestAddress(a)) => assert_eq!(a.0, BASE - 4096),
        other => panic!("got {other:?}, want InvalidGuestAddress"),
    }
    // Partly mapped: refused as a whole, at the first unmapped byte, and
    // nothing is populated.
    match mem.write_slice(&[1; 16], GuestAddress(BASE + 2 * MIB - 8)) {
        Err(GuestMemoryError::InvalidGuestAddress(a)) => assert_eq!(a.0, BASE + 2 * MIB),
        other => panic!("got {other:?}, want InvalidGuestAddress"),
    }
    assert_eq!(
        space.stats().populated_bytes,
        0,
        "a refused access populates nothing"
    );
    assert!(mem.read_obj::<u64>(GuestAddress(BASE + 3 * MIB)).is_err());
    assert!(
        mem.read(&mut buf, GuestAddress(1 << 50)).is_err(),
        "beyond the space"
    );
    assert!(matches!(
        mem.read_slice(&mut buf, GuestAddress(u64::MAX - 4)),
        Err(GuestMemoryError::GuestAddressOverflow)
    ));

    // Write to a read-only protection: PermissionDenied, unless forced.
    match mem.write_obj(7u32, GuestAddress(BASE + 4 * MIB)) {
        Err(GuestMemoryError::IOError(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}")
        }
        other => panic!("got {other:?}, want a PermissionDenied IOError"),
    }
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(BASE + 4 * MIB)).unwrap(),
        0
    );
    let loader = space.guest_memory(IoOpts::FORCE);
    loader
        .write_obj(7u32, GuestAddress(BASE + 4 * MIB))
        .unwrap();
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(BASE + 4 * MIB)).unwrap(),
        7
    );
    space.check_invariants().unwrap();
}

#[test]
fn check_range_answers_without_populating() {
    let (_mf, _be, space) = setup();
    space.map(MapOpts::anonymous(2 * MIB).fixed(BASE)).unwrap();
    space
        .map(
            MapOpts::anonymous(2 * MIB)
                .fixed(BASE + 2 * MIB)
                .perms(Perms::READ),
        )
        .unwrap();
    space
        .map(
            MapOpts::anonymous(2 * MIB)
                .fixed(BASE + 6 * MIB)
                .perms(Perms::NONE)
                .max_perms(Perms::READ_WRITE),
        )
        .unwrap();
    let mem = SpaceMemory::new(space.clone());
    let forced = SpaceMemory::with_opts(space.clone(), IoOpts::FORCE);
    use Permissions::{No, Read, ReadWrite, Write};
    // (start, len, access, want, want when forced)
    let table: &[(u64, usize, Permissions, bool, bool)] = &[
        (BASE, 4096, Read, true, true),
        (BASE, 4096, ReadWrite, true, true),
        (BASE + 2 * MIB - 1, 2, Read, true, true),
        (BASE + 2 * MIB - 1, 2, Write, false, true),
        (BASE + 2 * MIB, 100, Read, true, true),
        (BASE + 2 * MIB, 100, Write, false, true),
        (BASE + 4 * MIB - 1, 2, No, false, false),
        (BASE + 4 * MIB, 1, Read, false, false),
        (BASE + 6 * MIB, 1, No, true, true),
        (BASE + 6 * MIB, 1, Read, false, true),
        (BASE - 1, 1, No, false, false),
        (BASE - 1, 0, Read, true, true),
        (u64::MAX, 2, Read, false, false),
        (1 << 50, 1, No, false, false),
    ];
    for &(gpa, len, access, want, want_forced) in table {
        let got = mem.check_range(GuestAddress(gpa), len, access);
        assert_eq!(
            got, want,
            "check_range({gpa:#x}, {len}, {access:?}): got {got} want {want}"
        );
        let got = forced.check_range(GuestAddress(gpa), len, access);
        assert_eq!(
            got, want_forced,
            "forced check_range({gpa:#x}, {len}, {access:?}): got {got} want {want_forced}"
        );
    }
    assert_eq!(
        space.stats().populated_bytes,
        0,
        "check_range populates nothing"
    );
}

#[test]
fn slices_of_an_unmapped_host_file_stay_mapped_while_the_handle_lives() {
    let (_mf, _be, space) = setup();
    let hf = HostFile::new(tempfile_with(0x5A, 2 * MIB), false).unwrap();
    space
        .map(MapOpts::object(hf.clone(), 0, 2 * MIB).fixed(BASE))
        .unwrap();
    let mem = SpaceMemory::new(space.clone());
    let slice = mem
        .get_slices(GuestAddress(BASE), 4096, Permissions::Read)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    // The guest unmaps the file and its last other owner lets go.
    space.unmap(BASE, 2 * MIB).unwrap();
    drop(hf);
    let mut buf = [0u8; 8];
    slice.copy_to(&mut buf[..]);
    assert_eq!(buf, [0x5A; 8], "the handle kept the file mapped");
}

#[test]
fn a_pin_keeps_slices_backed_across_unmap() {
    let (mf, _be, space) = setup();
    space.map(MapOpts::anonymous(2 * MIB).fixed(BASE)).unwrap();
    let mem = SpaceMemory::new(space.clone());
    let pin = mem
        .pin(GuestAddress(BASE), 4096, Permissions::ReadWrite)
        .unwrap();
    let slice = mem
        .get_slices(GuestAddress(BASE), 4096, Permissions::Write)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    space.unmap(BASE, 2 * MIB).unwrap();
    assert!(
        mf.allocated_bytes() >= 4096,
        "the pinned page stays allocated"
    );
    slice.copy_from(&[9u8; 16][..]);
    let mut buf = [0u8; 16];
    slice.copy_to(&mut buf[..]);
    assert_eq!(buf, [9; 16]);
    mem.unpin(pin).unwrap();
    assert_eq!(mf.allocated_bytes(), 0, "unpin frees the page");
}

#[test]
fn space_memory_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SpaceMemory>();
}

#[test]
fn a_virtio_queue_serves_a_chain_from_lazy_memory() {
    use std::io::{Read, Write as _};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueT};
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let (_mf, _be, space) = setup();
    space.map(MapOpts::anonymous(4 * MIB).fixed(BASE)).unwrap();
    let mem = SpaceMemory::new(space.clone());
    let (desc, avail, used) = (BASE, BASE + 0x1000, BASE + 0x2000);
    // Driver: "hello " + "world" readable (the second crosses a page), a
    // writable response that crosses the 2 MiB chunk boundary.
    let (r1, r2, w) = (BASE + 0x10_000, BASE + 0x20_000 - 2, BASE + 2 * MIB - 5);
    mem.write_slice(b"hello ", GuestAddress(r1)).unwrap();
    mem.write_slice(b"world", GuestAddress(r2)).unwrap();
    let chain = [
        Descriptor::new(r1, 6, NEXT, 1),
        Descriptor::new(r2, 5, NEXT, 2),
        Descriptor::new(w, 16, WRITE, 0),
    ];
    for (i, d) in chain.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(desc + 16 * i as u64))
            .unwrap();
    }
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.store(1u16, GuestAddress(avail + 2), Ordering::Release)
        .unwrap();

    // Device.
    let mut q = Queue::new(16).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    assert!(q.is_valid(&mem));
    let c = q.pop_descriptor_chain(&mem).expect("one chain");
    let head = c.head_index();
    let mut reader = c.clone().reader(&mem).unwrap();
    let mut writer = c.writer(&mem).unwrap();
    let mut req = Vec::new();
    reader.read_to_end(&mut req).unwrap();
    assert_eq!(req, b"hello world");
    writer.write_all(&req.to_ascii_uppercase()).unwrap();
    q.add_used(&mem, head, writer.bytes_written() as u32)
        .unwrap();
    assert!(q.pop_descriptor_chain(&mem).is_none());

    // Driver reaps.
    assert_eq!(
        mem.load::<u16>(GuestAddress(used + 2), Ordering::Acquire)
            .unwrap(),
        1
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 4)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 11);
    let mut resp = [0u8; 11];
    mem.read_slice(&mut resp, GuestAddress(w)).unwrap();
    assert_eq!(&resp, b"HELLO WORLD");
    space.check_invariants().unwrap();
}
