//! Membership change, paper-style (Ongaro's thesis §4.1–4.3): learners, single-server
//! changes, a configuration that takes effect when appended, one change at a time, a removed
//! leader that steps down after committing its removal, a removed node that cannot disrupt,
//! and a configuration that survives restarts and snapshots.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use holdfast_core::raft::*;
use holdfast_core::time::Instant;
use proptest::prelude::*;

const GROUP: GroupId = 1;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What a node's disk holds, rebuilt from the writes it was handed (all synced).
#[derive(Default, Clone)]
struct Disk {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

impl Disk {
    fn apply(&mut self, write: &Write) {
        if let Some(snapshot) = &write.snapshot {
            self.entries.retain(|e| e.index > snapshot.index);
            self.snapshot = Some(snapshot.clone());
        }
        if write.discard_log {
            self.entries.clear();
        }
        if let Some(hard_state) = write.hard_state {
            self.hard_state = hard_state;
        }
        if let Some(first) = write.entries.first() {
            self.entries.retain(|e| e.index < first.index);
            self.entries.extend(write.entries.iter().cloned());
        }
    }

    fn recovered(&self) -> Recovered {
        Recovered {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
        }
    }
}

struct Net {
    now: Instant,
    initial: Vec<NodeId>,
    nodes: BTreeMap<NodeId, Replica>,
    disks: BTreeMap<NodeId, Disk>,
    queue: VecDeque<Envelope>,
    isolated: BTreeSet<NodeId>,
    tweak: fn(&mut Config),
}

impl Net {
    fn new(n: u64) -> Net {
        Net::with(n, |_| {})
    }

    fn with(n: u64, tweak: fn(&mut Config)) -> Net {
        let initial: Vec<NodeId> = (1..=n).collect();
        let mut net = Net {
            now: Instant::ZERO,
            initial: initial.clone(),
            nodes: BTreeMap::new(),
            disks: BTreeMap::new(),
            queue: VecDeque::new(),
            isolated: BTreeSet::new(),
            tweak,
        };
        for id in initial {
            net.start(id);
        }
        net
    }

    /// Starts (or restarts) `id` from its disk, with the group's initial voters as its
    /// configuration until its log or snapshot says otherwise.
    fn start(&mut self, id: NodeId) {
        let mut config = Config::new(id, GROUP, self.initial.clone());
        (self.tweak)(&mut config);
        let disk = self.disks.entry(id).or_default().recovered();
        self.nodes
            .insert(id, Replica::new(config, disk, id * 7919, self.now));
    }

    fn node(&self, id: NodeId) -> &Replica {
        &self.nodes[&id]
    }

    fn status(&self, id: NodeId) -> Status {
        self.node(id).status()
    }

    fn voters(&self, id: NodeId) -> Vec<NodeId> {
        self.node(id)
            .membership()
            .1
            .voters
            .iter()
            .copied()
            .collect()
    }

    fn learners(&self, id: NodeId) -> Vec<NodeId> {
        self.node(id)
            .membership()
            .1
            .learners
            .iter()
            .copied()
            .collect()
    }

    fn flush(&mut self, id: NodeId) {
        let now = self.now;
        let replica = self.nodes.get_mut(&id).expect("node");
        while let Some(write) = replica.poll_write() {
            self.disks.entry(id).or_default().apply(&write);
            replica.persisted(now, write.id);
        }
        while let Some(envelope) = replica.poll_message() {
            if !self.isolated.contains(&envelope.from) && !self.isolated.contains(&envelope.to) {
                self.queue.push_back(envelope);
            }
        }
    }

    fn flush_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
    }

    /// Delivers one queued message; false if none is left.
    fn deliver_one(&mut self) -> bool {
        let Some(envelope) = self.queue.pop_front() else {
            return false;
        };
        if self.isolated.contains(&envelope.from) || self.isolated.contains(&envelope.to) {
            return true;
        }
        let now = self.now;
        if let Some(replica) = self.nodes.get_mut(&envelope.to) {
            replica.step(now, envelope.from, envelope.message);
            self.flush(envelope.to);
        }
        true
    }

