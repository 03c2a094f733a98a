//! Coverage: which fault kinds a batch of seeds injected and which protocol paths worth
//! reaching the core took, so that a batch that never builds a state says so instead of
//! passing quietly. The path counts are facts the core counted ([`RaftCounters`],
//! [`NodeStats`], the client library's events and outcomes), harvested from each replica or
//! node before it crashes and at the end of the run; the simulator infers none of them.

use std::collections::BTreeMap;

use holdfast_core::node::NodeStats;
use holdfast_core::raft::RaftCounters;

use crate::options::Workload;
use crate::swarm::KINDS;

/// Faults the worlds inject besides the drawn kinds of [`KINDS`]: a crash that tears an
/// unsynced write, a crash in the middle of taking a snapshot, and (queue workload) a read of
/// the message store that returns flipped bytes or an error.
pub const DERIVED_FAULTS: [&str; 4] = ["torn-write", "snapshot-crash", "read-flip", "read-error"];

/// Protocol paths of the queue workload counted by the broker node and the client library.
pub const QUEUE_PATHS: [&str; 7] = [
    // A request reached a node that does not lead the group and was sent on (`not_leader`).
    "redirect",
    // A listener's ReconsumeLater moved a message to the retry queue (applied).
    "reconsume",
    // A message reconsumed `max_reconsume` times moved to the dead-letter queue (applied).
    "dead-letter",
    // A send whose outcome the producer library could not know (a retry may have stored it
    // twice, or a failure may have stored it).
    "ambiguous-send",
    // A consumer member's queues changed with the group's membership.
    "consumer-rebalance",
    // A follower node restored its broker state from a leader's snapshot.
    "snapshot-restored",
    // A retention trim dropped messages from a queue (applied; seeds that draw retention).
    "retention-trim",
];

/// Paths counted but that no run can reach yet, with why: listed by the summary, never
/// required. Empty today; kept so that a path the workload cannot reach yet is said so.
pub const UNREACHABLE: [(&str, &str); 0] = [];

/// Counts by name: fault kinds and protocol paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub counts: BTreeMap<&'static str, u64>,
}

impl Coverage {
    pub fn bump(&mut self, name: &'static str, by: u64) {
        *self.counts.entry(name).or_default() += by;
    }

    pub fn add(&mut self, other: &Coverage) {
        for (name, count) in &other.counts {
            self.bump(name, *count);
        }
    }

    /// What one replica counted in one incarnation.
    pub fn add_raft(&mut self, counters: &RaftCounters) {
        for (name, count) in counters.named() {
            self.bump(name, count);
        }
    }

    /// What one broker node counted in one incarnation: its replicas' protocol paths and its
    /// own broker paths.
    pub fn add_node(&mut self, stats: &NodeStats) {
        for group in &stats.groups {
            self.add_raft(&group.raft);
            self.bump("reconsume", group.counters.reconsumed);
            self.bump("dead-letter", group.counters.dead_lettered);
            self.bump("snapshot-restored", group.counters.snapshots_restored);
            self.bump("retention-trim", group.counters.retention_trims);
        }
        self.bump(
            "redirect",
            stats.responses.get("not_leader").copied().unwrap_or(0),
        );
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }
}

/// Every fault kind and protocol path a batch of `workload` seeds should reach, in the order
/// the summary prints them.
pub fn expected(workload: Workload) -> Vec<&'static str> {
    let queue = workload == Workload::Queue;
    let mut names: Vec<&'static str> = KINDS
        .iter()
        .copied()
        .filter(|k| queue || *k != "consumer-crash")
        .collect();
    names.extend(
        DERIVED_FAULTS
            .iter()
            .copied()
            .filter(|k| queue || !k.starts_with("read-")),
    );
    names.extend(RaftCounters::default().named().iter().map(|(n, _)| *n));
    if queue {
        names.extend(QUEUE_PATHS);
    }
    names
}

/// The fault kinds and paths of `workload` that `faults` and `paths` never reached.
pub fn never_reached(
    workload: Workload,
    faults: &BTreeMap<&'static str, u64>,
    paths: &Coverage,
) -> Vec<&'static str> {
    expected(workload)
        .into_iter()
        .filter(|name| faults.get(name).copied().unwrap_or(0) == 0 && paths.get(name) == 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_never_reached_path_is_listed_and_a_reached_one_is_not() {
        let mut faults = BTreeMap::new();
        for kind in expected(Workload::Raft) {
            faults.insert(kind, 1);
        }
        let mut paths = Coverage::default();
        assert!(never_reached(Workload::Raft, &faults, &paths).is_empty());
        faults.remove("crash");
        assert_eq!(never_reached(Workload::Raft, &faults, &paths), ["crash"]);
        faults.insert("crash", 1);
        let queue = never_reached(Workload::Queue, &faults, &paths);
        assert!(queue.contains(&"redirect") && queue.contains(&"consumer-crash"));
        paths.bump("redirect", 2);
        assert!(!never_reached(Workload::Queue, &faults, &paths).contains(&"redirect"));
    }
}
