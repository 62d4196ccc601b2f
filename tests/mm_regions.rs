//! The region-based vm-memory view ([`SpaceRegions`]) with linux-loader and
//! virtio-queue on lazy memory, extents, and `install_populated`.

mod common;

use std::io::Cursor;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use guestmm::mm::backend::BackendCall;
use guestmm::mm::{HostFile, IoOpts, MapOpts, MmError, SharedMemory, SpaceRegions};
use guestmm::{Perms, Range, RangeError};
use linux_loader::loader::{elf::Elf, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn r(start: u64, end: u64) -> Range {
    Range::new(start, end).unwrap()
}

/// One loadable segment of a test ELF.
struct Segment {
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

/// A minimal valid ELF64 (x86-64, little endian, executable) with one
/// `PT_LOAD` program header per segment, built by hand.
fn build_elf(entry: u64, segments: &[Segment]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut elf = vec![0u8; EHDR + PHDR * segments.len()];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // ELFDATA2LSB
    elf[6] = 1; // EV_CURRENT
    let put16 =
        |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut elf, 16, 2); // ET_EXEC
    put16(&mut elf, 18, 0x3e); // EM_X86_64
    put32(&mut elf, 20, 1);
    put64(&mut elf, 24, entry);
    put64(&mut elf, 32, EHDR as u64); // e_phoff
    put16(&mut elf, 52, EHDR as u16);
    put16(&mut elf, 54, PHDR as u16);
    put16(&mut elf, 56, segments.len() as u16);
    for (i, s) in segments.iter().enumerate() {
        // File data page aligned, as a linker would lay it out.
        let offset = (elf.len() as u64).next_multiple_of(PAGE);
        elf.resize(offset as usize, 0);
        elf.extend_from_slice(&s.data);
        let ph = EHDR + PHDR * i;
        put32(&mut elf, ph, 1); // PT_LOAD
        put32(&mut elf, ph + 4, 5); // R+X
        put64(&mut elf, ph + 8, offset);
        put64(&mut elf, ph + 16, s.paddr); // p_vaddr
        put64(&mut elf, ph + 24, s.paddr); // p_paddr
        put64(&mut elf, ph + 32, s.data.len() as u64);
        put64(&mut elf, ph + 40, s.memsz);
        put64(&mut elf, ph + 48, PAGE);
    }
    elf
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn linux_loader_loads_an_elf_into_lazy_memory_populating_only_its_segments() {
    let (_mf, be, space) = common::setup("regions-elf");
    // 64 MiB of lazy RAM from 0, as a VMM would lay it out.
    space.map(MapOpts::anonymous(64 * MIB).fixed(0)).unwrap();
    let text = pattern(3 * PAGE as usize + 100, 7);
    let data = pattern(2 * PAGE as usize, 99);
    let elf = build_elf(
        16 * MIB + 0x40,
        &[
            Segment {
                paddr: 16 * MIB,
                data: text.clone(),
                memsz: text.len() as u64,
            },
            Segment {
                paddr: 40 * MIB + 0x800,
                data: data.clone(),
                memsz: MIB, // bss: not written by the loader
            },
        ],
    );
    let mem = space.regions(IoOpts::FORCE).unwrap();
    let res = Elf::load(&mem, None, &mut Cursor::new(&elf), Some(GuestAddress(MIB))).unwrap();
    assert_eq!(res.kernel_load, GuestAddress(16 * MIB + 0x40));
    assert_eq!(res.kernel_end, 40 * MIB + 0x800 + MIB);

    // The bytes are there, read through the space itself.
    let mut got = vec![0u8; text.len()];
    space.read_with(16 * MIB, &mut got, IoOpts::FORCE).unwrap();
    assert_eq!(got, text);
    let mut got = vec![0u8; data.len()];
    space
        .read_with(40 * MIB + 0x800, &mut got, IoOpts::FORCE)
        .unwrap();
    assert_eq!(got, data);

    // Lazy: only the pages the segments' file bytes touch were populated
    // (4 pages of text, 3 of data straddling page boundaries), and nothing
    // was shown to the guest.
    let populated: u64 = space
        .extents(r(0, 64 * MIB))
        .unwrap()
        .iter()
        .filter(|e| e.is_populated())
        .map(|e| e.range.len())
        .sum();
    assert_eq!(populated, 7 * PAGE);
    assert_eq!(space.stats().populated_bytes, 7 * PAGE);
    assert!(
        !be.calls()
            .iter()
            .any(|c| matches!(c, BackendCall::Install { .. })),
        "host writes install nothing: {:?}",
        be.calls()
    );

    // A segment beyond RAM is a loader error, not a panic.
    let beyond = build_elf(
        80 * MIB,
        &[Segment {
            paddr: 80 * MIB,
            data: text.clone(),
            memsz: text.len() as u64,
        }],
    );
    assert!(Elf::load(&mem, None, &mut Cursor::new(&beyond), None).is_err());
    space.check_invariants().unwrap();
}

#[test]
fn an_elf_built_by_gcc_loads_if_gcc_is_here() {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("guestmm-regions-gcc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("k.S");
    let out = dir.join("k.elf");
    std::fs::write(
        &src,
        ".globl _start\n.text\n_start: hlt\n jmp _start\n.data\nmsg: .ascii \"guestmm loaded me\"\n",
    )
    .unwrap();
    let built = Command::new("gcc")
        .args([
            "-static",
            "-nostdlib",
            "-no-pie",
            "-Wl,-Ttext=0x200000,-Tdata=0x300000",
        ])
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output();
    let elf = match built {
        Ok(o) if o.status.success() => std::fs::read(&out).unwrap(),
        Ok(o) => {
            eprintln!(
                "skipping the gcc-built ELF: gcc failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        Err(e) => {
            eprintln!("skipping the gcc-built ELF: no gcc ({e})");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let (_mf, _be, space) = common::setup("regions-gcc");
    space.map(MapOpts::anonymous(16 * MIB).fixed(0)).unwrap();
    let mem = space.regions(IoOpts::FORCE).unwrap();
    let res = Elf::load(&mem, None, &mut Cursor::new(&elf), None).unwrap();
    assert_eq!(res.kernel_load, GuestAddress(0x200000));
    let mut code = [0u8; 3];
    mem.read_slice(&mut code, GuestAddress(0x200000)).unwrap();
    assert_eq!(code, [0xf4, 0xeb, 0xfd], "hlt; jmp _start");
    let mut msg = [0u8; 17];
    space.read_with(0x300000, &mut msg, IoOpts::FORCE).unwrap();
    assert_eq!(&msg, b"guestmm loaded me");
}

#[test]
fn load_cmdline_and_the_linux_boot_configurator_write_lazy_memory() {
    use linux_loader::configurator::linux::LinuxBootConfigurator;
    use linux_loader::configurator::{BootConfigurator, BootParams};
    use linux_loader::loader::bootparam::boot_params;

    let (_mf, _be, space) = common::setup("regions-boot");
    space.map(MapOpts::anonymous(16 * MIB).fixed(0)).unwrap();
    let mem = space.regions(IoOpts::FORCE).unwrap();

    let mut cl = Cmdline::new(256).unwrap();
    cl.insert_str("console=ttyS0 panic=1").unwrap();
    load_cmdline(&mem, GuestAddress(0x2_0000), &cl).unwrap();
    let mut got = [0u8; 22];
    space.read_with(0x2_0000, &mut got, IoOpts::FORCE).unwrap();
    assert_eq!(&got, b"console=ttyS0 panic=1\0");
    // Past the end of RAM: the loader's own error.
    assert!(load_cmdline(&mem, GuestAddress(16 * MIB - 4), &cl).is_err());

    let mut params = boot_params::default();
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = 0x2_0000;
    params.e820_entries = 1;
    params.e820_table[0].size = 16 * MIB;
    let zero_page = GuestAddress(0x7000);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, zero_page), &mem).unwrap();
    let back: boot_params = mem.read_obj(zero_page).unwrap();
    assert_eq!({ back.hdr.boot_flag }, 0xaa55);
    assert_eq!({ back.hdr.cmd_line_ptr }, 0x2_0000);
    assert_eq!({ back.e820_table[0].size }, 16 * MIB);
    // The zero page past the end of RAM is refused.
    let late = GuestAddress(16 * MIB - 16);
    assert!(
        LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, late), &mem).is_err()
    );
    // Two pages were populated: the command line's and the zero page's.
    assert_eq!(space.stats().populated_bytes, 2 * PAGE);
}

#[test]
fn a_virtio_queue_serves_a_chain_over_the_region_view() {
    use std::io::{Read, Write as _};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueT};
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const BASE: u64 = 1 << 30;
    let (_mf, _be, space) = common::setup("regions-virtio");
    // Two adjacent vmas: one region; the response crosses from one to the
    // other.
    space.map(MapOpts::anonymous(2 * MIB).fixed(BASE)).unwrap();
    space
        .map(
            MapOpts::anonymous(2 * MIB)
                .fixed(BASE + 2 * MIB)
                .name("second"),
        )
        .unwrap();
    let mem = space.regions(IoOpts::default()).unwrap();
    assert_eq!(mem.num_regions(), 1);
    let (desc, avail, used) = (BASE, BASE + 0x1000, BASE + 0x2000);
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

    assert_eq!(
        mem.load::<u16>(GuestAddress(used + 2), Ordering::Acquire)
            .unwrap(),
        1
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 11);
    // The guest-side truth, through the space.
    let mut resp = [0u8; 11];
    space.read(w, &mut resp).unwrap();
    assert_eq!(&resp, b"HELLO WORLD");
    space.check_invariants().unwrap();
}

#[test]
fn regions_are_runs_of_vmas_and_checks_populate_nothing() {
    let (_mf, _be, space) = common::setup("regions-layout");
    space.map(MapOpts::anonymous(MIB).fixed(0)).unwrap();
    space
        .map(MapOpts::anonymous(MIB).fixed(MIB).perms(Perms::READ))
        .unwrap();
    space
        .map(MapOpts::anonymous(4 * MIB).fixed(8 * MIB))
        .unwrap();
    let mem = space.regions(IoOpts::default()).unwrap();
    let ranges: Vec<_> = mem.iter().map(|r| r.range()).collect();
    assert_eq!(ranges, vec![r(0, 2 * MIB), r(8 * MIB, 12 * MIB)]);
    assert_eq!(mem.last_addr(), GuestAddress(12 * MIB - 1));
    assert_eq!(
        mem.find_region(GuestAddress(9 * MIB))
            .map(|r| r.start_addr()),
        Some(GuestAddress(8 * MIB))
    );
    assert!(mem.find_region(GuestAddress(3 * MIB)).is_none());
    assert!(mem.find_region(GuestAddress(12 * MIB)).is_none());
    assert!(mem.check_range(GuestAddress(0x100), 0x1000));
    assert!(!mem.check_range(GuestAddress(MIB - 8), 16), "read-only vma");
    assert!(!mem.check_range(GuestAddress(2 * MIB - 8), 16), "hole");
    assert!(!mem.check_range(GuestAddress(u64::MAX - 4), 16), "overflow");
    assert_eq!(space.stats().populated_bytes, 0, "checks populate nothing");

    // The default view respects protections for writing: a read-only vma
    // can be neither written nor read through it; FORCE can.
    assert!(mem.write_obj(1u32, GuestAddress(MIB)).is_err());
    assert!(mem.read_obj::<u32>(GuestAddress(MIB)).is_err());
    let forced = SpaceRegions::new(space.clone(), IoOpts::FORCE).unwrap();
    forced.write_obj(0xfeed_u32, GuestAddress(MIB)).unwrap();
    assert_eq!(forced.read_obj::<u32>(GuestAddress(MIB)).unwrap(), 0xfeed);
    // Unmapped: errors, not panics; a range crossing into a hole too.
    assert!(mem.read_obj::<u32>(GuestAddress(4 * MIB)).is_err());
    assert!(mem
        .write_slice(&[0; 32], GuestAddress(2 * MIB - 16))
        .is_err());
    // A region's own get_slice refuses what does not fit it.
    let region = mem.find_region(GuestAddress(0)).unwrap();
    assert!(region
        .get_slice(vm_memory::MemoryRegionAddress(2 * MIB - 8), 16)
        .is_err());
    space.check_invariants().unwrap();
}

#[test]
fn the_view_follows_the_pages_behind_the_guest_range() {
    let (mf, _be, space) = common::setup("regions-follow");
    const BASE: u64 = 1 << 30;
    space.map(MapOpts::anonymous(2 * MIB).fixed(BASE)).unwrap();
    let mem = space.regions(IoOpts::default()).unwrap();
    mem.write_slice(b"first", GuestAddress(BASE + 100)).unwrap();
    // Replace the mapping: new pages behind the same guest range, written
    // through the space, not the view.
    space.unmap(BASE, 2 * MIB).unwrap();
    let mut buf = [0u8; 5];
    assert!(
        mem.read_slice(&mut buf, GuestAddress(BASE + 100)).is_err(),
        "unmapped since the view was built"
    );
    space.map(MapOpts::anonymous(2 * MIB).fixed(BASE)).unwrap();
    space.write(BASE + 100, b"other").unwrap();
    mem.read_slice(&mut buf, GuestAddress(BASE + 100)).unwrap();
    assert_eq!(&buf, b"other");

    // Copy-on-write: after a fork, the parent's view writes its own copy.
    let child = space
        .fork(Arc::new(guestmm::mm::RecordingBackend::new()))
        .unwrap();
    mem.write_slice(b"mine!", GuestAddress(BASE + 100)).unwrap();
    assert!(space.stats().cow_copies + space.stats().cow_takeovers >= 1);
    let mut theirs = [0u8; 5];
    child.read(BASE + 100, &mut theirs).unwrap();
    assert_eq!(&theirs, b"other", "the child keeps its data");
    space.read(BASE + 100, &mut buf).unwrap();
    assert_eq!(&buf, b"mine!");

    // A read through the view counts as a write: it copies the child's
    // shared page.
    let cmem = child.regions(IoOpts::default()).unwrap();
    let copies = child.stats().cow_copies + child.stats().cow_takeovers;
    let mut page = [0u8; 5];
    cmem.read_slice(&mut page, GuestAddress(BASE + 100))
        .unwrap();
    assert_eq!(&page, b"other");
    assert!(child.stats().cow_copies + child.stats().cow_takeovers > copies);
    drop((mem, cmem));
    space.check_invariants().unwrap();
    child.check_invariants().unwrap();
    guestmm::mm::check_file_refs(&mf, &[&space, &child], &[]).unwrap();
}

#[test]
fn region_views_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SpaceRegions>();
}

