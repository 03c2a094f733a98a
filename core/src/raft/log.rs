//! The replica's in-memory view of its log: the durable prefix plus whatever is still on its
//! way to disk, above the latest snapshot. Entries at or below the snapshot's index are gone;
//! the snapshot's `(index, term)` stands in for them.

use super::types::{Entry, Index, Term};

#[derive(Debug, Default)]
pub(super) struct RaftLog {
    /// The index and term of the last entry the snapshot replaced (0 and 0 without one).
    snapshot_index: Index,
    snapshot_term: Term,
    /// Contiguous from `snapshot_index + 1`.
    entries: Vec<Entry>,
}

impl RaftLog {
    pub(super) fn new(snapshot_index: Index, snapshot_term: Term, entries: Vec<Entry>) -> Self {
        let mut log = RaftLog {
            snapshot_index,
            snapshot_term,
            entries: Vec::with_capacity(entries.len()),
        };
        // Whatever the driver passed, only the part that continues the snapshot.
        for entry in entries {
            if entry.index != log.last_index() + 1 {
                break;
            }
            log.entries.push(entry);
        }
        log
    }

    pub(super) fn snapshot_index(&self) -> Index {
        self.snapshot_index
    }

    pub(super) fn last_index(&self) -> Index {
        self.snapshot_index + self.entries.len() as Index
    }

    pub(super) fn last_term(&self) -> Term {
        self.entries.last().map_or(self.snapshot_term, |e| e.term)
    }

    /// The term of the entry at `index`: index 0 has term 0, the snapshot's index its term;
    /// `None` below the snapshot (compacted) and past the end.
    pub(super) fn term_at(&self, index: Index) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        self.get(index).map(|e| e.term)
    }

    pub(super) fn get(&self, index: Index) -> Option<&Entry> {
        let offset = index.checked_sub(self.snapshot_index + 1)?;
        self.entries.get(usize::try_from(offset).ok()?)
    }

    /// Up to `count_max` entries starting at `from` (an empty slice past the end, and from the
    /// first entry if `from` is compacted), stopping before the entry that would take their
    /// command bytes past `bytes_max` unless it is the first.
    pub(super) fn slice(&self, from: Index, count_max: usize, bytes_max: usize) -> Vec<Entry> {
        let start = from.saturating_sub(self.snapshot_index + 1);
        let start = usize::try_from(start)
            .unwrap_or(usize::MAX)
            .min(self.entries.len());
        let mut bytes = 0usize;
        let mut slice = Vec::new();
        for entry in self.entries[start..].iter().take(count_max) {
            bytes = bytes.saturating_add(entry.encoded_bytes_max());
            if !slice.is_empty() && bytes > bytes_max {
                break;
            }
            slice.push(entry.clone());
        }
        slice
    }

    pub(super) fn push(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        self.entries.push(entry);
    }

    /// Drops every entry at `index` and above (never the snapshot).
    pub(super) fn truncate_from(&mut self, index: Index) {
        let keep = index.saturating_sub(self.snapshot_index + 1);
        self.entries
            .truncate(usize::try_from(keep).unwrap_or(usize::MAX));
    }

    /// Drops the entries up to `index`, which a snapshot now stands in for. The caller checks
    /// that `index` is in the log and past the current snapshot.
    pub(super) fn compact_to(&mut self, index: Index, term: Term) {
        debug_assert!(index > self.snapshot_index && index <= self.last_index());
        let drop = usize::try_from(index - self.snapshot_index).unwrap_or(usize::MAX);
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot_index = index;
        self.snapshot_term = term;
    }

    /// Replaces the whole log by a snapshot at `(index, term)`.
    pub(super) fn reset_to(&mut self, index: Index, term: Term) {
        self.entries.clear();
        self.snapshot_index = index;
        self.snapshot_term = term;
    }

    /// Raft §5.4.1: a log is at least as up to date as ours if its last term is higher, or
    /// equal with an index at least as high.
    pub(super) fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The largest index `<= index` whose term is `<= term` (0 if none, or if only compacted
    /// entries could be). Used from both sides of a rejected append to skip a whole run of
    /// conflicting entries in one round trip.
    pub(super) fn find_conflict_by_term(&self, index: Index, term: Term) -> Index {
        let mut i = index.min(self.last_index());
        while i > self.snapshot_index {
            match self.term_at(i) {
                Some(t) if t <= term => return i,
                _ => i -= 1,
            }
        }
        if i == self.snapshot_index && self.snapshot_term <= term {
            self.snapshot_index
        } else {
            0
        }
    }
}
