//! The values that cross the boundary between a replica and its driver.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A node of the cluster (one process). Every replica of a group lives on a distinct node.
pub type NodeId = u64;
/// A Raft group: one replicated log. A node hosts replicas of many groups.
pub type GroupId = u64;
pub type Term = u64;
/// A log position; the first entry has index 1, and 0 means "before the log".
pub type Index = u64;

/// One log entry. A command entry holds a whole batch: many commands cost one entry, one
/// write, and one round of replication.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub term: Term,
    pub index: Index,
    pub kind: EntryKind,
}

impl Entry {
    /// The bytes of its commands: what it weighs in a message or on disk, give or take a
    /// few bytes of framing per command.
    pub fn command_bytes(&self) -> usize {
        match &self.kind {
            EntryKind::Noop => 0,
            EntryKind::Commands(commands) => commands.iter().map(Bytes::len).sum(),
            EntryKind::Config(membership) => membership.len() * 8,
        }
    }

    /// At least what it encodes to: its commands with their framing, and its header.
    pub fn encoded_bytes_max(&self) -> usize {
        let commands = match &self.kind {
            EntryKind::Noop | EntryKind::Config(_) => 0,
            EntryKind::Commands(commands) => commands.len(),
        };
        self.command_bytes()
            + commands * crate::limits::COMMAND_FRAMING_BYTES
            + crate::limits::ENTRY_HEADER_BYTES
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// Appended by every new leader at the start of its term, so entries of earlier terms
    /// commit as soon as the current term's first entry does.
    Noop,
    /// A batch of opaque commands from one proposal.
    Commands(Vec<Bytes>),
    /// The group's whole new configuration (one server added, promoted or removed from the
    /// one before it). It takes effect on every replica as soon as it is in its log, committed
    /// or not; see `Replica::propose_membership`. New variants go last.
    Config(Membership),
}

/// Who a group's members are: voters elect leaders and make quorums; learners only receive
/// the log (a new server catching up before it is promoted). The two sets are disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Membership {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

impl Membership {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Membership {
        Membership {
            voters: voters.into_iter().collect(),
            learners: BTreeSet::new(),
        }
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// Members, voters and learners.
    pub fn len(&self) -> usize {
        self.voters.len() + self.learners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every member, voters and learners, in id order.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        let mut all: Vec<NodeId> = self.voters.union(&self.learners).copied().collect();
        all.sort_unstable();
        all.into_iter()
    }

    /// The configuration `change` makes of this one, or why it cannot. Each change moves one
    /// server in or out of the voters (single-server change, see `Replica::propose_membership`).
    pub fn apply(&self, change: ConfChange) -> Result<Membership, MembershipError> {
        let mut next = self.clone();
        match change {
            ConfChange::AddLearner(id) => {
                if self.contains(id) {
                    return Err(MembershipError::AlreadyMember { id });
                }
                if self.len() >= crate::limits::GROUP_MEMBERS_MAX {
                    return Err(MembershipError::TooManyMembers {
                        members_max: crate::limits::GROUP_MEMBERS_MAX,
                    });
                }
                next.learners.insert(id);
            }
            ConfChange::Promote(id) => {
                if !self.is_learner(id) {
                    return Err(MembershipError::NotALearner { id });
                }
                next.learners.remove(&id);
                next.voters.insert(id);
            }
            ConfChange::Remove(id) => {
                if !self.contains(id) {
                    return Err(MembershipError::NotAMember { id });
                }
                if self.voters.len() == 1 && self.is_voter(id) {
                    return Err(MembershipError::LastVoter { id });
                }
                next.voters.remove(&id);
                next.learners.remove(&id);
            }
        }
        Ok(next)
    }
}

/// One single-server membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConfChange {
    /// A new server joins as a learner: it receives the log but neither votes nor counts.
    AddLearner(NodeId),
    /// A learner that has caught up becomes a voter.
    Promote(NodeId),
    /// A voter or learner leaves the group.
    Remove(NodeId),
}

impl std::fmt::Display for ConfChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfChange::AddLearner(id) => write!(f, "add node {id} as a learner"),
            ConfChange::Promote(id) => write!(f, "promote node {id} to voter"),
            ConfChange::Remove(id) => write!(f, "remove node {id}"),
        }
    }
}

