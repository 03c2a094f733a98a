//! Fuzz entry points shared by the cargo-fuzz targets (`fuzz/cargo-fuzz`) and the stable
//! corpus replay (`fuzz/tests/corpus.rs`).
//!
//! This crate is an ordinary library with no libFuzzer dependency, so the workspace builds and
//! tests it without a C++ toolchain or a nightly compiler.
//!
//! Targets: `raft_messages` (here), [`frames`], [`log_recovery`], [`plan_recovery`], [`broker`]
//! and [`sim_schedule`]. Each has a `run_*` function that returns what the input reached, for the
//! corpus test, and a plain one that the cargo-fuzz wrapper calls. Nothing here unwraps fuzz
//! input: the only panics are assertions of the properties each target documents.

mod broker;
mod frames;
mod log_recovery;
mod plan_recovery;
mod sim_schedule;

pub use broker::{BrokerStats, broker, run_broker};
pub use frames::{FramesStats, frames, run_frames};
pub use log_recovery::{LogStats, log_recovery, run_log_recovery};
pub use plan_recovery::{PlanStats, plan_recovery_target as plan_recovery, run_plan_recovery};
pub use sim_schedule::{SimStats, replay_command, run_sim_schedule, sim_schedule};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use holdfast_core::raft::{
    AppendResult, CompactError, Config, Entry, EntryKind, Envelope, GroupId, HardState, Index,
    Message, NodeId, ProposalId, ProposalOutcome, Recovered, Replica, Role, Snapshot,
    TERM_ACCEPTED_MAX, TERM_MAX, Term, Write, WriteId,
};
use holdfast_core::time::Instant;

const GROUP: GroupId = 7;
const VOTERS: [NodeId; 3] = [1, 2, 3];
/// More operations than this in one input are ignored: they only slow the fuzzer down.
const MAX_OPS: usize = 2048;
/// Messages in flight beyond this are dropped, oldest first (the network loses them).
const MAX_IN_FLIGHT: usize = 256;
/// Entries in one forged Append.
const MAX_FORGED_ENTRIES: usize = 4;
/// Bytes of a forged snapshot (and of one forged chunk at most).
const MAX_FORGED_SNAPSHOT_BYTES: u8 = 32;

/// How the group is configured; the first bytes of an input.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Setup {
    /// Without it `Forge` operations are skipped, and the replicas must agree on every entry
    /// they apply (a forger can make them disagree, so that check is off with it).
    forgery: bool,
    pre_vote: bool,
    check_quorum: bool,
    append_entries_max: u8,
    inflight_appends_max: u8,
    uncommitted_entries_max: u8,
    /// `% 8 + 1` bytes per InstallSnapshot chunk: the state machine's 16 bytes go in pieces.
    snapshot_chunk_bytes_max: u8,
    seeds: [u64; 3],
}

/// One step of the scenario. Node and message selectors are taken modulo what exists, and
/// terms and indexes of forged messages relative to the receiver's state, so that most inputs
/// are meaningful.
#[derive(Arbitrary, Debug, Clone)]
enum Op {
    /// Delivers the in-flight message at this position (modulo the number in flight).
    Deliver(u8),
    /// Delivers a copy of an in-flight message and leaves it in flight (duplication).
    Duplicate(u8),
    /// Loses an in-flight message.
    Lose(u8),
    /// Delivers a message no replica sent, from any node id (including the receiver's own
    /// and a non-member's).
    Forge { to: u8, from: u8, message: Forged },
    /// Time passes, then `node`'s timers fire (if due).
    Tick { node: u8, millis: u16 },
    /// Time jumps to `node`'s next deadline and its timers fire.
    FireTimer { node: u8 },
    /// A proposal of `count % 4` commands on `node`.
    Propose { node: u8, count: u8, payload: u8 },
    /// `node`'s disk syncs its oldest `count % 4 + 1` pending writes, in order.
    Persist { node: u8, count: u8 },
    /// `node` crashes, losing unsynced writes and messages it had not sent, and restarts from
    /// its disk with a new seed.
    Restart { node: u8, seed: u64 },
    /// Up to `rounds % 8 + 1` rounds of: every disk syncs everything, every message in flight
    /// is delivered in order. Lets short inputs reach elections and commits.
    Settle { rounds: u8 },
    /// `node` compacts its log at its applied index minus `back % 4` (which the replica
    /// refuses if that is not past its snapshot), with its state machine's state there.
    Compact { node: u8, back: u8 },
}

