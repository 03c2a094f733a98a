//! A whole cluster of nodes driven in memory: instant disks, a FIFO network, 1 ms steps.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use super::protocol::{ClientId, Request, Response, Route};
use super::*;
use crate::broker::{Message, QueueId, QueueRange, StoreOp};
use crate::client::{AckStatus, Consumer, ConsumerConfig, Producer, ProducerConfig, SendResult};
use crate::raft::{Envelope, GroupId, NodeId, Recovered, Role};
use crate::time::Instant;

mod node_table;
mod refusals;

struct Cluster {
    now: Instant,
    nodes: BTreeMap<NodeId, BrokerNode>,
    network: VecDeque<Envelope>,
    responses: Vec<(NodeId, ClientId, u64, Response)>,
    next_request: u64,
    /// Nodes that are stopped: no timers, and messages to them are lost.
    down: std::collections::BTreeSet<NodeId>,
    /// Check that every peer message fits a wire frame (it costs an encoding each).
    check_frames: bool,
    /// Each node's queue store.
    stores: BTreeMap<NodeId, crate::broker::MemoryStore>,
    /// Transfer images made, and store catch-ups carried out (copied from the peer's store).
    transfer_images: u64,
    catch_ups: u64,
    /// Messages of this group to this node wait in `held` until the test lets them go.
    hold: Option<(GroupId, NodeId)>,
    held: Vec<Envelope>,
}

impl Cluster {
    fn new(nodes: u64, broker_groups: u64) -> Cluster {
        Cluster::with(nodes, broker_groups, |_| {})
    }

    fn with(nodes: u64, broker_groups: u64, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        let ids: Vec<NodeId> = (1..=nodes).collect();
        let nodes = ids
            .iter()
            .map(|id| {
                let mut config = NodeConfig::new(*id, ids.clone(), broker_groups);
                tweak(&mut config);
                (
                    *id,
                    BrokerNode::new(config, BTreeMap::new(), *id, Instant::ZERO),
                )
            })
            .collect();
        Cluster {
            now: Instant::ZERO,
            nodes,
            network: VecDeque::new(),
            responses: Vec::new(),
            next_request: 1,
            down: std::collections::BTreeSet::new(),
            check_frames: false,
            stores: BTreeMap::new(),
            transfer_images: 0,
            catch_ups: 0,
            hold: None,
            held: Vec::new(),
        }
    }

    /// Delivers the messages held back, in their order, from the next step on.
    fn release_held(&mut self) {
        self.hold = None;
        for envelope in std::mem::take(&mut self.held).into_iter().rev() {
            self.network.push_front(envelope);
        }
    }

    /// What a file store does for [`StoreOp::CatchUp`]: copies every record it lacks from
    /// the peer's store, then checks it holds them all.
    fn catch_up(&mut self, id: NodeId, group: GroupId, from: NodeId, queues: Vec<QueueRange>) {
        self.catch_ups += 1;
        let source = self.stores.get(&from).cloned().unwrap_or_default();
        let store = self.stores.entry(id).or_default();
        for range in &queues {
            for offset in range.start..range.end {
                if store.record(group, &range.queue, offset).is_none()
                    && let Some(record) = source.record(group, &range.queue, offset)
                {
                    store.insert_record(group, range.queue.clone(), offset, record.clone());
                }
            }
        }
        store
            .apply(group, StoreOp::Recover { queues })
            .expect("the peer held every record the snapshot references");
    }

    /// Moves time on by 1 ms and delivers everything sent, syncing every write at once.
    fn step(&mut self) {
        self.now = self.now + Duration::from_millis(1);
        for (id, node) in &mut self.nodes {
            if self.down.contains(id) {
                continue;
            }
            if node.poll_timeout() <= self.now {
                node.handle_timeout(self.now);
            }
        }
        for _ in 0..100 {
            let mut quiet = true;
            let mut catch_ups = Vec::new();
            for (id, node) in &mut self.nodes {
                let store = self.stores.entry(*id).or_default();
                while let Some((group, op)) = node.poll_store() {
                    if let StoreOp::CatchUp { from, queues } = op {
                        catch_ups.push((*id, group, from, queues));
                        continue;
                    }
                    store
                        .apply(group, op)
                        .expect("the store carries out every operation");
                }
                while let Some(read) = node.poll_read() {
                    let (records, error) = store.read(read.group, &read.queue, &read.offsets);
                    node.read_done(self.now, read.id, records, error);
                    quiet = false;
                }
                while let Some((group, op)) = node.poll_store() {
                    store
                        .apply(group, op)
                        .expect("the store carries out every operation");
                }
                while let Some(job) = node.poll_snapshot_job() {
                    let data = job.encode().expect("a state encodes");
                    node.snapshot_encoded(self.now, job.group, job.index, Bytes::from(data));
                    quiet = false;
                }
                while let Some(job) = node.poll_transfer_job() {
                    let image = job
                        .encode(&mut |queue, offset| {
                            store
                                .message(job.group, queue, offset)
                                .ok_or_else(|| format!("{queue}@{offset} not stored"))
                        })
                        .map(Bytes::from);
                    node.transfer_encoded(self.now, job.group, job.index, image);
                    self.transfer_images += 1;
                    quiet = false;
                }
                while let Some((group, write)) = node.poll_write() {
                    // What a disk must read back: a snapshot records the configuration in
                    // effect at its index, which has a voter (`storage::record`).
                    if let Some(membership) =
                        write.snapshot.as_ref().and_then(|s| s.membership.as_ref())
                    {
                        assert!(
                            !membership.voters.is_empty(),
                            "node {id} group {group} writes a snapshot at {} with no voter",
                            write.snapshot.as_ref().map_or(0, |s| s.index)
                        );
                    }
                    node.persisted(self.now, group, write.id);
                    quiet = false;
                }
                while let Some(envelope) = node.poll_message() {
                    self.network.push_back(envelope);
                }
                while let Some((client, request, response)) = node.poll_response() {
                    self.responses.push((*id, client, request, response));
                }
            }
            for (id, group, from, queues) in catch_ups {
                self.catch_up(id, group, from, queues);
            }
            while let Some(envelope) = self.network.pop_front() {
                quiet = false;
                if self.check_frames {
                    let frame = crate::wire::Frame::Peer(envelope.clone());
                    let encoded = crate::wire::encode_frame(&frame, &mut Vec::new());
                    assert!(
                        encoded.is_ok(),
                        "a peer message does not fit a frame: {encoded:?}"
                    );
                }
                if self.down.contains(&envelope.to) || self.down.contains(&envelope.from) {
                    continue;
                }
                if self.hold == Some((envelope.group, envelope.to)) {
                    self.held.push(envelope);
                    continue;
                }
                if let Some(node) = self.nodes.get_mut(&envelope.to) {
                    node.handle_peer(self.now, envelope);
                }
            }
            if quiet {
                break;
            }
        }
    }

    fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.nodes
            .values()
            .find(|n| {
                n.replica(group)
                    .is_some_and(|r| r.status().role == Role::Leader)
            })
            .map(|n| n.id())
    }

    fn settle_leaders(&mut self, groups: &[GroupId]) {
        for _ in 0..2_000 {
            if groups.iter().all(|g| self.leader(*g).is_some()) {
                return;
            }
            self.step();
        }
        panic!("no leaders for {groups:?}");
    }

    /// Sends `request` to `node` and steps until it is answered.
    fn ask(&mut self, node: NodeId, request: Request) -> Response {
        let id = self.next_request;
        self.next_request += 1;
        let now = self.now;
        if let Some(n) = self.nodes.get_mut(&node) {
            n.handle_request(now, 7, id, request);
        }
        for _ in 0..5_000 {
            let answered = self
                .responses
                .iter()
                .position(|(n, c, r, _)| (*n, *c, *r) == (node, 7, id));
            if let Some(at) = answered {
                return self.responses.remove(at).3;
            }
            self.step();
        }
        panic!("request {id} to node {node} never answered");
    }
}

fn batch(texts: &[&str]) -> Vec<Message> {
    texts
        .iter()
        .map(|t| Message::with_body(Bytes::from(t.to_string())))
        .collect()
}

fn routes(cluster: &mut Cluster, topic: &str) -> Vec<Route> {
    match cluster.ask(
        1,
        Request::Route {
            topic: topic.into(),
        },
    ) {
        Response::Routes { routes, .. } => routes,
        other => panic!("{other:?}"),
    }
}

/// Three nodes, two broker groups, and a topic "orders" of four queues; returns the metadata
/// leader too.
fn cluster_with_orders() -> (Cluster, NodeId) {
    cluster_with_orders_tweaked(|_| {})
}

fn cluster_with_orders_tweaked(tweak: impl Fn(&mut NodeConfig)) -> (Cluster, NodeId) {
    let mut cluster = Cluster::with(3, 2, tweak);
    cluster.settle_leaders(&[METADATA_GROUP, 1, 2]);
    let meta = cluster.leader(METADATA_GROUP).unwrap_or(1);
    let create = Request::CreateTopic {
        topic: "orders".into(),
        queues: 4,
    };
    let created = cluster.ask(meta, create);
    let expected = Response::TopicCreated {
        topic: "orders".into(),
        existed: false,
    };
    assert_eq!(created, expected);
    (cluster, meta)
}

