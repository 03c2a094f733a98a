//! What the queue's clients saw, and the checks of DESIGN §1 over it, named as Jepsen names
//! them: lost, unexpected, duplicated, inconsistent-offsets, nonmonotonic-poll,
//! offset-regression, and order; dead-letter, on when a message gives up retrying; and
//! retention, on what a trim may delete.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use holdfast_core::broker::{BrokerState, Offset, ProducerId, QueueId, Seq, StoredMessage};
use holdfast_core::raft::GroupId;
use holdfast_core::time::Instant;

use crate::checker::{Violation, violation};
use crate::swarm::Retention;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Pending,
    Acked {
        broker: GroupId,
        queue: QueueId,
        base_offset: Offset,
        ambiguous: bool,
    },
    Failed {
        maybe_written: bool,
    },
}

struct SendRecord {
    bodies: Vec<Bytes>,
    outcome: SendOutcome,
    started: Instant,
    /// When the producer learnt the outcome.
    ended: Option<Instant>,
    /// Sent by a producer that keeps one send in flight, relying on the order of its sends
    /// (else it pipelines, and only sends that did not overlap keep their order).
    ordered: bool,
}

impl SendRecord {
    /// Whether a copy of this batch may legitimately sit in a second broker group.
    fn ambiguous(&self) -> bool {
        match self.outcome {
            SendOutcome::Pending => true,
            SendOutcome::Acked { ambiguous, .. } => ambiguous,
            SendOutcome::Failed { maybe_written } => maybe_written,
        }
    }
}

/// A message as found at a place in a queue: who sent it and how often it was retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub producer_id: ProducerId,
    pub seq: Seq,
    pub reconsume_times: u32,
    pub body: Bytes,
}

/// A position in a queue: broker group, queue, offset.
type Place = (GroupId, QueueId, Offset);

#[derive(Default)]
pub struct History {
    /// Batches by producer and first sequence number.
    sends: BTreeMap<(ProducerId, Seq), SendRecord>,
    /// Every delivery: (consumer group, broker, queue, offset) and what it held.
    deliveries: Vec<(String, GroupId, QueueId, Offset, Found)>,
    /// The latest delivery of each message to each group: place, reconsume count, consumer.
    latest: BTreeMap<(String, ProducerId, Seq), (Place, u32, u64)>,
    pub redeliveries_by_cause: BTreeMap<&'static str, u64>,
    /// (consumer group, broker, queue, offset) to when an ack for it was first confirmed.
    confirmed: BTreeMap<(String, GroupId, QueueId, Offset), Instant>,
    /// (consumer group, broker, queue, offset) of messages requeued for a retry.
    requeued: BTreeSet<(String, GroupId, QueueId, Offset)>,
    /// The last offset each consumer pulled from each queue since it came to own it.
    last_pulled: BTreeMap<(u64, GroupId, QueueId), Offset>,
    pub dead_lettered: u64,
    /// Consumers (client ids) that crashed: what they held comes again to the next owner.
    pub crashed: BTreeSet<u64>,
    /// Messages a listener of a consumer group answered `Success` for: the only progress that
    /// counts (a message handed out is not yet consumed).
    succeeded: BTreeSet<(String, ProducerId, Seq)>,
    /// Each `ReconsumeLater` a listener answered: group, message, and how often the message
    /// had been reconsumed when it was delivered; with when it was first answered so (the
    /// copy it makes is stamped no earlier, so it ages from no earlier).
    nacked: BTreeMap<(String, ProducerId, Seq, u32), Instant>,
    /// The run's retention policy.
    retention: Retention,
    /// Per (broker, queue): every offset below this was dropped by a trim the history judged
    /// (see [`History::trimmed`]).
    trimmed_to: BTreeMap<(GroupId, QueueId), Offset>,
    /// Copies in a consumer group's retry or dead-letter queue that a trim dropped: group and
    /// message. The group may never see that message again.
    dropped_copies: BTreeSet<(String, ProducerId, Seq)>,
    /// Messages a trim dropped, for the summary.
    pub trimmed_messages: u64,
    /// The highest consume offset each replica incarnation has shown, to catch regressions.
    consume_seen: BTreeMap<(u64, u64, GroupId, String, QueueId), Offset>,
}

