use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn topic(state: &mut BrokerState, name: &str, queues: u32) {
    let outcome = state.apply(Command::CreateQueues {
        queues: (0..queues).map(|q| QueueId::new(name, q)).collect(),
    });
    assert_eq!(outcome, Outcome::QueuesCreated);
}

fn append(
    state: &mut BrokerState,
    queue: u32,
    producer_id: u64,
    first_seq: u64,
    n: usize,
) -> Outcome {
    state.apply(Command::Append {
        queue: QueueId::new("orders", queue),
        producer_id,
        first_seq,
        messages: (0..n)
            .map(|i| {
                Message::with_body(Bytes::from(format!(
                    "p{producer_id} s{}",
                    first_seq + i as u64
                )))
            })
            .collect(),
        stamp_ms: 1_000,
    })
}

fn appended_at(outcome: Outcome) -> (QueueId, Offset, bool) {
    match outcome {
        Outcome::Appended {
            queue,
            base_offset,
            duplicate,
        } => (queue, base_offset, duplicate),
        other => panic!("not appended: {other:?}"),
    }
}

fn orders() -> BrokerState {
    let mut state = BrokerState::new(BrokerConfig::default());
    topic(&mut state, "orders", 2);
    state
}

#[test]
fn appends_get_consecutive_offsets_and_a_retry_gets_the_original_ones() {
    let mut state = orders();
    assert_eq!(
        appended_at(append(&mut state, 0, 7, 0, 3)),
        (QueueId::new("orders", 0), 0, false)
    );
    assert_eq!(
        appended_at(append(&mut state, 0, 8, 0, 2)),
        (QueueId::new("orders", 0), 3, false)
    );
    // The retry names the other queue of this group: it still gets the original place.
    assert_eq!(
        appended_at(append(&mut state, 1, 7, 0, 3)),
        (QueueId::new("orders", 0), 0, true)
    );
    assert_eq!(state.queue_len(&QueueId::new("orders", 0)), Some(5));
    assert_eq!(state.queue_len(&QueueId::new("orders", 1)), Some(0));
    let stored = state.message(&QueueId::new("orders", 0), 4).cloned();
    assert_eq!(stored.map(|s| (s.producer_id, s.seq)), Some((8, 1)));
}

#[test]
fn a_batch_that_overlaps_a_written_one_or_is_too_old_is_refused() {
    let mut state = orders();
    appended_at(append(&mut state, 0, 1, 10, 5));
    assert!(matches!(
        append(&mut state, 0, 1, 12, 5),
        Outcome::Refused(Refusal::SequenceOverlap { .. })
    ));
    assert!(matches!(
        append(&mut state, 0, 1, 8, 3),
        Outcome::Refused(Refusal::SequenceOverlap { .. })
    ));
    appended_at(append(&mut state, 0, 1, 10 + DEDUP_WINDOW_SEQS * 2, 1));
    assert!(matches!(
        append(&mut state, 0, 1, 10, 5),
        Outcome::Refused(Refusal::SequenceTooOld { .. })
    ));
    assert_eq!(state.queue_len(&QueueId::new("orders", 0)), Some(6));
}

#[test]
fn sequence_numbers_near_the_largest_are_refused_or_deduplicated_without_overflow() {
    // Found by the `broker` fuzz target: `first_seq` comes from the client, and a batch
    // running past `Seq::MAX` overflowed (a panic on every replica applying the entry, or
    // wrapped sequence numbers in a release build).
    let mut state = orders();
    let mut send = |queue: u32, first_seq: Seq, n: usize| {
        state.apply(Command::Append {
            queue: QueueId::new("orders", queue),
            producer_id: 1,
            first_seq,
            messages: vec![Message::with_body("m"); n],
            stamp_ms: 1_000,
        })
    };
    assert_eq!(
        send(0, u64::MAX, 2),
        Outcome::Refused(Refusal::SequenceOverflow {
            producer_id: 1,
            seq: u64::MAX
        })
    );
    // A batch ending exactly at the largest sequence number is fine, and so is its retry;
    // one overlapping it is refused, not written again.
    assert_eq!(
        appended_at(send(0, u64::MAX, 1)),
        (QueueId::new("orders", 0), 0, false)
    );
    assert_eq!(
        appended_at(send(1, u64::MAX, 1)),
        (QueueId::new("orders", 0), 0, true)
    );
    assert!(matches!(
        send(0, u64::MAX - 1, 2),
        Outcome::Refused(Refusal::SequenceOverlap { .. })
    ));
    assert_eq!(state.queue_len(&QueueId::new("orders", 0)), Some(1));
}

