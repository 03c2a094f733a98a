use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::broker::{Message, QueueId};
use crate::node::protocol::{Request, Response, Route};
use crate::time::Instant;

/// A producer whose routes name node 1 as the leader of both broker groups, with a send to
/// node 1 in flight.
fn producer_with_a_send_to_node_1() -> (Producer, Instant) {
    let now = Instant::from_micros(1_000_000);
    let mut producer = Producer::new(ProducerConfig::new(7, vec![1, 2, 3]));
    producer.send(now, "orders", vec![Message::with_body(Bytes::from("m"))]);
    let Some((_, route_request, Request::Route { .. })) = producer.poll_request() else {
        panic!("a producer asks for routes first");
    };
    let routes = (0..2)
        .map(|q| Route {
            queue: QueueId::new("orders", q),
            group: u64::from(q) + 1,
            leader: Some(1),
        })
        .collect();
    let response = Response::Routes {
        topic: "orders".into(),
        routes,
    };
    producer.handle_response(now, route_request, response);
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
