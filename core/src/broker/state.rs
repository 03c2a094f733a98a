//! The applied state of one broker group.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::codec::decode_command;
use super::dedup::{ProducerWindow, Verdict};
use super::offsets::GroupOffsets;
use super::queue_log::{IndexEntry, QueueLog};
use super::snapshot::{
    self, Decoded, ImageRef, IndexImageRef, ProducersRef, QueueIndexesRef as QueuesIndexRef,
    QueuesRef, ReadMessage, SnapshotError,
};
use super::store::{QueueRange, Requeue, StoreOp};
use super::types::*;
use crate::limits::PRODUCERS_PER_GROUP_MAX;
use crate::raft::Canary;

#[derive(Debug, Default)]
pub struct BrokerState {
    config: BrokerConfig,
    queues: BTreeMap<QueueId, QueueLog>,
    /// `(group, queue)` to the group's progress there.
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    /// Shared with a snapshot job's copy of the state, so that copying it on the event loop
    /// costs a reference count per producer; a window the state writes to afterwards is
    /// copied then, once (profiled: copying every window, up to 65,536 batches each, was
    /// the event loop's largest cost of a snapshot).
    producers: BTreeMap<ProducerId, Arc<ProducerWindow>>,
    /// Derived from `producers` (not in the snapshot): each producer by when it last wrote,
    /// least recent first, and the latest such time.
    by_touch: BTreeSet<(u64, ProducerId)>,
    touched_max: u64,
    /// `(consumer group, queue)` to who holds it: see [`Command::Claim`].
    leases: BTreeMap<(String, QueueId), Lease>,
    /// Bytes the queues' caches hold, and which message each cached byte belongs to, oldest
    /// first: the cache of the whole group stays within `config.cache_bytes_max`.
    pub(super) cache_bytes: u64,
    pub(super) cache_order: VecDeque<(QueueId, Offset)>,
    /// The length of `cache_order` when it was last pruned or looked at.
    order_checked: usize,
    /// What the driver's queue store must do, in order; see [`BrokerState::take_store_ops`].
    store_ops: Vec<StoreOp>,
    /// Each topic's incarnation here (a topic with queues but no mark is of epoch 0), and the
    /// dropped ones, at most `TOMBSTONES_MAX` of those: see [`Command::DropTopic`].
    marks: BTreeMap<String, TopicMark>,
}

impl Clone for BrokerState {
    /// The state without its cache or pending store operations: what a snapshot job needs
    /// (it reads messages from the store), at the cost of the index, not of the messages.
    fn clone(&self) -> BrokerState {
        // Sharing the index's full blocks: a reference count per thousand messages, where
        // copying the entries (and the cache, only to drop it) cost the event loop tens of
        // milliseconds per snapshot with a million messages retained.
        let queues = self
            .queues
            .iter()
            .map(|(queue, log)| (queue.clone(), log.index_only()))
            .collect();
        BrokerState {
            config: self.config.clone(),
            queues,
            offsets: self.offsets.clone(),
            producers: self.producers.clone(),
            by_touch: self.by_touch.clone(),
            touched_max: self.touched_max,
            leases: self.leases.clone(),
            cache_bytes: 0,
            cache_order: VecDeque::new(),
            order_checked: 0,
            store_ops: Vec::new(),
            marks: self.marks.clone(),
        }
    }
}

impl BrokerState {
    /// An empty state; its first store operation forgets whatever the store held.
    pub fn new(config: BrokerConfig) -> BrokerState {
        BrokerState {
            config,
            store_ops: vec![StoreOp::Reset],
            ..BrokerState::default()
        }
    }

    /// The store operations applying commands asked for since the last call, in order.
    pub fn take_store_ops(&mut self) -> Vec<StoreOp> {
        std::mem::take(&mut self.store_ops)
    }

    /// Appends `stored` to `queue` (which exists), writes it to the store and caches it.
    fn store(&mut self, queue: &QueueId, stored: StoredMessage) -> Offset {
        let Some(log) = self.queues.get_mut(queue) else {
            return 0;
        };
        let size = stored.message.size_bytes() as u64;
        let cache = size <= self.config.cache_bytes_max;
        let (offset, freed) = log.push(&stored, cache);
        self.cache_bytes -= freed;
        self.store_ops.push(StoreOp::Write {
            queue: queue.clone(),
            offset,
            message: stored,
        });
        if cache {
            self.cache_bytes += size;
            self.cache_order.push_back((queue.clone(), offset));
            self.evict();
        }
        offset
    }

