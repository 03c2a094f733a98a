//! What clients ask a node and what it answers. The same values travel over the wire (shell)
//! and through the simulator's network.

use serde::{Deserialize, Serialize};

use crate::broker::{Message, Offset, ProducerId, QueueId, Seq, StoredMessage};
use crate::raft::{GroupId, NodeId};

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
    /// A consumer of `group` is alive; answered by the metadata leader with the group's live
    /// members, from which every member computes the same queue allocation.
    Heartbeat {
        group: String,
        member: String,
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
    /// `wait_ms` for some to arrive if there are none.
    Pull {
        broker: GroupId,
        group: String,
        queue: QueueId,
        from: Offset,
        messages_max: u32,
        bytes_max: u32,
        wait_ms: u64,
    },
    Ack {
        broker: GroupId,
        group: String,
        queue: QueueId,
        offsets: Vec<Offset>,
    },
    ReconsumeLater {
        broker: GroupId,
        group: String,
        queue: QueueId,
        offset: Offset,
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
    /// in, as this replica has applied it.
    pub consumers: Vec<ConsumerProgress>,
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
    /// The live members of a consumer group, sorted.
    Members {
        group: String,
        members: Vec<String>,
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
}

impl Response {
    /// Whether the request was certainly not carried out, so a retry cannot duplicate it.
    pub fn nothing_written(&self) -> bool {
        matches!(
            self,
            Response::NotLeader { .. } | Response::Refused { .. } | Response::Busy
        )
    }
}
