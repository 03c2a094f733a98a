//! The client's network: one connection per server, opened on demand, driving a core state
//! machine (producer, consumer, or a one-shot call) until it has what it waits for.
//!
//! Servers are named by node id: the n-th address of `--servers` is node n. With TLS, each
//! server must present a certificate of the cluster CA for `cluster.holdfast`; the client
//! presents its token in the Hello. A server that refuses the connection (a Goodbye, a failed
//! handshake) is remembered as the [`ClientIo::refusal`], and a request refused as not
//! authorised as the [`ClientIo::denial`], so callers can stop and say why instead of
//! retrying until they time out.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use holdfast_core::node::protocol::{Request, RequestId, Response};
use holdfast_core::raft::NodeId;
use holdfast_core::time::Instant;
use holdfast_core::wire::{Frame, FrameDecoder, PROTOCOL_VERSION, check_hello, encode_frame};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tracing::debug;

use super::config::ClientConfig;
use crate::clock::Clock;
use crate::transport::Transport;

/// A client state machine the I/O can drive.
pub trait Machine {
    fn poll_request(&mut self) -> Option<(NodeId, RequestId, Request)>;
    fn handle_response(&mut self, now: Instant, id: RequestId, response: Response);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_timeout(&self) -> Option<Instant>;
    /// Logs what the machine reports happened (and so keeps its event buffer empty).
    fn log_events(&mut self) {}
    /// The cluster's nodes changed (the node table added or removed some).
    fn set_nodes(&mut self, _nodes: Vec<NodeId>) {}
    /// The connection to `node` closed or could not be made: what was in flight to it gets
    /// no answer. (A machine that does not say waits out its requests' timeouts.)
    fn connection_lost(&mut self, _now: Instant, _node: NodeId) {}
}

impl Machine for holdfast_core::client::Producer {
    fn poll_request(&mut self) -> Option<(NodeId, RequestId, Request)> {
        holdfast_core::client::Producer::poll_request(self)
    }
    fn handle_response(&mut self, now: Instant, id: RequestId, response: Response) {
        holdfast_core::client::Producer::handle_response(self, now, id, response)
    }
    fn handle_timeout(&mut self, now: Instant) {
        holdfast_core::client::Producer::handle_timeout(self, now)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        holdfast_core::client::Producer::poll_timeout(self)
    }
    fn set_nodes(&mut self, nodes: Vec<NodeId>) {
        holdfast_core::client::Producer::set_nodes(self, nodes)
    }
    fn connection_lost(&mut self, now: Instant, node: NodeId) {
        holdfast_core::client::Producer::connection_lost(self, now, node)
    }
}

impl Machine for holdfast_core::client::Consumer {
    fn poll_request(&mut self) -> Option<(NodeId, RequestId, Request)> {
        holdfast_core::client::Consumer::poll_request(self)
    }
    fn handle_response(&mut self, now: Instant, id: RequestId, response: Response) {
        holdfast_core::client::Consumer::handle_response(self, now, id, response)
    }
    fn handle_timeout(&mut self, now: Instant) {
        holdfast_core::client::Consumer::handle_timeout(self, now)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Some(holdfast_core::client::Consumer::poll_timeout(self))
    }
    fn connection_lost(&mut self, now: Instant, node: NodeId) {
        holdfast_core::client::Consumer::connection_lost(self, now, node)
    }
    fn set_nodes(&mut self, nodes: Vec<NodeId>) {
        holdfast_core::client::Consumer::set_nodes(self, nodes)
    }
    fn log_events(&mut self) {
        use holdfast_core::client::ConsumerEvent as E;
        while let Some(event) = self.poll_event() {
            match event {
                E::Rebalanced { generation, owned } => {
                    let (retry, topic): (Vec<_>, Vec<_>) =
                        owned.iter().partition(|(_, queue)| queue.is_retry());
                    let topic: Vec<String> = topic
                        .iter()
                        .map(|(broker, queue)| format!("{queue} (group {broker})"))
                        .collect();
                    tracing::info!(
                        generation,
                        "owns {} and {} retry queue(s)",
                        if topic.is_empty() {
                            "no topic queue".to_string()
                        } else {
                            topic.join(", ")
                        },
                        retry.len()
                    );
                }
                E::Revoked {
                    broker,
                    queue,
                    reason,
                } => tracing::info!("{queue} (group {broker}) revoked: {reason}"),
                E::ReleaseSent { broker, queue } => {
                    tracing::debug!("releasing {queue} (group {broker})")
                }
                other => tracing::debug!("{other:?}"),
            }
        }
    }
}

