//! What clients ask a node and what it answers. The same values travel over the wire (shell)
//! and through the simulator's network.

use serde::{Deserialize, Serialize};

use crate::broker::{Message, Offset, ProducerId, QueueId, SeekTo, Seq, StoredMessage};
use crate::raft::{ConfChange, GroupId, Index, NodeId};

/// A connection (shell) or simulated client, as the node knows it.
pub type ClientId = u64;
/// Chosen by the client; echoed in the response.
pub type RequestId = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Which group holds each queue of `topic`, and who leads it as far as this node knows.
    Route {
        topic: String,
    },
    /// Every topic and its queue count, as this node's metadata replica knows them.
    Topics,
    /// This node's replicas: role, term, leader, commit and applied index of each group.
    Status,
    CreateTopic {
        topic: String,
        queues: u32,
    },
    /// A consumer of `group`, consuming `topic`, is alive; answered by the metadata leader
    /// with the queues it owns at the group's current generation ([`Response::Assignment`]).
    Heartbeat {
        group: String,
        member: String,
        topic: String,
    },
    /// A consumer leaves `group` now rather than after its session times out.
    Leave {
        group: String,
        member: String,
    },
    /// Queue requests name the broker group that holds the queue (from the routes; retry and
    /// dead-letter queues live in every group that had a message requeued).
    Send {
        broker: GroupId,
        queue: QueueId,
        producer_id: ProducerId,
        first_seq: Seq,
        messages: Vec<Message>,
    },
    /// Messages of `queue` from `from` on that `group` has not acknowledged; waits up to
    /// `wait_ms` for some to arrive if there are none. Served only to the member that holds
    /// the queue at `generation` (claimed on its first pull); a stale one is `Revoked`.
    /// `tenure` is the member's number for its current tenure of the queue (see
    /// [`crate::broker::Command::ClaimTenure`]).
    Pull {
        broker: GroupId,
        group: String,
        member: String,
        generation: u64,
        tenure: u64,
        queue: QueueId,
        from: Offset,
        messages_max: u32,
        bytes_max: u32,
        wait_ms: u64,
    },
    /// Accepted only from the member holding the queue (same tenure): bound to the delivery.
    Ack {
        broker: GroupId,
        group: String,
        member: String,
        generation: u64,
        queue: QueueId,
        offsets: Vec<Offset>,
    },
    ReconsumeLater {
        broker: GroupId,
        group: String,
        member: String,
        generation: u64,
        queue: QueueId,
        offset: Offset,
    },
    /// The holder of `queue` gives it up (its answers are confirmed): the next owner may
    /// start at once instead of after the lease expires. Refused if it names an earlier
    /// tenure than the member's current one.
    Release {
        broker: GroupId,
        group: String,
        member: String,
        generation: u64,
        tenure: u64,
        queue: QueueId,
    },
    /// Admin: moves consumer group `group`'s position on `queue` (see
    /// [`crate::broker::Command::Seek`]); answered with [`Response::Acked`] and the new
    /// consume offset.
    SeekGroup {
        broker: GroupId,
        group: String,
        queue: QueueId,
        to: SeekTo,
        force: bool,
    },
    /// Admin: forgets consumer group `group` in broker group `broker` (its offsets and
    /// leases); answered with [`Response::GroupDeleted`].
    DeleteGroup {
        broker: GroupId,
        group: String,
        force: bool,
    },
    /// Admin: the leader of Raft group `group` hands leadership to node `to` (`TimeoutNow`);
    /// answered with [`Response::TransferStarted`] once it has begun.
    TransferLeader {
        group: GroupId,
        to: NodeId,
    },
    /// Admin: reads consumer group `group`'s dead-letter queue in broker group `broker` from
    /// `from` on, without claiming or acknowledging anything; answered with
    /// [`Response::Pulled`] (only what the group has not redriven).
    PeekDeadLetters {
        broker: GroupId,
        group: String,
        from: Offset,
        messages_max: u32,
    },
    /// Admin: moves up to `messages_max` (at most `REDRIVE_MESSAGES_MAX`) of `group`'s
    /// dead-lettered messages in broker group `broker` back to its first retry queue (see
    /// [`crate::broker::Command::Redrive`]); answered with [`Response::Redriven`].
    RedriveDeadLetters {
        broker: GroupId,
        group: String,
        messages_max: u32,
    },
    /// Admin: deletes `topic` from the topic table; every broker group then drops its queues
    /// with their messages, offsets and leases. Answered with [`Response::TopicDeleted`] once
    /// the deletion committed in the table (the queues go as each broker group applies it).
    DeleteTopic {
        topic: String,
    },
    /// Admin: the leader of Raft group `group` appends the configuration `change` makes
    /// (one server at a time); answered with [`Response::MembershipChanged`] once it commits.
    /// A `Remove` that leaves the group fewer voters than the replication factor is refused
    /// unless `force`.
    ChangeMembership {
        group: GroupId,
        change: ConfChange,
        force: bool,
    },
    /// The metadata group's node table (nodes added at runtime, ids removed); answered with
    /// [`Response::Nodes`] from this node's applied state.
    Nodes,
    /// Admin: the metadata leader records node `id`'s addresses (before any group adds it);
    /// answered with [`Response::Nodes`] once committed.
    AddNode {
        id: NodeId,
        client_addr: String,
        peer_addr: String,
    },
    /// Admin: the metadata leader records node `id` as removed for good; refused while a group
    /// still has it as a member, unless `force`. Answered with [`Response::Nodes`].
    RemoveNode {
        id: NodeId,
        force: bool,
    },
    /// Admin: the metadata leader records a new broker group `group` (its choice, one past the
    /// highest, when `None`) whose first configuration is `voters`; each voter then creates a
    /// replica of it, and topics created afterwards place queues in it too. Fewer voters than
    /// the replication factor is refused unless `force`. Answered with
    /// [`Response::BrokerGroupAdded`] once committed.
    AddBrokerGroup {
        group: Option<GroupId>,
        voters: Vec<NodeId>,
        force: bool,
    },
}