impl History {
    pub fn new(retention: Retention) -> History {
        History {
            retention,
            ..History::default()
        }
    }

    pub fn sent(
        &mut self,
        now: Instant,
        producer_id: ProducerId,
        first_seq: Seq,
        bodies: Vec<Bytes>,
        ordered: bool,
    ) {
        let record = SendRecord {
            bodies,
            outcome: SendOutcome::Pending,
            started: now,
            ended: None,
            ordered,
        };
        self.sends.insert((producer_id, first_seq), record);
    }

    pub fn send_ended(
        &mut self,
        now: Instant,
        producer_id: ProducerId,
        first_seq: Seq,
        outcome: SendOutcome,
    ) {
        if let Some(record) = self.sends.get_mut(&(producer_id, first_seq)) {
            record.outcome = outcome;
            record.ended = Some(now);
        }
    }

    /// A listener of `group` answered a delivery of `found`: `success` for `Success`, else
    /// `ReconsumeLater`. Recorded when the answer reaches the consumer library, never for a
    /// listener whose process crashed first.
    pub fn answered(&mut self, now: Instant, group: &str, found: &Found, success: bool) {
        let (p, s) = (found.producer_id, found.seq);
        if success {
            self.succeeded.insert((group.to_string(), p, s));
        } else {
            self.nacked
                .entry((group.to_string(), p, s, found.reconsume_times))
                .or_insert(now);
        }
    }