#[test]
fn unknown_queues_empty_batches_and_garbage_are_refused() {
    let mut state = orders();
    assert!(matches!(
        append(&mut state, 9, 1, 0, 1),
        Outcome::Refused(Refusal::UnknownQueue(_))
    ));
    assert_eq!(
        append(&mut state, 0, 1, 0, 0),
        Outcome::Refused(Refusal::EmptyBatch)
    );
    assert!(matches!(
        state.apply_bytes(&[0xff, 0xff, 0xff, 0xff, 0xff]),
        Outcome::Refused(Refusal::Malformed(_))
    ));
    assert!(
        state
            .pull("g", &QueueId::new("nope", 0), 0, 10, 1 << 20, 0)
            .is_err()
    );
}

#[test]
fn acks_move_the_consume_offset_to_the_lowest_unacked_and_pulls_skip_acked() {
    let mut state = orders();
    let queue = QueueId::new("orders", 0);
    appended_at(append(&mut state, 0, 1, 0, 5));
    let ack = |state: &mut BrokerState, offsets: Vec<Offset>| {
        state.apply(Command::Ack {
            group: "billing".into(),
            queue: queue.clone(),
            offsets,
        })
    };
    assert_eq!(
        ack(&mut state, vec![1, 3]),
        Outcome::Acked { consume_offset: 0 }
    );
    let pulled = state
        .pull("billing", &queue, 0, 10, 1 << 20, 0)
        .unwrap_or_default();
    let offsets: Vec<_> = pulled.messages.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, vec![0, 2, 4]);
    assert_eq!(pulled.next_offset, 5);
    assert_eq!(
        ack(&mut state, vec![0, 2]),
        Outcome::Acked { consume_offset: 4 }
    );
    assert_eq!(
        ack(&mut state, vec![0]),
        Outcome::Acked { consume_offset: 4 }
    );
    assert_eq!(state.consume_offset("billing", &queue), 4);
    assert_eq!(
        state.consume_offset("audit", &queue),
        0,
        "groups are independent"
    );
    assert!(matches!(
        ack(&mut state, vec![5]),
        Outcome::Refused(Refusal::NoSuchOffset { .. })
    ));
}

#[test]
fn reconsume_later_requeues_by_delay_level_then_dead_letters() {
    let config = BrokerConfig {
        reconsume_delays_ms: vec![1_000, 5_000],
        max_reconsume: 3,
        canary: None,
    };
    let mut state = BrokerState::new(config);
    topic(&mut state, "orders", 1);
    appended_at(append(&mut state, 0, 1, 0, 1));
    let mut queue = QueueId::new("orders", 0);
    let mut offset = 0;
    let mut now_ms = 10_000;
    for attempt in 1..=3u32 {
        let outcome = state.apply(Command::ReconsumeLater {
            group: "billing".into(),
            queue: queue.clone(),
            offset,
            stamp_ms: now_ms,
        });
        let Outcome::Requeued {
            to,
            offset: at,
            dead_letter,
        } = outcome
        else {
            panic!("attempt {attempt}: {outcome:?}");
        };
        assert!(!dead_letter);
        assert_eq!(to, QueueId::retry("billing", attempt.min(2) - 1));
        // Asking twice does not requeue twice.
        let again = state.apply(Command::ReconsumeLater {
            group: "billing".into(),
            queue: queue.clone(),
            offset,
            stamp_ms: now_ms,
        });
        assert!(matches!(again, Outcome::Acked { .. }), "{again:?}");
        let delay_ms = if attempt == 1 { 1_000 } else { 5_000 };
        let early = state
            .pull("billing", &to, 0, 10, 1 << 20, now_ms + delay_ms - 1)
            .unwrap_or_default();
        assert!(early.messages.is_empty(), "delivered before due");
        let due = state
            .pull("billing", &to, 0, 10, 1 << 20, now_ms + delay_ms)
            .unwrap_or_default();
        let (o, stored) = due.messages.last().cloned().expect("due message");
        assert_eq!(stored.reconsume_times, attempt);
        assert_eq!(
            stored.origin.as_ref().map(|o| o.queue.clone()),
            Some(QueueId::new("orders", 0))
        );
        assert_eq!(stored.message.body, Bytes::from("p1 s0"));
        assert_eq!(o, at);
        (queue, offset, now_ms) = (to, at, now_ms + delay_ms);
    }
    let last = state.apply(Command::ReconsumeLater {
        group: "billing".into(),
        queue,
        offset,
        stamp_ms: now_ms,
    });
    assert_eq!(
        last,
        Outcome::Requeued {
            to: QueueId::dead_letter("billing"),
            offset: 0,
            dead_letter: true
        }
    );
    assert_eq!(
        state.consume_offset("billing", &QueueId::new("orders", 0)),
        1,
        "the original counts as consumed"
    );
}

