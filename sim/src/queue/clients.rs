//! The clients of the queue workload: an admin that creates the topic, producers, and the
//! members of two consumer groups, driven through the simulated network.

use std::collections::BTreeMap;

use bytes::Bytes;
use holdfast_core::broker::Message;
use std::time::Duration;

use holdfast_core::client::{
    AckStatus, Consumer, ConsumerConfig, ConsumerEvent, Delivery, Producer, ProducerConfig,
    SendResult,
};
use holdfast_core::node::protocol::{ClientId, Request, RequestId, Response};
use holdfast_core::raft::{Canary, GroupId, NodeId};
use holdfast_core::time::Instant;
use rand::RngExt;

use super::history::{Found, SendOutcome};
use super::{CONSUMER_GROUPS, Event, QueueWorld, TOPIC};
use crate::checker::Violation;
use crate::kernel::{Phase, ms};

const PRODUCERS: usize = 3;
const MEMBERS_PER_GROUP: usize = 2;
const ADMIN: ClientId = 1;
/// One answer in ten is `ReconsumeLater`.
const RECONSUME_PER_MILLE: u32 = 100;

struct ProducerSlot {
    id: ClientId,
    producer: Producer,
    /// First sequence number of each send in flight.
    sends: BTreeMap<u64, u64>,
    messages: u64,
}

struct ConsumerSlot {
    group: &'static str,
    name: String,
    generation: u32,
    id: ClientId,
    consumer: Option<Consumer>,
}

enum Who {
    Producer(usize),
    Consumer(usize),
}

pub(crate) struct Clients {
    nodes: Vec<NodeId>,
    /// Sends each producer keeps in flight (drawn per seed: most seeds wait for each send,
    /// some pipeline, as the shell's `send_async` allows).
    pub(crate) pipeline: usize,
    topic_ready: bool,
    admin_turn: usize,
    /// The metadata leader a refusal named, asked next: as `holdfast topic create` follows
    /// hints, and the only way to reach a leader added at runtime, outside `nodes`.
    admin_hint: Option<NodeId>,
    producers: Vec<ProducerSlot>,
    consumers: Vec<ConsumerSlot>,
    by_id: BTreeMap<ClientId, Who>,
    next_id: ClientId,
    timers: BTreeMap<ClientId, Instant>,
}

impl Clients {
    pub(crate) fn new(nodes: &[NodeId], _broker_groups: GroupId) -> Clients {
        let mut clients = Clients {
            nodes: nodes.to_vec(),
            pipeline: 1,
            topic_ready: false,
            admin_turn: 0,
            admin_hint: None,
            producers: Vec::new(),
            consumers: Vec::new(),
            by_id: BTreeMap::new(),
            next_id: 100,
            timers: BTreeMap::new(),
        };
        for i in 0..PRODUCERS {
            let id = clients.fresh_id();
            let mut config = ProducerConfig::new(i as u64 + 1, nodes.to_vec());
            config.request_timeout_ms = 500;
            config.avoid_ms = 1_000;
            config.route_ttl_ms = 2_000;
            clients.by_id.insert(id, Who::Producer(i));
            clients.producers.push(ProducerSlot {
                id,
                producer: Producer::new(config),
                sends: BTreeMap::new(),
                messages: 0,
            });
        }
        for group in CONSUMER_GROUPS {
            for m in 0..MEMBERS_PER_GROUP {
                clients.consumers.push(ConsumerSlot {
                    group,
                    name: format!("{group}-{m}"),
                    generation: 0,
                    id: 0,
                    consumer: None,
                });
            }
        }
        clients
    }

    fn fresh_id(&mut self) -> ClientId {
        self.next_id += 1;
        self.next_id
    }

