//! Values of the broker state machine: queues, messages, commands and their outcomes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub type Offset = u64;
pub type ProducerId = u64;
/// A producer's sequence number: one per message, the same on every retry of that message.
pub type Seq = u64;

/// One queue of a topic. Retry and dead-letter queues of a consumer group are queues too, of
/// the topics [`QueueId::retry`] and [`QueueId::dead_letter`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId {
    pub topic: Arc<str>,
    pub queue: u32,
}

impl QueueId {
    pub fn new(topic: impl Into<Arc<str>>, queue: u32) -> QueueId {
        QueueId {
            topic: topic.into(),
            queue,
        }
    }

    /// The queue where a group's messages wait for their `attempt`-th redelivery. Each delay
    /// level has its own queue, so due times rise with offsets within one queue.
    pub fn retry(group: &str, level: u32) -> QueueId {
        QueueId::new(format!("%RETRY%{group}"), level)
    }

    pub fn is_retry(&self) -> bool {
        self.topic.starts_with("%RETRY%")
    }

    pub fn is_dead_letter(&self) -> bool {
        self.topic.starts_with("%DLQ%")
    }

    /// The queue where a group's messages go after `max_reconsume` attempts.
    pub fn dead_letter(group: &str) -> QueueId {
        QueueId::new(format!("%DLQ%{group}"), 0)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.queue)
    }
}

/// A message as a producer sends it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub key: Option<Bytes>,
    pub tags: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub body: Bytes,
}

impl Message {
    pub fn with_body(body: impl Into<Bytes>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    /// Bytes the message occupies, for pull limits.
    pub fn size_bytes(&self) -> usize {
        self.body.len()
            + self.key.as_ref().map_or(0, |k| k.len())
            + self.tags.iter().map(String::len).sum::<usize>()
            + self
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Where a retried message first came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub queue: QueueId,
    pub offset: Offset,
}

/// A message as a queue holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub producer_id: ProducerId,
    pub seq: Seq,
    pub message: Message,
    /// The leader's time when the message was appended.
    pub stored_ms: u64,
    /// How many times a consumer answered `ReconsumeLater` for it.
    pub reconsume_times: u32,
    /// Not before this time may it be delivered (retry queues only).
    pub due_ms: u64,
    /// Set on messages in retry and dead-letter queues.
    pub origin: Option<Origin>,
}

/// A queue's holder as a takeover found it: the member and the generation of its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub member: String,
    pub generation: u64,
}

