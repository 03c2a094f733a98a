//! The queue workload: whole broker nodes (the metadata group and every broker group), real
//! producers and consumer groups, and the same faults and Raft checks as the Raft workload,
//! plus the queue's own checks over the history of what clients saw.
//!
//! Clients sit outside the cluster: their messages are delayed, lost and duplicated like any
//! other, but partitions cut only links between nodes.

mod clients;
mod history;
mod operator;
mod ownership;

use std::collections::BTreeMap;
use std::time::Duration;

use holdfast_core::broker::{
    BrokerConfig, BrokerState, MemoryStore, Offset, QueueId, StoredMessage,
};
use holdfast_core::node::protocol::{ClientId, Request, RequestId, Response};
use holdfast_core::node::{BrokerNode, METADATA_GROUP, NodeConfig, NodeFault};
use holdfast_core::raft::{Envelope, GroupId, Index, Message, NodeId, Recovered, WriteId};
use holdfast_core::time::Instant;
use rand::{Rng, RngExt};

use crate::checker::{Checker, Violation, violation};
use crate::disk::Disk;
use crate::kernel::{Kernel, KernelEvent, Phase, Workload, ms, us};
use crate::options::Options;
use crate::raft_checks::{
    ReplicaView, check_applied, check_recovery, check_restored, check_status, check_write, log_view,
};
use crate::swarm::Retention;
use crate::world::Outcome;
use clients::Clients;
use history::History;

const CHECK_INTERVAL_MS: u64 = 50;
/// Consumer session and queue lease timeout: short, so that crashed members' queues move
/// within a run.
const MEMBER_SESSION_MS: u64 = 2_000;
/// What a restarting node queues of store writes per replay step: a few records, so that the
/// simulator drives a replay over many steps (see `BrokerNode::replaying`).
const REPLAY_STORE_BYTES_MAX: u64 = 4 << 10;
pub(crate) const TOPIC: &str = "orders";
pub(crate) const CONSUMER_GROUPS: [&str; 2] = ["billing", "audit"];

pub fn run(options: &Options) -> Outcome {
    let mut world = QueueWorld::new(options.clone());
    let result = world.run();
    for broker in world.nodes.iter().filter_map(|h| h.broker.as_deref()) {
        world.k.stats.coverage.add_node(&broker.stats());
    }
    let (acked, failed, ambiguous, _) = world.history.counts();
    world.k.stats.messages_acked = acked;
    world.k.stats.messages_failed = failed;
    world.k.stats.messages_ambiguous = ambiguous;
    world.k.stats.deliveries = world.history.deliveries() as u64;
    world.k.stats.redeliveries = world.history.redeliveries_by_cause.values().sum();
    world.k.stats.redeliveries_by_cause = world.history.redeliveries_by_cause.clone();
    world.k.stats.dead_lettered = world.history.dead_lettered;
    world.k.stats.entries_committed = (0..=world.broker_groups)
        .map(|g| world.checker.committed(g))
        .sum();
    world.k.outcome(result)
}

