//! Every refusal is answered at once with a reason, and every limit holds: names, queue
//! counts, members, sizes of sends, acks and pulls, terms of Raft messages.

use super::*;
use crate::broker::encode_command;
use crate::limits::*;
use crate::node::NodeEvent;
use crate::raft::{Message as RaftMessage, TERM_MAX};

/// Hands `request` to `node` and returns its answer without letting any time pass: a
/// refusal must not wait for a quorum (or never come).
fn ask_now(cluster: &mut Cluster, node: NodeId, request: Request) -> Response {
    let now = cluster.now;
    let id = cluster.next_request;
    cluster.next_request += 1;
    let n = cluster.nodes.get_mut(&node).expect("the node exists");
    n.handle_request(now, 9, id, request);
    let mut answer = None;
    while let Some((client, request, response)) = n.poll_response() {
        if (client, request) == (9, id) {
            answer = Some(response);
        } else {
            cluster.responses.push((node, client, request, response));
        }
    }
    answer.expect("answered at once")
}

fn assert_refused(response: &Response, needles: &[&str]) {
    let Response::Refused { reason } = response else {
        panic!("not refused: {response:?}");
    };
    for needle in needles {
        assert!(
            reason.contains(needle),
            "{reason:?} does not say {needle:?}"
        );
    }
}

fn events(cluster: &mut Cluster, node: NodeId) -> Vec<NodeEvent> {
    let n = cluster.nodes.get_mut(&node).expect("the node exists");
    std::iter::from_fn(|| n.poll_event()).collect()
}

#[test]
fn a_refused_create_topic_is_answered_at_once_with_why() {
    let (mut cluster, meta) = cluster_with_orders();
    let create = |topic: &str, queues| Request::CreateTopic {
        topic: topic.into(),
        queues,
    };
    for queues in [0, QUEUES_PER_TOPIC_MAX + 1, 100_000, u32::MAX] {
        let answer = ask_now(&mut cluster, meta, create("fresh", queues));
        assert_refused(&answer, &["1 to 1024 queues", &queues.to_string()]);
    }
    let answer = ask_now(&mut cluster, meta, create("orders", 5));
    assert_refused(&answer, &["orders", "exists with 4 queues", "5"]);
    assert_eq!(
        ask_now(&mut cluster, meta, create("orders", 4)),
        Response::TopicCreated {
            topic: "orders".into(),
            existed: true
        }
    );
    let long = "a".repeat(1 << 20);
    for bad in ["", &long, "a\0b", "a\nb", "a b", "%RETRY%g", "orders/1"] {
        let answer = ask_now(&mut cluster, meta, create(bad, 1));
        assert_refused(&answer, &["topic name"]);
    }
    let refusals = events(&mut cluster, meta)
        .into_iter()
        .filter(|e| matches!(e, NodeEvent::RequestRefused { client: 9, .. }))
        .count();
    assert_eq!(refusals, 12, "each refusal is an event for the log");
    // Nothing of it reached the table.
    let Response::Topics { topics } = cluster.ask(meta, Request::Topics) else {
        panic!("no topics");
    };
    assert_eq!(topics, vec![("orders".to_string(), 4)]);
}

#[test]
fn a_creation_refused_when_it_applies_answers_its_waiter() {
    let (mut cluster, meta) = cluster_with_orders();
    // Both pass the check against the applied table; the second is refused when it applies.
    let now = cluster.now;
    let requests = [(2, 3), (3, 2)].map(|(id, queues)| {
        (
            7,
            100 + id,
            Request::CreateTopic {
                topic: "race".into(),
                queues,
            },
        )
    });
    cluster
        .nodes
        .get_mut(&meta)
        .expect("the leader")
        .handle_requests(now, requests);
    let mut answers = BTreeMap::new();
    for _ in 0..1_000 {
        for (node, client, id, response) in std::mem::take(&mut cluster.responses) {
            if node == meta && client == 7 && id > 100 {
                answers.insert(id, response);
            }
        }
        if answers.len() == 2 {
            break;
        }
        cluster.step();
    }
    assert_eq!(
        answers.get(&102),
        Some(&Response::TopicCreated {
            topic: "race".into(),
            existed: false
        })
    );
    assert_refused(
        answers.get(&103).expect("answered"),
        &["race", "exists with 3 queues", "2"],
    );
}

