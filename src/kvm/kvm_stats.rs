//! KVM's own counters: the binary statistics of a VM and its vCPUs
//! (`KVM_GET_STATS_FD`, Linux 5.14+).
//!
//! KVM keeps per-VM counters (`remote_tlb_flush`, `mmu_shadow_zapped`,
//! `pages_4k`…) and per-vCPU counters (`pf_taken`, `pf_fixed`, `exits`…).
//! They count what KVM did, so they do not depend on machine load: they are
//! the firm evidence behind the fault-path figures.
//!
//! The stats file of a VM or vCPU fd holds a header, an id string, one
//! descriptor per statistic (type, unit, size, offset into the data block,
//! name) and the data block of `u64`s (see the kernel's
//! `Documentation/virt/kvm/api.rst`, "KVM_GET_STATS_FD"). [`KvmStatsFd`]
//! opens one such file and reads it into a [`KvmStatSet`], every statistic
//! kept by name; [`KvmStatsReader`] reads a VM and all its vCPUs at once into
//! [`KvmStats`], the vCPU counters summed.
//!
//! Which statistics exist depends on the kernel and architecture: every
//! accessor returns `Option<u64>`, `None` when this kernel does not have the
//! counter. A kernel without binary statistics gives
//! [`KvmStatsError::Unsupported`].
//!
//! The per-vCPU sums need the vCPU fds: [`Vm::kvm_stats`] takes the vCPUs
//! (a [`Vm`] does not own its [`Vcpu`]s); a VMM whose vCPUs live on their own
//! threads opens a [`KvmStatsReader`] while it still holds them and reads it
//! whenever it likes (a stats fd stays readable after its vCPU fd is closed,
//! until the VM is destroyed).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_LINEAR_HIST,
    KVM_STATS_TYPE_LOG_HIST, KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK, KVM_STATS_UNIT_BOOLEAN,
    KVM_STATS_UNIT_BYTES, KVM_STATS_UNIT_CYCLES, KVM_STATS_UNIT_MASK, KVM_STATS_UNIT_NONE,
    KVM_STATS_UNIT_SECONDS,
};
use vmm_sys_util::ioctl::ioctl;

use super::{Vcpu, Vm};

/// `_IO(KVMIO, 0xce)`: no direction, no size (kvm-ioctls does not wrap it).
const KVM_GET_STATS_FD: libc::c_ulong = (0xAE << 8) | 0xce;

/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const DESC_SIZE: usize = 16;
/// Largest stats file we accept (real ones are a few KiB).
const MAX_FILE: usize = 1 << 20;

/// Why KVM's statistics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    /// This kernel has no binary statistics (`KVM_GET_STATS_FD` is older
    /// than Linux 5.14).
    #[error("KVM_GET_STATS_FD is not supported by this kernel: {0}")]
    Unsupported(std::io::Error),
    /// The ioctl or a read of the stats file failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What failed.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The stats file does not have the documented layout.
    #[error("malformed KVM stats: {0}")]
    Malformed(String),
}

/// How a statistic's value behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmStatKind {
    /// Only ever grows (a count of events).
    Cumulative,
    /// A current level (e.g. pages mapped now).
    Instant,
    /// The highest level seen.
    Peak,
    /// A histogram with equal-width buckets.
    LinearHistogram,
    /// A histogram with power-of-two buckets.
    LogHistogram,
    /// A type this crate does not know (the raw type bits).
    Other(u32),
}

/// The unit of a statistic (scaled by its exponent, see [`KvmStat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmStatUnit {
    /// A plain count.
    None,
    /// Bytes.
    Bytes,
    /// Seconds.
    Seconds,
    /// CPU cycles.
    Cycles,
    /// 0 or 1.
    Boolean,
    /// A unit this crate does not know (the raw unit bits).
    Other(u32),
}