/// A forged message. Numbers are offsets around the receiver's own term and log.
#[derive(Arbitrary, Debug, Clone)]
enum Forged {
    PreVote {
        term: u8,
        last_index: u8,
        last_term: u8,
    },
    PreVoteResponse {
        term: u8,
        granted: bool,
    },
    Vote {
        term: u8,
        last_index: u8,
        last_term: u8,
    },
    VoteResponse {
        term: u8,
        granted: bool,
    },
    Append {
        term: u8,
        prev_index: u8,
        /// Even: the receiver's own term at `prev_index` (so the append usually matches).
        prev_term: u8,
        count: u8,
        entries: [ForgedEntry; MAX_FORGED_ENTRIES],
        commit: u8,
    },
    AppendResponse {
        term: u8,
        accepted: bool,
        index: u8,
        hint_index: u8,
        hint_term: u8,
    },
    Heartbeat {
        term: u8,
        commit: u8,
        /// The sender's clock: `now` minus this many 10 ms steps.
        age: u8,
    },
    HeartbeatResponse {
        term: u8,
        /// The clock echoed back: `now` minus this many 10 ms steps.
        age: u8,
    },
    /// A chunk of a snapshot around the receiver's log end.
    InstallSnapshot {
        term: u8,
        index: u8,
        snapshot_term: u8,
        /// `% (total + 1)`: where the chunk starts.
        offset: u8,
        /// `% MAX_FORGED_SNAPSHOT_BYTES`: the snapshot's size.
        total: u8,
        /// `% 9`, cut at `total`: the chunk's size.
        len: u8,
        byte: u8,
    },
    SnapshotResponse {
        term: u8,
        index: u8,
        received: u8,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct ForgedEntry {
    /// Odd: one term above the previous entry's (capped at the message's term).
    term_step: u8,
    noop: bool,
    payload: u8,
}

/// What one run reached; used by the corpus test to show the corpus is not trivial.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftStats {
    pub ops: usize,
    pub forged: usize,
    pub restarts: usize,
    /// Forged messages whose term was above [`TERM_ACCEPTED_MAX`].
    pub far_terms: usize,
    /// Distinct (term, leader) pairs seen.
    pub leaders: usize,
    pub max_commit: Index,
    pub proposals_committed: usize,
    /// Compactions the replicas accepted, and snapshots installed from a leader.
    pub compactions: usize,
    pub snapshots_installed: usize,
}

/// The node's disk: what a restart recovers.
#[derive(Default)]
struct Disk {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    /// Contiguous from the snapshot's index + 1.
    entries: Vec<Entry>,
}

impl Disk {
    fn snapshot_index(&self) -> Index {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }

    fn last_index(&self) -> Index {
        self.snapshot_index() + self.entries.len() as Index
    }

    fn entry(&self, index: Index) -> Option<&Entry> {
        let at = index.checked_sub(self.snapshot_index() + 1)?;
        self.entries.get(usize::try_from(at).ok()?)
    }

    fn term_at(&self, index: Index) -> Option<Term> {
        match &self.snapshot {
            Some(s) if s.index == index => Some(s.term),
            _ if index == 0 => Some(0),
            _ => self.entry(index).map(|e| e.term),
        }
    }

    /// Performs `write` as the contract in `raft::Write` says, checking it is well formed.
    fn apply(&mut self, node: NodeId, write: &Write) {
        if let Some(snapshot) = &write.snapshot {
            assert!(
                snapshot.index > self.snapshot_index(),
                "node {node}: write {} replaces the snapshot at {} by one at {}",
                write.id,
                self.snapshot_index(),
                snapshot.index
            );
            // Unless the log is replaced, what it keeps after the snapshot must continue it.
            assert!(
                write.discard_log || self.term_at(snapshot.index) == Some(snapshot.term),
                "node {node}: write {} keeps a log holding {:?} at the index of its snapshot \
                 {}@{}",
                write.id,
                self.term_at(snapshot.index),
                snapshot.index,
                snapshot.term
            );
            let replaced = (snapshot.index - self.snapshot_index()) as usize;
            self.entries.drain(..replaced.min(self.entries.len()));
            self.snapshot = Some(snapshot.clone());
        }
        if write.discard_log {
            assert!(
                write.snapshot.is_some(),
                "node {node}: write {} discards the log without a snapshot",
                write.id
            );
            self.entries.clear();
        }
        if let Some(hard_state) = write.hard_state {
            assert!(
                hard_state.term >= self.hard_state.term,
                "node {node}: write {} lowers the durable term {} to {}",
                write.id,
                self.hard_state.term,
                hard_state.term
            );
            self.hard_state = hard_state;
        }
        if let Some(first) = write.entries.first() {
            let (snapshot, last) = (self.snapshot_index(), self.last_index());
            assert!(
                first.index > snapshot && first.index <= last + 1,
                "node {node}: write {} starts at index {} but the disk holds a snapshot at \
                 {snapshot} and entries up to {last}",
                write.id,
                first.index
            );
            self.entries.truncate((first.index - snapshot - 1) as usize);
            for entry in &write.entries {
                assert_eq!(
                    entry.index,
                    self.last_index() + 1,
                    "node {node}: write {} is not contiguous",
                    write.id
                );
                self.entries.push(entry.clone());
            }
        }
        assert!(
            self.hard_state.commit <= self.last_index(),
            "node {node}: durable commit {} beyond the durable log ..={} after write {}",
            self.hard_state.commit,
            self.last_index(),
            write.id
        );
    }
}

/// A running hash of the entries a state machine applied: its state, and a snapshot's data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Machine {
    chain: u64,
    index: Index,
}

