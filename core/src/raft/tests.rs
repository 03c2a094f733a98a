//! Step-by-step tests of one replica.
//! - The damaged-replica rule: a replica recovered with a damaged log (or a wiped disk)
//!   neither votes nor campaigns until a leader of a newer term has repaired it.
//! - A wiped replica's acknowledgements promise nothing, and a leader counts them for nothing.
//! - A snapshot transfer sends one chunk per answer that moves it forward.
//! - A leader takes no proposal while its oldest pending one has waited too long.
//! - A snapshot that replaces a conflicting log is durable only once its own write is.
//! - A pre-vote is granted only for a term above the replica's own.
//! - A leader commits entries of an earlier term only behind one of its own (figure 8).
//! - A leader ignores a copy of a rejection below a follower's match, unless the follower says
//!   its disk was damaged; a rejection's hint skips the leader's entries the follower cannot
//!   hold; any answer to an Append counts for CheckQuorum.
//! - A new leader's timers start at its election; a sync notice for a write not handed out yet
//!   is ignored.
//! - Terms: a vote request from a member with a log behind ours moves our term, one from outside
//!   the configuration does not; terms up to the limit are taken however far ahead, an absurd
//!   one moves the term to the limit (a vote request only outside the lease) and never to
//!   `TERM_MAX`; within the lease a vote request is ignored; a stale leader is told the newer
//!   term; a candidate that lost keeps its vote for itself.
//! - A pre-candidate counts grants only for its next term; a heartbeat is rejected only by a
//!   damaged follower lacking committed entries; following the same leader in a newer term is
//!   no leader change.
//! - A leadership transfer is given up at its deadline and not before, and its leader steps down
//!   then only if it sent `TimeoutNow`.
//! - Leases and heartbeat answers: one follower's answer gives a leader of three its read lease
//!   for four fifths of an election timeout, and none without CheckQuorum or once that follower
//!   says its votes were lost; a restarted replica ignores vote requests for an election timeout;
//!   heartbeat answers keep a leader in power only if they carry a promise, send an unanswered
//!   snapshot chunk again only after its wait, an Append only to a follower behind (even with a
//!   full window), and drop a transfer image only once no follower is sent it.
//! - Snapshot transfers: a follower takes a chunk only at the offset it has reached and within
//!   the snapshot's size, and drops a partly received snapshot for a newer one; a leader that
//!   compacts during a transfer starts it over with the newer snapshot (and that one's transfer
//!   image), and answers about the older one move nothing.

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::time::Instant;

fn entry(index: Index, term: Term) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Noop,
    }
}

/// Node 1 of a three-node group, recovered at `term` with entries 1..=last of that term and
/// the given damage.
fn recovered(term: Term, last: Index, damage: Option<Damage>) -> Replica {
    let mut config = Config::new(1, 1, vec![1, 2, 3]);
    if let Some(damage) = damage {
        config.damaged.insert(1, damage);
    }
    let recovered = Recovered {
        hard_state: HardState {
            term,
            vote: None,
            commit: last,
        },
        snapshot: None,
        entries: (1..=last).map(|i| entry(i, term)).collect(),
    };
    Replica::new(config, recovered, 7, Instant::ZERO)
}

/// Syncs every write and returns every message that may leave.
fn settle(replica: &mut Replica, now: Instant) -> Vec<Message> {
    while let Some(write) = replica.poll_write() {
        replica.persisted(now, write.id);
    }
    std::iter::from_fn(|| replica.poll_message())
        .map(|e| e.message)
        .collect()
}

/// Node 1 of a three-node group, recovered at `term` with entries 1..=last of that term,
/// `commit` of them committed.
fn with_log(term: Term, last: Index, commit: Index) -> Replica {
    with_terms(term, &vec![term; last as usize], commit)
}

/// Node 1 of a three-node group, recovered at `term` with entries from index 1 of the given
/// terms, `commit` of them committed.
fn with_terms(term: Term, terms: &[Term], commit: Index) -> Replica {
    let recovered = Recovered {
        hard_state: HardState {
            term,
            vote: None,
            commit,
        },
        snapshot: None,
        entries: (1..).zip(terms).map(|(i, t)| entry(i, *t)).collect(),
    };
    Replica::new(
        Config::new(1, 1, vec![1, 2, 3]),
        recovered,
        7,
        Instant::ZERO,
    )
}

fn later(seconds: u64) -> Instant {
    Instant::ZERO + Duration::from_secs(seconds)
}

/// Makes node 1 leader of the next term at `now` (its election timeout has passed) with node
/// 2's pre-vote and vote; returns what it sends as the new leader.
fn elect(replica: &mut Replica, now: Instant) -> Vec<Message> {
    replica.handle_timeout(now);
    settle(replica, now);
    let term = replica.status().term + 1;
    let pre_vote = Message::PreVoteResponse {
        term,
        granted: true,
    };
    replica.step(now, 2, pre_vote);
    settle(replica, now);
    replica.step(
        now,
        2,
        Message::VoteResponse {
            term,
            granted: true,
        },
    );
    let sent = settle(replica, now);
    assert_eq!(replica.status().role, Role::Leader);
    assert_eq!(replica.status().term, term);
    sent
}

fn damage(from: Index) -> Option<Damage> {
    Some(Damage {
        from,
        votes_lost: false,
    })
}

fn granted(messages: &[Message]) -> bool {
    messages.iter().any(|m| {
        matches!(
            m,
            Message::VoteResponse { granted: true, .. }
                | Message::PreVoteResponse { granted: true, .. }
        )
    })
}

#[test]
fn a_damaged_replica_keeps_its_valid_prefix_and_neither_votes_nor_campaigns() {
    let mut replica = recovered(3, 10, damage(6));
    assert_eq!(replica.damaged_from(), Some(6));
    assert_eq!(
        replica.status().last_index,
        5,
        "only the prefix below the damage"
    );
    assert_eq!(replica.status().commit_index, 5);

    let now = later(10);
    replica.handle_timeout(now);
    assert_eq!(
        replica.status().role,
        Role::Follower,
        "it must not campaign"
    );
    assert!(settle(&mut replica, now).is_empty());

    // A candidate with a longer log than ours would get an undamaged replica's vote.
    let pre_vote = Message::PreVote {
        term: 4,
        last_index: 20,
        last_term: 3,
    };
    replica.step(now, 2, pre_vote);
    let vote = Message::Vote {
        term: 4,
        last_index: 20,
        last_term: 3,
    };
    replica.step(now, 2, vote);
    let sent = settle(&mut replica, now);
    assert!(!sent.is_empty(), "refusals are still sent");
    assert!(
        !granted(&sent),
        "a damaged replica granted a vote: {sent:?}"
    );
    assert_eq!(replica.status().vote, None);

    // The same request to an undamaged replica is granted: the refusal is the damage's.
    let mut healthy = recovered(3, 10, None);
    healthy.step(now, 2, vote_for(4));
    assert!(granted(&settle(&mut healthy, now)));
}

fn vote_for(term: Term) -> Message {
    Message::Vote {
        term,
        last_index: 20,
        last_term: 3,
    }
}

fn append(term: Term, prev: Index, prev_term: Term, entries: Vec<Entry>, commit: Index) -> Message {
    Message::Append {
        term,
        prev_index: prev,
        prev_term,
        entries,
        commit,
    }
}

#[test]
fn a_leader_of_a_newer_term_repairs_it_once_it_commits_an_entry_of_its_term_here() {
    let mut replica = recovered(3, 10, damage(6));
    let now = later(1);
    // The leader of the recovered term cannot repair it, however much it commits.
    replica.step(now, 2, append(3, 5, 3, vec![entry(6, 3), entry(7, 3)], 7));
    settle(&mut replica, now);
    assert_eq!(replica.status().commit_index, 7);
    assert_eq!(replica.damaged_from(), Some(6));

    // A leader of term 4 whose commit still lags behind its own entries: not yet.
    replica.step(now, 3, append(4, 7, 3, vec![entry(8, 3), entry(9, 4)], 8));
    settle(&mut replica, now);
    assert_eq!(
        replica.damaged_from(),
        Some(6),
        "commit 8 holds no entry of term 4"
    );

    // Its commit reaches its own no-op: repaired once that is durable.
    replica.step(now, 3, append(4, 9, 4, vec![], 9));
    assert_eq!(replica.status().commit_index, 9);
    settle(&mut replica, now);
    assert_eq!(replica.damaged_from(), None);

    // And now it votes like anyone else, in a later term.
    replica.step(later(20), 2, vote_for_long(5));
    assert!(granted(&settle(&mut replica, later(20))));
}

fn vote_for_long(term: Term) -> Message {
    Message::Vote {
        term,
        last_index: 30,
        last_term: 4,
    }
}

