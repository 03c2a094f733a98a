//! Tests of the Raft paper's rules (in the spirit of etcd-io/raft's `raft_paper_test.go`),
//! driving `Replica` only through its public API with a tiny deterministic harness: replicas
//! in a `BTreeMap`, a message queue delivered by hand, and writes synced at once unless a test
//! holds them back.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use holdfast_core::raft::{
    AppendResult, CompactError, Config, Entry, EntryKind, Envelope, GroupId, HardState, Index,
    Message, NodeId, Recovered, Replica, Role, Snapshot, Status, Term, Write,
};
use holdfast_core::time::Instant;

const GROUP: GroupId = 1;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn entry(index: Index, term: Term) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Noop,
    }
}

/// A disk holding `term` (no vote) and a log whose entry `i + 1` has term `terms[i]`.
fn recovered(term: Term, terms: &[Term]) -> Recovered {
    Recovered {
        hard_state: HardState {
            term,
            vote: None,
            commit: 0,
        },
        snapshot: None,
        entries: (1..).zip(terms).map(|(i, t)| entry(i, *t)).collect(),
    }
}

fn log_of(replica: &Replica) -> Vec<Entry> {
    (1..=replica.status().last_index)
        .map(|i| replica.entry(i).cloned().expect("entry in log"))
        .collect()
}

fn terms_of(replica: &Replica) -> Vec<Term> {
    log_of(replica).iter().map(|e| e.term).collect()
}

struct Net {
    now: Instant,
    nodes: BTreeMap<NodeId, Replica>,
    queue: VecDeque<Envelope>,
    /// Every message to or from these nodes is dropped.
    isolated: BTreeSet<NodeId>,
    /// These nodes' writes are held back instead of synced.
    unsynced: BTreeSet<NodeId>,
    held: BTreeMap<NodeId, Vec<Write>>,
    /// Every message delivered so far, for replays.
    delivered: Vec<Envelope>,
    /// The highest commit index seen per node: checked never to move back.
    max_commit: BTreeMap<NodeId, Index>,
    /// Every write handed out, per node, in order.
    writes: BTreeMap<NodeId, Vec<Write>>,
    /// Each node's state machine in these tests: the commands it applied, in order.
    applied: BTreeMap<NodeId, Vec<Bytes>>,
}

impl Net {
    fn new(n: u64, tweak: impl Fn(&mut Config)) -> Net {
        Net::recovered((0..n).map(|_| Recovered::default()).collect(), tweak)
    }

    /// Node `i + 1` starts from `disks[i]`.
    fn recovered(disks: Vec<Recovered>, tweak: impl Fn(&mut Config)) -> Net {
        let voters: Vec<NodeId> = (1..=disks.len() as NodeId).collect();
        let nodes = voters
            .iter()
            .zip(disks)
            .map(|(&id, disk)| {
                let mut config = Config::new(id, GROUP, voters.clone());
                tweak(&mut config);
                (id, Replica::new(config, disk, id, Instant::ZERO))
            })
            .collect();
        Net {
            now: Instant::ZERO,
            nodes,
            queue: VecDeque::new(),
            isolated: BTreeSet::new(),
            unsynced: BTreeSet::new(),
            held: BTreeMap::new(),
            delivered: Vec::new(),
            max_commit: BTreeMap::new(),
            writes: BTreeMap::new(),
            applied: BTreeMap::new(),
        }
    }

    fn node(&self, id: NodeId) -> &Replica {
        &self.nodes[&id]
    }

    fn status(&self, id: NodeId) -> Status {
        self.node(id).status()
    }

    /// Takes `id`'s writes (syncing them unless it is unsynced) and queues its messages.
    fn flush(&mut self, id: NodeId) {
        let now = self.now;
        let replica = self.nodes.get_mut(&id).expect("node");
        while let Some(write) = replica.poll_write() {
            self.writes.entry(id).or_default().push(write.clone());
            if self.unsynced.contains(&id) {
                self.held.entry(id).or_default().push(write);
            } else {
                replica.persisted(now, write.id);
            }
        }
        while let Some(envelope) = replica.poll_message() {
            assert_eq!(envelope.from, id);
            if !self.isolated.contains(&envelope.from) && !self.isolated.contains(&envelope.to) {
                self.queue.push_back(envelope);
            }
        }
        let commit = replica.status().commit_index;
        let max = self.max_commit.entry(id).or_default();
        assert!(
            commit >= *max,
            "node {id}: commit moved back from {max} to {commit}"
        );
        *max = commit;
    }

    /// Syncs every write `id` holds back, and syncs its writes from now on.
    fn sync(&mut self, id: NodeId) {
        self.unsynced.remove(&id);
        if let Some(last) = self.held.remove(&id).and_then(|w| w.last().map(|w| w.id)) {
            let now = self.now;
            self.nodes.get_mut(&id).expect("node").persisted(now, last);
        }
        self.flush(id);
    }

