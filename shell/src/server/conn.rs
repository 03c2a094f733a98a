//! One TCP connection of the server: framed reads and buffered, non-blocking writes.

use std::io::{self, Read, Write};

use holdfast_core::node::protocol::ClientId;
use holdfast_core::raft::NodeId;
use holdfast_core::wire::{Frame, FrameDecoder, WireError, encode_frame};
use mio::net::TcpStream;

/// A connection that has queued this much unsent output is too slow to keep.
pub use holdfast_core::limits::CONNECTION_OUTPUT_BYTES_MAX as OUTPUT_BYTES_MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No Hello yet.
    Unknown,
    Node(NodeId),
    Client(ClientId),
}

pub struct Conn {
    pub stream: TcpStream,
    pub kind: Kind,
    /// The peer this node dialed, for outbound links.
    pub dialed: Option<NodeId>,
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
    Wire(WireError),
    TooSlow,
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
            Closed::Wire(e) => write!(f, "bad frame: {e}"),
            Closed::TooSlow => write!(f, "more than {OUTPUT_BYTES_MAX} bytes unsent"),
        }
    }
}

impl Conn {
    pub fn new(stream: TcpStream, dialed: Option<NodeId>) -> Conn {
        Conn {
            stream,
            kind: Kind::Unknown,
            dialed,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            written: 0,
        }
    }

    /// Reads everything available; returns the whole frames received, and whether the other
    /// side has closed (after them).
    pub fn read(&mut self) -> Result<(Vec<Frame>, Option<Closed>), Closed> {
        let mut buf = [0u8; 64 * 1024];
        let mut frames = Vec::new();
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.drain(&mut frames)?;
                    let closed = match self.decoder.buffered_bytes() {
                        0 => Closed::Eof,
                        buffered_bytes => Closed::Truncated { buffered_bytes },
                    };
                    return Ok((frames, Some(closed)));
                }
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                    self.drain(&mut frames)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((frames, None)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Closed::Io(e)),
            }
        }
    }

    fn drain(&mut self, frames: &mut Vec<Frame>) -> Result<(), Closed> {
        while let Some(frame) = self.decoder.next_frame().map_err(Closed::Wire)? {
            frames.push(frame);
        }
        Ok(())
    }

    pub fn queue(&mut self, frame: &Frame) -> Result<(), Closed> {
        encode_frame(frame, &mut self.out).map_err(Closed::Wire)?;
        if self.pending_bytes() > OUTPUT_BYTES_MAX {
            return Err(Closed::TooSlow);
        }
        Ok(())
    }

    pub fn pending_bytes(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) -> Result<(), Closed> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(Closed::Eof),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Not connected yet: the writable event will come.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => return Err(Closed::Io(e)),
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        }
        Ok(())
    }
}
