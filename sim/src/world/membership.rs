//! The Raft workload's glue to [`crate::membership`]: asking leaders for changes, and the
//! disks' view of who holds an entry.

use std::collections::BTreeSet;

use holdfast_core::raft::{ConfChange, GroupId, NodeId, Replica, Role};

use super::{Event, World};
use crate::checker::Violation;
use crate::disk::Disk;
use crate::kernel::{Phase, ms};
use crate::membership::{
    GroupView, check_commit_quorum, check_one_at_a_time, commit_holders, fault_name,
};

impl World {
    /// Asks `group`'s leader (the running one of the highest term) for the change the plan
    /// chooses, during the fault phase.
    pub(super) fn change_membership(&mut self, group: GroupId) -> Result<(), Violation> {
        if self.k.phase != Phase::Faults {
            return Ok(());
        }
        let at = self.k.now + ms(self.membership.gap_ms());
        self.k.schedule(at, Event::Membership { group });
        let index = (group - 1) as usize;
        let leader = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let host = &self.k.hosts[*i];
                host.up && host.paused_until <= self.k.now
            })
            .filter_map(|(i, n)| {
                let replica = n.slots[index].as_ref()?.replica.as_ref()?;
                let status = replica.status();
                (status.role == Role::Leader).then_some((status.term, i as NodeId + 1))
            })
            .max();
        let Some((_, leader)) = leader else {
            return Ok(());
        };
        let damaged: BTreeSet<NodeId> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.slots[index].as_ref().is_some_and(|s| s.disk.is_damaged()))
            .map(|(i, _)| i as NodeId + 1)
            .collect();
        let Some(replica) = self.nodes[(leader - 1) as usize].slots[index]
            .as_ref()
            .and_then(|s| s.replica.as_ref())
        else {
            return Ok(());
        };
        let (previous, membership) = replica.latest_membership();
        let commit = replica.status().commit_index;
        let view = GroupView {
            membership,
            pending: previous > commit,
            nodes: &self.k.node_ids,
            damaged: &damaged,
        };
        let Some(change) = self.membership.choose(&view) else {
            return Ok(());
        };
        let id = self.membership.proposal_id();
        let now = self.k.now;
        let Some(replica) = self.nodes[(leader - 1) as usize].slots[index]
            .as_mut()
            .and_then(|s| s.replica.as_mut())
        else {
            return Ok(());
        };
        let result = replica.propose_membership(now, id, change);
        self.k.trace.record(now, &[17, leader, group], || {
            format!("n{leader} g{group} MEMBERSHIP {change}: {result:?}")
        });
        if let Ok(appended) = result {
            *self.k.stats.faults.entry(fault_name(change)).or_default() += 1;
            check_one_at_a_time(group, leader, previous, commit, appended)?;
            if let ConfChange::Remove(gone) = change {
                self.abandon(group, &|n| n == gone);
            }
        }
        self.drain(leader, group)
    }

    /// The client gives up on its proposals to nodes `gone` says left the configuration: they
    /// may never learn their fate (no leader replicates to them), so they are treated as a
    /// crashed replica's.
    fn abandon(&mut self, group: GroupId, gone: &dyn Fn(NodeId) -> bool) {
        let client = &mut self.clients[(group - 1) as usize];
        let before = client.pending.len();
        let abandoned = &mut self.abandoned;
        client.pending.retain(|id, p| {
            let keep = !gone(p.node);
            if !keep {
                abandoned.insert(*id);
            }
            keep
        });
        self.k.stats.proposals_indeterminate += (before - client.pending.len()) as u64;
    }

    /// Before a liveness check: proposals to nodes outside the latest leader's configuration
    /// (one that proposed after its removal was appended, then lost its leadership before the
    /// removal committed, hears from no leader again).
    pub(super) fn abandon_outside_members(&mut self) {
        if !self.membership.enabled() {
            return;
        }
        for group in self.groups() {
            let index = (group - 1) as usize;
            let members = self
                .nodes
                .iter()
                .filter_map(|n| n.slots[index].as_ref()?.replica.as_ref())
                .filter(|r| r.status().role == Role::Leader)
                .max_by_key(|r| r.status().term)
                .map(|r| r.latest_membership().1.clone());
            if let Some(members) = members {
                self.abandon(group, &|n| !members.contains(n));
            }
        }
    }

    /// config-quorum for `leader`'s replica of `group`, which just advanced its commit index.
    pub(super) fn check_commit_quorum(
        &self,
        leader: NodeId,
        group: GroupId,
        replica: &Replica,
        own_disk: &Disk,
        voters: &BTreeSet<NodeId>,
    ) -> Result<(), Violation> {
        let status = replica.status();
        let index = status.commit_index;
        let Some(term) = crate::raft_checks::term_of(replica, index) else {
            return Ok(());
        };
        let disk_of = |node: NodeId| {
            if node == leader {
                Some(own_disk)
            } else {
                self.nodes[(node - 1) as usize].slots[(group - 1) as usize]
                    .as_ref()
                    .map(|s| &s.disk)
            }
        };
        let holders = commit_holders((index, term), voters, &disk_of);
        check_commit_quorum(group, leader, (index, term), voters, &holders)
    }
}
