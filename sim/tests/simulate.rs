//! The simulator against the real core: seeds pass, runs are deterministic, and every
//! planted bug is caught by the checker meant for it.

use holdfast_sim::runner::{run_one, run_seeds};
use holdfast_sim::{Options, Workload, run};

fn raft(seed: u64) -> Options {
    let mut options = Options::new(seed);
    options.workload = Workload::Raft;
    options
}

fn queue(seed: u64) -> Options {
    let mut options = Options::new(seed);
    options.workload = Workload::Queue;
    options.groups = 2;
    options
}

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn assert_all_pass(template: &Options, from: u64, count: u64) -> Vec<holdfast_sim::Outcome> {
    let outcomes = run_seeds(template, from, count, jobs(), &|_| {});
    assert_eq!(outcomes.len() as u64, count);
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.violation.as_ref().map(|(_, v)| (o.seed, v.clone())))
        .collect();
    assert!(failed.is_empty(), "failing seeds: {failed:#?}");
    let elections: u64 = outcomes.iter().map(|o| o.stats.elections).sum();
    let acked: u64 = outcomes
        .iter()
        .map(|o| o.stats.proposals_acked + o.stats.messages_acked)
        .sum();
    let faults: u64 = outcomes
        .iter()
        .map(|o| o.stats.faults.values().sum::<u64>())
        .sum();
    // A run that elects nobody, commits nothing or injects no fault proves nothing.
    assert!(elections >= count, "{elections} elections in {count} seeds");
    assert!(
        acked >= count * 100,
        "{acked} proposals acked in {count} seeds"
    );
    assert!(faults >= count * 10, "{faults} faults in {count} seeds");
    outcomes
}

/// Every kind of disk fault was injected, replicas came back damaged, and damaged replicas
/// were repaired: the runs exercised what the damaged-replica rule is for.
fn assert_disk_faults(outcomes: &[holdfast_sim::Outcome]) {
    let mut stats = holdfast_sim::Stats::default();
    for outcome in outcomes {
        stats.add(&outcome.stats);
    }
    for kind in [
        "torn-write",
        "bit-flip",
        "misdirected-write",
        "fsync-error",
        "disk-full",
        "wipe",
    ] {
        assert!(
            stats.faults.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} in {:?}",
            stats.faults
        );
    }
    assert!(stats.damaged_starts > 0, "no replica started damaged");
    assert!(stats.repairs > 0, "no damaged replica was repaired");
}

/// Replicas compacted, followers were sent snapshots (in several chunks), and crashes came
/// while snapshots were being written: the runs exercised what snapshots are for.
fn assert_snapshots(outcomes: &[holdfast_sim::Outcome]) {
    let mut stats = holdfast_sim::Stats::default();
    for outcome in outcomes {
        stats.add(&outcome.stats);
    }
    assert!(stats.snapshots_taken > 0, "no compaction");
    assert!(stats.snapshots_installed > 0, "no snapshot installed");
    assert!(
        stats.snapshot_chunks > stats.snapshots_installed,
        "snapshots never went in several chunks: {} chunks for {} installs",
        stats.snapshot_chunks,
        stats.snapshots_installed
    );
    assert!(
        stats.faults.get("snapshot-crash").copied().unwrap_or(0) > 0,
        "no crash while writing a snapshot"
    );
}

#[test]
fn three_nodes_survive_three_hundred_seeds() {
    let outcomes = assert_all_pass(&raft(0), 0, 300);
    assert_disk_faults(&outcomes);
    assert_snapshots(&outcomes);
}

#[test]
fn five_nodes_with_two_groups_survive_a_hundred_seeds() {
    let mut options = raft(0);
    options.nodes = 5;
    options.groups = 2;
    assert_all_pass(&options, 50_000, 100);
}

#[test]
fn the_queue_survives_a_hundred_and_fifty_seeds_of_three_nodes() {
    let outcomes = run_seeds(&queue(0), 0, 150, jobs(), &|_| {});
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| (o.seed, o.violation.clone()))
        .collect();
    assert!(failed.is_empty(), "failing seeds: {failed:#?}");
    let sum =
        |f: &dyn Fn(&holdfast_sim::Stats) -> u64| outcomes.iter().map(|o| f(&o.stats)).sum::<u64>();
    // Runs that send, consume, retry and crash, or they prove nothing.
    assert!(sum(&|s| s.messages_acked) > 150 * 200);
    assert!(sum(&|s| s.deliveries) > sum(&|s| s.messages_acked));
    assert!(sum(&|s| s.redeliveries) > 0);
    assert!(sum(&|s| s.faults.get("crash").copied().unwrap_or(0)) > 150);
    // About one consumer crash per seed (144 in these 150).
    assert!(sum(&|s| s.faults.get("consumer-crash").copied().unwrap_or(0)) > 100);
    // Half the seeds grow and shrink the cluster through the operator's requests (about 0.8
    // nodes added and 0.5 removed per seed over 500 seeds).
    assert!(sum(&|s| s.faults.get("node-add").copied().unwrap_or(0)) > 50);
    assert!(sum(&|s| s.faults.get("node-remove").copied().unwrap_or(0)) > 25);
    assert_disk_faults(&outcomes);
    assert_snapshots(&outcomes);
}

