//! The applied state of one broker group.

use std::collections::BTreeMap;

use super::codec::decode_command;
use super::dedup::{ProducerWindow, Verdict};
use super::offsets::GroupOffsets;
use super::types::*;
use crate::raft::Canary;

#[derive(Clone, Debug, Default)]
pub struct BrokerState {
    config: BrokerConfig,
    queues: BTreeMap<QueueId, Vec<StoredMessage>>,
    /// `(group, queue)` to the group's progress there.
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    producers: BTreeMap<ProducerId, ProducerWindow>,
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
        }
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
        let window = self.producers.entry(producer_id).or_default();
        let verdict = if Canary::NoDedup.planted(self.config.canary) {
            Ok(Verdict::New)
        } else {
            window.check(producer_id, first_seq, len)
        };
        match verdict {
            Err(refusal) => return Outcome::Refused(refusal),
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
        let base_offset = log.len() as Offset;
        log.extend(
            messages
                .into_iter()
                .enumerate()
                .map(|(i, message)| StoredMessage {
                    producer_id,
                    seq: first_seq + i as Seq,
                    message,
                    stored_ms: stamp_ms,
                    reconsume_times: 0,
                    due_ms: 0,
                    origin: None,
                }),
        );
        if !Canary::NoDedup.planted(self.config.canary) {
            window.record(first_seq, len, queue.clone(), base_offset);
        }
        Outcome::Appended {
            queue,
            base_offset,
            duplicate: false,
        }
    }

    fn ack(&mut self, group: String, queue: QueueId, offsets: Vec<Offset>) -> Outcome {
        let Some(len) = self.queue_len(&queue) else {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        };
        if let Some(offset) = offsets.iter().find(|o| **o >= len) {
            return Outcome::Refused(Refusal::NoSuchOffset {
                queue,
                offset: *offset,
            });
        }
        let progress = self.offsets.entry((group, queue)).or_default();
        for offset in offsets {
            if Canary::OverwriteConsumeOffset.planted(self.config.canary) {
                progress.overwrite(offset);
            } else {
                progress.ack(offset);
            }
        }
        Outcome::Acked {
            consume_offset: progress.consume_offset(),
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
            .and_then(|log| log.get(offset as usize))
        else {
            return Outcome::Refused(Refusal::NoSuchOffset { queue, offset });
        };
        let progress = self
            .offsets
            .entry((group.clone(), queue.clone()))
            .or_default();
        // A repeated ReconsumeLater (the consumer retried it) must not requeue twice.
        if progress.is_acked(offset) {
            return Outcome::Acked {
                consume_offset: progress.consume_offset(),
            };
        }
        let attempt = stored.reconsume_times + 1;
        let dead_letter = attempt > self.config.max_reconsume;
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
            offset: (log.len() as Offset).saturating_sub(1),
            dead_letter,
        }
    }

    /// Up to `messages_max` messages (and about `bytes_max` bytes, at least one message) of
    /// `queue` from `from` on that `group` has not acknowledged. In a retry queue, delivery
    /// stops at the first message not due at `now_ms`.
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
        let empty = Vec::new();
        let log = match self.queues.get(queue) {
            Some(log) => log,
            None if queue.is_retry() || queue.is_dead_letter() => &empty,
            None => return Err(Refusal::UnknownQueue(queue.clone())),
        };
        let progress = self.offsets.get(&(group.to_string(), queue.clone()));
        let consume_offset = progress.map_or(0, |p| p.consume_offset());
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
        for (offset, stored) in log.iter().enumerate().skip(start as usize) {
            let offset = offset as Offset;
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
        let progress = self.offsets.get(&(group.to_string(), queue.clone()));
        let start = from.max(progress.map_or(0, |p| p.consume_offset()));
        self.queues
            .get(queue)?
            .iter()
            .enumerate()
            .skip(start as usize)
            .find(|(offset, _)| !progress.is_some_and(|p| p.is_acked(*offset as Offset)))
            .map(|(_, stored)| stored.due_ms)
    }

    /// The group's consume offset on `queue`: every offset below it is acknowledged.
    pub fn consume_offset(&self, group: &str, queue: &QueueId) -> Offset {
        self.offsets
            .get(&(group.to_string(), queue.clone()))
            .map_or(0, GroupOffsets::consume_offset)
    }

    /// Every `(consumer group, queue, consume offset)` this group tracks.
    pub fn consume_offsets(&self) -> impl Iterator<Item = (&str, &QueueId, Offset)> {
        self.offsets
            .iter()
            .map(|((group, queue), o)| (group.as_str(), queue, o.consume_offset()))
    }

    pub fn queue_len(&self, queue: &QueueId) -> Option<Offset> {
        self.queues.get(queue).map(|log| log.len() as Offset)
    }

    pub fn message(&self, queue: &QueueId, offset: Offset) -> Option<&StoredMessage> {
        self.queues.get(queue)?.get(usize::try_from(offset).ok()?)
    }

    /// Every queue, retry and dead-letter queues included, in order.
    pub fn queues(&self) -> impl Iterator<Item = &QueueId> {
        self.queues.keys()
    }
}