/// Three nodes with one broker group and a topic "orders" of `queues` queues, settled; returns
/// the metadata leader too.
fn one_group_with_orders(queues: u32, tweak: impl Fn(&mut NodeConfig)) -> (Cluster, NodeId) {
    let mut cluster = Cluster::with(3, 1, tweak);
    cluster.settle_leaders(&[METADATA_GROUP, 1]);
    let meta = cluster.leader(METADATA_GROUP).unwrap_or(1);
    let create = Request::CreateTopic {
        topic: "orders".into(),
        queues,
    };
    assert!(matches!(
        cluster.ask(meta, create),
        Response::TopicCreated { .. }
    ));
    (cluster, meta)
}

#[test]
fn produce_consume_ack_and_retry_through_a_three_node_cluster() {
    produce_consume_ack_and_retry(|_| {});
}

/// With no cache every pull reads the queue store, and a nack has the store copy the message.
#[test]
fn with_no_cache_pulls_read_the_queue_store_and_requeues_copy_there() {
    produce_consume_ack_and_retry(|config| {
        config.broker.cache_bytes_max = 0;
        config.snapshot_entries_min = Some(3);
    });
}

fn produce_consume_ack_and_retry(tweak: impl Fn(&mut NodeConfig)) {
    let (mut cluster, meta) = cluster_with_orders_tweaked(tweak);
    let follower = (1..=3).find(|n| *n != meta).unwrap_or(2);
    assert!(matches!(
        cluster.ask(
            follower,
            Request::CreateTopic {
                topic: "x".into(),
                queues: 1
            }
        ),
        Response::NotLeader {
            group: METADATA_GROUP,
            ..
        }
    ));

    let routes = routes(&mut cluster, "orders");
    assert_eq!(routes.len(), 4);
    let groups: std::collections::BTreeSet<_> = routes.iter().map(|r| r.group).collect();
    assert_eq!(groups.len(), 2, "queues spread over both broker groups");
    // Let the group leaders create the placed queues.
    for _ in 0..20 {
        cluster.step();
    }

    let route = routes[0].clone();
    let leader = cluster.leader(route.group).unwrap_or(1);
    let send = Request::Send {
        broker: route.group,
        queue: route.queue.clone(),
        producer_id: 42,
        first_seq: 0,
        messages: batch(&["a", "b", "c"]),
    };
    let sent = cluster.ask(leader, send.clone());
    assert_eq!(
        sent,
        Response::Sent {
            queue: route.queue.clone(),
            base_offset: 0,
            duplicate: false
        }
    );
    // The same batch again (a producer retry) gets the original offsets.
    assert_eq!(
        cluster.ask(leader, send),
        Response::Sent {
            queue: route.queue.clone(),
            base_offset: 0,
            duplicate: true
        }
    );

    let pull = |from| Request::Pull {
        broker: route.group,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        tenure: 1,
        queue: route.queue.clone(),
        from,
        messages_max: 10,
        bytes_max: 1 << 20,
        wait_ms: 0,
    };
    let Response::Pulled {
        messages,
        next_offset,
        ..
    } = cluster.ask(leader, pull(0))
    else {
        panic!("no pull");
    };
    let bodies: Vec<_> = messages
        .iter()
        .map(|(_, m)| m.message.body.clone())
        .collect();
    assert_eq!(
        bodies,
        vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]
    );
    assert_eq!(next_offset, 3);

    let ack = Request::Ack {
        broker: route.group,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        queue: route.queue.clone(),
        offsets: vec![0, 2],
    };
    assert_eq!(
        cluster.ask(leader, ack),
        Response::Acked {
            queue: route.queue.clone(),
            consume_offset: 1
        }
    );
    let nack = Request::ReconsumeLater {
        broker: route.group,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        queue: route.queue.clone(),
        offset: 1,
    };
    let retry = QueueId::retry("billing", 0);
    let nacked_at = cluster.now;
    assert_eq!(
        cluster.ask(leader, nack),
        Response::Requeued {
            to: retry.clone(),
            offset: 0,
            dead_letter: false
        }
    );
    // Every replica applies the same thing, followers once the next heartbeat carries the commit.
    for _ in 0..100 {
        cluster.step();
    }
    for node in cluster.nodes.values() {
        let state = node.broker_state(route.group).expect("broker group");
        assert_eq!(state.consume_offset("billing", &route.queue), 3);
    }
    // A long poll on the retry queue is answered once the message is due (1 s).
    let long_poll = Request::Pull {
        broker: route.group,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        tenure: 1,
        queue: retry,
        from: 0,
        messages_max: 10,
        bytes_max: 1 << 20,
        wait_ms: 5_000,
    };
    let Response::Pulled { messages, .. } = cluster.ask(leader, long_poll) else {
        panic!("no retry pull");
    };
    let waited = cluster.now.saturating_since(nacked_at);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].1.message.body, Bytes::from("b"));
    assert_eq!(messages[0].1.reconsume_times, 1);
    assert!(
        waited >= Duration::from_millis(990) && waited < Duration::from_millis(5_000),
        "{waited:?}"
    );
}

#[test]
fn unknown_topics_and_groups_are_refused_without_harm() {
    let mut cluster = Cluster::new(3, 1);
    cluster.settle_leaders(&[METADATA_GROUP, 1]);
    assert!(matches!(
        cluster.ask(
            1,
            Request::Route {
                topic: "nope".into()
            }
        ),
        Response::Refused { .. }
    ));
    let leader = cluster.leader(1).unwrap_or(1);
    let send = |broker, queue: &str| Request::Send {
        broker,
        queue: QueueId::new(queue, 0),
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["x"]),
    };
    assert!(matches!(
        cluster.ask(leader, send(9, "t")),
        Response::Refused { .. }
    ));
    let answer = cluster.ask(leader, send(1, "never-created"));
    assert!(
        matches!(&answer, Response::Refused { reason } if reason.contains("unknown queue")),
        "{answer:?}"
    );
    assert!(answer.nothing_written());
}

/// Hands client requests to nodes and responses back, for one producer and some consumers.
fn pump(cluster: &mut Cluster, producer: &mut Producer, consumers: &mut [Consumer]) {
    let now = cluster.now;
    while let Some((node, request, body)) = producer.poll_request() {
        if let Some(n) = cluster.nodes.get_mut(&node) {
            n.handle_request(now, 100, request, body);
        }
    }
    for (i, consumer) in consumers.iter_mut().enumerate() {
        while let Some((node, request, body)) = consumer.poll_request() {
            if let Some(n) = cluster.nodes.get_mut(&node) {
                n.handle_request(now, 200 + i as ClientId, request, body);
            }
        }
    }
    cluster.step();
    let now = cluster.now;
    for (_, client, request, response) in std::mem::take(&mut cluster.responses) {
        match client {
            100 => producer.handle_response(now, request, response),
            c if c >= 200 => {
                if let Some(consumer) = consumers.get_mut((c - 200) as usize) {
                    consumer.handle_response(now, request, response);
                }
            }
            _ => {}
        }
    }
    if producer.poll_timeout().is_some_and(|t| t <= now) {
        producer.handle_timeout(now);
    }
    for consumer in consumers.iter_mut() {
        if consumer.poll_timeout() <= now {
            consumer.handle_timeout(now);
        }
    }
}

/// A settled cluster with `orders`, a producer, and members `a` and `b` of group `billing`
/// (heartbeats every 200 ms).
fn a_producer_and_two_consumers() -> (Cluster, Producer, Vec<Consumer>) {
    let (mut cluster, _) = cluster_with_orders();
    for _ in 0..20 {
        cluster.step();
    }
    let nodes = vec![1, 2, 3];
    let producer = Producer::new(ProducerConfig::new(9, nodes.clone()));
    let consumers: Vec<Consumer> = ["a", "b"]
        .iter()
        .map(|m| {
            let mut config = ConsumerConfig::new("billing", m, "orders", nodes.clone());
            config.heartbeat_ms = 200;
            Consumer::new(config, cluster.now)
        })
        .collect();
    (cluster, producer, consumers)
}