/// Why [`super::Replica::propose_membership`] refused; nothing was appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipError {
    NotLeader {
        leader_hint: Option<NodeId>,
    },
    /// A leadership transfer is under way.
    Transferring {
        to: NodeId,
    },
    /// This leader has not yet committed an entry of its own term, so it may not know the
    /// latest committed configuration (the single-server change bug Ongaro found in 2015).
    NotReady,
    /// The configuration appended at `index` is not committed yet: one change at a time.
    ChangePending {
        index: Index,
    },
    AlreadyMember {
        id: NodeId,
    },
    NotALearner {
        id: NodeId,
    },
    NotAMember {
        id: NodeId,
    },
    /// Removing the only voter would leave a group that can never elect a leader.
    LastVoter {
        id: NodeId,
    },
    /// The learner holds the log only up to `match_index`, below the commit index `commit`:
    /// promoting it now would make a voter that slows every commit until it catches up.
    NotCaughtUp {
        id: NodeId,
        match_index: Index,
        commit: Index,
    },
    TooManyMembers {
        members_max: usize,
    },
}

impl std::fmt::Display for MembershipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipError::NotLeader { leader_hint } => {
                write!(f, "not the leader (leader hint {leader_hint:?})")
            }
            MembershipError::Transferring { to } => {
                write!(f, "handing leadership to node {to}; retry once it leads")
            }
            MembershipError::NotReady => write!(
                f,
                "the leader has not committed an entry of its term yet; retry shortly"
            ),
            MembershipError::ChangePending { index } => write!(
                f,
                "the configuration change at index {index} is not committed yet: one change \
                 at a time"
            ),
            MembershipError::AlreadyMember { id } => {
                write!(f, "node {id} is already a member of this group")
            }
            MembershipError::NotALearner { id } => write!(f, "node {id} is not a learner"),
            MembershipError::NotAMember { id } => {
                write!(f, "node {id} is not a member of this group")
            }
            MembershipError::LastVoter { id } => {
                write!(f, "node {id} is the group's last voter")
            }
            MembershipError::NotCaughtUp {
                id,
                match_index,
                commit,
            } => write!(
                f,
                "learner {id} holds the log up to {match_index}, behind the commit index \
                 {commit}; retry once it caught up"
            ),
            MembershipError::TooManyMembers { members_max } => {
                write!(f, "a group has at most {members_max} members")
            }
        }
    }
}

/// What must survive a crash besides the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HardState {
    pub term: Term,
    /// The candidate this replica voted for in `term`.
    pub vote: Option<NodeId>,
    /// A lower bound of the commit index, carried along with writes that happen anyway (a
    /// commit advance alone never costs a sync). Always `<=` the last index of the log
    /// written together with it.
    pub commit: Index,
}

/// A Raft message between two replicas of one group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// "Would you vote for me in `term`?" Changes no state on the receiver.
    PreVote {
        term: Term,
        last_index: Index,
        last_term: Term,
    },
    PreVoteResponse {
        term: Term,
        granted: bool,
    },
    Vote {
        term: Term,
        last_index: Index,
        last_term: Term,
    },
    VoteResponse {
        term: Term,
        granted: bool,
    },
    Append {
        term: Term,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
    },
    AppendResponse {
        term: Term,
        result: AppendResult,
    },
    /// The leader's keep-alive. `commit` is at most what the receiver is known to hold.
    /// `context` is the leader's clock when it sent this, echoed back in the response: a
    /// follower that answers promises not to vote for anyone else until an election timeout
    /// after it received it, which is what the leader's read lease rests on.
    Heartbeat {
        term: Term,
        commit: Index,
        context: u64,
    },
    HeartbeatResponse {
        term: Term,
        context: u64,
    },
    /// One chunk of the leader's snapshot, for a follower that needs entries the leader has
    /// compacted away. Chunks go one at a time, `offset` being where `chunk` starts in the
    /// snapshot's `data` of `total` bytes; the follower installs it when it holds all of it
    /// and answers with an `AppendResponse` once the snapshot is durable.
    InstallSnapshot {
        term: Term,
        index: Index,
        snapshot_term: Term,
        offset: u64,
        total: u64,
        chunk: Bytes,
        /// The snapshot's configuration (see [`Snapshot::membership`]).
        membership: Option<Membership>,
    },
    /// The follower holds the first `received` bytes of the snapshot at `index` (in memory).
    SnapshotResponse {
        term: Term,
        index: Index,
        received: u64,
    },
    /// Leadership transfer: the leader of `term` has caught the receiver up and asks it to
    /// campaign at once, skipping PreVote (etcd-io/raft's `MsgTimeoutNow`). New variants go
    /// last: a node of an older version still decodes every message it knows.
    TimeoutNow {
        term: Term,
    },
    /// A `Vote` of a campaign started by `TimeoutNow`. Voters grant it even while they hear
    /// from a leader (their CheckQuorum lease): that leader asked for this election.
    TransferVote {
        term: Term,
        last_index: Index,
        last_term: Term,
    },
}