/// Steps a heartbeat from `(leader, term)` and returns what the replica sends.
fn heartbeat_answers(
    replica: &mut Replica,
    now: Instant,
    (leader, term): (NodeId, Term),
    commit: Index,
    context: u64,
) -> Vec<Message> {
    let heartbeat = Message::Heartbeat {
        term,
        commit,
        context,
    };
    replica.step(now, leader, heartbeat);
    settle(replica, now)
}

#[test]
fn a_damaged_follower_tells_an_idle_leader_what_it_lost() {
    let mut replica = recovered(3, 10, damage(6));
    let now = later(1);
    let sent = heartbeat_answers(&mut replica, now, (2, 3), 10, 1);
    assert!(
        sent.iter().any(|m| matches!(
            m,
            Message::AppendResponse {
                result: AppendResult::RejectedDamaged {
                    rejected_index: 10,
                    hint_index: 5,
                    ..
                },
                ..
            }
        )),
        "{sent:?}"
    );
}

#[test]
fn a_wiped_replica_is_never_repaired_and_never_votes() {
    let wiped = Some(Damage {
        from: 1,
        votes_lost: true,
    });
    let mut replica = recovered(0, 0, wiped);
    let now = later(1);
    replica.step(now, 3, append(4, 0, 0, vec![entry(1, 4), entry(2, 4)], 2));
    let sent = settle(&mut replica, now);
    assert!(
        sent.iter().all(|m| matches!(
            m,
            Message::AppendResponse {
                result: AppendResult::AcceptedVotesLost { match_index: 2 },
                ..
            }
        )) && !sent.is_empty(),
        "it holds the entries but its acknowledgement promises nothing: {sent:?}"
    );
    let sent = heartbeat_answers(&mut replica, now, (3, 4), 2, 77);
    assert!(
        sent.iter()
            .any(|m| matches!(m, Message::HeartbeatResponse { context: 0, .. })),
        "no lease promise either: {sent:?}"
    );
    assert_eq!(replica.status().commit_index, 2);
    assert_eq!(
        replica.damaged_from(),
        Some(1),
        "it may have voted in any term"
    );
    replica.step(later(20), 2, vote_for_long(9));
    assert!(!granted(&settle(&mut replica, later(20))));
    replica.handle_timeout(later(40));
    assert_eq!(replica.status().role, Role::Follower);
}

#[test]
fn a_wiped_followers_acknowledgement_counts_for_no_commit_lease_or_check_quorum() {
    // Seed 32002003: a deposed leader of term 2 came back from a pause; a follower whose disk
    // had been wiped since it voted in term 3 accepted term 2 again, and its answers gave the
    // deposed leader a read lease (and would have let it commit).
    let (mut leader, _) = leader_sending_snapshot(10);
    let now = later(1);
    assert!(
        leader
            .propose(now, 1, vec![Bytes::from_static(b"c")])
            .is_ok()
    );
    settle(&mut leader, now);
    let last = leader.status().last_index;
    leader.step(now, 2, wiped_ack_at(last));
    let sent = settle(&mut leader, now);
    assert_eq!(
        leader.transfer_leadership(now, 2),
        Err(TransferError::NotAVoter { to: 2 }),
        "it would never campaign"
    );
    assert!(
        leader.status().commit_index < last,
        "committed with a wiped follower's acknowledgement: {sent:?}"
    );
    let heartbeat_answer = Message::HeartbeatResponse {
        term: 2,
        context: 0,
    };
    leader.step(now, 2, heartbeat_answer);
    settle(&mut leader, now);
    assert!(!leader.read_lease(now));
    // CheckQuorum: the wiped follower alone does not keep it leader.
    for ms in (1_050..3_000).step_by(50) {
        let at = Instant::ZERO + Duration::from_millis(ms);
        leader.step(at, 2, wiped_ack_at(last));
        let answer = Message::HeartbeatResponse {
            term: 2,
            context: 0,
        };
        leader.step(at, 2, answer);
        leader.handle_timeout(at);
        settle(&mut leader, at);
    }
    assert_ne!(leader.status().role, Role::Leader);
    // The same answer from an ordinary follower commits.
    let (mut leader, _) = leader_sending_snapshot(10);
    assert!(
        leader
            .propose(now, 1, vec![Bytes::from_static(b"c")])
            .is_ok()
    );
    settle(&mut leader, now);
    let ack = Message::AppendResponse {
        term: 2,
        result: AppendResult::Accepted { match_index: last },
    };
    leader.step(now, 2, ack);
    settle(&mut leader, now);
    assert_eq!(leader.status().commit_index, last);
}

/// Seed 719002261 of the raft workload: a follower's disk was wiped, the deposed leader it
/// followed repaired it (its answers said its votes were lost, and were not counted), then an
/// answer the follower sent before the wipe arrived late. Taken as a sign the follower counts
/// again, it let the deposed leader commit, with the match the wiped follower had reported
/// since, an entry the new leader had overwritten.
#[test]
fn a_late_answer_from_before_a_followers_wipe_does_not_make_it_count_again() {
    let now = later(1);
    let mut leader = elected_with_a_proposal(now);
    settle(&mut leader, now);
    let last = leader.status().last_index;
    let term = leader.status().term;
    let wiped = AppendResult::AcceptedVotesLost { match_index: last };
    leader.step(now, 2, answer(term, wiped));
    settle(&mut leader, now);
    assert_eq!(
        leader.status().commit_index,
        5,
        "a wiped follower counts for nothing"
    );
    let from_before_the_wipe = AppendResult::Accepted { match_index: 5 };
    leader.step(now, 2, answer(term, from_before_the_wipe));
    settle(&mut leader, now);
    assert_eq!(
        leader.status().commit_index,
        5,
        "committed with the match a wiped follower reported"
    );
    leader.handle_timeout(now + Duration::from_millis(50));
    settle(&mut leader, now + Duration::from_millis(50));
    assert!(!leader.read_lease(now + Duration::from_millis(50)));
}

/// Node 1 elected in term 3 over 1..=5 of term 2 at `now`, with one proposal (7, after its
/// term's first entry) not yet written.
fn elected_with_a_proposal(now: Instant) -> Replica {
    let mut leader = with_log(2, 5, 5);
    elect(&mut leader, now);
    assert!(
        leader
            .propose(now, 1, vec![Bytes::from_static(b"c")])
            .is_ok()
    );
    leader
}

fn wiped_ack_at(match_index: Index) -> Message {
    Message::AppendResponse {
        term: 2,
        result: AppendResult::AcceptedVotesLost { match_index },
    }
}

#[test]
fn a_message_of_an_absurd_term_is_dropped_unread_and_reported() {
    for absurd in [u64::MAX, TERM_MAX, TERM_MAX - 1, TERM_ACCEPTED_MAX + 2] {
        let mut replica = recovered(3, 2, None);
        let heartbeat = Message::Heartbeat {
            term: absurd,
            commit: 2,
            context: 0,
        };
        replica.step(later(1), 2, heartbeat);
        let status = replica.status();
        // Not adopted (its leader is not followed), though the replica moves to the limit,
        // from where honest replicas go on one term at a time.
        assert_eq!(status.term, TERM_ACCEPTED_MAX, "term {absurd}");
        assert_eq!(status.leader, None, "term {absurd}");
        assert!(
            matches!(
                replica.poll_event(),
                Some(RaftEvent::MessageRefused { from: 2, ref why }) if why.contains("above the maximum")
            ),
            "term {absurd}"
        );
        // Still able to campaign: its own next term exists, and is one anyone accepts.
        replica.handle_timeout(later(10));
        assert!(
            settle(&mut replica, later(10)).iter().any(
                |m| matches!(m, Message::PreVote { term, .. } if *term == TERM_ACCEPTED_MAX + 1)
            ),
            "term {absurd}"
        );
    }
}

#[test]
fn above_the_term_limit_terms_are_taken_one_at_a_time() {
    let mut replica = recovered(TERM_ACCEPTED_MAX + 5, 2, None);
    let heartbeat = |term| Message::Heartbeat {
        term,
        commit: 2,
        context: 0,
    };
    // One past its own: a leader elected after it; followed.
    replica.step(later(1), 2, heartbeat(TERM_ACCEPTED_MAX + 6));
    assert_eq!(replica.status().term, TERM_ACCEPTED_MAX + 6);
    assert_eq!(replica.status().leader, Some(2));
    // Further: refused, one term further on, following nobody.
    replica.step(later(2), 3, heartbeat(TERM_ACCEPTED_MAX + 100));
    assert_eq!(replica.status().term, TERM_ACCEPTED_MAX + 7);
    assert_eq!(replica.status().leader, None);
    // A pre-vote asking for a far term changes nothing.
    replica.step(
        later(3),
        3,
        Message::PreVote {
            term: TERM_MAX - 1,
            last_index: 9,
            last_term: TERM_MAX - 2,
        },
    );
    assert_eq!(replica.status().term, TERM_ACCEPTED_MAX + 7);
    assert!(!granted(&settle(&mut replica, later(3))));
}

