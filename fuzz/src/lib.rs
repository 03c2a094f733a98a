//! Fuzz entry points shared by the cargo-fuzz targets (`fuzz/cargo-fuzz`) and the stable
//! corpus replay (`fuzz/tests/corpus.rs`).
//!
//! This crate is an ordinary library with no libFuzzer dependency, so the workspace builds and
//! tests it without a C++ toolchain or a nightly compiler.
//!
//! Targets: `raft_messages` (here), [`frames`], [`log_recovery`], [`broker`] and
//! [`sim_schedule`]. Each has a `run_*` function that returns what the input reached, for the
//! corpus test, and a plain one that the cargo-fuzz wrapper calls. Nothing here unwraps fuzz
//! input: the only panics are assertions of the properties each target documents.

mod broker;
mod frames;
mod log_recovery;
mod sim_schedule;

pub use broker::{BrokerStats, broker, run_broker};
pub use frames::{FramesStats, frames, run_frames};
pub use log_recovery::{LogStats, log_recovery, run_log_recovery};
pub use sim_schedule::{SimStats, replay_command, run_sim_schedule, sim_schedule};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use holdfast_core::raft::{
    AppendResult, Config, Entry, EntryKind, Envelope, GroupId, HardState, Index, Message, NodeId,
    ProposalId, ProposalOutcome, Recovered, Replica, Role, Term, Write, WriteId,
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
    /// Distinct (term, leader) pairs seen.
    pub leaders: usize,
    pub max_commit: Index,
    pub proposals_committed: usize,
}

/// The node's disk: what a restart recovers.
#[derive(Default)]
struct Disk {
    hard_state: HardState,
    entries: Vec<Entry>,
}

impl Disk {
    /// Performs `write` as the contract in `raft::Write` says, checking it is well formed.
    fn apply(&mut self, node: NodeId, write: &Write) {
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
            let on_disk = self.entries.len() as Index;
            assert!(
                first.index >= 1 && first.index <= on_disk + 1,
                "node {node}: write {} starts at index {} but the disk holds 1..={on_disk}",
                write.id,
                first.index
            );
            self.entries.truncate((first.index - 1) as usize);
            for entry in &write.entries {
                assert_eq!(
                    entry.index,
                    self.entries.len() as Index + 1,
                    "node {node}: write {} is not contiguous",
                    write.id
                );
                self.entries.push(entry.clone());
            }
        }
        assert!(
            self.hard_state.commit <= self.entries.len() as Index,
            "node {node}: durable commit {} beyond the durable log 1..={} after write {}",
            self.hard_state.commit,
            self.entries.len(),
            write.id
        );
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
            entries: disk.entries.clone(),
        };
        let replica = Replica::new(config, recovered, seed, now);
        let status = replica.status();
        assert_eq!(
            status.commit_index,
            disk.hard_state.commit.min(disk.entries.len() as Index),
            "node {id}: restarted with a commit index other than its durable one"
        );
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
    /// Every entry any replica applied, by index; all replicas must agree. Only meaningful
    /// while no forged message was delivered (a forger can make replicas disagree).
    applied: BTreeMap<Index, Entry>,
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
        let node = &mut self.nodes[(envelope.to - 1) as usize];
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
                assert!(
                    envelope.to != id && VOTERS.contains(&envelope.to),
                    "node {id}: sent to {}",
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
            while let Some(entry) = node.replica.poll_committed() {
                assert_eq!(
                    entry.index,
                    node.applied + 1,
                    "node {id}: applied out of order"
                );
                node.applied = entry.index;
                if honest {
                    let agreed = self.applied.entry(entry.index).or_insert(entry.clone());
                    assert_eq!(
                        *agreed, entry,
                        "node {id}: applied an entry another replica applied differently"
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
                    let kind = node.replica.entry(index).map(|e| &e.kind);
                    assert!(
                        matches!(kind, Some(EntryKind::Commands(_))),
                        "node {id}: proposal {} committed at {index}, which holds {kind:?}",
                        fate.id
                    );
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
            // Every entry up to the durable index is on disk as it is in memory.
            assert!(
                status.durable_index <= node.disk.entries.len() as Index,
                "node {id}: durable index {} but the disk holds 1..={}",
                status.durable_index,
                node.disk.entries.len()
            );
            for index in 1..=status.durable_index {
                assert_eq!(
                    node.replica.entry(index),
                    node.disk.entries.get((index - 1) as usize),
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

/// A term around `base`: `base - 2 ..= base + 2`.
fn near_term(offset: u8, base: Term) -> Term {
    base.saturating_sub(2) + Term::from(offset % 5)
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
    let last_term = to.entry(last).map_or(0, |e| e.term);
    match forged {
        Forged::PreVote {
            term: t,
            last_index,
            last_term: lt,
        } => Message::PreVote {
            term: near_term(t, term + 1),
            last_index: near_index(last_index, last),
            last_term: near_term(lt, last_term),
        },
        Forged::PreVoteResponse { term: t, granted } => Message::PreVoteResponse {
            term: near_term(t, term + 1),
            granted,
        },
        Forged::Vote {
            term: t,
            last_index,
            last_term: lt,
        } => Message::Vote {
            term: near_term(t, term + 1),
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
            let own_term = if prev_index == 0 {
                Some(0)
            } else {
                to.entry(prev_index).map(|e| e.term)
            };
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
                        entry_term = (entry_term + 1).min(term);
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
            let result = if accepted {
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
    }
}

/// Runs a scenario decoded from `data` against a 3-node group and returns what it reached.
/// Panics if a replica breaks one of its invariants.
///
/// Checked after every operation, on every replica: commit `<=` last index, commit never
/// decreases (within one incarnation), applied `<=` commit, `poll_committed` yields
/// consecutive indexes, durable index `<=` last index and every entry up to it is on the
/// (modelled) disk as in memory, the term never decreases, write ids increase by one, writes
/// are contiguous, a granted vote leaves only once it is durable, proposal fates are unique
/// and committed ones point at command entries. While no forged message has been delivered,
/// replicas must also agree on every entry they apply.
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
    group.stats
}

/// The `raft_messages` fuzz target: see [`run_raft_messages`].
pub fn raft_messages(data: &[u8]) {
    run_raft_messages(data);
}