/// Request ids from here up are the I/O's own (asking for the node table), never a machine's
/// (machines count theirs up from 1).
const OWN_REQUEST_IDS: RequestId = 1 << 63;
/// The node table is asked for at most this often while a node's address is wanted.
const NODES_ASK_INTERVAL: Duration = Duration::from_millis(500);
/// And at least this often otherwise, so removals are learned too.
const NODES_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

struct ServerConn {
    transport: Transport,
    decoder: FrameDecoder,
    out: Vec<u8>,
    written: usize,
    /// The server's Hello arrived: it speaks our protocol on this transport.
    hello_seen: bool,
}

pub struct ClientIo {
    servers: Vec<SocketAddr>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    token: Option<String>,
    /// Why a server refused this client's connection (its credential, TLS, the port): every
    /// later request would be refused the same way.
    refusal: Option<String>,
    /// The last request a server refused as not authorised for this client's principal.
    denial: Option<String>,
    poll: Poll,
    events: Events,
    conns: BTreeMap<NodeId, ServerConn>,
    /// A server that refused a connection is not tried again before this.
    retry_at: BTreeMap<NodeId, std::time::Instant>,
    /// Client addresses of nodes added to the cluster at runtime, from the node table.
    learned: BTreeMap<NodeId, SocketAddr>,
    /// Nodes the node table says were removed: never dialed again.
    removed: BTreeSet<NodeId>,
    /// A node without a known address was wanted: ask some server for the node table.
    nodes_wanted: bool,
    nodes_asked_at: Option<std::time::Instant>,
    next_own_id: RequestId,
    /// The node table changed what `node_ids` gives since the machine was last told.
    nodes_changed: bool,
    /// Nodes whose connection closed, or that a request could not be sent to, since the
    /// machine was last told: it fails over what it had in flight there at once.
    lost: BTreeSet<NodeId>,
    pub clock: Clock,
}

impl ClientIo {
    pub fn new(config: ClientConfig) -> io::Result<ClientIo> {
        Ok(ClientIo {
            servers: config.servers,
            tls: config.tls,
            token: config.token,
            refusal: None,
            denial: None,
            poll: Poll::new()?,
            events: Events::with_capacity(256),
            conns: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            learned: BTreeMap::new(),
            removed: BTreeSet::new(),
            nodes_wanted: false,
            nodes_asked_at: None,
            next_own_id: OWN_REQUEST_IDS,
            nodes_changed: false,
            lost: BTreeSet::new(),
            clock: Clock::new(),
        })
    }

    /// The configured servers (node n is the n-th) and the nodes learned from the node table,
    /// minus those it removed.
    pub fn node_ids(&self) -> Vec<NodeId> {
        let mut ids: BTreeSet<NodeId> = (1..=self.servers.len() as NodeId).collect();
        ids.extend(self.learned.keys().copied());
        ids.retain(|id| !self.removed.contains(id));
        ids.into_iter().collect()
    }

