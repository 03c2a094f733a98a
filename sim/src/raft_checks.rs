//! The Raft checks a world runs around every step of a replica, whoever drives the replica
//! (the Raft workload drives replicas directly, the queue workload drives whole nodes).

use holdfast_core::raft::{
    Entry, GroupId, Index, NodeId, Replica, Role, Snapshot, Status, Term, Write,
};

use crate::checker::{Checker, LogView, Violation, violation};
use crate::disk::Disk;

/// What the checkers last saw of one replica, in its current incarnation.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaView {
    pub commit: Index,
    pub applied: Index,
    pub role: Role,
    pub term: Term,
    /// The index of the latest snapshot the checkers saw the replica hold.
    pub snapshot: Index,
    /// The last snapshot and next entry `snapshot_continued` found written and agreeing:
    /// what the checker holds of an entry written never changes, so the same pair needs no
    /// second look (it was a lookup in a large map on every step).
    pub continued: Option<(Index, Term, Index, Term)>,
}

impl ReplicaView {
    /// A replica just started: it has applied what its recovered snapshot stands for.
    pub fn new(status: &Status) -> ReplicaView {
        ReplicaView {
            commit: status.commit_index,
            applied: status.snapshot_index,
            role: status.role,
            term: status.term,
            snapshot: status.snapshot_index,
            continued: None,
        }
    }
}

/// The term of `replica`'s entry at `index`: 0 before the log, its snapshot's term at the
/// snapshot's index, `None` below it (compacted) and past the end.
pub fn term_of(replica: &Replica, index: Index) -> Option<Term> {
    if index == 0 {
        return Some(0);
    }
    if let Some(entry) = replica.entry(index) {
        return Some(entry.term);
    }
    replica
        .snapshot()
        .filter(|s| s.index == index)
        .map(|s| s.term)
}

/// The end of `replica`'s in-memory log, and its term at `index`.
pub fn log_view(replica: &Replica, index: Index) -> LogView {
    let status = replica.status();
    LogView {
        last_index: status.last_index,
        last_term: term_of(replica, status.last_index).unwrap_or(0),
        term_at_index: term_of(replica, index),
        damaged: replica.damaged_from().is_some(),
        snapshot_index: status.snapshot_index,
    }
}

/// A replica hands `write` to its disk: log matching, and no rewrite below its commit. (The
/// write's snapshot is the one the replica holds, which [`check_status`] checks once the
/// step's entries are applied, so that the committed sequence reaches it.)
pub fn check_write(
    checker: &mut Checker,
    node: NodeId,
    group: GroupId,
    view: &ReplicaView,
    replica: &Replica,
    write: &Write,
) -> Result<(), Violation> {
    if write.discard_log {
        // Dropping the whole log drops committed entries: only a snapshot that stands for
        // all of them may replace it.
        let covered = write.snapshot.as_ref().map_or(0, |s| s.index);
        if covered < view.commit {
            return Err(violation(
                "committed-prefix",
                format!(
                    "group {group} node {node}: write #{} discards the log (commit {}) for a \
                     snapshot at {covered}",
                    write.id, view.commit
                ),
            ));
        }
        if write
            .entries
            .first()
            .is_some_and(|e| e.index != covered + 1)
        {
            return Err(violation(
                "committed-prefix",
                format!(
                    "group {group} node {node}: write #{} replaces the log by a snapshot at \
                     {covered} and entries from {:?}",
                    write.id,
                    write.entries.first().map(|e| e.index)
                ),
            ));
        }
    }
    let Some(first) = write.entries.first() else {
        return Ok(());
    };
    let prev_term = term_of(replica, first.index - 1).unwrap_or(0);
    checker.written(group, node, &write.entries, prev_term)?;
    Checker::rewrite(group, node, first.index, view.commit)
}

