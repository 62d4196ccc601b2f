//! Builds a vhost-user memory table (`VHOST_USER_SET_MEM_TABLE`'s regions:
//! guest address, size, user address, mmap offset, plus the fd sent with
//! each) from [`AddressSpace::extents`], then plays the backend: maps every
//! region from its fd and offset, as a vhost-user daemon would, and checks
//! it sees the bytes the VMM wrote.
//!
//! The guest has 256 MiB of lazy RAM and an 8 MiB shared-memory object;
//! the host writes some of both. Lazy memory has no backing until something
//! touches it, so the table lists only populated extents; untouched RAM is
//! reported as such. A VMM that shares lazy memory with a vhost-user backend
//! populates (or precommits) what the device may reach first, and sends the
//! regions that get populated later with `VHOST_USER_ADD_MEM_REG`.
//!
//! ```text
//! cargo run --example vhost_user_table
//! ```
//!
//! No KVM is needed (a [`RecordingBackend`] stands in for the memslots).

use std::error::Error;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{
    AddressSpace, AddressSpaceOptions, Extent, IoOpts, MapOpts, RecordingBackend, SharedMemory,
};
use guestmm::Range;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{Bytes, GuestAddress, VolatileMemory};

const MIB: u64 = 1 << 20;
const RAM_BASE: u64 = 0;
const RAM: u64 = 256 << 20;
const SHM_BASE: u64 = 4 << 30;
const SHM: u64 = 8 << 20;

/// One row of the table: the region and the fd that goes with it.
struct Row {
    region: VhostUserMemoryRegion,
    fd: RawFd,
    /// A duplicate of the fd, for the "backend" side of this example.
    file: File,
}

/// Populated extents as vhost-user regions: adjacent extents on the same
/// fd at consecutive offsets are one region (vhost-user has no
/// permissions per region).
fn table(extents: &[Extent]) -> Result<Vec<Row>, Box<dyn Error>> {
    let mut rows: Vec<Row> = Vec::new();
    for e in extents {
        let Some(b) = &e.backing else { continue };
        let fd = b.fd().as_raw_fd();
        if let Some(last) = rows.last_mut() {
            let r = &mut last.region;
            if last.fd == fd
                && r.guest_phys_addr + r.memory_size == e.range.start()
                && r.mmap_offset + r.memory_size == b.offset
            {
                r.memory_size += e.range.len();
                continue;
            }
        }
        rows.push(Row {
            // This VMM gives the backend vring addresses as guest-physical
            // ones, so the "user address" of a region is its GPA.
            region: VhostUserMemoryRegion::new(
                e.range.start(),
                e.range.len(),
                e.range.start(),
                b.offset,
            ),
            fd,
            file: File::from(b.fd().try_clone_to_owned()?),
        });
    }
    Ok(rows)
}

fn main() -> Result<(), Box<dyn Error>> {
    let memfile = Arc::new(MemoryFile::new("vhost-user", MemoryFileOptions::default())?);
    let space = AddressSpace::new(
        memfile.clone(),
        Arc::new(RecordingBackend::new()),
        AddressSpaceOptions::default(),
    )?;
    space.map(MapOpts::anonymous(RAM).fixed(RAM_BASE).name("ram"))?;
    let shm = SharedMemory::new(memfile, SHM)?;
    space.map(
        MapOpts::object(shm, 0, SHM)
            .fixed(SHM_BASE)
            .shared()
            .name("shm"),
    )?;

    // The VMM writes a virtqueue's rings, a request buffer and part of the
    // shared object (through the region view, as a loader would).
    let mem = space.regions(IoOpts::default())?;
    let writes: [(u64, Vec<u8>); 4] = [
        (RAM_BASE + MIB, vec![0x11; 12 << 10]),
        (
            RAM_BASE + 64 * MIB + 0x800,
            b"a request that crosses a page".repeat(200),
        ),
        (RAM_BASE + 200 * MIB, vec![0x22; 2 << 20]),
        (SHM_BASE + MIB, b"shared with the backend".to_vec()),
    ];
    for (gpa, bytes) in &writes {
        mem.write_slice(bytes, GuestAddress(*gpa))?;
    }

    let all = Range::new(0, SHM_BASE + SHM)?;
    let extents = space.extents(all)?;
    let rows = table(&extents)?;
    println!("vhost-user memory table ({} regions):", rows.len());
    println!(
        "  {:>14} {:>10} {:>14} {:>12} {:>4}",
        "guest_phys", "size", "user_addr", "mmap_offset", "fd"
    );
    for row in &rows {
        let r = &row.region;
        println!(
            "  {:#14x} {:>7} KiB {:#14x} {:#12x} {:>4}",
            // Copies: the struct is packed, its fields cannot be borrowed.
            { r.guest_phys_addr },
            { r.memory_size } >> 10,
            { r.user_addr },
            { r.mmap_offset },
            row.fd
        );
    }
    let unpopulated: u64 = extents
        .iter()
        .filter(|e| !e.is_populated())
        .map(|e| e.range.len())
        .sum();
    println!(
        "not populated (no fd yet): {} MiB in {} extents",
        unpopulated >> 20,
        extents.iter().filter(|e| !e.is_populated()).count()
    );

    // The backend's side: map each region from its fd and check the VMM's
    // bytes are there.
    for (gpa, bytes) in &writes {
        let row = rows
            .iter()
            .find(|row| {
                let r = &row.region;
                (r.guest_phys_addr..r.guest_phys_addr + r.memory_size).contains(gpa)
            })
            .ok_or("a written range is missing from the table")?;
        let mapped = row
            .region
            .mmap_region::<()>(row.file.try_clone()?)
            .map_err(|e| format!("backend mmap: {e:?}"))?;
        let mut seen = vec![0u8; bytes.len()];
        let at = (gpa - row.region.guest_phys_addr) as usize;
        mapped.get_slice(at, seen.len())?.read_slice(&mut seen, 0)?;
        if &seen != bytes {
            return Err(format!("backend sees other bytes at {gpa:#x}").into());
        }
    }
    println!(
        "backend check: all {} writes visible through the table's fds",
        writes.len()
    );
    Ok(())
}