#[test]
fn the_queue_survives_forty_seeds_of_five_nodes_and_three_broker_groups() {
    let mut options = queue(0);
    options.nodes = 5;
    options.groups = 3;
    assert_all_pass(&options, 70_000, 40);
}

#[test]
fn a_seed_replays_bit_for_bit() {
    for options in [raft(3), raft(77), raft(1_000_003), queue(3), queue(77)] {
        let seed = options.seed;
        let first = run(&options);
        let again = run(&options);
        assert_eq!(first.trace_hash, again.trace_hash, "seed {seed}");
        assert_eq!(first.stats.events, again.stats.events, "seed {seed}");
        let mut traced = options.clone();
        traced.trace = true;
        let traced = run(&traced);
        assert_eq!(
            traced.trace_hash, first.trace_hash,
            "tracing changed seed {seed}"
        );
        assert!(
            traced.trace.len() > 100,
            "seed {seed} traced {} lines",
            traced.trace.len()
        );
    }
    assert_ne!(
        run(&Options::new(1)).trace_hash,
        run(&Options::new(2)).trace_hash
    );
}

#[test]
fn a_trace_reads_as_events() {
    let mut options = raft(5);
    options.trace = true;
    let outcome = run_one(&options);
    assert!(outcome.passed(), "{:?}", outcome.violation);
    let text = outcome.trace.join("\n");
    for expected in ["LEADER term=", "Append t", "FAULT ", "HEAL", "CONVERGED"] {
        assert!(text.contains(expected), "no {expected:?} in the trace");
    }
}

#[cfg(feature = "canaries")]
mod canaries {
    use std::collections::BTreeSet;

    use holdfast_core::raft::Canary;
    use holdfast_sim::checker::{
        DISK_CHECKERS, MEMBERSHIP_CHECKERS, QUEUE_CHECKERS, RAFT_CHECKERS, SNAPSHOT_CHECKERS,
    };

    use super::*;

    /// The first of `seeds` seeds that catches `canary`, with the checker that fired.
    fn first_catch(
        template: &Options,
        canary: Canary,
        nodes: usize,
        seeds: u64,
    ) -> Option<(u64, &'static str)> {
        (0..seeds).find_map(|seed| {
            let mut options = template.clone();
            options.seed = seed;
            options.canary = Some(canary);
            options.nodes = nodes;
            let outcome = run_one(&options);
            outcome.violation.map(|(_, v)| (seed, v.checker))
        })
    }

    /// One canary run on one workload and cluster size.
    struct Case {
        canary: Canary,
        workload: &'static str,
        template: Options,
        nodes: usize,
    }

    /// Every case is caught within 500 seeds, never by a panic (nor, with `stall_is_a_miss`,
    /// by the liveness check alone), and every one of `checkers` is the first to catch at
    /// least one case: a checker that catches nothing is broken.
    fn expect_caught(cases: Vec<Case>, stall_is_a_miss: bool, class: &str, checkers: &[&str]) {
        let mut fired = BTreeSet::new();
        let mut missed = Vec::new();
        for case in cases {
            let name = case.canary.name();
            match first_catch(&case.template, case.canary, case.nodes, 500) {
                Some((seed, checker)) => {
                    println!(
                        "{name:<30} {:<5} {} nodes: seed {seed:>3} by {checker}",
                        case.workload, case.nodes
                    );
                    assert_ne!(checker, "panic", "{name} panicked instead of being caught");
                    if stall_is_a_miss {
                        assert_ne!(checker, "liveness", "{name} only stalled");
                    }
                    fired.insert(checker);
                }
                None => missed.push((name, case.workload, case.nodes)),
            }
        }
        assert!(
            missed.is_empty(),
            "canaries not caught within 500 seeds: {missed:?}"
        );
        let idle: Vec<_> = checkers.iter().filter(|c| !fired.contains(*c)).collect();
        assert!(
            idle.is_empty(),
            "{class} checkers that caught no canary: {idle:?}"
        );
    }

    fn case(canary: Canary, workload: &'static str, nodes: usize) -> Case {
        let template = if workload == "raft" {
            raft(0)
        } else {
            queue(0)
        };
        Case {
            canary,
            workload,
            template,
            nodes,
        }
    }

