//! The wire protocol between nodes and between clients and nodes, as pure functions over bytes.
//!
//! ```text
//! frame = [len u32 LE][crc32c u32 LE][postcard(Frame), len bytes]
//! ```
//!
//! The checksum covers the payload. Every connection starts with a [`Frame::Hello`] each way,
//! carrying [`PROTOCOL_VERSION`]; a node says which node it is (and, over mutual TLS, proves
//! it with its certificate), a client presents its credential. A frame whose length exceeds
//! the decoder's maximum ([`FRAME_BYTES_MAX`], or less before a connection has
//! authenticated), whose checksum fails, or whose payload does not decode is an error of that
//! one connection: the shell closes it and logs the reason. Nothing here may panic on bytes
//! from a socket.

use std::fmt;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::broker::{Offset, QueueId};
use crate::node::protocol::{Request, RequestId, Response};
use crate::raft::{Envelope, GroupId, NodeId};

/// Bumped on any change of [`Frame`] or of the types it carries.
pub const PROTOCOL_VERSION: u16 = 4;
/// The largest payload a frame may carry. Bounds what a garbage length field can make a
/// receiver buffer.
pub use crate::limits::FRAME_BYTES_MAX;
/// The `len` and `crc32c` fields in front of every payload.
pub use crate::limits::FRAME_HEADER_BYTES;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The first frame each way. `node` is the sender's node id, or `None` for a client;
    /// `token` is a client's bearer credential (`None` from nodes and from clients of a
    /// cluster without authentication).
    Hello {
        version: u16,
        node: Option<NodeId>,
        token: Option<String>,
    },
    /// A Raft message between two nodes.
    Peer(Envelope),
    Request {
        id: RequestId,
        request: Request,
    },
    Response {
        id: RequestId,
        response: Response,
    },
    /// A server's last frame on a connection it is about to close: why (a refused credential,
    /// a frame on the wrong port, a limit), so the other side can say so instead of timing out.
    Goodbye {
        reason: String,
    },
    /// Between nodes: the stored records of `queue` in broker group `group` from offset `from`
    /// on, below `end`, at most `bytes_max` bytes of them (a follower that installed a metadata
    /// snapshot fetches the message segments it lacks; see `StoreOp::CatchUp`). `id` pairs
    /// the answer with the request.
    Fetch {
        id: u64,
        group: GroupId,
        queue: QueueId,
        from: Offset,
        end: Offset,
        bytes_max: u32,
    },
    /// The answer to [`Frame::Fetch`]: consecutive store records (each `[len][crc32c][offset]
    /// [message]`, checked by the receiver before it writes them) from offset `from` on, at
    /// least one; or why the sender cannot serve them.
    Fetched {
        id: u64,
        group: GroupId,
        queue: QueueId,
        from: Offset,
        records: Result<bytes::Bytes, String>,
    },
}

/// What a valid [`Frame::Hello`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub node: Option<NodeId>,
    pub token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// A frame (to send or announced by a received header) is larger than the maximum
    /// (`max_bytes`: [`FRAME_BYTES_MAX`], or less on a connection not yet authenticated).
    TooLarge {
        len_bytes: u64,
        max_bytes: u64,
    },
    Checksum {
        stored: u32,
        computed: u32,
    },
    /// The payload is not a valid frame: garbage, an unknown variant, or trailing bytes.
    Malformed(String),
    VersionMismatch {
        ours: u16,
        theirs: u16,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLarge {
                len_bytes,
                max_bytes,
            } => write!(
                f,
                "frame of {len_bytes} bytes exceeds the maximum of {max_bytes}"
            ),
            WireError::Checksum { stored, computed } => write!(
                f,
                "frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            WireError::Malformed(why) => write!(f, "malformed frame: {why}"),
            WireError::VersionMismatch { ours, theirs } => write!(
                f,
                "protocol version mismatch (ours {ours}, theirs {theirs})"
            ),
        }
    }
}

impl std::error::Error for WireError {}