impl Message {
    pub fn term(&self) -> Term {
        match self {
            Message::PreVote { term, .. }
            | Message::PreVoteResponse { term, .. }
            | Message::Vote { term, .. }
            | Message::VoteResponse { term, .. }
            | Message::Append { term, .. }
            | Message::AppendResponse { term, .. }
            | Message::Heartbeat { term, .. }
            | Message::HeartbeatResponse { term, .. }
            | Message::InstallSnapshot { term, .. }
            | Message::SnapshotResponse { term, .. }
            | Message::TimeoutNow { term }
            | Message::TransferVote { term, .. } => *term,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendResult {
    /// The receiver's log matches the leader's up to `match_index`, durably.
    Accepted { match_index: Index },
    /// The receiver has no entry `(prev_index, prev_term)`. `hint_index`/`hint_term` point at
    /// the receiver's last entry at or below `rejected_index` so the leader can skip a whole
    /// term of conflicting entries at once.
    Rejected {
        rejected_index: Index,
        hint_index: Index,
        hint_term: Term,
    },
    /// `Rejected` from a replica recovered with a damaged log (see
    /// [`super::Replica::damaged_from`]): it may lack entries it acknowledged before, so the
    /// leader must not dismiss this rejection as stale for being at or below the follower's
    /// known match, and lowers the match instead.
    RejectedDamaged {
        rejected_index: Index,
        hint_index: Index,
        hint_term: Term,
    },
    /// `Accepted` from a replica that lost its whole disk ([`Damage::votes_lost`]): it holds
    /// the entries, but it may have voted for or acknowledged a newer leader before the wipe
    /// and forgotten it, so it cannot refuse a stale leader's term. Its acknowledgement must not
    /// count towards a commit, a read lease or CheckQuorum, or a deposed leader could commit
    /// with it (seed 32002003). New variants go last.
    AcceptedVotesLost { match_index: Index },
}

/// What a replica reports for the operator's log ([`super::Replica::poll_event`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RaftEvent {
    /// Won the election of `term`.
    BecameLeader { term: Term },
    /// Stopped leading; `term` is the replica's term now.
    SteppedDown { term: Term },
    /// Follows `leader` in `term`.
    LeaderChanged { term: Term, leader: NodeId },
    /// A message claiming to come from `from` was dropped unread.
    MessageRefused { from: NodeId, why: String },
    /// This leader stopped handing leadership to `to`: not done within an election timeout.
    TransferAborted { term: Term, to: NodeId },
    /// The configuration in effect changed to `membership`, from the entry at `index` (0: a
    /// snapshot's or the initial one): an entry appended or overwritten, or a snapshot installed.
    MembershipChanged {
        index: Index,
        membership: Membership,
    },
}

/// A message with its addressing, as returned by [`super::Replica::poll_message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub group: GroupId,
    pub from: NodeId,
    pub to: NodeId,
    pub message: Message,
}

/// Identifies a write; ids increase by one per write a replica hands out.
pub type WriteId = u64;

/// The applied state of a group's state machine after the entry `(index, term)`: it stands in
/// for every entry up to `index`, which the log no longer needs to hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    pub index: Index,
    pub term: Term,
    /// The state machine's encoding; opaque to Raft.
    pub data: Bytes,
    /// The group's configuration as of `index` (`None`: the initial one, `Config::voters`, as
    /// in snapshots written before membership change existed).
    pub membership: Option<Membership>,
}

/// Something the driver must make durable, in this order:
/// 1. `snapshot` (if any), durably, before anything else of this write: it stands in for
///    every entry up to its index. The driver may then drop entries at or below that index
///    from its log whenever it likes (whole segments, oldest first), but must keep the entry
///    at `snapshot.index + 1` if it has it.
/// 2. If `discard_log`: the whole log is dropped (newest records first, so that a crash half
///    way leaves a prefix); `entries` then start at `snapshot.index + 1`. Set when an
///    installed snapshot replaced a log that does not continue it.
/// 3. `hard_state` (if any).
/// 4. The log change (if any): discard every entry at index `>= entries[0].index`, then append
///    `entries`.
///
/// When it has synced this write and every earlier one it calls
/// [`super::Replica::persisted`] with `id`. Recovery reads it back through
/// [`crate::storage::log_after_snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub id: WriteId,
    pub hard_state: Option<HardState>,
    pub snapshot: Option<Snapshot>,
    pub discard_log: bool,
    pub entries: Vec<Entry>,
}

