//! The client's network: one connection per server, opened on demand, driving a core state
//! machine (producer, consumer, or a one-shot call) until it has what it waits for.
//!
//! Servers are named by node id: the n-th address of `--servers` is node n. With TLS, each
//! server must present a certificate of the cluster CA for `cluster.holdfast`; the client
//! presents its token in the Hello. A server that refuses the connection (a Goodbye, a failed
//! handshake) is remembered as the [`ClientIo::refusal`], and a request refused as not
//! authorised as the [`ClientIo::denial`], so callers can stop and say why instead of
//! retrying until they time out.

use std::collections::BTreeMap;
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
            clock: Clock::new(),
        })
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        (1..=self.servers.len() as NodeId).collect()
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
    /// machine's own timeout decides what happens next.
    pub fn send(&mut self, node: NodeId, id: RequestId, request: Request) {
        let Some(conn) = self.conn(node) else {
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
            let addr = *self.servers.get(node.checked_sub(1)? as usize)?;
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
            self.flush();
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
        responses
    }
}