/// Node 1 of three, elected leader of term 2 at `later(1)` (returned), holding only a
/// snapshot of `bytes` bytes at index 10, which it sends in 64-byte chunks (from transfer
/// images when `transfer_images`).
fn leader_holding_only_a_snapshot(bytes: usize, transfer_images: bool) -> (Replica, Instant) {
    let mut config = Config::new(1, 1, vec![1, 2, 3]);
    config.snapshot_chunk_bytes_max = 64;
    let recovered = Recovered {
        hard_state: HardState {
            term: 1,
            vote: None,
            commit: 10,
        },
        snapshot: Some(Snapshot {
            index: 10,
            term: 1,
            data: Bytes::from(vec![7u8; bytes]),
            membership: None,
        }),
        entries: Vec::new(),
    };
    let mut leader = Replica::new(config, recovered, 7, Instant::ZERO);
    leader.use_transfer_images(transfer_images);
    let now = later(1);
    elect(&mut leader, now);
    (leader, now)
}

/// Node 1 of three, leader of term 2, holding only a snapshot of `bytes` bytes at index 10
/// and sending it to node 2 in 64-byte chunks; returns the leader and the first chunk sent.
fn leader_sending_snapshot(bytes: usize) -> (Replica, Message) {
    let (mut replica, now) = leader_holding_only_a_snapshot(bytes, false);
    let rejected = Message::AppendResponse {
        term: 2,
        result: AppendResult::Rejected {
            rejected_index: 10,
            hint_index: 0,
            hint_term: 0,
        },
    };
    replica.step(now, 2, rejected);
    let sent = settle(&mut replica, now);
    let chunks: Vec<Message> = sent
        .into_iter()
        .filter(|m| matches!(m, Message::InstallSnapshot { .. }))
        .collect();
    assert_eq!(chunks.len(), 1, "one chunk at a time: {chunks:?}");
    (replica, chunks[0].clone())
}

fn chunk_offsets(sent: &[Message]) -> Vec<u64> {
    chunk_places(sent)
        .into_iter()
        .map(|(_, offset)| offset)
        .collect()
}

fn received(received: u64) -> Message {
    Message::SnapshotResponse {
        term: 2,
        index: 10,
        received,
    }
}

#[test]
fn a_duplicated_snapshot_answer_sends_no_second_chunk() {
    let (mut leader, first) = leader_sending_snapshot(1_000);
    assert!(matches!(first, Message::InstallSnapshot { offset: 0, .. }));
    let now = later(1);
    // The network delivers the answer to the first chunk twice.
    leader.step(now, 2, received(64));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), vec![64]);
    leader.step(now, 2, received(64));
    assert_eq!(
        chunk_offsets(&settle(&mut leader, now)),
        Vec::<u64>::new(),
        "a copy of an answer must not start a second chain of chunks"
    );
    // So does a late copy of an older answer.
    leader.step(now, 2, received(128));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), vec![128]);
    leader.step(now, 2, received(64));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), Vec::<u64>::new());
}

#[test]
fn a_follower_that_lost_its_chunks_is_served_from_where_it_is() {
    let (mut leader, _) = leader_sending_snapshot(1_000);
    let now = later(1);
    leader.step(now, 2, received(64));
    leader.step(now, 2, received(128));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), vec![64, 128]);
    // The follower restarted and holds nothing: it answers the chunk at 128 with 0.
    leader.step(now, 2, received(0));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), Vec::<u64>::new());
    // Once the unanswered chunk's wait runs out, the transfer starts over from 0.
    let mut resent = Vec::new();
    for _ in 0..10 {
        let heartbeat = Message::HeartbeatResponse {
            term: 2,
            context: 0,
        };
        leader.step(now, 2, heartbeat);
        resent.extend(chunk_offsets(&settle(&mut leader, now)));
        if !resent.is_empty() {
            break;
        }
    }
    assert_eq!(resent, vec![0]);
}

/// Found by mutation testing (`Progress::accept` ending a snapshot transfer on any
/// acknowledgement): a late answer to an Append from before the snapshot was needed moves the
/// match but neither ends nor restarts the transfer.
#[test]
fn a_late_acknowledgement_below_the_snapshot_does_not_restart_its_transfer() {
    let (mut leader, _) = leader_sending_snapshot(1_000);
    let now = later(1);
    let late = Message::AppendResponse {
        term: 2,
        result: AppendResult::Accepted { match_index: 5 },
    };
    leader.step(now, 2, late);
    assert_eq!(
        chunk_offsets(&settle(&mut leader, now)),
        Vec::<u64>::new(),
        "the first chunk is still out"
    );
    leader.step(now, 2, received(64));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), vec![64]);
}

/// Found by mutation testing (`Progress::accept` calling a repeated acknowledgement news):
/// the leader sends a leadership transfer's target `TimeoutNow` once, when it catches up, not
/// again on every copy of the acknowledgement that the network delivers.
#[test]
fn a_repeated_acknowledgement_sends_no_second_timeout_now() {
    let (mut leader, _) = leader_sending_snapshot(64);
    let now = later(1);
    leader.step(now, 2, received(64));
    settle(&mut leader, now);
    let last = leader.status().last_index;
    let ack = Message::AppendResponse {
        term: 2,
        result: AppendResult::Accepted { match_index: 10 },
    };
    leader.step(now, 2, ack);
    settle(&mut leader, now);
    assert_eq!(leader.transfer_leadership(now, 2), Ok(()));
    let timeouts = |sent: &[Message]| {
        sent.iter()
            .filter(|m| matches!(m, Message::TimeoutNow { .. }))
            .count()
    };
    assert_eq!(timeouts(&settle(&mut leader, now)), 0, "not caught up yet");
    let ack = Message::AppendResponse {
        term: 2,
        result: AppendResult::Accepted { match_index: last },
    };
    leader.step(now, 2, ack.clone());
    assert_eq!(timeouts(&settle(&mut leader, now)), 1);
    leader.step(now, 2, ack);
    assert_eq!(
        timeouts(&settle(&mut leader, now)),
        0,
        "a copy of the answer"
    );
}

#[test]
fn a_leader_refuses_proposals_while_its_oldest_has_waited_too_long() {
    let (mut leader, _) = leader_sending_snapshot(100);
    let wait_max = leader.config().proposal_wait_max;
    let start = later(1);
    let command = || vec![Bytes::from_static(b"c")];
    assert!(leader.propose(start, 1, command()).is_ok());
    // Nobody has answered: the first proposal is still pending.
    let soon = start + wait_max / 2;
    assert!(leader.propose(soon, 2, command()).is_ok());
    let late = start + wait_max + Duration::from_millis(1);
    assert_eq!(leader.propose(late, 3, command()), Err(ProposeError::Busy));
    // A quorum holds both: the queue is empty again and proposals are taken.
    settle(&mut leader, late);
    let last = leader.status().last_index;
    let accepted = Message::AppendResponse {
        term: 2,
        result: AppendResult::Accepted { match_index: last },
    };
    leader.step(late, 3, accepted);
    settle(&mut leader, late);
    assert_eq!(leader.status().commit_index, last);
    assert!(leader.propose(late, 4, command()).is_ok());
}

#[test]
fn the_counters_name_the_paths_a_replica_took() {
    let mut replica = recovered(1, 2, None);
    assert_eq!(replica.counters(), RaftCounters::default());
    // An election timeout starts a PreVote round; a granted pre-vote, a real campaign; a
    // granted vote, leadership.
    elect(&mut replica, later(1));
    let c = replica.counters();
    assert_eq!(
        (c.pre_vote_campaigns, c.campaigns, c.elections_won),
        (1, 1, 1)
    );
    assert_eq!(c.check_quorum_step_downs, 0);
    // No follower answers: CheckQuorum steps it down within two election timeouts.
    for ms in (1_050..2_000).step_by(50) {
        replica.handle_timeout(Instant::ZERO + Duration::from_millis(ms));
        settle(&mut replica, Instant::ZERO + Duration::from_millis(ms));
    }
    assert_ne!(replica.status().role, Role::Leader);
    assert_eq!(replica.counters().check_quorum_step_downs, 1);
    // A follower holding an uncommitted stale tail drops it for the leader's entries.
    let mut follower = with_log(1, 4, 2);
    follower.step(later(5), 3, append(2, 2, 1, vec![entry(3, 2)], 2));
    settle(&mut follower, later(5));
    assert_eq!(follower.entry(3).map(|e| e.term), Some(2));
    assert_eq!(follower.counters().conflicting_tails_dropped, 1);
    // A whole snapshot from the leader is installed, and counted once (found by mutation
    // testing: the count as `*=` stayed 0).
    let chunk = Message::InstallSnapshot {
        term: 2,
        index: 8,
        snapshot_term: 2,
        offset: 0,
        total: 3,
        chunk: Bytes::from_static(b"abc"),
        membership: None,
    };
    follower.step(later(5), 3, chunk);
    settle(&mut follower, later(5));
    assert_eq!(follower.status().snapshot_index, 8);
    assert_eq!(follower.counters().snapshots_installed, 1);
    // A leader counts each snapshot chunk it sends, and a damaged replica its repair, once
    // (found by mutation testing: both counts as `*=` stayed 0).
    let (mut leader, _) = leader_sending_snapshot(1_000);
    leader.step(later(1), 2, received(64));
    settle(&mut leader, later(1));
    assert_eq!(leader.counters().snapshot_chunks_sent, 2);
    let mut damaged = recovered(3, 10, damage(6));
    damaged.step(later(1), 3, append(4, 5, 3, vec![entry(6, 4)], 6));
    settle(&mut damaged, later(1));
    assert_eq!(damaged.damaged_from(), None);
    assert_eq!(damaged.counters().damage_repaired, 1);
}

