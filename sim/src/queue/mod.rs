//! The queue workload: whole broker nodes (the metadata group and every broker group), real
//! producers and consumer groups, and the same faults and Raft checks as the Raft workload,
//! plus the queue's own checks over the history of what clients saw.
//!
//! Clients sit outside the cluster: their messages are delayed, lost and duplicated like any
//! other, but partitions cut only links between nodes.

mod clients;
mod history;
mod ownership;

use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use holdfast_core::broker::{
    BrokerConfig, BrokerState, MemoryStore, Offset, QueueId, StoredMessage,
};
use holdfast_core::node::protocol::{ClientId, Request, RequestId, Response};
use holdfast_core::node::{BrokerNode, METADATA_GROUP, NodeConfig};
use holdfast_core::raft::{Envelope, GroupId, Index, Message, NodeId, Recovered, WriteId};
use holdfast_core::time::Instant;
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::{Checker, Violation, violation};
use crate::disk::Disk;
use crate::faults::{self, NodeFault};
use crate::network::Network;
use crate::options::Options;
use crate::raft_checks::{
    ReplicaView, check_applied, check_recovery, check_restored, check_status, check_write, log_view,
};
use crate::trace::Trace;
use crate::world::{Outcome, Stats};
use clients::Clients;
use history::History;

const EVENTS_MAX: u64 = 20_000_000;
const CHECK_INTERVAL_MS: u64 = 50;
/// Consumer session and queue lease timeout: short, so that crashed members' queues move
/// within a run.
const MEMBER_SESSION_MS: u64 = 2_000;
pub(crate) const TOPIC: &str = "orders";
pub(crate) const CONSUMER_GROUPS: [&str; 2] = ["billing", "audit"];

pub fn run(options: &Options) -> Outcome {
    let mut world = QueueWorld::new(options.clone());
    let result = world.run();
    for broker in world.hosts.iter().filter_map(|h| h.broker.as_ref()) {
        world.stats.coverage.add_node(&broker.stats());
    }
    world.stats.simulated_us = world.now.as_micros();
    world.stats.faults_drawn = world.faults_drawn;
    let (acked, failed, ambiguous, _) = world.history.counts();
    world.stats.messages_acked = acked;
    world.stats.messages_failed = failed;
    world.stats.messages_ambiguous = ambiguous;
    world.stats.deliveries = world.history.deliveries() as u64;
    world.stats.redeliveries = world.history.redeliveries_by_cause.values().sum();
    world.stats.redeliveries_by_cause = world.history.redeliveries_by_cause.clone();
    world.stats.dead_lettered = world.history.dead_lettered;
    world.stats.entries_committed = (0..=world.broker_groups)
        .map(|g| world.checker.committed(g))
        .sum();
    let violation = result.err().map(|v| (world.now, v));
    if let Some((at, v)) = &violation {
        let (checker, detail) = (v.checker, v.detail.clone());
        world.trace.record(*at, &[u64::MAX], || {
            format!("VIOLATION {checker}: {detail}")
        });
    }
    Outcome {
        seed: options.seed,
        violation,
        stats: world.stats,
        trace_hash: world.trace.hash(),
        trace: world.trace.into_lines(),
    }
}

pub(crate) enum Event {
    Peer(Envelope),
    Request {
        node: NodeId,
        client: ClientId,
        id: RequestId,
        request: Request,
    },
    Response {
        client: ClientId,
        id: RequestId,
        response: Response,
    },
    NodeTimer {
        node: NodeId,
        at: Instant,
    },
    ClientTimer {
        client: ClientId,
        at: Instant,
    },
    Synced {
        node: NodeId,
        group: GroupId,
        incarnation: u64,
        upto: WriteId,
    },
    /// A snapshot the node handed out to encode comes back (the shell encodes on a thread of
    /// its own, so entries go on being applied, and snapshots installed, meanwhile).
    SnapshotEncoded {
        node: NodeId,
        incarnation: u64,
        group: GroupId,
        index: holdfast_core::raft::Index,
        data: bytes::Bytes,
    },
    Produce {
        producer: usize,
    },
    Admin,
    Fault,
    Restart {
        node: NodeId,
    },
    RestartConsumer {
        slot: usize,
    },
    /// A slow consumer answers a delivery.
    Answer {
        slot: usize,
        generation: u32,
        delivery: Box<holdfast_core::client::Delivery>,
        status: holdfast_core::client::AckStatus,
    },
    Heal,
    Check,
}

impl Event {
    fn node(&self) -> Option<NodeId> {
        match self {
            Event::Peer(envelope) => Some(envelope.to),
            Event::Request { node, .. }
            | Event::NodeTimer { node, .. }
            | Event::Synced { node, .. }
            | Event::SnapshotEncoded { node, .. } => Some(*node),
            _ => None,
        }
    }
}

struct Scheduled {
    at: Instant,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Host {
    up: bool,
    incarnation: u64,
    paused_until: Instant,
    fsync_us: (u64, u64),
    broker: Option<BrokerNode>,
    disks: BTreeMap<GroupId, Disk>,
    views: BTreeMap<GroupId, ReplicaView>,
    timer_at: Instant,
    /// The next fsync fails (I/O error or disk full): the node stops instead.
    fail_sync: bool,
    /// The node's queue store: message bytes, outside the state machine.
    store: MemoryStore,
    /// What of `store` a crash leaves: a copy taken at each sync, which the node makes before
    /// a broker group's (metadata-only) snapshot is handed over to be written.
    durable_store: MemoryStore,
}

/// A replica's applied state with its queue store: what the checkers read messages from.
pub(crate) struct StateView<'a> {
    state: &'a BrokerState,
    group: GroupId,
    store: &'a MemoryStore,
}