    /// Drops the oldest cached messages while the cache is over its size. An entry of the
    /// order whose message went already (retention, or an uncached write) frees nothing.
    fn evict(&mut self) {
        while self.cache_bytes > self.config.cache_bytes_max {
            let Some((queue, offset)) = self.cache_order.pop_front() else {
                self.cache_bytes = 0;
                return;
            };
            if let Some(log) = self.queues.get_mut(&queue) {
                self.cache_bytes -= log.evict(offset);
            }
        }
        // The order must not outgrow the cache it describes: entries whose messages went
        // (retention, an uncached write) are dropped once they outnumber the cached ones,
        // looked for only when the order doubled since the last look, so writes cost no pass
        // over the queues each.
        let len = self.cache_order.len();
        if len > 2 * self.order_checked.max(1024) {
            self.order_checked = len;
        }
        if len == self.order_checked && len > 2 * self.cached_count() + 1024 {
            let queues = &self.queues;
            self.cache_order.retain(|(queue, offset)| {
                queues
                    .get(queue)
                    .is_some_and(|log| log.cached(*offset).is_some())
            });
            self.order_checked = self.cache_order.len();
        }
    }

    fn cached_count(&self) -> usize {
        // Only called when the order is long; a pass over the queues, not over messages.
        self.queues
            .values()
            .map(|log| (log.end() - log.cached_from()) as usize)
            .sum()
    }

