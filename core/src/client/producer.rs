//! The producer: routes, queue selection, retries and broker failover, sans-IO.
//!
//! Every message gets a sequence number once, and every retry of it carries the same one, so a
//! retry to the same broker group is deduplicated there. A broker group that timed out is
//! avoided for a while and the retry goes to a queue of another group (RocketMQ's
//! `lastFailedBrokerName` and latency fault tolerance); there a retry of a message that was in
//! fact written becomes a duplicate, which is why such a send reports it may have been written.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::broker::{Message, Offset, ProducerId, QueueId, Seq};
use crate::node::protocol::{Request, RequestId, Response, Route};
use crate::raft::{GroupId, NodeId};
use crate::time::Instant;

pub type SendId = u64;

/// Wait before retrying a send the broker refused or was too busy for.
const REFUSAL_BACKOFF_MS: u64 = 100;
/// The pause before the n-th redirect of one send is `(n - 1)` times this.
const REDIRECT_BACKOFF_MS: u64 = 10;

#[derive(Clone, Debug)]
pub struct ProducerConfig {
    pub producer_id: ProducerId,
    /// Nodes to ask for routes.
    pub nodes: Vec<NodeId>,
    /// Attempts after the first that failed (redirects to a hinted leader do not count).
    pub retries: u32,
    /// The whole send, retries included.
    pub send_timeout_ms: u64,
    /// One request.
    pub request_timeout_ms: u64,
    /// How long a broker group that timed out is avoided.
    pub avoid_ms: u64,
    /// Routes older than this are fetched again.
    pub route_ttl_ms: u64,
    /// Redirects one send may follow before it counts as a failed attempt.
    pub redirects_max: u32,
}

impl ProducerConfig {
    pub fn new(producer_id: ProducerId, nodes: Vec<NodeId>) -> ProducerConfig {
        ProducerConfig {
            producer_id,
            nodes,
            retries: 2,
            send_timeout_ms: 3_000,
            request_timeout_ms: 1_000,
            avoid_ms: 10_000,
            route_ttl_ms: 30_000,
            redirects_max: 8,
        }
    }
}

/// How a send ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendResult {
    /// Written at `base_offset..` of `queue` in broker group `broker`. `ambiguous` says an
    /// earlier attempt timed out or lost its leader, so a copy may sit elsewhere too.
    Acked {
        broker: GroupId,
        queue: QueueId,
        base_offset: Offset,
        ambiguous: bool,
    },
    /// Given up. `maybe_written` is false only when every attempt was definitively refused.
    /// `refused`: the last attempt was refused by the cluster (an unknown topic, a permission,
    /// a bad request), not lost to a timeout or a leader change.
    Failed {
        reason: String,
        maybe_written: bool,
        refused: bool,
    },
}

struct Target {
    broker: GroupId,
    queue: QueueId,
    node: NodeId,
}

struct Pending {
    topic: String,
    messages: Vec<Message>,
    first_seq: Seq,
    deadline: Instant,
    failures: u32,
    redirects: u32,
    maybe_written: bool,
    last_error: String,
    /// Whether `last_error` is the cluster's refusal.
    refused: bool,
    target: Option<Target>,
    /// The request in flight and when it times out.
    request: Option<(RequestId, Instant)>,
    /// After a refusal, the next attempt waits until here (routes may be catching up).
    not_before: Instant,
    /// Parked until routes for its topic arrive.
    awaiting_routes: bool,
}

pub struct Producer {
    config: ProducerConfig,
    next_seq: Seq,
    next_send: SendId,
    next_request: RequestId,
    /// Round-robin counter for queue choice.
    turn: u64,
    /// Round-robin counter for node choice, apart from the queues' so that picking a node
    /// (no leader known) does not skip a queue.
    node_turn: u64,
    routes: BTreeMap<String, (Vec<Route>, Instant)>,
    route_requests: BTreeMap<RequestId, (String, Instant, NodeId)>,
    leaders: BTreeMap<GroupId, NodeId>,
    avoid_until: BTreeMap<GroupId, Instant>,
    /// Nodes that let a request time out: not asked again, for leadership or routes, before
    /// then, unless no other node is left. Without this a cut-off leader that the cached
    /// routes still name would take every retry until the routes expire.
    suspect_until: BTreeMap<NodeId, Instant>,
    pending: BTreeMap<SendId, Pending>,
    by_request: BTreeMap<RequestId, SendId>,
    outbox: VecDeque<(NodeId, RequestId, Request)>,
    results: VecDeque<(SendId, SendResult)>,
}

