//! The guest's side of the agent mailbox (`agent_proto::mailbox`): the VMM's
//! shared-memory rings, mapped through `/dev/mem`.
//!
//! The mailbox is not RAM to the kernel (absent from e820 and ACPI), so
//! `/dev/mem` maps it even with `STRICT_DEVMEM`, write-back cached like
//! the VMM's own mapping. It is used only when both rings carry the VMM's
//! magic: a VMM without a mailbox leaves the agent on plain UART bytes.

use std::io;
use std::os::fd::AsRawFd;

use agent_proto::mailbox::{Ring, MAILBOX_GPA, MAILBOX_SIZE, TO_GUEST, TO_HOST};

/// Where the mailbox is mapped from.
pub const DEV_MEM: &str = "/dev/mem";

/// The mapped mailbox.
#[derive(Debug)]
pub struct GuestMailbox {
    base: *mut libc::c_void,
    /// Whether `base` is this object's own mapping (unmapped on drop).
    mapped: bool,
    /// Host -> guest (this side consumes).
    pub to_guest: Ring,
    /// Guest -> host (this side produces).
    pub to_host: Ring,
}

impl GuestMailbox {
    /// Maps the mailbox from `/dev/mem`; `Ok(None)` when the VMM serves
    /// none (no magic).
    pub fn open() -> io::Result<Option<Self>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEV_MEM)?;
        let offset = libc::off_t::try_from(MAILBOX_GPA)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a new shared mapping of MAILBOX_SIZE bytes of the
        // mailbox's physical range; the kernel picks the address, nothing
        // else in the process aliases it. The fd may close after mmap.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAILBOX_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let bytes = base.cast::<u8>();
        // SAFETY: base is page-aligned and valid for MAILBOX_SIZE bytes
        // until Drop unmaps it; both rings live inside it and the Rings
        // are dropped with self. The VMM accesses it through its own Rings.
        let (to_guest, to_host) = unsafe {
            (
                Ring::new(bytes.add(TO_GUEST)),
                Ring::new(bytes.add(TO_HOST)),
            )
        };
        let mailbox = Self {
            base,
            mapped: true,
            to_guest,
            to_host,
        };
        if !(mailbox.to_guest.has_magic() && mailbox.to_host.has_magic()) {
            return Ok(None);
        }
        Ok(Some(mailbox))
    }
}

impl GuestMailbox {
    /// A mailbox over memory the caller owns (tests: a buffer standing in
    /// for the VMM's region, the VMM's side played through other Rings).
    ///
    /// # Safety
    /// `base` must be 8-byte aligned and valid for reads and writes of
    /// `MAILBOX_SIZE` bytes for the mailbox's life.
    #[cfg(test)]
    pub(crate) unsafe fn over(base: *mut u8) -> Self {
        // SAFETY: the caller's contract covers both rings.
        let (to_guest, to_host) =
            unsafe { (Ring::new(base.add(TO_GUEST)), Ring::new(base.add(TO_HOST))) };
        Self {
            base: base.cast(),
            mapped: false,
            to_guest,
            to_host,
        }
    }
}

impl Drop for GuestMailbox {
    fn drop(&mut self) {
        if !self.mapped {
            return;
        }
        // SAFETY: base/MAILBOX_SIZE is the mapping made in open(); the
        // rings pointing into it are fields of self, unusable after drop.
        unsafe {
            libc::munmap(self.base, MAILBOX_SIZE);
        }
    }
}