    fn flush_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
    }

    fn deliver(&mut self, envelope: Envelope) {
        if self.isolated.contains(&envelope.from) || self.isolated.contains(&envelope.to) {
            return;
        }
        self.delivered.push(envelope.clone());
        let now = self.now;
        let replica = self.nodes.get_mut(&envelope.to).expect("node");
        replica.step(now, envelope.from, envelope.message);
        self.flush(envelope.to);
    }

    /// Delivers messages until none is left, except those `hold` keeps back (returned).
    fn run_holding(&mut self, hold: impl Fn(&Net, &Envelope) -> bool) -> Vec<Envelope> {
        self.flush_all();
        let mut held = Vec::new();
        for _ in 0..100_000 {
            let Some(envelope) = self.queue.pop_front() else {
                return held;
            };
            if hold(self, &envelope) {
                held.push(envelope);
            } else {
                self.deliver(envelope);
            }
        }
        panic!("the network never went quiet");
    }

    fn run(&mut self) {
        self.run_holding(|_, _| false);
    }

    /// Fires `id`'s next timer (and nobody else's), without delivering anything.
    fn fire(&mut self, id: NodeId) {
        self.now = self.now.max(self.node(id).poll_timeout());
        let now = self.now;
        self.nodes.get_mut(&id).expect("node").handle_timeout(now);
        self.flush(id);
    }

    /// Lets `total` pass in 5 ms steps, firing every due timer and delivering everything.
    fn advance(&mut self, total: Duration) {
        let end = self.now + total;
        while self.now < end {
            self.now = self.now + ms(5);
            let now = self.now;
            for replica in self.nodes.values_mut() {
                if now >= replica.poll_timeout() {
                    replica.handle_timeout(now);
                }
            }
            self.run();
        }
    }

    fn elect(&mut self, id: NodeId) {
        self.fire(id);
        self.run();
        assert_eq!(self.status(id).role, Role::Leader, "node {id} not elected");
    }

    /// Applies what `id` committed to its state machine, restoring it from an installed
    /// snapshot first if there is one; returns the state.
    fn apply(&mut self, id: NodeId) -> Vec<Bytes> {
        let replica = self.nodes.get_mut(&id).expect("node");
        let state = self.applied.entry(id).or_default();
        if let Some(snapshot) = replica.poll_restore() {
            *state = decode_state(&snapshot.data);
        }
        while let Some(entry) = replica.poll_committed() {
            if let EntryKind::Commands(commands) = entry.kind {
                state.extend(commands);
            }
        }
        state.clone()
    }

    /// Compacts `id`'s log up to what it applied.
    fn compact(&mut self, id: NodeId) -> Index {
        let state = self.apply(id);
        let replica = self.nodes.get_mut(&id).expect("node");
        let index = replica.status().applied_index;
        replica
            .compact(index, encode_state(&state))
            .expect("compacts what it applied");
        self.flush(id);
        index
    }

    fn propose(&mut self, id: NodeId, tag: u64) -> Index {
        let now = self.now;
        let command = vec![Bytes::from(format!("command {tag}"))];
        let replica = self.nodes.get_mut(&id).expect("node");
        let index = replica.propose(now, tag, command).expect("leader accepts");
        self.flush(id);
        index
    }
}

/// The test state machine's snapshot: its commands joined by newlines.
fn encode_state(state: &[Bytes]) -> Bytes {
    let parts: Vec<&[u8]> = state.iter().map(|b| b.as_ref()).collect();
    Bytes::from(parts.join(&b'\n'))
}

fn decode_state(data: &[u8]) -> Vec<Bytes> {
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|b| *b == b'\n')
        .map(Bytes::copy_from_slice)
        .collect()
}

/// A single replica of the group {1, 2, 3}, driven message by message.
fn solo(id: NodeId, disk: Recovered) -> Replica {
    let mut config = Config::new(id, GROUP, vec![1, 2, 3]);
    config.pre_vote = false;
    config.check_quorum = false;
    Replica::new(config, disk, 7, Instant::ZERO)
}

/// Syncs every write of `replica` and returns every message that may leave.
fn settle(replica: &mut Replica, now: Instant) -> Vec<Envelope> {
    while let Some(write) = replica.poll_write() {
        replica.persisted(now, write.id);
    }
    std::iter::from_fn(|| replica.poll_message()).collect()
}

fn vote_answer(out: &[Envelope], to: NodeId) -> Option<bool> {
    out.iter().find_map(|e| match e.message {
        Message::VoteResponse { granted, .. } if e.to == to => Some(granted),
        _ => None,
    })
}

fn append_answer(out: &[Envelope]) -> Option<AppendResult> {
    out.iter().find_map(|e| match e.message {
        Message::AppendResponse { result, .. } => Some(result),
        _ => None,
    })
}

fn vote(term: Term, last_index: Index, last_term: Term) -> Message {
    Message::Vote {
        term,
        last_index,
        last_term,
    }
}

#[test]
fn election_timeout_starts_pre_vote_and_majority_makes_leader_with_noop_of_its_term() {
    let mut net = Net::new(5, |_| {});
    // Only a bare majority (1, 2, 3) can talk.
    net.isolated.extend([4, 5]);
    let before = net.status(1).term;

    // Before the timer is due nothing happens.
    let early = net.node(1).poll_timeout() - ms(1);
    net.nodes.get_mut(&1).unwrap().handle_timeout(early);
    assert_eq!(net.status(1).role, Role::Follower);

    net.fire(1);
    let status = net.status(1);
    assert_eq!(status.role, Role::PreCandidate);
    assert_eq!(
        status.term, before,
        "a pre-candidate does not bump its term"
    );
    let asked: BTreeSet<NodeId> = net
        .queue
        .iter()
        .filter(|e| matches!(e.message, Message::PreVote { term, .. } if term == before + 1))
        .map(|e| e.to)
        .collect();
    assert_eq!(
        asked,
        BTreeSet::from([2, 3]),
        "pre-votes go to reachable peers"
    );

    net.run();
    let status = net.status(1);
    assert_eq!(status.role, Role::Leader, "three of five votes elect");
    assert_eq!(status.term, before + 1);
    let first = net.node(1).entry(1).expect("the leader appended an entry");
    assert_eq!((first.index, first.term), (1, status.term));
    assert_eq!(
        first.kind,
        EntryKind::Noop,
        "the first entry of a term is a no-op"
    );
    assert_eq!(status.last_index, 1);
    assert_eq!(
        status.commit_index, 1,
        "the no-op commits with the majority"
    );
    for id in [2, 3] {
        let follower = net.status(id);
        assert_eq!((follower.term, follower.leader), (status.term, Some(1)));
    }
}

