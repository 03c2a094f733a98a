//! A simulated disk for one replica: real bytes in the core's on-disk format, and a model of
//! what a correct recovery must return from them.
//!
//! The files are the ones the shell keeps (`shell/src/storage/group_store.rs`): a log of
//! records from [`encode_entry`] and a hard-state file of two slots from [`encode_state_slot`],
//! written alternately. A restart reads them back through [`scan`] and
//! [`decode_stored_state`], with the shell's rules: a bad record after the synced bytes is a
//! torn tail and is cut; a bad record inside them, a bad record followed by a valid one, or
//! fewer entries than the recorded commit is damage. Unlike the shell, which refuses to start
//! on damage, the simulator brings the replica back damaged ([`Damage`]) and keeps a marker
//! (a third file) until the replica reports itself repaired.
//!
//! Beside the files, the disk keeps the model: the hard state and entries every write so far
//! made durable (whole writes only; a torn one counts for what of it fully landed), which is
//! what the checkers compare the replica and its recovery against.

use std::collections::{BTreeSet, VecDeque};

use holdfast_core::raft::{
    Canary, Damage, Entry, HardState, Index, NodeId, Recovered, Term, Write, WriteId,
};
use holdfast_core::storage::{
    HEADER_BYTES, SLOT_BYTES, STATE_BYTES, ScanOutcome, decode_stored_state, encode_entry,
    encode_state_slot, find_record_after, next_slot, scan,
};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::checker::LogView;

pub struct Disk {
    // ----- the files -----
    /// The log file as written (synced or not).
    log_bytes: Vec<u8>,
    /// Where the record of index `i + 1` starts, as the writer laid the records out.
    offsets: Vec<u64>,
    /// The leading bytes of the log known to be synced.
    synced_len: u64,
    /// Entries wholly inside the synced bytes: a state slot claims no commit beyond them.
    synced_entries: Index,
    state_bytes: Box<[u8; STATE_BYTES]>,
    /// The sequence of the newest slot written.
    state_sequence: u64,
    /// The damage marker: set by a recovery that found damage, cleared once the replica
    /// reports itself repaired. Survives restarts, so a replica cannot forget its damage by
    /// crashing before the repair.
    pub damage: Option<Damage>,
    /// A corruption fault changed bytes that no recovery has read yet.
    pub hit: bool,

    // ----- the model -----
    /// Everything synced: what a restart must recover (the commit as the state file holds it).
    pub hard_state: HardState,
    pub log: Vec<Entry>,
    /// Writes handed over by the replica and not yet synced, oldest first.
    pub unsynced: VecDeque<Write>,
    /// A sync is under way and will report when it completes.
    pub syncing: bool,
    /// Every `(index, term)` that was ever durable, for checking acknowledgements that were
    /// true when made and later overwritten.
    ever: BTreeSet<(Index, Term)>,
    /// Every `(term, vote)` that was ever durable, likewise for votes.
    votes_ever: BTreeSet<(Term, NodeId)>,
}

impl Default for Disk {
    fn default() -> Disk {
        Disk {
            log_bytes: Vec::new(),
            offsets: Vec::new(),
            synced_len: 0,
            synced_entries: 0,
            state_bytes: Box::new([0; STATE_BYTES]),
            state_sequence: 0,
            damage: None,
            hit: false,
            hard_state: HardState::default(),
            log: Vec::new(),
            unsynced: VecDeque::new(),
            syncing: false,
            ever: BTreeSet::new(),
            votes_ever: BTreeSet::new(),
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
    /// Where recovery returned something a correct recovery would not (the "recovery"
    /// checker); reported after the byte comparison of committed records.
    pub problem: Option<String>,
}

/// Faults that change synced bytes of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// One bit of the synced region flips.
    BitFlip,
    /// A record's bytes land at a wrong offset inside the synced region.
    Misdirect,
}

impl Disk {
    pub fn last_index(&self) -> Index {
        self.log.len() as Index
    }

