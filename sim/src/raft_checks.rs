//! The Raft checks a world runs around every step of a replica, whoever drives the replica
//! (the Raft workload drives replicas directly, the queue workload drives whole nodes).

use holdfast_core::raft::{Entry, GroupId, Index, NodeId, Replica, Role, Status, Term, Write};

use crate::checker::{Checker, LogView, Violation, violation};
use crate::disk::Disk;

/// What the checkers last saw of one replica, in its current incarnation.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaView {
    pub commit: Index,
    pub applied: Index,
    pub role: Role,
    pub term: Term,
}

impl ReplicaView {
    pub fn new(status: &Status) -> ReplicaView {
        ReplicaView {
            commit: status.commit_index,
            applied: 0,
            role: status.role,
            term: status.term,
        }
    }
}

/// The end of `replica`'s in-memory log, and its term at `index`.
pub fn log_view(replica: &Replica, index: Index) -> LogView {
    let status = replica.status();
    LogView {
        last_index: status.last_index,
        last_term: replica.entry(status.last_index).map_or(0, |e| e.term),
        term_at_index: replica.entry(index).map(|e| e.term),
        damaged: replica.damaged_from().is_some(),
    }
}

/// A replica hands `write` to its disk: log matching, and no rewrite below its commit.
pub fn check_write(
    checker: &mut Checker,
    node: NodeId,
    group: GroupId,
    view: &ReplicaView,
    replica: &Replica,
    write: &Write,
) -> Result<(), Violation> {
    let Some(first) = write.entries.first() else {
        return Ok(());
    };
    let prev_term = match first.index {
        0 | 1 => 0,
        i => replica.entry(i - 1).map_or(0, |e| e.term),
    };
    checker.written(group, node, &write.entries, prev_term)?;
    Checker::rewrite(group, node, first.index, view.commit)
}

/// A replica applied `entry` while in `term`.
pub fn check_applied(
    checker: &mut Checker,
    node: NodeId,
    group: GroupId,
    view: &mut ReplicaView,
    term: Term,
    entry: &Entry,
) -> Result<(), Violation> {
    checker.applied(group, node, term, entry, view.applied + 1)?;
    view.applied = entry.index;
    Ok(())
}

/// Checks a replica's state after a step: commit, durable index, leadership, and commit
/// safety against every node's logs (`logs(index)`, this node's included). Returns whether
/// the replica just became leader of a new term.
pub fn check_status(
    checker: &mut Checker,
    node: NodeId,
    group: GroupId,
    view: &mut ReplicaView,
    replica: &Replica,
    disk: &Disk,
    logs: &dyn Fn(Index) -> Vec<(NodeId, LogView, Option<LogView>)>,
) -> Result<bool, Violation> {
    let status = replica.status();
    if status.commit_index < view.commit || status.commit_index > status.last_index {
        return Err(violation(
            "commit-monotonic",
            format!(
                "group {group} node {node}: commit went from {} to {} (last index {})",
                view.commit, status.commit_index, status.last_index
            ),
        ));
    }
    let newly_committed = status.commit_index > view.commit;
    view.commit = status.commit_index;
    let durable = status.durable_index;
    let durable_term = replica.entry(durable).map(|e| e.term);
    if durable > 0 && disk.term_at(durable) != durable_term {
        return Err(violation(
            "durable-index",
            format!(
                "group {group} node {node} claims {durable} durable (term {durable_term:?}) \
                 but its disk holds {:?} there and ends at {}",
                disk.term_at(durable),
                disk.last_index()
            ),
        ));
    }
    if let Some(leader) = status.leader.filter(|l| *l != node) {
        checker.follows(group, node, status.term, leader)?;
    }
    let mut elected = false;
    if status.role == Role::Leader {
        checker.leader(group, status.term, node)?;
        if view.role != Role::Leader || view.term != status.term {
            elected = true;
            checker.leader_complete(group, replica)?;
        }
    }
    view.role = status.role;
    view.term = status.term;
    if status.role == Role::Leader && newly_committed {
        let index = status.commit_index;
        let term = replica.entry(index).map_or(0, |e| e.term);
        Checker::commit_safe(group, node, index, term, &logs(index))?;
    }
    Ok(elected)
}

/// A replica restarted: it must hold exactly what its disk holds, and its commit must not be
/// below the durable one.
pub fn check_recovery(
    node: NodeId,
    group: GroupId,
    status: &Status,
    disk: &Disk,
) -> Result<(), Violation> {
    let durable = (
        disk.hard_state.term,
        disk.hard_state.vote,
        disk.last_index(),
    );
    if (status.term, status.vote, status.last_index) != durable {
        return Err(violation(
            "recovery",
            format!(
                "group {group} node {node} restarted with term {} vote {:?} last index {} \
                 but its disk holds term {} vote {:?} last index {}",
                status.term, status.vote, status.last_index, durable.0, durable.1, durable.2
            ),
        ));
    }
    if status.commit_index < disk.hard_state.commit.min(disk.last_index()) {
        return Err(violation(
            "commit-monotonic",
            format!(
                "group {group} node {node} restarted with commit {} below its durable commit {}",
                status.commit_index, disk.hard_state.commit
            ),
        ));
    }
    Ok(())
}
