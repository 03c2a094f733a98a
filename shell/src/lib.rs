//! The shell: the I/O driver of holdfast-core. A mio server around `BrokerNode`, the file
//! backend, the blocking client library, and the pieces of the `holdfast` CLI.

pub mod bench;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod server;
pub mod storage;
