//! What the queue's clients saw, and the checks of DESIGN §1 over it, named as Jepsen names
//! them: lost, unexpected, duplicated, inconsistent-offsets, nonmonotonic-poll,
//! offset-regression, and order; and dead-letter, on when a message gives up retrying.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use holdfast_core::broker::{BrokerState, Offset, ProducerId, QueueId, Seq};
use holdfast_core::raft::GroupId;
use holdfast_core::time::Instant;

use crate::checker::{Violation, violation};

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
    /// had been reconsumed when it was delivered.
    nacked: BTreeSet<(String, ProducerId, Seq, u32)>,
    /// The highest consume offset each replica incarnation has shown, to catch regressions.
    consume_seen: BTreeMap<(u64, u64, GroupId, String, QueueId), Offset>,
}

impl History {
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
    pub fn answered(&mut self, group: &str, found: &Found, success: bool) {
        let (p, s) = (found.producer_id, found.seq);
        if success {
            self.succeeded.insert((group.to_string(), p, s));
        } else {
            self.nacked
                .insert((group.to_string(), p, s, found.reconsume_times));
        }
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
        // listeners answered it `Success` (or it went to the group's dead-letter queue).
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
                let found = found_at(*broker, queue, offset);
                let expected = (*producer_id, seq, body);
                if found.as_ref().map(|f| (f.producer_id, f.seq, &f.body)) != Some(expected) {
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
                    !self.succeeded.contains(&key) && !dead_letters.contains(&key)
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
            if !again {
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
                        || !self.nacked.contains(&last_nack)
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
                                    .map(|(_, _, _, r)| *r)
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