impl StateView<'_> {
    /// The retained message at `(queue, offset)`, from the store (checked).
    pub(crate) fn message(&self, queue: &QueueId, offset: Offset) -> Option<StoredMessage> {
        if !self.state.retains(queue, offset) {
            return None;
        }
        self.store.message(self.group, queue, offset)
    }
}

impl std::ops::Deref for StateView<'_> {
    type Target = BrokerState;
    fn deref(&self) -> &BrokerState {
        self.state
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Faults,
    Liveness,
}

pub(crate) struct QueueWorld {
    options: Options,
    pub(crate) rng: ChaCha8Rng,
    /// Fault decisions, when a script chooses them; else `rng` does.
    fault_script: Option<crate::faults::FaultScript>,
    /// What this seed explores (its fault mix, pipelining, batch size), and how many faults
    /// were drawn so far.
    swarm: crate::swarm::Swarm,
    faults_drawn: u64,
    pub(crate) now: Instant,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    pub(crate) node_ids: Vec<NodeId>,
    hosts: Vec<Host>,
    broker_groups: GroupId,
    network: Network,
    pub(crate) clients: Clients,
    pub(crate) history: History,
    pub(crate) ownership: ownership::Ownership,
    checker: Checker,
    pub(crate) trace: Trace,
    pub(crate) stats: Stats,
    pub(crate) phase: Phase,
    pub(crate) canary: Option<holdfast_core::raft::Canary>,
    heal_at: Instant,
    deadline: Instant,
    /// Drawn per seed: when nodes compact (`None`: never) and the snapshot chunk size.
    snapshot_entries_min: Option<u64>,
    snapshot_chunk_bytes_max: usize,
}

pub(crate) fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn us(us: u64) -> Duration {
    Duration::from_micros(us)
}

/// Redelivery delays short enough that retries come back within a run.
pub(crate) fn broker_config() -> BrokerConfig {
    BrokerConfig {
        reconsume_delays_ms: vec![100, 300, 1_000],
        max_reconsume: 3,
        // Retention deletes messages the checkers expect every consumer group to receive.
        retention_ms: None,
        retention_bytes: None,
        cache_bytes_max: holdfast_core::broker::CACHE_BYTES_DEFAULT,
        canary: None,
    }
}

/// SplitMix64's finaliser: decisions taken from a seed without drawing from the run's RNG.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1330_11eb);
    z ^ (z >> 31)
}

/// The message cache of a seed's nodes: none (every pull reads the queue store), a few
/// messages, or all of them. From the seed, not drawn, so that seeds keep their runs.
fn cache_bytes_max(seed: u64) -> u64 {
    [0, 300, 4_096, holdfast_core::broker::CACHE_BYTES_DEFAULT][(seed / 7 % 4) as usize]
}

impl QueueWorld {
    fn new(options: Options) -> QueueWorld {
        let node_ids: Vec<NodeId> = (1..=options.nodes as NodeId).collect();
        let heal_at = Instant::ZERO + ms(options.fault_phase_ms);
        let deadline = heal_at + ms(options.liveness_limit_ms);
        let broker_groups = options.groups.max(2) as GroupId;
        QueueWorld {
            rng: ChaCha8Rng::seed_from_u64(options.seed),
            fault_script: crate::world::fault_source(&options),
            swarm: options.swarm(),
            faults_drawn: 0,
            now: Instant::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            hosts: node_ids.iter().map(|_| Host::default()).collect(),
            clients: Clients::new(&node_ids, broker_groups),
            node_ids,
            broker_groups,
            network: Network::calm(),
            history: History::default(),
            ownership: ownership::Ownership::new(MEMBER_SESSION_MS),
            checker: Checker::default(),
            trace: Trace::new(options.trace),
            stats: Stats::default(),
            phase: Phase::Faults,
            canary: options.canary,
            heal_at,
            deadline,
            snapshot_entries_min: None,
            snapshot_chunk_bytes_max: 1 << 20,
            options,
        }
    }

