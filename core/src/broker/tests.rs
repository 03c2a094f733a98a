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
        ..BrokerConfig::default()
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

/// Appends of messages with keys, tags and properties, which `arb_command`'s lack.
fn arb_append_of_full_messages() -> impl Strategy<Value = Command> {
    let message = (
        prop::option::of(prop::collection::vec(any::<u8>(), 0..5)),
        prop::collection::vec("[a-z]{0,3}", 0..3),
        prop::collection::btree_map("[a-z]{1,3}", "[a-z]{0,4}", 0..3),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(key, tags, properties, body)| Message {
            key: key.map(Bytes::from),
            tags,
            properties,
            body: Bytes::from(body),
        });
    (prop::collection::vec(message, 0..4), any::<u64>()).prop_map(|(messages, seq)| {
        Command::Append {
            queue: QueueId::new("orders", 1),
            producer_id: seq / 3,
            first_seq: seq,
            messages,
            stamp_ms: seq / 7,
        }
    })
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
        (0..120_000u64).prop_map(|stamp_ms| Command::Trim { stamp_ms }),
    ]
}

/// Commands of both groups on the topic's queues and on the retry and dead-letter queues.
fn arb_any_command() -> impl Strategy<Value = Command> {
    let queue = prop_oneof![
        (0..3u32).prop_map(|q| QueueId::new("orders", q)),
        (0..2usize, 0..2u32).prop_map(|(g, level)| QueueId::retry(GROUPS[g], level)),
        (0..2usize).prop_map(|g| QueueId::dead_letter(GROUPS[g])),
    ];
    prop_oneof![
        3 => arb_command(),
        1 => (0..2usize, queue.clone(), prop::collection::vec(0..40u64, 0..4)).prop_map(
            |(g, queue, offsets)| Command::Ack {
                group: GROUPS[g].into(),
                queue,
                offsets,
            }
        ),
        1 => (0..2usize, queue, 0..40u64, 0..100_000u64).prop_map(
            |(g, queue, offset, stamp_ms)| Command::ReconsumeLater {
                group: GROUPS[g].into(),
                queue,
                offset,
                stamp_ms,
            }
        ),
    ]
}

fn arb_retention() -> impl Strategy<Value = BrokerConfig> {
    (
        prop::option::of(0..30_000u64),
        prop::option::of(0..24u64),
        0..3u32,
    )
        .prop_map(
            |(retention_ms, retention_bytes, max_reconsume)| BrokerConfig {
                reconsume_delays_ms: vec![1_000, 5_000],
                max_reconsume,
                retention_ms,
                retention_bytes,
                canary: None,
                ..BrokerConfig::default()
            },
        )
}

proptest! {
    #[test]
    fn commands_survive_the_codec(command in arb_command()) {
        prop_assert_eq!(decode_command(&encode_command(&command)), Ok(command));
    }

    /// The decoding that slices messages out of the entry gives the same command as the one
    /// that copies them, for every kind of command, and its bodies and keys are slices of the
    /// entry's bytes (no copy); bytes that are no command are refused by both alike.
    #[test]
    fn a_command_decoded_as_slices_of_its_entry_is_the_command(
        command in prop_oneof![arb_command(), arb_append_of_full_messages()],
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let bytes = encode_command(&command);
        let shared = decode_command_shared(&bytes);
        prop_assert_eq!(&shared, &Ok(command));
        if let Ok(Command::Append { messages, .. }) = &shared {
            let within = bytes.as_ptr_range();
            for m in messages {
                let parts = m.key.iter().chain([&m.body]).filter(|b| !b.is_empty());
                for part in parts {
                    prop_assert!(within.contains(&part.as_ptr()), "a copy, not a slice");
                }
            }
        }
        // Damaged: cut short, or a byte changed.
        let short = bytes.slice(..cut.index(bytes.len().max(1)));
        prop_assert_eq!(decode_command_shared(&short), decode_command(&short));
        if !bytes.is_empty() {
            let mut changed = bytes.to_vec();
            changed[flip.index(bytes.len())] ^= 0x5a;
            let changed = bytes::Bytes::from(changed);
            prop_assert_eq!(decode_command_shared(&changed), decode_command(&changed));
        }
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

    /// A state restored from a snapshot taken anywhere in a command sequence answers the rest
    /// exactly as the original does, and snapshots to the same bytes all along.
    #[test]
    fn a_restored_state_is_indistinguishable(
        config in arb_retention(),
        commands in prop::collection::vec(arb_any_command(), 1..100),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut original = BrokerState::new(config);
        topic(&mut original, "orders", 3);
        let cut = cut.index(commands.len());
        for command in &commands[..cut] {
            original.apply(command.clone());
        }
        let mut copy = restored(&original);
        for command in &commands[cut..] {
            prop_assert_eq!(original.apply(command.clone()), copy.apply(command.clone()));
        }
        prop_assert_eq!(observe(&copy, 50_000), observe(&original, 50_000));
        prop_assert_eq!(copy.snapshot(), original.snapshot());
    }

    /// A state restored from its metadata snapshot, with a store that carried out its
    /// operations, answers the rest exactly as the original does and holds the same messages:
    /// the store is asked to check exactly what the index references, and it does hold it.
    #[test]
    fn a_state_restored_from_metadata_and_its_store_is_indistinguishable(
        config in arb_retention(),
        commands in prop::collection::vec(arb_any_command(), 1..100),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut original = BrokerState::new(config.clone());
        topic(&mut original, "orders", 3);
        let mut store = MemoryStore::default();
        let cut = cut.index(commands.len());
        for command in &commands[..cut] {
            original.apply(command.clone());
        }
        for op in original.take_store_ops() {
            prop_assert_eq!(store.apply(0, op), Ok(()));
        }
        let bytes = original.metadata_snapshot().expect("encodes");
        prop_assert_eq!(bytes[0], METADATA_SNAPSHOT_VERSION);
        let mut copy = BrokerState::restore(config, &bytes).expect("restores");
        prop_assert_eq!(copy.metadata_snapshot().expect("encodes"), bytes.clone());
        let ops = copy.take_store_ops();
        let ranges: Vec<(QueueId, Offset, Offset)> = original
            .queues()
            .map(|q| (q.clone(), original.start_offset(q).unwrap_or(0), original.queue_len(q).unwrap_or(0)))
            .collect();
        match ops.as_slice() {
            [StoreOp::Recover { queues }] => {
                let asked: Vec<_> = queues.iter().map(|r| (r.queue.clone(), r.start, r.end)).collect();
                prop_assert_eq!(asked, ranges);
            }
            other => prop_assert!(false, "restoring asks {:?}", other),
        }
        let mut copy_store = store.clone();
        for op in ops {
            prop_assert_eq!(copy_store.apply(0, op), Ok(()));
        }
        for command in &commands[cut..] {
            prop_assert_eq!(original.apply(command.clone()), copy.apply(command.clone()));
            for op in original.take_store_ops() {
                prop_assert_eq!(store.apply(0, op), Ok(()));
            }
            for op in copy.take_store_ops() {
                prop_assert_eq!(copy_store.apply(0, op), Ok(()));
            }
        }
        let full = |state: &BrokerState, store: &MemoryStore| {
            state.snapshot_with(&mut |q, o| {
                store.message(0, q, o).ok_or_else(|| format!("{q}@{o} not stored"))
            })
        };
        prop_assert_eq!(full(&copy, &copy_store), full(&original, &store));
        prop_assert!(full(&original, &store).is_ok());
    }

    /// Whatever the commands, a consume offset never moves back and is never below the
    /// queue's start; the start never moves back nor past the end.
    #[test]
    fn retention_moves_starts_and_consume_offsets_forward_only(
        config in arb_retention(),
        commands in prop::collection::vec(arb_any_command(), 1..120),
    ) {
        let mut state = BrokerState::new(config);
        topic(&mut state, "orders", 3);
        let mut seen = std::collections::BTreeMap::new();
        for command in commands {
            let trim_due = match command {
                Command::Trim { stamp_ms } => Some((stamp_ms, state.trim_due(stamp_ms))),
                _ => None,
            };
            let before = state.snapshot();
            state.apply(command);
            if let Some((stamp_ms, due)) = trim_due {
                prop_assert_eq!(due, state.snapshot() != before, "trim_due({})", stamp_ms);
                prop_assert!(!state.trim_due(stamp_ms), "a trim leaves nothing due");
            }
            for queue in state.queues().cloned().collect::<Vec<_>>() {
                let start = state.start_offset(&queue).unwrap_or(0);
                prop_assert!(start <= state.queue_len(&queue).unwrap_or(0));
                for group in GROUPS {
                    let now = (start, state.consume_offset(group, &queue));
                    prop_assert!(now.1 >= now.0);
                    let before = seen.insert((group, queue.clone()), now).unwrap_or((0, 0));
                    prop_assert!(now.0 >= before.0 && now.1 >= before.1, "{} went back", queue);
                }
            }
        }
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut state = orders();
        let _ = state.apply_bytes(&bytes);
        let _ = BrokerState::restore(BrokerConfig::default(), &bytes);
    }

    /// A snapshot damaged anywhere, by any byte, is refused.
    #[test]
    fn damaged_snapshot_bytes_are_refused(at in any::<prop::sample::Index>(), xor in 1..=255u8) {
        let (state, _) = mixed_history();
        let mut bytes = state.snapshot();
        let at = at.index(bytes.len());
        bytes[at] ^= xor;
        prop_assert!(BrokerState::restore(state.config().clone(), &bytes).is_err());
    }
}

// ----- retention -----

fn retaining(retention_ms: Option<u64>, retention_bytes: Option<u64>) -> BrokerState {
    let mut state = BrokerState::new(BrokerConfig {
        reconsume_delays_ms: vec![1_000, 2_000],
        max_reconsume: 2,
        retention_ms,
        retention_bytes,
        canary: None,
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 2);
    state
}

/// Appends `bodies` (one message each) as one batch of `producer_id` from `first_seq`.
fn send(
    state: &mut BrokerState,
    queue: u32,
    producer_id: u64,
    first_seq: u64,
    bodies: &[&str],
    stamp_ms: u64,
) -> Outcome {
    state.apply(Command::Append {
        queue: QueueId::new("orders", queue),
        producer_id,
        first_seq,
        messages: bodies
            .iter()
            .map(|b| Message::with_body(b.to_string()))
            .collect(),
        stamp_ms,
    })
}

fn ack(state: &mut BrokerState, group: &str, queue: &QueueId, offsets: &[Offset]) -> Outcome {
    state.apply(Command::Ack {
        group: group.into(),
        queue: queue.clone(),
        offsets: offsets.to_vec(),
    })
}

fn nack(state: &mut BrokerState, group: &str, queue: &QueueId, offset: Offset, at: u64) -> Outcome {
    state.apply(Command::ReconsumeLater {
        group: group.into(),
        queue: queue.clone(),
        offset,
        stamp_ms: at,
    })
}

fn trim(state: &mut BrokerState, stamp_ms: u64) {
    assert_eq!(
        state.apply(Command::Trim { stamp_ms }),
        Outcome::QueuesCreated
    );
}

fn pulled_offsets(state: &BrokerState, group: &str, queue: &QueueId, from: Offset) -> Vec<Offset> {
    let pulled = state.pull(group, queue, from, 100, 1 << 20, u64::MAX);
    pulled
        .map(|p| p.messages.iter().map(|(o, _)| *o).collect())
        .unwrap_or_default()
}

#[test]
fn age_retention_drops_the_front_once_it_is_old_enough() {
    let mut state = retaining(Some(10_000), None);
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["a", "b"], 1_000);
    send(&mut state, 0, 1, 2, &["c"], 5_000);
    send(&mut state, 0, 1, 3, &["d"], 2_000); // a lagging leader's stamp
    assert!(!state.trim_due(10_999));
    trim(&mut state, 10_999);
    assert_eq!(
        state.start_offset(&queue),
        Some(0),
        "nothing is old enough yet"
    );
    assert!(
        state.trim_due(11_000),
        "stored_ms + retention_ms <= stamp drops"
    );
    trim(&mut state, 11_000);
    assert_eq!(state.start_offset(&queue), Some(2));
    assert_eq!(
        state.queue_len(&queue),
        Some(4),
        "the end offset does not move"
    );
    assert_eq!(state.message(&queue, 1), None);
    assert_eq!(
        state.message(&queue, 2).map(|m| m.message.body.clone()),
        Some(Bytes::from("c")),
        "offsets keep their meaning"
    );
    // Only the front is cut: "d", older than "c", waits until "c" goes.
    trim(&mut state, 14_000);
    assert_eq!(state.start_offset(&queue), Some(2));
    assert!(!state.trim_due(14_999));
    trim(&mut state, 15_000);
    assert_eq!(
        state.start_offset(&queue),
        Some(4),
        "empty, and still at its end"
    );
    assert!(
        !state.trim_due(u64::MAX),
        "an empty queue has nothing to drop"
    );
    assert_eq!(
        appended_at(send(&mut state, 0, 1, 4, &["e"], 16_000)),
        (queue.clone(), 4, false),
        "an offset is never reused"
    );
    assert_eq!(state.start_offset(&QueueId::new("orders", 1)), Some(0));
    assert_eq!(state.start_offset(&QueueId::new("nope", 0)), None);
}

#[test]
fn size_retention_keeps_each_queue_at_or_under_its_limit_and_keeps_the_newest() {
    let mut state = retaining(None, Some(5));
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["aa", "bb", "cc"], 0);
    send(&mut state, 1, 2, 0, &["12345"], 0);
    assert!(state.trim_due(0));
    trim(&mut state, 0);
    assert_eq!(
        state.start_offset(&queue),
        Some(1),
        "6 bytes over 5: the oldest goes"
    );
    assert_eq!(
        state.start_offset(&QueueId::new("orders", 1)),
        Some(0),
        "exactly at the limit is kept"
    );
    assert!(!state.trim_due(u64::MAX), "age retention is off");
    send(&mut state, 0, 1, 3, &["a much longer body"], 0);
    trim(&mut state, 0);
    assert_eq!(
        (state.start_offset(&queue), state.queue_len(&queue)),
        (Some(3), Some(4)),
        "the newest message stays, even over the limit on its own"
    );
    assert!(!state.trim_due(0));
}

