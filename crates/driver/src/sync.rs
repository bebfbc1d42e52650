//! The driver's locks, chosen by whoever embeds it.
//!
//! Every lock of the driver and the DMA layer comes from one [`Locks`]
//! family, a type parameter of [`VirtioIommu`](crate::VirtioIommu),
//! [`Domain`](crate::Domain), [`DmaDomain`](crate::DmaDomain) and the
//! adapters, defaulting to [`DefaultLocks`]:
//! - with `std`, [`StdLocks`]: `std::sync::Mutex` (poisoning ignored);
//! - without, [`SpinLocks`]: a test-and-test-and-set spin lock that does
//!   **not** mask interrupts.
//!
//! A kernel brings its own lock as a [`lock_api::RawMutex`] (the trait
//! the `spin` crate, `parking_lot` and most Rust kernels' lock types
//! implement) through [`RawLocks`]: for example an interrupt-masking spin
//! lock (save the interrupt flag and disable in `lock`, restore in
//! `unlock`).
//!
//! # Interrupt handlers
//! The driver takes its locks for short, bounded sections; it holds one
//! while it waits for the device only where ordering needs it: attach and
//! detach (under the endpoint's and the domain's lock), a MAP or UNMAP that
//! finds the request ring full (under its domain's lock, until there is
//! space), and a [`SharedDma`](crate::adapter::SharedDma) sync (under its
//! own). From an interrupt handler an OS may call:
//! - [`DmaDomain::unmap`](crate::DmaDomain::unmap), `unmap_single` and
//!   `unmap_sg` under a lazy policy, and virtio-drivers' `pop_used` over an
//!   [`IommuHal`](crate::adapter::IommuHal) with a lazy domain: they queue
//!   UNMAPs and never wait, unless the request ring is full;
//! - [`VirtioIommu::poll_events`](crate::VirtioIommu::poll_events) (the
//!   fault handler runs under the fault-handler lock);
//! - [`DmaDomain::tick`](crate::DmaDomain::tick) from a timer interrupt.
//!
//! and only with a lock that masks interrupts (`RawLocks<YourIrqLock>`):
//! with [`SpinLocks`] an interrupt that arrives while the same CPU holds a
//! driver lock spins forever on it. Where these calls do wait (a full
//! request ring, a flush older than its timeout in `tick`), they poll the
//! used ring, so the transport must not block for an interrupt there:
//! leave [`Transport::wait_for_used`](crate::Transport::wait_for_used) at
//! its spinning default and give no [`UsedWaiter`](crate::UsedWaiter).
//! Everything else (maps, Strict unmaps, attach, detach, probe, flush) runs
//! in thread context.

use core::marker::PhantomData;
use core::ops::DerefMut;
use core::sync::atomic::{AtomicBool, Ordering};

/// One mutex of a [`Locks`] family.
pub trait LockCell<T>: Send + Sync {
    /// Held while it lives.
    type Guard<'a>: DerefMut<Target = T>
    where
        Self: 'a;
    /// An unlocked mutex holding `value`.
    fn new(value: T) -> Self;
    /// Waits for the lock.
    fn lock(&self) -> Self::Guard<'_>;
    /// The lock, if it is free now.
    fn try_lock(&self) -> Option<Self::Guard<'_>>;
}

/// Where the driver's mutexes come from (see the [module docs](self)).
pub trait Locks: Send + Sync + 'static {
    /// A mutex of this family over `T`.
    type Mutex<T: Send>: LockCell<T>;
    /// Called while the driver polls for the device (it holds no lock of
    /// this family then): let other threads run, or just spin.
    fn relax() {
        core::hint::spin_loop();
    }
}