impl Producer {
    /// The nodes to ask when no leader is known: the cluster's nodes as the driver learned
    /// them (nodes added or removed at runtime). An empty list changes nothing.
    pub fn set_nodes(&mut self, nodes: Vec<crate::raft::NodeId>) {
        if !nodes.is_empty() {
            self.config.nodes = nodes;
        }
    }

    pub fn new(config: ProducerConfig) -> Producer {
        Producer {
            config,
            next_seq: 0,
            next_send: 1,
            next_request: 1,
            turn: 0,
            node_turn: 0,
            routes: BTreeMap::new(),
            route_requests: BTreeMap::new(),
            leaders: BTreeMap::new(),
            avoid_until: BTreeMap::new(),
            suspect_until: BTreeMap::new(),
            pending: BTreeMap::new(),
            by_request: BTreeMap::new(),
            outbox: VecDeque::new(),
            results: VecDeque::new(),
        }
    }

    pub fn producer_id(&self) -> ProducerId {
        self.config.producer_id
    }

    /// Starts sending `messages` to `topic` as one batch. Returns the send's id and the
    /// sequence number of its first message.
    pub fn send(&mut self, now: Instant, topic: &str, messages: Vec<Message>) -> (SendId, Seq) {
        let id = self.next_send;
        self.next_send += 1;
        let first_seq = self.next_seq;
        self.next_seq += messages.len() as Seq;
        let deadline = now + Duration::from_millis(self.config.send_timeout_ms);
        self.pending.insert(
            id,
            Pending {
                topic: topic.to_string(),
                messages,
                first_seq,
                deadline,
                failures: 0,
                redirects: 0,
                maybe_written: false,
                last_error: String::new(),
                refused: false,
                target: None,
                request: None,
                not_before: now,
                awaiting_routes: false,
            },
        );
        self.advance(now, id);
        (id, first_seq)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn handle_response(&mut self, now: Instant, request: RequestId, response: Response) {
        if let Some((topic, _, node)) = self.route_requests.remove(&request) {
            self.suspect_until.remove(&node);
            let refusal = match response {
                Response::Routes { routes, .. } => {
                    for route in &routes {
                        if let Some(leader) = route.leader {
                            self.leaders.insert(route.group, leader);
                        }
                    }
                    self.routes.insert(topic.clone(), (routes, now));
                    None
                }
                // The sends keep trying until their deadline (the topic may be on its way),
                // but if they give up, this is why.
                Response::Refused { reason } => Some(reason),
                _ => None,
            };
            let waiting: Vec<SendId> = self
                .pending
                .iter()
                .filter(|(_, p)| p.topic == topic && p.awaiting_routes)
                .map(|(id, _)| *id)
                .collect();
            for id in waiting {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.awaiting_routes = false;
                    p.not_before = now;
                    if let Some(reason) = &refusal {
                        p.last_error.clone_from(reason);
                        p.refused = true;
                        // Asking again at once would be a tight loop of round trips until
                        // the deadline.
                        p.not_before = now + Duration::from_millis(REFUSAL_BACKOFF_MS);
                    }
                }
                self.advance(now, id);
            }
            return;
        }
        let Some(id) = self.by_request.remove(&request) else {
            return; // an attempt already given up on
        };
        let Some(pending) = self.pending.get_mut(&id) else {
            return;
        };
        pending.request = None;
        let broker = pending.target.as_ref().map_or(0, |t| t.broker);
        if let Some(target) = &pending.target {
            self.suspect_until.remove(&target.node);
        }
        match response {
            Response::Sent {
                queue, base_offset, ..
            } => {
                let ambiguous = pending.maybe_written;
                self.pending.remove(&id);
                self.avoid_until.remove(&broker);
                let result = SendResult::Acked {
                    broker,
                    queue,
                    base_offset,
                    ambiguous,
                };
                self.results.push_back((id, result));
            }
            Response::NotLeader { group, leader_hint } => {
                pending.redirects += 1;
                match leader_hint {
                    Some(leader) => {
                        self.leaders.insert(group, leader);
                    }
                    None => {
                        self.leaders.remove(&group);
                    }
                }
                if pending.redirects > self.config.redirects_max {
                    self.fail_attempt(now, id, "too many redirects".into(), false);
                } else {
                    // During an election nodes' hints disagree and go stale; a growing pause
                    // lets the redirects span an election instead of using them all up in
                    // one round trip each. The first redirect goes at once.
                    let pause_ms = REDIRECT_BACKOFF_MS * u64::from(pending.redirects - 1);
                    pending.not_before = now + Duration::from_millis(pause_ms);
                    // Same queue, at the hinted leader: dedup still covers a retry there.
                    if let Some(target) = pending.target.as_mut() {
                        target.node = match leader_hint {
                            Some(leader) => leader,
                            None => pick_live(
                                &self.config.nodes,
                                &mut self.node_turn,
                                &self.suspect_until,
                                now,
                            ),
                        };
                    }
                    self.advance(now, id);
                }
            }
            Response::Unknown => {
                // Leadership moved while the batch waited for a quorum. Retrying in the same
                // group is deduplicated, so keep the target.
                pending.maybe_written = true;
                self.fail_attempt(now, id, "leadership changed before commit".into(), true);
            }
            Response::Busy => {
                pending.not_before = now + Duration::from_millis(REFUSAL_BACKOFF_MS);
                self.fail_attempt(now, id, "broker busy".into(), false);
            }
            Response::Refused { reason } => {
                // Perhaps the routes are stale, or the group has not created a new topic's
                // queue yet: back off, fetch routes again, and choose afresh.
                pending.not_before = now + Duration::from_millis(REFUSAL_BACKOFF_MS);
                pending.target = None;
                let topic = pending.topic.clone();
                self.routes.remove(&topic);
                self.refuse_attempt(now, id, reason);
            }
            other => self.fail_attempt(now, id, format!("unexpected answer {other:?}"), false),
        }
    }