#[test]
fn names_are_checked_in_every_request() {
    let (mut cluster, _meta) = cluster_with_orders();
    let route = routes(&mut cluster, "orders")[0].clone();
    let leader = cluster.leader(route.group).expect("a leader");
    let bad_queue = QueueId::new("bad name", 0);
    let send = |queue: QueueId| Request::Send {
        broker: route.group,
        queue,
        producer_id: 1,
        first_seq: 0,
        messages: batch(&["x"]),
    };
    let pull = |group: &str, queue: QueueId| Request::Pull {
        broker: route.group,
        group: group.into(),
        member: "m".into(),
        generation: 0,
        tenure: 1,
        queue,
        from: 0,
        messages_max: 10,
        bytes_max: 1 << 20,
        wait_ms: 0,
    };
    let ack = |group: &str, queue: QueueId| Request::Ack {
        broker: route.group,
        group: group.into(),
        member: "m".into(),
        generation: 0,
        queue,
        offsets: vec![0],
    };
    let nack = |group: &str, queue: QueueId| Request::ReconsumeLater {
        broker: route.group,
        group: group.into(),
        member: "m".into(),
        generation: 0,
        queue,
        offset: 0,
    };
    let long_group = "g".repeat(NAME_BYTES_MAX + 1);
    let cases = [
        (
            Request::Route {
                topic: "a\nb".into(),
            },
            "topic name",
        ),
        (send(bad_queue.clone()), "topic name"),
        (send(QueueId::retry("billing", 0)), "topic name"),
        (pull("billing", bad_queue.clone()), "topic name"),
        (
            pull("", route.queue.clone()),
            "consumer group name is empty",
        ),
        (pull(&long_group, route.queue.clone()), "250 bytes"),
        (pull("billing", QueueId::retry("other", 0)), "not a retry"),
        (
            pull("billing", QueueId::dead_letter("other")),
            "not a retry",
        ),
        (ack("bil ling", route.queue.clone()), "consumer group name"),
        (ack("billing", bad_queue.clone()), "topic name"),
        (nack("billing", bad_queue), "topic name"),
        (
            nack("billing", QueueId::new("%RETRY%billing.x", 0)),
            "not a retry",
        ),
    ];
    for (request, why) in cases {
        let answer = ask_now(&mut cluster, leader, request.clone());
        assert_refused(&answer, &[why]);
        assert!(answer.nothing_written(), "{request:?}");
    }
    // A group's own retry and dead-letter queues are its to read.
    for queue in [
        QueueId::retry("billing", 3),
        QueueId::dead_letter("billing"),
    ] {
        // The first pull claims the queue: it is answered once the claim commits.
        let answer = cluster.ask(leader, pull("billing", queue));
        assert!(matches!(answer, Response::Pulled { .. }), "{answer:?}");
    }
    let meta = cluster.leader(METADATA_GROUP).expect("a leader");
    let heartbeat = |group: &str, member: &str| Request::Heartbeat {
        group: group.into(),
        member: member.into(),
        topic: "orders".into(),
    };
    let long_member = "m".repeat(MEMBER_BYTES_MAX + 1);
    for (request, why) in [
        (heartbeat("", "m"), "consumer group name is empty"),
        (heartbeat("g", ""), "member id is empty"),
        (heartbeat("g", &long_member), "member id of 250 bytes"),
        (heartbeat("g", "a\u{0}b"), "control character"),
        (
            Request::Leave {
                group: "g\n".into(),
                member: "m".into(),
            },
            "consumer group name",
        ),
    ] {
        assert_refused(&ask_now(&mut cluster, meta, request), &[why]);
    }
}