#[test]
fn a_producer_and_two_consumers_move_every_message_with_retries() {
    let (mut cluster, mut producer, mut consumers) = a_producer_and_two_consumers();

    let total = 200;
    let mut sent = 0;
    let mut acked_sends = 0;
    let mut succeeded = std::collections::BTreeSet::new();
    let mut retried = std::collections::BTreeSet::new();
    for _ in 0..30_000 {
        if sent < total && producer.in_flight() < 4 {
            let body = format!("m{sent:03}");
            producer.send(
                cluster.now,
                "orders",
                vec![Message::with_body(Bytes::from(body))],
            );
            sent += 1;
        }
        pump(&mut cluster, &mut producer, &mut consumers);
        while let Some((_, result)) = producer.poll_result() {
            assert!(matches!(result, SendResult::Acked { .. }), "{result:?}");
            acked_sends += 1;
        }
        let now = cluster.now;
        for consumer in consumers.iter_mut() {
            while let Some(delivery) = consumer.poll_delivery() {
                let body = String::from_utf8_lossy(&delivery.message.message.body).to_string();
                // Every tenth message fails once and must come back from the retry queue.
                if body.ends_with('7') && delivery.message.reconsume_times == 0 {
                    consumer.answer(now, &delivery, AckStatus::ReconsumeLater);
                } else {
                    if body.ends_with('7') {
                        retried.insert(body.clone());
                    }
                    succeeded.insert(body);
                    consumer.answer(now, &delivery, AckStatus::Success);
                }
            }
            while consumer.poll_event().is_some() {}
        }
        if acked_sends == total && succeeded.len() == total {
            break;
        }
    }
    assert_eq!(acked_sends, total);
    assert_eq!(succeeded.len(), total, "not every message was consumed");
    assert_eq!(retried.len(), total / 10, "every nacked message came back");
    let owned: usize = consumers.iter().map(|c| c.owned().count()).sum();
    let levels = crate::broker::BrokerConfig::default()
        .reconsume_delays_ms
        .len();
    assert_eq!(
        owned,
        4 + 2 * levels,
        "four queues and a retry queue per delay level per broker group, shared"
    );
    assert!(
        consumers.iter().all(|c| c.owned().count() > 0),
        "both members own a share"
    );
}

/// A consumer that leaves releases its queues while its long polls wait on them for
/// messages. Such a pull is answered at once, and claims nothing: run again after the release,
/// it would take the queue back and hold its member (and the queue) for the rest of its wait.
#[test]
fn a_long_poll_whose_member_released_its_queue_is_answered_at_once_and_claims_nothing() {
    let (mut cluster, _) = one_group_with_orders(1, |c| c.member_session_ms = 2_000);
    let leader = cluster.leader(1).unwrap_or(1);
    let mut long_poll = lease_request("pull", "a", 10);
    if let Request::Pull { wait_ms, .. } = &mut long_poll {
        *wait_ms = 5_000;
    }
    let parked = cluster.send(leader, long_poll);
    for _ in 0..50 {
        cluster.step();
    }
    assert_eq!(
        cluster.answer(leader, parked),
        None,
        "nothing to pull: it waits"
    );
    let released_at = cluster.now;
    assert!(matches!(
        cluster.ask(leader, lease_request("release", "a", 10)),
        Response::Released { .. }
    ));
    let mut answer = None;
    while answer.is_none() && cluster.now.saturating_since(released_at) < Duration::from_secs(6) {
        cluster.step();
        answer = cluster.answer(leader, parked);
    }
    assert!(
        matches!(&answer, Some(Response::Pulled { messages, .. }) if messages.is_empty()),
        "{answer:?}"
    );
    let waited = cluster.now.saturating_since(released_at);
    assert!(
        waited < Duration::from_millis(500),
        "answered after {waited:?}"
    );
    send_x_to_orders_0(&mut cluster, leader);
    let taken = cluster.ask(leader, lease_request("pull", "b", 11));
    assert!(
        matches!(&taken, Response::Pulled { messages, .. } if messages.len() == 1),
        "the queue stayed released: the next member is served at once, not after a's \
         session: {taken:?}"
    );
}

#[test]
fn a_member_that_leaves_hands_its_queues_over_before_its_session_would_expire() {
    let (mut cluster, mut producer, mut consumers) = a_producer_and_two_consumers();
    let all_queues = 4 + 2 * crate::broker::BrokerConfig::default()
        .reconsume_delays_ms
        .len();
    let shared = |c: &[Consumer]| c.iter().all(|c| c.owned().count() > 0);
    for _ in 0..5_000 {
        pump(&mut cluster, &mut producer, &mut consumers);
        if shared(&consumers) {
            break;
        }
    }
    assert!(shared(&consumers), "both members own a share first");

    let left_at = cluster.now;
    consumers[1].leave(left_at);
    assert_eq!(
        consumers[1].owned().count(),
        0,
        "a leaving member pulls nothing"
    );
    for _ in 0..5_000 {
        pump(&mut cluster, &mut producer, &mut consumers);
        if consumers[1].has_left() && consumers[0].owned().count() == all_queues {
            break;
        }
    }
    assert!(consumers[1].has_left(), "the group heard the goodbye");
    assert_eq!(
        consumers[0].owned().count(),
        all_queues,
        "the other took over"
    );
    let session =
        std::time::Duration::from_millis(NodeConfig::new(1, vec![1, 2, 3], 2).member_session_ms);
    assert!(
        cluster.now.saturating_since(left_at) < session,
        "handed over in {:?}, not after the session timeout",
        cluster.now.saturating_since(left_at)
    );
}

#[test]
fn a_node_back_from_a_long_absence_is_brought_up_by_snapshots_and_serves_the_same_state() {
    let cluster = back_from_a_long_absence(false);
    assert!(cluster.transfer_images > 0 && cluster.catch_ups == 0);
}

/// With `segment_catch_up`, the node installs the metadata snapshot itself and its store
/// fetches the records it lacks; no transfer image is made.
#[test]
fn a_node_back_from_a_long_absence_catches_up_its_store_from_a_metadata_snapshot() {
    let cluster = back_from_a_long_absence(true);
    assert!(cluster.catch_ups > 0, "the store caught up");
    assert_eq!(cluster.transfer_images, 0, "no transfer image");
}

fn back_from_a_long_absence(segment_catch_up: bool) -> Cluster {
    let (mut cluster, meta) = one_group_with_orders(1, |config| {
        config.snapshot_entries_min = Some(4);
        config.segment_catch_up = segment_catch_up;
    });
    for _ in 0..20 {
        cluster.step();
    }
    let leader = cluster.leader(1).unwrap_or(1);
    let absent = (1..=3).find(|n| *n != leader && *n != meta).unwrap_or(3);
    cluster.down.insert(absent);
    let queue = QueueId::new("orders", 0);
    let send = |seq: u64| Request::Send {
        broker: 1,
        queue: queue.clone(),
        producer_id: 9,
        first_seq: seq,
        messages: batch(&["x", "y"]),
    };
    for seq in (0..60).step_by(2) {
        assert!(matches!(
            cluster.ask(leader, send(seq)),
            Response::Sent {
                duplicate: false,
                ..
            }
        ));
    }
    // The member's first pull claims the queue; its acks are accepted from then on.
    let claim = Request::Pull {
        broker: 1,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        tenure: 1,
        queue: queue.clone(),
        from: 0,
        messages_max: 1,
        bytes_max: 1 << 20,
        wait_ms: 0,
    };
    assert!(matches!(
        cluster.ask(leader, claim),
        Response::Pulled { .. }
    ));
    let ack = Request::Ack {
        broker: 1,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        queue: queue.clone(),
        offsets: (0..25).collect(),
    };
    assert!(matches!(cluster.ask(leader, ack), Response::Acked { .. }));
    let compacted = cluster.nodes[&leader]
        .replica(1)
        .map_or(0, |r| r.status().snapshot_index);
    assert!(compacted > 0, "the leader compacted its log");

    cluster.down.remove(&absent);
    for _ in 0..500 {
        cluster.step();
    }
    let back = cluster.nodes[&absent].replica(1).map(|r| r.status());
    assert!(
        back.is_some_and(|s| s.snapshot_index >= compacted),
        "installed a snapshot: {back:?}"
    );
    let state_of = |cluster: &Cluster, node: NodeId| {
        cluster.nodes[&node]
            .broker_state(1)
            .map(|s| {
                if segment_catch_up {
                    // Its cache starts empty: the messages are compared in the stores.
                    s.metadata_snapshot().unwrap_or_default()
                } else {
                    s.snapshot()
                }
            })
            .unwrap_or_default()
    };
    assert_eq!(state_of(&cluster, absent), state_of(&cluster, leader));
    for offset in 0..60 {
        let record = |node: NodeId| cluster.stores[&node].record(1, &queue, offset).cloned();
        assert!(record(absent).is_some(), "offset {offset} stored");
        assert_eq!(record(absent), record(leader), "offset {offset}");
    }
    assert_eq!(
        cluster.nodes[&absent]
            .broker_state(1)
            .map(|s| s.consume_offset("billing", &queue)),
        Some(25)
    );
    // A retry of an early batch is still recognised by its dedup window, after the restore.
    let mut restored = cluster.nodes[&absent]
        .broker_state(1)
        .cloned()
        .expect("broker group");
    let retry = crate::broker::Command::Append {
        queue: queue.clone(),
        producer_id: 9,
        first_seq: 58,
        messages: batch(&["x", "y"]),
        stamp_ms: cluster.now.as_micros() / 1_000,
    };
    assert_eq!(
        restored.apply(retry),
        crate::broker::Outcome::Appended {
            queue: queue.clone(),
            base_offset: 58,
            duplicate: true
        }
    );
    assert!(cluster.nodes.values_mut().all(|n| n.poll_fault().is_none()));
    cluster
}

