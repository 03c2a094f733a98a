//! Refusals are logged at WARN, so an attack or a broken client shows in the log; but a client
//! sending refused requests in a loop must not fill the disk with log lines. At most
//! [`WARNINGS_PER_WINDOW_MAX`] refusal lines per [`WINDOW`]; past that they are counted, and the
//! next window begins with one line saying how many were left out.

use std::time::{Duration, Instant};

use tracing::warn;

pub const WARNINGS_PER_WINDOW_MAX: u32 = 50;
pub const WINDOW: Duration = Duration::from_secs(10);

pub struct WarnBudget {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl WarnBudget {
    pub fn new(now: Instant) -> WarnBudget {
        WarnBudget {
            window_start: now,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether one more refusal may be logged now.
    pub fn allow(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            if self.suppressed > 0 {
                warn!(
                    "{} more refusal(s) in the last {} s were not logged",
                    self.suppressed,
                    now.saturating_duration_since(self.window_start).as_secs()
                );
            }
            self.window_start = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < WARNINGS_PER_WINDOW_MAX {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_per_window_and_counted() {
        let start = Instant::now();
        let mut budget = WarnBudget::new(start);
        let allowed = (0..1_000).filter(|_| budget.allow(start)).count();
        assert_eq!(allowed, WARNINGS_PER_WINDOW_MAX as usize);
        assert_eq!(
            budget.suppressed,
            1_000 - u64::from(WARNINGS_PER_WINDOW_MAX)
        );
        let later = start + WINDOW;
        assert!(budget.allow(later), "a new window logs again");
        assert_eq!(budget.suppressed, 0);
    }
}