#[test]
fn no_retention_and_the_default_keep_messages() {
    let mut state = retaining(None, None);
    send(&mut state, 0, 1, 0, &["a"], 0);
    assert!(!state.trim_due(u64::MAX));
    trim(&mut state, u64::MAX);
    assert_eq!(state.start_offset(&QueueId::new("orders", 0)), Some(0));

    let mut state = orders();
    let day_ms = 24 * 3600 * 1000;
    append(&mut state, 0, 1, 0, 1); // stamped 1 000
    assert!(
        !state.trim_due(1_000 + 3 * day_ms - 1),
        "72 hours by default"
    );
    assert!(state.trim_due(1_000 + 3 * day_ms));
}

#[test]
fn a_queue_of_several_messages_exactly_at_its_size_limit_keeps_them_all() {
    let mut state = retaining(None, Some(5));
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["aa", "bbb"], 0);
    assert!(!state.trim_due(0), "5 bytes of 5");
    trim(&mut state, 0);
    assert_eq!(state.start_offset(&queue), Some(0));
    send(&mut state, 0, 1, 2, &["c"], 0);
    assert!(state.trim_due(0), "6 bytes of 5");
    trim(&mut state, 0);
    assert_eq!(state.start_offset(&queue), Some(1), "down to 4 bytes");
}

#[test]
fn a_queue_retains_exactly_its_offsets_from_its_start_to_its_end() {
    let mut state = retaining(Some(10_000), None);
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["a", "b"], 1_000);
    send(&mut state, 0, 1, 2, &["c"], 20_000);
    trim(&mut state, 11_000);
    assert_eq!(
        (0..4).map(|o| state.retains(&queue, o)).collect::<Vec<_>>(),
        vec![false, false, true, false],
        "dropped, dropped, retained, not written yet"
    );
    assert!(
        !state.retains(&QueueId::new("orders", 1), 0),
        "an empty queue"
    );
    assert!(!state.retains(&QueueId::new("nope", 0), 0), "no such queue");
}

#[test]
fn pulls_from_below_the_start_begin_at_the_start() {
    let mut state = retaining(Some(10), None);
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["a", "b"], 0);
    send(&mut state, 0, 1, 2, &["c", "d"], 100);
    trim(&mut state, 50);
    assert_eq!(state.start_offset(&queue), Some(2));
    let pulled = state
        .pull("g", &queue, 0, 1, 1 << 20, 0)
        .unwrap_or_default();
    assert_eq!(pulled.messages.len(), 1);
    assert_eq!((pulled.messages[0].0, pulled.next_offset), (2, 3));
    assert_eq!(pulled_offsets(&state, "g", &queue, 1), vec![2, 3]);
    assert_eq!(pulled_offsets(&state, "g", &queue, 3), vec![3]);
    assert_eq!(
        state.consume_offset("g", &queue),
        2,
        "a new group starts at the start"
    );
}

#[test]
fn acks_of_dropped_offsets_are_harmless_and_consume_offsets_never_move_back() {
    let mut state = retaining(Some(10), None);
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["a", "b", "c"], 0);
    send(&mut state, 0, 1, 3, &["d", "e", "f"], 100);
    // "audit" is ahead of the cut, "billing" behind it with an ack above a gap.
    assert_eq!(
        ack(&mut state, "audit", &queue, &[0, 1, 2, 3, 4]),
        Outcome::Acked { consume_offset: 5 }
    );
    assert_eq!(
        ack(&mut state, "billing", &queue, &[0, 4]),
        Outcome::Acked { consume_offset: 1 }
    );
    trim(&mut state, 50);
    assert_eq!(state.start_offset(&queue), Some(3));
    assert_eq!(
        state.consume_offset("audit", &queue),
        5,
        "not moved back to the start"
    );
    assert_eq!(
        state.consume_offset("billing", &queue),
        3,
        "moved up to the start"
    );
    assert_eq!(state.consume_offset("newcomer", &queue), 3);
    let listed: Vec<(String, Offset)> = state
        .consume_offsets()
        .map(|(g, _, o)| (g.to_string(), o))
        .collect();
    assert_eq!(listed, vec![("audit".into(), 5), ("billing".into(), 3)]);
    // Acks below the start are accepted and move nothing.
    assert_eq!(
        ack(&mut state, "billing", &queue, &[1, 2]),
        Outcome::Acked { consume_offset: 3 }
    );
    assert_eq!(
        ack(&mut state, "audit", &queue, &[0]),
        Outcome::Acked { consume_offset: 5 }
    );
    assert_eq!(
        ack(&mut state, "newcomer", &queue, &[0]),
        Outcome::Acked { consume_offset: 3 }
    );
    // The ack of 4 kept above the gap still counts once 3 is acked.
    assert_eq!(pulled_offsets(&state, "billing", &queue, 0), vec![3, 5]);
    assert_eq!(
        ack(&mut state, "billing", &queue, &[3]),
        Outcome::Acked { consume_offset: 5 }
    );
    // Past the end is still refused.
    assert!(matches!(
        ack(&mut state, "billing", &queue, &[2, 6]),
        Outcome::Refused(Refusal::NoSuchOffset { offset: 6, .. })
    ));
    // Emptied by age, the queue keeps every consume offset where it was or at its end.
    trim(&mut state, 1_000);
    assert_eq!(state.start_offset(&queue), Some(6));
    for group in ["audit", "billing", "newcomer"] {
        assert_eq!(state.consume_offset(group, &queue), 6, "{group}");
    }
}

#[test]
fn reconsume_later_of_a_dropped_offset_is_answered_as_acked() {
    let mut state = retaining(Some(10), None);
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["a", "b"], 0);
    send(&mut state, 0, 1, 2, &["c"], 100);
    trim(&mut state, 50);
    assert_eq!(
        nack(&mut state, "billing", &queue, 0, 60),
        Outcome::Acked { consume_offset: 2 }
    );
    assert_eq!(
        state.queues().filter(|q| q.is_retry()).count(),
        0,
        "nothing requeued"
    );
    assert!(matches!(
        nack(&mut state, "billing", &queue, 2, 60),
        Outcome::Requeued {
            offset: 0,
            dead_letter: false,
            ..
        }
    ));
    assert!(matches!(
        nack(&mut state, "billing", &queue, 3, 60),
        Outcome::Refused(Refusal::NoSuchOffset { offset: 3, .. })
    ));
    // Retry queues are trimmed like any other, and offsets in them keep their meaning too.
    let retry = QueueId::retry("billing", 0);
    trim(&mut state, 1_000);
    assert_eq!(state.start_offset(&retry), Some(1));
    assert_eq!(state.next_due_ms("billing", &retry, 0), None);
    assert_eq!(
        nack(&mut state, "billing", &retry, 0, 1_000),
        Outcome::Acked { consume_offset: 1 }
    );
}

#[test]
fn a_retry_of_a_batch_retention_dropped_gets_its_original_offsets() {
    let mut state = retaining(Some(10), None);
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["a", "b"], 0);
    send(&mut state, 0, 2, 0, &["x"], 0);
    trim(&mut state, 10);
    assert_eq!(state.start_offset(&queue), Some(3));
    assert_eq!(
        appended_at(send(&mut state, 1, 1, 0, &["a", "b"], 20)),
        (queue.clone(), 0, true)
    );
    assert_eq!(
        appended_at(send(&mut state, 0, 2, 0, &["x"], 20)),
        (queue.clone(), 2, true)
    );
    assert_eq!(state.queue_len(&queue), Some(3), "no second copy");
    assert!(matches!(
        send(&mut state, 0, 1, 1, &["b"], 20),
        Outcome::Refused(Refusal::SequenceOverlap { .. })
    ));
}

#[test]
fn trim_is_the_last_command_variant_so_earlier_encodings_stay_valid() {
    // postcard writes the variant's index first: CreateQueues 0 .. ReconsumeLater 3.
    assert_eq!(encode_command(&Command::Trim { stamp_ms: 7 })[..], [4, 7]);
    assert_eq!(
        decode_command(&[3, 1, b'g', 1, b't', 2, 5, 6]),
        Ok(Command::ReconsumeLater {
            group: "g".into(),
            queue: QueueId::new("t", 2),
            offset: 5,
            stamp_ms: 6,
        })
    );
}

// ----- snapshots -----

const GROUPS: [&str; 2] = ["billing", "audit"];

/// Everything a client can learn from a state: each queue's start and end, every message
/// retained, every consume offset, and what every group would pull from each queue (from 0,
/// from where its consume offset is, and in small steps) and when its retries fall due.
fn observe(state: &BrokerState, now_ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for queue in state.queues() {
        let (start, end) = (state.start_offset(queue), state.queue_len(queue));
        let _ = writeln!(out, "{queue}: {start:?}..{end:?}");
        for offset in start.unwrap_or(0)..end.unwrap_or(0) {
            let _ = writeln!(out, "  {offset}: {:?}", state.message(queue, offset));
        }
        for group in GROUPS {
            let consume = state.consume_offset(group, queue);
            let _ = writeln!(
                out,
                "  {group} at {consume}: {:?} / {:?} / {:?} / due {:?}",
                state.pull(group, queue, 0, 100, 1 << 20, now_ms),
                state.pull(group, queue, consume, 2, 1, now_ms),
                state.pull(group, queue, end.unwrap_or(0), 100, 1 << 20, now_ms),
                state.next_due_ms(group, queue, 0)
            );
        }
    }
    let offsets: Vec<_> = state.consume_offsets().collect();
    let _ = writeln!(out, "{offsets:?}");
    out
}