    /// A replica applied a retention trim at `now`: `queue` of broker group `broker` drops
    /// every message below `start`; `message` reads the queue store as it stood just before
    /// (every retained message, up to the queue's end). Judged once per message, at the first
    /// replica to drop it (every replica drops the same ones at the same log index).
    ///
    /// retention: a message goes only if the policy allowed it at the trim: it was stored at
    /// least `retention_ms` before (the trim's stamp is no later than now, and a message is
    /// stored no earlier than its send started, a copy no earlier than the `ReconsumeLater`
    /// that made it), or the queue's messages from it to the newest exceed `retention_bytes`
    /// and it is not the newest.
    pub fn trimmed(
        &mut self,
        now: Instant,
        broker: GroupId,
        queue: &QueueId,
        start: Offset,
        message: impl Fn(Offset) -> Option<StoredMessage>,
    ) -> Result<(), Violation> {
        let key = (broker, queue.clone());
        let from = self.trimmed_to.get(&key).copied().unwrap_or(0);
        if start <= from {
            return Ok(());
        }
        // The queue from the first newly dropped message to its newest, as the store holds it.
        let mut held: Vec<(Offset, Option<StoredMessage>)> = Vec::new();
        let mut offset = from;
        loop {
            let stored = message(offset);
            if stored.is_none() && offset >= start {
                break;
            }
            held.push((offset, stored));
            offset += 1;
        }
        let end = offset;
        // Bytes from each held message to the newest (`None` past a record the store could
        // not read: unknown, so size retention is given the benefit of the doubt).
        let mut suffix: Vec<Option<u64>> = vec![None; held.len()];
        let mut total = Some(0u64);
        for (i, (_, stored)) in held.iter().enumerate().rev() {
            total = total.and_then(|t| Some(t + stored.as_ref()?.message.size_bytes() as u64));
            suffix[i] = total;
        }
        let now_ms = now.as_micros() / 1_000;
        for (i, (offset, stored)) in held.iter().enumerate() {
            if *offset >= start {
                break;
            }
            // Unknown bounds (a record the store lacks, a message nobody sent) excuse the
            // trim: other checkers speak for those.
            let Some(stored) = stored else { continue };
            let (p, s, times) = (stored.producer_id, stored.seq, stored.reconsume_times);
            let stored_from_ms = self.stored_no_earlier_than(queue, stored);
            let old_enough = match (self.retention.ms, stored_from_ms) {
                (Some(keep_ms), Some(at)) => at / 1_000 + keep_ms <= now_ms,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let too_big = self.retention.bytes.is_some_and(|limit| {
                offset + 1 < end && suffix[i].is_none_or(|bytes| bytes > limit)
            });
            if !old_enough && !too_big {
                let age = stored_from_ms.map_or("?".to_string(), |at| {
                    now_ms.saturating_sub(at / 1_000).to_string()
                });
                let bytes = suffix[i].map_or("?".to_string(), |b| b.to_string());
                return Err(violation(
                    "retention",
                    format!(
                        "a trim of {queue} of group {broker} (to start {start}) dropped producer \
                         {p} seq {s} (reconsumed {times}) at offset {offset}, stored at most \
                         {age} ms before, with {bytes} bytes from it to the newest at {}: inside \
                         retention {}",
                        end.saturating_sub(1),
                        self.retention
                    ),
                ));
            }
            self.trimmed_messages += 1;
            if let Some(group) = copy_owner(queue) {
                self.dropped_copies.insert((group.to_string(), p, s));
            }
        }
        self.trimmed_to.insert(key, start);
        Ok(())
    }

    /// The earliest the message can have been stored (microseconds): when its send started,
    /// or for a copy in a retry or dead-letter queue, when a listener of the queue's group
    /// first answered `ReconsumeLater` to the attempt before. `None` when the history cannot
    /// tell.
    fn stored_no_earlier_than(&self, queue: &QueueId, stored: &StoredMessage) -> Option<u64> {
        let (p, s) = (stored.producer_id, stored.seq);
        match copy_owner(queue) {
            None => Some(self.batch_of(p, s)?.0.started.as_micros()),
            Some(group) => {
                let before = stored.reconsume_times.checked_sub(1)?;
                let at = self.nacked.get(&(group.to_string(), p, s, before))?;
                Some(at.as_micros())
            }
        }
    }

    /// Whether a trim dropped `(queue, offset)` of `broker`.
    fn trimmed_at(&self, broker: GroupId, queue: &QueueId, offset: Offset) -> bool {
        self.trimmed_to
            .get(&(broker, queue.clone()))
            .is_some_and(|to| offset < *to)
    }

    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let mut counts = (0, 0, 0, 0);
        for record in self.sends.values() {
            let n = record.bodies.len() as u64;
            match record.outcome {
                SendOutcome::Pending => counts.3 += n,
                SendOutcome::Acked { .. } => counts.0 += n,
                SendOutcome::Failed {
                    maybe_written: false,
                } => counts.1 += n,
                SendOutcome::Failed {
                    maybe_written: true,
                } => counts.2 += n,
            }
        }
        counts
    }

    pub fn deliveries(&self) -> usize {
        self.deliveries.len()
    }

    /// The batch a message belongs to, and its place in it.
    fn batch_of(&self, producer_id: ProducerId, seq: Seq) -> Option<(&SendRecord, usize)> {
        let ((_, first), record) = self
            .sends
            .range((producer_id, 0)..=(producer_id, seq))
            .next_back()?;
        let at = (seq - first) as usize;
        (at < record.bodies.len()).then_some((record, at))
    }