    #[test]
    // 500, as for the other classes: `commit-old-term` needs a leader change at the figure 8
    // moment, rarer since heartbeat answers stopped waiting for slow disks (first caught at
    // seed 241 on 5 nodes, 85 on 3).
    fn every_canary_is_caught_within_500_seeds_and_every_checker_catches_one() {
        let cases = Canary::ALL
            .into_iter()
            .filter(|c| c.is_raft() && !c.is_disk() && !c.is_snapshot() && !c.is_membership())
            .flat_map(|c| [case(c, "raft", 3), case(c, "raft", 5)])
            // A second vote after a lost campaign needs, in a group of three, the winner's
            // request to overtake both refusals and to come before the winner's first append
            // (the loser then has no leader): about one raft seed in 150 builds it (13 of
            // seeds 500..2500, none of 0..500). Five nodes lose campaigns far more often, and
            // the queue workload (the default, three nodes) catches it within 100 seeds.
            .filter(|c| !(c.canary == Canary::ForgetVoteOnStepDown && c.nodes == 3))
            .collect();
        expect_caught(cases, false, "raft", &RAFT_CHECKERS);
    }

    /// The storage canaries, on both workloads: each caught within 500 seeds, and each disk
    /// checker the first to catch at least one.
    #[test]
    fn every_disk_canary_is_caught_within_500_seeds_and_every_disk_checker_catches_one() {
        let cases = Canary::ALL
            .into_iter()
            .filter(|c| c.is_disk() && !c.is_snapshot())
            .flat_map(|c| [case(c, "raft", 3), case(c, "queue", 3)])
            .collect();
        expect_caught(cases, true, "disk", &DISK_CHECKERS);
    }

    #[test]
    fn every_queue_canary_is_caught_within_500_seeds_and_every_queue_checker_catches_one() {
        let cases = Canary::ALL
            .into_iter()
            .filter(|c| !c.is_raft() && !c.is_snapshot())
            .map(|c| case(c, "queue", 3))
            .collect();
        expect_caught(cases, false, "queue", &QUEUE_CHECKERS);
    }

    /// The membership canaries on the Raft workload (half its seeds change membership): each
    /// caught within 500 seeds on 3 and 5 nodes, and each membership checker the first to
    /// catch one.
    #[test]
    fn every_membership_canary_is_caught_within_500_seeds_and_every_membership_checker_catches_one()
    {
        let cases = Canary::ALL
            .into_iter()
            .filter(|c| c.is_membership())
            .flat_map(|c| [case(c, "raft", 3), case(c, "raft", 5)])
            .collect();
        expect_caught(cases, true, "membership", &MEMBERSHIP_CHECKERS);
    }

    /// The membership canaries on the queue workload, whose operator changes membership
    /// through the node's requests in half its seeds: each caught within 500 seeds, and each
    /// membership checker but config-quorum the first to catch one there too.
    #[test]
    fn every_membership_canary_is_caught_on_the_queue_workload_by_every_membership_checker() {
        // Which checker sees a canary first depends on the seeds' draws: on this workload
        // config-election sees config-on-commit before config-quorum does on 3 and 5 nodes
        // (since the operator waits out its stray changes, sim/regressions.txt 42001074).
        // config-quorum is the same `membership::check_step` on both workloads, and is shown
        // to catch config-on-commit first on the Raft workload (the test above).
        let cases = Canary::ALL
            .into_iter()
            .filter(|c| c.is_membership())
            .flat_map(|c| [case(c, "queue", 3), case(c, "queue", 5)])
            .collect();
        let checkers: Vec<&str> = MEMBERSHIP_CHECKERS
            .into_iter()
            .filter(|c| *c != "config-quorum")
            .collect();
        expect_caught(cases, true, "membership", &checkers);
    }

    /// The snapshot canaries, each on the workload whose code it plants a bug in (the Raft
    /// core's and the simulated disk's on the Raft workload, the broker's on the queue):
    /// each caught within 500 seeds, and each snapshot checker the first to catch one.
    #[test]
    fn every_snapshot_canary_is_caught_within_500_seeds_and_every_snapshot_checker_catches_one() {
        let cases = Canary::ALL
            .into_iter()
            .filter(|c| c.is_snapshot())
            .map(|c| case(c, if c.is_raft() { "raft" } else { "queue" }, 3))
            .collect();
        expect_caught(cases, true, "snapshot", &SNAPSHOT_CHECKERS);
    }
}

#[test]
fn a_fault_script_chooses_the_faults_and_replays_bit_for_bit() {
    let scripted = |script: &[u8]| {
        let mut options = raft(11);
        options.fault_phase_ms = 3_000;
        options.fault_script = Some(script.to_vec());
        run(&options)
    };
    let script: Vec<u8> = (0u8..=255).map(|b| b.wrapping_mul(37)).collect();
    let first = scripted(&script);
    assert!(first.violation.is_none(), "{:?}", first.violation);
    assert_eq!(
        first.trace_hash,
        scripted(&script).trace_hash,
        "deterministic"
    );
    let mut other = script.clone();
    other[0] ^= 0x80; // the first fault's kind
    assert_ne!(
        first.trace_hash,
        scripted(&other).trace_hash,
        "one byte of the script changes the run"
    );
    let unscripted = run(&{
        let mut options = raft(11);
        options.fault_phase_ms = 3_000;
        options
    });
    assert_ne!(
        first.trace_hash, unscripted.trace_hash,
        "the script, not the seed, chose"
    );
}
