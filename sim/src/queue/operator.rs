//! The queue workload's operator: in the seeds whose swarm draws it, it grows, shrinks and
//! replaces the cluster while the faults run, through the requests `holdfast node add`,
//! `node remove` and `node replace` send (`shell/src/admin.rs`): `AddNode` records a spare
//! node in the metadata group's node table, `ChangeMembership` adds it to each group as a
//! learner and promotes it once the leader finds it caught up, `TransferLeader` hands a group
//! away from a node about to be removed (sometimes: a leader may also remove itself),
//! `ChangeMembership` removes a node from each group, and `RemoveNode` retires its id.
//!
//! Its changes alternate: add a spare, remove a member (an original node, a damaged one if a
//! fault damaged one, or the node just added), add the other spare, remove another member.
//! An add then a remove is a replacement; groups keep between the initial number of voters and
//! one more, so the faults' bound on damage (a minority of the initial nodes) stays a
//! minority. Where the command line asks each node for its status, the operator reads the
//! leaders' logs from the simulator (a request still goes to a node over the network, is
//! delayed, lost or duplicated, and the node decides); now and then it asks a node that does
//! not lead, or asks for another change while the group's last one is pending, which must be
//! refused. Once the network heals it finishes the change under way and starts no other.

use std::collections::{BTreeSet, VecDeque};

use holdfast_core::node::protocol::{ClientId, Request, RequestId, Response};
use holdfast_core::node::{BrokerNode, METADATA_GROUP};
use holdfast_core::raft::{ConfChange, GroupId, Membership, NodeId, Replica, Role};
use holdfast_core::time::Instant;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Event, QueueWorld};
use crate::checker::Violation;
use crate::kernel::{Phase, ms};

/// The operator's client id (the admin that creates the topic is 1; the others start at 100).
pub(super) const OPERATOR: ClientId = 2;
/// Nodes started beside the initial ones, outside every configuration, for the operator to add.
pub(super) const SPARE_NODES: usize = 2;

#[derive(Clone, Copy, Debug)]
enum Goal {
    /// Record the node, then add it to every group as a learner and promote it.
    Add(NodeId),
    /// Remove a member (chosen when the goal starts) from every group, then retire its id.
    Remove(Option<NodeId>),
}

pub(crate) struct Operator {
    rng: ChaCha8Rng,
    goals: VecDeque<Goal>,
    next_request: RequestId,
    /// This look is a hasty one (see `Event::Operate`).
    hasty: bool,
    /// No goal is judged done before this: a stray change sent while another was pending
    /// may still be on its way, and one that undoes the goal (removing the node being
    /// added) can be accepted once the pending change commits.
    settle_until: Option<Instant>,
}

/// How long a stray change may take to reach a leader and be appended: above the slowest
/// client link (200 ms) plus the longest pause of the leader that holds it (1.5 s).
const STRAY_SETTLE_MS: u64 = 2_000;

impl Operator {
    /// `spares`: the ids of the spare nodes, if this seed changes membership.
    pub(super) fn new(seed: u64, spares: &[NodeId]) -> Operator {
        let goals = spares
            .iter()
            .flat_map(|s| [Goal::Add(*s), Goal::Remove(None)])
            .collect();
        Operator {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6f70_6572_6174_6f72),
            goals,
            next_request: 0,
            hasty: false,
            settle_until: None,
        }
    }

    pub(super) fn enabled(&self) -> bool {
        !self.goals.is_empty()
    }

    /// Whether every change it meant to make is made.
    pub(super) fn idle(&self) -> Result<(), String> {
        match self.goals.front() {
            None => Ok(()),
            Some(goal) => Err(format!("the operator's {goal:?} is not done")),
        }
    }

    fn gap_ms(&mut self) -> u64 {
        self.rng.random_range(50..400)
    }
}

/// `group`'s leader of the highest term among running nodes, and its replica.
fn leader_of(world: &QueueWorld, group: GroupId) -> Option<(NodeId, &Replica)> {
    world
        .k
        .node_ids
        .iter()
        .zip(&world.nodes)
        .filter(|(n, _)| world.host(**n).up)
        .filter_map(|(n, h)| Some((*n, h.broker.as_deref()?.replica(group)?)))
        .filter(|(_, r)| r.status().role == Role::Leader)
        .max_by_key(|(_, r)| r.status().term)
}

impl QueueWorld {
    pub(super) fn start_operator(&mut self) {
        if self.operator.enabled() {
            let at = self.k.now + ms(self.operator.gap_ms());
            self.k.schedule(at, Event::Operate { hasty: false });
        }
    }

