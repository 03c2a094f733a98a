//! One node of the cluster: a replica of the metadata group and of every broker group, the
//! state machines applied from their logs, and the client requests waiting on them.
//!
//! Sans-IO like the replica: inputs carry `now`; writes, peer messages and client responses
//! are polled. Requests that change state are batched: every command that arrives for a group
//! before the driver next polls goes into one Raft entry, so one write, one sync and one round
//! of replication serve them all.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::membership::{Allocation, LeaseClocks, Membership, PullAsk, PullVerdict};
use super::metadata::{
    METADATA_GROUP, MetaCommand, MetaState, NodeApplied, NodeRecord, TopicApplied,
};
use super::protocol::{
    ClientId, ConsumerProgress, GroupStatus, QueueHolder, Request, RequestId, Response, Route,
};
use super::seen_requests::SeenRequests;
use crate::broker::{
    BrokerConfig, BrokerState, Command, Holder, Message, Offset, Outcome, PullPlan, QueueId,
    ReadMessage, Refusal, StoreOp, decode_command, decode_command_shared, decode_record_checking,
    encode_command, holds_messages,
};
use crate::client::AllocationStrategy;
use crate::limits::{
    ACK_OFFSETS_MAX, COMMAND_BYTES_MAX, CREATE_QUEUES_PER_COMMAND_MAX, EVENTS_BUFFERED_MAX,
    MESSAGE_PROPERTIES_MAX, MESSAGE_TAGS_MAX, PULL_BYTES_MAX, PULL_MESSAGES_MAX, PULL_WAIT_MS_MAX,
    REDRIVE_MESSAGES_MAX, SEND_MESSAGES_MAX, STATUS_CONSUMERS_MAX, check_member, check_name,
};
use crate::raft::{
    Canary, ConfChange, Config, Entry, EntryKind, Envelope, GroupId, Index, MembershipError,
    NodeId, ProposalId, ProposalOutcome, ProposeError, RaftEvent, Recovered, Replica, Role,
    Snapshot, Term, TransferError, Write,
};
use crate::time::Instant;

/// The most message bytes one `Send` may carry; larger batches are refused whole.
pub use crate::limits::SEND_BYTES_MAX;
/// Batched commands are split into entries of about this many bytes (one command always goes):
/// entries, records and AppendEntries stay far below the storage and wire limits.
use crate::limits::{COMMAND_FRAMING_BYTES, ENTRY_BYTES_MAX};
/// How often a parked pull on a leader without its read lease looks again.
const LEASE_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);
/// A pull that waits for its queue's lease (a claim going through the log, or the holder's
/// release or expiry) waits at least this long before it is answered empty.
const CLAIM_WAIT_MS: u64 = 1_000;
/// A parked claim looks again after this long, in case its entry was lost.
const CLAIM_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);
/// How long the metadata leader looks out for followers to tell of a topic-table change;
/// after it, the ordinary heartbeats tell them (see `BrokerNode::tell_table_change`).
const TABLE_NOTICE_MS: u64 = 100;

/// A topic-table change the metadata leader announces: the entry, the followers told.
struct TableNotice {
    index: Index,
    told: BTreeSet<NodeId>,
    until: Instant,
}

/// Why a node cannot go on (polled with [`BrokerNode::poll_fault`]): the driver stops it, as
/// going on would apply or answer from state that is known to be wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeFault {
    /// A group's snapshot does not decode (a bug, or bytes damaged past their checksums): that
    /// group can no longer apply anything.
    SnapshotUndecodable(String),
    /// Raft reported a proposal of this node committed where the log holds another entry, or
    /// above the commit index: a Raft bug, found before any client was told its command took
    /// effect (those clients hear that the outcome is unknown).
    ProposalMisreported(String),
}

impl std::fmt::Display for NodeFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeFault::SnapshotUndecodable(why) | NodeFault::ProposalMisreported(why) => {
                f.write_str(why)
            }
        }
    }
}

/// What happened in a node that its operator should see in the log: elections, leader
/// changes, and input refused. Polled with [`BrokerNode::poll_event`]; the core reports them
/// as they happen rather than leaving the driver to infer them from changes of state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// This node's replica of `group` won the election of `term`.
    BecameLeader { group: GroupId, term: Term },
    /// This node's replica of `group` stopped leading; `term` is its term now.
    SteppedDown { group: GroupId, term: Term },
    /// This node's replica of `group` follows `leader` in `term`.
    LeaderChanged {
        group: GroupId,
        term: Term,
        leader: NodeId,
    },
    /// A Raft message claiming to come from `from` was dropped unread.
    MessageRefused {
        group: GroupId,
        from: NodeId,
        why: String,
    },
    /// A client request was refused: it changed nothing.
    RequestRefused { client: ClientId, why: String },
    /// This node's replica of `group` gave up handing leadership to `to` (not done in time).
    TransferAborted {
        group: GroupId,
        term: Term,
        to: NodeId,
    },
    /// The queue store could not give back a retained message (an I/O error, or bytes that
    /// fail their checksum): nothing unproven was delivered, and the pull ended before it.
    StoreReadFailed {
        group: GroupId,
        queue: QueueId,
        offset: Offset,
        why: String,
    },
    /// A snapshot's transfer image could not be made (a message of it did not read): a
    /// follower waiting for it is sent none yet; the image is asked for again.
    TransferFailed {
        group: GroupId,
        index: Index,
        why: String,
    },
}

/// A read of the queue store the node needs to finish a pull: the records of `offsets` of
/// `queue` in `group`, in order, handed back through [`BrokerNode::read_done`]. The driver
/// carries out every [`StoreOp`] polled before it first, so the store holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRead {
    pub id: u64,
    pub group: GroupId,
    pub queue: QueueId,
    pub offsets: Vec<Offset>,
}

/// What an applied broker command means for the per consumer group counters.
enum Counted {
    Nothing,
    /// A `ReconsumeLater` by this consumer group of a message of this queue.
    Requeue(String, QueueId),
    /// These consumer groups are deleted (if the command was not refused).
    Forget(Vec<String>),
    /// This topic's queues may be dropped.
    Drop(String),
}

impl Counted {
    fn of(command: &Command) -> Counted {
        match command {
            Command::ReconsumeLater { group, queue, .. }
            | Command::OwnedReconsumeLater { group, queue, .. } => {
                Counted::Requeue(group.clone(), queue.clone())
            }
            Command::DeleteGroup { group, .. } => Counted::Forget(vec![group.clone()]),
            Command::ExpireGroups { groups } => Counted::Forget(groups.clone()),
            Command::DropTopic { topic, .. } => Counted::Drop(topic.clone()),
            _ => Counted::Nothing,
        }
    }
}

/// A pull waiting for its read.
struct PendingRead {
    client: ClientId,
    request: RequestId,
    group: GroupId,
    consumer_group: String,
    queue: QueueId,
    offsets: Vec<Offset>,
    next_offset: Offset,
    /// An operator's read of a dead-letter queue (`PeekDeadLetters`), not a consumer's pull.
    peek: bool,
}

/// Static configuration of a node.
/// The leader balancer looks this often by default: moves are rare and each costs the group a
/// round trip without proposals, so there is no hurry.
pub const LEADER_BALANCE_INTERVAL_MS_DEFAULT: u64 = 3_000;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// The nodes of the cluster's first configuration; each hosts a replica of every group.
    /// Nodes added later are in the metadata group's node table.
    pub nodes: Vec<NodeId>,
    /// This node joined a running cluster (it is not among `nodes`' first configuration): its
    /// replicas start with no configuration of their own, so they neither campaign nor count
    /// themselves, and learn each group's configuration from its leader's log or snapshot.
    pub joined: bool,
    /// A `ChangeMembership` removal that leaves a group fewer voters than this is refused
    /// unless forced: each group is meant to survive `(replication_factor - 1) / 2` failures.
    pub replication_factor: usize,
    /// Broker groups, numbered from 1 (the metadata group is 0).
    pub broker_groups: Vec<GroupId>,
    pub broker: BrokerConfig,
    /// Raft settings for every replica (its `id` and `group` are filled in per replica).
    pub raft: Config,
    /// Most long polls parked at once; more are answered empty at once.
    pub parked_pulls_max: usize,
    /// A consumer not heard from for this long has left its group, and a broker may hand the
    /// queues it held to their next owners.
    pub member_session_ms: u64,
    /// How the metadata leader shares a group's queues among its members.
    pub allocation: AllocationStrategy,
    /// Keep every applied entry for [`BrokerNode::poll_applied`] (the simulator's checkers).
    pub record_applied: bool,
    /// Compact a group's log into a snapshot of its state once this many entries were applied
    /// since the last snapshot and their command bytes exceed that snapshot's size (so the
    /// work of snapshotting stays proportional to what the log grew by). `None`: never.
    pub snapshot_entries_min: Option<u64>,
    /// A snapshot is also due once a group's log holds this many command bytes since the last
    /// one, whatever `snapshot_entries_min` says (unless it is `None`): the log's entries carry
    /// message bytes until compaction, so this bounds that memory per group and what a restart
    /// reads back. At most [`crate::limits::SNAPSHOT_LOG_BYTES_MAX`].
    pub snapshot_log_bytes: u64,
    /// How often a broker group's leader checks whether retention has messages to delete.
    pub trim_interval_ms: u64,
    /// A consumer group none of whose members a broker group's leader has heard from for this
    /// long loses its offsets and leases there ([`Command::ExpireGroups`]); `None`: never.
    /// Looked for once per `trim_interval_ms`.
    pub group_retention_ms: Option<u64>,
    /// How often this node looks whether it leads too many groups and hands one over (see
    /// `balance.rs`); `None`: never.
    pub leader_balance_interval_ms: Option<u64>,
    /// A follower behind a broker group's compaction point is sent the metadata snapshot
    /// itself, and its store fetches the message segments it lacks from peers
    /// ([`StoreOp::CatchUp`]), instead of a transfer image with every retained message
    /// ([`TransferJob`]). For drivers whose store can fetch (the shell's files); the
    /// simulator's memory store cannot.
    pub segment_catch_up: bool,
    /// A restarting node applies the log it recovered in steps: each ends once this many bytes
    /// of queue store writes wait for the driver (see [`BrokerNode::replaying`]), so the
    /// replay never holds more than this (plus one entry's writes) of re-encoded messages.
    pub replay_store_bytes_max: u64,
    pub canary: Option<Canary>,
}

impl NodeConfig {
    pub fn new(id: NodeId, nodes: Vec<NodeId>, broker_groups: u64) -> NodeConfig {
        NodeConfig {
            id,
            raft: Config::new(id, METADATA_GROUP, nodes.clone()),
            joined: false,
            replication_factor: nodes.len().clamp(1, 3),
            nodes,
            broker_groups: (1..=broker_groups).collect(),
            broker: BrokerConfig::default(),
            parked_pulls_max: 10_000,
            member_session_ms: crate::limits::MEMBER_SESSION_MS_DEFAULT,
            allocation: AllocationStrategy::default(),
            record_applied: false,
            snapshot_entries_min: Some(10_000),
            snapshot_log_bytes: crate::limits::SNAPSHOT_LOG_BYTES_DEFAULT,
            trim_interval_ms: 1_000,
            group_retention_ms: Some(crate::limits::GROUP_RETENTION_MS_DEFAULT),
            leader_balance_interval_ms: Some(LEADER_BALANCE_INTERVAL_MS_DEFAULT),
            segment_catch_up: false,
            replay_store_bytes_max: crate::limits::REPLAY_STORE_BYTES_DEFAULT,
            canary: None,
        }
    }

    fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        std::iter::once(METADATA_GROUP).chain(self.broker_groups.iter().copied())
    }
}

// One machine per group: boxing the larger variant would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Machine {
    Meta(MetaState),
    Broker(BrokerState),
}

impl Machine {
    /// The same kind of machine, restored from a snapshot's data: from this node's own disk,
    /// or (`from_leader`) installed from the leader, when it must hold every message, since
    /// this node's store may hold none of them.
    /// `from_leader` names the sender when this node's store fetches what it lacks from peers
    /// (`NodeConfig::segment_catch_up`).
    fn restored(
        &self,
        data: &[u8],
        from_leader: bool,
        catch_up_from: Option<NodeId>,
    ) -> Result<Machine, String> {
        match self {
            Machine::Meta(_) => MetaState::restore(data).map(Machine::Meta),
            Machine::Broker(state) if from_leader && !holds_messages(data) => {
                let Some(from) = catch_up_from else {
                    return Err(
                        "a metadata-only snapshot, which holds no messages, cannot be \
                         installed from another node"
                            .to_string(),
                    );
                };
                BrokerState::restore(state.config().clone(), data)
                    .map(|state| Machine::Broker(state.catching_up_from(from)))
                    .map_err(|e| e.to_string())
            }
            Machine::Broker(state) => BrokerState::restore(state.config().clone(), data)
                .map(Machine::Broker)
                .map_err(|e| e.to_string()),
        }
    }
}

/// A group's state machine as it was after applying entry `index`, to encode into a snapshot.
/// Encoding a large state takes long enough to stall heartbeats (hundreds of milliseconds for
/// a few hundred megabytes of messages), so the node only copies the state (cheap: message
/// bodies are shared) and the driver encodes it wherever it likes, another thread included,
/// then hands the bytes back through [`BrokerNode::snapshot_encoded`].
pub struct SnapshotJob {
    pub group: GroupId,
    pub index: Index,
    /// The term of the entry at `index`: the snapshot's term.
    pub term: Term,
    /// The group's configuration as of `index`, which the snapshot file must hold.
    pub membership: Option<crate::raft::Membership>,
    image: Machine,
}

impl SnapshotJob {
    /// The snapshot's data, a function of the image alone (a broker group's is metadata
    /// only: [`BrokerState::metadata_snapshot`]); safe to call on any thread. On an error the
    /// driver reports [`BrokerNode::snapshot_failed`].
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        match &self.image {
            Machine::Meta(meta) => Ok(meta.snapshot()),
            Machine::Broker(state) => state.metadata_snapshot(),
        }
    }

    /// Whether the snapshot refers to the group's queue store, which the driver must then
    /// sync (every operation polled before the job) before it writes the snapshot anywhere
    /// or reports it encoded, and must not delete below the snapshot's queue starts
    /// ([`SnapshotJob::queue_starts`]) until a newer snapshot is durable.
    pub fn needs_store(&self) -> bool {
        matches!(self.image, Machine::Broker(_))
    }

    /// Each queue's first retained offset in the snapshot: what a restart from it needs of
    /// the store.
    pub fn queue_starts(&self) -> Vec<(QueueId, Offset)> {
        match &self.image {
            Machine::Meta(_) => Vec::new(),
            Machine::Broker(state) => state
                .queues()
                .filter_map(|q| Some((q.clone(), state.start_offset(q)?)))
                .collect(),
        }
    }
}

