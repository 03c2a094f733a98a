//! The replica's in-memory view of its log: the durable prefix plus whatever is still on its
//! way to disk. Contiguous from index 1 (snapshots and a later first index come with compaction).

use super::types::{Entry, Index, Term};

#[derive(Debug, Default)]
pub(super) struct RaftLog {
    entries: Vec<Entry>,
}

impl RaftLog {
    pub(super) fn from_entries(entries: Vec<Entry>) -> Self {
        RaftLog { entries }
    }

    pub(super) fn last_index(&self) -> Index {
        self.entries.len() as Index
    }

    pub(super) fn last_term(&self) -> Term {
        self.entries.last().map_or(0, |e| e.term)
    }

    /// The term of the entry at `index`; index 0 has term 0; `None` past the end.
    pub(super) fn term_at(&self, index: Index) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        self.get(index).map(|e| e.term)
    }

    pub(super) fn get(&self, index: Index) -> Option<&Entry> {
        let offset = usize::try_from(index.checked_sub(1)?).ok()?;
        self.entries.get(offset)
    }

    /// Up to `count_max` entries starting at `from` (an empty slice past the end), stopping
    /// before the entry that would take their command bytes past `bytes_max` unless it is the
    /// first.
    pub(super) fn slice(&self, from: Index, count_max: usize, bytes_max: usize) -> Vec<Entry> {
        let start = usize::try_from(from.saturating_sub(1)).unwrap_or(usize::MAX);
        let start = start.min(self.entries.len());
        let mut bytes = 0usize;
        let mut slice = Vec::new();
        for entry in self.entries[start..].iter().take(count_max) {
            bytes = bytes.saturating_add(entry.command_bytes());
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

    /// Drops every entry at `index` and above.
    pub(super) fn truncate_from(&mut self, index: Index) {
        let keep = usize::try_from(index.saturating_sub(1)).unwrap_or(usize::MAX);
        self.entries.truncate(keep);
    }

    /// Raft §5.4.1: a log is at least as up to date as ours if its last term is higher, or
    /// equal with an index at least as high.
    pub(super) fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The largest index `<= index` whose term is `<= term` (0 if none). Used from both sides
    /// of a rejected append to skip a whole run of conflicting entries in one round trip.
    pub(super) fn find_conflict_by_term(&self, index: Index, term: Term) -> Index {
        let mut i = index.min(self.last_index());
        while i > 0 {
            match self.term_at(i) {
                Some(t) if t <= term => return i,
                _ => i -= 1,
            }
        }
        0
    }
}
