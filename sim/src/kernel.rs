//! The simulated cluster both workloads run on: one clock and event queue, one network model,
//! one set of processes (up, paused, crashed, slow or failing disks) and one fault injector.
//! A workload (the Raft replicas of `world`, the broker nodes of `queue`) says only what runs
//! on a node and which checkers apply; it reaches the kernel through `Deref`, so a fault is
//! added here once and both workloads meet it.

use std::collections::BinaryHeap;
use std::ops::DerefMut;
use std::time::Duration;

use holdfast_core::raft::{GroupId, NodeId};
use holdfast_core::time::Instant;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::{Violation, violation};
use crate::disk::Disk;
use crate::faults::{self, FaultScript, NodeFault};
use crate::network::Network;
use crate::options::Options;
use crate::swarm::Swarm;
use crate::trace::Trace;
use crate::world::Stats;

/// A run that has not finished after this many events is stuck; it fails as a liveness bug.
pub const EVENTS_MAX: u64 = 20_000_000;

pub fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

pub fn us(us: u64) -> Duration {
    Duration::from_micros(us)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Faults,
    Liveness,
}

/// The events the kernel itself schedules; each workload's event type carries them.
pub enum KernelEvent {
    Fault,
    Restart { node: NodeId },
    Heal,
}

/// The event queue's entry: when, and in which order among events of the same instant. The
/// event itself waits in a slab, so the heap moves 24 bytes, not a whole request.
struct Scheduled {
    at: Instant,
    seq: u64,
    slot: usize,
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

/// Future events, earliest first, ties in scheduling order.
struct EventQueue<E> {
    seq: u64,
    heap: BinaryHeap<Scheduled>,
    slab: Vec<Option<E>>,
    free: Vec<usize>,
}

impl<E> EventQueue<E> {
    fn new() -> Self {
        EventQueue {
            seq: 0,
            heap: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
        }
    }

    fn push(&mut self, at: Instant, event: E) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot] = Some(event);
                slot
            }
            None => {
                self.slab.push(Some(event));
                self.slab.len() - 1
            }
        };
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            slot,
        });
    }

    fn pop(&mut self) -> Option<(Instant, E)> {
        let Scheduled { at, slot, .. } = self.heap.pop()?;
        self.free.push(slot);
        let event = self.slab[slot].take()?;
        Some((at, event))
    }
}

/// A node's process and the machine under it, whatever the workload runs there.
pub struct Host {
    pub up: bool,
    /// Bumped on every crash, so a sync that completes after a crash is ignored.
    pub incarnation: u64,
    pub paused_until: Instant,
    pub fsync_us: (u64, u64),
    /// The next fsync fails (I/O error or disk full): the node stops instead.
    pub fail_sync: bool,
}

impl Host {
    fn new() -> Host {
        Host {
            up: false,
            incarnation: 0,
            paused_until: Instant::ZERO,
            fsync_us: faults::FSYNC_US,
            fail_sync: false,
        }
    }
}

/// Where copies of one message go: up to three arrival delays (a duplicate, a late copy, the
/// message itself), none if the network lost it.
pub struct Copies {
    delays: [Duration; 3],
    len: usize,
}

impl Copies {
    pub fn iter(&self) -> impl Iterator<Item = Duration> + '_ {
        self.delays[..self.len].iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Hands `message` to `send` once per copy, in order, with its delay: clones for all but
    /// the last copy, which takes the message itself (a clone copies every entry it carries,
    /// and most messages have one copy).
    pub fn deliver<T: Clone>(&self, message: T, mut send: impl FnMut(Duration, T)) {
        let Some((last, earlier)) = self.delays[..self.len].split_last() else {
            return;
        };
        for delay in earlier {
            send(*delay, message.clone());
        }
        send(*last, message);
    }
}

pub struct Kernel<E> {
    pub options: Options,
    pub rng: ChaCha8Rng,
    /// Fault decisions, when a script chooses them; else `rng` does.
    pub fault_script: Option<FaultScript>,
    /// What this seed explores (its fault mix, pipelining, batch size), and how many faults
    /// were drawn so far.
    pub swarm: Swarm,
    pub faults_drawn: u64,
    pub now: Instant,
    events: EventQueue<E>,
    /// Every node, spare nodes of membership changes included.
    pub node_ids: Vec<NodeId>,
    /// Indexed by node - 1.
    pub hosts: Vec<Host>,
    pub network: Network,
    pub trace: Trace,
    pub stats: Stats,
    pub phase: Phase,
    pub heal_at: Instant,
    pub deadline: Instant,
}

