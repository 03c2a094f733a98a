//! Counters a node keeps about itself, and the snapshot of them that [`BrokerNode::stats`]
//! returns. The server exports them as metrics and tests read them, so both see the facts the
//! core counted as they happened instead of each inferring them by diffing state.
//!
//! Everything here is bounded: per-topic counters for topics the metadata table knows (at most
//! `TOPICS_MAX`), per consumer group and queue counters at most [`CONSUMER_COUNTERS_MAX`]
//! (a client names its consumer group, so it could invent as many as it likes), and the
//! per-queue lists of a snapshot at most [`STATS_QUEUES_MAX`] long.

use std::collections::BTreeMap;

use crate::broker::QueueId;
use crate::raft::{GroupId, Index, NodeId, RaftCounters, Role, Term};

use super::BrokerNode;

/// Most queues (and most consumer-group/queue pairs) a stats snapshot lists, so a scrape of a
/// node with a huge topic table stays a bounded amount of work; `truncated` says when more
/// were left out.
pub const STATS_QUEUES_MAX: usize = 16_384;

/// Most (broker group, consumer group, queue) triples a node keeps [`ConsumerCounters`] for.
/// Past it, events of a triple not yet counted are left uncounted (and counted in
/// `NodeStats::consumer_counters_uncounted`) rather than growing the table: a client can invent
/// consumer group names. Entries go when their topic or consumer group is deleted.
pub const CONSUMER_COUNTERS_MAX: usize = 16_384;

/// What one node counted about one of its replicas since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupCounters {
    /// Elections this replica won.
    pub elections_won: u64,
    /// Times this replica stopped leading.
    pub stepped_down: u64,
    /// Times this replica learned of a new leader (itself included).
    pub leader_changes: u64,
    /// Log entries applied to the state machine.
    pub entries_applied: u64,
    /// Commands in those entries.
    pub commands_applied: u64,
    /// Messages moved to a retry queue by `ReconsumeLater` (applied).
    pub reconsumed: u64,
    /// Messages moved to a dead-letter queue (applied).
    pub dead_lettered: u64,
    /// Queues a retention trim dropped messages from (applied).
    pub retention_trims: u64,
    /// Snapshots from the leader installed in place of the state.
    pub snapshots_restored: u64,
    /// Snapshots taken here that replaced a prefix of the log.
    pub snapshots_compacted: u64,
    /// The size of the newest snapshot taken or restored, bytes.
    pub snapshot_bytes_last: u64,
}

/// Traffic of one topic through this node, as leader of its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicCounters {
    /// Messages and body bytes of send requests proposed (a refused or retried send may be
    /// counted and not stored; see the queues' `next_offset` for what was stored).
    pub send_messages: u64,
    pub send_bytes: u64,
    /// Messages and body bytes handed to consumers in pull answers.
    pub pulled_messages: u64,
    pub pulled_bytes: u64,
    /// Of those, messages handed to their consumer group before: redeliveries.
    pub redelivered: u64,
}

/// What happened to one consumer group's messages on one queue (a retry queue counts as a
/// queue of its own: topic `%RETRY%<group>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerCounters {
    /// Messages handed to the consumer group in pull answers (as leader) that had been handed
    /// to it before.
    pub redelivered: u64,
    /// Messages of this queue the consumer group moved to its retry queue (`ReconsumeLater`,
    /// applied).
    pub reconsumed: u64,
    /// Messages of this queue moved to the consumer group's dead-letter queue (applied).
    pub dead_lettered: u64,
}

/// (broker group, consumer group, queue): the key of [`ConsumerCounters`].
pub(super) type ConsumerKey = (GroupId, String, QueueId);

/// The node's own counters, updated as inputs arrive and outputs leave.
#[derive(Clone, Debug, Default)]
pub(super) struct Counters {
    pub groups: BTreeMap<GroupId, GroupCounters>,
    pub requests: BTreeMap<&'static str, u64>,
    pub responses: BTreeMap<&'static str, u64>,
    pub topics: BTreeMap<String, TopicCounters>,
    pub consumers: BTreeMap<ConsumerKey, ConsumerCounters>,
    /// Events not counted because `consumers` was full.
    pub consumers_uncounted: u64,
}

impl Counters {
    pub fn group(&mut self, group: GroupId) -> &mut GroupCounters {
        self.groups.entry(group).or_default()
    }

    /// The counters of `topic`, which the caller checked the topic table knows (so the map
    /// stays within `TOPICS_MAX` plus the retry and dead-letter topics of live groups).
    pub fn topic(&mut self, topic: &str) -> &mut TopicCounters {
        self.topics.entry(topic.to_string()).or_default()
    }