    /// One look at the cluster and, if the change under way needs it, one request.
    pub(super) fn operate(&mut self, hasty: bool) -> Result<(), Violation> {
        let Some(goal) = self.operator.goals.front().copied() else {
            return Ok(());
        };
        self.operator.hasty = hasty;
        if !hasty {
            let at = self.k.now + ms(self.operator.gap_ms());
            self.k.schedule(at, Event::Operate { hasty: false });
        }
        let done = match goal {
            Goal::Add(node) => self.operate_add(node),
            Goal::Remove(node) => self.operate_remove(node),
        } && self.operator.settle_until.is_none_or(|t| self.k.now >= t);
        if done {
            let kind = match goal {
                Goal::Add(_) => "node-add",
                Goal::Remove(_) => "node-remove",
            };
            *self.k.stats.faults.entry(kind).or_default() += 1;
            self.k
                .trace
                .record(self.k.now, &[30], || format!("OPERATOR done: {goal:?}"));
            self.operator.goals.pop_front();
            if self.k.phase == Phase::Liveness {
                self.operator.goals.clear();
            }
        }
        Ok(())
    }

    /// The metadata leader's applied node table: who is recorded, who is retired.
    fn node_table(&self) -> Option<(NodeId, BTreeSet<NodeId>, BTreeSet<NodeId>)> {
        let (leader, _) = leader_of(self, METADATA_GROUP)?;
        let table = self
            .node(leader)
            .broker
            .as_deref()
            .map(BrokerNode::node_table)?;
        let recorded = table.iter().map(|r| r.id).collect();
        let removed = table.iter().filter(|r| r.removed).map(|r| r.id).collect();
        Some((leader, recorded, removed))
    }

    /// Groups where `done` does not hold of a committed configuration yet (as their leader
    /// has it): a change counts once it committed, as the command line waits for
    /// `MembershipChanged`; an uncommitted one may still be overwritten by a new leader.
    fn groups_where_not(&self, done: &dyn Fn(&Membership) -> bool) -> Vec<GroupId> {
        self.groups()
            .filter(|g| {
                leader_of(self, *g).is_some_and(|(_, r)| {
                    let (index, latest) = r.latest_membership();
                    !(done(latest) && index <= r.status().commit_index)
                })
            })
            .collect()
    }

    /// Every group has a leader (else no change can be judged done).
    fn all_led(&self) -> bool {
        self.groups().all(|g| leader_of(self, g).is_some())
    }

    fn operate_add(&mut self, node: NodeId) -> bool {
        let Some((meta_leader, recorded, _)) = self.node_table() else {
            return false;
        };
        if !recorded.contains(&node) {
            let request = Request::AddNode {
                id: node,
                client_addr: format!("sim-n{node}:7000"),
                peer_addr: format!("sim-n{node}:7001"),
            };
            self.operator_send(meta_leader, request);
            return false;
        }
        let todo = self.groups_where_not(&|m| m.is_voter(node));
        if todo.is_empty() {
            return self.all_led();
        }
        // Every group at once (the command line goes group by group; nothing needs it to).
        for group in todo {
            let change = match leader_of(self, group) {
                Some((_, r)) if r.latest_membership().1.is_voter(node) => None,
                Some((_, r)) if r.latest_membership().1.learners.contains(&node) => {
                    Some(ConfChange::Promote(node))
                }
                _ => Some(ConfChange::AddLearner(node)),
            };
            self.ask_change(group, change);
        }
        false
    }

    fn operate_remove(&mut self, chosen: Option<NodeId>) -> bool {
        let node = match chosen {
            Some(node) => node,
            None => {
                let Some(node) = self.removal_target() else {
                    return false;
                };
                if let Some(goal) = self.operator.goals.front_mut() {
                    *goal = Goal::Remove(Some(node));
                }
                self.k.trace.record(self.k.now, &[31, node], || {
                    format!("OPERATOR removes n{node}")
                });
                node
            }
        };
        let todo = self.groups_where_not(&|m| !m.contains(node));
        if todo.is_empty() {
            if !self.all_led() {
                return false;
            }
            let Some((meta_leader, _, removed)) = self.node_table() else {
                return false;
            };
            if removed.contains(&node) {
                return true;
            }
            let request = Request::RemoveNode {
                id: node,
                force: false,
            };
            self.operator_send(meta_leader, request);
            return false;
        }
        for group in todo {
            self.remove_from(group, node);
        }
        false
    }

