use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::broker::{Message, QueueId};
use crate::node::protocol::{Request, RequestId, Response, Route};
use crate::time::Instant;

/// The routes of `orders`: queue `q` in broker group `q + 1`, led by node 1.
fn orders_routes() -> Response {
    let routes = (0..2)
        .map(|q| Route {
            queue: QueueId::new("orders", q),
            group: u64::from(q) + 1,
            leader: Some(1),
        })
        .collect();
    Response::Routes {
        topic: "orders".into(),
        routes,
    }
}

/// A producer (`config`) with a send to `orders` whose routes (`orders_routes`) have
/// arrived, its first Send request waiting in the outbox.
fn producer_with_routes(config: ProducerConfig, now: Instant) -> Producer {
    let mut producer = Producer::new(config);
    producer.send(now, "orders", vec![Message::with_body(Bytes::from("m"))]);
    let Some((_, route_request, Request::Route { .. })) = producer.poll_request() else {
        panic!("a producer asks for routes first");
    };
    producer.handle_response(now, route_request, orders_routes());
    producer
}

/// A producer whose routes name node 1 as the leader of both broker groups, with a send to
/// node 1 in flight.
fn producer_with_a_send_to_node_1() -> (Producer, Instant) {
    let now = Instant::from_micros(1_000_000);
    let mut producer = producer_with_routes(ProducerConfig::new(7, vec![1, 2, 3]), now);
    let Some((node, _, Request::Send { .. })) = producer.poll_request() else {
        panic!("then it sends");
    };
    assert_eq!(node, 1, "to the leader the routes name");
    (producer, now)
}

#[test]
fn a_retry_after_a_timeout_goes_to_another_node_not_the_silent_leader() {
    let (mut producer, now) = producer_with_a_send_to_node_1();
    let later = now + Duration::from_millis(ProducerConfig::new(7, vec![]).request_timeout_ms);
    producer.handle_timeout(later);
    let Some((node, _, Request::Send { .. })) = producer.poll_request() else {
        panic!("the send is retried at once");
    };
    assert_ne!(
        node, 1,
        "node 1 let a request time out; any other node can redirect to the new leader"
    );
}

#[test]
fn a_node_that_answers_again_is_trusted_again() {
    let (mut producer, now) = producer_with_a_send_to_node_1();
    let later = now + Duration::from_millis(ProducerConfig::new(7, vec![]).request_timeout_ms);
    producer.handle_timeout(later);
    let Some((node, request, Request::Send { broker, .. })) = producer.poll_request() else {
        panic!("the send is retried at once");
    };
    // The node asked redirects back to node 1, which has recovered and leads again.
    let redirect = Response::NotLeader {
        group: broker,
        leader_hint: Some(1),
    };
    producer.handle_response(later, request, redirect);
    let Some((to, request, Request::Send { .. })) = producer.poll_request() else {
        panic!("the redirect is followed");
    };
    assert_ne!(node, 1);
    assert_eq!(to, 1, "a hint names the leader, suspect or not");
    let sent = Response::Sent {
        queue: QueueId::new("orders", 0),
        base_offset: 0,
        duplicate: false,
    };
    producer.handle_response(later, request, sent);
    assert!(matches!(
        producer.poll_result(),
        Some((
            _,
            SendResult::Acked {
                ambiguous: true,
                ..
            }
        ))
    ));
}

/// A connection that closes under a send in flight fails it over at once, to another node,
/// same queue and sequence (the broker deduplicates it there), and the send reports that it
/// may have been written twice: no request timeout is waited out.
#[test]
fn a_send_in_flight_on_a_lost_connection_is_retried_elsewhere_at_once() {
    let (mut producer, now) = producer_with_a_send_to_node_1();
    // Nothing else in flight to node 2: nothing happens.
    producer.connection_lost(now, 2);
    assert!(producer.poll_request().is_none());
    producer.connection_lost(now, 1);
    let Some((
        node,
        request,
        Request::Send {
            broker,
            queue,
            first_seq,
            ..
        },
    )) = producer.poll_request()
    else {
        panic!("the send is retried at once, with no time passing");
    };
    assert_ne!(node, 1, "node 1's connection is gone");
    assert_eq!(first_seq, 0, "the same sequence");
    assert_eq!(broker, u64::from(queue.queue) + 1, "a queue of the routes");
    let sent = Response::Sent {
        queue,
        base_offset: 0,
        duplicate: true,
    };
    producer.handle_response(now, request, sent);
    assert!(matches!(
        producer.poll_result(),
        Some((
            _,
            SendResult::Acked {
                ambiguous: true,
                ..
            }
        ))
    ));
}

fn stored(seq: u64) -> crate::broker::StoredMessage {
    crate::broker::StoredMessage {
        producer_id: 1,
        seq,
        message: Message::with_body(Bytes::from("m")),
        stored_ms: 0,
        reconsume_times: 0,
        due_ms: 0,
        origin: None,
    }
}

/// The member's request of `kind` that leaves next, after a tick at `now`.
fn next_request(consumer: &mut Consumer, now: Instant) -> (RequestId, Request) {
    consumer.handle_timeout(now);
    let (_, id, request) = consumer.poll_request().expect("a request leaves");
    (id, request)
}

/// Seed 7101663: a member held a queue, another held it for a generation the first never saw,
/// then the first owned it again. Its answers from its first tenure were refused: those
/// messages stay unacknowledged below where it pulls from, so it must pull again from the
/// group's committed offset, or they wait for ever.
/// A pull's answer: the message at `offset`, handed out for the first time.
fn pulled_one(q: &QueueId, offset: u64) -> Response {
    Response::Pulled {
        queue: q.clone(),
        messages: vec![(offset, stored(offset))],
        next_offset: offset + 1,
        delivered_below: 0,
    }
}

/// A pull's answer: `messages`, with everything below offset 31 handed out before.
fn pulled_below_31(q: &QueueId, messages: Vec<(u64, crate::broker::StoredMessage)>) -> Response {
    Response::Pulled {
        queue: q.clone(),
        messages,
        next_offset: 31,
        delivered_below: 31,
    }
}

/// A member of group "g" whose answers for `orders/0` (offsets 29 and 30, pulled in its
/// first tenure) were refused after it owned the queue again: returns it with the pull that
/// was in flight at the refusal, and the time.
fn member_whose_answers_were_refused() -> (Consumer, RequestId, Instant) {
    let q = QueueId::new("orders", 0);
    let mut now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", vec![1]), now);
    let assign = |consumer: &mut Consumer, now, id, generation| {
        let response = Response::Assignment {
            group: "g".into(),
            generation,
            members: 1,
            queues: vec![(1, q.clone())],
        };
        consumer.handle_response(now, id, response);
    };
    let (id, request) = next_request(&mut consumer, now);
    assert!(matches!(request, Request::Heartbeat { .. }));
    assign(&mut consumer, now, id, 5);
    let (pull, request) = next_request(&mut consumer, now);
    assert!(
        matches!(
            request,
            Request::Pull {
                from: 0,
                generation: 5,
                ..
            }
        ),
        "{request:?}"
    );
    let response = Response::Pulled {
        queue: q.clone(),
        messages: vec![(29, stored(29)), (30, stored(30))],
        next_offset: 31,
        delivered_below: 0,
    };
    consumer.handle_response(now, pull, response);
    let deliveries: Vec<Delivery> = std::iter::from_fn(|| consumer.poll_delivery()).collect();
    assert_eq!(deliveries.len(), 2);
    // A newer generation still gives the member the queue.
    now = now + Duration::from_millis(1_000);
    let mut ack = None;
    let mut pull_in_flight = None;
    for delivery in &deliveries {
        consumer.answer(now, delivery, AckStatus::Success);
    }
    consumer.handle_timeout(now);
    while let Some((_, id, request)) = consumer.poll_request() {
        match request {
            Request::Heartbeat { .. } => assign(&mut consumer, now, id, 7),
            Request::Ack { .. } => ack = Some(id),
            Request::Pull { from, .. } => {
                assert_eq!(from, 31);
                pull_in_flight = Some(id);
            }
            _ => {}
        }
    }
    let ack = ack.expect("the answers leave");
    let refused = Response::Revoked {
        queue: q.clone(),
        reason: "another member held it in between".into(),
    };
    consumer.handle_response(now, ack, refused);
    (consumer, pull_in_flight.expect("a pull was in flight"), now)
}

#[test]
fn answers_refused_from_an_earlier_tenure_make_the_member_pull_from_the_committed_offset() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull_in_flight, mut now) = member_whose_answers_were_refused();
    // The pull in flight when the answers were refused comes back: it must not move the
    // member past the refused messages again.
    let stale = pulled_below_31(&q, Vec::new());
    consumer.handle_response(now, pull_in_flight, stale);
    now = now + Duration::from_millis(50);
    let mut froms = Vec::new();
    consumer.handle_timeout(now);
    while let Some((_, id, request)) = consumer.poll_request() {
        if let Request::Pull { from, .. } = request {
            froms.push(from);
            consumer.handle_response(now, id, pulled_below_31(&q, Vec::new()));
        }
    }
    now = now + Duration::from_millis(50);
    consumer.handle_timeout(now);
    while let Some((_, _, request)) = consumer.poll_request() {
        if let Request::Pull { from, .. } = request {
            froms.push(from);
        }
    }
    assert_eq!(
        froms.first(),
        Some(&0),
        "pulls after the refusal: {froms:?}"
    );
}