    /// A consumer of `group` was handed `found` from (broker, queue, offset). Unexpected if
    /// no send could have written it.
    pub fn delivered(
        &mut self,
        consumer: u64,
        group: &str,
        broker: GroupId,
        queue: &QueueId,
        offset: Offset,
        found: Found,
    ) -> Result<(), Violation> {
        match self.batch_of(found.producer_id, found.seq) {
            Some((record, at)) if record.bodies.get(at) == Some(&found.body) => {
                if record.outcome
                    == (SendOutcome::Failed {
                        maybe_written: false,
                    })
                {
                    return Err(violation(
                        "unexpected",
                        format!(
                            "{group} received producer {} seq {} from {queue}@{offset} of group {broker}, \
                             a send that definitively failed",
                            found.producer_id, found.seq
                        ),
                    ));
                }
            }
            _ => {
                return Err(violation(
                    "unexpected",
                    format!(
                        "{group} received {found:?} from {queue}@{offset} of group {broker}, which nobody sent"
                    ),
                ));
            }
        }
        let place = (broker, queue.clone(), offset);
        let key = (group.to_string(), found.producer_id, found.seq);
        let now = (place.clone(), found.reconsume_times, consumer);
        if let Some((before, times, by)) = self.latest.insert(key, now) {
            // Why the group sees this message again (DESIGN §1 item 4).
            let cause = if found.reconsume_times > times {
                "nack"
            } else if before != place {
                "ambiguous-send"
            } else if by != consumer && self.crashed.contains(&by) {
                "owner-crashed"
            } else if by != consumer {
                "handover"
            } else {
                "unconfirmed-ack"
            };
            *self.redeliveries_by_cause.entry(cause).or_default() += 1;
        }
        self.deliveries
            .push((group.to_string(), broker, queue.clone(), offset, found));
        Ok(())
    }

    /// retry-delay: a copy in a retry queue is handed out no earlier than `delay_ms` (its
    /// attempt's delay) after the first `ReconsumeLater` a listener answered to the attempt
    /// before. The broker stamps the copy no earlier than that answer (its request leaves
    /// after it) and serves it from the stamp plus the delay on, in whole milliseconds: one
    /// millisecond of rounding is allowed.
    pub fn check_retry_delay(
        &self,
        now: Instant,
        group: &str,
        queue: &QueueId,
        offset: Offset,
        found: &Found,
        delay_ms: u64,
    ) -> Result<(), Violation> {
        let Some(before) = found.reconsume_times.checked_sub(1) else {
            return Ok(());
        };
        let key = (group.to_string(), found.producer_id, found.seq, before);
        let Some(nacked) = self.nacked.get(&key) else {
            return Ok(());
        };
        let due = *nacked + Duration::from_millis(delay_ms.saturating_sub(1));
        if now < due {
            return Err(violation(
                "retry-delay",
                format!(
                    "{group} was handed {queue}@{offset} (producer {} seq {}, attempt {}) at \
                     {now:?}, {:?} after its ReconsumeLater at {nacked:?}; its delay is {delay_ms} ms",
                    found.producer_id,
                    found.seq,
                    found.reconsume_times,
                    now.saturating_since(*nacked),
                ),
            ));
        }
        Ok(())
    }

    /// A consumer's pull, sent at `requested_at`, returned `offsets`: increasing, after what
    /// it pulled before, and none of them acknowledged (confirmed) before the pull was sent.
    pub fn pulled(
        &mut self,
        consumer: u64,
        group: &str,
        broker: GroupId,
        queue: &QueueId,
        requested_at: Instant,
        offsets: &[Offset],
    ) -> Result<(), Violation> {
        let key = (consumer, broker, queue.clone());
        let mut last = self.last_pulled.get(&key).copied();
        for offset in offsets {
            if last.is_some_and(|l| *offset <= l) {
                return Err(violation(
                    "nonmonotonic-poll",
                    format!(
                        "consumer {consumer} of {group} pulled {queue}@{offset} of group {broker} \
                         after offset {last:?}"
                    ),
                ));
            }
            last = Some(*offset);
            let acked = (group.to_string(), broker, queue.clone(), *offset);
            if let Some(at) = self.confirmed.get(&acked)
                && *at < requested_at
            {
                return Err(violation(
                    "duplicated",
                    format!(
                        "{group} was handed {queue}@{offset} of group {broker} by a pull sent at \
                         {requested_at}, after its ack was confirmed at {at}"
                    ),
                ));
            }
        }
        if let Some(last) = last {
            self.last_pulled.insert(key, last);
        }
        Ok(())
    }

    /// The consumer's queues changed: pulls of newly owned queues start again at the
    /// committed consume offset.
    pub fn rebalanced(&mut self, consumer: u64) {
        self.last_pulled.retain(|(c, _, _), _| *c != consumer);
    }