/// A replica installed `snapshot` from its leader and the driver restored its state machine
/// from it: the applied sequence jumps over what the snapshot stands for.
pub fn check_restored(
    checker: &mut Checker,
    node: NodeId,
    group: GroupId,
    view: &mut ReplicaView,
    snapshot: &Snapshot,
) -> Result<(), Violation> {
    if snapshot.index <= view.applied {
        return Err(violation(
            "committed-prefix",
            format!(
                "group {group} node {node} restored a snapshot at {} after applying up to {}",
                snapshot.index, view.applied
            ),
        ));
    }
    checker.snapshot(group, node, snapshot, "installed")?;
    view.applied = snapshot.index;
    Ok(())
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
    if status.applied_index > status.commit_index {
        // State machine safety: only committed entries are applied (a snapshot counts as
        // committed through its index, and installing or restoring one raises the commit).
        return Err(violation(
            "committed-prefix",
            format!(
                "group {group} node {node}: applied through {} but its commit index is {}",
                status.applied_index, status.commit_index
            ),
        ));
    }
    let newly_committed = status.commit_index > view.commit;
    view.commit = status.commit_index;
    let durable = status.durable_index;
    let durable_term = term_of(replica, durable);
    // At or below the disk's snapshot the disk holds it whatever its log; below the
    // replica's own snapshot (compacted in memory) any durable copy will do.
    let held = durable <= disk.snapshot_index()
        || match durable_term {
            Some(term) => disk.term_at(durable) == Some(term),
            None => disk.term_at(durable).is_some(),
        };
    if durable > 0 && !held {
        return Err(violation(
            "durable-index",
            format!(
                "group {group} node {node} claims {durable} durable (term {durable_term:?}) \
                 but its disk holds {:?} there, its snapshot at {} and ends at {}",
                disk.term_at(durable),
                disk.snapshot_index(),
                disk.last_index()
            ),
        ));
    }
    if let Some(snapshot) = replica.snapshot() {
        if snapshot.index != view.snapshot {
            view.snapshot = snapshot.index;
            checker.snapshot(group, node, snapshot, "held")?;
        }
        if let Some(next) = replica.entry(snapshot.index + 1) {
            let pair = (snapshot.index, snapshot.term, next.index, next.term);
            if view.continued != Some(pair)
                && checker.snapshot_continued(group, node, (snapshot.index, snapshot.term), next)?
            {
                view.continued = Some(pair);
            }
        }
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
        let term = term_of(replica, index).unwrap_or(0);
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
        disk.snapshot_index(),
    );
    let started = (
        status.term,
        status.vote,
        status.last_index,
        status.snapshot_index,
    );
    if started != durable {
        return Err(violation(
            "recovery",
            format!(
                "group {group} node {node} restarted with term {} vote {:?} last index {} \
                 snapshot at {} but its disk holds term {} vote {:?} last index {} snapshot at {}",
                started.0,
                started.1,
                started.2,
                started.3,
                durable.0,
                durable.1,
                durable.2,
                durable.3
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

/// read-lease: when `holder`'s replica of `group` may serve reads under its lease at `now`, no
/// other replica of the group may (two would serve two histories), and the holder's commit
/// index is at least every replica's (else its reads would miss committed writes).
pub fn check_lease<'a>(
    group: GroupId,
    holder: NodeId,
    now: holdfast_core::time::Instant,
    replicas: impl Iterator<Item = (NodeId, &'a Replica)> + Clone,
) -> Result<(), Violation> {
    // Walked twice rather than collected: this runs after every step of every node, and an
    // allocation per call was a visible share of a queue run's profile.
    let Some((_, mine)) = replicas.clone().find(|(n, _)| *n == holder) else {
        return Ok(());
    };
    check_lease_of(group, holder, mine, now, replicas)
}

/// [`check_lease`] when the caller has `holder`'s replica, `mine`, at hand.
pub fn check_lease_of<'a>(
    group: GroupId,
    holder: NodeId,
    mine: &Replica,
    now: holdfast_core::time::Instant,
    replicas: impl Iterator<Item = (NodeId, &'a Replica)>,
) -> Result<(), Violation> {
    // Most steps are a follower's, which holds no lease: the cheap test first.
    if mine.status().role != Role::Leader || !mine.read_lease(now) {
        return Ok(());
    }
    let mine = mine.status();
    for (node, replica) in replicas.filter(|(n, _)| *n != holder) {
        let status = replica.status();
        if replica.read_lease(now) {
            return Err(violation(
                "read-lease",
                format!(
                    "group {group}: n{holder} (term {}) and n{node} (term {}) both hold a read \
                     lease at once",
                    mine.term, status.term
                ),
            ));
        }
        if status.commit_index > mine.commit_index {
            return Err(violation(
                "read-lease",
                format!(
                    "group {group}: n{holder} serves reads under a lease at commit {} while \
                     n{node} knows commit {}",
                    mine.commit_index, status.commit_index
                ),
            ));
        }
    }
    Ok(())
}