/// One replica as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupId,
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    /// The log holds entries above this index only; a snapshot stands in for the rest.
    pub snapshot_index: u64,
    /// For a broker group: each consumer group's progress on each queue it has acknowledged
    /// in or claimed (from the queue's start, if nothing acknowledged yet), as this replica
    /// has applied it.
    pub consumers: Vec<ConsumerProgress>,
    /// For a broker group: who holds each queue a consumer group has claimed, as this
    /// replica has applied it (`None`: released).
    pub holders: Vec<QueueHolder>,
    /// The configuration in effect on this replica: voters and learners.
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// On a leader: how far each other member's log is known to match the leader's.
    pub matches: Vec<(NodeId, Index)>,
    /// A removal that leaves the group fewer voters is refused unless forced.
    pub replication_factor: u32,
}

/// A queue's lease as a broker group's log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueHolder {
    pub group: String,
    pub queue: QueueId,
    pub member: Option<String>,
    pub generation: u64,
}

/// How far a consumer group is on one queue: `queue_len - consume_offset` messages wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerProgress {
    pub group: String,
    pub queue: QueueId,
    pub consume_offset: Offset,
    pub queue_len: Offset,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub queue: QueueId,
    pub group: GroupId,
    pub leader: Option<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Routes {
        topic: String,
        routes: Vec<Route>,
    },
    /// The topic exists with the queue count asked for: created now, or `existed` already
    /// (creating is idempotent; another count is refused).
    TopicCreated {
        topic: String,
        existed: bool,
    },
    Topics {
        topics: Vec<(String, u32)>,
    },
    Status {
        node: NodeId,
        groups: Vec<GroupStatus>,
    },
    /// The queues (with their broker groups) this member owns at `generation` of `group`,
    /// which has `members` live members. Generations only rise; the broker refuses older ones.
    Assignment {
        group: String,
        generation: u64,
        members: u32,
        queues: Vec<(GroupId, QueueId)>,
    },
    /// The member left its group.
    Left {
        group: String,
    },
    /// The member does not hold `queue` (any more): it must drop what it holds of it. Nothing
    /// was served or written.
    Revoked {
        queue: QueueId,
        reason: String,
    },
    /// The lease of `queue` was given up.
    Released {
        queue: QueueId,
    },
    /// Committed: the batch sits at `base_offset..` of `queue`, one offset per message.
    Sent {
        queue: QueueId,
        base_offset: Offset,
        duplicate: bool,
    },
    Pulled {
        queue: QueueId,
        messages: Vec<(Offset, StoredMessage)>,
        next_offset: Offset,
        /// Offsets below this were handed to the group before (as far as this leader knows,
        /// since it took office): those messages are redeliveries.
        delivered_below: Offset,
    },
    /// The acknowledgement committed.
    Acked {
        queue: QueueId,
        consume_offset: Offset,
    },
    Requeued {
        to: QueueId,
        offset: Offset,
        dead_letter: bool,
    },
    /// The consumer group's positions and leases in the broker group asked are gone.
    GroupDeleted {
        group: String,
        offsets: u64,
        leases: u64,
    },
    /// This node does not lead `group`; nothing was done.
    NotLeader {
        group: GroupId,
        leader_hint: Option<NodeId>,
    },
    /// Definitively refused: nothing was written.
    Refused {
        reason: String,
    },
    /// Too much is waiting for a quorum; nothing was written. Retry later.
    Busy,
    /// Leadership changed while the request waited for a quorum: it may or may not have been
    /// written. Retry with the same ids; idempotence sorts it out.
    Unknown,
    /// The leader of `group` began handing leadership to `to`; it completes within an
    /// election timeout or is given up.
    TransferStarted {
        group: GroupId,
        to: NodeId,
    },
    /// `moved` dead-lettered messages of `group` went back to its retry queue; `remaining`
    /// still wait in this broker group's dead-letter queue.
    Redriven {
        group: String,
        moved: u64,
        remaining: u64,
    },
    /// `topic` and its `queues` queues left the topic table.
    TopicDeleted {
        topic: String,
        queues: u32,
    },
    /// The configuration change asked for committed: `group`'s configuration as of `index`.
    MembershipChanged {
        group: GroupId,
        index: Index,
        voters: Vec<NodeId>,
        learners: Vec<NodeId>,
    },
    /// The node table as the answering node has applied it.
    Nodes {
        nodes: Vec<super::metadata::NodeRecord>,
    },
    /// Broker group `group` with first voters `voters` is in the metadata table (added now,
    /// or by an earlier try of the same request).
    BrokerGroupAdded {
        group: GroupId,
        voters: Vec<NodeId>,
    },
}

