//! One simulated run: a cluster of nodes hosting replicas of every group, a network, disks,
//! clients, and a fault schedule, all driven by one seed through a discrete-event queue.
//!
//! The run has two phases, as TigerBeetle's simulator does: a safety phase in which faults
//! are injected while every step is checked, then a liveness phase in which everything heals
//! and the cluster must converge within a bounded simulated time.

use std::collections::BTreeMap;

use holdfast_core::raft::{
    Config, Envelope, GroupId, Index, Message, NodeId, ProposalId, Replica, Role, WriteId,
};
use holdfast_core::time::Instant;
use rand::{Rng, RngExt};

use crate::checker::{Checker, MachineDigest, Violation, violation};
use crate::disk::Disk;
use crate::kernel::{Kernel, KernelEvent, Workload, ms, us};
use crate::options::Options;
use crate::raft_checks::{
    ReplicaView, check_applied, check_recovery, check_restored, check_status, check_write, log_view,
};

mod client;
mod faults;
mod membership;
mod render;

use render::{describe, fields};

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
            world.k.stats.coverage.add_raft(&replica.counters());
        }
    }
    world.k.stats.entries_committed = (1..=options.groups as GroupId)
        .map(|g| world.checker.committed(g))
        .sum();
    world.k.outcome(result)
}

enum Event {
    Kernel(KernelEvent),
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
    LivenessCheck,
    /// Ask the group's leader for a membership change.
    Membership {
        group: GroupId,
    },
}