/// A command in a broker group's Raft log. New variants go last, and a variant's fields never
/// change: postcard numbers variants in order, and logs on disk hold the earlier encodings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates these queues in this group; creating one again is harmless.
    CreateQueues { queues: Vec<QueueId> },
    /// Appends `messages`, which carry the sequence numbers `first_seq..first_seq + n`.
    Append {
        queue: QueueId,
        producer_id: ProducerId,
        first_seq: Seq,
        messages: Vec<Message>,
        stamp_ms: u64,
    },
    /// A consumer group's `Success` for these offsets of `queue`.
    Ack {
        group: String,
        queue: QueueId,
        offsets: Vec<Offset>,
    },
    /// A consumer group's `ReconsumeLater` for the message at `offset` of `queue`.
    ReconsumeLater {
        group: String,
        queue: QueueId,
        offset: Offset,
        stamp_ms: u64,
    },
    /// Applies the retention policy ([`BrokerConfig::retention_ms`],
    /// [`BrokerConfig::retention_bytes`]) at the leader's time `stamp_ms`: every queue, retry
    /// and dead-letter queues included, drops messages from its front, consumed or not (as
    /// Kafka and RocketMQ delete old segments). It is a command in the log, not a timer on each
    /// replica, so every replica drops the same messages at the same index.
    ///
    /// Its outcome is [`Outcome::QueuesCreated`], the outcome of the commands the node proposes
    /// itself (`respond` in the node already tells a client "internal command" for it) rather
    /// than a new variant that every exhaustive match on outcomes would have to learn; what was
    /// dropped shows in [`crate::broker::BrokerState::start_offset`].
    Trim { stamp_ms: u64 },
    /// `member` of consumer group `group` takes `queue` at `generation` (decided by the
    /// metadata leader). Granted if nobody holds the queue and `generation` is not older than
    /// the queue's, if `member` holds it already (its generation moves up), or, with
    /// `takeover`, if `generation` is newer than the holder's and the holder is still the one
    /// `takeover` names: the broker leader proposes a takeover only once that holder's lease
    /// expired, a judgement about that holder alone. Two takeovers decided against one holder
    /// can be in the log at once; the second must not oust the first's winner, who is live.
    /// The lease table is in the log, so a new broker leader knows who holds what.
    Claim {
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        takeover: Option<Holder>,
    },
    /// The holder gives `queue` up: the next claimant need not wait for its lease to expire.
    /// `generation` is the one it last pulled under; nothing up to it may claim again.
    Release {
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
    },
    /// [`Command::Ack`] bound to its delivery: applied only if `member` holds the queue under
    /// the tenure that began at or before `generation`.
    OwnedAck {
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        offsets: Vec<Offset>,
    },
    /// [`Command::ReconsumeLater`] bound to its delivery, like [`Command::OwnedAck`].
    OwnedReconsumeLater {
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        offset: Offset,
        stamp_ms: u64,
    },
    /// An operator moves consumer group `group`'s position on `queue`: every offset below the
    /// target counts as consumed and none at or above it (Kafka's `--reset-offsets`). The
    /// target is clamped to what the queue retains. Refused while a member holds the queue
    /// (it would go on from its own position) unless `force`. This is the one way a committed
    /// consume offset moves backwards, and only on an operator's word.
    Seek {
        group: String,
        queue: QueueId,
        to: SeekTo,
        force: bool,
    },
    /// An operator forgets consumer group `group` in this broker group: its offsets and
    /// queue leases. Refused while a member holds one of its queues unless `force`. The
    /// group's retry and dead-letter queues keep their messages (retention deletes them).
    DeleteGroup { group: String, force: bool },
    /// An operator moves up to `messages_max` of consumer group `group`'s dead-lettered
    /// messages (from the group's position on its dead-letter queue on) back to its first
    /// retry queue, due after the first redelivery delay, with their redelivery count reset:
    /// the group's members consume them again. Each message is copied and acknowledged in the
    /// dead-letter queue by this one command, so a message is in exactly one of the two
    /// queues whatever happens around it (a redrive stopped half way leaves the rest where
    /// they were).
    Redrive {
        group: String,
        messages_max: u32,
        stamp_ms: u64,
    },
    /// Creates each queue at the epoch of its topic's incarnation in the topic table (see
    /// [`TopicMark`]): not if this group dropped that topic at that epoch or later (a leader
    /// whose copy of the table lags behind a deletion proposes such creations), and replacing
    /// the topic's queues here if they are of an older epoch. Creating one again is harmless.
    CreateQueuesAt { queues: Vec<(u64, QueueId)> },
    /// The topic table deleted `topic`'s incarnation `epoch`: every queue of it here goes, with
    /// its messages and every consumer group's offsets and leases on it, unless the queues
    /// here are of a newer incarnation. Remembered ([`TopicMark`]), so that a creation of
    /// that incarnation arriving late changes nothing.
    DropTopic { topic: String, epoch: u64 },
    /// The broker leader found these consumer groups without a live member for longer than
    /// its group retention (Kafka's `offsets.retention.minutes` for empty groups): their
    /// offsets and leases go. The leader's judgement travels in the command, so every
    /// replica forgets the same groups.
    ExpireGroups { groups: Vec<String> },
    /// [`Command::Claim`] with the member's number for this tenure of the queue, which it
    /// counts up each time it takes a queue (again): a claim by another member, or of a
    /// released queue, records it; the holder's own claims raise it, never lower it (a pull
    /// from an earlier tenure may arrive late). [`Command::Claim`] is this with tenure 0.
    ClaimTenure {
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        takeover: Option<Holder>,
        tenure: u64,
    },
    /// [`Command::Release`] naming the tenure it ends: refused if the holder's tenure is
    /// newer. A member may release a queue, be given it back at the same generation and
    /// claim it again while its release's first copy is still held back by the network; that
    /// copy, applied late, would otherwise strip the new tenure and let another member be
    /// served while this one still consumes (queue seed 612008318 on 243ad3e,
    /// exclusive-owner). [`Command::Release`] is this with tenure 0.
    ReleaseTenure {
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        tenure: u64,
    },
}

/// What a broker group knows of a topic's incarnation: the epoch of its queues here, and
/// whether that incarnation was dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMark {
    pub epoch: u64,
    pub dropped: bool,
}

/// Where [`Command::Seek`] moves a group's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeekTo {
    /// The oldest message the queue retains: everything is consumed again.
    Earliest,
    /// The queue's end: everything there now counts as consumed.
    Latest,
    /// This offset (clamped to the retained range).
    Offset(Offset),
    /// The first retained message stored at or after this time (milliseconds since the Unix
    /// epoch, as the leader that appended it stamped it); the end if none was. New variants go
    /// last: postcard numbers them in order.
    Time(u64),
}

