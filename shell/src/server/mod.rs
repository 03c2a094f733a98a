//! The server: one mio event loop around one `BrokerNode`, a storage thread per group that
//! writes and syncs in batches, links to every peer, and client connections.
//!
//! Peers and clients have listeners of their own. On the peer port a connection must complete
//! mutual TLS with a certificate of the cluster CA naming the node its Hello claims; on the
//! client port, TLS and a token of a principal in `auth.toml`, whose ACL every request is
//! checked against before it reaches the node. Anything else (a node's Hello on the client
//! port, a client's on the peer port, a failed handshake, no Hello within
//! [`HANDSHAKE_TIMEOUT`]) is answered with a Goodbye saying why, closed and logged at WARN.
//! Every connection is bounded: at most `connections_max` (`CONNECTIONS_MAX`) clients and a few
//! connections per node on the peer port, small frames until
//! authenticated, at most `REQUESTS_PENDING_PER_CONNECTION_MAX` requests unanswered (reading
//! stops meanwhile, and while much output waits), and bounded buffers each way.
//!
//! The loop never waits on disk: writes go to the group's storage thread, and the node learns
//! they are durable when the thread wakes the loop. Nor on encoding a snapshot of a large state: a
//! snapshot thread does that. A storage error stops the server: an fsync that
//! failed is never taken for a success.

mod catch_up;
mod conn;
pub mod handshake;
pub mod identity;
pub mod lock;
mod snapshots;
mod warn_budget;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use catch_up::{Action, CATCH_UP_CHUNK_BYTES_MAX, CatchUps, FETCHES_PENDING_PER_PEER_MAX};
use holdfast_core::broker::StoreOp;
use holdfast_core::limits::{CONNECTIONS_MAX, REQUESTS_PENDING_PER_CONNECTION_MAX};
use holdfast_core::node::protocol::{ClientId, Request, RequestId, Response};
use holdfast_core::node::{BrokerNode, NodeEvent};
use holdfast_core::raft::{Envelope, GroupId, NodeId};
use holdfast_core::wire::{Frame, PROTOCOL_VERSION};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use snapshots::{Done, Fetch, SnapshotEncoder};
use tracing::{debug, error, info, warn};
use warn_budget::WarnBudget;

use crate::auth::Principals;
use crate::clock::Clock;
use crate::config::ServerConfig;
use crate::metrics::{KindLabel, Metrics, PortLabel, ReasonLabel, STATS_INTERVAL};
use crate::storage::{GroupStore, QueueStore, StorageConfig, StorageThread};
use crate::tls::NodeTls;
use crate::transport::{Transport, set_unacked_timeout};
use conn::{Closed, Conn, Kind};
use handshake::Port;

const CLIENT_LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const PEER_LISTENER: Token = Token(2);
const FIRST_CONN: usize = 3;
/// A connection that has not completed its TLS handshake and an accepted Hello by then is
/// closed: a stranger cannot hold a connection (and its buffers) by saying nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client connection is not read while this much output waits for it: a client that
/// pipelines requests and does not read the answers stops being read, not served into memory.
pub const READ_PAUSE_OUTPUT_BYTES: usize = 4 << 20;
/// Connections the peer port holds per node of the cluster (a node needs one or two).
const PEER_CONNECTIONS_PER_NODE: usize = 4;
/// Frames read from one peer link per turn of the loop, so one busy link cannot starve the
/// others.
const PEER_FRAMES_PER_TURN_MAX: usize = 4_096;
/// Refused connections are logged at most this often (with a count), so a flood of them does
/// not become a flood of log lines.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// On SIGTERM a node hands the groups it leads to peers (leadership transfer) and stops once
/// it leads none, or after this long: a transfer takes a round trip and a sync when peers are
/// up to date, and gives up after an election timeout.
const HANDOVER_WAIT_MAX: Duration = Duration::from_secs(2);
/// The loop wakes at least this often to look at the stop flag and reconnect peers.
const TICK: Duration = Duration::from_millis(50);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// A dead peer costs a connect attempt this often at most: cheap, and a peer that comes back
/// (healed, restarted) is reached within it.
const RECONNECT_MAX: Duration = Duration::from_millis(500);
/// A peer link whose sent data the other side's TCP has not acknowledged for this long is
/// closed by the kernel and dialed again ([`crate::transport::set_unacked_timeout`]). Several
/// retransmissions fit on a LAN (200 ms minimum each); a link that is merely idle is never
/// closed by it.
const PEER_UNACKED_TIMEOUT: Duration = Duration::from_secs(1);
/// A dial to a peer whose TCP connection is not established by then is abandoned and made
/// again at once: the kernel would retry its SYN only after 1, 3, 7, ... s, so across a
/// partition a fresh SYN every half second is what reaches the peer soon after it heals.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

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

/// What a node checks connections against; `None` with `no_auth`.
struct Security {
    tls: NodeTls,
    principals: Principals,
}

