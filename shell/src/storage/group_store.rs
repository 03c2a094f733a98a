//! One group's files: staging writes in memory and making them durable in the order
//! [`Write`] prescribes. Opening and recovery are in `recover.rs`.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};

use holdfast_core::raft::{Entry, HardState, Index, Snapshot, Term, Write, WriteId};
use holdfast_core::storage::{
    SLOT_BYTES, SNAPSHOT_HEADER_BYTES, encode_entry, encode_snapshot_header,
    encode_snapshot_membership, encode_state_slot, next_slot,
};

use super::StorageError;
use super::files::{
    self, SyncedRecord, io_error, list_dir, remove_file, segment_name, snapshot_name,
    snapshot_temp_name, sync_dir,
};

/// A commit advance alone (same term and vote) is written to the state file only once it has
/// moved this far past the last written commit. The stored commit is only a lower bound that a
/// restarted replica starts from and then re-learns from the leader, so writing every advance
/// would cost a state sync per batch for little; this bounds how far a restart falls behind.
const COMMIT_WRITE_INTERVAL: Index = 1000;

/// One segment file of the log, as staged writes will leave it.
pub(super) struct Segment {
    /// The index of its first record, which is also its name.
    pub first: Index,
    pub path: PathBuf,
    /// `None` for a segment staged but not yet created.
    pub file: Option<File>,
    /// Where each record starts and its term: the entry `first + i` at `starts[i]`.
    pub starts: Vec<u64>,
    pub terms: Vec<Term>,
    /// The bytes of the file that stay: what is in it, less a staged cut.
    pub written: u64,
    /// The file is longer than `written`: the next sync cuts it before appending.
    pub cut: bool,
    /// Staged records, which belong at `written`.
    pub pending: Vec<u8>,
}

/// Buffers kept between writes: grown again from nothing for every write, they took fresh
/// pages from the system each time (a tenth of a publishing node's storage thread).
#[derive(Default)]
pub(super) struct SpareBuffers {
    /// For a write's encoded records.
    records: Vec<u8>,
    /// For the newest segment's staged records.
    pending: Vec<u8>,
}

impl SpareBuffers {
    /// Larger buffers (a burst of big entries) are let go.
    const BYTES_MAX: usize = 8 << 20;

    fn keep_records(&mut self, mut buffer: Vec<u8>) {
        if buffer.capacity() <= Self::BYTES_MAX {
            buffer.clear();
            self.records = buffer;
        }
    }

    fn keep_pending(&mut self, mut buffer: Vec<u8>) {
        if buffer.capacity() <= Self::BYTES_MAX && buffer.capacity() > self.pending.capacity() {
            buffer.clear();
            self.pending = buffer;
        }
    }
}

impl Segment {
    pub fn staged(dir: &Path, first: Index) -> Segment {
        Segment {
            first,
            path: dir.join(segment_name(first)),
            file: None,
            starts: Vec::new(),
            terms: Vec::new(),
            written: 0,
            cut: false,
            pending: Vec::new(),
        }
    }

    pub fn count(&self) -> Index {
        self.starts.len() as Index
    }

    /// The index its next record would have.
    pub fn next_index(&self) -> Index {
        self.first + self.count()
    }

    /// Its last entry's index (`first - 1` when empty).
    pub fn last(&self) -> Index {
        self.next_index().saturating_sub(1)
    }

    fn end(&self) -> u64 {
        self.written + self.pending.len() as u64
    }
}