/// Who holds a queue for a consumer group, as the broker group's log decided it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// `None` once released (or never claimed).
    pub owner: Option<String>,
    /// The oldest generation that may still claim or pull the queue: the highest it was
    /// claimed at, or the one after the generation it was released at.
    pub generation: u64,
    /// The generation at which the current owner's tenure began: its answers from before it
    /// (an earlier tenure, perhaps before someone else held the queue) are refused.
    pub since: u64,
    /// The owner's own number for its current tenure of the queue (see
    /// [`Command::ClaimTenure`]); 0 for claims logged before members numbered their tenures.
    pub tenure: u64,
}

/// What applying a command did; handed back to whoever proposed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A `CreateQueues` or a `Trim` was applied.
    QueuesCreated,
    /// A `Claim` or `Release` was applied; the queue's lease is now this.
    Leased(Lease),
    /// The batch sits at `base_offset..base_offset + n` of `queue`. `duplicate` means this was
    /// a retry of a batch already written, and these are its original place (the retry may
    /// have named another queue of this group).
    Appended {
        queue: QueueId,
        base_offset: Offset,
        duplicate: bool,
    },
    Acked {
        consume_offset: Offset,
    },
    /// The message went to the retry queue (or the dead-letter queue) at `offset`.
    Requeued {
        to: QueueId,
        offset: Offset,
        dead_letter: bool,
    },
    /// A [`Command::Seek`] set the group's consume offset to `consume_offset`.
    Sought {
        consume_offset: Offset,
    },
    /// A [`Command::DeleteGroup`] removed this many queue positions and leases.
    GroupDeleted {
        offsets: u64,
        leases: u64,
    },
    Refused(Refusal),
    /// A [`Command::Redrive`] moved `moved` messages; `remaining` still wait in the
    /// dead-letter queue.
    Redriven {
        moved: u64,
        remaining: u64,
    },
}

/// Why a command changed nothing. Every one is definitive: nothing was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownQueue(QueueId),
    EmptyBatch,
    /// The batch's sequence numbers are older than the dedup window remembers, so a retry
    /// can no longer be told from a new message.
    SequenceTooOld {
        producer_id: ProducerId,
        seq: Seq,
    },
    /// Part of the batch was written before under other sequence numbers' batch boundaries.
    SequenceOverlap {
        producer_id: ProducerId,
        seq: Seq,
    },
    /// The batch's sequence numbers would run past `Seq::MAX`.
    SequenceOverflow {
        producer_id: ProducerId,
        seq: Seq,
    },
    NoSuchOffset {
        queue: QueueId,
        offset: Offset,
    },
    /// The command did not decode: a corrupt or foreign entry.
    Malformed(String),
    /// An operator's command on a consumer group while `member` holds `queue` for it.
    GroupActive {
        group: String,
        queue: QueueId,
        member: String,
    },
    /// An answer, claim or release from a member that does not hold the queue (or holds it
    /// under a newer tenure than the one the request speaks for).
    NotOwner(Box<NotOwner>),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownQueue(q) => write!(f, "unknown queue {q}"),
            Refusal::EmptyBatch => write!(f, "empty batch"),
            Refusal::SequenceTooOld { producer_id, seq } => write!(
                f,
                "producer {producer_id} seq {seq} is older than the dedup window"
            ),
            Refusal::SequenceOverlap { producer_id, seq } => write!(
                f,
                "producer {producer_id} seq {seq} was written in a different batch"
            ),
            Refusal::SequenceOverflow { producer_id, seq } => write!(
                f,
                "producer {producer_id} seq {seq}: the batch runs past the largest sequence number"
            ),
            Refusal::NoSuchOffset { queue, offset } => write!(f, "no offset {offset} in {queue}"),
            Refusal::Malformed(why) => write!(f, "malformed command: {why}"),
            Refusal::GroupActive {
                group,
                queue,
                member,
            } => write!(
                f,
                "consumer group {group} is in use: member {member} holds {queue} (stop its \
                 consumers first, or force it)"
            ),
            Refusal::NotOwner(n) => match &n.lease.owner {
                Some(owner) => write!(
                    f,
                    "{} (generation {}) does not hold {} for group {}: \
                     {owner} does since generation {} (queue generation {})",
                    n.member, n.generation, n.queue, n.group, n.lease.since, n.lease.generation
                ),
                None => write!(
                    f,
                    "{} (generation {}) does not hold {} for group {}: \
                     nobody does (queue generation {})",
                    n.member, n.generation, n.queue, n.group, n.lease.generation
                ),
            },
        }
    }
}

