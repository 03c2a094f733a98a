//! The oracles. Each method states one safety invariant of Raft and returns a [`Violation`]
//! naming it when the run breaks it. The world calls them on every step.

use std::collections::BTreeMap;

use bytes::Bytes;
use holdfast_core::raft::{
    AppendResult, Entry, EntryKind, Envelope, GroupId, Index, Message, NodeId, Replica, Snapshot,
    Term,
};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::disk::Disk;

/// The Raft checkers, by the name a violation reports.
pub const RAFT_CHECKERS: [&str; 13] = [
    "one-leader-per-term",
    "one-vote-per-term",
    "read-lease",
    "commit-safety",
    "recovery",
    "log-matching",
    "leader-completeness",
    "committed-prefix",
    "commit-monotonic",
    "persist-before-send",
    "durable-index",
    "acked-stays",
    "liveness",
];

/// The checkers that only disk faults exercise: byte-level agreement and the damaged-replica
/// rule. (Recovery losing a durable entry is the `recovery` checker's.)
pub const DISK_CHECKERS: [&str; 2] = ["committed-bytes", "damaged-vote"];

/// The checkers of configuration safety, which only runs that change membership exercise.
pub const MEMBERSHIP_CHECKERS: [&str; 3] =
    ["config-quorum", "config-election", "one-change-at-a-time"];

/// The checkers that only runs that compact exercise.
/// `queue-store`: a node's queue store holds what its snapshot references and can make every
/// copy asked of it (a restart from a metadata-only snapshot checks the first).
pub const SNAPSHOT_CHECKERS: [&str; 2] = ["snapshot-agreement", "queue-store"];

/// The queue's checkers (DESIGN §1 items 1-5), named as Jepsen names them, and
/// `state-invariants`: what the parts of each node's broker state must agree on
/// (`BrokerState::check_invariants`: index, cache and its accounting, offsets, producers),
/// which no delivery shows.
pub const QUEUE_CHECKERS: [&str; 12] = [
    "exclusive-owner",
    "dead-letter",
    "retry-delay",
    "retention",
    "lost",
    "unexpected",
    "duplicated",
    "inconsistent-offsets",
    "nonmonotonic-poll",
    "offset-regression",
    "order",
    "state-invariants",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub checker: &'static str,
    pub detail: String,
}

pub fn violation(checker: &'static str, detail: String) -> Violation {
    debug_assert!(
        RAFT_CHECKERS.contains(&checker)
            || DISK_CHECKERS.contains(&checker)
            || SNAPSHOT_CHECKERS.contains(&checker)
            || MEMBERSHIP_CHECKERS.contains(&checker)
            || QUEUE_CHECKERS.contains(&checker)
    );
    Violation { checker, detail }
}

/// A content hash of one entry; the term and index are compared separately.
pub fn digest(entry: &Entry) -> u64 {
    let mut hasher = Xxh3::new();
    match &entry.kind {
        EntryKind::Noop => hasher.update(&[0]),
        EntryKind::Config(membership) => {
            hasher.update(&[2]);
            for set in [&membership.voters, &membership.learners] {
                hasher.update(&(set.len() as u64).to_le_bytes());
                for id in set {
                    hasher.update(&id.to_le_bytes());
                }
            }
        }
        EntryKind::Commands(commands) => {
            hasher.update(&[1]);
            for command in commands {
                hasher.update(&(command.len() as u64).to_le_bytes());
                hasher.update(command);
            }
        }
    }
    hasher.digest()
}

/// The Raft workload's state machine: a running hash of every entry applied (its index and
/// content), the commands applied, and the last index. Its encoding is a snapshot's `data`, so
/// the snapshot-agreement checker can tell whether a snapshot stands for exactly the committed
/// sequence up to its index; the checker keeps the same digest for every committed prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MachineDigest {
    pub chain: u64,
    pub commands: u64,
    pub index: Index,
}

impl MachineDigest {
    pub const BYTES: usize = 24;

