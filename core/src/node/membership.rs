//! Consumer groups: who is a member (on the metadata leader) and who holds each queue (on
//! each broker group's leader).
//!
//! **Generations.** The metadata leader keeps each group's live members (soft state, from
//! heartbeats) and allocates the group's queues among them itself. Whenever the allocation
//! changes, the group's generation rises; each member is told its queues and the generation.
//! A generation is `metadata term << 32 | counter`: a new metadata leader has a higher term,
//! so every generation it hands out is newer than any its predecessors did, and within a
//! term there is one leader, which gives each generation exactly one allocation. So no two
//! members own one queue at one generation, and the membership need not go through the log
//! (which would cost an entry per heartbeat); fencing by the term is enough, because the
//! brokers, not the metadata group, enforce who is served.
//!
//! **Leases.** A broker group's log records, per (consumer group, queue), who holds the queue
//! and the highest generation it was claimed at ([`crate::broker::Lease`]). A member's first
//! pull of a queue claims it (a `Claim` command); a pull from an older generation than the
//! queue's is answered `Revoked`; a newer generation takes a held queue over only once the
//! holder released it or the holder's lease expired (it was not heard from for the session
//! timeout). Meanwhile the claimant's pull waits, and the holder's next pull is answered
//! `Revoked`, so it confirms its answers and releases. Acks and nacks are applied only from
//! the holder, so they are bound to the delivery. When the lease expired is soft state on the
//! broker leader; a new leader counts every holder as heard from when it took office, which
//! only ever makes a takeover later, never earlier.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::broker::{Holder, Lease, QueueId};
use crate::client::AllocationStrategy;
use crate::limits::{CONSUMER_GROUPS_MAX, MEMBER_BYTES_MAX, MEMBERS_PER_GROUP_MAX};
use crate::node::protocol::Response;
use crate::raft::{GroupId, Term};
use crate::time::Instant;

struct Member {
    seen: Instant,
    topic: String,
}

#[derive(Default)]
struct GroupMembers {
    members: BTreeMap<String, Member>,
    generation: u64,
    assignment: BTreeMap<String, Vec<(GroupId, QueueId)>>,
}

/// The metadata leader's view of consumer groups.
#[derive(Default)]
pub(super) struct Membership {
    /// The metadata term these generations belong to.
    term: Term,
    counter: u32,
    groups: BTreeMap<String, GroupMembers>,
    /// When every group was last swept of expired members: groups whose members all went
    /// silent still count against `CONSUMER_GROUPS_MAX` until swept, and a sweep is a pass over
    /// every group, so at most one per session.
    swept_at: Option<Instant>,
}

/// Each queue of a topic with the broker group that holds it; `None`: no such topic.
pub(super) type Placement<'a> = &'a dyn Fn(&str) -> Option<Vec<(QueueId, GroupId)>>;

/// What the metadata leader needs to know to allocate a group's queues.
pub(super) struct Allocation<'a> {
    pub strategy: AllocationStrategy,
    pub session_ms: u64,
    /// Delay levels: one retry queue per level per broker group.
    pub retry_levels: u32,
    pub placement: Placement<'a>,
}