/// Where fault decisions come from: a script if given; else, unless the fixed mix asks for the
/// shared RNG as before, an RNG of their own (an empty script falls back to one), so that
/// leaving a fault out (`only_faults`) changes none of the others.
fn fault_source(options: &Options) -> Option<FaultScript> {
    let legacy = options.swarm().legacy;
    match &options.fault_script {
        Some(bytes) => Some(FaultScript::new(bytes.clone(), options.seed)),
        None if !legacy => Some(FaultScript::new(Vec::new(), options.seed)),
        None => None,
    }
}

impl<E: From<KernelEvent>> Kernel<E> {
    pub fn new(options: Options, nodes: usize) -> Kernel<E> {
        let heal_at = Instant::ZERO + ms(options.fault_phase_ms);
        let deadline = heal_at + ms(options.liveness_limit_ms);
        Kernel {
            rng: ChaCha8Rng::seed_from_u64(options.seed),
            fault_script: fault_source(&options),
            swarm: options.swarm(),
            faults_drawn: 0,
            now: Instant::ZERO,
            events: EventQueue::new(),
            node_ids: (1..=nodes as NodeId).collect(),
            hosts: (0..nodes).map(|_| Host::new()).collect(),
            network: Network::calm(),
            trace: Trace::new(options.trace),
            stats: Stats::default(),
            phase: Phase::Faults,
            heal_at,
            deadline,
            options,
        }
    }

    pub fn schedule(&mut self, at: Instant, event: E) {
        self.events.push(at, event);
    }

    pub fn host(&self, node: NodeId) -> &Host {
        &self.hosts[(node - 1) as usize]
    }

    pub fn host_mut(&mut self, node: NodeId) -> &mut Host {
        &mut self.hosts[(node - 1) as usize]
    }

    /// The first fault, and the healing that ends the fault phase.
    pub fn schedule_faults(&mut self) {
        let first_fault = self.now + ms(self.rng.random_range(100..1_000));
        self.schedule(first_fault, KernelEvent::Fault.into());
        self.schedule(self.heal_at, KernelEvent::Heal.into());
    }

