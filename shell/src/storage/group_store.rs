//! One group's log and state files: staging writes, syncing them, and recovery.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use holdfast_core::raft::{
    Damage, Entry, GroupId, HardState, Index, Recovered, Term, Write, WriteId,
};
use holdfast_core::storage::{
    SLOT_BYTES, STATE_BYTES, ScanOutcome, decode_stored_state, encode_entry, encode_state_slot,
    find_record_after, next_slot, record_len_bytes, scan,
};
use tracing::{error, warn};

use super::StorageError;

/// A commit advance alone (same term and vote) is written to the state file only once it has
/// moved this far past the last written commit. The stored commit is only a lower bound that a
/// restarted replica starts from and then re-learns from the leader, so writing every advance
/// would cost a state sync per batch for little; this bounds how far a restart falls behind.
const COMMIT_WRITE_INTERVAL: Index = 1000;

/// The files of one group, with the log's layout in memory so a truncating write knows where
/// to cut. Writes are staged in memory and reach the files in [`GroupStore::sync`].
pub struct GroupStore {
    log_path: PathBuf,
    state_path: PathBuf,
    log: File,
    state: File,
    /// Where each entry's record starts: the entry with index `i` at `offsets[i - 1]`.
    offsets: Vec<u64>,
    /// Each entry's term, to refuse a write whose terms decrease: recovery would stop there.
    terms: Vec<Term>,
    /// Log bytes staged but not yet in the file; they belong at `pending_at`.
    pending: Vec<u8>,
    pending_at: u64,
    /// A truncation of bytes already in the file, applied by the next sync before `pending`.
    cut: Option<u64>,
    /// How many leading entries are durable and have not been cut since. A commit written to
    /// the state file is clamped to it: the state is synced before the log, so a crash between
    /// the two must not leave a commit that the log cannot back (recovery would call it
    /// corruption).
    durable_floor: Index,
    /// The sequence of the newest valid slot (0 for a fresh file).
    state_sequence: u64,
    /// The hard state in the newest slot.
    written: HardState,
    /// The newest hard state handed over, written by the next sync when `state_dirty`.
    latest: HardState,
    state_dirty: bool,
    fsyncs: u64,
    /// The first error; after it every call fails, so a failed fsync is never retried.
    failed: Option<String>,
}

impl GroupStore {
    /// Opens (creating when missing) `dir/group-<id>/` with its `log` and `state`, fsyncing
    /// every directory that gains an entry, and recovers what they hold.
    ///
    /// A torn tail of the log (bytes of a write that never finished syncing) is cut off. Damage
    /// that may cover acknowledged data is [`StorageError::Corrupt`], and the server refuses to
    /// start on it: repairing the damaged range from peers is future work.
    pub fn open(dir: &Path, group: GroupId) -> Result<(GroupStore, Recovered), StorageError> {
        Self::open_with(dir, group, false).map(|(store, recovered, _)| (store, recovered))
    }

    /// Like [`GroupStore::open`], but a log damaged inside its synced part is not refused: it
    /// is cut back to its valid prefix and the replica starts [`Damage`]d, so it neither votes
    /// nor campaigns until a leader has repaired it from its peers (the core's rule; see
    /// `Replica::damaged_from`). A `damaged` marker file, synced before the cut, keeps that
    /// across restarts until [`GroupStore::clear_damage`] removes it.
    pub fn open_repairing(
        dir: &Path,
        group: GroupId,
    ) -> Result<(GroupStore, Recovered, Option<Damage>), StorageError> {
        Self::open_with(dir, group, true)
    }

