//! The server: one mio event loop around one `BrokerNode`, a storage thread that writes and
//! syncs in batches, links to every peer, and client connections.
//!
//! The loop never waits on disk: writes go to the storage thread, and the node learns they are
//! durable when the thread wakes the loop. Nor on encoding a snapshot of a large state: a
//! snapshot thread does that. A storage error stops the server: an fsync that
//! failed is never taken for a success.

mod conn;
pub mod identity;
mod snapshots;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use holdfast_core::node::protocol::{ClientId, Request, RequestId};
use holdfast_core::node::{BrokerNode, NodeEvent};
use holdfast_core::raft::{Envelope, GroupId, NodeId};
use holdfast_core::wire::{Frame, PROTOCOL_VERSION, check_hello};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use snapshots::SnapshotEncoder;
use tracing::{debug, error, info, warn};

use crate::clock::Clock;
use crate::config::ServerConfig;
use crate::storage::{GroupStore, StorageConfig, StorageThread};
use conn::{Closed, Conn, Kind};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// The loop wakes at least this often to look at the stop flag and reconnect peers.
const TICK: Duration = Duration::from_millis(50);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct ServerError(pub String);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServerError {}

/// An outbound link to a peer: this node sends its messages over the connection it dialed.
struct Link {
    addr: SocketAddr,
    token: Option<Token>,
    next_attempt: std::time::Instant,
    backoff: Duration,
}

struct Server {
    id: NodeId,
    poll: Poll,
    listener: TcpListener,
    node: BrokerNode,
    storage: StorageThread,
    snapshots: SnapshotEncoder,
    conns: BTreeMap<Token, Conn>,
    links: BTreeMap<NodeId, Link>,
    clients: BTreeMap<ClientId, Token>,
    /// Requests read in this turn of the loop, handed to the node together so their commands
    /// share log entries.
    requests: Vec<(ClientId, RequestId, Request)>,
    /// Groups recovered damaged and not yet repaired: their markers go once the core says so.
    damaged: BTreeSet<GroupId>,
    data_dir: PathBuf,
    next_token: usize,
    next_client: ClientId,
    clock: Clock,
}

/// Runs a node until `stop` is set (SIGINT/SIGTERM) or storage fails.
pub fn run(config: ServerConfig, stop: Arc<AtomicBool>) -> Result<(), ServerError> {
    let clock = Clock::new();
    let groups: Vec<GroupId> = (0..=config.broker_groups).collect();
    // Before any group's files: which groups, if any, lost their data and their votes.
    let mut identity = identity::Identity::open(&config).map_err(ServerError)?;
    let mut stores = BTreeMap::new();
    let mut recovered = BTreeMap::new();
    let mut damaged = BTreeMap::new();
    for group in &groups {
        let (store, disk, damage) =
            GroupStore::open_repairing(&config.data_dir, *group, &StorageConfig::default())
                .map_err(|e| ServerError(format!("group {group}: cannot recover its data: {e}")))?;
        if let Some(damage) = damage {
            warn!(
                group,
                from = damage.from,
                "log damaged: not voting until a leader has repaired it"
            );
            damaged.insert(*group, damage);
        }
        info!(
            group,
            entries = disk.entries.len(),
            snapshot = disk.snapshot.as_ref().map_or(0, |s| s.index),
            term = disk.hard_state.term,
            "recovered"
        );
        stores.insert(*group, store);
        recovered.insert(*group, disk);
    }
    identity
        .opened(&recovered, &mut damaged)
        .map_err(ServerError)?;
    let poll = Poll::new().map_err(|e| ServerError(format!("mio: {e}")))?;
    let waker =
        Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| ServerError(format!("mio: {e}")))?);
    let notify = {
        let waker = waker.clone();
        Box::new(move || {
            if let Err(e) = waker.wake() {
                warn!("cannot wake the event loop: {e}");
            }
        })
    };
    let storage = StorageThread::spawn(stores, notify);
    let snapshots = {
        let waker = waker.clone();
        SnapshotEncoder::spawn(
            config.data_dir.clone(),
            Box::new(move || {
                if let Err(e) = waker.wake() {
                    warn!("cannot wake the event loop: {e}");
                }
            }),
        )
    };
    let mut listener = TcpListener::bind(config.listen())
        .map_err(|e| ServerError(format!("cannot listen on {}: {e}", config.listen())))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| ServerError(format!("mio: {e}")))?;
    let mut node_config = config.node_config();
    node_config.raft.damaged = damaged.clone();
    let seed = clock.now().as_micros() ^ config.id.rotate_left(32);
    let node = BrokerNode::new(node_config, recovered, seed, clock.now());
    let now = std::time::Instant::now();
    let links = config
        .nodes
        .iter()
        .filter(|(id, _)| **id != config.id)
        .map(|(id, addr)| {
            let link = Link {
                addr: *addr,
                token: None,
                next_attempt: now,
                backoff: RECONNECT_MIN,
            };
            (*id, link)
        })
        .collect();
    info!(id = config.id, listen = %config.listen(), data = %config.data_dir.display(), "node started");
    let mut server = Server {
        id: config.id,
        poll,
        listener,
        node,
        storage,
        snapshots,
        conns: BTreeMap::new(),
        links,
        clients: BTreeMap::new(),
        requests: Vec::new(),
        damaged: damaged.keys().copied().collect(),
        data_dir: config.data_dir.clone(),
        next_token: FIRST_CONN,
        next_client: 1,
        clock,
    };
    let result = server.run(&stop);
    info!("stopping: finishing queued writes");
    let (syncs, batches) = (server.storage.syncs(), server.storage.batches());
    server.storage.shutdown();
    info!(syncs, batches, "stopped");
    result
}