    /// What the parts of the state must agree on, or the first disagreement: each queue's
    /// cache a suffix of its messages as the index holds them; the cache's byte count (their
    /// sizes summed) within its bound, and every cached message in the eviction order (else
    /// nothing would ever evict it); consume offsets and acks within their queues; as many
    /// producers in the order by last write as there are. A pass over the cache, the order
    /// and the offsets, not over every retained message: the simulator runs it on every node
    /// at its periodic checks. [`BrokerState::check_invariants_fully`] adds the rest.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check(false)
    }

    /// [`BrokerState::check_invariants`], and every retained message indexed with each
    /// queue's byte count their sizes summed, and each producer's window and its place in
    /// the order by last write: a pass over the whole state. The core's unit tests run it
    /// after every command on small states, the simulator at the end of a run.
    pub fn check_invariants_fully(&self) -> Result<(), String> {
        self.check(true)?;
        for (id, window) in &self.producers {
            if !window.consistent() {
                return Err(format!("producer {id:?}'s window: {window:?}"));
            }
            if !self.by_touch.contains(&(window.touched, *id)) || window.touched > self.touched_max
            {
                return Err(format!(
                    "producer {id:?} last wrote at {}, the order by last write does not say so \
                     (latest {})",
                    window.touched, self.touched_max
                ));
            }
        }
        Ok(())
    }

    fn check(&self, every_entry: bool) -> Result<(), String> {
        let mut cached_bytes = 0;
        for (queue, log) in &self.queues {
            log.check_invariants(every_entry)
                .map_err(|e| format!("{queue}: {e}"))?;
            cached_bytes += log.cached_bytes();
        }
        if cached_bytes != self.cache_bytes {
            return Err(format!(
                "the cache counts {} bytes and holds {cached_bytes}",
                self.cache_bytes
            ));
        }
        if self.cache_bytes > self.config.cache_bytes_max {
            return Err(format!(
                "the cache holds {} bytes, past its bound of {}",
                self.cache_bytes, self.config.cache_bytes_max
            ));
        }
        // Each queue's cached offsets, marked as the order names them.
        let mut named: BTreeMap<&QueueId, Vec<bool>> = self
            .queues
            .iter()
            .map(|(queue, log)| (queue, vec![false; (log.end() - log.cached_from()) as usize]))
            .collect();
        for (queue, offset) in &self.cache_order {
            if let (Some(log), Some(marks)) = (self.queues.get(queue), named.get_mut(queue))
                && let Some(i) = offset.checked_sub(log.cached_from())
                && let Some(mark) = marks.get_mut(i as usize)
            {
                *mark = true;
            }
        }
        for (queue, marks) in &named {
            if let Some(i) = marks.iter().position(|named| !named) {
                let offset = self.queues.get(*queue).map_or(0, QueueLog::cached_from) + i as u64;
                return Err(format!(
                    "{queue}@{offset} is cached but not in the eviction order"
                ));
            }
        }
        for ((group, queue), offsets) in &self.offsets {
            if let Some(log) = self.queues.get(queue)
                && !offsets.consistent(log.end())
            {
                return Err(format!(
                    "{group}'s offsets in {queue} (ending at {}): {offsets:?}",
                    log.end()
                ));
            }
        }
        if self.by_touch.len() != self.producers.len() {
            return Err(format!(
                "{} producers, {} in the order by last write",
                self.producers.len(),
                self.by_touch.len()
            ));
        }
        Ok(())
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The applied state as bytes (see [`BrokerState::restore`]): queues with their retained
    /// messages and start offsets, every group's consume offset and acks, every producer's
    /// dedup window. Not the config, which each node has from its own configuration. Equal
    /// states give equal bytes, so replicas can compare snapshots. The messages come from the
    /// cache or else from `read` (the queue store); an error if one cannot be read.
    pub fn snapshot_with(&self, read: &mut ReadMessage<'_>) -> Result<Vec<u8>, String> {
        let mut from_cache_or_read = |queue: &QueueId, offset: Offset| match self
            .queues
            .get(queue)
            .and_then(|log| log.cached(offset))
        {
            Some(stored) => Ok(stored.clone()),
            None => read(queue, offset),
        };
        snapshot::encode(&ImageRef {
            queues: QueuesRef {
                queues: &self.queues,
                read: RefCell::new(&mut from_cache_or_read),
            },
            offsets: &self.offsets,
            producers: ProducersRef(&self.producers),
            leases: &self.leases,
            marks: &self.marks,
        })
    }

    /// [`BrokerState::snapshot_with`] from the cache alone: for states whose cache holds every
    /// retained message (tests, fuzzing). Empty bytes, refused on restore, if it does not.
    pub fn snapshot(&self) -> Vec<u8> {
        self.snapshot_with(&mut |queue, offset| {
            Err(format!("{queue}@{offset} is not in the cache"))
        })
        .unwrap_or_default()
    }

    /// The applied state as a metadata snapshot: everything [`BrokerState::snapshot_with`]
    /// writes except the messages' bytes, with a few bytes per retained message for the index
    /// instead. Its size depends on queues, groups, producers and how many messages are
    /// retained, not on their bytes. It stands for the state only together with the queue
    /// store that holds the messages, which the driver must sync before it writes the
    /// snapshot anywhere a restart reads it (see [`StoreOp::Recover`]).
    pub fn metadata_snapshot(&self) -> Result<Vec<u8>, String> {
        snapshot::encode_index(&IndexImageRef {
            queues: QueuesIndexRef(&self.queues),
            offsets: &self.offsets,
            producers: ProducersRef(&self.producers),
            leases: &self.leases,
            marks: &self.marks,
        })
    }

    /// [`BrokerState::metadata_snapshot`] as the previous format (version 5) wrote it, for
    /// tests that a restart from an older build's snapshot still works.
    #[cfg(test)]
    pub(super) fn metadata_snapshot_v5(&self) -> Vec<u8> {
        snapshot::v5::encode(&snapshot::v5::IndexImageRef {
            queues: snapshot::v5::QueueIndexesRef(&self.queues),
            offsets: &self.offsets,
            producers: ProducersRef(&self.producers),
            leases: &self.leases_v1(),
            marks: &self.marks,
        })
    }

    /// [`BrokerState::metadata_snapshot`] as the build before tenures (version 6) wrote it.
    #[cfg(test)]
    pub(super) fn metadata_snapshot_v6(&self) -> Vec<u8> {
        snapshot::encode_index_v6(&IndexImageRef {
            queues: QueuesIndexRef(&self.queues),
            offsets: &self.offsets,
            producers: ProducersRef(&self.producers),
            leases: &self.leases_v1(),
            marks: &self.marks,
        })
    }

    #[cfg(test)]
    fn leases_v1(&self) -> BTreeMap<(String, QueueId), snapshot::LeaseV1> {
        self.leases
            .iter()
            .map(|(k, l)| (k.clone(), l.into()))
            .collect()
    }

    /// The state [`BrokerState::snapshot`] or [`BrokerState::metadata_snapshot`] wrote, under
    /// `config`. Damaged, truncated or foreign bytes, or another format version, are an
    /// error, never a panic or a partial state. A snapshot with messages writes them to the
    /// store again (writes of what the store holds already change nothing); a metadata
    /// snapshot asks the store to check that it holds what the index references
    /// ([`StoreOp::Recover`]).
    pub fn restore(config: BrokerConfig, bytes: &[u8]) -> Result<BrokerState, SnapshotError> {
        let (queues, offsets, producers, leases, marks) = match snapshot::decode(bytes)? {
            Decoded::Full(image) => (
                Ok(image.queues),
                image.offsets,
                image.producers,
                image.leases,
                image.marks,
            ),
            Decoded::Index(image) => (
                Err(image.queues),
                image.offsets,
                image.producers,
                image.leases,
                image.marks,
            ),
        };
        let producers: BTreeMap<ProducerId, ProducerWindow> =
            if Canary::SnapshotOmitsDedup.planted(config.canary) {
                BTreeMap::new()
            } else {
                producers
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
        let mut state = BrokerState {
            config,
            queues: BTreeMap::new(),
            offsets,
            producers: producers
                .into_iter()
                .map(|(id, window)| (id, Arc::new(window)))
                .collect(),
            by_touch,
            touched_max,
            leases,
            cache_bytes: 0,
            cache_order: VecDeque::new(),
            order_checked: 0,
            store_ops: Vec::new(),
            marks,
        };
        match queues {
            // The store gets the snapshot's messages, the cache its newest.
            Ok(queues) => {
                for (queue, image) in queues {
                    state
                        .queues
                        .insert(queue.clone(), QueueLog::starting_at(image.start));
                    for stored in image.messages {
                        state.store(&queue, stored);
                    }
                }
            }
            // The store holds the messages; the cache starts empty.
            Err(queues) => {
                let mut ranges = Vec::with_capacity(queues.len());
                for (queue, log) in queues {
                    ranges.push(QueueRange {
                        queue: queue.clone(),
                        start: log.start(),
                        end: log.end(),
                    });
                    state.queues.insert(queue, log);
                }
                state.store_ops.push(StoreOp::Recover { queues: ranges });
            }
        }
        Ok(state)
    }

    /// A state just restored from a metadata snapshot on this node's disk, told the commands
    /// of the log after that snapshot, which replaying will apply: the queues they drop (a
    /// [`Command::DropTopic`] of their incarnation or a newer one, or a creation of a newer
    /// incarnation of their topic) are no longer asked of the store ([`StoreOp::Recover`]),
    /// which drops them at once. The store removed their files when the drop was applied
    /// before the crash, and the snapshot that no longer references them may not have been
    /// written yet: without this, a restart in that window found the files gone and took it
    /// for damage, and no peer can repair a queue every replica dropped. Until the replay
    /// drops them, a read of those queues fails like a read of a damaged record (the pull
    /// ends before it). Returns the queues no longer asked of the store.
    ///
    /// The drop is certain even if these entries are not committed yet: a DropTopic or a
    /// newer creation is proposed only once the metadata group's tombstone for the
    /// incarnation is committed, and a leader proposes it again until it is applied.
    pub fn expect_replay<'a>(
        &mut self,
        commands: impl IntoIterator<Item = &'a Command>,
    ) -> Vec<QueueId> {
        let mut dropped_from: BTreeMap<&str, u64> = BTreeMap::new();
        let mut newer_than: BTreeMap<&str, u64> = BTreeMap::new();
        for command in commands {
            match command {
                // Drops the incarnation `epoch` and every older one.
                Command::DropTopic { topic, epoch } => {
                    let e = dropped_from.entry(topic.as_str()).or_insert(*epoch);
                    *e = (*e).max(*epoch);
                }
                // Drops every incarnation older than `epoch`.
                Command::CreateQueuesAt { queues } => {
                    for (epoch, queue) in queues {
                        let e = newer_than.entry(queue.topic.as_ref()).or_insert(*epoch);
                        *e = (*e).max(*epoch);
                    }
                }
                _ => {}
            }
        }
        if dropped_from.is_empty() && newer_than.is_empty() {
            return Vec::new();
        }
        let marks = &self.marks;
        let goes = |queue: &QueueId| {
            let epoch = marks.get(&*queue.topic).map_or(0, |m| m.epoch);
            dropped_from
                .get(queue.topic.as_ref())
                .is_some_and(|e| *e >= epoch)
                || newer_than
                    .get(queue.topic.as_ref())
                    .is_some_and(|e| *e > epoch)
        };
        let mut gone = Vec::new();
        for op in &mut self.store_ops {
            if let StoreOp::Recover { queues } = op {
                queues.retain(|range| {
                    let keep = !goes(&range.queue);
                    if !keep {
                        gone.push(range.queue.clone());
                    }
                    keep
                });
            }
        }
        gone
    }

    /// A state restored from a metadata snapshot installed from node `from`: its store must
    /// fetch what it lacks ([`StoreOp::CatchUp`]) instead of only checking what it holds.
    pub fn catching_up_from(mut self, from: u64) -> BrokerState {
        for op in &mut self.store_ops {
            if let StoreOp::Recover { queues } = op {
                *op = StoreOp::CatchUp {
                    from,
                    queues: std::mem::take(queues),
                };
            }
        }
        self
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
        let outcome = self.apply_unchecked(command);
        // A pass over every retained message: on small states only, or a test of tens of
        // thousands of messages would be quadratic.
        #[cfg(test)]
        if self.queues.values().map(QueueLog::len).sum::<usize>() <= 4_096
            && self.producers.len() <= 4_096
            && let Err(e) = self.check_invariants_fully()
        {
            panic!("after {outcome:?}: {e}");
        }
        outcome
    }

    fn apply_unchecked(&mut self, command: Command) -> Outcome {
        match command {
            // Logs from before epochs hold this: every topic of theirs is of epoch 0.
            Command::CreateQueues { queues } => {
                for queue in queues {
                    self.create_queue(0, queue);
                }
                Outcome::QueuesCreated
            }
            Command::CreateQueuesAt { queues } => {
                for (epoch, queue) in queues {
                    self.create_queue(epoch, queue);
                }
                Outcome::QueuesCreated
            }
            Command::DropTopic { topic, epoch } => {
                self.drop_topic(&topic, epoch);
                Outcome::QueuesCreated
            }
            Command::ExpireGroups { groups } => {
                let mut offsets = 0;
                let mut leases = 0;
                for group in groups {
                    if let Outcome::GroupDeleted {
                        offsets: o,
                        leases: l,
                    } = self.delete_group(&group, true)
                    {
                        offsets += o;
                        leases += l;
                    }
                }
                Outcome::GroupDeleted { offsets, leases }
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
            Command::Seek {
                group,
                queue,
                to,
                force,
            } => self.seek(group, queue, to, force),
            Command::DeleteGroup { group, force } => self.delete_group(&group, force),
            Command::Redrive {
                group,
                messages_max,
                stamp_ms,
            } => self.redrive(group, messages_max, stamp_ms),
        }
    }

    /// A member holding one of `group`'s queues (of `only`, if given), if any.
    fn active_holder(&self, group: &str, only: Option<&QueueId>) -> Option<Refusal> {
        self.leases
            .iter()
            .filter(|((g, q), _)| g == group && only.is_none_or(|o| o == q))
            .find_map(|((g, q), lease)| {
                lease.owner.as_ref().map(|member| Refusal::GroupActive {
                    group: g.clone(),
                    queue: q.clone(),
                    member: member.clone(),
                })
            })
    }

    fn seek(&mut self, group: String, queue: QueueId, to: SeekTo, force: bool) -> Outcome {
        let Some(log) = self.queues.get(&queue) else {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        };
        if !force && let Some(refusal) = self.active_holder(&group, Some(&queue)) {
            return Outcome::Refused(refusal);
        }
        let target = match to {
            SeekTo::Earliest => log.start(),
            SeekTo::Latest => log.end(),
            SeekTo::Offset(offset) => offset.clamp(log.start(), log.end()),
            SeekTo::Time(ms) => log.first_stored_at_or_after(ms),
        };
        self.offsets
            .insert((group, queue), GroupOffsets::starting_at(target));
        Outcome::Sought {
            consume_offset: target,
        }
    }

    /// Creates `queue` as a queue of its topic's incarnation `epoch` (see
    /// [`Command::CreateQueuesAt`]).
    fn create_queue(&mut self, epoch: u64, queue: QueueId) {
        let mark = self.marks.get(&*queue.topic).copied().unwrap_or_default();
        if mark.epoch > epoch || (mark.epoch == epoch && mark.dropped) {
            return; // a creation of an incarnation gone already
        }
        if mark.epoch < epoch && !mark.dropped {
            // The older incarnation's deletion never arrived (its tombstone was forgotten):
            // its queues must not pass for the new one's.
            self.drop_topic(&queue.topic, mark.epoch);
        }
        if mark.epoch != epoch || mark.dropped {
            self.marks.insert(
                queue.topic.to_string(),
                TopicMark {
                    epoch,
                    dropped: false,
                },
            );
        }
        self.queues.entry(queue).or_default();
    }

    /// [`Command::DropTopic`]: the queues of `topic` of incarnation `epoch` or older go, with
    /// their messages (in the store too) and every group's offsets and leases on them.
    fn drop_topic(&mut self, topic: &str, epoch: u64) {
        let mark = self.marks.get(topic).copied().unwrap_or_default();
        if mark.epoch > epoch || (mark.epoch == epoch && mark.dropped) {
            return;
        }
        let gone: Vec<QueueId> = self
            .queues
            .range(QueueId::new(topic, 0)..=QueueId::new(topic, u32::MAX))
            .map(|(q, _)| q.clone())
            .collect();
        for queue in gone {
            if let Some(mut log) = self.queues.remove(&queue) {
                self.cache_bytes -= log.drop_cache();
            }
            self.store_ops.push(StoreOp::DropQueue { queue });
        }
        self.offsets.retain(|(_, q), _| &*q.topic != topic);
        self.leases.retain(|(_, q), _| &*q.topic != topic);
        let dropped = self.marks.values().filter(|m| m.dropped).count();
        if dropped >= crate::limits::TOMBSTONES_MAX
            && let Some(oldest) = self
                .marks
                .iter()
                .filter(|(t, m)| m.dropped && t.as_str() != topic)
                .min_by_key(|(_, m)| m.epoch)
                .map(|(t, _)| t.clone())
        {
            self.marks.remove(&oldest);
        }
        self.marks.insert(
            topic.to_string(),
            TopicMark {
                epoch,
                dropped: true,
            },
        );
    }

    /// What this group knows of `topic`'s incarnation, if anything.
    pub fn topic_mark(&self, topic: &str) -> Option<TopicMark> {
        self.marks.get(topic).copied()
    }

    /// Every consumer group with offsets or leases here, by name (for group expiry).
    pub fn consumer_groups(&self) -> BTreeSet<&str> {
        self.offsets
            .keys()
            .chain(self.leases.keys())
            .map(|(g, _)| g.as_str())
            .collect()
    }

    fn delete_group(&mut self, group: &str, force: bool) -> Outcome {
        if !force && let Some(refusal) = self.active_holder(group, None) {
            return Outcome::Refused(refusal);
        }
        let before = (self.offsets.len(), self.leases.len());
        self.offsets.retain(|(g, _), _| g != group);
        self.leases.retain(|(g, _), _| g != group);
        Outcome::GroupDeleted {
            offsets: (before.0 - self.offsets.len()) as u64,
            leases: (before.1 - self.leases.len()) as u64,
        }
    }

    /// [`Command::Redrive`]: each message is copied to the first retry queue (the cached
    /// original, or by the store as for a `ReconsumeLater`) and acknowledged in the
    /// dead-letter queue, both by this one command.
    fn redrive(&mut self, group: String, messages_max: u32, stamp_ms: u64) -> Outcome {
        let dlq = QueueId::dead_letter(&group);
        let Some(log) = self.queues.get(&dlq) else {
            return Outcome::Redriven {
                moved: 0,
                remaining: 0,
            };
        };
        let start = log.start();
        let key = (group.clone(), dlq.clone());
        let progress = self.offsets.get(&key);
        let from = progress.map_or(0, GroupOffsets::consume_offset).max(start);
        let unacked = || {
            log.iter_from(from)
                .filter(|(offset, _)| !progress.is_some_and(|p| p.is_acked(*offset)))
        };
        let waiting = unacked().count() as u64;
        let chosen: Vec<(Offset, IndexEntry, Option<StoredMessage>)> = unacked()
            .take(messages_max as usize)
            .map(|(offset, entry)| (offset, entry, log.cached(offset).cloned()))
            .collect();
        let to = QueueId::retry(&group, self.config.reconsume_level(1));
        let due_ms = stamp_ms.saturating_add(self.config.reconsume_delay_ms(1));
        let mut moved = 0u64;
        for (offset, entry, cached) in &chosen {
            let log = self.queues.entry(to.clone()).or_default();
            let mut requeue = Requeue {
                from: dlq.clone(),
                from_offset: *offset,
                to: to.clone(),
                offset: log.end(),
                reconsume_times: 0,
                due_ms,
                stored_ms: stamp_ms,
            };
            match cached {
                Some(stored) => {
                    let copy = requeue.copy_of(stored.clone());
                    self.store(&to, copy);
                }
                None => {
                    let (at, freed) = log.push_uncached(IndexEntry {
                        stored_ms: stamp_ms,
                        due_ms,
                        size: entry.size,
                        reconsume_times: 0,
                    });
                    self.cache_bytes -= freed;
                    requeue.offset = at;
                    self.store_ops.push(StoreOp::Requeue(requeue));
                }
            }
            self.offsets
                .entry(key.clone())
                .or_insert_with(|| GroupOffsets::starting_at(start))
                .ack(*offset);
            moved += 1;
        }
        Outcome::Redriven {
            moved,
            remaining: waiting - moved,
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
        Err(Refusal::not_owner(
            group.to_string(),
            queue.clone(),
            member.to_string(),
            generation,
            lease,
        ))
    }

    fn claim(
        &mut self,
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        takeover: Option<Holder>,
        tenure: u64,
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
        // The holder's claims continue its tenure: a pull from an earlier one, arriving late,
        // must not take the number back down to what a late release of that tenure names.
        let (since, tenure) = if lease.owner.as_deref() == Some(member.as_str()) {
            (lease.since, lease.tenure.max(tenure))
        } else {
            (generation, tenure)
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

    fn release(
        &mut self,
        group: String,
        queue: QueueId,
        member: String,
        generation: u64,
        tenure: u64,
    ) -> Outcome {
        if let Err(refusal) = self.holder_check(&group, &queue, &member, generation) {
            return Outcome::Refused(refusal);
        }
        let key = (group, queue);
        let Some(lease) = self.leases.get_mut(&key) else {
            return Outcome::Leased(Lease::default());
        };
        if tenure < lease.tenure {
            // Sent in an earlier tenure of this member's and held back: the member took the
            // queue again since and still consumes it.
            let (group, queue) = key;
            let lease = lease.clone();
            return Outcome::Refused(Refusal::not_owner(group, queue, member, generation, lease));
        }
        // The generation stays: the metadata may still give the queue to this member at this
        // generation (an expired lease taken over by a waiter whose claim then failed), and a
        // generation past every one handed out would fence everyone until the next rebalance
        // (campaigns found such stalls). A pull of the member's still on its way (a long poll
        // the release wakes) may claim the queue back: the member releases it again when that
        // pull's answer finds the queue no longer its, and a closing member waits for its
        // pulls' answers before it leaves.
        lease.owner = None;
        lease.generation = lease.generation.max(generation);
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
        let Some(log) = self.queues.get(&queue) else {
            return Outcome::Refused(Refusal::UnknownQueue(queue));
        };
        let base_offset = log.end();
        for (i, message) in messages.into_iter().enumerate() {
            let stored = StoredMessage {
                producer_id,
                seq: first_seq + i as Seq,
                message,
                stored_ms: stamp_ms,
                reconsume_times: 0,
                due_ms: 0,
                origin: None,
            };
            self.store(&queue, stored);
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
        let window = Arc::make_mut(self.producers.entry(producer_id).or_default());
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
        let entry = match log.entry(offset) {
            Some(entry) if !progress.is_acked(offset) => entry,
            _ => {
                return Outcome::Acked {
                    consume_offset: progress.consume_offset().max(start),
                };
            }
        };
        let cached = log.cached(offset).cloned();
        let attempt = entry.reconsume_times.saturating_add(1);
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
        progress.ack(offset);
        let log = self.queues.entry(to.clone()).or_default();
        let mut requeue = Requeue {
            from: queue,
            from_offset: offset,
            to: to.clone(),
            offset: log.end(),
            reconsume_times: attempt,
            due_ms,
            stored_ms: stamp_ms,
        };
        if !Canary::NackDropsMessage.planted(self.config.canary) {
            match cached {
                // The original is at hand: the copy is written (and cached) like any message.
                Some(stored) => {
                    let copy = requeue.copy_of(stored);
                    requeue.offset = self.store(&to, copy);
                }
                // Only the store holds the original: it makes the copy. The index learns what
                // it needs of the copy without its bytes.
                None => {
                    let (at, freed) = log.push_uncached(IndexEntry {
                        stored_ms: stamp_ms,
                        due_ms,
                        size: entry.size,
                        reconsume_times: attempt,
                    });
                    if !Canary::RequeueKeepsCacheBytes.planted(self.config.canary) {
                        self.cache_bytes -= freed;
                    }
                    requeue.offset = at;
                    self.store_ops.push(StoreOp::Requeue(requeue.clone()));
                }
            }
        }
        let end = self.queues.get(&to).map_or(0, QueueLog::end);
        Outcome::Requeued {
            to,
            offset: end.saturating_sub(1),
            dead_letter,
        }
    }

    /// Retention at the leader's time `stamp_ms`: see [`Command::Trim`]. Every group's consume
    /// offset on a trimmed queue moves up to the queue's new start, so the gap the dropped
    /// messages leave never holds it back (and the acks kept above it do not pile up).
    fn trim(&mut self, stamp_ms: u64) {
        for (queue, log) in &mut self.queues {
            let start = log.start();
            while front_expires(&self.config, log, stamp_ms) {
                self.cache_bytes -= log.pop_front();
            }
            if log.start() != start {
                self.store_ops.push(StoreOp::Trim {
                    queue: queue.clone(),
                    start: log.start(),
                });
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
    /// `auto.offset.reset=earliest` does. Served from the cache when it holds them all, else
    /// a read of the queue store is needed first (see [`BrokerState::finish_pull`]).
    pub fn plan_pull(
        &self,
        group: &str,
        queue: &QueueId,
        from: Offset,
        messages_max: usize,
        bytes_max: usize,
        now_ms: u64,
    ) -> Result<PullPlan, Refusal> {
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
        let mut offsets = Vec::new();
        let mut next_offset = start;
        let mut bytes = 0;
        for (offset, entry) in log.iter_from(start) {
            if offsets.len() >= messages_max || (!offsets.is_empty() && bytes >= bytes_max) {
                break;
            }
            if queue.is_retry()
                && entry.due_ms > now_ms
                && !Canary::RetryIgnoresDelay.planted(self.config.canary)
            {
                break;
            }
            next_offset = offset + 1;
            if progress.is_some_and(|p| p.is_acked(offset)) {
                continue;
            }
            bytes += entry.size as usize;
            offsets.push(offset);
        }
        if offsets.first().is_some_and(|o| *o < log.cached_from()) {
            return Ok(PullPlan::Read {
                offsets,
                next_offset,
            });
        }
        let label_shift = u64::from(Canary::ShiftPullOffsets.planted(self.config.canary));
        let messages = offsets
            .into_iter()
            .filter_map(|offset| Some((offset + label_shift, log.cached(offset)?.clone())))
            .collect();
        Ok(PullPlan::Ready(Pulled {
            messages,
            next_offset,
        }))
    }

    /// The pull [`BrokerState::plan_pull`] planned as a read of `offsets`, with `read` the
    /// messages the store gave back for a prefix of them. Offsets `group` acknowledged
    /// meanwhile are left out; where the store could not give a message, the pull ends
    /// before it, so nothing unproven is delivered and nothing is skipped.
    pub fn finish_pull(
        &self,
        group: &str,
        queue: &QueueId,
        offsets: &[Offset],
        next_offset: Offset,
        read: Vec<StoredMessage>,
    ) -> Pulled {
        let progress = self.offsets.get(&(group.to_string(), queue.clone()));
        let label_shift = u64::from(Canary::ShiftPullOffsets.planted(self.config.canary));
        let next_offset = match offsets.get(read.len()) {
            Some(unread) => *unread,
            None => next_offset,
        };
        let messages = offsets
            .iter()
            .zip(read)
            .filter(|(offset, _)| !progress.is_some_and(|p| p.is_acked(**offset)))
            .map(|(offset, stored)| (offset + label_shift, stored))
            .collect();
        Pulled {
            messages,
            next_offset,
        }
    }

    /// [`BrokerState::plan_pull`] served from the cache alone (tests): messages the cache no
    /// longer holds are left out.
    #[cfg(test)]
    pub fn pull(
        &self,
        group: &str,
        queue: &QueueId,
        from: Offset,
        messages_max: usize,
        bytes_max: usize,
        now_ms: u64,
    ) -> Result<Pulled, Refusal> {
        match self.plan_pull(group, queue, from, messages_max, bytes_max, now_ms)? {
            PullPlan::Ready(pulled) => Ok(pulled),
            PullPlan::Read {
                offsets,
                next_offset,
            } => {
                let read = offsets
                    .iter()
                    .map_while(|o| self.message(queue, *o).cloned())
                    .collect();
                Ok(self.finish_pull(group, queue, &offsets, next_offset, read))
            }
        }
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
            .map(|(_, entry)| entry.due_ms)
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

    /// The message at `offset`, if the queue retains one there and the cache holds it (the
    /// queue store holds every retained message).
    pub fn message(&self, queue: &QueueId, offset: Offset) -> Option<&StoredMessage> {
        self.queues.get(queue)?.cached(offset)
    }

    /// Whether the queue retains a message at `offset` (its bytes are in the store).
    pub fn retains(&self, queue: &QueueId, offset: Offset) -> bool {
        self.queues
            .get(queue)
            .is_some_and(|log| log.entry(offset).is_some())
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
    let too_old = config.retention_ms.is_some_and(|keep_ms| {
        let keep_ms = if Canary::TrimInsideRetention.planted(config.canary) {
            keep_ms / 2
        } else {
            keep_ms
        };
        oldest.stored_ms.saturating_add(keep_ms) <= stamp_ms
    });
    let too_big = config
        .retention_bytes
        .is_some_and(|limit| log.bytes() > limit && log.len() > 1);
    too_old || too_big
}