/// Restores `state` from its snapshot and checks the copy writes the same bytes again.
fn restored(state: &BrokerState) -> BrokerState {
    let bytes = state.snapshot();
    let copy = match BrokerState::restore(state.config().clone(), &bytes) {
        Ok(copy) => copy,
        Err(e) => panic!("restore: {e}"),
    };
    assert_eq!(
        copy.snapshot(),
        bytes,
        "a restored state snapshots differently"
    );
    copy
}

fn mixed_history() -> (BrokerState, Vec<Command>) {
    let mut state = retaining(Some(10_000), Some(64));
    let q0 = QueueId::new("orders", 0);
    appended_at(send(&mut state, 0, 1, 0, &["a0", "a1", "a2"], 1_000));
    appended_at(send(&mut state, 1, 2, 0, &["b0"], 1_500));
    // A retry to the other queue: deduplicated.
    assert!(appended_at(send(&mut state, 1, 1, 0, &["a0", "a1", "a2"], 1_600)).2);
    appended_at(send(&mut state, 0, 1, 3, &["a3", "a4"], 9_000));
    ack(&mut state, "billing", &q0, &[2, 4]);
    ack(&mut state, "billing", &q0, &[0]);
    // ReconsumeLater to the retry queues, then to the dead-letter queue (max_reconsume 2).
    assert!(matches!(
        nack(&mut state, "billing", &q0, 1, 2_000),
        Outcome::Requeued { .. }
    ));
    let retry0 = QueueId::retry("billing", 0);
    assert!(matches!(
        nack(&mut state, "billing", &retry0, 0, 3_000),
        Outcome::Requeued {
            dead_letter: false,
            ..
        }
    ));
    let retry1 = QueueId::retry("billing", 1);
    assert!(matches!(
        nack(&mut state, "billing", &retry1, 0, 5_000),
        Outcome::Requeued {
            dead_letter: true,
            ..
        }
    ));
    nack(&mut state, "audit", &q0, 3, 9_500);
    appended_at(send(
        &mut state,
        1,
        2,
        1,
        &[&"x".repeat(40), &"y".repeat(30)],
        9_600,
    ));
    // Age drops q0's first three and b0 and the first retry copy; size drops a 40-byte one.
    trim(&mut state, 12_000);
    assert_eq!(state.start_offset(&q0), Some(3));
    assert_eq!(state.start_offset(&QueueId::new("orders", 1)), Some(2));
    assert_eq!(state.start_offset(&retry0), Some(1));

    let later = vec![
        // The duplicate retry of the first batch, whose messages are gone.
        Command::Append {
            queue: QueueId::new("orders", 1),
            producer_id: 1,
            first_seq: 0,
            messages: ["a0", "a1", "a2"].map(Message::with_body).to_vec(),
            stamp_ms: 12_500,
        },
        Command::Ack {
            group: "audit".into(),
            queue: q0.clone(),
            offsets: vec![0, 4],
        },
        Command::ReconsumeLater {
            group: "audit".into(),
            queue: q0.clone(),
            offset: 1,
            stamp_ms: 12_600,
        },
        Command::ReconsumeLater {
            group: "billing".into(),
            queue: q0.clone(),
            offset: 3,
            stamp_ms: 12_700,
        },
        Command::Append {
            queue: q0.clone(),
            producer_id: 3,
            first_seq: 0,
            messages: vec![Message::with_body("c0")],
            stamp_ms: 13_000,
        },
        Command::Ack {
            group: "billing".into(),
            queue: q0.clone(),
            offsets: vec![6, 5],
        },
        Command::Trim { stamp_ms: 19_600 },
        Command::Append {
            queue: q0.clone(),
            producer_id: 1,
            first_seq: 3,
            messages: ["a3", "a4"].map(Message::with_body).to_vec(),
            stamp_ms: 20_000,
        },
        Command::Ack {
            group: "audit".into(),
            queue: q0,
            offsets: vec![3, 99],
        },
        Command::Trim { stamp_ms: 40_000 },
    ];
    (state, later)
}

#[test]
fn a_restored_state_snapshots_the_same_and_answers_everything_the_same() {
    let (mut original, later) = mixed_history();
    let mut copy = restored(&original);
    assert_eq!(observe(&copy, 12_000), observe(&original, 12_000));
    for command in later {
        let (a, b) = (original.apply(command.clone()), copy.apply(command.clone()));
        assert_eq!(a, b, "{command:?}");
        if let Command::Append {
            producer_id: 1,
            first_seq: 0,
            ..
        } = command
        {
            assert_eq!(
                a,
                Outcome::Appended {
                    queue: QueueId::new("orders", 0),
                    base_offset: 0,
                    duplicate: true
                },
                "the dedup window survives the snapshot"
            );
        }
        for now_ms in [0, 15_000, u64::MAX] {
            assert_eq!(
                observe(&copy, now_ms),
                observe(&original, now_ms),
                "{command:?}"
            );
        }
        assert_eq!(copy.snapshot(), original.snapshot());
        copy = restored(&copy);
    }
}

#[test]
fn equal_states_give_equal_snapshots_and_different_ones_differ() {
    let (a, _) = mixed_history();
    let (mut b, _) = mixed_history();
    assert_eq!(a.snapshot(), b.snapshot());
    assert_eq!(a.snapshot()[0], SNAPSHOT_VERSION);
    ack(&mut b, "audit", &QueueId::new("orders", 0), &[4]);
    assert_ne!(
        a.snapshot(),
        b.snapshot(),
        "an ack above the gap is in the snapshot"
    );
    let empty = BrokerState::new(BrokerConfig::default());
    let restored = BrokerState::restore(BrokerConfig::default(), &empty.snapshot());
    assert_eq!(restored.map(|s| s.queues().count()).ok(), Some(0));
}

/// A metadata snapshot as the previous build wrote it (version 5: each index entry on its
/// own) restores the state today's format (version 6: blocks of packed columns) restores,
/// across block boundaries, a front cut by retention and retry queues with due times, and
/// the restored state writes today's bytes; so does a state restored from a transfer image,
/// whose first block never held what retention dropped.
#[test]
fn a_metadata_snapshot_of_the_previous_format_restores_the_same_state() {
    let mut state = retaining(Some(10_000), None);
    for seq in 0..3_000u64 {
        send(
            &mut state,
            (seq % 7 == 0) as u32,
            1,
            seq,
            &["m"],
            1_000 + seq,
        );
    }
    trim(&mut state, 12_400);
    let q0 = QueueId::new("orders", 0);
    let start = state.start_offset(&q0).expect("exists");
    assert!(
        start > 1_000 && !start.is_multiple_of(1_024),
        "the front is cut mid-block: {start}"
    );
    for offset in [start, start + 1, start + 1_000] {
        nack(&mut state, "billing", &q0, offset, 20_000 + offset);
    }
    let retry = QueueId::retry("billing", 0);
    assert_eq!(state.queue_len(&retry), Some(3));
    let old = state.metadata_snapshot_v5();
    let new = state.metadata_snapshot().expect("encodes");
    assert_eq!((old[0], new[0]), (5, METADATA_SNAPSHOT_VERSION));
    assert!(!holds_messages(&old) && !holds_messages(&new));
    let config = state.config().clone();
    let mut from_old = BrokerState::restore(config.clone(), &old).expect("restores");
    let mut from_new = BrokerState::restore(config.clone(), &new).expect("restores");
    assert_eq!(from_old.metadata_snapshot().expect("encodes"), new);
    assert_eq!(from_new.metadata_snapshot().expect("encodes"), new);
    assert_eq!(from_old.take_store_ops(), from_new.take_store_ops());
    for now_ms in [0, 21_000, u64::MAX] {
        assert_eq!(observe(&from_old, now_ms), observe(&from_new, now_ms));
    }
    for ms in [0, 2_000, 2_500, 3_599, 3_600, 30_000] {
        for queue in [&q0, &retry] {
            let seek = |s: &mut BrokerState| {
                s.apply(Command::Seek {
                    group: "seeker".into(),
                    queue: queue.clone(),
                    to: SeekTo::Time(ms),
                    force: true,
                })
            };
            let expected = seek(&mut state);
            assert_eq!(seek(&mut from_old), expected, "seek {queue} to {ms} ms");
            assert_eq!(seek(&mut from_new), expected, "seek {queue} to {ms} ms");
        }
    }
    let transferred = BrokerState::restore(config, &state.snapshot()).expect("restores");
    assert_eq!(
        transferred.metadata_snapshot().expect("encodes"),
        state.metadata_snapshot().expect("encodes")
    );
}

/// A snapshot job's copy of the state shares the index's blocks and the producers' windows
/// with the state; what the state applies afterwards (appends into a shared block, a shared
/// window recorded to, retention) leaves the copy, and so the snapshot, as it was.
#[test]
fn a_snapshot_jobs_copy_does_not_see_later_commands() {
    let mut state = retaining(Some(10_000), None);
    for seq in 0..1_500u64 {
        send(&mut state, 0, 1 + seq % 3, seq / 3, &["m"], 1_000 + seq);
    }
    let copy = state.clone();
    let before = state.metadata_snapshot().expect("encodes");
    assert_eq!(copy.metadata_snapshot().expect("encodes"), before);
    for seq in 1_500..1_600u64 {
        send(&mut state, 0, 1 + seq % 3, seq / 3, &["m"], 1_000 + seq);
    }
    trim(&mut state, 11_700);
    assert_ne!(state.metadata_snapshot().expect("encodes"), before);
    assert_eq!(copy.metadata_snapshot().expect("encodes"), before);
    let restored = BrokerState::restore(state.config().clone(), &before).expect("restores");
    assert_eq!(restored.queue_len(&QueueId::new("orders", 0)), Some(1_500));
}

/// A metadata snapshot holds a few bytes per message and none of their bodies; damaged, it is
/// refused; a store that lacks what it references refuses it too, naming the offset.
#[test]
fn a_metadata_snapshot_is_small_and_checked() {
    let mut state = BrokerState::new(BrokerConfig::default());
    topic(&mut state, "orders", 1);
    let body = "x".repeat(1_000);
    let mut store = MemoryStore::default();
    for seq in 0..200 {
        send(&mut state, 0, 1, seq, &[body.as_str()], 1_000 + seq);
    }
    for op in state.take_store_ops() {
        store.apply(0, op).expect("applies");
    }
    let full = state.snapshot();
    let meta = state.metadata_snapshot().expect("encodes");
    assert!(full.len() > 200_000, "the full snapshot holds the bodies");
    // The index and the producer's dedup window: tens of bytes a message, not a thousand.
    assert!(
        meta.len() < full.len() / 40,
        "{} bytes of metadata",
        meta.len()
    );
    for bit in 0..meta.len() * 8 {
        let mut flipped = meta.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            BrokerState::restore(BrokerConfig::default(), &flipped).is_err(),
            "bit {bit} flipped"
        );
    }
    assert!(!holds_messages(&meta) && holds_messages(&full));
    let mut restored = BrokerState::restore(BrokerConfig::default(), &meta).expect("restores");
    let queue = QueueId::new("orders", 0);
    let mut lacking = MemoryStore::default();
    for offset in (0..200).filter(|o| *o != 57) {
        let record = store.record(0, &queue, offset).expect("held").clone();
        lacking.insert_record(0, queue.clone(), offset, record);
    }
    let mut complete = store.clone();
    complete.insert_record(0, queue.clone(), 200, Bytes::from_static(b"torn"));
    let ops = restored.take_store_ops();
    let error = ops
        .iter()
        .cloned()
        .map(|op| lacking.apply(0, op))
        .find_map(Result::err)
        .expect("refused");
    assert!(
        error.contains("orders/0@57") || error.contains("@57"),
        "{error}"
    );
    for op in ops {
        complete
            .apply(0, op)
            .expect("a store with a torn tail past the end is fine");
    }
    assert!(complete.record(0, &queue, 200).is_none(), "the tail is cut");
    assert!(complete.message(0, &queue, 199).is_some());
}