#[test]
fn a_snapshot_replacing_a_conflicting_log_is_not_durable_before_its_own_write() {
    // Node 1 holds entries 1..=10 of term 3, of which 1..=5 are committed.
    let recovered = Recovered {
        hard_state: HardState {
            term: 3,
            vote: None,
            commit: 5,
        },
        snapshot: None,
        entries: (1..=10).map(|i| entry(i, 3)).collect(),
    };
    let mut replica = Replica::new(Config::new(1, 1, vec![1, 2, 3]), recovered, 7, later(0));
    let now = later(1);
    // A leader of term 4: the new term is a write, handed out and not yet synced.
    let heartbeat = Message::Heartbeat {
        term: 4,
        commit: 0,
        context: 1,
    };
    replica.step(now, 2, heartbeat);
    let first = replica.poll_write().expect("the new term is written");
    // Its snapshot at 8 of term 4 conflicts with our 8 of term 3: the old log goes.
    let chunk = Message::InstallSnapshot {
        term: 4,
        index: 8,
        snapshot_term: 4,
        offset: 0,
        total: 3,
        chunk: Bytes::from_static(b"abc"),
        membership: None,
    };
    replica.step(now, 2, chunk);
    let second = replica.poll_write().expect("the snapshot is written");
    assert!(second.discard_log && second.snapshot.is_some());
    // The earlier write syncs: the disk still holds the old log above the old commit.
    replica.persisted(now, first.id);
    assert!(
        replica.status().durable_index <= 5,
        "durable {} with the old log's entries 6..=10 on disk",
        replica.status().durable_index
    );
    replica.persisted(now, second.id);
    assert!(replica.status().durable_index >= 8);
}

/// Found by mutation testing (`term > self.term` as `>=`): a pre-vote is granted only for a
/// term above ours. One for our own term comes from a node a term behind, whose campaign would
/// ask for votes in a term that may have spent them already.
#[test]
fn a_pre_vote_for_a_term_not_above_ours_is_refused() {
    let mut replica = recovered(3, 2, None);
    let now = later(1);
    let pre_vote = |term| Message::PreVote {
        term,
        last_index: 9,
        last_term: 3,
    };
    replica.step(now, 2, pre_vote(3));
    assert!(!granted(&settle(&mut replica, now)), "our own term");
    replica.step(now, 2, pre_vote(4));
    assert!(granted(&settle(&mut replica, now)), "the next term");
    assert_eq!(replica.status().term, 3, "a pre-vote moves no term");
}

/// Raft's figure 8: a leader counts replicas to commit only entries of its own term. Entries of
/// an earlier term held by a majority commit only with one of its own after them.
#[test]
fn a_leader_commits_an_earlier_terms_entries_only_behind_one_of_its_own() {
    let mut replica = with_log(2, 5, 3);
    let now = later(1);
    elect(&mut replica, now);
    assert_eq!(replica.status().term, 3);
    let accepted = |match_index| Message::AppendResponse {
        term: 3,
        result: AppendResult::Accepted { match_index },
    };
    // Node 2 holds the term-2 entries up to 5: with the leader, a majority, yet not committed.
    replica.step(now, 2, accepted(5));
    settle(&mut replica, now);
    assert_eq!(
        replica.status().commit_index,
        3,
        "entries of term 2 committed by counting replicas"
    );
    // Once node 2 holds the leader's own no-op (index 6, term 3), everything up to it commits.
    assert_eq!(replica.status().last_index, 6);
    replica.step(now, 2, accepted(6));
    settle(&mut replica, now);
    assert_eq!(replica.status().commit_index, 6);
}

fn answer(term: Term, result: AppendResult) -> Message {
    Message::AppendResponse { term, result }
}

fn rejection(rejected_index: Index, hint_index: Index, hint_term: Term) -> AppendResult {
    AppendResult::Rejected {
        rejected_index,
        hint_index,
        hint_term,
    }
}

/// The Appends in `sent` as (prev_index, last index sent).
fn appends(sent: &[Message]) -> Vec<(Index, Index)> {
    sent.iter()
        .filter_map(|m| match m {
            Message::Append {
                prev_index,
                entries,
                ..
            } => Some((*prev_index, entries.last().map_or(*prev_index, |e| e.index))),
            _ => None,
        })
        .collect()
}

/// Found by mutation testing (`recent_active = !progress.votes_lost` on a rejection with its
/// `!` deleted; the node tests catch the same on an acknowledgement): a follower that answers
/// the leader's Appends, and no heartbeat, has been heard from, and with the leader it is a
/// quorum that keeps the leader in CheckQuorum, whether it accepts or refuses them.
#[test]
fn check_quorum_counts_a_follower_heard_only_through_its_answers_to_appends() {
    let mut leader = with_log(2, 5, 5);
    let start = later(1);
    elect(&mut leader, start);
    let last = leader.status().last_index;
    let accepted = AppendResult::Accepted { match_index: last };
    // A late copy of a rejection from before it caught up: stale, yet an answer.
    let rejected = rejection(1, 1, 2);
    let mut at = start;
    for (result, what) in [(accepted, "acknowledgements"), (rejected, "rejections")] {
        for _ in 0..20 {
            at = at + Duration::from_millis(50);
            leader.step(at, 2, answer(3, result));
            leader.handle_timeout(at);
            settle(&mut leader, at);
        }
        assert_eq!(leader.status().role, Role::Leader, "{what}");
    }
}

/// Found by mutation testing (the staleness test's `!(damaged && ..)` as `(damaged && ..)` or
/// `!(damaged || ..)`): a copy of an old rejection, delivered after the follower acknowledged
/// more, neither lowers its match nor sends again what it holds.
#[test]
fn a_late_copy_of_a_rejection_below_the_followers_match_is_ignored() {
    let mut leader = with_log(2, 5, 5);
    let now = later(1);
    assert_eq!(appends(&elect(&mut leader, now)), vec![(5, 6), (5, 6)]);
    // Node 2 holds 1..=4 only: it refuses the probe, and takes 5 and 6 after 4.
    let rejected = rejection(5, 4, 2);
    leader.step(now, 2, answer(3, rejected));
    assert_eq!(appends(&settle(&mut leader, now)), vec![(4, 6)]);
    leader.step(now, 2, answer(3, AppendResult::Accepted { match_index: 6 }));
    assert_eq!(
        appends(&settle(&mut leader, now)),
        vec![],
        "nothing more to send"
    );
    assert_eq!(leader.status().commit_index, 6);
    // The network delivers the rejection again.
    leader.step(now, 2, answer(3, rejected));
    assert_eq!(appends(&settle(&mut leader, now)), vec![]);
    // Node 2 is still known to hold 6: the next entry goes out alone.
    assert!(
        leader
            .propose(now, 1, vec![Bytes::from_static(b"c")])
            .is_ok()
    );
    let sent = settle(&mut leader, now);
    assert!(appends(&sent).contains(&(6, 7)), "{sent:?}");
    assert!(
        !appends(&sent).iter().any(|&(prev, _)| prev < 6),
        "{sent:?}"
    );
}

/// Found by mutation testing (`rejected_index <= match_index` as `>` in the damaged case): a
/// follower whose damaged disk lost entries it acknowledged says so, and the leader believes
/// it: it sends them again from where the follower's valid log ends.
#[test]
fn a_damaged_followers_rejection_below_its_match_is_believed() {
    let mut leader = with_log(2, 5, 5);
    let now = later(1);
    elect(&mut leader, now);
    leader.step(now, 2, answer(3, AppendResult::Accepted { match_index: 6 }));
    settle(&mut leader, now);
    assert_eq!(leader.status().commit_index, 6);
    // Node 2 restarts with only 1..=3 valid and answers a heartbeat committing 6.
    let damaged = AppendResult::RejectedDamaged {
        rejected_index: 6,
        hint_index: 3,
        hint_term: 2,
    };
    leader.step(now, 2, answer(3, damaged));
    assert_eq!(appends(&settle(&mut leader, now)), vec![(3, 6)]);
}

