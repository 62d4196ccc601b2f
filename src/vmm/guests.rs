//! The test guests (`guest/*.S`), assembled by `build.rs` and embedded here.
//!
//! Each guest checks its own results and stops with the EXIT hypercall: 0 when
//! every check held, otherwise the number of the failed check (documented at
//! the top of its source file). Entry registers and hypercalls: see
//! [`super::boot`] and [`super::hypercall`].

use crate::kvm::CowMode;

/// One test guest and what running it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guest {
    /// Name (the source is `guest/<name>.S`).
    pub name: &'static str,
    /// Flat image, loaded at [`super::boot::CODE_GPA`] and entered at its first byte.
    pub image: &'static [u8],
    /// vCPUs to run it with.
    pub vcpus: u32,
    /// Smallest RAM size it works with (it exits with code 1 below that).
    pub min_ram: u64,
    /// Bytes of template file the VMM maps privately before start and passes
    /// in `r8`/`r9` (filled with [`cow_pattern`]), 0 for none.
    pub template_size: u64,
    /// Memory violations the VMM must report for a pass.
    pub expected_violations: u32,
    /// Every vCPU must end stopped by a violation (an instruction that can
    /// never complete) instead of the EXIT hypercall.
    pub ends_in_violation: bool,
    /// Console output of a passing run.
    pub expected_console: &'static str,
    /// Exit code meaning "this host cannot run the test" (e.g. no AVX), if any.
    pub unsupported_exit: Option<u32>,
    /// The copy-on-write mode the guest needs, `None` for the run's
    /// ([`RunOptions::cow`](super::runner::RunOptions::cow)).
    pub cow: Option<CowMode>,
    /// One line on what it exercises.
    pub description: &'static str,
}

const MIB: u64 = 1 << 20;

macro_rules! image {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bin"))
    };
}

const fn guest(name: &'static str, image: &'static [u8], description: &'static str) -> Guest {
    Guest {
        name,
        image,
        vcpus: 1,
        min_ram: 2 * MIB,
        template_size: 0,
        expected_violations: 0,
        ends_in_violation: false,
        expected_console: "",
        unsupported_exit: None,
        cow: None,
        description,
    }
}

