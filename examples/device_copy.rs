//! A device model serving a virtio split queue whose rings and buffers live
//! in lazily populated guest memory.
//!
//! The "driver" (this program, writing guest memory through the same
//! [`SpaceMemory`] handle) posts descriptor chains: a request split over one
//! to three device-readable buffers, and a response area of one or two
//! device-writable buffers, all placed at awkward addresses that cross pages
//! and the MemoryFile's 2 MiB internal mappings. The device pops each chain
//! with `virtio_queue::Queue`, uppercases the request, appends an FNV-1a
//! checksum of it, writes that into the response buffers and adds a used
//! entry. The driver then checks every response.
//!
//! No KVM is needed: the address space uses a [`RecordingBackend`], and the
//! program exits non-zero on any mismatch.
//!
//! ```text
//! cargo run --example device_copy
//! ```

use std::error::Error;
use std::io::{Read, Write};
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{AddressSpace, AddressSpaceOptions, MapOpts, RecordingBackend, SpaceMemory};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
/// Guest-physical layout: a small vma for the rings, then RAM for buffers.
const RINGS: u64 = 1 << 30;
const RAM: u64 = RINGS + 2 * MIB;
const RAM_LEN: u64 = 64 * MIB;
const DESC_TABLE: u64 = RINGS;
const AVAIL_RING: u64 = RINGS + 0x1000;
const USED_RING: u64 = RINGS + 0x2000;

const QUEUE_SIZE: u16 = 16;
const REQUESTS: usize = 48;
/// Bytes the device appends after the uppercased request.
const CHECKSUM_LEN: usize = 4;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// A small deterministic generator (no extra crates).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// What the device should answer to `request`.
fn expected_response(request: &[u8]) -> Vec<u8> {
    let mut out = request.to_ascii_uppercase();
    out.extend_from_slice(&fnv1a(request).to_le_bytes());
    out
}

/// One request in flight: where its response goes.
struct InFlight {
    request: Vec<u8>,
    response_bufs: Vec<(u64, u32)>,
    /// What a fork's parent showed in the response buffers when the request
    /// was posted (it must not change: the device writes the child's copy).
    parent_before: Option<Vec<u8>>,
}

/// The driver side: posts chains, reaps used entries. `mem` is the memory
/// the device serves; `parent`, after a fork, the space it was forked from.
struct Driver {
    rng: Lcg,
    /// Next free byte of RAM for buffers (a bump allocator that wraps).
    next_buf: u64,
    /// Buffers are `1..=max_gap` bytes apart.
    max_gap: u64,
    avail_idx: Wrapping<u16>,
    used_seen: Wrapping<u16>,
    in_flight: Vec<Option<InFlight>>,
}

impl Driver {
    /// A buffer of `len` bytes at an awkward address.
    fn alloc(&mut self, len: u64) -> u64 {
        let gap = self.rng.below(self.max_gap) + 1;
        if self.next_buf + gap + len > RAM + RAM_LEN {
            self.next_buf = RAM;
        }
        let at = self.next_buf + gap;
        self.next_buf = at + len;
        at
    }

    fn random_request(&mut self) -> Vec<u8> {
        let len = 1 + self.rng.below(6000) as usize;
        (0..len)
            .map(|_| match self.rng.below(28) {
                26 | 27 => b' ',
                c => b'a' + c as u8,
            })
            .collect()
    }

    /// Splits `len` into `parts` non-empty pieces (fewer if `len` is small).
    fn split(&mut self, len: usize, parts: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (1..parts.min(len))
            .map(|_| 1 + self.rng.below(len as u64 - 1) as usize)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain([len]) {
            out.push(c - prev);
            prev = c;
        }
        out
    }