#[test]
fn without_pre_vote_timeout_makes_candidate_of_next_term() {
    let mut net = Net::new(3, |c| c.pre_vote = false);
    net.fire(2);
    let status = net.status(2);
    assert_eq!(status.role, Role::Candidate);
    assert_eq!((status.term, status.vote), (1, Some(2)), "votes for itself");
    net.run();
    assert_eq!(net.status(2).role, Role::Leader);
}

#[test]
fn replica_grants_at_most_one_vote_per_term() {
    let mut r = solo(3, Recovered::default());
    let now = Instant::ZERO + ms(1000);

    r.step(now, 1, vote(1, 0, 0));
    assert!(
        r.poll_message().is_none(),
        "a vote leaves only once durable"
    );
    let out = settle(&mut r, now);
    assert_eq!(vote_answer(&out, 1), Some(true));
    assert_eq!(r.status().vote, Some(1));

    r.step(now, 2, vote(1, 0, 0));
    let out = settle(&mut r, now);
    assert_eq!(
        vote_answer(&out, 2),
        Some(false),
        "second candidate of term 1"
    );
    assert_eq!(r.status().vote, Some(1));

    // The same candidate asking again (a lost response) is granted again.
    r.step(now, 1, vote(1, 0, 0));
    assert_eq!(vote_answer(&settle(&mut r, now), 1), Some(true));

    // A new term frees the vote.
    r.step(now, 2, vote(2, 0, 0));
    assert_eq!(vote_answer(&settle(&mut r, now), 2), Some(true));
    assert_eq!((r.status().term, r.status().vote), (2, Some(2)));
}

#[test]
fn replica_refuses_vote_to_candidate_with_less_up_to_date_log() {
    // Our log: terms [1, 2, 2]; last entry (3, 2).
    let mut r = solo(3, recovered(2, &[1, 2, 2]));
    let now = Instant::ZERO + ms(1000);

    r.step(now, 1, vote(3, 10, 1));
    assert_eq!(
        vote_answer(&settle(&mut r, now), 1),
        Some(false),
        "lower last term"
    );
    r.step(now, 2, vote(3, 2, 2));
    assert_eq!(
        vote_answer(&settle(&mut r, now), 2),
        Some(false),
        "same term, shorter"
    );
    assert_eq!(r.status().vote, None, "refusals leave the vote free");

    r.step(now, 1, vote(3, 3, 2));
    assert_eq!(
        vote_answer(&settle(&mut r, now), 1),
        Some(true),
        "equal is up to date"
    );
    r.step(now, 2, vote(4, 1, 3));
    assert_eq!(
        vote_answer(&settle(&mut r, now), 2),
        Some(true),
        "higher last term"
    );
}

#[test]
fn follower_rejects_append_without_matching_prev_entry_and_repairs_conflicts() {
    let mut r = solo(2, recovered(2, &[1, 1, 2, 2]));
    let now = Instant::ZERO + ms(1000);
    let append = |prev_index, prev_term, entries| Message::Append {
        term: 3,
        prev_index,
        prev_term,
        entries,
        commit: 0,
    };

    // Index 4 is held but with term 2, not 3.
    r.step(now, 1, append(4, 3, vec![entry(5, 3)]));
    let result = append_answer(&settle(&mut r, now));
    assert!(
        matches!(
            result,
            Some(AppendResult::Rejected {
                rejected_index: 4,
                ..
            })
        ),
        "{result:?}"
    );
    // Index 6 is not held at all.
    r.step(now, 1, append(6, 3, vec![]));
    let result = append_answer(&settle(&mut r, now));
    assert!(
        matches!(
            result,
            Some(AppendResult::Rejected {
                rejected_index: 6,
                ..
            })
        ),
        "{result:?}"
    );
    assert_eq!(terms_of(&r), [1, 1, 2, 2], "a rejection changes nothing");

    // (2, 1) matches: entry 3 conflicts, so 3.. is replaced by the leader's.
    r.step(now, 1, append(2, 1, vec![entry(3, 3)]));
    let result = append_answer(&settle(&mut r, now));
    assert_eq!(result, Some(AppendResult::Accepted { match_index: 3 }));
    assert_eq!(terms_of(&r), [1, 1, 3]);

    // A stale, shorter append of entries we hold truncates nothing.
    r.step(now, 1, append(1, 1, vec![entry(2, 1)]));
    let result = append_answer(&settle(&mut r, now));
    assert_eq!(result, Some(AppendResult::Accepted { match_index: 2 }));
    assert_eq!(terms_of(&r), [1, 1, 3]);
}

/// Figure 2: commitIndex = min(leaderCommit, index of last new entry). A follower holding a
/// stale tail past what an append proved (an old leader's entries 3 and 4, which the new
/// leader's append of entry 2 alone does not reach) must not commit that tail because the
/// leader's commit is past it: the leader's entries there may differ.
#[test]
fn a_follower_commits_no_further_than_the_append_proved_its_log() {
    let mut r = solo(2, recovered(2, &[1, 1, 2, 2]));
    let now = Instant::ZERO + ms(1000);
    r.step(
        now,
        1,
        Message::Append {
            term: 3,
            prev_index: 1,
            prev_term: 1,
            entries: vec![entry(2, 1)],
            commit: 4,
        },
    );
    let result = append_answer(&settle(&mut r, now));
    assert_eq!(result, Some(AppendResult::Accepted { match_index: 2 }));
    assert_eq!(terms_of(&r), [1, 1, 2, 2], "nothing conflicted");
    assert_eq!(r.status().commit_index, 2, "entries 3 and 4 are not proven");
}

