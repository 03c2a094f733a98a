//! One simulated run: a cluster of nodes hosting replicas of every group, a network, disks,
//! clients, and a fault schedule, all driven by one seed through a discrete-event queue.
//!
//! The run has two phases, as TigerBeetle's simulator does: a safety phase in which faults
//! are injected while every step is checked, then a liveness phase in which everything heals
//! and the cluster must converge within a bounded simulated time.

use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use holdfast_core::raft::{
    Config, Envelope, GroupId, Index, Message, NodeId, ProposalId, Replica, Role, WriteId,
};
use holdfast_core::time::Instant;
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::{Checker, MachineDigest, Violation, violation};
use crate::disk::Disk;
use crate::network::Network;
use crate::options::Options;
use crate::raft_checks::{
    ReplicaView, check_applied, check_recovery, check_restored, check_status, check_write, log_view,
};
use crate::trace::Trace;

mod client;
mod faults;
mod membership;
mod render;

use render::{describe, fields};

/// A run that has not finished after this many events is stuck; it fails as a liveness bug.
const EVENTS_MAX: u64 = 20_000_000;
pub(crate) const LIVENESS_CHECK_INTERVAL_MS: u64 = 50;
pub(crate) const COMMANDS_PER_PROPOSAL_MAX: u64 = 8;

/// What happened in one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub elections: u64,
    /// Entries in the committed sequence, summed over groups.
    pub entries_committed: u64,
    pub proposals_acked: u64,
    pub proposals_dropped: u64,
    /// Proposals whose replica crashed before their fate was known.
    pub proposals_indeterminate: u64,
    pub messages_delivered: u64,
    pub messages_lost: u64,
    pub events: u64,
    pub simulated_us: u64,
    /// Queue workload: messages whose send was acked, definitively failed, or left ambiguous.
    pub messages_acked: u64,
    pub messages_failed: u64,
    pub messages_ambiguous: u64,
    /// Queue workload: messages handed to consumers, redeliveries included.
    pub deliveries: u64,
    /// Deliveries of a message a consumer group had received before, and why.
    pub redeliveries: u64,
    pub redeliveries_by_cause: BTreeMap<&'static str, u64>,
    pub dead_lettered: u64,
    /// Replicas that started with a damaged log (or a wiped disk), and damage repaired.
    pub damaged_starts: u64,
    pub repairs: u64,
    /// Compactions (a replica replaced its log up to its applied index by a snapshot),
    /// snapshots installed from a leader (and restored from), and InstallSnapshot chunks sent.
    pub snapshots_taken: u64,
    pub snapshots_installed: u64,
    pub snapshot_chunks: u64,
    /// Leadership transfers a client asked a leader for (raft workload), and those the
    /// leader took on.
    pub transfers_asked: u64,
    pub transfers_started: u64,
    /// Faults drawn (applied or left out by `only_faults`): fault numbers run `0..` this.
    pub faults_drawn: u64,
    /// Protocol paths the core counted (see [`crate::coverage`]).
    pub coverage: crate::coverage::Coverage,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        for (kind, count) in &other.faults {
            *self.faults.entry(kind).or_default() += count;
        }
        self.elections += other.elections;
        self.faults_drawn += other.faults_drawn;
        self.entries_committed += other.entries_committed;
        self.proposals_acked += other.proposals_acked;
        self.proposals_dropped += other.proposals_dropped;
        self.proposals_indeterminate += other.proposals_indeterminate;
        self.messages_delivered += other.messages_delivered;
        self.messages_lost += other.messages_lost;
        self.events += other.events;
        self.simulated_us += other.simulated_us;
        self.messages_acked += other.messages_acked;
        self.messages_failed += other.messages_failed;
        self.messages_ambiguous += other.messages_ambiguous;
        self.deliveries += other.deliveries;
        self.redeliveries += other.redeliveries;
        for (cause, count) in &other.redeliveries_by_cause {
            *self.redeliveries_by_cause.entry(cause).or_default() += count;
        }
        self.dead_lettered += other.dead_lettered;
        self.damaged_starts += other.damaged_starts;
        self.repairs += other.repairs;
        self.snapshots_taken += other.snapshots_taken;
        self.snapshots_installed += other.snapshots_installed;
        self.snapshot_chunks += other.snapshot_chunks;
        self.transfers_asked += other.transfers_asked;
        self.transfers_started += other.transfers_started;
        self.coverage.add(&other.coverage);
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    /// The first invariant broken, and when; `None` if the run passed.
    pub violation: Option<(Instant, Violation)>,
    pub stats: Stats,
    pub trace_hash: u64,
    /// Readable event lines, when the options asked for them.
    pub trace: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violation.is_none()
    }
}