/// A follower needs the snapshot of a broker group at `index`, whose data is metadata only:
/// the driver makes its *transfer image* (the same state with every retained message, read
/// from the queue store) wherever it likes, then hands it back through
/// [`BrokerNode::transfer_encoded`].
pub struct TransferJob {
    pub group: GroupId,
    pub index: Index,
    pub term: Term,
    metadata: Bytes,
    config: BrokerConfig,
}

impl TransferJob {
    /// The image, reading each retained message of the snapshot with `read` (from the store,
    /// which holds them while this snapshot is the group's latest durable one). An error if
    /// a message did not read or the snapshot did not decode.
    pub fn encode(&self, read: &mut ReadMessage<'_>) -> Result<Vec<u8>, String> {
        let state =
            BrokerState::restore(self.config.clone(), &self.metadata).map_err(|e| e.to_string())?;
        state.snapshot_with(read)
    }
}

/// Log growth since a group's last snapshot, to decide when to compact.
#[derive(Debug, Default)]
struct SnapshotPace {
    entries_since: u64,
    bytes_since: u64,
    /// The size of the last snapshot's data.
    last_bytes: u64,
}

/// What applying one command did, to answer whoever proposed it.
enum Applied {
    Broker(Outcome),
    Topic {
        topic: String,
        result: Result<TopicApplied, String>,
    },
    /// A node-table command: the table after it, or why it was refused.
    NodeTable(Result<Vec<NodeRecord>, String>),
    /// A broker group added: its id and first voters, or why it was refused.
    BrokerGroup(Result<(GroupId, Vec<NodeId>), String>),
}

/// A client request inside a proposed entry.
struct Waiter {
    client: ClientId,
    request: RequestId,
    queue: Option<QueueId>,
}

struct Group {
    raft: Replica,
    machine: Machine,
    /// Commands to propose as one entry, with whoever waits for each (none for the node's own).
    batch: Vec<(Option<Waiter>, Bytes)>,
    /// Proposed entries: the waiters of each command, in order.
    proposed: BTreeMap<ProposalId, Vec<Option<Waiter>>>,
    /// Outcomes of applied entries that carry proposals of ours, until their fate arrives.
    applied: BTreeMap<Index, Vec<Applied>>,
    /// Index and term of each proposal still in flight.
    proposal_index: BTreeMap<ProposalId, (Index, Term)>,
    /// Queues (with their topic's epoch) this node asked the group to create.
    creating: BTreeSet<(u64, QueueId)>,
    /// The topic table changed, or this replica's leadership did, since its leader last
    /// looked for queues the table places here and it has not created: the look is a pass
    /// over the table, so it is not made on every event.
    placement_stale: bool,
    pace: SnapshotPace,
    /// The index of a snapshot handed out to encode and not yet back.
    encoding: Option<Index>,
    /// The index of a snapshot whose transfer image is being made and not yet back.
    transferring: Option<Index>,
    /// When this node, as leader, last looked for messages retention deletes.
    trim_checked_at: Option<Instant>,
    /// The term this node leads the group in and since when (soft state, like the lease
    /// clocks: a new leader counts every consumer group as heard from when it took office).
    led_since: Option<(Term, Instant)>,
    /// When each consumer group's members were last heard from by this leader, at most
    /// `GROUP_ACTIVITY_ENTRIES_MAX`.
    group_seen: BTreeMap<String, Instant>,
    /// Configuration changes proposed for clients, answered when their fate is known.
    config_waiters: BTreeMap<ProposalId, (ClientId, RequestId)>,
    /// The commit index recovered from disk while the entries up to it are still being
    /// applied in steps (see [`NodeConfig::replay_store_bytes_max`]); 0 once they are.
    replay_to: Index,
    /// The driver holds this group's writes and store operations and can take no more for
    /// now (see [`BrokerNode::pause`]).
    paused: bool,
}

impl Group {
    fn new(raft: Replica, machine: Machine, pace: SnapshotPace) -> Group {
        let status = raft.status();
        let replay_to = if status.commit_index > status.applied_index {
            status.commit_index
        } else {
            0
        };
        Group {
            raft,
            machine,
            batch: Vec::new(),
            proposed: BTreeMap::new(),
            applied: BTreeMap::new(),
            proposal_index: BTreeMap::new(),
            creating: BTreeSet::new(),
            placement_stale: true,
            pace,
            encoding: None,
            transferring: None,
            trim_checked_at: None,
            led_since: None,
            group_seen: BTreeMap::new(),
            config_waiters: BTreeMap::new(),
            replay_to,
            paused: false,
        }
    }
}

struct ParkedPull {
    client: ClientId,
    request: RequestId,
    group: GroupId,
    request_body: Request,
    deadline: Instant,
    /// Earlier than the deadline when a retry message falls due before it.
    wake_at: Instant,
    /// Waits for its queue's lease rather than for messages: answered empty at the deadline.
    for_lease: bool,
}

pub struct BrokerNode {
    config: NodeConfig,
    groups: BTreeMap<GroupId, Group>,
    responses: VecDeque<(ClientId, RequestId, Response)>,
    parked: Vec<ParkedPull>,
    /// Requests taken, so a duplicated copy is dropped (see `seen_requests`).
    seen_requests: SeenRequests,
    next_proposal: ProposalId,
    /// Consumer groups' members and generations, on the metadata leader (soft state, fenced
    /// by the metadata term: see `membership`). At most `CONSUMER_GROUPS_MAX` groups of
    /// `MEMBERS_PER_GROUP_MAX` members.
    membership: Membership,
    /// On broker leaders: when each queue's holder was last heard from, who waits for it.
    lease_clocks: LeaseClocks,
    /// For the operator's log; the oldest go first past `EVENTS_BUFFERED_MAX`.
    events: VecDeque<NodeEvent>,
    /// Passes over the topic table looking for queues to create, for tests to count.
    #[cfg(test)]
    pub(super) placement_scans: u64,
    applied: VecDeque<(GroupId, Entry)>,
    /// Why the node cannot go on: see [`NodeFault`].
    faults: VecDeque<NodeFault>,
    snapshot_jobs: VecDeque<SnapshotJob>,
    transfer_jobs: VecDeque<TransferJob>,
    /// What [`BrokerNode::stats`] reports.
    pub(super) counters: super::stats::Counters,
    /// When the leader balancer looks next (`None`: it is off).
    balance_at: Option<Instant>,
    /// Queue store operations from applying commands, in order per group.
    store_ops: VecDeque<(GroupId, StoreOp)>,
    /// What `store_ops` weighs ([`StoreOp::weight_bytes`]), which bounds a replay's steps.
    store_ops_bytes: u64,
    /// Reads to hand the driver, and the pulls waiting for them (at most `parked_pulls_max`).
    store_reads: VecDeque<StoreRead>,
    pending_reads: BTreeMap<u64, PendingRead>,
    next_read: u64,
    /// Rises whenever the applied node table changes (see [`BrokerNode::node_table`]).
    node_table_version: u64,
    /// What the driver recovered for groups outside the config (broker groups added at
    /// runtime): each becomes a replica once the applied metadata table lists its group.
    dormant: BTreeMap<GroupId, Recovered>,
    /// Broker groups this node created a fresh replica of, with their first voters, for the
    /// driver to give storage before it carries out any write of theirs.
    new_groups: VecDeque<(GroupId, Vec<NodeId>)>,
    /// The metadata table's broker groups may list one this node should host and does not.
    added_groups_stale: bool,
    /// On the metadata leader, for a short while after the topic table changed: the
    /// followers told of the change so far (see `tell_table_change`).
    table_notice: Option<TableNotice>,
    /// Seeds the replicas of broker groups added at runtime.
    seed: u64,
}