/// Seed 100116 (5 nodes, 3 groups): the pull in flight when the member rewound was answered
/// NotLeader, not with messages. The member's next pull (from the committed offset) is not
/// the stale one: its messages move the member on, and the member says it rewound before
/// it hands them out.
#[test]
fn a_rewind_whose_pull_in_flight_bounced_pulls_once_from_the_committed_offset() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull_in_flight, mut now) = member_whose_answers_were_refused();
    while consumer.poll_event().is_some() {}
    let bounced = Response::NotLeader {
        group: 1,
        leader_hint: Some(1),
    };
    consumer.handle_response(now, pull_in_flight, bounced);
    let events: Vec<ConsumerEvent> = std::iter::from_fn(|| consumer.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ConsumerEvent::Rewound { .. })),
        "the rewind is said once the pull in flight is over: {events:?}"
    );
    let mut froms = Vec::new();
    for _ in 0..3 {
        now = now + Duration::from_millis(50);
        consumer.handle_timeout(now);
        while let Some((_, id, request)) = consumer.poll_request() {
            if let Request::Pull { from, .. } = request {
                froms.push(from);
                let messages = if from == 0 {
                    vec![(29, stored(29)), (30, stored(30))]
                } else {
                    Vec::new()
                };
                let response = pulled_below_31(&q, messages);
                consumer.handle_response(now, id, response);
            }
        }
        while consumer.poll_delivery().is_some() {}
    }
    assert_eq!(froms.first(), Some(&0), "pulls after the bounce: {froms:?}");
    assert!(
        froms.iter().skip(1).all(|from| *from == 31),
        "the pull from the committed offset moves the member on: {froms:?}"
    );
}

/// Drives a producer whose every request gets `answer` (none: no answer at all) until its
/// send gives up, and returns how.
fn given_up(answer: Option<Response>) -> SendResult {
    let mut now = Instant::from_micros(1_000_000);
    let mut producer = Producer::new(ProducerConfig::new(7, vec![1, 2, 3]));
    producer.send(now, "orders", vec![Message::with_body(Bytes::from("m"))]);
    for _ in 0..100_000 {
        for _ in 0..10 {
            let Some((_, request, _)) = producer.poll_request() else {
                break;
            };
            if let Some(answer) = &answer {
                producer.handle_response(now, request, answer.clone());
            }
        }
        assert!(
            producer.poll_request().is_none(),
            "a refusal is not asked again within the same millisecond"
        );
        if let Some((_, result)) = producer.poll_result() {
            return result;
        }
        now = now + Duration::from_millis(10);
        producer.handle_timeout(now);
    }
    panic!("the send never ended");
}

