//! The consumer: group membership, queue allocation, long-polling pulls, acks and nacks,
//! sans-IO.
//!
//! A member heartbeats to the metadata leader and gets back the queues it owns and the
//! group's generation (the metadata leader allocates; see `node::membership`). Every pull,
//! ack and nack carries the member and generation; the broker serves a queue only to the
//! member holding its lease and refuses a stale one with `Revoked`. A queue the member loses
//! (revoked, or gone from its assignment) is dropped: deliveries not yet handed out go, answers
//! already given are confirmed, then the queue is released so the next owner starts at once
//! from the committed consume offset. What was delivered but never acknowledged comes again
//! (at-least-once). Acks and nacks are retried until the broker confirms them: both are
//! idempotent.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::broker::{Offset, QueueId, StoredMessage};
use crate::limits::EVENTS_BUFFERED_MAX;
use crate::node::METADATA_GROUP;
use crate::node::protocol::{Request, RequestId, Response};
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
    /// The group generation it was pulled under; its answer speaks for it.
    pub generation: u64,
    /// Handed to this group before (to this member or another), or back from a retry queue.
    pub redelivered: bool,
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
        generation: u64,
        owned: Vec<(GroupId, QueueId)>,
    },
    /// A pull sent at `requested_at` under `generation` returned these offsets.
    Pulled {
        broker: GroupId,
        queue: QueueId,
        requested_at: Instant,
        generation: u64,
        offsets: Vec<Offset>,
    },
    /// The broker refused a pull or an answer: another member holds the queue now.
    Revoked {
        broker: GroupId,
        queue: QueueId,
        reason: String,
    },
    /// A release of the queue's lease left (its answers are all confirmed).
    ReleaseSent { broker: GroupId, queue: QueueId },
    /// Answers from an earlier tenure of the queue were refused: pulls start again at the
    /// committed consume offset, so offsets already pulled come again.
    Rewound { broker: GroupId, queue: QueueId },
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
    /// The generation of the latest pull sent (0: none yet, so nothing to release).
    generation: u64,
    next: Offset,
    unanswered: u32,
    /// The next pull may leave at this time; [`NEVER`] while one is in flight.
    retry_at: Instant,
    /// `next` was rewound while a pull was in flight: that pull's answer must not move it on.
    stale_pull: bool,
    /// When this tenure of the queue began (assigned for the first time, or again after the
    /// member let it go): pulls sent before belong to an earlier tenure.
    since: Instant,
    /// This member's number for this tenure, carried by its pulls and its release: the broker
    /// refuses a release from an earlier tenure (see [`crate::broker::Command::ReleaseTenure`]).
    tenure: u64,
}

const NEVER: Instant = Instant::from_micros(u64::MAX);
/// A node whose connection was lost is asked only when every other is suspect too, for this
/// long (as the producer's `avoid_ms`): the consumer does not send its retries into it.
pub const LOST_NODE_AVOID_MS: u64 = 10_000;
/// How long answers wait after a node said it knows no leader of their group: the pause pulls
/// and heartbeats take in the same case.
const NO_LEADER_RETRY_MS: u64 = 10;
const NO_LEADER_RETRY_MAX_MS: u64 = 80;

enum InFlight {
    Heartbeat,
    Pull {
        broker: GroupId,
        queue: QueueId,
        sent_at: Instant,
        generation: u64,
        tenure: u64,
    },
    Ack(Answer),
    Release {
        broker: GroupId,
        queue: QueueId,
    },
    Leave,
}

/// What a pull in flight was sent under.
struct PullSent {
    at: Instant,
    generation: u64,
    tenure: u64,
}

/// A queue this member no longer owns: its answers are confirmed, then it is released.
struct Releasing {
    /// The generation this member last pulled the queue under: the release speaks for it.
    generation: u64,
    /// The newest tenure a pull of the queue was sent under: the release ends it.
    tenure: u64,
    /// Handed to the application and not answered yet.
    unanswered: u32,
    /// When the release may be (re)sent; [`NEVER`] while one is in flight.
    send_at: Instant,
    /// A pull answered after the release left may have claimed the queue back: once the
    /// release in flight is answered, release again.
    again: bool,
}