#[test]
fn members_and_consumer_groups_are_bounded() {
    let mut cluster = Cluster::new(3, 1);
    cluster.settle_leaders(&[METADATA_GROUP]);
    let meta = cluster.leader(METADATA_GROUP).expect("a leader");
    let heartbeat = |group: &str, member: String| Request::Heartbeat {
        group: group.into(),
        member,
        topic: "orders".into(),
    };
    for m in 0..MEMBERS_PER_GROUP_MAX {
        let answer = ask_now(&mut cluster, meta, heartbeat("g", format!("m{m}")));
        assert!(matches!(answer, Response::Assignment { .. }), "{answer:?}");
    }
    let answer = ask_now(&mut cluster, meta, heartbeat("g", "one-more".into()));
    assert_refused(&answer, &["most members it may (1024)"]);
    // A member already in goes on heartbeating.
    let Response::Assignment { members, .. } =
        ask_now(&mut cluster, meta, heartbeat("g", "m7".into()))
    else {
        panic!("m7 refused");
    };
    assert_eq!(members as usize, MEMBERS_PER_GROUP_MAX);

    for g in 1..CONSUMER_GROUPS_MAX {
        let answer = ask_now(&mut cluster, meta, heartbeat(&format!("g{g}"), "m".into()));
        assert!(matches!(answer, Response::Assignment { .. }), "{answer:?}");
    }
    let answer = ask_now(&mut cluster, meta, heartbeat("late", "m".into()));
    assert_refused(&answer, &["most consumer groups it may (10000)"]);
    // Leaving never needs room.
    let leave_unknown = Request::Leave {
        group: "never-joined".into(),
        member: "m".into(),
    };
    assert!(matches!(
        ask_now(&mut cluster, meta, leave_unknown),
        Response::Left { .. }
    ));
    // A group that left makes room.
    let leave = Request::Leave {
        group: "g1".into(),
        member: "m".into(),
    };
    assert!(matches!(
        ask_now(&mut cluster, meta, leave),
        Response::Left { .. }
    ));
    assert!(matches!(
        ask_now(&mut cluster, meta, heartbeat("late", "m".into())),
        Response::Assignment { .. }
    ));
}

/// `messages` messages of `body` bytes with `tags` empty tags each: empty tags weigh nothing
/// in `size_bytes` but a byte each once encoded.
fn heavy_send(
    queue: &QueueId,
    first_seq: u64,
    messages: usize,
    body: usize,
    tags: usize,
) -> Request {
    let message = Message {
        tags: vec![String::new(); tags],
        ..Message::with_body(Bytes::from(vec![7u8; body]))
    };
    Request::Send {
        broker: 1,
        queue: queue.clone(),
        producer_id: 5,
        first_seq,
        messages: vec![message; messages],
    }
}

fn encoded_command_bytes(request: &Request) -> usize {
    let Request::Send {
        queue,
        producer_id,
        first_seq,
        messages,
        ..
    } = request
    else {
        return 0;
    };
    let command = crate::broker::Command::Append {
        queue: queue.clone(),
        producer_id: *producer_id,
        first_seq: *first_seq,
        messages: messages.clone(),
        stamp_ms: u64::MAX,
    };
    encode_command(&command).len()
}