#[test]
fn a_node_restarts_from_a_snapshot_on_its_disk() {
    let (mut cluster, meta) = one_group_with_orders(2, |config| {
        config.snapshot_entries_min = Some(2);
    });
    for _ in 0..50 {
        cluster.step();
    }
    let node = &cluster.nodes[&meta];
    let snapshot = node
        .replica(METADATA_GROUP)
        .and_then(|r| r.snapshot().cloned())
        .expect("the metadata group compacted");
    let disk = Recovered {
        hard_state: crate::raft::HardState {
            term: node.replica(METADATA_GROUP).map_or(0, |r| r.status().term),
            vote: None,
            commit: snapshot.index,
        },
        snapshot: Some(snapshot),
        entries: Vec::new(),
    };
    let config = NodeConfig::new(meta, vec![1, 2, 3], 1);
    let mut restarted = BrokerNode::new(
        config,
        BTreeMap::from([(METADATA_GROUP, disk)]),
        5,
        cluster.now,
    );
    assert_eq!(restarted.poll_fault(), None);
    // Routes come from the restored topic table (its leader hints are unknown yet).
    restarted.handle_request(
        cluster.now,
        1,
        1,
        Request::Route {
            topic: "orders".into(),
        },
    );
    let routes = std::iter::from_fn(|| restarted.poll_response()).find_map(|(_, _, r)| match r {
        Response::Routes { routes, .. } => Some(routes),
        _ => None,
    });
    assert_eq!(routes.map(|r| r.len()), Some(2));

    // A snapshot that does not decode is a fault, not a panic.
    let bad = Recovered {
        snapshot: Some(crate::raft::Snapshot {
            index: 3,
            term: 1,
            data: Bytes::from_static(b"garbage"),
            membership: None,
        }),
        ..Recovered::default()
    };
    let mut broken = BrokerNode::new(
        NodeConfig::new(meta, vec![1, 2, 3], 1),
        BTreeMap::from([(1, bad)]),
        5,
        cluster.now,
    );
    assert!(
        broken
            .poll_fault()
            .is_some_and(|f| f.to_string().contains("group 1"))
    );
}

#[test]
fn the_leader_trims_by_retention_and_every_replica_deletes_the_same_messages() {
    let (mut cluster, _) = one_group_with_orders(1, |config| {
        config.broker.retention_ms = Some(2_000);
        config.trim_interval_ms = 100;
    });
    for _ in 0..20 {
        cluster.step();
    }
    let leader = cluster.leader(1).unwrap_or(1);
    let queue = QueueId::new("orders", 0);
    let send = |seq: u64| Request::Send {
        broker: 1,
        queue: queue.clone(),
        producer_id: 3,
        first_seq: seq,
        messages: batch(&["old"]),
    };
    assert!(matches!(
        cluster.ask(leader, send(0)),
        Response::Sent { .. }
    ));
    for _ in 0..1_500 {
        cluster.step();
    }
    // Sent 1.5 s after the first: still retained when the first goes.
    assert!(matches!(
        cluster.ask(leader, send(1)),
        Response::Sent { .. }
    ));
    for _ in 0..1_000 {
        cluster.step();
    }
    for (id, node) in &cluster.nodes {
        let state = node.broker_state(1).expect("broker group");
        assert_eq!(state.start_offset(&queue), Some(1), "node {id}");
        assert_eq!(
            state.queue_len(&queue),
            Some(2),
            "node {id}: offsets keep their meaning"
        );
        let trims: u64 = node
            .stats()
            .groups
            .iter()
            .map(|g| g.counters.retention_trims)
            .sum();
        assert_eq!(trims, 1, "node {id} counts the one queue it trimmed, once");
    }
    let pull = Request::Pull {
        broker: 1,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        tenure: 1,
        queue: queue.clone(),
        from: 0,
        messages_max: 10,
        bytes_max: 1 << 20,
        wait_ms: 0,
    };
    let Response::Pulled { messages, .. } = cluster.ask(leader, pull) else {
        panic!("no pull");
    };
    let offsets: Vec<u64> = messages.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        vec![1],
        "a pull from below the start begins at the start"
    );
}

impl Cluster {
    /// Sends `request` to `node` without waiting; see [`Cluster::answer`].
    fn send(&mut self, node: NodeId, request: Request) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let now = self.now;
        if let Some(n) = self.nodes.get_mut(&node) {
            n.handle_request(now, 7, id, request);
        }
        id
    }

    /// The answer to request `id` to `node`, if it came.
    fn answer(&mut self, node: NodeId, id: u64) -> Option<Response> {
        let at = self
            .responses
            .iter()
            .position(|(n, c, r, _)| (*n, *c, *r) == (node, 7, id))?;
        Some(self.responses.remove(at).3)
    }
}

/// Producer 1 sends "x" to `orders/0` of broker group 1, and it is stored.
fn send_x_to_orders_0(cluster: &mut Cluster, leader: NodeId) {
    let send = Request::Send {
        broker: 1,
        queue: QueueId::new("orders", 0),
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["x"]),
    };
    assert!(matches!(cluster.ask(leader, send), Response::Sent { .. }));
}

/// A pull, ack or release of "orders"/0 in group "billing" by `member` at `generation`.
fn lease_request(kind: &str, member: &str, generation: u64) -> Request {
    let (broker, group, member, queue) = (
        1,
        "billing".to_string(),
        member.to_string(),
        QueueId::new("orders", 0),
    );
    match kind {
        "pull" => Request::Pull {
            broker,
            group,
            member,
            generation,
            tenure: 1,
            queue,
            from: 0,
            messages_max: 10,
            bytes_max: 1 << 20,
            wait_ms: 100,
        },
        "ack" => Request::Ack {
            broker,
            group,
            member,
            generation,
            queue,
            offsets: vec![0],
        },
        _ => Request::Release {
            broker,
            group,
            member,
            generation,
            tenure: 1,
            queue,
        },
    }
}

#[test]
fn a_queue_is_served_to_one_holder_and_moves_on_release_or_expiry() {
    let (mut cluster, _) = one_group_with_orders(1, |c| c.member_session_ms = 2_000);
    let leader = cluster.leader(1).unwrap_or(1);
    let send = Request::Send {
        broker: 1,
        queue: QueueId::new("orders", 0),
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["x", "y"]),
    };
    assert!(matches!(cluster.ask(leader, send), Response::Sent { .. }));
    let pulled =
        |r: &Response| matches!(r, Response::Pulled { messages, .. } if !messages.is_empty());

    // a's first pull claims the queue and is served.
    let first = cluster.ask(leader, lease_request("pull", "a", 10));
    assert!(pulled(&first), "{first:?}");
    // b, given the queue at a newer generation, waits while a holds it...
    let waiting = cluster.send(leader, lease_request("pull", "b", 11));
    for _ in 0..50 {
        cluster.step();
    }
    assert_eq!(
        cluster.answer(leader, waiting),
        None,
        "b is not served while a holds"
    );
    // ...b cannot ack what a was handed, and a stale member cannot pull...
    assert!(matches!(
        cluster.ask(leader, lease_request("ack", "b", 11)),
        Response::Revoked { .. }
    ));
    assert!(matches!(
        cluster.ask(leader, lease_request("pull", "c", 9)),
        Response::Revoked { .. }
    ));
    // ...a is told to let go, its answers still count, and its release hands over at once.
    assert!(matches!(
        cluster.ask(leader, lease_request("pull", "a", 10)),
        Response::Revoked { .. }
    ));
    assert!(matches!(
        cluster.ask(leader, lease_request("ack", "a", 10)),
        Response::Acked {
            consume_offset: 1,
            ..
        }
    ));
    let released_at = cluster.now;
    assert!(matches!(
        cluster.ask(leader, lease_request("release", "a", 10)),
        Response::Released { .. }
    ));
    let mut served = None;
    for _ in 0..1_000 {
        served = cluster.answer(leader, waiting);
        if served.is_some() {
            break;
        }
        cluster.step();
    }
    let served = served.expect("b's pull answered");
    assert!(
        matches!(&served, Response::Pulled { messages, .. } if messages.iter().map(|(o, _)| *o).eq([1])),
        "b starts at the committed offset: {served:?}"
    );
    assert!(cluster.now.saturating_since(released_at) < Duration::from_millis(100));
    assert!(
        matches!(
            cluster.ask(leader, lease_request("ack", "a", 10)),
            Response::Revoked { .. }
        ),
        "a's tenure is over"
    );

    // b goes silent: d, at a newer generation, takes over once b's lease expired.
    let silent_from = cluster.now;
    let mut d = None;
    for _ in 0..40 {
        let id = cluster.send(leader, lease_request("pull", "d", 12));
        let mut answer = None;
        while answer.is_none() {
            cluster.step();
            answer = cluster.answer(leader, id);
        }
        if answer.as_ref().is_some_and(pulled) {
            d = answer;
            break;
        }
    }
    assert!(d.is_some(), "d took over");
    let waited = cluster.now.saturating_since(silent_from);
    assert!(
        waited >= Duration::from_millis(2_000) && waited < Duration::from_millis(3_500),
        "after the session: {waited:?}"
    );
}

/// `request` (a pull or a release) sent in the member's tenure `number`.
fn in_tenure(mut request: Request, number: u64) -> Request {
    if let Request::Pull { tenure, .. } | Request::Release { tenure, .. } = &mut request {
        *tenure = number;
    }
    request
}

