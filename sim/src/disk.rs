//! A simulated disk for one replica: real bytes in the core's on-disk format, and a model of
//! what a correct recovery must return from them.
//!
//! The files are the ones the shell keeps (`shell/src/storage/group_store.rs`): a log of
//! records from [`encode_entry`] (one segment, named for its first record), a hard-state file
//! of two slots from [`encode_state_slot`], written alternately, a synced record (the index
//! through which the log was synced, lowered before a write cuts below it) and a snapshot file
//! from [`encode_snapshot`], named for its index. A restart hands them to the core's
//! [`plan_recovery`], the decision the shell's `GroupStore::open_repairing` carries out on its
//! directory, and carries out the plan on these files: a torn tail is cut; a bad record inside
//! the synced record's reach, a bad record followed by a valid one, fewer entries than the
//! recorded commit, a log that does not reach its snapshot or a snapshot that fails its
//! checksum is damage. Like the shell's repairing open, the simulator brings the replica back
//! damaged ([`Damage`]) and keeps a marker (a fourth file) until the replica reports itself
//! repaired.
//!
//! A write is performed in the order [`Write`] prescribes. Its snapshot is written whole to a
//! temporary file, synced and renamed over the old one, so a crash before the rename leaves
//! the previous snapshot. Log records at or below the snapshot's index are deleted lazily, as
//! whole segments would be: some at a later sync, the rest on restart, oldest first, never the
//! record after the snapshot. A `discard_log` write drops the whole log newest first, so a crash
//! half way leaves a prefix of the replaced log (which recovery then ignores).
//!
//! Beside the files, the disk keeps the model: the hard state, snapshot and entries every write
//! so far made durable (whole writes only; a torn one counts for what of it fully landed),
//! which is what the checkers compare the replica and its recovery against, and the hard
//! states written but never confirmed durable (see [`Disk::recover`] for what recovery may
//! return of those).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use holdfast_core::raft::{
    Canary, Damage, Entry, HardState, Index, NodeId, Recovered, Snapshot, Term, Write, WriteId,
};
use holdfast_core::storage::{
    HEADER_BYTES, RecoveryInput, RecoveryPlan, SLOT_BYTES, STATE_BYTES, SegmentFile, SnapshotFile,
    StateLost, encode_entry, encode_snapshot, encode_state_slot, next_slot, plan_recovery,
};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::checker::{LogView, Violation, violation};

pub struct Disk {
    // ----- the files -----
    /// The log file as written (synced or not).
    log_bytes: Vec<u8>,
    /// The index of the log file's first record. File metadata, as the shell's segment names
    /// carry their first index: after lazy deletion or a discard the log starts above 1.
    log_first: Index,
    /// Where the record of index `log_first + i` starts, as the writer laid the records out.
    offsets: Vec<u64>,
    /// The leading bytes of the log known to be synced.
    synced_len: u64,
    /// Records (from `log_first`) wholly inside the synced bytes: with the snapshot, what a
    /// state slot may claim committed.
    synced_records: usize,
    /// The shell's synced record (`synced` file): every entry up to this index was synced,
    /// so recovery calls a bad record at or below it damage. Raised after each sync (the
    /// shell raises it when idle, so it may lag: this is the best case), and lowered before a
    /// write cuts the log below it, as the shell's `sync_files` does, or recovery would call
    /// a legitimate cut damage.
    synced_record: Index,
    state_bytes: Box<[u8; STATE_BYTES]>,
    /// The sequence of the newest slot written whole: the durable hard state's.
    state_sequence: u64,
    /// The snapshot file: the latest snapshot renamed into place, if any, with the index its
    /// name carries (as the shell names `snapshot-<index>.snap`).
    snapshot_file: Option<(Index, Vec<u8>)>,
    /// The damage marker: set by a recovery that found damage, cleared once the replica
    /// reports itself repaired. Survives restarts, so a replica cannot forget its damage by
    /// crashing before the repair.
    pub damage: Option<Damage>,
    /// A corruption fault changed bytes that no recovery has read yet.
    pub hit: bool,

    // ----- the model -----
    /// Everything synced: what a restart must recover (the commit as the state file holds it).
    pub hard_state: HardState,
    /// The durable snapshot.
    pub snapshot: Option<Snapshot>,
    /// The durable entries after the snapshot, contiguous from its index + 1.
    pub log: Vec<Entry>,
    /// Writes handed over by the replica and not yet synced, oldest first.
    pub unsynced: VecDeque<Write>,
    /// A sync is under way and will report when it completes.
    pub syncing: bool,
    /// Every `(index, term)` that was ever durable (as an entry or a snapshot's last entry),
    /// for checking acknowledgements that were true when made and later overwritten.
    ever: BTreeSet<(Index, Term)>,
    /// Every `(term, vote)` that was ever durable, likewise for votes.
    votes_ever: BTreeSet<(Term, NodeId)>,
    /// Hard states whose slot was written after the durable one but never confirmed durable
    /// (a torn slot write), by sequence, as the slot holds them (commit clamped). The bytes a
    /// torn write missed may already hold the values it would have written (the slot's
    /// checksum ends it), so the slot can read back whole: see [`Disk::recover`].
    unconfirmed: BTreeMap<u64, HardState>,
    /// A torn write that replaces the log's tail lowered the synced record to this index and
    /// the crash came before it cut anything: the old entries above it are being replaced and
    /// no longer protected, so recovery may keep them, or drop them from any one on (a latent
    /// bit flip in one reads as a torn tail then). Safe: the replica took the write from a
    /// leader whose log differs there, so none of them is committed.
    cut_begun: Option<Index>,
}

