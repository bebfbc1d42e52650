//! A notification line between threads: a Linux eventfd, as a VMM's
//! ioeventfd (guest kick → I/O thread) and irqfd (device → guest) are.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// One eventfd. `signal` adds to its counter; `wait` blocks until the
/// counter is non-zero and resets it, so no signal is ever lost.
#[derive(Debug)]
pub struct EventNotifier {
    fd: OwnedFd,
}

impl EventNotifier {
    /// Creates a non-blocking eventfd (waits use `poll`).
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; a non-negative return is a fresh fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is valid and owned by nobody else.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Adds one to the counter, waking a waiter.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our fd. The only failure
        // is EAGAIN on a saturated counter, which still leaves it signalled.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Takes the counter without blocking: true if it was signalled.
    pub fn try_consume(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking fd.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8
    }

    /// Blocks until signalled or until `timeout` passes; true if signalled.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        if self.try_consume() {
            return true;
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        r > 0 && self.try_consume()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn signals_are_sticky_and_consumed_once() {
        let n = EventNotifier::new().unwrap();
        assert!(!n.try_consume());
        n.signal();
        n.signal();
        assert!(n.wait(Some(Duration::from_millis(1))));
        assert!(!n.wait(Some(Duration::from_millis(1))), "two signals fold into one wake");
    }

    #[test]
    fn wakes_a_waiter_on_another_thread() {
        let n = Arc::new(EventNotifier::new().unwrap());
        let n2 = n.clone();
        let t = std::thread::spawn(move || n2.wait(Some(Duration::from_secs(10))));
        std::thread::sleep(Duration::from_millis(5));
        n.signal();
        assert!(t.join().unwrap());
    }
}