    pub fn term_at(&self, index: Index) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        self.log
            .get(usize::try_from(index - 1).ok()?)
            .map(|e| e.term)
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
        }
    }

    /// The bytes of the record of `index` in the log file, as laid out by the writer.
    pub fn record_bytes(&self, index: Index) -> Option<&[u8]> {
        let i = usize::try_from(index.checked_sub(1)?).ok()?;
        let start = usize::try_from(*self.offsets.get(i)?).ok()?;
        let end = match self.offsets.get(i + 1) {
            Some(end) => usize::try_from(*end).ok()?,
            None => self.log_bytes.len(),
        };
        self.log_bytes.get(start..end)
    }

    /// Makes every unsynced write up to `upto` durable, in order, and returns the write id to
    /// report to the replica as synced. Returns an error when a write would leave a hole in
    /// the log: the replica handed out an impossible write.
    pub fn sync(&mut self, upto: WriteId, canary: Option<Canary>) -> Result<WriteId, String> {
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
        self.synced_entries = self.offsets.len() as Index;
        Ok(report)
    }

    /// A crash: unsynced writes are lost. With `survivors = Some(k)` the first `k` of them
    /// reached the platter anyway (the OS flushed them) and the one after is torn: part of
    /// its bytes land, either a prefix of its state slot or, after the whole slot, a prefix of
    /// its log records. Recovery must cut or ignore the torn part.
    pub fn crash(
        &mut self,
        survivors: Option<usize>,
        rng: &mut ChaCha8Rng,
        canary: Option<Canary>,
    ) -> Result<(), String> {
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

    fn apply(&mut self, write: Write, canary: Option<Canary>) -> Result<(), String> {
        if let Some(hard_state) = write.hard_state {
            self.write_state(hard_state, canary);
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

    /// Lands part of `write`: a prefix of its state slot, or its whole slot and a prefix of
    /// its records' bytes.
    fn tear(
        &mut self,
        write: Write,
        rng: &mut ChaCha8Rng,
        canary: Option<Canary>,
    ) -> Result<(), String> {
        if let Some(hard_state) = write.hard_state
            && (write.entries.is_empty() || rng.random_bool(0.5))
        {
            let (at, slot) = self.state_slot(&hard_state, canary);
            let landed = rng.random_range(1..SLOT_BYTES);
            self.state_bytes[at..at + landed].copy_from_slice(&slot[..landed]);
            return Ok(());
        }
        if let Some(hard_state) = write.hard_state {
            self.write_state(hard_state, canary);
        }
        let Some(first) = write.entries.first() else {
            return Ok(());
        };
        self.cut(write.id, first.index)?;
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(write.entries.len());
        for entry in &write.entries {
            encode_entry(entry, &mut bytes).map_err(|e| e.to_string())?;
            ends.push(bytes.len());
        }
        let landed = rng.random_range(0..bytes.len());
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

    /// Drops every record from `index` on, in the file and in the model.
    fn cut(&mut self, id: WriteId, index: Index) -> Result<(), String> {
        let keep = index.saturating_sub(1);
        if keep > self.last_index() {
            return Err(format!(
                "write {id} starts at index {index} but the disk ends at {}",
                self.last_index()
            ));
        }
        self.log.truncate(keep as usize);
        if let Some(&at) = self.offsets.get(keep as usize) {
            self.offsets.truncate(keep as usize);
            self.log_bytes.truncate(at as usize);
            self.synced_len = self.synced_len.min(at);
            self.synced_entries = self.synced_entries.min(keep);
        }
        Ok(())
    }

    fn append_record(&mut self, entry: &Entry) -> Result<(), String> {
        self.offsets.push(self.log_bytes.len() as u64);
        encode_entry(entry, &mut self.log_bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Where the next slot goes and its bytes. The commit is clamped to the synced entries,
    /// as the shell does: the slot is synced before the log bytes of the same write.
    fn state_slot(
        &self,
        hard_state: &HardState,
        canary: Option<Canary>,
    ) -> (usize, [u8; SLOT_BYTES]) {
        let mut hard_state = *hard_state;
        hard_state.commit = hard_state.commit.min(self.synced_entries);
        if Canary::StateFileSingleSlot.planted(canary) {
            // The planted bug: always slot 0, written in place (even sequences live there).
            let sequence = (self.state_sequence + 2) & !1;
            return (0, encode_state_slot(sequence, &hard_state));
        }
        let sequence = self.state_sequence + 1;
        let at = next_slot(self.state_sequence) * SLOT_BYTES;
        (at, encode_state_slot(sequence, &hard_state))
    }

    fn write_state(&mut self, hard_state: HardState, canary: Option<Canary>) {
        let (at, slot) = self.state_slot(&hard_state, canary);
        self.state_bytes[at..at + SLOT_BYTES].copy_from_slice(&slot);
        self.state_sequence = if Canary::StateFileSingleSlot.planted(canary) {
            (self.state_sequence + 2) & !1
        } else {
            self.state_sequence + 1
        };
        if let Some(vote) = hard_state.vote {
            self.votes_ever.insert((hard_state.term, vote));
        }
        self.hard_state = HardState {
            commit: hard_state.commit.min(self.synced_entries),
            ..hard_state
        };
    }

    // ----- faults -----

    /// Damages the synced part of the log; returns whether any byte changed.
    pub fn corrupt(&mut self, corruption: Corruption, rng: &mut ChaCha8Rng) -> bool {
        let synced = self.synced_len.min(self.log_bytes.len() as u64) as usize;
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
                let index = rng.random_range(0..records) as Index + 1;
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

    /// Reads the files back as a restarting node does, cuts a torn tail, marks damage, and
    /// checks the result against the model. The model becomes what was recovered.
    pub fn recover(&mut self, canary: Option<Canary>) -> Recovery {
        debug_assert!(self.unsynced.is_empty(), "recovery with writes in flight");
        let mut problems = Vec::new();
        let stored = match decode_stored_state(&self.state_bytes[..]) {
            Ok(stored) => stored,
            Err(e) => {
                problems.push(format!("the hard-state file is unreadable: {e}"));
                None
            }
        };
        let (sequence, hard_state) =
            stored.map_or((0, HardState::default()), |s| (s.sequence, s.hard_state));
        if Canary::TrustBadChecksum.planted(canary) {
            trust_checksums(&mut self.log_bytes);
        }
        let found = scan(&self.log_bytes, self.synced_len, 1);
        let count = found.entries.len() as Index;
        let last_term = found.entries.last().map_or(0, |e| e.term);
        let mut damaged_at = match found.outcome {
            ScanOutcome::Clean => None,
            ScanOutcome::TornTail { at } => {
                find_record_after(&self.log_bytes, at, count + 1, last_term).map(|_| count + 1)
            }
            ScanOutcome::Corrupt { .. } => Some(count + 1),
        };
        if damaged_at.is_none() && count < hard_state.commit {
            damaged_at = Some(count + 1);
        }
        if Canary::TruncateAtCorruption.planted(canary) {
            // The planted bug: damage is cut off like a torn tail, and forgotten.
            damaged_at = None;
        }
        // Cut to the valid prefix (a torn tail, or the damage the marker now remembers) and
        // sync: everything left is durable.
        self.log_bytes.truncate(found.valid_len as usize);
        self.offsets.clear();
        let mut offset = 0u64;
        for entry in &found.entries {
            self.offsets.push(offset);
            offset += holdfast_core::storage::record_len_bytes(entry).unwrap_or(0) as u64;
        }
        self.synced_len = found.valid_len;
        self.synced_entries = count;
        self.state_sequence = sequence;
        if damaged_at.is_some() || self.damage.is_some() {
            self.damage = Some(Damage {
                from: damaged_at.unwrap_or(count + 1),
                votes_lost: self.damage.is_some_and(|d| d.votes_lost),
            });
        }
        self.hit = false;

        // What a correct recovery returns: the model, or (damaged) a prefix of its log.
        if (hard_state.term, hard_state.vote) != (self.hard_state.term, self.hard_state.vote) {
            problems.push(format!(
                "recovered term {} vote {:?} but term {} vote {:?} was durable",
                hard_state.term, hard_state.vote, self.hard_state.term, self.hard_state.vote
            ));
        }
        let ids = |entries: &[Entry]| -> Vec<(Index, Term)> {
            entries.iter().map(|e| (e.index, e.term)).collect()
        };
        let (recovered_ids, durable_ids) = (ids(&found.entries), ids(&self.log));
        match self.damage {
            None if recovered_ids != durable_ids => problems.push(format!(
                "recovered {count} entries (last term {last_term}) as undamaged, but {} \
                 entries (last term {}) were durable: a durable entry was lost or changed \
                 without marking the replica damaged",
                self.log.len(),
                self.log.last().map_or(0, |e| e.term)
            )),
            Some(_) if !durable_ids.starts_with(&recovered_ids) => problems.push(format!(
                "recovered {count} entries that are not a prefix of the durable log"
            )),
            _ => {}
        }
        if self.damage.is_none() && hard_state.commit != self.hard_state.commit {
            problems.push(format!(
                "recovered commit {} but {} was durable",
                hard_state.commit, self.hard_state.commit
            ));
        }
        self.hard_state = hard_state;
        self.log = found.entries.clone();
        Recovery {
            recovered: Recovered {
                hard_state,
                entries: found.entries,
            },
            damage: self.damage,
            commit: hard_state.commit,
            problem: (!problems.is_empty()).then(|| problems.join("; ")),
        }
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