impl Default for Disk {
    fn default() -> Disk {
        Disk {
            log_bytes: Vec::new(),
            log_first: 1,
            offsets: Vec::new(),
            synced_len: 0,
            synced_records: 0,
            synced_record: 0,
            state_bytes: Box::new([0; STATE_BYTES]),
            state_sequence: 0,
            snapshot_file: None,
            damage: None,
            hit: false,
            hard_state: HardState::default(),
            snapshot: None,
            log: Vec::new(),
            unsynced: VecDeque::new(),
            syncing: false,
            ever: BTreeSet::new(),
            votes_ever: BTreeSet::new(),
            unconfirmed: BTreeMap::new(),
            cut_begun: None,
        }
    }
}

/// What a restart read back from the files.
pub struct Recovery {
    pub recovered: Recovered,
    /// The damage to start the replica with, if any.
    pub damage: Option<Damage>,
    /// The commit index the state file holds (the log may hold less).
    pub commit: Index,
    /// The last index recovered: the snapshot's, or the last entry's after it.
    pub last_index: Index,
    /// Where recovery returned something a correct recovery would not (the "recovery"
    /// checker); reported after the byte comparison of committed records.
    pub problem: Option<String>,
}

/// Faults that change synced bytes of the log (or of the snapshot file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// One bit of the synced region flips, in the log or in the snapshot file.
    BitFlip,
    /// A record's bytes land at a wrong offset inside the synced region.
    Misdirect,
}

impl Disk {
    pub fn snapshot_index(&self) -> Index {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }

    pub fn last_index(&self) -> Index {
        self.snapshot_index() + self.log.len() as Index
    }