impl Request {
    /// The consumer group a member's request speaks for (admin requests about a group are
    /// not counted: see `CONSUMER_GROUPS_PER_CONNECTION_MAX`).
    pub fn member_group(&self) -> Option<&str> {
        match self {
            Request::Heartbeat { group, .. }
            | Request::Leave { group, .. }
            | Request::Pull { group, .. }
            | Request::Ack { group, .. }
            | Request::ReconsumeLater { group, .. }
            | Request::Release { group, .. } => Some(group),
            _ => None,
        }
    }

    /// The request's kind, a fixed name for counting (metrics label values).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Route { .. } => "route",
            Request::Topics => "topics",
            Request::Status => "status",
            Request::CreateTopic { .. } => "create_topic",
            Request::Heartbeat { .. } => "heartbeat",
            Request::Leave { .. } => "leave",
            Request::Send { .. } => "send",
            Request::Pull { .. } => "pull",
            Request::Ack { .. } => "ack",
            Request::ReconsumeLater { .. } => "reconsume_later",
            Request::Release { .. } => "release",
            Request::SeekGroup { .. } => "seek_group",
            Request::DeleteGroup { .. } => "delete_group",
            Request::TransferLeader { .. } => "transfer_leader",
            Request::PeekDeadLetters { .. } => "peek_dead_letters",
            Request::RedriveDeadLetters { .. } => "redrive_dead_letters",
            Request::DeleteTopic { .. } => "delete_topic",
            Request::ChangeMembership { .. } => "change_membership",
            Request::Nodes => "nodes",
            Request::AddNode { .. } => "add_node",
            Request::RemoveNode { .. } => "remove_node",
            Request::AddBrokerGroup { .. } => "add_broker_group",
        }
    }
}

impl Response {
    /// The answer's kind, a fixed name for counting (metrics label values).
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Routes { .. } => "routes",
            Response::TopicCreated { .. } => "topic_created",
            Response::Topics { .. } => "topics",
            Response::Status { .. } => "status",
            Response::Assignment { .. } => "assignment",
            Response::Left { .. } => "left",
            Response::Revoked { .. } => "revoked",
            Response::Released { .. } => "released",
            Response::Sent { .. } => "sent",
            Response::Pulled { .. } => "pulled",
            Response::Acked { .. } => "acked",
            Response::Requeued { .. } => "requeued",
            Response::GroupDeleted { .. } => "group_deleted",
            Response::TransferStarted { .. } => "transfer_started",
            Response::NotLeader { .. } => "not_leader",
            Response::Refused { .. } => "refused",
            Response::Busy => "busy",
            Response::Unknown => "unknown",
            Response::Redriven { .. } => "redriven",
            Response::TopicDeleted { .. } => "topic_deleted",
            Response::MembershipChanged { .. } => "membership_changed",
            Response::Nodes { .. } => "nodes",
            Response::BrokerGroupAdded { .. } => "broker_group_added",
        }
    }

    /// Whether the request was certainly not carried out, so a retry cannot duplicate it.
    pub fn nothing_written(&self) -> bool {
        matches!(
            self,
            Response::NotLeader { .. }
                | Response::Refused { .. }
                | Response::Busy
                | Response::Revoked { .. }
        )
    }
}
