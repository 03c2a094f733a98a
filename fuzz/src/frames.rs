//! The `frames` target: [`FrameDecoder`] fed a byte stream in arbitrary pieces, and the
//! connection handshake in front of it: the first frame judged as a Hello on either port
//! (with or without security, with each node's certificate or none, with real tokens or
//! not), and arbitrary bytes fed to a node's TLS server, which must never hand out plaintext
//! before a handshake that only the holder of a key could complete.
//!
//! The stream is built from pieces of four kinds: raw bytes, payloads sealed with a correct
//! header (so postcard's decoder behind the checksum is reached), whole frames encoded from a
//! few templates (so valid streams are common), and bare headers (oversized lengths).

use std::collections::BTreeSet;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use holdfast_core::broker::{Message as QueueMessage, QueueId, StoredMessage};
use holdfast_core::node::protocol::{Request, Response};
use holdfast_core::raft::{Entry, EntryKind, Envelope, Message};
use holdfast_core::wire::{
    FRAME_BYTES_MAX, FRAME_HEADER_BYTES, Frame, FrameDecoder, PROTOCOL_VERSION, WireError,
    check_hello, encode_frame,
};
use holdfast_shell::auth::{Principals, token_sha256_hex};
use holdfast_shell::server::handshake::{Accepted, HelloContext, Port, accept_hello};
use holdfast_shell::tls::{NodeTls, certificates_from_pem, generate_ca, issue_node_certificate};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Bytes of stream beyond this are ignored: they only slow the fuzzer down.
const STREAM_BYTES_MAX: usize = 1 << 16;

#[derive(Arbitrary, Debug)]
struct Input {
    pieces: Vec<Piece>,
    handshake: Handshake,
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

/// How the first frame is judged, and what reaches the TLS server.
#[derive(Arbitrary, Debug)]
struct Handshake {
    peer_port: bool,
    /// `None`: `no_auth`.
    secure: bool,
    /// For a dialed link: the node dialed (`% 4`).
    dialed: Option<u8>,
    /// The verified certificate presented: node `n % 4` (0: none).
    certificate: u8,
    /// Bytes offered to node 1's TLS server (peer or client port, as `peer_port`).
    tls: Vec<u8>,
}

/// A token in a Hello: a real principal's sometimes, so acceptance is reachable.
#[derive(Arbitrary, Debug)]
enum Token {
    Admin,
    Billing,
    Other(String),
}

const ADMIN_TOKEN: &str = "hf_fuzz-admin";
const BILLING_TOKEN: &str = "hf_fuzz-billing";

impl Token {
    fn text(self) -> String {
        match self {
            Token::Admin => ADMIN_TOKEN.into(),
            Token::Billing => BILLING_TOKEN.into(),
            Token::Other(text) => text,
        }
    }
}

/// A small cluster's credentials, made once per process: keys do not change what is checked.
struct Pki {
    /// Node `n`'s certificate at `n - 1`.
    certificates: Vec<CertificateDer<'static>>,
    node1: NodeTls,
    principals: Principals,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let (ca_pem, ca_key) = generate_ca().expect("a CA");
        let ca = certificates_from_pem(&ca_pem).expect("CA pem");
        let mut certificates = Vec::new();
        let mut node1 = None;
        for id in 1..=3 {
            let (cert, key) = issue_node_certificate(&ca_key, id).expect("a certificate");
            let chain = certificates_from_pem(&cert).expect("pem");
            certificates.push(chain[0].clone());
            if id == 1 {
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
                node1 = Some(NodeTls::new(&ca, chain, key).expect("TLS configs"));
            }
        }
        let principals = Principals::from_toml(&format!(
            "[principals.admin]\ntoken_sha256 = \"{}\"\nadmin = true\n\
             [principals.billing]\ntoken_sha256 = \"{}\"\nproduce = [\"orders\"]\n",
            token_sha256_hex(ADMIN_TOKEN),
            token_sha256_hex(BILLING_TOKEN)
        ))
        .expect("principals");
        Pki {
            certificates,
            node1: node1.expect("node 1"),
            principals,
        }
    })
}

/// Judges `frame` as node 1's first frame under `handshake` and checks the verdict against the
/// rules: a node only on the peer port, as itself, proven by its certificate when secure; a
/// client only on the client port, with a real principal's token when secure. Returns whether
/// it was accepted.
fn judge(handshake: &Handshake, frame: &Frame) -> bool {
    let pki = pki();
    let nodes: BTreeSet<u64> = [1, 2, 3].into();
    let dialed = handshake.dialed.map(|d| u64::from(d % 4));
    let presented = u64::from(handshake.certificate % 4);
    let certificate = (presented > 0).then(|| &pki.certificates[presented as usize - 1]);
    let context = HelloContext {
        port: if handshake.peer_port {
            Port::Peer
        } else {
            Port::Client
        },
        me: 1,
        nodes: &nodes,
        dialed,
        principals: handshake.secure.then_some(&pki.principals),
        certificate,
    };
    let verdict = accept_hello(&context, frame);
    let hello = check_hello(frame).ok();
    // What the rules say.
    let expected = match (&hello, handshake.peer_port) {
        (None, _) => None,
        (Some(h), true) => h
            .node
            .filter(|n| *n != 1 && nodes.contains(n))
            .filter(|n| dialed.is_none_or(|d| d == *n))
            .filter(|n| !handshake.secure || presented == *n)
            .map(Accepted::Node),
        (Some(h), false) => match (&h.node, handshake.secure, h.token.as_deref()) {
            (Some(_), _, _) => None,
            (None, false, _) => Some(Accepted::Client(None)),
            (None, true, token) => token
                .and_then(|t| pki.principals.authenticate(t))
                .map(|p| Accepted::Client(Some(p.clone()))),
        },
    };
    match (verdict, expected) {
        (Ok(got), Some(want)) => {
            assert_eq!(got, want, "accepted as another identity");
            true
        }
        (Err(why), None) => {
            assert!(!why.is_empty(), "a refusal says why");
            false
        }
        (Ok(got), None) => panic!("accepted what the rules refuse: {frame:?} as {got:?}"),
        (Err(why), Some(want)) => panic!("refused {frame:?} (rules: {want:?}): {why}"),
    }
}