    /// The durable term at `index`: 0 before the log, the snapshot's term at its index, `None`
    /// below the snapshot (compacted) and past the end.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        let snapshot = self.snapshot_index();
        if index == snapshot {
            return self.snapshot.as_ref().map(|s| s.term);
        }
        let at = index.checked_sub(snapshot + 1)?;
        self.log.get(usize::try_from(at).ok()?).map(|e| e.term)
    }

    /// Whether an entry at `index` of a term no newer than `term` was ever durable here.
    pub fn ever_held(&self, index: Index, term: Term) -> bool {
        self.ever.range((index, 0)..=(index, term)).next().is_some()
    }

    /// Whether a vote for `candidate` in `term` was ever durable here.
    pub fn ever_voted(&self, term: Term, candidate: NodeId) -> bool {
        self.votes_ever.contains(&(term, candidate))
    }

    /// Damaged and not repaired, or hit by a fault no recovery has seen: counts against the
    /// minority of a group that corruption may touch at once.
    pub fn is_damaged(&self) -> bool {
        self.hit || self.damage.is_some()
    }

    pub fn view(&self, index: Index) -> LogView {
        let last_index = self.last_index();
        LogView {
            last_index,
            last_term: self.term_at(last_index).unwrap_or(0),
            term_at_index: self.term_at(index),
            damaged: self.damage.is_some(),
            snapshot_index: self.snapshot_index(),
        }
    }

    /// The bytes of the record of `index` in the log file, as laid out by the writer.
    pub fn record_bytes(&self, index: Index) -> Option<&[u8]> {
        let i = usize::try_from(index.checked_sub(self.log_first)?).ok()?;
        let start = usize::try_from(*self.offsets.get(i)?).ok()?;
        let end = match self.offsets.get(i + 1) {
            Some(end) => usize::try_from(*end).ok()?,
            None => self.log_bytes.len(),
        };
        self.log_bytes.get(start..end)
    }

    /// The position among the unsynced writes up to `upto` of the first that carries a
    /// snapshot, and whether it replaces the log: where a crash does the most harm.
    pub fn snapshot_write(&self, upto: WriteId) -> Option<(usize, bool)> {
        self.unsynced
            .iter()
            .take_while(|w| w.id <= upto)
            .position(|w| w.snapshot.is_some())
            .map(|at| (at, self.unsynced[at].discard_log))
    }

    /// Makes every unsynced write up to `upto` durable, in order, and returns the write id to
    /// report to the replica as synced; then deletes some records the snapshot replaced, as
    /// a background cleanup would. Fails when a write is impossible: a hole in the log, or a
    /// snapshot that the log it keeps does not continue.
    pub fn sync(
        &mut self,
        upto: WriteId,
        rng: &mut ChaCha8Rng,
        canary: Option<Canary>,
    ) -> Result<WriteId, Violation> {
        // The planted bug: the report covers writes handed over after this sync began.
        let report = match self.unsynced.back() {
            Some(last) if Canary::AckBeforeFsync.planted(canary) => last.id.max(upto),
            _ => upto,
        };
        while self.unsynced.front().is_some_and(|w| w.id <= upto) {
            if let Some(write) = self.unsynced.pop_front() {
                self.apply(write, canary)?;
            }
        }
        self.synced_len = self.log_bytes.len() as u64;
        self.synced_records = self.offsets.len();
        self.synced_record = self.last_index();
        // Half the time every replaced record goes, else some of the oldest: recovery sees
        // logs that hold the snapshot's entry, and logs that start right after it.
        let replaced = self.replaced_records();
        if replaced > 0 {
            let drop = if rng.random_bool(0.5) {
                replaced
            } else {
                rng.random_range(0..=replaced)
            };
            self.drop_oldest(drop);
        }
        Ok(report)
    }

    /// A crash: unsynced writes are lost. With `survivors = Some(k)` the first `k` of them
    /// reached the platter anyway (the OS flushed them) and the one after is torn: part of
    /// it lands in the order a write is performed (its snapshot, the discard of the old log,
    /// a prefix of its state slot or, after the whole slot, a prefix of its log records).
    /// Recovery must cut or ignore the torn part.
    pub fn crash(
        &mut self,
        survivors: Option<usize>,
        rng: &mut ChaCha8Rng,
        canary: Option<Canary>,
    ) -> Result<(), Violation> {
        let mut unsynced = std::mem::take(&mut self.unsynced);
        self.syncing = false;
        let Some(survivors) = survivors else {
            return Ok(());
        };
        for write in unsynced.drain(..survivors.min(unsynced.len())) {
            self.apply(write, canary)?;
        }
        if let Some(torn) = unsynced.pop_front() {
            self.tear(torn, rng, canary)?;
        }
        Ok(())
    }

    fn apply(&mut self, write: Write, canary: Option<Canary>) -> Result<(), Violation> {
        self.lower_synced_record(&write);
        if let Some(snapshot) = &write.snapshot {
            self.store_snapshot(write.id, snapshot, write.discard_log)?;
        }
        // (`DiscardBeforeSnapshot` swaps these two steps, which only shows when a crash comes
        // between them: see `tear`.)
        if write.discard_log {
            self.keep_records(0);
            self.log.clear();
        }
        if let Some(hard_state) = write.hard_state {
            self.write_state(hard_state, cut_floor(&write), canary);
        }
        if let Some(first) = write.entries.first() {
            self.cut(write.id, first.index)?;
            for entry in write.entries {
                self.append_record(&entry)?;
                self.ever.insert((entry.index, entry.term));
                self.log.push(entry);
            }
        }
        Ok(())
    }

    /// Lands part of `write`, in the order of [`Write`]: nothing or its whole snapshot; then a
    /// prefix of the old log (the discard stopped half way), or all of the discard and then a
    /// prefix of its state slot, or its whole slot and a prefix of its records' bytes.
    fn tear(
        &mut self,
        write: Write,
        rng: &mut ChaCha8Rng,
        canary: Option<Canary>,
    ) -> Result<(), Violation> {
        if !write.discard_log {
            self.lower_synced_record(&write);
            // Only a genuine conflict: the new entry at the cut has another term than the old
            // one, so by log matching no old entry from there on is in the writing leader's
            // log, and none is committed. (A write that rewrote entries it already holds would
            // get no such allowance.)
            if let Some(first) = write.entries.first()
                && self.term_at(first.index).is_some_and(|t| t != first.term)
            {
                self.cut_begun = Some(cut_floor(&write));
            }
        }
        if write.discard_log && Canary::DiscardBeforeSnapshot.planted(canary) {
            // The planted bug: the old log goes first, so the crash can come before the
            // snapshot that replaces it is durable. The model keeps what a correct disk
            // would still hold: the old log.
            self.lower_synced_record(&write);
            let keep = rng.random_range(0..=self.offsets.len());
            self.keep_records(keep);
            if keep > 0 || rng.random_bool(0.5) {
                return Ok(());
            }
        }
        if let Some(snapshot) = &write.snapshot {
            if rng.random_bool(0.5) {
                // The crash came before the rename: the temporary file is ignored.
                return Ok(());
            }
            self.store_snapshot(write.id, snapshot, write.discard_log)?;
        }
        if write.discard_log {
            self.log.clear();
            if rng.random_bool(0.5) {
                // The crash came before the synced record was lowered: the old log is whole,
                // and the record may still name its end.
                return Ok(());
            }
            self.lower_synced_record(&write);
            let keep = rng.random_range(0..=self.offsets.len());
            self.keep_records(keep);
            if keep > 0 {
                return Ok(());
            }
        }
        let floor = cut_floor(&write);
        if let Some(hard_state) = write.hard_state
            && (write.entries.is_empty() || rng.random_bool(0.5))
        {
            let landed = rng.random_range(1..SLOT_BYTES);
            self.tear_slot(&hard_state, floor, landed, canary);
            return Ok(());
        }
        if let Some(hard_state) = write.hard_state {
            self.write_state(hard_state, floor, canary);
        }
        let Some(first) = write.entries.first() else {
            return Ok(());
        };
        self.cut(write.id, first.index)?;
        self.cut_begun = None;
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(write.entries.len());
        for entry in &write.entries {
            encode_entry(entry, &mut bytes)
                .map_err(|e| violation("durable-index", e.to_string()))?;
            ends.push(bytes.len());
        }
        let landed = rng.random_range(0..bytes.len());
        if self.offsets.is_empty() {
            self.log_first = first.index;
        }
        let base = self.log_bytes.len() as u64;
        let mut start = 0;
        for (entry, end) in write.entries.into_iter().zip(ends) {
            if end > landed {
                break;
            }
            self.offsets.push(base + start as u64);
            self.ever.insert((entry.index, entry.term));
            self.log.push(entry);
            start = end;
        }
        self.log_bytes.extend_from_slice(&bytes[..landed]);
        Ok(())
    }

    /// Before a write that cuts the log touches anything, the synced record goes down to what
    /// the write keeps; for a discard, once its snapshot is durable (as the shell's
    /// `sync_files`: until then the old log's synced entries stay protected).
    fn lower_synced_record(&mut self, write: &Write) {
        let mut floor = cut_floor(write);
        if write.discard_log
            && let Some(snapshot) = &write.snapshot
        {
            floor = floor.min(snapshot.index);
        }
        self.synced_record = self.synced_record.min(floor);
    }

    /// The first `landed` bytes of the next slot reach the file, and the slot is never synced.
    /// When the bytes it missed already hold what it would have written (its checksum's last
    /// byte, 1 time in 256 for `landed = SLOT_BYTES - 1`), the slot reads back whole.
    fn tear_slot(
        &mut self,
        hard_state: &HardState,
        floor: Index,
        landed: usize,
        canary: Option<Canary>,
    ) {
        let (at, sequence, written, slot) = self.state_slot(hard_state, floor, canary);
        let landed = landed.min(SLOT_BYTES);
        self.state_bytes[at..at + landed].copy_from_slice(&slot[..landed]);
        self.unconfirmed.insert(sequence, written);
    }

    /// The snapshot of write `id` is renamed into place. Unless the write replaces the log,
    /// the log it keeps must continue the snapshot: hold the snapshot's own entry.
    fn store_snapshot(
        &mut self,
        id: WriteId,
        snapshot: &Snapshot,
        discard_log: bool,
    ) -> Result<(), Violation> {
        let held = self.term_at(snapshot.index);
        if !discard_log && held != Some(snapshot.term) {
            return Err(violation(
                "snapshot-agreement",
                format!(
                    "write #{id} stores a snapshot at {}@{} and keeps the log, whose entry there \
                     has term {held:?} (log {}..={}, snapshot at {})",
                    snapshot.index,
                    snapshot.term,
                    self.snapshot_index() + 1,
                    self.last_index(),
                    self.snapshot_index()
                ),
            ));
        }
        let replaced = snapshot.index.saturating_sub(self.snapshot_index());
        let replaced = usize::try_from(replaced).unwrap_or(usize::MAX);
        self.log.drain(..replaced.min(self.log.len()));
        self.snapshot_file = Some((snapshot.index, encode_snapshot(snapshot)));
        self.ever.insert((snapshot.index, snapshot.term));
        self.snapshot = Some(snapshot.clone());
        Ok(())
    }

    /// Records of the log file at or below the snapshot's index: deletable.
    fn replaced_records(&self) -> usize {
        let replaced = (self.snapshot_index() + 1).saturating_sub(self.log_first);
        usize::try_from(replaced)
            .unwrap_or(usize::MAX)
            .min(self.offsets.len())
    }

    /// Deletes the oldest `count` records of the log file.
    fn drop_oldest(&mut self, count: usize) {
        if count == 0 {
            return;
        }
        let cut = match self.offsets.get(count) {
            Some(&at) => at,
            None => self.log_bytes.len() as u64,
        };
        self.log_bytes.drain(..cut as usize);
        self.offsets.drain(..count.min(self.offsets.len()));
        for offset in &mut self.offsets {
            *offset -= cut;
        }
        self.log_first += count as Index;
        self.synced_len = self.synced_len.saturating_sub(cut);
        self.synced_records = self.synced_records.saturating_sub(count);
    }

    /// Keeps the first `count` records of the log file, dropping the rest (the file only).
    fn keep_records(&mut self, count: usize) {
        if let Some(&at) = self.offsets.get(count) {
            self.offsets.truncate(count);
            self.log_bytes.truncate(at as usize);
            self.synced_len = self.synced_len.min(at);
            self.synced_records = self.synced_records.min(count);
        }
        if self.offsets.is_empty() {
            self.log_bytes.clear();
            self.synced_len = 0;
        }
    }

    /// Drops every record from `index` on, in the file and in the model.
    fn cut(&mut self, id: WriteId, index: Index) -> Result<(), Violation> {
        let keep = index.saturating_sub(1);
        if keep > self.last_index() || keep < self.snapshot_index() {
            return Err(violation(
                "durable-index",
                format!(
                    "write {id} starts at index {index} but the disk holds a snapshot at {} and \
                     entries up to {}",
                    self.snapshot_index(),
                    self.last_index()
                ),
            ));
        }
        self.log.truncate((keep - self.snapshot_index()) as usize);
        let records = (keep + 1).saturating_sub(self.log_first);
        self.keep_records(usize::try_from(records).unwrap_or(usize::MAX));
        Ok(())
    }

    fn append_record(&mut self, entry: &Entry) -> Result<(), Violation> {
        if self.offsets.is_empty() {
            // A new first segment, named after its first record.
            self.log_bytes.clear();
            self.log_first = entry.index;
        }
        self.offsets.push(self.log_bytes.len() as u64);
        encode_entry(entry, &mut self.log_bytes)
            .map(|_| ())
            .map_err(|e| violation("durable-index", e.to_string()))
    }

    /// The last index a state slot may claim committed: synced records that the write does
    /// not cut (below `floor`), or the snapshot.
    fn durable_floor(&self, floor: Index) -> Index {
        let records = self.log_first - 1 + self.synced_records as Index;
        records.min(floor).max(self.snapshot_index())
    }

    /// Where the next slot goes, its sequence, the state it holds and its bytes. The commit
    /// is clamped to what is synced and
    /// not cut by the same write (below `floor`), as the shell's `durable_floor` does: the slot
    /// is synced before the log bytes of the same write, so a crash between the two must not
    /// leave a commit that the log cannot back, nor one that names entries being replaced.
    fn state_slot(
        &self,
        hard_state: &HardState,
        floor: Index,
        canary: Option<Canary>,
    ) -> (usize, u64, HardState, [u8; SLOT_BYTES]) {
        let mut hard_state = *hard_state;
        hard_state.commit = hard_state.commit.min(self.durable_floor(floor));
        if Canary::StateFileSingleSlot.planted(canary) {
            // The planted bug: always slot 0, written in place (even sequences live there).
            let sequence = (self.state_sequence + 2) & !1;
            return (
                0,
                sequence,
                hard_state,
                encode_state_slot(sequence, &hard_state),
            );
        }
        let sequence = self.state_sequence + 1;
        let at = next_slot(self.state_sequence) * SLOT_BYTES;
        (
            at,
            sequence,
            hard_state,
            encode_state_slot(sequence, &hard_state),
        )
    }

    fn write_state(&mut self, hard_state: HardState, floor: Index, canary: Option<Canary>) {
        let (at, sequence, written, slot) = self.state_slot(&hard_state, floor, canary);
        self.state_bytes[at..at + SLOT_BYTES].copy_from_slice(&slot);
        self.state_sequence = sequence;
        if let Some(vote) = written.vote {
            self.votes_ever.insert((written.term, vote));
        }
        self.hard_state = written;
    }

    // ----- faults -----

    /// Damages the synced part of the log, or the snapshot file; returns whether any byte
    /// changed.
    pub fn corrupt(&mut self, corruption: Corruption, rng: &mut ChaCha8Rng) -> bool {
        let synced = self.synced_len.min(self.log_bytes.len() as u64) as usize;
        if corruption == Corruption::BitFlip
            && let Some((_, file)) = self.snapshot_file.as_mut()
            && (synced == 0 || rng.random_bool(0.25))
        {
            let at = rng.random_range(0..file.len());
            file[at] ^= 1 << rng.random_range(0..8);
            self.hit = true;
            return true;
        }
        if synced == 0 {
            return false;
        }
        let changed = match corruption {
            Corruption::BitFlip => {
                let at = rng.random_range(0..synced);
                self.log_bytes[at] ^= 1 << rng.random_range(0..8);
                true
            }
            Corruption::Misdirect => {
                // A synced record's bytes written again, at a wrong offset in the synced part.
                let records = self
                    .offsets
                    .iter()
                    .take_while(|o| (**o as usize) < synced)
                    .count();
                let index = self.log_first + rng.random_range(0..records) as Index;
                let Some(record) = self.record_bytes(index).map(<[u8]>::to_vec) else {
                    return false;
                };
                let at = rng
                    .random_range(0..synced)
                    .min(self.log_bytes.len().saturating_sub(record.len()));
                let target = &mut self.log_bytes[at..at + record.len()];
                let changed = target != record.as_slice();
                target.copy_from_slice(&record);
                changed
            }
        };
        self.hit |= changed;
        changed
    }

    /// Every file gone, on a node that is down. The driver knows (in production: an operator
    /// who replaced the disk), so the marker says so: the replica comes back as a damaged
    /// replica that lost its votes, and never votes again.
    pub fn wipe(&mut self) {
        let ever = std::mem::take(&mut self.ever);
        let votes_ever = std::mem::take(&mut self.votes_ever);
        *self = Disk {
            damage: Some(Damage {
                from: 1,
                votes_lost: true,
            }),
            ever,
            votes_ever,
            ..Disk::default()
        };
    }

    // ----- recovery -----

    /// Reads the files back as a restarting node does, cuts a torn tail, removes what the
    /// snapshot replaced, marks damage, and checks the result against the model. The model
    /// becomes what was recovered.
    pub fn recover(&mut self, canary: Option<Canary>) -> Recovery {
        debug_assert!(self.unsynced.is_empty(), "recovery with writes in flight");
        let mut problems = Vec::new();
        if Canary::TrustBadChecksum.planted(canary) {
            trust_checksums(&mut self.log_bytes);
        }
        // The files as the shell's directory would hold them: the state file, the synced
        // record, the snapshot file, and the log in segments of `RECORDS_PER_SEGMENT` records
        // (the last one also holds any torn bytes), each named for its first record.
        let mut bounds: Vec<(Index, usize)> = Vec::new();
        if !self.log_bytes.is_empty() {
            if self.offsets.is_empty() {
                bounds.push((self.log_first, 0));
            }
            for (i, start) in self.offsets.iter().enumerate().step_by(RECORDS_PER_SEGMENT) {
                bounds.push((self.log_first + i as Index, *start as usize));
            }
        }
        let input = RecoveryInput {
            state: &self.state_bytes[..],
            synced: Some(self.synced_record),
            snapshot: self
                .snapshot_file
                .as_ref()
                .map(|(index, bytes)| SnapshotFile {
                    index: *index,
                    bytes: Bytes::copy_from_slice(bytes),
                }),
            segments: bounds
                .iter()
                .enumerate()
                .map(|(k, (first, start))| {
                    let end = bounds.get(k + 1).map_or(self.log_bytes.len(), |b| b.1);
                    SegmentFile {
                        first: *first,
                        bytes: self.log_bytes.get(*start..end),
                    }
                })
                .collect(),
        };
        // The same decision the shell's `GroupStore::open_repairing` carries out.
        let plan = match plan_recovery(&input) {
            Ok(plan) => plan,
            Err(e) => {
                problems.push(format!("recovery could not decide: {e}"));
                RecoveryPlan {
                    hard_state: HardState::default(),
                    state_sequence: 0,
                    state_lost: None,
                    snapshot: None,
                    entries: Vec::new(),
                    segments: Vec::new(),
                    remove_trailing: Vec::new(),
                    remove_leading: Vec::new(),
                    set_aside_snapshots: false,
                    damage: None,
                    torn: None,
                }
            }
        };
        let (sequence, hard_state) = (plan.state_sequence, plan.hard_state);
        match plan.state_lost {
            Some(StateLost::Damaged(e)) => {
                problems.push(format!("the hard-state file is unreadable: {e}"));
            }
            Some(StateLost::MissingBesideLog) if self.hard_state != HardState::default() => {
                problems.push(format!(
                    "the hard-state file is empty beside a log, though {:?} was durable",
                    self.hard_state
                ));
            }
            _ => {}
        }
        let snapshot = plan.snapshot;
        let entries = plan.entries;
        let mut damaged_at = plan.damage.as_ref().map(|d| d.from);
        let (damage_cause, torn) = (plan.damage.map(|d| d.cause), plan.torn);
        let snapshot_refused = plan.set_aside_snapshots;
        if Canary::TruncateAtCorruption.planted(canary) && !snapshot_refused {
            // The planted bug: damage is cut off like a torn tail, and forgotten.
            damaged_at = None;
        }
        if snapshot_refused {
            // Without its snapshot nothing of the log can be trusted to continue anything:
            // the replica starts over, damaged from index 1 (its state file is intact, so it
            // can be repaired).
            if !self.hit && self.damage.is_none() {
                problems.push(format!(
                    "the snapshot file is unreadable: {}",
                    damage_cause
                        .as_ref()
                        .map_or_else(String::new, ToString::to_string)
                ));
            }
            self.snapshot_file = None;
        }
        // Carry out the plan: the kept segments (contiguous, only the last cut) stay; the
        // leading ones (held by the snapshot) and the trailing ones (behind damage, or a
        // replaced log) go.
        let start_of = |first: Index| bounds.iter().find(|b| b.0 == first).map(|b| b.1);
        let kept = plan.segments.first().zip(plan.segments.last());
        match kept.and_then(|(head, tail)| {
            Some((
                head,
                start_of(head.first)?,
                start_of(tail.first)? + tail.valid_len as usize,
            ))
        }) {
            Some((head, from, to)) if from <= to && to <= self.log_bytes.len() => {
                let mut offsets = Vec::new();
                for segment in &plan.segments {
                    let base = start_of(segment.first).unwrap_or(from) - from;
                    offsets.extend(segment.starts.iter().map(|s| base as u64 + s));
                }
                self.log_bytes.truncate(to);
                self.log_bytes.drain(..from);
                self.offsets = offsets;
                self.log_first = head.first;
            }
            Some(_) => {
                problems.push("the plan keeps segments that are not in the file".to_string());
                self.log_bytes.clear();
                self.offsets.clear();
            }
            None => {
                self.log_bytes.clear();
                self.offsets.clear();
            }
        }
        let snapshot_index = snapshot.as_ref().map_or(0, |s| s.index);
        match entries.first() {
            Some(first) => self.drop_oldest((first.index - self.log_first) as usize),
            None => {
                self.offsets.clear();
                self.log_bytes.clear();
                self.log_first = snapshot_index + 1;
            }
        }
        let last = snapshot_index + entries.len() as Index;
        if damaged_at.is_none() && last < hard_state.commit {
            damaged_at = Some(last + 1);
        }
        if damaged_at.is_some() && !self.hit && self.damage.is_none() {
            // Damage needs a fault that changed bytes (or a wipe, which leaves the marker):
            // otherwise the disk lost a durable write.
            problems.push(format!(
                "recovery found damage from {damaged_at:?} though no fault touched this disk: \
                 a durable write was lost ({}; torn tail at {:?}; snapshot at \
                 {snapshot_index}, {} entries after it, durable commit {}; the model held a \
                 snapshot at {} and {} entries after it)",
                damage_cause
                    .as_ref()
                    .map_or_else(|| "no damage found".to_string(), ToString::to_string),
                torn.map(|t| t.at),
                entries.len(),
                hard_state.commit,
                self.snapshot_index(),
                self.log.len()
            ));
        }
        self.synced_len = self.log_bytes.len() as u64;
        self.synced_records = self.offsets.len();
        // As the shell's open: everything kept was synced as it was read, and the record says
        // so before the store is used (never above what survived).
        self.synced_record = last;
        let durable_sequence = std::mem::replace(&mut self.state_sequence, sequence);
        if damaged_at.is_some() || self.damage.is_some() {
            let from = damaged_at.unwrap_or(last + 1).max(snapshot_index + 1);
            self.damage = Some(Damage {
                from,
                votes_lost: self.damage.is_some_and(|d| d.votes_lost),
            });
        }
        if plan.state_lost.is_some() {
            // As the shell starts it: the votes are unknown, so the replica never votes again.
            self.damage = Some(Damage {
                from: 1,
                votes_lost: true,
            });
        }
        self.hit = false;

        // What a correct recovery returns: the model, or (damaged) a prefix of its log; and
        // for the hard state the rule of `check_hard_state`.
        if let Err(problem) = self.check_hard_state(durable_sequence, sequence, &hard_state) {
            problems.push(problem);
        }
        if !snapshot_refused && snapshot != self.snapshot {
            let brief = |s: &Option<Snapshot>| s.as_ref().map(|s| (s.index, s.term, s.data.len()));
            problems.push(format!(
                "recovered the snapshot {:?} but {:?} was durable",
                brief(&snapshot),
                brief(&self.snapshot)
            ));
        }
        let ids = |entries: &[Entry]| -> Vec<(Index, Term)> {
            entries.iter().map(|e| (e.index, e.term)).collect()
        };
        let (recovered_ids, durable_ids) = (ids(&entries), ids(&self.log));
        let cut_begun = self.cut_begun.take().is_some_and(|floor| {
            snapshot == self.snapshot && durable_ids.starts_with(&recovered_ids) && last >= floor
        });
        match self.damage {
            None if recovered_ids != durable_ids && !cut_begun => problems.push(format!(
                "recovered {} entries after the snapshot at {snapshot_index} (last {:?}) as \
                 undamaged, but {} entries (last {:?}) were durable: a durable entry was lost or \
                 changed without marking the replica damaged",
                entries.len(),
                recovered_ids.last(),
                self.log.len(),
                durable_ids.last()
            )),
            Some(_) if snapshot == self.snapshot && !durable_ids.starts_with(&recovered_ids) => {
                problems.push(format!(
                    "recovered {} entries that are not a prefix of the durable log",
                    entries.len()
                ))
            }
            _ => {}
        }
        self.unconfirmed.clear();
        if let Some(vote) = hard_state.vote {
            // Recovered, it is durable now, and the replica may grant it again.
            self.votes_ever.insert((hard_state.term, vote));
        }
        self.hard_state = hard_state;
        self.snapshot = snapshot.clone();
        self.log = entries.clone();
        Recovery {
            recovered: Recovered {
                hard_state,
                snapshot,
                entries,
            },
            damage: self.damage,
            commit: hard_state.commit,
            last_index: last,
            problem: (!problems.is_empty()).then(|| problems.join("; ")),
        }
    }

    /// The recovery checker's rule for the hard state. Recovery must return the durable hard
    /// state, or one whose slot was written after it and never confirmed durable (in
    /// `unconfirmed`: a torn slot write whose missing bytes already held the right values),
    /// with a term no older than the durable one and, in the same term, the same vote if one
    /// was durable. Nothing that was never written, nothing older than the durable state. The
    /// commit is compared only on an undamaged replica (damage may leave the log short of it,
    /// and the replica repairs from the leader).
    ///
    /// Why taking an unconfirmed state is safe for Raft: the replica acts on a hard state only
    /// once the sync covering it completes (it grants a vote, acknowledges entries or reports
    /// a higher term after `persisted`; the ack-before-fsync and vote checkers hold it to
    /// that), so nobody has seen this state. Recovering it is the same as if the crash had come
    /// just after the sync rather than just before. Its term is at least the durable term,
    /// and its vote is one the replica had decided to cast in that term: keeping a promise it
    /// never announced only narrows what it may grant later, and it can never vote twice in a
    /// term, since in the durable state's term the vote is the durable one. Its commit was
    /// clamped, when written, to records that were already synced and that the same write
    /// did not cut (or the snapshot), and is a lower bound of what the cluster committed;
    /// recovery still marks damage (a lost durable write, here a problem) if the log does not
    /// reach it, and the committed bytes up to it are compared with every other replica's.
    fn check_hard_state(
        &self,
        durable_sequence: u64,
        sequence: u64,
        recovered: &HardState,
    ) -> Result<(), String> {
        let durable = &self.hard_state;
        let commit_counts = self.damage.is_none();
        let same = |a: &HardState, b: &HardState| {
            (a.term, a.vote) == (b.term, b.vote) && (!commit_counts || a.commit == b.commit)
        };
        if same(recovered, durable) {
            return Ok(());
        }
        let unconfirmed = self
            .unconfirmed
            .get(&sequence)
            .filter(|_| sequence > durable_sequence);
        let Some(written) = unconfirmed else {
            return Err(
                if (recovered.term, recovered.vote) != (durable.term, durable.vote) {
                    format!(
                        "recovered term {} vote {:?} but term {} vote {:?} was durable, and no \
                     later slot held it",
                        recovered.term, recovered.vote, durable.term, durable.vote
                    )
                } else {
                    format!(
                        "recovered commit {} but {} was durable, and no later slot held it",
                        recovered.commit, durable.commit
                    )
                },
            );
        };
        if !same(recovered, written) {
            return Err(format!(
                "recovered term {} vote {:?} commit {} from slot sequence {sequence}, which was \
                 written with term {} vote {:?} commit {} (durable: term {} vote {:?} commit {})",
                recovered.term,
                recovered.vote,
                recovered.commit,
                written.term,
                written.vote,
                written.commit,
                durable.term,
                durable.vote,
                durable.commit
            ));
        }
        let older = recovered.term < durable.term
            || (recovered.term == durable.term
                && durable.vote.is_some()
                && recovered.vote != durable.vote);
        if older {
            return Err(format!(
                "recovered the unsynced term {} vote {:?}, older than the durable term {} vote \
                 {:?}",
                recovered.term, recovered.vote, durable.term, durable.vote
            ));
        }
        Ok(())
    }

    /// The replica reports whether it is still damaged: a repaired one clears the marker.
    pub fn note_repair(&mut self, damaged_from: Option<Index>) -> bool {
        if self.damage.is_some() && damaged_from.is_none() {
            self.damage = None;
            return true;
        }
        false
    }
}