/// Where a member that is shutting down is in leaving its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaving {
    Staying,
    /// Owns nothing any more; waits for its answers to be confirmed and its queues released,
    /// then says goodbye.
    Draining,
    Left,
}

#[derive(Clone)]
struct Answer {
    broker: GroupId,
    queue: QueueId,
    generation: u64,
    offsets: Vec<Offset>,
    status: AckStatus,
}

pub struct Consumer {
    config: ConsumerConfig,
    next_request: RequestId,
    turn: u64,
    /// The generation of the assignment this member follows (0: none yet).
    generation: u64,
    /// The queues the latest assignment gives this member.
    assigned: Vec<(GroupId, QueueId)>,
    owned: BTreeMap<(GroupId, QueueId), Owned>,
    releasing: BTreeMap<(GroupId, QueueId), Releasing>,
    /// The number the next tenure of a queue gets. Member names are unique to a process (and
    /// to a simulated consumer's incarnation), so counting from 1 in each is enough.
    next_tenure: u64,
    /// Queues a broker revoked at this generation, and when: not taken again before a newer
    /// generation, or a few heartbeats later (the queue may be free by then, and the metadata
    /// leader still gives it to this member).
    revoked: BTreeMap<(GroupId, QueueId), (u64, Instant)>,
    leaders: BTreeMap<GroupId, NodeId>,
    heartbeat_due: Instant,
    in_flight: BTreeMap<RequestId, (InFlight, Instant)>,
    /// Answers not yet sent (batched per queue), or to send again.
    answers: Vec<Answer>,
    /// Broker groups whose answers bounced off a node that knew no leader: until when they
    /// are held, so that an election costs a few retries instead of one per round trip.
    answers_wait: BTreeMap<GroupId, Instant>,
    /// Answers and pulls in a row a group's nodes bounced with no leader: the wait doubles
    /// with each, up to `NO_LEADER_RETRY_MAX_MS`, so a long outage is not polled 100 times a
    /// second per queue.
    no_leader_bounces: BTreeMap<GroupId, u32>,
    deliveries: VecDeque<Delivery>,
    events: VecDeque<ConsumerEvent>,
    outbox: VecDeque<(NodeId, RequestId, Request)>,
    leaving: Leaving,
    /// The node each request in flight went to (pruned of answered ones as it grows).
    sent_to: BTreeMap<RequestId, NodeId>,
    /// Nodes whose connection was lost, until when they are avoided.
    suspect_until: BTreeMap<NodeId, Instant>,
}

impl Consumer {
    /// The nodes to ask when no leader is known: the cluster's nodes as the driver learned
    /// them (nodes added or removed at runtime). An empty list changes nothing.
    pub fn set_nodes(&mut self, nodes: Vec<crate::raft::NodeId>) {
        if !nodes.is_empty() {
            self.config.nodes = nodes;
        }
    }

    pub fn new(config: ConsumerConfig, now: Instant) -> Consumer {
        let mut consumer = Consumer {
            config,
            next_request: 1,
            turn: 0,
            generation: 0,
            assigned: Vec::new(),
            owned: BTreeMap::new(),
            releasing: BTreeMap::new(),
            next_tenure: 1,
            revoked: BTreeMap::new(),
            leaders: BTreeMap::new(),
            heartbeat_due: now,
            in_flight: BTreeMap::new(),
            answers: Vec::new(),
            answers_wait: BTreeMap::new(),
            no_leader_bounces: BTreeMap::new(),
            deliveries: VecDeque::new(),
            events: VecDeque::new(),
            outbox: VecDeque::new(),
            leaving: Leaving::Staying,
            sent_to: BTreeMap::new(),
            suspect_until: BTreeMap::new(),
        };
        consumer.work(now);
        consumer
    }

