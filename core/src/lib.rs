//! holdfast-core: the pure state machines of holdfast.
//!
//! Nothing in this crate performs I/O, reads a clock, spawns a thread or draws unseeded
//! randomness. Time comes in as an argument ([`time::Instant`]); everything a driver must do
//! (send, write and sync, apply, arm a timer) goes out as typed values that the driver polls.
//! The production shell and the simulator are two drivers of exactly this code.
//! `tests/tests/purity.rs` enforces the rule.

pub mod broker;
pub mod client;
pub mod limits;
pub mod node;
pub mod raft;
pub mod storage;
pub mod time;
pub mod wire;