/// A send the cluster refused (an unknown topic, a permission) says so, so the CLI exits
/// with the refusal's code (4) rather than the timeout's (5); one that went unanswered does
/// not.
#[test]
fn a_send_given_up_says_whether_the_cluster_refused_it() {
    let refusal = Response::Refused {
        reason: "unknown topic \"orders\"".into(),
    };
    match given_up(Some(refusal)) {
        SendResult::Failed {
            reason,
            refused,
            maybe_written,
        } => {
            assert!(refused, "{reason}");
            assert!(!maybe_written);
            assert!(reason.contains("unknown topic"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match given_up(None) {
        SendResult::Failed { refused, .. } => assert!(!refused),
        other => panic!("{other:?}"),
    }
}

/// A consumer's pull in flight on a connection that closes goes again at once, from the same
/// offset, to another node; with every node lost it waits out its timeout instead of spinning.
#[test]
fn a_pull_in_flight_on_a_lost_connection_goes_again_at_once_to_another_node() {
    let q = QueueId::new("orders", 0);
    let now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", vec![1, 2, 3]), now);
    let (_, heartbeat, request) = consumer.poll_request().expect("a heartbeat leaves");
    assert!(matches!(request, Request::Heartbeat { .. }));
    let assignment = Response::Assignment {
        group: "g".into(),
        generation: 1,
        members: 1,
        queues: vec![(1, q.clone())],
    };
    consumer.handle_response(now, heartbeat, assignment);
    consumer.handle_timeout(now);
    let pull_from = |request: &Request| match request {
        Request::Pull { queue, from, .. } => {
            assert_eq!(queue, &q);
            *from
        }
        other => panic!("expected a pull, got {other:?}"),
    };
    let (first, _, request) = consumer.poll_request().expect("a pull leaves");
    assert_eq!(pull_from(&request), 0);
    assert!(consumer.poll_request().is_none());

    // A node with nothing in flight changes nothing.
    let idle = [1, 2, 3].into_iter().find(|n| *n != first).expect("a node");
    consumer.connection_lost(now, idle);
    assert!(consumer.poll_request().is_none());

    // No time passes: the pull goes again, elsewhere, from the same offset.
    consumer.connection_lost(now, first);
    let (second, _, request) = consumer
        .poll_request()
        .expect("the pull goes again at once");
    assert_ne!(second, first);
    assert_eq!(pull_from(&request), 0);
    assert!(consumer.poll_request().is_none());

    // The last node left too: no node is unsuspected, so it waits for its timeout.
    consumer.connection_lost(now, second);
    let (third, _, request) = consumer.poll_request().expect("to the third node");
    assert!(third != first && third != second);
    assert_eq!(pull_from(&request), 0);
    consumer.connection_lost(now, third);
    assert!(
        consumer.poll_request().is_none(),
        "no spinning over lost nodes"
    );
    let later = now + Duration::from_millis(5_000);
    consumer.handle_timeout(later);
    let again = std::iter::from_fn(|| consumer.poll_request())
        .find(|(_, _, r)| matches!(r, Request::Pull { .. }));
    assert!(again.is_some(), "the pull goes again after its timeout");
}

/// Issue 18's profile: during an election every node answers an ack with `NotLeader` and no
/// hint. Resent at once, each answer bounced once per round trip for the whole election (a
/// third of all redirects in the simulator's queue runs); it now waits, longer each time.
#[test]
fn answers_bounced_with_no_leader_known_wait_before_going_again() {
    let q = QueueId::new("orders", 0);
    let now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", vec![1, 2, 3]), now);
    let (id, request) = next_request(&mut consumer, now);
    assert!(matches!(request, Request::Heartbeat { .. }));
    let assignment = Response::Assignment {
        group: "g".into(),
        generation: 1,
        members: 1,
        queues: vec![(1, q.clone())],
    };
    consumer.handle_response(now, id, assignment);
    let (pull, _) = next_request(&mut consumer, now);
    consumer.handle_response(now, pull, pulled_one(&q, 0));
    let delivery = consumer.poll_delivery().expect("a delivery");
    consumer.answer(now, &delivery, AckStatus::Success);
    // Sends the ack; returns the times it left at over 100 ms of bounces.
    let mut acks_sent = Vec::new();
    let mut t = now;
    let end = now + Duration::from_millis(100);
    while t <= end {
        consumer.handle_timeout(t);
        while let Some((_, id, request)) = consumer.poll_request() {
            if matches!(request, Request::Ack { .. }) && acks_sent.len() < 1_000 {
                acks_sent.push(t);
                let bounce = Response::NotLeader {
                    group: 1,
                    leader_hint: None,
                };
                consumer.handle_response(t, id, bounce);
            }
        }
        t = t + Duration::from_millis(1);
    }
    // 0, 10, 30, 70 ms: four tries in 100 ms, not one a millisecond.
    assert!(
        (2..=5).contains(&acks_sent.len()),
        "acks sent at {acks_sent:?}"
    );
    // A hint is followed at once.
    let (_, id, request) = {
        consumer.handle_timeout(end + Duration::from_millis(200));
        consumer.poll_request().expect("the ack goes again")
    };
    assert!(matches!(request, Request::Ack { .. }), "{request:?}");
    let t = end + Duration::from_millis(200);
    let redirect = Response::NotLeader {
        group: 1,
        leader_hint: Some(2),
    };
    consumer.handle_response(t, id, redirect);
    let acks: Vec<crate::raft::NodeId> = std::iter::from_fn(|| consumer.poll_request())
        .filter(|(_, _, r)| matches!(r, Request::Ack { .. }))
        .map(|(node, _, _)| node)
        .collect();
    assert_eq!(acks, vec![2], "the ack follows the hint at once");
}

/// Queue seed 1775156482413113839 (explore run, exclusive-owner): a pull sent before the member
/// let its queue go was answered while it still held the queue, but the network held the answer
/// back until the queue was the member's again. Meanwhile another member held the queue and
/// was handed the same messages: the late answer's messages are not handed out.
#[test]
fn an_answer_from_an_earlier_tenure_of_a_queue_is_not_handed_out() {
    let q = QueueId::new("orders", 0);
    let mut now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", vec![1]), now);
    let assign = |consumer: &mut Consumer, now, id, generation, queues: Vec<(u64, QueueId)>| {
        let response = Response::Assignment {
            group: "g".into(),
            generation,
            members: 2,
            queues,
        };
        consumer.handle_response(now, id, response);
    };
    let (id, _) = next_request(&mut consumer, now);
    assign(&mut consumer, now, id, 5, vec![(1, q.clone())]);
    let (early_pull, request) = next_request(&mut consumer, now);
    assert!(matches!(request, Request::Pull { .. }), "{request:?}");
    // The queue goes to another member before the pull is answered; this member releases it.
    now = now + Duration::from_millis(1_000);
    consumer.handle_timeout(now);
    let mut released = false;
    while let Some((_, id, request)) = consumer.poll_request() {
        match request {
            Request::Heartbeat { .. } => assign(&mut consumer, now, id, 6, Vec::new()),
            Request::Release { .. } => {
                consumer.handle_response(now, id, Response::Released { queue: q.clone() });
                released = true;
            }
            _ => {}
        }
    }
    assert!(released, "the member lets the queue go");
    // The queue is its again; then the early pull's answer comes.
    now = now + Duration::from_millis(1_000);
    consumer.handle_timeout(now);
    while let Some((_, id, request)) = consumer.poll_request() {
        if let Request::Heartbeat { .. } = request {
            assign(&mut consumer, now, id, 7, vec![(1, q.clone())]);
        }
    }
    consumer.handle_response(now, early_pull, pulled_one(&q, 4));
    assert!(
        consumer.poll_delivery().is_none(),
        "the late answer's message is not handed out"
    );
    now = now + Duration::from_millis(10);
    consumer.handle_timeout(now);
    let froms: Vec<u64> = std::iter::from_fn(|| consumer.poll_request())
        .filter_map(|(_, _, r)| match r {
            Request::Pull { from, .. } => Some(from),
            _ => None,
        })
        .collect();
    assert_eq!(
        froms,
        [0],
        "it pulls from the committed offset, not past the late answer"
    );
}

/// The driver tells the producer the cluster's nodes as it learns them: routes are asked of
/// those; an empty list (the driver knows of none yet) keeps the ones it had.
#[test]
fn routes_are_asked_of_the_nodes_the_driver_last_named_and_an_empty_list_changes_nothing() {
    let now = Instant::from_micros(1_000_000);
    let mut producer = Producer::new(ProducerConfig::new(7, vec![1, 2, 3]));
    producer.set_nodes(Vec::new());
    let mut asked = Vec::new();
    for _ in 0..3 {
        producer.send(now, "orders", vec![Message::with_body(Bytes::from("m"))]);
        let Some((node, request, Request::Route { .. })) = producer.poll_request() else {
            panic!("a producer asks for routes first");
        };
        asked.push(node);
        // No routes yet: the next send asks again.
        let refused = Response::Refused {
            reason: "unknown topic".into(),
        };
        producer.handle_response(now, request, refused);
    }
    asked.sort();
    assert_eq!(asked, [1, 2, 3], "round-robin over the nodes it had");
    producer.set_nodes(vec![4, 5]);
    let later = now + Duration::from_millis(500);
    producer.handle_timeout(later);
    let asked: Vec<crate::raft::NodeId> = std::iter::from_fn(|| producer.poll_request())
        .filter(|(_, _, r)| matches!(r, Request::Route { .. }))
        .map(|(node, _, _)| node)
        .collect();
    assert!(!asked.is_empty(), "the sends ask for routes again");
    assert!(
        asked.iter().all(|n| [4, 5].contains(n)),
        "of the nodes last named: {asked:?}"
    );
}

/// Drives a producer made by `producer_with_routes` at `now` until its send ends, answering
/// its route requests with `orders_routes` and handing each Send request (node, request,
/// broker group) to `answer`; returns how many Sends left and how the send ended.
fn sends_until_the_end(
    mut now: Instant,
    mut answer: impl FnMut(&mut Producer, Instant, crate::raft::NodeId, RequestId, u64),
) -> (u32, SendResult) {
    let mut producer = producer_with_routes(ProducerConfig::new(7, vec![1, 2, 3]), now);
    let mut sends = 0;
    loop {
        while let Some((node, id, request)) = producer.poll_request() {
            match request {
                Request::Send { broker, .. } => {
                    sends += 1;
                    answer(&mut producer, now, node, id, broker);
                }
                Request::Route { .. } => producer.handle_response(now, id, orders_routes()),
                other => panic!("{other:?}"),
            }
        }
        if let Some((_, result)) = producer.poll_result() {
            return (sends, result);
        }
        now = now + Duration::from_millis(1);
        producer.handle_timeout(now);
    }
}

/// Every Send is answered `NotLeader` with a hint: each attempt follows `redirects_max`
/// redirects, and the one after that counts as a failed attempt; after `retries` more such
/// attempts the send gives up, saying why, with nothing written.
#[test]
fn a_send_follows_redirects_max_redirects_before_counting_a_failed_attempt() {
    let config = ProducerConfig::new(7, vec![]);
    let (sends, result) = sends_until_the_end(
        Instant::from_micros(1_000_000),
        |producer, now, _, id, broker| {
            let bounce = Response::NotLeader {
                group: broker,
                leader_hint: Some(2),
            };
            producer.handle_response(now, id, bounce);
        },
    );
    assert_eq!(sends, (config.retries + 1) * (config.redirects_max + 1));
    assert_eq!(
        result,
        SendResult::Failed {
            reason: "too many redirects".into(),
            maybe_written: false,
            refused: false,
        }
    );
}

/// A lost connection counts as a redirect: each attempt goes again `redirects_max` times
/// after one, and the next loss counts as a failed attempt; the send gives up after
/// `retries` more, saying it may have been written.
#[test]
fn a_send_goes_again_after_redirects_max_lost_connections_before_counting_a_failed_attempt() {
    let config = ProducerConfig::new(7, vec![]);
    let mut last = None;
    let (sends, result) = sends_until_the_end(
        Instant::from_micros(1_000_000),
        |producer, now, node, _, _| {
            producer.connection_lost(now, node);
            last = Some(node);
        },
    );
    assert_eq!(sends, (config.retries + 1) * (config.redirects_max + 1));
    let last = last.expect("a send left");
    assert_eq!(
        result,
        SendResult::Failed {
            reason: format!("connection to node {last} lost"),
            maybe_written: true,
            refused: false,
        }
    );
}

/// A route request in flight on a connection that closes goes again at once, to another
/// node; a connection lost to a node nothing was asked of changes nothing.
#[test]
fn a_route_request_in_flight_on_a_lost_connection_goes_again_at_once_to_another_node() {
    let now = Instant::from_micros(1_000_000);
    let mut producer = Producer::new(ProducerConfig::new(7, vec![1, 2, 3]));
    producer.send(now, "orders", vec![Message::with_body(Bytes::from("m"))]);
    let Some((asked, _, Request::Route { .. })) = producer.poll_request() else {
        panic!("a producer asks for routes first");
    };
    let idle = [1, 2, 3].into_iter().find(|n| *n != asked).expect("a node");
    producer.connection_lost(now, idle);
    assert!(
        producer.poll_request().is_none(),
        "nothing was asked of {idle}"
    );
    producer.connection_lost(now, asked);
    let Some((again, _, Request::Route { topic })) = producer.poll_request() else {
        panic!("the routes are asked for again at once");
    };
    assert_eq!(topic, "orders");
    assert_ne!(again, asked, "{asked}'s connection is gone");
    assert!(producer.poll_request().is_none(), "once");
}

/// A send the broker refuses (a permission, a queue not created yet) counts a failed attempt
/// per refusal, asking for routes again before each retry, and gives up after `retries` of
/// them with the broker's reason, as refused and not written.
#[test]
fn a_send_the_broker_refuses_gives_up_after_retries_refused_attempts() {
    let config = ProducerConfig::new(7, vec![]);
    let (sends, result) = sends_until_the_end(
        Instant::from_micros(1_000_000),
        |producer, now, _, id, _| {
            let refused = Response::Refused {
                reason: "not authorised".into(),
            };
            producer.handle_response(now, id, refused);
        },
    );
    assert_eq!(sends, config.retries + 1);
    assert_eq!(
        result,
        SendResult::Failed {
            reason: "not authorised".into(),
            maybe_written: false,
            refused: true,
        }
    );
}

/// A tick before a request's timeout leaves it in flight; a send whose deadline passes while
/// its request is still in flight (the deadline before the request's timeout) gives up then,
/// as maybe written.
#[test]
fn a_send_with_a_request_in_flight_gives_up_at_its_deadline_not_before() {
    let now = Instant::from_micros(1_000_000);
    let mut config = ProducerConfig::new(7, vec![1, 2, 3]);
    config.send_timeout_ms = 500;
    config.request_timeout_ms = 1_000;
    let mut producer = producer_with_routes(config, now);
    let Some((_, _, Request::Send { .. })) = producer.poll_request() else {
        panic!("the send leaves");
    };
    let deadline = now + Duration::from_millis(500);
    assert_eq!(producer.poll_timeout(), Some(deadline));
    producer.handle_timeout(now + Duration::from_millis(1));
    assert!(
        producer.poll_request().is_none(),
        "the request is in flight"
    );
    assert!(producer.poll_result().is_none());
    producer.handle_timeout(deadline);
    let Some((_, SendResult::Failed { maybe_written, .. })) = producer.poll_result() else {
        panic!("the send gives up at its deadline");
    };
    assert!(maybe_written, "the request in flight may have been written");
    assert!(producer.poll_request().is_none());
    assert_eq!(producer.in_flight(), 0);
}

/// Cached routes are used until they are `route_ttl_ms` old; from then a send asks for them
/// again first.
#[test]
fn routes_are_fetched_again_once_route_ttl_old() {
    let now = Instant::from_micros(1_000_000);
    let config = ProducerConfig::new(7, vec![1, 2, 3]);
    let ttl = Duration::from_millis(config.route_ttl_ms);
    let mut producer = producer_with_routes(config, now);
    let answer_sends = |producer: &mut Producer, at: Instant| {
        let mut routes_asked = false;
        while let Some((_, id, request)) = producer.poll_request() {
            match request {
                Request::Send { queue, .. } => {
                    let sent = Response::Sent {
                        queue,
                        base_offset: 0,
                        duplicate: false,
                    };
                    producer.handle_response(at, id, sent);
                }
                Request::Route { .. } => routes_asked = true,
                other => panic!("{other:?}"),
            }
        }
        routes_asked
    };
    assert!(!answer_sends(&mut producer, now));
    let message = || vec![Message::with_body(Bytes::from("m"))];
    let young = now + ttl - Duration::from_millis(1);
    producer.send(young, "orders", message());
    assert!(
        !answer_sends(&mut producer, young),
        "the cached routes serve"
    );
    let old = now + ttl;
    producer.send(old, "orders", message());
    assert!(
        answer_sends(&mut producer, old),
        "the routes are asked for again"
    );
}

/// Answers every request the producer has sent: route requests with `orders_routes`, Sends
/// as written. Returns each Send's node and broker group.
fn answer_all(producer: &mut Producer, now: Instant) -> Vec<(crate::raft::NodeId, u64)> {
    let mut sends = Vec::new();
    while let Some((node, id, request)) = producer.poll_request() {
        match request {
            Request::Send { broker, queue, .. } => {
                sends.push((node, broker));
                let sent = Response::Sent {
                    queue,
                    base_offset: 0,
                    duplicate: false,
                };
                producer.handle_response(now, id, sent);
            }
            Request::Route { .. } => producer.handle_response(now, id, orders_routes()),
            other => panic!("{other:?}"),
        }
    }
    while producer.poll_result().is_some() {}
    sends
}

fn one_message() -> Vec<Message> {
    vec![Message::with_body(Bytes::from("m"))]
}

/// Successive sends take the topic's queues in turn (groups 1 and 2 alternate), each to the
/// leader the routes name.
#[test]
fn successive_sends_take_the_topics_queues_in_turn() {
    let now = Instant::from_micros(1_000_000);
    let mut producer = producer_with_routes(ProducerConfig::new(7, vec![1, 2, 3]), now);
    let mut sends = answer_all(&mut producer, now);
    for _ in 0..3 {
        producer.send(now, "orders", one_message());
        sends.extend(answer_all(&mut producer, now));
    }
    assert!(sends.iter().all(|(node, _)| *node == 1), "{sends:?}");
    let groups: Vec<u64> = sends.iter().map(|(_, group)| *group).collect();
    assert!(
        groups == [1, 2, 1, 2] || groups == [2, 1, 2, 1],
        "groups in turn: {groups:?}"
    );
}

/// Queues keep their turn when the producer must pick a node for each send (the routes'
/// leader is suspect): node choice has a round-robin of its own. (With one shared counter, on
/// four nodes every send went to the same queue.)
#[test]
fn queues_keep_their_turn_while_nodes_are_picked() {
    let now = Instant::from_micros(1_000_000);
    let mut producer = producer_with_routes(ProducerConfig::new(7, vec![1, 2, 3, 4]), now);
    let Some((1, _, Request::Send { .. })) = producer.poll_request() else {
        panic!("the send leaves for node 1");
    };
    producer.connection_lost(now, 1);
    answer_all(&mut producer, now);
    let mut sends = Vec::new();
    for _ in 0..8 {
        producer.send(now, "orders", one_message());
        sends.extend(answer_all(&mut producer, now));
    }
    assert!(sends.iter().all(|(node, _)| *node != 1), "{sends:?}");
    let groups: Vec<u64> = sends.iter().map(|(_, group)| *group).collect();
    assert!(
        groups.windows(2).all(|pair| pair[0] != pair[1]),
        "groups in turn: {groups:?}"
    );
}

/// A broker group a request timed out in is avoided by new sends while another is available,
/// for `avoid_ms`; after that it is chosen again.
#[test]
fn a_broker_group_that_timed_out_is_avoided_for_avoid_ms() {
    let now = Instant::from_micros(1_000_000);
    let config = ProducerConfig::new(7, vec![1, 2, 3]);
    let (request_timeout, avoid) = (config.request_timeout_ms, config.avoid_ms);
    let mut producer = producer_with_routes(config, now);
    let Some((_, _, Request::Send { broker: silent, .. })) = producer.poll_request() else {
        panic!("the send leaves");
    };
    let t = now + Duration::from_millis(request_timeout);
    producer.handle_timeout(t);
    let mut groups = Vec::new();
    for _ in 0..4 {
        groups.extend(answer_all(&mut producer, t).into_iter().map(|(_, g)| g));
        producer.send(t, "orders", one_message());
    }
    groups.extend(answer_all(&mut producer, t).into_iter().map(|(_, g)| g));
    assert_eq!(groups.len(), 5, "the retry and four new sends: {groups:?}");
    assert!(
        !groups.contains(&silent),
        "group {silent} timed out: {groups:?}"
    );
    // Once avoid_ms have passed it is a candidate again.
    let later = t + Duration::from_millis(avoid);
    let mut groups = Vec::new();
    for _ in 0..4 {
        producer.send(later, "orders", one_message());
        groups.extend(answer_all(&mut producer, later).into_iter().map(|(_, g)| g));
    }
    assert!(groups.contains(&silent), "{groups:?}");
}

/// A node whose connection was lost is not sent to, even as the leader fresh routes name,
/// until `avoid_ms` later; from exactly then it is trusted again.
#[test]
fn a_suspect_leader_is_trusted_again_once_avoid_ms_have_passed() {
    let now = Instant::from_micros(1_000_000);
    let mut config = ProducerConfig::new(7, vec![1, 2, 3]);
    // Routes (naming node 1 the leader) are fetched again while node 1 is still suspect.
    config.route_ttl_ms = 1_000;
    let avoid = Duration::from_millis(config.avoid_ms);
    let mut producer = producer_with_routes(config, now);
    let Some((1, _, Request::Send { .. })) = producer.poll_request() else {
        panic!("the send leaves for node 1");
    };
    producer.connection_lost(now, 1);
    let retried = answer_all(&mut producer, now);
    assert!(retried.iter().all(|(node, _)| *node != 1), "{retried:?}");
    let just_before = now + avoid - Duration::from_micros(1);
    producer.send(just_before, "orders", one_message());
    let sends = answer_all(&mut producer, just_before);
    assert_eq!(sends.len(), 1);
    assert!(sends.iter().all(|(node, _)| *node != 1), "{sends:?}");
    let then = now + avoid;
    producer.send(then, "orders", one_message());
    let sends = answer_all(&mut producer, then);
    assert_eq!(
        sends.iter().map(|(node, _)| *node).collect::<Vec<_>>(),
        [1],
        "the routes' leader"
    );
}

/// Queue seed 612008318: each time a member takes a queue (again) its pulls carry a new,
/// higher tenure number, and its release names the tenure it ends, so the broker can refuse
/// a release of an earlier tenure that arrives after the member took the queue back.
#[test]
fn each_tenure_of_a_queue_has_its_own_number_and_the_release_names_it() {
    let q = QueueId::new("orders", 0);
    let mut now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", vec![1]), now);
    let assignment = |queues: Vec<(u64, QueueId)>| Response::Assignment {
        group: "g".into(),
        generation: 5,
        members: 2,
        queues,
    };
    let empty = Response::Pulled {
        queue: q.clone(),
        messages: Vec::new(),
        next_offset: 0,
        delivered_below: 0,
    };
    let mut tenures = Vec::new();
    let mut released = Vec::new();
    // Given the queue, then not, then again, all at generation 5.
    for queues in [vec![(1, q.clone())], Vec::new(), vec![(1, q.clone())]] {
        for _ in 0..4 {
            consumer.handle_timeout(now);
            while let Some((_, id, request)) = consumer.poll_request() {
                match request {
                    Request::Heartbeat { .. } => {
                        consumer.handle_response(now, id, assignment(queues.clone()));
                    }
                    Request::Pull { tenure, .. } => {
                        tenures.push(tenure);
                        consumer.handle_response(now, id, empty.clone());
                    }
                    Request::Release { tenure, .. } => {
                        released.push(tenure);
                        let response = Response::Released { queue: q.clone() };
                        consumer.handle_response(now, id, response);
                    }
                    _ => {}
                }
            }
            now = now + Duration::from_millis(600);
        }
    }
    tenures.dedup();
    assert_eq!(tenures.len(), 2, "pulls in two tenures: {tenures:?}");
    assert!(tenures[0] < tenures[1], "{tenures:?}");
    // (Released twice: a pull in flight when the queue went may have claimed it back.)
    assert!(
        !released.is_empty() && released.iter().all(|t| *t == tenures[0]),
        "the release ends the first tenure: {released:?}"
    );
}

/// A member of group "g" given `orders/0` (broker group 1) and `orders/1` (broker group 2) at
/// generation 5, with a pull of each sent and unanswered: returns it with the pulls' ids (in
/// that order) and the time.
fn member_of_both_queues(nodes: Vec<crate::raft::NodeId>) -> (Consumer, [RequestId; 2], Instant) {
    let now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", nodes), now);
    let (id, request) = next_request(&mut consumer, now);
    assert!(matches!(request, Request::Heartbeat { .. }));
    let assignment = Response::Assignment {
        group: "g".into(),
        generation: 5,
        members: 2,
        queues: vec![
            (1, QueueId::new("orders", 0)),
            (2, QueueId::new("orders", 1)),
        ],
    };
    consumer.handle_response(now, id, assignment);
    let mut pulls = Vec::new();
    while let Some((_, id, request)) = consumer.poll_request() {
        if let Request::Pull { queue, .. } = request {
            pulls.push((queue.queue, id));
        }
    }
    pulls.sort();
    let [(0, q0), (1, q1)] = pulls[..] else {
        panic!("a pull of each queue: {pulls:?}");
    };
    (consumer, [q0, q1], now)
}

/// A tick at `now`: the member's heartbeat is answered with `queues` at `generation`;
/// returns the other requests that leave (or were waiting to).
fn assigned(
    consumer: &mut Consumer,
    now: Instant,
    generation: u64,
    queues: Vec<(u64, QueueId)>,
) -> Vec<(crate::raft::NodeId, RequestId, Request)> {
    consumer.handle_timeout(now);
    let mut others = Vec::new();
    while let Some((node, id, request)) = consumer.poll_request() {
        if let Request::Heartbeat { .. } = request {
            let response = Response::Assignment {
                group: "g".into(),
                generation,
                members: 2,
                queues: queues.clone(),
            };
            consumer.handle_response(now, id, response);
        } else {
            others.push((node, id, request));
        }
    }
    others.extend(std::iter::from_fn(|| consumer.poll_request()));
    others
}

/// A dropped queue's deliveries not yet handed out go, and only those: another queue's stay.
/// Its release waits until the application has answered what it was handed of the queue
/// (an answer that overtook the release would be refused, and its message delivered again
/// to the next owner), and leaves once that answer is confirmed.
#[test]
fn a_dropped_queue_is_released_once_its_handed_out_deliveries_are_answered() {
    let (q0, q1) = (QueueId::new("orders", 0), QueueId::new("orders", 1));
    let (mut consumer, [pull0, pull1], mut now) = member_of_both_queues(vec![1]);
    let two = Response::Pulled {
        queue: q0.clone(),
        messages: vec![(0, stored(0)), (1, stored(1))],
        next_offset: 2,
        delivered_below: 0,
    };
    consumer.handle_response(now, pull0, two);
    consumer.handle_response(now, pull1, pulled_one(&q1, 7));
    let handed = consumer.poll_delivery().expect("a delivery");
    assert_eq!((&handed.queue, handed.offset), (&q0, 0));
    // orders/0 goes; orders/1 stays.
    now = now + Duration::from_millis(1_000);
    let sent = assigned(&mut consumer, now, 6, vec![(2, q1.clone())]);
    let releases = |sent: &[(crate::raft::NodeId, RequestId, Request)]| {
        sent.iter()
            .filter(|(_, _, r)| matches!(r, Request::Release { .. }))
            .count()
    };
    assert_eq!(releases(&sent), 0, "a delivery is unanswered: {sent:?}");
    let left: Vec<(QueueId, u64)> = std::iter::from_fn(|| consumer.poll_delivery())
        .map(|d| (d.queue, d.offset))
        .collect();
    assert_eq!(left, [(q1.clone(), 7)], "orders/0's second message went");
    now = now + Duration::from_millis(100);
    consumer.handle_timeout(now);
    let sent: Vec<_> = std::iter::from_fn(|| consumer.poll_request()).collect();
    assert_eq!(releases(&sent), 0, "still unanswered: {sent:?}");
    // Answered: the ack leaves first, the release once the ack is confirmed.
    consumer.answer(now, &handed, AckStatus::Success);
    let sent: Vec<_> = std::iter::from_fn(|| consumer.poll_request()).collect();
    assert_eq!(releases(&sent), 0, "the ack is not confirmed yet: {sent:?}");
    let Some((_, ack, _)) = sent
        .iter()
        .find(|(_, _, r)| matches!(r, Request::Ack { queue, .. } if *queue == q0))
    else {
        panic!("the answer leaves: {sent:?}");
    };
    let acked = Response::Acked {
        queue: q0.clone(),
        consume_offset: 1,
    };
    consumer.handle_response(now, *ack, acked);
    let sent: Vec<_> = std::iter::from_fn(|| consumer.poll_request()).collect();
    assert!(
        sent.iter().any(
            |(_, _, r)| matches!(r, Request::Release { queue, generation: 5, .. } if *queue == q0)
        ),
        "{sent:?}"
    );
}

/// A member that held `orders/0` at generation 5 (a pull sent) and lost it at generation 6:
/// returns it with the release that left, where to, and the time.
fn member_releasing(
    nodes: Vec<crate::raft::NodeId>,
) -> (Consumer, crate::raft::NodeId, RequestId, Instant) {
    let q = QueueId::new("orders", 0);
    let mut now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", nodes), now);
    let sent = assigned(&mut consumer, now, 5, vec![(1, q.clone())]);
    assert!(
        sent.iter()
            .any(|(_, _, r)| matches!(r, Request::Pull { .. })),
        "{sent:?}"
    );
    now = now + Duration::from_millis(1_000);
    let sent = assigned(&mut consumer, now, 6, Vec::new());
    let Some((node, release, _)) = sent
        .into_iter()
        .find(|(_, _, r)| matches!(r, Request::Release { queue, .. } if *queue == q))
    else {
        panic!("the queue is released");
    };
    (consumer, node, release, now)
}

/// A release answered by a node that does not lead the broker group goes again to the node
/// the answer names.
#[test]
fn a_release_bounced_with_a_hint_goes_again_to_the_hinted_node() {
    let (mut consumer, node, release, now) = member_releasing(vec![1, 2, 3, 4, 5]);
    let hinted = [4, 2].into_iter().find(|n| *n != node).expect("a node");
    let bounce = Response::NotLeader {
        group: 1,
        leader_hint: Some(hinted),
    };
    consumer.handle_response(now, release, bounce);
    let mut to = Vec::new();
    for ms in 0..=200 {
        let t = now + Duration::from_millis(ms);
        consumer.handle_timeout(t);
        while let Some((node, _, request)) = consumer.poll_request() {
            if matches!(request, Request::Release { .. }) {
                to.push(node);
            }
        }
    }
    assert_eq!(
        to,
        [hinted],
        "the release goes again, once, to the hinted node"
    );
}

/// While the broker group's nodes bounce a release (each naming another as the leader, as
/// stale hints do during an election, or saying they are busy), the release goes again after
/// a pause, not once per round trip.
#[test]
fn a_bounced_release_waits_before_going_again() {
    for bounce in [
        Response::NotLeader {
            group: 1,
            leader_hint: Some(2),
        },
        Response::Busy,
    ] {
        let (mut consumer, _, release, now) = member_releasing(vec![1, 2, 3]);
        let mut pending = vec![release];
        let mut sent = 1;
        let end = now + Duration::from_millis(100);
        let mut t = now;
        while t <= end && sent < 1_000 {
            for id in std::mem::take(&mut pending) {
                let bounce = match &bounce {
                    Response::NotLeader { leader_hint, .. } => Response::NotLeader {
                        group: 1,
                        // Node 2 names node 3, node 3 names node 2.
                        leader_hint: leader_hint.map(|_| if sent % 2 == 0 { 2 } else { 3 }),
                    },
                    other => other.clone(),
                };
                consumer.handle_response(t, id, bounce);
            }
            consumer.handle_timeout(t);
            while let Some((_, id, request)) = consumer.poll_request() {
                if matches!(request, Request::Release { .. }) && sent < 1_000 {
                    sent += 1;
                    pending.push(id);
                }
            }
            if pending.is_empty() {
                t = t + Duration::from_millis(1);
            }
        }
        // NotLeader: every 10 ms, 11 in 100 ms; Busy: every 100 ms, 2.
        assert!(
            (2..=11).contains(&sent),
            "{sent} releases in 100 ms after {bounce:?}"
        );
    }
}

/// A pull sent in the member's first tenure of a queue is still on its way when the member,
/// having let the queue go and been given it back, loses it again before it pulled in its
/// second tenure: that pull may yet claim the queue, so the queue is released under the
/// pull's generation, naming the newest tenure.
#[test]
fn a_queue_dropped_with_a_pull_of_an_earlier_tenure_in_flight_is_released() {
    let q = QueueId::new("orders", 0);
    let mut now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", vec![1]), now);
    let sent = assigned(&mut consumer, now, 5, vec![(1, q.clone())]);
    let Some(Request::Pull { tenure: first, .. }) = sent.into_iter().map(|(_, _, r)| r).next()
    else {
        panic!("a pull");
    };
    let mut releases = Vec::new();
    for (generation, queues) in [(6, Vec::new()), (7, vec![(1, q.clone())]), (8, Vec::new())] {
        now = now + Duration::from_millis(1_000);
        for (_, id, request) in assigned(&mut consumer, now, generation, queues) {
            match request {
                Request::Release {
                    generation, tenure, ..
                } => {
                    releases.push((generation, tenure));
                    let response = Response::Released { queue: q.clone() };
                    consumer.handle_response(now, id, response);
                }
                other => panic!("only releases leave, the pull being in flight: {other:?}"),
            }
        }
    }
    assert_eq!(releases.len(), 2, "{releases:?}");
    assert_eq!(releases[0], (5, first));
    assert_eq!(releases[1].0, 5, "the pull's generation: {releases:?}");
    assert!(releases[1].1 > first, "the second tenure's: {releases:?}");
}

/// A queue's release names the tenure of that queue's pulls, not that of another queue's pull
/// in flight (a member numbers its tenures of all its queues in one sequence).
#[test]
fn a_release_names_its_own_queues_tenure_not_another_queues() {
    let (q0, q1) = (QueueId::new("orders", 0), QueueId::new("orders", 1));
    let (mut consumer, [pull0, _], mut now) = member_of_both_queues(vec![1]);
    consumer.handle_response(now, pull0, pulled_one(&q0, 0));
    let delivery = consumer.poll_delivery().expect("a delivery");
    consumer.answer(now, &delivery, AckStatus::Success);
    let mut tenure0 = None;
    while let Some((_, id, request)) = consumer.poll_request() {
        match request {
            Request::Ack { .. } => {
                let acked = Response::Acked {
                    queue: q0.clone(),
                    consume_offset: 1,
                };
                consumer.handle_response(now, id, acked);
            }
            Request::Pull { tenure, .. } => tenure0 = Some(tenure),
            _ => {}
        }
    }
    let tenure0 = tenure0.expect("orders/0 is pulled again");
    // orders/1's pull, of a later tenure, is still in flight.
    now = now + Duration::from_millis(1_000);
    let sent = assigned(&mut consumer, now, 6, vec![(2, q1.clone())]);
    let released: Vec<(u64, u64)> = sent
        .iter()
        .filter_map(|(_, _, r)| match r {
            Request::Release {
                queue,
                generation,
                tenure,
                ..
            } if *queue == q0 => Some((*generation, *tenure)),
            _ => None,
        })
        .collect();
    assert_eq!(released, [(5, tenure0)]);
}

/// A pull's answer: nothing to hand out.
fn pulled_nothing(q: &QueueId) -> Response {
    Response::Pulled {
        queue: q.clone(),
        messages: Vec::new(),
        next_offset: 0,
        delivered_below: 0,
    }
}

/// A pull's answer: the messages at offsets 0 and 1, handed out for the first time.
fn pulled_two(q: &QueueId) -> Response {
    Response::Pulled {
        queue: q.clone(),
        messages: vec![(0, stored(0)), (1, stored(1))],
        next_offset: 2,
        delivered_below: 0,
    }
}

/// The requests waiting to leave.
fn sent_requests(consumer: &mut Consumer) -> Vec<Request> {
    std::iter::from_fn(|| consumer.poll_request())
        .map(|(_, _, r)| r)
        .collect()
}

/// A member of group "g" (its configuration changed by `configure`) given `orders/0` of broker
/// group 1 at generation 5, with its first pull sent and unanswered: returns it with the
/// pull's id and the time.
fn member_pulling(configure: impl FnOnce(&mut ConsumerConfig)) -> (Consumer, RequestId, Instant) {
    let now = Instant::from_micros(1_000_000);
    let mut config = ConsumerConfig::new("g", "m", "orders", vec![1]);
    configure(&mut config);
    let mut consumer = Consumer::new(config, now);
    let sent = assigned(&mut consumer, now, 5, vec![(1, QueueId::new("orders", 0))]);
    let [(_, pull, Request::Pull { generation: 5, .. })] = &sent[..] else {
        panic!("one pull leaves: {sent:?}");
    };
    (consumer, *pull, now)
}

/// From `from` to `to`, a tick every millisecond; every pull that leaves is answered at once
/// with `answer`. Returns when each pull left, in milliseconds after `from` (at most 100: a
/// member that pulls again at once stops there).
fn pulls_answered(
    consumer: &mut Consumer,
    from: Instant,
    to: Instant,
    answer: impl Fn() -> Response,
) -> Vec<u64> {
    let mut sent = Vec::new();
    let mut t = from;
    while t <= to && sent.len() < 100 {
        consumer.handle_timeout(t);
        while let Some((_, id, request)) = consumer.poll_request() {
            if matches!(request, Request::Pull { .. }) && sent.len() < 100 {
                sent.push(t.saturating_since(from).as_millis() as u64);
                consumer.handle_response(t, id, answer());
            }
        }
        t = t + Duration::from_millis(1);
    }
    sent
}

/// A delivery says it was redelivered exactly when the broker handed it to the group before
/// (below the answer's `delivered_below`) or it came back from a retry queue.
#[test]
fn a_delivery_is_redelivered_exactly_when_handed_out_before_or_back_from_a_retry_queue() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, now) = member_pulling(|_| {});
    let retried = crate::broker::StoredMessage {
        reconsume_times: 1,
        ..stored(32)
    };
    let messages = vec![
        (30, stored(30)),
        (31, stored(31)),
        (32, retried),
        (33, stored(33)),
    ];
    let response = Response::Pulled {
        queue: q.clone(),
        messages,
        next_offset: 34,
        delivered_below: 31,
    };
    consumer.handle_response(now, pull, response);
    let redelivered: Vec<(u64, bool)> = std::iter::from_fn(|| consumer.poll_delivery())
        .map(|d| (d.offset, d.redelivered))
        .collect();
    assert_eq!(
        redelivered,
        [(30, true), (31, false), (32, true), (33, false)]
    );
}

/// While the broker group's nodes know no leader, a pull goes again after a pause that
/// doubles with each bounce (10, 20, 40, 80 ms, no more), not once per round trip; a pull
/// served ends the run, and the next bounce pauses 10 ms again.
#[test]
fn pulls_bounced_with_no_leader_known_wait_longer_each_time_until_one_is_served() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, now) = member_pulling(|_| {});
    let bounce = || Response::NotLeader {
        group: 1,
        leader_hint: None,
    };
    consumer.handle_response(now, pull, bounce());
    let t = now + Duration::from_millis(1);
    let sent = pulls_answered(&mut consumer, t, t + Duration::from_millis(300), bounce);
    // After 10 ms, then 20, 40, 80 and 80 ms more.
    assert_eq!(sent, [9, 29, 69, 149, 229], "pulls left at {sent:?} ms");
    // Served (nothing to hand out), then bounced: 10 ms after the empty pull, then 10 ms.
    let t = t + Duration::from_millis(301);
    let empty = || pulled_nothing(&q);
    let sent = pulls_answered(&mut consumer, t, t + Duration::from_millis(100), empty);
    assert!(!sent.is_empty(), "a pull leaves");
    let t = t + Duration::from_millis(101);
    let sent = pulls_answered(&mut consumer, t, t + Duration::from_millis(20), bounce);
    assert_eq!(sent.len(), 2, "pulls left at {sent:?} ms");
    assert_eq!(sent[1] - sent[0], 10, "pulls left at {sent:?} ms");
}