    /// Posts one request starting at descriptor `first`; returns how many
    /// descriptors it used.
    fn post(
        &mut self,
        mem: &SpaceMemory,
        parent: Option<&SpaceMemory>,
        first: u16,
    ) -> Result<u16, Box<dyn Error>> {
        let request = self.random_request();
        let readable = 1 + self.rng.below(3) as usize;
        let writable = 1 + self.rng.below(2) as usize;
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        let mut at = 0;
        for part in self.split(request.len(), readable) {
            let gpa = self.alloc(part as u64);
            mem.write_slice(&request[at..at + part], GuestAddress(gpa))?;
            descs.push((gpa, part as u32, 0));
            at += part;
        }
        let mut response_bufs = Vec::new();
        for part in self.split(request.len() + CHECKSUM_LEN, writable) {
            let gpa = self.alloc(part as u64);
            descs.push((gpa, part as u32, VRING_DESC_F_WRITE));
            response_bufs.push((gpa, part as u32));
        }
        let n = descs.len() as u16;
        for (i, &(gpa, len, flags)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let desc = Descriptor::new(gpa, len, flags, if last { 0 } else { index + 1 });
            mem.write_obj(desc, GuestAddress(DESC_TABLE + 16 * u64::from(index)))?;
        }
        let slot = u64::from(self.avail_idx.0 % QUEUE_SIZE);
        mem.write_obj(first, GuestAddress(AVAIL_RING + 4 + 2 * slot))?;
        self.avail_idx += 1;
        // Publish after the ring entry (the device loads with Acquire).
        mem.store(
            self.avail_idx.0,
            GuestAddress(AVAIL_RING + 2),
            Ordering::Release,
        )?;
        let parent_before = parent.map(|p| read_bufs(p, &response_bufs)).transpose()?;
        self.in_flight[usize::from(first)] = Some(InFlight {
            request,
            response_bufs,
            parent_before,
        });
        Ok(n)
    }

    /// Checks every new used entry; returns (checked, mismatches).
    fn reap(
        &mut self,
        mem: &SpaceMemory,
        parent: Option<&SpaceMemory>,
    ) -> Result<(usize, usize), Box<dyn Error>> {
        let used_idx: u16 = mem.load(GuestAddress(USED_RING + 2), Ordering::Acquire)?;
        let (mut checked, mut bad) = (0, 0);
        while self.used_seen.0 != used_idx {
            let slot = u64::from(self.used_seen.0 % QUEUE_SIZE);
            // A used element: le32 id (the chain's head), le32 len.
            let elem = USED_RING + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(elem))?;
            let used_len: u32 = mem.read_obj(GuestAddress(elem + 4))?;
            self.used_seen += 1;
            let Some(req) = self.in_flight.get_mut(id as usize).and_then(Option::take) else {
                eprintln!("used entry for unknown head {}", id);
                bad += 1;
                continue;
            };
            let want = expected_response(&req.request);
            let got = read_bufs(mem, &req.response_bufs)?;
            checked += 1;
            if let (Some(p), Some(before)) = (parent, &req.parent_before) {
                if read_bufs(p, &req.response_bufs)? != *before {
                    eprintln!("head {id}: the device's write reached the fork's parent");
                    bad += 1;
                }
            }
            if used_len as usize != want.len() || got != want {
                eprintln!(
                    "head {}: got {} bytes (used len {}), want {}; contents {}",
                    id,
                    got.len(),
                    used_len,
                    want.len(),
                    if got == want { "match" } else { "differ" }
                );
                bad += 1;
            }
        }
        Ok((checked, bad))
    }
}

/// The bytes of `bufs`, concatenated.
fn read_bufs(mem: &SpaceMemory, bufs: &[(u64, u32)]) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut out = Vec::new();
    for &(gpa, len) in bufs {
        let mut part = vec![0u8; len as usize];
        mem.read_slice(&mut part, GuestAddress(gpa))?;
        out.extend_from_slice(&part);
    }
    Ok(out)
}

/// The device side: serves every available chain.
fn serve(queue: &mut Queue, mem: &SpaceMemory) -> Result<usize, Box<dyn Error>> {
    let mut served = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut reader = chain.clone().reader(mem)?;
        let mut writer = chain.writer(mem)?;
        let mut request = vec![0u8; reader.available_bytes()];
        reader.read_exact(&mut request)?;
        let response = expected_response(&request);
        let written = if writer.available_bytes() >= response.len() {
            writer.write_all(&response)?;
            writer.bytes_written()
        } else {
            0
        };
        queue.add_used(mem, head, written as u32)?;
        served += 1;
    }
    Ok(served)
}

/// Totals of one phase.
#[derive(Default)]
struct Tally {
    posted: usize,
    served: usize,
    checked: usize,
    bad: usize,
    rounds: usize,
}

