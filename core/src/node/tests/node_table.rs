//! Growing and shrinking a cluster through the node's requests: the node table, single-server
//! changes, the replication factor, and a node that joins with no configuration of its own.

use super::*;
use crate::raft::ConfChange;

/// Asks the leader of `group` (whichever node that is) and returns its answer.
fn ask_leader(cluster: &mut Cluster, group: GroupId, request: Request) -> Response {
    for _ in 0..50 {
        cluster.settle_leaders(&[group]);
        let leader = cluster.leader(group).expect("a leader");
        match cluster.ask(leader, request.clone()) {
            Response::NotLeader { .. } | Response::Unknown => {
                for _ in 0..20 {
                    cluster.step();
                }
            }
            other => return other,
        }
    }
    panic!("group {group} never answered {request:?}");
}

fn change(cluster: &mut Cluster, group: GroupId, change: ConfChange, force: bool) -> Response {
    let request = Request::ChangeMembership {
        group,
        change,
        force,
    };
    // A leader that has not committed an entry of its term yet, or a change still pending,
    // asks for a retry.
    for _ in 0..100 {
        match ask_leader(cluster, group, request.clone()) {
            Response::Refused { reason }
                if reason.contains("retry") || reason.contains("one change at a time") =>
            {
                for _ in 0..20 {
                    cluster.step();
                }
            }
            other => return other,
        }
    }
    panic!("group {group}: {change} never went through");
}

fn refused(response: Response, needle: &str) {
    match response {
        Response::Refused { reason } => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected a refusal about {needle:?}, got {other:?}"),
    }
}