    pub fn apply(&mut self, entry: &Entry) {
        let mut link = [0u8; 24];
        link[..8].copy_from_slice(&self.chain.to_le_bytes());
        link[8..16].copy_from_slice(&entry.index.to_le_bytes());
        link[16..].copy_from_slice(&digest(entry).to_le_bytes());
        self.chain = xxh3_64(&link);
        if let EntryKind::Commands(commands) = &entry.kind {
            self.commands += commands.len() as u64;
        }
        self.index = entry.index;
    }

    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(Self::BYTES);
        out.extend_from_slice(&self.chain.to_le_bytes());
        out.extend_from_slice(&self.commands.to_le_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
        Bytes::from(out)
    }

    pub fn decode(data: &[u8]) -> Option<MachineDigest> {
        if data.len() != Self::BYTES {
            return None;
        }
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&data[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        Some(MachineDigest {
            chain: word(0),
            commands: word(8),
            index: word(16),
        })
    }
}

/// A hash of `entry`'s record as the core's storage format encodes it.
pub fn record_hash(entry: &Entry) -> u64 {
    let mut bytes = Vec::new();
    let _ = holdfast_core::storage::encode_entry(entry, &mut bytes);
    xxh3_64(&bytes)
}

/// The end of one log, and the term it holds at the index being checked.
#[derive(Clone, Copy, Debug)]
pub struct LogView {
    pub last_index: Index,
    pub last_term: Term,
    pub term_at_index: Option<Term>,
    /// The replica is damaged and must not vote: it counts for no election.
    pub damaged: bool,
    /// The latest snapshot's index (0 if none): the log holds nothing at or below it.
    pub snapshot_index: Index,
}

struct Committed {
    term: Term,
    hash: u64,
    /// An upper bound of the term in which the entry committed: the term of the first replica
    /// seen applying it. Leaders of later terms must hold the entry (leader completeness);
    /// a stale leader of an earlier term, elected by votes that were delayed, need not.
    commit_term: Term,
    /// A hash of the entry's encoded record: what every replica's disk must hold there.
    record_hash: u64,
    /// The Raft workload's state machine after applying the sequence up to this entry.
    machine: MachineDigest,
}

/// The first snapshot seen at one `(group, index)`: every other must equal it.
struct SnapshotSeen {
    term: Term,
    data_hash: u64,
    data_len: usize,
    node: NodeId,
}

#[derive(Default)]
pub struct Checker {
    leaders: BTreeMap<(GroupId, Term), NodeId>,
    /// Whom each `(group, voter, term)` gave its vote, as the messages that left it say: a
    /// candidate's request is its vote for itself, a granted answer its vote for the asker.
    votes: BTreeMap<(GroupId, NodeId, Term), NodeId>,
    /// What every `(group, index, term)` ever written holds: its content and the term of the
    /// entry before it. Log matching says both are fixed once any replica writes it.
    written: BTreeMap<(GroupId, Index, Term), (u64, Term)>,
    /// The one committed sequence per group, index `i + 1` at position `i`.
    canonical: BTreeMap<GroupId, Vec<Committed>>,
    /// Proposals reported committed to a client: `(group, index)` to the entry's digest.
    acked: BTreeMap<(GroupId, Index), u64>,
    /// Every snapshot any replica held or wrote, by `(group, index)`.
    snapshots: BTreeMap<(GroupId, Index), SnapshotSeen>,
    /// Snapshots hold a [`MachineDigest`] (the Raft workload): check it too.
    pub digest_snapshots: bool,
    /// A broker snapshot with its messages (a transfer image, installed) compared as the
    /// metadata snapshot of the same state, which is what the leader compacted into: by the
    /// hash of its data, the hash of that metadata.
    canonical_hashes: BTreeMap<u64, u64>,
}

/// The hash `data` is compared by: a broker snapshot that holds its messages as the metadata
/// snapshot of its state (so a transfer image and the snapshot it was made from agree, and
/// disagree wherever their states do); any other data as itself.
fn canonical_hash(data: &[u8]) -> u64 {
    use holdfast_core::broker::{BrokerConfig, BrokerState, holds_messages};
    if holds_messages(data)
        && let Ok(state) = BrokerState::restore(BrokerConfig::default(), data)
        && let Ok(metadata) = state.metadata_snapshot()
    {
        return xxh3_64(&metadata);
    }
    xxh3_64(data)
}

impl Checker {
    pub fn committed(&self, group: GroupId) -> u64 {
        self.canonical.get(&group).map_or(0, |c| c.len() as u64)
    }

