//! tinyvmm's machinery: boot setup for the test guests, the hypercall ABI,
//! the guest images and the runner, public so tinyvmm, tests and benches
//! drive guests the same way.
//!
//! - [`boot`]: the guest-physical layout, the boot region's bytes (GDT, TSS,
//!   identity page tables, the image) and vCPU setup for 64-bit mode at CPL3.
//! - [`hypercall`]: the port-I/O ABI guests use to talk to the VMM.
//! - [`guests`]: the embedded guest images and what each needs to run.
//! - [`runner`]: boots one guest on a guestmm VM, runs it, checks and reports.
//! - [`linux`]: boots an unmodified Linux kernel (linux-loader, a 16550
//!   console from vm-superio, KVM's irqchip) on lazy guestmm memory.
//!
//! `boot`, `hypercall` and `guests` do not depend on how guest memory is
//! managed (the caller writes [`boot::BootLayout::boot_image`] into guest
//! memory itself); `runner` puts them on a [`crate::kvm::Vm`].

pub mod boot;
pub mod guests;
pub mod hypercall;
pub mod lifecycle;
pub mod linux;
pub mod runner;

pub use boot::{BootError, BootLayout, EntryArgs};
pub use guests::{Guest, GUESTS};
pub use hypercall::{Hypercall, HypercallError};