#[test]
fn damaged_snapshots_are_refused_never_misread() {
    let (state, _) = mixed_history();
    let bytes = state.snapshot();
    let config = state.config().clone();
    let restore = |bytes: &[u8]| BrokerState::restore(config.clone(), bytes).map(|_| ());
    assert_eq!(restore(&bytes), Ok(()));
    assert_eq!(restore(&[]), Err(SnapshotError::Truncated { len: 0 }));
    for len in 1..bytes.len() {
        assert!(restore(&bytes[..len]).is_err(), "cut to {len} bytes");
    }
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(restore(&flipped).is_err(), "bit {bit} flipped");
    }
    let mut other = bytes.clone();
    let unknown = METADATA_SNAPSHOT_VERSION.max(SNAPSHOT_VERSION) + 1;
    other[0] = unknown;
    assert_eq!(restore(&other), Err(SnapshotError::UnknownVersion(unknown)));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        restore(&longer),
        Err(SnapshotError::Checksum { .. })
    ));
    // Trailing bytes under a valid checksum (a writer's bug, not damage).
    let mut padded = bytes[..bytes.len() - 4].to_vec();
    padded.push(0);
    let checksum = crc32c::crc32c(&padded);
    padded.extend_from_slice(&checksum.to_le_bytes());
    assert_eq!(restore(&padded), Err(SnapshotError::TrailingBytes(1)));
    for error in [
        SnapshotError::Truncated { len: 3 },
        SnapshotError::UnknownVersion(9),
        SnapshotError::Checksum {
            stored: 1,
            computed: 2,
        },
        SnapshotError::Undecodable("x".into()),
        SnapshotError::TrailingBytes(1),
        SnapshotError::Inconsistent("y".into()),
    ] {
        assert!(error.to_string().starts_with("broker snapshot"), "{error}");
    }
}

/// Snapshot images with a valid checksum but a state no command sequence builds: written
/// with stand-ins of the same shape (postcard writes no field names).
#[test]
fn inconsistent_snapshots_are_refused() {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    type Queues = BTreeMap<QueueId, (Offset, VecDeque<StoredMessage>)>;
    type Offsets = BTreeMap<(String, QueueId), (Offset, BTreeSet<Offset>)>;
    type Windows = BTreeMap<ProducerId, (BTreeMap<Seq, (QueueId, Offset, u64)>, Seq, u64)>;
    type Leases = BTreeMap<(String, QueueId), (Option<String>, u64, u64)>;
    // Version 2's shape (no topic marks), which is still read: the checks are the same.
    fn forge(image: &(Queues, Offsets, Windows, Leases)) -> Vec<u8> {
        let mut bytes = postcard::to_extend(image, vec![2]).unwrap_or_default();
        let checksum = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }
    let restore = |image| BrokerState::restore(BrokerConfig::default(), &forge(&image));
    let q = QueueId::new("orders", 0);
    let one = StoredMessage {
        producer_id: 1,
        seq: 0,
        message: Message::with_body("m"),
        stored_ms: 0,
        reconsume_times: 0,
        due_ms: 0,
        origin: None,
    };
    let queues: Queues = [(q.clone(), (5, VecDeque::from([one])))].into();
    let good = (
        queues.clone(),
        [(("g".to_string(), q.clone()), (5, BTreeSet::new()))].into(),
        [(1, ([(0, (q.clone(), 5, 1))].into(), 0, 0))].into(),
        [(("g".to_string(), q.clone()), (Some("m".to_string()), 7, 3))].into(),
    );
    let state = restore(good.clone()).map_err(|e| e.to_string());
    // Written again, it reads back the same.
    let again = state.as_ref().map(|s| s.snapshot()).expect("restored");
    assert_eq!(again[0], SNAPSHOT_VERSION);
    let reread = BrokerState::restore(BrokerConfig::default(), &again).map(|s| s.snapshot());
    assert_eq!(reread, Ok(again));
    assert_eq!(state.map(|s| s.message(&q, 5).cloned().is_some()), Ok(true));

    let mut bad = good.clone();
    bad.1 = [(
        ("g".to_string(), QueueId::new("nope", 0)),
        (0, BTreeSet::new()),
    )]
    .into();
    assert!(matches!(restore(bad), Err(SnapshotError::Inconsistent(_))));
    let mut bad = good.clone();
    bad.1 = [(("g".to_string(), q.clone()), (5, BTreeSet::from([6])))].into();
    assert!(
        matches!(restore(bad), Err(SnapshotError::Inconsistent(_))),
        "an ack past the end"
    );
    let mut bad = good.clone();
    bad.1 = [(("g".to_string(), q.clone()), (7, BTreeSet::new()))].into();
    assert!(
        matches!(restore(bad), Err(SnapshotError::Inconsistent(_))),
        "consumed past the end"
    );
    let mut bad = good.clone();
    bad.2 = [(1, ([(0, (q.clone(), 5, 0))].into(), 0, 0))].into();
    assert!(
        matches!(restore(bad), Err(SnapshotError::Inconsistent(_))),
        "an empty batch"
    );
    let mut bad = good.clone();
    bad.2 = [(1, ([(u64::MAX, (q.clone(), 5, 2))].into(), u64::MAX, 0))].into();
    assert!(
        matches!(restore(bad), Err(SnapshotError::Inconsistent(_))),
        "past Seq::MAX"
    );
    let mut bad = good.clone();
    bad.3 = [(("g".to_string(), q.clone()), (Some("m".to_string()), 3, 7))].into();
    assert!(
        matches!(restore(bad), Err(SnapshotError::Inconsistent(_))),
        "a tenure from a generation after the queue's"
    );
    let mut bad = good;
    bad.0 = [(q, (u64::MAX, VecDeque::new()))].into();
    bad.1 = BTreeMap::new();
    assert!(
        matches!(restore(bad), Err(SnapshotError::Inconsistent(_))),
        "offsets past 2^63"
    );
}

#[test]
fn a_new_producer_beyond_the_maximum_forgets_the_least_recently_used_one() {
    use crate::limits::PRODUCERS_PER_GROUP_MAX;
    let mut state = orders();
    let max = PRODUCERS_PER_GROUP_MAX as u64;
    for producer in 0..max {
        appended_at(append(&mut state, 0, producer, 0, 1));
    }
    // Producer 0 writes again: now producer 1 is the least recently used.
    appended_at(append(&mut state, 0, 0, 1, 1));
    let mut restored =
        BrokerState::restore(state.config().clone(), &state.snapshot()).expect("restores");
    for state in [&mut state, &mut restored] {
        appended_at(append(state, 0, max, 0, 1));
        // Producer 0's retry is still known; producer 1's is not, and is written again.
        assert!(
            appended_at(append(state, 0, 0, 1, 1)).2,
            "producer 0 remembered"
        );
        assert!(
            !appended_at(append(state, 0, 1, 0, 1)).2,
            "producer 1 forgotten"
        );
        // Which evicted producer 2, the next least recent, which in turn evicts producer 3.
        assert!(
            !appended_at(append(state, 0, 2, 0, 1)).2,
            "producer 2 forgotten"
        );
        assert!(
            appended_at(append(state, 0, 4, 0, 1)).2,
            "producer 4 remembered"
        );
    }
    // The replica that restored forgets exactly what the one that applied everything did.
    assert_eq!(state.snapshot(), restored.snapshot());
}

fn claim(
    state: &mut BrokerState,
    member: &str,
    generation: u64,
    from: Option<(&str, u64)>,
) -> Outcome {
    state.apply(Command::Claim {
        group: "g".into(),
        queue: QueueId::new("orders", 0),
        member: member.into(),
        generation,
        takeover: from.map(|(member, generation)| Holder {
            member: member.into(),
            generation,
        }),
    })
}

fn holder(state: &BrokerState) -> (Option<String>, u64) {
    let lease = state
        .lease("g", &QueueId::new("orders", 0))
        .cloned()
        .unwrap_or_default();
    (lease.owner, lease.generation)
}

/// Seed 7000164: two takeovers decided against one expired holder were in the log at once.
/// The first won; the second must not oust the winner, whom nobody judged expired.
#[test]
fn a_takeover_applies_only_against_the_holder_it_judged_expired() {
    let mut state = orders();
    assert!(matches!(
        claim(&mut state, "a", 5, None),
        Outcome::Leased(_)
    ));
    assert!(matches!(
        claim(&mut state, "b", 6, Some(("a", 5))),
        Outcome::Leased(_)
    ));
    assert_eq!(holder(&state), (Some("b".into()), 6));
    assert!(matches!(
        claim(&mut state, "c", 7, Some(("a", 5))),
        Outcome::Refused(Refusal::NotOwner(_))
    ));
    assert_eq!(holder(&state), (Some("b".into()), 6));
    // Nor may a plain claim take a held queue, nor a takeover name the holder at an older
    // generation than it holds now.
    assert!(matches!(
        claim(&mut state, "c", 7, None),
        Outcome::Refused(Refusal::NotOwner(_))
    ));
    assert!(matches!(
        claim(&mut state, "b", 8, None),
        Outcome::Leased(_)
    ));
    assert!(matches!(
        claim(&mut state, "c", 9, Some(("b", 6))),
        Outcome::Refused(Refusal::NotOwner(_))
    ));
    assert!(matches!(
        claim(&mut state, "c", 9, Some(("b", 8))),
        Outcome::Leased(_)
    ));
    assert_eq!(holder(&state), (Some("c".into()), 9));
}

fn claim_tenure(state: &mut BrokerState, member: &str, generation: u64, tenure: u64) -> Outcome {
    state.apply(Command::ClaimTenure {
        group: "g".into(),
        queue: QueueId::new("orders", 0),
        member: member.into(),
        generation,
        takeover: None,
        tenure,
    })
}

fn release_tenure(state: &mut BrokerState, member: &str, generation: u64, tenure: u64) -> Outcome {
    state.apply(Command::ReleaseTenure {
        group: "g".into(),
        queue: QueueId::new("orders", 0),
        member: member.into(),
        generation,
        tenure,
    })
}

