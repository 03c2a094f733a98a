use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::broker::Message as QueueMessage;
use crate::raft::{Entry, EntryKind, Message};

fn send(bodies: &[Vec<u8>]) -> Frame {
    Frame::Request {
        id: 7,
        request: Request::Send {
            broker: 1,
            queue: crate::broker::QueueId::new("t", 2),
            producer_id: 3,
            first_seq: 4,
            messages: bodies
                .iter()
                .map(|b| QueueMessage::with_body(Bytes::from(b.clone())))
                .collect(),
        },
    }
}

fn append(commands: Vec<Vec<u8>>, term: u64) -> Frame {
    Frame::Peer(Envelope {
        group: 1,
        from: 2,
        to: 3,
        message: Message::Append {
            term,
            prev_index: 9,
            prev_term: term.saturating_sub(1),
            entries: vec![
                Entry {
                    term,
                    index: 10,
                    kind: EntryKind::Commands(commands.into_iter().map(Bytes::from).collect()),
                },
                Entry {
                    term,
                    index: 11,
                    kind: EntryKind::Noop,
                },
            ],
            commit: 8,
        },
    })
}

fn encoded(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        encode_frame(frame, &mut out).expect("encodes");
    }
    out
}

fn decode_all(decoder: &mut FrameDecoder) -> Result<Vec<Frame>, WireError> {
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame()? {
        frames.push(frame);
    }
    Ok(frames)
}

#[test]
fn frames_survive_arbitrary_splits() {
    let frames = vec![
        Frame::Hello {
            version: PROTOCOL_VERSION,
            node: Some(1),
            token: None,
        },
        Frame::Hello {
            version: PROTOCOL_VERSION,
            node: None,
            token: Some("hf_secret".into()),
        },
        Frame::Goodbye {
            reason: "refused".into(),
        },
        send(&[b"a".to_vec(), vec![0; 3000]]),
        append(vec![b"x".to_vec()], 5),
        Frame::Response {
            id: 7,
            response: Response::Busy,
        },
    ];
    let bytes = encoded(&frames);
    for piece in [1, 2, 7, 8, 9, 100, bytes.len()] {
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(piece) {
            decoder.push(chunk);
            got.extend(decode_all(&mut decoder).expect("valid stream"));
        }
        assert_eq!(got, frames, "pieces of {piece} bytes");
        assert_eq!(decoder.buffered_bytes(), 0);
    }
}

#[test]
fn a_truncated_frame_waits_for_more() {
    let bytes = encoded(&[send(&[b"hello".to_vec()])]);
    let mut decoder = FrameDecoder::new();
    decoder.push(&bytes[..bytes.len() - 1]);
    assert_eq!(decoder.next_frame(), Ok(None));
    assert_eq!(decoder.buffered_bytes(), bytes.len() - 1);
}

#[test]
fn an_oversized_length_is_refused_before_buffering() {
    let mut decoder = FrameDecoder::new();
    decoder.push(&u32::MAX.to_le_bytes());
    decoder.push(&[0; 4]);
    assert_eq!(
        decoder.next_frame(),
        Err(WireError::TooLarge {
            len_bytes: u64::from(u32::MAX),
            max_bytes: FRAME_BYTES_MAX as u64,
        })
    );
    // The stream has lost its framing: later bytes never resynchronise it.
    decoder.push(&encoded(&[Frame::Response {
        id: 1,
        response: Response::Busy,
    }]));
    assert!(decoder.next_frame().is_err());
}

#[test]
fn an_oversized_frame_is_not_encoded() {
    let mut out = vec![1, 2, 3];
    let big = send(&[vec![0; FRAME_BYTES_MAX]]);
    assert!(matches!(
        encode_frame(&big, &mut out),
        Err(WireError::TooLarge { .. })
    ));
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn a_flipped_bit_fails_the_checksum() {
    let mut bytes = encoded(&[send(&[b"hello".to_vec()])]);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    let mut decoder = FrameDecoder::new();
    decoder.push(&bytes);
    assert!(matches!(
        decoder.next_frame(),
        Err(WireError::Checksum { .. })
    ));
}

/// `payload` behind a valid header: length and checksum right, whatever the payload is.
fn checksummed(payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn an_unknown_variant_is_malformed() {
    // A well-checksummed payload naming a frame variant this version does not have.
    let mut decoder = FrameDecoder::new();
    decoder.push(&checksummed(&[200, 1, 2, 3]));
    assert!(matches!(decoder.next_frame(), Err(WireError::Malformed(_))));
}

#[test]
fn trailing_bytes_inside_a_frame_are_malformed() {
    let mut payload = postcard::to_allocvec(&Frame::Response {
        id: 1,
        response: Response::Busy,
    })
    .expect("encodes");
    payload.push(0);
    let mut decoder = FrameDecoder::new();
    decoder.push(&checksummed(&payload));
    assert!(matches!(decoder.next_frame(), Err(WireError::Malformed(_))));
}

#[test]
fn hello_checks_the_version() {
    let ours = Frame::Hello {
        version: PROTOCOL_VERSION,
        node: Some(4),
        token: None,
    };
    assert_eq!(
        check_hello(&ours),
        Ok(Hello {
            node: Some(4),
            token: None
        })
    );
    let theirs = Frame::Hello {
        version: PROTOCOL_VERSION + 1,
        node: None,
        token: None,
    };
    assert_eq!(
        check_hello(&theirs),
        Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: PROTOCOL_VERSION + 1
        })
    );
    let not_hello = Frame::Response {
        id: 1,
        response: Response::Busy,
    };
    assert!(matches!(
        check_hello(&not_hello),
        Err(WireError::Malformed(_))
    ));
}

