//! Regression tests, one per bug found, named after the scenario.

mod common;
use common::{setup, space_over};

use std::sync::Arc;

use guestmm::mm::{IoOpts, MapOpts, MmError, RecordingBackend};
use guestmm::{Access, RangeError};

const MIB: u64 = 1 << 20;

#[test]
fn zero_over_a_partly_unmapped_range_writes_nothing() {
    let (mf, be, space) = setup("regressions");
    let gpa = space
        .map(MapOpts::anonymous(2 * MIB).fixed(1 << 30))
        .unwrap();
    space.write(gpa, &[0xEE; 16]).unwrap();
    let populated = space.stats().populated_bytes;
    let calls = be.calls();
    // The first 1 MiB chunk is mapped, the range runs past the vma's end.
    let got = space.zero(gpa, 3 * MIB, IoOpts::default());
    assert!(
        matches!(got, Err(MmError::NotMapped { .. })),
        "got {got:?}, want NotMapped"
    );
    let mut buf = [0u8; 16];
    space.read(gpa, &mut buf).unwrap();
    assert_eq!(buf, [0xEE; 16], "got {buf:?}, want the bytes untouched");
    assert_eq!(space.stats().populated_bytes, populated);
    assert_eq!(be.calls(), calls);
    drop(space);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn zero_length_pin_at_an_unaligned_address_is_refused() {
    let (mf, _be, space) = setup("regressions");
    let gpa = space
        .map(MapOpts::anonymous(2 * MIB).fixed(1 << 30))
        .unwrap();
    // Used to pin (and populate) the page holding gpa + 5.
    let got = space.pin(gpa + 5, 0, Access::Read, IoOpts::default());
    assert!(
        matches!(got, Err(MmError::Range(RangeError::Empty { .. }))),
        "got {got:?}, want Range(Empty)"
    );
    assert_eq!(space.stats().populated_bytes, 0);
    drop(space);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn pin_whose_end_overflows_reports_overflow() {
    let (_mf, _be, space) = setup("regressions");
    // Used to saturate the end and report an unaligned range.
    let got = space.pin(u64::MAX - 10, 100, Access::Read, IoOpts::default());
    assert!(
        matches!(got, Err(MmError::Range(RangeError::Overflow { .. }))),
        "got {got:?}, want Range(Overflow)"
    );
    let got = space.pin(u64::MAX - 10, 5, Access::Read, IoOpts::default());
    assert!(
        matches!(got, Err(MmError::OutOfSpace { .. })),
        "got {got:?}, want OutOfSpace"
    );
}

#[test]
fn unpin_of_another_spaces_pin_releases_nothing() {
    let (mf, _be, a) = setup("regressions");
    let b = space_over(&mf).1;
    let ga = a.map(MapOpts::anonymous(2 * MIB).fixed(1 << 30)).unwrap();
    let gb = b.map(MapOpts::anonymous(2 * MIB).fixed(1 << 30)).unwrap();
    // Both pins get id 1 in their own space.
    let pa = a.pin(ga, 4096, Access::Read, IoOpts::default()).unwrap();
    let pb = b.pin(gb, 4096, Access::Read, IoOpts::default()).unwrap();
    b.unmap(gb, 2 * MIB).unwrap();
    let allocated = mf.allocated_bytes();
    // Used to release b's own pin (same id), freeing a page still pinned.
    let got = b.unpin(pa);
    assert!(
        matches!(got, Err(MmError::ForeignPin { .. })),
        "got {got:?}, want ForeignPin"
    );
    assert_eq!(
        mf.allocated_bytes(),
        allocated,
        "b's pinned page is still held"
    );
    b.unpin(pb).unwrap();
    assert_eq!(mf.allocated_bytes(), allocated - 4096);
    drop(a);
    assert_eq!(mf.allocated_bytes(), 0, "a's pin is released when a drops");
}

/// Reads what the backend shows the guest at `gpa`.
fn guest_view(be: &RecordingBackend, gpa: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let (r, inst) = be.installed_at(gpa)?;
    // SAFETY: the fd belongs to the test's live MemoryFile; ManuallyDrop
    // keeps it open.
    let f = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(inst.fd)
    });
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, inst.file_offset + (gpa - r.start()))
        .unwrap();
    Some(buf)
}