/// A pull answered with nothing to hand out goes again after 10 ms, and one the broker was
/// too busy for after 500 ms: neither at once.
#[test]
fn a_pull_answered_empty_or_busy_goes_again_after_a_pause() {
    let q = QueueId::new("orders", 0);
    let empty = || pulled_nothing(&q);
    let (mut consumer, pull, now) = member_pulling(|_| {});
    consumer.handle_response(now, pull, empty());
    let sent = pulls_answered(&mut consumer, now, now + Duration::from_millis(50), empty);
    assert_eq!(sent, [10, 20, 30, 40, 50], "pulls left at {sent:?} ms");
    let (mut consumer, pull, now) = member_pulling(|_| {});
    consumer.handle_response(now, pull, Response::Busy);
    let end = now + Duration::from_millis(900);
    let sent = pulls_answered(&mut consumer, now, end, || Response::Busy);
    assert_eq!(sent, [500], "pulls left at {sent:?} ms");
}

/// A member whose first pull of `orders/0`, sent under its generation (5), the broker revoked:
/// returns it and the time.
fn member_whose_pull_was_revoked() -> (Consumer, Instant) {
    let (mut consumer, pull, now) = member_pulling(|_| {});
    let revoked = Response::Revoked {
        queue: QueueId::new("orders", 0),
        reason: "another member holds it".into(),
    };
    consumer.handle_response(now, pull, revoked);
    (consumer, now)
}

