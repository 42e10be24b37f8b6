//! The shared buffer: a head (its lock, capacity and used length) and the records appended
//! after it, one after the other, which the notifier takes all at once.

use std::cell::UnsafeCell;
use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::PgSharedMemoryInitialization;

use crate::guc;

pub(super) static BUFFER: SharedBuffer = SharedBuffer {
    name: c"pg_outbox_handoff",
    head: UnsafeCell::new(std::ptr::null_mut()),
};

/// The head of the shared buffer; `capacity` bytes of records follow it, appended one after the
/// other, and the notifier takes them all at once. A record takes some 100 bytes per event plus
/// the user id, channel and origin, and the payload when it may go inline: at 10,000 events/s
/// and a batch every 4 ms the notifier drains a few tens of kilobytes at a time.
#[repr(C)]
struct Head {
    lock: *mut pg_sys::LWLock,
    capacity: usize,
    used: usize,
}

/// The buffer in shared memory, set up by hand: its size is a setting.
pub(super) struct SharedBuffer {
    name: &'static CStr,
    head: UnsafeCell<*mut Head>,
}

// SAFETY: the pointer is set once in the postmaster, before any backend forks, and the buffer
// it points to is only touched under its LWLock.
unsafe impl Sync for SharedBuffer {}

impl PgSharedMemoryInitialization for SharedBuffer {
    type Value = ();

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called from the shmem request hook, as the trait requires.
        unsafe {
            pg_sys::RequestAddinShmemSpace(size_of::<Head>() + guc::handoff_buffer_bytes());
            pg_sys::RequestNamedLWLockTranche(self.name.as_ptr(), 1);
        }
    }

    unsafe fn on_shmem_startup(&'static self, _: ()) {
        // SAFETY: called from the shmem startup hook, as the trait requires; 21 is
        // AddinShmemInitLock, which every extension takes around ShmemInitStruct.
        unsafe {
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let capacity = guc::handoff_buffer_bytes();
            let mut found = false;
            let head = pg_sys::ShmemInitStruct(
                self.name.as_ptr(),
                size_of::<Head>() + capacity,
                &mut found,
            )
            .cast::<Head>();
            if !found {
                let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(self.name.as_ptr())).lock;
                head.write(Head {
                    lock,
                    capacity,
                    used: 0,
                });
            }
            *self.head.get() = head;
            pg_sys::LWLockRelease(init_lock);
        }
    }
}

impl SharedBuffer {
    /// How many bytes of records the buffer holds.
    pub(super) fn capacity(&self) -> usize {
        // SAFETY: set before any backend forked; `capacity` never changes after.
        unsafe {
            self.head
                .get()
                .read()
                .as_ref()
                .map_or(0, |head| head.capacity)
        }
    }

    /// Runs `f` on the used length and the bytes under the buffer's lock. `f` must not raise
    /// a PostgreSQL error.
    pub(super) fn locked<R>(&self, f: impl FnOnce(&mut usize, &mut [u8]) -> R) -> R {
        // SAFETY: set before any backend forked, in every process that preloaded the library,
        // which is the only kind that hands events over.
        let head = unsafe { *self.head.get() };
        assert!(
            !head.is_null(),
            "pg_outbox: the handoff buffer is not set up"
        );
        // SAFETY: the buffer is valid for the server's life, its bytes right after the head;
        // the lock serialises access to it.
        unsafe {
            let lock = (*head).lock;
            pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let bytes = std::slice::from_raw_parts_mut(head.add(1).cast::<u8>(), (*head).capacity);
            let result = f(&mut (*head).used, bytes);
            pg_sys::LWLockRelease(lock);
            result
        }
    }
}