#[test]
fn new_leader_overwrites_conflicting_follower_suffix_until_logs_match() {
    let mut net = Net::recovered(
        vec![
            recovered(3, &[1, 1, 3, 3]),
            recovered(2, &[1, 1, 2, 2, 2]),
            recovered(1, &[1, 1]),
        ],
        |_| {},
    );
    net.elect(1);
    let term = net.status(1).term;
    assert_eq!(term, 4);
    net.propose(1, 1);
    net.run();

    let leader = log_of(net.node(1));
    assert_eq!(terms_of(net.node(1)), [1, 1, 3, 3, 4, 4]);
    for id in [2, 3] {
        assert_eq!(log_of(net.node(id)), leader, "node {id} log differs");
    }
    assert_eq!(net.status(1).commit_index, 6);
}

#[test]
fn leader_commits_earlier_term_entry_only_through_entry_of_its_own_term() {
    // Figure 8 (c): S1 holds (2, term 2), S5 holds (2, term 3) and is down.
    let mut net = Net::recovered(
        vec![
            recovered(3, &[1, 2]),
            recovered(3, &[1]),
            recovered(3, &[1]),
            recovered(3, &[1]),
            recovered(3, &[1, 3]),
        ],
        |c| c.append_entries_max = 1,
    );
    net.isolated.insert(5);
    net.fire(1);
    // Elect S1 and replicate entry 2 everywhere, but hold back every entry of term 4 from a
    // follower that already holds entry 2.
    let held = net.run_holding(|net, e| match &e.message {
        Message::Append { entries, .. } => {
            entries.iter().any(|x| x.term == 4) && net.status(e.to).last_index >= 2
        }
        _ => false,
    });
    let term = net.status(1).term;
    assert_eq!((net.status(1).role, term), (Role::Leader, 4));
    assert_eq!(net.node(1).entry(3).map(|e| e.term), Some(term));
    assert!(!held.is_empty());
    for id in [1, 2, 3, 4] {
        assert_eq!(net.node(id).entry(2).map(|e| e.term), Some(2), "node {id}");
    }
    assert!(
        net.status(1).commit_index < 2,
        "entry 2 of term 2 committed by counting replicas: commit {}",
        net.status(1).commit_index
    );
    let mut applied: Vec<Term> = Vec::new();
    let mut apply = |net: &mut Net| {
        let leader = net.nodes.get_mut(&1).unwrap();
        applied.extend(std::iter::from_fn(|| leader.poll_committed()).map(|e| e.term));
        assert_eq!(
            applied.len() as Index,
            leader.status().commit_index,
            "applied"
        );
    };
    apply(&mut net);

    for envelope in held {
        net.deliver(envelope);
    }
    net.run();
    assert_eq!(
        net.status(1).commit_index,
        3,
        "the term-4 entry commits both"
    );
    apply(&mut net);
    assert_eq!(applied, [1, 2, 4]);
}

#[test]
fn partitioned_node_with_pre_vote_keeps_its_term_and_does_not_depose_leader() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.advance(ms(200));
    let term = net.status(1).term;

    net.isolated.insert(3);
    net.advance(ms(3000));
    let lonely = net.status(3);
    assert_eq!(
        lonely.term, term,
        "pre-votes without a majority bump no term"
    );
    assert_ne!(lonely.role, Role::Leader);
    assert_eq!(
        (net.status(1).role, net.status(1).term),
        (Role::Leader, term)
    );

    net.isolated.clear();
    net.advance(ms(1000));
    assert_eq!(
        (net.status(1).role, net.status(1).term),
        (Role::Leader, term)
    );
    let back = net.status(3);
    assert_eq!(
        (back.role, back.term, back.leader),
        (Role::Follower, term, Some(1))
    );
}

/// Issue 17 asked whether PreVote refusals under a live leader lease could hold a healed node
/// in PreCandidate for seconds. They cannot: the leader's next heartbeat makes it a follower,
/// whatever it was doing. Checked in 5 ms steps, for a cut-off follower and for a cut-off
/// leader that the others replaced, after a partition long enough for many campaigns.
#[test]
fn a_healed_node_follows_the_leader_within_one_heartbeat_interval() {
    for cut in [3, 1] {
        let mut net = Net::new(3, |_| {});
        net.elect(1);
        net.advance(ms(200));
        let heartbeat = net.node(1).config().heartbeat_interval;

        net.isolated.insert(cut);
        net.advance(ms(15_000));
        let lonely = net.status(cut);
        assert_eq!(
            lonely.role,
            Role::PreCandidate,
            "node {cut} campaigns alone"
        );
        let leader = (1..=3)
            .find(|id| *id != cut && net.status(*id).role == Role::Leader)
            .expect("the majority has a leader");
        let term = net.status(leader).term;

        net.isolated.clear();
        let healed = net.now;
        while net.status(cut).leader != Some(leader) {
            assert!(
                net.now < healed + heartbeat + ms(10),
                "node {cut} still {:?} {:?} after healing",
                net.status(cut).role,
                net.now.saturating_since(healed)
            );
            net.advance(ms(5));
        }
        let back = net.status(cut);
        assert_eq!((back.role, back.term), (Role::Follower, term));
        assert_eq!(net.status(leader).role, Role::Leader, "the leader stays");
    }
}

#[test]
fn partitioned_node_without_pre_vote_inflates_its_term() {
    // The contrast that makes the test above meaningful.
    let mut net = Net::new(3, |c| c.pre_vote = false);
    net.elect(1);
    let term = net.status(1).term;
    net.isolated.insert(3);
    net.advance(ms(3000));
    assert!(net.status(3).term > term);
}