/// A driver-chosen tag for a proposal, handed back with its fate.
pub type ProposalId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposalOutcome {
    /// The proposal's entry is committed at `index` (and will be returned by
    /// `poll_committed` at that index).
    Committed { index: Index },
    /// This replica's copy of the entry was overwritten by a newer leader's entry. That does
    /// not mean it will never commit: another replica may hold it and win a later election
    /// (then it commits at the same index). A client must treat the outcome as unknown and
    /// retry idempotently.
    Dropped { leader_hint: Option<NodeId> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProposalFate {
    pub id: ProposalId,
    pub outcome: ProposalOutcome,
}

/// Why a proposal was refused at once; nothing was appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposeError {
    NotLeader {
        leader_hint: Option<NodeId>,
    },
    /// The replica is the leader but too many entries wait for a quorum; retry later.
    Busy,
    /// The replica is the leader but hands leadership to `to`: it takes no proposal meanwhile
    /// (one would only hold the transfer up); `to` is about to lead.
    Transferring {
        to: NodeId,
    },
}

/// Why [`super::Replica::transfer_leadership`] refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferError {
    NotLeader {
        leader_hint: Option<NodeId>,
    },
    /// `to` is this replica, not a voter of the group, or a voter that lost its disk
    /// ([`AppendResult::AcceptedVotesLost`]) and so never campaigns.
    NotAVoter {
        to: NodeId,
    },
    /// A transfer to another node is under way.
    Transferring {
        to: NodeId,
    },
}

impl std::fmt::Display for TransferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransferError::NotLeader { leader_hint } => {
                write!(f, "not the leader (leader hint {leader_hint:?})")
            }
            TransferError::NotAVoter { to } => {
                write!(f, "node {to} is not another voter of this group")
            }
            TransferError::Transferring { to } => {
                write!(f, "already handing leadership to node {to}")
            }
        }
    }
}