    /// The consumer pulls `queue` again from the committed consume offset.
    pub fn rewound(&mut self, consumer: u64, broker: GroupId, queue: &QueueId) {
        self.last_pulled.remove(&(consumer, broker, queue.clone()));
    }

    pub fn ack_confirmed(
        &mut self,
        now: Instant,
        group: &str,
        broker: GroupId,
        queue: &QueueId,
        offsets: &[Offset],
    ) {
        for offset in offsets {
            self.confirmed
                .entry((group.to_string(), broker, queue.clone(), *offset))
                .or_insert(now);
        }
    }

    pub fn requeued(
        &mut self,
        group: &str,
        broker: GroupId,
        queue: &QueueId,
        offset: Offset,
        dead_letter: bool,
    ) {
        if dead_letter {
            self.dead_lettered += 1;
        } else {
            self.requeued
                .insert((group.to_string(), broker, queue.clone(), offset));
        }
    }

    /// A replica (node, incarnation) shows these consume offsets for broker group `broker`:
    /// none may be lower than it showed before.
    pub fn consume_offsets(
        &mut self,
        node: u64,
        incarnation: u64,
        broker: GroupId,
        state: &BrokerState,
    ) -> Result<(), Violation> {
        for (group, queue, offset) in state.consume_offsets() {
            let key = (node, incarnation, broker, group.to_string(), queue.clone());
            let seen = self.consume_seen.entry(key).or_insert(offset);
            if offset < *seen {
                return Err(violation(
                    "offset-regression",
                    format!(
                        "node {node} group {broker}: {group}'s consume offset on {queue} went from \
                         {seen} to {offset}"
                    ),
                ));
            }
            *seen = offset;
        }
        Ok(())
    }