proptest! {
    #[test]
    fn round_trip(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
        commands in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
        term in any::<u64>(),
        split in 1usize..64,
    ) {
        let frames = vec![send(&bodies), append(commands, term)];
        let bytes = encoded(&frames);
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(split) {
            decoder.push(chunk);
            got.extend(decode_all(&mut decoder).expect("valid stream"));
        }
        prop_assert_eq!(got, frames);
    }

    /// Arbitrary bytes never panic the decoder, and whatever it accepts survives a round trip
    /// (postcard accepts non-canonical varints, so the bytes themselves may differ).
    #[test]
    fn garbage_is_refused_or_read_consistently(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        while let Ok(Some(frame)) = decoder.next_frame() {
            let again = encoded(std::slice::from_ref(&frame));
            let mut redecoder = FrameDecoder::new();
            redecoder.push(&again);
            prop_assert_eq!(redecoder.next_frame(), Ok(Some(frame)));
        }
    }
}

#[test]
fn a_small_maximum_refuses_what_the_default_accepts() {
    let frame = send(&[vec![0; 20_000]]);
    let bytes = encoded(std::slice::from_ref(&frame));
    let mut small = FrameDecoder::with_frame_bytes_max(16 << 10);
    // The header alone is enough to refuse: nothing of the payload needs to arrive.
    small.push(&bytes[..FRAME_HEADER_BYTES]);
    assert!(matches!(
        small.next_frame(),
        Err(WireError::TooLarge { max_bytes, .. }) if max_bytes == 16 << 10
    ));
    let mut raised = FrameDecoder::with_frame_bytes_max(16 << 10);
    raised.set_frame_bytes_max(FRAME_BYTES_MAX);
    raised.push(&bytes);
    assert_eq!(raised.next_frame(), Ok(Some(frame)));
    assert_eq!(
        FrameDecoder::with_frame_bytes_max(usize::MAX).frame_bytes_max(),
        FRAME_BYTES_MAX
    );
}

/// Every kind of frame the sliced decoding handles, and some it hands back, decode through a
/// decoder exactly as postcard decodes their bytes; the commands of a large append and a
/// send's keys and bodies are then slices of the frame's bytes, and a small append's
/// commands copies of their own.
#[test]
fn frames_decoded_with_slices_are_the_frames_postcard_decodes() {
    let large = vec![0xab; crate::limits::SHARED_FRAME_BYTES_MIN];
    let mut config = append(vec![b"c".to_vec()], 4);
    if let Frame::Peer(Envelope {
        message: Message::Append { entries, .. },
        ..
    }) = &mut config
    {
        entries[1].kind = EntryKind::Config(crate::raft::Membership::new([1, 2, 3]));
    }
    let mut tagged = send(&[vec![1; 100], vec![2; 200]]);
    if let Frame::Request {
        request: Request::Send { messages, .. },
        ..
    } = &mut tagged
    {
        messages[0].key = Some(Bytes::from_static(b"key"));
        messages[0].tags = vec!["a".into()];
        messages[0].properties.insert("p".into(), "v".into());
    }
    let frames = vec![
        Frame::Hello {
            version: PROTOCOL_VERSION,
            node: Some(2),
            token: None,
        },
        append(vec![large.clone(), b"small".to_vec()], 3),
        append(vec![b"one".to_vec(), b"two".to_vec()], 3),
        append(vec![], u64::MAX),
        config,
        Frame::Peer(Envelope {
            group: 1,
            from: 2,
            to: 3,
            message: Message::Heartbeat {
                term: 2,
                commit: 3,
                context: 4,
            },
        }),
        send(&[vec![5; 1000], vec![6; 1000], vec![]]),
        tagged,
        Frame::Request {
            id: 1,
            request: Request::Topics,
        },
        Frame::Goodbye {
            reason: "bye".into(),
        },
    ];
    let mut sliced = 0;
    for frame in &frames {
        let bytes = encoded(std::slice::from_ref(frame));
        let payload = Bytes::copy_from_slice(&bytes[FRAME_HEADER_BYTES..]);
        let plain: Frame = postcard::from_bytes(&payload).expect("decodes");
        assert_eq!(&plain, frame);
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        assert_eq!(decoder.next_frame(), Ok(Some(frame.clone())));

        let Some(got) = shared::decode_sliced(&payload) else {
            continue;
        };
        sliced += 1;
        assert_eq!(&got, frame);
        let within = payload.as_ptr_range();
        let inside = |b: &Bytes| b.is_empty() || within.contains(&b.as_ptr());
        match &got {
            Frame::Peer(Envelope {
                message: Message::Append { entries, .. },
                ..
            }) => {
                for entry in entries {
                    if let EntryKind::Commands(commands) = &entry.kind {
                        for command in commands.iter().filter(|c| !c.is_empty()) {
                            let large = payload.len() >= crate::limits::SHARED_FRAME_BYTES_MIN;
                            assert_eq!(inside(command), large, "{command:?} in {frame:?}");
                        }
                    }
                }
            }
            Frame::Request {
                request: Request::Send { messages, .. },
                ..
            } => {
                for m in messages {
                    assert!(inside(&m.body) && m.key.as_ref().is_none_or(inside));
                }
            }
            other => panic!("sliced a frame it does not slice: {other:?}"),
        }
    }
    // The appends without a configuration entry, and both sends.
    assert_eq!(sliced, 5);
}