#[test]
fn failed_install_after_cow_break_leaves_no_stale_page_in_the_guest() {
    let (_mf, be, parent) = setup("regressions");
    let gpa = parent
        .map(MapOpts::anonymous(2 * MIB).fixed(1 << 30))
        .unwrap();
    parent.write(gpa, b"old").unwrap();
    parent.handle_fault(gpa, Access::Read).unwrap();
    let child_be = Arc::new(RecordingBackend::new());
    let child = parent.fork(child_be.clone()).unwrap();
    // The parent's write copies the page, then the backend refuses to
    // install the copy (e.g. out of memslots).
    be.fail_installs_after(Some(0));
    assert!(parent.write(gpa, b"new").is_err());
    be.fail_installs_after(None);
    // The child, now sole owner of the old page, writes it in place.
    child.handle_fault(gpa, Access::Write).unwrap();
    child.write(gpa, b"kid").unwrap();
    // Used to keep showing the parent's guest the old page, i.e. the
    // child's writes.
    let seen = guest_view(&be, gpa, 3);
    assert!(
        seen.as_deref().is_none_or(|b| b != b"kid"),
        "got parent guest seeing {seen:?}, want nothing installed or the parent's own page"
    );
    let mut buf = [0u8; 3];
    parent.read(gpa, &mut buf).unwrap();
    assert_ne!(&buf, b"kid");
}

/// A third-party object whose `translate` answers with offsets it was not
/// asked for (or too few).
#[derive(Debug)]
struct LyingObject {
    mf: Arc<guestmm::memfile::MemoryFile>,
    backing: guestmm::FileRange,
    shift: u64,
}

impl guestmm::mm::Mappable for LyingObject {
    fn size(&self) -> u64 {
        self.backing.len()
    }
    fn max_perms(&self) -> guestmm::Perms {
        guestmm::Perms::ALL
    }
    fn add_mapping(
        &self,
        _: std::sync::Weak<dyn guestmm::mm::MappingSpace>,
        _: u64,
        _: guestmm::GuestRange,
        _: u64,
    ) {
    }
    fn remove_mapping(&self, _: u64, _: guestmm::GuestRange, _: u64) {}
    fn translate(
        &self,
        required: guestmm::Range,
        _optional: guestmm::Range,
        _access: Access,
    ) -> Result<Vec<guestmm::mm::Translation>, guestmm::mm::FileError> {
        let start = required.start() + self.shift;
        let source = guestmm::Range::new(start, start + 4096).unwrap();
        Ok(vec![guestmm::mm::Translation {
            source,
            file: self.mf.clone(),
            offset: self.backing.start(),
            perms: guestmm::Perms::ALL,
        }])
    }
}

#[test]
fn a_mappable_that_translates_the_wrong_offsets_is_refused_not_trusted() {
    for shift in [0, 8192, 1 << 40] {
        let (mf, be, space) = setup("regressions");
        let backing = mf
            .allocate(2 * MIB, guestmm::memfile::MemoryKind::Other)
            .unwrap();
        let obj = Arc::new(LyingObject {
            mf: mf.clone(),
            backing,
            shift,
        });
        let gpa = space
            .map(MapOpts::object(obj, 0, 2 * MIB).fixed(1 << 30))
            .unwrap();
        let got = space.handle_fault(gpa, Access::Read);
        assert!(
            matches!(got, Err(guestmm::mm::FaultError::Bus { .. })),
            "shift {shift:#x}: got {got:?}, want a Bus fault (BadTranslation)"
        );
        space.check_invariants().unwrap();
        assert!(
            be.installed().is_empty(),
            "nothing installed from a bad translation"
        );
        drop(space);
        assert_eq!(
            mf.refs(backing.start()),
            Some(1),
            "refs balanced after refusal"
        );
    }
}

const PS: u64 = 4096;

/// Reads one byte of every page of `pages` pages at `gpa`: `Some(byte)` or
/// `None` if the read fails.
fn first_bytes(space: &guestmm::mm::AddressSpace, gpa: u64, pages: u64) -> Vec<Option<u8>> {
    (0..pages)
        .map(|i| {
            let mut b = [0u8; 1];
            space.read(gpa + i * PS, &mut b).ok().map(|_| b[0])
        })
        .collect()
}

