//! A mutex that is `std::sync::Mutex` with `std` and a spin lock without.

#[cfg(feature = "std")]
mod imp {
    /// A mutex that ignores poisoning: a panic in one thread must not wedge the driver.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

    pub(crate) use std::sync::MutexGuard;

    impl<T> Mutex<T> {
        pub(crate) const fn new(v: T) -> Self {
            Self(std::sync::Mutex::new(v))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            match self.0.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
    }

    /// Lets other threads run while we wait for the device.
    pub(crate) fn relax() {
        std::thread::yield_now();
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    use core::cell::UnsafeCell;
    use core::ops::{Deref, DerefMut};
    use core::sync::atomic::{AtomicBool, Ordering};

    /// A test-and-test-and-set spin lock.
    #[derive(Default)]
    pub(crate) struct Mutex<T> {
        locked: AtomicBool,
        value: UnsafeCell<T>,
    }

    // SAFETY: the lock hands out at most one guard at a time, so T is only
    // reached from one thread at a time; T: Send suffices, as for std's Mutex.
    unsafe impl<T: Send> Sync for Mutex<T> {}
    // SAFETY: moving the mutex moves the T it owns.
    unsafe impl<T: Send> Send for Mutex<T> {}

    pub(crate) struct MutexGuard<'a, T> {
        lock: &'a Mutex<T>,
    }

    impl<T> Mutex<T> {
        pub(crate) const fn new(v: T) -> Self {
            Self { locked: AtomicBool::new(false), value: UnsafeCell::new(v) }
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            loop {
                if let Some(g) = self.try_lock() {
                    return g;
                }
                while self.locked.load(Ordering::Relaxed) {
                    core::hint::spin_loop();
                }
            }
        }
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .ok()
                .map(|_| MutexGuard { lock: self })
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: holding the guard means holding the lock.
            unsafe { &*self.lock.value.get() }
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: holding the guard means holding the lock, exclusively.
            unsafe { &mut *self.lock.value.get() }
        }
    }

    impl<T> Drop for MutexGuard<'_, T> {
        fn drop(&mut self) {
            self.lock.locked.store(false, Ordering::Release);
        }
    }

    pub(crate) fn relax() {
        core::hint::spin_loop();
    }
}

pub(crate) use imp::{relax, Mutex, MutexGuard};

/// Bounds one wait for the device: a poll count, and with `std` a wall-clock deadline.
pub(crate) struct Waiter {
    spins: u64,
    limit: u64,
    #[cfg(feature = "std")]
    deadline: Option<std::time::Instant>,
}

impl Waiter {
    pub(crate) fn new(limit: u64, timeout: Option<core::time::Duration>) -> Self {
        #[cfg(feature = "std")]
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        #[cfg(not(feature = "std"))]
        let _ = timeout;
        Self {
            spins: 0,
            limit,
            #[cfg(feature = "std")]
            deadline,
        }
    }

    /// Counts one poll. Returns the polls so far, or `None` once a bound is passed.
    pub(crate) fn poll(&mut self) -> Option<u64> {
        self.spins += 1;
        if self.spins > self.limit {
            return None;
        }
        #[cfg(feature = "std")]
        if self.deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return None;
        }
        Some(self.spins)
    }
}
