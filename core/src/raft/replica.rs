//! The replica: election, replication, commit. See the module docs of `raft` for the contract.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::configs::Configs;
use super::log::RaftLog;
use super::progress::{Progress, ProgressState};
use super::quorum::{majority, quorum_index};
use super::types::*;
use crate::time::Instant;

/// A write handed to the driver and not yet reported durable.
#[derive(Debug)]
struct WriteInFlight {
    id: WriteId,
    /// The last log index once this write is on disk.
    last_index: Index,
    /// Entries above this index are being replaced by this write.
    rewrite_floor: Index,
}

/// A damaged replica's progress towards repair.
#[derive(Debug)]
struct DamageState {
    from: Index,
    /// Every term in which this replica voted or acknowledged before the damage is at most this.
    recovered_term: Term,
    votes_lost: bool,
    /// The commit index at which repair was reached; repair is complete once every entry up to
    /// here is durable.
    repaired_at: Option<Index>,
}

/// A leadership transfer under way on a leader (etcd-io/raft's `leadTransferee`).
#[derive(Debug)]
struct Transfer {
    to: NodeId,
    /// Given up if `to` has not taken over by then: one election timeout after it began.
    deadline: Instant,
}

/// A snapshot a follower is receiving, chunk by chunk.
#[derive(Debug)]
struct IncomingSnapshot {
    index: Index,
    term: Term,
    total: u64,
    data: Vec<u8>,
}

/// Messages of this term or higher are dropped unread.
pub const TERM_MAX: Term = u64::MAX / 2;
/// Messages of a term above this, and more than one past the replica's own, are dropped
/// unread and reported: see [`crate::limits::TERM_ACCEPTED_MAX`].
pub use crate::limits::TERM_ACCEPTED_MAX;
/// Events a replica holds for its driver; past it the oldest are dropped.
const EVENTS_MAX: usize = 64;

pub struct Replica {
    config: Config,
    rng: ChaCha8Rng,

    // Persistent state (mirrored to disk through `Write`s).
    term: Term,
    vote: Option<NodeId>,
    log: RaftLog,
    /// The configurations the log and snapshot hold; the latest is in effect.
    configs: Configs,
    /// The configuration (and its entry's index) the side effects of a change were last run
    /// for: the leader's progress map, the step-down of a removed leader, the driver's event.
    membership_seen: (Index, Membership),

    // Volatile state.
    role: Role,
    leader: Option<NodeId>,
    commit: Index,
    applied: Index,
    /// Votes (or pre-votes) received in the current campaign.
    votes: BTreeMap<NodeId, bool>,
    /// The leader's view of each follower.
    progress: BTreeMap<NodeId, Progress>,
    /// Proposals whose entries are in the log but not yet committed or overwritten, with when
    /// each was proposed.
    proposals: BTreeMap<Index, (ProposalId, Term, Instant)>,
    /// On a leader handing over: to whom, and until when.
    transfer: Option<Transfer>,
    /// The term in which this replica, leading, last sent `TimeoutNow` (0: never). Voters
    /// grant a transfer's votes despite the promise behind the read lease, so from then on
    /// this leader's lease is void for the rest of its term, even if the transfer is given up.
    timeout_now_term: Term,
    fates: VecDeque<ProposalFate>,

    // Timers.
    election_deadline: Instant,
    heartbeat_deadline: Instant,
    check_quorum_deadline: Instant,
    /// When this follower last heard from a leader of its term (for the CheckQuorum lease).
    leader_contact: Option<Instant>,
    started_at: Instant,

    // Durability bookkeeping.
    /// Ids handed out so far; the next write gets `writes_issued + 1`.
    writes_issued: WriteId,
    durable_write: WriteId,
    hard_state_dirty: bool,
    /// The lowest log index changed since the last `poll_write`.
    log_dirty_from: Option<Index>,
    /// The commit index carried by the last write.
    written_commit: Index,
    /// The id of the write that carries the latest term and vote.
    term_write: WriteId,
    writes_in_flight: VecDeque<WriteInFlight>,
    /// Every entry up to here is durable and equal to the in-memory log.
    durable_index: Index,
    /// Set while recovery's damage is not repaired; see [`Replica::damaged_from`].
    damage: Option<DamageState>,

    // Snapshots.
    /// The latest snapshot, standing in for the log up to its index (sent to followers that
    /// need what it replaced).
    snapshot: Option<Snapshot>,
    /// `snapshot` is not yet handed out in a write.
    snapshot_dirty: bool,
    incoming_snapshot: Option<IncomingSnapshot>,
    /// An installed snapshot the driver has not yet restored its state machine from.
    restore: Option<Snapshot>,
    /// After installing a snapshot that replaces a conflicting log, until the write carrying
    /// it is issued: the highest index the disk's old log still agrees with (what was
    /// committed before). Until that write is durable nothing above it is durable.
    discard_floor: Option<Index>,
    /// Whether followers are sent a transfer image of the snapshot rather than the snapshot
    /// itself (see [`Replica::use_transfer_images`]).
    transfer_images: bool,
    /// The transfer image of `snapshot` (same index and term), while a follower may need it.
    transfer_image: Option<Snapshot>,
    /// The index of a snapshot whose transfer image a follower waits for and the driver has
    /// not yet been asked for.
    transfer_wanted: Option<Index>,

    /// Which protocol paths this replica took; see [`RaftCounters`].
    counters: RaftCounters,

    // Outputs.
    events: VecDeque<RaftEvent>,
    ready: VecDeque<Envelope>,
    /// Messages waiting until the given write is durable, oldest first.
    waiting: VecDeque<(WriteId, Envelope)>,
}

impl Replica {
    /// Starts a replica from what its disk holds. `seed` drives its randomised election
    /// timeouts; a driver passes a fresh seed on every start.
    pub fn new(config: Config, recovered: Recovered, seed: u64, now: Instant) -> Replica {
        let Recovered {
            hard_state,
            snapshot,
            entries,
        } = recovered;
        let (snapshot_index, snapshot_term) =
            snapshot.as_ref().map_or((0, 0), |s| (s.index, s.term));
        let mut log = RaftLog::new(snapshot_index, snapshot_term, entries);
        let damage = config.damaged.get(&config.group).map(|damage| {
            // Only the valid prefix, whatever the driver passed; a snapshot is never damaged
            // (a driver whose snapshot fails its checksum passes none).
            let from = damage.from.max(snapshot_index + 1);
            log.truncate_from(from);
            DamageState {
                from,
                recovered_term: hard_state.term.max(log.last_term()),
                votes_lost: damage.votes_lost,
                repaired_at: None,
            }
        });
        let initial = Membership::new(config.voters.iter().copied());
        let mut configs = Configs::new(
            snapshot
                .as_ref()
                .and_then(|s| s.membership.clone())
                .unwrap_or(initial),
        );
        for index in snapshot_index + 1..=log.last_index() {
            if let Some(Entry {
                kind: EntryKind::Config(membership),
                ..
            }) = log.get(index)
            {
                configs.appended(index, membership.clone());
            }
        }
        let membership_seen = {
            let (index, membership) = configs.latest();
            (index, membership.clone())
        };
        let durable_index = log.last_index();
        let commit = hard_state.commit.min(log.last_index()).max(snapshot_index);
        let mut replica = Replica {
            rng: ChaCha8Rng::seed_from_u64(seed),
            term: hard_state.term,
            vote: hard_state.vote,
            log,
            configs,
            membership_seen,
            role: Role::Follower,
            leader: None,
            commit,
            applied: snapshot_index,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            proposals: BTreeMap::new(),
            transfer: None,
            timeout_now_term: 0,
            fates: VecDeque::new(),
            election_deadline: now,
            heartbeat_deadline: now,
            check_quorum_deadline: now,
            leader_contact: None,
            started_at: now,
            writes_issued: 0,
            durable_write: 0,
            hard_state_dirty: false,
            log_dirty_from: None,
            written_commit: commit,
            term_write: 0,
            writes_in_flight: VecDeque::new(),
            durable_index,
            damage,
            snapshot,
            snapshot_dirty: false,
            incoming_snapshot: None,
            restore: None,
            discard_floor: None,
            counters: RaftCounters::default(),
            transfer_images: false,
            transfer_image: None,
            transfer_wanted: None,
            events: VecDeque::new(),
            ready: VecDeque::new(),
            waiting: VecDeque::new(),
            config,
        };
        if replica.canary(Canary::ForgetVoteOnRestart) {
            replica.vote = None;
        }
        if replica.canary(Canary::ForgetCommitOnRestart) {
            replica.commit = snapshot_index;
        }
        replica.reset_election_deadline(now);
        replica
    }