    fn run(&mut self) {
        self.flush_all();
        for _ in 0..100_000 {
            if !self.deliver_one() {
                return;
            }
        }
        panic!("the network never went quiet");
    }

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

    fn change(&mut self, id: NodeId, change: ConfChange) -> Result<Index, MembershipError> {
        let now = self.now;
        let result = self
            .nodes
            .get_mut(&id)
            .expect("node")
            .propose_membership(now, 1_000, change);
        self.flush(id);
        result
    }

    fn propose(&mut self, id: NodeId, tag: u64) -> Index {
        let now = self.now;
        let command = vec![Bytes::from(format!("command {tag}"))];
        let replica = self.nodes.get_mut(&id).expect("node");
        let index = replica.propose(now, tag, command).expect("leader accepts");
        self.flush(id);
        index
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, r)| r.status().role == Role::Leader)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// A three-node group led by node 1 with node 4 added as a learner and caught up.
fn three_and_a_learner() -> Net {
    let mut net = Net::new(3);
    net.elect(1);
    net.start(4);
    net.change(1, ConfChange::AddLearner(4)).expect("adds");
    net.run();
    net
}

#[test]
fn a_learner_receives_the_log_but_neither_votes_nor_counts_nor_campaigns() {
    let mut net = three_and_a_learner();
    assert_eq!(
        net.voters(4),
        vec![1, 2, 3],
        "the learner learned the group"
    );
    assert_eq!(net.learners(4), vec![4]);
    let index = net.propose(1, 1);
    net.advance(ms(100));
    assert_eq!(net.status(4).commit_index, index, "the learner has the log");

    // A learner whose log holds nothing uncommitted never campaigns, however long it goes
    // without a leader.
    net.isolated = BTreeSet::from([1]);
    let term = net.status(4).term;
    for _ in 0..5 {
        net.fire(4);
    }
    assert_eq!(net.status(4).role, Role::Follower);
    assert_eq!(net.status(4).term, term);
    assert!(
        net.queue.iter().all(|e| e.from != 4),
        "the learner asked for votes"
    );
    net.queue.clear();
    net.isolated.clear();

    // The learner is no quorum with the leader: with 2 and 3 cut off nothing commits.
    net.isolated.extend([2, 3]);
    let index = net.propose(1, 2);
    net.run();
    assert!(
        net.status(4).last_index >= index,
        "replicated to the learner"
    );
    assert!(
        net.status(1).commit_index < index,
        "a learner's acknowledgement counted towards the commit"
    );
}

/// The leader replicated an entry to the learner alone and is gone for good: the voters left
/// may need the learner's log (one of them may count it a voter through a promotion it never
/// received), so the learner campaigns, without counting its own vote, and steps down once an
/// entry of its term commits.
#[test]
fn a_learner_holding_uncommitted_entries_campaigns_without_counting_itself() {
    let mut net = three_and_a_learner();
    net.propose(1, 1);
    net.advance(ms(100));
    net.isolated.extend([2, 3]);
    let index = net.propose(1, 2);
    net.run();
    assert!(net.status(4).last_index >= index && net.status(4).commit_index < index);
    let learners_entry = net.node(4).entry(index).cloned();
    net.isolated = BTreeSet::from([1]);
    net.fire(4);
    net.run();
    net.advance(ms(2_000));
    let committed = [2, 3]
        .iter()
        .all(|id| net.status(*id).commit_index >= index);
    assert!(committed, "the learner's entry committed by the voters");
    assert_eq!(
        net.node(2).entry(index).cloned(),
        learners_entry,
        "the learner's log won"
    );
    let leader = [2, 3]
        .into_iter()
        .find(|id| net.status(*id).role == Role::Leader);
    assert!(
        leader.is_some(),
        "a voter leads once the learner stepped down"
    );
    assert_ne!(net.status(4).role, Role::Leader);
    assert_eq!(net.learners(4), vec![4], "still a learner");
}

