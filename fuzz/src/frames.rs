//! The `frames` target: [`FrameDecoder`] fed a byte stream in arbitrary pieces.
//!
//! The stream is built from pieces of four kinds: raw bytes, payloads sealed with a correct
//! header (so postcard's decoder behind the checksum is reached), whole frames encoded from a
//! few templates (so valid streams are common), and bare headers (oversized lengths).

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use holdfast_core::broker::{Message as QueueMessage, QueueId, StoredMessage};
use holdfast_core::node::protocol::{Request, Response};
use holdfast_core::raft::{Entry, EntryKind, Envelope, Message};
use holdfast_core::wire::{
    FRAME_BYTES_MAX, FRAME_HEADER_BYTES, Frame, FrameDecoder, PROTOCOL_VERSION, WireError,
    check_hello, encode_frame,
};

/// Bytes of stream beyond this are ignored: they only slow the fuzzer down.
const STREAM_BYTES_MAX: usize = 1 << 16;

#[derive(Arbitrary, Debug)]
struct Input {
    pieces: Vec<Piece>,
    /// Sizes of the pieces the stream arrives in (each `% 256 + 1` bytes), used in turn;
    /// none: the whole stream at once.
    chunks: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Raw(Vec<u8>),
    /// A payload behind a correct length and checksum.
    Sealed(Vec<u8>),
    Frame(Template),
    /// A header alone, usually announcing more than [`FRAME_BYTES_MAX`].
    Header {
        len: u32,
        crc: u32,
    },
}

/// A few frame shapes, filled in by the fuzzer.
#[derive(Arbitrary, Debug)]
enum Template {
    Hello {
        /// Even: [`PROTOCOL_VERSION`].
        version: u16,
        node: Option<u8>,
    },
    Append {
        term: u8,
        commands: Vec<Vec<u8>>,
        noop: bool,
    },
    Send {
        topic: String,
        bodies: Vec<Vec<u8>>,
        key: Option<Vec<u8>>,
    },
    Pull {
        group: String,
        from: u64,
        wait_ms: u32,
    },
    Pulled {
        offsets: Vec<u16>,
        body: Vec<u8>,
    },
    Ack {
        offsets: Vec<u64>,
    },
    Busy,
    NotLeader {
        group: u8,
        hint: Option<u8>,
    },
}

impl Template {
    fn frame(self) -> Frame {
        let queue = QueueId::new("t", 1);
        match self {
            Template::Hello { version, node } => Frame::Hello {
                version: if version % 2 == 0 {
                    PROTOCOL_VERSION
                } else {
                    version
                },
                node: node.map(u64::from),
            },
            Template::Append {
                term,
                commands,
                noop,
            } => {
                let term = u64::from(term);
                let mut entries = vec![Entry {
                    term,
                    index: 10,
                    kind: EntryKind::Commands(commands.into_iter().map(Bytes::from).collect()),
                }];
                if noop {
                    entries.push(Entry {
                        term,
                        index: 11,
                        kind: EntryKind::Noop,
                    });
                }
                Frame::Peer(Envelope {
                    group: 1,
                    from: 2,
                    to: 3,
                    message: Message::Append {
                        term,
                        prev_index: 9,
                        prev_term: term.saturating_sub(1),
                        entries,
                        commit: 8,
                    },
                })
            }
            Template::Send { topic, bodies, key } => Frame::Request {
                id: 7,
                request: Request::Send {
                    broker: 1,
                    queue: QueueId::new(topic, 2),
                    producer_id: 3,
                    first_seq: 4,
                    messages: bodies
                        .into_iter()
                        .map(|body| QueueMessage {
                            key: key.clone().map(Bytes::from),
                            tags: vec!["tag".into()],
                            properties: [("k".to_string(), "v".to_string())].into(),
                            body: Bytes::from(body),
                        })
                        .collect(),
                },
            },
            Template::Pull {
                group,
                from,
                wait_ms,
            } => Frame::Request {
                id: 8,
                request: Request::Pull {
                    broker: 2,
                    group,
                    member: "m".into(),
                    generation: from,
                    queue,
                    from,
                    messages_max: 32,
                    bytes_max: 1 << 20,
                    wait_ms: u64::from(wait_ms),
                },
            },
            Template::Pulled { offsets, body } => Frame::Response {
                id: 9,
                response: Response::Pulled {
                    queue: queue.clone(),
                    messages: offsets
                        .iter()
                        .map(|&offset| {
                            (
                                u64::from(offset),
                                StoredMessage {
                                    producer_id: 1,
                                    seq: u64::from(offset),
                                    message: QueueMessage::with_body(Bytes::from(body.clone())),
                                    stored_ms: 5,
                                    reconsume_times: 1,
                                    due_ms: 6,
                                    origin: None,
                                },
                            )
                        })
                        .collect(),
                    next_offset: offsets.iter().max().map_or(0, |&o| u64::from(o) + 1),
                    delivered_below: offsets.first().map_or(0, |&o| u64::from(o)),
                },
            },
            Template::Ack { offsets } => Frame::Request {
                id: 10,
                request: Request::Ack {
                    broker: 1,
                    group: "g".into(),
                    member: "m".into(),
                    generation: 7,
                    queue,
                    offsets,
                },
            },
            Template::Busy => Frame::Response {
                id: 11,
                response: Response::Busy,
            },
            Template::NotLeader { group, hint } => Frame::Response {
                id: 12,
                response: Response::NotLeader {
                    group: u64::from(group),
                    leader_hint: hint.map(u64::from),
                },
            },
        }
    }
}

