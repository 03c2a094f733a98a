//! The run's event trace: always hashed, optionally kept as readable lines.

use holdfast_core::time::Instant;
use xxhash_rust::xxh3::Xxh3;

pub struct Trace {
    hasher: Xxh3,
    lines: Option<Vec<String>>,
}

impl Trace {
    pub fn new(keep_lines: bool) -> Trace {
        Trace {
            hasher: Xxh3::new(),
            lines: keep_lines.then(Vec::new),
        }
    }

    /// Records one event. `fields` identify it for the hash; `line` is only rendered when
    /// lines are kept, so tracing costs nothing in bulk runs and never changes the hash.
    pub fn record(&mut self, now: Instant, fields: &[u64], line: impl FnOnce() -> String) {
        self.hasher.update(&now.as_micros().to_le_bytes());
        for field in fields {
            self.hasher.update(&field.to_le_bytes());
        }
        if let Some(lines) = &mut self.lines {
            lines.push(format!("{now} {}", line()));
        }
    }

    pub fn hash(&self) -> u64 {
        self.hasher.digest()
    }

    pub fn into_lines(self) -> Vec<String> {
        self.lines.unwrap_or_default()
    }
}
