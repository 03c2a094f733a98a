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

fn add_group(
    cluster: &mut Cluster,
    group: Option<GroupId>,
    voters: &[NodeId],
    force: bool,
) -> Response {
    let request = Request::AddBrokerGroup {
        group,
        voters: voters.to_vec(),
        force,
    };
    ask_leader(cluster, METADATA_GROUP, request)
}

#[test]
fn a_broker_group_added_at_runtime_lives_on_its_voters_takes_new_topics_and_comes_back() {
    let mut cluster = Cluster::with(3, 1, |config| config.snapshot_entries_min = Some(2));
    cluster.settle_leaders(&[METADATA_GROUP, 1]);
    let meta = cluster.leader(METADATA_GROUP).expect("leader");
    assert!(matches!(
        cluster.ask(
            meta,
            Request::CreateTopic {
                topic: "old".into(),
                queues: 2,
            }
        ),
        Response::TopicCreated { .. }
    ));

    refused(
        add_group(&mut cluster, Some(1), &[1, 2, 3], false),
        "exists already",
    );
    refused(
        add_group(&mut cluster, Some(0), &[1, 2, 3], false),
        "metadata group",
    );
    refused(
        add_group(&mut cluster, None, &[1, 9], true),
        "no address in the node table",
    );
    refused(
        add_group(&mut cluster, None, &[2, 3], false),
        "replication factor 3",
    );
    refused(add_group(&mut cluster, None, &[2, 2, 3], true), "twice");
    // Two voters of three, said so: the leader picks the id, one past the highest.
    let added = Response::BrokerGroupAdded {
        group: 2,
        voters: vec![2, 3],
    };
    assert_eq!(add_group(&mut cluster, None, &[2, 3], true), added);
    // A retry of the same request answers the same, and adds nothing.
    assert_eq!(add_group(&mut cluster, Some(2), &[2, 3], true), added);
    for _ in 0..100 {
        cluster.step();
    }
    // Its voters created a replica and told their driver once; node 1 ignored it.
    for id in 1..=3 {
        let node = cluster.nodes.get_mut(&id).expect("node");
        let announced: Vec<_> = std::iter::from_fn(|| node.poll_new_group()).collect();
        if id == 1 {
            assert!(node.replica(2).is_none());
            assert!(announced.is_empty());
        } else {
            assert!(node.replica(2).is_some(), "node {id}");
            assert_eq!(announced, vec![(2, vec![2, 3])], "node {id}");
        }
        assert_eq!(node.broker_groups(), vec![1, 2], "node {id}");
    }
    cluster.settle_leaders(&[2]);
    let leader2 = cluster.leader(2).expect("leader");
    assert_ne!(leader2, 1);

    // A new topic places over both groups; the old one stays in group 1.
    assert!(matches!(
        cluster.ask(
            meta,
            Request::CreateTopic {
                topic: "new".into(),
                queues: 4,
            }
        ),
        Response::TopicCreated { .. }
    ));
    let old: Vec<GroupId> = routes(&mut cluster, "old")
        .iter()
        .map(|r| r.group)
        .collect();
    assert_eq!(old, vec![1, 1]);
    let new = routes(&mut cluster, "new");
    assert!(new.iter().any(|r| r.group == 2) && new.iter().any(|r| r.group == 1));
    // Node 1, which hosts no replica of group 2, points at one of its voters.
    for route in new.iter().filter(|r| r.group == 2) {
        assert!(matches!(route.leader, Some(2 | 3)), "{route:?}");
    }
    let queue = new
        .iter()
        .find(|r| r.group == 2)
        .expect("a queue in 2")
        .queue
        .clone();
    let send = Request::Send {
        broker: 2,
        queue: queue.clone(),
        producer_id: 77,
        first_seq: 0,
        messages: batch(&["into the new group"]),
    };
    match cluster.ask(1, send.clone()) {
        Response::NotLeader {
            group: 2,
            leader_hint: Some(2 | 3),
        } => {}
        other => panic!("{other:?}"),
    }
    for _ in 0..100 {
        cluster.step();
    }
    match cluster.ask(leader2, send) {
        Response::Sent {
            base_offset: 0,
            duplicate: false,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    refused(
        cluster.ask(
            leader2,
            Request::Send {
                broker: 9,
                queue,
                producer_id: 77,
                first_seq: 1,
                messages: batch(&["x"]),
            },
        ),
        "no broker group 9",
    );
    let status = cluster.ask(leader2, Request::Status);
    let Response::Status { groups, .. } = status else {
        panic!("{status:?}");
    };
    let g2 = groups
        .iter()
        .find(|g| g.group == 2)
        .expect("status shows group 2");
    assert_eq!(g2.voters, vec![2, 3]);

    // A restart: the metadata snapshot lists the group. Node 2 recovered its directory, so
    // the replica comes back from it and is not announced again; node 3 lost it (the driver
    // had none), so the replica is created fresh and announced.
    for _ in 0..100 {
        cluster.step();
    }
    let snapshot = cluster.nodes[&2]
        .replica(METADATA_GROUP)
        .and_then(|r| r.snapshot().cloned())
        .expect("the metadata group compacted");
    let replica = cluster.nodes[&2].replica(METADATA_GROUP).expect("replica");
    let last = replica.status().last_index;
    let entries: Vec<_> = (snapshot.index + 1..=last)
        .filter_map(|i| replica.entry(i).cloned())
        .collect();
    let meta_disk = Recovered {
        hard_state: crate::raft::HardState {
            term: 0,
            vote: None,
            commit: last,
        },
        snapshot: Some(snapshot),
        entries,
    };
    let group2_disk = Recovered {
        hard_state: crate::raft::HardState {
            term: 7,
            vote: Some(2),
            commit: 0,
        },
        ..Recovered::default()
    };
    let mut two = BrokerNode::new(
        NodeConfig::new(2, vec![1, 2, 3], 1),
        BTreeMap::from([(METADATA_GROUP, meta_disk.clone()), (2, group2_disk)]),
        9,
        cluster.now,
    );
    assert_eq!(two.poll_fault(), None);
    assert_eq!(two.replica(2).map(|r| r.status().term), Some(7));
    assert_eq!(two.poll_new_group(), None);
    let mut three = BrokerNode::new(
        NodeConfig::new(3, vec![1, 2, 3], 1),
        BTreeMap::from([(METADATA_GROUP, meta_disk.clone())]),
        9,
        cluster.now,
    );
    assert_eq!(three.poll_new_group(), Some((2, vec![2, 3])));
    assert_eq!(three.replica(2).and_then(|r| r.damaged_from()), None);
    // A node whose metadata replica lost its votes (a lost disk) may have voted in group 2
    // before: its fresh replica never votes either.
    // (Its metadata log since the loss holds the group.)
    let mut wiped = NodeConfig::new(3, vec![1, 2, 3], 1);
    wiped.raft.damaged.insert(
        METADATA_GROUP,
        crate::raft::Damage {
            from: last + 1,
            votes_lost: true,
        },
    );
    let wiped = BrokerNode::new(
        wiped,
        BTreeMap::from([(METADATA_GROUP, meta_disk.clone())]),
        9,
        cluster.now,
    );
    assert!(wiped.replica(2).expect("replica").damaged_from().is_some());
    let one = BrokerNode::new(
        NodeConfig::new(1, vec![1, 2, 3], 1),
        BTreeMap::from([(METADATA_GROUP, meta_disk)]),
        9,
        cluster.now,
    );
    assert!(one.replica(2).is_none());
}
