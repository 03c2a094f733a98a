//! The `broker` target: the broker state machine fed arbitrary command sequences, checked
//! against a reference model written from the contract rather than from the code.
//!
//! Commands reach [`BrokerState`] as bytes, the way they come out of the Raft log. Most are
//! built from a structured description (appends with `(producer, seq)` pairs, retries of
//! earlier batches, pulls, acks and `ReconsumeLater`, retention trims under small age and size
//! limits, clock advances and skew); raw bytes are decoded as commands too, and whatever
//! decodes is checked against the model like the rest. Now and then the state is replaced by
//! the one restored from its snapshot (as a replica restores after log compaction), and
//! everything after must still match the model. The metadata group's state machine gets raw
//! and structured `CreateTopic`s on the side.

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use holdfast_core::broker::{
    BrokerConfig, BrokerState, CACHE_BYTES_DEFAULT, Command, DEDUP_WINDOW_SEQS, Holder, Lease,
    MemoryStore, Message, Offset, Origin, Outcome, ProducerId, PullPlan, QueueId, Refusal, Seq,
    StoredMessage, decode_command, decode_record, encode_command,
};
use holdfast_core::node::{
    MetaCommand, MetaState, QUEUES_PER_TOPIC_MAX, TopicApplied, decode_entry,
};
use holdfast_core::raft::{EntryKind, GroupId};

const TOPIC: &str = "orders";
const GROUPS: [&str; 2] = ["billing", "audit"];
const PRODUCERS: u64 = 3;
/// More operations than this in one input are ignored: they only slow the fuzzer down.
const OPS_MAX: usize = 512;