    fn remove_from(&mut self, group: GroupId, node: NodeId) {
        if leader_of(self, group).is_some_and(|(_, r)| !r.latest_membership().1.contains(node)) {
            return self.ask_change(group, None);
        }
        let handover = leader_of(self, group)
            .filter(|(l, _)| *l == node)
            .map(|(l, r)| {
                let others: Vec<NodeId> = r
                    .latest_membership()
                    .1
                    .voters
                    .iter()
                    .copied()
                    .filter(|v| *v != node)
                    .collect();
                (l, others)
            });
        if let Some((leader, others)) = handover
            && !others.is_empty()
            && self.operator.rng.random_bool(0.5)
        {
            // As `holdfast node remove` does: hand the group over first, so it does not wait
            // an election timeout once its leader has left.
            let to = others[self.operator.rng.random_range(0..others.len())];
            self.operator_send(leader, Request::TransferLeader { group, to });
            return;
        }
        self.ask_change(group, Some(ConfChange::Remove(node)));
    }

    /// Whom to remove: a member whose disk a fault damaged if there is one (the replacement
    /// of a node that lost its disk), else any voter of the metadata group.
    fn removal_target(&mut self) -> Option<NodeId> {
        let (_, replica) = leader_of(self, METADATA_GROUP)?;
        let voters: Vec<NodeId> = replica
            .latest_membership()
            .1
            .voters
            .iter()
            .copied()
            .collect();
        let damaged: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|n| {
                self.node(*n)
                    .disks
                    .values()
                    .any(crate::disk::Disk::is_damaged)
            })
            .collect();
        let pool = if damaged.is_empty() { voters } else { damaged };
        if pool.is_empty() {
            return None;
        }
        Some(pool[self.operator.rng.random_range(0..pool.len())])
    }

    /// Asks `group`'s leader for `change` (`None`: the change is made, waiting to commit).
    /// While the group's latest configuration is pending it mostly waits; now and then (in the fault phase) it asks for another change at once,
    /// which the leader must refuse: one that undoes or goes on from the pending one, so that
    /// if the pending one committed before the request arrived, the goal still holds.
    fn ask_change(&mut self, group: GroupId, change: Option<ConfChange>) {
        let Some((leader, replica)) = leader_of(self, group) else {
            return;
        };
        let (index, latest) = replica.latest_membership();
        let (pending, latest) = (index > replica.status().commit_index, latest.clone());
        let mut change = change;
        if pending {
            let stray = self.operator.hasty || self.operator.rng.random_bool(0.2);
            if self.k.phase != Phase::Faults || !stray {
                return;
            }
            let goal = self.operator.goals.front().copied();
            let learner = latest.learners.iter().next().copied();
            change = match (learner, goal) {
                (Some(l), _) if self.operator.rng.random_bool(0.5) => Some(ConfChange::Remove(l)),
                (Some(l), _) => Some(ConfChange::Promote(l)),
                (None, Some(Goal::Add(s))) if latest.is_voter(s) => Some(ConfChange::Remove(s)),
                (None, Some(Goal::Remove(Some(x)))) if !latest.contains(x) => {
                    Some(ConfChange::AddLearner(x))
                }
                _ => None,
            };
            if change.is_some() {
                self.operator.settle_until = Some(self.k.now + ms(STRAY_SETTLE_MS));
            }
        }
        let Some(change) = change else {
            return;
        };
        let request = Request::ChangeMembership {
            group,
            change,
            force: false,
        };
        self.operator_send(leader, request);
        if !pending && self.k.phase == Phase::Faults && self.operator.rng.random_bool(0.15) {
            let at = self.k.now + ms(self.operator.rng.random_range(1..15));
            self.k.schedule(at, Event::Operate { hasty: true });
        }
    }

    /// Sends `request` to `node`, or now and then to another node (which must redirect or
    /// refuse it).
    fn operator_send(&mut self, node: NodeId, request: Request) {
        let node = if self.operator.rng.random_bool(0.1) {
            let all = &self.k.node_ids;
            all[self.operator.rng.random_range(0..all.len())]
        } else {
            node
        };
        self.operator.next_request += 1;
        let id = self.operator.next_request;
        let now = self.k.now;
        self.k.trace.record(now, &[32, node, id], || {
            format!("OPERATOR asks n{node} #{id}: {request:?}")
        });
        self.send_to_node(node, OPERATOR, id, request);
    }

    pub(super) fn operator_response(&mut self, id: RequestId, response: &Response) {
        let now = self.k.now;
        self.k.trace.record(now, &[33, id], || {
            format!("OPERATOR answer #{id}: {response:?}")
        });
    }
}