struct Server {
    id: NodeId,
    poll: Poll,
    client_listener: TcpListener,
    peer_listener: TcpListener,
    security: Option<Security>,
    /// Every node's id, to refuse a Hello from a node that is not one of them: the config's,
    /// plus those the node table added, minus those it removed.
    nodes: BTreeSet<NodeId>,
    /// The node table version last acted on (see `sync_node_table`).
    node_table_seen: u64,
    /// This node read its own removal in the node table (logged once).
    removed_self: bool,
    /// Client connections held at once; see `accept`.
    connections_max: usize,
    /// Connections accepted on each port and open: (client port, peer port).
    accepted: (usize, usize),
    node: BrokerNode,
    storage: StorageThread,
    /// Groups whose store the storage thread holds.
    opened: BTreeSet<GroupId>,
    /// Records the directories of broker groups added at runtime.
    identity: identity::Identity,
    snapshots: SnapshotEncoder,
    /// Message bytes; shared with the snapshot thread, which reads them.
    queue_store: Arc<Mutex<QueueStore>>,
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
    /// See `ServerConfig::hand_over_on_stop`.
    hand_over_on_stop: bool,
    /// Connections that stopped reading at their budget, read again when there is room.
    paused: BTreeSet<Token>,
    /// Connections refused at accept since the last log line about it.
    refused_unlogged: u64,
    refused_logged_at: Option<std::time::Instant>,
    last_deadline_check: std::time::Instant,
    /// Refusal lines logged at WARN: bounded, so a flood of bad requests is not a flood of log.
    warnings: WarnBudget,
    metrics: Arc<Metrics>,
    stats_published_at: Option<std::time::Instant>,
    /// When each client request was read, and its kind, for the latency histogram. Bounded
    /// by the requests pending per connection; a closed client's go with it.
    started: BTreeMap<(ClientId, RequestId), (std::time::Instant, &'static str)>,
    /// When each snapshot job went out to be encoded (one per group at most).
    snapshot_started: BTreeMap<GroupId, std::time::Instant>,
    /// Broker groups whose store fetches segments from peers; their writes wait.
    catch_ups: CatchUps,
    /// Fetches of each peer being served (bounded by `FETCHES_PENDING_PER_PEER_MAX`).
    fetches_pending: BTreeMap<NodeId, usize>,
    /// The queue store failed outside `drain` (writing what a peer sent): the node stops.
    store_failed: Option<String>,
}

/// Runs a node until `stop` is set (SIGINT/SIGTERM) or storage fails.
pub fn run(config: ServerConfig, stop: Arc<AtomicBool>) -> Result<(), ServerError> {
    let clock = Clock::new();
    // Before anything reads or writes the directory; held until this function returns.
    let _lock = lock::DataDirLock::acquire(&config.data_dir).map_err(ServerError)?;
    // Before any group's files: which groups, if any, lost their data and their votes.
    let mut identity = identity::Identity::open(&config).map_err(ServerError)?;
    // Broker groups added at runtime come back from their directories; the node makes a
    // replica of each once its metadata table lists the group.
    let groups = identity
        .groups_to_open(config.broker_groups)
        .map_err(ServerError)?;
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
    let metrics = Arc::new(Metrics::new(config.id));
    let _metrics_thread = match config.metrics_addr {
        Some(addr) => {
            Some(crate::metrics::serve(addr, metrics.clone(), stop.clone()).map_err(ServerError)?)
        }
        None => None,
    };
    let opened: BTreeSet<GroupId> = stores.keys().copied().collect();
    let storage = StorageThread::spawn_measured(stores, notify, Some(metrics.shell.clone()));
    let queue_store = Arc::new(Mutex::new(
        QueueStore::open(&config.data_dir)
            .map_err(|e| ServerError(format!("cannot open the queue store: {e}")))?,
    ));
    let snapshots = {
        let waker = waker.clone();
        SnapshotEncoder::spawn(
            config.data_dir.clone(),
            queue_store.clone(),
            Box::new(move || {
                if let Err(e) = waker.wake() {
                    warn!("cannot wake the event loop: {e}");
                }
            }),
        )
    };
    let security = match &config.security {
        None => {
            warn!(
                "no_auth: TLS and authentication are OFF; anyone who reaches a port can act as a \
                 client or as a node (for experiments only)"
            );
            None
        }
        Some(files) => {
            let tls =
                NodeTls::load(&files.ca_cert, &files.cert, &files.key).map_err(ServerError)?;
            let principals = Principals::from_file(&files.principals).map_err(ServerError)?;
            info!(
                principals = principals.len(),
                "mutual TLS between nodes; TLS and tokens for clients"
            );
            Some(Security { tls, principals })
        }
    };
    raise_open_files_limit();
    let mut client_listener = TcpListener::bind(config.listen()).map_err(|e| {
        ServerError(format!(
            "cannot listen for clients on {}: {e}",
            config.listen()
        ))
    })?;
    let mut peer_listener = TcpListener::bind(config.listen_peers()).map_err(|e| {
        ServerError(format!(
            "cannot listen for peers on {}: {e}",
            config.listen_peers()
        ))
    })?;
    poll.registry()
        .register(&mut client_listener, CLIENT_LISTENER, Interest::READABLE)
        .map_err(|e| ServerError(format!("mio: {e}")))?;
    poll.registry()
        .register(&mut peer_listener, PEER_LISTENER, Interest::READABLE)
        .map_err(|e| ServerError(format!("mio: {e}")))?;
    let mut node_config = config.node_config();
    node_config.raft.damaged = damaged.clone();
    node_config.joined = identity.joined();
    let seed = clock.now().as_micros() ^ config.id.rotate_left(32);
    let node = BrokerNode::new(node_config, recovered, seed, clock.now());
    let now = std::time::Instant::now();
    let links = config
        .peers
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
    info!(
        id = config.id,
        clients = %config.listen(),
        peers = %config.listen_peers(),
        data = %config.data_dir.display(),
        "node started"
    );
    let mut server = Server {
        id: config.id,
        poll,
        client_listener,
        peer_listener,
        security,
        nodes: config.nodes.keys().copied().collect(),
        node_table_seen: 0,
        removed_self: false,
        connections_max: config.connections_max,
        accepted: (0, 0),
        node,
        storage,
        opened,
        identity,
        snapshots,
        queue_store,
        conns: BTreeMap::new(),
        links,
        clients: BTreeMap::new(),
        requests: Vec::new(),
        damaged: damaged.keys().copied().collect(),
        data_dir: config.data_dir.clone(),
        next_token: FIRST_CONN,
        next_client: 1,
        clock,
        paused: BTreeSet::new(),
        hand_over_on_stop: config.hand_over_on_stop,
        refused_unlogged: 0,
        refused_logged_at: None,
        last_deadline_check: std::time::Instant::now(),
        warnings: WarnBudget::new(std::time::Instant::now()),
        metrics,
        stats_published_at: None,
        started: BTreeMap::new(),
        snapshot_started: BTreeMap::new(),
        catch_ups: CatchUps::default(),
        fetches_pending: BTreeMap::new(),
        store_failed: None,
    };
    let result = server.run(&stop);
    info!("stopping: finishing queued writes");
    let (syncs, batches) = (server.storage.syncs(), server.storage.batches());
    server.storage.shutdown();
    info!(syncs, batches, "stopped");
    result
}

impl Server {
    /// Serves until `stop` is set, then hands over the groups it leads (see
    /// [`HANDOVER_WAIT_MAX`]) before returning.
    fn run(&mut self, stop: &AtomicBool) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let mut handover_until: Option<std::time::Instant> = None;
        // The rest of the log recovered at the start is applied before anything is served.
        let replay_started = std::time::Instant::now();
        self.drain()?;
        info!(
            ms = replay_started.elapsed().as_millis() as u64,
            "recovered log applied"
        );
        loop {
            if stop.load(Ordering::Relaxed) {
                if !self.hand_over_on_stop {
                    break;
                }
                let deadline = *handover_until.get_or_insert_with(|| {
                    info!("stopping: handing over the groups this node leads");
                    std::time::Instant::now() + HANDOVER_WAIT_MAX
                });
                let transferring = self.node.hand_over_leadership(self.clock.now());
                self.drain()?;
                if transferring == 0 {
                    info!("no group left to hand over");
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    warn!(
                        transferring,
                        "stopping while still leading: no peer took over within {} ms",
                        HANDOVER_WAIT_MAX.as_millis()
                    );
                    break;
                }
            }
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
                    CLIENT_LISTENER => self.accept(Port::Client),
                    PEER_LISTENER => self.accept(Port::Peer),
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
            if let Some(e) = self.store_failed.take() {
                return Err(ServerError(format!("queue store failed: {e}")));
            }
            let now = self.clock.now();
            for done in self.snapshots.poll_done() {
                let (group, index, data) = match done {
                    Done::Snapshot(group, index, data) => (group, index, data),
                    Done::Fetched { to, frame } => {
                        if let Some(pending) = self.fetches_pending.get_mut(&to) {
                            *pending = pending.saturating_sub(1);
                        }
                        self.send_to_peer(to, &frame);
                        continue;
                    }
                    Done::CatchUpSynced(group, result) => {
                        self.caught_up(group, result)?;
                        continue;
                    }
                };
                let started = self.snapshot_started.remove(&group);
                match data {
                    Ok(data) => {
                        if let Some(at) = started {
                            let shell = &self.metrics.shell;
                            shell
                                .snapshot_encode_seconds
                                .observe(at.elapsed().as_secs_f64());
                            shell.snapshot_bytes.observe(data.len() as f64);
                        }
                        self.node.snapshot_encoded(now, group, index, data)
                    }
                    Err(_) => self.node.snapshot_failed(group, index),
                }
            }
            if !self.requests.is_empty() {
                self.node
                    .handle_requests(now, std::mem::take(&mut self.requests));
            }
            if self.node.poll_timeout() <= now {
                self.node.handle_timeout(now);
            }
            self.drain()?;
            self.resume_paused();
            self.close_late_handshakes();
            self.abandon_slow_dials();
            if let Some(fault) = self.node.poll_fault() {
                error!("stopping this node: {fault}");
                return Err(ServerError(fault.to_string()));
            }
            self.forget_repaired_damage()?;
            self.sync_node_table();
            self.publish_stats();
        }
        Ok(())
    }

