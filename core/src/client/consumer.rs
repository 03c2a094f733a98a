//! The consumer: group membership, queue allocation, long-polling pulls, acks and nacks,
//! sans-IO.
//!
//! A member heartbeats to the metadata leader and gets the group's live members back; every
//! member allocates the same sorted queue list over the same sorted member list, so ownership
//! needs no coordinator. A newly owned queue is pulled from offset 0 and the broker starts at
//! the group's committed consume offset, so ownership moves lose nothing; what was delivered
//! but not acknowledged before a move comes again (at-least-once). Acks and nacks are retried
//! until the broker confirms them: both are idempotent.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::allocation::allocate;
use crate::broker::{Offset, QueueId, StoredMessage};
use crate::node::METADATA_GROUP;
use crate::node::protocol::{Request, RequestId, Response, Route};
use crate::raft::{GroupId, NodeId};
use crate::time::Instant;

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub group: String,
    pub member: String,
    pub topic: String,
    pub nodes: Vec<NodeId>,
    pub heartbeat_ms: u64,
    pub request_timeout_ms: u64,
    pub long_poll_ms: u64,
    /// Messages per pull.
    pub pull_batch: u32,
    /// No pull while this many messages of a queue wait for the application's answer
    /// (RocketMQ's process-queue limit): a slow message does not stall the queue behind it.
    pub unanswered_max: u32,
    /// Retry queues per broker group to consume (the brokers' delay levels).
    pub retry_levels: u32,
    pub route_ttl_ms: u64,
}

impl ConsumerConfig {
    pub fn new(group: &str, member: &str, topic: &str, nodes: Vec<NodeId>) -> ConsumerConfig {
        ConsumerConfig {
            group: group.into(),
            member: member.into(),
            topic: topic.into(),
            nodes,
            heartbeat_ms: 1_000,
            request_timeout_ms: 3_000,
            long_poll_ms: 1_000,
            pull_batch: 32,
            unanswered_max: 1_000,
            retry_levels: 18,
            route_ttl_ms: 30_000,
        }
    }
}

/// A message handed to the application, which must answer it with [`Consumer::answer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub broker: GroupId,
    pub queue: QueueId,
    pub offset: Offset,
    pub message: StoredMessage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckStatus {
    Success,
    ReconsumeLater,
}

/// What happened, for logs and for the simulator's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumerEvent {
    Rebalanced {
        owned: Vec<(GroupId, QueueId)>,
    },
    /// A pull sent at `requested_at` returned these offsets.
    Pulled {
        broker: GroupId,
        queue: QueueId,
        requested_at: Instant,
        offsets: Vec<Offset>,
    },
    AckConfirmed {
        broker: GroupId,
        queue: QueueId,
        offsets: Vec<Offset>,
    },
    Requeued {
        broker: GroupId,
        queue: QueueId,
        offset: Offset,
        dead_letter: bool,
    },
}

struct Owned {
    next: Offset,
    unanswered: u32,
    /// The next pull may leave at this time; [`NEVER`] while one is in flight.
    retry_at: Instant,
}

const NEVER: Instant = Instant::from_micros(u64::MAX);

enum InFlight {
    Heartbeat,
    Routes,
    Pull {
        broker: GroupId,
        queue: QueueId,
        sent_at: Instant,
    },
    Ack(Answer),
    Leave,
}

/// Where a member that is shutting down is in leaving its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaving {
    Staying,
    /// Owns nothing any more; waits for its answers to be confirmed, then says goodbye.
    Draining,
    Left,
}

#[derive(Clone)]
struct Answer {
    broker: GroupId,
    queue: QueueId,
    offsets: Vec<Offset>,
    status: AckStatus,
}

pub struct Consumer {
    config: ConsumerConfig,
    next_request: RequestId,
    turn: u64,
    members: Vec<String>,
    routes: Vec<Route>,
    routes_at: Option<Instant>,
    owned: BTreeMap<(GroupId, QueueId), Owned>,
    leaders: BTreeMap<GroupId, NodeId>,
    heartbeat_due: Instant,
    in_flight: BTreeMap<RequestId, (InFlight, Instant)>,
    /// Answers not yet sent (batched per queue), or to send again.
    answers: Vec<Answer>,
    deliveries: VecDeque<Delivery>,
    events: VecDeque<ConsumerEvent>,
    outbox: VecDeque<(NodeId, RequestId, Request)>,
    leaving: Leaving,
}

impl Consumer {
    pub fn new(config: ConsumerConfig, now: Instant) -> Consumer {
        let mut consumer = Consumer {
            config,
            next_request: 1,
            turn: 0,
            members: Vec::new(),
            routes: Vec::new(),
            routes_at: None,
            owned: BTreeMap::new(),
            leaders: BTreeMap::new(),
            heartbeat_due: now,
            in_flight: BTreeMap::new(),
            answers: Vec::new(),
            deliveries: VecDeque::new(),
            events: VecDeque::new(),
            outbox: VecDeque::new(),
            leaving: Leaving::Staying,
        };
        consumer.work(now);
        consumer
    }

