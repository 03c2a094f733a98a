//! A simulated disk for one replica: what is durable, and what is written but not yet synced.

use std::collections::{BTreeSet, VecDeque};

use crate::checker::LogView;
use holdfast_core::raft::{Entry, HardState, Index, NodeId, Recovered, Term, Write, WriteId};

#[derive(Default)]
pub struct Disk {
    /// Everything synced: what a restart recovers.
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

    pub fn view(&self, index: Index) -> LogView {
        let last_index = self.last_index();
        LogView {
            last_index,
            last_term: self.term_at(last_index).unwrap_or(0),
            term_at_index: self.term_at(index),
        }
    }

    pub fn recovered(&self) -> Recovered {
        Recovered {
            hard_state: self.hard_state,
            entries: self.log.clone(),
        }
    }

    /// Makes every unsynced write up to `upto` durable, in order. Returns an error when a
    /// write would leave a hole in the log: the replica handed out an impossible write.
    pub fn sync(&mut self, upto: WriteId) -> Result<(), String> {
        while self.unsynced.front().is_some_and(|w| w.id <= upto) {
            if let Some(write) = self.unsynced.pop_front() {
                self.apply(write)?;
            }
        }
        Ok(())
    }

    /// A crash: unsynced writes are lost, except that the first `survivors` of them reached
    /// the platter anyway (the OS flushed them); the one after is torn and discarded whole
    /// by recovery, as a checksummed record would be.
    pub fn crash(&mut self, survivors: usize) -> Result<(), String> {
        let unsynced = std::mem::take(&mut self.unsynced);
        for write in unsynced.into_iter().take(survivors) {
            self.apply(write)?;
        }
        self.syncing = false;
        Ok(())
    }

    fn apply(&mut self, write: Write) -> Result<(), String> {
        if let Some(first) = write.entries.first() {
            let keep = first.index.saturating_sub(1);
            if keep > self.last_index() {
                return Err(format!(
                    "write {} starts at index {} but the disk ends at {}",
                    write.id,
                    first.index,
                    self.last_index()
                ));
            }
            self.log.truncate(keep as usize);
            self.ever
                .extend(write.entries.iter().map(|e| (e.index, e.term)));
            self.log.extend(write.entries);
        }
        if let Some(hard_state) = write.hard_state {
            if let Some(vote) = hard_state.vote {
                self.votes_ever.insert((hard_state.term, vote));
            }
            self.hard_state = hard_state;
        }
        Ok(())
    }
}
