//! The client's network: one connection per server, opened on demand, driving a core state
//! machine (producer, consumer, or a one-shot call) until it has what it waits for.
//!
//! Servers are named by node id: the n-th address of `--servers` is node n.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use holdfast_core::node::protocol::{Request, RequestId, Response};
use holdfast_core::raft::NodeId;
use holdfast_core::time::Instant;
use holdfast_core::wire::{Frame, FrameDecoder, PROTOCOL_VERSION, check_hello, encode_frame};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tracing::debug;

use crate::clock::Clock;

/// A client state machine the I/O can drive.
pub trait Machine {
    fn poll_request(&mut self) -> Option<(NodeId, RequestId, Request)>;
    fn handle_response(&mut self, now: Instant, id: RequestId, response: Response);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_timeout(&self) -> Option<Instant>;
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
}

struct ServerConn {
    stream: TcpStream,
    decoder: FrameDecoder,
    out: Vec<u8>,
}

pub struct ClientIo {
    servers: Vec<SocketAddr>,
    poll: Poll,
    events: Events,
    conns: BTreeMap<NodeId, ServerConn>,
    /// A server that refused a connection is not tried again before this.
    retry_at: BTreeMap<NodeId, std::time::Instant>,
    pub clock: Clock,
}

impl ClientIo {
    pub fn new(servers: Vec<SocketAddr>) -> io::Result<ClientIo> {
        Ok(ClientIo {
            servers,
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
            let mut stream = match TcpStream::connect(addr) {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%addr, "connect: {e}");
                    self.retry_at.insert(node, now + Duration::from_millis(200));
                    return None;
                }
            };
            let _ = stream.set_nodelay(true);
            let interest = Interest::READABLE | Interest::WRITABLE;
            self.poll
                .registry()
                .register(&mut stream, Token(node as usize), interest)
                .ok()?;
            let mut out = Vec::new();
            let hello = Frame::Hello {
                version: PROTOCOL_VERSION,
                node: None,
            };
            encode_frame(&hello, &mut out).ok()?;
            let conn = ServerConn {
                stream,
                decoder: FrameDecoder::new(),
                out,
            };
            self.conns.insert(node, conn);
        }
        self.conns.get_mut(&node)
    }

    fn drop_conn(&mut self, node: NodeId) {
        if let Some(mut conn) = self.conns.remove(&node) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
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
        }
    }

    fn flush(&mut self) {
        let mut broken = Vec::new();
        for (node, conn) in &mut self.conns {
            while !conn.out.is_empty() {
                match conn.stream.write(&conn.out) {
                    Ok(0) => {
                        broken.push(*node);
                        break;
                    }
                    Ok(n) => {
                        conn.out.drain(..n);
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::NotConnected =>
                    {
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        broken.push(*node);
                        break;
                    }
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
                match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        broken.push(node);
                        break;
                    }
                    Ok(n) => conn.decoder.push(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        broken.push(node);
                        break;
                    }
                }
            }
            loop {
                match conn.decoder.next_frame() {
                    Ok(Some(Frame::Response { id, response })) => responses.push((id, response)),
                    Ok(Some(hello @ Frame::Hello { .. })) => {
                        if check_hello(&hello).is_err() {
                            broken.push(node);
                            break;
                        }
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
            self.drop_conn(node);
        }
        responses
    }
}