    pub fn acked_count(&self) -> usize {
        self.acked.len()
    }

    /// The term of the committed entry at `index`, if the committed sequence reaches it.
    pub fn committed_term(&self, group: GroupId, index: Index) -> Option<Term> {
        let position = usize::try_from(index.checked_sub(1)?).ok()?;
        self.canonical.get(&group)?.get(position).map(|c| c.term)
    }

    pub fn leader(&mut self, group: GroupId, term: Term, node: NodeId) -> Result<(), Violation> {
        let first = *self.leaders.entry((group, term)).or_insert(node);
        if first != node {
            return Err(violation(
                "one-leader-per-term",
                format!("group {group} term {term}: node {first} and node {node} both lead"),
            ));
        }
        Ok(())
    }

    /// A vote that left a replica: each replica votes for at most one candidate per term, or
    /// two candidates can each count it towards a majority. (A pre-vote binds nothing.)
    pub fn voted(&mut self, envelope: &Envelope) -> Result<(), Violation> {
        let (term, candidate) = match envelope.message {
            Message::Vote { term, .. } | Message::TransferVote { term, .. } => {
                (term, envelope.from)
            }
            Message::VoteResponse {
                term,
                granted: true,
            } => (term, envelope.to),
            _ => return Ok(()),
        };
        let (group, voter) = (envelope.group, envelope.from);
        let first = *self.votes.entry((group, voter, term)).or_insert(candidate);
        if first != candidate {
            return Err(violation(
                "one-vote-per-term",
                format!(
                    "group {group} node {voter} voted for node {first} and then for node \
                     {candidate} in term {term}"
                ),
            ));
        }
        Ok(())
    }

    /// A replica in `term` follows `leader`: that node must be the one that leads `term`.
    pub fn follows(
        &self,
        group: GroupId,
        node: NodeId,
        term: Term,
        leader: NodeId,
    ) -> Result<(), Violation> {
        let actual = self.leaders.get(&(group, term));
        if actual != Some(&leader) {
            return Err(violation(
                "one-leader-per-term",
                format!(
                    "group {group} node {node} follows node {leader} in term {term}, whose leader is {actual:?}"
                ),
            ));
        }
        Ok(())
    }

    /// A replica wrote `entries` after an entry of term `prev_term`.
    pub fn written(
        &mut self,
        group: GroupId,
        node: NodeId,
        entries: &[Entry],
        mut prev_term: Term,
    ) -> Result<(), Violation> {
        for entry in entries {
            let seen = (digest(entry), prev_term);
            let first = *self
                .written
                .entry((group, entry.index, entry.term))
                .or_insert(seen);
            if first != seen {
                return Err(violation(
                    "log-matching",
                    format!(
                        "group {group} node {node}: entry {}@{} holds {:016x} after term {}, \
                         another replica holds {:016x} after term {}",
                        entry.index, entry.term, seen.0, seen.1, first.0, first.1
                    ),
                ));
            }
            prev_term = entry.term;
        }
        Ok(())
    }

    /// A replica in term `term` applied `entry`; `expected` is the index it must have.
    pub fn applied(
        &mut self,
        group: GroupId,
        node: NodeId,
        term: Term,
        entry: &Entry,
        expected: Index,
    ) -> Result<(), Violation> {
        if entry.index != expected {
            return Err(violation(
                "committed-prefix",
                format!(
                    "group {group} node {node} applied index {} after {}",
                    entry.index,
                    expected - 1
                ),
            ));
        }
        let canonical = self.canonical.entry(group).or_default();
        let hash = digest(entry);
        let position = (entry.index - 1) as usize;
        match canonical.get(position) {
            Some(c) if (c.term, c.hash) != (entry.term, hash) => Err(violation(
                "committed-prefix",
                format!(
                    "group {group} node {node} applied {}@{} ({hash:016x}) where {}@{} ({:016x}) \
                     was committed",
                    entry.index, entry.term, entry.index, c.term, c.hash
                ),
            )),
            Some(_) => Ok(()),
            // Only a replica that jumped over a snapshot can apply past the end, and a
            // snapshot only ever stands for entries some replica applied (and so recorded).
            None if position > canonical.len() => Err(violation(
                "committed-prefix",
                format!(
                    "group {group} node {node} applied {}@{} but the committed sequence ends at \
                     {}: its snapshot stood for entries no replica applied",
                    entry.index,
                    entry.term,
                    canonical.len()
                ),
            )),
            None => {
                let mut machine = canonical
                    .last()
                    .map_or_else(MachineDigest::default, |c| c.machine);
                machine.apply(entry);
                canonical.push(Committed {
                    term: entry.term,
                    hash,
                    commit_term: term,
                    record_hash: record_hash(entry),
                    machine,
                });
                Ok(())
            }
        }
    }

