//! The client library, built on the core's producer and consumer state machines: blocking
//! ([`Producer`], [`Consumer`]) and async ([`AsyncProducer`], [`AsyncConsumer`]).

mod async_consumer;
mod asynchronous;
mod config;
mod io;
mod settings;

use std::net::SocketAddr;
use std::time::Duration;

use holdfast_core::broker::{Message, Offset, QueueId};
use holdfast_core::client::{
    AckStatus, Consumer as ConsumerMachine, ConsumerConfig, Delivery, Producer as ProducerMachine,
    ProducerConfig, SendId, SendResult,
};
use holdfast_core::node::protocol::{Request, RequestId, Response};
use holdfast_core::node::{METADATA_GROUP, SEND_BYTES_MAX};
use holdfast_core::raft::{GroupId, NodeId};
use holdfast_core::time::Instant;

pub use async_consumer::{
    ASYNC_DELIVERIES_BUFFERED_MAX, AcksConfirmed, AsyncConsumer, AsyncDelivery, Closed, Next,
};
pub use asynchronous::{
    ASYNC_SENDS_IN_FLIGHT_MAX, ASYNC_SENDS_QUEUED_MAX, AsyncProducer, ProducerClosed, SendFuture,
};
pub use config::{CLIENT_FILE_ENV, ClientConfig, DEFAULT_CLIENT_FILE, client_file_text};
pub use io::{ClientIo, Machine};
pub use settings::{CLIENT_TIMEOUT_MAX, ConsumerSettings, ProducerSettings};

/// The addresses `holdfast cluster` uses by default, so one laptop needs no flag.
pub const DEFAULT_SERVERS: &str = "127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303";

#[derive(Debug)]
pub enum ClientError {
    Io(std::io::Error),
    /// The send was given up. `maybe_written` says whether it may still have been written;
    /// `refused`, whether the cluster refused it (an unknown topic, a permission) rather than
    /// it running out of time.
    Send {
        reason: String,
        maybe_written: bool,
        refused: bool,
    },
    Refused(String),
    Timeout,
    BadAddress(String),
    /// A client file or TLS setting that cannot be used.
    Config(String),
    /// A batch larger than the brokers accept; nothing was sent.
    TooLarge {
        bytes: usize,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o: {e}"),
            ClientError::Send {
                reason,
                maybe_written,
                ..
            } => {
                let written = if *maybe_written {
                    "it may have been written"
                } else {
                    "nothing was written"
                };
                write!(f, "send failed ({reason}); {written}")
            }
            ClientError::Refused(reason) => write!(f, "refused: {reason}"),
            ClientError::Timeout => write!(f, "no answer from the cluster in time"),
            ClientError::BadAddress(a) => write!(f, "bad server address {a:?}"),
            ClientError::Config(why) => f.write_str(why),
            ClientError::TooLarge { bytes } => write!(
                f,
                "{bytes} message bytes in one send exceed the maximum of {SEND_BYTES_MAX}; nothing was sent"
            ),
        }
    }
}

impl std::error::Error for ClientError {}

/// Parses `host:port,host:port,…`; the n-th address is node n.
pub fn parse_servers(list: &str) -> Result<Vec<SocketAddr>, ClientError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            std::net::ToSocketAddrs::to_socket_addrs(s)
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ClientError::BadAddress(s.to_string()))
        })
        .collect()
}

/// Where a message was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReceipt {
    pub broker: GroupId,
    pub queue: QueueId,
    pub offset: Offset,
    /// An earlier attempt timed out or lost its leader, so a second copy may exist elsewhere:
    /// consumers may see this message twice (at-least-once).
    pub ambiguous: bool,
}

pub struct Producer {
    io: ClientIo,
    machine: ProducerMachine,
    results: Vec<(SendId, SendResult)>,
}

impl Producer {
    /// `config`: a [`ClientConfig`], or just the servers of a cluster without authentication.
    pub fn connect(config: impl Into<ClientConfig>) -> Result<Producer, ClientError> {
        Producer::with_settings(config, ProducerSettings::default())
    }

    /// [`Producer::connect`] with other timeouts and retries; see [`ProducerSettings`].
    pub fn with_settings(
        config: impl Into<ClientConfig>,
        settings: ProducerSettings,
    ) -> Result<Producer, ClientError> {
        let io = ClientIo::new(config.into()).map_err(ClientError::Io)?;
        // Distinct producers need distinct ids: the process and the time make one.
        let producer_id = (u64::from(std::process::id()) << 32) ^ io.now().as_micros();
        let mut config = ProducerConfig::new(producer_id, io.node_ids());
        settings.apply(&mut config);
        Ok(Producer {
            io,
            machine: ProducerMachine::new(config),
            results: Vec::new(),
        })
    }

