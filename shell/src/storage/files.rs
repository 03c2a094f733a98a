//! The names in a group's directory, its small files (the synced record, the damage marker),
//! and the I/O helpers the store and its recovery share. Every error names its path.

use std::fs::{self, File};
use std::io::{self, Read, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use holdfast_core::raft::{HardState, Index};
use holdfast_core::storage::{
    SLOT_BYTES, STATE_BYTES, decode_stored_state, encode_state_slot, next_slot,
};
use tracing::error;

use super::StorageError;

pub(super) const STATE_FILE: &str = "state";
pub(super) const SYNCED_FILE: &str = "synced";
/// The marker of a damaged replica: the first index that may have been lost, as text.
pub(super) const DAMAGE_MARKER: &str = "damaged";
/// The single log file of the layout before segments; migrated to the first segment on open.
pub(super) const LEGACY_LOG_FILE: &str = "log";

const SEGMENT_PREFIX: &str = "log-";
const SEGMENT_SUFFIX: &str = ".seg";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";
/// A snapshot being written; renamed into place once it is durable, so a name without this
/// suffix always holds a whole snapshot.
const TEMP_SUFFIX: &str = ".tmp";
/// A snapshot that recovery refused; kept for inspection, never read again.
pub(super) const SET_ASIDE_SUFFIX: &str = ".damaged";
/// Names are zero-padded to this many digits (`{:020}`) so that they sort as their indexes do.
const INDEX_DIGITS: usize = 20;

pub(super) fn segment_name(first: Index) -> String {
    format!("{SEGMENT_PREFIX}{first:020}{SEGMENT_SUFFIX}")
}

pub(super) fn snapshot_name(index: Index) -> String {
    format!("{SNAPSHOT_PREFIX}{index:020}{SNAPSHOT_SUFFIX}")
}

pub(super) fn snapshot_temp_name(index: Index) -> String {
    format!("{}{TEMP_SUFFIX}", snapshot_name(index))
}

fn parse_index(name: &str, prefix: &str, suffix: &str) -> Option<Index> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.len() != INDEX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a group's directory holds, each list sorted by index.
#[derive(Default)]
pub(super) struct Listing {
    /// `(first index, path)` of every segment.
    pub segments: Vec<(Index, PathBuf)>,
    /// `(index, path)` of every snapshot file.
    pub snapshots: Vec<(Index, PathBuf)>,
    /// Snapshots that were being written when the process stopped.
    pub temps: Vec<PathBuf>,
}

pub(super) fn list_dir(dir: &Path) -> Result<Listing, StorageError> {
    let mut listing = Listing::default();
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, "list", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, "list", e))?;
        let path = entry.path();
        // Names that are not UTF-8 are not ours.
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(first) = parse_index(&name, SEGMENT_PREFIX, SEGMENT_SUFFIX) {
            listing.segments.push((first, path));
        } else if let Some(index) = parse_index(&name, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX) {
            listing.snapshots.push((index, path));
        } else if name.starts_with(SNAPSHOT_PREFIX) && name.ends_with(TEMP_SUFFIX) {
            listing.temps.push(path);
        }
    }
    listing.segments.sort();
    listing.snapshots.sort();
    Ok(listing)
}

/// The synced record: every log entry up to its index was synced and reported durable, so
/// recovery calls a bad record at or below it damage, never a torn tail.
///
/// It reuses the core's two-slot hard-state format ([`encode_state_slot`]), which is pure,
/// checksummed and survives a torn write, as a container for one number: the `commit` field
/// holds the synced index, `term` is 0 and there is no vote. A torn write of the slot being
/// written leaves the other slot, whose older index is still true: lowering is made durable
/// before anything it guards is cut, and raising only ever follows a sync.
pub(super) struct SyncedRecord {
    /// The sequence of the newest valid slot (0 for a fresh file).
    pub sequence: u64,
    /// `None` when neither slot can be read (two faults, not one torn write): recovery then
    /// treats everything in the log as possibly synced.
    pub index: Option<Index>,
}

