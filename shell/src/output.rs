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
            ClientError::Refused(_) | ClientError::Send { refused: true, .. } => Failure::Refused,
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

/// A progress bar on stderr (of `len` steps, else a spinner), drawn only when stderr is a
/// terminal: piped or redirected output gets no control characters.
pub fn progress(len: Option<u64>, template: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = match len {
        Some(len) => indicatif::ProgressBar::new(len),
        None => indicatif::ProgressBar::new_spinner(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
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

/// How `consume` prints a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageFormat {
    /// The body alone, as it is (a body with a newline spans two lines).
    Body,
    /// `topic/queue@offset redeliveries=N body`, the body escaped onto one line.
    Line,
    /// One JSON object per message: topic, queue, offset, reconsume_times, redelivered,
    /// answer, body (as UTF-8, invalid bytes replaced).
    Json,
}

/// `text` on one line: backslash, newline, carriage return, tab and other control characters
/// escaped (`\\`, `\n`, `\r`, `\t`, `\u{..}`).
pub fn escape_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// What `consume` prints for one delivery answered with `answer`.
pub fn message_line(
    format: MessageFormat,
    delivery: &holdfast_core::client::Delivery,
    answer: crate::client::ConsumeStatus,
) -> String {
    let body = String::from_utf8_lossy(&delivery.message.message.body);
    match format {
        MessageFormat::Body => body.into_owned(),
        MessageFormat::Line => format!(
            "{}@{} redeliveries={} {}",
            delivery.queue,
            delivery.offset,
            delivery.message.reconsume_times,
            escape_line(&body)
        ),
        MessageFormat::Json => serde_json::json!({
            "topic": delivery.queue.topic,
            "queue": delivery.queue.queue,
            "offset": delivery.offset,
            "reconsume_times": delivery.message.reconsume_times,
            "redelivered": delivery.redelivered,
            "answer": match answer {
                crate::client::ConsumeStatus::Success => "success",
                crate::client::ConsumeStatus::ReconsumeLater => "reconsume_later",
            },
            "body": body,
        })
        .to_string(),
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn escaped_bodies_stay_on_one_line_and_read_back_unambiguously() {
        assert_eq!(escape_line("plain text"), "plain text");
        assert_eq!(escape_line("a\nb\r\tc"), "a\\nb\\r\\tc");
        // A backslash is escaped too, so a literal "\n" is not taken for a newline.
        assert_eq!(escape_line("a\\nb"), "a\\\\nb");
        assert_eq!(escape_line("bell\u{7}"), "bell\\u{7}");
        assert!(!escape_line("x\ny\u{0}\u{1b}").contains(['\n', '\u{0}', '\u{1b}']));
    }
}