    /// Sends one batch and waits for its receipt (the first message's place).
    pub fn send(
        &mut self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<SendReceipt, ClientError> {
        let id = self.send_async(topic, messages)?;
        loop {
            if let Some(at) = self.results.iter().position(|(s, _)| *s == id) {
                return receipt(self.results.remove(at).1);
            }
            if let Some(why) = self.io.refusal() {
                return Err(ClientError::Refused(why.to_string()));
            }
            self.drive(Duration::from_secs(1));
        }
    }

    /// Starts a send; its result comes from [`Producer::poll`]. A batch over
    /// [`SEND_BYTES_MAX`] is refused here, before anything is sent.
    pub fn send_async(
        &mut self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<SendId, ClientError> {
        let bytes: usize = messages.iter().map(Message::size_bytes).sum();
        if bytes > SEND_BYTES_MAX {
            return Err(ClientError::TooLarge { bytes });
        }
        let now = self.io.now();
        Ok(self.machine.send(now, topic, messages).0)
    }

    pub fn in_flight(&self) -> usize {
        self.machine.in_flight()
    }

    /// Why a server refused this producer's connection (its credential), if one did. A send
    /// its principal may not make fails alone, with the reason.
    pub fn refusal(&self) -> Option<&str> {
        self.io.refusal()
    }

    /// Drives the network for up to `wait` (less if a send ends sooner) and returns the sends
    /// that ended.
    pub fn poll(&mut self, wait: Duration) -> Vec<(SendId, Result<SendReceipt, ClientError>)> {
        if self.results.is_empty() {
            self.drive(wait);
        }
        std::mem::take(&mut self.results)
            .into_iter()
            .map(|(id, r)| (id, receipt(r)))
            .collect()
    }

    /// Runs the network until at least one more send has ended or `wait` passes.
    fn drive(&mut self, wait: Duration) {
        let deadline = std::time::Instant::now() + wait;
        let results = &mut self.results;
        let before = results.len();
        self.io.drive(&mut self.machine, deadline, |m| {
            while let Some(result) = m.poll_result() {
                results.push(result);
            }
            results.len() > before
        });
    }
}

fn receipt(result: SendResult) -> Result<SendReceipt, ClientError> {
    match result {
        SendResult::Acked {
            broker,
            queue,
            base_offset,
            ambiguous,
        } => Ok(SendReceipt {
            broker,
            queue,
            offset: base_offset,
            ambiguous,
        }),
        SendResult::Failed {
            reason,
            maybe_written,
            refused,
        } => Err(ClientError::Send {
            reason,
            maybe_written,
            refused,
        }),
    }
}

/// What a listener answers for each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeStatus {
    Success,
    ReconsumeLater,
}

/// Deliveries `run` takes from the machine at once, at least.
const TAKE_MIN: usize = 32;

pub struct Consumer {
    io: ClientIo,
    machine: ConsumerMachine,
    /// Delivered by the machine, not yet handed to a listener: the next `run` starts with
    /// them. The machine holds them as unanswered, so dropping them would stall their queue.
    undelivered: std::collections::VecDeque<Delivery>,
    /// When set, `run` returns at once (the CLI sets it on SIGINT and SIGTERM).
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Consumer {
    pub fn connect(
        config: impl Into<ClientConfig>,
        group: &str,
        topic: &str,
    ) -> Result<Consumer, ClientError> {
        Consumer::with_settings(config, group, topic, ConsumerSettings::default())
    }

    /// [`Consumer::connect`] with other timeouts and batch sizes; see [`ConsumerSettings`].
    pub fn with_settings(
        config: impl Into<ClientConfig>,
        group: &str,
        topic: &str,
        settings: ConsumerSettings,
    ) -> Result<Consumer, ClientError> {
        let io = ClientIo::new(config.into()).map_err(ClientError::Io)?;
        let member = format!("{}-{}", std::process::id(), io.now().as_micros());
        let mut config = ConsumerConfig::new(group, &member, topic, io.node_ids());
        settings.apply(&mut config);
        let machine = ConsumerMachine::new(config, io.now());
        Ok(Consumer {
            io,
            machine,
            undelivered: std::collections::VecDeque::new(),
            stop: None,
        })
    }

    /// `run` returns as soon as `stop` is set, after the answers given so far are confirmed;
    /// then [`Consumer::close`] hands the queues over at once.
    pub fn stop_when(&mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.stop = Some(stop);
    }

    fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Hands messages to `listener` until it has seen `count` of them or `idle` passes with
    /// none, then waits (up to 5 s) for the answers to be confirmed. Returns how many it saw.
    pub fn run(
        &mut self,
        count: Option<usize>,
        idle: Duration,
        mut listener: impl FnMut(&Delivery) -> ConsumeStatus,
    ) -> usize {
        self.run_batches(count, idle, 1, |batch| {
            batch.first().map_or(ConsumeStatus::Success, &mut listener)
        })
    }

    /// Like [`Consumer::run`], but hands the listener up to `batch_max` messages at once (as
    /// many as have arrived); its one answer holds for the whole batch.
    pub fn run_batches(
        &mut self,
        count: Option<usize>,
        idle: Duration,
        batch_max: usize,
        mut listener: impl FnMut(&[Delivery]) -> ConsumeStatus,
    ) -> usize {
        let mut seen = 0;
        let mut last = std::time::Instant::now();
        while count.is_none_or(|c| seen < c)
            && last.elapsed() < idle
            && !self.stopped()
            && self.refusal().is_none()
        {
            if self.undelivered.is_empty() {
                let deadline = std::time::Instant::now() + Duration::from_millis(100);
                let undelivered = &mut self.undelivered;
                // Take a batch at a time: what stays in the machine can be dropped there if
                // its queue moves to another member, instead of being handed out here first.
                let take = batch_max.max(TAKE_MIN);
                self.io.drive(&mut self.machine, deadline, |m| {
                    while undelivered.len() < take
                        && let Some(d) = m.poll_delivery()
                    {
                        undelivered.push_back(d);
                    }
                    !undelivered.is_empty()
                });
            }
            let now = self.io.now();
            while !self.undelivered.is_empty() && count.is_none_or(|c| seen < c) && !self.stopped()
            {
                let take = count
                    .map_or(usize::MAX, |c| c - seen)
                    .min(batch_max.max(1))
                    .min(self.undelivered.len());
                let batch: Vec<Delivery> = self.undelivered.drain(..take).collect();
                last = std::time::Instant::now();
                seen += batch.len();
                let status = match listener(&batch) {
                    ConsumeStatus::Success => AckStatus::Success,
                    ConsumeStatus::ReconsumeLater => AckStatus::ReconsumeLater,
                };
                for delivery in &batch {
                    self.machine.answer(now, delivery, status);
                }
            }
        }
        if self.refusal().is_some() {
            return seen; // nothing of this consumer's will be confirmed
        }
        // Only the answers given matter now: deliveries not handed out stay for the next run
        // (or go to the next owner on close), so wait for confirmations, not for them.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        self.io
            .drive(&mut self.machine, deadline, |m| m.unconfirmed() == 0);
        seen
    }
}

impl Consumer {
    /// Why a server refused this consumer (its credential, or its principal may not consume
    /// this topic as this group), if one did: `run` stops then.
    pub fn refusal(&self) -> Option<&str> {
        self.io.refusal().or(self.io.denial())
    }