    /// The counters of consumer group `consumer_group` on `queue` of broker group `group`;
    /// `None` (and the event counted as uncounted) when the table is at
    /// [`CONSUMER_COUNTERS_MAX`] and does not hold them yet.
    pub fn consumer(
        &mut self,
        group: GroupId,
        consumer_group: &str,
        queue: &QueueId,
    ) -> Option<&mut ConsumerCounters> {
        let key = (group, consumer_group.to_string(), queue.clone());
        if self.consumers.len() >= CONSUMER_COUNTERS_MAX && !self.consumers.contains_key(&key) {
            self.consumers_uncounted += 1;
            return None;
        }
        Some(self.consumers.entry(key).or_default())
    }

    /// Consumer group `consumer_group` was deleted (or expired) in broker group `group`: its
    /// series end, those of its retry and dead-letter topics included (node-wide: a group
    /// deleted from the cluster is deleted in every broker group).
    pub fn forget_consumer_group(&mut self, group: GroupId, consumer_group: &str) {
        self.consumers
            .retain(|(g, c, _), _| !(*g == group && c == consumer_group));
        self.topics
            .remove(&*QueueId::retry(consumer_group, 0).topic);
        self.topics
            .remove(&*QueueId::dead_letter(consumer_group).topic);
    }

    /// Queues of `topic` in broker group `group` for which `gone` holds were dropped: their
    /// consumer series end.
    pub fn forget_queues(&mut self, group: GroupId, topic: &str, gone: impl Fn(&QueueId) -> bool) {
        self.consumers
            .retain(|(g, _, q), _| !(*g == group && &*q.topic == topic && gone(q)));
    }
}

/// A replica at the moment of the snapshot, with its counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStats {
    pub group: GroupId,
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub commit_index: Index,
    pub applied_index: Index,
    pub last_index: Index,
    pub snapshot_index: Index,
    pub counters: GroupCounters,
    /// The protocol paths the replica took since this node started (elections, PreVote,
    /// CheckQuorum, transfers, snapshots, repairs).
    pub raft: RaftCounters,
}

/// A queue of a broker group, as this replica has applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    pub group: GroupId,
    pub queue: QueueId,
    /// Messages ever appended: the offset the next one gets.
    pub next_offset: u64,
    /// The oldest offset retention kept.
    pub start_offset: u64,
}

/// How far one consumer group is behind on one queue, as this replica has applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagStats {
    pub group: GroupId,
    pub consumer_group: String,
    pub queue: QueueId,
    pub consume_offset: u64,
    /// Messages waiting: `next_offset - consume_offset`.
    pub lag: u64,
}

/// One consumer group's counters on one queue of a broker group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerStats {
    pub group: GroupId,
    pub consumer_group: String,
    pub queue: QueueId,
    pub counters: ConsumerCounters,
}

/// Everything [`BrokerNode::stats`] reports. Pure data: reading it changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStats {
    pub node: NodeId,
    pub groups: Vec<GroupStats>,
    /// Client requests taken, by kind (`Request::kind`).
    pub requests: BTreeMap<&'static str, u64>,
    /// Answers handed out, by kind (`Response::kind`): refusals are `refused`, `not_leader`,
    /// `busy` and `revoked`.
    pub responses: BTreeMap<&'static str, u64>,
    pub topics: BTreeMap<String, TopicCounters>,
    pub queues: Vec<QueueStats>,
    pub lag: Vec<LagStats>,
    /// Redeliveries, retries and dead letters per consumer group and queue, at most
    /// [`CONSUMER_COUNTERS_MAX`].
    pub consumers: Vec<ConsumerStats>,
    /// Events left out of `consumers` because it was full.
    pub consumer_counters_uncounted: u64,
    /// Pulls waiting for messages or for their queue's lease.
    pub parked_pulls: u64,
    /// Whether `queues` or `lag` stopped at [`STATS_QUEUES_MAX`].
    pub truncated: bool,
}

impl NodeStats {
    /// Whether every replica on this node knows a leader: the node can serve or redirect
    /// every request.
    pub fn every_group_has_leader(&self) -> bool {
        !self.groups.is_empty() && self.groups.iter().all(|g| g.leader.is_some())
    }
}