#[test]
fn candidates_ask_only_voters_and_count_only_voters() {
    let mut net = three_and_a_learner();
    // Node 2 campaigns with 3 cut off: the learner's grant must not make up a majority.
    net.isolated.extend([1, 3]);
    net.advance(ms(1_000));
    assert_ne!(
        net.status(2).role,
        Role::Leader,
        "won with a learner's vote"
    );
    assert!(
        net.queue
            .iter()
            .all(|e| !(e.to == 4 && matches!(e.message, Message::PreVote { .. }))),
        "a learner was asked for a vote"
    );
}

#[test]
fn promotion_waits_until_the_learner_caught_up_then_it_counts() {
    let mut net = Net::new(3);
    net.elect(1);
    for tag in 0..5 {
        net.propose(1, tag);
    }
    net.run();
    net.start(4);
    net.isolated.insert(4);
    net.change(1, ConfChange::AddLearner(4)).expect("adds");
    net.run();
    assert!(matches!(
        net.change(1, ConfChange::Promote(4)),
        Err(MembershipError::NotCaughtUp { id: 4, .. })
    ));
    net.isolated.clear();
    net.advance(ms(200));
    net.change(1, ConfChange::Promote(4)).expect("promotes");
    net.run();
    for id in 1..=4 {
        assert_eq!(net.voters(id), vec![1, 2, 3, 4], "node {id}");
    }
    // Four voters: a quorum is three, so 1, 2 and 4 commit without 3, but 1 and 2 do not.
    net.isolated.insert(3);
    let index = net.propose(1, 10);
    net.run();
    assert_eq!(net.status(1).commit_index, index);
    net.isolated.insert(4);
    let index = net.propose(1, 11);
    net.run();
    assert!(
        net.status(1).commit_index < index,
        "two of four voters committed"
    );
}

#[test]
fn a_configuration_takes_effect_when_appended_before_it_commits() {
    let mut net = Net::new(5);
    net.elect(1);
    // Only 2 hears the leader: the removal of 5 reaches it but cannot commit.
    net.isolated.extend([3, 4, 5]);
    let index = net.change(1, ConfChange::Remove(5)).expect("removes");
    assert_eq!(
        net.voters(1),
        vec![1, 2, 3, 4],
        "in effect on the leader at once"
    );
    net.run();
    assert!(net.status(2).commit_index < index, "not committed");
    assert_eq!(
        net.voters(2),
        vec![1, 2, 3, 4],
        "in effect on a follower as soon as it appended it"
    );
    assert_eq!(net.node(2).membership().0, index);
    // Four voters now: 1 and 2 alone are no quorum for the removal either.
    assert!(net.status(1).commit_index < index);
}

#[test]
fn a_second_change_is_refused_while_one_is_uncommitted() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolated.extend([2, 3]);
    let index = net.change(1, ConfChange::AddLearner(4)).expect("adds");
    assert_eq!(
        net.change(1, ConfChange::AddLearner(5)),
        Err(MembershipError::ChangePending { index })
    );
    assert_eq!(
        net.change(1, ConfChange::Remove(3)),
        Err(MembershipError::ChangePending { index })
    );
    net.isolated.clear();
    net.start(4);
    net.advance(ms(200));
    net.change(1, ConfChange::AddLearner(5))
        .expect("the next change once the first committed");
}

#[test]
fn a_new_leader_changes_nothing_before_it_committed_an_entry_of_its_term() {
    let mut fresh = Net::new(3);
    fresh.fire(1);
    while fresh.status(1).role != Role::Leader {
        assert!(fresh.deliver_one(), "never elected");
    }
    assert_eq!(
        fresh.change(1, ConfChange::AddLearner(4)),
        Err(MembershipError::NotReady),
        "a leader whose no-op is not committed may not know the latest configuration"
    );
    fresh.run();
    fresh.change(1, ConfChange::AddLearner(4)).expect("ready");
}

