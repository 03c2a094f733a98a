//! What the client commands print and how they exit: the exit codes scripts can rely on, the
//! check that a cluster is reachable at all, and `--output json`.

use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use crate::client::ClientError;

/// Why a command failed, as its exit status says. 0 is success only; 2 is clap's for a bad
/// command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 1: anything else (a bad config or client file, an unexpected answer, an i/o error).
    Error = 1,
    /// 3: no server of the cluster accepted a connection.
    Unreachable = 3,
    /// 4: a server refused (a credential, a permission, an unknown topic, a bad request).
    Refused = 4,
    /// 5: servers were reached but gave no answer in time (no leader, a partition).
    Timeout = 5,
}

/// The exit codes, for `--help`.
pub const EXIT_CODES_HELP: &str = "Exit status: 0 success; 1 error; 2 bad command line; \
    3 cannot reach any server; 4 refused by the cluster; 5 no answer in time.";

/// A failed command: its exit code and the one line it prints.
#[derive(Debug)]
pub struct Failed {
    pub kind: Failure,
    pub message: String,
}

impl Failed {
    pub fn new(kind: Failure, message: impl Into<String>) -> Failed {
        Failed {
            kind,
            message: message.into(),
        }
    }

    pub fn refused(message: impl Into<String>) -> Failed {
        Failed::new(Failure::Refused, message)
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.kind as u8)
    }
}

impl From<String> for Failed {
    fn from(message: String) -> Failed {
        Failed::new(Failure::Error, message)
    }
}

impl From<ClientError> for Failed {
    fn from(e: ClientError) -> Failed {
        let kind = match &e {
            ClientError::Refused(_) => Failure::Refused,
            ClientError::Timeout | ClientError::Send { .. } => Failure::Timeout,
            _ => Failure::Error,
        };
        let message = match &e {
            ClientError::Refused(why) => format!("refused: {why}"),
            _ => e.to_string(),
        };
        Failed::new(kind, message)
    }
}

/// How long a connection attempt to one server may take before the check gives up on it.
pub const PROBE_TIMEOUT_MS: u64 = 2_000;

/// Succeeds once any server accepts a TCP connection; else fails at once with
/// [`Failure::Unreachable`], naming each address and why (the client library would only
/// notice its requests going unanswered, seconds later). All servers are tried in parallel.
pub fn reachable(servers: &[SocketAddr]) -> Result<(), Failed> {
    if servers.is_empty() {
        return Err(Failed::new(Failure::Error, "no servers given"));
    }
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    let errors: Vec<String> = std::thread::scope(|scope| {
        let probes: Vec<_> = servers
            .iter()
            .map(|addr| scope.spawn(move || TcpStream::connect_timeout(addr, timeout)))
            .collect();
        probes
            .into_iter()
            .zip(servers)
            .filter_map(|(probe, addr)| match probe.join() {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!("{addr} ({})", io_reason(&e))),
                Err(_) => Some(format!("{addr} (the check failed)")),
            })
            .collect()
    });
    if errors.len() < servers.len() {
        return Ok(());
    }
    Err(Failed::new(
        Failure::Unreachable,
        format!("cannot reach any server: {}", errors.join(", ")),
    ))
}

/// The error without Rust's " (os error 111)" suffix, in lower case: `connection refused`.
fn io_reason(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock {
        return format!("no connection within {PROBE_TIMEOUT_MS} ms");
    }
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// `--output`: how a command prints what it finds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Prints one JSON object on its own line.
pub fn json_line(value: &serde_json::Value) {
    crate::out!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_reported_as_refused_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let failed = reachable(&[addr]).expect_err("nothing listens");
        assert_eq!(failed.kind, Failure::Unreachable);
        assert!(
            failed.message.contains(&addr.to_string()),
            "{}",
            failed.message
        );
        assert!(
            failed.message.contains("connection refused"),
            "{}",
            failed.message
        );
        let open = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        reachable(&[addr, open.local_addr().expect("addr")]).expect("one listens");
    }
}