fn seal(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What one run reached; used by the corpus test to show the corpus is not trivial.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FramesStats {
    pub stream_bytes: usize,
    pub frames: usize,
    pub hellos_accepted: usize,
    /// The stream ended cleanly, or by which error.
    pub clean_end: bool,
    pub too_large: bool,
    pub checksum: bool,
    pub malformed: bool,
}

/// How a decoder left a stream: the frames it returned, each with the bytes it consumed, and
/// the error that ended the stream, if any.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    frames: Vec<(Frame, usize)>,
    error: Option<WireError>,
    buffered_bytes: usize,
}

/// Pulls every frame the decoder has, and the error that ends the stream.
fn drain(decoder: &mut FrameDecoder, decoded: &mut Decoded) {
    if let Some(failed) = &decoded.error {
        // After an error every later call errors, with the same error, whatever arrived.
        assert_eq!(
            decoder.next_frame().as_ref(),
            Err(failed),
            "the decoder recovered from an error"
        );
        return;
    }
    loop {
        let before = decoder.buffered_bytes();
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                let after = decoder.buffered_bytes();
                assert!(after < before, "a frame consumed no bytes");
                decoded.frames.push((frame, before - after));
            }
            Ok(None) => {
                assert_eq!(
                    decoder.buffered_bytes(),
                    before,
                    "waiting for more bytes consumed some"
                );
                break;
            }
            Err(e) => {
                assert_eq!(
                    decoder.next_frame().as_ref(),
                    Err(&e),
                    "the decoder recovered from an error"
                );
                decoded.error = Some(e);
                break;
            }
        }
    }
}

fn decode(stream: &[u8], chunks: &[u8]) -> Decoded {
    let mut decoder = FrameDecoder::new();
    let mut decoded = Decoded {
        frames: Vec::new(),
        error: None,
        buffered_bytes: 0,
    };
    if chunks.is_empty() {
        decoder.push(stream);
        drain(&mut decoder, &mut decoded);
    } else {
        let mut rest = stream;
        for &chunk in chunks.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((usize::from(chunk) + 1).min(rest.len()));
            decoder.push(now);
            drain(&mut decoder, &mut decoded);
            rest = later;
        }
        // An empty push changes nothing.
        decoder.push(&[]);
        drain(&mut decoder, &mut decoded);
    }
    decoded.buffered_bytes = decoder.buffered_bytes();
    decoded
}

fn header(bytes: &[u8]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    Some((usize::try_from(len).ok()?, crc))
}