    /// The checks over the whole run, against the final state of every broker group.
    /// `max_reconsume`: the `ReconsumeLater` answers a message may get before the next one
    /// dead-letters it.
    pub fn check_final(
        &self,
        states: &BTreeMap<GroupId, super::StateView<'_>>,
        groups: &[&str],
        max_reconsume: u32,
    ) -> Result<(), Violation> {
        let found_at = |broker: GroupId, queue: &QueueId, offset: Offset| {
            let stored = states.get(&broker)?.message(queue, offset)?;
            Some(Found {
                producer_id: stored.producer_id,
                seq: stored.seq,
                reconsume_times: stored.reconsume_times,
                body: stored.message.body.clone(),
            })
        };
        // inconsistent-offsets: every delivery matches what the queue holds there now.
        for (group, broker, queue, offset, found) in &self.deliveries {
            if self.trimmed_at(*broker, queue, *offset) {
                continue;
            }
            let now = found_at(*broker, queue, *offset);
            if now.as_ref() != Some(found) {
                return Err(violation(
                    "inconsistent-offsets",
                    format!(
                        "{group} received {found:?} from {queue}@{offset} of group {broker}, which \
                         holds {now:?}"
                    ),
                ));
            }
        }
        let dead_letters = self.check_dead_letters(states, groups, max_reconsume)?;
        // lost: every acked message is where its producer was told, and every group's
        // listeners answered it `Success` (or it went to the group's dead-letter queue),
        // unless a trim dropped it (there, or a copy of it on the group's way).
        for ((producer_id, first_seq), record) in &self.sends {
            let SendOutcome::Acked {
                broker,
                queue,
                base_offset,
                ..
            } = &record.outcome
            else {
                continue;
            };
            for (i, body) in record.bodies.iter().enumerate() {
                let seq = first_seq + i as Seq;
                let offset = base_offset + i as Offset;
                let trimmed = self.trimmed_at(*broker, queue, offset);
                let found = found_at(*broker, queue, offset);
                let expected = (*producer_id, seq, body);
                if !trimmed
                    && found.as_ref().map(|f| (f.producer_id, f.seq, &f.body)) != Some(expected)
                {
                    return Err(violation(
                        "lost",
                        format!(
                            "producer {producer_id} seq {seq} was acked at {queue}@{offset} of group \
                             {broker}, which holds {found:?}"
                        ),
                    ));
                }
                if let Some(group) = groups.iter().find(|g| {
                    let key = (g.to_string(), *producer_id, seq);
                    !self.succeeded.contains(&key)
                        && !dead_letters.contains(&key)
                        && !trimmed
                        && !self.dropped_copies.contains(&key)
                }) {
                    let handed = self.deliveries.iter().any(|(g, _, _, _, f)| {
                        g == group && (f.producer_id, f.seq) == (*producer_id, seq)
                    });
                    return Err(violation(
                        "lost",
                        format!(
                            "producer {producer_id} seq {seq} was acked but no listener of {group} \
                             answered it Success, nor is it dead-lettered (handed out: {handed})"
                        ),
                    ));
                }
            }
        }
        // lost: every message requeued for a retry came back (unless it went dead-letter).
        for (group, broker, queue, offset) in &self.requeued {
            let Some(original) = found_at(*broker, queue, *offset) else {
                continue;
            };
            let again = self.deliveries.iter().any(|(g, _, _, _, f)| {
                g == group
                    && (f.producer_id, f.seq) == (original.producer_id, original.seq)
                    && f.reconsume_times > original.reconsume_times
            });
            let copy_trimmed =
                self.dropped_copies
                    .contains(&(group.clone(), original.producer_id, original.seq));
            if !again && !copy_trimmed {
                return Err(violation(
                    "lost",
                    format!(
                        "{group} asked to reconsume {queue}@{offset} of group {broker} ({original:?}) \
                         and never got it again"
                    ),
                ));
            }
        }
        // duplicated: a message at two places only across broker groups, after an ambiguous send.
        let mut places: BTreeMap<(ProducerId, Seq), Vec<Place>> = BTreeMap::new();
        for (broker, state) in states {
            for queue in state
                .queues()
                .filter(|q| !q.is_retry() && !q.is_dead_letter())
            {
                for offset in 0..state.queue_len(queue).unwrap_or(0) {
                    if let Some(stored) = state.message(queue, offset) {
                        places
                            .entry((stored.producer_id, stored.seq))
                            .or_default()
                            .push((*broker, queue.clone(), offset));
                    }
                }
            }
        }
        for ((producer_id, seq), at) in &places {
            if at.len() < 2 {
                continue;
            }
            let brokers: BTreeSet<GroupId> = at.iter().map(|(b, _, _)| *b).collect();
            let ambiguous = self
                .batch_of(*producer_id, *seq)
                .is_some_and(|(record, _)| record.ambiguous());
            if brokers.len() < at.len() || !ambiguous {
                return Err(violation(
                    "duplicated",
                    format!(
                        "producer {producer_id} seq {seq} sits at {at:?} (ambiguous send: {ambiguous})"
                    ),
                ));
            }
        }
        self.check_order()
    }