/// One statistic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmStat {
    /// How the value behaves (which also decides how vCPU values add up).
    pub kind: KvmStatKind,
    /// Unit of the values.
    pub unit: KvmStatUnit,
    /// The values are in units of `base^exponent` (base 10 or 2, see
    /// api.rst); e.g. -9 for nanoseconds.
    pub exponent: i16,
    /// The values: one for a scalar, one per bucket for a histogram.
    pub values: Vec<u64>,
}

impl KvmStat {
    /// The value of a scalar statistic (a histogram's first bucket).
    pub fn value(&self) -> u64 {
        self.values.first().copied().unwrap_or(0)
    }

    /// Combines `other` (the same statistic of another vCPU) into `self`:
    /// peaks take the maximum, everything else adds up.
    fn absorb(&mut self, other: &KvmStat) {
        if self.values.len() < other.values.len() {
            self.values.resize(other.values.len(), 0);
        }
        for (a, b) in self.values.iter_mut().zip(&other.values) {
            *a = match self.kind {
                KvmStatKind::Peak => (*a).max(*b),
                _ => a.saturating_add(*b),
            };
        }
    }
}

/// The statistics of one VM or vCPU stats file, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmStatSet {
    /// The file's id string (e.g. `kvm-1234` or `kvm-1234/vcpu-0`).
    pub id: String,
    /// Every statistic, by name.
    pub stats: BTreeMap<String, KvmStat>,
}

fn u32_at(buf: &[u8], off: usize) -> Result<u32, KvmStatsError> {
    buf.get(off..off + 4)
        .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| {
            KvmStatsError::Malformed(format!("u32 at {off} past the end ({})", buf.len()))
        })
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The header fields that locate everything else.
#[derive(Debug, Clone, Copy)]
struct Header {
    name_size: usize,
    num_desc: usize,
    id_offset: usize,
    desc_offset: usize,
    data_offset: usize,
}

impl Header {
    fn parse(buf: &[u8]) -> Result<Header, KvmStatsError> {
        if buf.len() < HEADER_SIZE {
            return Err(KvmStatsError::Malformed(format!(
                "{} bytes, shorter than the header",
                buf.len()
            )));
        }
        let h = Header {
            name_size: u32_at(buf, 4)? as usize,
            num_desc: u32_at(buf, 8)? as usize,
            id_offset: u32_at(buf, 12)? as usize,
            desc_offset: u32_at(buf, 16)? as usize,
            data_offset: u32_at(buf, 20)? as usize,
        };
        if h.name_size == 0 || h.name_size > 4096 || h.num_desc > 65536 {
            return Err(KvmStatsError::Malformed(format!(
                "name_size {} num_desc {}",
                h.name_size, h.num_desc
            )));
        }
        Ok(h)
    }

    /// Where the descriptor block ends.
    fn desc_end(&self) -> usize {
        self.desc_offset + self.num_desc * (DESC_SIZE + self.name_size)
    }
}

