//! The test guests' hypercall ABI: port I/O.
//!
//! Guests run at CPL3 with IOPL = 3 and a TSS I/O bitmap that allows every
//! port, so `out` to a port is allowed and exits to the VMM as `KVM_EXIT_IO`
//! (on VMX because of IOPL; under PVM, where hardware IOPL stays 0, because
//! KVM's emulator finds the port allowed in the bitmap). Guests use the immediate-port form
//! (`out 0x10, al`) so that `rdx` stays free for arguments.
//!
//! | port | name | guest does | meaning |
//! |---|---|---|---|
//! | 0x10 | CONSOLE | `out 0x10, al` | print one byte |
//! | 0x11 | EXIT | `out 0x11, eax` | stop; 0 = pass, else the number of the failed check |
//! | 0x12 | MARK | `out 0x12, eax` | phase `eax` begins/ends (for timing) |
//! | 0x13 | PROTECT | `out 0x13, al` | set protection of `[rdi, rdi + rsi)` to `rdx` (1 = read, 2 = write, 4 = exec) |
//! | 0x14 | MAP_TEMPLATE | `out 0x14, al` | map the VMM's template file privately at `[rdi, rdi + rsi)` |
//! | 0x15 | SET_CR3 | `out 0x15, al` | load CR3 with `rdi` (a CPL3 guest cannot) |
//!
//! For PROTECT, MAP_TEMPLATE and SET_CR3 the data byte is ignored and the
//! arguments come from the registers, so the VMM reads them with
//! `KVM_GET_REGS` ([`needs_regs`] says when that is necessary).

use crate::Perms;
use kvm_bindings::kvm_regs;

/// Port: print one byte (`out 0x10, al`).
pub const PORT_CONSOLE: u16 = 0x10;
/// Port: exit with a code (`out 0x11, eax`).
pub const PORT_EXIT: u16 = 0x11;
/// Port: phase marker (`out 0x12, eax`).
pub const PORT_MARK: u16 = 0x12;
/// Port: change protection (`rdi` = gpa, `rsi` = len, `rdx` = perms bits).
pub const PORT_PROTECT: u16 = 0x13;
/// Port: map the template file (`rdi` = gpa, `rsi` = len).
pub const PORT_MAP_TEMPLATE: u16 = 0x14;
/// Port: set this vCPU's CR3 (`rdi` = new CR3).
pub const PORT_SET_CR3: u16 = 0x15;

/// Permission bit: read.
pub const PERM_READ: u64 = 1;
/// Permission bit: write.
pub const PERM_WRITE: u64 = 2;
/// Permission bit: execute.
pub const PERM_EXEC: u64 = 4;

/// A decoded hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercall {
    /// Print one byte.
    Console(u8),
    /// The guest stops with this code (0 = every check passed).
    Exit(u32),
    /// The guest reached phase marker `n`.
    Mark(u32),
    /// Change the protection of `[gpa, gpa + len)`.
    Protect {
        /// Start GPA.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// The new permissions.
        perms: Perms,
    },
    /// Map the VMM's template file privately at `[gpa, gpa + len)`.
    MapTemplate {
        /// Start GPA.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Load this vCPU's CR3.
    SetCr3 {
        /// The new CR3 value (the PML4's GPA).
        cr3: u64,
    },
}

/// A port write that is not a valid hypercall.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypercallError {
    /// Nothing listens on this port.
    #[error("out to unknown port {port:#x}")]
    UnknownPort {
        /// The port.
        port: u16,
    },
    /// The access width is wrong for the port.
    #[error("out to port {port:#x} with {got} bytes, want {want}")]
    BadWidth {
        /// The port.
        port: u16,
        /// Bytes written.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// PROTECT with bits other than read/write/exec.
    #[error("PROTECT with permission bits {bits:#x}: only 0x1 | 0x2 | 0x4 are defined")]
    BadPerms {
        /// The `rdx` value.
        bits: u64,
    },
}

/// True if decoding a write to `port` needs the vCPU's registers; callers
/// may pass default registers otherwise and save a `KVM_GET_REGS`.
pub fn needs_regs(port: u16) -> bool {
    matches!(port, PORT_PROTECT | PORT_MAP_TEMPLATE | PORT_SET_CR3)
}

/// Decodes an `out` of `data` to `port`; `regs` are the vCPU's registers at
/// the exit (only read for the ports where [`needs_regs`] is true).
pub fn decode(port: u16, data: &[u8], regs: &kvm_regs) -> Result<Hypercall, HypercallError> {
    let width = |want: usize| {
        if data.len() == want {
            Ok(())
        } else {
            Err(HypercallError::BadWidth {
                port,
                got: data.len(),
                want,
            })
        }
    };
    let dword = || u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    match port {
        PORT_CONSOLE => {
            width(1)?;
            Ok(Hypercall::Console(data[0]))
        }
        PORT_EXIT => {
            width(4)?;
            Ok(Hypercall::Exit(dword()))
        }
        PORT_MARK => {
            width(4)?;
            Ok(Hypercall::Mark(dword()))
        }
        PORT_PROTECT => {
            let bits = regs.rdx;
            if bits & !(PERM_READ | PERM_WRITE | PERM_EXEC) != 0 {
                return Err(HypercallError::BadPerms { bits });
            }
            Ok(Hypercall::Protect {
                gpa: regs.rdi,
                len: regs.rsi,
                perms: Perms::new(
                    bits & PERM_READ != 0,
                    bits & PERM_WRITE != 0,
                    bits & PERM_EXEC != 0,
                ),
            })
        }
        PORT_MAP_TEMPLATE => Ok(Hypercall::MapTemplate {
            gpa: regs.rdi,
            len: regs.rsi,
        }),
        PORT_SET_CR3 => Ok(Hypercall::SetCr3 { cr3: regs.rdi }),
        _ => Err(HypercallError::UnknownPort { port }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_port() {
        let regs = kvm_regs {
            rdi: 0x4000_0000,
            rsi: 0x1000,
            rdx: PERM_READ,
            ..Default::default()
        };
        let cases: &[(u16, &[u8], Result<Hypercall, HypercallError>)] = &[
            (PORT_CONSOLE, b"h", Ok(Hypercall::Console(b'h'))),
            (PORT_EXIT, &7u32.to_le_bytes(), Ok(Hypercall::Exit(7))),
            (PORT_MARK, &3u32.to_le_bytes(), Ok(Hypercall::Mark(3))),
            (
                PORT_PROTECT,
                &[0],
                Ok(Hypercall::Protect {
                    gpa: 0x4000_0000,
                    len: 0x1000,
                    perms: Perms::READ,
                }),
            ),
            (
                PORT_MAP_TEMPLATE,
                &[0],
                Ok(Hypercall::MapTemplate {
                    gpa: 0x4000_0000,
                    len: 0x1000,
                }),
            ),
            (
                PORT_SET_CR3,
                &[0],
                Ok(Hypercall::SetCr3 { cr3: 0x4000_0000 }),
            ),
            (
                PORT_EXIT,
                &[1],
                Err(HypercallError::BadWidth {
                    port: PORT_EXIT,
                    got: 1,
                    want: 4,
                }),
            ),
            (0x99, &[0], Err(HypercallError::UnknownPort { port: 0x99 })),
        ];
        for (port, data, want) in cases {
            assert_eq!(&decode(*port, data, &regs), want, "port {port:#x}");
        }
        let bad = kvm_regs {
            rdx: 8,
            ..Default::default()
        };
        assert_eq!(
            decode(PORT_PROTECT, &[0], &bad),
            Err(HypercallError::BadPerms { bits: 8 })
        );
    }
}