impl Machine {
    fn apply(&mut self, entry: &Entry) {
        // FNV-1a over the previous state and the entry: any change anywhere changes it.
        let mut hash = self.chain ^ 0xcbf2_9ce4_8422_2325;
        let mut mix = |bytes: &[u8]| {
            for byte in bytes {
                hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        mix(&entry.index.to_le_bytes());
        match &entry.kind {
            EntryKind::Noop => mix(&[0]),
            EntryKind::Commands(commands) => {
                for command in commands {
                    mix(&(command.len() as u64).to_le_bytes());
                    mix(command);
                }
            }
            EntryKind::Config(membership) => {
                mix(&[2]);
                for id in membership.members() {
                    mix(&id.to_le_bytes());
                }
            }
        }
        self.chain = hash;
        self.index = entry.index;
    }

    fn encode(&self) -> Bytes {
        let mut data = self.chain.to_le_bytes().to_vec();
        data.extend_from_slice(&self.index.to_le_bytes());
        Bytes::from(data)
    }

    /// `None` for bytes no machine encoded (a forged snapshot).
    fn decode(data: &[u8]) -> Option<Machine> {
        let chain = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
        let index = u64::from_le_bytes(data.get(8..16)?.try_into().ok()?);
        (data.len() == 16).then_some(Machine { chain, index })
    }
}

struct Node {
    id: NodeId,
    replica: Replica,
    disk: Disk,
    /// Writes handed out and not yet synced, oldest first.
    unsynced: VecDeque<Write>,
    /// The id of the last write handed out in this incarnation.
    last_write: WriteId,
    // What this incarnation has shown so far; each must only grow.
    term: Term,
    commit: Index,
    applied: Index,
    /// Proposals accepted by this incarnation whose fate is not known yet.
    pending_proposals: BTreeSet<ProposalId>,
    /// The state machine, and its states at the last few indexes applied (for compactions
    /// below the applied index). `None` after restoring a forged snapshot.
    machine: Option<Machine>,
    recent: VecDeque<Machine>,
    /// Whom this node granted its vote in each term, over all its incarnations.
    votes_granted: BTreeMap<Term, NodeId>,
}

impl Node {
    fn start(
        id: NodeId,
        config: Config,
        disk: Disk,
        votes_granted: BTreeMap<Term, NodeId>,
        seed: u64,
        now: Instant,
    ) -> Node {
        let recovered = Recovered {
            hard_state: disk.hard_state,
            snapshot: disk.snapshot.clone(),
            entries: disk.entries.clone(),
        };
        let replica = Replica::new(config, recovered, seed, now);
        let status = replica.status();
        assert_eq!(
            status.commit_index,
            disk.hard_state
                .commit
                .min(disk.last_index())
                .max(disk.snapshot_index()),
            "node {id}: restarted with a commit index other than its durable one"
        );
        assert_eq!(
            (
                status.snapshot_index,
                status.applied_index,
                status.last_index
            ),
            (
                disk.snapshot_index(),
                disk.snapshot_index(),
                disk.last_index()
            ),
            "node {id}: restarted with another snapshot or log than its disk's"
        );
        let machine = match &disk.snapshot {
            Some(snapshot) => Machine::decode(&snapshot.data),
            None => Some(Machine::default()),
        };
        Node {
            id,
            term: status.term,
            commit: status.commit_index,
            applied: status.applied_index,
            replica,
            disk,
            unsynced: VecDeque::new(),
            last_write: 0,
            pending_proposals: BTreeSet::new(),
            recent: machine.into_iter().collect(),
            machine,
            votes_granted,
        }
    }

    /// Syncs the oldest `count` pending writes and reports the last one durable.
    fn persist(&mut self, now: Instant, count: usize) {
        let mut last = None;
        for _ in 0..count {
            let Some(write) = self.unsynced.pop_front() else {
                break;
            };
            self.disk.apply(self.id, &write);
            last = Some(write.id);
        }
        if let Some(id) = last {
            self.replica.persisted(now, id);
        }
    }
}

struct Group {
    config: Config,
    forgery: bool,
    now: Instant,
    nodes: Vec<Node>,
    network: VecDeque<Envelope>,
    next_proposal: ProposalId,
    /// Every entry any replica applied, by index, and the state machine after it; all
    /// replicas must agree. Only meaningful while no forged message was delivered (a forger
    /// can make replicas disagree).
    applied: BTreeMap<Index, (Entry, Machine)>,
    /// Every snapshot any replica held, by index: one term and one content each (honest).
    snapshots: BTreeMap<Index, (Term, Bytes)>,
    leaders: BTreeSet<(Term, NodeId)>,
    stats: RaftStats,
}

impl Group {
    fn new(setup: Setup) -> Group {
        let mut config = Config::new(0, GROUP, VOTERS.to_vec());
        config.pre_vote = setup.pre_vote;
        config.check_quorum = setup.check_quorum;
        config.append_entries_max = usize::from(setup.append_entries_max % 4) + 1;
        config.inflight_appends_max = usize::from(setup.inflight_appends_max % 3) + 1;
        config.uncommitted_entries_max = usize::from(setup.uncommitted_entries_max % 8) + 1;
        config.snapshot_chunk_bytes_max = usize::from(setup.snapshot_chunk_bytes_max % 8) + 1;
        let now = Instant::ZERO;
        let nodes = VOTERS
            .iter()
            .zip(setup.seeds)
            .map(|(&id, seed)| {
                let config = Config {
                    id,
                    ..config.clone()
                };
                Node::start(id, config, Disk::default(), BTreeMap::new(), seed, now)
            })
            .collect();
        Group {
            config,
            forgery: setup.forgery,
            now,
            nodes,
            network: VecDeque::new(),
            next_proposal: 0,
            applied: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            leaders: BTreeSet::new(),
            stats: RaftStats::default(),
        }
    }

    fn node_index(&self, selector: u8) -> usize {
        usize::from(selector) % self.nodes.len()
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now + by;
    }

    fn deliver(&mut self, envelope: Envelope) {
        let now = self.now;
        // An answer to a forged sender outside the group goes nowhere.
        let Some(node) = self.nodes.get_mut((envelope.to as usize).wrapping_sub(1)) else {
            return;
        };
        node.replica.step(now, envelope.from, envelope.message);
    }

    fn apply(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Deliver(at) => {
                if !self.network.is_empty() {
                    let at = usize::from(at) % self.network.len();
                    if let Some(envelope) = self.network.remove(at) {
                        self.deliver(envelope);
                    }
                }
            }
            Op::Duplicate(at) => {
                if !self.network.is_empty() {
                    let at = usize::from(at) % self.network.len();
                    let envelope = self.network[at].clone();
                    self.deliver(envelope);
                }
            }
            Op::Lose(at) => {
                if !self.network.is_empty() {
                    let at = usize::from(at) % self.network.len();
                    self.network.remove(at);
                }
            }
            Op::Forge { .. } if !self.forgery => {}
            Op::Forge { to, from, message } => {
                let to = self.node_index(to);
                let from = NodeId::from(from % 4) + 1; // 4 is not a member
                let message = forge(&self.nodes[to].replica, now, message);
                self.stats.forged += 1;
                if message.term() > TERM_ACCEPTED_MAX {
                    self.stats.far_terms += 1;
                }
                self.nodes[to].replica.step(now, from, message);
            }
            Op::Tick { node, millis } => {
                self.advance(Duration::from_millis(u64::from(millis % 1000)));
                let node = self.node_index(node);
                let now = self.now;
                self.nodes[node].replica.handle_timeout(now);
            }
            Op::FireTimer { node } => {
                let node = self.node_index(node);
                self.now = self.now.max(self.nodes[node].replica.poll_timeout());
                let now = self.now;
                self.nodes[node].replica.handle_timeout(now);
            }
            Op::Propose {
                node,
                count,
                payload,
            } => {
                let node = self.node_index(node);
                let node = &mut self.nodes[node];
                let id = self.next_proposal;
                self.next_proposal += 1;
                let commands = (0..count % 4)
                    .map(|i| Bytes::from(vec![payload, i, (id % 256) as u8]))
                    .collect();
                let before = node.replica.status();
                match node.replica.propose(now, id, commands) {
                    Ok(index) => {
                        assert_eq!(
                            before.role,
                            Role::Leader,
                            "node {}: proposed on a {:?}",
                            node.id,
                            before.role
                        );
                        assert_eq!(
                            index,
                            before.last_index + 1,
                            "node {}: a proposal must append right after the log",
                            node.id
                        );
                        node.pending_proposals.insert(id);
                    }
                    Err(_) => {
                        let after = node.replica.status();
                        assert_eq!(
                            after.last_index, before.last_index,
                            "node {}: a refused proposal changed the log",
                            node.id
                        );
                    }
                }
            }
            Op::Persist { node, count } => {
                let node = self.node_index(node);
                self.nodes[node].persist(now, usize::from(count % 4) + 1);
            }
            Op::Restart { node, seed } => {
                let node = self.node_index(node);
                let old = &mut self.nodes[node];
                let id = old.id;
                let disk = std::mem::take(&mut old.disk);
                let votes = std::mem::take(&mut old.votes_granted);
                let config = Config {
                    id,
                    ..self.config.clone()
                };
                self.nodes[node] = Node::start(id, config, disk, votes, seed, now);
                self.stats.restarts += 1;
            }
            Op::Compact { node, back } => {
                let node = self.node_index(node);
                let node = &mut self.nodes[node];
                let before = node.replica.status();
                let back = usize::from(back % 4);
                // (No state known only after restoring a forged snapshot.)
                let state = node
                    .recent
                    .len()
                    .checked_sub(1)
                    .and_then(|last| node.recent.get(last - back.min(last)))
                    .copied();
                let index = state.map_or(before.applied_index, |m| m.index);
                let data = state.map_or_else(|| Bytes::from_static(b"unknown"), |m| m.encode());
                let result = node.replica.compact(index, data.clone());
                let after = node.replica.status();
                match result {
                    Ok(()) => {
                        assert!(
                            index <= before.applied_index && index > before.snapshot_index,
                            "node {}: compacted at {index} with applied {} and a snapshot at {}",
                            node.id,
                            before.applied_index,
                            before.snapshot_index
                        );
                        let held = node.replica.snapshot().map(|s| (s.index, s.data.clone()));
                        assert_eq!(
                            held,
                            Some((index, data)),
                            "node {}: compaction kept another snapshot",
                            node.id
                        );
                        assert_eq!(after.snapshot_index, index);
                        assert!(
                            node.replica.entry(index).is_none(),
                            "node {}: entry {index} is still there after compaction",
                            node.id
                        );
                        self.stats.compactions += 1;
                    }
                    Err(CompactError::NotApplied { .. }) => assert!(
                        index > before.applied_index,
                        "node {}: refused a compaction at {index} as not applied (applied {})",
                        node.id,
                        before.applied_index
                    ),
                    Err(CompactError::Stale { .. }) => assert!(
                        index <= before.snapshot_index,
                        "node {}: refused a compaction at {index} as stale (snapshot at {})",
                        node.id,
                        before.snapshot_index
                    ),
                    Err(CompactError::Unconfigured { .. }) => assert!(
                        node.replica.membership_at(index).voters.is_empty(),
                        "node {}: refused a compaction at {index} as unconfigured, with {:?}",
                        node.id,
                        node.replica.membership_at(index)
                    ),
                }
                if result.is_err() {
                    assert_eq!(
                        after, before,
                        "node {}: a refused compaction changed the replica",
                        node.id
                    );
                }
            }
            Op::Settle { rounds } => {
                for _ in 0..=rounds % 8 {
                    for node in &mut self.nodes {
                        node.persist(now, usize::MAX);
                    }
                    self.drain_and_check();
                    if self.network.is_empty() {
                        break;
                    }
                    while let Some(envelope) = self.network.pop_front() {
                        self.deliver(envelope);
                    }
                    self.drain_and_check();
                }
            }
        }
    }

    /// Whatever came before (forged messages of any term included), once the network is
    /// honest and timers fire, the replicas elect a leader of the highest term any of them
    /// holds. Above the term limit replicas reach each other one term per message, so the
    /// bound on rounds grows with the number of forged messages.
    fn elect(&mut self) {
        let rounds = 256 + 8 * self.stats.forged;
        for _ in 0..rounds {
            self.apply(Op::Settle { rounds: 7 });
            let term_max = self.nodes.iter().map(|n| n.replica.status().term).max();
            let elected = self.nodes.iter().any(|n| {
                let status = n.replica.status();
                status.role == Role::Leader && Some(status.term) == term_max
            });
            if elected {
                return;
            }
            // The earliest timer fires alone (replicas seeded alike would split every vote).
            let Some(first) = self
                .nodes
                .iter_mut()
                .min_by_key(|n| n.replica.poll_timeout())
            else {
                break;
            };
            self.now = self.now.max(first.replica.poll_timeout());
            first.replica.handle_timeout(self.now);
            self.drain_and_check();
        }
        let terms: Vec<_> = self
            .nodes
            .iter()
            .map(|n| (n.replica.status().role, n.replica.status().term))
            .collect();
        panic!("no leader after {rounds} honest rounds: {terms:?}");
    }

    /// Polls every output of every replica, checking each one and the replica's state.
    fn drain_and_check(&mut self) {
        let honest = self.stats.forged == 0;
        for node in &mut self.nodes {
            let id = node.id;
            while let Some(write) = node.replica.poll_write() {
                assert_eq!(
                    write.id,
                    node.last_write + 1,
                    "node {id}: write ids must increase by one"
                );
                node.last_write = write.id;
                node.unsynced.push_back(write);
            }
            while let Some(envelope) = node.replica.poll_message() {
                assert_eq!(
                    envelope.from, id,
                    "node {id}: sent a message as another node"
                );
                assert_eq!(envelope.group, GROUP, "node {id}: wrong group");
                // A replica answers whoever asked, a node outside its configuration too
                // (Raft membership change: a member may not know it yet), but starts nothing
                // with one.
                let answer = matches!(
                    envelope.message,
                    Message::PreVoteResponse { .. }
                        | Message::VoteResponse { .. }
                        | Message::AppendResponse { .. }
                        | Message::HeartbeatResponse { .. }
                        | Message::SnapshotResponse { .. }
                );
                assert!(
                    envelope.to != id && (answer || VOTERS.contains(&envelope.to)),
                    "node {id}: sent {:?} to {}",
                    envelope.message,
                    envelope.to
                );
                if let Message::VoteResponse {
                    term,
                    granted: true,
                } = envelope.message
                {
                    let durable = node.disk.hard_state;
                    assert!(
                        durable.term > term
                            || (durable.term == term && durable.vote == Some(envelope.to)),
                        "node {id}: granted its vote to {} in term {term} before the vote was \
                         durable (disk: {durable:?})",
                        envelope.to
                    );
                    let first = *node.votes_granted.entry(term).or_insert(envelope.to);
                    assert_eq!(
                        first, envelope.to,
                        "node {id}: voted for two candidates in term {term}"
                    );
                }
                if self.network.len() >= MAX_IN_FLIGHT {
                    self.network.pop_front();
                }
                self.network.push_back(envelope);
            }
            // An installed snapshot replaces the state machine before anything more applies.
            if let Some(snapshot) = node.replica.poll_restore() {
                let status = node.replica.status();
                assert!(
                    snapshot.index > node.applied && snapshot.index == status.applied_index,
                    "node {id}: restores a snapshot at {} after applying {} (applied index {})",
                    snapshot.index,
                    node.applied,
                    status.applied_index
                );
                assert_eq!(
                    node.replica.snapshot(),
                    Some(&snapshot),
                    "node {id}: restores another snapshot than it holds"
                );
                node.machine = Machine::decode(&snapshot.data);
                node.recent = node.machine.into_iter().collect();
                node.applied = snapshot.index;
                if honest {
                    let agreed = self.applied.get(&snapshot.index).map(|(_, m)| *m);
                    assert!(
                        agreed.is_some() && node.machine == agreed,
                        "node {id}: restored {:?} at {}, where the applied sequence has {agreed:?}",
                        node.machine,
                        snapshot.index
                    );
                }
                self.stats.snapshots_installed += 1;
            }
            while let Some(entry) = node.replica.poll_committed() {
                assert_eq!(
                    entry.index,
                    node.applied + 1,
                    "node {id}: applied out of order"
                );
                node.applied = entry.index;
                if let Some(machine) = node.machine.as_mut() {
                    machine.apply(&entry);
                    node.recent.push_back(*machine);
                    if node.recent.len() > 4 {
                        node.recent.pop_front();
                    }
                }
                if honest {
                    // The first replica to apply an index has applied the one before it (or
                    // restored a snapshot there, which someone applied first).
                    let before = entry
                        .index
                        .checked_sub(1)
                        .and_then(|i| self.applied.get(&i));
                    let mut agreed_machine = before.map_or_else(Machine::default, |(_, m)| *m);
                    agreed_machine.apply(&entry);
                    let (agreed, _) = self
                        .applied
                        .entry(entry.index)
                        .or_insert((entry.clone(), agreed_machine));
                    assert_eq!(
                        *agreed, entry,
                        "node {id}: applied an entry another replica applied differently"
                    );
                    assert_eq!(
                        node.machine,
                        Some(agreed_machine),
                        "node {id}: its state machine at {} is not the applied sequence's",
                        entry.index
                    );
                }
            }
            let status = node.replica.status();
            while let Some(fate) = node.replica.poll_proposal() {
                assert!(
                    node.pending_proposals.remove(&fate.id),
                    "node {id}: a fate for proposal {} that is unknown or already decided",
                    fate.id
                );
                if let ProposalOutcome::Committed { index } = fate.outcome {
                    assert!(
                        index <= status.commit_index,
                        "node {id}: proposal {} reported committed at {index} above the commit \
                         index {}",
                        fate.id,
                        status.commit_index
                    );
                    // (The entry may be compacted already: an installed snapshot commits up to
                    // its index and replaces those entries at once.)
                    if index > status.snapshot_index {
                        let kind = node.replica.entry(index).map(|e| &e.kind);
                        assert!(
                            matches!(kind, Some(EntryKind::Commands(_))),
                            "node {id}: proposal {} committed at {index}, which holds {kind:?}",
                            fate.id
                        );
                    }
                    self.stats.proposals_committed += 1;
                }
            }

            assert!(
                status.commit_index <= status.last_index,
                "node {id}: commit {} beyond the log 1..={}",
                status.commit_index,
                status.last_index
            );
            assert!(
                status.commit_index >= node.commit,
                "node {id}: commit went back from {} to {}",
                node.commit,
                status.commit_index
            );
            assert!(
                status.snapshot_index <= status.applied_index,
                "node {id}: snapshot at {} beyond the applied index {}",
                status.snapshot_index,
                status.applied_index
            );
            assert_eq!(
                status.snapshot_index,
                node.replica.snapshot().map_or(0, |s| s.index),
                "node {id}: the status and the snapshot disagree"
            );
            if let Some(snapshot) = node.replica.snapshot()
                && honest
            {
                let (term, data) = self
                    .snapshots
                    .entry(snapshot.index)
                    .or_insert((snapshot.term, snapshot.data.clone()));
                assert_eq!(
                    (*term, data.clone()),
                    (snapshot.term, snapshot.data.clone()),
                    "node {id}: its snapshot at {} differs from another replica's",
                    snapshot.index
                );
            }
            assert!(
                status.applied_index <= status.commit_index,
                "node {id}: applied {} beyond commit {}",
                status.applied_index,
                status.commit_index
            );
            assert_eq!(
                status.applied_index, node.applied,
                "node {id}: applied index disagrees with the entries handed out"
            );
            assert!(
                status.durable_index <= status.last_index,
                "node {id}: durable index {} beyond the log 1..={}",
                status.durable_index,
                status.last_index
            );
            assert!(
                status.term >= node.term,
                "node {id}: term went back from {} to {}",
                node.term,
                status.term
            );
            if status.role == Role::Leader {
                assert_eq!(
                    status.leader,
                    Some(id),
                    "node {id}: a leader that names another"
                );
                self.leaders.insert((status.term, id));
            }
            // Every entry up to the durable index is on disk as it is in memory (or stood for
            // by a snapshot on disk, or compacted in memory and held by the disk either way).
            assert!(
                status.durable_index <= node.disk.last_index(),
                "node {id}: durable index {} but the disk holds up to {}",
                status.durable_index,
                node.disk.last_index()
            );
            let covered = node.disk.snapshot_index().max(status.snapshot_index);
            for index in covered + 1..=status.durable_index {
                assert_eq!(
                    node.replica.entry(index),
                    node.disk.entry(index),
                    "node {id}: entry {index} is below the durable index {} but differs on disk",
                    status.durable_index
                );
            }
            node.term = status.term;
            node.commit = status.commit_index;
            self.stats.max_commit = self.stats.max_commit.max(status.commit_index);
        }
        self.stats.leaders = self.leaders.len();
    }
}

/// `replica`'s term at `index`, its snapshot's at the snapshot's index; `None` where it holds
/// nothing (compacted, or past the end).
fn term_of(replica: &Replica, index: Index) -> Option<Term> {
    if index == 0 {
        return Some(0);
    }
    match replica.snapshot() {
        Some(snapshot) if snapshot.index == index => Some(snapshot.term),
        _ => replica.entry(index).map(|e| e.term),
    }
}

/// A term around `base`: `base - 2 ..= base + 2`; or, for the top few offsets, a term no
/// honest election reaches (around the refusal limit and the end of the term space).
fn near_term(offset: u8, base: Term) -> Term {
    match offset {
        250 => TERM_ACCEPTED_MAX,
        251 => TERM_ACCEPTED_MAX + 1,
        252 => TERM_ACCEPTED_MAX + 2,
        253 => TERM_MAX - 1,
        254 => TERM_MAX,
        255 => u64::MAX,
        _ => base.saturating_sub(2) + Term::from(offset % 5),
    }
}

/// An index around `base`: `base - 4 ..= base + 2`.
fn near_index(offset: u8, base: Index) -> Index {
    base.saturating_sub(4) + Index::from(offset % 7)
}

/// A clock reading up to 2.55 s before `now`, in the microseconds a `context` carries.
fn past(now: Instant, age: u8) -> u64 {
    now.as_micros().saturating_sub(u64::from(age) * 10_000)
}

/// Turns a forged message into a structurally valid one around `to`'s state: Append entries
/// are consecutive from `prev_index + 1`, with terms from `prev_term` up to the message's.
fn forge(to: &Replica, now: Instant, forged: Forged) -> Message {
    let status = to.status();
    let (term, last) = (status.term, status.last_index);
    let last_term = term_of(to, last).unwrap_or(0);
    match forged {
        Forged::PreVote {
            term: t,
            last_index,
            last_term: lt,
        } => Message::PreVote {
            term: near_term(t, term.saturating_add(1)),
            last_index: near_index(last_index, last),
            last_term: near_term(lt, last_term),
        },
        Forged::PreVoteResponse { term: t, granted } => Message::PreVoteResponse {
            term: near_term(t, term.saturating_add(1)),
            granted,
        },
        Forged::Vote {
            term: t,
            last_index,
            last_term: lt,
        } => Message::Vote {
            term: near_term(t, term.saturating_add(1)),
            last_index: near_index(last_index, last),
            last_term: near_term(lt, last_term),
        },
        Forged::VoteResponse { term: t, granted } => Message::VoteResponse {
            term: near_term(t, term),
            granted,
        },
        Forged::Append {
            term: t,
            prev_index,
            prev_term,
            count,
            entries,
            commit,
        } => {
            let term = near_term(t, term);
            let prev_index = near_index(prev_index, last);
            let own_term = term_of(to, prev_index);
            let prev_term = match own_term {
                Some(own) if prev_term % 2 == 0 => own,
                _ => near_term(prev_term, last_term),
            }
            .min(term);
            let mut entry_term = prev_term;
            let entries = entries
                .iter()
                .take(usize::from(count) % (MAX_FORGED_ENTRIES + 1))
                .enumerate()
                .map(|(i, e)| {
                    if e.term_step % 2 == 1 {
                        entry_term = entry_term.saturating_add(1).min(term);
                    }
                    Entry {
                        term: entry_term,
                        index: prev_index + 1 + i as Index,
                        kind: if e.noop {
                            EntryKind::Noop
                        } else {
                            EntryKind::Commands(vec![Bytes::from(vec![0xf0, e.payload])])
                        },
                    }
                })
                .collect();
            Message::Append {
                term,
                prev_index,
                prev_term,
                entries,
                commit: near_index(commit, last + 2),
            }
        }
        Forged::AppendResponse {
            term: t,
            accepted,
            index,
            hint_index,
            hint_term,
        } => {
            // An accepted answer has no hint: its hint's parity picks a wiped follower's
            // acknowledgement, which promises nothing.
            let result = if accepted && hint_term % 2 == 1 {
                AppendResult::AcceptedVotesLost {
                    match_index: near_index(index, last),
                }
            } else if accepted {
                AppendResult::Accepted {
                    match_index: near_index(index, last),
                }
            } else {
                AppendResult::Rejected {
                    rejected_index: near_index(index, last),
                    hint_index: near_index(hint_index, last),
                    hint_term: near_term(hint_term, last_term),
                }
            };
            Message::AppendResponse {
                term: near_term(t, term),
                result,
            }
        }
        Forged::Heartbeat {
            term: t,
            commit,
            age,
        } => Message::Heartbeat {
            term: near_term(t, term),
            commit: near_index(commit, last),
            context: past(now, age),
        },
        Forged::HeartbeatResponse { term: t, age } => Message::HeartbeatResponse {
            term: near_term(t, term),
            context: past(now, age),
        },
        Forged::InstallSnapshot {
            term: t,
            index,
            snapshot_term,
            offset,
            total,
            len,
            byte,
        } => {
            let term = near_term(t, term);
            let total = total % MAX_FORGED_SNAPSHOT_BYTES;
            let offset = offset % (total + 1);
            let len = (len % 9).min(total - offset);
            Message::InstallSnapshot {
                term,
                index: near_index(index, last + 2),
                snapshot_term: near_term(snapshot_term, last_term).min(term),
                offset: u64::from(offset),
                total: u64::from(total),
                chunk: Bytes::from(vec![byte; usize::from(len)]),
                membership: None,
            }
        }
        Forged::SnapshotResponse {
            term: t,
            index,
            received,
        } => Message::SnapshotResponse {
            term: near_term(t, term),
            index: near_index(index, status.snapshot_index + 2),
            received: u64::from(received % MAX_FORGED_SNAPSHOT_BYTES),
        },
    }
}

/// Runs a scenario decoded from `data` against a 3-node group and returns what it reached.
/// Panics if a replica breaks one of its invariants.
///
/// Checked after every operation, on every replica: commit `<=` last index, commit never
/// decreases (within one incarnation), snapshot index `<=` applied `<=` commit,
/// `poll_committed` yields consecutive indexes except across a restored snapshot (which lies
/// ahead of what was applied and is the snapshot the replica holds), durable index `<=` last
/// index and every entry up to it is on the (modelled) disk as in memory, the term never
/// decreases, write ids increase by one, writes are contiguous and replace the snapshot only by
/// a newer one whose index the log they keep holds with the snapshot's term (or discard the log,
/// with a snapshot), a granted vote leaves only once it is durable, proposal fates are unique
/// and committed ones point at command entries, a compaction is accepted exactly when it is past
/// the snapshot and not past the applied index and refused without a change otherwise, a
/// restart recovers the disk's snapshot and log. While no forged message has been delivered,
/// replicas must also agree on every entry they apply, on every snapshot they hold, and every
/// restored snapshot is the state machine of the applied sequence up to its index.
pub fn run_raft_messages(data: &[u8]) -> RaftStats {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return RaftStats::default();
    };
    let mut group = Group::new(setup);
    group.drain_and_check();
    while group.stats.ops < MAX_OPS && !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        group.apply(op);
        group.drain_and_check();
        group.stats.ops += 1;
    }
    group.elect();
    group.stats
}

/// The `raft_messages` fuzz target: see [`run_raft_messages`].
pub fn raft_messages(data: &[u8]) {
    run_raft_messages(data);
}
