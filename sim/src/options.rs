//! What one simulated run looks like: cluster shape, phase lengths, the planted bug.

use holdfast_core::raft::Canary;

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Producers and consumer groups on a topic, over whole broker nodes.
    Queue,
    /// Clients proposing raw batches straight to Raft replicas.
    Raft,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub workload: Workload,
    pub seed: u64,
    /// Nodes in the cluster; every group has a replica on every node.
    pub nodes: usize,
    /// Raft groups in the Raft workload; broker groups (at least 2) in the queue workload.
    pub groups: usize,
    /// A planted bug for every replica; effective only with the `canaries` feature.
    pub canary: Option<Canary>,
    /// Simulated time during which faults are injected.
    pub fault_phase_ms: u64,
    /// After the fault phase everything heals; within this much simulated time every group
    /// must have a leader and every pending proposal must resolve.
    pub liveness_limit_ms: u64,
    /// Keep a readable line per event (the trace hash is computed either way).
    pub trace: bool,
    /// Chooses the fault schedule byte by byte instead of the seed (see
    /// [`crate::faults::FaultScript`]); everything else still comes from the seed.
    pub fault_script: Option<Vec<u8>>,
    /// How the fault mix is chosen: drawn from the seed, or pinned.
    pub faults: crate::swarm::FaultMix,
    /// Apply only these faults, by their number in the run (0 is the first drawn); the rest
    /// are drawn, so what follows them is unchanged, but not applied. What `shrink` narrows.
    pub only_faults: Option<std::collections::BTreeSet<u64>>,
}

impl Options {
    /// What this seed explores: its fault mix and workload knobs.
    pub fn swarm(&self) -> crate::swarm::Swarm {
        crate::swarm::Swarm::new(self.seed, self.workload, &self.faults)
    }

    /// Whether fault number `n` of the run is applied.
    pub fn applies_fault(&self, n: u64) -> bool {
        self.only_faults
            .as_ref()
            .is_none_or(|only| only.contains(&n))
    }

    pub fn new(seed: u64) -> Options {
        Options {
            workload: Workload::Queue,
            seed,
            nodes: 3,
            groups: 1,
            canary: None,
            fault_phase_ms: 10_000,
            liveness_limit_ms: 20_000,
            trace: false,
            fault_script: None,
            faults: crate::swarm::FaultMix::Swarm,
            only_faults: None,
        }
    }
}