    pub fn member(&self) -> &str {
        &self.config.member
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn owned(&self) -> impl Iterator<Item = &(GroupId, QueueId)> {
        self.owned.keys()
    }

    /// Leaves the group now rather than after the session times out, so the others take over
    /// its queues at once: pulls stop, deliveries not yet answered are given up (they come
    /// again to the new owners), answers already given are confirmed, every queue is
    /// released, then the metadata leader is told.
    pub fn leave(&mut self, now: Instant) {
        if self.leaving == Leaving::Staying {
            self.leaving = Leaving::Draining;
            self.assigned.clear();
            let owned: Vec<(GroupId, QueueId)> = self.owned.keys().cloned().collect();
            for key in owned {
                self.drop_queue(now, &key);
            }
            for releasing in self.releasing.values_mut() {
                releasing.unanswered = 0;
            }
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
        let key = (delivery.broker, delivery.queue.clone());
        if let Some(owned) = self.owned.get_mut(&key) {
            owned.unanswered = owned.unanswered.saturating_sub(1);
        } else if let Some(releasing) = self.releasing.get_mut(&key) {
            releasing.unanswered = releasing.unanswered.saturating_sub(1);
        }
        let same = self.answers.iter_mut().find(|a| {
            a.status == AckStatus::Success
                && status == AckStatus::Success
                && a.broker == delivery.broker
                && a.queue == delivery.queue
                && a.generation == delivery.generation
        });
        match same {
            Some(answer) => answer.offsets.push(delivery.offset),
            None => self.answers.push(Answer {
                broker: delivery.broker,
                queue: delivery.queue.clone(),
                generation: delivery.generation,
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
            (
                InFlight::Heartbeat,
                Response::Assignment {
                    generation, queues, ..
                },
            ) => {
                self.heartbeat_due = now + Duration::from_millis(self.config.heartbeat_ms);
                // An answer overtaken by a newer one says nothing new.
                if generation >= self.generation && self.leaving == Leaving::Staying {
                    self.generation = generation;
                    self.assigned = queues;
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
            (
                InFlight::Pull {
                    broker,
                    queue,
                    sent_at,
                    generation,
                    tenure,
                },
                response,
            ) => {
                let sent = PullSent {
                    at: sent_at,
                    generation,
                    tenure,
                };
                self.pulled(now, broker, queue, sent, response)
            }
            (InFlight::Ack(answer), response) => self.acked(now, answer, response),
            (InFlight::Release { broker, queue }, response) => {
                self.released(now, broker, queue, response);
            }
            (InFlight::Leave, Response::Left { .. }) => self.leaving = Leaving::Left,
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
                InFlight::Pull { broker, queue, .. } => {
                    self.leaders.remove(&broker);
                    let key = (broker, queue);
                    self.stale_pull_over(&key);
                    if let Some(owned) = self.owned.get_mut(&key) {
                        owned.retry_at = now;
                    }
                }
                InFlight::Ack(answer) => {
                    self.leaders.remove(&answer.broker);
                    self.answers.push(answer);
                }
                InFlight::Release { broker, queue, .. } => {
                    self.leaders.remove(&broker);
                    if let Some(releasing) = self.releasing.get_mut(&(broker, queue)) {
                        releasing.send_at = now;
                    }
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

    /// What happened, oldest first: at most [`EVENTS_BUFFERED_MAX`] are kept, so a driver
    /// that never asks holds no more than that.
    pub fn poll_event(&mut self) -> Option<ConsumerEvent> {
        self.events.pop_front()
    }

    fn push_event(&mut self, event: ConsumerEvent) {
        if self.events.len() >= EVENTS_BUFFERED_MAX {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// When `handle_timeout` must next be called. Work blocked behind a request in flight
    /// (a heartbeat, a pull, a release) waits for that request, not for the clock.
    pub fn poll_timeout(&self) -> Instant {
        let requests = self.in_flight.values().map(|(_, deadline)| *deadline);
        let pulls = self
            .owned
            .values()
            .filter(|o| o.unanswered < self.config.unanswered_max)
            .map(|o| o.retry_at);
        // A release waiting for answers is sent when they come (or are confirmed), not on a
        // timer: a deadline in the past here would spin.
        let releases = self
            .releasing
            .iter()
            .filter(|(key, r)| r.unanswered == 0 && !self.answering(key))
            .map(|(_, r)| r.send_at);
        let answers = self
            .answers
            .iter()
            .filter_map(|a| self.answers_wait.get(&a.broker).copied());
        let heartbeat_in_flight = self
            .in_flight
            .values()
            .any(|(w, _)| matches!(w, InFlight::Heartbeat));
        let heartbeat = Some(self.heartbeat_due)
            .filter(|_| !heartbeat_in_flight && self.leaving == Leaving::Staying);
        requests
            .chain(pulls)
            .chain(releases)
            .chain(heartbeat)
            .chain(answers)
            .min()
            .unwrap_or(NEVER)
    }

    /// Unanswered deliveries, unconfirmed answers, queues not yet released and answers in
    /// flight: zero when idle.
    pub fn busy(&self) -> usize {
        self.deliveries.len()
            + self.answers.len()
            + self.releasing.len()
            + self
                .in_flight
                .values()
                .filter(|(w, _)| matches!(w, InFlight::Ack(_)))
                .count()
    }

    /// Answers given and not yet confirmed by the broker.
    pub fn unconfirmed(&self) -> usize {
        self.answers.len()
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

    fn node_for(&mut self, now: Instant, group: GroupId) -> NodeId {
        if let Some(node) = self.leaders.get(&group) {
            return *node;
        }
        super::producer::pick_live(&self.config.nodes, &mut self.turn, &self.suspect_until, now)
    }

    /// The connection to `node` closed or could not be made: what was in flight to it gets
    /// no answer. It is handled at once as if it had timed out (heartbeats, pulls, answers
    /// and releases go again, to another node), instead of after `request_timeout_ms`; the
    /// node is avoided for [`LOST_NODE_AVOID_MS`]. When every node is suspect the requests
    /// wait out their timeouts: a driver that reaches no node must not spin asking them.
    pub fn connection_lost(&mut self, now: Instant, node: NodeId) {
        let lost: Vec<RequestId> = self
            .sent_to
            .iter()
            .filter(|(id, n)| **n == node && self.in_flight.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        if lost.is_empty() {
            return;
        }
        let until = now + Duration::from_millis(LOST_NODE_AVOID_MS);
        self.suspect_until.insert(node, until);
        self.leaders.retain(|_, leader| *leader != node);
        let other = self
            .config
            .nodes
            .iter()
            .any(|n| !super::producer::is_suspect(&self.suspect_until, now, *n));
        if !other {
            return;
        }
        for id in lost {
            self.sent_to.remove(&id);
            if let Some((_, deadline)) = self.in_flight.get_mut(&id) {
                *deadline = now;
            }
        }
        self.handle_timeout(now);
    }

    fn request(
        &mut self,
        now: Instant,
        group: GroupId,
        what: InFlight,
        request: Request,
        wait_ms: u64,
    ) {
        let node = self.node_for(now, group);
        let id = self.next_request;
        self.next_request += 1;
        let deadline = now + Duration::from_millis(self.config.request_timeout_ms + wait_ms);
        self.in_flight.insert(id, (what, deadline));
        if self.sent_to.len() > 2 * self.in_flight.len() + 16 {
            let in_flight = &self.in_flight;
            self.sent_to.retain(|id, _| in_flight.contains_key(id));
        }
        self.sent_to.insert(id, node);
        self.outbox.push_back((node, id, request));
    }

    fn send_answers(&mut self, now: Instant) {
        self.answers_wait.retain(|_, until| *until > now);
        let (held, due): (Vec<Answer>, Vec<Answer>) = std::mem::take(&mut self.answers)
            .into_iter()
            .partition(|a| self.answers_wait.contains_key(&a.broker));
        self.answers = held;
        for answer in due {
            let (group, member) = (self.config.group.clone(), self.config.member.clone());
            let request = match answer.status {
                AckStatus::Success => Request::Ack {
                    broker: answer.broker,
                    group,
                    member,
                    generation: answer.generation,
                    queue: answer.queue.clone(),
                    offsets: answer.offsets.clone(),
                },
                AckStatus::ReconsumeLater => Request::ReconsumeLater {
                    broker: answer.broker,
                    group,
                    member,
                    generation: answer.generation,
                    queue: answer.queue.clone(),
                    offset: answer.offsets.first().copied().unwrap_or(0),
                },
            };
            let broker = answer.broker;
            self.request(now, broker, InFlight::Ack(answer), request, 0);
        }
    }

    /// Whether answers for `key` wait to be sent or confirmed.
    fn answering(&self, key: &(GroupId, QueueId)) -> bool {
        self.answers
            .iter()
            .any(|a| a.broker == key.0 && a.queue == key.1)
            || self.in_flight.values().any(
                |(w, _)| matches!(w, InFlight::Ack(a) if a.broker == key.0 && a.queue == key.1),
            )
    }

    /// Releases each dropped queue whose answers are all confirmed: an answer that overtook
    /// the release would be refused, and its message delivered again to the next owner.
    fn send_releases(&mut self, now: Instant) {
        let due: Vec<(GroupId, QueueId, u64, u64)> = self
            .releasing
            .iter()
            .filter(|(key, r)| r.unanswered == 0 && now >= r.send_at && !self.answering(key))
            .map(|(key, r)| (key.0, key.1.clone(), r.generation, r.tenure))
            .collect();
        for (broker, queue, generation, tenure) in due {
            if let Some(releasing) = self.releasing.get_mut(&(broker, queue.clone())) {
                releasing.send_at = NEVER;
            }
            let request = Request::Release {
                broker,
                group: self.config.group.clone(),
                member: self.config.member.clone(),
                generation,
                tenure,
                queue: queue.clone(),
            };
            self.push_event(ConsumerEvent::ReleaseSent {
                broker,
                queue: queue.clone(),
            });
            let what = InFlight::Release { broker, queue };
            self.request(now, broker, what, request, 0);
        }
    }

    /// Sends whatever is due: heartbeat, answers, releases, pulls; while leaving, the goodbye
    /// once every answer is confirmed and every queue released.
    fn work(&mut self, now: Instant) {
        let waiting =
            |c: &Consumer, f: &dyn Fn(&InFlight) -> bool| c.in_flight.values().any(|(w, _)| f(w));
        self.send_answers(now);
        self.send_releases(now);
        if self.leaving != Leaving::Staying {
            // Pulls too: one still on its way when its queue was released can claim the queue
            // back on the broker (the release wakes a parked long poll); its answer then makes
            // this member release the queue again, which it must do before it goes.
            let busy = !self.in_flight.is_empty();
            if self.leaving == Leaving::Draining && !busy && self.releasing.is_empty() {
                let request = Request::Leave {
                    group: self.config.group.clone(),
                    member: self.config.member.clone(),
                };
                self.request(now, METADATA_GROUP, InFlight::Leave, request, 0);
            }
            return;
        }
        if now >= self.heartbeat_due && !waiting(self, &|w| matches!(w, InFlight::Heartbeat)) {
            let request = Request::Heartbeat {
                group: self.config.group.clone(),
                member: self.config.member.clone(),
                topic: self.config.topic.clone(),
            };
            self.heartbeat_due = now + Duration::from_millis(self.config.heartbeat_ms);
            self.request(now, METADATA_GROUP, InFlight::Heartbeat, request, 0);
        }
        let ready: Vec<(GroupId, QueueId, Offset, u64)> = self
            .owned
            .iter()
            .filter(|(_, o)| o.unanswered < self.config.unanswered_max && now >= o.retry_at)
            .map(|((broker, queue), o)| (*broker, queue.clone(), o.next, o.tenure))
            .collect();
        for (broker, queue, from, tenure) in ready {
            let pulling = waiting(
                self,
                &|w| matches!(w, InFlight::Pull { broker: b, queue: q, .. } if *b == broker && *q == queue),
            );
            let generation = self.generation;
            if let Some(owned) = self.owned.get_mut(&(broker, queue.clone())) {
                owned.retry_at = NEVER;
                if !pulling {
                    owned.generation = generation;
                }
            }
            if pulling {
                continue; // the answer to the pull in flight decides when to pull next
            }
            let request = Request::Pull {
                broker,
                group: self.config.group.clone(),
                member: self.config.member.clone(),
                generation: self.generation,
                tenure,
                queue: queue.clone(),
                from,
                messages_max: self.config.pull_batch,
                bytes_max: 4 << 20,
                wait_ms: self.config.long_poll_ms,
            };
            let what = InFlight::Pull {
                broker,
                queue,
                sent_at: now,
                generation: self.generation,
                tenure,
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
        sent: PullSent,
        response: Response,
    ) {
        let PullSent {
            at: sent_at,
            generation,
            tenure,
        } = sent;
        let key = (broker, queue.clone());
        if !matches!(response, Response::NotLeader { .. }) {
            self.no_leader_bounces.remove(&broker);
        }
        if !matches!(response, Response::Pulled { .. }) {
            self.stale_pull_over(&key);
        }
        match response {
            Response::Pulled {
                messages,
                next_offset,
                delivered_below,
                ..
            } => {
                let Some(owned) = self.owned.get_mut(&key) else {
                    // No longer ours: the new owner will pull these. But this pull, sent
                    // before this member let the queue go, may have claimed it back.
                    if let Some(releasing) = self.releasing.get_mut(&key) {
                        releasing.generation = releasing.generation.max(generation);
                        releasing.tenure = releasing.tenure.max(tenure);
                        releasing.again = releasing.send_at == NEVER;
                    } else if self.leaving != Leaving::Left {
                        self.releasing.insert(
                            key,
                            Releasing {
                                generation,
                                tenure,
                                unanswered: 0,
                                send_at: now,
                                again: false,
                            },
                        );
                    }
                    return;
                };
                if sent_at < owned.since {
                    // Sent in an earlier tenure, before this member let the queue go: the
                    // broker served it then, but since the release another member may have
                    // been handed the same messages (an answer the network held back: queue
                    // seed 1775156482413113839 of an explore run, exclusive-owner). They are
                    // not handed out; unacknowledged, they come again to whoever holds the
                    // queue.
                    owned.retry_at = now;
                    self.stale_pull_over(&key);
                    return;
                }
                let stale = std::mem::take(&mut owned.stale_pull);
                if !stale {
                    owned.next = owned.next.max(next_offset);
                }
                owned.unanswered += messages.len() as u32;
                owned.retry_at = if messages.is_empty() {
                    now + Duration::from_millis(10)
                } else {
                    now
                };
                self.push_event(ConsumerEvent::Pulled {
                    broker,
                    queue: queue.clone(),
                    requested_at: sent_at,
                    generation,
                    offsets: messages.iter().map(|(o, _)| *o).collect(),
                });
                if stale {
                    self.push_event(ConsumerEvent::Rewound {
                        broker,
                        queue: queue.clone(),
                    });
                }
                self.deliveries
                    .extend(messages.into_iter().map(|(offset, message)| Delivery {
                        broker,
                        queue: queue.clone(),
                        offset,
                        redelivered: offset < delivered_below || message.reconsume_times > 0,
                        message,
                        generation,
                    }));
            }
            Response::Revoked { reason, .. } => {
                self.push_event(ConsumerEvent::Revoked {
                    broker,
                    queue: queue.clone(),
                    reason,
                });
                // A pull from an older generation than ours says nothing about this one.
                if generation == self.generation {
                    self.drop_queue(now, &key);
                    self.revoked.insert(key, (generation, now));
                    // Someone newer has it: learn the new assignment now.
                    self.heartbeat_due = now;
                } else if let Some(owned) = self.owned.get_mut(&key) {
                    owned.retry_at = now;
                }
            }
            Response::NotLeader { leader_hint, .. } => {
                self.hint(broker, leader_hint);
                let pause_ms = match leader_hint {
                    Some(_) => NO_LEADER_RETRY_MS,
                    None => self.no_leader_pause_ms(broker),
                };
                if let Some(owned) = self.owned.get_mut(&key) {
                    owned.retry_at = now + Duration::from_millis(pause_ms);
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

    /// How long to hold requests to `group` after one of its nodes knew no leader, counting
    /// the bounce.
    fn no_leader_pause_ms(&mut self, group: GroupId) -> u64 {
        let bounced = self.no_leader_bounces.entry(group).or_default();
        let pause_ms = (NO_LEADER_RETRY_MS << (*bounced).min(4)).min(NO_LEADER_RETRY_MAX_MS);
        *bounced = bounced.saturating_add(1);
        pause_ms
    }

    fn acked(&mut self, now: Instant, answer: Answer, response: Response) {
        if !matches!(response, Response::NotLeader { .. }) {
            self.no_leader_bounces.remove(&answer.broker);
        }
        match response {
            Response::Acked { .. } => {
                self.push_event(ConsumerEvent::AckConfirmed {
                    broker: answer.broker,
                    queue: answer.queue,
                    offsets: answer.offsets,
                });
            }
            Response::Requeued { dead_letter, .. } => {
                self.push_event(ConsumerEvent::Requeued {
                    broker: answer.broker,
                    queue: answer.queue,
                    offset: answer.offsets.first().copied().unwrap_or(0),
                    dead_letter,
                });
            }
            Response::Revoked { reason, .. } => {
                // Another member holds the queue now: it gets these messages again.
                let key = (answer.broker, answer.queue.clone());
                self.push_event(ConsumerEvent::Revoked {
                    broker: answer.broker,
                    queue: answer.queue,
                    reason,
                });
                if self.owned.contains_key(&key) && answer.generation >= self.generation {
                    self.drop_queue(now, &key);
                    self.revoked.insert(key, (self.generation, now));
                    self.heartbeat_due = now;
                } else if self.owned.contains_key(&key) {
                    // Ours again at a newer generation, but these messages were handed out in
                    // an earlier tenure, and another member held the queue in between: they
                    // stay unacknowledged below where this member pulls from. Pull again from
                    // the committed offset (the broker skips what is acknowledged), or they
                    // would wait for ever.
                    self.rewind(&key);
                }
            }
            Response::Refused { .. } => {} // nothing to retry: the offset is not there
            Response::NotLeader { leader_hint, .. } => {
                self.hint(answer.broker, leader_hint);
                // With a hint the answer goes there at once; without one (an election, or a
                // node cut off from its group) resending at once would only bounce again.
                let waiting = self
                    .answers_wait
                    .get(&answer.broker)
                    .is_some_and(|until| *until > now);
                if leader_hint.is_none() && !waiting {
                    let pause_ms = self.no_leader_pause_ms(answer.broker);
                    let until = now + Duration::from_millis(pause_ms);
                    self.answers_wait.insert(answer.broker, until);
                }
                self.answers.push(answer);
            }
            _ => {
                self.leaders.remove(&answer.broker);
                self.answers.push(answer);
            }
        }
    }

    fn released(&mut self, now: Instant, broker: GroupId, queue: QueueId, response: Response) {
        let key = (broker, queue);
        match response {
            // Released, or not ours to release any more: either way the queue is let go.
            Response::Released { .. } | Response::Revoked { .. } | Response::Refused { .. } => {
                if let Some(releasing) = self.releasing.get_mut(&key)
                    && std::mem::take(&mut releasing.again)
                {
                    releasing.send_at = now;
                    return;
                }
                self.releasing.remove(&key);
                // A queue the latest assignment gives back waited for this.
                self.rebalance(now);
            }
            Response::NotLeader { leader_hint, .. } => {
                self.hint(broker, leader_hint);
                if let Some(r) = self.releasing.get_mut(&key) {
                    r.send_at = now + Duration::from_millis(10);
                }
            }
            _ => {
                self.leaders.remove(&broker);
                if let Some(r) = self.releasing.get_mut(&key) {
                    r.send_at = now + Duration::from_millis(100);
                }
            }
        }
    }

    /// The pull that was in flight when the member rewound `key` is over without handing
    /// anything out: the rewind takes effect now, and the next pull's answer is not the stale
    /// one. (Left set, that answer would be taken for the stale one and the member would pull
    /// from the committed offset for ever: queue seed 100116.)
    fn stale_pull_over(&mut self, key: &(GroupId, QueueId)) {
        if let Some(owned) = self.owned.get_mut(key)
            && std::mem::take(&mut owned.stale_pull)
        {
            self.push_event(ConsumerEvent::Rewound {
                broker: key.0,
                queue: key.1.clone(),
            });
        }
    }

    /// The next pull of `key` starts at the group's committed consume offset.
    fn rewind(&mut self, key: &(GroupId, QueueId)) {
        let pulling = self.in_flight.values().any(|(w, _)| {
            matches!(w, InFlight::Pull { broker, queue, .. } if (*broker, queue) == (key.0, &key.1))
        });
        if let Some(owned) = self.owned.get_mut(key) {
            owned.next = 0;
            owned.stale_pull = pulling;
            if !pulling {
                self.push_event(ConsumerEvent::Rewound {
                    broker: key.0,
                    queue: key.1.clone(),
                });
            }
        }
    }

    /// Stops consuming `key`: deliveries not handed out yet go, and the queue is released
    /// once the application's answers for it are confirmed.
    fn drop_queue(&mut self, now: Instant, key: &(GroupId, QueueId)) {
        let Some(owned) = self.owned.remove(key) else {
            return;
        };
        let before = self.deliveries.len();
        self.deliveries
            .retain(|d| (d.broker, &d.queue) != (key.0, &key.1));
        let dropped = (before - self.deliveries.len()) as u32;
        // A pull still on its way (sent before the queue was last dropped and taken again,
        // say) may claim the queue: release under its generation too.
        let (in_flight, in_flight_tenure) = self
            .in_flight
            .values()
            .filter_map(|(w, _)| match w {
                InFlight::Pull {
                    broker,
                    queue,
                    generation,
                    tenure,
                    ..
                } if (*broker, queue) == (key.0, &key.1) => Some((*generation, *tenure)),
                _ => None,
            })
            .fold((0, 0), |(g, t), (generation, tenure)| {
                (g.max(generation), t.max(tenure))
            });
        let generation = owned.generation.max(in_flight);
        if generation == 0 {
            return; // never pulled, so never claimed: nothing to release
        }
        self.releasing.insert(
            key.clone(),
            Releasing {
                generation,
                tenure: owned.tenure.max(in_flight_tenure),
                unanswered: owned.unanswered.saturating_sub(dropped),
                send_at: now,
                again: false,
            },
        );
    }

    /// Follows the latest assignment: queues no longer ours are dropped, new ones are pulled
    /// from the committed consume offset once any release of them by this member is done.
    fn rebalance(&mut self, now: Instant) {
        if self.leaving != Leaving::Staying {
            return;
        }
        let generation = self.generation;
        let retry_after = Duration::from_millis(self.config.heartbeat_ms.saturating_mul(2));
        self.revoked
            .retain(|_, (at, when)| *at >= generation && now < *when + retry_after);
        let mine: Vec<(GroupId, QueueId)> = self
            .assigned
            .iter()
            .filter(|key| !self.revoked.contains_key(*key))
            .cloned()
            .collect();
        let gone: Vec<(GroupId, QueueId)> = self
            .owned
            .keys()
            .filter(|key| !mine.contains(key))
            .cloned()
            .collect();
        for key in &gone {
            self.drop_queue(now, key);
        }
        let mut changed = !gone.is_empty();
        for key in &mine {
            if self.owned.contains_key(key) || self.releasing.contains_key(key) {
                continue;
            }
            changed = true;
            let tenure = self.next_tenure;
            self.next_tenure += 1;
            self.owned.insert(
                key.clone(),
                Owned {
                    generation: 0,
                    next: 0,
                    unanswered: 0,
                    retry_at: now,
                    stale_pull: false,
                    since: now,
                    tenure,
                },
            );
        }
        if changed {
            self.push_event(ConsumerEvent::Rebalanced {
                generation: self.generation,
                owned: self.owned.keys().cloned().collect(),
            });
        }
    }
}