    /// The driver's connection to `node` closed, or could not be made: the requests in flight
    /// to it will get no answer. Rather than wait out each one's timeout, they fail over at
    /// once, as a redirect without a hint: a send keeps its queue (the broker deduplicates a
    /// retry there, so it is not avoided as after a timeout) and goes to the group's leader if
    /// another is known, else to another live node, which redirects it; it may have been
    /// written. A route request goes to another node. The node is suspect for a while.
    pub fn connection_lost(&mut self, now: Instant, node: NodeId) {
        let routes: Vec<(RequestId, String)> = self
            .route_requests
            .iter()
            .filter(|(_, (_, _, n))| *n == node)
            .map(|(id, (topic, _, _))| (*id, topic.clone()))
            .collect();
        let sends: Vec<SendId> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.request.is_some() && p.target.as_ref().is_some_and(|t| t.node == node)
            })
            .map(|(id, _)| *id)
            .collect();
        if routes.is_empty() && sends.is_empty() {
            return;
        }
        self.suspect(now, node);
        self.leaders.retain(|_, leader| *leader != node);
        // Another node, if one is not suspect; else the request waits out its timeout (a
        // driver that cannot reach any node must not spin asking them in turn).
        let other = self.config.nodes.iter().any(|n| !self.is_suspect(now, *n));
        for (id, topic) in routes.into_iter().filter(|_| other) {
            self.route_requests.remove(&id);
            self.request_routes(now, &topic);
        }
        for id in sends {
            let Some(pending) = self.pending.get_mut(&id) else {
                continue;
            };
            if let Some((request, _)) = pending.request.take() {
                self.by_request.remove(&request);
            }
            pending.maybe_written = true;
            pending.redirects += 1;
            if pending.redirects > self.config.redirects_max {
                self.fail_attempt(now, id, format!("connection to node {node} lost"), true);
                continue;
            }
            // As for a redirect: the first goes at once, later ones (every node unreachable)
            // back off.
            let pause_ms = REDIRECT_BACKOFF_MS * u64::from(pending.redirects - 1);
            pending.not_before = now + Duration::from_millis(pause_ms);
            if let Some(target) = pending.target.as_mut() {
                target.node = match self.leaders.get(&target.broker) {
                    Some(leader) => *leader,
                    None => pick_live(
                        &self.config.nodes,
                        &mut self.node_turn,
                        &self.suspect_until,
                        now,
                    ),
                };
            }
            self.advance(now, id);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let expired_routes: Vec<RequestId> = self
            .route_requests
            .iter()
            .filter(|(_, (_, deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired_routes {
            if let Some((topic, _, node)) = self.route_requests.remove(&id) {
                self.suspect(now, node);
                self.request_routes(now, &topic);
            }
        }
        let timed_out: Vec<SendId> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.request.is_some_and(|(_, at)| at <= now)
                    || p.deadline <= now
                    || (p.request.is_none() && p.not_before <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in timed_out {
            let Some(pending) = self.pending.get_mut(&id) else {
                continue;
            };
            if let Some((request, _)) = pending.request.take() {
                self.by_request.remove(&request);
                pending.maybe_written = true;
                if let Some(target) = pending.target.take() {
                    let until = now + Duration::from_millis(self.config.avoid_ms);
                    self.avoid_until.insert(target.broker, until);
                    self.leaders.remove(&target.broker);
                    self.suspect(now, target.node);
                }
                self.fail_attempt(now, id, "request timed out".into(), true);
            } else {
                self.advance(now, id);
            }
        }
    }

    pub fn poll_request(&mut self) -> Option<(NodeId, RequestId, Request)> {
        self.outbox.pop_front()
    }

    pub fn poll_result(&mut self) -> Option<(SendId, SendResult)> {
        self.results.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let sends = self.pending.values().map(|p| match p.request {
            Some((_, at)) => at.min(p.deadline),
            None => p.not_before.min(p.deadline),
        });
        let routes = self.route_requests.values().map(|(_, at, _)| *at);
        sends.chain(routes).min()
    }

    /// Counts a failed attempt; gives up after `retries` of them.
    fn fail_attempt(&mut self, now: Instant, id: SendId, error: String, maybe_written: bool) {
        self.count_failure(now, id, error, maybe_written, false);
    }

    /// Counts an attempt the cluster refused (nothing written); gives up after `retries`.
    fn refuse_attempt(&mut self, now: Instant, id: SendId, error: String) {
        self.count_failure(now, id, error, false, true);
    }

    fn count_failure(
        &mut self,
        now: Instant,
        id: SendId,
        error: String,
        maybe_written: bool,
        refused: bool,
    ) {
        let Some(pending) = self.pending.get_mut(&id) else {
            return;
        };
        pending.failures += 1;
        pending.maybe_written |= maybe_written;
        pending.last_error = error;
        pending.refused = refused;
        pending.redirects = 0;
        if pending.failures > self.config.retries {
            self.give_up(id);
        } else {
            self.advance(now, id);
        }
    }

    fn give_up(&mut self, id: SendId) {
        if let Some(pending) = self.pending.remove(&id) {
            if let Some((request, _)) = pending.request {
                self.by_request.remove(&request);
            }
            let result = SendResult::Failed {
                reason: pending.last_error,
                maybe_written: pending.maybe_written,
                refused: pending.refused,
            };
            self.results.push_back((id, result));
        }
    }

    /// Sends the next attempt of `id`, fetching routes first if needed.
    fn advance(&mut self, now: Instant, id: SendId) {
        let Some(pending) = self.pending.get(&id) else {
            return;
        };
        if now >= pending.deadline {
            let pending = self.pending.get_mut(&id);
            if let Some(p) = pending
                && p.last_error.is_empty()
            {
                p.last_error = "send timed out".into();
            }
            return self.give_up(id);
        }
        if pending.request.is_some() || now < pending.not_before {
            return;
        }
        let topic = pending.topic.clone();
        let fresh = self.routes.get(&topic).is_some_and(|(routes, at)| {
            !routes.is_empty()
                && now.saturating_since(*at) < Duration::from_millis(self.config.route_ttl_ms)
        });
        if !fresh {
            if !self.route_requests.values().any(|(t, _, _)| *t == topic) {
                self.request_routes(now, &topic);
            }
            // The routes' arrival wakes this send; until then only its deadline matters.
            if let Some(p) = self.pending.get_mut(&id) {
                p.not_before = p.deadline;
                p.awaiting_routes = true;
            }
            return;
        }
        let target = match self.pending.get_mut(&id).and_then(|p| p.target.take()) {
            Some(target) => target,
            None => match self.choose_target(now, &topic) {
                Some(target) => target,
                None => return,
            },
        };
        let Some(pending) = self.pending.get_mut(&id) else {
            return;
        };
        let request_id = self.next_request;
        self.next_request += 1;
        let request = Request::Send {
            broker: target.broker,
            queue: target.queue.clone(),
            producer_id: self.config.producer_id,
            first_seq: pending.first_seq,
            messages: pending.messages.clone(),
        };
        let timeout = now + Duration::from_millis(self.config.request_timeout_ms);
        pending.request = Some((request_id, timeout));
        self.outbox.push_back((target.node, request_id, request));
        pending.target = Some(target);
        self.by_request.insert(request_id, id);
    }

    /// The next queue round-robin, skipping broker groups being avoided while any other is
    /// available.
    fn choose_target(&mut self, now: Instant, topic: &str) -> Option<Target> {
        let (routes, _) = self.routes.get(topic)?;
        let usable = |r: &&Route| {
            self.avoid_until
                .get(&r.group)
                .is_none_or(|until| now >= *until)
        };
        let candidates: Vec<&Route> = routes.iter().filter(usable).collect();
        let candidates = if candidates.is_empty() {
            routes.iter().collect()
        } else {
            candidates
        };
        let route = candidates.get((self.turn % candidates.len().max(1) as u64) as usize)?;
        self.turn += 1;
        let (broker, queue) = (route.group, route.queue.clone());
        let known_leader = self.leaders.get(&broker).copied().or(route.leader);
        let node = match known_leader.filter(|n| !self.is_suspect(now, *n)) {
            Some(node) => node,
            // Any live node answers with a hint to the current leader.
            None => self.pick_node(now),
        };
        Some(Target {
            broker,
            queue,
            node,
        })
    }

    fn suspect(&mut self, now: Instant, node: NodeId) {
        let until = now + Duration::from_millis(self.config.avoid_ms);
        self.suspect_until.insert(node, until);
        // Forget it as the leader the cached routes name, too.
        for (routes, _) in self.routes.values_mut() {
            for route in routes.iter_mut().filter(|r| r.leader == Some(node)) {
                route.leader = None;
            }
        }
    }

    fn is_suspect(&self, now: Instant, node: NodeId) -> bool {
        is_suspect(&self.suspect_until, now, node)
    }

    fn pick_node(&mut self, now: Instant) -> NodeId {
        pick_live(
            &self.config.nodes,
            &mut self.node_turn,
            &self.suspect_until,
            now,
        )
    }

    fn request_routes(&mut self, now: Instant, topic: &str) {
        let id = self.next_request;
        self.next_request += 1;
        let node = self.pick_node(now);
        let deadline = now + Duration::from_millis(self.config.request_timeout_ms);
        self.route_requests
            .insert(id, (topic.to_string(), deadline, node));
        let request = Request::Route {
            topic: topic.to_string(),
        };
        self.outbox.push_back((node, id, request));
    }
}

pub(super) fn is_suspect(
    suspect_until: &BTreeMap<NodeId, Instant>,
    now: Instant,
    node: NodeId,
) -> bool {
    suspect_until.get(&node).is_some_and(|until| now < *until)
}

/// The next node round-robin, skipping suspects while any other is left.
pub(super) fn pick_live(
    nodes: &[NodeId],
    turn: &mut u64,
    suspect_until: &BTreeMap<NodeId, Instant>,
    now: Instant,
) -> NodeId {
    for _ in 0..nodes.len() {
        let node = pick(nodes, turn);
        if !is_suspect(suspect_until, now, node) {
            return node;
        }
    }
    pick(nodes, turn)
}

fn pick(nodes: &[NodeId], turn: &mut u64) -> NodeId {
    *turn += 1;
    nodes
        .get((*turn % nodes.len().max(1) as u64) as usize)
        .copied()
        .unwrap_or(0)
}