impl BrokerNode {
    /// Starts a node from what its disks hold for each group (missing groups start empty).
    /// `seed` drives the replicas' election timeouts.
    pub fn new(
        config: NodeConfig,
        mut recovered: BTreeMap<GroupId, Recovered>,
        seed: u64,
        now: Instant,
    ) -> BrokerNode {
        let mut faults = VecDeque::new();
        let groups = config
            .groups()
            .map(|group| {
                let mut raft_config = config.raft.clone();
                raft_config.id = config.id;
                raft_config.group = group;
                raft_config.voters = if config.joined {
                    Vec::new()
                } else {
                    config.nodes.clone()
                };
                raft_config.canary = config.canary;
                let disk = recovered.remove(&group).unwrap_or_default();
                let machine = if group == METADATA_GROUP {
                    Machine::Meta(MetaState::default())
                } else {
                    let mut broker = config.broker.clone();
                    broker.canary = config.canary;
                    Machine::Broker(BrokerState::new(broker))
                };
                let (machine, pace) = restore_machine(group, machine, &disk, &mut faults);
                let replica_seed = seed ^ group.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut raft = Replica::new(raft_config, disk, replica_seed, now);
                raft.use_transfer_images(
                    matches!(machine, Machine::Broker(_)) && !config.segment_catch_up,
                );
                (group, Group::new(raft, machine, pace))
            })
            .collect();
        let mut node = BrokerNode {
            config,
            groups,
            responses: VecDeque::new(),
            seen_requests: SeenRequests::default(),
            parked: Vec::new(),
            next_proposal: 1,
            membership: Membership::default(),
            lease_clocks: LeaseClocks::default(),
            events: VecDeque::new(),
            #[cfg(test)]
            placement_scans: 0,
            applied: VecDeque::new(),
            faults,
            snapshot_jobs: VecDeque::new(),
            transfer_jobs: VecDeque::new(),
            counters: Default::default(),
            balance_at: None,
            store_ops: VecDeque::new(),
            store_ops_bytes: 0,
            store_reads: VecDeque::new(),
            pending_reads: BTreeMap::new(),
            next_read: 1,
            node_table_version: 1,
            dormant: recovered,
            new_groups: VecDeque::new(),
            added_groups_stale: true,
            table_notice: None,
            seed,
        };
        node.settle(now);
        node
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The replica of `group`, for status and checks.
    #[inline]
    pub fn replica(&self, group: GroupId) -> Option<&Replica> {
        self.groups.get(&group).map(|g| &g.raft)
    }

    #[inline]
    pub fn broker_state(&self, group: GroupId) -> Option<&BrokerState> {
        match &self.groups.get(&group)?.machine {
            Machine::Broker(state) => Some(state),
            Machine::Meta(_) => None,
        }
    }

    pub fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    /// The metadata group's node table as this node has applied it: nodes added at runtime
    /// with their addresses, and ids removed for good. A driver links to the added nodes and
    /// forgets the removed ones whenever [`BrokerNode::node_table_version`] rises.
    pub fn node_table(&self) -> Vec<NodeRecord> {
        match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
            Some(Machine::Meta(meta)) => meta.nodes().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Rises whenever the applied node table may have changed (an entry or a snapshot).
    pub fn node_table_version(&self) -> u64 {
        self.node_table_version
    }

    /// Nodes a group may add: the first configuration's and those the node table added.
    fn node_known(&self, id: NodeId) -> Result<(), String> {
        let record = self.node_table().into_iter().find(|r| r.id == id);
        match record {
            Some(r) if r.removed => Err(format!(
                "node {id} was removed from this cluster and its id is never used again"
            )),
            Some(_) => Ok(()),
            None if self.config.nodes.contains(&id) => Ok(()),
            None => Err(format!(
                "node {id} has no address in the node table: record it first (`holdfast node \
                 add` does); if it was just recorded, retry: this node has not applied it yet"
            )),
        }
    }

    /// Pulls waiting for messages or for their queue's lease.
    pub fn parked_pulls(&self) -> usize {
        self.parked.len()
    }

    /// Hands every group this node leads to its best placed peer (see
    /// [`Replica::transfer_candidate`]), for a node about to stop: its groups then change
    /// leader in a round trip instead of an election timeout. Asking again while transfers are
    /// under way changes nothing; a transfer given up is started again. Returns how many
    /// groups this node still leads with a transfer under way: worth waiting for. (A group
    /// whose peers were not heard from lately has no one to go to.)
    pub fn hand_over_leadership(&mut self, now: Instant) -> usize {
        let mut transferring = 0;
        for group in self.groups.values_mut() {
            if group.raft.status().role != Role::Leader {
                continue;
            }
            if group.raft.transferring_to().is_none()
                && let Some(to) = group.raft.transfer_candidate()
            {
                // Refused only by a replica that is not leading or already transferring.
                let _ = group.raft.transfer_leadership(now, to);
            }
            if group.raft.transferring_to().is_some() {
                transferring += 1;
            }
        }
        self.settle(now);
        transferring
    }

    // ----- inputs -----

    pub fn handle_peer(&mut self, now: Instant, envelope: Envelope) {
        if envelope.to == self.config.id && !self.groups.contains_key(&envelope.group) {
            self.reached_for_added_group(now, envelope.group);
        }
        let why = if envelope.to != self.config.id {
            Some(format!("addressed to node {}", envelope.to))
        } else if !self.groups.contains_key(&envelope.group) {
            Some("no such group".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            self.event(NodeEvent::MessageRefused {
                group: envelope.group,
                from: envelope.from,
                why,
            });
            return;
        }
        if let Some(group) = self.groups.get_mut(&envelope.group) {
            if group.paused
                && matches!(&envelope.message, crate::raft::Message::Append { entries, .. } if !entries.is_empty())
            {
                // Taken, it would only add to the writes the driver cannot take (see
                // `pause`); lost, it is sent again.
                return;
            }
            group.raft.step(now, envelope.from, envelope.message);
        }
        self.settle(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for group in self.groups.values_mut() {
            if group.raft.poll_timeout() <= now {
                group.raft.handle_timeout(now);
            }
        }
        self.balance_leaders(now);
        self.settle(now);
    }

    /// Hands over one group this node leads if it leads at least two more than some live node
    /// (see `balance.rs`), once per `leader_balance_interval_ms`.
    fn balance_leaders(&mut self, now: Instant) {
        let Some(interval_ms) = self.config.leader_balance_interval_ms else {
            return;
        };
        let interval = std::time::Duration::from_millis(interval_ms);
        let Some(at) = self.balance_at else {
            self.balance_at = Some(now + interval);
            return;
        };
        if now < at {
            return;
        }
        self.balance_at = Some(now + interval);
        let me = self.config.id;
        let mut leaders = BTreeMap::new();
        let mut live = BTreeSet::from([me]);
        let mut heard: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::new();
        let recent = self.config.raft.election_timeout_min;
        for (id, group) in &self.groups {
            let status = group.raft.status();
            if status.role == Role::Leader && group.raft.transferring_to().is_some() {
                return; // one move at a time
            }
            leaders.insert(*id, status.leader);
            live.extend(status.leader);
            if status.role == Role::Leader {
                let peers = group.raft.peers_heard_within(now, recent);
                live.extend(peers.iter().copied());
                heard.insert(*id, peers);
            }
        }
        let reachable = |group: GroupId, node: NodeId| {
            heard.get(&group).is_some_and(|peers| peers.contains(&node))
        };
        let Some((group, to)) = super::balance::pick_transfer(me, &leaders, &live, reachable)
        else {
            return;
        };
        if let Some(g) = self.groups.get_mut(&group) {
            // Refused only if it stopped leading meanwhile, which it did not.
            let _ = g.raft.transfer_leadership(now, to);
        }
    }

    /// The driver synced `write` of `group` and everything before it.
    pub fn persisted(&mut self, now: Instant, group: GroupId, write: crate::raft::WriteId) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.raft.persisted(now, write);
        }
        self.settle(now);
    }

    pub fn handle_request(
        &mut self,
        now: Instant,
        client: ClientId,
        request_id: RequestId,
        request: Request,
    ) {
        self.request(now, client, request_id, request);
        self.settle(now);
    }

    /// Many requests that arrived together: their commands for one group are proposed as one
    /// entry, so a burst of sends costs one log entry, one write and one replication round.
    pub fn handle_requests(
        &mut self,
        now: Instant,
        requests: impl IntoIterator<Item = (ClientId, RequestId, Request)>,
    ) {
        for (client, request_id, request) in requests {
            self.request(now, client, request_id, request);
        }
        self.settle(now);
    }

    fn request(&mut self, now: Instant, client: ClientId, id: RequestId, request: Request) {
        if !self.seen_requests.first_time(client, id) {
            // A copy of a request already taken: its answer comes (or came) for the first.
            return;
        }
        *self.counters.requests.entry(request.kind()).or_default() += 1;
        match request {
            Request::Route { topic } => {
                if let Err(why) = check_name("topic", &topic) {
                    return self.refuse(client, id, why);
                }
                // A follower may not have applied a topic just created: only the metadata
                // leader's word that a topic does not exist is final.
                let response = match (self.routes(&topic), self.not_leader(METADATA_GROUP)) {
                    (Response::Refused { .. }, Some(redirect)) => redirect,
                    (response, _) => response,
                };
                self.responses.push_back((client, id, response));
            }
            Request::Topics => {
                if let Some(response) = self.not_leader(METADATA_GROUP) {
                    self.responses.push_back((client, id, response));
                    return;
                }
                let topics = match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
                    Some(Machine::Meta(meta)) => meta.topics(),
                    _ => Vec::new(),
                };
                self.responses
                    .push_back((client, id, Response::Topics { topics }));
            }
            Request::Status => {
                // The first consumers only, so that the answer always fits a frame.
                // Both lists are bounded, so the answer always fits a frame.
                let mut consumers_left = STATUS_CONSUMERS_MAX;
                let mut holders_left = STATUS_CONSUMERS_MAX;
                let groups = self
                    .groups
                    .iter()
                    .map(|(group, g)| {
                        let s = g.raft.status();
                        let consumers: Vec<ConsumerProgress> = match &g.machine {
                            Machine::Broker(state) => {
                                let mut consumers: Vec<ConsumerProgress> = state
                                    .consume_offsets()
                                    .take(consumers_left)
                                    .map(|(group, queue, consume_offset)| ConsumerProgress {
                                        group: group.to_string(),
                                        queue: queue.clone(),
                                        consume_offset,
                                        queue_len: state.queue_len(queue).unwrap_or(0),
                                    })
                                    .collect();
                                // A queue claimed and never acknowledged in has no offsets
                                // yet: its group starts at the queue's start, so all of it
                                // is lag (not "end 0, lag 0").
                                let known: BTreeSet<(String, QueueId)> = consumers
                                    .iter()
                                    .map(|c| (c.group.clone(), c.queue.clone()))
                                    .collect();
                                let unacked: Vec<ConsumerProgress> = state
                                    .leases()
                                    .filter(|((group, queue), _)| {
                                        !known.contains(&(group.clone(), queue.clone()))
                                    })
                                    .filter_map(|((group, queue), _)| {
                                        Some(ConsumerProgress {
                                            group: group.clone(),
                                            queue: queue.clone(),
                                            consume_offset: state.start_offset(queue)?,
                                            queue_len: state.queue_len(queue)?,
                                        })
                                    })
                                    .take(consumers_left.saturating_sub(consumers.len()))
                                    .collect();
                                consumers.extend(unacked);
                                consumers
                            }
                            Machine::Meta(_) => Vec::new(),
                        };
                        consumers_left -= consumers.len();
                        let holders: Vec<QueueHolder> = match &g.machine {
                            Machine::Broker(state) => state
                                .leases()
                                .take(holders_left)
                                .map(|((group, queue), lease)| QueueHolder {
                                    group: group.clone(),
                                    queue: queue.clone(),
                                    member: lease.owner.clone(),
                                    generation: lease.generation,
                                })
                                .collect(),
                            Machine::Meta(_) => Vec::new(),
                        };
                        holders_left -= holders.len();
                        let membership = g.raft.membership().1;
                        let matches = if s.role == Role::Leader {
                            g.raft.progress_matches().into_iter().collect()
                        } else {
                            Vec::new()
                        };
                        GroupStatus {
                            voters: membership.voters.iter().copied().collect(),
                            learners: membership.learners.iter().copied().collect(),
                            matches,
                            replication_factor: self.config.replication_factor as u32,
                            consumers,
                            holders,
                            group: *group,
                            role: format!("{:?}", s.role),
                            term: s.term,
                            leader: s.leader,
                            commit_index: s.commit_index,
                            applied_index: s.applied_index,
                            last_index: s.last_index,
                            snapshot_index: s.snapshot_index,
                        }
                    })
                    .collect();
                let response = Response::Status {
                    node: self.config.id,
                    groups,
                };
                self.responses.push_back((client, id, response));
            }
            Request::Heartbeat {
                group,
                member,
                topic,
            } => {
                if let Err(why) = check_name("consumer group", &group)
                    .and(check_member(&member))
                    .and(check_name("topic", &topic))
                {
                    return self.refuse(client, id, why);
                }
                let response = self.heartbeat(now, &group, &member, Some(&topic));
                self.responses.push_back((client, id, response));
            }
            Request::Leave { group, member } => {
                if let Err(why) = check_name("consumer group", &group).and(check_member(&member)) {
                    return self.refuse(client, id, why);
                }
                let response = self.heartbeat(now, &group, &member, None);
                self.responses.push_back((client, id, response));
            }
            Request::CreateTopic { topic, queues } => {
                if let Some(response) = self.not_leader(METADATA_GROUP) {
                    self.responses.push_back((client, id, response));
                    return;
                }
                // Refused or already there on the applied table: answered now. A creation of
                // the same topic still in flight is sorted out when it applies.
                let checked = match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
                    Some(Machine::Meta(meta)) => {
                        meta.check_create(&topic, queues, &self.config.broker_groups)
                    }
                    _ => Err("no metadata group".into()),
                };
                match checked {
                    Err(why) => self.refuse(client, id, why),
                    Ok(TopicApplied::Deleted { .. }) => {
                        self.refuse(client, id, "not a creation".into())
                    }
                    Ok(TopicApplied::Existed) => {
                        let response = Response::TopicCreated {
                            topic,
                            existed: true,
                        };
                        self.responses.push_back((client, id, response));
                    }
                    Ok(TopicApplied::Created) => {
                        let command = MetaCommand::CreateTopic { topic, queues };
                        // A name and a number always encode.
                        let bytes =
                            Bytes::from(postcard::to_allocvec(&command).unwrap_or_default());
                        let waiter = Waiter {
                            client,
                            request: id,
                            queue: None,
                        };
                        self.enqueue(METADATA_GROUP, Some(waiter), bytes);
                    }
                }
            }
            Request::DeleteTopic { topic } => {
                if let Some(response) = self.not_leader(METADATA_GROUP) {
                    self.responses.push_back((client, id, response));
                    return;
                }
                let checked = match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
                    Some(Machine::Meta(meta)) => meta.check_delete(&topic),
                    _ => Err("no metadata group".into()),
                };
                if let Err(why) = checked {
                    return self.refuse(client, id, why);
                }
                // Two deletions racing in one batch: the second is refused when it applies.
                let command = MetaCommand::DeleteTopic { topic };
                let bytes = Bytes::from(postcard::to_allocvec(&command).unwrap_or_default());
                let waiter = Waiter {
                    client,
                    request: id,
                    queue: None,
                };
                self.enqueue(METADATA_GROUP, Some(waiter), bytes);
            }
            Request::Send {
                broker,
                queue,
                producer_id,
                first_seq,
                messages,
            } => {
                if let Err(why) = check_name("topic", &queue.topic).and(check_send(&messages)) {
                    return self.refuse(client, id, why);
                }
                let command = Command::Append {
                    queue: queue.clone(),
                    producer_id,
                    first_seq,
                    messages,
                    stamp_ms: now.as_micros() / 1_000,
                };
                self.propose_to_queue(client, id, broker, queue, command);
            }
            Request::Ack {
                broker,
                group,
                member,
                generation,
                queue,
                offsets,
            } => {
                let checked = check_consumer_queue(&group, &queue)
                    .and(check_member(&member))
                    .and_then(|()| {
                        if offsets.len() > ACK_OFFSETS_MAX {
                            Err(format!(
                                "an ack of {} offsets exceeds the maximum of {ACK_OFFSETS_MAX}",
                                offsets.len()
                            ))
                        } else {
                            Ok(())
                        }
                    });
                if let Err(why) = checked {
                    return self.refuse(client, id, why);
                }
                self.heard_from_holder(now, broker, &group, &queue, &member);
                self.heard_from_group(now, broker, &group);
                let command = Command::OwnedAck {
                    group,
                    queue: queue.clone(),
                    member,
                    generation,
                    offsets,
                };
                self.propose_to_queue(client, id, broker, queue, command);
            }
            Request::ReconsumeLater {
                broker,
                group,
                member,
                generation,
                queue,
                offset,
            } => {
                if let Err(why) = check_consumer_queue(&group, &queue).and(check_member(&member)) {
                    return self.refuse(client, id, why);
                }
                self.heard_from_holder(now, broker, &group, &queue, &member);
                self.heard_from_group(now, broker, &group);
                let command = Command::OwnedReconsumeLater {
                    group,
                    queue: queue.clone(),
                    member,
                    generation,
                    offset,
                    stamp_ms: now.as_micros() / 1_000,
                };
                self.propose_to_queue(client, id, broker, queue, command);
            }
            Request::Release {
                broker,
                group,
                member,
                generation,
                tenure,
                queue,
            } => {
                if let Err(why) = check_consumer_queue(&group, &queue).and(check_member(&member)) {
                    return self.refuse(client, id, why);
                }
                let command = Command::ReleaseTenure {
                    group,
                    queue: queue.clone(),
                    member,
                    generation,
                    tenure,
                };
                self.propose_to_queue(client, id, broker, queue, command);
            }
            Request::SeekGroup {
                broker,
                group,
                queue,
                to,
                force,
            } => {
                if let Err(why) = check_consumer_queue(&group, &queue) {
                    return self.refuse(client, id, why);
                }
                let command = Command::Seek {
                    group,
                    queue: queue.clone(),
                    to,
                    force,
                };
                self.propose_to_queue(client, id, broker, queue, command);
            }
            Request::TransferLeader { group, to } => {
                if let Some(response) = self.hosted_elsewhere(group) {
                    self.responses.push_back((client, id, response));
                    return;
                }
                let Some(g) = self.groups.get_mut(&group) else {
                    return self.refuse(client, id, format!("no group {group}"));
                };
                let response = match g.raft.transfer_leadership(now, to) {
                    Ok(()) => Response::TransferStarted { group, to },
                    Err(TransferError::NotLeader { leader_hint }) => {
                        Response::NotLeader { group, leader_hint }
                    }
                    Err(TransferError::NotAVoter { to }) => Response::Refused {
                        reason: format!("node {to} is not a voter of group {group} or leads it"),
                    },
                    Err(TransferError::Transferring { to }) => Response::Refused {
                        reason: format!("group {group} is being handed to node {to} already"),
                    },
                };
                self.responses.push_back((client, id, response));
            }
            Request::DeleteGroup {
                broker,
                group,
                force,
            } => {
                // A dead consumer's lease is never released and nobody of a deleted group
                // takes it over: holders unheard from for a member session do not keep the
                // group (the leader's judgement, as for a takeover, travels as `force`).
                let force = force || self.holders_silent(now, broker, &group);
                let command = Command::DeleteGroup {
                    group: group.clone(),
                    force,
                };
                self.propose_group_command(client, id, broker, &group, command);
            }
            Request::PeekDeadLetters {
                broker,
                group,
                from,
                messages_max,
            } => {
                if let Err(why) = check_name("consumer group", &group) {
                    return self.refuse(client, id, why);
                }
                self.peek_dead_letters(now, client, id, broker, group, from, messages_max);
            }
            Request::RedriveDeadLetters {
                broker,
                group,
                messages_max,
            } => {
                let command = Command::Redrive {
                    group: group.clone(),
                    messages_max: messages_max.min(REDRIVE_MESSAGES_MAX),
                    stamp_ms: now.as_micros() / 1_000,
                };
                self.propose_group_command(client, id, broker, &group, command);
            }
            Request::ChangeMembership {
                group,
                change,
                force,
            } => self.change_membership(now, client, id, group, change, force),
            Request::Nodes => {
                let nodes = self.node_table();
                self.responses
                    .push_back((client, id, Response::Nodes { nodes }));
            }
            Request::AddNode {
                id: node,
                client_addr,
                peer_addr,
            } => {
                if let Some(response) = self.not_leader(METADATA_GROUP) {
                    self.responses.push_back((client, id, response));
                    return;
                }
                let checked = match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
                    Some(Machine::Meta(meta)) => {
                        meta.check_add_node(node, &client_addr, &peer_addr)
                    }
                    _ => Err("no metadata group".into()),
                };
                let checked = checked.and_then(|applied| {
                    if self.config.nodes.contains(&node) {
                        Err(format!(
                            "node {node} is a node of the cluster's first configuration"
                        ))
                    } else {
                        Ok(applied)
                    }
                });
                match checked {
                    Err(why) => self.refuse(client, id, why),
                    Ok(NodeApplied::Unchanged) => {
                        let nodes = self.node_table();
                        self.responses
                            .push_back((client, id, Response::Nodes { nodes }));
                    }
                    Ok(NodeApplied::Changed) => {
                        let command = MetaCommand::AddNode {
                            id: node,
                            client_addr,
                            peer_addr,
                        };
                        self.enqueue_meta(client, id, &command);
                    }
                }
            }
            Request::AddBrokerGroup {
                group,
                voters,
                force,
            } => self.add_broker_group(client, id, group, voters, force),
            Request::RemoveNode { id: node, force } => {
                if let Some(response) = self.not_leader(METADATA_GROUP) {
                    self.responses.push_back((client, id, response));
                    return;
                }
                let still: Vec<GroupId> = self
                    .groups
                    .iter()
                    .filter(|(_, g)| g.raft.membership().1.contains(node))
                    .map(|(group, _)| *group)
                    .collect();
                if !still.is_empty() && !force {
                    return self.refuse(
                        client,
                        id,
                        format!(
                            "node {node} is still a member of groups {still:?}: remove it from \
                             them first (`holdfast node remove` does), or force"
                        ),
                    );
                }
                self.enqueue_meta(client, id, &MetaCommand::RemoveNode { id: node });
            }
            Request::Pull {
                broker,
                group,
                member,
                generation,
                tenure,
                queue,
                from,
                messages_max,
                bytes_max,
                wait_ms,
            } => {
                if let Err(why) = check_consumer_queue(&group, &queue).and(check_member(&member)) {
                    return self.refuse(client, id, why);
                }
                self.heard_from_group(now, broker, &group);
                // What a client asks for is clamped, not refused: a response always fits.
                let pull = Request::Pull {
                    broker,
                    group,
                    member,
                    generation,
                    tenure,
                    queue,
                    from,
                    messages_max: messages_max.min(PULL_MESSAGES_MAX),
                    bytes_max: bytes_max.min(PULL_BYTES_MAX as u32),
                    wait_ms: wait_ms.min(PULL_WAIT_MS_MAX),
                };
                self.pull(now, client, id, pull)
            }
        }
    }

    /// An operator adds a broker group, on the metadata leader.
    fn add_broker_group(
        &mut self,
        client: ClientId,
        id: RequestId,
        group: Option<GroupId>,
        voters: Vec<NodeId>,
        force: bool,
    ) {
        if let Some(response) = self.not_leader(METADATA_GROUP) {
            self.responses.push_back((client, id, response));
            return;
        }
        let Some(Machine::Meta(meta)) = self.groups.get(&METADATA_GROUP).map(|g| &g.machine) else {
            return self.refuse(client, id, "no metadata group".into());
        };
        let group = group.unwrap_or_else(|| meta.next_broker_group(&self.config.broker_groups));
        let mut checked = meta.check_add_group(group, &voters, &self.config.broker_groups);
        if checked == Ok(NodeApplied::Changed) {
            if let Some(why) = voters.iter().find_map(|v| self.node_known(*v).err()) {
                checked = Err(why);
            } else if voters.len() < self.config.replication_factor && !force {
                checked = Err(format!(
                    "{} voter(s) is fewer than the replication factor {}: name more nodes, or \
                     force",
                    voters.len(),
                    self.config.replication_factor
                ));
            }
        }
        match checked {
            Err(why) => self.refuse(client, id, format!("group {group}: {why}")),
            Ok(NodeApplied::Unchanged) => {
                let response = Response::BrokerGroupAdded { group, voters };
                self.responses.push_back((client, id, response));
            }
            Ok(NodeApplied::Changed) => {
                let command = MetaCommand::AddBrokerGroup { group, voters };
                self.enqueue_meta(client, id, &command);
            }
        }
    }

    /// Queues a metadata command for a client that waits for its outcome.
    fn enqueue_meta(&mut self, client: ClientId, id: RequestId, command: &MetaCommand) {
        // Numbers and short strings always encode.
        let bytes = Bytes::from(postcard::to_allocvec(command).unwrap_or_default());
        let waiter = Waiter {
            client,
            request: id,
            queue: None,
        };
        self.enqueue(METADATA_GROUP, Some(waiter), bytes);
    }

    /// An operator's single-server change of `group`'s configuration, on its leader.
    fn change_membership(
        &mut self,
        now: Instant,
        client: ClientId,
        id: RequestId,
        group: GroupId,
        change: ConfChange,
        force: bool,
    ) {
        let known = match change {
            ConfChange::AddLearner(node) => self.node_known(node),
            ConfChange::Promote(_) | ConfChange::Remove(_) => Ok(()),
        };
        if let Err(why) = known {
            return self.refuse(client, id, why);
        }
        if let Some(response) = self.hosted_elsewhere(group) {
            self.responses.push_back((client, id, response));
            return;
        }
        let factor = self.config.replication_factor;
        let proposal = self.next_proposal;
        let Some(g) = self.groups.get_mut(&group) else {
            return self.refuse(client, id, format!("no group {group}"));
        };
        if let ConfChange::Remove(node) = change {
            let voters = g.raft.membership().1.voters.len();
            let after = voters - usize::from(g.raft.membership().1.is_voter(node));
            if after < factor && !force && g.raft.status().role == Role::Leader {
                return self.refuse(
                    client,
                    id,
                    format!(
                        "removing node {node} leaves group {group} {after} voter(s), below the \
                         replication factor {factor}: add a node first, or force"
                    ),
                );
            }
        }
        let response = match g.raft.propose_membership(now, proposal, change) {
            Ok(_) => {
                self.next_proposal += 1;
                g.config_waiters.insert(proposal, (client, id));
                None
            }
            Err(MembershipError::NotLeader { leader_hint }) => {
                Some(Response::NotLeader { group, leader_hint })
            }
            Err(MembershipError::Transferring { to }) => Some(Response::NotLeader {
                group,
                leader_hint: Some(to),
            }),
            Err(e) => Some(Response::Refused {
                reason: format!("group {group}: {e}"),
            }),
        };
        if let Some(response) = response {
            self.responses.push_back((client, id, response));
        }
    }

    /// Proposes a command about a whole consumer group to its broker group's leader, after
    /// checking the group's name; the answer carries the name back.
    fn propose_group_command(
        &mut self,
        client: ClientId,
        id: RequestId,
        broker: GroupId,
        group: &str,
        command: Command,
    ) {
        if let Err(why) = check_name("consumer group", group) {
            return self.refuse(client, id, why);
        }
        if let Err(response) = self.check_broker_leader(broker) {
            self.responses.push_back((client, id, response));
            return;
        }
        let waiter = Waiter {
            client,
            request: id,
            queue: Some(QueueId::new(group, 0)),
        };
        self.enqueue(broker, Some(waiter), encode_command(&command));
    }

    /// An operator's read of `group`'s dead-letter queue: the broker group leader's applied
    /// state, from the cache or through a read of the queue store as for a pull, with no
    /// lease (nothing is claimed or acknowledged, so a stale read misleads only the reader).
    #[allow(clippy::too_many_arguments)]
    fn peek_dead_letters(
        &mut self,
        now: Instant,
        client: ClientId,
        id: RequestId,
        broker: GroupId,
        group: String,
        from: Offset,
        messages_max: u32,
    ) {
        if let Err(response) = self.check_broker_leader(broker) {
            self.responses.push_back((client, id, response));
            return;
        }
        let queue = QueueId::dead_letter(&group);
        let Some(state) = self.broker_state(broker) else {
            return self.refuse(client, id, format!("no broker group {broker}"));
        };
        let plan = state.plan_pull(
            &group,
            &queue,
            from,
            messages_max.min(PULL_MESSAGES_MAX) as usize,
            PULL_BYTES_MAX,
            now.as_micros() / 1_000,
        );
        match plan {
            Err(refusal) => self.refuse(client, id, refusal.to_string()),
            Ok(PullPlan::Ready(pulled)) => {
                let response = Response::Pulled {
                    queue,
                    messages: pulled.messages,
                    next_offset: pulled.next_offset,
                    delivered_below: 0,
                };
                self.responses.push_back((client, id, response));
            }
            Ok(PullPlan::Read {
                offsets,
                next_offset,
            }) => {
                if self.pending_reads.len() >= self.config.parked_pulls_max {
                    return self.refuse(
                        client,
                        id,
                        "too many reads of the queue store wait: try again".into(),
                    );
                }
                let read_id = self.next_read;
                self.next_read += 1;
                self.store_reads.push_back(StoreRead {
                    id: read_id,
                    group: broker,
                    queue: queue.clone(),
                    offsets: offsets.clone(),
                });
                self.pending_reads.insert(
                    read_id,
                    PendingRead {
                        client,
                        request: id,
                        group: broker,
                        consumer_group: group,
                        queue,
                        offsets,
                        next_offset,
                        peek: true,
                    },
                );
            }
        }
    }

    /// Counts messages a pull hands to `consumer_group`: per topic, and the redeliveries (the
    /// offsets below how far the queue had been handed out before) per consumer group and
    /// queue too.
    fn count_pulled(
        &mut self,
        group: GroupId,
        consumer_group: &str,
        queue: &QueueId,
        messages: &[(Offset, crate::broker::StoredMessage)],
        delivered_below: Offset,
    ) {
        if messages.is_empty() {
            return;
        }
        let counters = self.counters.topic(&queue.topic);
        let mut redelivered = 0;
        for (offset, stored) in messages {
            counters.pulled_messages += 1;
            counters.pulled_bytes += stored.message.body.len() as u64;
            redelivered += u64::from(*offset < delivered_below);
        }
        counters.redelivered += redelivered;
        if redelivered > 0
            && let Some(c) = self.counters.consumer(group, consumer_group, queue)
        {
            c.redelivered += redelivered;
        }
    }

    /// Whether every queue of `group` held in broker group `broker` has a holder this leader
    /// has not heard from for a member session (true if none is held).
    fn holders_silent(&self, now: Instant, broker: GroupId, group: &str) -> bool {
        let Some(state) = self.broker_state(broker) else {
            return false;
        };
        state
            .leases()
            .filter(|((g, _), lease)| g == group && lease.owner.is_some())
            .all(|((_, queue), _)| {
                self.lease_clocks.holder_silent(
                    broker,
                    group,
                    queue,
                    self.config.member_session_ms,
                    now,
                )
            })
    }

    /// Answers `Refused` with `why`, now.
    fn refuse(&mut self, client: ClientId, id: RequestId, why: String) {
        self.responses
            .push_back((client, id, Response::Refused { reason: why }));
    }

    fn event(&mut self, event: NodeEvent) {
        if self.events.len() >= EVENTS_BUFFERED_MAX {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    // ----- outputs -----

    /// The next write to perform and sync, for `group`.
    pub fn poll_write(&mut self) -> Option<(GroupId, Write)> {
        self.groups
            .iter_mut()
            .find_map(|(id, g)| g.raft.poll_write().map(|w| (*id, w)))
    }

    pub fn poll_message(&mut self) -> Option<Envelope> {
        self.groups.values_mut().find_map(|g| g.raft.poll_message())
    }

    pub fn poll_response(&mut self) -> Option<(ClientId, RequestId, Response)> {
        let answer = self.responses.pop_front()?;
        *self.counters.responses.entry(answer.2.kind()).or_default() += 1;
        if let (client, _, Response::Refused { reason }) = &answer {
            self.event(NodeEvent::RequestRefused {
                client: *client,
                why: reason.clone(),
            });
        }
        Some(answer)
    }

    /// The next thing the operator should see in the log; see [`NodeEvent`]. At most
    /// `EVENTS_BUFFERED_MAX` wait: a driver that never polls loses the oldest.
    #[inline]
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// A state to encode into a snapshot; see [`SnapshotJob`]. The driver carries out the
    /// store operations polled before it first.
    #[inline]
    pub fn poll_snapshot_job(&mut self) -> Option<SnapshotJob> {
        self.snapshot_jobs.pop_front()
    }

    /// A snapshot's transfer image to make; see [`TransferJob`].
    #[inline]
    pub fn poll_transfer_job(&mut self) -> Option<TransferJob> {
        self.transfer_jobs.pop_front()
    }

    /// The driver made the transfer image of `group`'s snapshot at `index` (or could not:
    /// then it is asked for again while a follower needs it).
    pub fn transfer_encoded(
        &mut self,
        now: Instant,
        group: GroupId,
        index: Index,
        image: Result<Bytes, String>,
    ) {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.transferring == Some(index) {
                g.transferring = None;
            }
            match image {
                Ok(data) => {
                    // A follower installs it whatever its store holds: it must carry them.
                    debug_assert!(holds_messages(&data), "a transfer image without messages");
                    if let Some((term, membership)) = g
                        .raft
                        .snapshot()
                        .filter(|s| s.index == index)
                        .map(|s| (s.term, s.membership.clone()))
                    {
                        g.raft.set_transfer(Snapshot {
                            index,
                            term,
                            data,
                            membership,
                        });
                    }
                }
                Err(why) => self.event(NodeEvent::TransferFailed { group, index, why }),
            }
        }
        self.settle(now);
    }

    /// The next queue store operation, in order per group; see [`StoreOp`].
    #[inline]
    pub fn poll_store(&mut self) -> Option<(GroupId, StoreOp)> {
        let (group, op) = self.store_ops.pop_front()?;
        self.store_ops_bytes = self.store_ops_bytes.saturating_sub(op.weight_bytes());
        Some((group, op))
    }

    /// The node is still applying the log it recovered at the start, a step at a time (see
    /// [`NodeConfig::replay_store_bytes_max`]). Until it is done the driver alternates
    /// [`BrokerNode::poll_store`] (carrying every operation out) and [`BrokerNode::replay`],
    /// before it serves anything: the node answers no proposal and takes no snapshot
    /// meanwhile.
    /// A paused group (see [`BrokerNode::pause`]) takes no step until it is resumed, so it
    /// does not count here.
    #[inline]
    pub fn replaying(&self) -> bool {
        self.groups.values().any(|g| g.replay_to != 0 && !g.paused)
    }

    /// The driver cannot take more of `group`'s writes and store operations for now (its store
    /// is catching up from peers and holds them meanwhile): until [`BrokerNode::resume`], the
    /// group takes no new input that would make more of them. It applies nothing (committed
    /// entries wait in the log, a replay step included, and the answers to their proposals
    /// with them), proposes nothing (clients are answered `Busy`, and a leader hands its
    /// leadership to the best placed peer), and drops a leader's Appends that carry entries
    /// (Raft sends them again: a follower whose writes are held has answered none of them, so
    /// the leader still counts them as not held here). Nothing is lost, and since nothing
    /// new is accepted, nothing is acknowledged that is not durable.
    pub fn pause(&mut self, now: Instant, group: GroupId) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        g.paused = true;
        if g.raft.status().role == Role::Leader
            && g.raft.transferring_to().is_none()
            && let Some(to) = g.raft.transfer_candidate()
        {
            // Refused only by a replica that is not leading or already transferring.
            let _ = g.raft.transfer_leadership(now, to);
        }
        self.settle(now);
    }

    /// `group` may go on after [`BrokerNode::pause`]: what committed meanwhile applies now.
    pub fn resume(&mut self, now: Instant, group: GroupId) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.paused = false;
        }
        self.settle(now);
    }

    /// Whether `group` is paused (see [`BrokerNode::pause`]).
    pub fn paused(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|g| g.paused)
    }

    /// Applies the next step of the recovered log (nothing once [`BrokerNode::replaying`] is
    /// false), once the driver has taken the previous step's store operations.
    pub fn replay(&mut self, now: Instant) {
        self.settle(now);
    }

    /// The next read of the queue store a pull waits for; see [`StoreRead`].
    #[inline]
    pub fn poll_read(&mut self) -> Option<StoreRead> {
        self.store_reads.pop_front()
    }

    /// The driver read `records` for the first `records.len()` offsets of read `id`; `error`
    /// says why it stopped short, if it did. Every record is checked here before anything
    /// reaches a consumer: the pull ends at the first one that fails.
    pub fn read_done(&mut self, now: Instant, id: u64, records: Vec<Bytes>, error: Option<String>) {
        let Some(read) = self.pending_reads.remove(&id) else {
            return;
        };
        let mut messages = Vec::with_capacity(records.len());
        let mut failure = None;
        let check = !Canary::ServeUncheckedRead.planted(self.config.canary);
        for (offset, record) in read.offsets.iter().zip(&records) {
            match decode_record_checking(record, *offset, check) {
                Ok(stored) => messages.push(stored),
                Err(e) => {
                    failure = Some((*offset, e.to_string()));
                    break;
                }
            }
        }
        if failure.is_none()
            && messages.len() < read.offsets.len()
            && let Some(offset) = read.offsets.get(messages.len())
        {
            let why = error.unwrap_or_else(|| "the store does not hold it".to_string());
            failure = Some((*offset, why));
        }
        if let Some((offset, why)) = failure {
            self.event(NodeEvent::StoreReadFailed {
                group: read.group,
                queue: read.queue.clone(),
                offset,
                why,
            });
        }
        // Leadership may have moved while the store read: only a current leader answers.
        if let Err(response) = self.check_broker_leader(read.group) {
            self.responses
                .push_back((read.client, read.request, response));
            return;
        }
        let Some(state) = self.broker_state(read.group) else {
            return;
        };
        let pulled = state.finish_pull(
            &read.consumer_group,
            &read.queue,
            &read.offsets,
            read.next_offset,
            messages,
        );
        // An operator's peek at a dead-letter queue hands nothing to the consumer group.
        let delivered_below = if read.peek {
            0
        } else {
            let delivered_below = self.lease_clocks.delivered(
                read.group,
                &read.consumer_group,
                &read.queue,
                pulled.next_offset,
            );
            self.count_pulled(
                read.group,
                &read.consumer_group,
                &read.queue,
                &pulled.messages,
                delivered_below,
            );
            delivered_below
        };
        let response = Response::Pulled {
            queue: read.queue,
            messages: pulled.messages,
            next_offset: pulled.next_offset,
            delivered_below,
        };
        self.responses
            .push_back((read.client, read.request, response));
        self.settle(now);
    }

    /// A snapshot job could not be encoded (a message would not read): the group may try
    /// again later; its log is not compacted meanwhile.
    pub fn snapshot_failed(&mut self, group: GroupId, index: Index) {
        if let Some(g) = self.groups.get_mut(&group)
            && g.encoding == Some(index)
        {
            g.encoding = None;
        }
    }

    /// The driver encoded the job of `group` at `index` into `data`: the group's log up to
    /// `index` is replaced by it. A snapshot installed from the leader meanwhile may have
    /// made it stale; then it is dropped.
    pub fn snapshot_encoded(&mut self, now: Instant, group: GroupId, index: Index, data: Bytes) {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.encoding == Some(index) {
                g.encoding = None;
            }
            let bytes = data.len() as u64;
            if g.raft.compact(index, data).is_ok() {
                g.pace.last_bytes = bytes;
                let counters = self.counters.group(group);
                counters.snapshots_compacted += 1;
                counters.snapshot_bytes_last = bytes;
            }
        }
        self.settle(now);
    }

    /// Something the node cannot go on from (see [`NodeFault`]): the driver must stop it.
    #[inline]
    pub fn poll_fault(&mut self) -> Option<NodeFault> {
        self.faults.pop_front()
    }

    /// The next entry applied, in order per group, when `record_applied` is set.
    #[inline]
    pub fn poll_applied(&mut self) -> Option<(GroupId, Entry)> {
        self.applied.pop_front()
    }

    pub fn poll_timeout(&self) -> Instant {
        let raft = self.groups.values().map(|g| g.raft.poll_timeout());
        let pulls = self.parked.iter().map(|p| p.wake_at);
        raft.chain(pulls)
            .chain(self.balance_at)
            .min()
            .unwrap_or(Instant::ZERO)
    }

    // ----- internals -----

    fn routes(&self, topic: &str) -> Response {
        let Some(Group {
            machine: Machine::Meta(meta),
            ..
        }) = self.groups.get(&METADATA_GROUP)
        else {
            return Response::Refused {
                reason: "no metadata group".into(),
            };
        };
        let Some(placement) = meta.placement(topic) else {
            return Response::Refused {
                reason: format!("unknown topic {topic:?}"),
            };
        };
        let routes = placement
            .into_iter()
            .map(|(queue, group)| Route {
                leader: match self.groups.get(&group) {
                    Some(g) => g.raft.status().leader,
                    None => self.voter_elsewhere(group),
                },
                queue,
                group,
            })
            .collect();
        Response::Routes {
            topic: topic.to_string(),
            routes,
        }
    }

    /// A member's heartbeat (`topic` set) or goodbye, on the metadata leader.
    fn heartbeat(
        &mut self,
        now: Instant,
        group: &str,
        member: &str,
        topic: Option<&str>,
    ) -> Response {
        if let Some(response) = self.not_leader(METADATA_GROUP) {
            self.membership = Membership::default();
            return response;
        }
        let Some(Group {
            raft,
            machine: Machine::Meta(meta),
            ..
        }) = self.groups.get(&METADATA_GROUP)
        else {
            return Response::Refused {
                reason: "no metadata group".into(),
            };
        };
        let placement = |topic: &str| meta.placement(topic);
        let how = Allocation {
            strategy: self.config.allocation,
            session_ms: self.config.member_session_ms,
            retry_levels: self.config.broker.reconsume_delays_ms.len() as u32,
            placement: &placement,
        };
        let term = raft.status().term;
        self.membership
            .heartbeat(now, term, group, member, topic, &how)
    }

    /// A member of consumer group `group` spoke to broker group `broker` (led here): the
    /// group is not expired for another retention. Past the table's maximum a new name is not
    /// remembered (it expires as if silent since this leader took office).
    fn heard_from_group(&mut self, now: Instant, broker: GroupId, group: &str) {
        let Some(g) = self.groups.get_mut(&broker) else {
            return;
        };
        if g.led_since.is_none() {
            return;
        }
        if let Some(seen) = g.group_seen.get_mut(group) {
            *seen = now;
        } else if g.group_seen.len() < crate::limits::GROUP_ACTIVITY_ENTRIES_MAX {
            g.group_seen.insert(group.to_string(), now);
        }
    }

    /// An answer from the member holding a queue renews its lease.
    fn heard_from_holder(
        &mut self,
        now: Instant,
        broker: GroupId,
        group: &str,
        queue: &QueueId,
        member: &str,
    ) {
        let holds = self
            .broker_state(broker)
            .and_then(|s| s.lease(group, queue))
            .is_some_and(|l| l.owner.as_deref() == Some(member));
        if holds {
            self.lease_clocks.touch(broker, group, queue, now);
        }
    }

    /// Whether a claim of `queue` in broker group `group` can be granted as far as this node
    /// knows: the group holds the queue, the topic table places it there (the claim's entry
    /// then follows its creation), or it is a retry queue (created by its first message).
    fn claimable(&self, group: GroupId, queue: &QueueId) -> bool {
        if queue.is_retry() {
            return true;
        }
        let held = matches!(
            self.groups.get(&group).map(|g| &g.machine),
            Some(Machine::Broker(state)) if state.queue_len(queue).is_some()
        );
        held || matches!(
            self.groups.get(&METADATA_GROUP).map(|g| &g.machine),
            Some(Machine::Meta(meta)) if meta.group_of(queue) == Some(group)
        )
    }

    /// Whether the topic table places `queue`, so counting its topic stays within `TOPICS_MAX`.
    fn queue_known(&self, queue: &QueueId) -> bool {
        matches!(
            self.groups.get(&METADATA_GROUP).map(|g| &g.machine),
            Some(Machine::Meta(meta)) if meta.group_of(queue).is_some()
        )
    }

    fn not_leader(&self, group: GroupId) -> Option<Response> {
        let status = self.groups.get(&group)?.raft.status();
        (status.role != Role::Leader).then_some(Response::NotLeader {
            group,
            leader_hint: status.leader,
        })
    }

    /// Queue requests go to the leader of an existing broker group.
    fn check_broker_leader(&self, group: GroupId) -> Result<(), Response> {
        if group != METADATA_GROUP && self.groups.contains_key(&group) {
            return self.not_leader(group).map_or(Ok(()), Err);
        }
        if group == METADATA_GROUP || !self.broker_groups().contains(&group) {
            let reason = format!("no broker group {group}");
            return Err(Response::Refused { reason });
        }
        // A group added at runtime on other nodes: one of its voters knows its leader.
        Err(self.hosted_elsewhere(group).unwrap_or(Response::NotLeader {
            group,
            leader_hint: None,
        }))
    }

    /// For a broker group added at runtime that this node hosts no replica of: where to ask
    /// instead.
    fn hosted_elsewhere(&self, group: GroupId) -> Option<Response> {
        if self.groups.contains_key(&group) {
            return None;
        }
        let leader_hint = self.voter_elsewhere(group)?;
        Some(Response::NotLeader {
            group,
            leader_hint: Some(leader_hint),
        })
    }

    /// A first voter of added broker group `group` other than this node, as the metadata
    /// table says.
    fn voter_elsewhere(&self, group: GroupId) -> Option<NodeId> {
        let Some(Machine::Meta(meta)) = self.groups.get(&METADATA_GROUP).map(|g| &g.machine) else {
            return None;
        };
        let me = self.config.id;
        meta.added_broker_groups()
            .find(|(g, _)| *g == group)
            .and_then(|(_, voters)| voters.iter().copied().find(|v| *v != me))
    }

    /// Every broker group: the config's and those the metadata table added at runtime.
    pub fn broker_groups(&self) -> Vec<GroupId> {
        match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
            Some(Machine::Meta(meta)) => meta.all_broker_groups(&self.config.broker_groups),
            _ => self.config.broker_groups.clone(),
        }
    }

    /// Broker groups the driver must give storage to before it carries out their writes:
    /// each a fresh replica this node created (a broker group added at runtime that lists it
    /// as a voter, or that a peer reached it for), with the group's first voters. A group
    /// whose storage the driver recovered at start is not listed again.
    pub fn poll_new_group(&mut self) -> Option<(GroupId, Vec<NodeId>)> {
        self.new_groups.pop_front()
    }

    /// Creates a replica of every broker group the applied metadata table added that lists
    /// this node as a voter, or whose storage the driver recovered, and that it has none of.
    fn create_added_groups(&mut self, now: Instant) {
        self.added_groups_stale = false;
        let Some(Machine::Meta(meta)) = self.groups.get(&METADATA_GROUP).map(|g| &g.machine) else {
            return;
        };
        let me = self.config.id;
        let wanted: Vec<(GroupId, Vec<NodeId>)> = meta
            .added_broker_groups()
            .filter(|(g, voters)| {
                !self.groups.contains_key(g)
                    && (voters.contains(&me) || self.dormant.contains_key(g))
            })
            .map(|(g, voters)| (g, voters.to_vec()))
            .collect();
        for (group, voters) in wanted {
            self.add_group(now, group, voters);
        }
    }

    /// A peer's message for added broker group `group`, which this node has no replica of:
    /// a node being added to it (`holdfast node add`). It gets a replica that starts from the
    /// group's first voters, not among them, so it neither campaigns nor counts itself until
    /// the leader's log or snapshot says otherwise.
    fn reached_for_added_group(&mut self, now: Instant, group: GroupId) -> bool {
        let voters = match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
            Some(Machine::Meta(meta)) => meta
                .added_broker_groups()
                .find(|(g, _)| *g == group)
                .map(|(_, voters)| voters.to_vec()),
            _ => None,
        };
        match voters {
            Some(voters) => {
                self.add_group(now, group, voters);
                true
            }
            None => false,
        }
    }

    /// A replica of broker group `group`, from what the driver recovered of it or fresh (then
    /// announced through [`BrokerNode::poll_new_group`]).
    fn add_group(&mut self, now: Instant, group: GroupId, voters: Vec<NodeId>) {
        let mut raft_config = self.config.raft.clone();
        raft_config.id = self.config.id;
        raft_config.group = group;
        raft_config.voters = voters.clone();
        raft_config.canary = self.config.canary;
        let mut broker = self.config.broker.clone();
        broker.canary = self.config.canary;
        let machine = Machine::Broker(BrokerState::new(broker));
        let disk = match self.dormant.remove(&group) {
            Some(disk) => disk,
            None => {
                // A node whose metadata replica lost its votes lost its disk: it may have
                // voted in this group before, so its fresh replica never votes either (the
                // driver records it so too).
                if self
                    .config
                    .raft
                    .damaged
                    .get(&METADATA_GROUP)
                    .is_some_and(|d| d.votes_lost)
                {
                    let damage = crate::raft::Damage {
                        from: 1,
                        votes_lost: true,
                    };
                    raft_config.damaged.insert(group, damage);
                }
                self.new_groups.push_back((group, voters));
                Recovered::default()
            }
        };
        let (machine, pace) = restore_machine(group, machine, &disk, &mut self.faults);
        let seed = self.seed ^ group.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut raft = Replica::new(raft_config, disk, seed, now);
        raft.use_transfer_images(!self.config.segment_catch_up);
        self.groups.insert(group, Group::new(raft, machine, pace));
    }

    fn propose_to_queue(
        &mut self,
        client: ClientId,
        id: RequestId,
        group: GroupId,
        queue: QueueId,
        command: Command,
    ) {
        if let Err(response) = self.check_broker_leader(group) {
            self.responses.push_back((client, id, response));
            return;
        }
        let bytes = encode_command(&command);
        if bytes.len() > COMMAND_BYTES_MAX {
            let why = format!(
                "the request encodes to {} bytes, more than the maximum of {COMMAND_BYTES_MAX}",
                bytes.len()
            );
            return self.refuse(client, id, why);
        }
        self.create_if_placed(group, &queue);
        if let Command::Append { messages, .. } = &command
            && self.queue_known(&queue)
        {
            let bytes: usize = messages.iter().map(|m| m.body.len()).sum();
            let counters = self.counters.topic(&queue.topic);
            counters.send_messages += messages.len() as u64;
            counters.send_bytes += bytes as u64;
        }
        if Canary::AckSendBeforeCommit.planted(self.config.canary)
            && matches!(command, Command::Append { .. })
        {
            let base_offset = self
                .broker_state(group)
                .and_then(|s| s.queue_len(&queue))
                .unwrap_or(0);
            let response = Response::Sent {
                queue,
                base_offset,
                duplicate: false,
            };
            self.responses.push_back((client, id, response));
            self.enqueue(group, None, bytes);
            return;
        }
        if Canary::WriteDespiteRefusal.planted(self.config.canary)
            && matches!(command, Command::Append { producer_id: 3, .. })
        {
            let reason = "refused (planted bug: written anyway)".to_string();
            self.responses
                .push_back((client, id, Response::Refused { reason }));
            self.enqueue(group, None, bytes);
            return;
        }
        let waiter = Waiter {
            client,
            request: id,
            queue: Some(queue),
        };
        self.enqueue(group, Some(waiter), bytes);
    }

    fn enqueue(&mut self, group: GroupId, waiter: Option<Waiter>, bytes: Bytes) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.batch.push((waiter, bytes));
        }
    }

    fn pull(&mut self, now: Instant, client: ClientId, id: RequestId, request: Request) {
        let Request::Pull {
            broker: group,
            group: consumer_group,
            member,
            generation,
            tenure,
            queue,
            from,
            messages_max,
            bytes_max,
            wait_ms,
        } = &request
        else {
            return;
        };
        let group = *group;
        let stale_reads = Canary::ServePullOnFollower.planted(self.config.canary);
        if let Err(response) = self.check_broker_leader(group)
            && !(stale_reads && self.groups.contains_key(&group) && group != METADATA_GROUP)
        {
            self.responses.push_back((client, id, response));
            return;
        }
        let Some(g) = self.groups.get(&group) else {
            return;
        };
        // Only a leader holding the read lease serves: a deposed leader that does not know
        // it yet could hand out a message whose ack its successor already confirmed.
        let current = g.raft.read_lease(now) || stale_reads;
        let Machine::Broker(state) = &g.machine else {
            return;
        };
        if current {
            let ask = PullAsk {
                broker: group,
                group: consumer_group,
                queue,
                member,
                generation: *generation,
                tenure: *tenure,
                session_ms: self.config.member_session_ms,
                serve_any: Canary::ServeStaleGeneration.planted(self.config.canary) || stale_reads,
                hand_over_early: Canary::HandOverEarly.planted(self.config.canary),
            };
            let lease = state.lease(consumer_group, queue);
            match self.lease_clocks.decide(&ask, lease, now) {
                PullVerdict::Serve => {}
                PullVerdict::ServeAndBump => {
                    let claim = claim_command(&ask, None);
                    self.enqueue(group, None, encode_command(&claim));
                }
                PullVerdict::Revoked(reason) => {
                    let response = Response::Revoked {
                        queue: queue.clone(),
                        reason,
                    };
                    self.responses.push_back((client, id, response));
                    return;
                }
                PullVerdict::Claim { takeover } => {
                    if !self.claimable(group, queue) {
                        // This node's topic table lacks the queue's topic yet: a follower of
                        // the metadata group learns a commit with its leader's next
                        // heartbeat, and a consumer may hear of a new topic first. A claim
                        // now would be refused as for an unknown queue and hold the pull for
                        // CLAIM_RECHECK (500 ms of end-to-end latency on every new topic's
                        // first messages); look again soon instead, proposing nothing.
                        let wake_at = now + LEASE_RECHECK;
                        self.park_for_lease(now, client, id, group, request, wake_at);
                        return;
                    }
                    let claim = claim_command(&ask, takeover);
                    let wake_at = now + CLAIM_RECHECK;
                    if !self.lease_clocks.claim_in_flight(&ask, now) {
                        let queue = queue.clone();
                        self.create_if_placed(group, &queue);
                        self.enqueue(group, None, encode_command(&claim));
                    }
                    self.park_for_lease(now, client, id, group, request, wake_at);
                    return;
                }
                PullVerdict::Wait { until } => {
                    let wake_at = until.max(now + LEASE_RECHECK);
                    self.park_for_lease(now, client, id, group, request, wake_at);
                    return;
                }
            }
        }
        let Some(Group {
            machine: Machine::Broker(state),
            ..
        }) = self.groups.get(&group)
        else {
            return;
        };
        let pulled = if current {
            state.plan_pull(
                consumer_group,
                queue,
                *from,
                *messages_max as usize,
                *bytes_max as usize,
                now.as_micros() / 1_000,
            )
        } else {
            Ok(PullPlan::Ready(Default::default()))
        };
        let pulled = match pulled {
            Ok(PullPlan::Read {
                offsets,
                next_offset,
            }) => {
                if self.pending_reads.len() >= self.config.parked_pulls_max {
                    // As many pulls wait for the store as may: this one is answered empty.
                    let response = Response::Pulled {
                        queue: queue.clone(),
                        messages: Vec::new(),
                        next_offset: *from,
                        delivered_below: 0,
                    };
                    self.responses.push_back((client, id, response));
                    return;
                }
                let read_id = self.next_read;
                self.next_read += 1;
                self.store_reads.push_back(StoreRead {
                    id: read_id,
                    group,
                    queue: queue.clone(),
                    offsets: offsets.clone(),
                });
                self.pending_reads.insert(
                    read_id,
                    PendingRead {
                        client,
                        request: id,
                        group,
                        consumer_group: consumer_group.clone(),
                        queue: queue.clone(),
                        offsets,
                        next_offset,
                        peek: false,
                    },
                );
                return;
            }
            Ok(PullPlan::Ready(pulled)) => Ok(pulled),
            Err(refusal) => Err(refusal),
        };
        match pulled {
            Err(refusal) => {
                let reason = refusal.to_string();
                self.responses
                    .push_back((client, id, Response::Refused { reason }));
            }
            Ok(pulled) if !pulled.messages.is_empty() || *wait_ms == 0 => {
                let delivered_below =
                    self.lease_clocks
                        .delivered(group, consumer_group, queue, pulled.next_offset);
                self.count_pulled(
                    group,
                    consumer_group,
                    queue,
                    &pulled.messages,
                    delivered_below,
                );
                let response = Response::Pulled {
                    queue: queue.clone(),
                    messages: pulled.messages,
                    next_offset: pulled.next_offset,
                    delivered_below,
                };
                self.responses.push_back((client, id, response));
            }
            Ok(pulled) => {
                if self.parked.len() >= self.config.parked_pulls_max {
                    let response = Response::Pulled {
                        queue: queue.clone(),
                        messages: Vec::new(),
                        next_offset: pulled.next_offset,
                        delivered_below: 0,
                    };
                    self.responses.push_back((client, id, response));
                    return;
                }
                let deadline = now + std::time::Duration::from_millis(*wait_ms);
                // Without the lease, look again shortly; otherwise when a retry falls due.
                let recheck = if current {
                    state
                        .next_due_ms(consumer_group, queue, *from)
                        .map(|ms| Instant::from_micros(ms.saturating_mul(1_000)))
                } else {
                    Some(now + LEASE_RECHECK)
                };
                let soonest = now + std::time::Duration::from_millis(1);
                let wake_at = recheck.map_or(deadline, |at| at.max(soonest).min(deadline));
                self.parked.push(ParkedPull {
                    client,
                    request: id,
                    group,
                    request_body: request,
                    deadline,
                    wake_at,
                    for_lease: false,
                });
            }
        }
    }

    /// Proposes what was batched, applies what committed (a step of it while replaying: see
    /// [`BrokerNode::replaying`]), answers who waited, retries parked pulls, and creates queues
    /// the metadata placed on groups this node leads.
    fn settle(&mut self, now: Instant) {
        let mut woken = BTreeSet::new();
        let mut table_changed = false;
        let broker_groups = &self.config.broker_groups;
        for (group_id, group) in &mut self.groups {
            if !group.batch.is_empty() {
                propose_batch(now, &mut self.next_proposal, group, &mut self.responses);
            }
            if let Some(snapshot) = group.raft.poll_restore() {
                // The sender is the leader it follows; the driver tries other peers when it
                // cannot serve the segments.
                let me = self.config.id;
                let catch_up_from = if self.config.segment_catch_up {
                    let status = group.raft.status();
                    status
                        .leader
                        .or_else(|| self.config.nodes.iter().copied().find(|n| *n != me))
                } else {
                    None
                };
                match group.machine.restored(&snapshot.data, true, catch_up_from) {
                    Ok(machine) => {
                        let counters = self.counters.group(*group_id);
                        counters.snapshots_restored += 1;
                        counters.snapshot_bytes_last = snapshot.data.len() as u64;
                        if matches!(machine, Machine::Meta(_)) {
                            table_changed = true;
                            self.node_table_version += 1;
                            self.added_groups_stale = true;
                        }
                        group.machine = machine;
                        group.pace = SnapshotPace {
                            last_bytes: snapshot.data.len() as u64,
                            ..SnapshotPace::default()
                        };
                        // Outcomes of entries the snapshot covers are gone with them.
                        group.applied = group.applied.split_off(&(snapshot.index + 1));
                        // A job still out is older: it will come back stale.
                        group.encoding = None;
                        woken.insert(*group_id);
                    }
                    Err(e) => self
                        .faults
                        .push_back(NodeFault::SnapshotUndecodable(format!(
                            "group {group_id}: the snapshot at index {} from the leader does not \
                         restore: {e}",
                            snapshot.index
                        ))),
                }
            }
            if let Some(index) = group.raft.poll_transfer_wanted()
                && group.transferring.is_none()
                && let (Machine::Broker(state), Some(snapshot)) =
                    (&group.machine, group.raft.snapshot())
                && snapshot.index == index
            {
                group.transferring = Some(index);
                self.transfer_jobs.push_back(TransferJob {
                    group: *group_id,
                    index,
                    term: snapshot.term,
                    metadata: snapshot.data.clone(),
                    config: state.config().clone(),
                });
            }
            // A paused group applies nothing: see `pause`.
            while !group.paused {
                if group.replay_to != 0 {
                    // A replay step counts the writes of each entry as it goes and ends once
                    // they weigh enough; the driver takes them before the next (`replay`).
                    hand_over_store_ops(
                        *group_id,
                        group,
                        &mut self.store_ops,
                        &mut self.store_ops_bytes,
                        &mut self.counters,
                    );
                    if self.store_ops_bytes >= self.config.replay_store_bytes_max {
                        break;
                    }
                }
                let Some(entry) = group.raft.poll_committed() else {
                    // Nothing more can apply now (a replay included), so none is waited for.
                    group.replay_to = 0;
                    break;
                };
                if entry.index >= group.replay_to {
                    group.replay_to = 0;
                }
                group.pace.entries_since += 1;
                group.pace.bytes_since += entry.command_bytes() as u64;
                if self.config.record_applied {
                    self.applied.push_back((*group_id, entry.clone()));
                }
                let counters = self.counters.group(*group_id);
                counters.entries_applied += 1;
                let EntryKind::Commands(commands) = entry.kind else {
                    continue;
                };
                counters.commands_applied += commands.len() as u64;
                let mut outcomes = Vec::with_capacity(commands.len());
                for bytes in &commands {
                    match &mut group.machine {
                        Machine::Broker(state) => {
                            // Decoded here rather than by `apply_bytes`, to count what the
                            // command did per consumer group and queue.
                            let (outcome, counted) = match decode_command_shared(bytes) {
                                Ok(command) => {
                                    let counted = Counted::of(&command);
                                    (state.apply(command), counted)
                                }
                                Err(e) => (
                                    Outcome::Refused(Refusal::Malformed(e.to_string())),
                                    Counted::Nothing,
                                ),
                            };
                            if let Outcome::Requeued { dead_letter, .. } = outcome {
                                let counters = self.counters.group(*group_id);
                                if dead_letter {
                                    counters.dead_lettered += 1;
                                } else {
                                    counters.reconsumed += 1;
                                }
                                if let Counted::Requeue(consumer_group, queue) = &counted
                                    && let Some(c) =
                                        self.counters.consumer(*group_id, consumer_group, queue)
                                {
                                    if dead_letter {
                                        c.dead_lettered += 1;
                                    } else {
                                        c.reconsumed += 1;
                                    }
                                }
                            }
                            match counted {
                                Counted::Forget(groups)
                                    if matches!(outcome, Outcome::GroupDeleted { .. }) =>
                                {
                                    for consumer_group in &groups {
                                        self.counters
                                            .forget_consumer_group(*group_id, consumer_group);
                                    }
                                }
                                Counted::Drop(topic) => {
                                    self.counters.forget_queues(*group_id, &topic, |q| {
                                        state.queue_len(q).is_none()
                                    });
                                }
                                _ => {}
                            }
                            if let Outcome::Appended { .. }
                            | Outcome::Requeued { .. }
                            | Outcome::Leased(_)
                            | Outcome::Refused(Refusal::NotOwner(_)) = outcome
                            {
                                woken.insert(*group_id);
                            }
                            outcomes.push(Applied::Broker(outcome));
                        }
                        Machine::Meta(meta) => {
                            let applied = match postcard::from_bytes::<MetaCommand>(bytes) {
                                Ok(
                                    command @ (MetaCommand::CreateTopic { .. }
                                    | MetaCommand::DeleteTopic { .. }),
                                ) => {
                                    let topic = match &command {
                                        MetaCommand::CreateTopic { topic, .. }
                                        | MetaCommand::DeleteTopic { topic } => topic.clone(),
                                        _ => String::new(),
                                    };
                                    let result = meta.apply(command, broker_groups);
                                    table_changed |= matches!(
                                        result,
                                        Ok(TopicApplied::Created | TopicApplied::Deleted { .. })
                                    );
                                    if let Ok(TopicApplied::Deleted { .. }) = result {
                                        // Its traffic series end with it (a topic created
                                        // again with the name counts from zero).
                                        self.counters.topics.remove(&topic);
                                    }
                                    Applied::Topic { topic, result }
                                }
                                Ok(MetaCommand::AddBrokerGroup { group, voters }) => {
                                    let command = MetaCommand::AddBrokerGroup {
                                        group,
                                        voters: voters.clone(),
                                    };
                                    let result = meta.apply_node(command, broker_groups);
                                    if result == Ok(NodeApplied::Changed) {
                                        self.added_groups_stale = true;
                                    }
                                    Applied::BrokerGroup(result.map(|_| (group, voters)))
                                }
                                Ok(command) => {
                                    let result = meta.apply_node(command, broker_groups);
                                    if result == Ok(NodeApplied::Changed) {
                                        self.node_table_version += 1;
                                    }
                                    Applied::NodeTable(
                                        result.map(|_| meta.nodes().cloned().collect()),
                                    )
                                }
                                Err(e) => Applied::Topic {
                                    topic: String::new(),
                                    result: Err(format!("malformed metadata command: {e}")),
                                },
                            };
                            outcomes.push(applied);
                        }
                    }
                }
                if group
                    .proposal_index
                    .values()
                    .any(|(i, _)| *i == entry.index)
                {
                    group.applied.insert(entry.index, outcomes);
                }
            }
            hand_over_store_ops(
                *group_id,
                group,
                &mut self.store_ops,
                &mut self.store_ops_bytes,
                &mut self.counters,
            );
            // A snapshot waits for the end of the replay, as if it had been applied at once.
            if group.replay_to == 0
                && let Some(job) = snapshot_due(
                    *group_id,
                    group,
                    self.config.snapshot_entries_min,
                    self.config.snapshot_log_bytes,
                )
            {
                self.snapshot_jobs.push_back(job);
            }
            // An outcome is known once its entry is applied; none is proposed during a replay.
            while group.replay_to == 0
                && !group.paused
                && let Some(fate) = group.raft.poll_proposal()
            {
                if let Some((client, request)) = group.config_waiters.remove(&fate.id) {
                    let response = match fate.outcome {
                        ProposalOutcome::Committed { index } => {
                            let membership = group.raft.membership_at(index);
                            Response::MembershipChanged {
                                group: *group_id,
                                index,
                                voters: membership.voters.iter().copied().collect(),
                                learners: membership.learners.iter().copied().collect(),
                            }
                        }
                        ProposalOutcome::Dropped { .. } => Response::Unknown,
                    };
                    self.responses.push_back((client, request, response));
                    continue;
                }
                let proposed = group.proposal_index.remove(&fate.id);
                let waiters = group.proposed.remove(&fate.id).unwrap_or_default();
                let outcomes = match (fate.outcome, proposed) {
                    (ProposalOutcome::Committed { index }, _) => {
                        let outcomes = group.applied.remove(&index).unwrap_or_default();
                        match misreported(&group.raft, fate.id, index, proposed) {
                            // The outcomes there are another entry's: no client hears them.
                            Some(why) => {
                                self.faults
                                    .push_back(NodeFault::ProposalMisreported(format!(
                                        "group {group_id}: {why}"
                                    )));
                                Vec::new()
                            }
                            None => outcomes,
                        }
                    }
                    (ProposalOutcome::Dropped { .. }, Some((index, _))) => {
                        group.applied.remove(&index);
                        Vec::new()
                    }
                    (ProposalOutcome::Dropped { .. }, None) => Vec::new(),
                };
                let mut outcomes = outcomes.into_iter();
                for waiter in waiters {
                    let outcome = outcomes.next();
                    let Some(waiter) = waiter else { continue };
                    let response = match outcome {
                        Some(outcome) => respond(outcome, waiter.queue),
                        None => Response::Unknown,
                    };
                    self.responses
                        .push_back((waiter.client, waiter.request, response));
                }
            }
            while let Some(event) = group.raft.poll_event() {
                if let RaftEvent::BecameLeader { .. } = event {
                    group.placement_stale = true;
                }
                let counters = self.counters.group(*group_id);
                match event {
                    RaftEvent::BecameLeader { .. } => {
                        counters.elections_won += 1;
                        counters.leader_changes += 1;
                    }
                    RaftEvent::SteppedDown { .. } => counters.stepped_down += 1,
                    RaftEvent::LeaderChanged { .. } => counters.leader_changes += 1,
                    RaftEvent::MessageRefused { .. }
                    | RaftEvent::TransferAborted { .. }
                    | RaftEvent::MembershipChanged { .. } => {}
                }
                let group = *group_id;
                let event = match event {
                    RaftEvent::BecameLeader { term } => NodeEvent::BecameLeader { group, term },
                    RaftEvent::SteppedDown { term } => NodeEvent::SteppedDown { group, term },
                    RaftEvent::LeaderChanged { term, leader } => NodeEvent::LeaderChanged {
                        group,
                        term,
                        leader,
                    },
                    RaftEvent::MessageRefused { from, why } => {
                        NodeEvent::MessageRefused { group, from, why }
                    }
                    RaftEvent::TransferAborted { term, to } => {
                        NodeEvent::TransferAborted { group, term, to }
                    }
                    // Nothing changes membership on a node yet (issue 17, operator surface).
                    RaftEvent::MembershipChanged { .. } => continue,
                };
                if self.events.len() >= EVENTS_BUFFERED_MAX {
                    self.events.pop_front();
                }
                self.events.push_back(event);
            }
        }
        if self.added_groups_stale {
            self.create_added_groups(now);
        }
        if table_changed {
            for group in self.groups.values_mut() {
                group.placement_stale = true;
            }
        }
        self.tell_table_change(now, table_changed);
        for (group_id, group) in &self.groups {
            if *group_id == METADATA_GROUP {
                continue;
            }
            let status = group.raft.status();
            let term = (status.role == Role::Leader).then_some(status.term);
            self.lease_clocks.leading(*group_id, term, now);
        }
        self.create_placed_queues();
        self.propose_trims(now);
        for group in self.groups.values_mut() {
            if !group.batch.is_empty() {
                propose_batch(now, &mut self.next_proposal, group, &mut self.responses);
            }
        }
        self.retry_parked(now, &woken);
    }

    /// The creator of a topic is answered once the change commits, and its producers and
    /// consumers go straight to broker leaders that may be followers of the topic table. A
    /// follower learns a commit with the leader's next heartbeat, up to its interval later,
    /// and only once it holds the entry; until then it refused the sends (each waited out the
    /// producer's 100 ms back-off: `bench`'s send p999 on every new topic) and held the pulls.
    /// So the metadata leader announces the commit to each follower as soon as that follower
    /// holds the change, for [`TABLE_NOTICE_MS`] after it.
    fn tell_table_change(&mut self, now: Instant, changed: bool) {
        if !changed && self.table_notice.is_none() {
            return;
        }
        let me = self.config.id;
        let Some(meta) = self.groups.get_mut(&METADATA_GROUP) else {
            return;
        };
        let status = meta.raft.status();
        if status.role != Role::Leader {
            self.table_notice = None;
            return;
        }
        if changed {
            self.table_notice = Some(TableNotice {
                index: status.commit_index,
                told: BTreeSet::new(),
                until: now + std::time::Duration::from_millis(TABLE_NOTICE_MS),
            });
        }
        let Some(notice) = &mut self.table_notice else {
            return;
        };
        if now >= notice.until {
            self.table_notice = None;
            return;
        }
        let holding: Vec<NodeId> = meta
            .raft
            .progress_matches()
            .into_iter()
            .filter(|(id, index)| *id != me && *index >= notice.index && !notice.told.contains(id))
            .map(|(id, _)| id)
            .collect();
        if !holding.is_empty() {
            meta.raft.announce_commit(now);
            notice.told.extend(holding);
        }
    }

    /// A request may reach a group's leader before it has created a queue the topic table
    /// places there: create it in the same entry, ahead of the request.
    fn create_if_placed(&mut self, group: GroupId, queue: &QueueId) {
        let epoch = match self.groups.get(&METADATA_GROUP).map(|g| &g.machine) {
            Some(Machine::Meta(meta)) if meta.group_of(queue) == Some(group) => {
                meta.epoch_of(&queue.topic)
            }
            _ => return,
        };
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let Machine::Broker(state) = &g.machine else {
            return;
        };
        let key = (epoch, queue.clone());
        if needs_creation(state, epoch, queue) && !g.creating.contains(&key) {
            g.creating.insert(key);
            let command = Command::CreateQueuesAt {
                queues: vec![(epoch, queue.clone())],
            };
            g.batch.push((None, encode_command(&command)));
        }
    }

    /// The leader of a broker group creates the queues the topic table places there. The
    /// look is a pass over the whole table, made only when the table changed or the group's
    /// leadership did since the last look, so no event costs work that grows with the table.
    fn create_placed_queues(&mut self) {
        let Some(Group {
            machine: Machine::Meta(meta),
            ..
        }) = self.groups.get(&METADATA_GROUP)
        else {
            return;
        };
        let mut wanted: Vec<(GroupId, Vec<(u64, QueueId)>)> = Vec::new();
        let mut tombstones: Vec<(String, u64)> = Vec::new();
        for (group_id, group) in &self.groups {
            if *group_id == METADATA_GROUP {
                continue;
            }
            if group.placement_stale && group.raft.status().role == Role::Leader {
                let queues = meta.queues_of(*group_id);
                let placed = queues
                    .into_iter()
                    .map(|q| (meta.epoch_of(&q.topic), q))
                    .collect();
                wanted.push((*group_id, placed));
                if tombstones.is_empty() {
                    tombstones = meta.tombstones().map(|(t, e)| (t.to_string(), e)).collect();
                }
            }
        }
        for group in self.groups.values_mut() {
            if group.raft.status().role != Role::Leader {
                // Whoever leads next looks afresh.
                group.creating.clear();
                group.placement_stale = true;
            }
        }
        #[cfg(test)]
        {
            self.placement_scans += wanted.len() as u64;
        }
        for (group_id, queues) in wanted {
            let Some(group) = self.groups.get_mut(&group_id) else {
                continue;
            };
            group.placement_stale = false;
            let Machine::Broker(state) = &group.machine else {
                continue;
            };
            // Deleted topics first: their queues go (and the group remembers the deletion, so
            // a leader with a lagging table cannot bring them back) before any new
            // incarnation of the same name is created.
            for (topic, epoch) in &tombstones {
                let mark = state.topic_mark(topic).unwrap_or_default();
                let done = mark.epoch > *epoch || (mark.epoch == *epoch && mark.dropped);
                if !done {
                    let command = Command::DropTopic {
                        topic: topic.clone(),
                        epoch: *epoch,
                    };
                    group.batch.push((None, encode_command(&command)));
                }
            }
            let missing: Vec<(u64, QueueId)> = queues
                .into_iter()
                .filter(|(epoch, q)| {
                    needs_creation(state, *epoch, q)
                        && !group.creating.contains(&(*epoch, q.clone()))
                })
                .collect();
            group.creating.extend(missing.iter().cloned());
            // In several commands if need be, each within the size of one.
            for chunk in missing.chunks(CREATE_QUEUES_PER_COMMAND_MAX) {
                let command = Command::CreateQueuesAt {
                    queues: chunk.to_vec(),
                };
                group.batch.push((None, encode_command(&command)));
            }
        }
    }

    /// On the leader of each broker group, a retention trim when some message has outlived
    /// the policy, looked for at most once per `trim_interval_ms`. The leader's clock goes into the
    /// command, so every replica deletes exactly the same messages.
    fn propose_trims(&mut self, now: Instant) {
        let interval = std::time::Duration::from_millis(self.config.trim_interval_ms);
        let now_ms = now.as_micros() / 1_000;
        for group in self.groups.values_mut() {
            let Machine::Broker(state) = &group.machine else {
                continue;
            };
            let status = group.raft.status();
            if status.role != Role::Leader {
                group.led_since = None;
                group.group_seen.clear();
                continue;
            }
            if group.led_since.is_none_or(|(term, _)| term != status.term) {
                group.led_since = Some((status.term, now));
                group.group_seen.clear();
            }
            if group
                .trim_checked_at
                .is_some_and(|at| now.saturating_since(at) < interval)
            {
                continue;
            }
            // Looking costs a pass over the queues: not on every event.
            group.trim_checked_at = Some(now);
            if let (Some(retention_ms), Some((_, since))) =
                (self.config.group_retention_ms, group.led_since)
            {
                let expired = expired_groups(state, &group.group_seen, since, now, retention_ms);
                for name in &expired {
                    // Not proposed again while this one is on its way.
                    if let Some(seen) = group.group_seen.get_mut(name) {
                        *seen = now;
                    } else if group.group_seen.len() < crate::limits::GROUP_ACTIVITY_ENTRIES_MAX {
                        group.group_seen.insert(name.clone(), now);
                    }
                }
                for chunk in expired.chunks(crate::limits::EXPIRE_GROUPS_PER_COMMAND_MAX) {
                    let command = Command::ExpireGroups {
                        groups: chunk.to_vec(),
                    };
                    group.batch.push((None, encode_command(&command)));
                }
            }
            if !state.trim_due(now_ms) {
                continue;
            }
            let command = Command::Trim { stamp_ms: now_ms };
            group.batch.push((None, encode_command(&command)));
        }
    }

    /// Parks a pull that waits for its queue's lease, at least [`CLAIM_WAIT_MS`]; one whose
    /// wait is over is answered with no messages.
    fn park_for_lease(
        &mut self,
        now: Instant,
        client: ClientId,
        id: RequestId,
        group: GroupId,
        mut request: Request,
        wake_at: Instant,
    ) {
        let Request::Pull {
            queue,
            from,
            wait_ms,
            ..
        } = &mut request
        else {
            return;
        };
        if self.parked.len() >= self.config.parked_pulls_max {
            let response = Response::Pulled {
                queue: queue.clone(),
                messages: Vec::new(),
                next_offset: *from,
                delivered_below: 0,
            };
            self.responses.push_back((client, id, response));
            return;
        }
        // A pull that would not wait for messages still waits for its claim to go through.
        if *wait_ms == 0 {
            *wait_ms = CLAIM_WAIT_MS;
        }
        let deadline = now + std::time::Duration::from_millis(*wait_ms);
        self.parked.push(ParkedPull {
            client,
            request: id,
            group,
            request_body: request,
            deadline,
            wake_at: wake_at.min(deadline),
            for_lease: true,
        });
    }

    /// Whether the queue a parked pull waits on has no owner now: released since the pull
    /// was served under its lease.
    fn released_under(&self, pull: &ParkedPull) -> bool {
        let Request::Pull {
            broker,
            group,
            queue,
            ..
        } = &pull.request_body
        else {
            return false;
        };
        match self.groups.get(broker).map(|g| &g.machine) {
            Some(Machine::Broker(state)) => state
                .lease(group, queue)
                .is_none_or(|lease| lease.owner.is_none()),
            _ => false,
        }
    }

    fn retry_parked(&mut self, now: Instant, woken: &BTreeSet<GroupId>) {
        // Most steps wake no parked pull: leave the list as it is rather than rebuild it (the
        // simulator spent a tenth of its time here).
        let due = |pull: &ParkedPull| {
            now >= pull.deadline || now >= pull.wake_at || woken.contains(&pull.group)
        };
        if !self.parked.iter().any(due) {
            return;
        }
        let capacity = self.parked.len();
        let parked = std::mem::replace(&mut self.parked, Vec::with_capacity(capacity));
        for pull in parked {
            // A pull waiting for its queue's lease is answered empty at its deadline. One
            // waiting for messages whose queue was released meanwhile (its member leaves, or
            // hands the queue on) is answered empty at once: run again, it would claim the
            // queue back and wait out the rest of its long poll, and a leaving member could
            // go only after it.
            let answer_empty = if pull.for_lease {
                now >= pull.deadline
            } else {
                woken.contains(&pull.group) && self.released_under(&pull)
            };
            if answer_empty && let Request::Pull { queue, from, .. } = &pull.request_body {
                let response = Response::Pulled {
                    queue: queue.clone(),
                    messages: Vec::new(),
                    next_offset: *from,
                    delivered_below: 0,
                };
                self.responses
                    .push_back((pull.client, pull.request, response));
                continue;
            }
            if woken.contains(&pull.group) || now >= pull.wake_at {
                let mut request = pull.request_body;
                if now >= pull.deadline
                    && let Request::Pull { wait_ms, .. } = &mut request
                {
                    *wait_ms = 0;
                }
                let remaining = pull.deadline.saturating_since(now).as_millis() as u64;
                if let Request::Pull { wait_ms, .. } = &mut request
                    && *wait_ms > 0
                {
                    *wait_ms = remaining.max(1);
                }
                self.pull(now, pull.client, pull.request, request);
            } else {
                self.parked.push(pull);
            }
        }
    }
}