#[test]
fn the_largest_accepted_send_replicates_and_a_larger_one_is_refused() {
    let (mut cluster, _meta) = one_group_with_orders(1, |_| {});
    cluster.check_frames = true;
    for _ in 0..20 {
        cluster.step();
    }
    let queue = QueueId::new("orders", 0);
    let leader = cluster.leader(1).expect("a leader");
    let body = SEND_BYTES_MAX / SEND_MESSAGES_MAX;
    // Every limit at once: the most messages, the most message bytes, and as many empty tags
    // as still fit the command.
    let largest = heavy_send(&queue, 0, SEND_MESSAGES_MAX, body, 11);
    let bytes = encoded_command_bytes(&largest);
    assert!(
        bytes <= COMMAND_BYTES_MAX && bytes + SEND_MESSAGES_MAX > COMMAND_BYTES_MAX,
        "{bytes} bytes is not the largest command that fits"
    );
    let larger = heavy_send(&queue, 0, SEND_MESSAGES_MAX, body, 12);
    assert_refused(
        &ask_now(&mut cluster, leader, larger),
        &["encodes to", "maximum of 5242880"],
    );
    // Two of the largest in one batch, behind a small one: cut into entries that fit, and
    // every AppendEntries that carries them fits a frame (`check_frames`), also to a
    // follower that was away and is sent what it missed together.
    let away = (1..=3).find(|n| *n != leader).expect("a follower");
    cluster.down.insert(away);
    let now = cluster.now;
    let small = Request::Send {
        broker: 1,
        queue: queue.clone(),
        producer_id: 6,
        first_seq: 0,
        messages: batch(&["a"]),
    };
    let second = heavy_send(
        &queue,
        SEND_MESSAGES_MAX as u64,
        SEND_MESSAGES_MAX,
        body,
        11,
    );
    let requests = [(1, small), (2, largest), (3, second)].map(|(id, r)| (8, id, r));
    cluster
        .nodes
        .get_mut(&leader)
        .expect("the leader")
        .handle_requests(now, requests);
    let mut sent = 0;
    for _ in 0..2_000 {
        for (_, client, _, response) in std::mem::take(&mut cluster.responses) {
            if client == 8 {
                assert!(matches!(response, Response::Sent { .. }), "{response:?}");
                sent += 1;
            }
        }
        if sent == 3 {
            break;
        }
        cluster.step();
    }
    assert_eq!(sent, 3, "the sends were answered");
    let total = 1 + 2 * SEND_MESSAGES_MAX as u64;
    cluster.down.remove(&away);
    for _ in 0..500 {
        cluster.step();
    }
    for node in cluster.nodes.values() {
        let len = node.broker_state(1).and_then(|s| s.queue_len(&queue));
        assert_eq!(len, Some(total), "node {} holds every message", node.id());
    }
}

#[test]
fn sends_acks_and_pulls_are_bounded() {
    let (mut cluster, _meta) = one_group_with_orders(1, |_| {});
    for _ in 0..20 {
        cluster.step();
    }
    let queue = QueueId::new("orders", 0);
    let leader = cluster.leader(1).expect("a leader");
    let answer = ask_now(
        &mut cluster,
        leader,
        heavy_send(&queue, 0, 1, 1, MESSAGE_TAGS_MAX + 1),
    );
    assert_refused(&answer, &["65 tags", "maximum of 64"]);
    let answer = ask_now(
        &mut cluster,
        leader,
        heavy_send(&queue, 0, SEND_MESSAGES_MAX + 1, 0, 0),
    );
    assert_refused(&answer, &["65537 messages"]);
    let answer = ask_now(
        &mut cluster,
        leader,
        heavy_send(&queue, 0, 1, SEND_BYTES_MAX + 1, 0),
    );
    assert_refused(&answer, &["message bytes exceeds the maximum"]);
    let ack = Request::Ack {
        broker: 1,
        group: "g".into(),
        member: "m".into(),
        generation: 0,
        queue: queue.clone(),
        offsets: vec![0; ACK_OFFSETS_MAX + 1],
    };
    assert_refused(&ask_now(&mut cluster, leader, ack), &["65537 offsets"]);

    // More messages than a pull may carry: a greedy pull gets the maximum.
    let sent = cluster.ask(leader, heavy_send(&queue, 0, 5_000, 1, 0));
    assert!(matches!(sent, Response::Sent { .. }), "{sent:?}");
    let pull = Request::Pull {
        broker: 1,
        group: "g".into(),
        member: "m".into(),
        generation: 0,
        tenure: 1,
        queue: queue.clone(),
        from: 0,
        messages_max: u32::MAX,
        bytes_max: u32::MAX,
        wait_ms: u64::MAX,
    };
    let Response::Pulled { messages, .. } = cluster.ask(leader, pull) else {
        panic!("no pull");
    };
    assert_eq!(messages.len(), PULL_MESSAGES_MAX as usize);
}