    /// Leaves the group at once, after the answers given so far are confirmed, so the other
    /// members take over this one's queues now instead of after its session expires. Waits up
    /// to 5 s; messages delivered but not answered go to the new owners.
    pub fn close(mut self) {
        let now = self.io.now();
        self.undelivered.clear();
        self.machine.leave(now);
        if self.refusal().is_some() {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        self.io.drive(&mut self.machine, deadline, |m| m.has_left());
    }
}

/// One request at a time, for admin commands: follows leader hints for the metadata group.
pub struct Admin {
    io: ClientIo,
    call: Call,
}

struct Call {
    outbox: Option<(NodeId, RequestId, Request)>,
    answer: Option<Response>,
    deadline: Option<Instant>,
    /// Every ask gets a fresh id: a node drops a request id it has already taken on this
    /// connection as a duplicate, and a late answer to an earlier ask must not pass for this
    /// one's.
    next_id: RequestId,
    waiting: Option<RequestId>,
}

impl Machine for Call {
    fn poll_request(&mut self) -> Option<(NodeId, RequestId, Request)> {
        self.outbox.take()
    }
    fn handle_response(&mut self, _now: Instant, id: RequestId, response: Response) {
        if self.waiting == Some(id) {
            self.answer = Some(response);
        }
    }
    fn handle_timeout(&mut self, _now: Instant) {
        self.deadline = None;
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }
}

impl Admin {
    pub fn connect(config: impl Into<ClientConfig>) -> Result<Admin, ClientError> {
        let mut io = ClientIo::new(config.into()).map_err(ClientError::Io)?;
        // Nodes added at runtime are in the node table, not in the client's server list.
        io.learn_nodes(Duration::from_secs(1));
        let call = Call {
            outbox: None,
            answer: None,
            deadline: None,
            next_id: 1,
            waiting: None,
        };
        Ok(Admin { io, call })
    }

