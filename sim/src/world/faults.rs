//! The fault schedule of the safety phase, and the healing that starts the liveness phase.

use rand::RngExt;

use super::{Event, LIVENESS_CHECK_INTERVAL_MS, Node, Phase, Step, World, ms};
use crate::checker::{Violation, violation};
use crate::faults::{self, NodeFault};
use holdfast_core::raft::{GroupId, NodeId, Replica, Role};

impl World {
    pub(super) fn fault(&mut self) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        let number = self.faults_drawn;
        self.faults_drawn += 1;
        let applies = self.options.applies_fault(number);
        // A fault left out (`only_faults`) is drawn all the same, on a copy of the network,
        // so the faults after it stay what they were.
        let mut scratch = self.network.clone();
        let network = if applies {
            &mut self.network
        } else {
            &mut scratch
        };
        let mix = &self.swarm.mix;
        let (kind, node_fault) = match self.fault_script.as_mut() {
            Some(script) => faults::draw(script, network, &self.node_ids, mix),
            None => faults::draw(&mut self.rng, network, &self.node_ids, mix),
        };
        if !applies {
            return self.next_fault();
        }
        match node_fault {
            Some(NodeFault::Crash(node)) => {
                if !self.node(node).up {
                    return self.next_fault();
                }
                self.crash(node)?;
            }
            Some(NodeFault::Pause(node, pause)) => {
                self.node_mut(node).paused_until = self.now + pause;
            }
            Some(NodeFault::ToggleSlowDisk(node)) => {
                let n = self.node_mut(node);
                (n.fsync_min_us, n.fsync_max_us) =
                    faults::toggle_fsync_us((n.fsync_min_us, n.fsync_max_us));
            }
            Some(NodeFault::Corrupt {
                node,
                corruption,
                crash,
            }) => {
                let groups: Vec<GroupId> = self
                    .groups()
                    .filter(|g| self.may_damage(node, *g))
                    .collect();
                if groups.is_empty() {
                    return self.next_fault();
                }
                let group = groups[self.rng.random_range(0..groups.len())];
                let World { nodes, rng, .. } = self;
                let slot = nodes[(node - 1) as usize].slots[(group - 1) as usize].as_mut();
                if !slot.is_some_and(|s| s.disk.corrupt(corruption, rng)) {
                    return self.next_fault();
                }
                if crash && self.node(node).up {
                    self.crash(node)?;
                }
            }
            Some(NodeFault::FailSync(node)) => {
                if !self.node(node).up {
                    return self.next_fault();
                }
                self.node_mut(node).fail_sync = true;
            }
            Some(NodeFault::Wipe(node)) => {
                if !self.groups().all(|g| self.may_damage(node, g)) {
                    return self.next_fault();
                }
                if self.node(node).up {
                    self.crash(node)?;
                }
                for slot in self.node_mut(node).slots.iter_mut().flatten() {
                    slot.disk.wipe();
                }
            }
            Some(NodeFault::IsolateLeader) => {
                let group = self.rng.random_range(1..=self.options.groups as GroupId);
                let leader = self.nodes.iter().enumerate().find_map(|(i, n)| {
                    let replica = n.slots[(group - 1) as usize].as_ref()?.replica.as_ref()?;
                    (n.up && replica.status().role == Role::Leader).then_some(i as NodeId + 1)
                });
                let Some(leader) = leader else {
                    return self.next_fault();
                };
                self.network.split(&[leader], &self.node_ids);
            }
            Some(NodeFault::ConsumerCrash) | None => {}
        }
        *self.stats.faults.entry(kind).or_default() += 1;
        self.trace.record(self.now, &[11, kind.len() as u64], || {
            format!("FAULT #{number} {kind} blocked={:?}", self.network.blocked)
        });
        self.next_fault()
    }

    /// Whether corrupting `node`'s replica of `group` leaves a majority of the group's
    /// replicas undamaged: corruption of a majority is beyond what any design survives, so
    /// a failure under it would prove nothing.
    fn may_damage(&self, node: NodeId, group: GroupId) -> bool {
        let damaged = |n: &Node| {
            n.slots[(group - 1) as usize]
                .as_ref()
                .is_some_and(|s| s.disk.is_damaged())
        };
        if damaged(self.node(node)) {
            return true;
        }
        let others = self.nodes.iter().filter(|n| damaged(n)).count();
        // Counted against the initial nodes: spare nodes added by membership changes do not
        // make room for more damage than the smallest configuration survives.
        others < (self.initial_voters.len() - 1) / 2
    }

    pub(super) fn next_fault(&mut self) -> Result<(), Violation> {
        let gap_ms = match self.fault_script.as_mut() {
            Some(script) => script.random_range(20..600),
            None => self.rng.random_range(20..600),
        };
        let at = self.now + ms(gap_ms);
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
            (n.fsync_min_us, n.fsync_max_us) = faults::FSYNC_US;
            if !n.up {
                self.start(node)?;
            }
        }
        let at = self.now + ms(LIVENESS_CHECK_INTERVAL_MS);
        self.schedule(at, Event::LivenessCheck);
        Ok(())
    }

    pub(super) fn liveness_check(&mut self) -> Result<Step, Violation> {
        self.abandon_outside_members();
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
        let replicas: Vec<&Replica> = self
            .nodes
            .iter()
            .filter_map(|n| n.slots[(group - 1) as usize].as_ref()?.replica.as_ref())
            .collect();
        // Only the members of the latest leader's configuration (every node, unless
        // membership changes): a removed node may never learn it was removed.
        let members = replicas
            .iter()
            .filter(|r| r.status().role == Role::Leader)
            .max_by_key(|r| r.status().term)
            .map(|r| r.latest_membership().1.clone());
        let statuses: Vec<_> = replicas
            .iter()
            .filter(|r| members.as_ref().is_none_or(|m| m.contains(r.status().id)))
            .map(|r| r.status())
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