/// Found by mutation testing (`probe.min(rejected_index) + 1` as `* 1`: the probe starts one
/// entry lower, sending again one the follower holds; also `hint_term > 0` as `==` or `<`,
/// which hang the simulation): a rejection that names the follower's term at its hint lets the
/// leader skip, in one round, its own entries of terms above that one, which the follower
/// cannot hold, and the next probe starts just past the last entry that can match.
#[test]
fn a_rejection_skips_the_leaders_entries_of_terms_above_the_followers() {
    // Entries 1..=3 of term 1 and 4..=5 of term 2; the new leader adds 6 of term 3.
    let mut leader = with_terms(2, &[1, 1, 1, 2, 2], 3);
    let now = later(1);
    assert_eq!(appends(&elect(&mut leader, now)), vec![(5, 6), (5, 6)]);
    // Node 2 holds 1..=5 all of term 1: its entry 5 is of term 1, not 2.
    let rejected = rejection(5, 5, 1);
    leader.step(now, 2, answer(3, rejected));
    assert_eq!(
        appends(&settle(&mut leader, now)),
        vec![(3, 6)],
        "the leader's entries of term 2 cannot match the follower's"
    );
}

/// Found by mutation testing (`persisted`'s guard `id > writes_issued` with `&&` for `||`, or
/// `<` for `>`): a sync notice for a write not yet handed out makes nothing durable, and lets
/// no answer go that waits for the writes before it.
#[test]
fn a_sync_notice_for_a_write_not_handed_out_yet_is_ignored() {
    let mut follower = with_log(2, 5, 5);
    let now = later(1);
    follower.step(now, 2, append(2, 5, 2, vec![entry(6, 2), entry(7, 2)], 5));
    let write = follower.poll_write().expect("the new entries are written");
    assert_eq!(follower.status().durable_index, 5);
    follower.persisted(now, write.id + 1);
    assert_eq!(follower.status().durable_index, 5);
    assert!(
        follower.poll_message().is_none(),
        "acknowledged before it is durable"
    );
    follower.persisted(now, write.id);
    assert_eq!(follower.status().durable_index, 7);
    assert!(matches!(
        follower.poll_message().map(|e| e.message),
        Some(Message::AppendResponse {
            result: AppendResult::Accepted { match_index: 7 },
            ..
        })
    ));
}

/// Found by mutation testing (`become_leader`'s `now + ..` as `now - ..`): a new leader's
/// first heartbeat is due a heartbeat interval after its election (its first Appends have just
/// gone out), and its first CheckQuorum round an election timeout after it, so that followers
/// that never answer depose it two minimum election timeouts after its election, not before.
#[test]
fn a_new_leaders_timers_start_at_its_election() {
    let mut leader = with_log(2, 5, 5);
    let start = later(1);
    elect(&mut leader, start);
    let config = leader.config().clone();
    assert_eq!(leader.poll_timeout(), start + config.heartbeat_interval);
    let deposed_at = start + config.election_timeout_min * 2;
    let mut at = start;
    while at < deposed_at {
        assert_eq!(leader.status().role, Role::Leader, "at {at}");
        at = at + config.heartbeat_interval;
        leader.handle_timeout(at);
        settle(&mut leader, at);
    }
    assert_eq!(leader.status().role, Role::Follower);
}

/// Found by mutation testing (`persisted`'s `self.role == Role::Leader` as `!=`): a leader
/// counts its own copy of an entry once its write is synced, so an entry the followers
/// acknowledged before the leader's own sync commits at that sync, without waiting for another
/// answer (an idle leader gets none).
#[test]
fn a_leader_commits_when_its_own_write_syncs_after_a_followers_acknowledgement() {
    let now = later(1);
    let mut leader = elected_with_a_proposal(now);
    let write = leader.poll_write().expect("the proposal is written");
    leader.step(now, 2, answer(3, AppendResult::Accepted { match_index: 7 }));
    assert_eq!(
        leader.status().commit_index,
        6,
        "entry 7 is on one disk of three"
    );
    leader.persisted(now, write.id);
    assert_eq!(leader.status().commit_index, 7);
}

fn vote_responses(sent: &[Message]) -> Vec<(Term, bool)> {
    sent.iter()
        .filter_map(|m| match m {
            Message::VoteResponse { term, granted } => Some((*term, *granted)),
            _ => None,
        })
        .collect()
}

/// Found by mutation testing (the check that drops a vote request unread, `!contains(from) &&
/// !is_up_to_date(..)`, with either `!` deleted): a vote request of a newer
/// term from a member whose log is behind ours is refused and its term becomes ours (Raft
/// §5.1); one from outside our configuration with such a log is dropped unread and moves no
/// term; one from outside with a log as long as ours is answered (a server added in a
/// configuration we lack).
#[test]
fn a_vote_request_with_a_log_behind_ours_is_refused_in_its_term_unless_from_outside_the_group() {
    let now = later(1);
    let vote = |last_index, last_term| Message::Vote {
        term: 5,
        last_index,
        last_term,
    };
    let mut replica = recovered(3, 10, None);
    replica.step(now, 2, vote(2, 1));
    assert_eq!(vote_responses(&settle(&mut replica, now)), vec![(5, false)]);
    assert_eq!(replica.status().term, 5, "a member's term is taken");

    let mut replica = recovered(3, 10, None);
    replica.step(now, 4, vote(2, 1));
    assert_eq!(settle(&mut replica, now), vec![], "dropped unread");
    assert_eq!(replica.status().term, 3);

    let mut replica = recovered(3, 10, None);
    replica.step(now, 4, vote(10, 3));
    assert_eq!(vote_responses(&settle(&mut replica, now)), vec![(5, true)]);
    assert_eq!(replica.status().vote, Some(4));
}

/// Found by mutation testing (the term limit's `term > TERM_ACCEPTED_MAX` as `>=`): a message
/// of any term up to the limit is taken as Raft takes it, however far past the replica's own
/// term, and its leader is followed.
#[test]
fn a_leader_of_any_term_up_to_the_limit_is_followed_however_far_ahead() {
    for term in [5, TERM_ACCEPTED_MAX] {
        let mut replica = recovered(3, 2, None);
        heartbeat_answers(&mut replica, later(1), (2, term), 2, 0);
        assert_eq!(replica.status().term, term);
        assert_eq!(replica.status().leader, Some(2), "term {term}");
    }
}

/// Found by mutation testing (the `Vote` arm of the refused absurd term's `bumps`, deleted or
/// with its `!` deleted): a vote request of an absurd term moves the replica's term to the
/// limit like any other message of a newer term, except within the CheckQuorum lease, where
/// any vote request is ignored.
#[test]
fn an_absurd_vote_request_moves_the_term_to_the_limit_only_outside_the_lease() {
    let mut replica = recovered(3, 2, None);
    let now = later(1);
    heartbeat_answers(&mut replica, now, (2, 3), 2, 0);
    let absurd = || Message::Vote {
        term: u64::MAX,
        last_index: 9,
        last_term: 3,
    };
    let soon = now + Duration::from_millis(50);
    replica.step(soon, 3, absurd());
    assert_eq!(settle(&mut replica, soon), vec![]);
    assert_eq!(replica.status().term, 3, "within the lease");
    assert_eq!(replica.status().leader, Some(2));
    let lease_over = now + replica.config().election_timeout_min * 2;
    replica.step(lease_over, 3, absurd());
    assert_eq!(settle(&mut replica, lease_over), vec![]);
    assert_eq!(
        replica.status().term,
        TERM_ACCEPTED_MAX,
        "outside the lease"
    );
    assert_eq!(replica.status().leader, None);
}

/// Found by mutation testing (`bumped < TERM_MAX` as `<=`): no message moves a replica's term
/// to `TERM_MAX`, where every message of its own term would be dropped unread.
#[test]
fn no_message_moves_a_replicas_term_to_term_max() {
    let mut replica = recovered(TERM_MAX - 1, 2, None);
    heartbeat_answers(&mut replica, later(1), (2, u64::MAX), 2, 0);
    assert_eq!(replica.status().term, TERM_MAX - 1);
}