pub(super) fn read_synced(file: &File, path: &Path) -> Result<SyncedRecord, StorageError> {
    let mut bytes = Vec::new();
    // One byte more than a valid file, so a longer one is refused without reading it all.
    file.take(STATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, "read", e))?;
    match decode_stored_state(&bytes) {
        Ok(None) => Ok(SyncedRecord {
            sequence: 0,
            index: Some(0),
        }),
        Ok(Some(stored)) => Ok(SyncedRecord {
            sequence: stored.sequence,
            index: Some(stored.hard_state.commit),
        }),
        Err(e) => {
            error!(
                path = %path.display(),
                "the synced record is unreadable ({e}): a torn tail of the log will count as damage"
            );
            Ok(SyncedRecord {
                sequence: 0,
                index: None,
            })
        }
    }
}

/// Writes `index` as the next synced record after `record` and syncs it; returns the new
/// record. An unreadable file is rewritten whole, so that no bad slot outlives the rewrite.
pub(super) fn write_synced(
    file: &File,
    path: &Path,
    record: &SyncedRecord,
    index: Index,
) -> Result<SyncedRecord, StorageError> {
    let Some(sequence) = record.sequence.checked_add(1) else {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            index: None,
            reason: "the slot sequence is exhausted".to_string(),
        });
    };
    let hard_state = HardState {
        term: 0,
        vote: None,
        commit: index,
    };
    let slot = encode_state_slot(sequence, &hard_state);
    let at = next_slot(record.sequence) * SLOT_BYTES;
    if record.index.is_some() {
        file.write_all_at(&slot, at as u64)
            .map_err(|e| io_error(path, "write", e))?;
    } else {
        let mut whole = [0u8; STATE_BYTES];
        if let Some(place) = whole.get_mut(at..at + SLOT_BYTES) {
            place.copy_from_slice(&slot);
        }
        file.write_all_at(&whole, 0)
            .map_err(|e| io_error(path, "write", e))?;
        file.set_len(STATE_BYTES as u64)
            .map_err(|e| io_error(path, "truncate", e))?;
    }
    file.sync_data()
        .map_err(|e| io_error(path, "fdatasync", e))?;
    Ok(SyncedRecord {
        sequence,
        index: Some(index),
    })
}

pub(super) fn read_damage_marker(marker: &Path) -> Result<Option<Index>, StorageError> {
    match fs::read_to_string(marker) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| StorageError::Corrupt {
                path: marker.to_path_buf(),
                offset: None,
                index: None,
                reason: format!("the damage marker holds {text:?}, not an index"),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(marker, "read", e)),
    }
}

/// Durable before the log is cut: a crash in between must not leave a shorter log that looks
/// whole.
pub(super) fn write_damage_marker(
    dir: &Path,
    marker: &Path,
    from: Index,
) -> Result<(), StorageError> {
    let write = || -> io::Result<()> {
        let mut file = File::create(marker)?;
        file.write_all(format!("{from}\n").as_bytes())?;
        file.sync_all()
    };
    write().map_err(|e| io_error(marker, "write", e))?;
    sync_dir(dir)
}

/// Opens `path` for reading and writing, creating it when missing; says whether it did.
pub(super) fn open_file(path: &Path) -> Result<(File, bool), StorageError> {
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true);
    match options.clone().create_new(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => options
            .open(path)
            .map(|file| (file, false))
            .map_err(|e| io_error(path, "open", e)),
        Err(e) => Err(io_error(path, "create", e)),
    }
}

/// Creates `path` and any missing ancestors, fsyncing the parent of each one created: a new
/// directory entry is only durable once its parent directory is synced.
pub(crate) fn create_dir_durable(path: &Path) -> Result<(), StorageError> {
    if path.is_dir() {
        return Ok(());
    }
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    create_dir_durable(parent)?;
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error(path, "mkdir", e)),
    }
    sync_dir(parent)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "fsync directory", e))
}

/// Removes a file; one that is already gone is fine (the caller wanted it gone).
pub(super) fn remove_file(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path, "remove", e)),
    }
}

pub(super) fn io_error(path: &Path, op: &'static str, source: io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}