    /// Whether the network loses a message (a partition too, for `link`s between nodes), and
    /// otherwise when each copy arrives: it may be duplicated, and a message between nodes may
    /// also arrive once more much later (`late-messages`).
    pub fn route(&mut self, link: Option<(NodeId, NodeId)>) -> Copies {
        let mut copies = Copies {
            delays: [Duration::ZERO; 3],
            len: 0,
        };
        let blocked = link.is_some_and(|(from, to)| self.network.is_blocked(from, to));
        let lost = blocked
            || (self.network.loss_ppm > 0
                && self.rng.random_range(0..1_000_000) < self.network.loss_ppm);
        if lost {
            self.stats.messages_lost += 1;
            return copies;
        }
        let mut add = |delay| {
            copies.delays[copies.len] = delay;
            copies.len += 1;
        };
        if self.network.duplicate_ppm > 0
            && self.rng.random_range(0..1_000_000) < self.network.duplicate_ppm
        {
            add(self.delay());
        }
        if link.is_some()
            && self.network.late_ppm > 0
            && self.rng.random_range(0..1_000_000) < self.network.late_ppm
        {
            add(faults::late_delay(&mut self.rng));
        }
        add(self.delay());
        copies
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

    /// When an fsync of `node` started now completes.
    pub fn fsync_done_at(&mut self, node: NodeId) -> Instant {
        let (lo, hi) = self.host(node).fsync_us;
        self.now + us(self.rng.random_range(lo..hi))
    }

    /// Marks `node` crashed and schedules its restart; the workload has dropped its process.
    pub fn crashed(&mut self, node: NodeId, torn: bool) {
        let host = self.host_mut(node);
        host.up = false;
        host.fail_sync = false;
        host.incarnation += 1;
        host.paused_until = Instant::ZERO;
        if torn {
            *self.stats.faults.entry("torn-write").or_default() += 1;
        }
        let restart_at = self.now + faults::downtime(&mut self.rng);
        self.schedule(restart_at, KernelEvent::Restart { node }.into());
        self.trace
            .record(self.now, &[3, node], || format!("n{node} CRASH"));
    }

    /// How many of `unsynced` writes a crash lets land before it tears the next: the given
    /// `tear`, or, for half the disks with writes in flight, a random point.
    pub fn tear_point(&mut self, tear: Option<usize>, unsynced: usize) -> Option<usize> {
        match tear {
            Some(k) => Some(k),
            None if unsynced > 0 && self.rng.random_bool(0.5) => {
                Some(self.rng.random_range(0..unsynced))
            }
            None => None,
        }
    }

    /// A crash while a snapshot is being written is when the order of a write matters most;
    /// left to chance it almost never happens, so it is a fault of its own. Whether a sync up
    /// to `upto` on `disk` crashes so: `Some(k)` lands the first `k` writes and tears the next.
    pub fn snapshot_crash(
        &mut self,
        node: NodeId,
        group: GroupId,
        disk: &Disk,
        upto: holdfast_core::raft::WriteId,
    ) -> Option<usize> {
        let (at, discard) = disk.snapshot_write(upto)?;
        let faults = self.phase == Phase::Faults;
        if !(faults && self.rng.random_bool(if discard { 0.25 } else { 0.02 })) {
            return None;
        }
        *self.stats.faults.entry("snapshot-crash").or_default() += 1;
        self.trace
            .record(self.now, &[6, node, group, u64::MAX], || {
                format!("n{node} g{group} CRASH while writing a snapshot")
            });
        Some(at)
    }

    /// Records a failed fsync of `node`: the node must stop, as a crash.
    pub fn sync_failed(&mut self, node: NodeId, group: GroupId) -> bool {
        if !(self.host(node).up && self.host(node).fail_sync) {
            return false;
        }
        self.trace.record(self.now, &[6, node, group, 0], || {
            format!("n{node} g{group} FSYNC FAILED: node stops")
        });
        true
    }

    fn next_fault(&mut self) {
        let gap_ms = match self.fault_script.as_mut() {
            Some(script) => script.random_range(20..600),
            None => self.rng.random_range(20..600),
        };
        let at = self.now + ms(gap_ms);
        if at < self.heal_at {
            self.schedule(at, KernelEvent::Fault.into());
        }
    }

    /// The end of the fault phase: the network heals and every disk is fast again; the
    /// workload restarts what is down.
    fn heal(&mut self) {
        self.phase = Phase::Liveness;
        self.network.heal();
        self.trace
            .record(self.now, &[12], || "HEAL: liveness phase".into());
        for host in &mut self.hosts {
            host.fsync_us = faults::FSYNC_US;
        }
    }
}

impl<E> Kernel<E> {
    /// The run's outcome, once the workload has added its own figures to the stats.
    pub fn outcome(&mut self, result: Result<(), Violation>) -> crate::world::Outcome {
        self.stats.simulated_us = self.now.as_micros();
        self.stats.faults_drawn = self.faults_drawn;
        let violation = result.err().map(|v| (self.now, v));
        if let Some((at, v)) = &violation {
            let (checker, detail) = (v.checker, v.detail.clone());
            self.trace.record(*at, &[u64::MAX], || {
                format!("VIOLATION {checker}: {detail}")
            });
        }
        let trace = std::mem::replace(&mut self.trace, Trace::new(false));
        crate::world::Outcome {
            seed: self.options.seed,
            violation,
            stats: std::mem::take(&mut self.stats),
            trace_hash: trace.hash(),
            trace: trace.into_lines(),
        }
    }
}

/// Reads `node`'s replica of `group` back from its disk after a start or a crash, with the
/// checks every workload makes of it: the committed records it holds are the committed ones,
/// recovery found nothing it should not have, and a recovered snapshot is the group's.
pub fn recover(
    checker: &mut crate::checker::Checker,
    stats: &mut Stats,
    node: NodeId,
    group: GroupId,
    disk: &mut Disk,
    canary: Option<holdfast_core::raft::Canary>,
) -> Result<crate::disk::Recovery, Violation> {
    let recovery = disk.recover(canary);
    let upto = recovery.commit.min(recovery.last_index);
    checker.committed_bytes(group, node, disk, upto)?;
    if let Some(problem) = &recovery.problem {
        return Err(violation(
            "recovery",
            format!("group {group} node {node}: {problem}"),
        ));
    }
    if let Some(snapshot) = &recovery.recovered.snapshot {
        checker.snapshot(group, node, snapshot, "recovered")?;
    }
    if recovery.damage.is_some() {
        stats.damaged_starts += 1;
    }
    Ok(recovery)
}

/// What a workload puts on the kernel's nodes.
pub trait Workload: DerefMut<Target = Kernel<Self::Event>> {
    type Event: From<KernelEvent>;