/// Why [`super::Replica::compact`] refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompactError {
    /// A snapshot may only cover entries the driver has applied.
    NotApplied { index: Index, applied: Index },
    /// The log is compacted up to `snapshot_index` already.
    Stale { index: Index, snapshot_index: Index },
    /// The replica knows no configuration at `index`: it started with none (it joined a
    /// running cluster) and holds no configuration entry at or below it.
    Unconfigured { index: Index },
}

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompactError::NotApplied { index, applied } => {
                write!(
                    f,
                    "snapshot at {index} is beyond the applied index {applied}"
                )
            }
            CompactError::Stale {
                index,
                snapshot_index,
            } => write!(
                f,
                "snapshot at {index} is not past the latest snapshot at {snapshot_index}"
            ),
            CompactError::Unconfigured { index } => write!(
                f,
                "no configuration is known at {index} (this replica joined with none): a \
                 snapshot there would record none"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// Planted bugs for the simulator's canaries. Each one only has an effect when the crate is
/// built with the `canaries` feature; in a normal build [`Config::canary`] is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Canary {
    /// Leaders commit entries of earlier terms by counting replicas (Raft paper figure 8).
    CommitOldTerm,
    /// A quorum is `n / 2` instead of `n / 2 + 1`: commit from a minority.
    CommitFromMinority,
    /// Followers acknowledge appended entries before they are durable.
    AckBeforeDurable,
    /// Votes leave before the term and vote that grant them are durable.
    VoteBeforeDurable,
    /// A restarted replica forgets whom it voted for.
    ForgetVoteOnRestart,
    /// A replica that becomes a follower in its own term (a candidate that lost its campaign,
    /// hearing from the winner) forgets whom it voted for, and may vote again in that term.
    ForgetVoteOnStepDown,
    /// Followers accept AppendEntries from a leader of an older term.
    AcceptStaleAppend,
    /// Votes are granted without checking that the candidate's log is up to date.
    VoteWithoutLogCheck,
    /// Followers append entries without checking that the previous entry matches.
    SkipPrevLogCheck,
    /// A proposal whose entry was overwritten by another leader is reported committed.
    AckOverwrittenProposal,
    /// A restarted replica starts with commit index 0 instead of its durable commit.
    ForgetCommitOnRestart,
    /// A sync report marks the whole log durable, even entries of writes still in flight.
    DurableIndexAhead,
    /// Every PreVote is refused, so no new leader can ever be elected.
    RefusePreVotes,
    /// Entries are handed out for applying as soon as they are in the log, before commit.
    ApplyBeyondCommit,
    /// A broker answers a send as soon as it is proposed, before it commits.
    AckSendBeforeCommit,
    /// Followers serve pulls from their possibly stale state.
    ServePullOnFollower,
    /// An ack sets the consume offset past itself instead of to the lowest unacked offset.
    OverwriteConsumeOffset,
    /// Appends skip the producer dedup window, so a retry writes the batch again.
    NoDedup,
    /// `ReconsumeLater` consumes the message without requeueing it.
    NackDropsMessage,
    /// A broker refuses every send of producer 3 yet writes it anyway.
    WriteDespiteRefusal,
    /// A pull starts at the consume offset, ignoring where the consumer asked to start.
    PullIgnoresFrom,
    /// A pull labels each message with the offset after its own.
    ShiftPullOffsets,
    /// The simulated producers send without waiting for the previous send where the
    /// application relies on the order of its sends (pipelining promises order only between
    /// sends that did not overlap; the planted bug is in how the client is used, not in the
    /// broker).
    AsyncSend,
    /// The simulator's recovery treats corruption inside the synced log as a torn tail: it cuts
    /// the log there silently and the replica starts undamaged, votes and all.
    TruncateAtCorruption,
    /// A replica recovered with a damaged log votes (and campaigns) as if it were whole.
    VoteWhileDamaged,
    /// The simulator's recovery trusts a record whose checksum fails, reading damaged bytes as
    /// an entry.
    TrustBadChecksum,
    /// The simulated disk reports a sync complete when it starts, covering writes handed over
    /// since, which are not on the platter yet (a driver-level lie, unlike `AckBeforeDurable`).
    AckBeforeFsync,
    /// The simulated disk writes the hard state in place, in one slot: a torn write of it
    /// loses the term and vote.
    StateFileSingleSlot,
    /// A follower installing a snapshot keeps the log after it without checking that its
    /// entry at the snapshot's index has the snapshot's term.
    InstallKeepsConflictingLog,
    /// A follower acknowledges an installed snapshot before it is durable.
    AckSnapshotBeforeDurable,
    /// The simulated disk drops a replaced log (`Write::discard_log`) before the snapshot that
    /// replaces it is durable.
    DiscardBeforeSnapshot,
    /// A broker's snapshot leaves out the producers' dedup windows, so a retry after a restore
    /// from a snapshot is written again.
    SnapshotOmitsDedup,
    /// A broker serves a pull of a consumer group's queue to whoever asks, at any generation,
    /// without the queue's lease.
    ServeStaleGeneration,
    /// A broker hands a held queue to a newer generation at once, without waiting for the
    /// holder to release it or for its lease to expire.
    HandOverEarly,
    /// A broker hands a consumer what its queue store read back without checking the
    /// records' checksums.
    ServeUncheckedRead,
    /// A broker dead-letters a message one reconsume early: on the `max_reconsume`-th
    /// `ReconsumeLater` instead of the one after it.
    DeadLetterEarly,
    /// The dedup window compares a batch only with the producer's highest sequence number: a
    /// batch numbered below it passes for a retry of the latest batch and is answered with that
    /// batch's offsets (invisible while a producer keeps one send in flight).
    DedupBySeqMax,
    /// The simulated consumers acknowledge a message as soon as it is handed out, before the
    /// listener answers (the planted bug is in how the client is used, not in the broker).
    AckOnDelivery,
    /// A leader's read lease counts only its own clock, not a majority's answers: a deposed
    /// leader goes on serving reads under a lease while its successor serves under its own.
    LeaseWithoutQuorum,
    /// The simulated driver hands over a broker group's metadata-only snapshot without first
    /// syncing the queue store it refers to: a crash then leaves a snapshot whose messages
    /// are gone, which the store's recovery must refuse.
    SnapshotBeforeStoreSync,
    /// A configuration takes effect when its entry commits instead of when it is appended.
    ConfigOnCommit,
    /// A leader appends a second configuration change while the first is uncommitted.
    SecondChangeWhilePending,
    /// A candidate asks learners for votes and counts their grants.
    LearnerVotes,
    /// Retention drops a queue's oldest message once it is half `retention_ms` old, while it
    /// is still inside the retention window.
    TrimInsideRetention,
    /// A `ReconsumeLater` of a message the cache no longer holds empties the retry queue's
    /// cache (it must stay a suffix) but leaves the bytes it held counted: nothing delivered
    /// changes, the cache just shrinks for good.
    RequeueKeepsCacheBytes,
    /// A pull of a retry queue hands out messages that are not due yet: a `ReconsumeLater`
    /// comes back at once instead of after its delay.
    RetryIgnoresDelay,
}