/// A consumer learns of a new topic from the metadata group's leader; the broker group's
/// leader may be a node whose replica of the topic table learns the commit only later. The
/// pull must not propose a claim that is refused as for an unknown queue and then wait out
/// the claim's recheck (every new topic's first messages were 500 ms late in `bench`): it is
/// served as soon as the node knows the topic and the message is there.
#[test]
fn a_pull_that_reaches_a_node_before_its_topic_does_is_served_once_the_topic_arrives() {
    let (mut cluster, meta, broker) = leaders_apart();
    cluster.hold = Some((METADATA_GROUP, broker));
    let create = Request::CreateTopic {
        topic: "orders".into(),
        queues: 1,
    };
    assert!(matches!(
        cluster.ask(meta, create),
        Response::TopicCreated { .. }
    ));
    let mut pull = lease_request("pull", "a", 1);
    if let Request::Pull { wait_ms, .. } = &mut pull {
        *wait_ms = 2_000;
    }
    let asked_at = cluster.now;
    let pull = cluster.send(broker, pull);
    for _ in 0..100 {
        cluster.step();
    }
    assert_eq!(cluster.answer(broker, pull), None, "the pull waits");
    cluster.release_held();
    for _ in 0..100 {
        cluster.step();
    }
    // Refused (and the helper fails) unless the node knows the topic by now.
    send_x_to_orders_0(&mut cluster, broker);
    for _ in 0..100 {
        if let Some(answer) = cluster.answer(broker, pull) {
            let Response::Pulled { messages, .. } = &answer else {
                panic!("{answer:?}");
            };
            assert_eq!(messages.len(), 1, "{answer:?}");
            let waited = cluster.now.saturating_since(asked_at);
            assert!(
                waited < Duration::from_millis(400),
                "served after {waited:?}"
            );
            return;
        }
        cluster.step();
    }
    panic!("the pull was not served within 100 ms of the message");
}

/// The metadata leader tells its followers of a new topic as soon as they hold it, not with
/// the next heartbeat: a send to a broker leader that follows the topic table, made right
/// after the topic was created, is taken, not refused as for an unknown queue (the producer
/// then waited 100 ms: `bench`'s send p999 on every new topic).
#[test]
fn a_new_topic_reaches_the_topic_tables_followers_before_the_next_heartbeat() {
    let (mut cluster, meta, broker) = leaders_apart();
    // The creation and the send take less than a heartbeat interval: without the notice,
    // the follower may not know the topic yet (in this cluster's schedule it does not).
    let interval = cluster.nodes[&meta]
        .replica(METADATA_GROUP)
        .map(|r| r.config().heartbeat_interval)
        .unwrap_or_default();
    let create = Request::CreateTopic {
        topic: "orders".into(),
        queues: 1,
    };
    let asked_at = cluster.now;
    assert!(matches!(
        cluster.ask(meta, create),
        Response::TopicCreated { .. }
    ));
    cluster.step();
    assert!(
        cluster.now.saturating_since(asked_at) < interval,
        "the creation took a heartbeat interval"
    );
    send_x_to_orders_0(&mut cluster, broker);
}

/// Three nodes, one broker group, no topic; the metadata leader, and broker group 1's leader
/// on another node.
fn leaders_apart() -> (Cluster, NodeId, NodeId) {
    let mut cluster = Cluster::new(3, 1);
    cluster.settle_leaders(&[METADATA_GROUP, 1]);
    let meta = cluster.leader(METADATA_GROUP).unwrap_or(1);
    let broker = leader_apart_from(&mut cluster, 1, meta);
    (cluster, meta, broker)
}

/// Makes the leader of `group` a node other than `apart_from` (by a transfer if need be),
/// holding its read lease; returns it.
fn leader_apart_from(cluster: &mut Cluster, group: GroupId, apart_from: NodeId) -> NodeId {
    let mut leader = cluster.leader(group).unwrap_or(1);
    if leader == apart_from {
        let to = apart_from % 3 + 1;
        let transfer = Request::TransferLeader { group, to };
        let started = cluster.ask(leader, transfer);
        assert!(
            matches!(started, Response::TransferStarted { .. }),
            "{started:?}"
        );
        for _ in 0..500 {
            if cluster.leader(group) == Some(to) {
                break;
            }
            cluster.step();
        }
        leader = to;
    }
    assert_eq!(cluster.leader(group), Some(leader));
    for _ in 0..500 {
        let now = cluster.now;
        if cluster.nodes[&leader]
            .replica(group)
            .is_some_and(|r| r.read_lease(now))
        {
            break;
        }
        cluster.step();
    }
    leader
}

/// Queue seed 612008318 (exclusive-owner): a member released a queue, the network held the
/// release back, the member's resent release let the queue go, and the member, given the
/// queue again at the same generation, claimed it back. The first release, applied late, must
/// not end the new tenure: another member would be served while this one still consumes.
#[test]
fn a_late_release_from_an_earlier_tenure_leaves_the_queue_with_its_holder() {
    let (mut cluster, _) = one_group_with_orders(1, |c| c.member_session_ms = 2_000);
    let leader = cluster.leader(1).unwrap_or(1);
    send_x_to_orders_0(&mut cluster, leader);
    let pulled =
        |r: &Response| matches!(r, Response::Pulled { messages, .. } if !messages.is_empty());
    let first = cluster.ask(leader, in_tenure(lease_request("pull", "a", 10), 1));
    assert!(pulled(&first), "{first:?}");
    // The release's first copy is held back by the network; the second lets the queue go.
    assert!(matches!(
        cluster.ask(leader, in_tenure(lease_request("release", "a", 10), 1)),
        Response::Released { .. }
    ));
    let again = cluster.ask(leader, in_tenure(lease_request("pull", "a", 10), 2));
    assert!(
        matches!(again, Response::Pulled { .. }),
        "a claims the queue again: {again:?}"
    );
    let late = cluster.ask(leader, in_tenure(lease_request("release", "a", 10), 1));
    assert!(
        matches!(late, Response::Revoked { .. }),
        "the late release is refused: {late:?}"
    );
    for _ in 0..100 {
        cluster.step();
    }
    for (id, node) in &cluster.nodes {
        let state = node.broker_state(1).expect("a broker group");
        let lease = state.lease("billing", &QueueId::new("orders", 0));
        assert_eq!(
            lease.and_then(|l| l.owner.as_deref()),
            Some("a"),
            "node {id}: a still holds the queue"
        );
    }
    let b = cluster.send(leader, lease_request("pull", "b", 10));
    for _ in 0..200 {
        cluster.step();
    }
    let b = cluster.answer(leader, b);
    assert!(!b.as_ref().is_some_and(pulled), "b is not served: {b:?}");
}

#[test]
fn stats_count_what_happened_on_every_node() {
    let (mut cluster, mut producer, mut consumers) = a_producer_and_two_consumers();
    let total = 20;
    let mut sent = 0;
    let mut acked_sends = 0;
    let mut succeeded = std::collections::BTreeSet::new();
    for _ in 0..30_000 {
        if sent < total && producer.in_flight() < 4 {
            let body = Bytes::from(format!("m{sent:03}"));
            producer.send(cluster.now, "orders", vec![Message::with_body(body)]);
            sent += 1;
        }
        pump(&mut cluster, &mut producer, &mut consumers);
        while let Some((_, result)) = producer.poll_result() {
            assert!(matches!(result, SendResult::Acked { .. }), "{result:?}");
            acked_sends += 1;
        }
        let now = cluster.now;
        for consumer in consumers.iter_mut() {
            while let Some(delivery) = consumer.poll_delivery() {
                let body = String::from_utf8_lossy(&delivery.message.message.body).to_string();
                if body.ends_with('7') && delivery.message.reconsume_times == 0 {
                    consumer.answer(now, &delivery, AckStatus::ReconsumeLater);
                } else {
                    succeeded.insert(body);
                    consumer.answer(now, &delivery, AckStatus::Success);
                }
            }
            while consumer.poll_event().is_some() {}
        }
        if acked_sends == total && succeeded.len() == total {
            break;
        }
    }
    assert_eq!(succeeded.len(), total);
    // Let the last acks commit and apply everywhere.
    for _ in 0..500 {
        pump(&mut cluster, &mut producer, &mut consumers);
    }
    let stats: Vec<NodeStats> = cluster.nodes.values().map(|n| n.stats()).collect();
    let sum = |f: &dyn Fn(&NodeStats) -> u64| stats.iter().map(f).sum::<u64>();
    let orders = |s: &NodeStats| s.topics.get("orders").cloned().unwrap_or_default();

    // No message was lost or resent on this network: every count is exact.
    assert_eq!(sum(&|s| orders(s).send_messages), total as u64);
    assert_eq!(sum(&|s| orders(s).send_bytes), 4 * total as u64);
    assert_eq!(sum(&|s| s.responses.get("sent").copied().unwrap_or(0)), 20);
    assert!(sum(&|s| orders(s).pulled_messages) >= total as u64);
    assert!(sum(&|s| s.requests.get("pull").copied().unwrap_or(0)) > 0);
    for s in &stats {
        // Every replica applied the same log: the same queues, offsets and requeues.
        let stored: u64 = s
            .queues
            .iter()
            .filter(|q| &*q.queue.topic == "orders")
            .map(|q| q.next_offset)
            .sum();
        assert_eq!(stored, total as u64, "node {}", s.node);
        let reconsumed: u64 = s.groups.iter().map(|g| g.counters.reconsumed).sum();
        assert_eq!(reconsumed, 2, "m007 and m017 went to a retry queue once");
        let by_consumer: u64 = s
            .consumers
            .iter()
            .filter(|c| c.consumer_group == "billing" && &*c.queue.topic == "orders")
            .map(|c| c.counters.reconsumed)
            .sum();
        assert_eq!(
            by_consumer, 2,
            "node {}: per consumer group and queue",
            s.node
        );
        let lag: u64 = s
            .lag
            .iter()
            .filter(|l| l.consumer_group == "billing" && &*l.queue.topic == "orders")
            .map(|l| l.lag)
            .sum();
        assert_eq!(lag, 0, "node {}: everything was acknowledged", s.node);
        assert!(s.every_group_has_leader());
        for g in &s.groups {
            assert!(g.counters.entries_applied > 0);
            assert!(g.counters.leader_changes >= 1, "{g:?}");
        }
    }
    for group in [METADATA_GROUP, 1, 2] {
        let won: u64 = stats
            .iter()
            .flat_map(|s| &s.groups)
            .filter(|g| g.group == group)
            .map(|g| g.counters.elections_won)
            .sum();
        assert!(won >= 1, "group {group} elected a leader");
    }
}