    /// Nothing in flight anywhere: every send resolved, every consumer answered and
    /// confirmed everything it was handed.
    pub(crate) fn idle(&self) -> Result<(), String> {
        if !self.topic_ready {
            return Err("the topic is not created".into());
        }
        if let Some(p) = self.producers.iter().find(|p| p.producer.in_flight() > 0) {
            return Err(format!("producer {} has sends in flight", p.id));
        }
        for slot in &self.consumers {
            match &slot.consumer {
                None => return Err(format!("consumer {} is down", slot.name)),
                Some(c) if c.busy() > 0 => {
                    return Err(format!(
                        "consumer {} has {} answers pending",
                        slot.name,
                        c.busy()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

impl QueueWorld {
    pub(super) fn admin(&mut self) -> Result<(), Violation> {
        if self.clients.topic_ready {
            return Ok(());
        }
        let clients = &mut self.clients;
        clients.admin_turn += 1;
        let node = clients
            .admin_hint
            .take()
            .unwrap_or(clients.nodes[clients.admin_turn % clients.nodes.len()]);
        let request = Request::CreateTopic {
            topic: TOPIC.into(),
            queues: 4,
        };
        self.send_to_node(
            node,
            ADMIN,
            clients_request_id(self.clients.admin_turn),
            request,
        );
        self.k.schedule(self.k.now + ms(200), Event::Admin);
        Ok(())
    }

    fn topic_created(&mut self) -> Result<(), Violation> {
        if self.clients.topic_ready {
            return Ok(());
        }
        self.clients.topic_ready = true;
        self.k
            .trace
            .record(self.k.now, &[20], || "topic created".into());
        for producer in 0..self.clients.producers.len() {
            self.k.schedule(self.k.now, Event::Produce { producer });
        }
        self.restart_all_consumers()
    }

    pub(super) fn produce(&mut self, index: usize) -> Result<(), Violation> {
        if self.k.phase == Phase::Liveness {
            return Ok(());
        }
        let now = self.k.now;
        let count = self.k.rng.random_range(1..=4u64);
        let Some(slot) = self.clients.producers.get_mut(index) else {
            return Ok(());
        };
        let producer_id = slot.producer.producer_id();
        let bodies: Vec<Bytes> = (0..count)
            .map(|k| Bytes::from(format!("p{producer_id}-{}", slot.messages + k)))
            .collect();
        slot.messages += count;
        let messages = bodies.iter().cloned().map(Message::with_body).collect();
        let (send, first_seq) = slot.producer.send(now, TOPIC, messages);
        slot.sends.insert(send, first_seq);
        let in_flight = slot.sends.len();
        // A producer that waits for each send relies on their order; the canary pipelines
        // while relying on it.
        let ordered = self.clients.pipeline == 1;
        self.history
            .sent(now, producer_id, first_seq, bodies, ordered);
        if self.async_send() || in_flight < self.clients.pipeline {
            // The planted bug: the next send leaves without waiting for this one.
            let think = ms(self.k.rng.random_range(1..10));
            self.k
                .schedule(now + think, Event::Produce { producer: index });
        }
        self.flush_producer(index)
    }

    fn flush_producer(&mut self, index: usize) -> Result<(), Violation> {
        let now = self.k.now;
        let Some(slot) = self.clients.producers.get_mut(index) else {
            return Ok(());
        };
        let id = slot.id;
        let producer_id = slot.producer.producer_id();
        let mut requests = Vec::new();
        while let Some(request) = slot.producer.poll_request() {
            requests.push(request);
        }
        let mut ended = Vec::new();
        while let Some((send, result)) = slot.producer.poll_result() {
            if let Some(first_seq) = slot.sends.remove(&send) {
                ended.push((first_seq, result));
            }
        }
        let timer = slot.producer.poll_timeout();
        for (node, request_id, request) in requests {
            self.send_to_node(node, id, request_id, request);
        }
        for (first_seq, result) in ended {
            let outcome = match result {
                SendResult::Acked {
                    broker,
                    queue,
                    base_offset,
                    ambiguous,
                } => SendOutcome::Acked {
                    broker,
                    queue,
                    base_offset,
                    ambiguous,
                },
                SendResult::Failed { maybe_written, .. } => SendOutcome::Failed { maybe_written },
            };
            if matches!(
                outcome,
                SendOutcome::Acked {
                    ambiguous: true,
                    ..
                } | SendOutcome::Failed {
                    maybe_written: true
                }
            ) {
                self.k.stats.coverage.bump("ambiguous-send", 1);
            }
            self.k.trace.record(now, &[21, producer_id, first_seq], || {
                format!("producer {producer_id} seq {first_seq}: {outcome:?}")
            });
            self.history
                .send_ended(now, producer_id, first_seq, outcome);
            // One send at a time per producer, so its acked batches keep their order (or a
            // few at a time in a pipelining seed: a new one whenever one ends).
            let in_flight = self
                .clients
                .producers
                .get(index)
                .map_or(0, |p| p.sends.len());
            if !self.async_send() && in_flight < self.clients.pipeline {
                // A pipelining producer thinks as much longer as it keeps sends in flight: its
                // sends overlap, yet it sends about as much as one that waits, so a seed costs
                // about as much either way.
                let depth = self.clients.pipeline as u64;
                let think = ms(self.k.rng.random_range(1..30) * depth);
                self.k
                    .schedule(now + think, Event::Produce { producer: index });
            }
        }
        self.arm_timer(id, timer);
        Ok(())
    }

    /// inconsistent-offsets, at once: what a consumer was handed from a place is what every
    /// replica that has applied that place holds there.
    fn check_place(
        &self,
        group: &str,
        broker: GroupId,
        queue: &holdfast_core::broker::QueueId,
        offset: holdfast_core::broker::Offset,
        found: &Found,
    ) -> Result<(), Violation> {
        for (node, state) in self.broker_states(broker) {
            let Some(stored) = state.message(queue, offset) else {
                continue;
            };
            let held = (stored.producer_id, stored.seq, stored.reconsume_times);
            if held != (found.producer_id, found.seq, found.reconsume_times) {
                return Err(crate::checker::violation(
                    "inconsistent-offsets",
                    format!(
                        "{group} was handed {found:?} as {queue}@{offset} of group {broker}, where \
                         node {node} holds producer {} seq {} (reconsumed {})",
                        held.0, held.1, held.2
                    ),
                ));
            }
        }
        Ok(())
    }

    fn async_send(&self) -> bool {
        Canary::AsyncSend.planted(self.canary)
    }

    fn arm_timer(&mut self, client: ClientId, at: Option<Instant>) {
        let Some(at) = at else {
            self.clients.timers.remove(&client);
            return;
        };
        let at = at.max(self.k.now + std::time::Duration::from_micros(1));
        if self.clients.timers.get(&client) != Some(&at) {
            self.clients.timers.insert(client, at);
            self.k.schedule(at, Event::ClientTimer { client, at });
        }
    }

    pub(super) fn client_timer(&mut self, client: ClientId, at: Instant) -> Result<(), Violation> {
        if self.clients.timers.get(&client) != Some(&at) {
            return Ok(());
        }
        self.clients.timers.remove(&client);
        let now = self.k.now;
        match self.clients.by_id.get(&client) {
            Some(Who::Producer(i)) => {
                let i = *i;
                if let Some(slot) = self.clients.producers.get_mut(i) {
                    slot.producer.handle_timeout(now);
                }
                self.flush_producer(i)
            }
            Some(Who::Consumer(i)) => {
                let i = *i;
                if let Some(c) = self.consumer_mut(i) {
                    c.handle_timeout(now);
                }
                self.flush_consumer(i)
            }
            None => Ok(()),
        }
    }

    pub(super) fn client_response(
        &mut self,
        client: ClientId,
        id: RequestId,
        response: Response,
    ) -> Result<(), Violation> {
        let now = self.k.now;
        if client == super::operator::OPERATOR {
            self.operator_response(id, &response);
            return Ok(());
        }
        if client == ADMIN {
            return match response {
                Response::TopicCreated { .. } => self.topic_created(),
                Response::NotLeader {
                    leader_hint: Some(leader),
                    ..
                } => {
                    self.clients.admin_hint = Some(leader);
                    Ok(())
                }
                _ => Ok(()),
            };
        }
        match self.clients.by_id.get(&client) {
            Some(Who::Producer(i)) => {
                let i = *i;
                if let Some(slot) = self.clients.producers.get_mut(i) {
                    slot.producer.handle_response(now, id, response);
                }
                self.flush_producer(i)
            }
            Some(Who::Consumer(i)) => {
                let i = *i;
                if let Some(c) = self.consumer_mut(i) {
                    c.handle_response(now, id, response);
                }
                self.flush_consumer(i)
            }
            None => Ok(()),
        }
    }

    fn consumer_mut(&mut self, slot: usize) -> Option<&mut Consumer> {
        self.clients.consumers.get_mut(slot)?.consumer.as_mut()
    }

    /// Hands out the consumer's requests, answers its deliveries, and records what it saw.
    fn flush_consumer(&mut self, index: usize) -> Result<(), Violation> {
        let now = self.k.now;
        loop {
            let Some(slot) = self.clients.consumers.get_mut(index) else {
                return Ok(());
            };
            let (id, group) = (slot.id, slot.group);
            let Some(consumer) = slot.consumer.as_mut() else {
                return Ok(());
            };
            let mut requests = Vec::new();
            while let Some(request) = consumer.poll_request() {
                requests.push(request);
            }
            let mut events = Vec::new();
            while let Some(event) = consumer.poll_event() {
                events.push(event);
            }
            let mut deliveries = Vec::new();
            while let Some(delivery) = consumer.poll_delivery() {
                deliveries.push(delivery);
            }
            if requests.is_empty() && events.is_empty() && deliveries.is_empty() {
                // Only once nothing is left: the consumer walks all it has in flight for it.
                let timer = consumer.poll_timeout();
                self.arm_timer(id, Some(timer));
                return Ok(());
            }
            for (node, request_id, request) in requests {
                self.send_to_node(node, id, request_id, request);
            }
            for event in events {
                self.consumer_event(id, group, event)?;
            }
            for delivery in deliveries {
                let stored = &delivery.message;
                let found = Found {
                    producer_id: stored.producer_id,
                    seq: stored.seq,
                    reconsume_times: stored.reconsume_times,
                    body: stored.message.body.clone(),
                };
                self.check_place(
                    group,
                    delivery.broker,
                    &delivery.queue,
                    delivery.offset,
                    &found,
                )?;
                if delivery.queue.is_retry() {
                    let delay_ms = super::broker_config(self.k.swarm.retention)
                        .reconsume_delay_ms(found.reconsume_times);
                    self.history.check_retry_delay(
                        now,
                        group,
                        &delivery.queue,
                        delivery.offset,
                        &found,
                        delay_ms,
                    )?;
                }
                self.history.delivered(
                    id,
                    group,
                    delivery.broker,
                    &delivery.queue,
                    delivery.offset,
                    found,
                )?;
                let status = if self.k.rng.random_range(0..1_000) < RECONSUME_PER_MILLE {
                    AckStatus::ReconsumeLater
                } else {
                    AckStatus::Success
                };
                let ack_on_delivery = Canary::AckOnDelivery.planted(self.canary);
                if ack_on_delivery && let Some(c) = self.consumer_mut(index) {
                    // The planted bug: the message is acknowledged as it is handed out.
                    c.answer(now, &delivery, AckStatus::Success);
                }
                // Most answers come at once; some consumers are slow, a few very slow.
                let think = match self.k.rng.random_range(0..100) {
                    0..80 => Duration::ZERO,
                    80..97 => ms(self.k.rng.random_range(1..100)),
                    _ => ms(self.k.rng.random_range(500..3_000)),
                };
                if think.is_zero() {
                    let found = &delivery.message;
                    self.history.answered(
                        now,
                        group,
                        &found_of(found),
                        status == AckStatus::Success,
                    );
                    if let Some(c) = self.consumer_mut(index)
                        && !ack_on_delivery
                    {
                        c.answer(now, &delivery, status);
                    }
                } else {
                    let generation = self.clients.consumers[index].generation;
                    let event = Event::Answer {
                        slot: index,
                        generation,
                        delivery: Box::new(delivery),
                        status,
                    };
                    self.k.schedule(now + think, event);
                }
            }
        }
    }

    fn consumer_event(
        &mut self,
        client: ClientId,
        group: &str,
        event: ConsumerEvent,
    ) -> Result<(), Violation> {
        let now = self.k.now;
        match event {
            ConsumerEvent::Rebalanced { generation, owned } => {
                self.k.stats.coverage.bump("consumer-rebalance", 1);
                self.history.rebalanced(client);
                self.k
                    .trace
                    .record(now, &[22, client, owned.len() as u64, generation], || {
                        format!(
                            "consumer {client} of {group} owns {owned:?} at generation {generation}"
                        )
                    });
            }
            ConsumerEvent::Pulled {
                broker,
                queue,
                requested_at,
                generation,
                offsets,
            } => {
                self.k.trace.record(now, &[23, client, broker, offsets.len() as u64], || {
                    format!("consumer {client} of {group} pulled {queue} of group {broker}: {offsets:?}")
                });
                if !offsets.is_empty() {
                    self.ownership.served(
                        now,
                        group,
                        client,
                        broker,
                        &queue,
                        generation,
                        requested_at,
                    )?;
                }
                self.history
                    .pulled(client, group, broker, &queue, requested_at, &offsets)?;
            }
            ConsumerEvent::AckConfirmed {
                broker,
                queue,
                offsets,
            } => self
                .history
                .ack_confirmed(now, group, broker, &queue, &offsets),
            ConsumerEvent::Revoked {
                broker,
                queue,
                reason,
            } => {
                self.k.trace.record(now, &[24, client, broker], || {
                    format!(
                        "consumer {client} of {group}: {queue} of group {broker} revoked: {reason}"
                    )
                });
            }
            ConsumerEvent::ReleaseSent { broker, queue } => {
                self.k.trace.record(now, &[25, client, broker], || {
                    format!("consumer {client} of {group} releases {queue} of group {broker}")
                });
                self.ownership.released(group, client, broker, &queue, now);
            }
            ConsumerEvent::Rewound { broker, queue } => {
                self.k.trace.record(now, &[26, client, broker], || {
                    format!(
                        "consumer {client} of {group} pulls {queue} of group {broker} again from \
                         the committed offset (answers from an earlier tenure were refused)"
                    )
                });
                self.history.rewound(client, broker, &queue);
            }
            ConsumerEvent::Requeued {
                broker,
                queue,
                offset,
                dead_letter,
            } => self
                .history
                .requeued(group, broker, &queue, offset, dead_letter),
        }
        Ok(())
    }

    /// A slow consumer's answer, if that consumer is still the one that was handed it.
    pub(super) fn answer_later(
        &mut self,
        slot: usize,
        generation: u32,
        delivery: &Delivery,
        status: AckStatus,
    ) -> Result<(), Violation> {
        let now = self.k.now;
        let Some(s) = self.clients.consumers.get_mut(slot) else {
            return Ok(());
        };
        if s.generation != generation {
            return Ok(()); // the listener's process crashed before it answered
        }
        let group = s.group;
        if let Some(consumer) = s.consumer.as_mut() {
            if !Canary::AckOnDelivery.planted(self.canary) {
                consumer.answer(now, delivery, status);
            }
            let found = found_of(&delivery.message);
            self.history
                .answered(now, group, &found, status == AckStatus::Success);
        }
        self.flush_consumer(slot)
    }

    /// `node`'s process died: the producers' connections to it close, and they fail over
    /// at once what they had in flight there, as the shell's client does (`client/io.rs`).
    pub(super) fn connections_lost(&mut self, node: NodeId) -> Result<(), Violation> {
        let now = self.k.now;
        for index in 0..self.clients.producers.len() {
            self.clients.producers[index]
                .producer
                .connection_lost(now, node);
            self.flush_producer(index)?;
        }
        Ok(())
    }

    /// Takes a random running consumer down; false if none runs.
    pub(super) fn crash_one_consumer(&mut self) -> bool {
        let running: Vec<usize> = (0..self.clients.consumers.len())
            .filter(|i| self.clients.consumers[*i].consumer.is_some())
            .collect();
        if running.is_empty() {
            return false;
        }
        let slot = running[self.k.rng.random_range(0..running.len())];
        let consumer = &mut self.clients.consumers[slot];
        consumer.consumer = None;
        let id = consumer.id;
        self.history.crashed.insert(id);
        self.clients.by_id.remove(&id);
        self.clients.timers.remove(&id);
        let back = self.k.now + ms(self.k.rng.random_range(100..2_000));
        self.k.schedule(back, Event::RestartConsumer { slot });
        true
    }

    pub(super) fn restart_consumer(&mut self, slot: usize) -> Result<(), Violation> {
        if !self.clients.topic_ready {
            return Ok(());
        }
        let id = self.clients.fresh_id();
        let nodes = self.clients.nodes.clone();
        let now = self.k.now;
        let Some(s) = self.clients.consumers.get_mut(slot) else {
            return Ok(());
        };
        if s.consumer.is_some() {
            return Ok(());
        }
        s.generation += 1;
        s.id = id;
        let member = format!("{}-{}", s.name, s.generation);
        let mut config = ConsumerConfig::new(s.group, &member, TOPIC, nodes);
        config.heartbeat_ms = 300;
        config.request_timeout_ms = 1_000;
        config.long_poll_ms = 300;
        config.pull_batch = 16;
        config.unanswered_max = 64;
        s.consumer = Some(Consumer::new(config, now));
        self.clients.by_id.insert(id, Who::Consumer(slot));
        self.flush_consumer(slot)
    }

    pub(super) fn restart_all_consumers(&mut self) -> Result<(), Violation> {
        for slot in 0..self.clients.consumers.len() {
            self.restart_consumer(slot)?;
        }
        Ok(())
    }
}

fn found_of(stored: &holdfast_core::broker::StoredMessage) -> Found {
    Found {
        producer_id: stored.producer_id,
        seq: stored.seq,
        reconsume_times: stored.reconsume_times,
        body: stored.message.body.clone(),
    }
}

/// The admin's request ids: one per attempt.
fn clients_request_id(turn: usize) -> RequestId {
    turn as RequestId
}