/// A copy of a group's state to snapshot, when its log grew enough since the last snapshot and
/// no other snapshot of it is being encoded.
/// Moves the store operations `group`'s state machine queued to the node's, counting them.
fn hand_over_store_ops(
    group_id: GroupId,
    group: &mut Group,
    store_ops: &mut VecDeque<(GroupId, StoreOp)>,
    store_ops_bytes: &mut u64,
    counters: &mut super::stats::Counters,
) {
    let Machine::Broker(state) = &mut group.machine else {
        return;
    };
    let ops = state.take_store_ops();
    if ops.is_empty() {
        return;
    }
    let trims = ops
        .iter()
        .filter(|op| matches!(op, StoreOp::Trim { .. }))
        .count();
    counters.group(group_id).retention_trims += trims as u64;
    if ops.iter().any(|op| matches!(op, StoreOp::DropQueue { .. })) {
        // A restart from a snapshot taken before a topic's deletion would look for the
        // dropped queues' messages, which the store no longer holds: compact at once, so that
        // window stays short.
        group.pace.entries_since = group.pace.entries_since.max(u64::MAX / 2);
        group.pace.bytes_since = group.pace.bytes_since.max(u64::MAX / 2);
    }
    *store_ops_bytes += ops.iter().map(StoreOp::weight_bytes).sum::<u64>();
    store_ops.extend(ops.into_iter().map(|op| (group_id, op)));
}