    /// order: a producer's unambiguous acked batches to one queue keep their send order:
    /// all of them for a producer that waits for each send, and for one that pipelines, a
    /// batch acked before another was sent (what pipelining promises; RocketMQ's too).
    fn check_order(&self) -> Result<(), Violation> {
        type Acked = (Instant, Instant, Offset, bool);
        let mut by_queue: BTreeMap<(ProducerId, GroupId, &QueueId), Vec<Acked>> = BTreeMap::new();
        for ((producer_id, _), record) in &self.sends {
            if let SendOutcome::Acked {
                broker,
                queue,
                base_offset,
                ambiguous: false,
            } = &record.outcome
            {
                let ended = record.ended.unwrap_or(record.started);
                by_queue
                    .entry((*producer_id, *broker, queue))
                    .or_default()
                    .push((record.started, ended, *base_offset, record.ordered));
            }
        }
        for ((producer_id, broker, queue), sends) in &by_queue {
            // In send order; `before` holds the sends that must sit lower than the next one.
            let mut ended: Vec<&Acked> = sends.iter().collect();
            ended.sort_by_key(|(_, end, _, _)| *end);
            let (mut next_ended, mut highest): (usize, Option<Offset>) = (0, None);
            let mut previous: Option<Offset> = None;
            for (started, _, base_offset, ordered) in sends {
                while let Some((_, end, offset, _)) = ended.get(next_ended)
                    && end < started
                {
                    highest = highest.max(Some(*offset));
                    next_ended += 1;
                }
                let bound = if *ordered { previous } else { highest };
                previous = Some(*base_offset);
                if let Some(bound) = bound
                    && bound >= *base_offset
                {
                    return Err(violation(
                        "order",
                        format!(
                            "producer {producer_id}: a later batch sits at {queue}@{base_offset} of \
                             group {broker}, before an earlier one at {bound} (one send in flight: \
                             {ordered})"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// dead-letter: a message reaches a group's dead-letter queue after exactly
    /// `max_reconsume` reconsumes: it is there only with `max_reconsume + 1` attempts behind it,
    /// after a listener answered `ReconsumeLater` to its last retry, and no retry beyond that
    /// is ever delivered. Returns the dead-lettered messages, by group.
    fn check_dead_letters(
        &self,
        states: &BTreeMap<GroupId, super::StateView<'_>>,
        groups: &[&str],
        max_reconsume: u32,
    ) -> Result<BTreeSet<(String, ProducerId, Seq)>, Violation> {
        let mut dead = BTreeSet::new();
        for (broker, state) in states {
            for group in groups {
                let queue = QueueId::dead_letter(group);
                for offset in 0..state.queue_len(&queue).unwrap_or(0) {
                    let Some(stored) = state.message(&queue, offset) else {
                        continue;
                    };
                    let (p, s) = (stored.producer_id, stored.seq);
                    let last_nack = (group.to_string(), p, s, max_reconsume);
                    if stored.reconsume_times != max_reconsume + 1
                        || !self.nacked.contains_key(&last_nack)
                    {
                        return Err(violation(
                            "dead-letter",
                            format!(
                                "producer {p} seq {s} sits at {queue}@{offset} of group {broker} \
                                 after {} attempts (max_reconsume {max_reconsume}); {group}'s \
                                 listeners answered ReconsumeLater at reconsume counts {:?}",
                                stored.reconsume_times,
                                self.nacked
                                    .range(
                                        (group.to_string(), p, s, 0)
                                            ..=(group.to_string(), p, s, u32::MAX)
                                    )
                                    .map(|((_, _, _, r), _)| *r)
                                    .collect::<Vec<_>>()
                            ),
                        ));
                    }
                    dead.insert((group.to_string(), p, s));
                }
            }
        }
        if let Some((group, _, _, _, found)) = self
            .deliveries
            .iter()
            .find(|(_, _, _, _, f)| f.reconsume_times > max_reconsume)
        {
            return Err(violation(
                "dead-letter",
                format!(
                    "{group} was handed {found:?}, a retry beyond max_reconsume {max_reconsume}"
                ),
            ));
        }
        Ok(dead)
    }
}

/// The consumer group whose retry or dead-letter queue `queue` is; `None` for a topic's queue.
fn copy_owner(queue: &QueueId) -> Option<&str> {
    queue
        .topic
        .strip_prefix("%RETRY%")
        .or_else(|| queue.topic.strip_prefix("%DLQ%"))
}

#[cfg(test)]
mod tests {
    use holdfast_core::broker::Message;

    use super::*;

    fn at_ms(ms: u64) -> Instant {
        Instant::from_micros(ms * 1_000)
    }

    /// Producer 1's messages 0..n, 10 bytes each, sent at `sent_ms`, at offsets 0..n.
    fn history(retention: Retention, n: u64, sent_ms: u64) -> (History, Vec<StoredMessage>) {
        let mut history = History::new(retention);
        let bodies: Vec<Bytes> = (0..n)
            .map(|i| Bytes::from(format!("body-{i:05}")))
            .collect();
        history.sent(at_ms(sent_ms), 1, 0, bodies.clone(), true);
        let stored = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| StoredMessage {
                producer_id: 1,
                seq: i as Seq,
                message: Message::with_body(body),
                stored_ms: sent_ms,
                reconsume_times: 0,
                due_ms: 0,
                origin: None,
            })
            .collect();
        (history, stored)
    }

    fn trim(
        history: &mut History,
        stored: &[StoredMessage],
        now_ms: u64,
        start: Offset,
    ) -> Result<(), Violation> {
        let queue = QueueId::new("orders", 0);
        history.trimmed(at_ms(now_ms), 1, &queue, start, |offset| {
            stored.get(offset as usize).cloned()
        })
    }

    #[test]
    fn age_retention_may_drop_only_what_is_old_enough() {
        let retention = Retention {
            ms: Some(2_000),
            bytes: None,
        };
        let (mut history, stored) = history(retention, 3, 500);
        let young = trim(&mut history, &stored, 2_499, 1).unwrap_err();
        assert_eq!(young.checker, "retention", "{young:?}");
        trim(&mut history, &stored, 2_500, 2).unwrap();
        assert!(history.trimmed_at(1, &QueueId::new("orders", 0), 1));
        assert!(!history.trimmed_at(1, &QueueId::new("orders", 0), 2));
        // Judged once: a second replica applying the same trim adds nothing.
        trim(&mut history, &stored, 9_000, 2).unwrap();
        assert_eq!(history.trimmed_messages, 2);
    }

    #[test]
    fn size_retention_may_drop_only_beyond_the_limit_from_the_newest_and_never_the_newest() {
        let retention = Retention {
            ms: None,
            bytes: Some(15),
        };
        // Offsets 0, 1, 2 of 10 bytes each: 30 and 20 bytes from them to the newest.
        let (mut history, stored) = history(retention, 3, 0);
        trim(&mut history, &stored, 100, 2).unwrap();
        let newest = trim(&mut history, &stored, 100, 3).unwrap_err();
        assert_eq!(newest.checker, "retention", "{newest:?}");
        let (mut history, stored) = history_with_limit(25);
        trim(&mut history, &stored, 100, 1).unwrap();
        let within = trim(&mut history, &stored, 100, 2).unwrap_err();
        assert_eq!(
            within.checker, "retention",
            "20 bytes are within 25: {within:?}"
        );
    }

    fn history_with_limit(bytes: u64) -> (History, Vec<StoredMessage>) {
        let retention = Retention {
            ms: None,
            bytes: Some(bytes),
        };
        history(retention, 3, 0)
    }

    #[test]
    fn without_retention_no_trim_is_allowed() {
        let (mut history, stored) = history(Retention::default(), 2, 0);
        let any = trim(&mut history, &stored, 1_000_000, 1).unwrap_err();
        assert_eq!(any.checker, "retention");
    }

    #[test]
    fn a_retry_copy_ages_from_the_reconsume_later_that_made_it() {
        let retention = Retention {
            ms: Some(1_000),
            bytes: None,
        };
        let (mut history, stored) = history(retention, 1, 0);
        let found = Found {
            producer_id: 1,
            seq: 0,
            reconsume_times: 0,
            body: stored[0].message.body.clone(),
        };
        history.answered(at_ms(5_000), "billing", &found, false);
        let copy = StoredMessage {
            reconsume_times: 1,
            stored_ms: 5_010,
            ..stored[0].clone()
        };
        let retry = QueueId::retry("billing", 0);
        let young = history.trimmed(at_ms(5_900), 1, &retry, 1, |o| {
            (o == 0).then(|| copy.clone())
        });
        assert_eq!(young.unwrap_err().checker, "retention");
        history
            .trimmed(at_ms(6_000), 1, &retry, 1, |o| {
                (o == 0).then(|| copy.clone())
            })
            .unwrap();
        assert!(
            history
                .dropped_copies
                .contains(&("billing".to_string(), 1, 0))
        );
    }
}
