//! The simulated network: per-message delay, loss, duplication, and directed partitions.

use std::collections::BTreeSet;

use holdfast_core::raft::NodeId;

#[derive(Clone)]
pub struct Network {
    /// Directed links that drop everything: `(from, to)`.
    pub blocked: BTreeSet<(NodeId, NodeId)>,
    pub loss_ppm: u32,
    pub duplicate_ppm: u32,
    /// Of every million peer messages, how many also arrive once more much later (see
    /// `faults::late_delay`); zero unless the `late-messages` fault is on.
    pub late_ppm: u32,
    pub delay_min_us: u64,
    pub delay_max_us: u64,
}

impl Network {
    pub const CALM_DELAY_MIN_US: u64 = 200;
    pub const CALM_DELAY_MAX_US: u64 = 5_000;

    pub fn calm() -> Network {
        Network {
            blocked: BTreeSet::new(),
            loss_ppm: 0,
            duplicate_ppm: 0,
            late_ppm: 0,
            delay_min_us: Self::CALM_DELAY_MIN_US,
            delay_max_us: Self::CALM_DELAY_MAX_US,
        }
    }

    pub fn heal(&mut self) {
        *self = Network::calm();
    }

    pub fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked.contains(&(from, to))
    }

    /// Cuts every link between `side` and the rest, both ways.
    pub fn split(&mut self, side: &[NodeId], all: &[NodeId]) {
        self.blocked.clear();
        for a in side {
            for b in all.iter().filter(|b| !side.contains(b)) {
                self.blocked.insert((*a, *b));
                self.blocked.insert((*b, *a));
            }
        }
    }

    /// Cuts the links in one direction only: `node` can hear but not be heard (or the
    /// opposite when `outbound` is false).
    pub fn one_way(&mut self, node: NodeId, all: &[NodeId], outbound: bool) {
        self.blocked.clear();
        for other in all.iter().filter(|o| **o != node) {
            let link = if outbound {
                (node, *other)
            } else {
                (*other, node)
            };
            self.blocked.insert(link);
        }
    }
}