#[test]
fn check_quorum_leader_steps_down_without_hearing_from_majority() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.advance(ms(1000));
    assert_eq!(net.status(1).role, Role::Leader, "a healthy leader stays");
    let timeout = net.node(1).config().election_timeout_min;

    net.isolated.insert(1);
    net.advance(timeout * 2 + ms(10));
    assert_eq!(
        net.status(1).role,
        Role::Follower,
        "isolated leader stays leader"
    );
}

#[test]
fn leader_without_check_quorum_stays_leader_when_isolated() {
    let mut net = Net::new(3, |c| c.check_quorum = false);
    net.elect(1);
    net.isolated.insert(1);
    net.advance(ms(2000));
    assert_eq!(net.status(1).role, Role::Leader);
}

#[test]
fn follower_acknowledges_entries_only_once_durable() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.run();
    net.unsynced.extend([2, 3]);
    let index = net.propose(1, 1);
    let acks = net.run_holding(|_, e| matches!(e.message, Message::AppendResponse { .. }));

    for id in [2, 3] {
        let status = net.status(id);
        assert_eq!(status.last_index, index, "node {id} appended the entry");
        assert!(status.durable_index < index, "node {id}: not synced yet");
    }
    for ack in &acks {
        if let Message::AppendResponse {
            result: AppendResult::Accepted { match_index },
            ..
        } = ack.message
        {
            let durable = net.status(ack.from).durable_index;
            assert!(match_index <= durable, "{ack:?} beyond durable {durable}");
        }
    }
    for ack in acks {
        net.deliver(ack);
    }
    net.run();
    assert!(
        net.status(1).commit_index < index,
        "committed without a durable majority"
    );

    net.sync(2);
    let ack = net.queue.iter().find_map(|e| match e.message {
        Message::AppendResponse {
            result: AppendResult::Accepted { match_index },
            ..
        } if e.from == 2 => Some(match_index),
        _ => None,
    });
    assert_eq!(ack, Some(index), "the ack leaves once durable");
    net.run();
    assert_eq!(net.status(1).commit_index, index);
}

#[test]
fn leader_counts_itself_only_up_to_its_durable_index() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.run();
    net.isolated.insert(3);
    net.unsynced.insert(1);
    let first = net.propose(1, 1);
    let second = net.propose(1, 2);
    net.run();
    assert_eq!(
        net.status(2).durable_index,
        second,
        "the follower holds both"
    );
    assert!(net.status(1).durable_index < first);
    assert!(
        net.status(1).commit_index < first,
        "leader counted its own unsynced entry"
    );

    // Only the write of the first proposal is reported synced.
    let writes = net.held.remove(&1).expect("held writes");
    assert_eq!(writes.len(), 2, "one write per proposal");
    let now = net.now;
    net.nodes.get_mut(&1).unwrap().persisted(now, writes[0].id);
    net.flush(1);
    net.run();
    let status = net.status(1);
    assert_eq!(
        status.durable_index, first,
        "durable only up to the synced write"
    );
    assert_eq!(
        status.commit_index, first,
        "commit stops at the leader's durable index"
    );

    net.held.insert(1, writes);
    net.sync(1);
    net.run();
    assert_eq!(net.status(1).commit_index, second);
    let fates: Vec<u64> = std::iter::from_fn(|| net.nodes.get_mut(&1).unwrap().poll_proposal())
        .map(|f| f.id)
        .collect();
    assert_eq!(fates, [1, 2]);
}

#[test]
fn follower_ignores_append_from_leader_of_older_term() {
    let mut r = solo(2, recovered(3, &[1, 1]));
    let now = Instant::ZERO + ms(1000);
    let stale = Message::Append {
        term: 2,
        prev_index: 2,
        prev_term: 1,
        entries: vec![entry(3, 2)],
        commit: 3,
    };
    r.step(now, 1, stale);
    let out = settle(&mut r, now);
    assert_eq!(append_answer(&out), None, "no ack to a stale leader");
    assert!(
        out.iter()
            .any(|e| matches!(e.message, Message::HeartbeatResponse { term: 3, .. })),
        "the reply tells the stale leader the newer term: {out:?}"
    );
    assert_eq!(terms_of(&r), [1, 1]);
    assert_eq!((r.status().term, r.status().commit_index), (3, 0));
}

#[test]
fn commit_index_never_moves_back_under_replays_and_leader_change() {
    // `Net::flush` asserts after every step that no commit index moved back.
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    for tag in 1..=3 {
        net.propose(1, tag);
    }
    net.advance(ms(200));
    let committed = net.status(1).commit_index;
    assert_eq!(committed, 4);

    // Depose 1, elect a new leader and commit more.
    net.isolated.insert(1);
    net.advance(ms(1000));
    let leader = [2, 3]
        .into_iter()
        .find(|id| net.status(*id).role == Role::Leader)
        .expect("2 or 3 leads");
    net.propose(leader, 4);
    net.advance(ms(200));
    net.isolated.clear();
    net.advance(ms(500));
    let before: Vec<Status> = (1..=3).map(|id| net.status(id)).collect();
    assert!(before.iter().all(|s| s.commit_index > committed));

    // Replay every message ever delivered, newest first, then oldest first.
    let history = net.delivered.clone();
    for envelope in history.iter().rev().chain(&history).cloned() {
        net.deliver(envelope);
        net.run();
    }
    for (id, old) in (1..=3).zip(before) {
        assert!(net.status(id).commit_index >= old.commit_index, "node {id}");
    }
}

// ----- snapshots and compaction (Raft paper §7) -----

