//! The wire protocol between nodes and between clients and nodes, as pure functions over bytes.
//!
//! ```text
//! frame = [len u32 LE][crc32c u32 LE][postcard(Frame), len bytes]
//! ```
//!
//! The checksum covers the payload. Every connection starts with a [`Frame::Hello`] each way,
//! carrying [`PROTOCOL_VERSION`]; a node says which node it is, a client says nothing. A
//! frame whose length exceeds [`FRAME_BYTES_MAX`], whose checksum fails, or whose payload does
//! not decode is an error of that one connection: the shell closes it and logs the reason.
//! Nothing here may panic on bytes from a socket.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::node::protocol::{Request, RequestId, Response};
use crate::raft::{Envelope, NodeId};

/// Bumped on any change of [`Frame`] or of the types it carries.
pub const PROTOCOL_VERSION: u16 = 2;
/// The largest payload a frame may carry. Bounds what a garbage length field can make a
/// receiver buffer.
pub use crate::limits::FRAME_BYTES_MAX;
/// The `len` and `crc32c` fields in front of every payload.
pub use crate::limits::FRAME_HEADER_BYTES;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The first frame each way. `node` is the sender's node id, or `None` for a client.
    Hello {
        version: u16,
        node: Option<NodeId>,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// A frame (to send or announced by a received header) is larger than [`FRAME_BYTES_MAX`].
    TooLarge {
        len_bytes: u64,
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
            WireError::TooLarge { len_bytes } => write!(
                f,
                "frame of {len_bytes} bytes exceeds the maximum of {FRAME_BYTES_MAX}"
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
    let payload =
        postcard::to_allocvec(frame).map_err(|e| WireError::Malformed(format!("encode: {e}")))?;
    let len = match u32::try_from(payload.len()) {
        Ok(len) if payload.len() <= FRAME_BYTES_MAX => len,
        _ => {
            return Err(WireError::TooLarge {
                len_bytes: payload.len() as u64,
            });
        }
    };
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Reassembles frames from a byte stream that arrives in arbitrary pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already returned as frames; compacted lazily so a burst of small frames
    /// does not shift the buffer once per frame.
    consumed: usize,
    /// Set after the first error: the stream has lost its framing and nothing after it can be
    /// trusted.
    failed: Option<WireError>,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.consumed > 0 && self.consumed >= self.buf.len() / 2 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.consumed
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
        let rest = self.buf.get(self.consumed..).unwrap_or_default();
        let Some((len, stored)) = read_header(rest) else {
            return Ok(None);
        };
        if len > FRAME_BYTES_MAX as u64 {
            return Err(WireError::TooLarge { len_bytes: len });
        }
        let end = FRAME_HEADER_BYTES + len as usize;
        let Some(payload) = rest.get(FRAME_HEADER_BYTES..end) else {
            return Ok(None);
        };
        let computed = crc32c::crc32c(payload);
        if computed != stored {
            return Err(WireError::Checksum { stored, computed });
        }
        let frame = match postcard::take_from_bytes::<Frame>(payload) {
            Ok((frame, [])) => frame,
            Ok((_, trailing)) => {
                return Err(WireError::Malformed(format!(
                    "{} trailing bytes after the frame",
                    trailing.len()
                )));
            }
            Err(e) => return Err(WireError::Malformed(e.to_string())),
        };
        self.consumed += end;
        Ok(Some(frame))
    }
}

fn read_header(bytes: &[u8]) -> Option<(u64, u32)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    Some((u64::from(len), crc))
}

/// Checks the first frame of a connection: a [`Frame::Hello`] of our version. Returns the
/// peer's node id (`None` for a client).
pub fn check_hello(frame: &Frame) -> Result<Option<NodeId>, WireError> {
    match frame {
        Frame::Hello { version, node } if *version == PROTOCOL_VERSION => Ok(*node),
        Frame::Hello { version, .. } => Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: *version,
        }),
        _ => Err(WireError::Malformed(
            "the first frame of a connection must be Hello".to_string(),
        )),
    }
}

#[cfg(test)]
mod tests;