    /// Handles one message from the replica of node `from`.
    ///
    /// Messages are not filtered by the configuration (thesis §4.1): a leader this replica
    /// does not know as a member yet may be one of a configuration it has not received, and
    /// a candidate it does not know may need its vote. What keeps a removed server from
    /// disrupting the group: it never learns its removal if it was a follower (the leader stops
    /// replicating to it at once) and so may campaign, but PreVote changes no one's term;
    /// members that hear from a leader ignore its Vote (the CheckQuorum lease, thesis
    /// §4.2.3); and a vote request from outside this replica's configuration with a log
    /// behind ours is dropped unread, without raising our term (see below).
    pub fn step(&mut self, now: Instant, from: NodeId, message: Message) {
        self.step_message(now, from, message);
        self.sync_membership(now);
        self.check_repaired();
    }

    fn step_message(&mut self, now: Instant, from: NodeId, message: Message) {
        if from == self.config.id {
            self.event(RaftEvent::MessageRefused {
                from,
                why: format!("node {from} is this replica"),
            });
            return;
        }
        if let Message::PreVote {
            last_index,
            last_term,
            ..
        }
        | Message::Vote {
            last_index,
            last_term,
            ..
        }
        | Message::TransferVote {
            last_index,
            last_term,
            ..
        } = &message
            && !self.configs.latest().1.contains(from)
            && !self.log.is_up_to_date(*last_index, *last_term)
        {
            // A server outside our configuration whose log lacks what ours holds: typically
            // one removed from the group, which never received the entry removing it (every
            // member that holds that entry gets here). We would refuse it anyway; dropping it
            // unread also keeps its term from raising ours. A server added in a configuration
            // we lack has a log ahead of ours, so it is not refused here.
            self.event(RaftEvent::MessageRefused {
                from,
                why: format!(
                    "node {from} asks for a vote but is not a member of this group's \
                     configuration and its log is behind this replica's"
                ),
            });
            return;
        }
        let term = message.term();
        if term > TERM_ACCEPTED_MAX && term > self.term.saturating_add(1) {
            // No honest election jumps there: a corrupt or hostile peer. Adopting it would
            // leave too few terms to campaign in (at `TERM_MAX` none: `term + 1` overflows),
            // and once durable it would stay after a restart. It is dropped unread; but as
            // any message of a newer term would, it moves this replica's term on, only by
            // one (or up to the limit): replicas honestly past the limit (after a forged
            // message pushed them to it) then still reach each other one term at a time, and
            // no message can take a replica more than one term past the limit.
            self.event(RaftEvent::MessageRefused {
                from,
                why: format!(
                    "term {term} is above the maximum of {TERM_ACCEPTED_MAX} and more than one \
                     past this replica's term {}",
                    self.term
                ),
            });
            let bumps = match &message {
                Message::PreVote { .. } | Message::PreVoteResponse { granted: true, .. } => false,
                Message::Vote { .. } => !self.in_lease(now),
                _ => true,
            };
            let bumped = self.term.saturating_add(1).max(TERM_ACCEPTED_MAX);
            if bumps && bumped < TERM_MAX {
                self.become_follower(now, bumped, None);
            }
            return;
        }
        if term >= TERM_MAX {
            self.event(RaftEvent::MessageRefused {
                from,
                why: format!("term {term} leaves no term to campaign in"),
            });
            return;
        }
        if term > self.term {
            match &message {
                // Asking changes nothing: that is the point of PreVote.
                Message::PreVote { .. } => {}
                // A granted pre-vote carries the term we would campaign in.
                Message::PreVoteResponse { granted: true, .. } => {}
                Message::Vote { .. } if self.in_lease(now) => return,
                Message::Append { .. }
                | Message::Heartbeat { .. }
                | Message::InstallSnapshot { .. } => {
                    self.become_follower(now, term, Some(from));
                }
                _ => self.become_follower(now, term, None),
            }
        } else if term < self.term {
            match message {
                Message::Append { .. } if self.canary(Canary::AcceptStaleAppend) => {}
                // Tell a stale leader about the newer term so it steps down.
                Message::Append { .. }
                | Message::Heartbeat { .. }
                | Message::InstallSnapshot { .. } => {
                    let reply = Message::HeartbeatResponse {
                        term: self.term,
                        context: 0,
                    };
                    self.send_after_all_writes(from, reply);
                    return;
                }
                Message::PreVote { .. } => {
                    let reply = Message::PreVoteResponse {
                        term: self.term,
                        granted: false,
                    };
                    self.send_after_all_writes(from, reply);
                    return;
                }
                _ => return,
            }
        }

        match message {
            Message::PreVote {
                term,
                last_index,
                last_term,
            } => self.handle_pre_vote(now, from, term, last_index, last_term),
            Message::Vote {
                term,
                last_index,
                last_term,
            }
            | Message::TransferVote {
                term,
                last_index,
                last_term,
            } => self.handle_vote(now, from, term, last_index, last_term),
            Message::TimeoutNow { .. } => self.handle_timeout_now(now),
            Message::PreVoteResponse { term, granted } => {
                // A grant must be for the term we would campaign in; a refusal counts whatever
                // its term (a higher one has already made us a follower above).
                if !granted || term == self.term + 1 {
                    self.tally(now, Role::PreCandidate, from, granted);
                }
            }
            Message::VoteResponse { granted, .. } => {
                self.tally(now, Role::Candidate, from, granted);
            }
            Message::Append {
                prev_index,
                prev_term,
                entries,
                commit,
                ..
            } => {
                self.follow(now, from);
                self.handle_append(from, prev_index, prev_term, entries, commit);
            }
            Message::Heartbeat {
                commit, context, ..
            } => {
                self.follow(now, from);
                if self.damage.is_some() && commit > self.log.last_index() {
                    // The leader believes we hold entries our damaged disk lost; an idle
                    // leader would never send them again unless told.
                    let result = AppendResult::RejectedDamaged {
                        rejected_index: commit,
                        hint_index: self.log.last_index(),
                        hint_term: self.log.last_term(),
                    };
                    self.reply_append(from, result);
                }
                self.advance_commit(commit.min(self.log.last_index()));
                // A wiped replica cannot keep the promise the context stands for (it may have
                // made the opposite one before the wipe): it answers without one.
                let reply = Message::HeartbeatResponse {
                    term: self.term,
                    context: if self.votes_lost() { 0 } else { context },
                };
                // It claims only the term (and a promise not to vote, which lives in memory
                // and across a restart in `in_lease`), so it waits for the term alone: a
                // follower busy syncing a large write must not look dead to CheckQuorum.
                self.send(from, reply, self.term_write);
            }
            Message::AppendResponse { result, .. } => {
                self.handle_append_response(from, result);
            }
            Message::HeartbeatResponse { context, .. } => {
                self.handle_heartbeat_response(from, context)
            }
            Message::InstallSnapshot {
                index,
                snapshot_term,
                offset,
                total,
                chunk,
                membership,
                ..
            } => {
                self.follow(now, from);
                let at = (index, snapshot_term, membership);
                self.handle_snapshot_chunk(from, at, offset, total, chunk);
            }
            Message::SnapshotResponse {
                index, received, ..
            } => self.handle_snapshot_response(from, index, received),
        }
    }