#[test]
fn extents_describe_backing_population_and_protection() {
    let (mf, _be, space) = common::setup("extents");
    const BASE: u64 = 1 << 30;
    let memfd = mf.fd().as_raw_fd();
    space
        .map(MapOpts::anonymous(16 * MIB).fixed(BASE).name("ram"))
        .unwrap();
    space.write(BASE, &[1; 100]).unwrap();
    space
        .write(BASE + 8 * MIB, &[2; 2 * PAGE as usize])
        .unwrap();
    space
        .protect(BASE + 12 * MIB, 4 * MIB, Perms::READ)
        .unwrap();
    let ext = space.extents(r(BASE, BASE + 16 * MIB)).unwrap();
    let summary: Vec<_> = ext
        .iter()
        .map(|e| (e.range, e.is_populated(), e.perms))
        .collect();
    assert_eq!(
        summary,
        vec![
            (r(BASE, BASE + PAGE), true, Perms::READ_WRITE),
            (r(BASE + PAGE, BASE + 8 * MIB), false, Perms::READ_WRITE),
            (
                r(BASE + 8 * MIB, BASE + 8 * MIB + 2 * PAGE),
                true,
                Perms::READ_WRITE
            ),
            (
                r(BASE + 8 * MIB + 2 * PAGE, BASE + 12 * MIB),
                false,
                Perms::READ_WRITE
            ),
            (r(BASE + 12 * MIB, BASE + 16 * MIB), false, Perms::READ),
        ]
    );
    let b = ext[2].backing.as_ref().unwrap();
    assert_eq!(b.fd().as_raw_fd(), memfd);
    assert!(b.memfile && b.writable && !b.cow);
    assert_eq!(b.committed, Some(2 * PAGE), "written pages are resident");
    assert!(ext.iter().all(|e| e.private && &*e.name == "ram"));
    // The fd and offset really hold the guest's bytes.
    let (fd, fr) = ext[2].file_range().unwrap();
    let mut got = vec![0u8; fr.len() as usize];
    let n = pread_fd(fd.as_raw_fd(), &mut got, fr.start());
    assert_eq!(n, got.len());
    assert!(got.iter().all(|&x| x == 2));

    // Unmapped parts are left out; a sub-range clips.
    let clipped = space
        .extents(r(BASE + 8 * MIB + PAGE, BASE + 32 * MIB))
        .unwrap();
    assert_eq!(
        clipped[0].range,
        r(BASE + 8 * MIB + PAGE, BASE + 8 * MIB + 2 * PAGE)
    );
    assert_eq!(clipped[0].backing.as_ref().unwrap().offset, b.offset + PAGE);
    assert_eq!(clipped.last().unwrap().range.end(), BASE + 16 * MIB);
    assert!(space.extents(r(0, PAGE)).unwrap().is_empty());

    // Bad ranges are typed errors.
    assert!(matches!(
        space.extents(r(BASE, BASE)),
        Err(MmError::Range(RangeError::Empty { .. }))
    ));
    assert!(matches!(
        space.extents(r(BASE + 1, BASE + PAGE)),
        Err(MmError::Range(RangeError::Unaligned { .. }))
    ));
    let size = space.options().size;
    assert!(matches!(
        space.extents(r(size - PAGE, size + PAGE)),
        Err(MmError::OutOfSpace { .. })
    ));
    assert!(matches!(
        space.install_populated(r(BASE, BASE + 1)),
        Err(MmError::Range(RangeError::Unaligned { .. }))
    ));

    // After a fork the parent's private pages are copy-on-write.
    let _child = space
        .fork(Arc::new(guestmm::mm::RecordingBackend::new()))
        .unwrap();
    let after = space.extents(r(BASE, BASE + PAGE)).unwrap();
    let b = after[0].backing.as_ref().unwrap();
    assert!(b.cow && !b.writable);
}