/// Who asked for a queue it does not hold, and who does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotOwner {
    pub group: String,
    pub queue: QueueId,
    pub member: String,
    pub generation: u64,
    pub lease: Lease,
}

impl Refusal {
    /// `member`, speaking for `generation`, does not hold `queue` as `lease` says.
    pub fn not_owner(
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        lease: Lease,
    ) -> Refusal {
        Refusal::NotOwner(Box::new(NotOwner {
            group,
            queue,
            member,
            generation,
            lease,
        }))
    }
}

/// How a broker group treats consumer failures and how long it keeps messages. Applying
/// commands depends on it, so every replica of a group must have the same one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Delay before the n-th redelivery is `reconsume_delays_ms[min(n, len) - 1]`.
    pub reconsume_delays_ms: Vec<u64>,
    /// After this many `ReconsumeLater`, a message goes to the dead-letter queue.
    pub max_reconsume: u32,
    /// A [`Command::Trim`] stamped `t` drops a queue's oldest message while
    /// `stored_ms + retention_ms <= t` (Kafka's `retention.ms`, RocketMQ's
    /// `fileReservedTime`). "Oldest" is the lowest offset: retention only ever cuts the front,
    /// so a message stamped by a leader whose clock lagged keeps the ones behind it a little
    /// longer. A message in a retry or dead-letter queue ages from when it was moved there.
    /// `None` keeps messages whatever their age.
    pub retention_ms: Option<u64>,
    /// A [`Command::Trim`] drops a queue's oldest messages while the queue's retained
    /// [`Message::size_bytes`] exceed this (Kafka's `retention.bytes`, per queue as Kafka's is
    /// per partition), down to at or under the limit, but it never drops the newest message:
    /// as Kafka never deletes the active segment, the latest write stays readable until age
    /// retention or a newer write takes it. `None` sets no size limit.
    pub retention_bytes: Option<u64>,
    /// The newest messages of the group, up to about this many bytes
    /// ([`Message::size_bytes`]), stay in memory to serve consumers that keep up without a
    /// read of the queue store; the rest of the retained messages live only there.
    pub cache_bytes_max: u64,
    /// A planted bug; effective only with the `canaries` feature.
    pub canary: Option<crate::raft::Canary>,
}

impl Default for BrokerConfig {
    /// RocketMQ's delay levels from 1 s to 2 h, 16 attempts, and its 72 hours of retention
    /// with no size limit.
    fn default() -> Self {
        const S: u64 = 1_000;
        const M: u64 = 60 * S;
        BrokerConfig {
            reconsume_delays_ms: vec![
                S,
                5 * S,
                10 * S,
                30 * S,
                M,
                2 * M,
                3 * M,
                4 * M,
                5 * M,
                6 * M,
                7 * M,
                8 * M,
                9 * M,
                10 * M,
                20 * M,
                30 * M,
                60 * M,
                120 * M,
            ],
            max_reconsume: 16,
            retention_ms: Some(72 * 60 * M),
            retention_bytes: None,
            cache_bytes_max: CACHE_BYTES_DEFAULT,
            canary: None,
        }
    }
}

/// The default of [`BrokerConfig::cache_bytes_max`].
pub const CACHE_BYTES_DEFAULT: u64 = 64 << 20;

impl BrokerConfig {
    /// The delay level (0-based) of redelivery number `attempt` (1 for the first).
    pub fn reconsume_level(&self, attempt: u32) -> u32 {
        let levels = self.reconsume_delays_ms.len().max(1) as u32;
        attempt.clamp(1, levels) - 1
    }

    pub fn reconsume_delay_ms(&self, attempt: u32) -> u64 {
        let level = self.reconsume_level(attempt) as usize;
        self.reconsume_delays_ms.get(level).copied().unwrap_or(0)
    }
}

/// What one pull returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pulled {
    pub messages: Vec<(Offset, StoredMessage)>,
    /// Where the next pull should start.
    pub next_offset: Offset,
}

/// How a pull is served: from the cache at once, or by reading these offsets from the queue
/// store first (then [`crate::broker::BrokerState::finish_pull`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullPlan {
    Ready(Pulled),
    Read {
        offsets: Vec<Offset>,
        next_offset: Offset,
    },
}