    /// The replica of `group` has been repaired: forget its damage.
    pub fn clear_damage(dir: &Path, group: GroupId) -> Result<(), StorageError> {
        let group_dir = dir.join(format!("group-{group}"));
        let marker = group_dir.join(DAMAGE_MARKER);
        match fs::remove_file(&marker) {
            Ok(()) => sync_dir(&group_dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&marker, "remove", e)),
        }
    }

    fn open_with(
        dir: &Path,
        group: GroupId,
        repair: bool,
    ) -> Result<(GroupStore, Recovered, Option<Damage>), StorageError> {
        let group_dir = dir.join(format!("group-{group}"));
        create_dir_durable(&group_dir)?;
        let state_path = group_dir.join("state");
        let log_path = group_dir.join("log");
        let (state, state_created) = open_file(&state_path)?;
        let (log, log_created) = open_file(&log_path)?;
        if state_created || log_created {
            sync_dir(&group_dir)?;
        }
        let (state_sequence, hard_state) = read_state(&state, &state_path)?;
        let mut store = GroupStore {
            log_path,
            state_path,
            log,
            state,
            offsets: Vec::new(),
            terms: Vec::new(),
            pending: Vec::new(),
            pending_at: 0,
            cut: None,
            durable_floor: 0,
            state_sequence,
            written: hard_state,
            latest: hard_state,
            state_dirty: false,
            fsyncs: 0,
            failed: None,
        };
        let marker = group_dir.join(DAMAGE_MARKER);
        let earlier = read_damage_marker(&marker)?;
        let (entries, damage) = match store.recover_log(hard_state.commit) {
            Ok(entries) => (entries, earlier),
            Err(StorageError::Corrupt {
                offset: Some(at),
                index: Some(from),
                reason,
                ..
            }) if repair => {
                let from = earlier.map_or(from, |earlier| earlier.min(from));
                error!(
                    path = %store.log_path.display(),
                    at, from, "{reason}; cutting the log back to its valid prefix: this replica will not vote until its peers have repaired it"
                );
                write_damage_marker(&group_dir, &marker, from)?;
                store.cut_damaged(at)?;
                let entries = store.recover_log(hard_state.commit.min(from.saturating_sub(1)))?;
                (entries, Some(from))
            }
            Err(e) => return Err(e),
        };
        let damage = damage.map(|from| Damage {
            from,
            votes_lost: false,
        });
        Ok((
            store,
            Recovered {
                hard_state,
                entries,
            },
            damage,
        ))
    }

    /// Cuts the log file back to `at` for a repairing open, and makes the cut durable.
    fn cut_damaged(&mut self, at: u64) -> Result<(), StorageError> {
        self.log
            .set_len(at)
            .map_err(|e| io_error(&self.log_path, "truncate", e))?;
        self.sync_log()?;
        self.log
            .seek(io::SeekFrom::Start(0))
            .map_err(|e| io_error(&self.log_path, "seek", e))?;
        self.offsets.clear();
        self.terms.clear();
        Ok(())
    }

    /// Stages `write` in memory; nothing is durable (or even in the files) until
    /// [`GroupStore::sync`]. A write that would leave a hole in the log, or whose entries are
    /// not contiguous with non-decreasing terms, is refused and fails the store.
    pub fn write(&mut self, write: &Write) -> Result<(), StorageError> {
        self.check_usable()?;
        let result = self.stage_entries(write.id, &write.entries);
        self.record_failure(result)?;
        if let Some(hard_state) = write.hard_state {
            self.stage_state(hard_state);
        }
        Ok(())
    }

    /// Makes every write so far durable: the state slot first (if it changed), then a pending
    /// truncation, then the appended bytes.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.check_usable()?;
        let result = self.sync_files();
        self.record_failure(result)
    }

    /// How many `fdatasync`s this store has made.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// The index of the last entry written (synced or not).
    pub fn last_index(&self) -> Index {
        self.offsets.len() as Index
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        match &self.failed {
            None => Ok(()),
            Some(first) => Err(StorageError::Failed {
                path: self.log_path.clone(),
                first: first.clone(),
            }),
        }
    }

    fn record_failure<T>(&mut self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    fn invalid(&self, id: WriteId, reason: String) -> StorageError {
        StorageError::InvalidWrite {
            path: self.log_path.clone(),
            id,
            reason,
        }
    }

    /// Checks and encodes the whole write before changing anything, so a refused write leaves
    /// the staged state as it was.
    fn stage_entries(&mut self, id: WriteId, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let last = self.last_index();
        if first.index == 0 || first.index > last.saturating_add(1) {
            return Err(self.invalid(
                id,
                format!(
                    "it starts at index {} but the log ends at {last}",
                    first.index
                ),
            ));
        }
        let keep = usize::try_from(first.index - 1).unwrap_or(usize::MAX);
        let mut previous_term = keep
            .checked_sub(1)
            .and_then(|i| self.terms.get(i))
            .copied()
            .unwrap_or(0);
        let mut expected = Some(first.index);
        let mut encoded = Vec::new();
        let mut starts = Vec::with_capacity(entries.len());
        for entry in entries {
            if expected != Some(entry.index) {
                let reason = format!(
                    "entry {} is not contiguous with the one before",
                    entry.index
                );
                return Err(self.invalid(id, reason));
            }
            if entry.term < previous_term {
                let reason = format!(
                    "entry {} has term {} after term {previous_term}",
                    entry.index, entry.term
                );
                return Err(self.invalid(id, reason));
            }
            starts.push(encoded.len() as u64);
            encode_entry(entry, &mut encoded)
                .map_err(|e| self.invalid(id, format!("entry {}: {e}", entry.index)))?;
            expected = entry.index.checked_add(1);
            previous_term = entry.term;
        }
        self.truncate_to(keep);
        let base = self.end();
        self.offsets.extend(starts.iter().map(|start| base + start));
        self.terms.extend(entries.iter().map(|e| e.term));
        self.pending.extend_from_slice(&encoded);
        Ok(())
    }

    /// Keeps the first `keep` entries. Staged bytes are simply dropped; bytes already in the
    /// file are cut by the next sync.
    fn truncate_to(&mut self, keep: usize) {
        let Some(&offset) = self.offsets.get(keep) else {
            return;
        };
        self.offsets.truncate(keep);
        self.terms.truncate(keep);
        self.durable_floor = self.durable_floor.min(keep as Index);
        if offset >= self.pending_at {
            let staged = usize::try_from(offset - self.pending_at).unwrap_or(usize::MAX);
            self.pending.truncate(staged);
        } else {
            self.pending.clear();
            self.pending_at = offset;
            self.cut = Some(offset);
        }
    }

    /// The byte offset where the next record goes.
    fn end(&self) -> u64 {
        self.pending_at + self.pending.len() as u64
    }

    fn stage_state(&mut self, hard_state: HardState) {
        self.latest = hard_state;
        let changed = hard_state.term != self.written.term || hard_state.vote != self.written.vote;
        let commit_due =
            hard_state.commit >= self.written.commit.saturating_add(COMMIT_WRITE_INTERVAL);
        if changed || commit_due {
            self.state_dirty = true;
        }
    }

    fn sync_files(&mut self) -> Result<(), StorageError> {
        if self.state_dirty {
            self.write_state_slot()?;
        }
        if let Some(cut) = self.cut.take() {
            // Synced on its own before new bytes go in: otherwise a crash could keep the old
            // length with new records written over part of it, and a stale record behind a torn
            // new one would make recovery see mid-log corruption. Truncations are rare (a new
            // leader overwriting uncommitted entries), so the extra sync is too.
            self.log
                .set_len(cut)
                .map_err(|e| io_error(&self.log_path, "truncate", e))?;
            self.sync_log()?;
        }
        if !self.pending.is_empty() {
            self.log
                .write_all_at(&self.pending, self.pending_at)
                .map_err(|e| io_error(&self.log_path, "write", e))?;
            self.pending_at += self.pending.len() as u64;
            self.pending.clear();
            self.sync_log()?;
        }
        self.durable_floor = self.last_index();
        Ok(())
    }

    /// Writes the latest hard state into the slot that does not hold the newest copy. Called at
    /// most once per sync, so the other slot always holds a synced state while this one is torn.
    fn write_state_slot(&mut self) -> Result<(), StorageError> {
        let mut hard_state = self.latest;
        hard_state.commit = hard_state.commit.min(self.durable_floor);
        let Some(sequence) = self.state_sequence.checked_add(1) else {
            return Err(StorageError::Corrupt {
                path: self.state_path.clone(),
                offset: None,
                index: None,
                reason: "the slot sequence is exhausted".to_string(),
            });
        };
        let slot = encode_state_slot(sequence, &hard_state);
        let at = (next_slot(self.state_sequence) * SLOT_BYTES) as u64;
        self.state
            .write_all_at(&slot, at)
            .map_err(|e| io_error(&self.state_path, "write", e))?;
        self.state
            .sync_data()
            .map_err(|e| io_error(&self.state_path, "fdatasync", e))?;
        self.fsyncs += 1;
        self.state_sequence = sequence;
        self.written = hard_state;
        self.state_dirty = false;
        Ok(())
    }

    fn sync_log(&mut self) -> Result<(), StorageError> {
        self.log
            .sync_data()
            .map_err(|e| io_error(&self.log_path, "fdatasync", e))?;
        self.fsyncs += 1;
        Ok(())
    }

    /// Reads and checks the whole log, cuts a torn tail, and fills in the layout.
    ///
    /// No synced length is recorded, so the scan treats everything as possibly unsynced and the
    /// damage is classified here: too few entries for the stored commit, or a valid record
    /// behind the damage, means synced data was hit; anything else is a torn last write.
    fn recover_log(&mut self, commit: Index) -> Result<Vec<Entry>, StorageError> {
        let mut bytes = Vec::new();
        (&self.log)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error(&self.log_path, "read", e))?;
        let found = scan(&bytes, 0, 1);
        let count = found.entries.len() as Index;
        let next_index = count.saturating_add(1);
        let damage = match found.outcome {
            ScanOutcome::Clean => None,
            ScanOutcome::TornTail { at } => Some(at),
            // Unreachable with a synced length of 0, but never ignored.
            ScanOutcome::Corrupt {
                at,
                index_hint,
                reason,
            } => return Err(self.corrupt(at, index_hint, reason.to_string())),
        };
        if count < commit {
            let what = match damage {
                Some(_) => damage_reason(&bytes),
                None => "the log ends cleanly".to_string(),
            };
            let reason = format!(
                "the state file says {commit} entries are committed but only {count} are readable ({what})"
            );
            return Err(self.corrupt(found.valid_len, next_index, reason));
        }
        if let Some(at) = damage {
            let last_term = found.entries.last().map_or(0, |e| e.term);
            if let Some((offset, index)) = find_record_after(&bytes, at, next_index, last_term) {
                let reason = format!(
                    "{}; a valid record (index {index}) follows at byte {offset}, so this is damage inside the log, not a torn tail",
                    damage_reason(&bytes)
                );
                return Err(self.corrupt(at, next_index, reason));
            }
            self.log
                .set_len(at)
                .map_err(|e| io_error(&self.log_path, "truncate", e))?;
            self.sync_log()?;
            warn!(
                path = %self.log_path.display(),
                dropped_bytes = (bytes.len() as u64).saturating_sub(at),
                entries = count,
                "cut a torn tail off the log"
            );
        }
        let mut offset = 0;
        for entry in &found.entries {
            self.offsets.push(offset);
            self.terms.push(entry.term);
            let len = record_len_bytes(entry)
                .map_err(|e| self.corrupt(offset, entry.index, e.to_string()))?;
            offset += len as u64;
        }
        self.pending_at = found.valid_len;
        self.durable_floor = count;
        Ok(found.entries)
    }

    fn corrupt(&self, offset: u64, index: Index, reason: String) -> StorageError {
        StorageError::Corrupt {
            path: self.log_path.clone(),
            offset: Some(offset),
            index: Some(index),
            reason,
        }
    }
}