impl BrokerNode {
    /// A snapshot of what this node counted and of its replicas' positions; see [`NodeStats`].
    pub fn stats(&self) -> NodeStats {
        let mut queues = Vec::new();
        let mut lag = Vec::new();
        let mut truncated = false;
        let groups = self
            .groups()
            .filter_map(|group| {
                let replica = self.replica(group)?;
                let s = replica.status();
                Some(GroupStats {
                    group,
                    role: s.role,
                    term: s.term,
                    leader: s.leader,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    last_index: s.last_index,
                    snapshot_index: s.snapshot_index,
                    counters: self
                        .counters
                        .groups
                        .get(&group)
                        .cloned()
                        .unwrap_or_default(),
                    raft: replica.counters(),
                })
            })
            .collect();
        for group in self.groups() {
            let Some(state) = self.broker_state(group) else {
                continue;
            };
            for queue in state.queues() {
                if queues.len() >= STATS_QUEUES_MAX {
                    truncated = true;
                    break;
                }
                queues.push(QueueStats {
                    group,
                    queue: queue.clone(),
                    next_offset: state.queue_len(queue).unwrap_or(0),
                    start_offset: state.start_offset(queue).unwrap_or(0),
                });
            }
            for (consumer_group, queue, consume_offset) in state.consume_offsets() {
                if lag.len() >= STATS_QUEUES_MAX {
                    truncated = true;
                    break;
                }
                let next = state.queue_len(queue).unwrap_or(0);
                lag.push(LagStats {
                    group,
                    consumer_group: consumer_group.to_string(),
                    queue: queue.clone(),
                    consume_offset,
                    lag: next.saturating_sub(consume_offset),
                });
            }
            // A queue claimed and never acknowledged in has no offsets yet: all of it waits.
            let acked: std::collections::BTreeSet<(&str, &QueueId)> = state
                .consume_offsets()
                .map(|(consumer_group, queue, _)| (consumer_group, queue))
                .collect();
            for ((consumer_group, queue), _) in state.leases() {
                if acked.contains(&(consumer_group.as_str(), queue)) {
                    continue;
                }
                let (Some(start), Some(next)) = (state.start_offset(queue), state.queue_len(queue))
                else {
                    continue;
                };
                if lag.len() >= STATS_QUEUES_MAX {
                    truncated = true;
                    break;
                }
                lag.push(LagStats {
                    group,
                    consumer_group: consumer_group.clone(),
                    queue: queue.clone(),
                    consume_offset: start,
                    lag: next.saturating_sub(start),
                });
            }
        }
        NodeStats {
            node: self.id(),
            groups,
            requests: self.counters.requests.clone(),
            responses: self.counters.responses.clone(),
            topics: self.counters.topics.clone(),
            queues,
            lag,
            consumers: self
                .counters
                .consumers
                .iter()
                .map(|((group, consumer_group, queue), counters)| ConsumerStats {
                    group: *group,
                    consumer_group: consumer_group.clone(),
                    queue: queue.clone(),
                    counters: counters.clone(),
                })
                .collect(),
            consumer_counters_uncounted: self.counters.consumers_uncounted,
            parked_pulls: self.parked_pulls() as u64,
            truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_counters_stop_growing_at_their_maximum_and_go_with_group_or_topic() {
        let mut counters = Counters::default();
        let q = |topic: &str, queue| QueueId::new(topic, queue);
        for i in 0..CONSUMER_COUNTERS_MAX {
            let c = counters.consumer(1, &format!("g{i}"), &q("orders", 0));
            c.expect("room for it").redelivered += 1;
        }
        // A new triple past the maximum is left uncounted; known ones still count.
        assert!(counters.consumer(1, "invented", &q("orders", 0)).is_none());
        assert!(counters.consumer(2, "g0", &q("orders", 0)).is_none());
        assert_eq!(counters.consumers_uncounted, 2);
        counters
            .consumer(1, "g0", &q("orders", 0))
            .expect("known")
            .reconsumed += 1;
        assert_eq!(counters.consumers.len(), CONSUMER_COUNTERS_MAX);
        assert_eq!(
            counters.consumers[&(1, "g0".to_string(), q("orders", 0))],
            ConsumerCounters {
                redelivered: 1,
                reconsumed: 1,
                dead_lettered: 0,
            }
        );

        // Deleting a consumer group ends its series and its retry and dead-letter topics'.
        counters.topic("%RETRY%g0").pulled_messages += 1;
        counters.topic("%DLQ%g0").pulled_messages += 1;
        counters.topic("orders").pulled_messages += 1;
        counters.forget_consumer_group(1, "g0");
        assert!(!counters.consumers.keys().any(|(_, g, _)| g == "g0"));
        assert_eq!(counters.topics.keys().collect::<Vec<_>>(), vec!["orders"]);
        assert_eq!(counters.consumers.len(), CONSUMER_COUNTERS_MAX - 1);
        // ... which makes room again.
        assert!(counters.consumer(2, "g0", &q("orders", 0)).is_some());

        // A dropped topic's queues go; another broker group's or a kept queue's stay.
        counters.forget_queues(1, "orders", |queue| queue.queue == 0);
        assert_eq!(counters.consumers.len(), 1);
        assert!(counters.consumer(1, "g1", &q("orders", 1)).is_some());
        counters.forget_queues(1, "orders", |queue| queue.queue == 0);
        assert_eq!(
            counters.consumers.keys().collect::<Vec<_>>(),
            vec![
                &(1, "g1".to_string(), q("orders", 1)),
                &(2, "g0".to_string(), q("orders", 0)),
            ]
        );
    }
}