impl Server {
    fn run(&mut self, stop: &AtomicBool) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
            self.connect_links();
            let now = self.clock.now();
            let wait = self.node.poll_timeout().saturating_since(now).min(TICK);
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError(format!("poll: {e}")));
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    token => {
                        if event.is_readable() {
                            self.readable(token);
                        }
                        if event.is_writable()
                            && let Some(conn) = self.conns.get_mut(&token)
                            && let Err(why) = conn.flush()
                        {
                            self.close(token, &why);
                        }
                    }
                }
            }
            self.storage_done()?;
            let now = self.clock.now();
            for (group, index, data) in self.snapshots.poll_done() {
                self.node.snapshot_encoded(now, group, index, data);
            }
            if !self.requests.is_empty() {
                self.node
                    .handle_requests(now, std::mem::take(&mut self.requests));
            }
            if self.node.poll_timeout() <= now {
                self.node.handle_timeout(now);
            }
            self.drain();
            if let Some(fault) = self.node.poll_fault() {
                error!("stopping this node: {fault}");
                return Err(ServerError(fault));
            }
            self.forget_repaired_damage()?;
        }
        Ok(())
    }

    fn forget_repaired_damage(&mut self) -> Result<(), ServerError> {
        let repaired: Vec<GroupId> = self
            .damaged
            .iter()
            .copied()
            .filter(|g| {
                self.node
                    .replica(*g)
                    .is_some_and(|r| r.damaged_from().is_none())
            })
            .collect();
        for group in repaired {
            GroupStore::clear_damage(&self.data_dir, group).map_err(|e| {
                ServerError(format!("group {group}: cannot record its repair: {e}"))
            })?;
            info!(group, "repaired from peers: voting again");
            self.damaged.remove(&group);
        }
        Ok(())
    }

    fn register(&mut self, mut conn: Conn) -> Option<Token> {
        let token = Token(self.next_token);
        self.next_token += 1;
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut conn.stream, token, interest)
        {
            warn!("cannot register a connection: {e}");
            return None;
        }
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            node: Some(self.id),
        };
        if conn.queue(&hello).is_err() {
            return None;
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => {
                    debug!(%addr, "accepted");
                    let _ = stream.set_nodelay(true);
                    self.register(Conn::new(stream, None));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn connect_links(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<(NodeId, SocketAddr)> = self
            .links
            .iter()
            .filter(|(_, l)| l.token.is_none() && l.next_attempt <= now)
            .map(|(id, l)| (*id, l.addr))
            .collect();
        for (peer, addr) in due {
            let token = match TcpStream::connect(addr) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    self.register(Conn::new(stream, Some(peer)))
                }
                Err(e) => {
                    debug!(peer, %addr, "connect: {e}");
                    None
                }
            };
            if let Some(link) = self.links.get_mut(&peer) {
                link.token = token;
                if token.is_none() {
                    link.next_attempt = now + link.backoff;
                    link.backoff = (link.backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    fn readable(&mut self, token: Token) {
        let (frames, closed) = match self.conns.get_mut(&token).map(Conn::read) {
            None => return,
            Some(Ok(read)) => read,
            Some(Err(why)) => return self.close(token, &why),
        };
        self.handle_frames(token, frames);
        if let Some(why) = closed {
            self.close(token, &why);
        }
    }

    fn handle_frames(&mut self, token: Token, frames: Vec<Frame>) {
        let now = self.clock.now();
        for frame in frames {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            match (conn.kind, frame) {
                (Kind::Unknown, hello) => match check_hello(&hello) {
                    Ok(Some(node)) if conn.dialed.is_some_and(|peer| peer != node) => {
                        let why = format!("dialed node {:?} but node {node} answered", conn.dialed);
                        let e = holdfast_core::wire::WireError::Malformed(why);
                        return self.close(token, &Closed::Wire(e));
                    }
                    Ok(Some(node)) => {
                        conn.kind = Kind::Node(node);
                        if let Some(link) = conn.dialed.and_then(|p| self.links.get_mut(&p)) {
                            link.backoff = RECONNECT_MIN;
                        }
                    }
                    Ok(None) => {
                        let client = self.next_client;
                        self.next_client += 1;
                        conn.kind = Kind::Client(client);
                        self.clients.insert(client, token);
                    }
                    Err(e) => return self.close(token, &Closed::Wire(e)),
                },
                (Kind::Node(from), Frame::Peer(envelope)) if envelope.from == from => {
                    self.node.handle_peer(now, envelope);
                }
                (Kind::Client(client), Frame::Request { id, request }) => {
                    self.requests.push((client, id, request));
                }
                (_, frame) => {
                    let why = format!("unexpected frame {}", frame_name(&frame));
                    return self.close(
                        token,
                        &Closed::Wire(holdfast_core::wire::WireError::Malformed(why)),
                    );
                }
            }
        }
    }

    fn close(&mut self, token: Token, why: &Closed) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        match (&conn.kind, why) {
            (_, Closed::Eof) => debug!(?conn.kind, "connection closed"),
            (Kind::Node(_), Closed::Io(_)) => debug!(?conn.kind, "peer link down: {why}"),
            (_, Closed::Io(_)) if conn.dialed.is_some() => {
                debug!(peer = conn.dialed, "cannot reach peer: {why}");
            }
            _ => warn!(?conn.kind, "closing connection: {why}"),
        }
        if let Kind::Client(client) = conn.kind {
            self.clients.remove(&client);
        }
        if let Some(peer) = conn.dialed
            && let Some(link) = self.links.get_mut(&peer)
        {
            link.token = None;
            link.next_attempt = std::time::Instant::now() + link.backoff;
            link.backoff = (link.backoff * 2).min(RECONNECT_MAX);
        }
    }

    fn storage_done(&mut self) -> Result<(), ServerError> {
        let now = self.clock.now();
        for done in self.storage.poll_done() {
            match done {
                Ok((group, write)) => self.node.persisted(now, group, write),
                Err((group, e)) => {
                    error!(group, "storage failed, stopping this node: {e}");
                    return Err(ServerError(format!("group {group}: storage failed: {e}")));
                }
            }
        }
        Ok(())
    }

    /// Hands the node's outputs to the storage thread and the sockets.
    fn drain(&mut self) {
        while let Some(job) = self.node.poll_snapshot_job() {
            self.snapshots.submit(job);
        }
        while let Some((group, write)) = self.node.poll_write() {
            self.storage.submit(group, write);
        }
        while let Some(envelope) = self.node.poll_message() {
            self.send_peer(envelope);
        }
        while let Some((client, id, response)) = self.node.poll_response() {
            let Some(token) = self.clients.get(&client).copied() else {
                continue; // the client left; it will retry elsewhere
            };
            let frame = Frame::Response { id, response };
            self.queue(token, &frame);
        }
        while let Some(event) = self.node.poll_event() {
            log_event(event);
        }
        let pending: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pending_bytes() > 0)
            .map(|(t, _)| *t)
            .collect();
        for token in pending {
            if let Some(conn) = self.conns.get_mut(&token)
                && let Err(why) = conn.flush()
            {
                self.close(token, &why);
            }
        }
    }

    fn send_peer(&mut self, envelope: Envelope) {
        // No link: drop it. Raft retransmits what matters.
        let Some(token) = self.links.get(&envelope.to).and_then(|l| l.token) else {
            return;
        };
        self.queue(token, &Frame::Peer(envelope));
    }

    fn queue(&mut self, token: Token, frame: &Frame) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if let Err(why) = conn.queue(frame) {
            self.close(token, &why);
        }
    }
}

/// Elections and leader changes at INFO, refusals at WARN, so a storm or an attack shows.
fn log_event(event: NodeEvent) {
    match event {
        NodeEvent::BecameLeader { group, term } => info!(group, term, "became leader"),
        NodeEvent::SteppedDown { group, term } => info!(group, term, "stepped down"),
        NodeEvent::LeaderChanged {
            group,
            term,
            leader,
        } => info!(group, term, leader, "leader changed"),
        NodeEvent::MessageRefused { group, from, why } => {
            warn!(group, from, %why, "refused a peer message")
        }
        NodeEvent::RequestRefused { client, why } => warn!(client, %why, "refused a request"),
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "Hello",
        Frame::Peer(_) => "Peer",
        Frame::Request { .. } => "Request",
        Frame::Response { .. } => "Response",
    }
}