#[test]
fn the_topic_table_is_looked_through_only_when_it_or_leadership_changes() {
    let (mut cluster, meta) = cluster_with_orders();
    for _ in 0..50 {
        cluster.step();
    }
    let scans: Vec<u64> = cluster.nodes.values().map(|n| n.placement_scans).collect();
    for _ in 0..500 {
        cluster.step();
    }
    let after: Vec<u64> = cluster.nodes.values().map(|n| n.placement_scans).collect();
    assert_eq!(
        scans, after,
        "500 ms of heartbeats made no pass over the table"
    );
    let create = Request::CreateTopic {
        topic: "more".into(),
        queues: 2,
    };
    assert!(matches!(
        cluster.ask(meta, create),
        Response::TopicCreated { existed: false, .. }
    ));
    for _ in 0..50 {
        cluster.step();
    }
    let created: u64 = cluster.nodes.values().map(|n| n.placement_scans).sum();
    assert!(
        created > after.iter().sum::<u64>(),
        "a new topic is looked at"
    );
    // Its queues were created where they are placed.
    for route in routes(&mut cluster, "more") {
        let leader = cluster.leader(route.group).expect("a leader");
        let state = cluster.nodes[&leader].broker_state(route.group);
        assert_eq!(state.and_then(|s| s.queue_len(&route.queue)), Some(0));
    }
}

#[test]
fn elections_and_refused_peer_messages_are_events() {
    let mut cluster = Cluster::new(3, 1);
    cluster.settle_leaders(&[METADATA_GROUP, 1]);
    let leader = cluster.leader(1).expect("a leader");
    let term = cluster.nodes[&leader]
        .replica(1)
        .expect("group 1")
        .status()
        .term;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    assert!(
        events(&mut cluster, leader).contains(&NodeEvent::BecameLeader { group: 1, term }),
        "the leader reports its election"
    );
    assert!(
        events(&mut cluster, follower).contains(&NodeEvent::LeaderChanged {
            group: 1,
            term,
            leader
        }),
        "a follower reports its leader"
    );
    // One forged heartbeat of a term that leaves no room to campaign, to every node.
    let now = cluster.now;
    for node in 1..=3 {
        let from = if node == leader { follower } else { leader };
        let forged = Envelope {
            group: 1,
            from,
            to: node,
            message: RaftMessage::Heartbeat {
                term: TERM_MAX - 1,
                commit: 0,
                context: 0,
            },
        };
        cluster
            .nodes
            .get_mut(&node)
            .expect("a node")
            .handle_peer(now, forged);
        let reported = events(&mut cluster, node);
        assert!(
            reported.iter().any(|e| matches!(
                e,
                NodeEvent::MessageRefused { group: 1, why, .. } if why.contains("above the maximum")
            )),
            "node {node} reports the refusal"
        );
        if node == leader {
            // Moved to the limit term, as for any newer term: it no longer leads.
            assert!(
                reported
                    .iter()
                    .any(|e| matches!(e, NodeEvent::SteppedDown { group: 1, .. })),
                "the old leader reports it stepped down: {reported:?}"
            );
        }
    }
    // Misaddressed: refused too.
    let misaddressed = Envelope {
        group: 1,
        from: 2,
        to: 9,
        message: RaftMessage::Heartbeat {
            term: 1,
            commit: 0,
            context: 0,
        },
    };
    cluster
        .nodes
        .get_mut(&1)
        .expect("node 1")
        .handle_peer(now, misaddressed);
    assert!(matches!(
        events(&mut cluster, 1).as_slice(),
        [NodeEvent::MessageRefused { why, .. }] if why.contains("addressed to node 9")
    ));
    // The group elects again, and the old leader says it stepped down.
    for _ in 0..2_000 {
        if cluster.leader(1).is_some() {
            break;
        }
        cluster.step();
    }
    let leader_now = cluster.leader(1).expect("the group elects again");
    let status = cluster.nodes[&leader_now]
        .replica(1)
        .expect("group 1")
        .status();
    assert!(status.term > TERM_ACCEPTED_MAX && status.term < TERM_MAX - 1);
    assert!(matches!(
        cluster.ask(
            leader_now,
            Request::Send {
                broker: 1,
                queue: QueueId::new("t", 0),
                producer_id: 1,
                first_seq: 0,
                messages: batch(&["x"]),
            }
        ),
        Response::Refused { .. }
    ));
}