pub(crate) enum Event {
    Kernel(KernelEvent),
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
    /// The operator looks whether its membership change needs a request; `hasty`: a second
    /// look right after a request, to ask for another change while that one is pending.
    Operate {
        hasty: bool,
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
    Check,
}

impl From<KernelEvent> for Event {
    fn from(event: KernelEvent) -> Event {
        Event::Kernel(event)
    }
}

/// What the queue workload runs on a node: a broker node, its disks and its queue store.
#[derive(Default)]
struct Node {
    /// Boxed: a node is moved out and back on every step it takes (see `drain`).
    broker: Option<Box<BrokerNode>>,
    disks: BTreeMap<GroupId, Disk>,
    views: BTreeMap<GroupId, ReplicaView>,
    timer_at: Instant,
    /// The node's queue store: message bytes, outside the state machine.
    store: MemoryStore,
    /// What of `store` a crash leaves: a copy taken at each sync, which the node makes before
    /// a broker group's (metadata-only) snapshot is handed over to be written.
    durable_store: MemoryStore,
    /// Peers the node table retired: their links are closed and refused, as the shell does.
    retired: std::collections::BTreeSet<NodeId>,
    /// The node table version `retired` follows (`u64::MAX`: not read yet).
    table_seen: u64,
    /// What the configuration checkers last saw of each replica.
    configs: BTreeMap<GroupId, crate::membership::ConfigSeen>,
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

pub(crate) struct QueueWorld {
    pub(crate) k: Kernel<Event>,
    nodes: Vec<Node>,
    broker_groups: GroupId,
    pub(crate) clients: Clients,
    pub(crate) history: History,
    pub(crate) ownership: ownership::Ownership,
    checker: Checker,
    pub(crate) canary: Option<holdfast_core::raft::Canary>,
    /// Drawn per seed: when nodes compact (`None`: never) and the snapshot chunk size.
    snapshot_entries_min: Option<u64>,
    snapshot_chunk_bytes_max: usize,
    /// The first configuration's nodes; `node_ids` adds the operator's spares.
    initial: Vec<NodeId>,
    operator: operator::Operator,
    tally: crate::membership::Tally,
    /// Periodic checks made so far: every [`STATE_CHECK_EVERY`]-th also checks each node's
    /// broker states' own invariants.
    checks: u64,
}

crate::kernel_deref!(QueueWorld, Event);

/// A broker state's invariants are checked at every this many periodic checks (a simulated
/// second apart; fully at the end): a state that breaks them stays broken (a miscount does
/// not heal by itself), and checking every fourth cost about 5 % of a queue seed's CPU time
/// (every 20th: within the noise).
const STATE_CHECK_EVERY: u64 = 20;

fn state_violation(node: usize, group: GroupId, why: String) -> Violation {
    violation(
        "state-invariants",
        format!("node {node} group {group}: {why}"),
    )
}

/// Redelivery delays short enough that retries come back within a run, and the seed's
/// retention (the history knows it, to tell a trim retention allows from a loss).
pub(crate) fn broker_config(retention: Retention) -> BrokerConfig {
    BrokerConfig {
        reconsume_delays_ms: vec![100, 300, 1_000],
        max_reconsume: 3,
        retention_ms: retention.ms,
        retention_bytes: retention.bytes,
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
        let broker_groups = options.groups.max(2) as GroupId;
        let spares = if options.swarm().membership {
            operator::SPARE_NODES
        } else {
            0
        };
        let spare_ids: Vec<NodeId> = (1..=spares as NodeId)
            .map(|i| options.nodes as NodeId + i)
            .collect();
        QueueWorld {
            nodes: (0..node_ids.len() + spares)
                .map(|_| Node::default())
                .collect(),
            clients: Clients::new(&node_ids, broker_groups),
            operator: operator::Operator::new(options.seed, &spare_ids),
            tally: crate::membership::Tally::default(),
            broker_groups,
            history: History::new(options.swarm().retention),
            ownership: ownership::Ownership::new(MEMBER_SESSION_MS),
            checker: Checker::default(),
            canary: options.canary,
            snapshot_entries_min: None,
            snapshot_chunk_bytes_max: 1 << 20,
            checks: 0,
            k: Kernel::new(options, node_ids.len() + spares),
            initial: node_ids,
        }
    }

    fn groups(&self) -> impl Iterator<Item = GroupId> + use<> {
        0..=self.broker_groups
    }

    fn run(&mut self) -> Result<(), Violation> {
        // A fifth of the seeds never compact; the rest do often, so snapshots are installed on
        // followers that fell behind and restored on restart, in several chunks in some seeds.
        // Not as small as 64 bytes: a queue seed's snapshots reach 130 KB (the index of every
        // retained message), and a transfer takes a round trip per chunk, so 2,000 chunks
        // outlasted the liveness phase (seed 591 once its schedule moved); real chunks are
        // a megabyte against snapshots of a few.
        self.snapshot_entries_min =
            [None, Some(5), Some(20), Some(60), Some(200)][self.k.rng.random_range(0..5)];
        self.snapshot_chunk_bytes_max = [1024, 8192, 1 << 20][self.k.rng.random_range(0..3)];
        let (every, chunk) = (self.snapshot_entries_min, self.snapshot_chunk_bytes_max);
        self.k
            .trace
            .record(self.k.now, &[0, every.unwrap_or(0), chunk as u64], || {
                format!("config snapshot_entries_min={every:?} snapshot_chunk_bytes_max={chunk}")
            });
        if !self.k.swarm.legacy {
            let mix = self.k.swarm.mix.to_string();
            let (pipeline, batch) = (self.k.swarm.pipeline, self.k.swarm.append_entries_max);
            let retention = self.k.swarm.retention;
            self.clients.pipeline = pipeline;
            let fields = [0, self.k.swarm.mix.total() as u64, pipeline as u64];
            self.k.trace.record(self.k.now, &fields, || {
                format!(
                    "swarm faults={mix} pipeline={pipeline} append_entries_max={batch:?} \
                     retention={retention}"
                )
            });
        }
        for node in self.k.node_ids.clone() {
            self.start(node)?;
        }
        self.k.schedule(self.k.now + ms(300), Event::Admin);
        self.start_operator();
        self.schedule_faults();
        self.k
            .schedule(self.k.now + ms(CHECK_INTERVAL_MS), Event::Check);

        self.run_events()
    }

    /// Handles one event; true when the run is over.
    fn dispatch_event(&mut self, event: Event) -> Result<bool, Violation> {
        let now = self.k.now;
        match event {
            Event::Kernel(event) => self.kernel_event(event)?,
            Event::Peer(envelope) => {
                let to = envelope.to;
                if self.node(to).retired.contains(&envelope.from) {
                    self.k.stats.messages_lost += 1;
                    return Ok(false);
                }
                if !self.host(to).up || self.node(to).broker.is_none() {
                    self.k.stats.messages_lost += 1;
                    return Ok(false);
                }
                self.tally.delivered(&envelope);
                let Some(broker) = self.live_broker(to) else {
                    return Ok(false);
                };
                broker.handle_peer(now, envelope);
                self.k.stats.messages_delivered += 1;
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
                if self.node(node).timer_at != at {
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
            Event::Operate { hasty } => self.operate(hasty)?,
            Event::RestartConsumer { slot } => self.restart_consumer(slot)?,
            Event::Answer {
                slot,
                generation,
                delivery,
                status,
            } => self.answer_later(slot, generation, &delivery, status)?,
            Event::Check => return self.check(),
        }
        Ok(false)
    }

    fn node(&self, node: NodeId) -> &Node {
        &self.nodes[(node - 1) as usize]
    }

    fn node_mut(&mut self, node: NodeId) -> &mut Node {
        &mut self.nodes[(node - 1) as usize]
    }

    /// The applied state of broker group `group` on every running node.
    pub(crate) fn broker_states(&self, group: GroupId) -> Vec<(NodeId, StateView<'_>)> {
        let hosts = &self.k.hosts;
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| hosts[*i].up)
            .filter_map(|(i, h)| {
                let state = h.broker.as_deref()?.broker_state(group)?;
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
        if !self.host(node).up {
            return None;
        }
        self.node_mut(node).broker.as_deref_mut()
    }
}

impl Workload for QueueWorld {
    type Event = Event;
    const HAS_CONSUMERS: bool = true;

    fn event_node(event: &Event) -> Option<NodeId> {
        match event {
            Event::Peer(envelope) => Some(envelope.to),
            Event::Request { node, .. }
            | Event::NodeTimer { node, .. }
            | Event::Synced { node, .. }
            | Event::SnapshotEncoded { node, .. } => Some(*node),
            _ => None,
        }
    }

    fn dispatch(&mut self, event: Event) -> Result<bool, Violation> {
        self.dispatch_event(event)
    }

    fn finish(&mut self) -> Result<(), Violation> {
        self.final_check()
    }

    fn group_ids(&self) -> Vec<GroupId> {
        self.groups().collect()
    }

    fn disk(&self, node: NodeId, group: GroupId) -> Option<&Disk> {
        self.node(node).disks.get(&group)
    }

    fn disk_mut(&mut self, node: NodeId, group: GroupId) -> Option<&mut Disk> {
        self.node_mut(node).disks.get_mut(&group)
    }

    fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.k.node_ids.iter().zip(&self.nodes).find_map(|(n, h)| {
            let replica = h.broker.as_deref()?.replica(group)?;
            let leads = replica.status().role == holdfast_core::raft::Role::Leader;
            (self.host(*n).up && leads).then_some(*n)
        })
    }

    /// Counted against the initial nodes: the operator's spares do not make room for more
    /// damage than the smallest configuration survives.
    fn damage_quorum(&self) -> usize {
        self.initial.len()
    }

    fn crash_consumer(&mut self) -> Result<bool, Violation> {
        Ok(self.crash_one_consumer())
    }

    fn healed(&mut self) -> Result<(), Violation> {
        self.restart_all_consumers()
    }

    // ----- nodes -----

    fn start(&mut self, node: NodeId) -> Result<(), Violation> {
        let mut config = NodeConfig::new(node, self.initial.clone(), self.broker_groups);
        // A spare joins the running cluster: its replicas wait to learn a configuration.
        config.joined = !self.initial.contains(&node);
        config.broker = broker_config(self.k.swarm.retention);
        config.broker.cache_bytes_max = cache_bytes_max(self.k.options.seed);
        config.member_session_ms = MEMBER_SESSION_MS;
        config.record_applied = true;
        config.canary = self.k.options.canary;
        config.snapshot_entries_min = self.snapshot_entries_min;
        // Small, so that a restart's replay takes many steps here too (the shell's is 16 MiB).
        config.replay_store_bytes_max = REPLAY_STORE_BYTES_MAX;
        config.raft.snapshot_chunk_bytes_max = self.snapshot_chunk_bytes_max;
        if let Some(batch) = self.k.swarm.append_entries_max {
            config.raft.append_entries_max = batch;
        }
        let seed = self.k.rng.next_u64();
        let now = self.k.now;
        let groups: Vec<GroupId> = self.groups().collect();
        let canary = self.k.options.canary;
        let index = (node - 1) as usize;
        let mut recovered: BTreeMap<GroupId, Recovered> = BTreeMap::new();
        for group in &groups {
            let disk = self.nodes[index].disks.entry(*group).or_default();
            let (checker, stats) = (&mut self.checker, &mut self.k.stats);
            let recovery = crate::kernel::recover(checker, stats, node, *group, disk, canary)?;
            if let Some(damage) = recovery.damage {
                config.raft.damaged.insert(*group, damage);
                self.k
                    .trace
                    .record(now, &[2, node, *group, damage.from], || {
                        format!("n{node} g{group} starts damaged: {damage:?}")
                    });
            }
            recovered.insert(*group, recovery.recovered);
        }
        self.host_mut(node).up = true;
        let host = self.node_mut(node);
        let broker = BrokerNode::new(config, recovered, seed, now);
        host.views.clear();
        host.configs.clear();
        host.table_seen = u64::MAX;
        for group in &groups {
            let Some(replica) = broker.replica(*group) else {
                continue;
            };
            let status = replica.status();
            let disk = host.disks.entry(*group).or_default();
            check_recovery(node, *group, &status, disk)?;
            host.views.insert(*group, ReplicaView::new(&status));
            host.configs
                .insert(*group, crate::membership::ConfigSeen::new(replica));
        }
        host.broker = Some(Box::new(broker));
        host.timer_at = Instant::ZERO;
        self.k
            .trace
            .record(now, &[2, node], || format!("n{node} start"));
        self.drain(node)
    }

    /// A crash; `tear = Some((group, k))` makes that group's disk land its first `k` unsynced
    /// writes and tear the next (else each group's disk draws its own fate).
    fn crash_tearing(
        &mut self,
        node: NodeId,
        tear: Option<(GroupId, usize)>,
    ) -> Result<(), Violation> {
        let mut torn = false;
        let canary = self.k.options.canary;
        for group in self.groups() {
            let unsynced = self
                .node(node)
                .disks
                .get(&group)
                .map_or(0, |d| d.unsynced.len());
            let tear = tear.filter(|(g, _)| *g == group).map(|(_, k)| k);
            let survivors = self.tear_point(tear, unsynced);
            torn |= survivors.is_some();
            let QueueWorld { nodes, k, .. } = self;
            if let Some(disk) = nodes[(node - 1) as usize].disks.get_mut(&group) {
                disk.crash(survivors, &mut k.rng, canary)?;
            }
        }
        let QueueWorld { nodes, k, .. } = self;
        let host = &mut nodes[(node - 1) as usize];
        if let Some(broker) = host.broker.take() {
            k.stats.coverage.add_node(&broker.stats());
        }
        host.store = host.durable_store.clone();
        self.crashed(node, torn);
        self.connections_lost(node)
    }
}

impl QueueWorld {
    /// Collects a node's outputs after an input, checking every replica on the way.
    fn drain(&mut self, node: NodeId) -> Result<(), Violation> {
        let index = (node - 1) as usize;
        let mut host = std::mem::take(&mut self.nodes[index]);
        let result = self.drain_host(node, &mut host);
        self.nodes[index] = host;
        result?;
        self.check_leases(node)
    }

    /// read-lease, for every group `node` may have just taken a lease of.
    fn check_leases(&self, node: NodeId) -> Result<(), Violation> {
        let now = self.k.now;
        let Some(broker) = self.node(node).broker.as_deref() else {
            return Ok(());
        };
        if !self.host(node).up {
            return Ok(());
        }
        for group in self.groups() {
            // The stepping node's replica straight from its broker, not found by walking the
            // other nodes.
            let Some(mine) = broker.replica(group) else {
                continue;
            };
            let replicas = self.k.node_ids.iter().zip(&self.nodes);
            let replicas = replicas.filter(|(n, _)| self.host(**n).up);
            let replicas =
                replicas.filter_map(|(n, h)| Some((*n, h.broker.as_deref()?.replica(group)?)));
            crate::raft_checks::check_lease_of(group, node, mine, now, replicas)?;
        }
        Ok(())
    }

    fn drain_host(&mut self, node: NodeId, host: &mut Node) -> Result<(), Violation> {
        let now = self.k.now;
        let Some(broker) = host.broker.as_deref_mut() else {
            return Ok(());
        };
        for (group, disk) in &mut host.disks {
            let damaged_from = broker.replica(*group).and_then(|r| r.damaged_from());
            if disk.note_repair(damaged_from) {
                self.k.stats.repairs += 1;
                let group = *group;
                self.k.trace.record(now, &[14, node, group], || {
                    format!("n{node} g{group} REPAIRED")
                });
            }
        }
        if let Some(fault) = broker.poll_fault() {
            let checker = match fault {
                NodeFault::SnapshotUndecodable(_) => "snapshot-agreement",
                // The raft workload's clients see their proposals' fates themselves; here the
                // node does, and checks each against its log before answering anyone.
                NodeFault::ProposalMisreported(_) => "acked-stays",
            };
            return Err(violation(checker, format!("node {node}: {fault}")));
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
                if let holdfast_core::broker::StoreOp::Trim { queue, start } = &op {
                    // The store still holds what the trim drops: judge each message by it.
                    self.history.trimmed(now, group, queue, *start, |offset| {
                        host.store.message(group, queue, offset)
                    })?;
                }
                host.store.apply(group, op).map_err(|why| {
                    violation("queue-store", format!("node {node} group {group}: {why}"))
                })?;
            }
            if broker.replaying() {
                // A restart's log applies a step at a time, as the shell drives it.
                broker.replay(now);
                continue;
            }
            let Some(read) = broker.poll_read() else {
                break;
            };
            let (mut records, mut error) = host.store.read(read.group, &read.queue, &read.offsets);
            // On the seeds without a cache (every pull reads), in the safety phase. From the
            // seed, not drawn, so that a seed's other faults stay as they were, and not on the
            // other seeds, whose runs (and recorded regressions) stay as they were too.
            if self.k.phase == Phase::Faults && cache_bytes_max(self.k.options.seed) == 0 {
                let roll = mix(self.k.options.seed ^ mix(node ^ mix(read.id)));
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
                        *self.k.stats.faults.entry("read-flip").or_default() += 1;
                    }
                    1 => {
                        records.truncate(((roll >> 8) as usize) % (records.len() + 1));
                        error = Some("read failed: Input/output error (injected)".into());
                        *self.k.stats.faults.entry("read-error").or_default() += 1;
                    }
                    _ => {}
                }
            }
            broker.read_done(now, read.id, records, error);
        }
        while let Some(job) = broker.poll_snapshot_job() {
            let at = now + Duration::from_micros(self.k.rng.random_range(0..20_000));
            // The snapshot refers to the store: what it references is synced first.
            if job.needs_store()
                && !holdfast_core::raft::Canary::SnapshotBeforeStoreSync
                    .planted(self.k.options.canary)
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
                incarnation: self.host(node).incarnation,
                group: job.group,
                index: job.index,
                data,
            };
            self.k.schedule(at, event);
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
            self.k.trace.record(
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
            let at = self.fsync_done_at(node);
            let event = Event::Synced {
                node,
                group: *group,
                incarnation: self.host(node).incarnation,
                upto: last.id,
            };
            self.k.schedule(at, event);
        }
        if broker.node_table_version() != host.table_seen {
            host.table_seen = broker.node_table_version();
            host.retired = broker
                .node_table()
                .iter()
                .filter(|r| r.removed && r.id != node)
                .map(|r| r.id)
                .collect();
        }
        let mut outbox = Vec::new();
        while let Some(envelope) = broker.poll_message() {
            if let Some(disk) = host.disks.get(&envelope.group) {
                Checker::sent(&envelope, disk)?;
            }
            self.checker.voted(&envelope)?;
            if !host.retired.contains(&envelope.to) {
                outbox.push(envelope);
            }
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
                    self.k.stats.snapshots_installed += 1;
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
                self.k.stats.snapshots_installed += 1;
            }
            if status.snapshot_index > view.snapshot {
                // Not a restore (those are seen above): a compaction.
                self.k.stats.snapshots_taken += 1;
            }
        }
        let mut responses = Vec::new();
        while let Some(response) = broker.poll_response() {
            responses.push(response);
        }
        for group in 0..=self.broker_groups {
            let (Some(replica), Some(view), Some(disk), Some(seen)) = (
                broker.replica(group),
                host.views.get_mut(&group),
                host.disks.get(&group),
                host.configs.get_mut(&group),
            ) else {
                continue;
            };
            let nodes = &self.nodes;
            // Commit safety is about the voters of the committing leader's configuration (all
            // the initial nodes, unless the operator changed it).
            let voters = &replica.latest_membership().1.voters;
            let logs = |index: Index| {
                let mut logs = Vec::new();
                if voters.contains(&node) {
                    logs.push((node, disk.view(index), Some(log_view(replica, index))));
                }
                for other in voters.iter().filter(|n| **n != node) {
                    let h = &nodes[(*other - 1) as usize];
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
            let commit_before = view.commit;
            let elected = check_status(&mut self.checker, node, group, view, replica, disk, &logs)?;
            let committed = view.commit > commit_before;
            let disk_of = |n: NodeId| {
                if n == node {
                    Some(disk)
                } else {
                    nodes[(n - 1) as usize].disks.get(&group)
                }
            };
            crate::membership::check_step(
                &self.tally,
                node,
                group,
                replica,
                seen,
                committed,
                elected,
                &disk_of,
            )?;
            if elected {
                self.k.stats.elections += 1;
                let term = view.term;
                self.k.trace.record(now, &[5, node, group, term], || {
                    format!("n{node} g{group} LEADER term={term}")
                });
            }
        }
        let timer = broker.poll_timeout().max(now + us(1));
        if timer != host.timer_at {
            host.timer_at = timer;
            self.k.schedule(timer, Event::NodeTimer { node, at: timer });
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
        let now = self.k.now;
        let canary = self.k.options.canary;
        if !self.host(node).up {
            return Ok(());
        }
        if self.sync_failed(node, group) {
            // The fsync failed: the node stops, and nothing is reported synced.
            return self.crash(node);
        }
        let QueueWorld { nodes, k, .. } = self;
        let host = &mut nodes[(node - 1) as usize];
        let mut report = upto;
        if let Some(disk) = host.disks.get_mut(&group) {
            if let Some(at) = k.snapshot_crash(node, group, disk, upto) {
                return self.crash_tearing(node, Some((group, at)));
            }
            report = disk.sync(upto, &mut k.rng, canary)?;
            disk.syncing = false;
        }
        if let Some(broker) = host.broker.as_deref_mut() {
            broker.persisted(now, group, report);
        }
        self.drain(node)
    }

    // ----- network -----

    fn transmit(&mut self, envelope: Envelope) {
        if let Message::InstallSnapshot { .. } = envelope.message {
            self.k.stats.snapshot_chunks += 1;
        }
        let copies = self.route(Some((envelope.from, envelope.to)));
        let now = self.k.now;
        copies.deliver(envelope, |delay, copy| {
            self.k.schedule(now + delay, Event::Peer(copy))
        });
    }

    /// A client's request reaches a node (clients sit outside partitions).
    pub(crate) fn send_to_node(
        &mut self,
        node: NodeId,
        client: ClientId,
        id: RequestId,
        request: Request,
    ) {
        let (copies, now) = (self.route(None), self.k.now);
        copies.deliver(request, |delay, request| {
            let event = Event::Request {
                node,
                client,
                id,
                request,
            };
            self.k.schedule(now + delay, event);
        });
    }

    fn send_to_client(&mut self, client: ClientId, id: RequestId, response: Response) {
        let (copies, now) = (self.route(None), self.k.now);
        copies.deliver(response, |delay, response| {
            let event = Event::Response {
                client,
                id,
                response,
            };
            self.k.schedule(now + delay, event);
        });
    }

    // ----- phases -----

    /// At the end of a run: every replica's disk holds exactly the committed records up to
    /// what it knows committed and durable (unless a fault changed bytes nobody read yet).
    fn check_committed_bytes(&self) -> Result<(), Violation> {
        for (node, host) in self.k.node_ids.iter().zip(&self.nodes) {
            let Some(broker) = host.broker.as_deref() else {
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

    /// Periodic checks: each broker state's own invariants; consume offsets never move back;
    /// after healing, has everything drained?
    fn check(&mut self) -> Result<bool, Violation> {
        self.checks += 1;
        let check_states = self.checks.is_multiple_of(STATE_CHECK_EVERY);
        for (i, host) in self.nodes.iter().enumerate() {
            let process = &self.k.hosts[i];
            let (Some(broker), true) = (host.broker.as_deref(), process.up) else {
                continue;
            };
            for group in 1..=self.broker_groups {
                if let Some(state) = broker.broker_state(group) {
                    if check_states {
                        let checked = state.check_invariants();
                        checked.map_err(|e| state_violation(i + 1, group, e))?;
                    }
                    self.history.consume_offsets(
                        i as u64 + 1,
                        process.incarnation,
                        group,
                        state,
                    )?;
                }
            }
        }
        if self.k.phase == Phase::Liveness {
            match self.drained() {
                Ok(()) => {
                    self.k.trace.record(self.k.now, &[13], || "DRAINED".into());
                    return Ok(true);
                }
                Err(why) if self.k.now >= self.k.deadline => {
                    return Err(violation(
                        "liveness",
                        format!(
                            "not drained {} ms after healing: {why}",
                            self.k.options.liveness_limit_ms
                        ),
                    ));
                }
                Err(_) => {}
            }
        }
        self.k
            .schedule(self.k.now + ms(CHECK_INTERVAL_MS), Event::Check);
        Ok(false)
    }

    /// The leader's replica of each group, if there is exactly one of the highest term.
    fn leader_of(&self, group: GroupId) -> Result<&BrokerNode, String> {
        let statuses: Vec<(NodeId, &BrokerNode, _)> = self
            .k
            .node_ids
            .iter()
            .zip(&self.nodes)
            .filter(|(n, _)| self.host(**n).up)
            .filter_map(|(n, h)| Some((*n, h.broker.as_deref()?)))
            .filter_map(|(n, b)| Some((n, b, b.replica(group)?.status())))
            .collect();
        // Only the members of the latest leader's configuration (the initial nodes, unless
        // the operator changed it): a removed node may never learn it was removed, and a
        // spare not added yet holds nothing.
        let members = statuses
            .iter()
            .filter(|(_, _, s)| s.role == holdfast_core::raft::Role::Leader)
            .max_by_key(|(_, _, s)| s.term)
            .and_then(|(_, b, _)| Some(b.replica(group)?.latest_membership().1.clone()));
        let Some(members) = members else {
            return Err(format!("group {group} has no leader"));
        };
        let statuses: Vec<_> = statuses
            .into_iter()
            .filter(|(n, _, _)| members.contains(*n))
            .collect();
        if statuses.len() < members.voters.len() + members.learners.len() {
            return Err("a node is down".into());
        }
        let term_max = statuses.iter().map(|(_, _, s)| s.term).max().unwrap_or(0);
        let Some((_, leader, status)) = statuses
            .iter()
            .find(|(_, _, s)| s.role == holdfast_core::raft::Role::Leader && s.term == term_max)
        else {
            return Err(format!("group {group} has no leader in term {term_max}"));
        };
        if status.commit_index != status.last_index {
            return Err(format!("group {group} leader has not committed its log"));
        }
        if statuses.iter().any(|(_, _, s)| {
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
        self.operator.idle()?;
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
        for (i, host) in self.nodes.iter().enumerate() {
            let (Some(broker), true) = (host.broker.as_deref(), self.k.hosts[i].up) else {
                continue;
            };
            for group in 1..=self.broker_groups {
                if let Some(state) = broker.broker_state(group) {
                    let checked = state.check_invariants_fully();
                    checked.map_err(|e| state_violation(i + 1, group, e))?;
                }
            }
        }
        let mut states: BTreeMap<GroupId, StateView<'_>> = BTreeMap::new();
        for group in 1..=self.broker_groups {
            let leader = self
                .leader_of(group)
                .map_err(|why| violation("liveness", why))?;
            let store = self
                .nodes
                .iter()
                .find(|h| h.broker.as_deref().is_some_and(|b| b.id() == leader.id()))
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
        let max_reconsume = broker_config(self.k.swarm.retention).max_reconsume;
        self.history
            .check_final(&states, &CONSUMER_GROUPS, max_reconsume)
    }
}
