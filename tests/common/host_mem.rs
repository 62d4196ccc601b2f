//! Plain anonymous host memory registered as an eager memslot: the
//! baseline without guestmm, shared by `tests/kvm_boot.rs` and the
//! benchmarks' eager-anon VM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Anonymous host memory, unmapped on drop.
///
/// Invariant: `ptr..ptr + len` is a private anonymous mapping owned by this
/// value. Its owner must drop the VM (and vCPUs) that use it first.
pub struct HostMem {
    ptr: *mut u8,
    len: usize,
}

#[allow(dead_code)]
impl HostMem {
    /// Maps `len` bytes (`MAP_NORESERVE`: untouched pages cost nothing).
    pub fn new(len: u64) -> HostMem {
        let len = usize::try_from(len).expect("fits the host");
        // SAFETY: a fresh anonymous private mapping with no address hint;
        // no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of {len} bytes failed");
        HostMem {
            ptr: ptr.cast(),
            len,
        }
    }

    /// The whole mapping.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is our live mapping and `&mut self` makes this
        // the only host reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Copies `bytes` to `offset`.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) {
        let off = usize::try_from(offset).expect("fits");
        self.bytes()[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// Registers this memory as memslot `slot` at `gpa`.
    pub fn register(&self, vm: &VmFd, slot: u32, gpa: u64) {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: self.len as u64,
            userspace_addr: self.ptr as u64,
        };
        // SAFETY: the mapping outlives the slot: owners drop their vCPUs and
        // VM fd before this memory (type invariant).
        unsafe { vm.set_user_memory_region(region) }.expect("set_user_memory_region");
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new` (invariant).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