/// Feeds `bytes` to node 1's TLS server in `chunks`: whatever they are, no plaintext comes
/// out and the handshake does not complete (that takes a key exchange the bytes cannot fake).
/// Returns whether TLS refused them.
fn tls_refuses(handshake: &Handshake, chunks: &[u8]) -> bool {
    let pki = pki();
    let config = if handshake.peer_port {
        pki.node1.peer_server.clone()
    } else {
        pki.node1.client_server.clone()
    };
    let Ok(mut server) = rustls::ServerConnection::new(config) else {
        return false;
    };
    let mut rest: &[u8] = &handshake.tls;
    let mut sizes = chunks.iter().cycle();
    let mut sink = Vec::new();
    while !rest.is_empty() {
        let size = sizes
            .next()
            .map_or(rest.len(), |c| usize::from(*c) % 256 + 1)
            .min(rest.len());
        let (piece, after) = rest.split_at(size);
        rest = after;
        let mut reader = piece;
        while !reader.is_empty() {
            match server.read_tls(&mut reader) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if server.process_new_packets().is_err() {
                return true;
            }
            let mut plain = [0u8; 256];
            match std::io::Read::read(&mut server.reader(), &mut plain) {
                Ok(n) => assert_eq!(n, 0, "plaintext from an unauthenticated stream"),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
            }
            assert!(
                server.is_handshaking(),
                "a handshake completed from arbitrary bytes"
            );
            sink.clear();
            while server.wants_write() {
                if server.write_tls(&mut sink).is_err() {
                    break;
                }
            }
        }
    }
    false
}

/// A few frame shapes, filled in by the fuzzer.
#[derive(Arbitrary, Debug)]
enum Template {
    Hello {
        /// Even: [`PROTOCOL_VERSION`].
        version: u16,
        /// `% 5`: nodes 1 to 3 are the cluster's, 0 and 4 are not.
        node: Option<u8>,
        token: Option<Token>,
    },
    Goodbye {
        reason: String,
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
            Template::Hello {
                version,
                node,
                token,
            } => Frame::Hello {
                version: if version % 2 == 0 {
                    PROTOCOL_VERSION
                } else {
                    version
                },
                node: node.map(|n| u64::from(n % 5)),
                token: token.map(Token::text),
            },
            Template::Goodbye { reason } => Frame::Goodbye { reason },
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
                    tenure: from,
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
    /// The first frame, judged as a Hello, made the connection a node's / a client's.
    pub node_accepted: bool,
    pub client_accepted: bool,
    pub hello_refused: bool,
    /// TLS refused the bytes offered to it.
    pub tls_refused: bool,
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
    let tls_refused = tls_refuses(&input.handshake, &input.chunks);
    assert_eq!(
        whole, split,
        "splitting the stream into pieces changed what was decoded"
    );

    let mut stats = FramesStats {
        stream_bytes: stream.len(),
        frames: whole.frames.len(),
        tls_refused,
        ..FramesStats::default()
    };
    if let Some((first, _)) = whole.frames.first() {
        let accepted = judge(&input.handshake, first);
        let node = matches!(first, Frame::Hello { node: Some(_), .. });
        stats.node_accepted = accepted && node;
        stats.client_accepted = accepted && !node;
        stats.hello_refused = !accepted;
    }
    let mut at = 0;
    for (frame, consumed) in &whole.frames {
        let rest = stream.get(at..).unwrap_or_default();
        let (len, _) = header(rest).expect("a decoded frame has a header");
        assert_eq!(
            *consumed,
            FRAME_HEADER_BYTES + len,
            "a frame consumed other than its header's length"
        );
        // The decoder slices some frames' bulk bytes out of its buffer instead of letting
        // postcard copy them: the frame must be the one postcard decodes all the same.
        let plain = postcard::take_from_bytes::<Frame>(&rest[FRAME_HEADER_BYTES..*consumed]);
        assert_eq!(
            plain.ok(),
            Some((frame.clone(), &[][..])),
            "the decoder's frame is not what postcard decodes from its bytes"
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
            (
                Frame::Hello {
                    version,
                    node,
                    token,
                },
                Ok(hello),
            ) => {
                assert_eq!(*version, PROTOCOL_VERSION);
                assert_eq!((node, token), (&hello.node, &hello.token));
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
        Some(WireError::TooLarge {
            len_bytes,
            max_bytes,
        }) => {
            stats.too_large = true;
            let (len, _) = header(rest).expect("a length was read");
            assert_eq!(*len_bytes, len as u64);
            assert_eq!(*max_bytes, FRAME_BYTES_MAX as u64);
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