impl From<KernelEvent> for Event {
    fn from(event: KernelEvent) -> Event {
        Event::Kernel(event)
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

/// What the Raft workload runs on a node: one replica of every group.
struct Node {
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

enum Step {
    Continue,
    Done,
}

struct World {
    k: Kernel<Event>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    next_proposal: ProposalId,
    checker: Checker,
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

crate::kernel_deref!(World, Event);

impl World {
    fn new(options: Options) -> World {
        let membership = crate::membership::Plan::new(options.seed, options.nodes);
        let initial_voters: Vec<NodeId> = (1..=options.nodes as NodeId).collect();
        let all = options.nodes + membership.spare_nodes();
        World {
            k: Kernel::new(options, all),
            nodes: Vec::new(),
            clients: Vec::new(),
            next_proposal: 1,
            checker: Checker::default(),
            append_entries_max: 64,
            inflight_appends_max: 8,
            compact_every: None,
            snapshot_chunk_bytes_max: 1 << 20,
            initial_voters,
            membership,
            tally: crate::membership::Tally::default(),
            abandoned: std::collections::BTreeSet::new(),
        }
    }

    fn groups(&self) -> impl Iterator<Item = GroupId> + use<> {
        1..=self.k.options.groups as GroupId
    }

    fn run(&mut self) -> Result<(), Violation> {
        self.append_entries_max = [1, 4, 64][self.k.rng.random_range(0..3)];
        self.inflight_appends_max = [1, 2, 8][self.k.rng.random_range(0..3)];
        // A fifth of the seeds never compact, so runs without snapshots stay exercised as
        // before; the rest compact often enough that followers lagging behind a partition or
        // a crash must be sent a snapshot.
        self.compact_every =
            [None, Some(5), Some(12), Some(30), Some(100)][self.k.rng.random_range(0..5)];
        self.snapshot_chunk_bytes_max = [3, 8, 1 << 20][self.k.rng.random_range(0..3)];
        self.checker.digest_snapshots = true;
        let (batch, window) = (self.append_entries_max, self.inflight_appends_max);
        let (every, chunk) = (self.compact_every, self.snapshot_chunk_bytes_max);
        self.k.trace.record(
            self.k.now,
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
        for _ in &self.k.node_ids {
            let slots = self.groups().map(|_| None).collect();
            self.nodes.push(Node { slots });
        }
        for node in self.k.node_ids.clone() {
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
                        continued: None,
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
            let at = self.k.now + ms(self.k.rng.random_range(1..50));
            self.k.schedule(at, Event::Propose { group });
        }
        if !self.k.swarm.legacy {
            let mix = self.k.swarm.mix.to_string();
            self.k
                .trace
                .record(self.k.now, &[0, self.k.swarm.mix.total() as u64], || {
                    format!("swarm faults={mix}")
                });
        }
        if self.membership.enabled() {
            for group in self.groups() {
                let at = self.k.now + ms(self.membership.gap_ms());
                self.k.schedule(at, Event::Membership { group });
            }
        }
        self.schedule_faults();
        self.run_events()
    }

    fn dispatch_event(&mut self, event: Event) -> Result<Step, Violation> {
        match event {
            Event::Kernel(event) => self.kernel_event(event)?,
            Event::Deliver(envelope) => self.deliver(envelope)?,
            Event::Timer { node, group, at } => {
                let now = self.k.now;
                let Some(slot) = self.live_slot(node, group) else {
                    return Ok(Step::Continue);
                };
                if slot.timer_at != at {
                    return Ok(Step::Continue);
                }
                if let Some(replica) = slot.replica.as_mut() {
                    replica.handle_timeout(now);
                }
                self.k.trace.record(now, &[1, node, group], || {
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
                if self.host(node).incarnation != incarnation {
                    return Ok(Step::Continue);
                }
                self.synced(node, group, upto)?;
            }
            Event::Propose { group } => self.propose(group)?,
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
        if !self.host(node).up {
            return None;
        }
        self.node_mut(node)
            .slots
            .get_mut((group - 1) as usize)?
            .as_mut()
    }
}

impl Workload for World {
    type Event = Event;

    fn event_node(event: &Event) -> Option<NodeId> {
        match event {
            Event::Deliver(envelope) => Some(envelope.to),
            Event::Timer { node, .. } | Event::Synced { node, .. } => Some(*node),
            _ => None,
        }
    }

    fn dispatch(&mut self, event: Event) -> Result<bool, Violation> {
        Ok(matches!(self.dispatch_event(event)?, Step::Done))
    }

    fn finish(&mut self) -> Result<(), Violation> {
        self.checker.all_acked_stay()?;
        self.check_committed_bytes()
    }

    fn group_ids(&self) -> Vec<GroupId> {
        self.groups().collect()
    }

    fn disk(&self, node: NodeId, group: GroupId) -> Option<&Disk> {
        let slot = self.node(node).slots.get((group - 1) as usize)?;
        slot.as_ref().map(|s| &s.disk)
    }

    fn disk_mut(&mut self, node: NodeId, group: GroupId) -> Option<&mut Disk> {
        let slot = self.node_mut(node).slots.get_mut((group - 1) as usize)?;
        slot.as_mut().map(|s| &mut s.disk)
    }

    fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            let replica = n.slots[(group - 1) as usize].as_ref()?.replica.as_ref()?;
            let node = i as NodeId + 1;
            (self.host(node).up && replica.status().role == Role::Leader).then_some(node)
        })
    }

    /// Counted against the initial nodes: spare nodes added by membership changes do not make
    /// room for more damage than the smallest configuration survives.
    fn damage_quorum(&self) -> usize {
        self.initial_voters.len()
    }

    fn healed(&mut self) -> Result<(), Violation> {
        let at = self.k.now + ms(LIVENESS_CHECK_INTERVAL_MS);
        self.k.schedule(at, Event::LivenessCheck);
        Ok(())
    }

    /// Starts (or restarts) every replica of `node` from what its disks hold.
    fn start(&mut self, node: NodeId) -> Result<(), Violation> {
        self.host_mut(node).up = true;
        for group in self.groups() {
            let seed = self.k.rng.next_u64();
            let mut config = Config::new(node, group, self.initial_voters.clone());
            config.canary = self.k.options.canary;
            config.append_entries_max = self.append_entries_max;
            config.inflight_appends_max = self.inflight_appends_max;
            config.snapshot_chunk_bytes_max = self.snapshot_chunk_bytes_max;
            let now = self.k.now;
            let canary = self.k.options.canary;
            let index = (group - 1) as usize;
            let Some(slot) = self.nodes[(node - 1) as usize].slots[index].as_mut() else {
                continue;
            };
            let (checker, stats) = (&mut self.checker, &mut self.k.stats);
            let recovery =
                crate::kernel::recover(checker, stats, node, group, &mut slot.disk, canary)?;
            slot.machine = recovery
                .recovered
                .snapshot
                .as_ref()
                .and_then(|snapshot| MachineDigest::decode(&snapshot.data))
                .unwrap_or_default();
            if let Some(damage) = recovery.damage {
                config.damaged.insert(group, damage);
            }
            let replica = Replica::new(config, recovery.recovered, seed, now);
            let status = replica.status();
            slot.replica = Some(replica);
            slot.timer_at = Instant::ZERO;
            slot.view = ReplicaView::new(&status);
            check_recovery(node, group, &status, &slot.disk)?;
            let damage = recovery.damage;
            self.k
                .trace
                .record(now, &[2, node, group, status.term], || {
                    format!(
                        "n{node} g{group} start term={} commit={} last={} damage={damage:?}",
                        status.term, status.commit_index, status.last_index
                    )
                });
            self.drain(node, group)?;
        }
        Ok(())
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
                .live_slot(node, group)
                .map_or(0, |s| s.disk.unsynced.len());
            let tear = tear.filter(|(g, _)| *g == group).map(|(_, k)| k);
            let survivors = self.tear_point(tear, unsynced);
            torn |= survivors.is_some();
            if !self.host(node).up {
                continue;
            }
            let World { nodes, k, .. } = self;
            if let Some(slot) = nodes[(node - 1) as usize].slots[(group - 1) as usize].as_mut() {
                slot.disk.crash(survivors, &mut k.rng, canary)?;
                if let Some(replica) = slot.replica.take() {
                    k.stats.coverage.add_raft(&replica.counters());
                }
            }
        }
        for client in &mut self.clients {
            let before = client.pending.len();
            client.pending.retain(|_, p| p.node != node);
            self.k.stats.proposals_indeterminate += (before - client.pending.len()) as u64;
        }
        self.crashed(node, torn);
        Ok(())
    }
}

impl World {
    // ----- the replica's outputs, and the checks on every step -----

    /// Collects everything `node`'s replica of `group` has to say after an input, and checks
    /// every invariant that the step could have broken.
    fn drain(&mut self, node: NodeId, group: GroupId) -> Result<(), Violation> {
        let now = self.k.now;
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
            self.k.schedule(at, Event::Timer { node, group, at });
        }
        self.node_mut(node).slots[index] = Some(slot);
        result?;
        let hosts = &self.k.hosts;
        let replicas = self.nodes.iter().enumerate().filter(|(i, _)| hosts[*i].up);
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
        let now = self.k.now;
        let Some(replica) = slot.replica.as_mut() else {
            return Ok(());
        };
        if slot.disk.note_repair(replica.damaged_from()) {
            self.k.stats.repairs += 1;
            self.k.trace.record(now, &[14, node, group], || {
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
            self.checker.voted(&envelope)?;
            outbox.push(envelope);
        }

        // An installed snapshot replaces the state machine before anything more is applied.
        let term = replica.status().term;
        if let Some(snapshot) = replica.poll_restore() {
            check_restored(&mut self.checker, node, group, &mut slot.view, &snapshot)?;
            slot.machine = MachineDigest::decode(&snapshot.data).unwrap_or_default();
            self.k.stats.snapshots_installed += 1;
            let index = snapshot.index;
            self.k.trace.record(now, &[15, node, group, index], || {
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
            self.k.stats.snapshots_taken += 1;
            self.k.trace.record(now, &[16, node, group, index], || {
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
            self.k.stats.elections += 1;
            let term = slot.view.term;
            self.k.trace.record(now, &[5, node, group, term], || {
                format!("n{node} g{group} LEADER term={term}")
            });
        }

        for fate in fates {
            if crate::membership::is_membership_proposal(fate.id) || self.abandoned.remove(&fate.id)
            {
                self.k.trace.record(now, &[10, node, group, fate.id], || {
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
        let now = self.k.now;
        let Some(replica) = slot.replica.as_mut() else {
            return Ok(());
        };
        while let Some(write) = replica.poll_write() {
            check_write(&mut self.checker, node, group, &slot.view, replica, &write)?;
            let (id, count) = (write.id, write.entries.len() as u64);
            let first = write.entries.first().map_or(0, |e| e.index);
            let snapshot = write.snapshot.as_ref().map_or(0, |s| s.index);
            let discard = write.discard_log;
            self.k.trace.record(
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
            let incarnation = self.host(node).incarnation;
            let at = self.fsync_done_at(node);
            self.k.schedule(
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
        let now = self.k.now;
        if self.sync_failed(node, group) {
            // The fsync failed: the node stops, and nothing is reported synced.
            return self.crash(node);
        }
        let canary = self.k.options.canary;
        if !self.host(node).up {
            return Ok(());
        }
        let World { nodes, k, .. } = self;
        let Some(slot) = nodes[(node - 1) as usize].slots[(group - 1) as usize].as_mut() else {
            return Ok(());
        };
        if let Some(at) = k.snapshot_crash(node, group, &slot.disk, upto) {
            return self.crash_tearing(node, Some((group, at)));
        }
        let report = slot.disk.sync(upto, &mut k.rng, canary)?;
        slot.disk.syncing = false;
        if let Some(replica) = slot.replica.as_mut() {
            replica.persisted(now, report);
        }
        self.k.trace.record(now, &[6, node, group, upto], || {
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
            self.k.stats.snapshot_chunks += 1;
        }
        let (from, to) = (envelope.from, envelope.to);
        let copies = self.route(Some((from, to)));
        if copies.is_empty() {
            self.k
                .trace
                .record(self.k.now, &[7, from, to, envelope.group], || {
                    format!(
                        "n{from}->n{to} g{} LOST {}",
                        envelope.group,
                        describe(&envelope.message)
                    )
                });
            return;
        }
        let now = self.k.now;
        copies.deliver(envelope, |delay, copy| {
            self.k.schedule(now + delay, Event::Deliver(copy))
        });
    }

    fn deliver(&mut self, envelope: Envelope) -> Result<(), Violation> {
        let now = self.k.now;
        let Envelope {
            group,
            from,
            to,
            message,
        } = envelope;
        let (kind, term, detail) = fields(&message);
        let up = self.host(to).up;
        let node = &mut self.nodes[(to - 1) as usize];
        let replica = node
            .slots
            .get_mut((group - 1) as usize)
            .and_then(|s| s.as_mut())
            .and_then(|s| s.replica.as_mut())
            .filter(|_| up);
        let Some(replica) = replica else {
            self.k.stats.messages_lost += 1;
            return Ok(());
        };
        self.k
            .trace
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
        self.k.stats.messages_delivered += 1;
        self.drain(to, group)
    }
}