/// A record that fails its checksum is never handed to a consumer: the pull ends before it,
/// the node reports the damage, and the records before it are still served.
#[test]
fn a_damaged_stored_message_is_reported_and_never_delivered() {
    let (mut cluster, _) = one_group_with_orders(1, |config| {
        config.broker.cache_bytes_max = 0;
    });
    for _ in 0..20 {
        cluster.step();
    }
    let queue = QueueId::new("orders", 0);
    let leader = cluster.leader(1).unwrap_or(1);
    let send = Request::Send {
        broker: 1,
        queue: queue.clone(),
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["a", "b", "c"]),
    };
    assert!(matches!(cluster.ask(leader, send), Response::Sent { .. }));
    let store = cluster.stores.get_mut(&leader).expect("the leader's store");
    let mut record = store.record(1, &queue, 1).expect("stored").to_vec();
    let last = record.len() - 1;
    record[last] ^= 0x01;
    assert!(store.replace(1, &queue, 1, Bytes::from(record)));
    while cluster
        .nodes
        .get_mut(&leader)
        .and_then(|n| n.poll_event())
        .is_some()
    {}
    let pull = Request::Pull {
        broker: 1,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        tenure: 1,
        queue: queue.clone(),
        from: 0,
        messages_max: 10,
        bytes_max: 1 << 20,
        wait_ms: 0,
    };
    let Response::Pulled {
        messages,
        next_offset,
        ..
    } = cluster.ask(leader, pull)
    else {
        panic!("no pull");
    };
    let offsets: Vec<u64> = messages.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        (offsets, next_offset),
        (vec![0], 1),
        "served up to the damage only"
    );
    let events: Vec<NodeEvent> =
        std::iter::from_fn(|| cluster.nodes.get_mut(&leader).and_then(|n| n.poll_event()))
            .collect();
    assert!(
        events.iter().any(|e| matches!(
            e,
            NodeEvent::StoreReadFailed { offset: 1, why, .. } if why.contains("checksum")
        )),
        "{events:?}"
    );
}

/// `Status` shows a consumer group's lag on a queue it claimed and never acknowledged in:
/// everything from the queue's start waits (`group describe` printed "end 0, lag 0").
#[test]
fn status_counts_the_lag_of_a_claimed_queue_with_nothing_acknowledged() {
    let (mut cluster, _) = one_group_with_orders(2, |_| {});
    let leader = cluster.leader(1).unwrap_or(1);
    let send = Request::Send {
        broker: 1,
        queue: QueueId::new("orders", 0),
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["a", "b", "c"]),
    };
    assert!(matches!(cluster.ask(leader, send), Response::Sent { .. }));
    let pulled = cluster.ask(leader, lease_request("pull", "a", 1));
    assert!(matches!(&pulled, Response::Pulled { messages, .. } if messages.len() == 3));
    let Response::Status { groups, .. } = cluster.ask(leader, Request::Status) else {
        panic!("no status");
    };
    let group = groups
        .iter()
        .find(|g| g.group == 1)
        .expect("broker group 1");
    assert!(
        group.holders.iter().any(|h| h.group == "billing"),
        "{group:?}"
    );
    let progress: Vec<_> = group
        .consumers
        .iter()
        .filter(|c| c.group == "billing")
        .map(|c| (c.queue.clone(), c.consume_offset, c.queue_len))
        .collect();
    assert_eq!(progress, vec![(QueueId::new("orders", 0), 0, 3)]);
    // So does the lag metric.
    let lag: Vec<_> = cluster.nodes[&leader]
        .stats()
        .lag
        .into_iter()
        .filter(|l| l.consumer_group == "billing" && &*l.queue.topic == "orders")
        .map(|l| (l.queue, l.consume_offset, l.lag))
        .collect();
    assert_eq!(lag, vec![(QueueId::new("orders", 0), 0, 3)]);
}

/// `DeleteTopic`: every replica of the broker group drops the topic's queues, messages,
/// offsets and leases (and its store the messages); producers and routes are refused; the
/// topic created again starts empty, and its first message sits at offset 0.
#[test]
fn a_deleted_topic_is_gone_everywhere_and_comes_back_empty() {
    let (mut cluster, meta) = one_group_with_orders(2, |_| {});
    let leader = cluster.leader(1).unwrap_or(1);
    let q0 = QueueId::new("orders", 0);
    let send = |seq, texts: &[&str]| Request::Send {
        broker: 1,
        queue: QueueId::new("orders", 0),
        producer_id: 1,
        first_seq: seq,
        messages: batch(texts),
    };
    assert!(matches!(
        cluster.ask(leader, send(0, &["old-1", "old-2"])),
        Response::Sent { .. }
    ));
    let first = cluster.ask(leader, lease_request("pull", "a", 1));
    assert!(matches!(&first, Response::Pulled { messages, .. } if messages.len() == 2));
    assert!(matches!(
        cluster.ask(leader, lease_request("ack", "a", 1)),
        Response::Acked { .. }
    ));

    assert!(
        cluster.nodes[&leader].stats().topics.contains_key("orders"),
        "the leader counted the topic's traffic"
    );
    let delete = Request::DeleteTopic {
        topic: "orders".into(),
    };
    assert_eq!(
        cluster.ask(meta, delete.clone()),
        Response::TopicDeleted {
            topic: "orders".into(),
            queues: 2
        }
    );
    let refused = cluster.ask(meta, delete);
    assert!(
        matches!(&refused, Response::Refused { reason } if reason.contains("unknown topic")),
        "{refused:?}"
    );
    for _ in 0..200 {
        cluster.step();
    }
    for (id, node) in &cluster.nodes {
        let state = node.broker_state(1).expect("a broker group");
        assert_eq!(
            state.queues().filter(|q| &*q.topic == "orders").count(),
            0,
            "node {id}"
        );
        assert!(state.lease("billing", &q0).is_none(), "node {id}");
        assert_eq!(state.consume_offset("billing", &q0), 0, "node {id}");
        assert!(
            state.topic_mark("orders").is_some_and(|m| m.dropped),
            "node {id}"
        );
        // Its per-topic metrics series end with it, instead of staying until a restart.
        assert!(
            !node.stats().topics.contains_key("orders"),
            "node {id} still reports the deleted topic's traffic"
        );
        let store = cluster.stores.get(id).expect("a store");
        assert!(
            store.record(1, &q0, 0).is_none(),
            "node {id} still stores a message"
        );
        // Compacted right after: a restart no longer starts from a snapshot that references
        // the dropped queues.
        let replica = node.replica(1).expect("a replica");
        let snapshot_index = replica.status().snapshot_index;
        assert!(
            replica.snapshot().is_some_and(|s| {
                crate::broker::BrokerState::restore(state.config().clone(), &s.data)
                    .is_ok_and(|restored| restored.topic_mark("orders").is_some_and(|m| m.dropped))
            }),
            "node {id}: no snapshot after the drop (snapshot index {snapshot_index})"
        );
    }
    let route = cluster.ask(
        1,
        Request::Route {
            topic: "orders".into(),
        },
    );
    assert!(
        matches!(&route, Response::Refused { reason } if reason.contains("unknown topic")),
        "{route:?}"
    );
    let late = cluster.ask(leader, send(2, &["late"]));
    assert!(
        matches!(&late, Response::Refused { reason } if reason.contains("unknown queue")),
        "{late:?}"
    );

    let create = Request::CreateTopic {
        topic: "orders".into(),
        queues: 1,
    };
    assert!(matches!(
        cluster.ask(meta, create),
        Response::TopicCreated { existed: false, .. }
    ));
    let leader = cluster.leader(1).unwrap_or(1);
    let sent = cluster.ask(leader, send(3, &["new"]));
    assert!(
        matches!(&sent, Response::Sent { base_offset: 0, .. }),
        "{sent:?}"
    );
    let pulled = cluster.ask(leader, lease_request("pull", "b", 1));
    let Response::Pulled { messages, .. } = pulled else {
        panic!("{pulled:?}");
    };
    let bodies: Vec<(u64, Bytes)> = messages
        .into_iter()
        .map(|(o, m)| (o, m.message.body))
        .collect();
    assert_eq!(bodies, vec![(0, Bytes::from("new"))]);
}