fn snapshot_due(
    group_id: GroupId,
    group: &mut Group,
    entries_min: Option<u64>,
    log_bytes: u64,
) -> Option<SnapshotJob> {
    let entries_min = entries_min?;
    let log_bytes = log_bytes.clamp(1, crate::limits::SNAPSHOT_LOG_BYTES_MAX);
    let pace = &group.pace;
    // By bytes too: entries of large batches (28 messages of 4 KiB each, say) made 10,000
    // entries over a gigabyte of log in memory per group, and as much read back at a restart.
    let due = pace.entries_since >= entries_min.max(1) || pace.bytes_since >= log_bytes;
    if group.encoding.is_some() || !due || pace.bytes_since < pace.last_bytes {
        return None;
    }
    let status = group.raft.status();
    if status.applied_index <= status.snapshot_index {
        return None;
    }
    let term = group.raft.entry(status.applied_index)?.term;
    let membership = group.raft.membership_at(status.applied_index);
    if membership.voters.is_empty() {
        // A node that joined knows no configuration below the first configuration entry it
        // received (the cluster's first is not in any log); a snapshot there would record
        // none, and none reads back. It waits until it has applied one (`Replica::compact`).
        return None;
    }
    let membership = Some(membership.clone());
    group.encoding = Some(status.applied_index);
    group.pace.entries_since = 0;
    group.pace.bytes_since = 0;
    Some(SnapshotJob {
        group: group_id,
        index: status.applied_index,
        term,
        membership,
        image: group.machine.clone(),
    })
}

