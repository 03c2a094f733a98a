//! One Raft replica of one group, sans-IO.
//!
//! The shape follows etcd-io/raft (a flat replica with `step`, timeouts and a log) and
//! quinn-proto (time passed in, outputs polled as typed values):
//!
//! - inputs: [`Replica::step`] (a message from a peer), [`Replica::handle_timeout`],
//!   [`Replica::propose`] (a batch of commands), [`Replica::persisted`] (the driver's report that
//!   a [`Write`] is durable);
//! - outputs: [`Replica::poll_write`] (bytes to write *and sync*), [`Replica::poll_message`]
//!   (messages that may be sent now), [`Replica::poll_committed`] (entries to apply, in order),
//!   [`Replica::poll_proposal`] (the fate of each proposal), [`Replica::poll_timeout`].
//!
//! Durability contract: a message that depends on local state is released by `poll_message`
//! only once the write that made that state is reported durable. A follower therefore
//! acknowledges only durable entries and a vote leaves only after the vote is durable. The one
//! exception is the leader's own AppendEntries: they may leave before the leader's own sync
//! (its term is durable already), and the leader counts itself towards a quorum only up to its
//! own durable index.

mod configs;
mod log;
mod progress;
mod quorum;
mod replica;
#[cfg(test)]
mod tests;
mod types;

pub use replica::{Replica, TERM_ACCEPTED_MAX, TERM_MAX};
pub use types::*;
