//! The applied state of one broker group.

use std::collections::{BTreeMap, BTreeSet};

use super::codec::decode_command;
use super::dedup::{ProducerWindow, Verdict};
use super::offsets::GroupOffsets;
use super::queue_log::QueueLog;
use super::snapshot::{self, ImageRef, SnapshotError};
use super::types::*;
use crate::limits::PRODUCERS_PER_GROUP_MAX;
use crate::raft::Canary;

#[derive(Clone, Debug, Default)]
pub struct BrokerState {
    config: BrokerConfig,
    queues: BTreeMap<QueueId, QueueLog>,
    /// `(group, queue)` to the group's progress there.
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    producers: BTreeMap<ProducerId, ProducerWindow>,
    /// Derived from `producers` (not in the snapshot): each producer by when it last wrote,
    /// least recent first, and the latest such time.
    by_touch: BTreeSet<(u64, ProducerId)>,
    touched_max: u64,
    /// `(consumer group, queue)` to who holds it: see [`Command::Claim`].
    leases: BTreeMap<(String, QueueId), Lease>,
}

impl BrokerState {
    pub fn new(config: BrokerConfig) -> BrokerState {
        BrokerState {
            config,
            ..BrokerState::default()
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The applied state as bytes (see [`BrokerState::restore`]): queues with their retained
    /// messages and start offsets, every group's consume offset and acks, every producer's
    /// dedup window. Not the config, which each node has from its own configuration. Equal
    /// states give equal bytes, so replicas can compare snapshots.
    pub fn snapshot(&self) -> Vec<u8> {
        snapshot::encode(&ImageRef {
            queues: &self.queues,
            offsets: &self.offsets,
            producers: &self.producers,
            leases: &self.leases,
        })
    }

    /// The state [`BrokerState::snapshot`] wrote, under `config`. Damaged, truncated or foreign
    /// bytes, or another format version, are an error, never a panic or a partial state.
    pub fn restore(config: BrokerConfig, bytes: &[u8]) -> Result<BrokerState, SnapshotError> {
        let image = snapshot::decode(bytes)?;
        let producers: BTreeMap<ProducerId, ProducerWindow> =
            if Canary::SnapshotOmitsDedup.planted(config.canary) {
                BTreeMap::new()
            } else {
                image.producers
            };
        if producers.len() > PRODUCERS_PER_GROUP_MAX {
            return Err(SnapshotError::Inconsistent(format!(
                "{} producers, more than the maximum of {PRODUCERS_PER_GROUP_MAX}",
                producers.len()
            )));
        }
        let by_touch = producers
            .iter()
            .map(|(id, window)| (window.touched, *id))
            .collect();
        let touched_max = producers.values().map(|w| w.touched).max().unwrap_or(0);
        Ok(BrokerState {
            config,
            queues: image.queues,
            offsets: image.offsets,
            producers,
            by_touch,
            touched_max,
            leases: image.leases,
        })
    }

    /// Applies one committed log entry's bytes. A command that does not decode is refused,
    /// the same way on every replica.
    pub fn apply_bytes(&mut self, bytes: &[u8]) -> Outcome {
        match decode_command(bytes) {
            Ok(command) => self.apply(command),
            Err(e) => Outcome::Refused(Refusal::Malformed(e.to_string())),
        }
    }

    pub fn apply(&mut self, command: Command) -> Outcome {
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
            Command::Trim { stamp_ms } => {
                self.trim(stamp_ms);
                Outcome::QueuesCreated
            }
            Command::Claim {
                group,
                queue,
                member,
                generation,
                takeover,
            } => self.claim(group, queue, member, generation, takeover),
            Command::Release {
                group,
                queue,
                member,
                generation,
            } => self.release(group, queue, member, generation),
            Command::OwnedAck {
                group,
                queue,
                member,
                generation,
                offsets,
            } => match self.holder_check(&group, &queue, &member, generation) {
                Err(refusal) => Outcome::Refused(refusal),
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
                Err(refusal) => Outcome::Refused(refusal),
                Ok(()) => self.reconsume_later(group, queue, offset, stamp_ms),
            },
        }
    }

    /// Who holds `queue` for consumer group `group`, if anyone ever claimed it.
    pub fn lease(&self, group: &str, queue: &QueueId) -> Option<&Lease> {
        self.leases.get(&(group.to_string(), queue.clone()))
    }

    /// Every lease, for status and checks.
    pub fn leases(&self) -> impl Iterator<Item = (&(String, QueueId), &Lease)> {
        self.leases.iter()
    }

    /// Whether `member`, speaking for `generation`, holds `queue` under its current tenure.
    fn holder_check(
        &self,
        group: &str,
        queue: &QueueId,
        member: &str,
        generation: u64,
    ) -> Result<(), Refusal> {
        let lease = self.lease(group, queue).cloned().unwrap_or_default();
        if lease.owner.as_deref() == Some(member) && generation >= lease.since {
            return Ok(());
        }
        Err(Refusal::NotOwner(Box::new(NotOwner {
            group: group.to_string(),
            queue: queue.clone(),
            member: member.to_string(),
            generation,
            lease,
        })))
    }

    fn claim(
        &mut self,
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        takeover: bool,
    ) -> Outcome {
        // Retry queues come into being with their first message; a claim may come first.
        let retry_level_ok =
            queue.is_retry() && (queue.queue as usize) < self.config.reconsume_delays_ms.len();
        if !self.queues.contains_key(&queue) && !retry_level_ok {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        }
        let key = (group, queue);
        if !self.leases.contains_key(&key)
            && self.leases.len() >= crate::limits::LEASES_PER_BROKER_GROUP_MAX
        {
            return Outcome::Refused(Refusal::Malformed(format!(
                "this broker group holds the most queue leases it may ({})",
                crate::limits::LEASES_PER_BROKER_GROUP_MAX
            )));
        }
        let lease = self.leases.get(&key).cloned().unwrap_or_default();
        let granted = match &lease.owner {
            _ if generation < lease.generation => false,
            None => true,
            Some(owner) if *owner == member => true,
            Some(_) => takeover && generation > lease.generation,
        };
        if !granted {
            let (group, queue) = key;
            return Outcome::Refused(Refusal::NotOwner(Box::new(NotOwner {
                group,
                queue,
                member,
                generation,
                lease,
            })));
        }
        let since = if lease.owner.as_deref() == Some(member.as_str()) {
            lease.since
        } else {
            generation
        };
        let lease = Lease {
            owner: Some(member),
            generation,
            since,
        };
        self.leases.insert(key, lease.clone());
        Outcome::Leased(lease)
    }

    fn release(
        &mut self,
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
    ) -> Outcome {
        if let Err(refusal) = self.holder_check(&group, &queue, &member, generation) {
            return Outcome::Refused(refusal);
        }
        let Some(lease) = self.leases.get_mut(&(group, queue)) else {
            return Outcome::Leased(Lease::default());
        };
        // A release closes the holder's generation: a pull of it still on its way (a long
        // poll woken by the release, say) must not claim the queue back for a member that has
        // let go. Generations rise by at least one, so the next one's members may claim.
        lease.owner = None;
        lease.generation = lease.generation.max(generation.saturating_add(1));
        Outcome::Leased(lease.clone())
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
        // A client chooses `first_seq`: a batch that would run past the largest sequence
        // number cannot be numbered, and would wrap the dedup window's arithmetic.
        if first_seq.checked_add(len - 1).is_none() {
            return Outcome::Refused(Refusal::SequenceOverflow {
                producer_id,
                seq: first_seq,
            });
        }
        let verdict = if Canary::NoDedup.planted(self.config.canary) {
            Ok(Verdict::New)
        } else {
            match self.producers.get(&producer_id) {
                Some(window) if Canary::DedupBySeqMax.planted(self.config.canary) => {
                    Ok(window.check_by_seq_max(first_seq))
                }
                Some(window) => window.check(producer_id, first_seq, len),
                None => Ok(Verdict::New),
            }
        };
        match verdict {
            Err(refusal) => return Outcome::Refused(refusal),
            // The window outlives retention: a retry of a batch whose messages were dropped
            // still gets their offsets, not a second copy.
            Ok(Verdict::Duplicate { queue, base_offset }) => {
                return Outcome::Appended {
                    queue,
                    base_offset,
                    duplicate: true,
                };
            }
            Ok(Verdict::New) => {}
        }
        let Some(log) = self.queues.get_mut(&queue) else {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        };
        let base_offset = log.end();
        for (i, message) in messages.into_iter().enumerate() {
            log.push(StoredMessage {
                producer_id,
                seq: first_seq + i as Seq,
                message,
                stored_ms: stamp_ms,
                reconsume_times: 0,
                due_ms: 0,
                origin: None,
            });
        }
        if !Canary::NoDedup.planted(self.config.canary) {
            self.touch(producer_id)
                .record(first_seq, len, queue.clone(), base_offset);
        }
        Outcome::Appended {
            queue,
            base_offset,
            duplicate: false,
        }
    }

    /// The window of `producer_id`, moved to the most recently used place. A producer new to
    /// a full table takes the place of the least recently used one, whose retries are then
    /// no longer recognised: the table stays within `PRODUCERS_PER_GROUP_MAX` however many
    /// producer ids clients make up, and a producer that keeps writing is never the one
    /// forgotten. (Refusing new producers instead would let anyone lock every new producer
    /// out for good by filling the table once.)
    fn touch(&mut self, producer_id: ProducerId) -> &mut ProducerWindow {
        if !self.producers.contains_key(&producer_id)
            && self.producers.len() >= PRODUCERS_PER_GROUP_MAX
            && let Some((_, oldest)) = self.by_touch.pop_first()
        {
            self.producers.remove(&oldest);
        }
        self.touched_max += 1;
        let touched = self.touched_max;
        let window = self.producers.entry(producer_id).or_default();
        self.by_touch.remove(&(window.touched, producer_id));
        window.touched = touched;
        self.by_touch.insert((touched, producer_id));
        window
    }

    /// Acks of offsets below the queue's start (dropped by retention) are accepted and change
    /// nothing: those offsets already count as consumed.
    fn ack(&mut self, group: String, queue: QueueId, offsets: Vec<Offset>) -> Outcome {
        let Some(log) = self.queues.get(&queue) else {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        };
        let (start, end) = (log.start(), log.end());
        if let Some(offset) = offsets.iter().find(|o| **o >= end) {
            return Outcome::Refused(Refusal::NoSuchOffset {
                queue,
                offset: *offset,
            });
        }
        let progress = self
            .offsets
            .entry((group, queue))
            .or_insert_with(|| GroupOffsets::starting_at(start));
        for offset in offsets {
            if Canary::OverwriteConsumeOffset.planted(self.config.canary) {
                progress.overwrite(offset);
            } else if offset >= start {
                progress.ack(offset);
            }
        }
        Outcome::Acked {
            consume_offset: progress.consume_offset().max(start),
        }
    }

    /// A `ReconsumeLater` of an offset retention has dropped is answered as an ack of it
    /// (`Acked`): the message can no longer be redelivered, and below the queue's start every
    /// offset counts as consumed, as for a `ReconsumeLater` repeated after the first one
    /// requeued the message. An offset at or past the end is refused with `NoSuchOffset`.
    fn reconsume_later(
        &mut self,
        group: String,
        queue: QueueId,
        offset: Offset,
        stamp_ms: u64,
    ) -> Outcome {
        let Some(log) = self.queues.get(&queue).filter(|log| offset < log.end()) else {
            return Outcome::Refused(Refusal::NoSuchOffset { queue, offset });
        };
        let start = log.start();
        let progress = self
            .offsets
            .entry((group.clone(), queue.clone()))
            .or_insert_with(|| GroupOffsets::starting_at(start));
        // A repeated ReconsumeLater (the consumer retried it) must not requeue twice.
        let stored = match log.get(offset) {
            Some(stored) if !progress.is_acked(offset) => stored,
            _ => {
                return Outcome::Acked {
                    consume_offset: progress.consume_offset().max(start),
                };
            }
        };
        let attempt = stored.reconsume_times.saturating_add(1);
        let dead_letter = attempt > self.config.max_reconsume
            || (Canary::DeadLetterEarly.planted(self.config.canary)
                && attempt >= self.config.max_reconsume);
        let (to, due_ms) = if dead_letter {
            (QueueId::dead_letter(&group), stamp_ms)
        } else {
            let level = self.config.reconsume_level(attempt);
            let delay_ms = self.config.reconsume_delay_ms(attempt);
            (
                QueueId::retry(&group, level),
                stamp_ms.saturating_add(delay_ms),
            )
        };
        let origin = stored.origin.clone().unwrap_or(Origin {
            queue: queue.clone(),
            offset,
        });
        let copy = StoredMessage {
            reconsume_times: attempt,
            due_ms,
            origin: Some(origin),
            stored_ms: stamp_ms,
            ..stored.clone()
        };
        progress.ack(offset);
        let log = self.queues.entry(to.clone()).or_default();
        if !Canary::NackDropsMessage.planted(self.config.canary) {
            log.push(copy);
        }
        Outcome::Requeued {
            to,
            offset: log.end().saturating_sub(1),
            dead_letter,
        }
    }

    /// Retention at the leader's time `stamp_ms`: see [`Command::Trim`]. Every group's consume
    /// offset on a trimmed queue moves up to the queue's new start, so the gap the dropped
    /// messages leave never holds it back (and the acks kept above it do not pile up).
    fn trim(&mut self, stamp_ms: u64) {
        for log in self.queues.values_mut() {
            while front_expires(&self.config, log, stamp_ms) {
                log.pop_front();
            }
        }
        for ((_, queue), progress) in &mut self.offsets {
            if let Some(log) = self.queues.get(queue) {
                progress.advance_to(log.start());
            }
        }
    }

    /// Whether a [`Command::Trim`] stamped `now_ms` would drop anything: the node proposes one
    /// only then, so an idle group's log does not fill with trims that do nothing.
    pub fn trim_due(&self, now_ms: u64) -> bool {
        self.queues
            .values()
            .any(|log| front_expires(&self.config, log, now_ms))
    }

    /// Up to `messages_max` messages (and about `bytes_max` bytes, at least one message) of
    /// `queue` from `from` on that `group` has not acknowledged. In a retry queue, delivery
    /// stops at the first message not due at `now_ms`. From below the queue's start (retention
    /// dropped what was there), delivery starts at the start, as Kafka's
    /// `auto.offset.reset=earliest` does.
    pub fn pull(
        &self,
        group: &str,
        queue: &QueueId,
        from: Offset,
        messages_max: usize,
        bytes_max: usize,
        now_ms: u64,
    ) -> Result<Pulled, Refusal> {
        // Retry and dead-letter queues come into being with their first message.
        let empty = QueueLog::default();
        let log = match self.queues.get(queue) {
            Some(log) => log,
            None if queue.is_retry() || queue.is_dead_letter() => &empty,
            None => return Err(Refusal::UnknownQueue(queue.clone())),
        };
        let progress = self.offsets.get(&(group.to_string(), queue.clone()));
        let consume_offset = progress.map_or(0, |p| p.consume_offset()).max(log.start());
        let start = if Canary::PullIgnoresFrom.planted(self.config.canary) {
            consume_offset
        } else {
            from.max(consume_offset)
        };
        let label_shift = u64::from(Canary::ShiftPullOffsets.planted(self.config.canary));
        let mut pulled = Pulled {
            messages: Vec::new(),
            next_offset: start,
        };
        let mut bytes = 0;
        for (offset, stored) in log.iter_from(start) {
            if pulled.messages.len() >= messages_max
                || (!pulled.messages.is_empty() && bytes >= bytes_max)
            {
                break;
            }
            if queue.is_retry() && stored.due_ms > now_ms {
                break;
            }
            pulled.next_offset = offset + 1;
            if progress.is_some_and(|p| p.is_acked(offset)) {
                continue;
            }
            bytes += stored.message.size_bytes();
            pulled.messages.push((offset + label_shift, stored.clone()));
        }
        Ok(pulled)
    }

    /// When the first message of a retry queue that `group` has not acknowledged, from `from`
    /// on, falls due; `None` if there is none (or the queue is not a retry queue).
    pub fn next_due_ms(&self, group: &str, queue: &QueueId, from: Offset) -> Option<u64> {
        if !queue.is_retry() {
            return None;
        }
        let log = self.queues.get(queue)?;
        let progress = self.offsets.get(&(group.to_string(), queue.clone()));
        let start = from.max(self.consume_offset(group, queue));
        log.iter_from(start)
            .find(|(offset, _)| !progress.is_some_and(|p| p.is_acked(*offset)))
            .map(|(_, stored)| stored.due_ms)
    }

    /// The group's consume offset on `queue`: every offset below it is acknowledged or was
    /// dropped by retention, so it is never below the queue's start offset.
    pub fn consume_offset(&self, group: &str, queue: &QueueId) -> Offset {
        let acked = self
            .offsets
            .get(&(group.to_string(), queue.clone()))
            .map_or(0, GroupOffsets::consume_offset);
        acked.max(self.start_offset(queue).unwrap_or(0))
    }

    /// Every `(consumer group, queue, consume offset)` this group tracks, each consume offset
    /// as [`BrokerState::consume_offset`] reports it.
    pub fn consume_offsets(&self) -> impl Iterator<Item = (&str, &QueueId, Offset)> {
        self.offsets.iter().map(|((group, queue), o)| {
            let start = self.start_offset(queue).unwrap_or(0);
            (group.as_str(), queue, o.consume_offset().max(start))
        })
    }

    /// The queue's end offset: the offset the next message will get (not how many messages
    /// it retains, which is `queue_len - start_offset`).
    pub fn queue_len(&self, queue: &QueueId) -> Option<Offset> {
        self.queues.get(queue).map(QueueLog::end)
    }

    /// The queue's first retained offset: retention dropped every message below it.
    pub fn start_offset(&self, queue: &QueueId) -> Option<Offset> {
        self.queues.get(queue).map(QueueLog::start)
    }

    /// The message at `offset`, if the queue retains one there.
    pub fn message(&self, queue: &QueueId, offset: Offset) -> Option<&StoredMessage> {
        self.queues.get(queue)?.get(offset)
    }

    /// Every queue, retry and dead-letter queues included, in order.
    pub fn queues(&self) -> impl Iterator<Item = &QueueId> {
        self.queues.keys()
    }
}

/// Whether retention drops `log`'s oldest message at `stamp_ms`: it is too old, or the queue
/// is over its size limit and holds more than that one (the newest message is never dropped
/// for size; see [`BrokerConfig::retention_bytes`]).
fn front_expires(config: &BrokerConfig, log: &QueueLog, stamp_ms: u64) -> bool {
    let Some(oldest) = log.front() else {
        return false;
    };
    let too_old = config
        .retention_ms
        .is_some_and(|keep_ms| oldest.stored_ms.saturating_add(keep_ms) <= stamp_ms);
    let too_big = config
        .retention_bytes
        .is_some_and(|limit| log.bytes() > limit && log.len() > 1);
    too_old || too_big
}