fn propose_batch(
    now: Instant,
    next_proposal: &mut ProposalId,
    group: &mut Group,
    responses: &mut VecDeque<(ClientId, RequestId, Response)>,
) {
    let mut batch = std::mem::take(&mut group.batch);
    while !batch.is_empty() {
        let mut bytes = 0usize;
        let take = batch
            .iter()
            .take_while(|(_, command)| {
                bytes = bytes.saturating_add(command.len() + COMMAND_FRAMING_BYTES);
                bytes <= ENTRY_BYTES_MAX
            })
            .count()
            .max(1);
        let rest = batch.split_off(take);
        propose_entry(now, next_proposal, group, responses, batch);
        batch = rest;
    }
}

/// Proposes `batch` as one entry.
fn propose_entry(
    now: Instant,
    next_proposal: &mut ProposalId,
    group: &mut Group,
    responses: &mut VecDeque<(ClientId, RequestId, Response)>,
    batch: Vec<(Option<Waiter>, Bytes)>,
) {
    let id = *next_proposal;
    *next_proposal += 1;
    let commands: Vec<Bytes> = batch.iter().map(|(_, b)| b.clone()).collect();
    let status = group.raft.status();
    let proposed = if group.paused {
        // See `BrokerNode::pause`: the client tries again later, or at the next leader.
        Err(ProposeError::Busy)
    } else {
        group.raft.propose(now, id, commands)
    };
    match proposed {
        Ok(index) => {
            group.proposal_index.insert(id, (index, status.term));
            group
                .proposed
                .insert(id, batch.into_iter().map(|(w, _)| w).collect());
        }
        Err(error) => {
            let response = match error {
                ProposeError::NotLeader { leader_hint } => Response::NotLeader {
                    group: status.group,
                    leader_hint,
                },
                ProposeError::Busy => Response::Busy,
                // The client goes straight to the node about to lead.
                ProposeError::Transferring { to } => Response::NotLeader {
                    group: status.group,
                    leader_hint: Some(to),
                },
            };
            for (waiter, _) in batch {
                if let Some(w) = waiter {
                    responses.push_back((w.client, w.request, response.clone()));
                }
            }
            group.creating.clear();
            group.placement_stale = true;
        }
    }
}