impl KvmStatSet {
    /// Parses a whole stats file (header, id, descriptors and data, at the
    /// offsets the header gives).
    ///
    /// # Errors
    /// [`KvmStatsError::Malformed`] if an offset or size points outside
    /// `buf` or a statistic's data is misaligned.
    pub fn parse(buf: &[u8]) -> Result<KvmStatSet, KvmStatsError> {
        let h = Header::parse(buf)?;
        let bad = |what: String| KvmStatsError::Malformed(what);
        let id = buf
            .get(h.id_offset..h.id_offset + h.name_size)
            .map(c_string)
            .ok_or_else(|| bad(format!("id at {} past the end", h.id_offset)))?;
        let data = buf
            .get(h.data_offset..)
            .ok_or_else(|| bad(format!("data at {} past the end", h.data_offset)))?;
        let mut stats = BTreeMap::new();
        for i in 0..h.num_desc {
            let d = h.desc_offset + i * (DESC_SIZE + h.name_size);
            let desc = buf
                .get(d..d + DESC_SIZE + h.name_size)
                .ok_or_else(|| bad(format!("descriptor {i} at {d} past the end")))?;
            let flags = u32_at(desc, 0)?;
            let exponent = i16::from_ne_bytes([desc[4], desc[5]]);
            let size = u16::from_ne_bytes([desc[6], desc[7]]) as usize;
            let offset = u32_at(desc, 8)? as usize;
            let name = c_string(&desc[DESC_SIZE..]);
            if offset % 8 != 0 {
                return Err(bad(format!("{name}: data offset {offset} not 8-aligned")));
            }
            let bytes = data
                .get(offset..offset + size * 8)
                .ok_or_else(|| bad(format!("{name}: {size} values at {offset} past the end")))?;
            let values = bytes
                .chunks_exact(8)
                .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
                .collect();
            let kind = match flags & KVM_STATS_TYPE_MASK {
                KVM_STATS_TYPE_CUMULATIVE => KvmStatKind::Cumulative,
                KVM_STATS_TYPE_INSTANT => KvmStatKind::Instant,
                KVM_STATS_TYPE_PEAK => KvmStatKind::Peak,
                KVM_STATS_TYPE_LINEAR_HIST => KvmStatKind::LinearHistogram,
                KVM_STATS_TYPE_LOG_HIST => KvmStatKind::LogHistogram,
                t => KvmStatKind::Other(t),
            };
            let unit = match flags & KVM_STATS_UNIT_MASK {
                KVM_STATS_UNIT_NONE => KvmStatUnit::None,
                KVM_STATS_UNIT_BYTES => KvmStatUnit::Bytes,
                KVM_STATS_UNIT_SECONDS => KvmStatUnit::Seconds,
                KVM_STATS_UNIT_CYCLES => KvmStatUnit::Cycles,
                KVM_STATS_UNIT_BOOLEAN => KvmStatUnit::Boolean,
                u => KvmStatUnit::Other(u),
            };
            stats.insert(
                name,
                KvmStat {
                    kind,
                    unit,
                    exponent,
                    values,
                },
            );
        }
        Ok(KvmStatSet { id, stats })
    }

    /// The value of the statistic `name` (a histogram's first bucket), if
    /// this kernel has it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.stats.get(name).map(KvmStat::value)
    }

    /// Adds `other`'s statistics into `self` (cumulative, instant and
    /// histogram values add up, peaks take the maximum; names only `other`
    /// has are copied).
    pub fn absorb(&mut self, other: &KvmStatSet) {
        for (name, s) in &other.stats {
            match self.stats.get_mut(name) {
                Some(mine) => mine.absorb(s),
                None => {
                    self.stats.insert(name.clone(), s.clone());
                }
            }
        }
    }

    /// The scalar statistics as `name=value` pairs, space separated, in name
    /// order (histograms left out).
    pub fn scalars_line(&self) -> String {
        self.scalars()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The scalar statistics (histograms left out), in name order.
    pub fn scalars(&self) -> impl Iterator<Item = (&str, u64)> {
        self.stats
            .iter()
            .filter(|(_, s)| s.values.len() == 1)
            .map(|(n, s)| (n.as_str(), s.value()))
    }
}

/// An open stats file of one VM or vCPU fd.
#[derive(Debug)]
pub struct KvmStatsFd {
    file: File,
}