impl Canary {
    pub const ALL: [Canary; 46] = [
        Canary::CommitOldTerm,
        Canary::CommitFromMinority,
        Canary::AckBeforeDurable,
        Canary::VoteBeforeDurable,
        Canary::ForgetVoteOnRestart,
        Canary::ForgetVoteOnStepDown,
        Canary::AcceptStaleAppend,
        Canary::VoteWithoutLogCheck,
        Canary::SkipPrevLogCheck,
        Canary::AckOverwrittenProposal,
        Canary::ForgetCommitOnRestart,
        Canary::DurableIndexAhead,
        Canary::RefusePreVotes,
        Canary::ApplyBeyondCommit,
        Canary::AckSendBeforeCommit,
        Canary::ServePullOnFollower,
        Canary::OverwriteConsumeOffset,
        Canary::NoDedup,
        Canary::NackDropsMessage,
        Canary::WriteDespiteRefusal,
        Canary::PullIgnoresFrom,
        Canary::ShiftPullOffsets,
        Canary::AsyncSend,
        Canary::TruncateAtCorruption,
        Canary::VoteWhileDamaged,
        Canary::TrustBadChecksum,
        Canary::AckBeforeFsync,
        Canary::StateFileSingleSlot,
        Canary::InstallKeepsConflictingLog,
        Canary::AckSnapshotBeforeDurable,
        Canary::DiscardBeforeSnapshot,
        Canary::SnapshotOmitsDedup,
        Canary::ServeStaleGeneration,
        Canary::HandOverEarly,
        Canary::ServeUncheckedRead,
        Canary::DeadLetterEarly,
        Canary::DedupBySeqMax,
        Canary::AckOnDelivery,
        Canary::LeaseWithoutQuorum,
        Canary::SnapshotBeforeStoreSync,
        Canary::ConfigOnCommit,
        Canary::SecondChangeWhilePending,
        Canary::LearnerVotes,
        Canary::TrimInsideRetention,
        Canary::RequeueKeepsCacheBytes,
        Canary::RetryIgnoresDelay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Canary::CommitOldTerm => "commit-old-term",
            Canary::CommitFromMinority => "commit-from-minority",
            Canary::AckBeforeDurable => "ack-before-durable",
            Canary::VoteBeforeDurable => "vote-before-durable",
            Canary::ForgetVoteOnRestart => "forget-vote-on-restart",
            Canary::ForgetVoteOnStepDown => "forget-vote-on-step-down",
            Canary::AcceptStaleAppend => "accept-stale-append",
            Canary::VoteWithoutLogCheck => "vote-without-log-check",
            Canary::SkipPrevLogCheck => "skip-prev-log-check",
            Canary::AckOverwrittenProposal => "ack-overwritten-proposal",
            Canary::ForgetCommitOnRestart => "forget-commit-on-restart",
            Canary::DurableIndexAhead => "durable-index-ahead",
            Canary::RefusePreVotes => "refuse-pre-votes",
            Canary::ApplyBeyondCommit => "apply-beyond-commit",
            Canary::AckSendBeforeCommit => "ack-send-before-commit",
            Canary::ServePullOnFollower => "serve-pull-on-follower",
            Canary::OverwriteConsumeOffset => "overwrite-consume-offset",
            Canary::NoDedup => "no-dedup",
            Canary::NackDropsMessage => "nack-drops-message",
            Canary::WriteDespiteRefusal => "write-despite-refusal",
            Canary::PullIgnoresFrom => "pull-ignores-from",
            Canary::ShiftPullOffsets => "shift-pull-offsets",
            Canary::AsyncSend => "async-send",
            Canary::TruncateAtCorruption => "truncate-at-corruption",
            Canary::VoteWhileDamaged => "vote-while-damaged",
            Canary::TrustBadChecksum => "trust-bad-checksum",
            Canary::AckBeforeFsync => "ack-before-fsync",
            Canary::StateFileSingleSlot => "state-file-single-slot",
            Canary::InstallKeepsConflictingLog => "install-keeps-conflicting-log",
            Canary::AckSnapshotBeforeDurable => "ack-snapshot-before-durable",
            Canary::DiscardBeforeSnapshot => "discard-before-snapshot",
            Canary::SnapshotOmitsDedup => "snapshot-omits-dedup",
            Canary::ServeStaleGeneration => "serve-stale-generation",
            Canary::HandOverEarly => "hand-over-early",
            Canary::ServeUncheckedRead => "serve-unchecked-read",
            Canary::DeadLetterEarly => "dead-letter-early",
            Canary::DedupBySeqMax => "dedup-by-seq-max",
            Canary::AckOnDelivery => "ack-on-delivery",
            Canary::LeaseWithoutQuorum => "lease-without-quorum",
            Canary::SnapshotBeforeStoreSync => "snapshot-before-store-sync",
            Canary::ConfigOnCommit => "config-on-commit",
            Canary::SecondChangeWhilePending => "second-change-while-pending",
            Canary::LearnerVotes => "learner-votes",
            Canary::TrimInsideRetention => "trim-inside-retention",
            Canary::RequeueKeepsCacheBytes => "requeue-keeps-cache-bytes",
            Canary::RetryIgnoresDelay => "retry-ignores-delay",
        }
    }

    pub fn from_name(name: &str) -> Option<Canary> {
        Canary::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether `chosen` plants this bug; never in a build without the `canaries` feature.
    pub fn planted(self, chosen: Option<Canary>) -> bool {
        cfg!(feature = "canaries") && chosen == Some(self)
    }

    /// The planted bugs of the Raft core, as opposed to the queue's.
    pub fn is_raft(self) -> bool {
        !matches!(
            self,
            Canary::AckSendBeforeCommit
                | Canary::ServePullOnFollower
                | Canary::OverwriteConsumeOffset
                | Canary::NoDedup
                | Canary::NackDropsMessage
                | Canary::WriteDespiteRefusal
                | Canary::PullIgnoresFrom
                | Canary::ShiftPullOffsets
                | Canary::AsyncSend
                | Canary::SnapshotOmitsDedup
                | Canary::ServeStaleGeneration
                | Canary::HandOverEarly
                | Canary::ServeUncheckedRead
                | Canary::DeadLetterEarly
                | Canary::DedupBySeqMax
                | Canary::AckOnDelivery
                | Canary::SnapshotBeforeStoreSync
                | Canary::TrimInsideRetention
                | Canary::RequeueKeepsCacheBytes
                | Canary::RetryIgnoresDelay
        )
    }

    /// The planted bugs of storage and recovery: disk faults are what reveal them. Most live
    /// in the simulator's disk (the part a driver owns), one in the replica.
    pub fn is_disk(self) -> bool {
        matches!(
            self,
            Canary::TruncateAtCorruption
                | Canary::VoteWhileDamaged
                | Canary::TrustBadChecksum
                | Canary::AckBeforeFsync
                | Canary::StateFileSingleSlot
                | Canary::DiscardBeforeSnapshot
        )
    }

    /// The planted bugs of membership change: only runs that change membership reveal them.
    pub fn is_membership(self) -> bool {
        matches!(
            self,
            Canary::ConfigOnCommit | Canary::SecondChangeWhilePending | Canary::LearnerVotes
        )
    }

    /// The planted bugs of snapshots and compaction: only runs that compact reveal them.
    pub fn is_snapshot(self) -> bool {
        matches!(
            self,
            Canary::InstallKeepsConflictingLog
                | Canary::AckSnapshotBeforeDurable
                | Canary::DiscardBeforeSnapshot
                | Canary::SnapshotOmitsDedup
                | Canary::SnapshotBeforeStoreSync
        )
    }
}

