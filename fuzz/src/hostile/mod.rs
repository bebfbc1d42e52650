//! A hostile device for the driver target. Every answer comes from the input: offered
//! features, config bytes and generation, status, queue sizes, and for each request the
//! used entry (its id and length), the status and property bytes, or no answer at all.
//! Only the driver's own state is trusted: it must return typed errors, never panic,
//! never wait without bound.
//!
//! Written for the fuzz target rather than taken from the driver's `fake` module: that one
//! models a correct device; this one lies.

mod memory;
mod rings;
mod transport;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::input::Input;

pub use memory::{Pool, PoolHal, POOL_PAGES};
pub use transport::{Hostile, HostileTransport};

/// The input, read in turn by the workload and by the device as events happen.
#[derive(Clone)]
pub struct Script(Arc<Mutex<(Vec<u8>, usize)>>);

impl Script {
    /// A script over a copy of `data`.
    pub fn new(data: &[u8]) -> Self {
        Self(Arc::new(Mutex::new((data.to_vec(), 0))))
    }

    fn lock(&self) -> MutexGuard<'_, (Vec<u8>, usize)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads from where the last read stopped.
    pub fn read<R>(&self, f: impl FnOnce(&mut Input) -> R) -> R {
        let mut g = self.lock();
        let (data, pos) = &mut *g;
        let mut inp = Input::new(&data[*pos..]);
        let r = f(&mut inp);
        *pos = data.len() - inp.remaining();
        r
    }

    /// One byte (0 once the script is over).
    pub fn u8(&self) -> u8 {
        self.read(|i| i.u8())
    }

    /// True once every byte was read.
    pub fn is_empty(&self) -> bool {
        let g = self.lock();
        g.1 >= g.0.len()
    }
}