impl Membership {
    /// `member` of `group` (consuming `topic`) is alive, or, with `None`, left.
    pub(super) fn heartbeat(
        &mut self,
        now: Instant,
        term: Term,
        group: &str,
        member: &str,
        topic: Option<&str>,
        how: &Allocation<'_>,
    ) -> Response {
        if term != self.term {
            // A new leader (or a new term of ours): generations start above the old ones.
            *self = Membership {
                term,
                ..Membership::default()
            };
        }
        if member.len() > MEMBER_BYTES_MAX {
            return refused(format!(
                "a member id of {} bytes exceeds the maximum of {MEMBER_BYTES_MAX}",
                member.len()
            ));
        }
        let session = Duration::from_millis(how.session_ms);
        if topic.is_some()
            && !self.groups.contains_key(group)
            && self.groups.len() >= CONSUMER_GROUPS_MAX
            && self
                .swept_at
                .is_none_or(|at| now.saturating_since(at) >= session)
        {
            self.swept_at = Some(now);
            self.groups.retain(|_, g| {
                g.members
                    .retain(|_, m| now.saturating_since(m.seen) < session);
                !g.members.is_empty()
            });
        }
        if topic.is_some()
            && !self.groups.contains_key(group)
            && self.groups.len() >= CONSUMER_GROUPS_MAX
        {
            return refused(format!(
                "the cluster tracks the most consumer groups it may ({CONSUMER_GROUPS_MAX})"
            ));
        }
        let entry = self.groups.entry(group.to_string()).or_default();
        entry
            .members
            .retain(|_, m| now.saturating_since(m.seen) < session);
        match topic {
            Some(topic) => {
                if !entry.members.contains_key(member)
                    && entry.members.len() >= MEMBERS_PER_GROUP_MAX
                {
                    return refused(format!(
                        "group {group} has the most members it may ({MEMBERS_PER_GROUP_MAX})"
                    ));
                }
                let topic = topic.to_string();
                entry
                    .members
                    .insert(member.to_string(), Member { seen: now, topic });
            }
            None => {
                entry.members.remove(member);
            }
        }
        let assignment = allocate(group, &entry.members, how);
        if assignment != entry.assignment || entry.generation == 0 {
            if self.counter == u32::MAX {
                return refused("this metadata term ran out of generations".into());
            }
            self.counter += 1;
            entry.generation = (term << 32) | u64::from(self.counter);
            entry.assignment = assignment;
        }
        let response = match topic {
            Some(_) => Response::Assignment {
                group: group.to_string(),
                generation: entry.generation,
                members: entry.members.len() as u32,
                queues: entry.assignment.get(member).cloned().unwrap_or_default(),
            },
            None => Response::Left {
                group: group.to_string(),
            },
        };
        if entry.members.is_empty() {
            self.groups.remove(group);
        }
        response
    }
}

fn refused(reason: String) -> Response {
    Response::Refused { reason }
}

/// Each member's queues: every topic's queues among the members consuming it, and the group's
/// retry queues (in every broker group holding one of those topics) among all members, as two
/// separate allocations, so the retry queues cannot crowd anyone out of the topic's. The retry
/// allocation counts members from the other end, so the members short of a topic queue are
/// the first to get a spare retry queue.
fn allocate(
    group: &str,
    members: &BTreeMap<String, Member>,
    how: &Allocation<'_>,
) -> BTreeMap<String, Vec<(GroupId, QueueId)>> {
    let mut out: BTreeMap<String, Vec<(GroupId, QueueId)>> = BTreeMap::new();
    let mut topics: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, m) in members {
        topics.entry(m.topic.as_ref()).or_default().push(name);
    }
    let mut brokers: Vec<GroupId> = Vec::new();
    for (topic, names) in &topics {
        let Some(placement) = (how.placement)(topic) else {
            continue;
        };
        let queues: Vec<(GroupId, QueueId)> = placement.into_iter().map(|(q, g)| (g, q)).collect();
        brokers.extend(queues.iter().map(|(g, _)| *g));
        for (me, name) in names.iter().enumerate() {
            let share = how.strategy.share(&queues, names.len(), me);
            out.entry(name.to_string()).or_default().extend(share);
        }
    }
    brokers.sort_unstable();
    brokers.dedup();
    let retry: Vec<(GroupId, QueueId)> = brokers
        .iter()
        .flat_map(|b| (0..how.retry_levels).map(move |level| (*b, QueueId::retry(group, level))))
        .collect();
    let names: Vec<&String> = members.keys().collect();
    for (me, name) in names.iter().enumerate() {
        let share = how
            .strategy
            .share(&retry, names.len(), names.len() - 1 - me);
        out.entry(name.to_string()).or_default().extend(share);
    }
    for queues in out.values_mut() {
        queues.sort();
    }
    out.retain(|_, queues| !queues.is_empty());
    out
}

/// What a broker leader does with a pull of a consumer group's queue.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PullVerdict {
    Serve,
    /// Serve, and record the holder's newer generation in the log.
    ServeAndBump,
    Revoked(String),
    /// Propose a claim and wait for it to apply: a takeover from the holder named, whose lease
    /// expired, if the queue is held.
    Claim {
        takeover: Option<Holder>,
    },
    /// Someone else holds the queue: wait until it releases or `until`, when its lease ends.
    Wait {
        until: Instant,
    },
}