/// Queue seed 612008318: a release from a member's earlier tenure of a queue, applied after
/// the member took the queue again at the same generation, is refused; a late pull (claim)
/// from that earlier tenure does not take the tenure back down; another member's claim, or a
/// claim of a released queue, records its own tenure, however low.
#[test]
fn a_release_from_an_earlier_tenure_is_refused() {
    let mut state = orders();
    let leased = |o: &Outcome| matches!(o, Outcome::Leased(_));
    let refused = |o: &Outcome| matches!(o, Outcome::Refused(Refusal::NotOwner(_)));
    assert!(leased(&claim_tenure(&mut state, "a", 5, 1)));
    assert!(leased(&release_tenure(&mut state, "a", 5, 1)));
    assert_eq!(holder(&state), (None, 5));
    assert!(leased(&claim_tenure(&mut state, "a", 5, 2)));
    assert!(leased(&claim_tenure(&mut state, "a", 5, 1)), "a late pull");
    let tenure = |s: &BrokerState| s.lease("g", &QueueId::new("orders", 0)).map(|l| l.tenure);
    assert_eq!(tenure(&state), Some(2));
    assert!(refused(&release_tenure(&mut state, "a", 5, 1)));
    assert_eq!(holder(&state), (Some("a".into()), 5));
    // A release logged before tenures (tenure 0) is refused by a numbered tenure too.
    let old = state.apply(Command::Release {
        group: "g".into(),
        queue: QueueId::new("orders", 0),
        member: "a".into(),
        generation: 5,
    });
    assert!(refused(&old));
    assert!(refused(&claim_tenure(&mut state, "b", 5, 9)));
    assert!(leased(&release_tenure(&mut state, "a", 5, 2)));
    assert!(leased(&claim_tenure(&mut state, "b", 5, 1)));
    assert_eq!(tenure(&state), Some(1));
    assert!(leased(&release_tenure(&mut state, "b", 6, 1)));
    assert!(
        leased(&claim_tenure(&mut state, "a", 6, 1)),
        "a restarted member"
    );
    assert_eq!(tenure(&state), Some(1));
    // Snapshots keep the tenure; one of the format before tenures restores with tenure 0.
    let config = state.config().clone();
    let restored = BrokerState::restore(config.clone(), &state.snapshot()).expect("restores");
    assert_eq!(tenure(&restored), Some(1));
    let bytes = state.metadata_snapshot().expect("encodes");
    let restored = BrokerState::restore(config.clone(), &bytes).expect("restores");
    assert_eq!(tenure(&restored), Some(1));
    let old = state.metadata_snapshot_v6();
    assert_eq!(old[0], 6);
    let mut restored = BrokerState::restore(config, &old).expect("restores");
    assert_eq!(tenure(&restored), Some(0));
    assert_eq!(holder(&restored), holder(&state));
    assert!(leased(&release_tenure(&mut restored, "a", 6, 1)));
}

/// A claim names a queue of the broker group, or a retry queue of a delay level the group
/// has (retry queues come into being with their first message, and a claim may come first):
/// any other queue is refused, a queue of another topic too, even one numbered like a level.
#[test]
fn a_claim_of_a_queue_the_group_does_not_have_is_refused_unless_it_is_a_retry_level() {
    let mut state = orders();
    let levels = state.config().reconsume_delays_ms.len() as u32;
    let mut claim_of = |queue: &QueueId| {
        state.apply(Command::ClaimTenure {
            group: "g".into(),
            queue: queue.clone(),
            member: "a".into(),
            generation: 1,
            takeover: None,
            tenure: 1,
        })
    };
    let unknown = |q: &QueueId| Outcome::Refused(Refusal::UnknownQueue(q.clone()));
    for queue in [QueueId::new("orders", 0), QueueId::new("orders", 1)] {
        assert!(matches!(claim_of(&queue), Outcome::Leased(_)), "{queue:?}");
    }
    for queue in [QueueId::new("orders", 2), QueueId::new("payments", 0)] {
        assert_eq!(claim_of(&queue), unknown(&queue));
    }
    for level in [0, levels - 1] {
        let queue = QueueId::retry("g", level);
        assert!(matches!(claim_of(&queue), Outcome::Leased(_)), "{queue:?}");
    }
    let past = QueueId::retry("g", levels);
    assert_eq!(claim_of(&past), unknown(&past));
}

/// A broker group holds at most `LEASES_PER_BROKER_GROUP_MAX` queue leases: at the limit a
/// claim that would add one is refused, while the claims of leases it holds still go.
#[test]
fn at_the_most_leases_a_new_lease_is_refused_and_held_ones_are_claimed_again() {
    use crate::limits::LEASES_PER_BROKER_GROUP_MAX;
    let mut state = orders();
    let claim_in = |state: &mut BrokerState, group: usize| {
        state.apply(Command::ClaimTenure {
            group: format!("g{group}"),
            queue: QueueId::new("orders", 0),
            member: "a".into(),
            generation: 1,
            takeover: None,
            tenure: 1,
        })
    };
    for group in 0..LEASES_PER_BROKER_GROUP_MAX {
        assert!(matches!(claim_in(&mut state, group), Outcome::Leased(_)));
    }
    assert_eq!(state.leases().count(), LEASES_PER_BROKER_GROUP_MAX);
    let more = claim_in(&mut state, LEASES_PER_BROKER_GROUP_MAX);
    assert!(
        matches!(more, Outcome::Refused(Refusal::Malformed(_))),
        "{more:?}"
    );
    assert_eq!(state.leases().count(), LEASES_PER_BROKER_GROUP_MAX);
    let again = claim_in(&mut state, 0);
    assert!(matches!(again, Outcome::Leased(_)), "{again:?}");
}

/// A takeover is for a newer generation than the expired holder's: one at the holder's own
/// generation is refused (both members would hold the queue at that generation).
#[test]
fn a_takeover_at_the_holders_own_generation_is_refused() {
    let mut state = orders();
    assert!(matches!(
        claim(&mut state, "a", 5, None),
        Outcome::Leased(_)
    ));
    assert!(matches!(
        claim(&mut state, "b", 5, Some(("a", 5))),
        Outcome::Refused(Refusal::NotOwner(_))
    ));
    assert_eq!(holder(&state), (Some("a".into()), 5));
    assert!(matches!(
        claim(&mut state, "b", 6, Some(("a", 5))),
        Outcome::Leased(_)
    ));
    assert_eq!(holder(&state), (Some("b".into()), 6));
}

/// A release does not move the queue's generation past the holder's: the metadata may give
/// the queue to the same member at the same generation again (seed 7103028), and it must be
/// able to claim it. Older generations stay fenced.
#[test]
fn a_release_keeps_the_generation_so_the_same_assignment_may_claim_again() {
    let mut state = orders();
    assert!(matches!(
        claim(&mut state, "a", 5, None),
        Outcome::Leased(_)
    ));
    let released = state.apply(Command::Release {
        group: "g".into(),
        queue: QueueId::new("orders", 0),
        member: "a".into(),
        generation: 6,
    });
    assert!(matches!(released, Outcome::Leased(_)), "{released:?}");
    assert_eq!(holder(&state), (None, 6));
    assert!(matches!(
        claim(&mut state, "b", 5, None),
        Outcome::Refused(Refusal::NotOwner(_))
    ));
    assert!(matches!(
        claim(&mut state, "a", 6, None),
        Outcome::Leased(_)
    ));
    assert_eq!(holder(&state), (Some("a".into()), 6));
}

#[test]
fn an_operator_seeks_a_group_to_earliest_latest_or_an_offset_unless_a_member_holds_the_queue() {
    let mut state = orders();
    let queue = QueueId::new("orders", 0);
    appended_at(append(&mut state, 0, 1, 0, 5));
    ack(&mut state, "billing", &queue, &[0, 1, 2, 4]);
    assert_eq!(state.consume_offset("billing", &queue), 3);
    let seek = |state: &mut BrokerState, to, force| {
        state.apply(Command::Seek {
            group: "billing".into(),
            queue: queue.clone(),
            to,
            force,
        })
    };
    assert_eq!(
        seek(&mut state, SeekTo::Earliest, false),
        Outcome::Sought { consume_offset: 0 }
    );
    assert_eq!(
        pulled_offsets(&state, "billing", &queue, 0),
        vec![0, 1, 2, 3, 4],
        "everything is served again, the old acks above the target forgotten"
    );
    assert_eq!(
        seek(&mut state, SeekTo::Offset(99), false),
        Outcome::Sought { consume_offset: 5 },
        "clamped to the queue's end"
    );
    assert_eq!(
        seek(&mut state, SeekTo::Offset(2), false),
        Outcome::Sought { consume_offset: 2 }
    );
    assert_eq!(pulled_offsets(&state, "billing", &queue, 0), vec![2, 3, 4]);
    assert_eq!(
        seek(&mut state, SeekTo::Latest, false),
        Outcome::Sought { consume_offset: 5 }
    );
    assert!(pulled_offsets(&state, "billing", &queue, 0).is_empty());

    // A member holds the queue: refused (nothing changes) unless forced.
    let claimed = state.apply(Command::Claim {
        group: "billing".into(),
        queue: queue.clone(),
        member: "m1".into(),
        generation: 1,
        takeover: None,
    });
    assert!(matches!(claimed, Outcome::Leased(_)), "{claimed:?}");
    let refused = seek(&mut state, SeekTo::Earliest, false);
    assert!(
        matches!(&refused, Outcome::Refused(Refusal::GroupActive { member, .. }) if member == "m1"),
        "{refused:?}"
    );
    assert_eq!(state.consume_offset("billing", &queue), 5);
    assert_eq!(
        seek(&mut state, SeekTo::Earliest, true),
        Outcome::Sought { consume_offset: 0 }
    );
    let unknown = state.apply(Command::Seek {
        group: "billing".into(),
        queue: QueueId::new("nope", 0),
        to: SeekTo::Earliest,
        force: true,
    });
    assert!(matches!(
        unknown,
        Outcome::Refused(Refusal::UnknownQueue(_))
    ));
}

#[test]
fn deleting_a_group_forgets_its_offsets_and_leases_and_no_other_groups() {
    let mut state = orders();
    let q0 = QueueId::new("orders", 0);
    let q1 = QueueId::new("orders", 1);
    appended_at(append(&mut state, 0, 1, 0, 3));
    appended_at(append(&mut state, 1, 1, 3, 3));
    ack(&mut state, "billing", &q0, &[0, 1]);
    ack(&mut state, "billing", &q1, &[0]);
    ack(&mut state, "audit", &q0, &[0]);
    let claimed = state.apply(Command::Claim {
        group: "billing".into(),
        queue: q1.clone(),
        member: "m1".into(),
        generation: 1,
        takeover: None,
    });
    assert!(matches!(claimed, Outcome::Leased(_)));
    let delete = |state: &mut BrokerState, force| {
        state.apply(Command::DeleteGroup {
            group: "billing".into(),
            force,
        })
    };
    assert!(matches!(
        delete(&mut state, false),
        Outcome::Refused(Refusal::GroupActive { .. })
    ));
    assert_eq!(
        state.consume_offset("billing", &q0),
        2,
        "a refusal changes nothing"
    );
    assert_eq!(
        delete(&mut state, true),
        Outcome::GroupDeleted {
            offsets: 2,
            leases: 1
        }
    );
    assert_eq!(state.consume_offset("billing", &q0), 0);
    assert!(state.lease("billing", &q1).is_none());
    assert_eq!(
        state.consume_offset("audit", &q0),
        1,
        "other groups untouched"
    );
    // The same state restored from a snapshot: deletion is part of the replicated state.
    let restored =
        BrokerState::restore(BrokerConfig::default(), &state.snapshot()).expect("restores");
    assert_eq!(restored.consume_offset("billing", &q0), 0);
    assert_eq!(restored.consume_offset("audit", &q0), 1);
}

/// Member `m1` of `group` claims `queue` (generation 1).
fn hold(state: &mut BrokerState, group: &str, queue: &QueueId) {
    let claimed = state.apply(Command::Claim {
        group: group.into(),
        queue: queue.clone(),
        member: "m1".into(),
        generation: 1,
        takeover: None,
    });
    assert!(matches!(claimed, Outcome::Leased(_)), "{claimed:?}");
}

