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

    #[inline]
    pub(super) fn snapshot_index(&self) -> Index {
        self.snapshot_index
    }

    #[inline]
    pub(super) fn last_index(&self) -> Index {
        self.snapshot_index + self.entries.len() as Index
    }

    pub(super) fn last_term(&self) -> Term {
        self.entries.last().map_or(self.snapshot_term, |e| e.term)
    }

    /// The term of the entry at `index`: index 0 has term 0, the snapshot's index its term;
    /// `None` below the snapshot (compacted) and past the end.
    #[inline]
    pub(super) fn term_at(&self, index: Index) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        self.get(index).map(|e| e.term)
    }

    #[inline]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::EntryKind;

    fn log_of(snapshot_index: Index, terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, term)| Entry {
                term: *term,
                index: snapshot_index + 1 + i as Index,
                kind: EntryKind::Noop,
            })
            .collect();
        // A snapshot of term 1, or none (index 0 has term 0).
        RaftLog::new(snapshot_index, snapshot_index.min(1), entries)
    }

    /// Found by cargo-mutants (`bytes > bytes_max` as `==`): a batch stops before the entry
    /// that takes it past its byte limit, not only at an exact fit, and never comes back empty.
    #[test]
    fn a_slice_stops_before_the_entry_that_passes_its_byte_limit() {
        let log = log_of(4, &[1, 1, 1, 1, 1]);
        let one = log.get(5).expect("entry 5").encoded_bytes_max();
        let indexes = |from, count_max, bytes_max| -> Vec<Index> {
            log.slice(from, count_max, bytes_max)
                .iter()
                .map(|e| e.index)
                .collect()
        };
        assert_eq!(indexes(5, 10, one * 2 + one / 2), [5, 6]);
        assert_eq!(indexes(5, 10, one * 2), [5, 6]);
        assert_eq!(
            indexes(5, 10, 1),
            [5],
            "the first entry goes whatever its size"
        );
        assert_eq!(indexes(5, 3, usize::MAX), [5, 6, 7]);
        assert_eq!(
            indexes(2, 2, usize::MAX),
            [5, 6],
            "from below the snapshot: its first"
        );
        assert_eq!(indexes(10, 2, usize::MAX), Vec::<Index>::new());
    }

    /// The largest index at or below `index` whose term is at or below `term`, by brute force.
    fn conflict_by_brute_force(log: &RaftLog, index: Index, term: Term) -> Index {
        (log.snapshot_index()..=index.min(log.last_index()))
            .rev()
            .find(|i| log.term_at(*i).is_some_and(|t| t <= term))
            .unwrap_or(0)
    }

    #[test]
    fn find_conflict_by_term_skips_a_whole_run_of_higher_terms() {
        // Snapshot at 3 (term 1); entries 4..=9 of terms 1 1 3 3 5 5.
        let log = log_of(3, &[1, 1, 3, 3, 5, 5]);
        for index in 0..12 {
            for term in 0..7 {
                assert_eq!(
                    log.find_conflict_by_term(index, term),
                    conflict_by_brute_force(&log, index, term),
                    "index {index} term {term}"
                );
            }
        }
        assert_eq!(log.find_conflict_by_term(9, 4), 7);
        assert_eq!(log.find_conflict_by_term(9, 2), 5);
        assert_eq!(log.find_conflict_by_term(9, 1), 5);
        assert_eq!(
            log.find_conflict_by_term(9, 0),
            0,
            "only the snapshot, of a higher term"
        );
        assert_eq!(log.find_conflict_by_term(3, 1), 3, "the snapshot itself");
        assert_eq!(log.find_conflict_by_term(2, 9), 0, "compacted: unknown");
    }

    #[test]
    fn up_to_date_means_a_higher_last_term_or_the_same_and_at_least_as_long() {
        let log = log_of(0, &[1, 2, 2]);
        assert!(
            log.is_up_to_date(1, 3),
            "a higher last term wins however short"
        );
        assert!(log.is_up_to_date(3, 2), "the same log");
        assert!(log.is_up_to_date(4, 2), "longer in the same term");
        assert!(!log.is_up_to_date(2, 2), "shorter in the same term");
        assert!(
            !log.is_up_to_date(9, 1),
            "a lower last term loses however long"
        );
        assert_eq!((log.last_index(), log.last_term()), (3, 2));
        assert_eq!(log.term_at(0), Some(0), "index 0 has term 0");
        assert_eq!(log.term_at(2), Some(2));
        assert_eq!(log.term_at(4), None);
    }

    #[test]
    fn truncation_compaction_and_reset_keep_indexes_in_place() {
        let mut log = log_of(2, &[1, 1, 2, 2, 3]);
        assert_eq!((log.snapshot_index(), log.last_index()), (2, 7));
        log.truncate_from(6);
        assert_eq!((log.last_index(), log.last_term()), (5, 2));
        log.truncate_from(1);
        assert_eq!(log.last_index(), 2, "never below the snapshot");
        log.push(Entry {
            term: 4,
            index: 3,
            kind: EntryKind::Noop,
        });
        log.push(Entry {
            term: 4,
            index: 4,
            kind: EntryKind::Noop,
        });
        log.compact_to(3, 4);
        assert_eq!((log.snapshot_index(), log.last_index()), (3, 4));
        assert_eq!(log.get(4).map(|e| e.index), Some(4));
        assert_eq!(log.get(3).map(|e| e.index), None, "compacted");
        assert_eq!(log.term_at(3), Some(4));
        log.reset_to(10, 6);
        assert_eq!(
            (log.snapshot_index(), log.last_index(), log.last_term()),
            (10, 10, 6)
        );
        assert_eq!(log.get(11).map(|e| e.index), None);
    }
}