type LeaseKey = (GroupId, String, QueueId);

/// The broker leader's soft state about leases: when each holder was last heard from, who
/// waits for each queue, which claims are in the log's pipeline.
#[derive(Default)]
pub(super) struct LeaseClocks {
    /// Per broker group this node leads: the term and when it noticed it leads.
    led: BTreeMap<GroupId, (Term, Instant)>,
    seen: BTreeMap<LeaseKey, Instant>,
    /// Who waits for each queue, at what generation: a holder at an older generation is told
    /// to let go. (One at the same or a newer generation keeps it: the waiter is the stale
    /// one. A takeover after the holder's lease expired is [`LeaseClocks::ousting`]'s.)
    pending: BTreeMap<LeaseKey, (String, u64)>,
    /// The claim this leader proposed last for each queue: member, generation, tenure and
    /// when (proposed again only for another of them, or once it is overdue).
    claiming: BTreeMap<LeaseKey, (String, u64, u64, Instant)>,
    /// The holder a takeover proposed by this leader (in this term) ousts once it applies:
    /// that holder is not served while its lease stays as the takeover found it, whoever
    /// else comes to wait meanwhile. Dropped once the lease changes (the takeover applied, or
    /// was refused because someone else got there first).
    ousting: BTreeMap<LeaseKey, Holder>,
    /// How far each queue was handed out to its group: below it, a delivery is a repeat.
    delivered: BTreeMap<LeaseKey, u64>,
}

/// A claim is proposed again if it has not applied after this long (its entry was lost).
const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// Soft entries a broker leader keeps per table, so clients cannot grow it without bound.
const CLOCK_ENTRIES_MAX: usize = crate::limits::LEASES_PER_BROKER_GROUP_MAX;

pub(super) struct PullAsk<'a> {
    pub broker: GroupId,
    pub group: &'a str,
    pub queue: &'a QueueId,
    pub member: &'a str,
    pub generation: u64,
    pub tenure: u64,
    pub session_ms: u64,
    pub serve_any: bool,
    pub hand_over_early: bool,
}

impl LeaseClocks {
    /// Forgets everything about groups this node no longer leads (or leads in a new term).
    pub(super) fn leading(&mut self, broker: GroupId, term: Option<Term>, now: Instant) {
        match term {
            Some(term) if self.led.get(&broker).is_some_and(|(t, _)| *t == term) => {}
            Some(term) => {
                self.forget(broker);
                self.led.insert(broker, (term, now));
            }
            None => {
                if self.led.remove(&broker).is_some() {
                    self.forget(broker);
                }
            }
        }
    }

    fn forget(&mut self, broker: GroupId) {
        self.seen.retain(|(b, _, _), _| *b != broker);
        self.pending.retain(|(b, _, _), _| *b != broker);
        self.claiming.retain(|(b, _, _), _| *b != broker);
        self.ousting.retain(|(b, _, _), _| *b != broker);
        self.delivered.retain(|(b, _, _), _| *b != broker);
    }

    /// A pull handed out a queue's messages up to `next_offset`: returns how far it had been
    /// handed out before.
    pub(super) fn delivered(
        &mut self,
        broker: GroupId,
        group: &str,
        queue: &QueueId,
        next_offset: u64,
    ) -> u64 {
        let key = (broker, group.to_string(), queue.clone());
        let before = self.delivered.get(&key).copied().unwrap_or(0);
        if self.delivered.len() < CLOCK_ENTRIES_MAX || self.delivered.contains_key(&key) {
            self.delivered.insert(key, before.max(next_offset));
        }
        before
    }

    /// Whether the holder of `queue` for `group` has gone unheard for a member session, as
    /// a takeover judges it (a leader new in office gives every holder a session first).
    pub(super) fn holder_silent(
        &self,
        broker: GroupId,
        group: &str,
        queue: &QueueId,
        session_ms: u64,
        now: Instant,
    ) -> bool {
        let since_led = self.led.get(&broker).map_or(now, |(_, at)| *at);
        let key = (broker, group.to_string(), queue.clone());
        let seen = self.seen.get(&key).copied().unwrap_or(since_led);
        now >= seen.max(since_led) + Duration::from_millis(session_ms)
    }

