//! A non-blocking TCP stream, plain or inside rustls, behind one read/write interface for the
//! mio loops of the server and the client.
//!
//! rustls is sans-IO: `read_tls` feeds it bytes from the socket, `process_new_packets`
//! decrypts them (and runs the handshake), `reader()` hands out plaintext, `writer()` takes
//! plaintext and `write_tls` pushes records to the socket. A caller reads until `WouldBlock`
//! and calls [`Transport::flush`] after every read, since a read can make the handshake want
//! to write.

use std::io::{self, Read, Write};
use std::time::Duration;

use mio::net::TcpStream;

/// Makes the kernel give up on `stream` once data it sent has gone unacknowledged for
/// `timeout` (Linux's `TCP_USER_TIMEOUT`): the next read or write then fails and the caller
/// reconnects. Without it a connection that was open when a partition began keeps its data in
/// TCP's retransmission queue, retried at doubling intervals, so after a long partition the
/// first byte gets through only at the next retry, seconds after the network healed. Elsewhere
/// than Linux it does nothing.
pub fn set_unacked_timeout(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: setsockopt reads `size_of::<c_uint>()` bytes from a live local, on a
        // descriptor `stream` owns for the duration of the call.
        let result = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                (&ms as *const libc::c_uint).cast(),
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, timeout);
    Ok(())
}

pub struct Transport {
    pub stream: TcpStream,
    tls: Option<Box<rustls::Connection>>,
}

/// A TLS failure (handshake or record), as an `io::Error` of kind `InvalidData` whose text
/// starts with this.
pub const TLS_ERROR_PREFIX: &str = "TLS: ";

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
    )
}

impl Transport {
    pub fn plain(stream: TcpStream) -> Transport {
        Transport { stream, tls: None }
    }

    pub fn tls(stream: TcpStream, tls: impl Into<rustls::Connection>) -> Transport {
        Transport {
            stream,
            tls: Some(Box::new(tls.into())),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The certificate the other side presented (TLS, handshake done), first of its chain.
    pub fn peer_certificate(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        self.tls.as_ref()?.peer_certificates()?.first()
    }

    /// Reads plaintext: `Ok(0)` at the end of the stream, `WouldBlock` when nothing more is
    /// there now, `InvalidData` ([`TLS_ERROR_PREFIX`]) when TLS fails.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    Err(io::ErrorKind::WouldBlock.into())
                }
                other => other,
            };
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The other side closed without close_notify: an end like any other here, as
                // the framing above tells a truncated frame.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match tls.read_tls(&mut self.stream) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // Tell the other side why (rustls queued an alert), best effort.
                        let _ = tls.write_tls(&mut self.stream);
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{TLS_ERROR_PREFIX}{e}"),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes as much of `buf` as it can now (all of it, plain; up to rustls's buffer limit,
    /// TLS). `Ok(0)` or `WouldBlock`: none now.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.tls.as_mut() {
            None => match self.stream.write(buf) {
                Err(e) if would_block(&e) => Err(io::ErrorKind::WouldBlock.into()),
                other => other,
            },
            Some(tls) => tls.writer().write(buf),
        }
    }

    /// Pushes TLS records to the socket while it takes them; returns how many bytes went.
    pub fn flush_tls(&mut self) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        let mut total = 0;
        while tls.wants_write() {
            match tls.write_tls(&mut self.stream) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Writes `out[*written..]` as far as the socket takes it now, advancing `written`.
    /// Returns an error only for a broken connection.
    pub fn flush(&mut self, out: &[u8], written: &mut usize) -> io::Result<()> {
        loop {
            let mut progress = 0;
            if let Some(rest) = out.get(*written..).filter(|r| !r.is_empty()) {
                match self.write(rest) {
                    Ok(0) if self.tls.is_none() => {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    Ok(n) => {
                        *written += n;
                        progress += n;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            progress += self.flush_tls()?;
            if progress == 0 {
                return Ok(());
            }
        }
    }

    /// Starts a clean TLS close (close_notify), best effort.
    pub fn close(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.flush_tls();
        }
    }
}