/// Posts `requests` requests in rounds (as many chains as the descriptor
/// table holds, at most 5 descriptors each), lets the device serve them and
/// checks the results.
fn run(
    driver: &mut Driver,
    queue: &mut Queue,
    mem: &SpaceMemory,
    parent: Option<&SpaceMemory>,
    requests: usize,
) -> Result<Tally, Box<dyn Error>> {
    let mut t = Tally::default();
    while t.posted < requests {
        let mut first = 0;
        while t.posted < requests && first + 5 <= QUEUE_SIZE {
            first += driver.post(mem, parent, first)?;
            t.posted += 1;
        }
        t.served += serve(queue, mem)?;
        let (checked, bad) = driver.reap(mem, parent)?;
        t.checked += checked;
        t.bad += bad;
        t.rounds += 1;
    }
    Ok(t)
}

fn main() -> Result<(), Box<dyn Error>> {
    let memfile = Arc::new(MemoryFile::new(
        "device-copy",
        MemoryFileOptions {
            chunk_size: 2 * MIB,
            ..Default::default()
        },
    )?);
    let space = AddressSpace::new(
        memfile.clone(),
        Arc::new(RecordingBackend::new()),
        AddressSpaceOptions::default(),
    )?;
    space.map(MapOpts::anonymous(2 * MIB).fixed(RINGS).name("rings"))?;
    space.map(MapOpts::anonymous(RAM_LEN).fixed(RAM).name("ram"))?;
    let mem = SpaceMemory::new(space.clone());

    let mut queue = Queue::new(QUEUE_SIZE)?;
    queue.set_size(QUEUE_SIZE);
    queue.try_set_desc_table_address(GuestAddress(DESC_TABLE))?;
    queue.try_set_avail_ring_address(GuestAddress(AVAIL_RING))?;
    queue.try_set_used_ring_address(GuestAddress(USED_RING))?;
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        return Err("queue rings are not accessible".into());
    }

    let mut driver = Driver {
        rng: Lcg(0x5eed),
        next_buf: RAM,
        max_gap: 400 * 1024,
        avail_idx: Wrapping(0),
        used_seen: Wrapping(0),
        in_flight: (0..QUEUE_SIZE).map(|_| None).collect(),
    };

    // Phase 1: the device serves the original space.
    let first = run(&mut driver, &mut queue, &mem, None, REQUESTS)?;
    let stats = space.stats();
    println!(
        "phase 1: {} requests in {} rounds, {} served, {} checked, {} mismatches",
        first.posted, first.rounds, first.served, first.checked, first.bad
    );
    println!(
        "         {} MiB mapped, {} KiB populated lazily",
        stats.mapped_bytes / MIB,
        stats.populated_bytes / 1024
    );

    // Phase 2: the guest fills its first MiB of RAM, then the VM is cloned
    // (fork: every page copy-on-write) and keeps going in the clone, rings
    // and all, with buffers packed into that MiB. The driver's and the
    // device's writes copy pages; the parent must keep its bytes.
    let fill: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&fill, GuestAddress(RAM))?;
    driver.next_buf = RAM;
    driver.max_gap = 2048;
    let clone = space.fork(Arc::new(RecordingBackend::new()))?;
    let clone_mem = SpaceMemory::new(clone.clone());
    let second = run(&mut driver, &mut queue, &clone_mem, Some(&mem), REQUESTS)?;
    let cstats = clone.stats();
    println!(
        "phase 2 (forked clone): {} requests in {} rounds, {} served, {} checked, {} mismatches",
        second.posted, second.rounds, second.served, second.checked, second.bad
    );
    println!(
        "         {} copy-on-write copies ({} KiB), {} take-overs; parent compared after every response",
        cstats.cow_copies,
        cstats.cow_copied_bytes / 1024,
        cstats.cow_takeovers
    );
    println!(
        "memfile: {} KiB allocated",
        memfile.allocated_bytes() / 1024
    );

    let ok = [&first, &second]
        .iter()
        .all(|t| t.bad == 0 && t.checked == REQUESTS && t.served == REQUESTS)
        && cstats.cow_copies > 0;
    if !ok {
        eprintln!("device_copy: FAILED");
        std::process::exit(1);
    }
    println!("device_copy: all responses match");
    Ok(())
}