/// A group's log segments, state file and synced record, with the log's layout in memory so a
/// truncating write knows where to cut. Writes are staged in memory and reach the files in
/// [`GroupStore::sync`].
pub struct GroupStore {
    pub(super) dir: PathBuf,
    pub(super) state_path: PathBuf,
    pub(super) state: File,
    pub(super) synced_path: PathBuf,
    pub(super) synced: File,
    pub(super) segment_bytes_max: u64,
    /// The log's segments, oldest first, as the staged writes leave them.
    pub(super) segments: Vec<Segment>,
    /// Segments on disk that staged writes dropped (a truncation or a discard): the next sync
    /// deletes them newest first, so that a crash half way leaves a prefix of the log.
    pub(super) doomed: Vec<Segment>,
    /// `doomed` holds a discarded log: deleted before the hard state, as `Write` orders.
    pub(super) discard_staged: bool,
    /// The newest snapshot handed over and not yet written.
    pub(super) staged_snapshot: Option<Snapshot>,
    /// The newest snapshot, staged or written (0 without one).
    pub(super) snapshot_index: Index,
    pub(super) snapshot_term: Term,
    /// Directory entries were removed and the directory has not been synced since.
    pub(super) dir_dirty: bool,
    /// Every entry up to here is durable (in the log or a snapshot) and not cut by a staged
    /// write. A commit written to the state file is clamped to it, and it is what the synced
    /// record may claim: the state is synced before the log, so a crash between the two must
    /// not leave a commit (or a synced claim) the log cannot back.
    pub(super) durable_floor: Index,
    /// The sequence of the newest valid slot (0 for a fresh file).
    pub(super) state_sequence: u64,
    /// The hard state in the newest slot.
    pub(super) written: HardState,
    /// The newest hard state handed over, written by the next sync when `state_dirty`.
    pub(super) latest: HardState,
    pub(super) state_dirty: bool,
    /// What the synced record on disk says.
    pub(super) synced_record: SyncedRecord,
    pub(super) fsyncs: u64,
    /// The first error; after it every call fails, so a failed fsync is never retried.
    pub(super) failed: Option<String>,
    pub(super) buffers: SpareBuffers,
    /// Where files the log no longer needs (compacted segments, older snapshots) go to be
    /// removed off this thread; `None` removes them in the sync itself.
    pub(super) remover: Option<Sender<PathBuf>>,
    /// Tests stop a sync after this many durable steps, leaving the files as a crash would.
    #[cfg(test)]
    pub(super) crash_after_steps: Option<u32>,
    #[cfg(test)]
    pub(super) steps: u32,
}

impl GroupStore {
    /// Stages `write` in memory; nothing is durable (or even in the files) until
    /// [`GroupStore::sync`]. A write that does not fit the log (a hole, entries that are not
    /// contiguous or whose terms decrease, a snapshot that is not newer or that neither
    /// continues the log nor discards it) is refused and fails the store.
    pub fn write(&mut self, write: &Write) -> Result<(), StorageError> {
        self.check_usable()?;
        let result = self.stage(write);
        self.record_failure(result)
    }