    /// The node whose process handles this event, if any; a paused node handles none.
    fn event_node(event: &Self::Event) -> Option<NodeId>;
    /// Handles a workload event; true when the run is over.
    fn dispatch(&mut self, event: Self::Event) -> Result<bool, Violation>;
    /// The checks of a run that converged.
    fn finish(&mut self) -> Result<(), Violation>;

    /// Starts (or restarts) `node`'s process from what its disks hold.
    fn start(&mut self, node: NodeId) -> Result<(), Violation>;
    /// Crashes `node`; `tear = Some((group, k))` makes that group's disk land its first `k`
    /// unsynced writes and tear the next.
    fn crash_tearing(
        &mut self,
        node: NodeId,
        tear: Option<(GroupId, usize)>,
    ) -> Result<(), Violation>;
    /// The groups each node hosts a replica of.
    fn group_ids(&self) -> Vec<GroupId>;
    fn disk_mut(&mut self, node: NodeId, group: GroupId) -> Option<&mut Disk>;
    fn disk(&self, node: NodeId, group: GroupId) -> Option<&Disk>;
    /// The running node that leads `group`, if one does.
    fn leader(&self, group: GroupId) -> Option<NodeId>;
    /// How many damaged replicas a group survives: fewer than half of this many nodes.
    fn damage_quorum(&self) -> usize;
    /// Whether the workload runs consumer processes (the fixed mix crashes them apart from the
    /// other faults).
    const HAS_CONSUMERS: bool = false;
    /// A consumer process dies, if the workload has one up; false if nothing happened.
    fn crash_consumer(&mut self) -> Result<bool, Violation> {
        Ok(false)
    }
    /// After the kernel healed: restart whatever else the workload keeps.
    fn healed(&mut self) -> Result<(), Violation> {
        Ok(())
    }

    fn crash(&mut self, node: NodeId) -> Result<(), Violation> {
        self.crash_tearing(node, None)
    }

    /// Whether corrupting `node`'s replica of `group` leaves a majority of the group's
    /// replicas undamaged: corruption of a majority is beyond what any design survives, so
    /// a failure under it would prove nothing.
    fn may_damage(&self, node: NodeId, group: GroupId) -> bool {
        let damaged = |n: NodeId| self.disk(n, group).is_some_and(Disk::is_damaged);
        if damaged(node) {
            return true;
        }
        let others = self.node_ids.iter().filter(|n| damaged(**n)).count();
        others < (self.damage_quorum() - 1) / 2
    }

    /// Runs the event loop to the end: a violation, a stuck run, or convergence.
    fn run_events(&mut self) -> Result<(), Violation> {
        while let Some((at, event)) = self.events.pop() {
            self.stats.events += 1;
            if self.stats.events > EVENTS_MAX {
                return Err(violation(
                    "liveness",
                    format!("no convergence within {EVENTS_MAX} events"),
                ));
            }
            debug_assert!(at >= self.now, "time went backwards");
            self.now = at;
            if let Some(node) = Self::event_node(&event) {
                let paused_until = self.host(node).paused_until;
                if self.now < paused_until {
                    self.schedule(paused_until, event);
                    continue;
                }
            }
            if self.dispatch(event)? {
                return self.finish();
            }
        }
        Err(violation("liveness", "the event queue ran dry".into()))
    }

    /// Handles one of the kernel's own events.
    fn kernel_event(&mut self, event: KernelEvent) -> Result<(), Violation> {
        match event {
            KernelEvent::Fault => self.fault(),
            KernelEvent::Restart { node } if !self.host(node).up => self.start(node),
            KernelEvent::Restart { .. } => Ok(()),
            KernelEvent::Heal => {
                self.heal();
                for node in self.node_ids.clone() {
                    if !self.host(node).up {
                        self.start(node)?;
                    }
                }
                self.healed()
            }
        }
    }