    pub fn addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        if self.removed.contains(&node) {
            return None;
        }
        self.learned
            .get(&node)
            .or_else(|| {
                self.servers
                    .get(usize::try_from(node.checked_sub(1)?).ok()?)
            })
            .copied()
    }

    /// Asks the servers for the node table (nodes added and removed at runtime) and waits up
    /// to `wait` for an answer.
    pub fn learn_nodes(&mut self, wait: Duration) {
        self.nodes_wanted = true;
        self.nodes_asked_at = None;
        let deadline = std::time::Instant::now() + wait;
        while self.nodes_wanted && self.refusal.is_none() {
            self.ask_nodes();
            self.flush();
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            let _ = self.wait((deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// While an address is wanted (or every `NODES_REFRESH_INTERVAL`), asks the servers for
    /// the node table.
    fn ask_nodes(&mut self) {
        let now = std::time::Instant::now();
        if self
            .nodes_asked_at
            .is_none_or(|at| now.duration_since(at) >= NODES_REFRESH_INTERVAL)
        {
            self.nodes_wanted = true;
        }
        if !self.nodes_wanted
            || self
                .nodes_asked_at
                .is_some_and(|at| now.duration_since(at) < NODES_ASK_INTERVAL)
        {
            return;
        }
        self.nodes_asked_at = Some(now);
        // The servers this client already talks to; with none, every node at once (a connect
        // to a dead one only fails later, and the first answer is enough).
        let connected: Vec<NodeId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.hello_seen)
            .map(|(node, _)| *node)
            .collect();
        let targets = if connected.is_empty() {
            self.node_ids()
        } else {
            connected
        };
        for node in targets {
            if self.conn(node).is_some() {
                let id = self.next_own_id;
                self.next_own_id += 1;
                self.send(node, id, Request::Nodes);
            }
        }
    }

    /// What the node table says: addresses of added nodes, removed ids.
    fn learned_nodes(&mut self, nodes: Vec<holdfast_core::node::NodeRecord>) {
        self.nodes_wanted = false;
        let before = self.node_ids();
        for record in nodes {
            if record.removed {
                self.removed.insert(record.id);
                self.learned.remove(&record.id);
                continue;
            }
            match crate::config::resolve_addr(&record.client_addr) {
                Ok(addr) => {
                    if self.learned.insert(record.id, addr) != Some(addr) {
                        debug!(node = record.id, %addr, "learned a node's address");
                    }
                }
                Err(e) => debug!(node = record.id, "node table address: {e}"),
            }
        }
        self.nodes_changed |= self.node_ids() != before;
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Why a server refused this client's connection, if one did: a bad or missing
    /// credential, no TLS where it is required, a server that is not of the cluster.
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// The last request refused as not authorised for this client's principal, if any.
    pub fn denial(&self) -> Option<&str> {
        self.denial.as_deref()
    }

    /// Queues `request` for `node`; a server that cannot be reached drops it, and the
    /// machine hears that its connection is lost.
    pub fn send(&mut self, node: NodeId, id: RequestId, request: Request) {
        let Some(conn) = self.conn(node) else {
            self.lost.insert(node);
            return;
        };
        let frame = Frame::Request { id, request };
        if encode_frame(&frame, &mut conn.out).is_err() {
            debug!(node, "request too large to send");
        }
    }

    fn conn(&mut self, node: NodeId) -> Option<&mut ServerConn> {
        if !self.conns.contains_key(&node) {
            let now = std::time::Instant::now();
            if self.retry_at.get(&node).is_some_and(|at| now < *at) {
                return None;
            }
            let Some(addr) = self.addr_of(node) else {
                // A node added at runtime: the node table has its address.
                if !self.removed.contains(&node) {
                    self.nodes_wanted = true;
                }
                return None;
            };
            let stream = match TcpStream::connect(addr) {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%addr, "connect: {e}");
                    self.retry_at.insert(node, now + Duration::from_millis(200));
                    return None;
                }
            };
            let _ = stream.set_nodelay(true);
            let mut transport = match &self.tls {
                None => Transport::plain(stream),
                Some(tls) => {
                    let name = crate::tls::client_server_name().ok()?;
                    let tls = rustls::ClientConnection::new(tls.clone(), name).ok()?;
                    Transport::tls(stream, tls)
                }
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            self.poll
                .registry()
                .register(&mut transport.stream, Token(node as usize), interest)
                .ok()?;
            let mut out = Vec::new();
            let hello = Frame::Hello {
                version: PROTOCOL_VERSION,
                node: None,
                token: self.token.clone(),
            };
            encode_frame(&hello, &mut out).ok()?;
            let conn = ServerConn {
                transport,
                decoder: FrameDecoder::new(),
                out,
                written: 0,
                hello_seen: false,
            };
            self.conns.insert(node, conn);
        }
        self.conns.get_mut(&node)
    }

    fn drop_conn(&mut self, node: NodeId) {
        if let Some(mut conn) = self.conns.remove(&node) {
            let _ = self.poll.registry().deregister(&mut conn.transport.stream);
            self.lost.insert(node);
        }
        self.retry_at
            .insert(node, std::time::Instant::now() + Duration::from_millis(200));
    }

    /// Runs `machine` until `done(machine)` holds or `deadline` passes; returns whether it
    /// is done.
    pub fn drive<M: Machine>(
        &mut self,
        machine: &mut M,
        deadline: std::time::Instant,
        mut done: impl FnMut(&mut M) -> bool,
    ) -> bool {
        loop {
            while let Some((node, id, request)) = machine.poll_request() {
                self.send(node, id, request);
            }
            self.ask_nodes();
            self.flush();
            if !self.lost.is_empty() {
                // Fail over at once what went nowhere, then send its retries.
                let now = self.now();
                for node in std::mem::take(&mut self.lost) {
                    machine.connection_lost(now, node);
                }
                if machine.poll_timeout().is_some_and(|t| t <= now) {
                    machine.handle_timeout(now);
                }
                continue;
            }
            if std::mem::take(&mut self.nodes_changed) {
                machine.set_nodes(self.node_ids());
            }
            if done(machine) {
                return true;
            }
            if self.refusal.is_some() {
                return false;
            }
            let wall = std::time::Instant::now();
            if wall >= deadline {
                return false;
            }
            let now = self.now();
            let until_machine = machine
                .poll_timeout()
                .map_or(Duration::from_millis(100), |t| t.saturating_since(now));
            let wait = until_machine
                .min(deadline - wall)
                .min(Duration::from_millis(100));
            let responses = self.wait(wait);
            let now = self.now();
            for (id, response) in responses {
                machine.handle_response(now, id, response);
            }
            if machine.poll_timeout().is_some_and(|t| t <= now) {
                machine.handle_timeout(now);
            }
            machine.log_events();
        }
    }

    fn flush(&mut self) {
        let mut broken = Vec::new();
        for (node, conn) in &mut self.conns {
            match conn.transport.flush(&conn.out, &mut conn.written) {
                Ok(()) => {
                    if conn.written == conn.out.len() {
                        conn.out.clear();
                        conn.written = 0;
                    }
                }
                Err(e) => {
                    debug!(node, "write: {e}");
                    broken.push(*node);
                }
            }
        }
        for node in broken {
            self.drop_conn(node);
        }
    }

    /// Waits up to `wait` for responses.
    fn wait(&mut self, wait: Duration) -> Vec<(RequestId, Response)> {
        let mut responses = Vec::new();
        if self.poll.poll(&mut self.events, Some(wait)).is_err() {
            return responses;
        }
        let ready: Vec<NodeId> = self
            .events
            .iter()
            .filter(|e| e.is_readable() || e.is_error() || e.is_read_closed())
            .map(|e| e.token().0 as NodeId)
            .collect();
        let mut broken = Vec::new();
        // Nothing listens there (a node down): not a server that dropped a plaintext client.
        let mut refused = BTreeSet::new();
        let mut own = Vec::new();
        for node in ready {
            let Some(conn) = self.conns.get_mut(&node) else {
                continue;
            };
            let mut buf = [0u8; 64 * 1024];
            loop {
                match conn.transport.read(&mut buf) {
                    Ok(0) => {
                        broken.push(node);
                        break;
                    }
                    Ok(n) => conn.decoder.push(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!(node, "read: {e}");
                        if e.kind() == io::ErrorKind::ConnectionRefused {
                            refused.insert(node);
                        }
                        if e.kind() == io::ErrorKind::InvalidData {
                            // A TLS failure: a server that is not what it claims is as good
                            // as a refusal, and retrying it will not help.
                            self.refusal = Some(format!("node {node}: {e}"));
                        }
                        broken.push(node);
                        break;
                    }
                }
            }
            loop {
                match conn.decoder.next_frame() {
                    Ok(Some(Frame::Response { id, response })) if id >= OWN_REQUEST_IDS => {
                        if let Response::Nodes { nodes } = response {
                            own.push(nodes);
                        }
                    }
                    Ok(Some(Frame::Response { id, response })) => {
                        if let Response::Refused { reason } = &response
                            && reason.starts_with("not authorised")
                        {
                            self.denial = Some(format!("node {node}: {reason}"));
                        }
                        responses.push((id, response));
                    }
                    Ok(Some(Frame::Goodbye { reason })) => {
                        self.refusal = Some(format!("node {node}: {reason}"));
                        broken.push(node);
                        break;
                    }
                    Ok(Some(hello @ Frame::Hello { .. })) => {
                        if let Err(e) = check_hello(&hello) {
                            self.refusal = Some(format!("node {node}: {e}"));
                            broken.push(node);
                            break;
                        }
                        conn.hello_seen = true;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        debug!(node, "bad frame from server: {e}");
                        broken.push(node);
                        break;
                    }
                }
            }
        }
        for node in broken {
            // A plaintext client that a server drops before its Hello most likely reached a
            // cluster that requires TLS: say so rather than retry until the timeout.
            if self.tls.is_none()
                && self.refusal.is_none()
                && !refused.contains(&node)
                && self.conns.get(&node).is_some_and(|c| !c.hello_seen)
            {
                self.refusal = Some(format!(
                    "node {node} closed the connection before its Hello: does the cluster \
                     require TLS and a credential? Give the client file (--client-file or \
                     HOLDFAST_CLIENT; `holdfast cluster` writes holdfast-data/client.toml)"
                ));
            }
            self.drop_conn(node);
        }
        if !refused.is_empty() {
            // A node down may be one the node table removed: look, so the machine stops
            // choosing it.
            self.nodes_wanted = true;
        }
        for nodes in own {
            self.learned_nodes(nodes);
        }
        responses
    }
}