    /// Makes every write so far durable, in the order of [`Write`]: a snapshot first (temp
    /// file, fsync, rename, fsync of the directory), a discarded log next, then the state
    /// slot, a truncation, the appended records, and last the segments the snapshot made
    /// unnecessary. Each step that a later one relies on is durable before that one starts.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.check_usable()?;
        let result = self.sync_files();
        self.record_failure(result)
    }

    /// Records durably that the log is synced through its last entry, unless the synced record
    /// says so already. One fdatasync; the storage thread calls it when it is idle, so a busy
    /// node pays nothing for it (see `thread.rs`).
    pub fn record_synced(&mut self) -> Result<(), StorageError> {
        self.check_usable()?;
        if self.synced_record.index == Some(self.durable_floor) {
            return Ok(());
        }
        let result = self.write_synced(self.durable_floor);
        self.record_failure(result)
    }

    /// How many `fdatasync`s this store has made (of files and of its directory).
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// The index of the last entry written (synced or not), or of the snapshot when the log
    /// holds nothing after it.
    pub fn last_index(&self) -> Index {
        self.log_last().unwrap_or(0).max(self.snapshot_index)
    }

    /// The index of the newest snapshot written (synced or not), 0 without one.
    pub fn snapshot_index(&self) -> Index {
        self.snapshot_index
    }

    /// How many segment files the log has (or will have after the next sync).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        match &self.failed {
            None => Ok(()),
            Some(first) => Err(StorageError::Failed {
                path: self.dir.clone(),
                first: first.clone(),
            }),
        }
    }

    pub(super) fn record_failure<T>(
        &mut self,
        result: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    fn invalid(&self, id: WriteId, reason: String) -> StorageError {
        StorageError::InvalidWrite {
            path: self.dir.clone(),
            id,
            reason,
        }
    }

    /// The indexes of the first and last entry in the segments, if they hold any.
    fn log_range(&self) -> Option<(Index, Index)> {
        let first = self.segments.first()?.first;
        let last = self.segments.last()?.last();
        (last >= first).then_some((first, last))
    }

    fn log_last(&self) -> Option<Index> {
        self.log_range().map(|(_, last)| last)
    }

    fn term_at(&self, index: Index) -> Option<Term> {
        let after = self.segments.partition_point(|s| s.first <= index);
        let segment = self.segments.get(after.checked_sub(1)?)?;
        let at = usize::try_from(index - segment.first).ok()?;
        segment.terms.get(at).copied()
    }

    /// Checks and encodes the whole write before changing anything, so a refused write leaves
    /// the staged state as it was.
    fn stage(&mut self, write: &Write) -> Result<(), StorageError> {
        let id = write.id;
        match &write.snapshot {
            Some(snapshot) if snapshot.index <= self.snapshot_index => {
                let reason = format!(
                    "its snapshot at index {} is not past the snapshot at {}",
                    snapshot.index, self.snapshot_index
                );
                return Err(self.invalid(id, reason));
            }
            Some(snapshot) if !write.discard_log && self.log_range().is_some() => {
                // Without a discard the log must go on from the snapshot's own entry, or
                // recovery (`log_after_snapshot`) would drop it as a replaced log.
                let held = self.term_at(snapshot.index);
                if held != Some(snapshot.term) {
                    let reason = format!(
                        "its snapshot at index {} (term {}) keeps the log, whose entry there has term {held:?} (log ends at {})",
                        snapshot.index,
                        snapshot.term,
                        self.last_index()
                    );
                    return Err(self.invalid(id, reason));
                }
            }
            Some(_) => {}
            None if write.discard_log => {
                return Err(self.invalid(id, "it discards the log without a snapshot".into()));
            }
            None => {}
        }
        let (base, base_term) = match &write.snapshot {
            Some(snapshot) => (snapshot.index, snapshot.term),
            None => (self.snapshot_index, self.snapshot_term),
        };
        let last = if write.discard_log {
            base
        } else {
            self.last_index()
        };
        let mut records = std::mem::take(&mut self.buffers.records);
        records.clear();
        let mut lens = Vec::with_capacity(write.entries.len());
        if let Some(first) = write.entries.first() {
            if first.index <= base {
                let reason = format!(
                    "it starts at index {} but the snapshot holds everything up to {base}",
                    first.index
                );
                return Err(self.invalid(id, reason));
            }
            if first.index > last.saturating_add(1) {
                let reason = format!(
                    "it starts at index {} but the log ends at {last}",
                    first.index
                );
                return Err(self.invalid(id, reason));
            }
            let before = first.index - 1;
            let mut previous_term = if before == base {
                base_term
            } else {
                self.term_at(before).unwrap_or(0)
            };
            let mut expected = Some(first.index);
            for entry in &write.entries {
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
                let len = encode_entry(entry, &mut records)
                    .map_err(|e| self.invalid(id, format!("entry {}: {e}", entry.index)))?;
                lens.push(len);
                expected = entry.index.checked_add(1);
                previous_term = entry.term;
            }
        }

        if let Some(snapshot) = &write.snapshot {
            self.snapshot_index = snapshot.index;
            self.snapshot_term = snapshot.term;
            // A newer snapshot in the same batch stands for this one: only the newest is written.
            self.staged_snapshot = Some(snapshot.clone());
        }
        if write.discard_log {
            self.discard_log(base);
        }
        if let Some(first) = write.entries.first() {
            self.truncate_from(first.index);
            self.append(&write.entries, &records, &lens);
        }
        self.buffers.keep_records(records);
        if let Some(hard_state) = write.hard_state {
            self.stage_state(hard_state);
        }
        Ok(())
    }

    /// Drops the whole log for a snapshot at `base` that it does not continue.
    fn discard_log(&mut self, base: Index) {
        for segment in std::mem::take(&mut self.segments) {
            self.doom(segment);
        }
        self.discard_staged = true;
        self.durable_floor = self.durable_floor.min(base);
    }

    /// Keeps the entries below `index`. Staged bytes are simply dropped; segments on disk are
    /// deleted or cut by the next sync.
    fn truncate_from(&mut self, index: Index) {
        let mut cut_any = false;
        // Whole segments from `index` on; an empty one that starts there is where the
        // appended entries go, so it stays.
        while self
            .segments
            .last()
            .is_some_and(|s| s.first > index || (s.first == index && s.count() > 0))
        {
            cut_any = true;
            if let Some(segment) = self.segments.pop() {
                self.doom(segment);
            }
        }
        if let Some(segment) = self
            .segments
            .last_mut()
            .filter(|segment| segment.last() >= index)
        {
            cut_any = true;
            let keep = usize::try_from(index - segment.first).unwrap_or(usize::MAX);
            let at = segment.starts.get(keep).copied().unwrap_or(segment.end());
            segment.starts.truncate(keep);
            segment.terms.truncate(keep);
            if at >= segment.written {
                let staged = usize::try_from(at - segment.written).unwrap_or(usize::MAX);
                segment.pending.truncate(staged);
            } else {
                segment.pending.clear();
                segment.written = at;
                segment.cut = true;
            }
        }
        if cut_any {
            self.durable_floor = self.durable_floor.min(index.saturating_sub(1));
        }
    }

    /// A segment leaves the log: the next sync deletes its file, if it has one yet.
    fn doom(&mut self, segment: Segment) {
        if segment.file.is_some() {
            self.doomed.push(segment);
        }
    }

    /// Appends encoded records (checked by `stage`), starting a new segment whenever the
    /// last one has passed `segment_bytes_max`.
    fn append(&mut self, entries: &[Entry], records: &[u8], lens: &[usize]) {
        let mut at = 0;
        for (entry, &len) in entries.iter().zip(lens) {
            let record = records.get(at..at + len).unwrap_or_default();
            at += len;
            // An empty segment that does not start here (left by a recovery cut, then
            // passed by a snapshot) would leave a hole in the names: it goes.
            if self
                .segments
                .last()
                .is_some_and(|s| s.count() == 0 && s.first != entry.index)
                && let Some(segment) = self.segments.pop()
            {
                self.doom(segment);
            }
            let roll = match self.segments.last() {
                None => true,
                Some(segment) => {
                    segment.next_index() != entry.index
                        || (segment.count() > 0 && segment.end() >= self.segment_bytes_max)
                }
            };
            if roll {
                self.segments.push(Segment::staged(&self.dir, entry.index));
            }
            if let Some(segment) = self.segments.last_mut() {
                segment.starts.push(segment.end());
                segment.terms.push(entry.term);
                if segment.pending.capacity() == 0 {
                    segment.pending = std::mem::take(&mut self.buffers.pending);
                }
                segment.pending.extend_from_slice(record);
            }
        }
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
        // Lowered before anything that could leave the recovered log shorter than the record
        // says (a truncation, or a discard), or recovery would call a legitimate cut damage.
        // Rare: only writes that cut need it. For a discard, only once its snapshot is
        // durable: until then a crash keeps the old log, whose synced entries the record must
        // still protect (a bit flip in one would otherwise pass for a torn tail); recovery
        // ignores the record beside a snapshot that replaced the log it describes.
        let discard = std::mem::take(&mut self.discard_staged);
        if !discard {
            self.lower_synced_record()?;
        }
        if let Some(snapshot) = self.staged_snapshot.take() {
            self.write_snapshot(&snapshot)?;
            self.durable_floor = self.durable_floor.max(snapshot.index);
            self.remove_older_snapshots(snapshot.index)?;
        }
        if discard {
            self.lower_synced_record()?;
            self.delete_doomed()?;
        }
        if self.state_dirty {
            self.write_state_slot()?;
            self.step("wrote the state slot")?;
        }
        self.delete_doomed()?;
        self.write_segments()?;
        self.compact()?;
        self.durable_floor = self.last_index();
        Ok(())
    }

    fn lower_synced_record(&mut self) -> Result<(), StorageError> {
        if self
            .synced_record
            .index
            .is_none_or(|index| index > self.durable_floor)
        {
            self.write_synced(self.durable_floor)?;
            self.step("lowered the synced record")?;
        }
        Ok(())
    }

    /// The snapshot file: written whole under a temporary name, synced, renamed into place and
    /// the directory synced, so the name only ever holds a whole, durable snapshot. The
    /// snapshot thread usually wrote it already ([`write_snapshot_file`]), durably, before the
    /// core ever saw the snapshot: then only its header is compared.
    fn write_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let path = self.dir.join(snapshot_name(snapshot.index));
        if snapshot_file_holds(&path, snapshot) {
            return self.step("found the snapshot written");
        }
        write_snapshot_file(&self.dir, snapshot)?;
        self.fsyncs += 2;
        self.dir_dirty = false;
        self.step("wrote the snapshot")
    }

    /// Older snapshots are never read again once a newer one is durable. Their removal need
    /// not be durable at once (recovery takes the newest), so the next directory sync of this
    /// sync covers it.
    fn remove_older_snapshots(&mut self, index: Index) -> Result<(), StorageError> {
        for (older, path) in list_dir(&self.dir)?.snapshots {
            if older < index {
                self.remove_unneeded(path)?;
                self.step("removed an older snapshot")?;
            }
        }
        Ok(())
    }

    /// Sends the file at `path`, which recovery would skip and remove (a segment the newest
    /// durable snapshot holds entirely, or an older snapshot), to be removed beside the sync
    /// path if the store has a remover: unlinking a 64 MiB segment took 25-120 ms, and every
    /// group's acknowledgements waited for it. Otherwise, or if the remover is gone, removes
    /// it here.
    fn remove_unneeded(&mut self, path: PathBuf) -> Result<(), StorageError> {
        let path = match &self.remover {
            Some(remover) => match remover.send(path) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(path)) => path,
            },
            None => path,
        };
        remove_file(&path)?;
        self.dir_dirty = true;
        Ok(())
    }

    /// Has files the log no longer needs removed by the receiver of `remover` rather than
    /// in [`GroupStore::sync`] (see [`super::thread::StorageThread`]).
    pub fn remove_unneeded_with(&mut self, remover: Sender<PathBuf>) {
        self.remover = Some(remover);
    }

    /// Deletes the doomed segments newest first, syncing the directory after each, so that a
    /// crash at any point leaves a prefix of the log (never a hole).
    fn delete_doomed(&mut self) -> Result<(), StorageError> {
        let mut doomed = std::mem::take(&mut self.doomed);
        doomed.sort_by_key(|s| std::cmp::Reverse(s.first));
        for segment in doomed {
            drop(segment.file);
            remove_file(&segment.path)?;
            self.sync_dir()?;
            self.step("removed a segment")?;
        }
        Ok(())
    }

    /// Cuts and appends, one segment after the other: each is synced before the next one is
    /// created, so only the last segment can ever hold a torn write.
    fn write_segments(&mut self) -> Result<(), StorageError> {
        for i in 0..self.segments.len() {
            let Some(segment) = self.segments.get_mut(i) else {
                break;
            };
            if segment.cut {
                // Synced on its own before new bytes go in: otherwise a crash could keep the old
                // length with new records written over part of it, and a stale record behind a
                // torn new one would make recovery see corruption. Truncations are rare (a new
                // leader overwriting uncommitted entries), so the extra sync is too.
                let file = open_segment(segment)?;
                file.set_len(segment.written)
                    .map_err(|e| io_error(&segment.path, "truncate", e))?;
                file.sync_data()
                    .map_err(|e| io_error(&segment.path, "fdatasync", e))?;
                segment.cut = false;
                self.fsyncs += 1;
                self.step("cut a segment")?;
            }
            let Some(segment) = self.segments.get_mut(i) else {
                break;
            };
            if segment.pending.is_empty() {
                continue;
            }
            let created = segment.file.is_none();
            if created {
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&segment.path)
                    .map_err(|e| io_error(&segment.path, "create", e))?;
                segment.file = Some(file);
            }
            let file = open_segment(segment)?;
            file.write_all_at(&segment.pending, segment.written)
                .map_err(|e| io_error(&segment.path, "write", e))?;
            file.sync_data()
                .map_err(|e| io_error(&segment.path, "fdatasync", e))?;
            segment.written += segment.pending.len() as u64;
            self.buffers
                .keep_pending(std::mem::take(&mut segment.pending));
            self.fsyncs += 1;
            if created {
                // The records are durable only once the new name is.
                self.sync_dir()?;
            }
            self.step("appended to a segment")?;
        }
        Ok(())
    }

    /// Deletes, oldest first, the segments whose every entry the snapshot holds; never the one
    /// holding `snapshot_index + 1`. Recovery skips such leftovers, so a crash part way is
    /// harmless, and one directory sync at the end suffices.
    fn compact(&mut self) -> Result<(), StorageError> {
        let index = self.snapshot_index;
        let covered = self
            .segments
            .iter()
            .take_while(|s| s.first <= index && s.last() <= index)
            .count();
        for segment in self.segments.drain(..covered).collect::<Vec<_>>() {
            drop(segment.file);
            self.remove_unneeded(segment.path)?;
            self.step("removed a compacted segment")?;
        }
        if self.dir_dirty {
            self.sync_dir()?;
        }
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

    pub(super) fn write_synced(&mut self, index: Index) -> Result<(), StorageError> {
        self.synced_record =
            files::write_synced(&self.synced, &self.synced_path, &self.synced_record, index)?;
        self.fsyncs += 1;
        Ok(())
    }

    pub(super) fn sync_dir(&mut self) -> Result<(), StorageError> {
        sync_dir(&self.dir)?;
        self.fsyncs += 1;
        self.dir_dirty = false;
        Ok(())
    }

    /// A point where a crash may stop a sync: tests use it to leave the files as they are
    /// there and recover from them.
    #[cfg(not(test))]
    #[inline]
    pub(super) fn step(&mut self, _what: &'static str) -> Result<(), StorageError> {
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn step(&mut self, what: &'static str) -> Result<(), StorageError> {
        self.steps += 1;
        if self.crash_after_steps == Some(self.steps) {
            return Err(StorageError::Io {
                path: self.dir.clone(),
                op: "crash (test)",
                source: io::Error::other(what),
            });
        }
        Ok(())
    }
}

fn open_segment(segment: &Segment) -> Result<&File, StorageError> {
    segment.file.as_ref().ok_or_else(|| StorageError::Io {
        path: segment.path.clone(),
        op: "write",
        source: io::Error::other("the segment file is not open"),
    })
}

/// Writes `snapshot` into the group directory `dir` as its snapshot file, durably: a temporary
/// file, fsync, rename, fsync of the directory. Safe beside the storage thread: nothing else
/// writes a snapshot of the same index with other bytes (a snapshot is a pure function of the
/// committed log up to its index), and recovery takes the newest whole snapshot file, which is
/// always committed state.
pub(crate) fn write_snapshot_file(dir: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    let temp = dir.join(snapshot_temp_name(snapshot.index));
    let path = dir.join(snapshot_name(snapshot.index));
    let write = || -> io::Result<()> {
        let mut file = File::create(&temp)?;
        file.write_all(&encode_snapshot_header(snapshot))?;
        file.write_all(&encode_snapshot_membership(snapshot))?;
        file.write_all(&snapshot.data)?;
        file.sync_all()
    };
    write().map_err(|e| io_error(&temp, "write", e))?;
    fs::rename(&temp, &path).map_err(|e| io_error(&path, "rename", e))?;
    sync_dir(dir)
}

/// Whether the file at `path` is `snapshot`'s file: its size, and its header (which holds the
/// index, the term, the length and a checksum of the data) equal what `snapshot` encodes to.
fn snapshot_file_holds(path: &Path, snapshot: &Snapshot) -> bool {
    let header = encode_snapshot_header(snapshot);
    let membership_len = encode_snapshot_membership(snapshot).len();
    let expected_len = (header.len() + membership_len + snapshot.data.len()) as u64;
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let mut stored = [0u8; SNAPSHOT_HEADER_BYTES];
    file.metadata().is_ok_and(|m| m.len() == expected_len)
        && io::Read::read_exact(&mut file, &mut stored).is_ok()
        && stored == header
}
