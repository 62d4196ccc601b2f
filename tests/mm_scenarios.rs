//! Scenario tests of the mm core through the RecordingBackend.

mod common;
use common::tempfile;
use common::{setup, space_over};

use std::io::Write;
use std::sync::Arc;

use guestmm::mm::backend::BackendCall;
use guestmm::mm::{
    check_file_refs, FaultError, HostFile, MapOpts, Mappable, MmError, RecordingBackend,
    SharedMemory,
};
use guestmm::{Access, Perms, Range};

const MIB: u64 = 1 << 20;

fn r(s: u64, e: u64) -> Range {
    Range::new(s, e).unwrap()
}

#[test]
fn anonymous_fault_populates_an_aligned_window_writable() {
    let (mf, be, space) = setup("test");
    let gpa = space
        .map(MapOpts::anonymous(64 * MIB).fixed(1 << 30))
        .unwrap();
    let p = space.handle_fault(gpa + 3 * MIB + 5, Access::Read).unwrap();
    assert_eq!(p.window, r(gpa + 2 * MIB, gpa + 4 * MIB));
    assert_eq!(p.populated, 2 * MIB);
    let (range, inst) = be.installed_at(gpa + 3 * MIB).unwrap();
    assert_eq!(range, p.window, "got {range}, want {}", p.window);
    assert!(
        inst.writable,
        "anonymous memory is installed writable even on a read fault"
    );
    space.check_invariants().unwrap();
    check_file_refs(&mf, &[&space], &[]).unwrap();
}

#[test]
fn faults_outside_vmas_and_against_protection_are_refused() {
    let (_mf, _be, space) = setup("test");
    let gpa = space
        .map(
            MapOpts::anonymous(4 * MIB)
                .fixed(1 << 30)
                .perms(Perms::READ),
        )
        .unwrap();
    assert!(matches!(
        space.handle_fault(gpa - 4096, Access::Read),
        Err(FaultError::Unmapped { .. })
    ));
    match space.handle_fault(gpa, Access::Write) {
        Err(FaultError::Permission { allowed, .. }) => assert_eq!(allowed, Perms::READ),
        other => panic!("got {other:?}, want a permission fault"),
    }
    let p = space.handle_fault(gpa, Access::Read).unwrap();
    assert_eq!(p.perms, Perms::READ);
}

#[test]
fn protect_downgrades_installed_memory() {
    let (_mf, be, space) = setup("test");
    let gpa = space
        .map(MapOpts::anonymous(4 * MIB).fixed(1 << 30))
        .unwrap();
    space.handle_fault(gpa, Access::Write).unwrap();
    be.clear_calls();
    space.protect(gpa, MIB, Perms::READ).unwrap();
    assert_eq!(
        be.calls(),
        vec![BackendCall::WriteProtect {
            range: r(gpa, gpa + MIB)
        }]
    );
    be.clear_calls();
    space.protect(gpa + MIB, MIB, Perms::NONE).unwrap();
    assert_eq!(
        be.calls(),
        vec![BackendCall::Remove {
            range: r(gpa + MIB, gpa + 2 * MIB)
        }]
    );
    be.clear_calls();
    // Gaining permissions installs nothing.
    space.protect(gpa, 2 * MIB, Perms::READ_WRITE).unwrap();
    assert_eq!(be.calls(), vec![]);
    assert_eq!(
        space.maps().len(),
        1,
        "re-protecting everything merges the regions back"
    );
    space.check_invariants().unwrap();
}