    pub(crate) fn schedule(&mut self, at: Instant, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    fn groups(&self) -> impl Iterator<Item = GroupId> + use<> {
        0..=self.broker_groups
    }

    fn run(&mut self) -> Result<(), Violation> {
        // A fifth of the seeds never compact; the rest do often, so snapshots are installed on
        // followers that fell behind and restored on restart, in several chunks in some seeds.
        self.snapshot_entries_min =
            [None, Some(5), Some(20), Some(60), Some(200)][self.rng.random_range(0..5)];
        self.snapshot_chunk_bytes_max = [64, 1024, 1 << 20][self.rng.random_range(0..3)];
        let (every, chunk) = (self.snapshot_entries_min, self.snapshot_chunk_bytes_max);
        self.trace
            .record(self.now, &[0, every.unwrap_or(0), chunk as u64], || {
                format!("config snapshot_entries_min={every:?} snapshot_chunk_bytes_max={chunk}")
            });
        if !self.swarm.legacy {
            let mix = self.swarm.mix.to_string();
            let (pipeline, batch) = (self.swarm.pipeline, self.swarm.append_entries_max);
            self.clients.pipeline = pipeline;
            let fields = [0, self.swarm.mix.total() as u64, pipeline as u64];
            self.trace.record(self.now, &fields, || {
                format!("swarm faults={mix} pipeline={pipeline} append_entries_max={batch:?}")
            });
        }
        for node in self.node_ids.clone() {
            let host = self.host_mut(node);
            host.fsync_us = faults::FSYNC_US;
            self.start(node)?;
        }
        self.schedule(self.now + ms(300), Event::Admin);
        let first_fault = self.now + ms(self.rng.random_range(100..1_000));
        self.schedule(first_fault, Event::Fault);
        self.schedule(self.heal_at, Event::Heal);
        self.schedule(self.now + ms(CHECK_INTERVAL_MS), Event::Check);

        while let Some(Scheduled { at, event, .. }) = self.queue.pop() {
            self.stats.events += 1;
            if self.stats.events > EVENTS_MAX {
                return Err(violation(
                    "liveness",
                    format!("no convergence within {EVENTS_MAX} events"),
                ));
            }
            self.now = at;
            if let Some(node) = event.node() {
                let paused_until = self.host(node).paused_until;
                if self.now < paused_until {
                    self.schedule(paused_until, event);
                    continue;
                }
            }
            if self.dispatch(event)? {
                return self.final_check();
            }
        }
        Err(violation("liveness", "the event queue ran dry".into()))
    }

    /// Handles one event; true when the run is over.
    fn dispatch(&mut self, event: Event) -> Result<bool, Violation> {
        let now = self.now;
        match event {
            Event::Peer(envelope) => {
                let to = envelope.to;
                let Some(broker) = self.live_broker(to) else {
                    self.stats.messages_lost += 1;
                    return Ok(false);
                };
                broker.handle_peer(now, envelope);
                self.stats.messages_delivered += 1;
                self.drain(to)?;
            }
            Event::Request {
                node,
                client,
                id,
                request,
            } => {
                let Some(broker) = self.live_broker(node) else {
                    return Ok(false);
                };
                broker.handle_request(now, client, id, request);
                self.drain(node)?;
            }
            Event::Response {
                client,
                id,
                response,
            } => self.client_response(client, id, response)?,
            Event::NodeTimer { node, at } => {
                if self.host(node).timer_at != at {
                    return Ok(false);
                }
                let Some(broker) = self.live_broker(node) else {
                    return Ok(false);
                };
                broker.handle_timeout(now);
                self.drain(node)?;
            }
            Event::ClientTimer { client, at } => self.client_timer(client, at)?,
            Event::Synced {
                node,
                group,
                incarnation,
                upto,
            } => {
                if self.host(node).incarnation != incarnation {
                    return Ok(false);
                }
                self.synced(node, group, upto)?;
            }
            Event::SnapshotEncoded {
                node,
                incarnation,
                group,
                index,
                data,
            } => {
                if self.host(node).incarnation != incarnation {
                    return Ok(false);
                }
                let Some(broker) = self.live_broker(node) else {
                    return Ok(false);
                };
                broker.snapshot_encoded(now, group, index, data);
                self.drain(node)?;
            }
            Event::Produce { producer } => self.produce(producer)?,
            Event::Admin => self.admin()?,
            Event::Fault => self.fault()?,
            Event::Restart { node } => {
                if !self.host(node).up {
                    self.start(node)?;
                }
            }
            Event::RestartConsumer { slot } => self.restart_consumer(slot)?,
            Event::Answer {
                slot,
                generation,
                delivery,
                status,
            } => self.answer_later(slot, generation, &delivery, status)?,
            Event::Heal => self.heal()?,
            Event::Check => return self.check(),
        }
        Ok(false)
    }

    fn host(&self, node: NodeId) -> &Host {
        &self.hosts[(node - 1) as usize]
    }

    fn host_mut(&mut self, node: NodeId) -> &mut Host {
        &mut self.hosts[(node - 1) as usize]
    }

    /// The applied state of broker group `group` on every running node.
    pub(crate) fn broker_states(&self, group: GroupId) -> Vec<(NodeId, StateView<'_>)> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.up)
            .filter_map(|(i, h)| {
                let state = h.broker.as_ref()?.broker_state(group)?;
                let view = StateView {
                    state,
                    group,
                    store: &h.store,
                };
                Some((i as NodeId + 1, view))
            })
            .collect()
    }

    fn live_broker(&mut self, node: NodeId) -> Option<&mut BrokerNode> {
        let host = self.host_mut(node);
        if !host.up {
            return None;
        }
        host.broker.as_mut()
    }

    // ----- nodes -----

    fn start(&mut self, node: NodeId) -> Result<(), Violation> {
        let mut config = NodeConfig::new(node, self.node_ids.clone(), self.broker_groups);
        config.broker = broker_config();
        config.broker.cache_bytes_max = cache_bytes_max(self.options.seed);
        config.member_session_ms = MEMBER_SESSION_MS;
        config.record_applied = true;
        config.canary = self.options.canary;
        config.snapshot_entries_min = self.snapshot_entries_min;
        config.raft.snapshot_chunk_bytes_max = self.snapshot_chunk_bytes_max;
        if let Some(batch) = self.swarm.append_entries_max {
            config.raft.append_entries_max = batch;
        }
        let seed = self.rng.next_u64();
        let now = self.now;
        let groups: Vec<GroupId> = self.groups().collect();
        let canary = self.options.canary;
        let index = (node - 1) as usize;
        let mut recovered: BTreeMap<GroupId, Recovered> = BTreeMap::new();
        for group in &groups {
            let disk = self.hosts[index].disks.entry(*group).or_default();
            let recovery = disk.recover(canary);
            let upto = recovery.commit.min(recovery.last_index);
            self.checker.committed_bytes(*group, node, disk, upto)?;
            if let Some(problem) = recovery.problem {
                return Err(violation(
                    "recovery",
                    format!("group {group} node {node}: {problem}"),
                ));
            }
            if let Some(snapshot) = &recovery.recovered.snapshot {
                self.checker.snapshot(*group, node, snapshot, "recovered")?;
            }
            if let Some(damage) = recovery.damage {
                config.raft.damaged.insert(*group, damage);
                self.stats.damaged_starts += 1;
                self.trace.record(now, &[2, node, *group, damage.from], || {
                    format!("n{node} g{group} starts damaged: {damage:?}")
                });
            }
            recovered.insert(*group, recovery.recovered);
        }
        let host = self.host_mut(node);
        let broker = BrokerNode::new(config, recovered, seed, now);
        host.views.clear();
        for group in &groups {
            let Some(replica) = broker.replica(*group) else {
                continue;
            };
            let status = replica.status();
            let disk = host.disks.entry(*group).or_default();
            check_recovery(node, *group, &status, disk)?;
            host.views.insert(*group, ReplicaView::new(&status));
        }
        host.broker = Some(broker);
        host.up = true;
        host.timer_at = Instant::ZERO;
        self.trace
            .record(now, &[2, node], || format!("n{node} start"));
        self.drain(node)
    }

    fn crash(&mut self, node: NodeId) -> Result<(), Violation> {
        self.crash_tearing(node, None)
    }

    /// A crash; `tear = Some((group, k))` makes that group's disk land its first `k` unsynced
    /// writes and tear the next (else each group's disk draws its own fate).
    fn crash_tearing(
        &mut self,
        node: NodeId,
        tear: Option<(GroupId, usize)>,
    ) -> Result<(), Violation> {
        let groups: Vec<GroupId> = self.groups().collect();
        let mut torn = false;
        let canary = self.options.canary;
        for group in groups {
            let unsynced = self
                .host(node)
                .disks
                .get(&group)
                .map_or(0, |d| d.unsynced.len());
            let survivors = match tear {
                Some((g, k)) if g == group => {
                    torn = true;
                    Some(k)
                }
                _ if unsynced > 0 && self.rng.random_bool(0.5) => {
                    torn = true;
                    Some(self.rng.random_range(0..unsynced))
                }
                _ => None,
            };
            let QueueWorld { hosts, rng, .. } = self;
            if let Some(disk) = hosts[(node - 1) as usize].disks.get_mut(&group) {
                disk.crash(survivors, rng, canary)?;
            }
        }
        let QueueWorld { hosts, stats, .. } = self;
        let host = &mut hosts[(node - 1) as usize];
        if let Some(broker) = host.broker.take() {
            stats.coverage.add_node(&broker.stats());
        }
        host.up = false;
        host.fail_sync = false;
        host.store = host.durable_store.clone();
        host.incarnation += 1;
        host.paused_until = Instant::ZERO;
        if torn {
            *self.stats.faults.entry("torn-write").or_default() += 1;
        }
        let restart_at = self.now + faults::downtime(&mut self.rng);
        self.schedule(restart_at, Event::Restart { node });
        self.trace
            .record(self.now, &[3, node], || format!("n{node} CRASH"));
        Ok(())
    }

    /// Collects a node's outputs after an input, checking every replica on the way.
    fn drain(&mut self, node: NodeId) -> Result<(), Violation> {
        let index = (node - 1) as usize;
        let mut host = std::mem::take(&mut self.hosts[index]);
        let result = self.drain_host(node, &mut host);
        self.hosts[index] = host;
        result?;
        self.check_leases(node)
    }

    /// read-lease, for every group `node` may have just taken a lease of.
    fn check_leases(&self, node: NodeId) -> Result<(), Violation> {
        for group in self.groups() {
            let replicas = self.node_ids.iter().zip(&self.hosts).filter(|(_, h)| h.up);
            let replicas =
                replicas.filter_map(|(n, h)| Some((*n, h.broker.as_ref()?.replica(group)?)));
            crate::raft_checks::check_lease(group, node, self.now, replicas)?;
        }
        Ok(())
    }

    fn drain_host(&mut self, node: NodeId, host: &mut Host) -> Result<(), Violation> {
        let now = self.now;
        let Some(broker) = host.broker.as_mut() else {
            return Ok(());
        };
        for (group, disk) in &mut host.disks {
            let damaged_from = broker.replica(*group).and_then(|r| r.damaged_from());
            if disk.note_repair(damaged_from) {
                self.stats.repairs += 1;
                let group = *group;
                self.trace.record(now, &[14, node, group], || {
                    format!("n{node} g{group} REPAIRED")
                });
            }
        }
        if let Some(fault) = broker.poll_fault() {
            return Err(violation(
                "snapshot-agreement",
                format!("node {node}: {fault}"),
            ));
        }
        // Store operations before the reads and snapshots that need them; a read's pull may
        // answer at once, so round again until nothing is left.
        loop {
            // A transfer image reads the store as it is; answering it may apply entries,
            // whose store operations then go before anything that needs them.
            while let Some(job) = broker.poll_transfer_job() {
                let store = &host.store;
                let image = job.encode(&mut |queue, offset| {
                    store
                        .message(job.group, queue, offset)
                        .ok_or_else(|| format!("{queue}@{offset} is not in the store"))
                });
                broker.transfer_encoded(now, job.group, job.index, image.map(bytes::Bytes::from));
            }
            while let Some((group, op)) = broker.poll_store() {
                host.store.apply(group, op).map_err(|why| {
                    violation("queue-store", format!("node {node} group {group}: {why}"))
                })?;
            }
            let Some(read) = broker.poll_read() else {
                break;
            };
            let (mut records, mut error) = host.store.read(read.group, &read.queue, &read.offsets);
            // On the seeds without a cache (every pull reads), in the safety phase. From the
            // seed, not drawn, so that a seed's other faults stay as they were, and not on the
            // other seeds, whose runs (and recorded regressions) stay as they were too.
            if self.phase == Phase::Faults && cache_bytes_max(self.options.seed) == 0 {
                let roll = mix(self.options.seed ^ mix(node ^ mix(read.id)));
                match roll % 25 {
                    // A bit flipped between the platter and the node: the record's checksum
                    // must refuse it.
                    0 if !records.is_empty() => {
                        let mut record = records[0].to_vec();
                        let at = 16 + (roll >> 8) as usize % record.len().saturating_sub(16).max(1);
                        if let Some(byte) = record.get_mut(at) {
                            *byte ^= 1 << ((roll >> 40) % 8);
                        }
                        records[0] = bytes::Bytes::from(record);
                        *self.stats.faults.entry("read-flip").or_default() += 1;
                    }
                    1 => {
                        records.truncate(((roll >> 8) as usize) % (records.len() + 1));
                        error = Some("read failed: Input/output error (injected)".into());
                        *self.stats.faults.entry("read-error").or_default() += 1;
                    }
                    _ => {}
                }
            }
            broker.read_done(now, read.id, records, error);
        }
        while let Some(job) = broker.poll_snapshot_job() {
            let at = now + Duration::from_micros(self.rng.random_range(0..20_000));
            // The snapshot refers to the store: what it references is synced first.
            if job.needs_store()
                && !holdfast_core::raft::Canary::SnapshotBeforeStoreSync
                    .planted(self.options.canary)
            {
                host.durable_store = host.store.clone();
            }
            let encoded = job.encode();
            let data = match encoded {
                Ok(data) => bytes::Bytes::from(data),
                Err(why) => {
                    return Err(violation(
                        "queue-store",
                        format!("node {node} cannot snapshot group {}: {why}", job.group),
                    ));
                }
            };
            let event = Event::SnapshotEncoded {
                node,
                incarnation: host.incarnation,
                group: job.group,
                index: job.index,
                data,
            };
            self.schedule(at, event);
        }
        while let Some((group, write)) = broker.poll_write() {
            let (Some(view), Some(replica)) = (host.views.get(&group), broker.replica(group))
            else {
                continue;
            };
            check_write(&mut self.checker, node, group, view, replica, &write)?;
            let (id, count) = (write.id, write.entries.len() as u64);
            let snapshot = write.snapshot.as_ref().map_or(0, |s| s.index);
            let discard = write.discard_log;
            self.trace.record(
                now,
                &[4, node, group, id, count, snapshot, discard as u64],
                || {
                    format!(
                        "n{node} g{group} write #{id} entries={count} snapshot={snapshot} \
                         discard_log={discard}"
                    )
                },
            );
            host.disks
                .entry(group)
                .or_default()
                .unsynced
                .push_back(write);
        }
        for (group, disk) in &mut host.disks {
            if disk.syncing {
                continue;
            }
            let Some(last) = disk.unsynced.back() else {
                continue;
            };
            disk.syncing = true;
            let (lo, hi) = host.fsync_us;
            let at = now + us(self.rng.random_range(lo..hi));
            let event = Event::Synced {
                node,
                group: *group,
                incarnation: host.incarnation,
                upto: last.id,
            };
            self.seq += 1;
            self.queue.push(Scheduled {
                at,
                seq: self.seq,
                event,
            });
        }
        let mut outbox = Vec::new();
        while let Some(envelope) = broker.poll_message() {
            if let Some(disk) = host.disks.get(&envelope.group) {
                Checker::sent(&envelope, disk)?;
            }
            outbox.push(envelope);
        }
        while let Some((group, entry)) = broker.poll_applied() {
            let (Some(replica), Some(view)) = (broker.replica(group), host.views.get_mut(&group))
            else {
                continue;
            };
            if entry.index > view.applied + 1 {
                // Only an installed snapshot at the entry before may explain a jump (the node
                // restores from it inside the step; the replica still holds it, since a
                // compaction needs entries applied after the restore, so a later step).
                if let Some(snapshot) = replica.snapshot().filter(|s| s.index + 1 == entry.index) {
                    check_restored(&mut self.checker, node, group, view, snapshot)?;
                    view.snapshot = snapshot.index;
                    self.stats.snapshots_installed += 1;
                }
            }
            let term = replica.status().term;
            check_applied(&mut self.checker, node, group, view, term, &entry)?;
        }
        for (group, view) in &mut host.views {
            let Some(replica) = broker.replica(*group) else {
                continue;
            };
            let status = replica.status();
            if status.applied_index > view.applied {
                // Applied moved with no entry to show for it: a restore, and nothing after.
                let snapshot = replica
                    .snapshot()
                    .filter(|s| s.index == status.applied_index);
                let Some(snapshot) = snapshot else {
                    return Err(violation(
                        "committed-prefix",
                        format!(
                            "group {group} node {node} has applied {} but handed out entries up \
                             to {} only, and holds no snapshot there",
                            status.applied_index, view.applied
                        ),
                    ));
                };
                check_restored(&mut self.checker, node, *group, view, snapshot)?;
                view.snapshot = snapshot.index;
                self.stats.snapshots_installed += 1;
            }
            if status.snapshot_index > view.snapshot {
                // Not a restore (those are seen above): a compaction.
                self.stats.snapshots_taken += 1;
            }
        }
        let mut responses = Vec::new();
        while let Some(response) = broker.poll_response() {
            responses.push(response);
        }
        for group in 0..=self.broker_groups {
            let (Some(replica), Some(view), Some(disk)) = (
                broker.replica(group),
                host.views.get_mut(&group),
                host.disks.get(&group),
            ) else {
                continue;
            };
            let hosts = &self.hosts;
            let node_ids = &self.node_ids;
            let logs = |index: Index| {
                let mut logs = vec![(node, disk.view(index), Some(log_view(replica, index)))];
                for other in node_ids.iter().filter(|n| **n != node) {
                    let h = &hosts[(*other - 1) as usize];
                    let Some(d) = h.disks.get(&group) else {
                        continue;
                    };
                    let memory = h
                        .broker
                        .as_ref()
                        .and_then(|b| b.replica(group))
                        .map(|r| log_view(r, index));
                    logs.push((*other, d.view(index), memory));
                }
                logs
            };
            if check_status(&mut self.checker, node, group, view, replica, disk, &logs)? {
                self.stats.elections += 1;
                let term = view.term;
                self.trace.record(now, &[5, node, group, term], || {
                    format!("n{node} g{group} LEADER term={term}")
                });
            }
        }
        let timer = broker.poll_timeout().max(now + us(1));
        if timer != host.timer_at {
            host.timer_at = timer;
            self.schedule(timer, Event::NodeTimer { node, at: timer });
        }
        for envelope in outbox {
            self.transmit(envelope);
        }
        for (client, id, response) in responses {
            self.send_to_client(client, id, response);
        }
        Ok(())
    }

    fn synced(&mut self, node: NodeId, group: GroupId, upto: WriteId) -> Result<(), Violation> {
        let now = self.now;
        let canary = self.options.canary;
        let host = self.host_mut(node);
        if !host.up {
            return Ok(());
        }
        if host.fail_sync {
            // The fsync failed: the node stops, and nothing is reported synced.
            self.trace.record(now, &[6, node, group, 0], || {
                format!("n{node} g{group} FSYNC FAILED: node stops")
            });
            return self.crash(node);
        }
        let faults = self.phase == Phase::Faults;
        let QueueWorld {
            hosts,
            rng,
            stats,
            trace,
            ..
        } = self;
        let host = &mut hosts[(node - 1) as usize];
        let mut report = upto;
        if let Some(disk) = host.disks.get_mut(&group) {
            // A crash while a snapshot is being written, which chance alone almost never
            // brings (see the Raft world).
            if let Some((at, discard)) = disk.snapshot_write(upto)
                && faults
                && rng.random_bool(if discard { 0.25 } else { 0.02 })
            {
                *stats.faults.entry("snapshot-crash").or_default() += 1;
                trace.record(now, &[6, node, group, u64::MAX], || {
                    format!("n{node} g{group} CRASH while writing a snapshot")
                });
                return self.crash_tearing(node, Some((group, at)));
            }
            report = disk.sync(upto, rng, canary)?;
            disk.syncing = false;
        }
        if let Some(broker) = host.broker.as_mut() {
            broker.persisted(now, group, report);
        }
        self.drain(node)
    }

    // ----- network -----

    fn delay(&mut self) -> Duration {
        let (lo, hi) = (self.network.delay_min_us, self.network.delay_max_us);
        let delay = self.rng.random_range(lo..=hi);
        if self.rng.random_bool(0.02) {
            us(delay * 10)
        } else {
            us(delay)
        }
    }

    /// Whether the network loses a message (a partition too, for links between nodes), and
    /// otherwise how many copies arrive.
    fn copies(&mut self, link: Option<(NodeId, NodeId)>) -> usize {
        let blocked = link.is_some_and(|(from, to)| self.network.is_blocked(from, to));
        let lost = blocked
            || (self.network.loss_ppm > 0
                && self.rng.random_range(0..1_000_000) < self.network.loss_ppm);
        if lost {
            self.stats.messages_lost += 1;
            return 0;
        }
        let duplicated = self.network.duplicate_ppm > 0
            && self.rng.random_range(0..1_000_000) < self.network.duplicate_ppm;
        1 + usize::from(duplicated)
    }

    fn transmit(&mut self, envelope: Envelope) {
        if let Message::InstallSnapshot { .. } = envelope.message {
            self.stats.snapshot_chunks += 1;
        }
        for _ in 0..self.copies(Some((envelope.from, envelope.to))) {
            let at = self.now + self.delay();
            self.schedule(at, Event::Peer(envelope.clone()));
        }
        if self.network.late_ppm > 0 && self.rng.random_range(0..1_000_000) < self.network.late_ppm
        {
            let at = self.now + faults::late_delay(&mut self.rng);
            self.schedule(at, Event::Peer(envelope));
        }
    }

    pub(crate) fn send_to_node(
        &mut self,
        node: NodeId,
        client: ClientId,
        id: RequestId,
        request: Request,
    ) {
        for _ in 0..self.copies(None) {
            let at = self.now + self.delay();
            let event = Event::Request {
                node,
                client,
                id,
                request: request.clone(),
            };
            self.schedule(at, event);
        }
    }

    fn send_to_client(&mut self, client: ClientId, id: RequestId, response: Response) {
        for _ in 0..self.copies(None) {
            let at = self.now + self.delay();
            let event = Event::Response {
                client,
                id,
                response: response.clone(),
            };
            self.schedule(at, event);
        }
    }

    // ----- faults and phases -----

    fn fault(&mut self) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        let number = self.faults_drawn;
        self.faults_drawn += 1;
        let applies = self.options.applies_fault(number);
        // The fixed mix: one fault in eight takes a consumer down instead of a node or a link
        // (a swarm mix weighs consumer crashes with the rest).
        let kind = if self.swarm.legacy && self.rng.random_bool(0.125) {
            if !applies || !self.crash_consumer() {
                return self.next_fault();
            }
            "consumer-crash"
        } else {
            // A fault left out (`only_faults`) is drawn all the same, on a copy of the
            // network, so the faults after it stay what they were.
            let mut scratch = self.network.clone();
            let network = if applies {
                &mut self.network
            } else {
                &mut scratch
            };
            let mix = &self.swarm.mix;
            let (kind, node_fault) = match self.fault_script.as_mut() {
                Some(script) => faults::draw(script, network, &self.node_ids, mix),
                None => faults::draw(&mut self.rng, network, &self.node_ids, mix),
            };
            if !applies {
                return self.next_fault();
            }
            match node_fault {
                Some(NodeFault::ConsumerCrash) if !self.crash_consumer() => {
                    return self.next_fault();
                }
                Some(NodeFault::ConsumerCrash) => {}
                Some(NodeFault::IsolateLeader) => {
                    let group = self.rng.random_range(0..=self.broker_groups);
                    let leader = self.node_ids.iter().zip(&self.hosts).find_map(|(n, h)| {
                        let replica = h.broker.as_ref()?.replica(group)?;
                        let leads = replica.status().role == holdfast_core::raft::Role::Leader;
                        (h.up && leads).then_some(*n)
                    });
                    let Some(leader) = leader else {
                        return self.next_fault();
                    };
                    self.network.split(&[leader], &self.node_ids);
                }
                Some(NodeFault::Crash(node)) => {
                    if !self.host(node).up {
                        return self.next_fault();
                    }
                    self.crash(node)?;
                }
                Some(NodeFault::Pause(node, pause)) => {
                    self.host_mut(node).paused_until = self.now + pause;
                }
                Some(NodeFault::ToggleSlowDisk(node)) => {
                    let host = self.host_mut(node);
                    host.fsync_us = faults::toggle_fsync_us(host.fsync_us);
                }
                Some(NodeFault::Corrupt {
                    node,
                    corruption,
                    crash,
                }) => {
                    let groups: Vec<GroupId> = self
                        .groups()
                        .filter(|g| self.may_damage(node, *g))
                        .collect();
                    if groups.is_empty() {
                        return self.next_fault();
                    }
                    let group = groups[self.rng.random_range(0..groups.len())];
                    let QueueWorld { hosts, rng, .. } = self;
                    let disk = hosts[(node - 1) as usize].disks.get_mut(&group);
                    if !disk.is_some_and(|d| d.corrupt(corruption, rng)) {
                        return self.next_fault();
                    }
                    if crash && self.host(node).up {
                        self.crash(node)?;
                    }
                }
                Some(NodeFault::FailSync(node)) => {
                    if !self.host(node).up {
                        return self.next_fault();
                    }
                    self.host_mut(node).fail_sync = true;
                }
                Some(NodeFault::Wipe(node)) => {
                    if !self.groups().all(|g| self.may_damage(node, g)) {
                        return self.next_fault();
                    }
                    if self.host(node).up {
                        self.crash(node)?;
                    }
                    for disk in self.host_mut(node).disks.values_mut() {
                        disk.wipe();
                    }
                }
                None => {}
            }
            kind
        };
        *self.stats.faults.entry(kind).or_default() += 1;
        self.trace.record(self.now, &[11, kind.len() as u64], || {
            format!("FAULT #{number} {kind}")
        });
        self.next_fault()
    }