/// Found by mutation testing (the guard `Vote if self.in_lease(now)` as `false`): a follower
/// that heard from its leader less than an election timeout ago ignores a vote request of a
/// newer term (the CheckQuorum lease, thesis §4.2.3), and grants it once that time is over.
#[test]
fn a_follower_ignores_a_vote_request_while_its_leader_was_heard_within_an_election_timeout() {
    let mut replica = recovered(3, 2, None);
    let now = later(1);
    heartbeat_answers(&mut replica, now, (2, 3), 2, 0);
    let timeout = replica.config().election_timeout_min;
    let soon = now + timeout - Duration::from_millis(1);
    replica.step(soon, 3, vote_for(4));
    assert_eq!(settle(&mut replica, soon), vec![]);
    assert_eq!(replica.status().term, 3);
    assert_eq!(replica.status().leader, Some(2));
    let after = now + timeout;
    replica.step(after, 3, vote_for(4));
    assert_eq!(
        vote_responses(&settle(&mut replica, after)),
        vec![(4, true)]
    );
}

/// Found by mutation testing (the stale branch's `Append | Heartbeat | InstallSnapshot` arm
/// deleted: the stale leader was not answered): a leader of an older term is told the newer
/// one, so that it steps down, and its entries are not taken.
#[test]
fn a_stale_leader_is_told_the_newer_term_and_its_entries_are_not_taken() {
    let mut replica = with_terms(3, &[1, 1], 2);
    let now = later(1);
    replica.step(now, 2, append(2, 2, 1, vec![entry(3, 2)], 2));
    let told = |sent: &[Message]| {
        sent.iter()
            .any(|m| matches!(m, Message::HeartbeatResponse { term: 3, .. }))
    };
    let sent = settle(&mut replica, now);
    assert!(told(&sent), "{sent:?}");
    assert_eq!(replica.status().last_index, 2);
    assert_eq!(replica.status().leader, None);
    let sent = heartbeat_answers(&mut replica, now, (2, 2), 2, 0);
    assert!(told(&sent), "{sent:?}");
}

/// Found by mutation testing (`!granted || term == self.term + 1` with the `!` deleted): a
/// pre-candidate counts a grant only for the term it would campaign in (a late grant of an
/// earlier round is not one), and a refusal whatever its term.
#[test]
fn a_pre_candidate_counts_grants_for_its_next_term_only_and_refusals_of_any_term() {
    let mut replica = recovered(3, 2, None);
    let now = later(1);
    replica.handle_timeout(now);
    settle(&mut replica, now);
    assert_eq!(replica.status().role, Role::PreCandidate);
    let late_grant = Message::PreVoteResponse {
        term: 3,
        granted: true,
    };
    replica.step(now, 2, late_grant);
    settle(&mut replica, now);
    assert_eq!(replica.status().role, Role::PreCandidate);
    for from in [2, 3] {
        let refusal = Message::PreVoteResponse {
            term: 3,
            granted: false,
        };
        replica.step(now, from, refusal);
    }
    settle(&mut replica, now);
    assert_eq!(replica.status().role, Role::Follower, "a majority refused");
    assert_eq!(replica.status().term, 3);
}

/// Found by mutation testing (`self.damage.is_some() && commit > last_index` with `||`, or `>`
/// as `>=`): a heartbeat is answered with a rejection only by a damaged follower that lacks
/// entries the leader committed; a follower merely behind, or a damaged one holding them all,
/// just answers it.
#[test]
fn only_a_damaged_follower_lacking_committed_entries_rejects_a_heartbeat() {
    let rejects = |sent: &[Message]| {
        sent.iter()
            .any(|m| matches!(m, Message::AppendResponse { .. }))
    };
    let mut behind = recovered(3, 5, None);
    let sent = heartbeat_answers(&mut behind, later(1), (2, 3), 10, 1);
    assert!(!rejects(&sent), "{sent:?}");
    let mut damaged = recovered(3, 10, damage(6));
    let sent = heartbeat_answers(&mut damaged, later(1), (2, 3), 5, 1);
    assert!(!rejects(&sent), "{sent:?}");
    let sent = heartbeat_answers(&mut damaged, later(1), (2, 3), 6, 1);
    assert!(rejects(&sent), "{sent:?}");
}

/// Found by mutation testing (`become_follower`'s `term > self.term` as `>=`): a candidate
/// that loses its campaign keeps its vote for itself in that term, and refuses another
/// candidate of the same term.
#[test]
fn a_candidate_that_lost_its_campaign_votes_for_no_one_else_in_its_term() {
    let mut replica = recovered(3, 2, None);
    let now = later(1);
    replica.handle_timeout(now);
    settle(&mut replica, now);
    let grant = Message::PreVoteResponse {
        term: 4,
        granted: true,
    };
    replica.step(now, 2, grant);
    settle(&mut replica, now);
    assert_eq!(replica.status().role, Role::Candidate);
    for from in [2, 3] {
        let refusal = Message::VoteResponse {
            term: 4,
            granted: false,
        };
        replica.step(now, from, refusal);
    }
    settle(&mut replica, now);
    assert_eq!(replica.status().role, Role::Follower);
    assert_eq!(replica.status().vote, Some(1));
    replica.step(now, 3, vote_for(4));
    assert_eq!(vote_responses(&settle(&mut replica, now)), vec![(4, false)]);
}

fn events(replica: &mut Replica) -> Vec<RaftEvent> {
    std::iter::from_fn(|| replica.poll_event()).collect()
}

/// Found by mutation testing (the newer term's `Append | Heartbeat | InstallSnapshot` arm
/// deleted, so the replica first follows no one in the new term, then the sender): the leader
/// changes, for the driver's `leader_changes` count, when the replica follows another node, not
/// when the node it follows leads a newer term.
#[test]
fn a_follower_reports_no_leader_change_when_its_leader_leads_a_newer_term() {
    let mut replica = recovered(3, 2, None);
    let now = later(1);
    heartbeat_answers(&mut replica, now, (2, 3), 2, 0);
    assert_eq!(
        events(&mut replica),
        vec![RaftEvent::LeaderChanged { term: 3, leader: 2 }]
    );
    heartbeat_answers(&mut replica, now, (2, 5), 2, 0);
    assert_eq!(replica.status().term, 5);
    assert_eq!(replica.status().leader, Some(2));
    assert_eq!(events(&mut replica), vec![]);
    heartbeat_answers(&mut replica, now, (3, 6), 2, 0);
    assert_eq!(
        events(&mut replica),
        vec![RaftEvent::LeaderChanged { term: 6, leader: 3 }]
    );
}

/// Found by mutation testing (`handle_timeout`'s `now >= transfer.deadline` as `<`: a transfer
/// given up at the first timer before its deadline, and never after it; `transfers_aborted +=
/// 1` as `*=`; `timeout_now_term == self.term` as `!=`: the wrong leader stepped down): a
/// leadership transfer is given up at its deadline, an election timeout after it began, and not
/// before; the leader, which sent no `TimeoutNow`, keeps leading and takes proposals again. One
/// that did send `TimeoutNow` steps down as it gives up (its read lease is void for the term).
#[test]
fn a_leadership_transfer_is_given_up_at_its_deadline_and_not_before() {
    let command = || vec![Bytes::from_static(b"c")];
    let acked = || answer(3, AppendResult::Accepted { match_index: 6 });
    let mut leader = with_log(2, 5, 5);
    let start = later(1);
    elect(&mut leader, start);
    leader.step(start, 3, acked());
    settle(&mut leader, start);
    events(&mut leader);
    assert_eq!(leader.transfer_leadership(start, 2), Ok(()));
    let config = leader.config().clone();
    let deadline = start + config.election_timeout_min;
    let mut at = start;
    while at + config.heartbeat_interval < deadline {
        at = at + config.heartbeat_interval;
        leader.step(at, 3, acked());
        leader.handle_timeout(at);
        settle(&mut leader, at);
        assert_eq!(events(&mut leader), vec![], "at {at}");
        assert_eq!(
            leader.propose(at, 1, command()),
            Err(ProposeError::Transferring { to: 2 })
        );
    }
    leader.step(deadline, 3, acked());
    leader.handle_timeout(deadline);
    settle(&mut leader, deadline);
    assert_eq!(
        events(&mut leader),
        vec![RaftEvent::TransferAborted { term: 3, to: 2 }]
    );
    assert_eq!(leader.counters().transfers_aborted, 1);
    assert_eq!(leader.status().role, Role::Leader);
    assert!(leader.propose(deadline, 1, command()).is_ok());

    // Node 2 caught up and was sent `TimeoutNow`, and never took over.
    let mut leader = with_log(2, 5, 5);
    elect(&mut leader, start);
    leader.step(start, 3, acked());
    leader.step(start, 2, acked());
    settle(&mut leader, start);
    assert_eq!(leader.transfer_leadership(start, 2), Ok(()));
    let sent = settle(&mut leader, start);
    assert!(
        sent.iter().any(|m| matches!(m, Message::TimeoutNow { .. })),
        "{sent:?}"
    );
    leader.step(deadline, 3, acked());
    leader.handle_timeout(deadline);
    assert_eq!(leader.status().role, Role::Follower);
    assert_eq!(leader.counters().transfers_aborted, 1);
}

