//! The clock a driver hands the core.

use std::time::{SystemTime, UNIX_EPOCH};

use holdfast_core::time::Instant;

/// The clock the core sees: microseconds since the Unix epoch, moving monotonically within
/// this process, so that time stamps inside commands (retry due times) mean the same on every
/// node.
pub struct Clock {
    start: std::time::Instant,
    start_unix_us: u64,
}

impl Clock {
    pub fn new() -> Clock {
        let start_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Clock {
            start: std::time::Instant::now(),
            start_unix_us,
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_micros(self.start_unix_us + self.start.elapsed().as_micros() as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