/// Reads `buf.len()` bytes at `offset` of the file behind `fd`, through a
/// fresh open of `/proc/self/fd/N` (no unsafe in tests).
fn pread_fd(fd: i32, buf: &mut [u8], offset: u64) -> usize {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/self/fd/{fd}")).unwrap();
    f.read_at(buf, offset).unwrap()
}

#[test]
fn extents_of_shared_objects_and_host_files() {
    let (mf, _be, space) = common::setup("extents-objects");
    const BASE: u64 = 1 << 30;
    let shm = SharedMemory::new(mf.clone(), 4 * MIB).unwrap();
    space
        .map(
            MapOpts::object(shm.clone(), 0, 4 * MIB)
                .fixed(BASE)
                .shared()
                .name("shm"),
        )
        .unwrap();
    let file = common::tempfile("extents-hf");
    file.set_len(2 * MIB).unwrap();
    let file_fd = file.as_raw_fd();
    let hf = HostFile::new(file, true).unwrap();
    space
        .map(
            MapOpts::object(hf, 0, 2 * MIB)
                .fixed(BASE + 8 * MIB)
                .shared()
                .name("disk"),
        )
        .unwrap();
    space.write(BASE + MIB, b"shared").unwrap();
    space.write(BASE + 8 * MIB + PAGE, b"file").unwrap();
    let ext = space.extents(r(BASE, BASE + 16 * MIB)).unwrap();
    let populated: Vec<_> = ext.iter().filter(|e| e.is_populated()).collect();
    assert_eq!(populated.len(), 2, "{ext:#?}");
    let (s, h) = (populated[0], populated[1]);
    assert_eq!(s.range, r(BASE + MIB, BASE + MIB + PAGE));
    assert!(!s.private && &*s.name == "shm");
    let sb = s.backing.as_ref().unwrap();
    assert!(sb.memfile && sb.writable && !sb.cow);
    assert_eq!(sb.fd().as_raw_fd(), mf.fd().as_raw_fd());
    assert_eq!(h.range, r(BASE + 8 * MIB + PAGE, BASE + 8 * MIB + 2 * PAGE));
    let hb = h.backing.as_ref().unwrap();
    assert!(!hb.memfile && hb.writable && !hb.cow);
    assert_eq!(
        hb.offset, PAGE,
        "a host file's pages sit at their file offset"
    );
    assert_eq!(hb.fd().as_raw_fd(), file_fd);
    assert_eq!(hb.committed, None);
}