    /// Draws the next fault by the seed's mix and applies it.
    fn fault(&mut self) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        let number = self.faults_drawn;
        self.faults_drawn += 1;
        let applies = self.options.applies_fault(number);
        // The fixed mix of the queue workload: one fault in eight takes a consumer down
        // instead of a node or a link (a swarm mix weighs consumer crashes with the rest).
        let consumer_roll = Self::HAS_CONSUMERS && self.swarm.legacy && self.rng.random_bool(0.125);
        let kind = if consumer_roll {
            if !applies || !self.crash_consumer()? {
                self.next_fault();
                return Ok(());
            }
            "consumer-crash"
        } else {
            match self.draw_fault(applies)? {
                Some(kind) => kind,
                None => {
                    self.next_fault();
                    return Ok(());
                }
            }
        };
        *self.stats.faults.entry(kind).or_default() += 1;
        let kernel: &mut Kernel<Self::Event> = self;
        let blocked = &kernel.network.blocked;
        kernel
            .trace
            .record(kernel.now, &[11, kind.len() as u64], || {
                format!("FAULT #{number} {kind} blocked={blocked:?}")
            });
        self.next_fault();
        Ok(())
    }

    /// Draws one fault from the mix and applies it (unless `applies` is false); its kind, or
    /// `None` if it was left out or found nothing to act on.
    fn draw_fault(&mut self, applies: bool) -> Result<Option<&'static str>, Violation> {
        // A fault left out (`only_faults`) is drawn all the same, on a copy of the network,
        // so the faults after it stay what they were.
        let kernel: &mut Kernel<Self::Event> = self;
        let mut scratch = kernel.network.clone();
        let network = if applies {
            &mut kernel.network
        } else {
            &mut scratch
        };
        let mix = &kernel.swarm.mix;
        let (kind, node_fault) = match kernel.fault_script.as_mut() {
            Some(script) => faults::draw(script, network, &kernel.node_ids, mix),
            None => faults::draw(&mut kernel.rng, network, &kernel.node_ids, mix),
        };
        if !applies {
            return Ok(None);
        }
        match node_fault {
            Some(NodeFault::Crash(node)) => {
                if !self.host(node).up {
                    return Ok(None);
                }
                self.crash(node)?;
            }
            Some(NodeFault::Pause(node, pause)) => {
                let until = self.now + pause;
                self.host_mut(node).paused_until = until;
            }
            Some(NodeFault::PauseTogether(nodes, pause)) => {
                let until = self.now + pause;
                for node in nodes {
                    let host = self.host_mut(node);
                    host.paused_until = host.paused_until.max(until);
                }
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
                    .group_ids()
                    .into_iter()
                    .filter(|g| self.may_damage(node, *g))
                    .collect();
                if groups.is_empty() {
                    return Ok(None);
                }
                let group = groups[self.rng.random_range(0..groups.len())];
                // The disk lives in the workload and the RNG in the kernel, both behind `self`:
                // lend the RNG out for the call.
                let mut rng = std::mem::replace(&mut self.rng, ChaCha8Rng::seed_from_u64(0));
                let corrupted = self
                    .disk_mut(node, group)
                    .is_some_and(|d| d.corrupt(corruption, &mut rng));
                self.rng = rng;
                if !corrupted {
                    return Ok(None);
                }
                if crash && self.host(node).up {
                    self.crash(node)?;
                }
            }
            Some(NodeFault::FailSync(node)) => {
                if !self.host(node).up {
                    return Ok(None);
                }
                self.host_mut(node).fail_sync = true;
            }
            Some(NodeFault::Wipe(node)) => {
                if !self.group_ids().iter().all(|g| self.may_damage(node, *g)) {
                    return Ok(None);
                }
                if self.host(node).up {
                    self.crash(node)?;
                }
                for group in self.group_ids() {
                    if let Some(disk) = self.disk_mut(node, group) {
                        disk.wipe();
                    }
                }
            }
            Some(NodeFault::IsolateLeader) => {
                let groups = self.group_ids();
                let (first, last) = (groups[0], groups[groups.len() - 1]);
                let group = self.rng.random_range(first..=last);
                let Some(leader) = self.leader(group) else {
                    return Ok(None);
                };
                let kernel: &mut Kernel<Self::Event> = self;
                kernel.network.split(&[leader], &kernel.node_ids);
            }
            Some(NodeFault::ConsumerCrash) if !self.crash_consumer()? => return Ok(None),
            Some(NodeFault::ConsumerCrash) | None => {}
        }
        Ok(Some(kind))
    }
}

/// Lets a workload's struct reach the kernel's fields as its own.
#[macro_export]
macro_rules! kernel_deref {
    ($world:ty, $event:ty) => {
        impl std::ops::Deref for $world {
            type Target = $crate::kernel::Kernel<$event>;
            fn deref(&self) -> &Self::Target {
                &self.k
            }
        }
        impl std::ops::DerefMut for $world {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.k
            }
        }
    };
}
