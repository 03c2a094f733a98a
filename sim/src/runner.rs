//! Many seeds at once: one worker thread per core, each running whole seeds, and a summary.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use holdfast_core::time::Instant;

use crate::checker::Violation;
use crate::options::{Options, Workload};
use crate::world::{Outcome, Stats};

/// The first seed of an exploring window named by `text` (CI passes the commit hash and the
/// date). The fixed ranges CI and the tests run are all below 2^32, so a window from here
/// never repeats them; starts are spread over 2^62 values, so two windows of `n` seeds
/// overlap with a chance of about 2n / 2^62; and a window of up to 2^32 seeds cannot overflow.
pub fn explore_start(text: &str) -> u64 {
    (xxhash_rust::xxh3::xxh3_64(text.as_bytes()) >> 2) + (1 << 32)
}

/// Runs one seed; a panic anywhere in the run is a failure of that seed, not of the batch.
pub fn run_one(options: &Options) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| crate::run(options))) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Outcome {
                seed: options.seed,
                violation: Some((
                    Instant::ZERO,
                    Violation {
                        checker: "panic",
                        detail: message,
                    },
                )),
                stats: Stats::default(),
                trace_hash: 0,
                trace: Vec::new(),
            }
        }
    }
}

/// Runs `count` seeds from `from` on `jobs` threads; `progress` is called after each seed.
/// The outcomes come back in seed order whatever the scheduling.
pub fn run_seeds(
    template: &Options,
    from: u64,
    count: u64,
    jobs: usize,
    progress: &(dyn Fn(&Outcome) + Sync),
) -> Vec<Outcome> {
    let next = AtomicU64::new(0);
    let outcomes = Mutex::new(Vec::with_capacity(count as usize));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let mut options = template.clone();
                    options.seed = from + i;
                    let outcome = run_one(&options);
                    progress(&outcome);
                    // A poisoned lock only means another worker panicked outside a run;
                    // its outcomes are still sound.
                    outcomes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(outcome);
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    outcomes.sort_by_key(|o| o.seed);
    outcomes
}

/// Runs each of `runs` (any seeds and shapes, as a regression list holds them) on `jobs`
/// threads; the outcomes come back in the order of `runs`.
pub fn run_each(runs: &[Options], jobs: usize) -> Vec<Outcome> {
    let next = AtomicU64::new(0);
    let outcomes = Mutex::new(Vec::with_capacity(runs.len()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(options) = runs.get(i) else {
                        break;
                    };
                    let outcome = run_one(options);
                    outcomes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, outcome));
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    outcomes.sort_by_key(|(i, _)| *i);
    outcomes.into_iter().map(|(_, o)| o).collect()
}

/// The first seed in `from..from + count` that fails as `template` runs it, and why; seeds run
/// in rounds of a few per worker, in parallel, stopping after the first round that fails.
pub fn first_failure(
    template: &Options,
    from: u64,
    count: u64,
    jobs: usize,
) -> Option<(u64, Violation)> {
    let round = (jobs.max(1) * 2) as u64;
    let mut start = from;
    while start < from + count {
        let end = (start + round).min(from + count);
        let runs: Vec<Options> = (start..end)
            .map(|seed| {
                let mut options = template.clone();
                options.seed = seed;
                options
            })
            .collect();
        let found = run_each(&runs, jobs)
            .into_iter()
            .find_map(|o| o.violation.map(|(_, v)| (o.seed, v)));
        if found.is_some() {
            return found;
        }
        start = end;
    }
    None
}

/// What a batch of seeds found.
pub struct Summary {
    pub workload: Workload,
    pub passed: u64,
    /// Failing seeds with what broke, in seed order.
    pub failed: Vec<(u64, Violation)>,
    pub stats: Stats,
    pub wall: Duration,
}