    /// Whether corrupting `node`'s replica of `group` leaves a majority of the group's
    /// replicas undamaged (see the Raft world's rule).
    fn may_damage(&self, node: NodeId, group: GroupId) -> bool {
        let damaged = |h: &Host| h.disks.get(&group).is_some_and(Disk::is_damaged);
        if damaged(self.host(node)) {
            return true;
        }
        let others = self.hosts.iter().filter(|h| damaged(h)).count();
        others < (self.hosts.len() - 1) / 2
    }

    /// At the end of a run: every replica's disk holds exactly the committed records up to
    /// what it knows committed and durable (unless a fault changed bytes nobody read yet).
    fn check_committed_bytes(&self) -> Result<(), Violation> {
        for (node, host) in self.node_ids.iter().zip(&self.hosts) {
            let Some(broker) = host.broker.as_ref() else {
                continue;
            };
            for (group, disk) in host.disks.iter().filter(|(_, d)| !d.hit) {
                let Some(status) = broker.replica(*group).map(|r| r.status()) else {
                    continue;
                };
                let upto = status.commit_index.min(status.durable_index);
                self.checker.committed_bytes(*group, *node, disk, upto)?;
            }
        }
        Ok(())
    }

    fn next_fault(&mut self) -> Result<(), Violation> {
        let gap_ms = match self.fault_script.as_mut() {
            Some(script) => script.random_range(20..600),
            None => self.rng.random_range(20..600),
        };
        let at = self.now + ms(gap_ms);
        if at < self.heal_at {
            self.schedule(at, Event::Fault);
        }
        Ok(())
    }