#[test]
fn a_joined_node_is_added_promoted_and_an_original_removed_within_the_replication_factor() {
    let mut cluster = Cluster::new(3, 1);
    let groups = [METADATA_GROUP, 1];
    cluster.settle_leaders(&groups);
    let mut config = NodeConfig::new(4, vec![1, 2, 3], 1);
    config.joined = true;
    let joined = BrokerNode::new(config, BTreeMap::new(), 4, cluster.now);
    cluster.nodes.insert(4, joined);
    for _ in 0..3_000 {
        cluster.step();
    }
    // With no configuration of its own, the newcomer never campaigned.
    for group in groups {
        let status = cluster.nodes[&4].replica(group).expect("replica").status();
        assert_eq!(status.role, Role::Follower, "group {group}: {status:?}");
        assert_eq!(status.term, 0, "group {group}: it never campaigned");
    }

    refused(
        ask_leader(
            &mut cluster,
            1,
            Request::ChangeMembership {
                group: 1,
                change: ConfChange::AddLearner(4),
                force: false,
            },
        ),
        "no address in the node table",
    );
    let version = cluster.nodes[&1].node_table_version();
    let add = Request::AddNode {
        id: 4,
        client_addr: "10.0.0.4:7301".into(),
        peer_addr: "10.0.0.4:7401".into(),
    };
    match ask_leader(&mut cluster, METADATA_GROUP, add.clone()) {
        Response::Nodes { nodes } => assert!(nodes.iter().any(|r| r.id == 4 && !r.removed)),
        other => panic!("{other:?}"),
    }
    // Asked again (a retry after a lost answer): the same table, nothing appended.
    assert!(matches!(
        ask_leader(&mut cluster, METADATA_GROUP, add),
        Response::Nodes { .. }
    ));
    for _ in 0..50 {
        cluster.step();
    }
    for id in 1..=3 {
        let node = &cluster.nodes[&id];
        assert!(node.node_table_version() > version || id != 1);
        assert_eq!(node.node_table().len(), 1, "node {id} applied the record");
    }
    refused(
        ask_leader(
            &mut cluster,
            METADATA_GROUP,
            Request::AddNode {
                id: 4,
                client_addr: "10.0.0.9:7301".into(),
                peer_addr: "10.0.0.9:7401".into(),
            },
        ),
        "remove it first",
    );
    refused(
        ask_leader(
            &mut cluster,
            METADATA_GROUP,
            Request::AddNode {
                id: 2,
                client_addr: "10.0.0.2:7301".into(),
                peer_addr: "10.0.0.2:7401".into(),
            },
        ),
        "first configuration",
    );

    for group in groups {
        match change(&mut cluster, group, ConfChange::AddLearner(4), false) {
            Response::MembershipChanged {
                voters, learners, ..
            } => {
                assert_eq!(voters, vec![1, 2, 3]);
                assert_eq!(learners, vec![4]);
            }
            other => panic!("{other:?}"),
        }
        for _ in 0..200 {
            cluster.step();
        }
        match change(&mut cluster, group, ConfChange::Promote(4), false) {
            Response::MembershipChanged {
                voters, learners, ..
            } => {
                assert_eq!(voters, vec![1, 2, 3, 4]);
                assert!(learners.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
    // Status shows the configuration and, on the leader, each member's progress.
    let leader = cluster.leader(1).expect("leader");
    let Response::Status { groups: status, .. } = cluster.ask(leader, Request::Status) else {
        panic!("no status");
    };
    let broker = status.iter().find(|g| g.group == 1).expect("group 1");
    assert_eq!(broker.voters, vec![1, 2, 3, 4]);
    let matched: Vec<NodeId> = broker.matches.iter().map(|(n, _)| *n).collect();
    assert_eq!(matched.len(), 3, "{:?}", broker.matches);
    assert!(matched.contains(&4));
    for _ in 0..200 {
        cluster.step();
    }
    let leader_applied = cluster.nodes[&leader]
        .replica(1)
        .unwrap()
        .status()
        .applied_index;
    assert_eq!(
        cluster.nodes[&4].replica(1).unwrap().status().applied_index,
        leader_applied,
        "the newcomer holds the group's log"
    );

    // Four voters to three is within the factor; three to two is not, unless forced.
    for group in groups {
        assert!(matches!(
            change(&mut cluster, group, ConfChange::Remove(1), false),
            Response::MembershipChanged { .. }
        ));
    }
    for _ in 0..2_000 {
        cluster.step();
    }
    refused(
        change(&mut cluster, 1, ConfChange::Remove(2), false),
        "below the replication factor 3",
    );
    refused(
        ask_leader(
            &mut cluster,
            METADATA_GROUP,
            Request::RemoveNode {
                id: 2,
                force: false,
            },
        ),
        "still a member",
    );
    match ask_leader(
        &mut cluster,
        METADATA_GROUP,
        Request::RemoveNode {
            id: 1,
            force: false,
        },
    ) {
        Response::Nodes { nodes } => assert!(nodes.iter().any(|r| r.id == 1 && r.removed)),
        other => panic!("{other:?}"),
    }
    // A removed id is never used again.
    refused(
        ask_leader(
            &mut cluster,
            METADATA_GROUP,
            Request::AddNode {
                id: 1,
                client_addr: "10.0.0.1:7301".into(),
                peer_addr: "10.0.0.1:7401".into(),
            },
        ),
        "never used again",
    );
    // The group still serves with its new voters.
    cluster.settle_leaders(&groups);
    for group in groups {
        let leader = cluster.leader(group).expect("leader");
        assert_ne!(leader, 1, "the removed node stepped down");
    }
}

/// A node that joined has no configuration of its own: it learns a group's from the first
/// configuration entry it receives. A snapshot below that entry would record an empty
/// configuration, which no disk reads back (`storage::record`: "has no voter"), so the node
/// restarted from it lost the group. Found by the simulator (queue seed 263, once its operator
/// added nodes): the learner applied the entries before its own `AddLearner` and compacted.
#[test]
fn a_joined_node_compacts_only_where_it_knows_the_configuration() {
    let mut cluster = Cluster::new(3, 1);
    let groups = [METADATA_GROUP, 1];
    cluster.settle_leaders(&groups);
    let mut config = NodeConfig::new(4, vec![1, 2, 3], 1);
    config.joined = true;
    config.snapshot_entries_min = Some(1);
    let joined = BrokerNode::new(config, BTreeMap::new(), 4, cluster.now);
    cluster.nodes.insert(4, joined);
    let add = Request::AddNode {
        id: 4,
        client_addr: "10.0.0.4:7301".into(),
        peer_addr: "10.0.0.4:7401".into(),
    };
    assert!(matches!(
        ask_leader(&mut cluster, METADATA_GROUP, add),
        Response::Nodes { .. }
    ));
    for _ in 0..50 {
        cluster.step();
    }
    // A backlog longer than one append, so the newcomer applies entries below its own
    // `AddLearner` before it receives that entry.
    for i in 0..100 {
        let create = Request::CreateTopic {
            topic: format!("t{i}"),
            queues: 1,
        };
        assert!(matches!(
            ask_leader(&mut cluster, METADATA_GROUP, create),
            Response::TopicCreated { .. }
        ));
    }
    // The test harness checks every snapshot written has a voter (`Cluster::step`).
    assert!(matches!(
        change(
            &mut cluster,
            METADATA_GROUP,
            ConfChange::AddLearner(4),
            false
        ),
        Response::MembershipChanged { .. }
    ));
    for _ in 0..200 {
        cluster.step();
    }
    let replica = cluster.nodes[&4].replica(METADATA_GROUP).expect("replica");
    let snapshot = replica.snapshot().expect("the newcomer compacted");
    let membership = snapshot.membership.as_ref().expect("with a configuration");
    assert!(membership.voters.contains(&1) && membership.learners.contains(&4));
    let mut bytes = Vec::new();
    crate::storage::record::encode_membership(membership, &mut bytes);
    assert!(crate::storage::record::decode_membership_prefix(&bytes).is_ok());
}
