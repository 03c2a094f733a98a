//! Membership change as a fault, and the checkers of configuration safety.
//!
//! Self-contained on purpose: it knows nothing of a world, only Raft's types. The Raft
//! workload asks [`Plan`] how many spare nodes to start (outside every group's configuration)
//! and, from time to time, which single-server change to ask a group's leader for; the queue
//! workload's operator asks its nodes for changes through the requests an operator sends
//! (`queue/operator.rs`). Both report granted votes to a [`Tally`] and call the `check_*`
//! functions at the moments they name, with [`commit_holders`] from their disks; the queue
//! workload, whose nodes append configurations on their own, calls [`check_step`] after every
//! step instead.
//!
//! The checkers:
//! - `config-quorum`: whenever a leader's commit index advances, a majority of the voters of
//!   the latest configuration in its log (committed or not) hold the entry on disk. This is
//!   "nothing committed by a majority of an old configuration alone" and "no removed node (nor
//!   learner) counted in a quorum" at once: only current voters count.
//! - `config-election`: a replica that becomes leader received granted votes from a majority
//!   of the voters of its configuration (itself included); a learner's or a removed node's
//!   grant counts for nothing.
//! - `one-change-at-a-time`: a leader appends a configuration only once the previous one in
//!   its log is committed.
//!
//! "At most one leader per term under any configuration" is the world's `one-leader-per-term`
//! checker, which never looked at configurations in the first place.

use std::collections::{BTreeMap, BTreeSet};

use holdfast_core::raft::{
    ConfChange, Envelope, GroupId, Index, Membership, Message, NodeId, ProposalId, Replica, Role,
    Term,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::{Violation, violation};
use crate::disk::Disk;

/// Proposal ids of membership changes start here, apart from the clients' ids.
pub const PROPOSAL_ID_BASE: ProposalId = 1 << 62;

/// Whether a proposal id is a membership change's (whose fate the world's client must not see).
pub fn is_membership_proposal(id: ProposalId) -> bool {
    id >= PROPOSAL_ID_BASE
}

/// What a world tells the plan about one group, as its leader sees it.
pub struct GroupView<'a> {
    /// The latest configuration in the leader's log.
    pub membership: &'a Membership,
    /// That configuration is not committed yet.
    pub pending: bool,
    /// Every node of the world, members or not.
    pub nodes: &'a [NodeId],
    /// Nodes whose disks were damaged or wiped: never added (a wiped node never votes again).
    pub damaged: &'a BTreeSet<NodeId>,
}

/// Decides which seeds change membership and which changes they ask for, from an RNG of its
/// own: a seed that does not change membership runs exactly as it did before this existed.
pub struct Plan {
    rng: ChaCha8Rng,
    enabled: bool,
    /// The size of the initial configuration: groups keep between this many voters and one
    /// more, so the faults' bound on damage (a minority of the initial nodes) stays a minority.
    voters_min: usize,
    next_id: ProposalId,
}

impl Plan {
    /// Half the seeds change membership.
    pub fn new(seed: u64, nodes: usize) -> Plan {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d65_6d62_6572_7321);
        let enabled = rng.random_bool(0.5);
        Plan {
            rng,
            enabled,
            voters_min: nodes,
            next_id: PROPOSAL_ID_BASE,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Nodes to start beside the initial ones, in no group's configuration: room to add and
    /// replace.
    pub fn spare_nodes(&self) -> usize {
        if self.enabled { 2 } else { 0 }
    }

    /// Milliseconds until the next change is asked for.
    pub fn gap_ms(&mut self) -> u64 {
        self.rng.random_range(100..800)
    }

    /// An id for the next change's proposal.
    pub fn proposal_id(&mut self) -> ProposalId {
        self.next_id += 1;
        self.next_id
    }

    /// The change to ask the leader for, if any. Now and then one while another is pending,
    /// which the leader must refuse.
    pub fn choose(&mut self, view: &GroupView<'_>) -> Option<ConfChange> {
        if view.pending && !self.rng.random_bool(0.2) {
            return None;
        }
        let membership = view.membership;
        if let Some(&learner) = membership.learners.iter().next() {
            // Promoted once caught up (the leader refuses until then); sometimes given up.
            return Some(if self.rng.random_bool(0.15) {
                ConfChange::Remove(learner)
            } else {
                ConfChange::Promote(learner)
            });
        }
        let outsiders: Vec<NodeId> = view
            .nodes
            .iter()
            .copied()
            .filter(|n| !membership.contains(*n) && !view.damaged.contains(n))
            .collect();
        let voters: Vec<NodeId> = membership.voters.iter().copied().collect();
        let may_add = voters.len() <= self.voters_min && !outsiders.is_empty();
        let may_remove = voters.len() > self.voters_min;
        if may_add && (!may_remove || self.rng.random_bool(0.5)) {
            let new = outsiders[self.rng.random_range(0..outsiders.len())];
            return Some(ConfChange::AddLearner(new));
        }
        if may_remove {
            // Any voter, the leader included: a replacement is an add, a promotion and this.
            let old = voters[self.rng.random_range(0..voters.len())];
            return Some(ConfChange::Remove(old));
        }
        None
    }
}

/// The fault name a change is counted under.
pub fn fault_name(change: ConfChange) -> &'static str {
    match change {
        ConfChange::AddLearner(_) => "member-add",
        ConfChange::Promote(_) => "member-promote",
        ConfChange::Remove(_) => "member-remove",
    }
}

/// Granted votes as delivered, per group, term and candidate.
#[derive(Default)]
pub struct Tally {
    grants: BTreeMap<(GroupId, Term, NodeId), BTreeSet<NodeId>>,
}