    /// A replica that has committed up to `commit` wrote entries from `first` on: it must
    /// never rewrite a committed entry.
    pub fn rewrite(
        group: GroupId,
        node: NodeId,
        first: Index,
        commit: Index,
    ) -> Result<(), Violation> {
        if first <= commit {
            return Err(violation(
                "committed-prefix",
                format!(
                    "group {group} node {node} rewrote its log from {first}, below its commit {commit}"
                ),
            ));
        }
        Ok(())
    }

    /// A replica just became leader: it must hold every entry committed in an earlier term.
    pub fn leader_complete(&self, group: GroupId, replica: &Replica) -> Result<(), Violation> {
        let Some(canonical) = self.canonical.get(&group) else {
            return Ok(());
        };
        let status = replica.status();
        let snapshot = replica.snapshot().map(|s| (s.index, s.term));
        for (i, c) in canonical.iter().enumerate() {
            if c.commit_term >= status.term {
                continue;
            }
            let index = i as Index + 1;
            // A compacted entry is held by the snapshot that replaced it (whether the
            // snapshot stands for the committed one is snapshot-agreement's business); the
            // snapshot's own entry must at least have the committed term.
            match snapshot {
                Some((at, _)) if index < at => continue,
                Some((at, term)) if index == at && term == c.term => continue,
                _ => {}
            }
            let held = replica.entry(index).map(|e| (e.term, digest(e)));
            if held != Some((c.term, c.hash)) {
                return Err(violation(
                    "leader-completeness",
                    format!(
                        "group {group}: node {} leads term {} without entry {index}@{} committed \
                         in term {} (it holds {held:?}, last index {})",
                        status.id, status.term, c.term, c.commit_term, status.last_index
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A leader just committed up to `index`, an entry of `term`. Committed means no replica
    /// lacking that entry can ever be elected: it would need votes from a majority whose
    /// durable logs (what survives any crash) are no more up to date than its own. This is
    /// the figure 8 argument of the Raft paper, checked at the moment of commit.
    ///
    /// `logs` holds, per node, its durable `(last_index, last_term, term at index)` and, if
    /// it runs, the same of its in-memory log (an electable candidate may use either).
    pub fn commit_safe(
        group: GroupId,
        leader: NodeId,
        index: Index,
        term: Term,
        logs: &[(NodeId, LogView, Option<LogView>)],
    ) -> Result<(), Violation> {
        let majority = logs.len() / 2 + 1;
        for (candidate, durable, memory) in logs {
            for view in [Some(durable), memory.as_ref()].into_iter().flatten() {
                // A snapshot at or past the index holds the committed entry.
                if view.term_at_index == Some(term) || index <= view.snapshot_index {
                    continue;
                }
                let voters: Vec<NodeId> = logs
                    .iter()
                    .filter(|(_, d, _)| {
                        !d.damaged
                            && (view.last_term, view.last_index) >= (d.last_term, d.last_index)
                    })
                    .map(|(n, _, _)| *n)
                    .collect();
                if voters.len() >= majority {
                    return Err(violation(
                        "commit-safety",
                        format!(
                            "group {group}: node {leader} committed {index}@{term}, but node \
                             {candidate} lacks it (log ends {}@{}) and could be elected by \
                             {voters:?}",
                            view.last_index, view.last_term
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Replicas agree byte for byte on committed entries: every record of `disk` up to
    /// `upto` (a prefix this replica knows committed and durable) is the encoding of the
    /// committed entry at its index.
    pub fn committed_bytes(
        &self,
        group: GroupId,
        node: NodeId,
        disk: &Disk,
        upto: Index,
    ) -> Result<(), Violation> {
        let Some(canonical) = self.canonical.get(&group) else {
            return Ok(());
        };
        // Records at or below the disk's snapshot may be gone (compacted) or be what is left
        // of a replaced log whose removal a crash interrupted (recovery ignores both).
        let compacted = disk.snapshot_index();
        for (i, c) in canonical.iter().enumerate().take(upto as usize) {
            let index = i as Index + 1;
            if index <= compacted {
                continue;
            }
            let held = disk.record_bytes(index).map(xxh3_64);
            if held != Some(c.record_hash) {
                return Err(violation(
                    "committed-bytes",
                    format!(
                        "group {group} node {node}: the record of committed entry {index}@{} on \
                         disk is not the committed one's bytes ({} bytes there)",
                        c.term,
                        disk.record_bytes(index).map_or(0, <[u8]>::len)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `node` holds `snapshot` of `group` (in memory, on its way to disk, or recovered from
    /// it): every snapshot at one `(group, index)` has one term and one content, and the
    /// term is that of the committed entry at that index. `what` says where it was seen.
    pub fn snapshot(
        &mut self,
        group: GroupId,
        node: NodeId,
        snapshot: &Snapshot,
        what: &str,
    ) -> Result<(), Violation> {
        let index = snapshot.index;
        let raw = xxh3_64(&snapshot.data);
        let data_hash = *self
            .canonical_hashes
            .entry(raw)
            .or_insert_with(|| canonical_hash(&snapshot.data));
        let seen = SnapshotSeen {
            term: snapshot.term,
            data_hash,
            data_len: snapshot.data.len(),
            node,
        };
        match self.snapshots.get(&(group, index)) {
            Some(first) if (first.term, first.data_hash) != (seen.term, seen.data_hash) => {
                return Err(violation(
                    "snapshot-agreement",
                    format!(
                        "group {group}: node {node}'s snapshot at {index} ({what}) has term {} and \
                         {} bytes of data {:016x}; node {}'s has term {} and {} bytes {:016x}",
                        seen.term,
                        seen.data_len,
                        seen.data_hash,
                        first.node,
                        first.term,
                        first.data_len,
                        first.data_hash
                    ),
                ));
            }
            Some(_) => {}
            None => {
                self.snapshots.insert((group, index), seen);
            }
        }
        match self.committed_term(group, index) {
            Some(term) if term == snapshot.term && self.digest_snapshots => {
                self.snapshot_digest(group, node, snapshot, what)
            }
            Some(term) if term == snapshot.term => Ok(()),
            committed => Err(violation(
                "snapshot-agreement",
                format!(
                    "group {group}: node {node}'s snapshot at {index}@{} ({what}) does not stand \
                     for a committed entry: the committed sequence holds {committed:?} there",
                    snapshot.term
                ),
            )),
        }
    }

    /// `node` holds a snapshot at `(index, term)` and, after it, `next`: the log must continue
    /// the snapshot, so `next` was written after an entry of the snapshot's term (log matching
    /// across the snapshot's boundary). A follower that kept a log of another history beside an
    /// installed snapshot fails this. True if it was checked (`next` was seen written), false
    /// if there is nothing to check it against yet.
    pub fn snapshot_continued(
        &self,
        group: GroupId,
        node: NodeId,
        (index, term): (Index, Term),
        next: &Entry,
    ) -> Result<bool, Violation> {
        let Some(&(_, prev_term)) = self.written.get(&(group, next.index, next.term)) else {
            return Ok(false);
        };
        if prev_term != term {
            return Err(violation(
                "snapshot-agreement",
                format!(
                    "group {group} node {node} holds a snapshot at {index}@{term} followed by \
                     entry {}@{}, which was written after an entry of term {prev_term}: the log \
                     does not continue the snapshot",
                    next.index, next.term
                ),
            ));
        }
        Ok(true)
    }

    /// The Raft workload: a snapshot's data is the state machine after exactly the committed
    /// sequence up to its index.
    pub fn snapshot_digest(
        &self,
        group: GroupId,
        node: NodeId,
        snapshot: &Snapshot,
        what: &str,
    ) -> Result<(), Violation> {
        let index = snapshot.index;
        let expected = usize::try_from(index.saturating_sub(1))
            .ok()
            .and_then(|at| self.canonical.get(&group)?.get(at))
            .map(|c| c.machine);
        let found = MachineDigest::decode(&snapshot.data);
        if found.is_none() || found != expected {
            return Err(violation(
                "snapshot-agreement",
                format!(
                    "group {group}: node {node}'s snapshot at {index} ({what}) holds {found:?}, \
                     but the committed sequence up to {index} digests to {expected:?}"
                ),
            ));
        }
        Ok(())
    }

    /// A client was told its proposal committed at `index` with content `hash`.
    pub fn acked(&mut self, group: GroupId, index: Index, hash: u64) -> Result<(), Violation> {
        self.acked.insert((group, index), hash);
        self.check_acked(group, index, hash)
    }

    /// Every acknowledged proposal is in the committed sequence at its index.
    pub fn all_acked_stay(&self) -> Result<(), Violation> {
        for ((group, index), hash) in &self.acked {
            self.check_acked(*group, *index, *hash)?;
        }
        Ok(())
    }

    fn check_acked(&self, group: GroupId, index: Index, hash: u64) -> Result<(), Violation> {
        let committed = self
            .canonical
            .get(&group)
            .and_then(|c| c.get((index - 1) as usize));
        match committed {
            Some(c) if c.hash == hash => Ok(()),
            other => Err(violation(
                "acked-stays",
                format!(
                    "group {group}: proposal acked at index {index} ({hash:016x}) but the \
                     committed sequence holds {:?} there",
                    other.map(|c| (c.term, c.hash))
                ),
            )),
        }
    }

    /// Nothing leaves a node that depends on state its disk does not hold yet.
    pub fn sent(envelope: &Envelope, disk: &Disk) -> Result<(), Violation> {
        let durable = disk.hard_state;
        let fail = |why: String| {
            Err(violation(
                "persist-before-send",
                format!(
                    "group {} node {} sent {:?} to {}: {why}",
                    envelope.group, envelope.from, envelope.message, envelope.to
                ),
            ))
        };
        let message = &envelope.message;
        let campaigns_or_grants = matches!(
            message,
            Message::PreVote { .. }
                | Message::Vote { .. }
                | Message::TransferVote { .. }
                | Message::PreVoteResponse { granted: true, .. }
                | Message::VoteResponse { granted: true, .. }
        );
        if campaigns_or_grants && disk.damage.is_some() {
            return Err(violation(
                "damaged-vote",
                format!(
                    "group {} node {} is damaged ({:?}) but sent {:?} to {}",
                    envelope.group, envelope.from, disk.damage, envelope.message, envelope.to
                ),
            ));
        }
        // A pre-vote and its grant speak of the term one would campaign in, not one held.
        let speculative = matches!(
            message,
            Message::PreVote { .. } | Message::PreVoteResponse { granted: true, .. }
        );
        if !speculative && message.term() > durable.term {
            return fail(format!("durable term is {}", durable.term));
        }
        match message {
            // A reply may wait for its write while the replica moves on to a newer term; what
            // counts is that the vote it carries was durable before it left.
            Message::Vote { term, .. } | Message::TransferVote { term, .. }
                if !disk.ever_voted(*term, envelope.from) =>
            {
                fail(format!("no durable vote for itself in term {term}"))
            }
            Message::VoteResponse {
                term,
                granted: true,
            } if !disk.ever_voted(*term, envelope.to) => fail(format!(
                "no durable vote for {} in term {term}; durable vote {:?} in term {}",
                envelope.to, durable.vote, durable.term
            )),
            // The reply may have waited for its write while a newer leader rewrote the log in
            // memory; what counts is that the entries it acknowledges reached the disk.
            Message::AppendResponse {
                result:
                    AppendResult::Accepted { match_index }
                    | AppendResult::AcceptedVotesLost { match_index },
                term,
            } if *match_index > 0 && !disk.ever_held(*match_index, *term) => fail(format!(
                "no entry at {match_index} of term <= {term} was ever durable (disk ends at {})",
                disk.last_index()
            )),
            _ => Ok(()),
        }
    }
}