/// How many records each segment of the log holds when a restart hands the log to the core's
/// recovery: small, so that most logs span several segments and a bad record is often
/// followed by another segment (damage), or held by the snapshot in a leading one (skipped).
const RECORDS_PER_SEGMENT: usize = 3;

/// The last index a write keeps of the log before it: one before its first entry (the write
/// cuts the log there), or all of it.
fn cut_floor(write: &Write) -> Index {
    write
        .entries
        .first()
        .map_or(Index::MAX, |e| e.index.saturating_sub(1))
}

/// The planted bug of [`Canary::TrustBadChecksum`]: every record's checksum is recomputed
/// over whatever its bytes are now, so a damaged record reads as a valid one.
fn trust_checksums(bytes: &mut [u8]) {
    let mut pos = 0usize;
    while let Some(len) = le_u32(bytes, pos) {
        let body = pos + HEADER_BYTES;
        let end = body.saturating_add(len as usize);
        if len < 17 || end > bytes.len() {
            return;
        }
        let crc = crc32c::crc32c(&bytes[body..end]);
        bytes[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use holdfast_core::storage::slot_of;
    use rand::SeedableRng;

    use super::*;

    fn state(term: Term, vote: Option<NodeId>) -> HardState {
        HardState {
            term,
            vote,
            commit: 0,
        }
    }

    /// A disk whose durable hard state is term 1, vote for 2 (slot sequence 1).
    fn durable_disk() -> Disk {
        let mut disk = Disk::default();
        disk.unsynced.push_back(Write {
            id: 1,
            hard_state: Some(state(1, Some(2))),
            snapshot: None,
            discard_log: false,
            entries: Vec::new(),
        });
        let mut rng = ChaCha8Rng::seed_from_u64(19);
        assert_eq!(disk.sync(1, &mut rng, None).ok(), Some(1));
        disk
    }

    fn recover(disk: &mut Disk) -> (HardState, Option<String>) {
        let recovery = disk.recover(None);
        (recovery.recovered.hard_state, recovery.problem)
    }

    fn entries_write(id: WriteId, from: Index, to: Index, term: Term) -> Write {
        Write {
            id,
            hard_state: Some(state(term, Some(1))),
            snapshot: None,
            discard_log: false,
            entries: (from..=to)
                .map(|index| Entry {
                    term,
                    index,
                    kind: holdfast_core::raft::EntryKind::Noop,
                })
                .collect(),
        }
    }

    #[test]
    fn the_shared_recovery_cuts_a_torn_tail_and_keeps_every_synced_entry() {
        for seed in 0..64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut disk = Disk::default();
            disk.unsynced.push_back(entries_write(1, 1, 5, 1));
            assert_eq!(disk.sync(1, &mut rng, None).ok(), Some(1));
            disk.unsynced.push_back(entries_write(2, 6, 9, 1));
            assert!(disk.crash(Some(0), &mut rng, None).is_ok());
            let durable: Vec<Index> = disk.log.iter().map(|e| e.index).collect();
            let recovery = disk.recover(None);
            assert_eq!(recovery.problem, None, "seed {seed}");
            assert_eq!(recovery.damage, None, "seed {seed}");
            let got: Vec<Index> = recovery.recovered.entries.iter().map(|e| e.index).collect();
            assert_eq!(got, durable, "seed {seed}");
            assert!(got.starts_with(&[1, 2, 3, 4, 5]), "seed {seed}");
        }
    }

    #[test]
    fn the_shared_recovery_reports_a_flipped_bit_in_a_synced_record_as_damage() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for record in 1..=5u64 {
            let mut disk = Disk::default();
            disk.unsynced.push_back(entries_write(1, 1, 5, 1));
            assert_eq!(disk.sync(1, &mut rng, None).ok(), Some(1));
            let at = disk.offsets[(record - 1) as usize] as usize + HEADER_BYTES + 3;
            disk.log_bytes[at] ^= 0x10;
            disk.hit = true;
            let recovery = disk.recover(None);
            assert_eq!(recovery.problem, None);
            let damage = recovery.damage.expect("a flipped synced bit is damage");
            assert_eq!(damage.from, record, "record {record}");
            assert_eq!(recovery.recovered.entries.len() as Index, record - 1);
        }
    }

    #[test]
    fn a_torn_slot_that_landed_whole_is_recovered_and_becomes_durable() {
        // The seeds of issue 19: all but the last byte landed, and the byte already on the
        // platter was the one the write would have put there.
        let mut disk = durable_disk();
        let at = slot_of(2) * SLOT_BYTES;
        disk.state_bytes[at + SLOT_BYTES - 1] = encode_state_slot(2, &state(2, Some(3)))[63];
        disk.tear_slot(&state(2, Some(3)), Index::MAX, SLOT_BYTES - 1, None);
        let (recovered, problem) = recover(&mut disk);
        assert_eq!(problem, None);
        assert_eq!(recovered, state(2, Some(3)));
        assert_eq!(disk.hard_state, state(2, Some(3)));
        assert!(
            disk.ever_voted(2, 3),
            "a recovered vote is durable from then on"
        );
    }

    #[test]
    fn a_torn_slot_that_did_not_land_leaves_the_durable_state() {
        let mut disk = durable_disk();
        disk.tear_slot(&state(2, Some(3)), Index::MAX, SLOT_BYTES - 1, None);
        let (recovered, problem) = recover(&mut disk);
        assert_eq!(problem, None);
        assert_eq!(recovered, state(1, Some(2)));
        // What was never recovered is no longer allowed: the next recovery must agree.
        assert!(disk.unconfirmed.is_empty());
    }

    #[test]
    fn a_state_that_was_never_written_is_refused() {
        let mut disk = durable_disk();
        let slot = encode_state_slot(2, &state(2, Some(3)));
        let at = slot_of(2) * SLOT_BYTES;
        disk.state_bytes[at..at + SLOT_BYTES].copy_from_slice(&slot);
        let (_, problem) = recover(&mut disk);
        let problem = problem.unwrap_or_default();
        assert!(problem.contains("no later slot held it"), "{problem}");
    }

    #[test]
    fn a_slot_that_differs_from_what_was_written_is_refused() {
        let mut disk = durable_disk();
        disk.tear_slot(&state(2, Some(3)), Index::MAX, SLOT_BYTES, None);
        let slot = encode_state_slot(2, &state(2, Some(1)));
        let at = slot_of(2) * SLOT_BYTES;
        disk.state_bytes[at..at + SLOT_BYTES].copy_from_slice(&slot);
        let (_, problem) = recover(&mut disk);
        let problem = problem.unwrap_or_default();
        assert!(problem.contains("which was written with"), "{problem}");
    }

    #[test]
    fn an_unconfirmed_state_older_than_the_durable_one_is_refused() {
        let mut disk = durable_disk();
        // Not something a correct replica writes (its terms never go back, nor its vote in a
        // term): the rule must still refuse it rather than take any later slot.
        for older in [state(0, None), state(1, Some(3)), state(1, None)] {
            let mut disk = durable_disk();
            disk.tear_slot(&older, Index::MAX, SLOT_BYTES, None);
            let (_, problem) = recover(&mut disk);
            let problem = problem.unwrap_or_default();
            assert!(
                problem.contains("older than the durable"),
                "{older:?}: {problem}"
            );
        }
        // The same term with a vote where none was durable is a promise it may keep.
        disk.unsynced.push_back(Write {
            id: 2,
            hard_state: Some(state(3, None)),
            snapshot: None,
            discard_log: false,
            entries: Vec::new(),
        });
        let mut rng = ChaCha8Rng::seed_from_u64(19);
        assert_eq!(disk.sync(2, &mut rng, None).ok(), Some(2));
        disk.tear_slot(&state(3, Some(1)), Index::MAX, SLOT_BYTES, None);
        assert_eq!(recover(&mut disk), (state(3, Some(1)), None));
    }
}
