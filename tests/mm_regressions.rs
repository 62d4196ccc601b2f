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