#[test]
fn changes_are_refused_with_reasons() {
    let mut net = Net::new(3);
    net.elect(1);
    assert!(matches!(
        net.change(2, ConfChange::AddLearner(4)),
        Err(MembershipError::NotLeader {
            leader_hint: Some(1)
        })
    ));
    assert_eq!(
        net.change(1, ConfChange::AddLearner(2)),
        Err(MembershipError::AlreadyMember { id: 2 })
    );
    assert_eq!(
        net.change(1, ConfChange::Promote(2)),
        Err(MembershipError::NotALearner { id: 2 })
    );
    assert_eq!(
        net.change(1, ConfChange::Remove(9)),
        Err(MembershipError::NotAMember { id: 9 })
    );
    let solo = Membership::new([1]);
    assert_eq!(
        solo.apply(ConfChange::Remove(1)),
        Err(MembershipError::LastVoter { id: 1 })
    );
}

#[test]
fn a_removed_leader_leads_until_its_removal_commits_then_steps_down_for_good() {
    let mut net = Net::new(3);
    net.elect(1);
    let index = net
        .change(1, ConfChange::Remove(1))
        .expect("removes itself");
    assert_eq!(net.voters(1), vec![2, 3]);
    assert_eq!(
        net.status(1).role,
        Role::Leader,
        "it sees its removal through"
    );
    net.run();
    assert!(net.status(2).commit_index >= index || net.status(1).commit_index >= index);
    assert_eq!(
        net.status(1).role,
        Role::Follower,
        "stepped down once committed"
    );
    assert_eq!(net.status(1).commit_index, index);
    // 2 and 3 elect a leader between them; 1 never campaigns again.
    net.advance(ms(2_000));
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    assert_ne!(leaders[0], 1);
    let leader = leaders[0];
    let index = net.propose(leader, 7);
    net.isolated.insert(1);
    net.run();
    assert_eq!(
        net.status(leader).commit_index,
        index,
        "two voters commit alone"
    );
}

#[test]
fn a_removed_follower_cannot_raise_the_members_terms() {
    // Node 3 campaigns without PreVote: the worst case for disruption.
    let mut net = Net::with(3, |c| c.pre_vote = c.id != 3);
    net.elect(1);
    // 3 is cut off before it receives its removal, so it never learns of it.
    net.isolated.insert(3);
    net.change(1, ConfChange::Remove(3)).expect("removes");
    net.run();
    let index = net.propose(1, 1);
    net.run();
    assert_eq!(net.status(1).commit_index, index, "1 and 2 commit alone");
    let term = net.status(1).term;
    net.isolated.clear();
    // 3 times out again and again and asks 1 and 2 for votes in ever higher terms.
    for _ in 0..5 {
        net.fire(3);
        net.run();
    }
    assert!(net.status(3).term > term, "3 campaigned");
    assert_eq!(net.status(1).term, term, "the leader's term was raised");
    assert_eq!(net.status(2).term, term, "a member's term was raised");
    assert_eq!(net.status(1).role, Role::Leader);
    // Even once the members lose their leader (their lease gone), 3 is refused unread.
    net.isolated.insert(1);
    net.now = net.now + ms(1_000);
    net.fire(3);
    net.run();
    assert_eq!(net.status(2).term, term);
}

#[test]
fn an_overwritten_configuration_entry_puts_the_previous_one_back() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolated.extend([2, 3]);
    net.change(1, ConfChange::Remove(3)).expect("removes");
    assert_eq!(net.voters(1), vec![1, 2]);
    // 2 leads a new term without the entry and writes over it.
    net.isolated = BTreeSet::from([1]);
    net.advance(ms(1_000));
    assert_eq!(net.leaders(), vec![2]);
    net.isolated.clear();
    net.advance(ms(200));
    assert_eq!(net.status(1).role, Role::Follower);
    assert_eq!(
        net.voters(1),
        vec![1, 2, 3],
        "the overwritten configuration is no longer in effect"
    );
    assert_eq!(net.node(1).membership().0, 0);
}