/// Redeliveries and dead letters are counted per consumer group and queue, on the leader
/// (redeliveries) and on every replica (dead letters); the series end when their consumer
/// group or topic is deleted, the retry and dead-letter topics' traffic with the group.
#[test]
fn consumer_counters_per_group_and_queue_end_with_their_group_or_topic() {
    let (mut cluster, meta) = one_group_with_orders(1, |c| c.broker.max_reconsume = 0);
    let leader = cluster.leader(1).unwrap_or(1);
    let q0 = QueueId::new("orders", 0);
    let send = Request::Send {
        broker: 1,
        queue: q0.clone(),
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["a", "b", "c"]),
    };
    assert!(matches!(cluster.ask(leader, send), Response::Sent { .. }));
    for (group, pulls) in [("billing", 2), ("audit", 1)] {
        for _ in 0..pulls {
            let pulled = cluster.ask(leader, pull_as(group, "m", 1));
            assert!(
                matches!(&pulled, Response::Pulled { messages, .. } if messages.len() == 3),
                "{pulled:?}"
            );
        }
    }
    let nack = |group: &str, offset| Request::ReconsumeLater {
        broker: 1,
        group: group.into(),
        member: "m".into(),
        generation: 1,
        queue: QueueId::new("orders", 0),
        offset,
    };
    for offset in [0, 2] {
        let answer = cluster.ask(leader, nack("billing", offset));
        assert!(
            matches!(
                answer,
                Response::Requeued {
                    dead_letter: true,
                    ..
                }
            ),
            "max_reconsume 0: straight to the dead-letter queue: {answer:?}"
        );
    }
    for _ in 0..100 {
        cluster.step();
    }
    let counters = |cluster: &Cluster, node: NodeId, group: &str| {
        cluster.nodes[&node]
            .stats()
            .consumers
            .into_iter()
            .find(|c| c.group == 1 && c.consumer_group == group && c.queue == q0)
            .map(|c| c.counters)
    };
    for node in 1..=3 {
        let billing = counters(&cluster, node, "billing").unwrap_or_default();
        assert_eq!(
            billing.dead_lettered, 2,
            "node {node}: applied on every replica"
        );
        assert_eq!(billing.reconsumed, 0, "node {node}");
        let redelivered = if node == leader { 3 } else { 0 };
        assert_eq!(
            billing.redelivered, redelivered,
            "node {node}: the leader's pulls"
        );
        assert_eq!(
            counters(&cluster, node, "audit").unwrap_or_default(),
            Default::default(),
            "node {node}: audit saw each message once and answered none"
        );
    }
    // The dead letters are pulled as a queue of their own, counted under its topic.
    let dlq = QueueId::dead_letter("billing");
    let pull_dlq = Request::Pull {
        broker: 1,
        group: "billing".into(),
        member: "m".into(),
        generation: 1,
        tenure: 1,
        queue: dlq.clone(),
        from: 0,
        messages_max: 10,
        bytes_max: 1 << 20,
        wait_ms: 0,
    };
    let pulled = cluster.ask(leader, pull_dlq);
    assert!(
        matches!(&pulled, Response::Pulled { messages, .. } if messages.len() == 2),
        "{pulled:?}"
    );
    assert!(
        cluster.nodes[&leader]
            .stats()
            .topics
            .contains_key(&*dlq.topic)
    );

    let delete = Request::DeleteGroup {
        broker: 1,
        group: "billing".into(),
        force: true,
    };
    let deleted = cluster.ask(leader, delete);
    assert!(
        matches!(deleted, Response::GroupDeleted { .. }),
        "{deleted:?}"
    );
    for _ in 0..100 {
        cluster.step();
    }
    for node in 1..=3 {
        let stats = cluster.nodes[&node].stats();
        assert!(
            !stats
                .consumers
                .iter()
                .any(|c| c.consumer_group == "billing"),
            "node {node} still reports the deleted group: {:?}",
            stats.consumers
        );
        assert!(!stats.topics.contains_key(&*dlq.topic), "node {node}");
    }
    // audit still has its (all zero) series until the topic goes.
    let pulled = cluster.ask(leader, pull_as("audit", "m", 1));
    assert!(matches!(&pulled, Response::Pulled { messages, .. } if messages.len() == 3));
    assert_eq!(
        counters(&cluster, leader, "audit").map(|c| c.redelivered),
        Some(3)
    );
    let delete = Request::DeleteTopic {
        topic: "orders".into(),
    };
    assert!(matches!(
        cluster.ask(meta, delete),
        Response::TopicDeleted { .. }
    ));
    for _ in 0..200 {
        cluster.step();
    }
    for node in 1..=3 {
        let stats = cluster.nodes[&node].stats();
        assert!(
            stats.consumers.is_empty(),
            "node {node}: {:?}",
            stats.consumers
        );
        assert_eq!(stats.consumer_counters_uncounted, 0);
    }
}

/// `DeleteGroup` without force is refused while a member holds a queue, but not by the lease
/// of a consumer that died: once its holder is unheard from for a member session, the lease
/// goes with the group (it is never released, and a deleted group has nobody to take it over).
#[test]
fn a_dead_consumers_lease_does_not_keep_its_group_from_deletion() {
    let (mut cluster, _) = one_group_with_orders(1, |c| c.member_session_ms = 2_000);
    let leader = cluster.leader(1).unwrap_or(1);
    send_x_to_orders_0(&mut cluster, leader);
    let pulled = cluster.ask(leader, lease_request("pull", "a", 1));
    assert!(matches!(&pulled, Response::Pulled { messages, .. } if messages.len() == 1));
    let delete = Request::DeleteGroup {
        broker: 1,
        group: "billing".into(),
        force: false,
    };
    let refused = cluster.ask(leader, delete.clone());
    assert!(
        matches!(&refused, Response::Refused { reason } if reason.contains("a")),
        "a holds orders/0 and was just heard from: {refused:?}"
    );
    // a dies: nothing more from it.
    for _ in 0..2_100 {
        cluster.step();
    }
    let deleted = cluster.ask(leader, delete);
    assert!(
        matches!(deleted, Response::GroupDeleted { leases: 1, .. }),
        "{deleted:?}"
    );
    for _ in 0..100 {
        cluster.step();
    }
    for (id, node) in &cluster.nodes {
        let state = node.broker_state(1).expect("a broker group");
        assert!(
            state.lease("billing", &QueueId::new("orders", 0)).is_none(),
            "node {id}"
        );
    }
}

/// A pull of "orders"/0 for consumer group `group` by `member` at `generation`.
fn pull_as(group: &str, member: &str, generation: u64) -> Request {
    Request::Pull {
        broker: 1,
        group: group.into(),
        member: member.into(),
        generation,
        tenure: 1,
        queue: QueueId::new("orders", 0),
        from: 0,
        messages_max: 10,
        bytes_max: 1 << 20,
        wait_ms: 0,
    }
}

/// Consumer groups nobody speaks for expire through the log once the broker leader has not
/// heard from any of their members for the retention: leases claimed under invented names do
/// not stay, while a real group's offsets survive an absence shorter than the retention.
#[test]
fn silent_consumer_groups_expire_and_a_short_absence_keeps_offsets() {
    let (mut cluster, _) = one_group_with_orders(1, |c| {
        c.group_retention_ms = Some(2_000);
        c.trim_interval_ms = 100;
    });
    let leader = cluster.leader(1).unwrap_or(1);
    let send = Request::Send {
        broker: 1,
        queue: QueueId::new("orders", 0),
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["x", "y", "z"]),
    };
    assert!(matches!(cluster.ask(leader, send), Response::Sent { .. }));
    let pulled = cluster.ask(leader, pull_as("billing", "a", 1));
    assert!(matches!(&pulled, Response::Pulled { messages, .. } if messages.len() == 3));
    assert!(matches!(
        cluster.ask(leader, lease_request("ack", "a", 1)),
        Response::Acked {
            consume_offset: 1,
            ..
        }
    ));
    // Invented names: each pull claims a lease under a new group.
    for i in 0..300 {
        cluster.send(leader, pull_as(&format!("invented-{i}"), "m", 1));
    }
    for _ in 0..200 {
        cluster.step();
    }
    let leases = |cluster: &Cluster, node: NodeId| {
        cluster.nodes[&node]
            .broker_state(1)
            .map_or(0, |s| s.leases().count())
    };
    assert!(
        leases(&cluster, leader) > 300,
        "{}",
        leases(&cluster, leader)
    );

    // billing is away for 1.5 s (shorter than the retention), then back; the invented
    // groups never come back.
    for _ in 0..1_500 {
        cluster.step();
    }
    let back = cluster.ask(leader, pull_as("billing", "a", 1));
    assert!(matches!(back, Response::Pulled { .. }), "{back:?}");
    for _ in 0..1_500 {
        cluster.step();
    }
    assert_eq!(
        cluster.leader(1),
        Some(leader),
        "no change of leader in this test"
    );
    for (id, node) in &cluster.nodes {
        let state = node.broker_state(1).expect("a broker group");
        let groups: Vec<&str> = state.consumer_groups().into_iter().collect();
        assert_eq!(groups, vec!["billing"], "node {id}");
        assert_eq!(state.leases().count(), 1, "node {id}");
        assert_eq!(
            state.consume_offset("billing", &QueueId::new("orders", 0)),
            1,
            "node {id}: billing's offset survived its short absence"
        );
    }
    // Silent for longer than the retention, billing goes too.
    for _ in 0..2_500 {
        cluster.step();
    }
    for (id, node) in &cluster.nodes {
        let state = node.broker_state(1).expect("a broker group");
        assert!(state.consumer_groups().is_empty(), "node {id}");
    }
}

