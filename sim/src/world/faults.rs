//! The liveness phase of the Raft workload: when its groups have converged.

use super::{Event, LIVENESS_CHECK_INTERVAL_MS, Step, World, ms};
use crate::checker::{Violation, violation};
use holdfast_core::raft::{GroupId, Replica, Role};

impl World {
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
            self.k
                .trace
                .record(self.k.now, &[13], || "CONVERGED".into());
            return Ok(Step::Done);
        };
        if self.k.now >= self.k.deadline {
            return Err(violation(
                "liveness",
                format!(
                    "not converged {} ms after healing: {why}",
                    self.k.options.liveness_limit_ms
                ),
            ));
        }
        let at = self.k.now + ms(LIVENESS_CHECK_INTERVAL_MS);
        self.k.schedule(at, Event::LivenessCheck);
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