    /// The holder of a queue was heard from.
    pub(super) fn touch(&mut self, broker: GroupId, group: &str, queue: &QueueId, now: Instant) {
        let key = (broker, group.to_string(), queue.clone());
        if self.seen.len() < CLOCK_ENTRIES_MAX || self.seen.contains_key(&key) {
            self.seen.insert(key, now);
        }
    }

    /// Whether a claim for this member and generation is on its way through the log.
    pub(super) fn claim_in_flight(&mut self, ask: &PullAsk<'_>, now: Instant) -> bool {
        let key = (ask.broker, ask.group.to_string(), ask.queue.clone());
        match self.claiming.get(&key) {
            Some((m, g, t, at))
                if m == ask.member
                    && *g == ask.generation
                    && *t == ask.tenure
                    && now.saturating_since(*at) < CLAIM_RETRY =>
            {
                true
            }
            _ => {
                if self.claiming.len() < CLOCK_ENTRIES_MAX || self.claiming.contains_key(&key) {
                    self.claiming.insert(
                        key,
                        (ask.member.to_string(), ask.generation, ask.tenure, now),
                    );
                }
                false
            }
        }
    }

    /// Decides a pull from `ask.member` at `ask.generation`, given the queue's applied lease.
    pub(super) fn decide(
        &mut self,
        ask: &PullAsk<'_>,
        lease: Option<&Lease>,
        now: Instant,
    ) -> PullVerdict {
        let key = (ask.broker, ask.group.to_string(), ask.queue.clone());
        let lease = lease.cloned().unwrap_or_default();
        if ask.serve_any {
            return PullVerdict::Serve; // the planted bug: no fencing at all
        }
        if ask.generation < lease.generation {
            return PullVerdict::Revoked(format!(
                "generation {} is older than {}'s generation {}",
                ask.generation, ask.queue, lease.generation
            ));
        }
        if let Some(ousted) = self.ousting.get(&key) {
            let unchanged = lease.owner.as_deref() == Some(ousted.member.as_str())
                && lease.generation == ousted.generation;
            if !unchanged {
                self.ousting.remove(&key);
            } else if ousted.member == ask.member {
                return PullVerdict::Revoked(format!(
                    "{}'s lease of {} at generation {} expired and is being taken over",
                    ousted.member, ask.queue, ousted.generation
                ));
            }
        }
        match &lease.owner {
            None => {
                self.pending.remove(&key);
                PullVerdict::Claim { takeover: None }
            }
            Some(owner) if owner == ask.member => {
                self.touch(ask.broker, ask.group, ask.queue, now);
                if let Some((next, at)) = self.pending.get(&key) {
                    // The one that waited holds it now; otherwise the holder must let go.
                    if next != ask.member && *at > ask.generation {
                        return PullVerdict::Revoked(format!(
                            "{} goes to {next} at generation {at}",
                            ask.queue
                        ));
                    }
                    self.pending.remove(&key);
                }
                // A newer tenure is recorded too, so a late release of an earlier one cannot
                // end it.
                if ask.generation > lease.generation || ask.tenure > lease.tenure {
                    PullVerdict::ServeAndBump
                } else {
                    PullVerdict::Serve
                }
            }
            Some(owner) => {
                if ask.generation == lease.generation {
                    return PullVerdict::Revoked(format!(
                        "{owner} holds {} at the same generation {}",
                        ask.queue, lease.generation
                    ));
                }
                let since_led = self.led.get(&ask.broker).map_or(now, |(_, at)| *at);
                let seen = self.seen.get(&key).copied().unwrap_or(since_led);
                let until = seen.max(since_led) + Duration::from_millis(ask.session_ms);
                let takeover = now >= until || ask.hand_over_early;
                let newer = self
                    .pending
                    .get(&key)
                    .is_none_or(|(_, at)| *at <= ask.generation);
                if newer
                    && (self.pending.len() < CLOCK_ENTRIES_MAX || self.pending.contains_key(&key))
                {
                    self.pending
                        .insert(key.clone(), (ask.member.to_string(), ask.generation));
                }
                if takeover {
                    let from = Holder {
                        member: owner.clone(),
                        generation: lease.generation,
                    };
                    if self.ousting.len() < CLOCK_ENTRIES_MAX || self.ousting.contains_key(&key) {
                        self.ousting.insert(key, from.clone());
                    } else {
                        // Without a record of the ousting the holder could still be served
                        // while the takeover is on its way: better to wait.
                        return PullVerdict::Wait {
                            until: now + Duration::from_millis(ask.session_ms),
                        };
                    }
                    return PullVerdict::Claim {
                        takeover: Some(from),
                    };
                }
                PullVerdict::Wait { until }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_micros(ms * 1_000)
    }

    fn placement(topic: &str) -> Option<Vec<(QueueId, GroupId)>> {
        (topic == "t").then(|| {
            (0..8)
                .map(|q| (QueueId::new("t", q), 1 + u64::from(q % 2)))
                .collect()
        })
    }

    fn how() -> Allocation<'static> {
        Allocation {
            strategy: AllocationStrategy::Averagely,
            session_ms: 10_000,
            retry_levels: 3,
            placement: &placement,
        }
    }

    fn queues(r: &Response) -> (u64, Vec<(GroupId, QueueId)>) {
        match r {
            Response::Assignment {
                generation, queues, ..
            } => (*generation, queues.clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_member_gets_topic_queues_and_generations_rise_with_changes() {
        let mut m = Membership::default();
        let how = how();
        let (g1, _) = queues(&m.heartbeat(at(0), 3, "g", "a", Some("t"), &how));
        assert_eq!(g1 >> 32, 3, "fenced by the metadata term");
        for name in ["b", "c", "d"] {
            m.heartbeat(at(1), 3, "g", name, Some("t"), &how);
        }
        let mut all = Vec::new();
        let mut generations = Vec::new();
        for name in ["a", "b", "c", "d"] {
            let (g, owned) = queues(&m.heartbeat(at(2), 3, "g", name, Some("t"), &how));
            let topic = owned.iter().filter(|(_, q)| !q.is_retry()).count();
            assert_eq!(topic, 2, "{name} owns {owned:?}");
            generations.push(g);
            all.extend(owned);
        }
        assert!(generations.iter().all(|g| *g == generations[0] && *g > g1));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8 + 2 * 3, "every queue once");
        // Unchanged membership: same generation. A leader of a newer term: a higher one.
        let (same, _) = queues(&m.heartbeat(at(3), 3, "g", "a", Some("t"), &how));
        assert_eq!(same, generations[0]);
        let (newer, _) = queues(&m.heartbeat(at(4), 4, "g", "a", Some("t"), &how));
        assert!(newer > same);
        // A member unheard for the session is gone.
        let (_, owned) = queues(&m.heartbeat(at(20_000), 4, "g", "a", Some("t"), &how));
        assert_eq!(owned.len(), 8 + 6);
        assert!(matches!(
            m.heartbeat(at(20_001), 4, "g", "a", None, &how),
            Response::Left { .. }
        ));
        assert!(m.groups.is_empty(), "an empty group is forgotten");
    }

    fn ask<'a>(queue: &'a QueueId, member: &'a str, generation: u64) -> PullAsk<'a> {
        PullAsk {
            broker: 1,
            group: "g",
            queue,
            member,
            generation,
            tenure: 1,
            session_ms: 1_000,
            serve_any: false,
            hand_over_early: false,
        }
    }

    #[test]
    fn a_held_queue_moves_only_after_release_or_expiry_and_stale_pulls_are_revoked() {
        let q = QueueId::new("t", 0);
        let mut clocks = LeaseClocks::default();
        clocks.leading(1, Some(1), at(0));
        assert_eq!(
            clocks.decide(&ask(&q, "a", 5), None, at(0)),
            PullVerdict::Claim { takeover: None }
        );
        let held = Lease {
            owner: Some("a".into()),
            generation: 5,
            since: 5,
            tenure: 1,
        };
        assert_eq!(
            clocks.decide(&ask(&q, "a", 5), Some(&held), at(10)),
            PullVerdict::Serve
        );
        // b is given the queue at generation 6: it waits while a's lease runs...
        assert_eq!(
            clocks.decide(&ask(&q, "b", 6), Some(&held), at(20)),
            PullVerdict::Wait { until: at(1_010) }
        );
        // ...a is told to let go...
        assert!(matches!(
            clocks.decide(&ask(&q, "a", 5), Some(&held), at(30)),
            PullVerdict::Revoked(_)
        ));
        // ...and once a is silent for the session, b takes over.
        assert_eq!(
            clocks.decide(&ask(&q, "b", 6), Some(&held), at(1_030)),
            PullVerdict::Claim {
                takeover: Some(Holder {
                    member: "a".into(),
                    generation: 5
                })
            }
        );
        let moved = Lease {
            owner: Some("b".into()),
            generation: 6,
            since: 6,
            tenure: 1,
        };
        assert!(matches!(
            clocks.decide(&ask(&q, "a", 5), Some(&moved), at(1_040)),
            PullVerdict::Revoked(_)
        ));
        // A new leader counts the holder as heard from when it took office.
        clocks.leading(1, Some(2), at(5_000));
        assert_eq!(
            clocks.decide(&ask(&q, "c", 7), Some(&moved), at(5_100)),
            PullVerdict::Wait { until: at(6_000) }
        );
    }

    /// Seed 7000164: b's takeover of a's expired lease is on its way when c, given the queue
    /// at a newer generation, comes to wait. a must stay ousted until the takeover applies,
    /// whoever waits meanwhile.
    #[test]
    fn a_holder_being_taken_over_is_not_served_whoever_else_waits() {
        let q = QueueId::new("t", 0);
        let mut clocks = LeaseClocks::default();
        clocks.leading(1, Some(1), at(0));
        let held = Lease {
            owner: Some("a".into()),
            generation: 5,
            since: 5,
            tenure: 1,
        };
        assert_eq!(
            clocks.decide(&ask(&q, "a", 5), Some(&held), at(0)),
            PullVerdict::Serve
        );
        assert!(matches!(
            clocks.decide(&ask(&q, "b", 6), Some(&held), at(1_000)),
            PullVerdict::Claim { takeover: Some(_) }
        ));
        // c waits (a was not silent long in c's view of it: a new waiter, a new clock)...
        clocks.touch(1, "g", &q, at(1_001));
        assert!(matches!(
            clocks.decide(&ask(&q, "c", 7), Some(&held), at(1_002)),
            PullVerdict::Wait { .. }
        ));
        // ...and a, even at a newer generation than c's, is not served while b's takeover of
        // a at generation 5 may still apply.
        assert!(matches!(
            clocks.decide(&ask(&q, "a", 8), Some(&held), at(1_003)),
            PullVerdict::Revoked(_)
        ));
        // Once the takeover applied, the record goes and the new holder is served (at the
        // generation c was given: b's generation 6 would be told to hand over to c).
        let moved = Lease {
            owner: Some("b".into()),
            generation: 6,
            since: 6,
            tenure: 1,
        };
        assert_eq!(
            clocks.decide(&ask(&q, "b", 7), Some(&moved), at(1_004)),
            PullVerdict::ServeAndBump
        );
        assert!(clocks.ousting.is_empty());
    }

    /// Seed 7103028: a waiter at an older generation than the holder's is the stale one; it
    /// must not make the holder let go (the holder would release at its own generation and,
    /// the waiter's claim failing, nobody would consume the queue).
    #[test]
    fn a_stale_waiter_does_not_revoke_a_newer_holder() {
        let q = QueueId::new("t", 0);
        let mut clocks = LeaseClocks::default();
        clocks.leading(1, Some(1), at(0));
        let held = Lease {
            owner: Some("a".into()),
            generation: 9,
            since: 9,
            tenure: 1,
        };
        assert_eq!(
            clocks.decide(&ask(&q, "a", 9), Some(&held), at(0)),
            PullVerdict::Serve
        );
        assert!(matches!(
            clocks.decide(&ask(&q, "b", 8), Some(&held), at(10)),
            PullVerdict::Revoked(_)
        ));
        let older = Lease {
            owner: Some("a".into()),
            generation: 7,
            since: 7,
            tenure: 1,
        };
        assert!(matches!(
            clocks.decide(&ask(&q, "b", 8), Some(&older), at(20)),
            PullVerdict::Wait { .. }
        ));
        // a, at generation 9, is newer than b's 8: it keeps the queue.
        assert_eq!(
            clocks.decide(&ask(&q, "a", 9), Some(&older), at(30)),
            PullVerdict::ServeAndBump
        );
    }
}