#[test]
fn pulls_respect_message_and_byte_limits() {
    let mut state = orders();
    appended_at(append(&mut state, 0, 1, 0, 10));
    let queue = QueueId::new("orders", 0);
    let pulled = state
        .pull("g", &queue, 2, 3, 1 << 20, 0)
        .unwrap_or_default();
    assert_eq!(pulled.messages.len(), 3);
    assert_eq!((pulled.messages[0].0, pulled.next_offset), (2, 5));
    let one = state.pull("g", &queue, 0, 10, 1, 0).unwrap_or_default();
    assert_eq!(
        one.messages.len(),
        1,
        "at least one message whatever the byte limit"
    );
}

fn arb_command() -> impl Strategy<Value = Command> {
    let queue = (0..3u32).prop_map(|q| QueueId::new("orders", q));
    prop_oneof![
        (queue.clone(), 0..4u64, 0..64u64, 1..5usize, 0..10_000u64).prop_map(
            |(queue, producer_id, first_seq, n, stamp_ms)| Command::Append {
                queue,
                producer_id,
                first_seq,
                messages: (0..n)
                    .map(|i| Message::with_body(vec![i as u8; i]))
                    .collect(),
                stamp_ms,
            }
        ),
        (queue.clone(), prop::collection::vec(0..40u64, 0..6)).prop_map(|(queue, offsets)| {
            Command::Ack {
                group: "g".into(),
                queue,
                offsets,
            }
        }),
        (queue, 0..40u64, 0..100_000u64).prop_map(|(queue, offset, stamp_ms)| {
            Command::ReconsumeLater {
                group: "g".into(),
                queue,
                offset,
                stamp_ms,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn commands_survive_the_codec(command in arb_command()) {
        prop_assert_eq!(decode_command(&encode_command(&command)), Ok(command));
    }

    /// Whatever the commands, every (producer, seq) is written at most once, and no consume
    /// offset ever moves back.
    #[test]
    fn no_duplicate_writes_and_no_offset_regression(commands in prop::collection::vec(arb_command(), 1..120)) {
        let mut state = orders();
        topic(&mut state, "orders", 3);
        let mut consume = std::collections::BTreeMap::new();
        for command in commands {
            state.apply_bytes(&encode_command(&command));
            for queue in state.queues().cloned().collect::<Vec<_>>() {
                let now = state.consume_offset("g", &queue);
                let before = consume.insert(queue.clone(), now).unwrap_or(0);
                prop_assert!(now >= before, "{queue} went from {before} to {now}");
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for q in 0..3 {
            let queue = QueueId::new("orders", q);
            for offset in 0..state.queue_len(&queue).unwrap_or(0) {
                let stored = state.message(&queue, offset).cloned();
                let id = stored.map(|s| (s.producer_id, s.seq));
                prop_assert!(seen.insert(id), "{id:?} written twice");
            }
        }
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut state = orders();
        let _ = state.apply_bytes(&bytes);
    }
}