/// Appends `frame`, header included, to `out`. On error `out` is unchanged.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let payload_at = out.len();
    // Serialised straight into `out`, which a connection keeps between frames: a payload
    // grown in a vector of its own (a large Append frame reallocated a dozen times) and
    // copied in cost a publishing node more than the copy itself.
    let encoded = postcard::serialize_with_flavor(frame, AppendTo(out));
    let payload_len = out.len() - payload_at;
    let len = match (encoded, u32::try_from(payload_len)) {
        (Ok(()), Ok(len)) if payload_len <= FRAME_BYTES_MAX => len,
        (Err(e), _) => {
            out.truncate(start);
            return Err(WireError::Malformed(format!("encode: {e}")));
        }
        _ => {
            out.truncate(start);
            return Err(WireError::TooLarge {
                len_bytes: payload_len as u64,
                max_bytes: FRAME_BYTES_MAX as u64,
            });
        }
    };
    let crc = crc32c::crc32c(&out[payload_at..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..payload_at].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A postcard flavor that appends to a vector it borrows.
pub(crate) struct AppendTo<'a>(pub(crate) &'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Reassembles frames from a byte stream that arrives in arbitrary pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Received bytes not yet returned as frames. A frame is split off its front, and a frame's
    /// large commands and message bodies are slices of it (see `shared`).
    buf: BytesMut,
    /// The largest payload accepted: a header announcing more ends the stream.
    frame_bytes_max: usize,
    /// Set after the first error: the stream has lost its framing and nothing after it can be
    /// trusted.
    failed: Option<WireError>,
}

impl Default for FrameDecoder {
    fn default() -> FrameDecoder {
        FrameDecoder::with_frame_bytes_max(FRAME_BYTES_MAX)
    }
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// A decoder that refuses payloads over `frame_bytes_max` (capped at [`FRAME_BYTES_MAX`]):
    /// a server reads a stranger's frames with a small maximum until it has authenticated.
    pub fn with_frame_bytes_max(frame_bytes_max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            frame_bytes_max: frame_bytes_max.min(FRAME_BYTES_MAX),
            failed: None,
        }
    }

    /// Changes the maximum for the frames not yet returned.
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: usize) {
        self.frame_bytes_max = frame_bytes_max.min(FRAME_BYTES_MAX);
    }

    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `None` if more bytes are needed, or the error that ends this
    /// stream (returned again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.decode_next() {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn decode_next(&mut self) -> Result<Option<Frame>, WireError> {
        let rest = &self.buf[..];
        let Some((len, stored)) = read_header(rest) else {
            return Ok(None);
        };
        if len > self.frame_bytes_max as u64 {
            return Err(WireError::TooLarge {
                len_bytes: len,
                max_bytes: self.frame_bytes_max as u64,
            });
        }
        let end = FRAME_HEADER_BYTES + len as usize;
        let Some(payload) = rest.get(FRAME_HEADER_BYTES..end) else {
            return Ok(None);
        };
        let computed = crc32c::crc32c(payload);
        if computed != stored {
            return Err(WireError::Checksum { stored, computed });
        }
        let payload = self.buf.split_to(end).freeze().slice(FRAME_HEADER_BYTES..);
        if let Some(frame) = shared::decode_sliced(&payload) {
            return Ok(Some(frame));
        }
        let frame = match postcard::take_from_bytes::<Frame>(&payload) {
            Ok((frame, [])) => frame,
            Ok((_, trailing)) => {
                return Err(WireError::Malformed(format!(
                    "{} trailing bytes after the frame",
                    trailing.len()
                )));
            }
            Err(e) => return Err(WireError::Malformed(e.to_string())),
        };
        Ok(Some(frame))
    }
}

fn read_header(bytes: &[u8]) -> Option<(u64, u32)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    Some((u64::from(len), crc))
}

/// Checks the first frame of a connection: a [`Frame::Hello`] of our version. Returns what it
/// says: the peer's node id (`None` for a client) and a client's credential.
pub fn check_hello(frame: &Frame) -> Result<Hello, WireError> {
    match frame {
        Frame::Hello {
            version,
            node,
            token,
        } if *version == PROTOCOL_VERSION => Ok(Hello {
            node: *node,
            token: token.clone(),
        }),
        Frame::Hello { version, .. } => Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: *version,
        }),
        _ => Err(WireError::Malformed(
            "the first frame of a connection must be Hello".to_string(),
        )),
    }
}

mod shared;
#[cfg(test)]
mod tests;