/// A few entries of large batches compact the log once their bytes pass
/// `snapshot_log_bytes`, long before `snapshot_entries_min` entries: the log carries message
/// bytes until compaction, so this is what bounds its memory.
#[test]
fn a_log_of_large_batches_is_compacted_by_its_bytes() {
    let compacted_after = |log_bytes: u64| {
        let (mut cluster, _) = one_group_with_orders(1, |config| {
            config.snapshot_entries_min = Some(1_000_000);
            config.snapshot_log_bytes = log_bytes;
        });
        for _ in 0..20 {
            cluster.step();
        }
        let leader = cluster.leader(1).unwrap_or(1);
        let body = "b".repeat(64 << 10);
        for seq in 0..24u64 {
            let send = Request::Send {
                broker: 1,
                queue: QueueId::new("orders", 0),
                producer_id: 5,
                first_seq: seq * 2,
                messages: batch(&[&body, &body]),
            };
            assert!(matches!(
                cluster.ask(leader, send),
                Response::Sent {
                    duplicate: false,
                    ..
                }
            ));
        }
        for _ in 0..20 {
            cluster.step();
        }
        cluster.nodes[&leader]
            .replica(1)
            .map_or(0, |r| r.status().snapshot_index)
    };
    // 24 entries of 128 KiB: 3 MiB of log.
    assert!(compacted_after(1 << 20) > 0, "compacted after 1 MiB");
    assert_eq!(compacted_after(64 << 20), 0, "3 MiB stays under 64 MiB");
}

/// A node restarting from a broker snapshot taken before a topic's drop, with the drop in the
/// log after it, does not ask its store for the dropped queues (their files went when the
/// drop was applied): the rest it still checks.
#[test]
fn a_restart_does_not_ask_the_store_for_queues_its_log_drops() {
    use crate::broker::{BrokerConfig, BrokerState, Command, encode_command};
    use crate::raft::{Entry, EntryKind, HardState, Snapshot};
    let mut state = BrokerState::new(BrokerConfig::default());
    state.apply(Command::CreateQueuesAt {
        queues: vec![
            (3, QueueId::new("orders", 0)),
            (0, QueueId::new("other", 0)),
        ],
    });
    let snapshot = Snapshot {
        index: 5,
        term: 1,
        data: Bytes::from(state.metadata_snapshot().expect("encodes")),
        membership: None,
    };
    let drop = Command::DropTopic {
        topic: "orders".into(),
        epoch: 3,
    };
    let disk = Recovered {
        hard_state: HardState {
            term: 1,
            vote: None,
            commit: 6,
        },
        snapshot: Some(snapshot),
        entries: vec![Entry {
            term: 1,
            index: 6,
            kind: EntryKind::Commands(vec![encode_command(&drop)]),
        }],
    };
    let mut node = BrokerNode::new(
        NodeConfig::new(1, vec![1, 2, 3], 1),
        BTreeMap::from([(1, disk)]),
        5,
        Instant::ZERO,
    );
    assert_eq!(node.poll_fault(), None);
    let asked: Vec<QueueId> = std::iter::from_fn(|| node.poll_store())
        .filter_map(|(group, op)| match op {
            StoreOp::Recover { queues } if group == 1 => Some(queues),
            _ => None,
        })
        .flatten()
        .map(|r| r.queue)
        .collect();
    assert_eq!(asked, vec![QueueId::new("other", 0)]);
}

/// A restart applies the log it recovered a step at a time: the store writes waiting for the
/// driver never weigh more than `replay_store_bytes_max` plus one entry's, and the node ends
/// where a replay in one go ends, with the same store operations in the same order.
#[test]
fn a_restart_replays_its_log_in_steps_bounded_by_their_store_writes() {
    use crate::broker::{Command, encode_command};
    use crate::raft::{Entry, EntryKind, HardState};
    let queues = [QueueId::new("orders", 0), QueueId::new("orders", 1)];
    let body = "m".repeat(1024);
    let mut entries = vec![Entry {
        term: 1,
        index: 1,
        kind: EntryKind::Commands(vec![encode_command(&Command::CreateQueues {
            queues: queues.to_vec(),
        })]),
    }];
    for index in 2..=300u64 {
        let append = Command::Append {
            queue: queues[(index % 2) as usize].clone(),
            producer_id: 7,
            first_seq: index * 4,
            messages: batch(&[&body, &body, &body, &body]),
            stamp_ms: index,
        };
        entries.push(Entry {
            term: 1,
            index,
            kind: EntryKind::Commands(vec![encode_command(&append)]),
        });
    }
    let disk = Recovered {
        hard_state: HardState {
            term: 1,
            vote: None,
            commit: 300,
        },
        snapshot: None,
        entries,
    };
    // Each replay step's store operations, and the state it ends in.
    let replay = |bytes_max: u64| {
        let mut config = NodeConfig::new(1, vec![1, 2, 3], 1);
        config.replay_store_bytes_max = bytes_max;
        let mut node = BrokerNode::new(
            config,
            BTreeMap::from([(1, disk.clone())]),
            5,
            Instant::ZERO,
        );
        let mut steps: Vec<Vec<(GroupId, StoreOp)>> = Vec::new();
        loop {
            steps.push(std::iter::from_fn(|| node.poll_store()).collect());
            if !node.replaying() {
                break;
            }
            node.replay(Instant::ZERO);
            assert!(steps.len() < 10_000, "the replay makes progress");
        }
        let status = node.replica(1).expect("group 1").status();
        let state = node.broker_state(1).expect("a broker group");
        let snapshot = state.metadata_snapshot().expect("encodes");
        (steps, status.applied_index, snapshot)
    };
    let weight = |step: &Vec<(GroupId, StoreOp)>| -> u64 {
        step.iter().map(|(_, op)| op.weight_bytes()).sum()
    };
    let bytes_max = 16 << 10;
    let (steps, applied, snapshot) = replay(bytes_max);
    let (once, applied_once, snapshot_once) = replay(u64::MAX);
    assert_eq!(once.len(), 1, "an unbounded replay is one step");
    let total = weight(&once[0]);
    assert!(total > 1 << 20, "the log writes over 1 MiB: {total}");
    // One entry's writes: four records of a little over 1 KiB.
    let entry_max = 4 * (64 + 1024 + 256);
    let most = steps.iter().map(weight).max().unwrap_or(0);
    assert!(
        most <= bytes_max + entry_max,
        "a step queued {most} bytes of store writes, over {bytes_max} + {entry_max}"
    );
    assert!(steps.len() > 50, "{} steps", steps.len());
    assert_eq!((applied, applied_once), (300, 300));
    assert_eq!(snapshot, snapshot_once, "the same state");
    let flat: Vec<(GroupId, StoreOp)> = steps.into_iter().flatten().collect();
    assert_eq!(flat, once.into_iter().flatten().collect::<Vec<_>>());
}

#[test]
fn a_proposal_reported_committed_where_the_log_holds_another_entry_is_not_believed() {
    use super::broker_node::misreported;
    let (cluster, _) = cluster_with_orders();
    let leader = cluster.leader(1).expect("group 1 has a leader");
    let raft = cluster.nodes[&leader].replica(1).expect("group 1");
    let index = raft.status().commit_index;
    let term = raft.entry(index).expect("the committed entry is held").term;
    assert_eq!(misreported(raft, 7, index, Some((index, term))), None);
    // Not a proposal this node knows of: nobody waits for it, so there is nothing to check.
    assert_eq!(misreported(raft, 7, index, None), None);
    let said = |why: Option<String>, what: &str| why.is_some_and(|w| w.contains(what));
    assert!(said(
        misreported(raft, 7, index, Some((index, term + 1))),
        "holds an entry of term"
    ));
    assert!(said(
        misreported(raft, 7, index, Some((index - 1, term))),
        "was proposed at"
    ));
    assert!(said(
        misreported(raft, 7, index + 1, Some((index + 1, term))),
        "above the commit index"
    ));
}