#[test]
fn truncate_drops_private_copies_past_the_new_end_in_every_space() {
    let (mf, _be, parent) = setup("regressions");
    let obj = guestmm::mm::SharedMemory::new(mf.clone(), 4 * PS).unwrap();
    let gpa = parent
        .map(MapOpts::object(obj.clone(), 0, 4 * PS).fixed(1 << 30))
        .unwrap();
    // Page 1 gets a private copy; page 2 a private copy that a hole punch
    // must keep.
    parent.write(gpa + PS, &[0xA1; 8]).unwrap();
    parent.write(gpa + 2 * PS, &[0xA2; 8]).unwrap();
    parent.handle_fault(gpa + PS, Access::Write).unwrap();
    let child = parent.fork(Arc::new(RecordingBackend::new())).unwrap();
    obj.decommit(guestmm::Range::new(2 * PS, 3 * PS).unwrap())
        .unwrap();
    assert_eq!(
        first_bytes(&parent, gpa, 4),
        vec![Some(0), Some(0xA1), Some(0xA2), Some(0)],
        "a hole punch keeps private copies"
    );
    obj.truncate(PS).unwrap();
    for (name, space) in [("parent", &parent), ("child", &child)] {
        // Used to return the old private bytes (Linux: SIGBUS).
        assert_eq!(
            first_bytes(space, gpa, 4),
            vec![Some(0), None, None, None],
            "{name}: pages past the new end are bus errors"
        );
        let got = space.handle_fault(gpa + PS, Access::Read);
        assert!(
            matches!(got, Err(guestmm::mm::FaultError::Bus { .. })),
            "{name}: got {got:?}, want Bus"
        );
        // A fault inside the object succeeds although its fault-around
        // window reaches past the end (used to be a Bus fault).
        space.handle_fault(gpa, Access::Write).unwrap();
        space.check_invariants().unwrap();
    }
    guestmm::mm::check_file_refs(&mf, &[&parent, &child], &[&obj]).unwrap();
    obj.truncate(4 * PS).unwrap();
    for (name, space) in [("parent", &parent), ("child", &child)] {
        assert_eq!(
            first_bytes(space, gpa, 4),
            vec![Some(0); 4],
            "{name}: zeros after growing back"
        );
        space.check_invariants().unwrap();
    }
    guestmm::mm::check_file_refs(&mf, &[&parent, &child], &[&obj]).unwrap();
    drop((parent, child, obj));
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn forced_write_reaching_a_read_only_shared_host_file_writes_nothing() {
    let (mf, be, space) = setup("regressions");
    let file = common::tempfile("regressions");
    file.set_len(2 * PS).unwrap();
    let hf = guestmm::mm::HostFile::new(file, false).unwrap();
    // A read-only shared page of a writable object, then the read-only file.
    let obj = guestmm::mm::SharedMemory::new(mf.clone(), PS).unwrap();
    let gpa = space
        .map(
            MapOpts::object(obj.clone(), 0, PS)
                .shared()
                .perms(guestmm::Perms::READ)
                .fixed(1 << 30),
        )
        .unwrap();
    space
        .map(
            MapOpts::object(hf.clone(), 0, 2 * PS)
                .shared()
                .perms(guestmm::Perms::READ)
                .max_perms(guestmm::Perms::new(true, false, true))
                .fixed(gpa + PS),
        )
        .unwrap();
    let calls = be.calls();
    let populated = space.stats().populated_bytes;
    let want_err = |got: Result<(), MmError>, what: &str| {
        assert!(
            matches!(
                got,
                Err(MmError::File(guestmm::mm::FileError::Access { .. }))
            ),
            "{what}: got {got:?}, want File(Access)"
        );
    };
    want_err(
        space.write_with(gpa + PS - 4, &[0xFF; 8], IoOpts::FORCE),
        "forced write",
    );
    want_err(space.zero(gpa, 3 * PS, IoOpts::FORCE), "forced zero");
    // Used to write the shared object's page before failing.
    let mut buf = [0u8; 4];
    space.read(gpa + PS - 4, &mut buf).unwrap();
    assert_eq!(buf, [0; 4], "the object's page is untouched");
    assert_eq!(space.stats().populated_bytes, populated + PS);
    assert_eq!(
        be.calls().len(),
        calls.len(),
        "nothing installed by the failed writes"
    );
    // The forced write of the object page alone is allowed (the VMM may
    // write read-only guest memory).
    space.write_with(gpa, &[7; 4], IoOpts::FORCE).unwrap();
    space.check_invariants().unwrap();
}

#[test]
fn populate_read_and_write_past_an_objects_end_change_nothing() {
    let (mf, be, space) = setup("regressions");
    let gpa = space
        .map(MapOpts::anonymous(2 * PS).fixed(1 << 30))
        .unwrap();
    let obj = guestmm::mm::SharedMemory::new(mf.clone(), 4 * PS).unwrap();
    space
        .map(
            MapOpts::object(obj.clone(), 0, 4 * PS)
                .shared()
                .fixed(gpa + 2 * PS),
        )
        .unwrap();
    obj.truncate(PS).unwrap();
    let calls = be.calls();
    let is_beyond_end = |got: &Result<(), MmError>| {
        matches!(
            got,
            Err(MmError::File(guestmm::mm::FileError::BeyondEnd { .. }))
        )
    };
    // The anonymous pages and the object's first page come first; its
    // second page is past the end. Each used to populate (and install) the
    // part before the failing page.
    let got = space.populate(gpa, 4 * PS, Access::Write);
    assert!(is_beyond_end(&got), "populate: got {got:?}");
    let mut buf = vec![0u8; (4 * PS) as usize];
    let got = space.read_with(gpa, &mut buf, IoOpts::default());
    assert!(is_beyond_end(&got), "read: got {got:?}");
    let got = space.write_with(gpa, &buf, IoOpts::FORCE);
    assert!(is_beyond_end(&got), "write: got {got:?}");
    let got = space.zero(gpa, 4 * PS, IoOpts::default());
    assert!(is_beyond_end(&got), "zero: got {got:?}");
    assert_eq!(space.stats().populated_bytes, 0, "nothing populated");
    assert_eq!(be.calls(), calls, "nothing installed");
    assert_eq!(obj.committed(), 0, "no object page allocated");
    // Inside the object everything works.
    space.populate(gpa, 3 * PS, Access::Write).unwrap();
    assert_eq!(space.stats().populated_bytes, 3 * PS);
    space.check_invariants().unwrap();
    guestmm::mm::check_file_refs(&mf, &[&space], &[&obj]).unwrap();
}

/// A mapper that, when told of a truncation, forks `parent`: a fork that
/// lands after `truncate` collected its mappers and before it told the
/// parent.
struct ForkOnTruncate {
    parent: Arc<guestmm::mm::AddressSpace>,
    child: std::sync::Mutex<Option<Arc<guestmm::mm::AddressSpace>>>,
}

impl guestmm::mm::MappingSpace for ForkOnTruncate {
    fn invalidate(&self, _: guestmm::GuestRange, _: bool) {}
    fn truncated(&self, _: &dyn guestmm::mm::Mappable, _: guestmm::GuestRange, _: u64) {
        let mut child = self.child.lock().unwrap();
        if child.is_none() {
            *child = Some(self.parent.fork(Arc::new(RecordingBackend::new())).unwrap());
        }
    }
}

#[test]
fn a_fork_racing_a_truncate_keeps_no_private_copy_past_the_end() {
    use guestmm::mm::Mappable;
    let (mf, _be, parent) = setup("regressions");
    let obj = guestmm::mm::SharedMemory::new(mf.clone(), 4 * PS).unwrap();
    // Recorded first, so it is told first.
    let racer = Arc::new(ForkOnTruncate {
        parent: parent.clone(),
        child: Default::default(),
    });
    let weak = Arc::downgrade(&racer) as std::sync::Weak<dyn guestmm::mm::MappingSpace>;
    let range = guestmm::Range::new(0, 4 * PS).unwrap();
    obj.add_mapping(weak, u64::MAX, range, 0);
    let gpa = parent
        .map(MapOpts::object(obj.clone(), 0, 4 * PS).fixed(1 << 30))
        .unwrap();
    parent.write(gpa + PS, &[0xA1; 8]).unwrap();
    obj.truncate(PS).unwrap();
    let child = racer.child.lock().unwrap().clone().expect("forked");
    // The child inherited the parent's copy of page 1 before the parent was
    // told; it used to keep it.
    assert_eq!(first_bytes(&child, gpa, 2), vec![Some(0), None]);
    assert_eq!(first_bytes(&parent, gpa, 2), vec![Some(0), None]);
    child.check_invariants().unwrap();
    guestmm::mm::check_file_refs(&mf, &[&parent, &child], &[&obj]).unwrap();
    // Unreachable while the object is short, but it showed again (the old
    // bytes) once the object grew back.
    obj.truncate(4 * PS).unwrap();
    assert_eq!(first_bytes(&child, gpa, 2), vec![Some(0), Some(0)]);
    assert_eq!(first_bytes(&parent, gpa, 2), vec![Some(0), Some(0)]);
    obj.remove_mapping(u64::MAX, range, 0);
}