fn respond(applied: Applied, queue: Option<QueueId>) -> Response {
    let outcome = match applied {
        Applied::Broker(outcome) => outcome,
        Applied::Topic {
            topic,
            result: Ok(TopicApplied::Deleted { queues }),
        } => return Response::TopicDeleted { topic, queues },
        Applied::Topic {
            topic,
            result: Ok(applied),
        } => {
            return Response::TopicCreated {
                topic,
                existed: applied == TopicApplied::Existed,
            };
        }
        Applied::Topic {
            result: Err(reason),
            ..
        } => return Response::Refused { reason },
        Applied::NodeTable(Ok(nodes)) => return Response::Nodes { nodes },
        Applied::NodeTable(Err(reason)) => return Response::Refused { reason },
        Applied::BrokerGroup(Ok((group, voters))) => {
            return Response::BrokerGroupAdded { group, voters };
        }
        Applied::BrokerGroup(Err(reason)) => return Response::Refused { reason },
    };
    match outcome {
        Outcome::Appended {
            queue,
            base_offset,
            duplicate,
        } => Response::Sent {
            queue,
            base_offset,
            duplicate,
        },
        Outcome::Acked { consume_offset } => Response::Acked {
            queue: queue.unwrap_or_else(|| QueueId::new("", 0)),
            consume_offset,
        },
        Outcome::Requeued {
            to,
            offset,
            dead_letter,
        } => Response::Requeued {
            to,
            offset,
            dead_letter,
        },
        Outcome::QueuesCreated => Response::Refused {
            reason: "internal command".into(),
        },
        Outcome::Sought { consume_offset } => Response::Acked {
            queue: queue.unwrap_or_else(|| QueueId::new("", 0)),
            consume_offset,
        },
        Outcome::GroupDeleted { offsets, leases } => Response::GroupDeleted {
            group: queue.map(|q| q.topic.to_string()).unwrap_or_default(),
            offsets,
            leases,
        },
        Outcome::Leased(_) => Response::Released {
            queue: queue.unwrap_or_else(|| QueueId::new("", 0)),
        },
        Outcome::Refused(refusal @ Refusal::NotOwner(_)) => Response::Revoked {
            queue: queue.unwrap_or_else(|| QueueId::new("", 0)),
            reason: refusal.to_string(),
        },
        Outcome::Refused(refusal) => Response::Refused {
            reason: refusal.to_string(),
        },
        Outcome::Redriven { moved, remaining } => Response::Redriven {
            group: queue.map(|q| q.topic.to_string()).unwrap_or_default(),
            moved,
            remaining,
        },
    }
}