    /// Fires every timer due at `now`; harmless if none is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.role == Role::Leader {
            if let Some(transfer) = &self.transfer
                && now >= transfer.deadline
            {
                let to = transfer.to;
                self.transfer = None;
                self.counters.transfers_aborted += 1;
                self.event(RaftEvent::TransferAborted {
                    term: self.term,
                    to,
                });
                if self.timeout_now_term == self.term {
                    // TimeoutNow went out, so our read lease is void for this term (a late one
                    // may still start a transfer campaign that voters grant despite their
                    // promise). A leader without a lease serves no reads: step down and let an
                    // election make a leader with a lease, rather than stay one without.
                    self.become_follower(now, self.term, None);
                    return;
                }
            }
            if now >= self.check_quorum_deadline {
                self.check_quorum_deadline = now + self.config.election_timeout_min;
                if self.config.check_quorum && !self.quorum_recently_active() {
                    self.counters.check_quorum_step_downs += 1;
                    self.become_follower(now, self.term, None);
                    return;
                }
            }
            if now >= self.heartbeat_deadline {
                self.heartbeat_deadline = now + self.config.heartbeat_interval;
                self.broadcast_heartbeat(now);
            }
        } else if now >= self.election_deadline {
            if !self.may_campaign() {
                // A damaged replica waits for a leader to repair it, a learner to be promoted;
                // neither campaigns, nor does a server removed from the group.
                self.reset_election_deadline(now);
                return;
            }
            if self.config.pre_vote {
                self.become_pre_candidate(now);
            } else {
                self.become_candidate(now, false);
            }
        }
    }

    /// Appends one entry holding `commands`, on a leader. Returns the entry's index; the
    /// proposal's fate comes later through `poll_proposal` tagged with `id`.
    pub fn propose(
        &mut self,
        now: Instant,
        id: ProposalId,
        commands: Vec<Bytes>,
    ) -> Result<Index, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if let Some(transfer) = &self.transfer {
            return Err(ProposeError::Transferring { to: transfer.to });
        }
        let uncommitted = self.log.last_index() - self.commit;
        if uncommitted >= self.config.uncommitted_entries_max as Index {
            return Err(ProposeError::Busy);
        }
        // Admission by waiting time, not only by count: see `Config::proposal_wait_max`.
        if let Some((_, (_, _, since))) = self.proposals.first_key_value()
            && now.saturating_since(*since) > self.config.proposal_wait_max
        {
            return Err(ProposeError::Busy);
        }
        let index = self.append_own(EntryKind::Commands(commands));
        self.proposals.insert(index, (id, self.term, now));
        self.broadcast_append();
        Ok(index)
    }

    /// Appends a configuration entry making `change` (a leader only). It takes effect here at
    /// once, and on each follower as soon as the follower appends it; its fate comes back
    /// through `poll_proposal` tagged with `id`, like a command's. A leader that removes itself
    /// goes on leading (without counting itself in any quorum) until the entry commits, then
    /// steps down; a server that is no voter never campaigns.
    ///
    /// # Why this is safe: single-server changes (Ongaro's thesis §4.1–4.3)
    ///
    /// Raft's safety rests on any two quorums intersecting: two leaders of one term need two
    /// majorities that share a voter who voted twice, and a committed entry is held by a
    /// majority that shares a voter with the majority electing any later leader. While the
    /// configuration changes, different servers may use different configurations. When two
    /// configurations differ by one voter, added or removed, any majority of one and any
    /// majority of the other intersect: with `n` voters in the old one and `n + 1` in the new,
    /// a majority of the old has more than `n / 2` voters and one of the new more than
    /// `(n + 1) / 2`, together more than `n + 1`, the servers there are. So it is enough that
    /// at every moment at most two configurations are in use that differ by one voter. That
    /// is what these rules make true:
    ///
    /// - a configuration takes effect when it is appended, on every server (a server acts on
    ///   the latest configuration in its log): no server waits for a commit to switch, so there
    ///   is no window in which one server already uses `C_new` while another that holds it
    ///   still uses `C_old`;
    /// - one change at a time: no new change is appended before the previous one commits.
    ///   Once `C_new` is committed, a majority of `C_new` holds it, so no server that lacks it
    ///   (and still uses `C_old`) can be elected by `C_new`'s voters, and `C_old` is out of use
    ///   as far as quorums go; only then may `C_newer` (one from `C_new`) appear;
    /// - a leader appends a change only after it has committed an entry of its own term. Without
    ///   this, a leader elected under `C_old` with an uncommitted `C_a` from a deposed leader in
    ///   another's log could append `C_b` (also one from `C_old`) while `C_a` is still in use
    ///   elsewhere: `C_a` and `C_b` may differ by two voters, whose majorities need not
    ///   intersect (the bug Ongaro reported in 2015). Committing its own entry first means
    ///   every configuration appended in an earlier term is either in its log or can never be
    ///   committed (its own entry outranks it);
    /// - a log entry that overwrites an uncommitted configuration entry (a new leader's)
    ///   puts the one before it back in effect; the rule above applies to it unchanged.
    ///
    /// Learners (thesis §4.2.1, etcd-io/raft's learners) keep a new server from slowing or
    /// stalling commits while it catches up: it is in no quorum until promoted, and promotion
    /// is refused until it holds the log up to the commit index.
    ///
    /// # Why not joint consensus
    ///
    /// Joint consensus (`C_old,new`, thesis §4.3) changes many voters at once, at the price of
    /// two configuration entries per change and dual-majority arithmetic everywhere a quorum is
    /// counted (commit, election, CheckQuorum, the read lease). Every operation this system
    /// needs (add a node, remove one, replace a lost one) is a sequence of single-server
    /// changes, and a replacement is add-then-remove so the group never drops below its size.
    /// The one thing lost is atomically swapping voters in a 2-voter group, which we never run.
    pub fn propose_membership(
        &mut self,
        now: Instant,
        id: ProposalId,
        change: ConfChange,
    ) -> Result<Index, MembershipError> {
        if self.role != Role::Leader {
            return Err(MembershipError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if let Some(transfer) = &self.transfer {
            return Err(MembershipError::Transferring { to: transfer.to });
        }
        if self.log.term_at(self.commit) != Some(self.term) {
            return Err(MembershipError::NotReady);
        }
        let (pending, latest) = self.configs.latest();
        if pending > self.commit && !self.canary(Canary::SecondChangeWhilePending) {
            return Err(MembershipError::ChangePending { index: pending });
        }
        let next = latest.apply(change)?;
        if let ConfChange::Promote(learner) = change {
            let match_index = self.progress.get(&learner).map_or(0, |p| p.match_index);
            if match_index < self.commit {
                return Err(MembershipError::NotCaughtUp {
                    id: learner,
                    match_index,
                    commit: self.commit,
                });
            }
        }
        let index = self.append_own(EntryKind::Config(next));
        self.proposals.insert(index, (id, self.term, now));
        self.sync_membership(now);
        self.broadcast_append();
        self.maybe_commit();
        self.sync_membership(now);
        Ok(index)
    }

    /// The configuration in effect (the latest in the log, committed or not) and the index of
    /// its entry (0: the snapshot's or the initial one).
    pub fn membership(&self) -> (Index, &Membership) {
        (self.membership_index(), self.effective())
    }

    /// The configuration in effect after the entry at `index` (at or above the snapshot's).
    pub fn membership_at(&self, index: Index) -> &Membership {
        self.configs.at(index).1
    }

    /// The latest configuration in the log whatever a canary plants: for checkers.
    #[inline]
    pub fn latest_membership(&self) -> (Index, &Membership) {
        self.configs.latest()
    }

    /// On a leader: how far each other member's log is known to match ours.
    pub fn progress_matches(&self) -> BTreeMap<NodeId, Index> {
        self.progress
            .iter()
            .map(|(id, p)| (*id, p.match_index))
            .collect()
    }

    /// Runs what a change of the configuration in effect entails, once per change.
    fn sync_membership(&mut self, now: Instant) {
        let index = self.membership_index();
        if index != self.membership_seen.0 || *self.effective() != self.membership_seen.1 {
            let membership = self.effective().clone();
            self.membership_seen = (index, membership.clone());
            self.event(RaftEvent::MembershipChanged { index, membership });
            if self.role == Role::Leader {
                // A new member starts out probing with our last entry (the configuration that
                // added it, usually): one round trip finds where its log stands.
                let next_index = self.log.last_index().max(1);
                let members: BTreeSet<NodeId> = self.peers().into_iter().collect();
                self.progress.retain(|id, _| members.contains(id));
                for peer in members {
                    self.progress
                        .entry(peer)
                        .or_insert_with(|| Progress::new(next_index));
                }
                if self
                    .transfer
                    .as_ref()
                    .is_some_and(|t| !self.membership_seen.1.is_voter(t.to))
                {
                    self.transfer = None;
                }
                self.maybe_commit();
            }
        }
        // A leader removed from the configuration leads until that configuration commits
        // (thesis §4.2.2: it must see the change through), then steps down; as no voter it
        // never campaigns again.
        // A learner that won an election (see `may_campaign`) steps down the same way, once an
        // entry of its term commits: its log is then the voters' too.
        if self.role == Role::Leader
            && !self.effective().is_voter(self.config.id)
            && self.commit >= self.membership_index()
            && self.log.term_at(self.commit) == Some(self.term)
        {
            self.become_follower(now, self.term, None);
            // No leader will replicate to a server outside the configuration, so its
            // proposals past the commit would wait for ever: their outcome is unknown (the
            // next leader may well commit them), which is what `Dropped` says.
            for (_, (id, _, _)) in std::mem::take(&mut self.proposals) {
                let outcome = ProposalOutcome::Dropped { leader_hint: None };
                self.fates.push_back(ProposalFate { id, outcome });
            }
        }
    }

    /// The driver has synced the write `id` and every write before it.
    pub fn persisted(&mut self, now: Instant, id: WriteId) {
        if id <= self.durable_write || id > self.writes_issued {
            return;
        }
        self.durable_write = id;
        let mut durable_last = None;
        while self.writes_in_flight.front().is_some_and(|w| w.id <= id) {
            durable_last = self.writes_in_flight.pop_front().map(|w| w.last_index);
        }
        if let Some(last) = durable_last {
            self.durable_index = self.rewrite_floor().min(last);
        }
        if self.canary(Canary::DurableIndexAhead) {
            self.durable_index = self.log.last_index();
        }
        while self.waiting.front().is_some_and(|(req, _)| *req <= id) {
            if let Some((_, envelope)) = self.waiting.pop_front() {
                self.ready.push_back(envelope);
            }
        }
        if self.role == Role::Leader {
            self.maybe_commit();
        }
        self.sync_membership(now);
        self.check_repaired();
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Instant {
        if self.role == Role::Leader {
            let timers = self.heartbeat_deadline.min(self.check_quorum_deadline);
            match &self.transfer {
                Some(transfer) => timers.min(transfer.deadline),
                None => timers,
            }
        } else {
            self.election_deadline
        }
    }

    /// The next write to perform and sync, coalescing every change made since the last call.
    pub fn poll_write(&mut self) -> Option<Write> {
        if !self.dirty() {
            return None;
        }
        let id = self.writes_issued + 1;
        self.writes_issued = id;
        let snapshot = if std::mem::take(&mut self.snapshot_dirty) {
            self.snapshot.clone()
        } else {
            None
        };
        let dirty_from = self.log_dirty_from.take();
        // A rewrite that starts at or below the snapshot (an installed snapshot replacing a log
        // that does not continue it, or a truncation the snapshot then covered) cannot be
        // expressed as a suffix of the disk's log: the disk's log is replaced whole.
        let discard_log = match (&snapshot, dirty_from) {
            (Some(snapshot), Some(from)) => from <= snapshot.index,
            _ => false,
        };
        debug_assert!(
            snapshot.is_some() || dirty_from.is_none_or(|from| from > self.log.snapshot_index()),
            "a log rewrite below the snapshot without the snapshot"
        );
        let entries = match dirty_from {
            Some(from) => self.log.slice(from, usize::MAX, usize::MAX),
            None => Vec::new(),
        };
        // A write that discards the log makes nothing above what the old log agreed with
        // durable until it is synced itself: an earlier write's sync must not count the
        // snapshot's entries (seed 20001987 of the Raft workload).
        let rewrite_floor = match &snapshot {
            Some(snapshot) if discard_log => self.discard_floor.take().unwrap_or(snapshot.index),
            _ => entries
                .first()
                .map_or(Index::MAX, |e| e.index.saturating_sub(1)),
        };
        self.writes_in_flight.push_back(WriteInFlight {
            id,
            last_index: self.log.last_index(),
            rewrite_floor,
        });
        let carry_hard_state = self.hard_state_dirty || self.commit != self.written_commit;
        self.hard_state_dirty = false;
        self.written_commit = self.commit;
        Some(Write {
            id,
            hard_state: carry_hard_state.then(|| self.hard_state()),
            snapshot,
            discard_log,
            entries,
        })
    }

    /// The next message that may be sent now.
    pub fn poll_message(&mut self) -> Option<Envelope> {
        self.ready.pop_front()
    }

    /// A snapshot installed from the leader: the driver replaces its state machine by the
    /// snapshot's state before it applies anything more (`poll_committed` hands out nothing
    /// while one waits here).
    pub fn poll_restore(&mut self) -> Option<Snapshot> {
        self.restore.take()
    }

    /// The next committed entry to apply, in index order.
    pub fn poll_committed(&mut self) -> Option<Entry> {
        if self.restore.is_some() {
            return None;
        }
        let limit = if self.canary(Canary::ApplyBeyondCommit) {
            self.log.last_index()
        } else {
            self.commit
        };
        if self.applied >= limit {
            return None;
        }
        let entry = self.log.get(self.applied + 1)?.clone();
        self.applied += 1;
        Some(entry)
    }

    /// The next proposal whose fate is known.
    pub fn poll_proposal(&mut self) -> Option<ProposalFate> {
        self.fates.pop_front()
    }

    /// The next election, leader change or refused message, for the operator's log.
    /// What this replica counted since it started; see [`RaftCounters`].
    pub fn counters(&self) -> RaftCounters {
        self.counters
    }

    pub fn poll_event(&mut self) -> Option<RaftEvent> {
        self.events.pop_front()
    }

    fn event(&mut self, event: RaftEvent) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Whether this leader may serve reads from its applied state without asking anyone: a
    /// majority (itself included) answered heartbeats recent enough that none of them will
    /// vote for another leader yet, and it has committed an entry of its own term, so its
    /// applied state holds everything committed before it. The lease is shorter than the
    /// followers' promise by a fifth, a margin for clocks that run at slightly different rates.
    pub fn read_lease(&self, now: Instant) -> bool {
        if self.role != Role::Leader || !self.config.check_quorum {
            return false;
        }
        if self.log.term_at(self.commit) != Some(self.term) {
            return false;
        }
        if self.timeout_now_term == self.term {
            return false;
        }
        let membership = self.effective();
        if !membership.is_voter(self.config.id) {
            return false;
        }
        let counted = if self.canary(Canary::LeaseWithoutQuorum) {
            0
        } else {
            self.quorum() - 1
        };
        let promise = self.config.election_timeout_min;
        let lease = promise - promise / 5;
        // The lease runs from the `counted`-th newest context (this leader's own is `now`): it
        // holds exactly when at least `counted + 1` contexts are recent enough. Counted, not
        // sorted: the simulator asks after every step, and the sort's allocation showed.
        let recent = |context_us: u64| now < Instant::from_micros(context_us) + lease;
        let peers = self
            .progress
            .iter()
            .filter(|(id, p)| membership.is_voter(**id) && !p.votes_lost)
            .filter(|(_, p)| recent(p.lease_context_us))
            .count();
        peers + usize::from(recent(now.as_micros())) > counted
    }

    /// Hands leadership to `to` (a leader only), etcd-io/raft style: this leader takes no
    /// proposal meanwhile, brings `to` up to its last entry, then sends it `TimeoutNow`, on
    /// which `to` campaigns at once without PreVote, and the voters grant it despite their
    /// lease. Given up (a [`RaftEvent::TransferAborted`]) if `to` has not won within an election
    /// timeout; proposals are taken again then, or, if `TimeoutNow` went out, this leader
    /// steps down (its read lease is gone for the term).
    ///
    /// Safety is the ordinary election's: `to` needs a majority's votes in a new term with a
    /// log at least as up to date as theirs, and this leader steps down when it sees that
    /// term. What it gives up is the read lease (see `timeout_now_term`).
    pub fn transfer_leadership(&mut self, now: Instant, to: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader,
            });
        }
        // A follower that lost its disk never campaigns: handing it the group would only
        // cost an election timeout.
        let votes_lost = self.progress.get(&to).is_some_and(|p| p.votes_lost);
        if to == self.config.id || !self.effective().is_voter(to) || votes_lost {
            return Err(TransferError::NotAVoter { to });
        }
        match &self.transfer {
            Some(transfer) if transfer.to == to => return Ok(()),
            Some(transfer) => return Err(TransferError::Transferring { to: transfer.to }),
            None => {}
        }
        self.counters.transfers_started += 1;
        self.transfer = Some(Transfer {
            to,
            deadline: now + self.config.election_timeout_min,
        });
        if !self.send_timeout_now_if_caught_up(to) {
            // As on a heartbeat's answer: an Append lost earlier would hold the catch-up until
            // the next one, so one more goes now, which either fills the gap or draws the
            // rejection that starts the repair.
            let window = self.config.inflight_appends_max;
            if let Some(progress) = self.progress.get_mut(&to) {
                progress.probe_sent = false;
                if progress.inflight.len() >= window {
                    progress.inflight.pop_front();
                }
            }
            if self.send_append(to, true) {
                while self.send_append(to, false) {}
            }
        }
        Ok(())
    }

    /// On a leader, a heartbeat round out of turn: every follower learns the commit index
    /// now rather than at the next heartbeat, up to `heartbeat_interval` later. For a commit
    /// the followers' state machines must act on promptly (a new topic, which clients are
    /// told of at once and take to broker leaders elsewhere). The next round is due a whole
    /// interval after this one, so rounds are no more frequent than these calls make them.
    pub fn announce_commit(&mut self, now: Instant) {
        if self.role != Role::Leader {
            return;
        }
        self.heartbeat_deadline = now + self.config.heartbeat_interval;
        self.broadcast_heartbeat(now);
    }

    /// The node a leadership transfer is under way to, on a leader.
    pub fn transferring_to(&self) -> Option<NodeId> {
        self.transfer.as_ref().map(|t| t.to)
    }

    /// On a leader: the peer best placed to take over, the one holding most of the log among
    /// those heard from since the last CheckQuorum round (ties to the lowest id).
    pub fn transfer_candidate(&self) -> Option<NodeId> {
        let membership = self.effective();
        self.progress
            .iter()
            .filter(|(id, p)| p.recent_active && membership.is_voter(**id))
            .max_by_key(|(id, p)| (p.match_index, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    /// On a leader: the peers that answered a heartbeat sent within `within` before `now`.
    pub fn peers_heard_within(&self, now: Instant, within: Duration) -> Vec<NodeId> {
        let since = (now - within).as_micros();
        self.progress
            .iter()
            .filter(|(_, p)| p.lease_context_us >= since && p.lease_context_us > 0)
            .map(|(id, _)| *id)
            .collect()
    }

    #[inline]
    pub fn status(&self) -> Status {
        Status {
            id: self.config.id,
            group: self.config.group,
            role: self.role,
            term: self.term,
            leader: self.leader,
            vote: self.vote,
            commit_index: self.commit,
            applied_index: self.applied,
            last_index: self.log.last_index(),
            durable_index: self.durable_index,
            snapshot_index: self.log.snapshot_index(),
        }
    }

    /// Replaces the log up to `index` by a snapshot whose state machine `data` the driver made
    /// after applying exactly the entries up to `index`. The snapshot goes to disk with the
    /// next write, and followers that need what it replaced are sent it.
    pub fn compact(&mut self, index: Index, data: Bytes) -> Result<(), CompactError> {
        if index > self.applied {
            return Err(CompactError::NotApplied {
                index,
                applied: self.applied,
            });
        }
        let snapshot_index = self.log.snapshot_index();
        let term = match self.log.term_at(index) {
            Some(term) if index > snapshot_index => term,
            _ => {
                return Err(CompactError::Stale {
                    index,
                    snapshot_index,
                });
            }
        };
        let membership = self.configs.at(index).1;
        if membership.voters.is_empty() {
            return Err(CompactError::Unconfigured { index });
        }
        let membership = Some(membership.clone());
        self.log.compact_to(index, term);
        self.configs.compacted_to(index);
        self.snapshot = Some(Snapshot {
            index,
            term,
            data,
            membership,
        });
        self.snapshot_dirty = true;
        Ok(())
    }

    /// Followers that need a snapshot are sent a *transfer image* of it, which the driver
    /// makes on request ([`Replica::poll_transfer_wanted`], [`Replica::set_transfer`]),
    /// instead of the snapshot itself: for state machines whose own snapshots leave out
    /// what another replica lacks (a broker's message bytes, which stay in its store).
    pub fn use_transfer_images(&mut self, on: bool) {
        self.transfer_images = on;
    }

    /// The index of the snapshot a follower waits for a transfer image of, once per request.
    pub fn poll_transfer_wanted(&mut self) -> Option<Index> {
        self.transfer_wanted.take()
    }

    /// The transfer image of the latest snapshot (ignored if the snapshot moved on): sent to
    /// the followers that wait for it, chunk by chunk, then dropped once none needs it.
    pub fn set_transfer(&mut self, image: Snapshot) {
        let current = self.snapshot.as_ref().map(|s| (s.index, s.term));
        if current != Some((image.index, image.term)) || self.role != Role::Leader {
            return;
        }
        self.transfer_image = Some(image);
        let waiting: Vec<NodeId> = self
            .progress
            .iter()
            .filter(|(_, p)| p.state == ProgressState::Snapshot && !p.snapshot.in_flight)
            .map(|(id, _)| *id)
            .collect();
        for to in waiting {
            self.send_snapshot_chunk(to);
        }
    }

    /// The latest snapshot, durable or on its way to disk.
    #[inline]
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The first log index recovery found damaged, while this replica is not repaired: until
    /// then it grants no vote or pre-vote and never campaigns (it still follows, appends and
    /// acknowledges: it holds what it acknowledges). `None` for a healthy replica. A driver
    /// that keeps a damage marker on disk clears it once this returns `None`.
    ///
    /// Repaired means: in a term `t` strictly greater than every term this replica recovered
    /// (its durable term and its last entry's term), it has learned from the leader of `t` a
    /// commit index `c` whose entry in its own log has term `t`, and every entry up to `c` is
    /// durable here.
    ///
    /// Why that is safe. Before the damage this replica voted and acknowledged only in terms up
    /// to what it recovered (both wait for the term to be durable), so a leader that counted
    /// its acknowledgement to commit an entry led such a term; since the damage it has voted in
    /// no term at all. The leader of `t` therefore holds every entry committed before `t`
    /// (leader completeness, whose quorums never relied on this replica's lost entries), and
    /// they all sit below its first entry of term `t`, so below `c`. An entry with index `c` and
    /// term `t` in our log makes our log equal to the leader's up to `c` (log matching; the
    /// prefix we kept passed its checksums). So once repaired this replica holds every entry
    /// whose commit could have counted on it, and it has never voted in `t` or later: its
    /// future votes are as sound as an undamaged replica's. Requiring only a match up to the
    /// leader's commit would not do: a new leader's commit may still lag behind entries that
    /// an older leader committed.
    ///
    /// A wiped disk ([`Damage::votes_lost`]) is never repaired: the state file went with it,
    /// so no term is known to exceed the terms it voted in, and voting again could vote twice
    /// in one term. It stays a non-voting follower.
    #[inline]
    pub fn damaged_from(&self) -> Option<Index> {
        self.damage.as_ref().map(|d| d.from)
    }

    /// The entry at `index` in this replica's (possibly not yet durable) log.
    #[inline]
    pub fn entry(&self, index: Index) -> Option<&Entry> {
        self.log.get(index)
    }

    // ----- roles -----

    fn become_follower(&mut self, now: Instant, term: Term, leader: Option<NodeId>) {
        if term > self.term || (term == self.term && self.canary(Canary::ForgetVoteOnStepDown)) {
            self.term = term;
            self.vote = None;
            self.mark_term_dirty();
        }
        if self.role == Role::Leader {
            self.event(RaftEvent::SteppedDown { term: self.term });
        }
        if let Some(leader) = leader
            && self.leader != Some(leader)
        {
            self.event(RaftEvent::LeaderChanged {
                term: self.term,
                leader,
            });
        }
        self.role = Role::Follower;
        self.transfer = None;
        self.leader = leader;
        self.leader_contact = leader.map(|_| now);
        self.votes.clear();
        self.progress.clear();
        self.reset_election_deadline(now);
    }

    fn become_pre_candidate(&mut self, now: Instant) {
        self.counters.pre_vote_campaigns += 1;
        self.role = Role::PreCandidate;
        self.leader = None;
        self.leader_contact = None;
        self.votes.clear();
        self.votes.insert(self.config.id, true);
        self.reset_election_deadline(now);
        if self.won_campaign() {
            self.become_candidate(now, false);
            return;
        }
        let request = Message::PreVote {
            term: self.term + 1,
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
        };
        for peer in self.electors() {
            self.send_after_all_writes(peer, request.clone());
        }
    }

    /// `transfer`: the campaign follows a `TimeoutNow`, and asks with `TransferVote`.
    fn become_candidate(&mut self, now: Instant, transfer: bool) {
        self.counters.campaigns += 1;
        self.counters.transfer_campaigns += u64::from(transfer);
        self.role = Role::Candidate;
        self.term += 1;
        self.vote = Some(self.config.id);
        self.mark_term_dirty();
        self.leader = None;
        self.leader_contact = None;
        self.votes.clear();
        self.votes.insert(self.config.id, true);
        self.reset_election_deadline(now);
        if self.won_campaign() {
            self.become_leader(now);
            return;
        }
        // Must not leave before the vote for ourselves is durable, or a restart could let us
        // vote for someone else in the same term.
        let (term, last_index, last_term) =
            (self.term, self.log.last_index(), self.log.last_term());
        let request = if transfer {
            Message::TransferVote {
                term,
                last_index,
                last_term,
            }
        } else {
            Message::Vote {
                term,
                last_index,
                last_term,
            }
        };
        for peer in self.electors() {
            self.send_after_all_writes(peer, request.clone());
        }
    }

    fn become_leader(&mut self, now: Instant) {
        self.counters.elections_won += 1;
        self.event(RaftEvent::BecameLeader { term: self.term });
        self.role = Role::Leader;
        self.transfer = None;
        self.leader = Some(self.config.id);
        self.leader_contact = None;
        self.votes.clear();
        let next_index = self.log.last_index() + 1;
        self.progress = self
            .peers()
            .into_iter()
            .map(|peer| (peer, Progress::new(next_index)))
            .collect();
        self.heartbeat_deadline = now + self.config.heartbeat_interval;
        self.check_quorum_deadline = now + self.config.election_timeout_min;
        // Entries of earlier terms commit only through an entry of this term (figure 8).
        self.append_own(EntryKind::Noop);
        self.broadcast_append();
        self.maybe_commit();
    }

    /// A valid leader of the current term spoke: follow it.
    fn follow(&mut self, now: Instant, leader: NodeId) {
        if self.role != Role::Follower || self.leader != Some(leader) {
            self.become_follower(now, self.term, Some(leader));
        }
        self.leader_contact = Some(now);
        self.reset_election_deadline(now);
    }

    // ----- elections -----

    fn handle_pre_vote(
        &mut self,
        now: Instant,
        from: NodeId,
        term: Term,
        last_index: Index,
        last_term: Term,
    ) {
        let granted = term > self.term
            && self.may_vote()
            && !self.in_lease(now)
            && !self.canary(Canary::RefusePreVotes)
            && (self.log.is_up_to_date(last_index, last_term)
                || self.canary(Canary::VoteWithoutLogCheck));
        let reply = Message::PreVoteResponse {
            term: if granted { term } else { self.term },
            granted,
        };
        self.send_after_all_writes(from, reply);
    }

    fn handle_vote(
        &mut self,
        now: Instant,
        from: NodeId,
        term: Term,
        last_index: Index,
        last_term: Term,
    ) {
        debug_assert_eq!(term, self.term);
        let free_to_vote =
            self.vote == Some(from) || (self.vote.is_none() && self.leader.is_none());
        let granted = free_to_vote
            && self.may_vote()
            && (self.log.is_up_to_date(last_index, last_term)
                || self.canary(Canary::VoteWithoutLogCheck));
        if granted {
            if self.vote != Some(from) {
                self.vote = Some(from);
                self.mark_term_dirty();
            }
            self.reset_election_deadline(now);
        }
        let reply = Message::VoteResponse {
            term: self.term,
            granted,
        };
        if self.canary(Canary::VoteBeforeDurable) {
            self.send(from, reply, 0);
        } else {
            self.send_after_all_writes(from, reply);
        }
    }

    /// The leader of our term caught us up and asks us to take over.
    fn handle_timeout_now(&mut self, now: Instant) {
        if self.role == Role::Leader || !self.may_campaign() {
            return;
        }
        self.become_candidate(now, true);
    }

    fn tally(&mut self, now: Instant, campaign: Role, from: NodeId, granted: bool) {
        if self.role != campaign {
            return;
        }
        self.votes.insert(from, granted);
        if self.won_campaign() {
            match campaign {
                Role::PreCandidate => self.become_candidate(now, false),
                _ => self.become_leader(now),
            }
        } else if self.counted_votes(false) >= self.quorum() {
            self.become_follower(now, self.term, None);
        }
    }

    /// Only voters' grants count (a learner's too under a canary).
    fn won_campaign(&self) -> bool {
        self.counted_votes(true) >= self.quorum()
    }

    fn counted_votes(&self, granted: bool) -> usize {
        let membership = self.effective();
        let learners_vote = self.canary(Canary::LearnerVotes);
        self.votes
            .iter()
            .filter(|(id, g)| {
                **g == granted
                    && (membership.is_voter(**id) || (learners_vote && membership.contains(**id)))
            })
            .count()
    }

    /// A damaged replica must not vote or campaign until it is repaired.
    fn may_vote(&self) -> bool {
        self.damage.is_none() || self.canary(Canary::VoteWhileDamaged)
    }

    /// A voter of the configuration in effect campaigns; so does a server that configuration
    /// removed while it does not know it committed (thesis §4.2.2): it may hold the only log
    /// that can finish the change (a leader that appended its own removal and lost its
    /// leadership before the removal committed), and it does not count its own vote. So does a
    /// learner holding uncommitted entries: a configuration it has not seen may make it a
    /// voter, and its log may be the only one those voters can elect (a leader replicated
    /// entries of its term to it and lost its disk; the voters' logs are older, and one of them
    /// counts the learner as a voter through a promotion the learner's log never held). Its own
    /// vote does not count, so it wins only with a majority of its configuration's voters.
    fn may_campaign(&self) -> bool {
        let membership = self.effective();
        let id = self.config.id;
        self.may_vote()
            && (membership.is_voter(id)
                || (!membership.contains(id) && self.membership_index() > self.commit)
                || (membership.is_learner(id) && self.log.last_index() > self.commit))
    }

    /// Notes repair progress; see [`Replica::damaged_from`].
    fn check_repaired(&mut self) {
        let Some(damage) = self.damage.as_mut() else {
            return;
        };
        if damage.repaired_at.is_none()
            && !damage.votes_lost
            && self.role == Role::Follower
            && self.leader.is_some()
            && self.term > damage.recovered_term
            && self.log.term_at(self.commit) == Some(self.term)
        {
            damage.repaired_at = Some(self.commit);
        }
        if damage
            .repaired_at
            .is_some_and(|at| self.durable_index >= at)
        {
            self.damage = None;
            self.counters.damage_repaired += 1;
        }
    }

    /// CheckQuorum's lease: while a leader is known to be alive, ignore anyone campaigning,
    /// so a node that merely lost touch cannot depose a healthy leader.
    fn in_lease(&self, now: Instant) -> bool {
        if !self.config.check_quorum {
            return false;
        }
        // A restarted replica may have promised a leader its vote before the crash: keep
        // the promise for one election timeout after starting.
        if now < self.started_at + self.config.election_timeout_min {
            return true;
        }
        match (self.role, self.leader_contact) {
            (Role::Leader, _) => true,
            (_, Some(at)) => self.leader.is_some() && now < at + self.config.election_timeout_min,
            (_, None) => false,
        }
    }

    // ----- replication, follower side -----

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        leader_commit: Index,
    ) {
        if prev_index < self.commit {
            // Everything up to our commit matches already; say so and let the leader move on.
            self.reply_append(from, self.acceptance(self.commit));
            return;
        }
        let prev_matches = self.log.term_at(prev_index) == Some(prev_term)
            || (self.canary(Canary::SkipPrevLogCheck) && prev_index <= self.log.last_index());
        if !prev_matches {
            let hint_index = self
                .log
                .find_conflict_by_term(prev_index.min(self.log.last_index()), prev_term);
            let hint_term = self.log.term_at(hint_index).unwrap_or(0);
            let result = if self.damage.is_some() {
                AppendResult::RejectedDamaged {
                    rejected_index: prev_index,
                    hint_index,
                    hint_term,
                }
            } else {
                AppendResult::Rejected {
                    rejected_index: prev_index,
                    hint_index,
                    hint_term,
                }
            };
            self.reply_append(from, result);
            return;
        }
        let match_index = prev_index + entries.len() as Index;
        // Entries we hold already (same index and term) are the same entries: log matching.
        let held = entries
            .iter()
            .take_while(|e| self.log.term_at(e.index) == Some(e.term))
            .count();
        let mut new_entries = entries.into_iter().skip(held);
        if let Some(first) = new_entries.next() {
            if first.index <= self.log.last_index() {
                debug_assert!(
                    first.index > self.commit || self.canary(Canary::SkipPrevLogCheck),
                    "overwriting a committed entry"
                );
                self.counters.conflicting_tails_dropped += 1;
                self.truncate_from(first.index);
            }
            self.mark_log_dirty(first.index);
            self.push_entry(first);
            for entry in new_entries {
                self.push_entry(entry);
            }
        }
        self.advance_commit(leader_commit.min(match_index));
        self.reply_append(from, self.acceptance(match_index));
    }

    fn handle_snapshot_chunk(
        &mut self,
        from: NodeId,
        (index, term, membership): (Index, Term, Option<Membership>),
        offset: u64,
        total: u64,
        chunk: Bytes,
    ) {
        if index <= self.commit {
            // We hold everything it stands for already (committed entries are the leader's).
            self.incoming_snapshot = None;
            self.reply_append(from, self.acceptance(self.commit));
            return;
        }
        let mut incoming = match self.incoming_snapshot.take() {
            Some(incoming)
                if incoming.index == index && incoming.term == term && incoming.total == total =>
            {
                incoming
            }
            _ => IncomingSnapshot {
                index,
                term,
                total,
                data: Vec::new(),
            },
        };
        let held = incoming.data.len() as u64;
        let fits = offset
            .checked_add(chunk.len() as u64)
            .is_some_and(|end| end <= total);
        if offset == held && fits {
            incoming.data.extend_from_slice(&chunk);
        }
        if (incoming.data.len() as u64) < total {
            let reply = Message::SnapshotResponse {
                term: self.term,
                index,
                received: incoming.data.len() as u64,
            };
            self.incoming_snapshot = Some(incoming);
            self.send_after_all_writes(from, reply);
            return;
        }
        let snapshot = Snapshot {
            index,
            term,
            data: Bytes::from(incoming.data),
            membership,
        };
        self.install_snapshot(snapshot);
        let reply = Message::AppendResponse {
            term: self.term,
            result: self.acceptance(index),
        };
        if self.canary(Canary::AckSnapshotBeforeDurable) {
            self.send(from, reply, 0);
        } else {
            self.send_after_all_writes(from, reply);
        }
    }

    /// Makes a whole snapshot from the leader this replica's state; `snapshot.index` is above
    /// the commit index.
    fn install_snapshot(&mut self, snapshot: Snapshot) {
        self.counters.snapshots_installed += 1;
        let (index, term) = (snapshot.index, snapshot.term);
        let keeps_log = index <= self.log.last_index()
            && (self.log.term_at(index) == Some(term)
                || self.canary(Canary::InstallKeepsConflictingLog));
        if keeps_log {
            // Our log continues it (log matching): keep what follows.
            self.advance_commit(index);
            self.log.compact_to(index, term);
            self.configs.compacted_to(index);
        } else {
            let commit_before = self.commit;
            self.truncate_from(self.log.snapshot_index() + 1);
            self.log.reset_to(index, term);
            let initial = Membership::new(self.config.voters.iter().copied());
            self.configs
                .reset(snapshot.membership.clone().unwrap_or(initial));
            // Only what was committed before is still equal to the disk's old log.
            self.mark_log_dirty(index);
            self.durable_index = self.durable_index.min(commit_before);
            let floor = self.durable_index;
            self.discard_floor = Some(self.discard_floor.map_or(floor, |f| f.min(floor)));
            self.advance_commit(index);
        }
        self.applied = index;
        self.restore = Some(snapshot.clone());
        self.snapshot = Some(snapshot);
        self.snapshot_dirty = true;
    }

    /// How this replica says it holds the leader's log up to `match_index`: without a promise
    /// if its disk was wiped (see [`AppendResult::AcceptedVotesLost`]).
    fn acceptance(&self, match_index: Index) -> AppendResult {
        if self.votes_lost() {
            AppendResult::AcceptedVotesLost { match_index }
        } else {
            AppendResult::Accepted { match_index }
        }
    }

    /// Whether this replica's disk was wiped ([`Damage::votes_lost`]).
    fn votes_lost(&self) -> bool {
        self.damage.as_ref().is_some_and(|d| d.votes_lost)
    }

    fn reply_append(&mut self, to: NodeId, result: AppendResult) {
        let reply = Message::AppendResponse {
            term: self.term,
            result,
        };
        if self.canary(Canary::AckBeforeDurable) {
            self.send(to, reply, 0);
        } else {
            self.send_after_all_writes(to, reply);
        }
    }

    fn truncate_from(&mut self, index: Index) {
        self.log.truncate_from(index);
        self.configs.truncated_from(index);
        let leader_hint = self.leader;
        for (at, (id, _, _)) in self.proposals.split_off(&index) {
            let outcome = if self.canary(Canary::AckOverwrittenProposal) {
                ProposalOutcome::Committed { index: at }
            } else {
                ProposalOutcome::Dropped { leader_hint }
            };
            self.fates.push_back(ProposalFate { id, outcome });
        }
    }

    // ----- replication, leader side -----

    fn append_own(&mut self, kind: EntryKind) -> Index {
        let index = self.log.last_index() + 1;
        self.mark_log_dirty(index);
        self.push_entry(Entry {
            term: self.term,
            index,
            kind,
        });
        index
    }

    /// Appends to the in-memory log; a configuration entry takes effect at once.
    fn push_entry(&mut self, entry: Entry) {
        if let EntryKind::Config(membership) = &entry.kind {
            self.configs.appended(entry.index, membership.clone());
        }
        self.log.push(entry);
    }

    fn broadcast_append(&mut self) {
        for peer in self.peers() {
            while self.send_append(peer, false) {}
        }
    }

    fn broadcast_heartbeat(&mut self, now: Instant) {
        for peer in self.peers() {
            let Some(progress) = self.progress.get(&peer) else {
                continue;
            };
            let heartbeat = Message::Heartbeat {
                term: self.term,
                commit: self.commit.min(progress.match_index),
                context: now.as_micros(),
            };
            self.send(peer, heartbeat, self.term_write);
        }
    }

    /// Sends `to` the entries it lacks, within the window. Returns true if it sent entries
    /// and there may be more to send.
    fn send_append(&mut self, to: NodeId, allow_empty: bool) -> bool {
        let Some(progress) = self.progress.get(&to) else {
            return false;
        };
        let blocked = match progress.state {
            ProgressState::Probe => progress.probe_sent,
            ProgressState::Replicate => progress.inflight.len() >= self.config.inflight_appends_max,
            ProgressState::Snapshot => false,
        };
        if blocked {
            return false;
        }
        let prev_index = progress.next_index - 1;
        if prev_index < self.log.snapshot_index() || progress.state == ProgressState::Snapshot {
            self.send_snapshot_chunk(to);
            return false;
        }
        let Some(prev_term) = self.log.term_at(prev_index) else {
            return false;
        };
        let entries = self.log.slice(
            progress.next_index,
            self.config.append_entries_max,
            self.config.append_bytes_max,
        );
        if entries.is_empty() && !allow_empty {
            return false;
        }
        let last_sent = entries.last().map(|e| e.index);
        let append = Message::Append {
            term: self.term,
            prev_index,
            prev_term,
            entries,
            commit: self.commit,
        };
        let Some(progress) = self.progress.get_mut(&to) else {
            return false;
        };
        let more = match progress.state {
            ProgressState::Probe | ProgressState::Snapshot => {
                progress.probe_sent = true;
                false
            }
            ProgressState::Replicate => match last_sent {
                Some(last) => {
                    progress.next_index = last + 1;
                    progress.inflight.push_back(last);
                    true
                }
                None => false,
            },
        };
        // Our term is durable (we campaigned with it); our entries need not be yet.
        self.send(to, append, self.term_write);
        more
    }

    /// Sends `TimeoutNow` to `to` if a transfer to it is under way and it holds our whole log
    /// (durably: it acknowledged it). Returns whether it did.
    fn send_timeout_now_if_caught_up(&mut self, to: NodeId) -> bool {
        let caught_up = self.transfer.as_ref().is_some_and(|t| t.to == to)
            && self
                .progress
                .get(&to)
                .is_some_and(|p| p.match_index == self.log.last_index());
        if !caught_up {
            return false;
        }
        self.timeout_now_term = self.term;
        let message = Message::TimeoutNow { term: self.term };
        self.send(to, message, self.term_write);
        true
    }

    fn handle_append_response(&mut self, from: NodeId, result: AppendResult) {
        if self.role != Role::Leader {
            return;
        }
        let log = &self.log;
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        match result {
            AppendResult::Accepted { match_index }
            | AppendResult::AcceptedVotesLost { match_index } => {
                let votes_lost = matches!(result, AppendResult::AcceptedVotesLost { .. });
                if progress.votes_lost && !votes_lost {
                    // A wiped replica stays wiped (see `Damage::votes_lost`): an ordinary
                    // answer after one that said so was sent before the wipe and delivered
                    // late. Taken, it would count the match the wiped replica reported since,
                    // and a deposed leader could commit over the new leader's entries (seed
                    // 719002261 of the raft workload).
                    return;
                }
                let counting_changed = progress.votes_lost != votes_lost;
                progress.votes_lost = votes_lost;
                progress.recent_active = !votes_lost;
                if progress.accept(match_index) || counting_changed {
                    self.maybe_commit();
                    self.send_timeout_now_if_caught_up(from);
                }
            }
            AppendResult::Rejected {
                rejected_index,
                hint_index,
                hint_term,
            }
            | AppendResult::RejectedDamaged {
                rejected_index,
                hint_index,
                hint_term,
            } => {
                progress.recent_active = !progress.votes_lost;
                let damaged = matches!(result, AppendResult::RejectedDamaged { .. });
                let stale = match progress.state {
                    ProgressState::Replicate => rejected_index <= progress.match_index,
                    ProgressState::Probe => rejected_index + 1 != progress.next_index,
                    // Answers an Append from before the snapshot was needed.
                    ProgressState::Snapshot => true,
                };
                // A damaged follower may really have lost what it acknowledged; at worst a
                // stale one costs a probe.
                let stale = stale && !(damaged && rejected_index <= progress.match_index);
                if stale {
                    return;
                }
                let probe = if hint_term > 0 {
                    log.find_conflict_by_term(hint_index, hint_term)
                } else {
                    hint_index
                };
                progress.probe_from(probe.min(rejected_index) + 1);
            }
        }
        while self.send_append(from, false) {}
        // A probe that carried nothing new still needs to go out to learn where we stand.
        if self
            .progress
            .get(&from)
            .is_some_and(|p| p.state == ProgressState::Probe && !p.probe_sent)
        {
            self.send_append(from, true);
        }
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, context: u64) {
        if self.role != Role::Leader {
            return;
        }
        let last_index = self.log.last_index();
        let window = self.config.inflight_appends_max;
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        // A context of 0 is an answer without a promise (a wiped follower's).
        progress.recent_active = context > 0 && !progress.votes_lost;
        progress.probe_sent = false;
        progress.lease_context_us = progress.lease_context_us.max(context);
        if self.transfer_image.is_some()
            && !self
                .progress
                .values()
                .any(|p| p.state == ProgressState::Snapshot)
        {
            // No follower needs the transfer image any more: its memory goes.
            self.transfer_image = None;
        }
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        if progress.state == ProgressState::Snapshot {
            // A lost chunk or answer would stall the transfer; a follower busy syncing a
            // large snapshot gets a few heartbeats before the chunk goes again.
            let transfer = &mut progress.snapshot;
            if transfer.in_flight {
                if transfer.wait_heartbeats > 0 {
                    transfer.wait_heartbeats -= 1;
                    return;
                }
                transfer.in_flight = false;
                if let Some(received) = transfer.rewind_to.take() {
                    transfer.offset = received;
                }
            }
            self.send_snapshot_chunk(from);
            return;
        }
        if progress.match_index < last_index {
            // An Append may have been lost: make room for one more, which either fills the
            // gap or draws a rejection that sends us back to probing.
            if progress.inflight.len() >= window {
                progress.inflight.pop_front();
            }
            self.send_append(from, true);
        }
    }

    /// Sends `to` the next chunk of our snapshot (or of its transfer image), unless one is
    /// out unanswered.
    fn send_snapshot_chunk(&mut self, to: NodeId) {
        let Some(snapshot) = &self.snapshot else {
            return;
        };
        let Some(progress) = self.progress.get_mut(&to) else {
            return;
        };
        if progress.state != ProgressState::Snapshot || progress.snapshot.index != snapshot.index {
            progress.send_snapshot(snapshot.index);
        }
        let snapshot = if self.transfer_images {
            match &self.transfer_image {
                Some(image) if image.index == snapshot.index => image,
                _ => {
                    // Asked for again each heartbeat while it is missing: a driver that
                    // failed to make it (a read error) tries again.
                    self.transfer_image = None;
                    self.transfer_wanted = Some(snapshot.index);
                    return;
                }
            }
        } else {
            snapshot
        };
        let transfer = &mut progress.snapshot;
        if transfer.in_flight {
            return;
        }
        let total = snapshot.data.len();
        let start = usize::try_from(transfer.offset).unwrap_or(total).min(total);
        let end = start
            .saturating_add(self.config.snapshot_chunk_bytes_max.max(1))
            .min(total);
        transfer.in_flight = true;
        self.counters.snapshot_chunks_sent += 1;
        transfer.wait_heartbeats = self.config.snapshot_resend_heartbeats;
        let message = Message::InstallSnapshot {
            term: self.term,
            index: snapshot.index,
            snapshot_term: snapshot.term,
            offset: start as u64,
            total: total as u64,
            chunk: snapshot.data.slice(start..end),
            membership: snapshot.membership.clone(),
        };
        // Our term is durable (we campaigned with it); the snapshot is committed state.
        self.send(to, message, self.term_write);
    }

    fn handle_snapshot_response(&mut self, from: NodeId, index: Index, received: u64) {
        if self.role != Role::Leader {
            return;
        }
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        progress.recent_active = true;
        if progress.state != ProgressState::Snapshot || progress.snapshot.index != index {
            return;
        }
        let transfer = &mut progress.snapshot;
        if transfer.in_flight && received <= transfer.offset {
            // Only an answer that moves the transfer forward sends the next chunk. If every
            // answer did, each chunk the network delivered twice would start one more chain
            // of chunks and answers that never ends: seed 9400733 sent 9.9 million chunks
            // in 6 simulated seconds. A follower that lost its bytes is served from where it
            // is once the unanswered chunk's wait runs out.
            let lowest = transfer.rewind_to.map_or(received, |r| r.min(received));
            transfer.rewind_to = Some(lowest);
            return;
        }
        transfer.offset = received;
        transfer.in_flight = false;
        transfer.rewind_to = None;
        self.send_snapshot_chunk(from);
    }

    fn maybe_commit(&mut self) {
        let mut matches: Vec<Index> = self
            .effective()
            .voters
            .iter()
            .map(|voter| {
                if *voter == self.config.id {
                    // Counting ourselves beyond what is on our disk would ack a write that one
                    // crash could erase.
                    self.durable_index
                } else {
                    self.progress
                        .get(voter)
                        .filter(|p| !p.votes_lost)
                        .map_or(0, |p| p.match_index)
                }
            })
            .collect();
        let index = quorum_index(&mut matches, self.commit_quorum());
        if index <= self.commit {
            return;
        }
        if self.log.term_at(index) != Some(self.term) && !self.canary(Canary::CommitOldTerm) {
            return;
        }
        self.advance_commit(index);
    }

    fn advance_commit(&mut self, index: Index) {
        if index <= self.commit {
            return;
        }
        self.commit = index;
        let still_pending = self.proposals.split_off(&(index + 1));
        for (at, (id, term, _)) in std::mem::replace(&mut self.proposals, still_pending) {
            let outcome = if self.log.term_at(at) == Some(term) {
                ProposalOutcome::Committed { index: at }
            } else {
                ProposalOutcome::Dropped {
                    leader_hint: self.leader,
                }
            };
            self.fates.push_back(ProposalFate { id, outcome });
        }
    }

    fn quorum_recently_active(&mut self) -> bool {
        let membership = self.effective();
        let me = usize::from(membership.is_voter(self.config.id));
        let active = me
            + self
                .progress
                .iter()
                .filter(|(id, p)| p.recent_active && membership.is_voter(**id))
                .count();
        for progress in self.progress.values_mut() {
            progress.recent_active = false;
        }
        active >= self.quorum()
    }

    // ----- durability -----

    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
        }
    }

    fn dirty(&self) -> bool {
        self.hard_state_dirty || self.log_dirty_from.is_some() || self.snapshot_dirty
    }

    /// The id of the write that will hold every change made so far.
    fn pending_write(&self) -> WriteId {
        self.writes_issued + WriteId::from(self.dirty())
    }

    fn mark_term_dirty(&mut self) {
        self.hard_state_dirty = true;
        self.term_write = self.writes_issued + 1;
    }

    fn mark_log_dirty(&mut self, from: Index) {
        self.log_dirty_from = Some(self.log_dirty_from.map_or(from, |f| f.min(from)));
        self.durable_index = self.durable_index.min(from - 1);
    }

    /// Entries above this index are being rewritten by a write that is not yet durable.
    fn rewrite_floor(&self) -> Index {
        let in_flight = self.writes_in_flight.iter().map(|w| w.rewrite_floor);
        let unwritten = self.log_dirty_from.map(|from| from - 1);
        in_flight
            .chain(unwritten)
            .chain(self.discard_floor)
            .min()
            .unwrap_or(Index::MAX)
    }

    // ----- sending -----

    /// Queues a message that depends on every change made so far being durable.
    fn send_after_all_writes(&mut self, to: NodeId, message: Message) {
        self.send(to, message, self.pending_write());
    }

    /// Queues a message that may leave once write `requires` is durable.
    fn send(&mut self, to: NodeId, message: Message, requires: WriteId) {
        let envelope = Envelope {
            group: self.config.group,
            from: self.config.id,
            to,
            message,
        };
        if requires <= self.durable_write {
            self.ready.push_back(envelope);
        } else {
            self.waiting.push_back((requires, envelope));
        }
    }

    // ----- helpers -----

    /// Every other member, voters and learners: whom a leader replicates to.
    fn peers(&self) -> Vec<NodeId> {
        let id = self.config.id;
        self.effective().members().filter(|v| *v != id).collect()
    }

    /// Every other voter: whom a candidate asks for votes (learners too under a canary).
    fn electors(&self) -> Vec<NodeId> {
        if self.canary(Canary::LearnerVotes) {
            return self.peers();
        }
        let id = self.config.id;
        let voters = &self.effective().voters;
        voters.iter().copied().filter(|v| *v != id).collect()
    }

    fn quorum(&self) -> usize {
        majority(self.effective().voters.len())
    }

    fn commit_quorum(&self) -> usize {
        if self.canary(Canary::CommitFromMinority) {
            (self.effective().voters.len() / 2).max(1)
        } else {
            self.quorum()
        }
    }

    /// The configuration in effect: the latest in the log, whether committed or not.
    fn effective(&self) -> &Membership {
        if self.canary(Canary::ConfigOnCommit) {
            return self.configs.at(self.commit).1;
        }
        self.configs.latest().1
    }

    fn membership_index(&self) -> Index {
        if self.canary(Canary::ConfigOnCommit) {
            return self.configs.at(self.commit).0;
        }
        self.configs.latest().0
    }

    fn reset_election_deadline(&mut self, now: Instant) {
        let min = self.config.election_timeout_min.as_micros() as u64;
        let max = (self.config.election_timeout_max.as_micros() as u64).max(min + 1);
        let timeout = rand::RngExt::random_range(&mut self.rng, min..max);
        self.election_deadline = now + Duration::from_micros(timeout);
    }

    fn canary(&self, canary: Canary) -> bool {
        canary.planted(self.config.canary)
    }
}