#[derive(Arbitrary, Debug)]
struct Setup {
    /// `% 4` delay levels from `delays_ms`.
    levels: u8,
    delays_ms: [u16; 3],
    /// `% 5`.
    max_reconsume: u8,
    /// `% 3 + 1` queues of the topic exist from the start.
    queues: u8,
    /// Small limits, so that trims drop messages within a run.
    retention_ms: Option<u16>,
    retention_bytes: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Append {
        queue: u8,
        producer: u8,
        seq: SeqChoice,
        /// `% 5` messages (none is refused).
        count: u8,
        body: u8,
    },
    /// A producer's retry of an earlier batch, to the same queue or another one.
    Retry {
        batch: u8,
        queue: Option<u8>,
    },
    Pull {
        group: bool,
        queue: QueueChoice,
        from: FromChoice,
        messages_max: u8,
        bytes_max: u16,
    },
    Ack {
        group: bool,
        queue: QueueChoice,
        offsets: Vec<u8>,
    },
    /// Acks the messages of the group's last pull that `mask` selects (bit i, cycled).
    AckPulled {
        group: bool,
        mask: u8,
    },
    ReconsumeLater {
        group: bool,
        queue: QueueChoice,
        offset: u8,
    },
    /// `ReconsumeLater` for one message of the group's last pull.
    NackPulled {
        group: bool,
        pick: u8,
    },
    Advance {
        ms: u16,
    },
    /// Another leader's clock: stamps from now on are this far behind the true time.
    Skew {
        behind_ms: u16,
    },
    CreateQueue {
        queue: u8,
    },
    /// Bytes from a log entry: whatever decodes is applied and checked like any command.
    Raw(Vec<u8>),
    /// The last command's bytes with one byte changed (and maybe cut short there): mostly
    /// still a command, with values no client would choose.
    Mutate {
        at: u8,
        value: u8,
        cut: bool,
    },
    /// A metadata-group entry's bytes, applied to the topic table.
    Meta {
        raw: Vec<u8>,
        groups: u8,
    },
    CreateTopic {
        name: u8,
        queues: u16,
        groups: u8,
    },
    /// Retention at the leader's time.
    Trim,
    /// Replaces the state by the one restored from its snapshot, after checking that the
    /// snapshot cut short or with one bit flipped (at `damage`) is refused.
    Snapshot {
        damage: u16,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum QueueChoice {
    Topic(u8),
    Retry(u8),
    DeadLetter,
    Unknown,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FromChoice {
    /// Where the group's last pull of this queue said to continue.
    Resume,
    At(u8),
    Far(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SeqChoice {
    /// Right after the producer's highest sequence number so far.
    Next,
    Small(u8),
    /// Far enough to slide the dedup window.
    Far(u16),
    Any(u64),
}

/// What one run reached; used by the corpus test to show the corpus is not trivial.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokerStats {
    pub ops: usize,
    pub appended: usize,
    pub duplicates: usize,
    pub refused: usize,
    pub pulled: usize,
    pub acked: usize,
    pub requeued: usize,
    pub dead_lettered: usize,
    pub raw_decoded: usize,
    pub topics_created: usize,
    /// Trims that dropped something, and the messages they dropped.
    pub trims: usize,
    pub trimmed: usize,
    /// States replaced by their restored snapshot.
    pub restores: usize,
    /// Lease commands (claims, releases, owned acks and requeues) the broker applied or
    /// refused as the model did.
    pub lease_commands: usize,
}

/// A batch as the model remembers it.
#[derive(Clone, Debug)]
struct Batch {
    len: u64,
    queue: QueueId,
    base_offset: Offset,
}

/// The reference model: what the broker must do, stated as plainly as possible.
struct Model {
    config: BrokerConfig,
    /// Every message ever written, at its offset: retention only raises `starts`.
    queues: BTreeMap<QueueId, Vec<StoredMessage>>,
    /// Each queue's first retained offset (0 if absent).
    starts: BTreeMap<QueueId, Offset>,
    /// Every batch ever written, by producer and first sequence number.
    batches: BTreeMap<ProducerId, BTreeMap<Seq, Batch>>,
    seq_max: BTreeMap<ProducerId, Seq>,
    acked: BTreeMap<(String, QueueId), BTreeSet<Offset>>,
    /// Who holds each queue for each consumer group (see [`Model::claim`]).
    leases: BTreeMap<(String, QueueId), Lease>,
}

/// The lowest offset from `start` on that is not in `acked`: every offset below the start
/// was dropped by retention and counts as consumed.
fn lowest_unacked(acked: Option<&BTreeSet<Offset>>, start: Offset) -> Offset {
    let mut offset = start;
    if let Some(acked) = acked {
        while acked.contains(&offset) {
            offset += 1;
        }
    }
    offset
}

impl Model {
    fn start(&self, queue: &QueueId) -> Offset {
        self.starts.get(queue).copied().unwrap_or(0)
    }

    fn consume_offset(&self, group: &str, queue: &QueueId) -> Offset {
        lowest_unacked(
            self.acked.get(&(group.to_string(), queue.clone())),
            self.start(queue),
        )
    }

    fn is_acked(&self, group: &str, queue: &QueueId, offset: Offset) -> bool {
        offset < self.start(queue)
            || self
                .acked
                .get(&(group.to_string(), queue.clone()))
                .is_some_and(|a| a.contains(&offset))
    }

    /// Where each queue would start after a trim stamped `stamp_ms`: from the front, drop a
    /// message while it is at least `retention_ms` old, or while the retained bytes are over
    /// `retention_bytes` and it is not the newest.
    fn trimmed_starts(&self, stamp_ms: u64) -> BTreeMap<QueueId, Offset> {
        let mut starts = BTreeMap::new();
        for (queue, log) in &self.queues {
            let mut start = self.start(queue) as usize;
            let mut bytes: u64 = log[start..]
                .iter()
                .map(|m| m.message.size_bytes() as u64)
                .sum();
            while let Some(oldest) = log.get(start) {
                let too_old = self
                    .config
                    .retention_ms
                    .is_some_and(|keep| oldest.stored_ms.saturating_add(keep) <= stamp_ms);
                let too_big = self
                    .config
                    .retention_bytes
                    .is_some_and(|limit| bytes > limit && start + 1 < log.len());
                if !too_old && !too_big {
                    break;
                }
                bytes -= oldest.message.size_bytes() as u64;
                start += 1;
            }
            starts.insert(queue.clone(), start as Offset);
        }
        starts
    }

    /// A member's claim of a queue for its consumer group, at `generation` (the consumer
    /// group's generation the metadata gave it the queue at). Only a queue that exists (or a
    /// retry queue of a configured level, which exists from its first message) can be
    /// claimed. It is granted if `generation` is not older than the lease's, and the queue is
    /// free, or already the member's, or taken over from its exact holder (member and
    /// generation) at a newer generation. A member's tenure begins at the generation it
    /// claimed a queue it did not hold; its number is `tenure` then, and the highest the
    /// holder claimed under while it holds.
    fn claim(
        &mut self,
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        takeover: Option<Holder>,
        tenure: u64,
    ) -> Outcome {
        let configured_retry =
            queue.is_retry() && (queue.queue as usize) < self.config.reconsume_delays_ms.len();
        if !self.queues.contains_key(&queue) && !configured_retry {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        }
        let key = (group, queue);
        let lease = self.leases.get(&key).cloned().unwrap_or_default();
        let granted = generation >= lease.generation
            && match &lease.owner {
                None => true,
                Some(owner) if *owner == member => true,
                Some(owner) => takeover.is_some_and(|from| {
                    from.member == *owner
                        && from.generation == lease.generation
                        && generation > lease.generation
                }),
            };
        if !granted {
            let (group, queue) = key;
            return Outcome::Refused(Refusal::not_owner(group, queue, member, generation, lease));
        }
        let (since, tenure) = match &lease.owner {
            Some(owner) if *owner == member => (lease.since, lease.tenure.max(tenure)),
            _ => (generation, tenure),
        };
        let lease = Lease {
            owner: Some(member),
            generation,
            since,
            tenure,
        };
        self.leases.insert(key, lease.clone());
        Outcome::Leased(lease)
    }

    /// Whether `member` holds `queue` and speaks for its current tenure: answers from before
    /// it (an older generation) are refused, whatever they say.
    fn holder_check(
        &self,
        group: &str,
        queue: &QueueId,
        member: &str,
        generation: u64,
    ) -> Result<(), Outcome> {
        let lease = self
            .leases
            .get(&(group.to_string(), queue.clone()))
            .cloned()
            .unwrap_or_default();
        if lease.owner.as_deref() == Some(member) && generation >= lease.since {
            return Ok(());
        }
        Err(Outcome::Refused(Refusal::not_owner(
            group.to_string(),
            queue.clone(),
            member.to_string(),
            generation,
            lease,
        )))
    }

    /// The holder gives the queue up; nobody may claim it at an older generation than the
    /// one it gave it up at. Not from an earlier tenure than the holder's.
    fn release(
        &mut self,
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        tenure: u64,
    ) -> Outcome {
        if let Err(refused) = self.holder_check(&group, &queue, &member, generation) {
            return refused;
        }
        let key = (group, queue);
        let lease = self.leases.entry(key.clone()).or_default();
        if tenure < lease.tenure {
            let (group, queue) = key;
            return Outcome::Refused(Refusal::not_owner(
                group,
                queue,
                member,
                generation,
                lease.clone(),
            ));
        }
        lease.owner = None;
        lease.generation = lease.generation.max(generation);
        Outcome::Leased(lease.clone())
    }

    fn trim(&mut self, stamp_ms: u64) -> Outcome {
        self.starts = self.trimmed_starts(stamp_ms);
        Outcome::QueuesCreated
    }

    /// The window remembers a batch while its last sequence number is at least
    /// `seq_max - DEDUP_WINDOW_SEQS` (sequence numbers up to that one are too old to write).
    fn remembered(&self, producer_id: ProducerId, last_seq: Seq) -> bool {
        let seq_max = self.seq_max.get(&producer_id).copied().unwrap_or(0);
        seq_max < DEDUP_WINDOW_SEQS || last_seq >= seq_max - DEDUP_WINDOW_SEQS
    }

    fn append(
        &mut self,
        queue: QueueId,
        producer_id: ProducerId,
        first_seq: Seq,
        messages: Vec<Message>,
        stamp_ms: u64,
    ) -> Outcome {
        if messages.is_empty() {
            return Outcome::Refused(Refusal::EmptyBatch);
        }
        if !self.queues.contains_key(&queue) {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        }
        let len = messages.len() as u64;
        let Some(last_seq) = first_seq.checked_add(len - 1) else {
            return Outcome::Refused(Refusal::SequenceOverflow {
                producer_id,
                seq: first_seq,
            });
        };
        let batches = self.batches.entry(producer_id).or_default().clone();
        // A retry of a batch the window remembers gets the batch's original place.
        if let Some(batch) = batches.get(&first_seq)
            && batch.len == len
            && self.remembered(producer_id, last_seq)
        {
            return Outcome::Appended {
                queue: batch.queue.clone(),
                base_offset: batch.base_offset,
                duplicate: true,
            };
        }
        // Sharing a sequence number with a remembered batch, other than as its exact retry.
        let overlaps = batches.iter().any(|(&first, b)| {
            let last = first + (b.len - 1);
            first <= last_seq && last >= first_seq && self.remembered(producer_id, last)
        });
        if overlaps {
            return Outcome::Refused(Refusal::SequenceOverlap {
                producer_id,
                seq: first_seq,
            });
        }
        let seq_max = self.seq_max.get(&producer_id).copied().unwrap_or(0);
        if seq_max >= DEDUP_WINDOW_SEQS && first_seq <= seq_max - DEDUP_WINDOW_SEQS {
            return Outcome::Refused(Refusal::SequenceTooOld {
                producer_id,
                seq: first_seq,
            });
        }
        let log = self.queues.entry(queue.clone()).or_default();
        let base_offset = log.len() as Offset;
        for (seq, message) in (first_seq..=last_seq).zip(messages) {
            log.push(StoredMessage {
                producer_id,
                seq,
                message,
                stored_ms: stamp_ms,
                reconsume_times: 0,
                due_ms: 0,
                origin: None,
            });
        }
        self.batches.entry(producer_id).or_default().insert(
            first_seq,
            Batch {
                len,
                queue: queue.clone(),
                base_offset,
            },
        );
        let seq_max = self.seq_max.entry(producer_id).or_default();
        *seq_max = (*seq_max).max(last_seq);
        Outcome::Appended {
            queue,
            base_offset,
            duplicate: false,
        }
    }

    fn ack(&mut self, group: String, queue: QueueId, offsets: Vec<Offset>) -> Outcome {
        let Some(len) = self.queues.get(&queue).map(|log| log.len() as Offset) else {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        };
        if let Some(&offset) = offsets.iter().find(|&&o| o >= len) {
            return Outcome::Refused(Refusal::NoSuchOffset { queue, offset });
        }
        let start = self.start(&queue);
        let acked = self.acked.entry((group, queue)).or_default();
        acked.extend(offsets);
        Outcome::Acked {
            consume_offset: lowest_unacked(Some(acked), start),
        }
    }

    fn reconsume_later(
        &mut self,
        group: String,
        queue: QueueId,
        offset: Offset,
        stamp_ms: u64,
    ) -> Outcome {
        let Some(stored) = self
            .queues
            .get(&queue)
            .and_then(|log| log.get(usize::try_from(offset).ok()?))
            .cloned()
        else {
            return Outcome::Refused(Refusal::NoSuchOffset { queue, offset });
        };
        let start = self.start(&queue);
        let acked = self
            .acked
            .entry((group.clone(), queue.clone()))
            .or_default();
        // The consumer asked again (requeued once only), or the message is gone: retention
        // dropped it, and a dropped message counts as consumed.
        if acked.contains(&offset) || offset < start {
            return Outcome::Acked {
                consume_offset: lowest_unacked(Some(acked), start),
            };
        }
        acked.insert(offset);
        let attempt = stored.reconsume_times + 1;
        let dead_letter = attempt > self.config.max_reconsume;
        let delays = &self.config.reconsume_delays_ms;
        let level = attempt.min(delays.len().max(1) as u32) - 1;
        let (to, due_ms) = if dead_letter {
            (QueueId::new(format!("%DLQ%{group}"), 0), stamp_ms)
        } else {
            let delay_ms = delays.get(level as usize).copied().unwrap_or(0);
            (
                QueueId::new(format!("%RETRY%{group}"), level),
                stamp_ms.saturating_add(delay_ms),
            )
        };
        let origin = stored.origin.clone().unwrap_or(Origin {
            queue: queue.clone(),
            offset,
        });
        let log = self.queues.entry(to.clone()).or_default();
        log.push(StoredMessage {
            reconsume_times: attempt,
            due_ms,
            origin: Some(origin),
            stored_ms: stamp_ms,
            ..stored
        });
        Outcome::Requeued {
            to,
            offset: log.len() as Offset - 1,
            dead_letter,
        }
    }

    fn apply(&mut self, command: Command) -> Outcome {
        match command {
            Command::CreateQueues { queues } => {
                for queue in queues {
                    self.queues.entry(queue).or_default();
                }
                Outcome::QueuesCreated
            }
            Command::Append {
                queue,
                producer_id,
                first_seq,
                messages,
                stamp_ms,
            } => self.append(queue, producer_id, first_seq, messages, stamp_ms),
            Command::Ack {
                group,
                queue,
                offsets,
            } => self.ack(group, queue, offsets),
            Command::ReconsumeLater {
                group,
                queue,
                offset,
                stamp_ms,
            } => self.reconsume_later(group, queue, offset, stamp_ms),
            Command::Trim { stamp_ms } => self.trim(stamp_ms),
            Command::Claim {
                group,
                queue,
                member,
                generation,
                takeover,
            } => self.claim(group, queue, member, generation, takeover, 0),
            Command::ClaimTenure {
                group,
                queue,
                member,
                generation,
                takeover,
                tenure,
            } => self.claim(group, queue, member, generation, takeover, tenure),
            Command::Release {
                group,
                queue,
                member,
                generation,
            } => self.release(group, queue, member, generation, 0),
            Command::ReleaseTenure {
                group,
                queue,
                member,
                generation,
                tenure,
            } => self.release(group, queue, member, generation, tenure),
            Command::OwnedAck {
                group,
                queue,
                member,
                generation,
                offsets,
            } => match self.holder_check(&group, &queue, &member, generation) {
                Err(refused) => refused,
                Ok(()) => self.ack(group, queue, offsets),
            },
            Command::OwnedReconsumeLater {
                group,
                queue,
                member,
                generation,
                offset,
                stamp_ms,
            } => match self.holder_check(&group, &queue, &member, generation) {
                Err(refused) => refused,
                Ok(()) => self.reconsume_later(group, queue, offset, stamp_ms),
            },
            // Nor the operator's seek and delete, which move offsets back by design.
            Command::Seek { .. }
            | Command::DeleteGroup { .. }
            | Command::Redrive { .. }
            | Command::DropTopic { .. }
            | Command::ExpireGroups { .. }
            | Command::CreateQueuesAt { .. } => {
                Outcome::Refused(Refusal::Malformed("admin commands are not modelled".into()))
            }
        }
    }
}

/// The driver: the state under test, the model, and what the clients saw.
struct Broker {
    state: BrokerState,
    /// Where the state's message bytes go (group 0).
    store: MemoryStore,
    model: Model,
    topic_queues: u32,
    now_ms: u64,
    behind_ms: u64,
    /// Every Append sent, for retries.
    sent: Vec<(ProducerId, Seq, Vec<Message>)>,
    /// The bytes of the last command applied, for `Op::Mutate`.
    last_bytes: Vec<u8>,
    /// Each group's last pull: the queue and the offsets handed out.
    last_pull: BTreeMap<&'static str, (QueueId, Vec<Offset>)>,
    /// Where each group's last pull of each queue said to continue.
    resume: BTreeMap<(&'static str, QueueId), Offset>,
    /// The consume offsets seen so far: they must never move back.
    consume: BTreeMap<(String, QueueId), Offset>,
    meta: MetaState,
    topics: BTreeMap<String, u32>,
    stats: BrokerStats,
}

impl Broker {
    fn new(setup: &Setup) -> Broker {
        let levels = usize::from(setup.levels % 4);
        let config = BrokerConfig {
            reconsume_delays_ms: setup.delays_ms[..levels]
                .iter()
                .map(|&d| u64::from(d))
                .collect(),
            max_reconsume: u32::from(setup.max_reconsume % 5),
            retention_ms: setup.retention_ms.map(u64::from),
            retention_bytes: setup.retention_bytes.map(u64::from),
            // From bits `levels % 4` leaves alone, so that inputs keep their meaning: no cache
            // (every pull and requeue goes through the store), a few messages, or all of them.
            cache_bytes_max: [0, 16, 64, CACHE_BYTES_DEFAULT][usize::from(setup.levels >> 2) % 4],
            canary: None,
        };
        let mut broker = Broker {
            state: BrokerState::new(config.clone()),
            store: MemoryStore::default(),
            model: Model {
                config,
                queues: BTreeMap::new(),
                starts: BTreeMap::new(),
                batches: BTreeMap::new(),
                seq_max: BTreeMap::new(),
                acked: BTreeMap::new(),
                leases: BTreeMap::new(),
            },
            topic_queues: u32::from(setup.queues % 3) + 1,
            now_ms: 0,
            behind_ms: 0,
            sent: Vec::new(),
            last_bytes: Vec::new(),
            last_pull: BTreeMap::new(),
            resume: BTreeMap::new(),
            consume: BTreeMap::new(),
            meta: MetaState::default(),
            topics: BTreeMap::new(),
            stats: BrokerStats::default(),
        };
        let queues = (0..broker.topic_queues)
            .map(|q| QueueId::new(TOPIC, q))
            .collect();
        broker.command(Command::CreateQueues { queues });
        broker
    }

    fn stamp(&self) -> u64 {
        self.now_ms.saturating_sub(self.behind_ms)
    }

    fn queue(&self, choice: QueueChoice, group: &str) -> QueueId {
        match choice {
            // One beyond the topic's queues: usually unknown.
            QueueChoice::Topic(q) => QueueId::new(TOPIC, u32::from(q) % (self.topic_queues + 1)),
            QueueChoice::Retry(level) => QueueId::retry(group, u32::from(level % 4)),
            QueueChoice::DeadLetter => QueueId::dead_letter(group),
            QueueChoice::Unknown => QueueId::new("nope", 0),
        }
    }

    /// Applies `command` as a log entry's bytes and checks the outcome against the model.
    fn command(&mut self, command: Command) -> Outcome {
        let bytes = encode_command(&command);
        assert_eq!(
            decode_command(&bytes).as_ref(),
            Ok(&command),
            "a command does not survive the codec"
        );
        self.last_bytes = bytes.to_vec();
        self.apply_checked(&bytes, Some(command))
    }

    fn apply_checked(&mut self, bytes: &[u8], command: Option<Command>) -> Outcome {
        let lease_command = matches!(
            command,
            Some(
                Command::Claim { .. }
                    | Command::Release { .. }
                    | Command::ClaimTenure { .. }
                    | Command::ReleaseTenure { .. }
                    | Command::OwnedAck { .. }
                    | Command::OwnedReconsumeLater { .. }
            )
        );
        let expected = match command {
            Some(command) => self.model.apply(command),
            None => Outcome::Refused(Refusal::Malformed(String::new())),
        };
        let outcome = self.state.apply_bytes(bytes);
        if let Err(e) = self.state.check_invariants_fully() {
            panic!("the broker state breaks its invariants after {outcome:?}: {e}");
        }
        self.sync_store();
        match (&expected, &outcome) {
            (Outcome::Refused(Refusal::Malformed(_)), Outcome::Refused(Refusal::Malformed(_))) => {}
            _ => assert_eq!(outcome, expected, "the broker disagrees with the model"),
        }
        if lease_command {
            self.stats.lease_commands += 1;
        }
        match &outcome {
            Outcome::Appended {
                duplicate: false, ..
            } => self.stats.appended += 1,
            Outcome::Appended {
                duplicate: true, ..
            } => self.stats.duplicates += 1,
            Outcome::Acked { .. } => self.stats.acked += 1,
            Outcome::Requeued {
                dead_letter: false, ..
            } => self.stats.requeued += 1,
            Outcome::Requeued {
                dead_letter: true, ..
            } => self.stats.dead_lettered += 1,
            Outcome::Refused(_) => self.stats.refused += 1,
            Outcome::QueuesCreated
            | Outcome::Leased(_)
            | Outcome::Sought { .. }
            | Outcome::GroupDeleted { .. }
            | Outcome::Redriven { .. } => {}
        }
        self.check_queues_and_offsets();
        outcome
    }

    /// Every queue has the model's start and end offsets; no consume offset moves back, and
    /// each is the lowest offset from the queue's start on that its group has not
    /// acknowledged.
    fn check_queues_and_offsets(&mut self) {
        type Range = (QueueId, Option<Offset>, Option<Offset>);
        let queues: Vec<Range> = self
            .state
            .queues()
            .map(|q| {
                (
                    q.clone(),
                    self.state.start_offset(q),
                    self.state.queue_len(q),
                )
            })
            .collect();
        let expected: Vec<Range> = self
            .model
            .queues
            .iter()
            .map(|(q, log)| {
                let start = self.model.start(q);
                (q.clone(), Some(start), Some(log.len() as Offset))
            })
            .collect();
        assert_eq!(queues, expected, "queues differ from the model");

        let tracked: Vec<(String, QueueId, Offset)> = self
            .state
            .consume_offsets()
            .map(|(g, q, o)| (g.to_string(), q.clone(), o))
            .collect();
        let expected: Vec<(String, QueueId, Offset)> = self
            .model
            .acked
            .iter()
            .map(|((g, q), acked)| {
                let start = self.model.start(q);
                (g.clone(), q.clone(), lowest_unacked(Some(acked), start))
            })
            .collect();
        assert_eq!(tracked, expected, "consume offsets differ from the model");
        let leases: Vec<_> = self.state.leases().collect();
        let expected: Vec<_> = self.model.leases.iter().collect();
        assert_eq!(leases, expected, "leases differ from the model");
        for (group, queue, offset) in tracked {
            assert_eq!(self.state.consume_offset(&group, &queue), offset);
            let before = self.consume.insert((group, queue.clone()), offset);
            assert!(
                before.is_none_or(|b| b <= offset),
                "the consume offset of {queue} moved back from {before:?} to {offset}"
            );
        }
    }

    /// Pulls and checks the result against the contract: only unacknowledged messages the
    /// queue holds, ascending from the start, none skipped, within the limits, due ones only
    /// in a retry queue, and the pull stops early only for a reason.
    fn pull(
        &mut self,
        group: &'static str,
        queue: QueueId,
        from: Offset,
        messages_max: usize,
        bytes_max: usize,
    ) {
        let now_ms = self.now_ms;
        let result = self
            .state
            .plan_pull(group, &queue, from, messages_max, bytes_max, now_ms)
            .map(|plan| match plan {
                PullPlan::Ready(pulled) => pulled,
                PullPlan::Read {
                    offsets,
                    next_offset,
                } => {
                    let (records, error) = self.store.read(0, &queue, &offsets);
                    assert_eq!(error, None, "the store lacks a message to pull");
                    let read = offsets
                        .iter()
                        .zip(&records)
                        .map(|(o, r)| decode_record(r, *o).expect("a stored record reads back"))
                        .collect();
                    self.state
                        .finish_pull(group, &queue, &offsets, next_offset, read)
                }
            });
        let exists = self.model.queues.contains_key(&queue);
        let Ok(pulled) = result else {
            assert!(
                !exists && !queue.is_retry() && !queue.is_dead_letter(),
                "a pull of {queue} refused: {result:?}"
            );
            return;
        };
        assert!(
            exists || queue.is_retry() || queue.is_dead_letter(),
            "a pull of an unknown queue {queue} succeeded"
        );
        let empty = Vec::new();
        let log = self.model.queues.get(&queue).unwrap_or(&empty);
        let len = log.len() as Offset;
        let start = from.max(self.model.consume_offset(group, &queue));
        assert!(pulled.messages.len() <= messages_max);
        assert!(pulled.next_offset >= start);
        assert!(pulled.next_offset <= start.max(len));
        let mut returned = pulled.messages.iter().peekable();
        let mut bytes = 0;
        for offset in start..pulled.next_offset {
            let stored = &log[offset as usize];
            if returned.peek().is_some_and(|(o, _)| *o == offset) {
                let (_, message) = returned.next().expect("peeked");
                assert_eq!(message, stored, "a pull returned another message");
                assert!(
                    !self.model.is_acked(group, &queue, offset),
                    "a pull returned an acknowledged message"
                );
                assert!(
                    !queue.is_retry() || stored.due_ms <= now_ms,
                    "a pull returned a message before it is due"
                );
                assert!(
                    bytes < bytes_max || bytes == 0,
                    "a pull went past its byte limit"
                );
                bytes += stored.message.size_bytes();
            } else {
                assert!(
                    self.model.is_acked(group, &queue, offset),
                    "a pull skipped unacknowledged offset {offset} of {queue}"
                );
            }
        }
        assert!(
            returned.next().is_none(),
            "a pull returned offsets out of order or beyond next_offset: {:?}",
            pulled.messages.iter().map(|(o, _)| o).collect::<Vec<_>>()
        );
        if pulled.next_offset < len {
            let stopped_for_limit = pulled.messages.len() >= messages_max
                || (!pulled.messages.is_empty() && bytes >= bytes_max);
            let not_due = queue.is_retry() && log[pulled.next_offset as usize].due_ms > now_ms;
            assert!(
                stopped_for_limit || not_due,
                "a pull stopped at {} of {queue} for no reason",
                pulled.next_offset
            );
        }
        // When the first unacknowledged retry falls due.
        let due = if queue.is_retry() {
            (start..len)
                .find(|&o| !self.model.is_acked(group, &queue, o))
                .map(|o| log[o as usize].due_ms)
        } else {
            None
        };
        assert_eq!(self.state.next_due_ms(group, &queue, from), due);

        self.stats.pulled += pulled.messages.len();
        self.resume
            .insert((group, queue.clone()), pulled.next_offset);
        let offsets = pulled.messages.iter().map(|(o, _)| *o).collect();
        self.last_pull.insert(group, (queue, offsets));
    }

    fn create_topic(&mut self, command: MetaCommand, groups: u8) {
        let broker_groups: Vec<GroupId> = (1..=GroupId::from(groups % 4)).collect();
        let (topic, queues) = match command.clone() {
            MetaCommand::CreateTopic { topic, queues } => (topic, queues),
            MetaCommand::DeleteTopic { topic } => {
                let existing = self.topics.remove(&topic);
                let applied = self.meta.apply(command, &broker_groups);
                assert_eq!(
                    applied.clone().ok(),
                    existing.map(|queues| TopicApplied::Deleted { queues }),
                    "DeleteTopic {topic:?}: {applied:?}"
                );
                assert!(self.meta.placement(&topic).is_none());
                return;
            }
            MetaCommand::AddNode { .. }
            | MetaCommand::RemoveNode { .. }
            | MetaCommand::AddBrokerGroup { .. } => return,
        };
        let existing = self.topics.get(&topic).copied();
        let applied = self.meta.apply(command, &broker_groups);
        let queues_total: u64 = self.topics.values().map(|q| u64::from(*q)).sum();
        // `apply` leaves names to the node (see `MetaState::check_create`).
        let expected = match existing {
            Some(count) => (count == queues).then_some(TopicApplied::Existed),
            None => (!broker_groups.is_empty()
                && (1..=QUEUES_PER_TOPIC_MAX).contains(&queues)
                && self.topics.len() < holdfast_core::limits::TOPICS_MAX
                && queues_total + u64::from(queues) <= holdfast_core::limits::QUEUES_MAX as u64)
                .then_some(TopicApplied::Created),
        };
        assert_eq!(
            applied.clone().ok(),
            expected,
            "CreateTopic {topic:?} of {queues} queues: {applied:?}"
        );
        let created = applied == Ok(TopicApplied::Created);
        if existing.is_none() && created {
            self.topics.insert(topic.clone(), queues);
            self.stats.topics_created += 1;
            let placement = self
                .meta
                .placement(&topic)
                .expect("a created topic is placed");
            assert_eq!(placement.len(), queues as usize);
            let held: BTreeMap<GroupId, BTreeSet<QueueId>> = broker_groups
                .iter()
                .map(|&g| (g, self.meta.queues_of(g).into_iter().collect()))
                .collect();
            for (q, (queue, group)) in placement.iter().enumerate() {
                assert_eq!(*queue, QueueId::new(topic.clone(), q as u32));
                assert!(
                    held.get(group).is_some_and(|queues| queues.contains(queue)),
                    "{queue} placed in group {group}, which does not list it"
                );
            }
        }
        let listed: BTreeMap<String, u32> = self.meta.topics().into_iter().collect();
        assert_eq!(
            listed, self.topics,
            "the topic table differs from the model"
        );
    }

    /// Applies bytes as a log entry: whatever decodes is checked against the model like any
    /// command; the rest must be refused as malformed and change nothing.
    fn raw(&mut self, bytes: Vec<u8>) {
        let decoded = decode_command(&bytes);
        assert_eq!(
            decode_entry(&EntryKind::Commands(vec![Bytes::from(bytes.clone())])),
            vec![decoded.clone().ok()]
        );
        if let Ok(command) = &decoded {
            self.stats.raw_decoded += 1;
            assert_eq!(
                decode_command(&encode_command(command)).as_ref(),
                Ok(command),
                "a decoded command does not survive the codec"
            );
        }
        // An operator's seek or delete moves offsets back by design (as does a topic's
        // deletion, an epoch's creation replacing older queues, or a group's expiry); the
        // model has no operator, so bytes that happen to decode to one are not applied.
        if matches!(
            decoded,
            Ok(Command::Seek { .. }
                | Command::DeleteGroup { .. }
                | Command::Redrive { .. }
                | Command::DropTopic { .. }
                | Command::ExpireGroups { .. }
                | Command::CreateQueuesAt { .. })
        ) {
            return;
        }
        self.apply_checked(&bytes, decoded.ok());
    }

    fn apply(&mut self, op: Op) {
        let stamp_ms = self.stamp();
        match op {
            Op::Append {
                queue,
                producer,
                seq,
                count,
                body,
            } => {
                let producer_id = u64::from(producer) % PRODUCERS;
                let first_seq = match seq {
                    SeqChoice::Next => self
                        .model
                        .seq_max
                        .get(&producer_id)
                        .map_or(0, |&s| s.saturating_add(1)),
                    SeqChoice::Small(s) => Seq::from(s),
                    SeqChoice::Far(s) => Seq::from(s) * 512,
                    SeqChoice::Any(s) => s,
                };
                let messages: Vec<Message> = (0..count % 5)
                    .map(|i| Message::with_body(Bytes::from(vec![body; usize::from(i)])))
                    .collect();
                self.sent.push((producer_id, first_seq, messages.clone()));
                self.command(Command::Append {
                    queue: self.queue(QueueChoice::Topic(queue), TOPIC),
                    producer_id,
                    first_seq,
                    messages,
                    stamp_ms,
                });
            }
            Op::Retry { batch, queue } => {
                if self.sent.is_empty() {
                    return;
                }
                let (producer_id, first_seq, messages) =
                    self.sent[usize::from(batch) % self.sent.len()].clone();
                let queue = match queue {
                    Some(q) => self.queue(QueueChoice::Topic(q), TOPIC),
                    None => QueueId::new(TOPIC, 0),
                };
                let outcome = self.command(Command::Append {
                    queue,
                    producer_id,
                    first_seq,
                    messages: messages.clone(),
                    stamp_ms,
                });
                // A retry never writes a second copy.
                if let Outcome::Appended {
                    duplicate: false, ..
                } = outcome
                {
                    let seqs = first_seq..=first_seq + (messages.len() as u64 - 1);
                    let copies = self
                        .model
                        .queues
                        .values()
                        .flatten()
                        .filter(|m| {
                            m.origin.is_none()
                                && m.producer_id == producer_id
                                && seqs.contains(&m.seq)
                        })
                        .count();
                    assert_eq!(copies, messages.len(), "a retry wrote a second copy");
                }
            }
            Op::Pull {
                group,
                queue,
                from,
                messages_max,
                bytes_max,
            } => {
                let group = GROUPS[usize::from(group)];
                let queue = self.queue(queue, group);
                let from = match from {
                    FromChoice::Resume => self
                        .resume
                        .get(&(group, queue.clone()))
                        .copied()
                        .unwrap_or(0),
                    FromChoice::At(o) => Offset::from(o),
                    FromChoice::Far(o) => o,
                };
                self.pull(
                    group,
                    queue,
                    from,
                    usize::from(messages_max % 16),
                    usize::from(bytes_max),
                );
            }
            Op::Ack {
                group,
                queue,
                offsets,
            } => {
                let group = GROUPS[usize::from(group)];
                self.command(Command::Ack {
                    group: group.into(),
                    queue: self.queue(queue, group),
                    offsets: offsets.into_iter().map(Offset::from).collect(),
                });
            }
            Op::AckPulled { group, mask } => {
                let group = GROUPS[usize::from(group)];
                let Some((queue, offsets)) = self.last_pull.get(group).cloned() else {
                    return;
                };
                let offsets = offsets
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << (i % 8)) != 0)
                    .map(|(_, o)| o)
                    .collect();
                self.command(Command::Ack {
                    group: group.into(),
                    queue,
                    offsets,
                });
            }
            Op::ReconsumeLater {
                group,
                queue,
                offset,
            } => {
                let group = GROUPS[usize::from(group)];
                self.command(Command::ReconsumeLater {
                    group: group.into(),
                    queue: self.queue(queue, group),
                    offset: Offset::from(offset),
                    stamp_ms,
                });
            }
            Op::NackPulled { group, pick } => {
                let group = GROUPS[usize::from(group)];
                let Some((queue, offsets)) = self.last_pull.get(group).cloned() else {
                    return;
                };
                if offsets.is_empty() {
                    return;
                }
                let offset = offsets[usize::from(pick) % offsets.len()];
                self.command(Command::ReconsumeLater {
                    group: group.into(),
                    queue,
                    offset,
                    stamp_ms,
                });
            }
            Op::Advance { ms } => self.now_ms += u64::from(ms),
            Op::Skew { behind_ms } => self.behind_ms = u64::from(behind_ms),
            Op::CreateQueue { queue } => {
                let queue = QueueId::new(TOPIC, u32::from(queue % 8));
                self.topic_queues = self.topic_queues.max(queue.queue + 1);
                self.command(Command::CreateQueues {
                    queues: vec![queue],
                });
            }
            Op::Raw(bytes) => self.raw(bytes),
            Op::Mutate { at, value, cut } => {
                let mut bytes = self.last_bytes.clone();
                if !bytes.is_empty() {
                    let at = usize::from(at) % bytes.len();
                    bytes[at] = value;
                    if cut {
                        bytes.truncate(at + 1);
                    }
                }
                self.raw(bytes);
            }
            Op::Meta { raw, groups } => {
                if let Ok(command) = postcard::from_bytes::<MetaCommand>(&raw) {
                    self.create_topic(command, groups);
                }
            }
            Op::CreateTopic {
                name,
                queues,
                groups,
            } => self.create_topic(
                MetaCommand::CreateTopic {
                    topic: format!("t{}", name % 8),
                    queues: u32::from(queues % 1100),
                },
                groups,
            ),
            Op::Trim => {
                let before = self.model.starts.clone();
                let due = self
                    .model
                    .trimmed_starts(stamp_ms)
                    .iter()
                    .any(|(q, start)| *start != self.model.start(q));
                assert_eq!(
                    self.state.trim_due(stamp_ms),
                    due,
                    "trim_due({stamp_ms}) disagrees with the model"
                );
                self.command(Command::Trim { stamp_ms });
                let dropped: u64 = self
                    .model
                    .starts
                    .iter()
                    .map(|(q, start)| start - before.get(q).copied().unwrap_or(0))
                    .sum();
                if dropped > 0 {
                    self.stats.trims += 1;
                    self.stats.trimmed += dropped as usize;
                }
                assert!(!self.state.trim_due(stamp_ms), "a trim left something due");
            }
            Op::Snapshot { damage } => self.restore(damage),
        }
    }

    /// Replaces the state by the one its snapshot restores to; damaged copies of the snapshot
    /// must be refused.
    fn restore(&mut self, damage: u16) {
        let bytes = snapshot_from(&self.state, &self.store);
        let config = self.model.config.clone();
        let mut restored = match BrokerState::restore(config.clone(), &bytes) {
            Ok(restored) => restored,
            Err(e) => panic!("a snapshot does not restore: {e}"),
        };
        // The restored state writes its messages into a store of its own.
        let mut store = MemoryStore::default();
        for op in restored.take_store_ops() {
            store.apply(0, op).expect("a restore's store operations");
        }
        assert_eq!(
            snapshot_from(&restored, &store),
            bytes,
            "a restored state snapshots differently"
        );
        let at = usize::from(damage) % bytes.len();
        assert!(
            BrokerState::restore(config.clone(), &bytes[..at]).is_err(),
            "a snapshot cut to {at} bytes restored"
        );
        let mut flipped = bytes.clone();
        flipped[at] ^= 1 << (damage >> 13);
        assert!(
            BrokerState::restore(config, &flipped).is_err(),
            "a snapshot with a bit flipped at byte {at} restored"
        );
        self.state = restored;
        self.store = store;
        self.stats.restores += 1;
        self.check_queues_and_offsets();
    }

    /// Every queue holds exactly what the model does (nothing below its start), and no
    /// `(producer, seq)` was written twice outside retry and dead-letter queues.
    fn final_check(&self) {
        let mut written = BTreeSet::new();
        for (queue, log) in &self.model.queues {
            let start = self.model.start(queue);
            for (offset, expected) in log.iter().enumerate() {
                let offset = offset as Offset;
                let stored = self.message(queue, offset);
                if offset < start {
                    assert_eq!(stored, None, "{queue} at {offset}, below the start {start}");
                } else {
                    assert_eq!(stored.as_ref(), Some(expected), "{queue} at {offset}");
                }
                if expected.origin.is_none() {
                    assert!(
                        written.insert((expected.producer_id, expected.seq)),
                        "producer {} seq {} written twice",
                        expected.producer_id,
                        expected.seq
                    );
                }
            }
            assert_eq!(self.message(queue, log.len() as Offset), None);
        }
    }

    /// Carries out the state's store operations.
    fn sync_store(&mut self) {
        for op in self.state.take_store_ops() {
            self.store
                .apply(0, op)
                .expect("the store carries out every operation");
        }
    }

    /// The retained message at `(queue, offset)`, from the store.
    fn message(&self, queue: &QueueId, offset: Offset) -> Option<StoredMessage> {
        if !self.state.retains(queue, offset) {
            return None;
        }
        let stored = self.store.message(0, queue, offset);
        assert!(
            stored.is_some(),
            "{queue}@{offset} is retained but not stored"
        );
        stored
    }
}

/// The snapshot of `state`, its messages read from `store`.
fn snapshot_from(state: &BrokerState, store: &MemoryStore) -> Vec<u8> {
    state
        .snapshot_with(&mut |queue, offset| {
            store
                .message(0, queue, offset)
                .ok_or_else(|| format!("{queue}@{offset} is not stored"))
        })
        .expect("a snapshot reads every retained message")
}

/// Runs a command sequence decoded from `data` against one broker state machine and its
/// reference model; panics where they disagree or an invariant breaks.
///
/// Checked after every command: the outcome is the model's (idempotent append by
/// `(producer, seq)` with a sliding window, so a retry the window remembers gets its original
/// offsets back; acks; `ReconsumeLater` to the right retry or dead-letter queue with the right
/// due time; refusals), every queue's length, every consume offset (the lowest unacknowledged,
/// never moving back). Checked on every pull: see `Broker::pull`. At the end, every stored
/// message. Raw bytes that decode as a command are checked the same way; those that do not
/// must be refused as malformed and change nothing.
pub fn run_broker(data: &[u8]) -> BrokerStats {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return BrokerStats::default();
    };
    let mut broker = Broker::new(&setup);
    while broker.stats.ops < OPS_MAX && !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        broker.apply(op);
        broker.stats.ops += 1;
    }
    broker.final_check();
    broker.stats
}

/// The `broker` fuzz target: see [`run_broker`].
pub fn broker(data: &[u8]) {
    run_broker(data);
}
