//! The leader balancer: each node hands over groups it leads while it leads at least two more
//! than the live node leading fewest, one group per round. Every node decides only about the
//! groups it leads, from its own replicas' view of who leads what, so no coordination is
//! needed; a move always goes from a node with the most to one with at least two fewer, so the
//! spread shrinks with every move and never swings back and forth.

use std::collections::{BTreeMap, BTreeSet};

use crate::raft::{GroupId, NodeId};

/// The group to hand over and to whom, if this node `me` leads too many.
///
/// `leaders`: every group with the leader this node knows of (or none). `live`: nodes heard
/// from lately, `me` included; only they count and receive. `reachable(group, node)`: `node`
/// answered `me` lately as a follower of `group` (a transfer to it can finish).
pub fn pick_transfer(
    me: NodeId,
    leaders: &BTreeMap<GroupId, Option<NodeId>>,
    live: &BTreeSet<NodeId>,
    reachable: impl Fn(GroupId, NodeId) -> bool,
) -> Option<(GroupId, NodeId)> {
    let mut led: BTreeMap<NodeId, usize> = live.iter().map(|n| (*n, 0)).collect();
    for leader in leaders.values().flatten() {
        if let Some(count) = led.get_mut(leader) {
            *count += 1;
        }
    }
    let mine = *led.get(&me)?;
    // Fewest first, lowest id among equals: every node picks the same receivers.
    let mut receivers: Vec<(usize, NodeId)> = led
        .iter()
        .filter(|(node, count)| **node != me && **count + 2 <= mine)
        .map(|(node, count)| (*count, *node))
        .collect();
    receivers.sort_unstable();
    for (_, to) in receivers {
        let group = leaders
            .iter()
            .filter(|(_, leader)| **leader == Some(me))
            .map(|(group, _)| *group)
            .find(|group| reachable(*group, to));
        if let Some(group) = group {
            return Some((group, to));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaders(of: &[(GroupId, NodeId)]) -> BTreeMap<GroupId, Option<NodeId>> {
        of.iter().map(|(g, n)| (*g, Some(*n))).collect()
    }

    fn live(nodes: &[NodeId]) -> BTreeSet<NodeId> {
        nodes.iter().copied().collect()
    }

    #[test]
    fn a_node_leading_two_more_than_another_hands_one_over() {
        let all = leaders(&[(0, 1), (1, 1), (2, 1)]);
        assert_eq!(
            pick_transfer(1, &all, &live(&[1, 2, 3]), |_, _| true),
            Some((0, 2))
        );
        // One apart is balanced enough: moving would only swap who leads more.
        let near = leaders(&[(0, 1), (1, 1), (2, 2)]);
        assert_eq!(
            pick_transfer(1, &near, &live(&[1, 2, 3]), |_, _| true),
            Some((0, 3))
        );
        let even = leaders(&[(0, 1), (1, 2), (2, 3)]);
        for me in 1..=3 {
            assert_eq!(
                pick_transfer(me, &even, &live(&[1, 2, 3]), |_, _| true),
                None
            );
        }
    }

    #[test]
    fn only_live_and_reachable_nodes_receive() {
        let all = leaders(&[(0, 1), (1, 1), (2, 1)]);
        // Node 3 is down: 1 leads 3, node 2 none; it gets one.
        assert_eq!(
            pick_transfer(1, &all, &live(&[1, 2]), |_, _| true),
            Some((0, 2))
        );
        // Node 2 does not answer for group 0: another group goes.
        assert_eq!(
            pick_transfer(1, &all, &live(&[1, 2]), |g, _| g != 0),
            Some((1, 2))
        );
        assert_eq!(pick_transfer(1, &all, &live(&[1, 2]), |_, _| false), None);
        // Alone, there is no one to hand to.
        assert_eq!(pick_transfer(1, &all, &live(&[1]), |_, _| true), None);
    }

    #[test]
    fn repeated_moves_converge_to_a_spread_of_at_most_one() {
        for groups in 1..12u64 {
            for nodes in 1..6u64 {
                let mut who: BTreeMap<GroupId, Option<NodeId>> =
                    (0..groups).map(|g| (g, Some(1))).collect();
                let everyone: BTreeSet<NodeId> = (1..=nodes).collect();
                let mut moves = 0;
                while let Some((group, to)) =
                    (1..=nodes).find_map(|me| pick_transfer(me, &who, &everyone, |_, _| true))
                {
                    who.insert(group, Some(to));
                    moves += 1;
                    assert!(
                        moves <= groups,
                        "{groups} groups on {nodes} nodes do not settle"
                    );
                }
                let mut counts: BTreeMap<NodeId, u64> = everyone.iter().map(|n| (*n, 0)).collect();
                for leader in who.values().flatten() {
                    *counts.entry(*leader).or_default() += 1;
                }
                let (min, max) = (counts.values().min(), counts.values().max());
                assert!(
                    max.zip(min).is_some_and(|(max, min)| max - min <= 1),
                    "{groups} groups on {nodes} nodes: {counts:?}"
                );
            }
        }
    }
}