    fn heal(&mut self) -> Result<(), Violation> {
        self.phase = Phase::Liveness;
        self.network.heal();
        self.trace
            .record(self.now, &[12], || "HEAL: liveness phase".into());
        for node in self.node_ids.clone() {
            let host = self.host_mut(node);
            host.fsync_us = faults::FSYNC_US;
            if !host.up {
                self.start(node)?;
            }
        }
        self.restart_all_consumers()
    }

    /// Periodic checks: consume offsets never move back; after healing, has everything
    /// drained?
    fn check(&mut self) -> Result<bool, Violation> {
        for (i, host) in self.hosts.iter().enumerate() {
            let (Some(broker), true) = (host.broker.as_ref(), host.up) else {
                continue;
            };
            for group in 1..=self.broker_groups {
                if let Some(state) = broker.broker_state(group) {
                    self.history
                        .consume_offsets(i as u64 + 1, host.incarnation, group, state)?;
                }
            }
        }
        if self.phase == Phase::Liveness {
            match self.drained() {
                Ok(()) => {
                    self.trace.record(self.now, &[13], || "DRAINED".into());
                    return Ok(true);
                }
                Err(why) if self.now >= self.deadline => {
                    return Err(violation(
                        "liveness",
                        format!(
                            "not drained {} ms after healing: {why}",
                            self.options.liveness_limit_ms
                        ),
                    ));
                }
                Err(_) => {}
            }
        }
        self.schedule(self.now + ms(CHECK_INTERVAL_MS), Event::Check);
        Ok(false)
    }