/// Static configuration of one replica.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    pub group: GroupId,
    /// The group's initial voters: its configuration until a configuration entry in the log
    /// or a snapshot's membership says otherwise. A node joining an existing group passes the
    /// group's initial voters (not itself): it learns the rest from the leader.
    pub voters: Vec<NodeId>,
    /// Election timeouts are drawn uniformly from `[min, max)` with the replica's seeded RNG.
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    pub heartbeat_interval: Duration,
    /// At most this many entries in one AppendEntries.
    pub append_entries_max: usize,
    /// At most about this many command bytes in one AppendEntries (one entry always goes,
    /// however large), so a message stays well under the wire's frame limit.
    pub append_bytes_max: usize,
    /// At most this many AppendEntries in flight to one follower.
    pub inflight_appends_max: usize,
    /// At most this many uncommitted entries on a leader; further proposals get `Busy`.
    pub uncommitted_entries_max: usize,
    /// A leader answers proposals with `Busy` while its oldest pending one has waited longer
    /// than this for a quorum. A queue that takes longer to drain than clients wait for their
    /// answers fills with requests they have given up on and sent again, each taking a place
    /// once more, so it never drains: the simulator saw a group commit 1,000 entries a second
    /// for 20 s with its 4,096 places all taken by retries. Keep it below clients' timeouts.
    pub proposal_wait_max: Duration,
    /// At most this many snapshot bytes in one InstallSnapshot chunk.
    pub snapshot_chunk_bytes_max: usize,
    /// A follower that has not answered a snapshot chunk is sent it again after this many
    /// heartbeat intervals (it may be busy syncing a large snapshot).
    pub snapshot_resend_heartbeats: u32,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// A planted bug; effective only with the `canaries` feature.
    pub canary: Option<Canary>,
    /// What the driver's log recovery found damaged, per group: the replica of
    /// [`Config::group`] starts damaged if its group is in here (see [`Damage`]). Empty for a
    /// healthy disk.
    ///
    /// A map in the config rather than a field of [`Recovered`]: a node hosts many groups
    /// from one shared `Config`, and existing drivers build `Recovered` field by field.
    pub damaged: BTreeMap<GroupId, Damage>,
}

impl Config {
    /// Defaults that suit a LAN or loopback: elections in 150-300 ms, heartbeats every 50 ms.
    pub fn new(id: NodeId, group: GroupId, voters: Vec<NodeId>) -> Self {
        Config {
            id,
            group,
            voters,
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            heartbeat_interval: Duration::from_millis(50),
            append_entries_max: crate::limits::APPEND_ENTRIES_MAX,
            append_bytes_max: crate::limits::APPEND_BYTES_MAX,
            inflight_appends_max: 8,
            uncommitted_entries_max: 4096,
            proposal_wait_max: Duration::from_millis(400),
            snapshot_chunk_bytes_max: crate::limits::SNAPSHOT_CHUNK_BYTES_MAX,
            snapshot_resend_heartbeats: 4,
            pre_vote: true,
            check_quorum: true,
            canary: None,
            damaged: BTreeMap::new(),
        }
    }
}

