//! One connection of the server: TLS (or plain) framed reads with a budget, and buffered,
//! non-blocking writes.

use std::io;
use std::net::SocketAddr;

use holdfast_core::limits::{CONNECTION_INPUT_BYTES_MAX, UNAUTHENTICATED_FRAME_BYTES_MAX};
use holdfast_core::node::protocol::ClientId;
use holdfast_core::raft::NodeId;
use holdfast_core::wire::{Frame, FrameDecoder, WireError, encode_frame};

use crate::auth::Principal;
use crate::transport::{TLS_ERROR_PREFIX, Transport};

/// A connection that has queued this much unsent output is too slow to keep.
pub use holdfast_core::limits::CONNECTION_OUTPUT_BYTES_MAX as OUTPUT_BYTES_MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No accepted Hello yet.
    Unknown,
    Node(NodeId),
    Client(ClientId),
}

pub use super::handshake::Port;

pub struct Conn {
    pub transport: Transport,
    pub kind: Kind,
    pub port: Port,
    pub addr: SocketAddr,
    /// The peer this node dialed, for outbound links.
    pub dialed: Option<NodeId>,
    /// When the connection was opened: it must authenticate within the handshake deadline.
    pub opened: std::time::Instant,
    /// Who a client connection authenticated as (`None` without authentication).
    pub principal: Option<Principal>,
    /// Requests handed to the node and not answered yet.
    pub requests_pending: usize,
    /// The consumer groups this connection's members spoke for, at most
    /// `CONSUMER_GROUPS_PER_CONNECTION_MAX`.
    pub consumer_groups: std::collections::BTreeSet<String>,
    decoder: FrameDecoder,
    out: Vec<u8>,
    written: usize,
}

/// Why a connection ends.
#[derive(Debug)]
pub enum Closed {
    Eof,
    /// The other side closed in the middle of a frame.
    Truncated {
        buffered_bytes: usize,
    },
    Io(io::Error),
    /// The TLS handshake or a record failed: a stranger, a certificate of another CA, none.
    Tls(String),
    Wire(WireError),
    TooSlow,
    /// This node refused it (wrong port, bad credential, identity not proven, a limit): the
    /// reason was sent to the other side in a Goodbye.
    Refused(String),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::Eof => f.write_str("closed by the other side"),
            Closed::Truncated { buffered_bytes } => write!(
                f,
                "closed by the other side inside a frame ({buffered_bytes} bytes of it received)"
            ),
            Closed::Io(e) => write!(f, "i/o error: {e}"),
            Closed::Tls(e) => write!(f, "TLS failed: {e}"),
            Closed::Wire(e) => write!(f, "bad frame: {e}"),
            Closed::TooSlow => write!(f, "more than {OUTPUT_BYTES_MAX} bytes unsent"),
            Closed::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

fn closed_by(e: io::Error) -> Closed {
    let text = e.to_string();
    match text.strip_prefix(TLS_ERROR_PREFIX) {
        Some(why) if e.kind() == io::ErrorKind::InvalidData => Closed::Tls(why.to_string()),
        _ => Closed::Io(e),
    }
}

/// What one [`Conn::read`] brought.
pub struct Read {
    pub frames: Vec<Frame>,
    /// The other side closed (after `frames`).
    pub closed: Option<Closed>,
    /// Stopped at the frame budget with input possibly left: read again when there is room.
    pub stopped: bool,
}

impl Conn {
    pub fn new(transport: Transport, port: Port, addr: SocketAddr, dialed: Option<NodeId>) -> Conn {
        Conn {
            transport,
            kind: Kind::Unknown,
            port,
            addr,
            dialed,
            opened: std::time::Instant::now(),
            principal: None,
            requests_pending: 0,
            consumer_groups: std::collections::BTreeSet::new(),
            // A stranger's frames are small until it has authenticated.
            decoder: FrameDecoder::with_frame_bytes_max(UNAUTHENTICATED_FRAME_BYTES_MAX),
            out: Vec::new(),
            written: 0,
        }
    }

    /// Lifts the frame limit to the full one, once the Hello was accepted.
    pub fn authenticated(&mut self) {
        self.decoder
            .set_frame_bytes_max(holdfast_core::limits::FRAME_BYTES_MAX);
    }

    /// Reads and decodes at most `frames_max` frames; what is left waits in the decoder, in
    /// rustls or in the socket until the next call.
    pub fn read(&mut self, frames_max: usize) -> Result<Read, Closed> {
        let mut buf = [0u8; 64 * 1024];
        let mut frames = Vec::new();
        loop {
            while frames.len() < frames_max {
                match self.decoder.next_frame().map_err(Closed::Wire)? {
                    Some(frame) => frames.push(frame),
                    None => break,
                }
            }
            if frames.len() >= frames_max {
                return Ok(Read {
                    frames,
                    closed: None,
                    stopped: true,
                });
            }
            // Never more buffered than one whole frame: a partial frame plus this read fits.
            let room = CONNECTION_INPUT_BYTES_MAX
                .saturating_sub(self.decoder.buffered_bytes())
                .clamp(1, buf.len());
            match self.transport.read(&mut buf[..room]) {
                Ok(0) => {
                    let closed = match self.decoder.buffered_bytes() {
                        0 => Closed::Eof,
                        buffered_bytes => Closed::Truncated { buffered_bytes },
                    };
                    return Ok(Read {
                        frames,
                        closed: Some(closed),
                        stopped: false,
                    });
                }
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Read {
                        frames,
                        closed: None,
                        stopped: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(closed_by(e)),
            }
        }
    }

    pub fn queue(&mut self, frame: &Frame) -> Result<(), Closed> {
        encode_frame(frame, &mut self.out).map_err(Closed::Wire)?;
        if self.pending_bytes() > OUTPUT_BYTES_MAX {
            return Err(Closed::TooSlow);
        }
        Ok(())
    }

    /// Output queued and not yet taken by the socket (or by rustls).
    pub fn pending_bytes(&self) -> usize {
        self.out.len() - self.written
    }

    /// Whether rustls holds records to send (a handshake in progress, say).
    pub fn wants_flush(&self) -> bool {
        self.pending_bytes() > 0 || self.transport.is_tls()
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) -> Result<(), Closed> {
        self.transport
            .flush(&self.out, &mut self.written)
            .map_err(closed_by)?;
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        }
        Ok(())
    }

    /// Sends `why` in a Goodbye and what else is queued, as far as the socket takes it now,
    /// and starts a clean TLS close: the last words before the server drops the connection.
    pub fn goodbye(&mut self, why: &str) {
        let _ = self.queue(&Frame::Goodbye {
            reason: why.to_string(),
        });
        let _ = self.flush();
        self.transport.close();
    }
}