#[test]
fn expiring_groups_counts_the_offsets_and_leases_of_all_of_them() {
    let mut state = orders();
    let q0 = QueueId::new("orders", 0);
    let q1 = QueueId::new("orders", 1);
    appended_at(append(&mut state, 0, 1, 0, 3));
    appended_at(append(&mut state, 1, 1, 3, 3));
    ack(&mut state, "billing", &q0, &[0]);
    ack(&mut state, "billing", &q1, &[0]);
    ack(&mut state, "audit", &q0, &[0]);
    ack(&mut state, "kept", &q0, &[0]);
    for (group, queue) in [("billing", &q1), ("audit", &q0), ("kept", &q1)] {
        hold(&mut state, group, queue);
    }
    // Expiry is forced: held leases go too.
    assert_eq!(
        state.apply(Command::ExpireGroups {
            groups: vec!["billing".into(), "audit".into(), "unknown".into()],
        }),
        Outcome::GroupDeleted {
            offsets: 3,
            leases: 2
        }
    );
    assert_eq!(
        state.consumer_groups(),
        std::collections::BTreeSet::from(["kept"])
    );
}

#[test]
fn only_a_member_of_the_same_group_holding_the_same_queue_blocks_a_seek_or_a_deletion() {
    let mut state = orders();
    let q0 = QueueId::new("orders", 0);
    let q1 = QueueId::new("orders", 1);
    appended_at(append(&mut state, 0, 1, 0, 3));
    ack(&mut state, "report", &q0, &[0]);
    // audit holds orders/0, billing holds orders/1; report holds nothing.
    hold(&mut state, "audit", &q0);
    hold(&mut state, "billing", &q1);
    let seek = |state: &mut BrokerState, group: &str, queue: &QueueId| {
        state.apply(Command::Seek {
            group: group.into(),
            queue: queue.clone(),
            to: SeekTo::Latest,
            force: false,
        })
    };
    assert_eq!(
        seek(&mut state, "billing", &q0),
        Outcome::Sought { consume_offset: 3 },
        "another group's holder of orders/0, and billing's of another queue, do not count"
    );
    let refused = seek(&mut state, "billing", &q1);
    assert!(
        matches!(&refused, Outcome::Refused(Refusal::GroupActive { group, queue, .. }) if group == "billing" && *queue == q1),
        "{refused:?}"
    );
    assert_eq!(
        state.apply(Command::DeleteGroup {
            group: "report".into(),
            force: false,
        }),
        Outcome::GroupDeleted {
            offsets: 1,
            leases: 0
        },
        "other groups' holders do not block a deletion"
    );
}

// ----- the cache and the queue store -----