    /// The leader's replica of each group, if there is exactly one of the highest term.
    fn leader_of(&self, group: GroupId) -> Result<&BrokerNode, String> {
        let statuses: Vec<(&BrokerNode, _)> = self
            .hosts
            .iter()
            .filter(|h| h.up)
            .filter_map(|h| h.broker.as_ref())
            .filter_map(|b| Some((b, b.replica(group)?.status())))
            .collect();
        if statuses.len() < self.node_ids.len() {
            return Err("a node is down".into());
        }
        let term_max = statuses.iter().map(|(_, s)| s.term).max().unwrap_or(0);
        let Some((leader, status)) = statuses
            .iter()
            .find(|(_, s)| s.role == holdfast_core::raft::Role::Leader && s.term == term_max)
        else {
            return Err(format!("group {group} has no leader in term {term_max}"));
        };
        if status.commit_index != status.last_index {
            return Err(format!("group {group} leader has not committed its log"));
        }
        if statuses.iter().any(|(_, s)| {
            s.commit_index != status.commit_index || s.applied_index != s.commit_index
        }) {
            return Err(format!("group {group} replicas have not caught up"));
        }
        Ok(leader)
    }

    /// Every group has a settled leader, every send resolved, and every consumer group has
    /// acknowledged everything in every queue, retry queues included.
    fn drained(&self) -> Result<(), String> {
        self.leader_of(METADATA_GROUP)?;
        self.clients.idle()?;
        for group in 1..=self.broker_groups {
            let leader = self.leader_of(group)?;
            let Some(state) = leader.broker_state(group) else {
                continue;
            };
            for queue in state.queues() {
                let len = state.queue_len(queue).unwrap_or(0);
                for consumer_group in CONSUMER_GROUPS {
                    let own_retry = queue.topic.ends_with(consumer_group);
                    if queue.is_dead_letter() || (queue.is_retry() && !own_retry) {
                        continue;
                    }
                    let offset = state.consume_offset(consumer_group, queue);
                    if offset < len {
                        return Err(format!(
                            "{consumer_group} is at {offset} of {len} in {queue} of group {group}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn final_check(&mut self) -> Result<(), Violation> {
        self.checker.all_acked_stay()?;
        self.check_committed_bytes()?;
        let mut states: BTreeMap<GroupId, StateView<'_>> = BTreeMap::new();
        for group in 1..=self.broker_groups {
            let leader = self
                .leader_of(group)
                .map_err(|why| violation("liveness", why))?;
            let store = self
                .hosts
                .iter()
                .find(|h| h.broker.as_ref().is_some_and(|b| b.id() == leader.id()))
                .map(|h| &h.store);
            if let (Some(state), Some(store)) = (leader.broker_state(group), store) {
                states.insert(
                    group,
                    StateView {
                        state,
                        group,
                        store,
                    },
                );
            }
        }
        let max_reconsume = broker_config().max_reconsume;
        self.history
            .check_final(&states, &CONSUMER_GROUPS, max_reconsume)
    }
}
