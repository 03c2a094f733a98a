//! A few seconds of simulation: the test command of mutation testing (`scripts/mutants.sh`),
//! next to the core's unit tests. A mutant of the core that the unit tests miss but that
//! breaks a safety property under faults fails here; the long campaigns stay in
//! `simulate.rs` and CI. `HOLDFAST_SMOKE_SEEDS` scales it (default 1: 200 raft seeds and 16
//! queue seeds).

use holdfast_sim::runner::run_seeds;
use holdfast_sim::{Options, Workload};

fn scale() -> u64 {
    std::env::var("HOLDFAST_SMOKE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn all_pass(template: &Options, count: u64) {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let outcomes = run_seeds(template, 0, count, jobs, &|_| {});
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.violation.as_ref().map(|(_, v)| (o.seed, v.clone())))
        .collect();
    assert!(failed.is_empty(), "failing seeds: {failed:#?}");
    let acked: u64 = outcomes
        .iter()
        .map(|o| o.stats.proposals_acked + o.stats.messages_acked)
        .sum();
    assert!(acked >= count * 50, "{acked} acked in {count} seeds");
}

#[test]
fn smoke_raft_seeds_pass() {
    let mut options = Options::new(0);
    options.workload = Workload::Raft;
    all_pass(&options, 200 * scale());
}

#[test]
fn smoke_queue_seeds_pass() {
    let mut options = Options::new(0);
    options.workload = Workload::Queue;
    options.groups = 2;
    all_pass(&options, 16 * scale());
}