/// Node 1 of three with `config`, leader of term 2 from `later(1)`, that has committed its
/// own entry with node 2's acknowledgement; no heartbeat answered yet.
fn committed_leader(config: Config) -> Replica {
    let recovered = Recovered {
        hard_state: HardState {
            term: 1,
            vote: None,
            commit: 2,
        },
        snapshot: None,
        entries: (1..=2).map(|i| entry(i, 1)).collect(),
    };
    let mut leader = Replica::new(config, recovered, 7, Instant::ZERO);
    let now = later(1);
    elect(&mut leader, now);
    let last = leader.status().last_index;
    leader.step(
        now,
        2,
        answer(2, AppendResult::Accepted { match_index: last }),
    );
    settle(&mut leader, now);
    assert_eq!(leader.status().commit_index, last);
    leader
}

fn heartbeat_answer(context: Instant) -> Message {
    Message::HeartbeatResponse {
        term: 2,
        context: context.as_micros(),
    }
}

/// Found by mutation testing (`read_lease`'s `now < context + lease` as `<=`): in a group of
/// three, one follower's answer to a heartbeat sent at `t` gives the leader its read lease from then until
/// `t` plus four fifths of an election timeout, and not a microsecond longer; without an answer
/// it has none.
#[test]
fn one_followers_heartbeat_answer_gives_a_leader_of_three_its_lease_for_four_fifths_of_a_timeout() {
    let mut leader = committed_leader(Config::new(1, 1, vec![1, 2, 3]));
    let sent = later(1) + Duration::from_millis(10);
    assert!(!leader.read_lease(sent), "no answer yet");
    let now = sent + Duration::from_millis(1);
    leader.step(now, 2, heartbeat_answer(sent));
    settle(&mut leader, now);
    let timeout = leader.config().election_timeout_min;
    let lease = timeout - timeout / 5;
    assert_eq!(lease, Duration::from_millis(120));
    assert!(leader.read_lease(now));
    assert!(leader.read_lease(sent + lease - Duration::from_micros(1)));
    assert!(
        !leader.read_lease(sent + lease),
        "the lease ends at t + lease"
    );
}

/// Found by mutation testing (`read_lease`'s `role != Leader || !check_quorum` as `&&`):
/// without CheckQuorum followers promise nothing (they vote whenever asked), so a leader holds
/// no read lease however recently they answered.
#[test]
fn a_leader_without_check_quorum_holds_no_read_lease() {
    let mut config = Config::new(1, 1, vec![1, 2, 3]);
    config.check_quorum = false;
    let mut leader = committed_leader(config);
    let now = later(1) + Duration::from_millis(10);
    leader.step(now, 2, heartbeat_answer(now));
    leader.step(now, 3, heartbeat_answer(now));
    settle(&mut leader, now);
    assert!(!leader.read_lease(now));
}

/// Found by mutation testing (`read_lease`'s filter `is_voter && !votes_lost` as `||`): a
/// follower's earlier answer counts for no read lease once it says its votes were lost (its
/// disk was wiped: it may not remember the promise).
#[test]
fn a_followers_answer_counts_for_no_lease_once_it_says_its_votes_were_lost() {
    let mut leader = committed_leader(Config::new(1, 1, vec![1, 2, 3]));
    let now = later(1) + Duration::from_millis(10);
    leader.step(now, 2, heartbeat_answer(now));
    settle(&mut leader, now);
    assert!(leader.read_lease(now));
    let last = leader.status().last_index;
    leader.step(now, 2, wiped_ack_at(last));
    settle(&mut leader, now);
    assert!(!leader.read_lease(now));
}

/// Found by mutation testing (`in_lease`'s `now < started_at + election_timeout_min` as `==`
/// or `<=`, or with `-`): a replica keeps the promise it may have made before a restart, so it
/// ignores vote requests of newer terms for an election timeout after it starts, and no
/// longer.
#[test]
fn a_restarted_replica_ignores_vote_requests_for_an_election_timeout_after_it_starts() {
    let mut replica = recovered(3, 2, None);
    let timeout = replica.config().election_timeout_min;
    let soon = Instant::ZERO + timeout - Duration::from_millis(1);
    replica.step(soon, 3, vote_for(4));
    assert_eq!(settle(&mut replica, soon), vec![]);
    assert_eq!(replica.status().term, 3);
    let after = Instant::ZERO + timeout;
    replica.step(after, 3, vote_for(4));
    assert_eq!(
        vote_responses(&settle(&mut replica, after)),
        vec![(4, true)]
    );
}

/// Found by mutation testing (`handle_heartbeat_response`'s `context > 0 && !votes_lost` with
/// `||`, or `>` as `>=`; the other half pins `>` as `==` and the `!` deleted, caught): for
/// CheckQuorum, a follower that answers only heartbeats keeps its leader in power if its
/// answers carry a promise (a context), and not if they carry none (a wiped follower's 0).
#[test]
fn heartbeat_answers_keep_a_leader_in_power_only_if_they_carry_a_promise() {
    for promise in [true, false] {
        let mut leader = committed_leader(Config::new(1, 1, vec![1, 2, 3]));
        for ms in (1_050..1_600).step_by(50) {
            let at = Instant::ZERO + Duration::from_millis(ms);
            let context = if promise { at.as_micros() } else { 0 };
            leader.step(at, 2, Message::HeartbeatResponse { term: 2, context });
            leader.handle_timeout(at);
            settle(&mut leader, at);
        }
        assert_eq!(leader.status().role == Role::Leader, promise);
    }
}

/// Found by mutation testing (`wait_heartbeats > 0` as `==` or `<`): an unanswered snapshot
/// chunk goes again only once `snapshot_resend_heartbeats` heartbeats were answered since it
/// went (the follower may be busy syncing), not at the first.
#[test]
fn an_unanswered_snapshot_chunk_goes_again_only_after_its_heartbeats_of_wait() {
    let (mut leader, _) = leader_sending_snapshot(1_000);
    let wait = leader.config().snapshot_resend_heartbeats;
    let now = later(1);
    for _ in 0..wait {
        leader.step(now, 2, heartbeat_answer(now));
        assert_eq!(chunk_offsets(&settle(&mut leader, now)), Vec::<u64>::new());
    }
    leader.step(now, 2, heartbeat_answer(now));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), vec![0]);
}

/// Written for a mutant the time-boxed mutation run did not reach (`match_index < last_index`
/// as `<=`, checked by hand): a heartbeat answer from a follower that holds the whole log draws
/// no Append.
#[test]
fn a_caught_up_followers_heartbeat_answer_draws_no_append() {
    let mut leader = committed_leader(Config::new(1, 1, vec![1, 2, 3]));
    let now = later(1) + Duration::from_millis(10);
    leader.step(now, 2, heartbeat_answer(now));
    assert_eq!(appends(&settle(&mut leader, now)), vec![]);
}

/// Written for mutants the time-boxed mutation run did not reach (`match_index < last_index`
/// as `==`, `inflight.len() >= window` as `<`, checked by hand): a heartbeat answer from a
/// follower behind the leader's log, whose window of Appends is full (one may have been lost),
/// makes room for one more and sends it.
#[test]
fn a_lagging_followers_heartbeat_answer_sends_an_append_despite_a_full_window() {
    let mut config = Config::new(1, 1, vec![1, 2, 3]);
    config.inflight_appends_max = 1;
    let mut leader = committed_leader(config);
    let now = later(1) + Duration::from_millis(10);
    let command = || vec![Bytes::from_static(b"c")];
    assert!(leader.propose(now, 1, command()).is_ok());
    let first = appends(&settle(&mut leader, now));
    assert!(leader.propose(now, 2, command()).is_ok());
    let second = appends(&settle(&mut leader, now));
    let last = leader.status().last_index;
    assert!(first.contains(&(last - 2, last - 1)), "{first:?}");
    assert!(
        !second.contains(&(last - 1, last)),
        "the window is full: {second:?}"
    );
    leader.step(now, 2, heartbeat_answer(now));
    assert_eq!(appends(&settle(&mut leader, now)), vec![(last - 1, last)]);
}

/// Node 1 of three, leader of term 2 using transfer images, holding only a snapshot of
/// `bytes` bytes at index 10: node 2 needs it, the leader asks for its transfer image, is
/// given it and sends its first 64-byte chunk.
fn leader_sending_a_transfer_image(bytes: usize) -> Replica {
    let (mut leader, now) = leader_holding_only_a_snapshot(bytes, true);
    leader.step(now, 2, answer(2, rejection(10, 0, 0)));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), Vec::<u64>::new());
    assert_eq!(leader.poll_transfer_wanted(), Some(10));
    let image = leader.snapshot().cloned().expect("a snapshot");
    leader.set_transfer(image);
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), vec![0]);
    leader
}