impl Tally {
    /// Call for every message delivered to a running replica, before it is stepped.
    pub fn delivered(&mut self, envelope: &Envelope) {
        if let Message::VoteResponse {
            term,
            granted: true,
        } = envelope.message
        {
            self.grants
                .entry((envelope.group, term, envelope.to))
                .or_default()
                .insert(envelope.from);
        }
    }

    /// config-election: `leader` just became leader of `term` with `voters` as its
    /// configuration's voters.
    pub fn check_elected(
        &self,
        group: GroupId,
        leader: NodeId,
        term: Term,
        voters: &BTreeSet<NodeId>,
    ) -> Result<(), Violation> {
        let empty = BTreeSet::new();
        let grants = self.grants.get(&(group, term, leader)).unwrap_or(&empty);
        let counted: BTreeSet<NodeId> = grants
            .iter()
            .copied()
            .chain(std::iter::once(leader))
            .filter(|n| voters.contains(n))
            .collect();
        if 2 * counted.len() <= voters.len() {
            return Err(violation(
                "config-election",
                format!(
                    "group {group}: n{leader} leads term {term} with grants from {grants:?}, of \
                     which only {counted:?} are voters of its configuration {voters:?}"
                ),
            ));
        }
        Ok(())
    }
}

/// config-quorum: `leader` advanced its commit index to `index` (of `term`) with `voters` the
/// voters of the latest configuration in its log; `holders` are the nodes whose disks hold the
/// entry (or a snapshot past it, or that a fault damaged and so may have lost it).
pub fn check_commit_quorum(
    group: GroupId,
    leader: NodeId,
    (index, term): (Index, Term),
    voters: &BTreeSet<NodeId>,
    holders: &BTreeSet<NodeId>,
) -> Result<(), Violation> {
    let counted: BTreeSet<NodeId> = holders.intersection(voters).copied().collect();
    if 2 * counted.len() <= voters.len() {
        return Err(violation(
            "config-quorum",
            format!(
                "group {group}: n{leader} committed {index}@{term} held by {holders:?}, of which \
                 only {counted:?} are voters of its latest configuration {voters:?}"
            ),
        ));
    }
    Ok(())
}

/// one-change-at-a-time: `leader` appended a configuration at `appended` when the latest one
/// in its log was at `previous` and its commit index `commit`.
pub fn check_one_at_a_time(
    group: GroupId,
    leader: NodeId,
    previous: Index,
    commit: Index,
    appended: Index,
) -> Result<(), Violation> {
    if previous > commit {
        return Err(violation(
            "one-change-at-a-time",
            format!(
                "group {group}: n{leader} appended a configuration at {appended} while the one \
                 at {previous} was uncommitted (commit {commit})"
            ),
        ));
    }
    Ok(())
}

/// The nodes among `voters` whose disks hold the entry `(index, term)`: in their log, under
/// their snapshot, or possibly (a fault damaged the disk, and what it lost is unknown).
pub fn commit_holders<'a>(
    (index, term): (Index, Term),
    voters: &BTreeSet<NodeId>,
    disk_of: &dyn Fn(NodeId) -> Option<&'a Disk>,
) -> BTreeSet<NodeId> {
    let holds = |disk: &Disk| {
        disk.is_damaged() || index <= disk.snapshot_index() || disk.term_at(index) == Some(term)
    };
    voters
        .iter()
        .copied()
        .filter(|n| disk_of(*n).is_some_and(holds))
        .collect()
}

/// What the configuration checkers last saw of one replica in its current incarnation.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigSeen {
    /// The index of the latest configuration in its log.
    pub index: Index,
    /// The term it led in, if it was leader.
    pub led: Option<Term>,
    pub commit: Index,
}

impl ConfigSeen {
    pub fn new(replica: &Replica) -> ConfigSeen {
        let status = replica.status();
        ConfigSeen {
            index: replica.latest_membership().0,
            led: (status.role == Role::Leader).then_some(status.term),
            commit: status.commit_index,
        }
    }
}

/// The three configuration checkers after a step of `node`'s replica of `group`, for a world
/// whose replicas append configurations on their own (a node does, on an operator's request):
/// `seen` is what the step before left (updated here), `committed` whether the step advanced
/// the commit index, `elected` whether it made the replica leader of a new term.
/// one-change-at-a-time is judged against the commit index before the step: a node appends a
/// configuration only on an operator's request, in a step that commits nothing before the
/// append (the append itself may commit more: the new configuration's quorum can be smaller,
/// which is how a second change while one is pending commits the first behind its back). The
/// world must call this after every step of the replica, so that `seen` is the step before's.
#[allow(clippy::too_many_arguments)]
pub fn check_step<'a>(
    tally: &Tally,
    node: NodeId,
    group: GroupId,
    replica: &Replica,
    seen: &mut ConfigSeen,
    committed: bool,
    elected: bool,
    disk_of: &dyn Fn(NodeId) -> Option<&'a Disk>,
) -> Result<(), Violation> {
    let before = *seen;
    *seen = ConfigSeen::new(replica);
    let status = replica.status();
    if status.role != Role::Leader {
        return Ok(());
    }
    let voters = &replica.latest_membership().1.voters;
    if elected {
        tally.check_elected(group, node, status.term, voters)?;
    }
    // A configuration appended by this leader in this term (one it received as a follower
    // came before it led: a replica is elected and appends in separate steps).
    if before.led == Some(status.term) && seen.index > before.index {
        check_one_at_a_time(group, node, before.index, before.commit, seen.index)?;
    }
    if committed {
        let index = status.commit_index;
        if let Some(term) = crate::raft_checks::term_of(replica, index) {
            let holders = commit_holders((index, term), voters, disk_of);
            check_commit_quorum(group, node, (index, term), voters, &holders)?;
        }
    }
    Ok(())
}