    pub fn member(&self) -> &str {
        &self.config.member
    }

    pub fn owned(&self) -> impl Iterator<Item = &(GroupId, QueueId)> {
        self.owned.keys()
    }

    /// Leaves the group now rather than after the session times out, so the others take over
    /// its queues at once: pulls stop, answers already given are still confirmed, then the
    /// metadata leader is told. Deliveries not yet answered come again to the new owners.
    pub fn leave(&mut self, now: Instant) {
        if self.leaving == Leaving::Staying {
            self.leaving = Leaving::Draining;
            self.owned.clear();
            self.deliveries.clear();
        }
        self.work(now);
    }

    /// Whether the group has confirmed that this member left.
    pub fn has_left(&self) -> bool {
        self.leaving == Leaving::Left
    }

    /// The application's answer for a delivery.
    pub fn answer(&mut self, now: Instant, delivery: &Delivery, status: AckStatus) {
        if let Some(owned) = self
            .owned
            .get_mut(&(delivery.broker, delivery.queue.clone()))
        {
            owned.unanswered = owned.unanswered.saturating_sub(1);
        }
        let same = self.answers.iter_mut().find(|a| {
            a.status == AckStatus::Success
                && status == AckStatus::Success
                && a.broker == delivery.broker
                && a.queue == delivery.queue
        });
        match same {
            Some(answer) => answer.offsets.push(delivery.offset),
            None => self.answers.push(Answer {
                broker: delivery.broker,
                queue: delivery.queue.clone(),
                offsets: vec![delivery.offset],
                status,
            }),
        }
        self.work(now);
    }

    pub fn handle_response(&mut self, now: Instant, request: RequestId, response: Response) {
        let Some((what, _)) = self.in_flight.remove(&request) else {
            return;
        };
        match (what, response) {
            (InFlight::Heartbeat, Response::Members { members, .. }) => {
                self.heartbeat_due = now + Duration::from_millis(self.config.heartbeat_ms);
                if members != self.members {
                    self.members = members;
                    self.rebalance(now);
                }
            }
            (InFlight::Heartbeat, Response::NotLeader { leader_hint, .. }) => {
                self.hint(METADATA_GROUP, leader_hint);
                self.heartbeat_due = now + Duration::from_millis(10);
            }
            (InFlight::Heartbeat, _) => {
                self.heartbeat_due = now + Duration::from_millis(100);
            }
            (InFlight::Routes, Response::Routes { routes, .. }) => {
                for route in &routes {
                    if let Some(leader) = route.leader {
                        self.leaders.insert(route.group, leader);
                    }
                }
                self.routes = routes;
                self.routes_at = Some(now);
                self.rebalance(now);
            }
            (InFlight::Routes, _) => {
                self.routes_at = None;
            }
            (
                InFlight::Pull {
                    broker,
                    queue,
                    sent_at,
                },
                response,
            ) => self.pulled(now, broker, queue, sent_at, response),
            (InFlight::Ack(answer), response) => self.acked(now, answer, response),
            (InFlight::Leave, Response::Members { .. }) => self.leaving = Leaving::Left,
            (InFlight::Leave, Response::NotLeader { leader_hint, .. }) => {
                self.hint(METADATA_GROUP, leader_hint);
            }
            (InFlight::Leave, _) => {}
        }
        self.work(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<RequestId> = self
            .in_flight
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let Some((what, _)) = self.in_flight.remove(&id) else {
                continue;
            };
            match what {
                InFlight::Heartbeat => {
                    self.leaders.remove(&METADATA_GROUP);
                    self.heartbeat_due = now;
                }
                InFlight::Routes => self.routes_at = None,
                InFlight::Pull { broker, queue, .. } => {
                    self.leaders.remove(&broker);
                    if let Some(owned) = self.owned.get_mut(&(broker, queue)) {
                        owned.retry_at = now;
                    }
                }
                InFlight::Ack(answer) => {
                    self.leaders.remove(&answer.broker);
                    self.answers.push(answer);
                }
                InFlight::Leave => {
                    self.leaders.remove(&METADATA_GROUP);
                }
            }
        }
        self.work(now);
    }

    pub fn poll_request(&mut self) -> Option<(NodeId, RequestId, Request)> {
        self.outbox.pop_front()
    }