/// Why the log's first bad record is bad: the scan again, now calling every byte synced.
/// Only runs on the way to an error.
fn damage_reason(bytes: &[u8]) -> String {
    match scan(bytes, bytes.len() as u64, 1).outcome {
        ScanOutcome::Corrupt { reason, .. } => reason.to_string(),
        other => other.to_string(),
    }
}

/// The newest hard state and its slot sequence; a missing or empty file is the default state.
fn read_state(file: &File, path: &Path) -> Result<(u64, HardState), StorageError> {
    let mut bytes = Vec::new();
    // One byte more than a valid file, so a longer one is refused without reading it all.
    file.take(STATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, "read", e))?;
    match decode_stored_state(&bytes) {
        Ok(None) => Ok((0, HardState::default())),
        Ok(Some(stored)) => Ok((stored.sequence, stored.hard_state)),
        Err(e) => Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            index: None,
            reason: e.to_string(),
        }),
    }
}

/// Opens `path` for reading and writing, creating it when missing; says whether it did.
/// The marker of a damaged replica: the first index that may have been lost, as text.
const DAMAGE_MARKER: &str = "damaged";

fn read_damage_marker(marker: &Path) -> Result<Option<Index>, StorageError> {
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
fn write_damage_marker(dir: &Path, marker: &Path, from: Index) -> Result<(), StorageError> {
    let write = || -> io::Result<()> {
        let mut file = File::create(marker)?;
        file.write_all(format!("{from}\n").as_bytes())?;
        file.sync_all()
    };
    write().map_err(|e| io_error(marker, "write", e))?;
    sync_dir(dir)
}

fn open_file(path: &Path) -> Result<(File, bool), StorageError> {
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
fn create_dir_durable(path: &Path) -> Result<(), StorageError> {
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

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "fsync directory", e))
}

fn io_error(path: &Path, op: &'static str, source: io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}