#[test]
fn a_status_answer_lists_a_bounded_number_of_consumers() {
    let (mut cluster, _meta) = one_group_with_orders(1, |_| {});
    for _ in 0..20 {
        cluster.step();
    }
    let queue = QueueId::new("orders", 0);
    let leader = cluster.leader(1).expect("a leader");
    let sent = cluster.ask(leader, heavy_send(&queue, 0, 1, 1, 0));
    assert!(matches!(sent, Response::Sent { .. }), "{sent:?}");
    // Each group's member claims the queue with a pull, then acks: only a holder's ack counts.
    let pulls = (0..STATUS_CONSUMERS_MAX as u64 + 10).map(|g| {
        let pull = Request::Pull {
            broker: 1,
            group: format!("g{g}"),
            member: "m".into(),
            generation: 1,
            tenure: 1,
            queue: queue.clone(),
            from: 0,
            messages_max: 1,
            bytes_max: 1 << 10,
            wait_ms: 0,
        };
        (6, g, pull)
    });
    let now = cluster.now;
    cluster
        .nodes
        .get_mut(&leader)
        .expect("the leader")
        .handle_requests(now, pulls);
    for _ in 0..50 {
        cluster.step();
    }
    let acks = (0..STATUS_CONSUMERS_MAX as u64 + 10).map(|g| {
        let ack = Request::Ack {
            broker: 1,
            group: format!("g{g}"),
            member: "m".into(),
            generation: 1,
            queue: queue.clone(),
            offsets: vec![0],
        };
        (8, g, ack)
    });
    let now = cluster.now;
    cluster
        .nodes
        .get_mut(&leader)
        .expect("the leader")
        .handle_requests(now, acks);
    for _ in 0..50 {
        cluster.step();
    }
    let Response::Status { groups, .. } = cluster.ask(leader, Request::Status) else {
        panic!("no status");
    };
    let consumers: usize = groups.iter().map(|g| g.consumers.len()).sum();
    assert_eq!(consumers, STATUS_CONSUMERS_MAX);
    let holders: usize = groups.iter().map(|g| g.holders.len()).sum();
    assert_eq!(holders, STATUS_CONSUMERS_MAX);
}

/// The frame check of the test above fires: with a byte budget per AppendEntries of two
/// frames, four of the largest sends go to a follower that was away in one message that does
/// not fit.
#[test]
#[should_panic(expected = "does not fit a frame")]
fn the_frame_check_catches_an_append_entries_over_the_budget() {
    let (mut cluster, _meta) = one_group_with_orders(1, |config| {
        config.raft.append_bytes_max = 2 * FRAME_BYTES_MAX;
    });
    cluster.check_frames = true;
    for _ in 0..20 {
        cluster.step();
    }
    let queue = QueueId::new("orders", 0);
    let leader = cluster.leader(1).expect("a leader");
    let body = SEND_BYTES_MAX / SEND_MESSAGES_MAX;
    // A follower away while they commit is later sent them together.
    let away = (1..=3).find(|n| *n != leader).expect("a follower");
    cluster.down.insert(away);
    let now = cluster.now;
    let requests = (0..4u64).map(|i| {
        let first_seq = i * SEND_MESSAGES_MAX as u64;
        (
            8,
            i,
            heavy_send(&queue, first_seq, SEND_MESSAGES_MAX, body, 11),
        )
    });
    cluster
        .nodes
        .get_mut(&leader)
        .expect("the leader")
        .handle_requests(now, requests);
    for _ in 0..100 {
        cluster.step();
    }
    cluster.down.remove(&away);
    for _ in 0..500 {
        cluster.step();
    }
}