fn install(term: Term, index: Index, snapshot_term: Term, data: &'static [u8]) -> Message {
    Message::InstallSnapshot {
        term,
        index,
        snapshot_term,
        offset: 0,
        total: data.len() as u64,
        chunk: Bytes::from_static(data),
        membership: None,
    }
}

#[test]
fn lagging_follower_is_brought_up_by_a_chunked_snapshot_and_restores_the_same_state() {
    let mut net = Net::new(3, |c| c.snapshot_chunk_bytes_max = 8);
    net.elect(1);
    net.run();
    net.isolated.insert(3);
    for tag in 0..10 {
        net.propose(1, tag);
        net.run();
    }
    let snapshot_index = net.compact(1);
    assert_eq!(net.status(1).snapshot_index, snapshot_index);
    assert!(net.node(1).entry(snapshot_index).is_none(), "compacted");
    let leader_state = net.apply(1);
    assert_eq!(leader_state.len(), 10);
    let after = net.propose(1, 10);
    net.run();

    net.isolated.remove(&3);
    net.advance(ms(200));
    let chunks = net
        .delivered
        .iter()
        .filter(|e| e.to == 3 && matches!(e.message, Message::InstallSnapshot { .. }))
        .count();
    let size = encode_state(&leader_state).len();
    assert!(
        chunks >= size.div_ceil(8),
        "{chunks} chunks for {size} bytes"
    );
    let status = net.status(3);
    assert_eq!(status.snapshot_index, snapshot_index);
    assert_eq!(status.commit_index, after, "caught up past the snapshot");
    let installed = net.writes[&3]
        .iter()
        .find_map(|w| w.snapshot.clone())
        .expect("the snapshot was written");
    assert_eq!(installed.index, snapshot_index);
    assert_eq!(installed.data, encode_state(&leader_state));
    let state = net.apply(3);
    assert_eq!(
        state,
        net.apply(1),
        "the follower's state equals the leader's"
    );
    assert_eq!(state.len(), 11);
}

#[test]
fn install_keeps_a_log_that_continues_the_snapshot_and_replaces_one_that_conflicts() {
    // Entry 3 has the snapshot's term: entry 4 continues it and stays.
    let mut replica = solo(2, recovered(2, &[1, 1, 2, 2]));
    replica.step(Instant::ZERO, 1, install(3, 3, 2, b"abc"));
    let write = replica.poll_write().expect("a write");
    assert_eq!(write.snapshot.as_ref().map(|s| s.index), Some(3));
    assert!(!write.discard_log);
    assert_eq!(replica.entry(4).map(|e| e.term), Some(2));
    assert_eq!(replica.status().last_index, 4);

    // Entry 3 has another term: everything after the snapshot conflicts and goes.
    let mut replica = solo(2, recovered(1, &[1, 1, 1, 1]));
    replica.step(Instant::ZERO, 1, install(3, 3, 2, b"abc"));
    let write = replica.poll_write().expect("a write");
    assert!(write.discard_log, "the disk's log is replaced whole");
    assert!(write.entries.is_empty());
    assert_eq!(replica.entry(4), None);
    assert_eq!(replica.status().last_index, 3);
    assert_eq!(replica.status().commit_index, 3);
    assert_eq!(
        replica.poll_restore().map(|s| s.data),
        Some(Bytes::from_static(b"abc"))
    );
    assert_eq!(
        replica.poll_committed(),
        None,
        "nothing below the snapshot to apply"
    );
}

#[test]
fn follower_acknowledges_a_snapshot_only_once_durable() {
    let mut replica = solo(2, recovered(1, &[1]));
    replica.step(Instant::ZERO, 1, install(3, 5, 2, b"state"));
    assert_eq!(
        replica.poll_message(),
        None,
        "nothing leaves before the sync"
    );
    let write = replica.poll_write().expect("a write");
    assert_eq!(replica.poll_message(), None);
    replica.persisted(Instant::ZERO, write.id);
    let out: Vec<Envelope> = std::iter::from_fn(|| replica.poll_message()).collect();
    assert_eq!(
        append_answer(&out),
        Some(AppendResult::Accepted { match_index: 5 })
    );
    assert_eq!(replica.status().durable_index, 5);
}

#[test]
fn snapshot_below_the_commit_index_changes_nothing() {
    let mut disk = recovered(2, &[1, 2, 2]);
    disk.hard_state.commit = 3;
    let mut replica = solo(2, disk);
    replica.step(Instant::ZERO, 1, install(3, 2, 2, b"old"));
    let out = settle(&mut replica, Instant::ZERO);
    assert_eq!(
        append_answer(&out),
        Some(AppendResult::Accepted { match_index: 3 })
    );
    assert_eq!(replica.status().snapshot_index, 0);
    assert_eq!(replica.poll_restore(), None);
    assert_eq!(replica.entry(3).map(|e| e.term), Some(2));
}

#[test]
fn compaction_covers_only_applied_entries_past_the_last_snapshot() {
    let mut disk = recovered(1, &[1, 1, 1]);
    disk.hard_state.commit = 3;
    let mut replica = solo(1, disk);
    assert_eq!(
        replica.compact(1, Bytes::new()),
        Err(CompactError::NotApplied {
            index: 1,
            applied: 0
        })
    );
    while replica.poll_committed().is_some() {}
    assert_eq!(replica.compact(2, Bytes::from_static(b"2")), Ok(()));
    assert_eq!(
        replica.compact(2, Bytes::new()),
        Err(CompactError::Stale {
            index: 2,
            snapshot_index: 2
        })
    );
    let write = replica.poll_write().expect("the snapshot is written");
    assert_eq!(write.snapshot.map(|s| (s.index, s.term)), Some((2, 1)));
    assert!(!write.discard_log && write.entries.is_empty());
    assert_eq!(replica.entry(2), None);
    assert_eq!(replica.entry(3).map(|e| e.index), Some(3));
}