#[test]
fn unmap_middle_splits_vma_and_keeps_protections() {
    let (mf, _be, space) = setup("test");
    let gpa = space
        .map(MapOpts::anonymous(8 * MIB).fixed(1 << 30))
        .unwrap();
    space.protect(gpa + 6 * MIB, MIB, Perms::READ).unwrap();
    space.write(gpa, &[1; 64]).unwrap();
    space.write(gpa + 7 * MIB, &[2; 64]).unwrap();
    space.unmap(gpa + 2 * MIB, 2 * MIB).unwrap();
    let maps: Vec<String> = space.maps().iter().map(|m| m.to_string()).collect();
    assert_eq!(maps.len(), 4, "got {maps:#?}");
    let mut buf = [0u8; 64];
    space.read(gpa + 7 * MIB, &mut buf).unwrap();
    assert_eq!(buf, [2; 64]);
    assert!(matches!(
        space.read(gpa + 3 * MIB, &mut buf),
        Err(MmError::NotMapped { .. })
    ));
    space.check_invariants().unwrap();
    check_file_refs(&mf, &[&space], &[]).unwrap();
    drop(space);
    assert_eq!(mf.allocated_bytes(), 0, "teardown frees everything");
}

#[test]
fn fork_is_copy_on_write_and_survivor_takes_over() {
    let (mf, be, parent) = setup("test");
    let gpa = parent
        .map(MapOpts::anonymous(4 * MIB).fixed(1 << 30))
        .unwrap();
    parent.write(gpa, b"parent").unwrap();
    let child_be = Arc::new(RecordingBackend::new());
    let child = parent.fork(child_be.clone()).unwrap();
    assert!(
        !be.installed_at(gpa).is_some_and(|(_, i)| i.writable),
        "parent write-protected after fork"
    );
    check_file_refs(&mf, &[&parent, &child], &[]).unwrap();

    let p = child.handle_fault(gpa, Access::Write).unwrap();
    assert!(p.cow_copied > 0, "child write copies: {p:?}");
    child.write(gpa, b"child!").unwrap();
    let mut buf = [0u8; 6];
    parent.read(gpa, &mut buf).unwrap();
    assert_eq!(&buf, b"parent");
    child.read(gpa, &mut buf).unwrap();
    assert_eq!(&buf, b"child!");
    parent.check_invariants().unwrap();
    child.check_invariants().unwrap();
    check_file_refs(&mf, &[&parent, &child], &[]).unwrap();

    drop(child);
    let p = parent.handle_fault(gpa, Access::Write).unwrap();
    assert_eq!(p.cow_copied, 0, "sole owner takes over: {p:?}");
    assert!(p.cow_taken_over > 0);
    check_file_refs(&mf, &[&parent], &[]).unwrap();
    drop(parent);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn private_host_file_mapping_copies_on_write_and_leaves_the_file() {
    let (mf, be, space) = setup("test");
    let mut f = tempfile("scenario");
    f.write_all(&vec![0xAB; 2 * MIB as usize]).unwrap();
    let hf = HostFile::new(f.try_clone().unwrap(), false).unwrap();
    let gpa = space
        .map(MapOpts::object(hf.clone(), 0, 2 * MIB).fixed(1 << 30))
        .unwrap();
    space.handle_fault(gpa, Access::Read).unwrap();
    assert!(
        !be.installed_at(gpa).unwrap().1.writable,
        "private file pages install read-only"
    );
    space.write(gpa + 10, &[1, 2, 3]).unwrap();
    let mut buf = [0u8; 4];
    space.read(gpa + 9, &mut buf).unwrap();
    assert_eq!(buf, [0xAB, 1, 2, 3]);
    let mut on_disk = vec![0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 0).unwrap();
    assert_eq!(on_disk, vec![0xAB; 16], "the host file is unchanged");
    assert!(space.stats().cow_copies >= 1);
    space.check_invariants().unwrap();
    check_file_refs(&mf, &[&space], &[]).unwrap();
    drop(space);
    assert_eq!(hf.refs(), 0);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn shared_memory_is_coherent_across_spaces_and_decommit_invalidates() {
    let (mf, _be, a) = setup("test");
    let b = space_over(&mf).1;
    let obj = SharedMemory::new(mf.clone(), 4 * MIB).unwrap();
    let ga = a
        .map(MapOpts::object(obj.clone() as Arc<dyn Mappable>, 0, 4 * MIB).shared())
        .unwrap();
    let gb = b
        .map(
            MapOpts::object(obj.clone() as Arc<dyn Mappable>, 0, 4 * MIB)
                .shared()
                .hint(1 << 32),
        )
        .unwrap();
    a.write(ga + 100, b"hello").unwrap();
    let mut buf = [0u8; 5];
    b.read(gb + 100, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    check_file_refs(&mf, &[&a, &b], &[&obj]).unwrap();
    obj.decommit(r(0, 4 * MIB)).unwrap();
    assert_eq!(
        b.stats().populated_bytes,
        0,
        "decommit invalidated b's pmas"
    );
    b.read(gb + 100, &mut buf).unwrap();
    assert_eq!(buf, [0; 5]);
    check_file_refs(&mf, &[&a, &b], &[&obj]).unwrap();
    drop(a);
    drop(b);
    drop(obj);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn precommit_installs_everything_at_map_time() {
    let (_mf, be, space) = setup("test");
    let gpa = space
        .map(
            MapOpts::anonymous(4 * MIB)
                .fixed(0)
                .precommit()
                .name("boot"),
        )
        .unwrap();
    assert_eq!(
        be.installed(),
        vec![(r(gpa, gpa + 4 * MIB), be.installed_at(0).unwrap().1)]
    );
    assert_eq!(space.stats().populated_bytes, 4 * MIB);
}

#[test]
fn decommit_drops_private_pages_and_they_read_zero() {
    let (mf, be, space) = setup("test");
    let gpa = space
        .map(MapOpts::anonymous(4 * MIB).fixed(1 << 30))
        .unwrap();
    space.write(gpa, &[7; 16]).unwrap();
    space.handle_fault(gpa, Access::Read).unwrap();
    space.decommit(gpa, 4 * MIB).unwrap();
    assert!(
        be.installed().is_empty(),
        "decommit removes what was installed"
    );
    assert_eq!(mf.allocated_bytes(), 0);
    let mut buf = [1u8; 16];
    space.read(gpa, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
    assert!(matches!(
        space.decommit(gpa + 4 * MIB, 4096),
        Err(MmError::NotMapped { .. })
    ));
}

#[test]
fn stats_count_populated_and_committed_bytes() {
    let (_mf, _be, space) = setup("test");
    let gpa = space
        .map(MapOpts::anonymous(4 * MIB).fixed(1 << 30))
        .unwrap();
    space.handle_fault(gpa, Access::Read).unwrap();
    let s = space.stats();
    assert_eq!(
        (s.populated_bytes, s.committed_bytes),
        (2 * MIB, 0),
        "populated but untouched commits nothing"
    );
    space.write(gpa, &[1; 3 * 4096]).unwrap();
    let s = space.stats();
    assert_eq!(s.committed_bytes, 3 * 4096, "got {s:?}");
    assert_eq!((s.vmas, s.pmas, s.faults, s.windows), (1, 1, 1, 1));
}

#[test]
fn metadata_bytes_grows_with_bookkeeping_not_with_memory() {
    let (_mf, _be, space) = setup("test");
    let empty = space.metadata_bytes();
    let gpa = space
        .map(MapOpts::anonymous(256 * MIB).fixed(1 << 30))
        .unwrap();
    let one_vma = space.metadata_bytes();
    assert!(one_vma > empty, "got {one_vma}, want > {empty} after a map");
    space.handle_fault(gpa, Access::Write).unwrap();
    space.handle_fault(gpa + 128 * MIB, Access::Write).unwrap();
    let populated = space.metadata_bytes();
    assert!(
        populated > one_vma,
        "got {populated}, want > {one_vma} with pmas"
    );
    space.protect(gpa + 64 * MIB, MIB, Perms::READ).unwrap();
    let protected = space.metadata_bytes();
    assert!(
        protected > populated,
        "got {protected}, want > {populated} with protection nodes"
    );
    assert!(
        protected < 16 << 10,
        "got {protected} bytes for a handful of entries"
    );
}
