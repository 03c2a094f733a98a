//! The fault schedule of the safety phase, and the healing that starts the liveness phase.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::{Event, LIVENESS_CHECK_INTERVAL_MS, Phase, Step, World, ms};
use crate::checker::{Violation, violation};
use holdfast_core::raft::{GroupId, Replica, Role};

impl World {
    pub(super) fn fault(&mut self) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        let all = self.node_ids.clone();
        let pick = |rng: &mut ChaCha8Rng| all[rng.random_range(0..all.len())];
        let kind: &'static str = match self.rng.random_range(0..100) {
            0..12 => {
                let node = pick(&mut self.rng);
                self.network.split(&[node], &all);
                "isolate"
            }
            12..22 => {
                let minority = self.rng.random_range(1..=(all.len() - 1) / 2);
                let mut side = all.clone();
                for i in 0..side.len() {
                    let j = self.rng.random_range(i..side.len());
                    side.swap(i, j);
                }
                side.truncate(minority);
                self.network.split(&side, &all);
                "partition"
            }
            22..32 => {
                let node = pick(&mut self.rng);
                let outbound = self.rng.random_bool(0.5);
                self.network.one_way(node, &all, outbound);
                "one-way"
            }
            32..47 => {
                self.network.blocked.clear();
                "heal-partition"
            }
            47..62 => {
                let node = pick(&mut self.rng);
                if !self.node(node).up {
                    return self.next_fault();
                }
                self.crash(node)?;
                "crash"
            }
            62..72 => {
                let node = pick(&mut self.rng);
                let until = self.now + ms(self.rng.random_range(10..1_500));
                self.node_mut(node).paused_until = until;
                "pause"
            }
            72..80 => {
                self.network.loss_ppm = self.rng.random_range(10_000..300_000);
                self.network.duplicate_ppm = self.rng.random_range(0..100_000);
                "lossy-network"
            }
            80..88 => {
                self.network.delay_min_us = 1_000;
                self.network.delay_max_us = self.rng.random_range(10_000..200_000);
                "slow-network"
            }
            88..94 => {
                let blocked = std::mem::take(&mut self.network.blocked);
                self.network.heal();
                self.network.blocked = blocked;
                "calm-network"
            }
            _ => {
                let node = pick(&mut self.rng);
                let n = self.node_mut(node);
                if n.fsync_max_us > 2_000 {
                    (n.fsync_min_us, n.fsync_max_us) = (50, 2_000);
                } else {
                    (n.fsync_min_us, n.fsync_max_us) = (1_000, 50_000);
                }
                "slow-disk"
            }
        };
        *self.stats.faults.entry(kind).or_default() += 1;
        self.trace.record(self.now, &[11, kind.len() as u64], || {
            format!("FAULT {kind} blocked={:?}", self.network.blocked)
        });
        self.next_fault()
    }

    pub(super) fn next_fault(&mut self) -> Result<(), Violation> {
        let at = self.now + ms(self.rng.random_range(20..600));
        if at < self.heal_at {
            self.schedule(at, Event::Fault);
        }
        Ok(())
    }

    pub(super) fn heal(&mut self) -> Result<(), Violation> {
        self.phase = Phase::Liveness;
        self.network.heal();
        self.trace
            .record(self.now, &[12], || "HEAL: liveness phase".into());
        for node in self.node_ids.clone() {
            let n = self.node_mut(node);
            (n.fsync_min_us, n.fsync_max_us) = (50, 2_000);
            if !n.up {
                self.start(node)?;
            }
        }
        let at = self.now + ms(LIVENESS_CHECK_INTERVAL_MS);
        self.schedule(at, Event::LivenessCheck);
        Ok(())
    }

    pub(super) fn liveness_check(&mut self) -> Result<Step, Violation> {
        let mut waiting_for = None;
        for group in self.groups() {
            if let Err(why) = self.converged(group) {
                waiting_for = Some(why);
                break;
            }
        }
        let Some(why) = waiting_for else {
            self.trace.record(self.now, &[13], || "CONVERGED".into());
            return Ok(Step::Done);
        };
        if self.now >= self.deadline {
            return Err(violation(
                "liveness",
                format!(
                    "not converged {} ms after healing: {why}",
                    self.options.liveness_limit_ms
                ),
            ));
        }
        let at = self.now + ms(LIVENESS_CHECK_INTERVAL_MS);
        self.schedule(at, Event::LivenessCheck);
        Ok(Step::Continue)
    }

    /// A group has converged when one leader of the highest term has committed its whole log,
    /// every replica has caught up with it, and the client has nothing left pending.
    pub(super) fn converged(&self, group: GroupId) -> Result<(), String> {
        let statuses: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|n| n.slots[(group - 1) as usize].as_ref()?.replica.as_ref())
            .map(Replica::status)
            .collect();
        let term_max = statuses.iter().map(|s| s.term).max().unwrap_or(0);
        let Some(leader) = statuses
            .iter()
            .find(|s| s.role == Role::Leader && s.term == term_max)
        else {
            return Err(format!("group {group} has no leader in term {term_max}"));
        };
        if leader.commit_index != leader.last_index {
            return Err(format!(
                "group {group} leader n{} committed {} of {}",
                leader.id, leader.commit_index, leader.last_index
            ));
        }
        if let Some(behind) = statuses
            .iter()
            .find(|s| s.commit_index != leader.commit_index || s.applied_index != s.commit_index)
        {
            return Err(format!(
                "group {group} n{} has commit {} applied {}, leader n{} has {}",
                behind.id,
                behind.commit_index,
                behind.applied_index,
                leader.id,
                leader.commit_index
            ));
        }
        let client = &self.clients[(group - 1) as usize];
        if client.needs_more() || !client.pending.is_empty() {
            return Err(format!(
                "group {group}: {} proposals pending, a post-heal proposal committed: {}",
                client.pending.len(),
                client.committed_after_heal
            ));
        }
        Ok(())
    }
}
