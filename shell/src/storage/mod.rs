//! The real-file backend of the Raft log: one directory per group, written by one thread.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/group-<id>/log     records [len][crc32c][index][term][payload], from index 1
//! <data_dir>/group-<id>/state   two 64-byte hard-state slots, written alternately
//! ```
//!
//! The byte formats are the core's ([`holdfast_core::storage`]), so recovery here runs the same
//! scan the simulator's disk runs (DESIGN.md §3).
//!
//! - One append-only log file per group keeps every write sequential and lets a truncating
//!   write be a single `set_len`. Recovery reads the whole file; segments (and snapshots that
//!   drop a prefix) are future work.
//! - The hard state lives apart from the log so that a vote never waits behind log bytes and
//!   so that it can be overwritten in place: two slots, the newer one never overwritten until
//!   the older one holds a synced copy, so a torn write loses at most the write being made.
//! - Durability is `fdatasync`, once per group per batch (group commit, see `thread.rs`). The
//!   state file is synced before the log: a crash can then never leave log entries of a term
//!   whose term/vote record was lost.
//! - Any I/O error is fatal for its group: an fsync that failed may have dropped dirty pages,
//!   and a retry that "succeeds" would lie (fsyncgate). A [`GroupStore`] refuses every call
//!   after its first error, and the thread reports it once and never reports that group's
//!   later writes as done.
//! - Corruption of data that may have been acknowledged is reported as
//!   [`StorageError::Corrupt`] and the server refuses to start; repairing the damaged range
//!   from peers is future work.

mod group_store;
mod thread;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

use holdfast_core::raft::{GroupId, Index, WriteId};

pub use group_store::GroupStore;
pub use thread::StorageThread;

/// Why a group's storage failed. Every variant is fatal for that group.
#[derive(Debug)]
pub enum StorageError {
    /// A system call failed; `op` names it ("fdatasync", "read", ...).
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// A file holds damaged data that must not be dropped silently. `offset` and `index` say
    /// where, when known (the state file has no index).
    Corrupt {
        path: PathBuf,
        offset: Option<u64>,
        index: Option<Index>,
        reason: String,
    },
    /// The caller handed over a write that cannot be applied (a hole in the log, indexes that
    /// are not contiguous, a term that decreases, an entry too large to encode).
    InvalidWrite {
        path: PathBuf,
        id: WriteId,
        reason: String,
    },
    /// An earlier error already failed this store; nothing more is written or synced.
    Failed { path: PathBuf, first: String },
    /// The storage thread was given a group it does not hold.
    UnknownGroup { group: GroupId },
    /// The storage thread is gone, so the write can never become durable.
    ThreadGone,
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io { path, op, source } => {
                write!(f, "{op} {} failed: {source}", path.display())
            }
            StorageError::Corrupt {
                path,
                offset,
                index,
                reason,
            } => {
                write!(f, "{} is corrupt", path.display())?;
                if let Some(offset) = offset {
                    write!(f, " at byte {offset}")?;
                }
                if let Some(index) = index {
                    write!(f, " (index {index})")?;
                }
                write!(f, ": {reason}")
            }
            StorageError::InvalidWrite { path, id, reason } => {
                write!(f, "invalid write {id} to {}: {reason}", path.display())
            }
            StorageError::Failed { path, first } => write!(
                f,
                "{} is unusable after an earlier error: {first}",
                path.display()
            ),
            StorageError::UnknownGroup { group } => {
                write!(f, "the storage thread holds no group {group}")
            }
            StorageError::ThreadGone => write!(f, "the storage thread has stopped"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