#[test]
fn the_configuration_survives_restarts_and_snapshots() {
    let mut net = three_and_a_learner();
    net.change(1, ConfChange::Promote(4)).expect("promotes");
    net.run();
    let index = net.propose(1, 1);
    net.run();
    // Restart from disk: the configuration is read back from the log.
    net.start(2);
    assert_eq!(net.voters(2), vec![1, 2, 3, 4]);
    // Compact past the configuration entries; restart: read back from the snapshot.
    net.advance(ms(100));
    let replica = net.nodes.get_mut(&2).expect("node");
    while replica.poll_committed().is_some() {}
    let applied = replica.status().applied_index;
    assert!(applied >= index);
    replica
        .compact(applied, Bytes::from_static(b"state"))
        .expect("compacts");
    net.flush(2);
    assert_eq!(
        net.disks[&2]
            .snapshot
            .as_ref()
            .and_then(|s| s.membership.clone()),
        Some(Membership::new([1, 2, 3, 4]))
    );
    net.start(2);
    assert_eq!(net.voters(2), vec![1, 2, 3, 4]);

    // A new node brought up by the leader's snapshot learns the group from it.
    let leader = net.nodes.get_mut(&1).expect("node");
    while leader.poll_committed().is_some() {}
    let applied = leader.status().applied_index;
    leader
        .compact(applied, Bytes::from_static(b"state"))
        .expect("compacts");
    net.change(1, ConfChange::AddLearner(5)).expect("adds");
    net.start(5);
    net.run();
    net.advance(ms(200));
    assert!(net.status(5).snapshot_index > 0, "installed a snapshot");
    assert_eq!(net.voters(5), vec![1, 2, 3, 4]);
    assert_eq!(net.learners(5), vec![5]);
    // And the snapshot file round-trips the configuration.
    let snapshot = net.node(5).snapshot().expect("snapshot").clone();
    let bytes = holdfast_core::storage::encode_snapshot(&snapshot);
    assert_eq!(
        holdfast_core::storage::decode_snapshot(Bytes::from(bytes)),
        Ok(snapshot)
    );
}

#[test]
fn grow_three_to_five_and_remove_two_originals() {
    let mut net = Net::new(3);
    net.elect(1);
    for new in [4, 5] {
        net.start(new);
        net.change(1, ConfChange::AddLearner(new)).expect("adds");
        net.run();
        net.change(1, ConfChange::Promote(new)).expect("promotes");
        net.run();
    }
    for old in [2, 3] {
        net.change(1, ConfChange::Remove(old)).expect("removes");
        net.run();
    }
    for id in [1, 4, 5] {
        assert_eq!(net.voters(id), vec![1, 4, 5], "node {id}");
    }
    net.isolated.extend([2, 3, 4, 5]);
    let index = net.propose(1, 1);
    net.run();
    assert!(net.status(1).commit_index < index, "1 alone committed");
    net.isolated.remove(&4);
    net.run();
    net.advance(ms(100));
    assert!(net.status(1).commit_index >= index, "1 and 4 commit");
}

/// Two configurations one single-server change apart share a voter between any majority of
/// the one and any majority of the other: the heart of the safety argument (thesis §4.1).
fn majorities(voters: &BTreeSet<NodeId>) -> Vec<BTreeSet<NodeId>> {
    let voters: Vec<NodeId> = voters.iter().copied().collect();
    let n = voters.len();
    (0u32..1 << n)
        .filter(|mask| 2 * mask.count_ones() as usize > n)
        .map(|mask| {
            (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| voters[i])
                .collect()
        })
        .collect()
}

proptest! {
    #[test]
    fn majorities_of_configurations_one_change_apart_intersect(
        voters in prop::collection::btree_set(1..9u64, 1..6),
        learners in prop::collection::btree_set(9..12u64, 0..2),
        change in (0..3u8, 1..12u64),
    ) {
        let before = Membership { voters, learners };
        let change = match change.0 {
            0 => ConfChange::AddLearner(change.1),
            1 => ConfChange::Promote(change.1),
            _ => ConfChange::Remove(change.1),
        };
        if let Ok(after) = before.apply(change) {
            prop_assert!(after.voters.is_disjoint(&after.learners));
            let changed = before.voters.symmetric_difference(&after.voters).count();
            prop_assert!(changed <= 1, "{change:?} moved {changed} voters");
            for a in majorities(&before.voters) {
                for b in majorities(&after.voters) {
                    prop_assert!(!a.is_disjoint(&b), "{a:?} and {b:?} after {change:?}");
                }
            }
        }
    }
}