impl KvmStatsFd {
    /// Opens the stats file of a KVM VM or vCPU fd (`KVM_GET_STATS_FD`).
    ///
    /// # Errors
    /// [`KvmStatsError::Unsupported`] when the kernel does not know the
    /// ioctl, [`KvmStatsError::Io`] when it fails otherwise.
    pub fn open(fd: &impl AsRawFd) -> Result<KvmStatsFd, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd
        // (or -1); it does not touch our memory.
        let ret = unsafe { ioctl(fd, KVM_GET_STATS_FD) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) => KvmStatsError::Unsupported(e),
                _ => KvmStatsError::Io {
                    op: "KVM_GET_STATS_FD",
                    source: e,
                },
            });
        }
        // SAFETY: `ret` is a new fd the kernel just gave us; nothing else
        // owns it.
        let file = unsafe { File::from_raw_fd(ret) };
        Ok(KvmStatsFd { file })
    }

    fn read_at(&self, buf: &mut [u8], off: usize) -> Result<(), KvmStatsError> {
        self.file
            .read_exact_at(buf, off as u64)
            .map_err(|source| KvmStatsError::Io {
                op: "read of the KVM stats fd",
                source,
            })
    }

    /// Reads every statistic now.
    ///
    /// # Errors
    /// [`KvmStatsError::Io`] if a read fails, [`KvmStatsError::Malformed`]
    /// if the file does not have the documented layout.
    pub fn read(&self) -> Result<KvmStatSet, KvmStatsError> {
        let mut head = [0u8; HEADER_SIZE];
        self.read_at(&mut head, 0)?;
        let h = Header::parse(&head)?;
        // The descriptors say how long the data block is.
        let desc_end = h.desc_end();
        if desc_end > MAX_FILE {
            return Err(KvmStatsError::Malformed(format!(
                "descriptors end at {desc_end}"
            )));
        }
        let mut buf = vec![0u8; desc_end.max(h.id_offset + h.name_size)];
        self.read_at(&mut buf, 0)?;
        let mut data_len = 0;
        for i in 0..h.num_desc {
            let d = h.desc_offset + i * (DESC_SIZE + h.name_size);
            let size = u16::from_ne_bytes([buf[d + 6], buf[d + 7]]) as usize;
            let offset = u32_at(&buf, d + 8)? as usize;
            data_len = data_len.max(offset + size * 8);
        }
        let total = buf.len().max(h.data_offset + data_len);
        if total > MAX_FILE {
            return Err(KvmStatsError::Malformed(format!("data ends at {total}")));
        }
        buf.resize(total, 0);
        // Re-read the data block only: header and descriptors do not change.
        let data_start = h.data_offset.min(total);
        self.read_at(&mut buf[data_start..], data_start)?;
        KvmStatSet::parse(&buf)
    }
}

/// KVM's statistics of a VM and its vCPUs.
///
/// Per-vCPU counters are summed over the vCPUs read (peaks: the maximum).
/// The accessors name the common x86 counters; [`KvmStats::get`] reaches
/// any other by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmStats {
    /// The VM's own statistics (`remote_tlb_flush`, `mmu_shadow_zapped`,
    /// `pages_4k`…).
    pub vm: KvmStatSet,
    /// The vCPUs' statistics summed (`pf_taken`, `exits`…).
    pub vcpus: KvmStatSet,
    /// How many vCPUs were summed.
    pub vcpu_count: u32,
}

macro_rules! vcpu_counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        $(
            #[doc = $doc]
            #[doc = ""]
            #[doc = "Summed over the vCPUs; `None` if this kernel does not count it."]
            pub fn $name(&self) -> Option<u64> {
                self.vcpus.get(stringify!($name))
            }
        )*
    };
}

macro_rules! vm_counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        $(
            #[doc = $doc]
            #[doc = ""]
            #[doc = "A VM-wide statistic; `None` if this kernel does not have it."]
            pub fn $name(&self) -> Option<u64> {
                self.vm.get(stringify!($name))
            }
        )*
    };
}