#[test]
fn restart_from_a_snapshot_applies_only_what_follows_it() {
    let disk = Recovered {
        hard_state: HardState {
            term: 2,
            vote: None,
            commit: 6,
        },
        snapshot: Some(Snapshot {
            index: 4,
            term: 2,
            data: Bytes::from_static(b"four"),
            membership: None,
        }),
        entries: vec![entry(5, 2), entry(6, 2), entry(7, 2)],
    };
    let mut replica = solo(1, disk);
    let status = replica.status();
    assert_eq!(
        (
            status.snapshot_index,
            status.applied_index,
            status.commit_index
        ),
        (4, 4, 6)
    );
    assert_eq!(status.last_index, 7);
    let applied: Vec<Index> = std::iter::from_fn(|| replica.poll_committed())
        .map(|e| e.index)
        .collect();
    assert_eq!(applied, vec![5, 6]);
    // Its log still matches at the snapshot's index, so it votes by the snapshot's term.
    let out = settle(&mut replica, Instant::ZERO);
    assert!(out.is_empty());
    replica.step(Instant::ZERO, 2, vote(3, 4, 2));
    let out = settle(&mut replica, Instant::ZERO);
    assert_eq!(
        vote_answer(&out, 2),
        Some(false),
        "candidate's log is behind"
    );
}

#[test]
fn a_lost_snapshot_chunk_is_sent_again() {
    let mut net = Net::new(3, |c| c.snapshot_chunk_bytes_max = 4);
    net.elect(1);
    net.run();
    net.isolated.insert(3);
    for tag in 0..4 {
        net.propose(1, tag);
        net.run();
    }
    let snapshot_index = net.compact(1);
    net.isolated.remove(&3);
    // Every chunk to node 3 is lost for a while.
    for _ in 0..20 {
        net.now = net.now + ms(10);
        let now = net.now;
        for replica in net.nodes.values_mut() {
            if now >= replica.poll_timeout() {
                replica.handle_timeout(now);
            }
        }
        net.run_holding(|_, e| matches!(e.message, Message::InstallSnapshot { .. }));
    }
    assert_eq!(net.status(3).snapshot_index, 0);
    net.advance(ms(500));
    assert_eq!(net.status(3).snapshot_index, snapshot_index);
    assert_eq!(net.apply(3), net.apply(1));
}

#[test]
fn a_follower_busy_syncing_still_answers_heartbeats_but_acknowledges_only_durable_entries() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.run();
    net.unsynced.extend([2, 3]);
    let index = net.propose(1, 1);
    // A heartbeat round: the answers leave although the followers' writes are not synced.
    net.advance(ms(60));
    let answered: BTreeSet<NodeId> = net
        .delivered
        .iter()
        .filter(|e| e.to == 1 && matches!(e.message, Message::HeartbeatResponse { .. }))
        .map(|e| e.from)
        .collect();
    assert_eq!(answered, BTreeSet::from([2, 3]));
    let acked = net.delivered.iter().any(|e| {
        matches!(
            e.message,
            Message::AppendResponse {
                result: AppendResult::Accepted { match_index },
                ..
            } if match_index >= index
        )
    });
    assert!(!acked, "an entry was acknowledged before it was durable");
    net.advance(ms(400));
    assert_eq!(
        net.status(1).role,
        Role::Leader,
        "CheckQuorum keeps the leader"
    );
    assert!(
        net.status(1).commit_index < index,
        "nothing committed on answers alone"
    );
}

// ----- leadership transfer (etcd-io/raft's TimeoutNow; Ongaro's thesis §3.10) -----

#[test]
fn transfer_to_a_caught_up_follower_elects_it_at_once_without_pre_vote() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.propose(1, 1);
    net.run();
    let term = net.status(1).term;
    let before = net.now;

    let now = net.now;
    net.nodes
        .get_mut(&1)
        .expect("node")
        .transfer_leadership(now, 2)
        .expect("a leader may hand over to a voter");
    net.flush(1);
    // Delivered without letting any time pass: no election timeout is waited for.
    let sent: Vec<Envelope> = net.run_holding(|_, _| false);
    assert!(sent.is_empty());
    assert_eq!(net.now, before);
    let kinds: Vec<&Message> = net.delivered.iter().map(|e| &e.message).collect();
    assert!(
        kinds
            .iter()
            .any(|m| matches!(m, Message::TimeoutNow { .. })),
        "no TimeoutNow went out"
    );
    assert!(
        kinds
            .iter()
            .any(|m| matches!(m, Message::TransferVote { .. })),
        "the target did not campaign with transfer votes"
    );
    assert_eq!(
        (net.status(2).role, net.status(2).term),
        (Role::Leader, term + 1)
    );
    assert_eq!(
        (net.status(1).role, net.status(1).leader),
        (Role::Follower, Some(2))
    );
    assert_eq!(net.status(3).leader, Some(2));
    // The new leader holds what the old one committed.
    assert_eq!(terms_of(net.node(2))[..3], terms_of(net.node(1))[..3]);
}