    /// Deletes `topic` (an admin's request): once this returns, the topic table no longer has
    /// it and each broker group drops its queues, messages, offsets and leases as it applies
    /// the deletion; a topic created again with the name starts empty. Returns how many
    /// queues it had. An unknown topic is [`ClientError::Refused`]; a deletion whose answer
    /// was lost to a change of leader and that is asked again may be refused as unknown
    /// although it took place.
    pub fn delete_topic(&mut self, topic: &str, wait: Duration) -> Result<u32, ClientError> {
        let request = Request::DeleteTopic {
            topic: topic.to_string(),
        };
        match self.ask_leader(request, wait)? {
            Response::TopicDeleted { queues, .. } => Ok(queues),
            other => Err(ClientError::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    /// Adds a broker group (an admin's request) whose first voters are `voters`: id `group`,
    /// or one past the highest when `None`. Once this returns the metadata table has it, each
    /// voter creates its replica, and topics created from then on place queues in it too
    /// (existing topics' queues stay where they are). Returns the group's id. Fewer voters
    /// than the cluster's replication factor is [`ClientError::Refused`] unless `force`; a
    /// retry of the same request answers the same.
    pub fn add_broker_group(
        &mut self,
        group: Option<GroupId>,
        voters: &[NodeId],
        force: bool,
        wait: Duration,
    ) -> Result<GroupId, ClientError> {
        let request = Request::AddBrokerGroup {
            group,
            voters: voters.to_vec(),
            force,
        };
        match self.ask_leader(request, wait)? {
            Response::BrokerGroupAdded { group, .. } => Ok(group),
            other => Err(ClientError::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.io.node_ids()
    }

    /// Where node `node` serves clients: the configured servers, or the node table's.
    pub fn addr_of(&self, node: NodeId) -> Option<std::net::SocketAddr> {
        self.io.addr_of(node)
    }

    /// Why a server refused this client's connection (its credential), if one did.
    pub fn refusal(&self) -> Option<&str> {
        self.io.refusal()
    }

    /// Asks `node` and waits up to 2 s.
    pub fn ask(&mut self, node: NodeId, request: Request) -> Option<Response> {
        self.call.answer = None;
        let id = self.call.next_id;
        self.call.next_id += 1;
        self.call.waiting = Some(id);
        self.call.outbox = Some((node, id, request));
        self.call.deadline = Some(self.io.now() + Duration::from_secs(2));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        self.io
            .drive(&mut self.call, deadline, |c| c.answer.is_some());
        self.call.answer.take()
    }

    /// Asks the metadata leader, following hints from any node; retries for up to `wait`.
    pub fn ask_leader(
        &mut self,
        request: Request,
        wait: Duration,
    ) -> Result<Response, ClientError> {
        self.ask_leader_of(METADATA_GROUP, request, wait)
    }

    /// Asks the leader of `group`, following hints from any node; retries for up to `wait`.
    pub fn ask_leader_of(
        &mut self,
        group: GroupId,
        request: Request,
        wait: Duration,
    ) -> Result<Response, ClientError> {
        let deadline = std::time::Instant::now() + wait;
        let mut target = self.node_ids().first().copied().unwrap_or(1);
        let mut turn = 0;
        while std::time::Instant::now() < deadline {
            let nodes = self.node_ids();
            let answer = self.ask(target, request.clone());
            if let Some(why) = self.io.refusal() {
                return Err(ClientError::Refused(why.to_string()));
            }
            match answer {
                Some(Response::NotLeader {
                    group: hinted,
                    leader_hint: Some(leader),
                }) if hinted == group => target = leader,
                Some(Response::NotLeader { .. } | Response::Unknown | Response::Busy) | None => {
                    turn += 1;
                    target = nodes[turn % nodes.len().max(1)];
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some(Response::Refused { reason }) => return Err(ClientError::Refused(reason)),
                Some(answer) => return Ok(answer),
            }
        }
        Err(ClientError::Timeout)
    }
}