/// The cache stays within its size whatever is written, its bookkeeping does not grow with the
/// messages written, and what it does not hold is planned as a read of the store, which holds
/// every retained message, exactly as written.
#[test]
fn the_cache_stays_bounded_and_the_store_serves_the_rest() {
    let mut state = BrokerState::new(BrokerConfig {
        cache_bytes_max: 100,
        retention_bytes: Some(400),
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 2);
    let mut store = MemoryStore::default();
    for seq in 0..2_000 {
        append(&mut state, (seq % 2) as u32, 1, seq, 1);
        if seq % 50 == 0 {
            state.apply(Command::Trim { stamp_ms: 2_000 });
        }
        for op in state.take_store_ops() {
            store.apply(0, op).expect("applies");
        }
        assert!(
            state.cache_bytes <= 100,
            "cache of {} bytes",
            state.cache_bytes
        );
        assert!(
            state.cache_order.len() <= 4 * 1024,
            "the cache's order holds {}",
            state.cache_order.len()
        );
    }
    let queue = QueueId::new("orders", 0);
    let start = state.start_offset(&queue).expect("queue");
    assert!(start > 0, "retention dropped the oldest");
    assert!(!state.retains(&queue, start - 1), "trimmed from the index");
    let plan = state
        .plan_pull("billing", &queue, 0, 5, 1 << 20, 0)
        .expect("plans");
    let PullPlan::Read {
        offsets,
        next_offset,
    } = plan
    else {
        panic!("the oldest retained messages are not cached: {plan:?}");
    };
    assert_eq!(offsets, (start..start + 5).collect::<Vec<_>>());
    let (records, error) = store.read(0, &queue, &offsets);
    assert_eq!(error, None);
    let read: Vec<StoredMessage> = offsets
        .iter()
        .zip(&records)
        .map(|(o, r)| decode_record(r, *o).expect("reads"))
        .collect();
    let pulled = state.finish_pull("billing", &queue, &offsets, next_offset, read);
    assert_eq!(pulled.next_offset, start + 5);
    for (offset, stored) in &pulled.messages {
        assert_eq!(
            stored.seq,
            2 * offset,
            "queue 0 holds the even sequence numbers"
        );
    }
    // A read that stopped short ends the pull there, skipping nothing.
    let short = state.finish_pull("billing", &queue, &offsets, next_offset, Vec::new());
    assert_eq!((short.messages.len(), short.next_offset), (0, start));
    // The newest are cached: served at once.
    let end = state.queue_len(&queue).expect("queue");
    let plan = state.plan_pull("billing", &queue, end - 1, 5, 1 << 20, 0);
    assert!(matches!(plan, Ok(PullPlan::Ready(p)) if p.messages.len() == 1));
}

/// The cache's order keeps an entry for every cached write, and entries whose messages left
/// the cache stay in it until the order is looked through: only once it has doubled since the
/// last look, so that a write costs no pass over the queues, and then, the stale entries
/// outnumbering the cached ones, it is cut back to what is still cached.
#[test]
fn the_caches_order_is_looked_through_only_when_it_has_doubled() {
    let mut state = BrokerState::new(BrokerConfig {
        cache_bytes_max: 20,
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 2);
    let kept: Vec<String> = (0..10).map(|i| format!("{i}")).collect();
    let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
    send(&mut state, 1, 2, 0, &kept, 0);
    let big = "x".repeat(21);
    let mut longest = 0;
    for seq in 0..2_100u64 {
        // A cached message, then one over the cache's size, which empties the queue's cache:
        // the first one's entry in the order is stale from then on.
        send(&mut state, 0, 1, 2 * seq, &["a"], 0);
        longest = longest.max(state.cache_order.len());
        send(&mut state, 0, 1, 2 * seq + 1, &[big.as_str()], 0);
    }
    assert!(
        longest >= 2_000,
        "looked through before it doubled: at most {longest} entries"
    );
    assert!(
        state.cache_order.len() < 100,
        "then cut back: {} entries",
        state.cache_order.len()
    );
    let queue = QueueId::new("orders", 1);
    assert!((0..10).all(|o| state.message(&queue, o).is_some()));
    assert_eq!(state.cache_bytes, 10);
}

/// The look at a doubled order cuts it back only when its stale entries outnumber the cached
/// ones by more than 1,024: else the pass over the order would free little.
#[test]
fn the_caches_order_keeps_its_stale_entries_while_they_do_not_outnumber_the_cached_ones() {
    let mut state = BrokerState::new(BrokerConfig {
        cache_bytes_max: 700,
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 2);
    let kept = vec!["b"; 600];
    send(&mut state, 1, 2, 0, &kept, 0);
    let big = "x".repeat(701);
    for seq in 0..1_500u64 {
        send(&mut state, 0, 1, 2 * seq, &["a"], 0);
        send(&mut state, 0, 1, 2 * seq + 1, &[big.as_str()], 0);
    }
    // Looked at 2,049 entries, 601 of them cached: not cut.
    assert_eq!(state.cache_order.len(), 2_100);
    assert_eq!(state.cache_bytes, 600);
}

/// The bytes of every message the queues' caches hold.
fn cached_bytes(state: &BrokerState) -> u64 {
    state
        .queues()
        .flat_map(|queue| {
            let start = state.start_offset(queue).unwrap_or(0);
            let end = state.queue_len(queue).unwrap_or(0);
            (start..end).filter_map(move |offset| state.message(queue, offset))
        })
        .map(|stored| stored.message.size_bytes() as u64)
        .sum()
}

/// A write the cache cannot hold (a message over its size, or a copy made by the store) empties
/// the cache of the queue it goes to, which must stay a suffix: the bytes that frees are no
/// longer counted, so the messages of other queues are not evicted for them.
#[test]
fn the_caches_byte_count_is_what_the_caches_hold_when_an_uncached_write_empties_one() {
    let mut state = BrokerState::new(BrokerConfig {
        reconsume_delays_ms: vec![1_000, 2_000],
        max_reconsume: 1,
        cache_bytes_max: 10,
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 2);
    let (q0, q1) = (QueueId::new("orders", 0), QueueId::new("orders", 1));
    let big = "x".repeat(11);
    let mut seq = 0;
    let step = |state: &mut BrokerState, command: Command, what: &str| {
        let outcome = state.apply(command);
        assert_eq!(
            state.cache_bytes,
            cached_bytes(state),
            "after {what}: {outcome:?}"
        );
        outcome
    };
    let mut sent = |queue: u32, body: &str| {
        seq += 1;
        Command::Append {
            queue: QueueId::new("orders", queue),
            producer_id: 1,
            first_seq: seq,
            messages: vec![Message::with_body(body.to_string())],
            stamp_ms: 1_000,
        }
    };
    let nacked = |queue: &QueueId, offset: Offset| Command::ReconsumeLater {
        group: "billing".into(),
        queue: queue.clone(),
        offset,
        stamp_ms: 2_000,
    };
    step(&mut state, sent(0, &big), "a message over the cache's size");
    step(&mut state, sent(1, "b"), "a cached message");
    step(&mut state, sent(0, "aaa"), "a cached message");
    step(
        &mut state,
        sent(0, &big),
        "an uncached write after cached ones",
    );
    assert!(state.message(&q1, 0).is_some(), "orders/1 keeps its cache");
    // orders/0:0, uncached, goes to the first retry queue, then to the dead-letter queue.
    let Outcome::Requeued { to: retry, .. } = step(&mut state, nacked(&q0, 0), "a requeue") else {
        panic!("not requeued");
    };
    let requeued = step(&mut state, nacked(&retry, 0), "a dead-lettering");
    assert!(
        matches!(
            requeued,
            Outcome::Requeued {
                dead_letter: true,
                ..
            }
        ),
        "{requeued:?}"
    );
    // A cached copy in the retry queue, then an uncached one (made by the store) after it.
    step(&mut state, sent(1, "c"), "a cached message");
    step(&mut state, nacked(&q1, 1), "a cached copy");
    assert!(state.message(&retry, 1).is_some());
    step(&mut state, nacked(&q0, 2), "a copy made by the store");
    assert!(
        state.message(&retry, 1).is_none(),
        "the retry queue's cache emptied"
    );
    // A cached copy again, then a redrive of the uncached dead letter after it.
    step(&mut state, sent(1, "d"), "a cached message");
    step(&mut state, nacked(&q1, 2), "a cached copy");
    let redriven = step(
        &mut state,
        Command::Redrive {
            group: "billing".into(),
            messages_max: 1,
            stamp_ms: 3_000,
        },
        "a redrive of an uncached dead letter",
    );
    assert_eq!(
        redriven,
        Outcome::Redriven {
            moved: 1,
            remaining: 0
        }
    );
    assert!(
        state.message(&retry, 3).is_none(),
        "the retry queue's cache emptied"
    );
    // The cache holds "b", "c" and "d" of orders/1: a 7-byte message fits beside them.
    step(&mut state, sent(0, "eeeeeee"), "a cached message");
    assert!(
        state.message(&q1, 0).is_some(),
        "nothing evicted for bytes no longer cached"
    );
}

#[test]
fn retention_stops_counting_the_cached_bytes_it_drops() {
    let mut state = BrokerState::new(BrokerConfig {
        retention_ms: Some(10_000),
        cache_bytes_max: 10,
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 2);
    let (q0, q1) = (QueueId::new("orders", 0), QueueId::new("orders", 1));
    send(&mut state, 0, 1, 0, &["aaaa"], 1_000);
    send(&mut state, 1, 1, 1, &["bbb"], 20_000);
    assert_eq!(state.cache_bytes, 7);
    trim(&mut state, 11_000);
    assert_eq!(state.start_offset(&q0), Some(1), "the old message dropped");
    assert_eq!(state.cache_bytes, 3);
    assert_eq!(state.cache_bytes, cached_bytes(&state));
    // Room for seven bytes more: nothing is evicted for the bytes retention dropped.
    send(&mut state, 1, 1, 2, &["ccccccc"], 20_000);
    assert!(
        state.message(&q1, 0).is_some(),
        "orders/1 keeps its oldest message cached"
    );
}

/// The store is read only for messages the cache does not hold: a pull starting at the oldest
/// cached message is answered at once.
#[test]
fn a_pull_from_the_oldest_cached_message_is_served_without_a_read() {
    let mut state = BrokerState::new(BrokerConfig {
        cache_bytes_max: 15,
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 1);
    let queue = QueueId::new("orders", 0);
    appended_at(append(&mut state, 0, 1, 0, 3));
    let plan = state.plan_pull("billing", &queue, 0, 10, 1 << 20, 0);
    assert!(
        matches!(&plan, Ok(PullPlan::Ready(p)) if p.messages.len() == 3 && p.next_offset == 3),
        "{plan:?}"
    );
    // Three messages more evict the first three ("p1 sN" is 5 bytes): the cache starts at 3.
    appended_at(append(&mut state, 0, 1, 3, 3));
    assert!(state.message(&queue, 2).is_none() && state.message(&queue, 3).is_some());
    let plan = state.plan_pull("billing", &queue, 3, 10, 1 << 20, 0);
    assert!(
        matches!(&plan, Ok(PullPlan::Ready(p)) if p.messages.len() == 3 && p.next_offset == 6),
        "{plan:?}"
    );
    let plan = state.plan_pull("billing", &queue, 2, 10, 1 << 20, 0);
    assert!(
        matches!(&plan, Ok(PullPlan::Read { offsets, .. }) if offsets[0] == 2),
        "{plan:?}"
    );
}

/// Five messages of orders/0, each answered `ReconsumeLater` once by `billing`: with no retry
/// allowed, all five go to billing's dead-letter queue (offsets 0..5).
fn dead_lettered(cache_bytes_max: u64) -> (BrokerState, MemoryStore) {
    let mut state = BrokerState::new(BrokerConfig {
        reconsume_delays_ms: vec![1_000, 5_000],
        max_reconsume: 0,
        cache_bytes_max,
        ..BrokerConfig::default()
    });
    topic(&mut state, "orders", 1);
    let mut store = MemoryStore::default();
    let queue = QueueId::new("orders", 0);
    send(&mut state, 0, 1, 0, &["a", "b", "c", "d", "e"], 1_000);
    for offset in 0..5 {
        let outcome = nack(&mut state, "billing", &queue, offset, 10_000);
        assert!(
            matches!(outcome, Outcome::Requeued { dead_letter: true, offset: o, .. } if o == offset),
            "{outcome:?}"
        );
    }
    for op in state.take_store_ops() {
        store.apply(0, op).expect("applies");
    }
    (state, store)
}

fn redrive(state: &mut BrokerState, store: &mut MemoryStore, n: u32, at: u64) -> Outcome {
    let outcome = state.apply(Command::Redrive {
        group: "billing".into(),
        messages_max: n,
        stamp_ms: at,
    });
    for op in state.take_store_ops() {
        store.apply(0, op).expect("applies");
    }
    outcome
}

/// What `group` would be handed from `queue` at `now_ms`, read through the store as a node
/// does: (offset, body, reconsume_times, origin offset).
fn read_all(
    state: &BrokerState,
    store: &MemoryStore,
    group: &str,
    queue: &QueueId,
    now_ms: u64,
) -> Vec<(Offset, String, u32, Option<Offset>)> {
    let pulled = match state
        .plan_pull(group, queue, 0, 100, 1 << 20, now_ms)
        .expect("plans")
    {
        PullPlan::Ready(pulled) => pulled,
        PullPlan::Read {
            offsets,
            next_offset,
        } => {
            let (records, error) = store.read(0, queue, &offsets);
            assert_eq!(error, None);
            let read = offsets
                .iter()
                .zip(&records)
                .map(|(o, r)| decode_record(r, *o).expect("reads"))
                .collect();
            state.finish_pull(group, queue, &offsets, next_offset, read)
        }
    };
    pulled
        .messages
        .into_iter()
        .map(|(o, m)| {
            (
                o,
                String::from_utf8_lossy(&m.message.body).into_owned(),
                m.reconsume_times,
                m.origin.map(|origin| origin.offset),
            )
        })
        .collect()
}

#[test]
fn a_redrive_moves_dead_letters_to_the_first_retry_queue_once_each() {
    // Cached originals (copied by the state) and uncached ones (copied by the store).
    for cache_bytes_max in [CACHE_BYTES_DEFAULT, 0] {
        let (mut state, mut store) = dead_lettered(cache_bytes_max);
        let dlq = QueueId::dead_letter("billing");
        let retry = QueueId::retry("billing", 0);
        assert_eq!(read_all(&state, &store, "billing", &dlq, 10_000).len(), 5);
        assert_eq!(
            redrive(&mut state, &mut store, 2, 20_000),
            Outcome::Redriven {
                moved: 2,
                remaining: 3
            }
        );
        // Due after the first redelivery delay, with the count reset and the origin kept.
        assert!(read_all(&state, &store, "billing", &retry, 20_999).is_empty());
        assert_eq!(
            read_all(&state, &store, "billing", &retry, 21_000),
            vec![
                (0, "a".to_string(), 0, Some(0)),
                (1, "b".to_string(), 0, Some(1))
            ],
            "cache {cache_bytes_max}"
        );
        // The moved ones are gone from the dead-letter queue for billing, and only them.
        let left: Vec<Offset> = read_all(&state, &store, "billing", &dlq, 30_000)
            .iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(left, vec![2, 3, 4]);
        assert_eq!(
            redrive(&mut state, &mut store, 100, 30_000),
            Outcome::Redriven {
                moved: 3,
                remaining: 0
            }
        );
        assert_eq!(
            redrive(&mut state, &mut store, 100, 40_000),
            Outcome::Redriven {
                moved: 0,
                remaining: 0
            },
            "a second redrive moves nothing twice"
        );
        let bodies: Vec<String> = read_all(&state, &store, "billing", &retry, 50_000)
            .into_iter()
            .map(|m| m.1)
            .collect();
        assert_eq!(bodies, ["a", "b", "c", "d", "e"]);
        // A restored replica agrees.
        if cache_bytes_max > 0 {
            let again = restored(&state);
            assert_eq!(
                read_all(&again, &store, "billing", &retry, 50_000).len(),
                5,
                "restored"
            );
            assert_eq!(again.consume_offset("billing", &dlq), 5);
        }
        // A group with no dead letters has nothing to move.
        let none = state.apply(Command::Redrive {
            group: "audit".into(),
            messages_max: 10,
            stamp_ms: 50_000,
        });
        assert_eq!(
            none,
            Outcome::Redriven {
                moved: 0,
                remaining: 0
            }
        );
    }
}

// ----- deleting topics -----

fn create_at(state: &mut BrokerState, epoch: u64, name: &str, queues: u32) {
    let outcome = state.apply(Command::CreateQueuesAt {
        queues: (0..queues)
            .map(|q| (epoch, QueueId::new(name, q)))
            .collect(),
    });
    assert_eq!(outcome, Outcome::QueuesCreated);
}

/// A deleted topic's queues go with their messages (in the store too), offsets and leases; a
/// creation of the deleted incarnation arriving late (a leader whose topic table lags) brings
/// nothing back, even after a snapshot; the topic created again starts empty.
#[test]
fn a_dropped_topic_leaves_nothing_and_a_late_creation_cannot_bring_it_back() {
    let mut state = BrokerState::new(BrokerConfig::default());
    let mut store = MemoryStore::default();
    create_at(&mut state, 3, "orders", 2);
    topic(&mut state, "other", 1);
    let q0 = QueueId::new("orders", 0);
    let other = QueueId::new("other", 0);
    appended_at(append(&mut state, 0, 1, 0, 3));
    ack(&mut state, "billing", &q0, &[0, 1]);
    ack(&mut state, "billing", &other, &[]);
    let claimed = state.apply(Command::Claim {
        group: "billing".into(),
        queue: q0.clone(),
        member: "m1".into(),
        generation: 1,
        takeover: None,
    });
    assert!(matches!(claimed, Outcome::Leased(_)));
    for op in state.take_store_ops() {
        store.apply(1, op).expect("applies");
    }
    assert!(store.record(1, &q0, 0).is_some());

    // A deletion of an older incarnation changes nothing.
    state.apply(Command::DropTopic {
        topic: "orders".into(),
        epoch: 2,
    });
    assert_eq!(state.queue_len(&q0), Some(3));

    state.apply(Command::DropTopic {
        topic: "orders".into(),
        epoch: 3,
    });
    assert_eq!(state.queue_len(&q0), None);
    assert_eq!(state.queue_len(&QueueId::new("orders", 1)), None);
    assert_eq!(state.consume_offset("billing", &q0), 0);
    assert!(state.lease("billing", &q0).is_none());
    assert_eq!(state.queue_len(&other), Some(0), "other topics untouched");
    let ops = state.take_store_ops();
    assert!(
        ops.contains(&StoreOp::DropQueue { queue: q0.clone() }),
        "{ops:?}"
    );
    for op in ops {
        store.apply(1, op).expect("applies");
    }
    assert!(
        store.record(1, &q0, 0).is_none(),
        "the store forgot the messages"
    );

    // A lagging leader proposes the old incarnation again: refused by the mark, also on a
    // replica restored from a snapshot of either kind.
    let full = BrokerState::restore(BrokerConfig::default(), &state.snapshot()).expect("full");
    let index = BrokerState::restore(
        BrokerConfig::default(),
        &state.metadata_snapshot().expect("encodes"),
    )
    .expect("metadata");
    for mut replica in [state.clone(), full, index] {
        create_at(&mut replica, 3, "orders", 2);
        topic(&mut replica, "orders", 2); // a pre-epoch creation is of epoch 0, older still
        assert_eq!(replica.queue_len(&q0), None, "the deleted topic came back");
        assert!(matches!(
            append(&mut replica, 0, 1, 10, 1),
            Outcome::Refused(Refusal::UnknownQueue(_))
        ));
    }

    // Created again (a newer epoch): empty, and the same producer's sequence numbers are new.
    create_at(&mut state, 5, "orders", 2);
    assert_eq!(state.queue_len(&q0), Some(0));
    assert_eq!(state.consume_offset("billing", &q0), 0);
    assert_eq!(
        state.topic_mark("orders"),
        Some(TopicMark {
            epoch: 5,
            dropped: false
        })
    );
    let ops = state.take_store_ops();
    for op in ops {
        store.apply(1, op).expect("applies");
    }
    appended_at(append(&mut state, 0, 2, 0, 1));
    for op in state.take_store_ops() {
        store.apply(1, op).expect("applies");
    }
    let first = state.message(&q0, 0).cloned().expect("cached");
    assert_eq!(
        first.producer_id, 2,
        "offset 0 holds the new incarnation's message"
    );
    assert_eq!(state.queue_len(&q0), Some(1));
}

/// A creation of a newer incarnation whose deletion never arrived (its tombstone was
/// forgotten) replaces the older queues rather than adopting them.
#[test]
fn a_newer_incarnation_replaces_older_queues_it_finds() {
    let mut state = BrokerState::new(BrokerConfig::default());
    create_at(&mut state, 1, "orders", 1);
    appended_at(append(&mut state, 0, 1, 0, 2));
    create_at(&mut state, 4, "orders", 1);
    assert_eq!(state.queue_len(&QueueId::new("orders", 0)), Some(0));
    // The same incarnation again is harmless.
    appended_at(append(&mut state, 0, 1, 5, 1));
    create_at(&mut state, 4, "orders", 1);
    assert_eq!(state.queue_len(&QueueId::new("orders", 0)), Some(1));
}

/// A crash after a topic's drop was applied (the store removed its files) and before the
/// next snapshot was durable: the restart reads the snapshot from before the drop. Told the
/// log it will replay, the restored state no longer asks the store for the dropped queues,
/// so recovery finds nothing missing, and the replay ends where the original did, also when
/// the topic was created again (and written to) before the crash.
#[test]
fn a_restart_between_a_drop_and_the_next_snapshot_finds_the_dropped_queues_legitimately_gone() {
    let q0 = QueueId::new("orders", 0);
    let other = QueueId::new("other", 0);
    for recreate in [false, true] {
        let mut state = BrokerState::new(BrokerConfig::default());
        let mut store = MemoryStore::default();
        create_at(&mut state, 3, "orders", 2);
        topic(&mut state, "other", 1);
        appended_at(append(&mut state, 0, 1, 0, 3));
        appended_at(append(&mut state, 1, 1, 3, 2));
        appended_at(state.apply(Command::Append {
            queue: other.clone(),
            producer_id: 2,
            first_seq: 0,
            messages: vec![Message::with_body("kept")],
            stamp_ms: 1_000,
        }));
        for op in state.take_store_ops() {
            store.apply(1, op).expect("applies");
        }
        let before_drop = state.metadata_snapshot().expect("encodes");

        // The log after that snapshot, applied (and carried out by the store) before the crash.
        let mut log = vec![Command::DropTopic {
            topic: "orders".into(),
            epoch: 3,
        }];
        if recreate {
            log.push(Command::CreateQueuesAt {
                queues: vec![(4, q0.clone()), (4, QueueId::new("orders", 1))],
            });
            log.push(Command::Append {
                queue: q0.clone(),
                producer_id: 7,
                first_seq: 0,
                messages: vec![Message::with_body("new")],
                stamp_ms: 2_000,
            });
        }
        for command in &log {
            state.apply(command.clone());
        }
        for op in state.take_store_ops() {
            store.apply(1, op).expect("applies");
        }

        // Without the log: the snapshot asks for what the store dropped (or, re-created, for
        // offsets the new incarnation's messages now occupy), and the store refuses.
        let mut blind = BrokerState::restore(BrokerConfig::default(), &before_drop).expect("ok");
        let refused = blind
            .take_store_ops()
            .into_iter()
            .try_for_each(|op| store.clone().apply(1, op));
        assert!(
            refused.is_err(),
            "the scenario needs a store that lacks the dropped queues"
        );

        let mut restored = BrokerState::restore(BrokerConfig::default(), &before_drop).expect("ok");
        let mut gone = restored.expect_replay(&log);
        gone.sort();
        assert_eq!(
            gone,
            vec![q0.clone(), QueueId::new("orders", 1)],
            "{recreate}"
        );
        let mut recovered = store.clone();
        for op in restored.take_store_ops() {
            recovered
                .apply(1, op)
                .expect("recovery finds the dropped queues legitimately gone");
        }
        assert!(
            recovered.record(1, &other, 0).is_some(),
            "other topics are still checked and kept"
        );
        for command in &log {
            restored.apply(command.clone());
        }
        for op in restored.take_store_ops() {
            recovered.apply(1, op).expect("the replay applies");
        }
        let full = |state: &BrokerState, store: &MemoryStore| {
            state.snapshot_with(&mut |q, o| {
                store
                    .message(1, q, o)
                    .ok_or_else(|| format!("{q}@{o} not stored"))
            })
        };
        assert_eq!(full(&restored, &recovered), full(&state, &store));
        assert!(full(&state, &store).is_ok());
    }

    // A log that drops only an older incarnation, or nothing, asks for everything.
    let mut state = BrokerState::new(BrokerConfig::default());
    create_at(&mut state, 3, "orders", 1);
    let bytes = state.metadata_snapshot().expect("encodes");
    let mut restored = BrokerState::restore(BrokerConfig::default(), &bytes).expect("ok");
    let older = [
        Command::DropTopic {
            topic: "orders".into(),
            epoch: 2,
        },
        Command::CreateQueuesAt {
            queues: vec![(3, q0.clone())],
        },
    ];
    assert_eq!(restored.expect_replay(&older), Vec::<QueueId>::new());
    match restored.take_store_ops().as_slice() {
        [StoreOp::Recover { queues }] => assert_eq!(queues.len(), 1),
        other => panic!("restoring asks {other:?}"),
    }
}

#[test]
fn an_operator_seeks_a_group_to_the_first_message_stored_at_or_after_a_time() {
    let mut state = orders();
    let queue = QueueId::new("orders", 0);
    for (seq, stamp_ms) in [(0u64, 1_000u64), (1, 2_000), (2, 3_000)] {
        let appended = state.apply(Command::Append {
            queue: queue.clone(),
            producer_id: 1,
            first_seq: seq,
            messages: vec![Message::with_body(Bytes::from(format!("m{seq}")))],
            stamp_ms,
        });
        assert_eq!(appended_at(appended).1, seq);
    }
    let mut seek = |ms| {
        state.apply(Command::Seek {
            group: "billing".into(),
            queue: queue.clone(),
            to: SeekTo::Time(ms),
            force: false,
        })
    };
    assert_eq!(seek(0), Outcome::Sought { consume_offset: 0 });
    assert_eq!(seek(2_000), Outcome::Sought { consume_offset: 1 });
    assert_eq!(seek(2_001), Outcome::Sought { consume_offset: 2 });
    assert_eq!(
        seek(3_001),
        Outcome::Sought { consume_offset: 3 },
        "after the newest message: the end"
    );
}

/// A restart from a snapshot taken before a creation of a newer incarnation of a topic whose
/// older incarnation's drop never arrived (its tombstone was forgotten): replaying the
/// creation drops the older queues, whose files the store removed before the crash, so the
/// restored state no longer asks the store for them. A creation of an older incarnation, or
/// of the same one, drops nothing and everything is asked for.
#[test]
fn a_restart_before_a_newer_incarnations_creation_finds_the_older_queues_legitimately_gone() {
    let q0 = QueueId::new("orders", 0);
    let q1 = QueueId::new("orders", 1);
    let mut state = BrokerState::new(BrokerConfig::default());
    let mut store = MemoryStore::default();
    create_at(&mut state, 3, "orders", 2);
    appended_at(append(&mut state, 0, 1, 0, 3));
    appended_at(append(&mut state, 1, 1, 3, 2));
    for op in state.take_store_ops() {
        store.apply(1, op).expect("applies");
    }
    let before = state.metadata_snapshot().expect("encodes");

    let log = [Command::CreateQueuesAt {
        queues: vec![(4, q0.clone())],
    }];
    for command in &log {
        state.apply(command.clone());
    }
    for op in state.take_store_ops() {
        store.apply(1, op).expect("applies");
    }
    assert_eq!(state.queue_len(&q1), None, "the older incarnation went");

    let mut restored = BrokerState::restore(BrokerConfig::default(), &before).expect("ok");
    let mut gone = restored.expect_replay(&log);
    gone.sort();
    assert_eq!(gone, vec![q0.clone(), q1.clone()]);
    let mut recovered = store.clone();
    for op in restored.take_store_ops() {
        recovered
            .apply(1, op)
            .expect("recovery finds the older queues legitimately gone");
    }
    for command in &log {
        restored.apply(command.clone());
    }
    assert_eq!(restored.snapshot(), state.snapshot());

    for epoch in [2, 3] {
        let mut restored = BrokerState::restore(BrokerConfig::default(), &before).expect("ok");
        let older = [Command::CreateQueuesAt {
            queues: vec![(epoch, q0.clone())],
        }];
        assert_eq!(
            restored.expect_replay(&older),
            Vec::<QueueId>::new(),
            "{epoch}"
        );
        match restored.take_store_ops().as_slice() {
            [StoreOp::Recover { queues }] => assert_eq!(queues.len(), 2, "{epoch}"),
            other => panic!("restoring asks {other:?}"),
        }
    }
}

fn drop_at(state: &mut BrokerState, topic: &str, epoch: u64) {
    state.apply(Command::DropTopic {
        topic: topic.into(),
        epoch,
    });
}

/// A drop of a newer incarnation than the one this group dropped (its creation here is still
/// to come, or never came) raises the tombstone to it: a late creation of that incarnation is
/// refused like one of the dropped incarnation, and only a newer one is created.
#[test]
fn a_drop_of_a_newer_incarnation_over_a_tombstone_refuses_its_late_creation() {
    let mut state = BrokerState::new(BrokerConfig::default());
    let q0 = QueueId::new("orders", 0);
    create_at(&mut state, 3, "orders", 1);
    drop_at(&mut state, "orders", 3);
    drop_at(&mut state, "orders", 4);
    assert_eq!(
        state.topic_mark("orders"),
        Some(TopicMark {
            epoch: 4,
            dropped: true
        })
    );
    create_at(&mut state, 4, "orders", 1);
    assert_eq!(
        state.queue_len(&q0),
        None,
        "the dropped incarnation 4 came back"
    );
    create_at(&mut state, 5, "orders", 1);
    assert_eq!(state.queue_len(&q0), Some(0));
}

/// The group keeps at most `TOMBSTONES_MAX` tombstones: under it every one is kept; past it the
/// one of the oldest incarnation among the other topics is forgotten (so a late creation of
/// it would be taken), never the mark of a topic that is not dropped, however old.
#[test]
fn past_the_most_tombstones_only_the_oldest_other_tombstone_is_forgotten() {
    use crate::limits::TOMBSTONES_MAX;
    let mut state = BrokerState::new(BrokerConfig::default());
    // A live topic of an incarnation older than every tombstone's.
    create_at(&mut state, 1, "live", 1);
    let name = |t: usize| format!("t{t}");
    for t in 0..TOMBSTONES_MAX {
        drop_at(&mut state, &name(t), 2 + t as u64);
    }
    for t in [0, 1, TOMBSTONES_MAX - 1] {
        assert_eq!(
            state.topic_mark(&name(t)),
            Some(TopicMark {
                epoch: 2 + t as u64,
                dropped: true
            }),
            "{t}: at the limit, none forgotten"
        );
    }
    drop_at(&mut state, "last", 2 + TOMBSTONES_MAX as u64);
    assert_eq!(state.topic_mark(&name(0)), None, "the oldest forgotten");
    for t in [1, TOMBSTONES_MAX - 1] {
        assert_eq!(
            state.topic_mark(&name(t)).map(|m| m.dropped),
            Some(true),
            "{t}"
        );
    }
    assert_eq!(
        state.topic_mark("last"),
        Some(TopicMark {
            epoch: 2 + TOMBSTONES_MAX as u64,
            dropped: true
        })
    );
    assert_eq!(
        state.topic_mark("live"),
        Some(TopicMark {
            epoch: 1,
            dropped: false
        }),
        "a live topic's mark is no tombstone"
    );
    // What the tombstones are for: a late creation of t1 is refused, of t0 no longer.
    create_at(&mut state, 3, &name(1), 1);
    assert_eq!(state.queue_len(&QueueId::new(name(1), 0)), None);
    create_at(&mut state, 2, &name(0), 1);
    assert_eq!(state.queue_len(&QueueId::new(name(0), 0)), Some(0));
}