impl KvmStats {
    /// A statistic by name: the vCPUs' sum if the vCPUs have it, else the
    /// VM's.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.vcpus.get(name).or_else(|| self.vm.get(name))
    }

    vcpu_counters! {
        pf_taken: "Page faults KVM's MMU handled (`kvm_mmu_page_fault` calls that reached the fault handler).",
        pf_fixed: "Page faults that installed a new mapping in KVM's page tables.",
        pf_emulate: "Page faults resolved by emulating the instruction (MMIO, write-protected page tables).",
        pf_spurious: "Page faults that found the mapping already fixed.",
        pf_fast: "Page faults fixed on the lockless fast path.",
        pf_guest: "Page faults reflected into the guest (shadow paging).",
        pf_mmio_spte_created: "MMIO SPTEs created (accesses outside every memslot).",
        exits: "VM exits.",
        io_exits: "Port I/O exits.",
        mmio_exits: "MMIO exits.",
        tlb_flush: "TLB flushes requested by this vCPU.",
        invlpg: "INVLPG instructions intercepted.",
    }

    vm_counters! {
        remote_tlb_flush: "TLB flushes of every vCPU (e.g. after zapping mappings).",
        remote_tlb_flush_requests: "Requests for such flushes.",
        mmu_shadow_zapped: "KVM page-table (shadow) pages zapped.",
        mmu_pte_write: "Guest writes to shadowed page tables.",
        mmu_pde_zapped: "Large-page directory entries zapped.",
        mmu_flooded: "Shadow pages unsynced because of write flooding.",
        mmu_recycled: "Shadow pages recycled under memory pressure.",
        mmu_cache_miss: "Shadow page lookups that missed the cache.",
        mmu_unsync: "Shadow pages currently unsynced.",
        pages_4k: "4 KiB mappings in KVM's page tables now.",
        pages_2m: "2 MiB mappings in KVM's page tables now.",
        pages_1g: "1 GiB mappings in KVM's page tables now.",
        nx_lpage_splits: "Huge pages split because of the NX huge page mitigation.",
    }

    /// Every scalar statistic of the VM and the vCPUs, each once, in name
    /// order (vCPU values summed).
    pub fn scalars(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self.vm.scalars().chain(self.vcpus.scalars()).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

/// The stats files of a VM and its vCPUs, opened once and read as often as
/// wanted.
#[derive(Debug)]
pub struct KvmStatsReader {
    vm: KvmStatsFd,
    vcpus: Vec<KvmStatsFd>,
}

impl KvmStatsReader {
    /// Opens the stats files of a VM fd and of each of its vCPU fds
    /// (`kvm_ioctls::VmFd`/`VcpuFd`, or any fd of the same kind).
    ///
    /// # Errors
    /// As [`KvmStatsFd::open`].
    pub fn open<V: AsRawFd, C: AsRawFd>(vm: &V, vcpus: &[&C]) -> Result<Self, KvmStatsError> {
        Ok(KvmStatsReader {
            vm: KvmStatsFd::open(vm)?,
            vcpus: vcpus
                .iter()
                .map(|c| KvmStatsFd::open(*c))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Reads the VM's statistics and the sum of the vCPUs'.
    ///
    /// # Errors
    /// As [`KvmStatsFd::read`].
    pub fn read(&self) -> Result<KvmStats, KvmStatsError> {
        let vm = self.vm.read()?;
        let mut vcpus = KvmStatSet::default();
        for (i, fd) in self.vcpus.iter().enumerate() {
            let s = fd.read()?;
            if i == 0 {
                vcpus = s;
            } else {
                vcpus.absorb(&s);
            }
        }
        Ok(KvmStats {
            vm,
            vcpus,
            vcpu_count: self.vcpus.len() as u32,
        })
    }
}

impl Vm {
    /// KVM's statistics of this VM and of `vcpus` (its vCPUs, summed).
    ///
    /// A [`Vm`] does not own its vCPUs, so the caller passes those it wants
    /// counted; to read after the vCPUs are gone, open a [`KvmStatsReader`]
    /// while they exist.
    ///
    /// # Errors
    /// [`KvmStatsError::Unsupported`] on kernels without binary statistics;
    /// otherwise as [`KvmStatsFd::read`].
    pub fn kvm_stats(&self, vcpus: &[&Vcpu]) -> Result<KvmStats, KvmStatsError> {
        let fds: Vec<_> = vcpus.iter().map(|v| v.fd()).collect();
        KvmStatsReader::open(self.vm_fd(), &fds)?.read()
    }
}

impl Vcpu {
    /// KVM's statistics of this vCPU.
    ///
    /// # Errors
    /// [`KvmStatsError::Unsupported`] on kernels without binary statistics;
    /// otherwise as [`KvmStatsFd::read`].
    pub fn kvm_stats(&self) -> Result<KvmStatSet, KvmStatsError> {
        KvmStatsFd::open(self.fd())?.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats file as the kernel lays it out: header, id, descriptors,
    /// data.
    fn file(descs: &[(&str, u32, i16, &[u64])]) -> Vec<u8> {
        let name_size = 48usize;
        let id_offset = HEADER_SIZE;
        let desc_offset = id_offset + name_size;
        let data_offset = desc_offset + descs.len() * (DESC_SIZE + name_size);
        let mut buf = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            descs.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        let mut id = b"kvm-42/vcpu-0".to_vec();
        id.resize(name_size, 0);
        buf.extend_from_slice(&id);
        let mut data = Vec::new();
        for (name, flags, exp, values) in descs {
            buf.extend_from_slice(&flags.to_ne_bytes());
            buf.extend_from_slice(&exp.to_ne_bytes());
            buf.extend_from_slice(&(values.len() as u16).to_ne_bytes());
            buf.extend_from_slice(&((data.len() * 8) as u32).to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            buf.extend_from_slice(&n);
            data.extend_from_slice(values);
        }
        for v in data {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        buf
    }

    #[test]
    fn parses_a_hand_built_file() {
        let buf = file(&[
            ("pf_taken", KVM_STATS_TYPE_CUMULATIVE, 0, &[65537]),
            ("pages_4k", KVM_STATS_TYPE_INSTANT, 0, &[12]),
            ("max_rmap", KVM_STATS_TYPE_PEAK, 0, &[7]),
            (
                "halt_wait_hist",
                KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_SECONDS,
                -9,
                &[1, 2, 3],
            ),
        ]);
        let s = KvmStatSet::parse(&buf).expect("parse");
        assert_eq!(s.id, "kvm-42/vcpu-0");
        assert_eq!(s.get("pf_taken"), Some(65537));
        assert_eq!(s.get("pages_4k"), Some(12));
        assert_eq!(s.get("nope"), None);
        let h = &s.stats["halt_wait_hist"];
        assert_eq!(h.kind, KvmStatKind::LogHistogram);
        assert_eq!(h.unit, KvmStatUnit::Seconds);
        assert_eq!(h.exponent, -9);
        assert_eq!(h.values, vec![1, 2, 3]);
        assert_eq!(s.stats["max_rmap"].kind, KvmStatKind::Peak);
        assert_eq!(s.scalars_line(), "max_rmap=7 pages_4k=12 pf_taken=65537");

        let mut sum = s.clone();
        sum.absorb(&s);
        assert_eq!(sum.get("pf_taken"), Some(2 * 65537));
        assert_eq!(sum.get("pages_4k"), Some(24));
        assert_eq!(sum.get("max_rmap"), Some(7), "peaks take the maximum");
        assert_eq!(sum.stats["halt_wait_hist"].values, vec![2, 4, 6]);

        let stats = KvmStats {
            vm: KvmStatSet::default(),
            vcpus: sum,
            vcpu_count: 2,
        };
        assert_eq!(stats.pf_taken(), Some(2 * 65537));
        assert_eq!(stats.remote_tlb_flush(), None);
    }

    #[test]
    fn refuses_truncated_and_out_of_range_files() {
        let buf = file(&[("pf_taken", KVM_STATS_TYPE_CUMULATIVE, 0, &[1])]);
        for cut in [0, 10, HEADER_SIZE + 4, buf.len() - 4] {
            assert!(
                matches!(
                    KvmStatSet::parse(&buf[..cut]),
                    Err(KvmStatsError::Malformed(_))
                ),
                "cut at {cut}"
            );
        }
        let mut bad = buf.clone();
        // The descriptor's data offset (header 24 + id 48 + 8) past the data.
        bad[80..84].copy_from_slice(&64u32.to_ne_bytes());
        assert!(matches!(
            KvmStatSet::parse(&bad),
            Err(KvmStatsError::Malformed(_))
        ));
        let mut bad = buf;
        bad[4..8].copy_from_slice(&0u32.to_ne_bytes());
        assert!(matches!(
            KvmStatSet::parse(&bad),
            Err(KvmStatsError::Malformed(_))
        ));
    }
}