#[test]
fn install_populated_shows_exactly_what_host_writes_populated() {
    let (mf, be, space) = common::setup("install");
    const BASE: u64 = 1 << 30;
    space.map(MapOpts::anonymous(16 * MIB).fixed(BASE)).unwrap();
    space
        .map(
            MapOpts::anonymous(2 * MIB)
                .fixed(BASE + 16 * MIB)
                .perms(Perms::READ),
        )
        .unwrap();
    space
        .map(
            MapOpts::anonymous(2 * MIB)
                .fixed(BASE + 18 * MIB)
                .perms(Perms::NONE),
        )
        .unwrap();
    let mem = space.regions(IoOpts::FORCE).unwrap();
    mem.write_slice(&pattern(3 * MIB as usize, 1), GuestAddress(BASE + MIB))
        .unwrap();
    mem.write_slice(b"x", GuestAddress(BASE + 12 * MIB))
        .unwrap();
    mem.write_slice(b"ro", GuestAddress(BASE + 16 * MIB))
        .unwrap();
    mem.write_slice(b"none", GuestAddress(BASE + 18 * MIB))
        .unwrap();
    assert!(be.installed().is_empty(), "host writes install nothing");
    let populated_before = space.stats().populated_bytes;

    let shown = space.install_populated(r(BASE, BASE + 32 * MIB)).unwrap();
    assert_eq!(shown, 3 * MIB + 2 * PAGE, "the PROT_NONE page stays hidden");
    assert_eq!(
        space.stats().populated_bytes,
        populated_before,
        "nothing new"
    );
    let memfd = mf.fd().as_raw_fd();
    let installed: Vec<_> = be
        .installed()
        .into_iter()
        .map(|(range, i)| (range, i.writable, i.fd == memfd))
        .collect();
    assert_eq!(
        installed,
        vec![
            (r(BASE + MIB, BASE + 4 * MIB), true, true),
            (r(BASE + 12 * MIB, BASE + 12 * MIB + PAGE), true, true),
            (r(BASE + 16 * MIB, BASE + 16 * MIB + PAGE), false, true),
        ]
    );
    // What is installed is what the extents say backs it.
    for (range, inst) in be.installed() {
        let e = space.extents(range).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].backing.as_ref().unwrap().offset, inst.file_offset);
    }
    // Again: harmless, same result.
    assert_eq!(
        space.install_populated(r(BASE, BASE + 32 * MIB)).unwrap(),
        shown
    );
    assert_eq!(be.installed().len(), 3);
    // A range with nothing populated installs nothing.
    be.clear_calls();
    assert_eq!(
        space
            .install_populated(r(BASE + 5 * MIB, BASE + 6 * MIB))
            .unwrap(),
        0
    );
    assert!(be.calls().is_empty());
    // A refusing backend is an error.
    be.fail_installs_after(Some(0));
    assert!(matches!(
        space.install_populated(r(BASE, BASE + 16 * MIB)),
        Err(MmError::Backend(_))
    ));
    be.fail_installs_after(None);
    space.check_invariants().unwrap();
}

#[test]
fn threads_share_one_view() {
    const BASE: u64 = 1 << 30;
    let (_mf, _be, space) = common::setup("regions-threads");
    space.map(MapOpts::anonymous(8 * MIB).fixed(BASE)).unwrap();
    let mem = Arc::new(space.regions(IoOpts::default()).unwrap());
    // Each thread writes its own 2 MiB in odd-sized pieces and reads a
    // page that straddles into its neighbour's part.
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let base = BASE + u64::from(t) * 2 * MIB;
                let bytes = pattern(2 * MIB as usize, t);
                for (i, chunk) in bytes.chunks(12_345).enumerate() {
                    mem.write_slice(chunk, GuestAddress(base + i as u64 * 12_345))
                        .unwrap();
                    let mut probe = [0u8; 64];
                    let at = (base + 2 * MIB - 32).min(BASE + 8 * MIB - 64);
                    mem.read_slice(&mut probe, GuestAddress(at)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..4u8 {
        let mut got = vec![0u8; 2 * MIB as usize];
        space.read(BASE + u64::from(t) * 2 * MIB, &mut got).unwrap();
        assert!(got == pattern(2 * MIB as usize, t), "thread {t}'s bytes");
    }
    space.check_invariants().unwrap();
}
