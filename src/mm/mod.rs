//! The memory manager: address spaces, vmas, pmas, faults.

pub mod protect;
