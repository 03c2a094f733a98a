//! The broker state machine: what a broker group's Raft log means.
//!
//! Every replica applies the same committed commands in the same order and so holds the same
//! queues, consume offsets, ack sets and dedup windows. Nothing here reads a clock: commands
//! carry the leader's time stamp (`stamp_ms`), so applying stays deterministic.
//!
//! - [`Command::Append`] adds a batch to a queue, idempotent by `(producer_id, seq)`.
//! - [`Command::Ack`] records a consumer group's `Success`; the group's consume offset is the
//!   lowest offset not yet acknowledged and never moves back.
//! - [`Command::ReconsumeLater`] moves a message to the group's retry queue, due after the next
//!   delay level, or to its dead-letter queue after `max_reconsume` attempts.
//! - [`Command::Trim`] applies the retention policy: queues drop their oldest messages by age
//!   and size. Offsets keep their meaning: a queue's [`BrokerState::start_offset`] rises,
//!   and pulls from below it start there.
//! - [`BrokerState::plan_pull`] is a read of applied (hence committed) state: from the cache
//!   of the newest messages, or from the driver's queue store.
//! - Message bytes live in the queue store ([`StoreOp`]), not here: the state keeps a few
//!   bytes per retained message (see `queue_log`).
//! - [`BrokerState::metadata_snapshot`] and [`BrokerState::restore`] turn the applied state
//!   into bytes and back, for Raft log compaction: metadata only, the messages staying in the
//!   (synced) queue store. [`BrokerState::snapshot_with`] writes the state with its messages,
//!   for a follower whose store lacks them.

mod codec;
mod dedup;
mod offsets;
mod queue_log;
mod snapshot;
mod state;
mod store;
mod types;

pub(crate) use codec::{BorrowedMessage, Elsewhere};
pub use codec::{CodecError, decode_command, decode_command_shared, encode_command};
pub use dedup::DEDUP_WINDOW_SEQS;
pub use offsets::GroupOffsets;
pub use snapshot::ReadMessage;
pub use snapshot::{METADATA_SNAPSHOT_VERSION, SNAPSHOT_VERSION, SnapshotError, holds_messages};
pub use state::BrokerState;
pub(crate) use store::decode_record_checking;
pub use store::{
    MemoryStore, QueueRange, Requeue, STORE_RECORD_HEADER_BYTES, StoreOp, StoreRecordError,
    check_record, decode_record, encode_record, encode_record_into, record_len,
};
pub use types::*;

#[cfg(test)]
mod tests;
