//! The configurations a replica's log holds: the one its snapshot stands for (or the initial
//! one) and every configuration entry above it. The latest is in effect (Ongaro's thesis §4.1:
//! a server uses the latest configuration in its log, committed or not), so when a new leader
//! overwrites an uncommitted configuration entry the one before it is in effect again.

use super::types::{Index, Membership};

#[derive(Debug)]
pub(super) struct Configs {
    /// As of the snapshot's index: its membership, or the initial one.
    base: Membership,
    /// Configuration entries in the log above the snapshot, by index.
    entries: Vec<(Index, Membership)>,
}

impl Configs {
    pub(super) fn new(base: Membership) -> Configs {
        Configs {
            base,
            entries: Vec::new(),
        }
    }

    /// The latest configuration in the log, and its entry's index (0: the base).
    #[inline]
    pub(super) fn latest(&self) -> (Index, &Membership) {
        self.entries
            .last()
            .map_or((0, &self.base), |(index, m)| (*index, m))
    }

    /// The configuration in effect at `index`: the latest at or below it.
    pub(super) fn at(&self, index: Index) -> (Index, &Membership) {
        self.entries
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or((0, &self.base), |(i, m)| (*i, m))
    }

    pub(super) fn appended(&mut self, index: Index, membership: Membership) {
        debug_assert!(self.entries.last().is_none_or(|(i, _)| *i < index));
        self.entries.push((index, membership));
    }

    /// Entries at `index` and above left the log.
    pub(super) fn truncated_from(&mut self, index: Index) {
        self.entries.retain(|(i, _)| *i < index);
    }

    /// A snapshot now stands for the log up to `index`.
    pub(super) fn compacted_to(&mut self, index: Index) {
        let keep = self.entries.iter().position(|(i, _)| *i > index);
        let keep = keep.unwrap_or(self.entries.len());
        if let Some((_, membership)) = self.entries.drain(..keep).next_back() {
            self.base = membership;
        }
    }

    /// The whole log was replaced by a snapshot with this membership.
    pub(super) fn reset(&mut self, base: Membership) {
        self.base = base;
        self.entries.clear();
    }
}
