//! A one-line progress bar on stderr, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};

/// Progress over a known number of steps.
pub struct Progress {
    total: usize,
    done: usize,
    enabled: bool,
}

impl Progress {
    /// A bar for `total` steps; silent unless stderr is a terminal and `allow`.
    pub fn new(total: usize, allow: bool) -> Self {
        Self { total, done: 0, enabled: allow && std::io::stderr().is_terminal() }
    }

    /// Shows that the step labelled `what` has started.
    pub fn start(&mut self, what: &str) {
        if !self.enabled {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * self.done / self.total.max(1);
        let bar: String = "#".repeat(filled) + &".".repeat(WIDTH - filled);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K[{bar}] {}/{} {what}", self.done, self.total);
        let _ = err.flush();
    }

    /// Marks one step done.
    pub fn step(&mut self) {
        self.done += 1;
    }

    /// Erases the bar.
    pub fn finish(&mut self) {
        if self.enabled {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}