    pub fn poll_delivery(&mut self) -> Option<Delivery> {
        self.deliveries.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ConsumerEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must next be called. Work blocked behind a request in flight
    /// (a heartbeat, a route fetch, a pull) waits for that request, not for the clock.
    pub fn poll_timeout(&self) -> Instant {
        let in_flight = |f: &dyn Fn(&InFlight) -> bool| self.in_flight.values().any(|(w, _)| f(w));
        let requests = self.in_flight.values().map(|(_, deadline)| *deadline);
        let pulls = self
            .owned
            .values()
            .filter(|o| o.unanswered < self.config.unanswered_max)
            .map(|o| o.retry_at);
        let routes = self
            .routes_at
            .filter(|_| !in_flight(&|w| matches!(w, InFlight::Routes)))
            .map(|at| at + Duration::from_millis(self.config.route_ttl_ms));
        let heartbeat =
            Some(self.heartbeat_due).filter(|_| !in_flight(&|w| matches!(w, InFlight::Heartbeat)));
        requests
            .chain(pulls)
            .chain(routes)
            .chain(heartbeat)
            .min()
            .unwrap_or(NEVER)
    }

    /// Unanswered deliveries, unconfirmed answers and requests in flight: zero when idle.
    pub fn busy(&self) -> usize {
        self.deliveries.len()
            + self.answers.len()
            + self
                .in_flight
                .values()
                .filter(|(w, _)| matches!(w, InFlight::Ack(_)))
                .count()
    }

    fn hint(&mut self, group: GroupId, leader: Option<NodeId>) {
        match leader {
            Some(leader) => self.leaders.insert(group, leader),
            None => self.leaders.remove(&group),
        };
    }

    fn node_for(&mut self, group: GroupId) -> NodeId {
        if let Some(node) = self.leaders.get(&group) {
            return *node;
        }
        self.turn += 1;
        let nodes = &self.config.nodes;
        nodes
            .get((self.turn % nodes.len().max(1) as u64) as usize)
            .copied()
            .unwrap_or(0)
    }

    fn request(
        &mut self,
        now: Instant,
        group: GroupId,
        what: InFlight,
        request: Request,
        wait_ms: u64,
    ) {
        let node = self.node_for(group);
        let id = self.next_request;
        self.next_request += 1;
        let deadline = now + Duration::from_millis(self.config.request_timeout_ms + wait_ms);
        self.in_flight.insert(id, (what, deadline));
        self.outbox.push_back((node, id, request));
    }

    fn send_answers(&mut self, now: Instant) {
        for answer in std::mem::take(&mut self.answers) {
            let request = match answer.status {
                AckStatus::Success => Request::Ack {
                    broker: answer.broker,
                    group: self.config.group.clone(),
                    queue: answer.queue.clone(),
                    offsets: answer.offsets.clone(),
                },
                AckStatus::ReconsumeLater => Request::ReconsumeLater {
                    broker: answer.broker,
                    group: self.config.group.clone(),
                    queue: answer.queue.clone(),
                    offset: answer.offsets.first().copied().unwrap_or(0),
                },
            };
            let broker = answer.broker;
            self.request(now, broker, InFlight::Ack(answer), request, 0);
        }
    }

    /// While leaving: confirm every answer first (a Leave that overtook an ack would hand the
    /// queue over at an offset that is about to move), then say goodbye until it is heard.
    fn work_leaving(&mut self, now: Instant) {
        self.send_answers(now);
        let busy = self
            .in_flight
            .values()
            .any(|(w, _)| !matches!(w, InFlight::Pull { .. }));
        if self.leaving == Leaving::Draining && !busy {
            let request = Request::Leave {
                group: self.config.group.clone(),
                member: self.config.member.clone(),
            };
            self.request(now, METADATA_GROUP, InFlight::Leave, request, 0);
        }
    }

    /// Sends whatever is due: heartbeat, routes, answers, pulls.
    fn work(&mut self, now: Instant) {
        let waiting =
            |c: &Consumer, f: &dyn Fn(&InFlight) -> bool| c.in_flight.values().any(|(w, _)| f(w));
        if self.leaving != Leaving::Staying {
            return self.work_leaving(now);
        }
        if now >= self.heartbeat_due && !waiting(self, &|w| matches!(w, InFlight::Heartbeat)) {
            let request = Request::Heartbeat {
                group: self.config.group.clone(),
                member: self.config.member.clone(),
            };
            self.heartbeat_due = now + Duration::from_millis(self.config.heartbeat_ms);
            self.request(now, METADATA_GROUP, InFlight::Heartbeat, request, 0);
        }
        let routes_stale = self
            .routes_at
            .is_none_or(|at| now >= at + Duration::from_millis(self.config.route_ttl_ms));
        if routes_stale && !waiting(self, &|w| matches!(w, InFlight::Routes)) {
            let request = Request::Route {
                topic: self.config.topic.clone(),
            };
            self.request(now, METADATA_GROUP, InFlight::Routes, request, 0);
        }
        self.send_answers(now);
        let ready: Vec<(GroupId, QueueId, Offset)> = self
            .owned
            .iter()
            .filter(|(_, o)| o.unanswered < self.config.unanswered_max && now >= o.retry_at)
            .map(|((broker, queue), o)| (*broker, queue.clone(), o.next))
            .collect();
        for (broker, queue, from) in ready {
            let pulling = waiting(
                self,
                &|w| matches!(w, InFlight::Pull { broker: b, queue: q, .. } if *b == broker && *q == queue),
            );
            if pulling {
                // The answer to the pull in flight decides when to pull next.
                if let Some(owned) = self.owned.get_mut(&(broker, queue)) {
                    owned.retry_at = NEVER;
                }
                continue;
            }
            let request = Request::Pull {
                broker,
                group: self.config.group.clone(),
                queue: queue.clone(),
                from,
                messages_max: self.config.pull_batch,
                bytes_max: 4 << 20,
                wait_ms: self.config.long_poll_ms,
            };
            if let Some(owned) = self.owned.get_mut(&(broker, queue.clone())) {
                owned.retry_at = NEVER;
            }
            let what = InFlight::Pull {
                broker,
                queue,
                sent_at: now,
            };
            let wait_ms = self.config.long_poll_ms;
            self.request(now, broker, what, request, wait_ms);
        }
    }

    fn pulled(
        &mut self,
        now: Instant,
        broker: GroupId,
        queue: QueueId,
        sent_at: Instant,
        response: Response,
    ) {
        let key = (broker, queue.clone());
        match response {
            Response::Pulled {
                messages,
                next_offset,
                ..
            } => {
                let Some(owned) = self.owned.get_mut(&key) else {
                    return; // no longer ours: the new owner will pull these
                };
                owned.next = owned.next.max(next_offset);
                owned.unanswered += messages.len() as u32;
                owned.retry_at = if messages.is_empty() {
                    now + Duration::from_millis(10)
                } else {
                    now
                };
                self.events.push_back(ConsumerEvent::Pulled {
                    broker,
                    queue: queue.clone(),
                    requested_at: sent_at,
                    offsets: messages.iter().map(|(o, _)| *o).collect(),
                });
                self.deliveries
                    .extend(messages.into_iter().map(|(offset, message)| Delivery {
                        broker,
                        queue: queue.clone(),
                        offset,
                        message,
                    }));
            }
            Response::NotLeader { leader_hint, .. } => {
                self.hint(broker, leader_hint);
                if let Some(owned) = self.owned.get_mut(&key) {
                    owned.retry_at = now + Duration::from_millis(10);
                }
            }
            _ => {
                self.leaders.remove(&broker);
                if let Some(owned) = self.owned.get_mut(&key) {
                    owned.retry_at = now + Duration::from_millis(500);
                }
            }
        }
    }

    fn acked(&mut self, now: Instant, answer: Answer, response: Response) {
        match response {
            Response::Acked { .. } => {
                self.events.push_back(ConsumerEvent::AckConfirmed {
                    broker: answer.broker,
                    queue: answer.queue,
                    offsets: answer.offsets,
                });
            }
            Response::Requeued { dead_letter, .. } => {
                self.events.push_back(ConsumerEvent::Requeued {
                    broker: answer.broker,
                    queue: answer.queue,
                    offset: answer.offsets.first().copied().unwrap_or(0),
                    dead_letter,
                });
            }
            Response::Refused { .. } => {} // nothing to retry: the offset is not there
            Response::NotLeader { leader_hint, .. } => {
                self.hint(answer.broker, leader_hint);
                self.answers.push(answer);
            }
            _ => {
                let _ = now;
                self.leaders.remove(&answer.broker);
                self.answers.push(answer);
            }
        }
    }

    /// Recomputes which queues this member owns.
    fn rebalance(&mut self, now: Instant) {
        let mut queues: Vec<(GroupId, QueueId)> = self
            .routes
            .iter()
            .map(|r| (r.group, r.queue.clone()))
            .collect();
        let mut brokers: Vec<GroupId> = self.routes.iter().map(|r| r.group).collect();
        brokers.sort();
        brokers.dedup();
        for broker in brokers {
            for level in 0..self.config.retry_levels {
                queues.push((broker, QueueId::retry(&self.config.group, level)));
            }
        }
        queues.sort();
        let mine = allocate(&queues, &self.members, &self.config.member).to_vec();
        self.owned.retain(|key, _| mine.contains(key));
        for key in &mine {
            self.owned.entry(key.clone()).or_insert(Owned {
                next: 0,
                unanswered: 0,
                retry_at: now,
            });
        }
        // Deliveries of queues we no longer own are dropped: the new owner gets them again.
        self.deliveries
            .retain(|d| mine.contains(&(d.broker, d.queue.clone())));
        self.events
            .push_back(ConsumerEvent::Rebalanced { owned: mine });
    }
}
