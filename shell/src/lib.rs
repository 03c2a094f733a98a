//! The shell: the I/O driver of holdfast-core. A mio server around `BrokerNode`, the file
//! backend, the blocking client library, and the pieces of the `holdfast` CLI.

/// `println!` that does not panic when stdout is a closed pipe (`holdfast status | head`).
#[macro_export]
macro_rules! out {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod admin;
pub mod auth;
pub mod bench;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod output;
pub mod server;
pub mod storage;
pub mod tls;
pub mod transport;