/// A pull the broker revokes, sent under the member's generation, means another member holds
/// the queue: it is dropped (and released), the member asks for the new assignment at once,
/// and it does not pull the queue again while the assignment it has still names it.
#[test]
fn a_pull_revoked_under_the_members_generation_drops_the_queue_until_a_new_assignment() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, now) = member_whose_pull_was_revoked();
    let events: Vec<ConsumerEvent> = std::iter::from_fn(|| consumer.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ConsumerEvent::Revoked { queue, .. } if *queue == q)),
        "{events:?}"
    );
    // The heartbeat's answer still names the queue; the release is answered.
    let mut sent = Vec::new();
    while let Some((_, id, request)) = consumer.poll_request() {
        let response = match request {
            Request::Heartbeat { .. } => Response::Assignment {
                group: "g".into(),
                generation: 5,
                members: 2,
                queues: vec![(1, q.clone())],
            },
            _ => Response::Released { queue: q.clone() },
        };
        consumer.handle_response(now, id, response);
        sent.push(request);
    }
    assert!(
        matches!(
            &sent[..],
            [
                Request::Release { generation: 5, .. },
                Request::Heartbeat { .. }
            ]
        ),
        "the queue is released and a heartbeat leaves at once: {sent:?}"
    );
    let sent = pulls_answered(&mut consumer, now, now + Duration::from_millis(900), || {
        unreachable!("no pull")
    });
    assert!(sent.is_empty(), "pulls left at {sent:?} ms");
    let later = now + Duration::from_millis(1_000);
    let sent = assigned(&mut consumer, later, 6, vec![(1, q.clone())]);
    assert!(
        sent.iter()
            .any(|(_, _, r)| matches!(r, Request::Pull { generation: 6, .. })),
        "the new assignment's queue is pulled: {sent:?}"
    );
}