/// Found by mutation testing (the guard that drops the transfer image, `is_some() &&
/// !any(Snapshot)`, as `||` or without its `!`): a heartbeat answer keeps the image while a
/// follower is still being sent it, so its next chunk goes at once, without asking the driver
/// for a new image.
#[test]
fn a_transfer_image_is_kept_while_a_follower_is_sent_it() {
    let mut leader = leader_sending_a_transfer_image(1_000);
    let now = later(1);
    leader.step(now, 3, heartbeat_answer(now));
    leader.step(now, 2, heartbeat_answer(now));
    settle(&mut leader, now);
    leader.step(now, 2, received(64));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), vec![64]);
    assert_eq!(leader.poll_transfer_wanted(), None);
}

/// Found by mutation testing (`any(|p| p.state == Snapshot)` as `!=`): once no follower is
/// sent the transfer image, the next heartbeat answer drops it (it may hold a whole broker's
/// messages), and a follower that needs the snapshot again waits for a new one.
#[test]
fn a_transfer_image_is_dropped_once_no_follower_is_sent_it() {
    let mut leader = leader_sending_a_transfer_image(64);
    let now = later(1);
    leader.step(now, 2, received(64));
    settle(&mut leader, now);
    leader.step(
        now,
        2,
        answer(2, AppendResult::Accepted { match_index: 10 }),
    );
    settle(&mut leader, now);
    leader.step(now, 2, heartbeat_answer(now));
    settle(&mut leader, now);
    let damaged = AppendResult::RejectedDamaged {
        rejected_index: 10,
        hint_index: 0,
        hint_term: 0,
    };
    leader.step(now, 2, answer(2, damaged));
    assert_eq!(chunk_offsets(&settle(&mut leader, now)), Vec::<u64>::new());
    assert_eq!(leader.poll_transfer_wanted(), Some(10));
}

/// A chunk from node 2, leader of term 2, of the snapshot at `index` (of term 1), `total`
/// bytes long: `data` at `offset`.
fn snapshot_chunk(index: Index, offset: u64, total: u64, data: &[u8]) -> Message {
    Message::InstallSnapshot {
        term: 2,
        index,
        snapshot_term: 1,
        offset,
        total,
        chunk: Bytes::copy_from_slice(data),
        membership: None,
    }
}

/// The snapshot answers in `sent` as (index, received).
fn snapshot_answers(sent: &[Message]) -> Vec<(Index, u64)> {
    sent.iter()
        .filter_map(|m| match m {
            Message::SnapshotResponse {
                index, received, ..
            } => Some((*index, *received)),
            _ => None,
        })
        .collect()
}

/// Found by mutation testing (`handle_snapshot_chunk`'s `offset == held && fits` as `||`): a
/// follower takes a chunk only at the offset it has reached and only if it ends within the
/// snapshot's size; a copy of a chunk it holds, one past a lost one, or one running past the
/// end changes nothing, and the snapshot installed is exactly the leader's.
#[test]
fn a_follower_takes_a_snapshot_chunk_only_at_the_offset_it_has_reached_and_within_the_size() {
    let data: Vec<u8> = (0..192).collect();
    let mut follower = recovered(1, 0, None);
    let now = later(1);
    let answers = |follower: &mut Replica, offset: u64, chunk: &[u8]| {
        follower.step(now, 2, snapshot_chunk(10, offset, 192, chunk));
        snapshot_answers(&settle(follower, now))
    };
    assert_eq!(answers(&mut follower, 0, &data[..64]), vec![(10, 64)]);
    assert_eq!(
        answers(&mut follower, 0, &data[..64]),
        vec![(10, 64)],
        "a copy"
    );
    assert_eq!(
        answers(&mut follower, 128, &data[128..]),
        vec![(10, 64)],
        "ahead"
    );
    let too_long = [data[64..].to_vec(), vec![0; 64]].concat();
    assert_eq!(
        answers(&mut follower, 64, &too_long),
        vec![(10, 64)],
        "past the end"
    );
    assert_eq!(answers(&mut follower, 64, &data[64..128]), vec![(10, 128)]);
    assert_eq!(follower.poll_restore(), None);
    follower.step(now, 2, snapshot_chunk(10, 128, 192, &data[128..]));
    settle(&mut follower, now);
    let installed = follower
        .poll_restore()
        .expect("the whole snapshot is installed");
    assert_eq!((installed.index, installed.data), (10, Bytes::from(data)));
}

/// Found by mutation testing (`handle_snapshot_chunk`'s guard that keeps the bytes received,
/// `incoming.index == index && incoming.term == term && incoming.total == total`, as `true`,
/// or with either `&&` as `||`): a follower holding part of one snapshot drops it when the
/// leader starts over with a newer one, even of the same term and size, instead of finishing
/// the newer one on the older one's bytes.
#[test]
fn a_partly_received_snapshot_is_dropped_for_a_newer_one_of_the_same_term_and_size() {
    let older = [1u8; 128];
    let newer: Vec<u8> = (0..128).collect();
    let mut follower = recovered(1, 0, None);
    let now = later(1);
    follower.step(now, 2, snapshot_chunk(10, 0, 128, &older[..64]));
    assert_eq!(
        snapshot_answers(&settle(&mut follower, now)),
        vec![(10, 64)]
    );
    // The leader compacted further meanwhile and sends its newer snapshot from the start.
    follower.step(now, 2, snapshot_chunk(12, 0, 128, &newer[..64]));
    assert_eq!(
        snapshot_answers(&settle(&mut follower, now)),
        vec![(12, 64)]
    );
    follower.step(now, 2, snapshot_chunk(12, 64, 128, &newer[64..]));
    settle(&mut follower, now);
    let installed = follower
        .poll_restore()
        .expect("the newer snapshot is installed");
    assert_eq!((installed.index, installed.data), (12, Bytes::from(newer)));
}

/// The snapshot chunks in `sent` as (index, offset).
fn chunk_places(sent: &[Message]) -> Vec<(Index, u64)> {
    sent.iter()
        .filter_map(|m| match m {
            Message::InstallSnapshot { index, offset, .. } => Some((*index, *offset)),
            _ => None,
        })
        .collect()
}

/// Node 3 acknowledges the leader's whole log, which the driver applies and compacts into a
/// snapshot of `bytes` bytes; returns the new snapshot's index.
fn compact_the_whole_log(leader: &mut Replica, now: Instant, bytes: usize) -> Index {
    let last = leader.status().last_index;
    leader.step(
        now,
        3,
        answer(2, AppendResult::Accepted { match_index: last }),
    );
    settle(leader, now);
    while leader.poll_committed().is_some() {}
    assert_eq!(leader.compact(last, Bytes::from(vec![9u8; bytes])), Ok(()));
    last
}

/// Found by mutation testing (`send_snapshot_chunk`'s `state != Snapshot || snapshot.index !=
/// snapshot.index` and `handle_snapshot_response`'s same test, each with `||` as `&&`): a
/// leader that compacts further while it sends a follower a snapshot starts the transfer over
/// with the newer snapshot, from its first byte, and a late answer about the older one moves
/// the new transfer nowhere.
#[test]
fn a_transfer_starts_over_with_a_newer_snapshot_and_ignores_answers_about_the_older() {
    let (mut leader, _) = leader_sending_snapshot(1_000);
    let now = later(1);
    let index = compact_the_whole_log(&mut leader, now, 1_000);
    assert!(index > 10);
    leader.step(now, 2, received(64));
    assert_eq!(chunk_places(&settle(&mut leader, now)), vec![(index, 0)]);
    leader.step(now, 2, received(128));
    assert_eq!(chunk_places(&settle(&mut leader, now)), vec![]);
    let answer = Message::SnapshotResponse {
        term: 2,
        index,
        received: 64,
    };
    leader.step(now, 2, answer);
    assert_eq!(chunk_places(&settle(&mut leader, now)), vec![(index, 64)]);
}

/// Found by mutation testing (`send_snapshot_chunk`'s guard `image.index == snapshot.index` as
/// `true`): once the leader compacts further, the transfer image of its older snapshot is not
/// sent for the newer one; the leader asks for the newer one's image and sends that.
#[test]
fn a_transfer_image_of_an_older_snapshot_is_not_sent_for_a_newer_one() {
    let mut leader = leader_sending_a_transfer_image(1_000);
    let now = later(1);
    let index = compact_the_whole_log(&mut leader, now, 1_000);
    leader.step(now, 2, received(64));
    assert_eq!(chunk_places(&settle(&mut leader, now)), vec![]);
    assert_eq!(leader.poll_transfer_wanted(), Some(index));
    let image = leader.snapshot().cloned().expect("a snapshot");
    leader.set_transfer(image);
    assert_eq!(chunk_places(&settle(&mut leader, now)), vec![(index, 0)]);
}
