//! The real-file backend of the Raft log: one directory per group, written by one thread.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/group-<id>/log-<first index>.seg   log segments: records [len][crc32c][index][term][payload]
//! <data_dir>/group-<id>/snapshot-<index>.snap   the newest snapshot (the core's snapshot file)
//! <data_dir>/group-<id>/state                   two 64-byte hard-state slots, written alternately
//! <data_dir>/group-<id>/synced                  two slots: how far the log was synced
//! <data_dir>/group-<id>/damaged                 only on a damaged replica: the first index lost
//! ```
//!
//! Indexes in names are zero-padded to 20 digits, so names sort as indexes do. The byte formats
//! are the core's ([`holdfast_core::storage`]), so recovery here runs the same scan, snapshot
//! decoding and `log_after_snapshot` rule that the simulator's disk runs (DESIGN.md §3).
//!
//! - Segments: appends go to the last segment until it has passed
//!   [`StorageConfig::segment_bytes_max`]; the next record starts a new one, named by its
//!   index. A truncation deletes the later segments newest first and cuts the one that holds
//!   the cut; a snapshot lets whole segments below it be deleted, oldest first. Every segment
//!   is synced before the next one is created, so only the last one can hold a torn write; the
//!   directory is synced whenever a segment is created or removed, before anything that
//!   depends on it is reported durable.
//! - Snapshots are written to a temporary file, synced, renamed into place and the directory
//!   synced, before the rest of their write; older snapshot files go after. A snapshot that
//!   fails its checksum is damage, never a reason to fall back to an older one.
//! - The hard state lives apart from the log so that a vote never waits behind log bytes and
//!   so that it can be overwritten in place: two slots, the newer one never overwritten until
//!   the older one holds a synced copy, so a torn write loses at most the write being made.
//! - The synced record says through which index the log was synced and reported durable;
//!   recovery calls a bad record at or below it damage, never a torn tail. The storage thread
//!   records it when idle (see `thread.rs`), and a write that cuts the log lowers it first.
//! - Durability is `fdatasync`, once per group per batch (group commit, see `thread.rs`). The
//!   state file is synced before the log: a crash can then never leave log entries of a term
//!   whose term/vote record was lost.
//! - Any I/O error is fatal for its group: an fsync that failed may have dropped dirty pages,
//!   and a retry that "succeeds" would lie (fsyncgate). A [`GroupStore`] refuses every call
//!   after its first error, and the thread reports it once and never reports that group's
//!   later writes as done.
//! - Corruption of data that may have been acknowledged is [`StorageError::Corrupt`] for
//!   [`GroupStore::open`]; the server opens with [`GroupStore::open_repairing`] instead, which
//!   cuts the damage off and starts that replica damaged until its peers have repaired it.

mod files;
mod group_store;
mod queue_store;
mod recover;
mod thread;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

use holdfast_core::raft::{GroupId, Index, WriteId};

pub(crate) use files::{create_dir_durable, sync_dir};
pub use group_store::GroupStore;
pub(crate) use group_store::write_snapshot_file;
pub use queue_store::{QueueStore, SyncPlan};
pub use thread::StorageThread;

/// How a node lays out its groups' files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageConfig {
    /// A log segment takes no more records once it holds this many bytes; the next record
    /// starts a new segment. One record may take a segment past it. Small segments make
    /// compaction free space sooner and recovery read less below a snapshot; large ones mean
    /// fewer files and fewer directory syncs.
    pub segment_bytes_max: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            segment_bytes_max: 64 << 20,
        }
    }
}

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