/// Every test guest.
pub const GUESTS: &[Guest] = &[
    Guest {
        expected_console: "hello from guestmm\n",
        ..guest("hello", image!("hello"), "prints a line and exits 0")
    },
    guest(
        "touch",
        image!("touch"),
        "writes every RAM page in order and in LCG order, verifies; MARK 1-4",
    ),
    guest(
        "scatter",
        image!("scatter"),
        "writes every RAM page in LCG order first (no two windows adjacent), verifies",
    ),
    guest(
        "sparse",
        image!("sparse"),
        "writes one page per 2 MiB of RAM, leaves the rest untouched, verifies; MARK 1-3",
    ),
    Guest {
        template_size: MIB,
        ..guest(
            "cow",
            image!("cow"),
            "verifies a private template mapping, writes half of it, verifies both halves",
        )
    },
    Guest {
        expected_violations: 2,
        ..guest(
            "protect",
            image!("protect"),
            "a write to a read-only page is dropped and a read of the hole gives zeros",
        )
    },
    Guest {
        min_ram: 16 * MIB,
        ..guest(
            "exec",
            image!("exec"),
            "runs code copied to a fresh RAM page on a stack in a fresh RAM page",
        )
    },
    Guest {
        vcpus: 4,
        min_ram: 18 * MIB,
        ..guest(
            "smp",
            image!("smp"),
            "4 vCPUs fill private slices and hammer shared counters with locked RMWs",
        )
    },
    Guest {
        min_ram: 72 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "simd",
            image!("simd"),
            "SSE and AVX loads/stores to fresh pages, one straddling two pages",
        )
    },
    Guest {
        min_ram: 32 * MIB,
        ..guest(
            "lazypt",
            image!("lazypt"),
            "builds page tables in fresh RAM, SET_CR3, accesses through the new mapping",
        )
    },
    Guest {
        vcpus: 2,
        min_ram: 16 * MIB,
        expected_violations: 2,
        ends_in_violation: true,
        unsupported_exit: Some(100),
        ..guest(
            "badstore",
            image!("badstore"),
            "AVX stores to a VA its page tables lack and to the hole: violations, not hangs",
        )
    },
    Guest {
        min_ram: 32 * MIB,
        ..guest(
            "sgdt",
            image!("sgdt"),
            "sgdt/sidt at CPL3 into fresh pages (KVM loops without an exit: the watchdog)",
        )
    },
    Guest {
        min_ram: 72 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_memset",
            image!("adv_memset"),
            "adversarial: glibc-style AVX memset over 64 MiB of fresh RAM, forwards and backwards",
        )
    },
    Guest {
        min_ram: 72 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_avx512",
            image!("adv_avx512"),
            "adversarial: AVX-512 zmm stores, {k} stores past the end of RAM, scatter/gather",
        )
    },
    Guest {
        min_ram: 64 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_straddle",
            image!("adv_straddle"),
            "adversarial: AVX, SSE and scalar loads/stores/RMWs straddling two fresh windows",
        )
    },
    Guest {
        min_ram: 16 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_masked",
            image!("adv_masked"),
            "adversarial: vmaskmov/vpmaskmov with the masked-off part past the end of RAM",
        )
    },
    Guest {
        min_ram: 40 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_gather",
            image!("adv_gather"),
            "adversarial: AVX2 gathers from fresh and slot-less pages in eight windows",
        )
    },
    Guest {
        min_ram: 24 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_xsave",
            image!("adv_xsave"),
            "adversarial: xsave/xsavec/xsaveopt/xrstor to and from fresh and slot-less pages",
        )
    },
    Guest {
        min_ram: 64 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_locked",
            image!("adv_locked"),
            "adversarial: lock cmpxchg16b/xadd/cmpxchg/inc/or/btc and xchg on fresh and slot-less pages",
        )
    },
    Guest {
        min_ram: 64 * MIB,
        template_size: 256 * 1024,
        unsupported_exit: Some(100),
        ..guest(
            "adv_bitscan",
            image!("adv_bitscan"),
            "adversarial: exact lzcnt/tzcnt/popcnt/bsf/bsr of fresh, template and slot-less pages",
        )
    },
    Guest {
        min_ram: 48 * MIB,
        ..guest(
            "adv_strings",
            image!("adv_strings"),
            "adversarial: rep movsb/stosq/stosb/cmpsb/scasb/lodsq across fresh windows, DF=0 and 1",
        )
    },
    Guest {
        min_ram: 40 * MIB,
        ..guest(
            "adv_stack",
            image!("adv_stack"),
            "adversarial: push/pop/call/enter/leave with RSP in fresh RAM, aligned and straddling",
        )
    },
    Guest {
        min_ram: 16 * MIB,
        ..guest(
            "adv_smc",
            image!("adv_smc"),
            "adversarial: self-modifying code in fresh and slot-less RAM pages",
        )
    },
    Guest {
        vcpus: 4,
        min_ram: 56 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_smpavx",
            image!("adv_smpavx"),
            "adversarial: 4 vCPUs race AVX stores and lock xadd into the same fresh pages",
        )
    },
    Guest {
        vcpus: 2,
        min_ram: 32 * MIB,
        ..guest(
            "adv_smppt",
            image!("adv_smppt"),
            "adversarial: page tables and code in RAM while another vCPU merges/splits slots next to them",
        )
    },
    Guest {
        vcpus: 2,
        min_ram: 16 * MIB,
        template_size: 64 * 1024,
        ..guest(
            "adv_cowsmp",
            image!("adv_cowsmp"),
            "adversarial: vCPUs lock inc on private COW template pages; prints the lost updates",
        )
    },
    Guest {
        vcpus: 4,
        min_ram: 16 * MIB,
        template_size: 64 * 1024,
        unsupported_exit: Some(100),
        cow: Some(CowMode::Auto),
        expected_console: "lost 0\n",
        ..guest(
            "cowsmp",
            image!("cowsmp"),
            "4 vCPUs: lock xadd, lock cmpxchg, xchg spinlock on fresh COW template pages; exact sums (uffd-wp mode)",
        )
    },
    Guest {
        vcpus: 2,
        min_ram: 40 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_decommit",
            image!("adv_decommit"),
            "adversarial: vCPUs stream AVX stores over RAM the host decommits (with RunOptions::decommit_every)",
        )
    },
    Guest {
        min_ram: 8 * MIB,
        unsupported_exit: Some(100),
        ..guest(
            "adv_xsavewide",
            image!("adv_xsavewide"),
            "adversarial: xsave/xrstor areas whose AVX state lies in the next fresh window",
        )
    },
    Guest {
        min_ram: 4 * MIB,
        ..guest(
            "lifecycle",
            image!("lifecycle"),
            "builds state (pattern over half of RAM, registers, a counter), MARK 10 = snapshot/clone point, then verifies it and reads/writes the working set",
        )
    },
];

/// The guest called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

/// The `cow` guest's template pattern: the u64 at byte offset `offset`
/// (8-aligned) is `(offset * 0x9E3779B97F4A7C15) ^ 0xC0FFEE`, wrapping.
pub fn cow_pattern(offset: u64) -> u64 {
    offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0_FFEE
}

/// Fills `buf` (the template file's bytes from offset 0) with [`cow_pattern`];
/// a trailing partial u64 is filled with the low bytes of its value.
pub fn fill_cow_template(buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let v = cow_pattern(i as u64 * 8).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::boot::CODE_MAX_SIZE;

    #[test]
    fn every_guest_is_built_and_fits() {
        let names: Vec<_> = GUESTS.iter().map(|g| g.name).collect();
        for want in [
            "hello", "touch", "cow", "protect", "exec", "smp", "simd", "lazypt", "badstore",
        ] {
            assert!(names.contains(&want), "guest {want} missing from {names:?}");
        }
        for g in GUESTS {
            assert!(!g.image.is_empty(), "{}: empty image", g.name);
            assert!(
                g.image.len() as u64 <= CODE_MAX_SIZE,
                "{}: image too large",
                g.name
            );
        }
        assert_eq!(find("smp").map(|g| g.vcpus), Some(4));
        assert!(find("nope").is_none());
    }

    #[test]
    fn cow_pattern_matches_the_guest_formula() {
        assert_eq!(cow_pattern(0), 0xC0FFEE);
        assert_eq!(
            cow_pattern(8),
            0x9E37_79B9_7F4A_7C15u64.wrapping_mul(8) ^ 0xC0FFEE
        );
        let mut buf = [0u8; 20];
        fill_cow_template(&mut buf);
        assert_eq!(
            u64::from_le_bytes(buf[8..16].try_into().unwrap()),
            cow_pattern(8)
        );
        assert_eq!(buf[16..20], cow_pattern(16).to_le_bytes()[..4]);
    }
}