#[test]
fn transfer_to_a_lagging_follower_catches_it_up_first() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolated.insert(3);
    for tag in 0..5 {
        net.propose(1, tag);
    }
    net.run();
    let last = net.status(1).last_index;
    assert!(net.status(3).last_index < last);
    net.isolated.clear();

    let now = net.now;
    net.nodes
        .get_mut(&1)
        .expect("node")
        .transfer_leadership(now, 3)
        .expect("transfer");
    net.flush(1);
    let mark = net.delivered.len();
    net.run();
    assert!(net.delivered.len() > mark);
    assert_eq!(net.status(3).role, Role::Leader);
    // TimeoutNow left only once node 3 acknowledged the whole log: it won with all of it.
    let timeout_now = net
        .delivered
        .iter()
        .position(|e| matches!(e.message, Message::TimeoutNow { .. }))
        .expect("TimeoutNow sent");
    let acked_all = net.delivered[..timeout_now].iter().any(|e| {
        e.from == 3
            && matches!(
                e.message,
                Message::AppendResponse {
                    result: AppendResult::Accepted { match_index },
                    ..
                } if match_index == last
            )
    });
    assert!(acked_all, "TimeoutNow before the target held the log");
    for index in 1..=last {
        assert_eq!(net.node(3).entry(index), net.node(1).entry(index));
    }
}

#[test]
fn a_transferring_leader_refuses_proposals_and_gives_up_after_an_election_timeout() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.advance(ms(100));
    // Node 3 lags and stays cut off: it never holds the whole log, so no TimeoutNow leaves.
    net.isolated.insert(3);
    net.propose(1, 1);
    net.run();
    let now = net.now;
    let leader = net.nodes.get_mut(&1).expect("node");
    leader.transfer_leadership(now, 3).expect("transfer");
    assert_eq!(leader.transferring_to(), Some(3));
    assert_eq!(
        leader.propose(now, 99, vec![Bytes::from_static(b"x")]),
        Err(holdfast_core::raft::ProposeError::Transferring { to: 3 })
    );
    assert_eq!(
        leader.transfer_leadership(now, 2),
        Err(holdfast_core::raft::TransferError::Transferring { to: 3 })
    );
    let timeout = leader.config().election_timeout_min;

    net.advance(timeout + ms(10));
    let leader = net.nodes.get_mut(&1).expect("node");
    assert_eq!(
        leader.status().role,
        Role::Leader,
        "node 2 keeps it in office"
    );
    assert_eq!(leader.transferring_to(), None);
    let events: Vec<_> = std::iter::from_fn(|| leader.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(
            e,
            holdfast_core::raft::RaftEvent::TransferAborted { to: 3, .. }
        )),
        "{events:?}"
    );
    net.propose(1, 100);
    net.run();
    assert!(net.status(1).commit_index >= 3, "proposals are taken again");
}

#[test]
fn voters_in_a_leader_lease_grant_a_transfer_vote_but_not_a_plain_vote() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.advance(ms(100));
    let term = net.status(2).term;
    let last = net.status(2).last_index;
    let last_term = net.node(2).entry(last).map(|e| e.term).expect("entry");
    let now = net.now;
    let voter = net.nodes.get_mut(&2).expect("node");

    voter.step(
        now,
        3,
        Message::Vote {
            term: term + 1,
            last_index: last,
            last_term,
        },
    );
    assert!(
        settle(voter, now).is_empty(),
        "a plain vote is ignored in the lease"
    );
    assert_eq!(voter.status().term, term);

    voter.step(
        now,
        3,
        Message::TransferVote {
            term: term + 1,
            last_index: last,
            last_term,
        },
    );
    assert_eq!(vote_answer(&settle(voter, now), 3), Some(true));
    assert_eq!(voter.status().vote, Some(3));
}

#[test]
fn a_leader_that_sent_timeout_now_has_no_read_lease_for_the_rest_of_its_term() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.advance(ms(100));
    assert!(
        net.node(1).read_lease(net.now),
        "a settled leader has its lease"
    );
    // Node 2 hears TimeoutNow but nobody hears its votes: node 1 stays leader.
    let now = net.now;
    net.nodes
        .get_mut(&1)
        .expect("node")
        .transfer_leadership(now, 2)
        .expect("transfer");
    net.flush(1);
    let held = net.run_holding(|_, e| e.from == 2);
    assert!(
        held.iter()
            .any(|e| matches!(e.message, Message::TransferVote { .. })),
        "node 2 campaigned"
    );
    assert_eq!(net.status(1).role, Role::Leader);
    assert!(
        !net.node(1).read_lease(net.now),
        "voters may grant node 2 despite their promise: no lease"
    );
    // Given up, node 1 steps down rather than lead on without a lease, and an election
    // makes a leader that has one.
    let timeout = net.node(1).config().election_timeout_min;
    let gave_up = net.now + timeout;
    while net.now < gave_up {
        net.now = net.now + ms(5);
        let now = net.now;
        let node = net.nodes.get_mut(&1).expect("node");
        if now >= node.poll_timeout() {
            node.handle_timeout(now);
        }
    }
    assert_ne!(net.status(1).role, Role::Leader, "leads on without a lease");
    net.queue.clear();
    net.advance(ms(2000));
    let leader = (1..=3)
        .find(|id| net.status(*id).role == Role::Leader)
        .expect("a leader again");
    assert!(net.node(leader).read_lease(net.now), "with a lease");
}

#[test]
fn transfer_is_refused_by_a_follower_and_to_itself_or_a_stranger() {
    use holdfast_core::raft::TransferError;
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    let now = net.now;
    assert_eq!(
        net.nodes
            .get_mut(&2)
            .expect("node")
            .transfer_leadership(now, 3),
        Err(TransferError::NotLeader {
            leader_hint: Some(1)
        })
    );
    let leader = net.nodes.get_mut(&1).expect("node");
    assert_eq!(
        leader.transfer_leadership(now, 1),
        Err(TransferError::NotAVoter { to: 1 })
    );
    assert_eq!(
        leader.transfer_leadership(now, 9),
        Err(TransferError::NotAVoter { to: 9 })
    );
    assert_eq!(leader.transferring_to(), None);
}