/// A pull revoked that was sent under a generation older than the member's says nothing about
/// the newer one: the queue stays the member's and is pulled again at once.
#[test]
fn a_pull_revoked_under_an_older_generation_leaves_the_queue_with_the_member() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, mut now) = member_pulling(|_| {});
    now = now + Duration::from_millis(1_000);
    let sent = assigned(&mut consumer, now, 6, vec![(1, q.clone())]);
    assert!(sent.is_empty(), "the pull is in flight: {sent:?}");
    let revoked = Response::Revoked {
        queue: q.clone(),
        reason: "an older generation".into(),
    };
    consumer.handle_response(now, pull, revoked);
    let sent = sent_requests(&mut consumer);
    assert!(
        matches!(
            &sent[..],
            [Request::Pull {
                generation: 6,
                from: 0,
                ..
            }]
        ),
        "pulled again at once, and not released: {sent:?}"
    );
    assert_eq!(consumer.owned().collect::<Vec<_>>(), [&(1, q)]);
}

/// A pull sent before the member let its queue go may have claimed the queue back on the
/// broker if it is answered with messages: the member releases the queue again, whether the
/// answer comes while the release is on its way or after it was answered. The messages are not
/// handed out.
#[test]
fn a_pull_served_after_its_queue_was_let_go_makes_the_member_release_it_again() {
    let q = QueueId::new("orders", 0);
    for pull_answered_first in [true, false] {
        let (mut consumer, pull, mut now) = member_pulling(|_| {});
        now = now + Duration::from_millis(1_000);
        let sent = assigned(&mut consumer, now, 6, Vec::new());
        let [(_, release, Request::Release { tenure, .. })] = &sent[..] else {
            panic!("the queue is released: {sent:?}");
        };
        let (release, tenure) = (*release, *tenure);
        let released = Response::Released { queue: q.clone() };
        if pull_answered_first {
            consumer.handle_response(now, pull, pulled_one(&q, 0));
            consumer.handle_response(now, release, released);
        } else {
            consumer.handle_response(now, release, released);
            consumer.handle_response(now, pull, pulled_one(&q, 0));
        }
        let sent = sent_requests(&mut consumer);
        assert!(
            matches!(&sent[..], [Request::Release { generation: 5, tenure: t, .. }] if *t == tenure),
            "released again (pull answered first: {pull_answered_first}): {sent:?}"
        );
        assert!(consumer.poll_delivery().is_none());
    }
}