/// The consumer groups with offsets or leases in `state` that this leader (in office since
/// `since`) has not heard from for `retention_ms`.
fn expired_groups(
    state: &BrokerState,
    seen: &BTreeMap<String, Instant>,
    since: Instant,
    now: Instant,
    retention_ms: u64,
) -> Vec<String> {
    let retention = std::time::Duration::from_millis(retention_ms);
    if now.saturating_since(since) < retention {
        return Vec::new();
    }
    state
        .consumer_groups()
        .into_iter()
        .filter(|g| now.saturating_since(seen.get(*g).copied().unwrap_or(since)) >= retention)
        .map(str::to_string)
        .collect()
}

/// Whether `queue` of its topic's incarnation `epoch` (as this node's table has it) is yet to
/// be created in `state`: absent or of an older incarnation, and not of one the group has
/// already dropped or replaced (this node's table lags behind).
fn needs_creation(state: &BrokerState, epoch: u64, queue: &QueueId) -> bool {
    let mark = state.topic_mark(&queue.topic).unwrap_or_default();
    if mark.epoch > epoch || (mark.epoch == epoch && mark.dropped) {
        return false;
    }
    mark.epoch < epoch || mark.dropped || state.queue_len(queue).is_none()
}

fn claim_command(ask: &PullAsk<'_>, takeover: Option<Holder>) -> Command {
    Command::ClaimTenure {
        group: ask.group.to_string(),
        queue: ask.queue.clone(),
        member: ask.member.to_string(),
        generation: ask.generation,
        takeover,
        tenure: ask.tenure,
    }
}

/// Decodes a committed broker entry's commands, for checkers and tools.
pub fn decode_entry(kind: &EntryKind) -> Vec<Option<Command>> {
    match kind {
        EntryKind::Noop | EntryKind::Config(_) => Vec::new(),
        EntryKind::Commands(commands) => commands.iter().map(|c| decode_command(c).ok()).collect(),
    }
}

/// Why a send is refused before it is proposed: too many messages, tags or properties, or more
/// message bytes than a send may carry. (Its encoded size is checked with the command.)
fn check_send(messages: &[Message]) -> Result<(), String> {
    if messages.len() > SEND_MESSAGES_MAX {
        return Err(format!(
            "a send of {} messages exceeds the maximum of {SEND_MESSAGES_MAX}",
            messages.len()
        ));
    }
    let mut bytes = 0usize;
    for message in messages {
        if message.tags.len() > MESSAGE_TAGS_MAX {
            return Err(format!(
                "a message with {} tags exceeds the maximum of {MESSAGE_TAGS_MAX}",
                message.tags.len()
            ));
        }
        if message.properties.len() > MESSAGE_PROPERTIES_MAX {
            return Err(format!(
                "a message with {} properties exceeds the maximum of {MESSAGE_PROPERTIES_MAX}",
                message.properties.len()
            ));
        }
        bytes = bytes.saturating_add(message.size_bytes());
    }
    if bytes > SEND_BYTES_MAX {
        return Err(format!(
            "a send of {bytes} message bytes exceeds the maximum of {SEND_BYTES_MAX}"
        ));
    }
    Ok(())
}

/// Whether a consumer of `group` may name `queue`: a topic's queue, or the group's own retry
/// or dead-letter queue (internal names, which no topic can take: they hold a `%`).
fn check_consumer_queue(group: &str, queue: &QueueId) -> Result<(), String> {
    check_name("consumer group", group)?;
    if queue.is_retry() || queue.is_dead_letter() {
        let own =
            queue == &QueueId::retry(group, queue.queue) || queue == &QueueId::dead_letter(group);
        if own {
            return Ok(());
        }
        return Err(format!(
            "queue {queue} is not a retry or dead-letter queue of consumer group {group}"
        ));
    }
    check_name("topic", &queue.topic)
}

/// Why Raft's report that proposal `id` committed at `index` cannot be true, if it cannot:
/// it was proposed at another index, the commit index is below it, or the entry there is of
/// another term than the one it was proposed in (another leader's entry took its place).
/// Checked by the node rather than trusted, since a client is told its command took effect.
pub(super) fn misreported(
    raft: &Replica,
    id: ProposalId,
    index: Index,
    proposed: Option<(Index, Term)>,
) -> Option<String> {
    let (at, term) = proposed?;
    let commit = raft.status().commit_index;
    let held = raft.entry(index).map(|e| e.term);
    if at != index {
        Some(format!(
            "proposal {id} was reported committed at index {index} but was proposed at {at}"
        ))
    } else if commit < index {
        Some(format!(
            "proposal {id} was reported committed at index {index} above the commit index \
             {commit}"
        ))
    } else if let Some(held) = held
        && held != term
    {
        Some(format!(
            "proposal {id} of term {term} was reported committed at index {index}, where the \
             log holds an entry of term {held}"
        ))
    } else {
        None
    }
}

/// The state a group's snapshot on disk restores, or `machine` as it is (with a fault for
/// the operator) when there is none or it does not decode.
fn restore_machine(
    group: GroupId,
    machine: Machine,
    disk: &Recovered,
    faults: &mut VecDeque<NodeFault>,
) -> (Machine, SnapshotPace) {
    let mut pace = SnapshotPace::default();
    let Some(snapshot) = &disk.snapshot else {
        return (machine, pace);
    };
    pace.last_bytes = snapshot.data.len() as u64;
    match machine.restored(&snapshot.data, false, None) {
        Ok(mut restored) => {
            if let Machine::Broker(state) = &mut restored {
                // Queues the log after the snapshot drops may be gone from the store
                // already: see `BrokerState::expect_replay`. Only the commands it looks at
                // are kept: the log's appends would be a decoded copy of every message in it.
                let replayed: Vec<Command> = disk
                    .entries
                    .iter()
                    .filter(|e| e.index > snapshot.index)
                    .flat_map(|e| decode_entry(&e.kind))
                    .flatten()
                    .filter(|c| {
                        matches!(
                            c,
                            Command::DropTopic { .. } | Command::CreateQueuesAt { .. }
                        )
                    })
                    .collect();
                state.expect_replay(&replayed);
            }
            (restored, pace)
        }
        Err(e) => {
            faults.push_back(NodeFault::SnapshotUndecodable(format!(
                "group {group}: the snapshot at index {} on disk does not restore: {e}",
                snapshot.index
            )));
            (machine, pace)
        }
    }
}