/// What a replica finds on its disk when it starts: everything in here is durable.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// The latest durable snapshot; the driver restores its state machine from it.
    pub snapshot: Option<Snapshot>,
    /// The log, contiguous from the snapshot's index + 1 (from 1 without a snapshot).
    pub entries: Vec<Entry>,
}

/// Damage that log recovery found on a replica's disk. Only a driver that chooses to bring a
/// damaged replica back (the simulator) passes it; the shell refuses to start instead.
///
/// A damaged replica keeps the valid prefix of its log (the driver passes only entries below
/// `from`) and follows, appends and acknowledges as usual (it holds what it acknowledges, and
/// its term survived, so it refuses a deposed leader), but grants no vote or pre-vote and never
/// campaigns until it is repaired. A wiped one (`votes_lost`) lost its term too: its
/// acknowledgements count for nothing ([`AppendResult::AcceptedVotesLost`]). See
/// [`super::Replica::damaged_from`] for when that is and why it is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Damage {
    /// The first log index that may be lost; entries from here on were dropped.
    pub from: Index,
    /// The whole disk was lost (wiped): the state file with it, so the terms in which this
    /// replica voted or acknowledged are unknown. Such a replica is never repaired: it stays a
    /// non-voting follower (making it a voter again needs a membership change).
    pub votes_lost: bool,
}

/// A snapshot of a replica's state for status pages, traces and checkers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub group: GroupId,
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub vote: Option<NodeId>,
    pub commit_index: Index,
    pub applied_index: Index,
    pub last_index: Index,
    pub durable_index: Index,
    /// The index of the latest snapshot (0 if none): the log holds entries above it only.
    pub snapshot_index: Index,
}

/// What a replica counted about the protocol paths it took since it started: what a driver
/// exports as metrics and what the simulator reports as coverage (which rare paths a run
/// reached), as facts the replica saw rather than inferred from outside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftCounters {
    /// PreVote rounds started (an election timeout with `pre_vote` on).
    pub pre_vote_campaigns: u64,
    /// Elections started with a term bump: after a won PreVote round, without PreVote, or on
    /// a `TimeoutNow` (those are also in `transfer_campaigns`).
    pub campaigns: u64,
    pub transfer_campaigns: u64,
    pub elections_won: u64,
    /// Times a leader stepped down because a majority did not answer within an election
    /// timeout (CheckQuorum).
    pub check_quorum_step_downs: u64,
    /// Leadership transfers taken on, and those given up after an election timeout.
    pub transfers_started: u64,
    pub transfers_aborted: u64,
    /// A follower dropped a conflicting tail of its log for a leader's entries.
    pub conflicting_tails_dropped: u64,
    /// InstallSnapshot chunks sent (leader) and whole snapshots installed (follower).
    pub snapshot_chunks_sent: u64,
    pub snapshots_installed: u64,
    /// A replica that recovered damaged became whole again (see `Replica::damaged_from`).
    pub damage_repaired: u64,
}

impl RaftCounters {
    /// Adds `other` in, field by field (a driver summing replicas or restarts).
    pub fn add(&mut self, other: &RaftCounters) {
        self.pre_vote_campaigns += other.pre_vote_campaigns;
        self.campaigns += other.campaigns;
        self.transfer_campaigns += other.transfer_campaigns;
        self.elections_won += other.elections_won;
        self.check_quorum_step_downs += other.check_quorum_step_downs;
        self.transfers_started += other.transfers_started;
        self.transfers_aborted += other.transfers_aborted;
        self.conflicting_tails_dropped += other.conflicting_tails_dropped;
        self.snapshot_chunks_sent += other.snapshot_chunks_sent;
        self.snapshots_installed += other.snapshots_installed;
        self.damage_repaired += other.damage_repaired;
    }

    /// Every counter with a stable name, in declaration order.
    pub fn named(&self) -> [(&'static str, u64); 11] {
        [
            ("pre-vote-campaign", self.pre_vote_campaigns),
            ("campaign", self.campaigns),
            ("transfer-campaign", self.transfer_campaigns),
            ("election-won", self.elections_won),
            ("check-quorum-step-down", self.check_quorum_step_downs),
            ("transfer-started", self.transfers_started),
            ("transfer-aborted", self.transfers_aborted),
            ("conflicting-tail-dropped", self.conflicting_tails_dropped),
            ("snapshot-chunk-sent", self.snapshot_chunks_sent),
            ("snapshot-installed", self.snapshots_installed),
            ("damage-repaired", self.damage_repaired),
        ]
    }
}