/// No pull leaves while `unanswered_max` messages of the queue wait for the application's
/// answer; one answer lets the next pull go.
#[test]
fn no_pull_leaves_while_unanswered_max_messages_wait_for_an_answer() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, now) = member_pulling(|config| config.unanswered_max = 2);
    consumer.handle_response(now, pull, pulled_two(&q));
    let sent = pulls_answered(&mut consumer, now, now + Duration::from_millis(100), || {
        unreachable!("no pull")
    });
    assert!(sent.is_empty(), "pulls left at {sent:?} ms");
    let first = consumer.poll_delivery().expect("a delivery");
    let later = now + Duration::from_millis(100);
    consumer.answer(later, &first, AckStatus::Success);
    let sent = sent_requests(&mut consumer);
    assert!(
        sent.iter()
            .any(|r| matches!(r, Request::Pull { from: 2, .. })),
        "{sent:?}"
    );
}

/// A queue dropped between two pulls (none in flight) was claimed by the last one: it is
/// released under that pull's generation.
#[test]
fn a_queue_dropped_between_pulls_is_released_under_the_last_pulls_generation() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, start) = member_pulling(|_| {});
    // The heartbeat a second later leaves with the pull in flight; the pull is answered first.
    let now = start + Duration::from_millis(1_000);
    let (heartbeat, request) = next_request(&mut consumer, now);
    assert!(matches!(request, Request::Heartbeat { .. }), "{request:?}");
    consumer.handle_response(now, pull, pulled_nothing(&q));
    assert!(consumer.poll_request().is_none(), "the next pull waits");
    let assignment = Response::Assignment {
        group: "g".into(),
        generation: 6,
        members: 2,
        queues: Vec::new(),
    };
    consumer.handle_response(now, heartbeat, assignment);
    let sent = sent_requests(&mut consumer);
    assert!(
        matches!(&sent[..], [Request::Release { generation: 5, .. }]),
        "{sent:?}"
    );
}

/// A pull asks for `pull_batch` messages and leaves room in bytes for a batch of them, not
/// for one message at a time.
#[test]
fn a_pull_asks_for_a_batch_of_messages_with_room_for_more_than_one() {
    let now = Instant::from_micros(1_000_000);
    let config = ConsumerConfig::new("g", "m", "orders", vec![1]);
    let pull_batch = config.pull_batch;
    let mut consumer = Consumer::new(config, now);
    let sent = assigned(&mut consumer, now, 5, vec![(1, QueueId::new("orders", 0))]);
    let [
        (
            _,
            _,
            Request::Pull {
                messages_max,
                bytes_max,
                ..
            },
        ),
    ] = &sent[..]
    else {
        panic!("a pull: {sent:?}");
    };
    assert_eq!(*messages_max, pull_batch);
    assert!(*bytes_max >= 1 << 20, "bytes_max {bytes_max}");
}

/// A member answers the message at offset 3 with `status`, and for a second every send of that
/// answer gets `response`: returns the member and how often the answer was sent (at most 100).
fn answer_sent_against(status: AckStatus, response: Response) -> (Consumer, usize) {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, now) = member_pulling(|_| {});
    consumer.handle_response(now, pull, pulled_one(&q, 3));
    let delivery = consumer.poll_delivery().expect("a delivery");
    consumer.answer(now, &delivery, status);
    let mut sent = 0;
    for ms in 0..=1_000 {
        let t = now + Duration::from_millis(ms);
        consumer.handle_timeout(t);
        while let Some((_, id, request)) = consumer.poll_request() {
            let answer = match request {
                Request::Ack { offsets, .. } => offsets == [3],
                Request::ReconsumeLater { offset, .. } => offset == 3,
                _ => false,
            };
            if answer && sent < 100 {
                sent += 1;
                consumer.handle_response(t, id, response.clone());
            }
        }
    }
    (consumer, sent)
}

/// An answer the broker refuses for good (the offset is not there) is not sent again.
#[test]
fn an_answer_the_broker_refuses_is_not_sent_again() {
    let refused = Response::Refused {
        reason: "no such offset".into(),
    };
    let (consumer, sent) = answer_sent_against(AckStatus::Success, refused);
    assert_eq!(sent, 1);
    assert_eq!(consumer.unconfirmed(), 0);
}