    /// Follows the metadata group's node table: links to nodes added at runtime (and accepts
    /// their links, authenticated like any peer's: a certificate of the cluster CA naming
    /// them), and forgets removed ones (closes their links, refuses them from then on).
    fn sync_node_table(&mut self) {
        let version = self.node.node_table_version();
        if version == self.node_table_seen {
            return;
        }
        self.node_table_seen = version;
        for record in self.node.node_table() {
            let peer = record.id;
            if peer == self.id {
                if record.removed && !self.removed_self {
                    self.removed_self = true;
                    warn!(
                        "this node was removed from the cluster (the node table says so): it is \
                         in no group's configuration any more; stop it and do not start it again"
                    );
                }
                continue;
            }
            if record.removed {
                let was_known = self.nodes.remove(&peer);
                let mut tokens: Vec<Token> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.kind == Kind::Node(peer) || c.dialed == Some(peer))
                    .map(|(t, _)| *t)
                    .collect();
                if let Some(link) = self.links.remove(&peer) {
                    tokens.extend(link.token);
                }
                for token in tokens {
                    self.close(token, &Closed::Eof);
                }
                if was_known {
                    info!(
                        peer,
                        "node removed from the cluster: its links are closed and refused"
                    );
                }
                continue;
            }
            let addr = match crate::config::resolve_addr(&record.peer_addr) {
                Ok(addr) => addr,
                Err(e) => {
                    warn!(peer, "the node table's peer address does not resolve: {e}");
                    continue;
                }
            };
            self.nodes.insert(peer);
            let now = std::time::Instant::now();
            match self.links.get_mut(&peer) {
                Some(link) if link.addr == addr => {}
                Some(link) => {
                    info!(peer, %addr, was = %link.addr, "peer address changed: dialing the new one");
                    link.addr = addr;
                    link.next_attempt = now;
                    if let Some(token) = link.token {
                        self.close(token, &Closed::Eof);
                    }
                }
                None => {
                    info!(peer, %addr, "node added to the cluster: linking to it");
                    self.links.insert(
                        peer,
                        Link {
                            addr,
                            token: None,
                            next_attempt: now,
                            backoff: RECONNECT_MIN,
                        },
                    );
                }
            }
        }
    }

    /// Hands the metrics a fresh copy of the core's counters, every `STATS_INTERVAL`.
    fn publish_stats(&mut self) {
        let now = std::time::Instant::now();
        if self
            .stats_published_at
            .is_some_and(|at| now.duration_since(at) < STATS_INTERVAL)
        {
            return;
        }
        self.stats_published_at = Some(now);
        self.metrics.stats.publish(self.node.stats());
        let open = |port| self.conns.values().filter(|c| c.port == port).count() as i64;
        let shell = &self.metrics.shell;
        shell
            .connections_open
            .get_or_create(&PortLabel { port: "client" })
            .set(open(Port::Client));
        shell
            .connections_open
            .get_or_create(&PortLabel { port: "peer" })
            .set(open(Port::Peer));
    }

    fn refused_metric(&self, reason: &'static str) {
        self.metrics
            .shell
            .refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
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
            .register(&mut conn.transport.stream, token, interest)
        {
            warn!("cannot register a connection: {e}");
            return None;
        }
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            node: Some(self.id),
            token: None,
        };
        if conn.queue(&hello).is_err() {
            return None;
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    fn accept(&mut self, port: Port) {
        loop {
            let listener = match port {
                Port::Client => &self.client_listener,
                Port::Peer => &self.peer_listener,
            };
            match listener.accept() {
                Ok((stream, addr)) => {
                    if !self.room_to_accept(port) {
                        // Dropping the stream closes it at once.
                        self.refused_at_accept(addr, port);
                        continue;
                    }
                    debug!(%addr, ?port, "accepted");
                    let _ = stream.set_nodelay(true);
                    let transport = match self.tls_for_accept(port) {
                        None => Transport::plain(stream),
                        Some(Ok(tls)) => Transport::tls(stream, tls),
                        Some(Err(e)) => {
                            warn!(%addr, "cannot start TLS: {e}");
                            continue;
                        }
                    };
                    if self
                        .register(Conn::new(transport, port, addr, None))
                        .is_some()
                    {
                        let label = match port {
                            Port::Client => {
                                self.accepted.0 += 1;
                                "client"
                            }
                            Port::Peer => {
                                self.accepted.1 += 1;
                                "peer"
                            }
                        };
                        self.metrics
                            .shell
                            .connections_accepted
                            .get_or_create(&PortLabel { port: label })
                            .inc();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn tls_for_accept(
        &self,
        port: Port,
    ) -> Option<Result<rustls::ServerConnection, rustls::Error>> {
        let security = self.security.as_ref()?;
        let config = match port {
            Port::Client => security.tls.client_server.clone(),
            Port::Peer => security.tls.peer_server.clone(),
        };
        Some(rustls::ServerConnection::new(config))
    }

    /// Whether one more connection fits on `port`: at most `connections_max` on the client
    /// port, and a few per node on the peer port, so a flood of clients cannot crowd out the
    /// links between nodes. At the limit, the oldest connection still in its handshake makes
    /// room (closed, logged): strangers that never finish cannot hold the port shut against
    /// one that does (in milliseconds) until their handshake deadline.
    fn room_to_accept(&mut self, port: Port) -> bool {
        let (open, max) = match port {
            Port::Client => (self.accepted.0, self.connections_max),
            Port::Peer => (
                self.accepted.1,
                PEER_CONNECTIONS_PER_NODE * self.nodes.len(),
            ),
        };
        if open < max {
            return true;
        }
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.port == port && c.dialed.is_none() && c.kind == Kind::Unknown)
            .min_by_key(|(_, c)| c.opened)
            .map(|(t, _)| *t);
        match oldest {
            Some(token) => {
                self.refuse(
                    token,
                    "connection limit reached: the oldest connection still in its handshake makes room",
                );
                true
            }
            None => false,
        }
    }

    fn refused_at_accept(&mut self, addr: SocketAddr, port: Port) {
        self.refused_metric("connections_max");
        self.refused_unlogged += 1;
        let now = std::time::Instant::now();
        if self
            .refused_logged_at
            .is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL)
        {
            warn!(
                %addr,
                ?port,
                refused = self.refused_unlogged,
                "refusing connections: as many open and authenticated as this port takes \
                 (connections_max {} for clients, {PEER_CONNECTIONS_PER_NODE} per node for peers)",
                self.connections_max
            );
            self.refused_unlogged = 0;
            self.refused_logged_at = Some(now);
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
                    if let Err(e) = set_unacked_timeout(&stream, PEER_UNACKED_TIMEOUT) {
                        debug!(peer, "cannot bound unacknowledged time: {e}");
                    }
                    let transport = match &self.security {
                        None => Some(Transport::plain(stream)),
                        Some(security) => crate::tls::server_name(peer)
                            .and_then(|name| {
                                rustls::ClientConnection::new(
                                    security.tls.peer_client.clone(),
                                    name,
                                )
                                .map_err(|e| e.to_string())
                            })
                            .map(|tls| Transport::tls(stream, tls))
                            .map_err(|e| warn!(peer, "cannot start TLS: {e}"))
                            .ok(),
                    };
                    transport
                        .and_then(|t| self.register(Conn::new(t, Port::Peer, addr, Some(peer))))
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

    /// How many frames a connection may be read for now: 1 before its Hello (the rest waits
    /// for the limits that follow from it), else what its budget of pending requests leaves,
    /// and nothing while much output waits.
    fn read_budget(conn: &Conn) -> usize {
        match conn.kind {
            Kind::Unknown => 1,
            Kind::Node(_) => PEER_FRAMES_PER_TURN_MAX,
            Kind::Client(_) if conn.pending_bytes() > READ_PAUSE_OUTPUT_BYTES => 0,
            Kind::Client(_) => {
                REQUESTS_PENDING_PER_CONNECTION_MAX.saturating_sub(conn.requests_pending)
            }
        }
    }

    fn readable(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let budget = Self::read_budget(conn);
        if budget == 0 {
            self.paused.insert(token);
            return;
        }
        let read = match conn.read(budget) {
            Ok(read) => read,
            Err(why @ Closed::Wire(_)) => {
                // Framing is lost, but the other side may still read: tell it why.
                conn.goodbye(&why.to_string());
                return self.close(token, &why);
            }
            Err(why) => return self.close(token, &why),
        };
        // A read can make a TLS handshake want to answer.
        if let Err(why) = conn.flush() {
            return self.close(token, &why);
        }
        if read.stopped {
            self.paused.insert(token);
        }
        self.handle_frames(token, read.frames);
        if let Some(why) = read.closed {
            self.close(token, &why);
        }
    }

    /// Reads again the connections that stopped at their budget and now have room.
    fn resume_paused(&mut self) {
        let ready: Vec<Token> = self
            .paused
            .iter()
            .copied()
            .filter(|t| self.conns.get(t).is_none_or(|c| Self::read_budget(c) > 0))
            .collect();
        for token in ready {
            self.paused.remove(&token);
            self.readable(token);
        }
    }

    fn close_late_handshakes(&mut self) {
        let now = std::time::Instant::now();
        if now.duration_since(self.last_deadline_check) < Duration::from_millis(500) {
            return;
        }
        self.last_deadline_check = now;
        let late: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.kind == Kind::Unknown && now.duration_since(c.opened) > HANDSHAKE_TIMEOUT
            })
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.refused_metric("handshake_timeout");
            let why = format!(
                "no TLS handshake and accepted Hello within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            );
            self.refuse(token, &why);
        }
    }

    /// Tells the other side why in a Goodbye, then closes (logged at WARN).
    fn refuse(&mut self, token: Token, why: &str) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.goodbye(why);
        }
        self.close(token, &Closed::Refused(why.to_string()));
    }

    fn handle_frames(&mut self, token: Token, frames: Vec<Frame>) {
        let now = self.clock.now();
        for frame in frames {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            match (conn.kind, frame) {
                (Kind::Unknown, hello) => {
                    if let Err(why) = self.hello(token, &hello) {
                        self.refused_metric("hello");
                        return self.refuse(token, &why);
                    }
                    // Frames after the Hello are read with the limits that follow from it.
                    self.paused.insert(token);
                }
                (Kind::Node(from), Frame::Peer(envelope)) if envelope.from == from => {
                    self.node.handle_peer(now, envelope);
                }
                (
                    Kind::Node(from),
                    Frame::Fetch {
                        id,
                        group,
                        queue,
                        from: offset,
                        end,
                        bytes_max,
                    },
                ) => self.serve_fetch(
                    from,
                    Fetch {
                        to: from,
                        id,
                        group,
                        queue,
                        from: offset,
                        end,
                        bytes_max: (bytes_max as usize).min(CATCH_UP_CHUNK_BYTES_MAX),
                    },
                ),
                (
                    Kind::Node(peer),
                    Frame::Fetched {
                        id,
                        group,
                        queue,
                        from,
                        records,
                    },
                ) => {
                    let fetched = match self.queue_store.lock() {
                        Ok(mut store) => self.catch_ups.fetched(
                            std::time::Instant::now(),
                            peer,
                            id,
                            group,
                            &queue,
                            from,
                            records,
                            &mut store,
                        ),
                        Err(_) => Err("the queue store is poisoned".to_string()),
                    };
                    if let Err(e) = fetched {
                        // The store failed (an I/O error): the loop sees it and stops.
                        error!(group, "queue store failed while catching up: {e}");
                        self.store_failed = Some(e);
                    }
                }
                (Kind::Client(client), Frame::Request { id, request }) => {
                    let max = holdfast_core::limits::CONSUMER_GROUPS_PER_CONNECTION_MAX;
                    let too_many = match request.member_group() {
                        Some(group) if !conn.consumer_groups.contains(group) => {
                            if conn.consumer_groups.len() >= max {
                                Some(format!(
                                    "this connection spoke for {max} consumer groups already,                                      the maximum: refusing the new group {group}"
                                ))
                            } else {
                                conn.consumer_groups.insert(group.to_string());
                                None
                            }
                        }
                        _ => None,
                    };
                    if let Some(reason) = too_many {
                        self.refused_metric("consumer_groups");
                        let response = Response::Refused { reason };
                        self.queue(token, &Frame::Response { id, response });
                        continue;
                    }
                    let denied = conn
                        .principal
                        .as_ref()
                        .and_then(|p| p.authorise(&request).err().map(|why| (p.name.clone(), why)));
                    match denied {
                        None => {
                            conn.requests_pending += 1;
                            self.started
                                .insert((client, id), (std::time::Instant::now(), request.kind()));
                            self.requests.push((client, id, request));
                        }
                        Some((principal, reason)) => {
                            self.metrics
                                .shell
                                .refused
                                .get_or_create(&ReasonLabel { reason: "acl" })
                                .inc();
                            if self.warnings.allow(std::time::Instant::now()) {
                                warn!(principal, addr = %conn.addr, request = request.kind(), "request refused: {reason}");
                            }
                            let response = Response::Refused { reason };
                            self.queue(token, &Frame::Response { id, response });
                        }
                    }
                }
                (kind, frame) => {
                    let why = match (kind, &frame) {
                        (Kind::Client(_), Frame::Peer(_)) => {
                            "a Raft message on the client port".to_string()
                        }
                        (Kind::Node(_), Frame::Request { .. }) => {
                            "a client request on the peer port".to_string()
                        }
                        _ => format!("unexpected frame {}", frame_name(&frame)),
                    };
                    self.refused_metric("protocol");
                    return self.refuse(token, &why);
                }
            }
        }
    }

    /// Checks a connection's Hello against its port and, with security, its certificate or
    /// its token; on success the connection is a node or a client.
    fn hello(&mut self, token: Token, frame: &Frame) -> Result<(), String> {
        let Some(conn) = self.conns.get_mut(&token) else {
            return Ok(());
        };
        let context = handshake::HelloContext {
            port: conn.port,
            me: self.id,
            nodes: &self.nodes,
            dialed: conn.dialed,
            principals: self.security.as_ref().map(|s| &s.principals),
            certificate: conn.transport.peer_certificate(),
        };
        match handshake::accept_hello(&context, frame)? {
            handshake::Accepted::Node(node) => {
                conn.kind = Kind::Node(node);
                conn.authenticated();
                if let Some(link) = conn.dialed.and_then(|p| self.links.get_mut(&p)) {
                    link.backoff = RECONNECT_MIN;
                }
                info!(peer = node, addr = %conn.addr, dialed = conn.dialed.is_some(), "peer connected");
                if conn.dialed.is_none() {
                    self.close_superseded(token, node);
                }
            }
            handshake::Accepted::Client(principal) => {
                if let Some(p) = &principal {
                    debug!(principal = p.name, addr = %conn.addr, "client authenticated");
                }
                conn.principal = principal;
                let client = self.next_client;
                self.next_client += 1;
                conn.kind = Kind::Client(client);
                conn.authenticated();
                self.clients.insert(client, token);
            }
        }
        Ok(())
    }

    /// A node sends over the one link it dialed, so a newer link from it means it gave up
    /// the older ones: across a partition they are dead without either side being told (the
    /// close never arrived), and kept they would fill the peer port's few places per node.
    fn close_superseded(&mut self, newest: Token, node: NodeId) {
        let older: Vec<Token> = self
            .conns
            .iter()
            .filter(|(t, c)| **t != newest && c.dialed.is_none() && c.kind == Kind::Node(node))
            .map(|(t, _)| *t)
            .collect();
        for token in older {
            info!(
                peer = node,
                "closing an older link from this peer: it dialed again"
            );
            self.close(token, &Closed::Eof);
        }
    }

    /// Abandons dials whose TCP connection is not established within
    /// [`PEER_CONNECT_TIMEOUT`] and lets `connect_links` dial again at once.
    fn abandon_slow_dials(&mut self) {
        let now = std::time::Instant::now();
        let slow: Vec<(Token, NodeId)> = self
            .links
            .iter()
            .filter_map(|(peer, link)| Some((link.token?, *peer)))
            .filter(|(token, _)| {
                self.conns.get(token).is_some_and(|c| {
                    c.kind == Kind::Unknown
                        && now.duration_since(c.opened) > PEER_CONNECT_TIMEOUT
                        && c.transport.stream.peer_addr().is_err()
                })
            })
            .collect();
        for (token, peer) in slow {
            let why = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "not connected within {} ms",
                    PEER_CONNECT_TIMEOUT.as_millis()
                ),
            );
            self.close(token, &Closed::Io(why));
            if let Some(link) = self.links.get_mut(&peer) {
                link.next_attempt = now;
            }
        }
    }

    fn close(&mut self, token: Token, why: &Closed) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.transport.stream);
        self.paused.remove(&token);
        if conn.dialed.is_none() {
            match conn.port {
                Port::Client => self.accepted.0 = self.accepted.0.saturating_sub(1),
                Port::Peer => self.accepted.1 = self.accepted.1.saturating_sub(1),
            }
        }
        let (kind, addr, port) = (conn.kind, conn.addr, conn.port);
        match (&conn.kind, why) {
            (_, Closed::Eof) => debug!(?kind, %addr, "connection closed"),
            (Kind::Node(_), Closed::Io(_)) => debug!(?kind, %addr, "peer link down: {why}"),
            (_, Closed::Io(_)) if conn.dialed.is_some() => {
                debug!(peer = conn.dialed, %addr, "cannot reach peer: {why}");
            }
            _ => warn!(?kind, ?port, %addr, "closing connection: {why}"),
        }
        if let Kind::Client(client) = conn.kind {
            self.clients.remove(&client);
            let answered: Vec<_> = self
                .started
                .range((client, 0)..=(client, RequestId::MAX))
                .map(|(k, _)| *k)
                .collect();
            for key in answered {
                self.started.remove(&key);
            }
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

    /// Hands the node's outputs to the queue store, the storage thread and the sockets. A
    /// queue store that cannot write stops the node: its index would claim messages its store
    /// does not hold.
    /// Gives every broker group the node created at runtime its directory and store, before
    /// any write of it goes to the storage thread (as the start does for the configured ones).
    fn open_new_groups(&mut self) -> Result<(), ServerError> {
        while let Some((group, voters)) = self.node.poll_new_group() {
            if self.opened.contains(&group) {
                continue;
            }
            let (store, disk, damage) =
                GroupStore::open_repairing(&self.data_dir, group, &StorageConfig::default())
                    .map_err(|e| {
                        ServerError(format!("group {group}: cannot create its data: {e}"))
                    })?;
            if damage.is_some() || !disk.entries.is_empty() || disk.snapshot.is_some() {
                // The node started this replica empty: a directory with data it did not read
                // at start would be overwritten, so stop rather than guess.
                return Err(ServerError(format!(
                    "group {group}: its directory holds data the node did not start from; \
                     restart the node to recover it"
                )));
            }
            self.identity.group_created(group).map_err(ServerError)?;
            self.storage.add_store(group, store);
            self.opened.insert(group);
            info!(group, ?voters, "broker group added: replica created");
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), ServerError> {
        self.open_new_groups()?;
        {
            let mut store = self
                .queue_store
                .lock()
                .map_err(|_| ServerError("the queue store is poisoned".into()))?;
            let now = self.clock.now();
            // Operations before the reads and snapshots that need them; an answered read may
            // bring more (a pull answered settles the node), so round again.
            loop {
                while let Some((group, op)) = self.node.poll_store() {
                    if let StoreOp::CatchUp { from, queues } = op {
                        let missing = store.catch_up_plan(group, &queues).map_err(|e| {
                            error!(group, "queue store failed, stopping this node: {e}");
                            ServerError(format!("group {group}: queue store failed: {e}"))
                        })?;
                        let peers: Vec<NodeId> = self
                            .nodes
                            .iter()
                            .copied()
                            .filter(|n| *n != self.id)
                            .collect();
                        let started = std::time::Instant::now();
                        self.catch_ups.start(started, group, from, &peers, missing);
                        continue;
                    }
                    if self.catch_ups.holds(group) {
                        self.catch_ups.hold_op(group, op);
                        self.catch_ups.pause_if_full(&mut self.node, now, group);
                        continue;
                    }
                    if let StoreOp::Recover { queues } = &op {
                        // Files the snapshot on disk references are damaged or gone: fetch
                        // them from peers (the group's writes wait meanwhile), instead of
                        // refusing to start.
                        match store.apply(group, op.clone()) {
                            Ok(()) => continue,
                            Err(e) if !store.failed() && e.contains("the queue store lacks") => {
                                warn!(group, "repairing the queue store from peers: {e}");
                                let missing = store.catch_up_plan(group, queues).map_err(|e| {
                                    error!(group, "queue store failed, stopping this node: {e}");
                                    ServerError(format!("group {group}: queue store failed: {e}"))
                                })?;
                                let peers: Vec<NodeId> = self
                                    .nodes
                                    .iter()
                                    .copied()
                                    .filter(|n| *n != self.id)
                                    .collect();
                                if let Some(first) = peers.first().copied() {
                                    let started = std::time::Instant::now();
                                    self.catch_ups.start(started, group, first, &peers, missing);
                                    continue;
                                }
                                return Err(ServerError(format!(
                                    "group {group}: queue store failed: {e}"
                                )));
                            }
                            Err(e) => {
                                error!(group, "queue store failed, stopping this node: {e}");
                                return Err(ServerError(format!(
                                    "group {group}: queue store failed: {e}"
                                )));
                            }
                        }
                    }
                    store.apply(group, op).map_err(|e| {
                        error!(group, "queue store failed, stopping this node: {e}");
                        ServerError(format!("group {group}: queue store failed: {e}"))
                    })?;
                }
                if self.node.replaying() {
                    // The log recovered at the start applies a step at a time, each step's
                    // store writes carried out before the next.
                    self.node.replay(now);
                    continue;
                }
                let Some(read) = self.node.poll_read() else {
                    break;
                };
                let (records, error) = store.read(read.group, &read.queue, &read.offsets);
                self.node.read_done(now, read.id, records, error);
            }
            while let Some(job) = self.node.poll_snapshot_job() {
                self.snapshot_started
                    .insert(job.group, std::time::Instant::now());
                self.snapshots.submit(job);
            }
            let actions = self
                .catch_ups
                .poll(std::time::Instant::now(), &mut store)
                .map_err(|e| {
                    error!("queue store failed while catching up, stopping this node: {e}");
                    ServerError(format!("queue store failed: {e}"))
                })?;
            drop(store);
            for action in actions {
                match action {
                    Action::Send(to, frame) => self.send_to_peer(to, &frame),
                    Action::Sync(group, plan) => {
                        if let Some(result) = self.snapshots.submit_sync(group, plan) {
                            self.caught_up(group, result)?;
                        }
                    }
                }
            }
            let mut store = self
                .queue_store
                .lock()
                .map_err(|_| ServerError("the queue store is poisoned".into()))?;
            store.flush().map_err(|e| {
                error!("queue store failed, stopping this node: {e}");
                ServerError(format!("queue store failed: {e}"))
            })?;
        }
        while let Some((group, write)) = self.node.poll_write() {
            if self.catch_ups.holds(group) {
                self.catch_ups.hold_write(group, write);
                let now = self.clock.now();
                self.catch_ups.pause_if_full(&mut self.node, now, group);
            } else {
                self.storage.submit(group, write);
            }
        }
        while let Some(envelope) = self.node.poll_message() {
            self.send_peer(envelope);
        }
        while let Some((client, id, response)) = self.node.poll_response() {
            if let Some((at, kind)) = self.started.remove(&(client, id)) {
                self.metrics
                    .shell
                    .request_seconds
                    .get_or_create(&KindLabel { kind })
                    .observe(at.elapsed().as_secs_f64());
            }
            let Some(token) = self.clients.get(&client).copied() else {
                continue; // the client left; it will retry elsewhere
            };
            if let Some(conn) = self.conns.get_mut(&token) {
                conn.requests_pending = conn.requests_pending.saturating_sub(1);
            }
            let frame = Frame::Response { id, response };
            self.queue(token, &frame);
        }
        while let Some(event) = self.node.poll_event() {
            log_event(event, &mut self.warnings);
        }
        let pending: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.wants_flush())
            .map(|(t, _)| *t)
            .collect();
        for token in pending {
            if let Some(conn) = self.conns.get_mut(&token)
                && let Err(why) = conn.flush()
            {
                self.close(token, &why);
            }
        }
        Ok(())
    }

    /// A peer asks for records of this node's store; read on the snapshot thread, answered
    /// from there ([`Done::Fetched`]).
    fn serve_fetch(&mut self, peer: NodeId, fetch: Fetch) {
        let pending = self.fetches_pending.entry(peer).or_default();
        if *pending >= FETCHES_PENDING_PER_PEER_MAX {
            let frame = Frame::Fetched {
                id: fetch.id,
                group: fetch.group,
                queue: fetch.queue,
                from: fetch.from,
                records: Err(format!(
                    "{FETCHES_PENDING_PER_PEER_MAX} fetches of this node are being served \
                     (FETCHES_PENDING_PER_PEER_MAX)"
                )),
            };
            self.send_to_peer(peer, &frame);
            return;
        }
        *pending += 1;
        self.snapshots.submit_fetch(fetch);
    }

    /// A catch-up's sync ended: its held writes go to the storage thread, or the node stops.
    fn caught_up(&mut self, group: GroupId, result: Result<(), String>) -> Result<(), ServerError> {
        let released = self
            .catch_ups
            .synced(std::time::Instant::now(), group, result)
            .map_err(|e| {
                error!(
                    group,
                    "cannot sync what a catch-up fetched, stopping this node: {e}"
                );
                ServerError(format!("group {group}: queue store sync failed: {e}"))
            })?;
        let Some(released) = released else {
            return Ok(());
        };
        for write in released {
            self.storage.submit(group, write);
        }
        if self.node.paused(group) {
            info!(group, "caught up: the group takes input again");
            self.node.resume(self.clock.now(), group);
        }
        Ok(())
    }

    /// Sends `frame` over the link this node dialed to `to`; without one it is dropped (the
    /// catch-up asks again).
    fn send_to_peer(&mut self, to: NodeId, frame: &Frame) {
        if let Some(token) = self.links.get(&to).and_then(|l| l.token) {
            self.queue(token, frame);
        }
    }

    fn send_peer(&mut self, envelope: Envelope) {
        if let holdfast_core::raft::Message::Append { entries, .. } = &envelope.message
            && !entries.is_empty()
        {
            let shell = &self.metrics.shell;
            shell.append_entries.observe(entries.len() as f64);
            let bytes: usize = entries.iter().map(|e| e.command_bytes()).sum();
            shell.append_bytes.observe(bytes as f64);
        }
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

/// Raises the soft limit of open files towards the hard one, so `CONNECTIONS_MAX` (and not a
/// default of 1,024 descriptors) is what bounds connections: at the descriptor limit, accept
/// fails and connections wait in the backlog unanswered.
fn raise_open_files_limit() {
    let wanted = (CONNECTIONS_MAX + 1_024) as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur >= wanted {
            return;
        }
        limit.rlim_cur = wanted.min(limit.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            warn!("cannot raise the open files limit to {}", limit.rlim_cur);
        }
    }
    if limit.rlim_cur < wanted {
        warn!(
            open_files_max = limit.rlim_cur,
            "the open files limit is below CONNECTIONS_MAX ({CONNECTIONS_MAX}) plus the node's own files"
        );
    }
}

/// Elections and leader changes at INFO, refusals at WARN, so a storm or an attack shows.
fn log_event(event: NodeEvent, warnings: &mut WarnBudget) {
    match event {
        NodeEvent::BecameLeader { group, term } => info!(group, term, "became leader"),
        NodeEvent::SteppedDown { group, term } => info!(group, term, "stepped down"),
        NodeEvent::LeaderChanged {
            group,
            term,
            leader,
        } => info!(group, term, leader, "leader changed"),
        NodeEvent::MessageRefused { group, from, why } => {
            if warnings.allow(std::time::Instant::now()) {
                warn!(group, from, %why, "refused a peer message")
            }
        }
        NodeEvent::RequestRefused { client, why } => {
            if warnings.allow(std::time::Instant::now()) {
                warn!(client, %why, "refused a request")
            }
        }
        NodeEvent::TransferAborted { group, term, to } => {
            warn!(group, term, to, "gave up handing leadership over")
        }
        NodeEvent::StoreReadFailed {
            group,
            queue,
            offset,
            why,
        } => error!(group, %queue, offset, %why, "a stored message does not read back"),
        NodeEvent::TransferFailed { group, index, why } => {
            warn!(group, index, %why, "cannot make a snapshot's transfer image for a follower")
        }
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "Hello",
        Frame::Peer(_) => "Peer",
        Frame::Request { .. } => "Request",
        Frame::Response { .. } => "Response",
        Frame::Goodbye { .. } => "Goodbye",
        Frame::Fetch { .. } => "Fetch",
        Frame::Fetched { .. } => "Fetched",
    }
}