/// Runs one seed to completion.
pub fn run(options: &Options) -> Outcome {
    let mut world = World::new(options.clone());
    let result = world.run();
    for slot in world.nodes.iter().flat_map(|n| &n.slots).flatten() {
        if let Some(replica) = &slot.replica {
            world.stats.coverage.add_raft(&replica.counters());
        }
    }
    world.stats.simulated_us = world.now.as_micros();
    world.stats.faults_drawn = world.faults_drawn;
    world.stats.entries_committed = (1..=options.groups as GroupId)
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

enum Event {
    Deliver(Envelope),
    Timer {
        node: NodeId,
        group: GroupId,
        at: Instant,
    },
    Synced {
        node: NodeId,
        group: GroupId,
        incarnation: u64,
        upto: WriteId,
    },
    Propose {
        group: GroupId,
    },
    Fault,
    Restart {
        node: NodeId,
    },
    Heal,
    LivenessCheck,
    /// Ask the group's leader for a membership change.
    Membership {
        group: GroupId,
    },
}

impl Event {
    /// The node whose process handles this event, if any; a paused node handles none.
    fn node(&self) -> Option<NodeId> {
        match self {
            Event::Deliver(envelope) => Some(envelope.to),
            Event::Timer { node, .. } | Event::Synced { node, .. } => Some(*node),
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
    /// Reversed, so the max-heap pops the earliest event; ties go in scheduling order.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One replica's place on a node: the replica while the process runs, and its disk always.
struct Slot {
    replica: Option<Replica>,
    disk: Disk,
    timer_at: Instant,
    /// What the checkers last saw of this replica (this incarnation).
    view: ReplicaView,
    /// The state machine: a digest of what the replica applied (volatile: rebuilt from the
    /// recovered snapshot on restart).
    machine: MachineDigest,
}

struct Node {
    up: bool,
    /// Bumped on every crash, so a sync that completes after a crash is ignored.
    incarnation: u64,
    paused_until: Instant,
    fsync_min_us: u64,
    fsync_max_us: u64,
    /// The next fsync fails (I/O error or disk full): the node stops instead.
    fail_sync: bool,
    /// Indexed by group - 1.
    slots: Vec<Option<Slot>>,
}

struct Pending {
    node: NodeId,
    index: Index,
    hash: u64,
    after_heal: bool,
}

/// The producer of one group: proposes batches to whoever it believes leads.
struct Client {
    leader_hint: Option<NodeId>,
    pending: BTreeMap<ProposalId, Pending>,
    committed_after_heal: bool,
}

impl Client {
    /// In the liveness phase the client proposes until one post-heal proposal committed and
    /// every proposal from the fault phase resolved (new entries overwrite stale tails).
    fn needs_more(&self) -> bool {
        !self.committed_after_heal || self.pending.values().any(|p| !p.after_heal)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Faults,
    Liveness,
}

enum Step {
    Continue,
    Done,
}

struct World {
    options: Options,
    rng: ChaCha8Rng,
    /// Fault decisions, when a script chooses them; else `rng` does.
    fault_script: Option<crate::faults::FaultScript>,
    /// What this seed explores (its fault mix), and how many faults were drawn so far.
    swarm: crate::swarm::Swarm,
    faults_drawn: u64,
    now: Instant,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    node_ids: Vec<NodeId>,
    nodes: Vec<Node>,
    network: Network,
    clients: Vec<Client>,
    next_proposal: ProposalId,
    checker: Checker,
    trace: Trace,
    stats: Stats,
    phase: Phase,
    heal_at: Instant,
    deadline: Instant,
    /// Replication limits drawn per seed, so small batches and windows get explored too.
    append_entries_max: usize,
    inflight_appends_max: usize,
    /// Compact every this many applied entries (`None`: never), and the snapshot chunk size:
    /// drawn per seed, small, so snapshots are installed in pieces under faults.
    compact_every: Option<u64>,
    snapshot_chunk_bytes_max: usize,
    /// The groups' initial voters; `node_ids` adds the spare nodes membership changes use.
    initial_voters: Vec<NodeId>,
    membership: crate::membership::Plan,
    tally: crate::membership::Tally,
    /// Proposals the client gave up on when their node left the configuration (it may still
    /// report their fate if it is added back).
    abandoned: std::collections::BTreeSet<ProposalId>,
}

/// Where fault decisions come from: a script if given; else, unless the fixed mix asks for the
/// shared RNG as before, an RNG of their own (an empty script falls back to one), so that
/// leaving a fault out (`only_faults`) changes none of the others.
pub(crate) fn fault_source(options: &Options) -> Option<crate::faults::FaultScript> {
    let legacy = options.swarm().legacy;
    match &options.fault_script {
        Some(bytes) => Some(crate::faults::FaultScript::new(bytes.clone(), options.seed)),
        None if !legacy => Some(crate::faults::FaultScript::new(Vec::new(), options.seed)),
        None => None,
    }
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn us(us: u64) -> Duration {
    Duration::from_micros(us)
}

impl World {
    fn new(options: Options) -> World {
        let membership = crate::membership::Plan::new(options.seed, options.nodes);
        let initial_voters: Vec<NodeId> = (1..=options.nodes as NodeId).collect();
        let all = options.nodes + membership.spare_nodes();
        let node_ids: Vec<NodeId> = (1..=all as NodeId).collect();
        let heal_at = Instant::ZERO + ms(options.fault_phase_ms);
        let deadline = heal_at + ms(options.liveness_limit_ms);
        World {
            rng: ChaCha8Rng::seed_from_u64(options.seed),
            fault_script: fault_source(&options),
            swarm: options.swarm(),
            faults_drawn: 0,
            now: Instant::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::new(),
            node_ids,
            network: Network::calm(),
            clients: Vec::new(),
            next_proposal: 1,
            checker: Checker::default(),
            trace: Trace::new(options.trace),
            stats: Stats::default(),
            phase: Phase::Faults,
            heal_at,
            deadline,
            append_entries_max: 64,
            inflight_appends_max: 8,
            compact_every: None,
            snapshot_chunk_bytes_max: 1 << 20,
            initial_voters,
            membership,
            tally: crate::membership::Tally::default(),
            abandoned: std::collections::BTreeSet::new(),
            options,
        }
    }

    fn groups(&self) -> impl Iterator<Item = GroupId> + use<> {
        1..=self.options.groups as GroupId
    }

    fn schedule(&mut self, at: Instant, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    fn run(&mut self) -> Result<(), Violation> {
        self.append_entries_max = [1, 4, 64][self.rng.random_range(0..3)];
        self.inflight_appends_max = [1, 2, 8][self.rng.random_range(0..3)];
        // A fifth of the seeds never compact, so runs without snapshots stay exercised as
        // before; the rest compact often enough that followers lagging behind a partition or
        // a crash must be sent a snapshot.
        self.compact_every =
            [None, Some(5), Some(12), Some(30), Some(100)][self.rng.random_range(0..5)];
        self.snapshot_chunk_bytes_max = [3, 8, 1 << 20][self.rng.random_range(0..3)];
        self.checker.digest_snapshots = true;
        let (batch, window) = (self.append_entries_max, self.inflight_appends_max);
        let (every, chunk) = (self.compact_every, self.snapshot_chunk_bytes_max);
        self.trace.record(
            self.now,
            &[
                0,
                batch as u64,
                window as u64,
                every.unwrap_or(0),
                chunk as u64,
            ],
            || {
                format!(
                    "config append_entries_max={batch} inflight_appends_max={window} \
                     compact_every={every:?} snapshot_chunk_bytes_max={chunk}"
                )
            },
        );
        for _ in &self.node_ids {
            let slots = self.groups().map(|_| None).collect();
            self.nodes.push(Node {
                up: false,
                incarnation: 0,
                paused_until: Instant::ZERO,
                fsync_min_us: crate::faults::FSYNC_US.0,
                fsync_max_us: crate::faults::FSYNC_US.1,
                fail_sync: false,
                slots,
            });
        }
        for node in self.node_ids.clone() {
            for group in self.groups() {
                self.node_mut(node).slots[(group - 1) as usize] = Some(Slot {
                    replica: None,
                    disk: Disk::default(),
                    timer_at: Instant::ZERO,
                    view: ReplicaView {
                        commit: 0,
                        applied: 0,
                        role: Role::Follower,
                        term: 0,
                        snapshot: 0,
                    },
                    machine: MachineDigest::default(),
                });
            }
            self.start(node)?;
        }
        for group in self.groups() {
            self.clients.push(Client {
                leader_hint: None,
                pending: BTreeMap::new(),
                committed_after_heal: false,
            });
            let at = self.now + ms(self.rng.random_range(1..50));
            self.schedule(at, Event::Propose { group });
        }
        if !self.swarm.legacy {
            let mix = self.swarm.mix.to_string();
            self.trace
                .record(self.now, &[0, self.swarm.mix.total() as u64], || {
                    format!("swarm faults={mix}")
                });
        }
        if self.membership.enabled() {
            for group in self.groups() {
                let at = self.now + ms(self.membership.gap_ms());
                self.schedule(at, Event::Membership { group });
            }
        }
        let first_fault = self.now + ms(self.rng.random_range(100..1_000));
        self.schedule(first_fault, Event::Fault);
        self.schedule(self.heal_at, Event::Heal);

        while let Some(Scheduled { at, event, .. }) = self.queue.pop() {
            self.stats.events += 1;
            if self.stats.events > EVENTS_MAX {
                return Err(violation(
                    "liveness",
                    format!("no convergence within {EVENTS_MAX} events"),
                ));
            }
            debug_assert!(at >= self.now, "time went backwards");
            self.now = at;
            if let Some(node) = event.node() {
                let paused_until = self.node(node).paused_until;
                if self.now < paused_until {
                    self.schedule(paused_until, event);
                    continue;
                }
            }
            if let Step::Done = self.dispatch(event)? {
                self.checker.all_acked_stay()?;
                return self.check_committed_bytes();
            }
        }
        Err(violation("liveness", "the event queue ran dry".into()))
    }

    fn dispatch(&mut self, event: Event) -> Result<Step, Violation> {
        match event {
            Event::Deliver(envelope) => self.deliver(envelope)?,
            Event::Timer { node, group, at } => {
                let now = self.now;
                let Some(slot) = self.live_slot(node, group) else {
                    return Ok(Step::Continue);
                };
                if slot.timer_at != at {
                    return Ok(Step::Continue);
                }
                if let Some(replica) = slot.replica.as_mut() {
                    replica.handle_timeout(now);
                }
                self.trace.record(now, &[1, node, group], || {
                    format!("n{node} g{group} timeout")
                });
                self.drain(node, group)?;
            }
            Event::Synced {
                node,
                group,
                incarnation,
                upto,
            } => {
                if self.node(node).incarnation != incarnation {
                    return Ok(Step::Continue);
                }
                self.synced(node, group, upto)?;
            }
            Event::Propose { group } => self.propose(group)?,
            Event::Fault => self.fault()?,
            Event::Restart { node } => {
                if !self.node(node).up {
                    self.start(node)?;
                }
            }
            Event::Heal => self.heal()?,
            Event::LivenessCheck => return self.liveness_check(),
            Event::Membership { group } => self.change_membership(group)?,
        }
        Ok(Step::Continue)
    }

    fn node(&self, node: NodeId) -> &Node {
        &self.nodes[(node - 1) as usize]
    }

    fn node_mut(&mut self, node: NodeId) -> &mut Node {
        &mut self.nodes[(node - 1) as usize]
    }

    /// The slot of a running replica, or `None` if its node is down.
    fn live_slot(&mut self, node: NodeId, group: GroupId) -> Option<&mut Slot> {
        let node = self.node_mut(node);
        if !node.up {
            return None;
        }
        node.slots.get_mut((group - 1) as usize)?.as_mut()
    }

    // ----- processes -----

    /// Starts (or restarts) every replica of `node` from what its disks hold.
    fn start(&mut self, node: NodeId) -> Result<(), Violation> {
        self.node_mut(node).up = true;
        for group in self.groups() {
            let seed = self.rng.next_u64();
            let mut config = Config::new(node, group, self.initial_voters.clone());
            config.canary = self.options.canary;
            config.append_entries_max = self.append_entries_max;
            config.inflight_appends_max = self.inflight_appends_max;
            config.snapshot_chunk_bytes_max = self.snapshot_chunk_bytes_max;
            let now = self.now;
            let canary = self.options.canary;
            let index = (group - 1) as usize;
            let Some(slot) = self.nodes[(node - 1) as usize].slots[index].as_mut() else {
                continue;
            };
            let recovery = slot.disk.recover(canary);
            let upto = recovery.commit.min(recovery.last_index);
            self.checker
                .committed_bytes(group, node, &slot.disk, upto)?;
            if let Some(problem) = recovery.problem {
                return Err(violation(
                    "recovery",
                    format!("group {group} node {node}: {problem}"),
                ));
            }
            slot.machine = MachineDigest::default();
            if let Some(snapshot) = &recovery.recovered.snapshot {
                self.checker.snapshot(group, node, snapshot, "recovered")?;
                slot.machine = MachineDigest::decode(&snapshot.data).unwrap_or_default();
            }
            if let Some(damage) = recovery.damage {
                config.damaged.insert(group, damage);
                self.stats.damaged_starts += 1;
            }
            let replica = Replica::new(config, recovery.recovered, seed, now);
            let status = replica.status();
            slot.replica = Some(replica);
            slot.timer_at = Instant::ZERO;
            slot.view = ReplicaView::new(&status);
            check_recovery(node, group, &status, &slot.disk)?;
            let damage = recovery.damage;
            self.trace.record(now, &[2, node, group, status.term], || {
                format!(
                    "n{node} g{group} start term={} commit={} last={} damage={damage:?}",
                    status.term, status.commit_index, status.last_index
                )
            });
            self.drain(node, group)?;
        }
        Ok(())
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
        let mut torn = 0;
        let canary = self.options.canary;
        for group in self.groups() {
            let unsynced = self
                .live_slot(node, group)
                .map_or(0, |s| s.disk.unsynced.len());
            let survivors = match tear {
                Some((g, k)) if g == group => {
                    torn += 1;
                    Some(k)
                }
                _ if unsynced > 0 && self.rng.random_bool(0.5) => {
                    torn += 1;
                    Some(self.rng.random_range(0..unsynced))
                }
                _ => None,
            };
            let World {
                nodes, rng, stats, ..
            } = self;
            let n = &mut nodes[(node - 1) as usize];
            if !n.up {
                continue;
            }
            if let Some(slot) = n.slots[(group - 1) as usize].as_mut() {
                slot.disk.crash(survivors, rng, canary)?;
                if let Some(replica) = slot.replica.take() {
                    stats.coverage.add_raft(&replica.counters());
                }
            }
        }
        let n = self.node_mut(node);
        n.up = false;
        n.fail_sync = false;
        n.incarnation += 1;
        n.paused_until = Instant::ZERO;
        if torn > 0 {
            *self.stats.faults.entry("torn-write").or_default() += 1;
        }
        for client in &mut self.clients {
            let before = client.pending.len();
            client.pending.retain(|_, p| p.node != node);
            self.stats.proposals_indeterminate += (before - client.pending.len()) as u64;
        }
        let restart_at = self.now + crate::faults::downtime(&mut self.rng);
        self.schedule(restart_at, Event::Restart { node });
        self.trace
            .record(self.now, &[3, node], || format!("n{node} CRASH"));
        Ok(())
    }

    // ----- the replica's outputs, and the checks on every step -----

    /// Collects everything `node`'s replica of `group` has to say after an input, and checks
    /// every invariant that the step could have broken.
    fn drain(&mut self, node: NodeId, group: GroupId) -> Result<(), Violation> {
        let now = self.now;
        let index = (group - 1) as usize;
        let Some(mut slot) = self.node_mut(node).slots[index].take() else {
            return Ok(());
        };
        let result = self.drain_slot(node, group, &mut slot);
        let timer_at = slot.timer_at;
        let new_timer = slot.replica.as_ref().and_then(|replica| {
            let at = replica.poll_timeout().max(now + us(1));
            (at != timer_at).then_some(at)
        });
        if let Some(at) = new_timer {
            slot.timer_at = at;
            self.schedule(at, Event::Timer { node, group, at });
        }
        self.node_mut(node).slots[index] = Some(slot);
        result?;
        let replicas = self.nodes.iter().enumerate().filter(|(_, n)| n.up);
        let replicas = replicas.filter_map(|(i, n)| {
            let replica = n.slots[index].as_ref()?.replica.as_ref()?;
            Some((i as NodeId + 1, replica))
        });
        crate::raft_checks::check_lease(group, node, now, replicas)
    }

    fn drain_slot(
        &mut self,
        node: NodeId,
        group: GroupId,
        slot: &mut Slot,
    ) -> Result<(), Violation> {
        let now = self.now;
        let Some(replica) = slot.replica.as_mut() else {
            return Ok(());
        };
        if slot.disk.note_repair(replica.damaged_from()) {
            self.stats.repairs += 1;
            self.trace.record(now, &[14, node, group], || {
                format!("n{node} g{group} REPAIRED")
            });
        }

        self.take_writes(node, group, slot)?;
        let Some(replica) = slot.replica.as_mut() else {
            return Ok(());
        };

        let mut outbox = Vec::new();
        while let Some(envelope) = replica.poll_message() {
            Checker::sent(&envelope, &slot.disk)?;
            outbox.push(envelope);
        }

        // An installed snapshot replaces the state machine before anything more is applied.
        let term = replica.status().term;
        if let Some(snapshot) = replica.poll_restore() {
            check_restored(&mut self.checker, node, group, &mut slot.view, &snapshot)?;
            slot.machine = MachineDigest::decode(&snapshot.data).unwrap_or_default();
            self.stats.snapshots_installed += 1;
            let index = snapshot.index;
            self.trace.record(now, &[15, node, group, index], || {
                format!("n{node} g{group} RESTORED snapshot at {index}")
            });
        }
        while let Some(entry) = replica.poll_committed() {
            check_applied(&mut self.checker, node, group, &mut slot.view, term, &entry)?;
            slot.machine.apply(&entry);
        }
        let status = replica.status();
        if let Some(every) = self.compact_every
            && status.applied_index >= status.snapshot_index + every
        {
            let index = status.applied_index;
            debug_assert_eq!(slot.machine.index, index, "the machine follows the replica");
            replica
                .compact(index, slot.machine.encode())
                .map_err(|e| violation("committed-prefix", format!("compaction refused: {e}")))?;
            self.stats.snapshots_taken += 1;
            self.trace.record(now, &[16, node, group, index], || {
                format!("n{node} g{group} COMPACTED to {index}")
            });
            // The compaction's write goes out now (after the step's own writes, whose checks
            // come first as before compaction existed).
            self.take_writes(node, group, slot)?;
        }
        let Some(replica) = slot.replica.as_mut() else {
            return Ok(());
        };

        let mut fates = Vec::new();
        while let Some(fate) = replica.poll_proposal() {
            fates.push(fate);
        }

        let nodes = &self.nodes;
        // Commit safety is about the voters of the committing leader's configuration (all the
        // nodes, unless membership changes).
        let voters = replica.latest_membership().1.voters.clone();
        let commit_before = slot.view.commit;
        let logs = |index: Index| {
            let mut logs = Vec::new();
            if voters.contains(&node) {
                logs.push((node, slot.disk.view(index), Some(log_view(replica, index))));
            }
            logs.extend(voters.iter().filter(|n| **n != node).filter_map(|n| {
                let slot = nodes[(*n - 1) as usize].slots[(group - 1) as usize].as_ref()?;
                let memory = slot.replica.as_ref().map(|r| log_view(r, index));
                Some((*n, slot.disk.view(index), memory))
            }));
            logs
        };
        let elected = check_status(
            &mut self.checker,
            node,
            group,
            &mut slot.view,
            replica,
            &slot.disk,
            &logs,
        )?;
        if slot.view.role == Role::Leader && slot.view.commit > commit_before {
            self.check_commit_quorum(node, group, replica, &slot.disk, &voters)?;
        }
        if elected {
            self.tally
                .check_elected(group, node, slot.view.term, &voters)?;
            self.stats.elections += 1;
            let term = slot.view.term;
            self.trace.record(now, &[5, node, group, term], || {
                format!("n{node} g{group} LEADER term={term}")
            });
        }

        for fate in fates {
            if crate::membership::is_membership_proposal(fate.id) || self.abandoned.remove(&fate.id)
            {
                self.trace.record(now, &[10, node, group, fate.id], || {
                    format!(
                        "n{node} g{group} membership #{} {:?}",
                        fate.id, fate.outcome
                    )
                });
                continue;
            }
            self.fate(node, group, fate)?;
        }
        for envelope in outbox {
            self.transmit(envelope);
        }
        Ok(())
    }

    /// Hands the replica's writes to its disk, checking each, and starts a sync if none runs.
    fn take_writes(
        &mut self,
        node: NodeId,
        group: GroupId,
        slot: &mut Slot,
    ) -> Result<(), Violation> {
        let now = self.now;
        let Some(replica) = slot.replica.as_mut() else {
            return Ok(());
        };
        while let Some(write) = replica.poll_write() {
            check_write(&mut self.checker, node, group, &slot.view, replica, &write)?;
            let (id, count) = (write.id, write.entries.len() as u64);
            let first = write.entries.first().map_or(0, |e| e.index);
            let snapshot = write.snapshot.as_ref().map_or(0, |s| s.index);
            let discard = write.discard_log;
            self.trace.record(
                now,
                &[4, node, group, id, first, count, snapshot, discard as u64],
                || {
                    format!(
                        "n{node} g{group} write #{id} entries={count} from={first} hard_state={:?} \
                         snapshot={snapshot} discard_log={discard}",
                        write.hard_state
                    )
                },
            );
            slot.disk.unsynced.push_back(write);
        }
        if !slot.disk.syncing
            && let Some(last) = slot.disk.unsynced.back()
        {
            slot.disk.syncing = true;
            let upto = last.id;
            let n = self.node(node);
            let (lo, hi, incarnation) = (n.fsync_min_us, n.fsync_max_us, n.incarnation);
            let at = now + us(self.rng.random_range(lo..hi));
            self.schedule(
                at,
                Event::Synced {
                    node,
                    group,
                    incarnation,
                    upto,
                },
            );
        }
        Ok(())
    }

    fn synced(&mut self, node: NodeId, group: GroupId, upto: WriteId) -> Result<(), Violation> {
        let now = self.now;
        if self.node(node).up && self.node(node).fail_sync {
            // The fsync failed: the node stops, and nothing is reported synced.
            self.trace.record(now, &[6, node, group, 0], || {
                format!("n{node} g{group} FSYNC FAILED: node stops")
            });
            return self.crash(node);
        }
        let canary = self.options.canary;
        let faults = self.phase == Phase::Faults;
        let World { nodes, rng, .. } = self;
        let n = &mut nodes[(node - 1) as usize];
        let Some(slot) = n.slots[(group - 1) as usize].as_mut().filter(|_| n.up) else {
            return Ok(());
        };
        // A crash while a snapshot is being written is when the order of a write matters
        // most; left to chance it almost never happens, so it is a fault of its own.
        if let Some((at, discard)) = slot.disk.snapshot_write(upto)
            && faults
            && rng.random_bool(if discard { 0.25 } else { 0.02 })
        {
            *self.stats.faults.entry("snapshot-crash").or_default() += 1;
            self.trace.record(now, &[6, node, group, u64::MAX], || {
                format!("n{node} g{group} CRASH while writing a snapshot")
            });
            return self.crash_tearing(node, Some((group, at)));
        }
        let report = slot.disk.sync(upto, rng, canary)?;
        slot.disk.syncing = false;
        if let Some(replica) = slot.replica.as_mut() {
            replica.persisted(now, report);
        }
        self.trace.record(now, &[6, node, group, upto], || {
            format!("n{node} g{group} synced #{upto}")
        });
        self.drain(node, group)
    }

    /// At the end of a run: every replica's disk holds exactly the committed records up to
    /// what it knows committed and durable (unless a fault changed bytes nobody read yet).
    fn check_committed_bytes(&self) -> Result<(), Violation> {
        for (n, node) in self.nodes.iter().enumerate() {
            for (g, slot) in node.slots.iter().enumerate() {
                let Some(slot) = slot.as_ref().filter(|s| !s.disk.hit) else {
                    continue;
                };
                let Some(status) = slot.replica.as_ref().map(Replica::status) else {
                    continue;
                };
                let upto = status.commit_index.min(status.durable_index);
                self.checker.committed_bytes(
                    g as GroupId + 1,
                    n as NodeId + 1,
                    &slot.disk,
                    upto,
                )?;
            }
        }
        Ok(())
    }

    // ----- network -----

    fn transmit(&mut self, envelope: Envelope) {
        if let Message::InstallSnapshot { .. } = envelope.message {
            self.stats.snapshot_chunks += 1;
        }
        let (from, to) = (envelope.from, envelope.to);
        let lost = self.network.is_blocked(from, to)
            || (self.network.loss_ppm > 0
                && self.rng.random_range(0..1_000_000) < self.network.loss_ppm);
        if lost {
            self.stats.messages_lost += 1;
            self.trace
                .record(self.now, &[7, from, to, envelope.group], || {
                    format!(
                        "n{from}->n{to} g{} LOST {}",
                        envelope.group,
                        describe(&envelope.message)
                    )
                });
            return;
        }
        let duplicated = self.network.duplicate_ppm > 0
            && self.rng.random_range(0..1_000_000) < self.network.duplicate_ppm;
        if duplicated {
            let at = self.now + self.delay();
            self.schedule(at, Event::Deliver(envelope.clone()));
        }
        if self.network.late_ppm > 0 && self.rng.random_range(0..1_000_000) < self.network.late_ppm
        {
            let at = self.now + crate::faults::late_delay(&mut self.rng);
            self.schedule(at, Event::Deliver(envelope.clone()));
        }
        let at = self.now + self.delay();
        self.schedule(at, Event::Deliver(envelope));
    }

    fn delay(&mut self) -> Duration {
        let (lo, hi) = (self.network.delay_min_us, self.network.delay_max_us);
        let delay = self.rng.random_range(lo..=hi);
        // A long tail reorders messages even on a calm network.
        if self.rng.random_bool(0.02) {
            us(delay * 10)
        } else {
            us(delay)
        }
    }

    fn deliver(&mut self, envelope: Envelope) -> Result<(), Violation> {
        let now = self.now;
        let Envelope {
            group,
            from,
            to,
            message,
        } = envelope;
        let (kind, term, detail) = fields(&message);
        let node = &mut self.nodes[(to - 1) as usize];
        let replica = node
            .slots
            .get_mut((group - 1) as usize)
            .and_then(|s| s.as_mut())
            .and_then(|s| s.replica.as_mut())
            .filter(|_| node.up);
        let Some(replica) = replica else {
            self.stats.messages_lost += 1;
            return Ok(());
        };
        self.trace
            .record(now, &[8, from, to, group, kind, term, detail], || {
                format!("n{from}->n{to} g{group} {}", describe(&message))
            });
        if let Message::VoteResponse { .. } = message {
            let envelope = Envelope {
                group,
                from,
                to,
                message,
            };
            self.tally.delivered(&envelope);
            replica.step(now, from, envelope.message);
        } else {
            replica.step(now, from, message);
        }
        self.stats.messages_delivered += 1;
        self.drain(to, group)
    }
}