/// A member that leaves says goodbye to the group once, after its queues are released and
/// every pull it had in flight is answered (one may have claimed its queue back, to be
/// released again first), and sends nothing once the group confirmed it left.
#[test]
fn a_leaving_member_says_goodbye_once_its_pulls_are_answered_and_its_queues_released() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, now) = member_pulling(|_| {});
    consumer.leave(now);
    let requests = |consumer: &mut Consumer| -> Vec<(RequestId, Request)> {
        std::iter::from_fn(|| consumer.poll_request())
            .map(|(_, id, r)| (id, r))
            .collect()
    };
    let sent = requests(&mut consumer);
    let [(release, Request::Release { generation: 5, .. })] = &sent[..] else {
        panic!("the queue is released: {sent:?}");
    };
    let released = || Response::Released { queue: q.clone() };
    consumer.handle_response(now, *release, released());
    let sent = requests(&mut consumer);
    assert!(sent.is_empty(), "the pull is in flight: {sent:?}");
    // The pull is served: it may have claimed the queue, which is released again.
    consumer.handle_response(now, pull, pulled_nothing(&q));
    let sent = requests(&mut consumer);
    let [(release, Request::Release { .. })] = &sent[..] else {
        panic!("released again, no goodbye yet: {sent:?}");
    };
    consumer.handle_response(now, *release, released());
    let sent = requests(&mut consumer);
    let [(leave, Request::Leave { .. })] = &sent[..] else {
        panic!("the goodbye: {sent:?}");
    };
    assert!(!consumer.has_left());
    consumer.handle_response(now, *leave, Response::Left { group: "g".into() });
    assert!(consumer.has_left());
    for ms in 0..=5_000 {
        consumer.handle_timeout(now + Duration::from_millis(ms));
    }
    let sent = requests(&mut consumer);
    assert!(sent.is_empty(), "nothing once gone: {sent:?}");
}

/// A `ReconsumeLater` the broker confirms (the message moved to a retry queue) is said as
/// `Requeued` and not sent again.
#[test]
fn a_reconsume_later_the_broker_requeued_is_confirmed_and_not_sent_again() {
    let requeued = Response::Requeued {
        to: QueueId::new("%RETRY%g", 0),
        offset: 0,
        dead_letter: false,
    };
    let (mut consumer, sent) = answer_sent_against(AckStatus::ReconsumeLater, requeued);
    assert_eq!(sent, 1);
    assert_eq!(consumer.unconfirmed(), 0);
    let events: Vec<ConsumerEvent> = std::iter::from_fn(|| consumer.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(
            e,
            ConsumerEvent::Requeued {
                offset: 3,
                dead_letter: false,
                ..
            }
        )),
        "{events:?}"
    );
}

/// Answers to one broker group bounced with no leader known wait together: one bounced while
/// the group's answers wait joins that wait without lengthening it, and one bounced just as the
/// wait ends starts a new, longer one instead of going again at once.
#[test]
fn an_answer_bounced_during_its_groups_wait_joins_it_and_one_bounced_as_it_ends_waits_again() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, pull, now) = member_pulling(|_| {});
    consumer.handle_response(now, pull, pulled_two(&q));
    let acks = |consumer: &mut Consumer| -> Vec<RequestId> {
        std::iter::from_fn(|| consumer.poll_request())
            .filter_map(|(_, id, r)| matches!(r, Request::Ack { .. }).then_some(id))
            .collect()
    };
    // Each answer leaves on its own.
    let mut sent = Vec::new();
    while let Some(delivery) = consumer.poll_delivery() {
        consumer.answer(now, &delivery, AckStatus::Success);
        sent.extend(acks(&mut consumer));
    }
    let [a, b] = sent[..] else {
        panic!("two acks: {sent:?}");
    };
    let bounce = || Response::NotLeader {
        group: 1,
        leader_hint: None,
    };
    let ms = |ms| now + Duration::from_millis(ms);
    // A waits 10 ms; B, bounced 5 ms later, waits with it.
    consumer.handle_response(now, a, bounce());
    consumer.handle_response(ms(5), b, bounce());
    let mut again = None;
    for t in 5..=40 {
        consumer.handle_timeout(ms(t));
        let sent = acks(&mut consumer);
        if !sent.is_empty() {
            again = Some((t, sent));
            break;
        }
    }
    let Some((10, sent)) = again else {
        panic!("both go again after 10 ms: {again:?}");
    };
    let [a, b] = sent[..] else {
        panic!("two acks: {sent:?}");
    };
    // A bounces again at once (a wait of 20 ms, to 30 ms); B just as that wait ends.
    consumer.handle_response(ms(10), a, bounce());
    consumer.handle_response(ms(30), b, bounce());
    assert!(
        acks(&mut consumer).is_empty(),
        "a bounce as the wait ends waits again"
    );
    let mut again = None;
    for t in 30..=100 {
        consumer.handle_timeout(ms(t));
        if !acks(&mut consumer).is_empty() {
            again = Some(t);
            break;
        }
    }
    assert_eq!(again, Some(70), "a wait of 40 ms");
}

/// Answers that wait to go (their broker group's answers bounced with no leader known) are
/// batched: successes of one queue under one generation in one `Ack`; a `ReconsumeLater`, or
/// a success of another queue, goes on its own.
#[test]
fn answers_waiting_to_go_are_batched_per_queue_and_a_reconsume_later_goes_alone() {
    let (q0, q1) = (QueueId::new("orders", 0), QueueId::new("orders", 1));
    let now = Instant::from_micros(1_000_000);
    let mut consumer = Consumer::new(ConsumerConfig::new("g", "m", "orders", vec![1]), now);
    let both = vec![(1, q0.clone()), (1, q1.clone())];
    for (_, id, request) in assigned(&mut consumer, now, 5, both) {
        let Request::Pull { queue, .. } = request else {
            panic!("{request:?}");
        };
        let response = if queue == q0 {
            pulled_below_31(&q0, vec![(0, stored(0)), (1, stored(1)), (2, stored(2))])
        } else {
            pulled_one(&q1, 7)
        };
        consumer.handle_response(now, id, response);
    }
    let deliveries: Vec<Delivery> = std::iter::from_fn(|| consumer.poll_delivery()).collect();
    let [d0, d1, d2, d7] = &deliveries[..] else {
        panic!("four deliveries: {deliveries:?}");
    };
    // The first answer bounces: the group's answers wait 10 ms.
    consumer.answer(now, d0, AckStatus::Success);
    let Some((_, ack, _)) = std::iter::from_fn(|| consumer.poll_request())
        .find(|(_, _, r)| matches!(r, Request::Ack { .. }))
    else {
        panic!("the ack leaves");
    };
    let bounce = Response::NotLeader {
        group: 1,
        leader_hint: None,
    };
    consumer.handle_response(now, ack, bounce);
    consumer.answer(now, d1, AckStatus::Success);
    consumer.answer(now, d2, AckStatus::ReconsumeLater);
    consumer.answer(now, d7, AckStatus::Success);
    consumer.handle_timeout(now + Duration::from_millis(10));
    let mut answers: Vec<(u32, &str, Vec<u64>)> = sent_requests(&mut consumer)
        .into_iter()
        .filter_map(|r| match r {
            Request::Ack { queue, offsets, .. } => Some((queue.queue, "ack", offsets)),
            Request::ReconsumeLater { queue, offset, .. } => {
                Some((queue.queue, "later", vec![offset]))
            }
            _ => None,
        })
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        [
            (0, "ack", vec![0, 1]),
            (0, "later", vec![2]),
            (1, "ack", vec![7])
        ]
    );
}

/// A rewind with a pull in flight takes effect when that pull is over, and is said then, once.
#[test]
fn a_rewind_is_said_once_when_it_takes_effect() {
    let (mut consumer, pull_in_flight, now) = member_whose_answers_were_refused();
    let rewound = |consumer: &mut Consumer| {
        std::iter::from_fn(|| consumer.poll_event())
            .filter(|e| matches!(e, ConsumerEvent::Rewound { .. }))
            .count()
    };
    assert_eq!(rewound(&mut consumer), 0, "the pull is in flight");
    let bounced = Response::NotLeader {
        group: 1,
        leader_hint: Some(1),
    };
    consumer.handle_response(now, pull_in_flight, bounced);
    assert_eq!(rewound(&mut consumer), 1);
}

/// A queue a broker revoked is not taken again while the assignment, at the same generation,
/// still names it, until two heartbeats have passed: then it is (the queue may be free).
#[test]
fn a_revoked_queue_still_assigned_is_taken_again_two_heartbeats_later() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, now) = member_whose_pull_was_revoked();
    let mut pulled_at = Vec::new();
    for ms in (0..=2_000).step_by(500) {
        let t = now + Duration::from_millis(ms);
        for (_, id, request) in assigned(&mut consumer, t, 5, vec![(1, q.clone())]) {
            match request {
                Request::Release { .. } => {
                    consumer.handle_response(t, id, Response::Released { queue: q.clone() });
                }
                Request::Pull { .. } => pulled_at.push(ms),
                _ => {}
            }
        }
    }
    assert_eq!(pulled_at, [2_000]);
}

/// The member says it rebalanced when the queues it owns change (one given, one taken away),
/// not when an assignment changes nothing.
#[test]
fn a_rebalance_is_said_when_the_owned_queues_change_and_only_then() {
    let q = QueueId::new("orders", 0);
    let (mut consumer, _, mut now) = member_pulling(|_| {});
    // Said since the start: the queue given at generation 5; then the same assignment again,
    // and one without the queue.
    let mut said = Vec::new();
    for (generation, queues) in [(5, vec![(1, q.clone())]), (6, Vec::new())] {
        now = now + Duration::from_millis(1_000);
        assigned(&mut consumer, now, generation, queues);
        said.extend(
            std::iter::from_fn(|| consumer.poll_event()).filter_map(|e| match e {
                ConsumerEvent::Rebalanced { generation, owned } => Some((generation, owned.len())),
                _ => None,
            }),
        );
    }
    assert_eq!(said, [(5, 1), (6, 0)]);
}