impl Summary {
    pub fn new(workload: Workload, outcomes: &[Outcome], wall: Duration) -> Summary {
        let mut stats = Stats::default();
        let mut failed = Vec::new();
        for outcome in outcomes {
            stats.add(&outcome.stats);
            if let Some((_, violation)) = &outcome.violation {
                failed.push((outcome.seed, violation.clone()));
            }
        }
        Summary {
            workload,
            passed: outcomes.len() as u64 - failed.len() as u64,
            failed,
            stats,
            wall,
        }
    }
}

impl Summary {
    /// Fault kinds and protocol paths of the workload no seed of the batch reached.
    pub fn never_reached(&self) -> Vec<&'static str> {
        crate::coverage::never_reached(self.workload, &self.stats.faults, &self.stats.coverage)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(f, "seeds passed: {}", self.passed)?;
        writeln!(f, "seeds failed: {}", self.failed.len())?;
        for (seed, violation) in self.failed.iter().take(20) {
            let detail: String = violation.detail.chars().take(160).collect();
            writeln!(f, "  seed {seed}: {}: {detail}", violation.checker)?;
        }
        if self.failed.len() > 20 {
            writeln!(f, "  ... and {} more", self.failed.len() - 20)?;
        }
        let faults: u64 = s.faults.values().sum();
        writeln!(f, "faults injected: {faults}")?;
        for (kind, count) in &s.faults {
            writeln!(f, "  {kind:<16} {count}")?;
        }
        if s.damaged_starts > 0 {
            writeln!(
                f,
                "damaged replicas: {} started damaged, {} repaired",
                s.damaged_starts, s.repairs
            )?;
        }
        writeln!(f, "elections won: {}", s.elections)?;
        if s.transfers_asked > 0 {
            writeln!(
                f,
                "leadership transfers: {} asked, {} started",
                s.transfers_asked, s.transfers_started
            )?;
        }
        writeln!(
            f,
            "snapshots: {} taken, {} installed, {} chunks sent",
            s.snapshots_taken, s.snapshots_installed, s.snapshot_chunks
        )?;
        writeln!(f, "entries committed: {}", s.entries_committed)?;
        if s.proposals_acked + s.proposals_dropped + s.proposals_indeterminate > 0 {
            writeln!(
                f,
                "proposals: {} acked, {} dropped, {} indeterminate (replica crashed)",
                s.proposals_acked, s.proposals_dropped, s.proposals_indeterminate
            )?;
        }
        if s.messages_acked + s.messages_failed + s.messages_ambiguous > 0 {
            let sent = s.messages_acked + s.messages_failed + s.messages_ambiguous;
            writeln!(
                f,
                "queue messages: {sent} sent: {} acked, {} failed, {} ambiguous",
                s.messages_acked, s.messages_failed, s.messages_ambiguous
            )?;
            writeln!(
                f,
                "deliveries: {} ({} redeliveries), {} dead-lettered",
                s.deliveries, s.redeliveries, s.dead_lettered
            )?;
            for (cause, count) in &s.redeliveries_by_cause {
                writeln!(f, "  redelivered after {cause:<16} {count}")?;
            }
        }
        writeln!(
            f,
            "network messages: {} delivered, {} lost",
            s.messages_delivered, s.messages_lost
        )?;
        writeln!(f, "protocol paths reached (counted by the core):")?;
        for (name, count) in &s.coverage.counts {
            writeln!(f, "  {name:<24} {count}")?;
        }
        let never = self.never_reached();
        if never.is_empty() {
            writeln!(f, "coverage: every fault kind and protocol path reached")?;
        } else {
            writeln!(f, "coverage: NEVER REACHED: {}", never.join(" "))?;
        }
        for (name, why) in crate::coverage::UNREACHABLE {
            writeln!(f, "  not counted as missing: {name}: {why}")?;
        }
        let simulated = s.simulated_us as f64 / 1e6;
        let wall = self.wall.as_secs_f64().max(1e-9);
        write!(
            f,
            "simulated {simulated:.0} s in {wall:.1} s wall: {:.0} simulated s per wall s",
            simulated / wall
        )
    }
}
