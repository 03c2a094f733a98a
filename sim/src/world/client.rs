//! The clients: one producer per group, proposing batches to whoever it believes leads.

use bytes::Bytes;
use holdfast_core::raft::{
    Entry, EntryKind, GroupId, NodeId, ProposalFate, ProposalOutcome, ProposeError,
};
use rand::RngExt;

use super::{COMMANDS_PER_PROPOSAL_MAX, Event, Pending, World};
use crate::checker::{Violation, digest, violation};
use crate::kernel::{Host, Phase, ms};

/// A proposal that reaches a leader is, one time in this many, a request to hand leadership
/// to another node instead.
const TRANSFER_ONE_IN: u32 = 200;

impl World {
    pub(super) fn propose(&mut self, group: GroupId) -> Result<(), Violation> {
        let now = self.k.now;
        if self.k.phase == Phase::Liveness && !self.clients[(group - 1) as usize].needs_more() {
            return Ok(());
        }
        let next_at = match self.k.phase {
            Phase::Faults => now + ms(self.k.rng.random_range(1..20)),
            Phase::Liveness => now + ms(10),
        };
        self.k.schedule(next_at, Event::Propose { group });

        let reachable = |n: &Host| n.up && n.paused_until <= now;
        let hint = self.clients[(group - 1) as usize]
            .leader_hint
            .filter(|h| reachable(self.host(*h)));
        let target = match hint {
            Some(h) => h,
            None => {
                let candidates: Vec<NodeId> = self
                    .node_ids
                    .iter()
                    .copied()
                    .filter(|n| reachable(self.host(*n)))
                    .collect();
                if candidates.is_empty() {
                    return Ok(());
                }
                candidates[self.k.rng.random_range(0..candidates.len())]
            }
        };
        let id = self.next_proposal;
        self.next_proposal += 1;
        let count = self.k.rng.random_range(1..=COMMANDS_PER_PROPOSAL_MAX);
        let commands: Vec<Bytes> = (0..count)
            .map(|k| {
                let mut command = Vec::with_capacity(24);
                command.extend_from_slice(&group.to_le_bytes());
                command.extend_from_slice(&id.to_le_bytes());
                command.extend_from_slice(&k.to_le_bytes());
                Bytes::from(command)
            })
            .collect();
        let hash = digest(&Entry {
            term: 0,
            index: 0,
            kind: EntryKind::Commands(commands.clone()),
        });
        let after_heal = self.k.phase == Phase::Liveness;
        // Now and then the client asks the leader to hand over to a random other node
        // instead, so transfers (TimeoutNow, transfer votes, proposals refused meanwhile,
        // transfers given up) run under every fault and every checker.
        let others: Vec<NodeId> = self
            .node_ids
            .iter()
            .copied()
            .filter(|n| *n != target)
            .collect();
        let transfer_to = (!others.is_empty() && self.k.rng.random_ratio(1, TRANSFER_ONE_IN))
            .then(|| others[self.k.rng.random_range(0..others.len())]);
        let Some(replica) = self
            .live_slot(target, group)
            .and_then(|s| s.replica.as_mut())
        else {
            return Ok(());
        };
        if let Some(to) = transfer_to
            && replica.status().role == holdfast_core::raft::Role::Leader
        {
            let started = replica.transfer_leadership(now, to);
            self.k.stats.transfers_asked += 1;
            self.k.stats.transfers_started += u64::from(started.is_ok());
            self.k.trace.record(now, &[12, target, group, to], || {
                format!("n{target} g{group} transfer leadership to n{to}: {started:?}")
            });
            return self.drain(target, group);
        }
        let result = replica.propose(now, id, commands);
        self.k.trace.record(now, &[9, target, group, id], || {
            format!("n{target} g{group} propose #{id} ({count} commands): {result:?}")
        });
        let client = &mut self.clients[(group - 1) as usize];
        match result {
            Ok(index) => {
                client.pending.insert(
                    id,
                    Pending {
                        node: target,
                        index,
                        hash,
                        after_heal,
                    },
                );
            }
            Err(ProposeError::NotLeader { leader_hint }) => client.leader_hint = leader_hint,
            Err(ProposeError::Transferring { to }) => client.leader_hint = Some(to),
            Err(ProposeError::Busy) => {}
        }
        self.drain(target, group)
    }

    pub(super) fn fate(
        &mut self,
        node: NodeId,
        group: GroupId,
        fate: ProposalFate,
    ) -> Result<(), Violation> {
        let client = &mut self.clients[(group - 1) as usize];
        let Some(pending) = client.pending.remove(&fate.id) else {
            return Err(violation(
                "acked-stays",
                format!(
                    "group {group} node {node} reported the fate of unknown proposal #{}",
                    fate.id
                ),
            ));
        };
        self.k
            .trace
            .record(self.k.now, &[10, node, group, fate.id], || {
                format!("n{node} g{group} proposal #{} {:?}", fate.id, fate.outcome)
            });
        match fate.outcome {
            ProposalOutcome::Committed { index } => {
                if index != pending.index {
                    return Err(violation(
                        "acked-stays",
                        format!(
                            "group {group}: proposal #{} accepted at index {} reported committed at {index}",
                            fate.id, pending.index
                        ),
                    ));
                }
                if pending.after_heal {
                    client.committed_after_heal = true;
                }
                self.k.stats.proposals_acked += 1;
                self.checker.acked(group, index, pending.hash)
            }
            ProposalOutcome::Dropped { leader_hint } => {
                client.leader_hint = leader_hint;
                self.k.stats.proposals_dropped += 1;
                Ok(())
            }
        }
    }
}