/// Mutexes over any [`lock_api::RawMutex`], e.g. the kernel's own
/// interrupt-masking spin lock.
///
/// ```
/// use core::sync::atomic::{AtomicBool, Ordering};
/// use viommu_driver::sync::{LockCell, Locks, RawLocks};
///
/// /// A spin lock that would also mask interrupts in `lock` and restore
/// /// them in `unlock` (here it only spins).
/// struct IrqSpin(AtomicBool);
/// // SAFETY: `lock` returns only once it set the flag, which `unlock` clears.
/// unsafe impl lock_api::RawMutex for IrqSpin {
///     const INIT: Self = IrqSpin(AtomicBool::new(false));
///     type GuardMarker = lock_api::GuardNoSend;
///     fn lock(&self) {
///         while !self.try_lock() {
///             core::hint::spin_loop();
///         }
///     }
///     fn try_lock(&self) -> bool {
///         self.0.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
///     }
///     unsafe fn unlock(&self) {
///         self.0.store(false, Ordering::Release);
///     }
/// }
///
/// type KernelLocks = RawLocks<IrqSpin>;
/// let m = <KernelLocks as Locks>::Mutex::new(1);
/// *m.lock() += 1;
/// assert_eq!(*m.lock(), 2);
/// ```
pub struct RawLocks<R>(PhantomData<fn() -> R>);

impl<R: lock_api::RawMutex + Send + Sync + 'static> Locks for RawLocks<R> {
    type Mutex<T: Send> = lock_api::Mutex<R, T>;
}

impl<R: lock_api::RawMutex + Send + Sync, T: Send> LockCell<T> for lock_api::Mutex<R, T> {
    type Guard<'a>
        = lock_api::MutexGuard<'a, R, T>
    where
        Self: 'a;
    fn new(value: T) -> Self {
        lock_api::Mutex::new(value)
    }
    fn lock(&self) -> Self::Guard<'_> {
        lock_api::Mutex::lock(self)
    }
    fn try_lock(&self) -> Option<Self::Guard<'_>> {
        lock_api::Mutex::try_lock(self)
    }
}

/// A test-and-test-and-set spin lock: [`SpinLocks`]'s raw lock. It does
/// not mask interrupts.
#[derive(Debug)]
pub struct SpinRaw(AtomicBool);

// SAFETY: `lock` and `try_lock` return holding the lock only after
// swapping the flag from false to true (Acquire), and `unlock` (Release)
// is called only by the holder, so at most one holder exists at a time.
unsafe impl lock_api::RawMutex for SpinRaw {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = SpinRaw(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;
    fn lock(&self) {
        while !self.try_lock() {
            while self.0.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
    }
    fn try_lock(&self) -> bool {
        self.0.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }
    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Spin locks ([`SpinRaw`]): the `no_std` default.
pub type SpinLocks = RawLocks<SpinRaw>;

/// `std::sync::Mutex`, with poisoning ignored: a panic in one thread must
/// not wedge the driver. Waits for the device yield the thread.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct StdLocks;

/// `std::sync::Mutex` as a [`LockCell`] (see [`StdLocks`]).
#[cfg(feature = "std")]
#[derive(Debug, Default)]
pub struct StdMutex<T>(std::sync::Mutex<T>);

#[cfg(feature = "std")]
impl Locks for StdLocks {
    type Mutex<T: Send> = StdMutex<T>;
    fn relax() {
        std::thread::yield_now();
    }
}

#[cfg(feature = "std")]
impl<T: Send> LockCell<T> for StdMutex<T> {
    type Guard<'a>
        = std::sync::MutexGuard<'a, T>
    where
        Self: 'a;
    fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }
    fn lock(&self) -> Self::Guard<'_> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn try_lock(&self) -> Option<Self::Guard<'_>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// The default family: [`StdLocks`] with `std`, [`SpinLocks`] without.
#[cfg(feature = "std")]
pub type DefaultLocks = StdLocks;
/// The default family: [`StdLocks`] with `std`, [`SpinLocks`] without.
#[cfg(not(feature = "std"))]
pub type DefaultLocks = SpinLocks;

/// The crate's mutex: a mutex of the family `L`.
pub(crate) struct Mutex<L: Locks, T: Send>(L::Mutex<T>);

/// A held [`Mutex`].
pub(crate) type MutexGuard<'a, L, T> = <<L as Locks>::Mutex<T> as LockCell<T>>::Guard<'a>;

impl<L: Locks, T: Send> Mutex<L, T> {
    pub(crate) fn new(v: T) -> Self {
        Self(LockCell::new(v))
    }
    pub(crate) fn lock(&self) -> MutexGuard<'_, L, T> {
        self.0.lock()
    }
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, L, T>> {
        self.0.try_lock()
    }
}

impl<L: Locks, T: Send + Default> Default for Mutex<L, T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

/// Lets other threads run while we wait for the device.
pub(crate) fn relax<L: Locks>() {
    L::relax();
}

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
