//! Loads an ELF kernel with linux-loader into lazily populated guestmm
//! memory through the region view ([`SpaceRegions`]), writes a command line,
//! and reports what got populated (extents) and what installing it before
//! the first run would show the guest.
//!
//! ```text
//! cargo run --example load_elf                 # a tiny ELF built in memory
//! cargo run --example load_elf -- ./vmlinux    # your own (e.g. a Linux vmlinux)
//! ```
//!
//! No KVM is needed: the address space uses a [`RecordingBackend`], which
//! records what a KVM backend would have been asked to install.

use std::error::Error;
use std::io::Cursor;
use std::sync::Arc;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{
    AddressSpace, AddressSpaceOptions, IoOpts, MapOpts, RecordingBackend, SpaceRegions,
};
use guestmm::Range;
use linux_loader::loader::{elf::Elf, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Lazy RAM from address 0: costs nothing until touched.
const RAM: u64 = 1 << 30;
const CMDLINE_GPA: u64 = 0x2_0000;

/// A minimal ELF64 (x86-64): `hlt; jmp $-1` at 16 MiB, then 3 pages of
/// data at 20 MiB with a 1 MiB bss the loader does not touch.
fn tiny_elf() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let text: Vec<u8> = vec![0xf4, 0xeb, 0xfd];
    let data: Vec<u8> = (0..3 * PAGE as usize).map(|i| i as u8).collect();
    let segments = [(16 * MIB, text, PAGE), (20 * MIB, data, 4 * MIB)];
    let mut elf = vec![0u8; EHDR + PHDR * segments.len()];
    let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(&mut elf, 0, b"\x7fELF\x02\x01\x01");
    put(&mut elf, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut elf, 18, &0x3eu16.to_le_bytes()); // EM_X86_64
    put(&mut elf, 20, &1u32.to_le_bytes());
    put(&mut elf, 24, &(16 * MIB).to_le_bytes()); // e_entry
    put(&mut elf, 32, &(EHDR as u64).to_le_bytes()); // e_phoff
    put(&mut elf, 52, &(EHDR as u16).to_le_bytes());
    put(&mut elf, 54, &(PHDR as u16).to_le_bytes());
    put(&mut elf, 56, &(segments.len() as u16).to_le_bytes());
    for (i, (paddr, bytes, memsz)) in segments.iter().enumerate() {
        let offset = (elf.len() as u64).next_multiple_of(PAGE);
        elf.resize(offset as usize, 0);
        elf.extend_from_slice(bytes);
        let ph = EHDR + PHDR * i;
        put(&mut elf, ph, &1u32.to_le_bytes()); // PT_LOAD
        put(&mut elf, ph + 4, &5u32.to_le_bytes()); // R+X
        for (at, v) in [
            (8, offset),
            (16, *paddr),
            (24, *paddr),
            (32, bytes.len() as u64),
            (40, *memsz),
            (48, PAGE),
        ] {
            put(&mut elf, ph + at, &v.to_le_bytes());
        }
    }
    elf
}

fn main() -> Result<(), Box<dyn Error>> {
    let (name, image) = match std::env::args().nth(1) {
        Some(path) => (path.clone(), std::fs::read(&path)?),
        None => ("a tiny ELF built in memory".to_string(), tiny_elf()),
    };
    let memfile = Arc::new(MemoryFile::new("load-elf", MemoryFileOptions::default())?);
    let backend = Arc::new(RecordingBackend::new());
    let space = AddressSpace::new(memfile, backend.clone(), AddressSpaceOptions::default())?;
    space.map(MapOpts::anonymous(RAM).fixed(0).name("ram"))?;

    // The loader writes like a VMM would: ignoring guest protections.
    let mem: SpaceRegions = space.regions(IoOpts::FORCE)?;
    let loaded = Elf::load(&mem, None, &mut Cursor::new(&image), None)?;
    let mut cmdline = Cmdline::new(4096)?;
    cmdline.insert_str("console=ttyS0 reboot=k panic=1")?;
    load_cmdline(&mem, GuestAddress(CMDLINE_GPA), &cmdline)?;

    println!(
        "loaded {name} ({} bytes): entry {:#x}, end {:#x}",
        image.len(),
        loaded.kernel_load.0,
        loaded.kernel_end
    );
    println!("pvh: {}", loaded.pvh_boot_cap);
    let mut first = [0u8; 8];
    mem.read_slice(&mut first, loaded.kernel_load)?;
    println!("first bytes at the entry: {first:02x?}");

    let ram = Range::new(0, RAM)?;
    let extents = space.extents(ram)?;
    println!("\npopulated extents of {ram}:");
    let mut populated = 0;
    for e in extents.iter().filter(|e| e.is_populated()) {
        let b = e.backing.as_ref().expect("populated");
        populated += e.range.len();
        println!(
            "  {:#012x}-{:#012x} {:>8} KiB  memfd offset {:#x}, {} KiB resident",
            e.range.start(),
            e.range.end(),
            e.range.len() >> 10,
            b.offset,
            b.committed.unwrap_or(0) >> 10
        );
    }
    let stats = space.stats();
    println!(
        "{} KiB of {} MiB of RAM populated ({} extents in all, the rest untouched)",
        populated >> 10,
        RAM >> 20,
        extents.len()
    );
    assert_eq!(populated, stats.populated_bytes);

    // Before the first run a VMM shows the guest what the loader wrote, so
    // it does not fault on it again.
    let shown = space.install_populated(ram)?;
    println!(
        "install_populated: {} KiB in {} backend ranges (memslots with KVM)",
        shown >> 10,
        backend.installed().len()
    );
    Ok(())
}