/// Decodes a stream built from `data` in the pieces `data` chooses and checks:
///
/// - nothing panics; the frames and the final state (waiting, or the error that ended the
///   stream) do not depend on how the stream was split;
/// - every frame consumed exactly its header's length, re-encodes with [`encode_frame`] and
///   decodes back to itself;
/// - after an error every later call returns that error, whatever bytes arrive next;
/// - errors are justified: `TooLarge` only for a length above [`FRAME_BYTES_MAX`], `Checksum`
///   only when the checksum differs; a stream left waiting holds less than one whole frame;
/// - [`check_hello`] accepts exactly a `Hello` of our version.
pub fn run_frames(data: &[u8]) -> FramesStats {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return FramesStats::default();
    };
    let mut stream = Vec::new();
    for piece in input.pieces {
        if stream.len() >= STREAM_BYTES_MAX {
            break;
        }
        match piece {
            Piece::Raw(bytes) => stream.extend_from_slice(&bytes),
            Piece::Sealed(payload) => seal(&payload, &mut stream),
            Piece::Frame(template) => {
                let frame = template.frame();
                let before = stream.clone();
                if encode_frame(&frame, &mut stream).is_err() {
                    assert_eq!(stream, before, "a failed encode changed its output");
                }
            }
            Piece::Header { len, crc } => {
                stream.extend_from_slice(&len.to_le_bytes());
                stream.extend_from_slice(&crc.to_le_bytes());
            }
        }
    }

    let whole = decode(&stream, &[]);
    let split = decode(&stream, &input.chunks);
    assert_eq!(
        whole, split,
        "splitting the stream into pieces changed what was decoded"
    );

    let mut stats = FramesStats {
        stream_bytes: stream.len(),
        frames: whole.frames.len(),
        ..FramesStats::default()
    };
    let mut at = 0;
    for (frame, consumed) in &whole.frames {
        let rest = stream.get(at..).unwrap_or_default();
        let (len, _) = header(rest).expect("a decoded frame has a header");
        assert_eq!(
            *consumed,
            FRAME_HEADER_BYTES + len,
            "a frame consumed other than its header's length"
        );
        at += consumed;

        let mut again = Vec::new();
        encode_frame(frame, &mut again).expect("a decoded frame re-encodes");
        let mut decoder = FrameDecoder::new();
        decoder.push(&again);
        assert_eq!(
            decoder.next_frame(),
            Ok(Some(frame.clone())),
            "a decoded frame re-encodes to something else"
        );
        assert_eq!(decoder.buffered_bytes(), 0);
        assert_eq!(decoder.next_frame(), Ok(None));

        match (frame, check_hello(frame)) {
            (Frame::Hello { version, node }, Ok(peer)) => {
                assert_eq!(*version, PROTOCOL_VERSION);
                assert_eq!(*node, peer);
                stats.hellos_accepted += 1;
            }
            (Frame::Hello { version, .. }, Err(WireError::VersionMismatch { ours, theirs })) => {
                assert_ne!(*version, PROTOCOL_VERSION);
                assert_eq!((ours, theirs), (PROTOCOL_VERSION, *version));
            }
            (Frame::Hello { .. }, other) => panic!("check_hello on {frame:?}: {other:?}"),
            (_, Err(WireError::Malformed(_))) => {}
            (_, other) => panic!("check_hello on {frame:?}: {other:?}"),
        }
    }
    let rest = stream.get(at..).unwrap_or_default();
    match &whole.error {
        None => {
            stats.clean_end = true;
            assert_eq!(whole.buffered_bytes, rest.len());
            // Waiting: what is left is less than one whole frame.
            if let Some((len, _)) = header(rest) {
                assert!(len <= FRAME_BYTES_MAX, "an oversized length was buffered");
                assert!(
                    rest.len() < FRAME_HEADER_BYTES + len,
                    "a whole frame is buffered and not returned"
                );
            }
        }
        Some(WireError::TooLarge { len_bytes }) => {
            stats.too_large = true;
            let (len, _) = header(rest).expect("a length was read");
            assert_eq!(*len_bytes, len as u64);
            assert!(len > FRAME_BYTES_MAX);
        }
        Some(WireError::Checksum { stored, computed }) => {
            stats.checksum = true;
            let (len, crc) = header(rest).expect("a header was read");
            assert_eq!(*stored, crc);
            assert_ne!(stored, computed);
            let payload = rest
                .get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len)
                .expect("a checksum error needs the whole payload");
            assert_eq!(*computed, crc32c::crc32c(payload));
        }
        Some(WireError::Malformed(_)) => {
            stats.malformed = true;
            let (len, crc) = header(rest).expect("a header was read");
            let payload = rest
                .get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len)
                .expect("a malformed frame needs the whole payload");
            assert_eq!(crc, crc32c::crc32c(payload));
        }
        Some(e @ WireError::VersionMismatch { .. }) => {
            panic!("the decoder returned a handshake error: {e:?}")
        }
    }
    stats
}

/// The `frames` fuzz target: see [`run_frames`].
pub fn frames(data: &[u8]) {
    run_frames(data);
}
