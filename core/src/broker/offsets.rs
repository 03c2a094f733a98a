//! A consumer group's progress on one queue.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::types::Offset;

/// The consume offset is the lowest offset not yet acknowledged; acknowledgements above it are
/// kept until the gap below them closes. It never moves back.
///
/// Retention moves it forward to the queue's first retained offset ([`GroupOffsets::advance_to`]):
/// a dropped message counts as consumed, so the gap it left never holds the offset back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOffsets {
    consume_offset: Offset,
    acked_above: BTreeSet<Offset>,
}

impl GroupOffsets {
    pub fn consume_offset(&self) -> Offset {
        self.consume_offset
    }

    pub fn is_acked(&self, offset: Offset) -> bool {
        offset < self.consume_offset || self.acked_above.contains(&offset)
    }

    /// A group's progress on a queue whose first retained offset is `start`.
    pub fn starting_at(start: Offset) -> GroupOffsets {
        GroupOffsets {
            consume_offset: start,
            acked_above: BTreeSet::new(),
        }
    }

    /// Acknowledges `offset`; returns whether it was new.
    pub fn ack(&mut self, offset: Offset) -> bool {
        if self.is_acked(offset) {
            return false;
        }
        self.acked_above.insert(offset);
        self.close_gap();
        true
    }

    /// Counts every offset below `start` as acknowledged (retention dropped them); forward
    /// only, so a consume offset already past `start` stays where it is.
    pub fn advance_to(&mut self, start: Offset) {
        if start <= self.consume_offset {
            return;
        }
        self.consume_offset = start;
        // Acks below the new consume offset are implied by it now.
        self.acked_above = self.acked_above.split_off(&start);
        self.close_gap();
    }

    fn close_gap(&mut self) {
        while self.acked_above.remove(&self.consume_offset) {
            self.consume_offset += 1;
        }
    }

    /// Whether this is a state `ack` can build on a queue ending at `end` (acks of offsets at
    /// or past the end are refused); a snapshot holding anything else is refused on restore.
    /// The consume offset may lag the queue's start: the planted bug
    /// `overwrite-consume-offset` moves it back, and readers take the larger of the two.
    pub(super) fn consistent(&self, end: Offset) -> bool {
        self.consume_offset <= end
            && self
                .acked_above
                .first()
                .is_none_or(|first| *first > self.consume_offset)
            && self.acked_above.last().is_none_or(|last| *last < end)
    }

    /// The planted bug `overwrite-consume-offset`: the consume offset jumps past the latest
    /// ack, forward or back.
    pub fn overwrite(&mut self, offset: Offset) {
        self.consume_offset = offset + 1;
        self.acked_above.clear();
    }

    /// Acknowledgements held above the consume offset (bounded by the consumer's in-flight
    /// window in practice).
    pub fn pending_acks(&self) -> usize {
        self.acked_above.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consume_offset_is_the_lowest_unacked_and_never_moves_back() {
        let mut offsets = GroupOffsets::default();
        assert!(offsets.ack(2));
        assert!(offsets.ack(1));
        assert_eq!(offsets.consume_offset(), 0);
        assert!(offsets.ack(0));
        assert_eq!(offsets.consume_offset(), 3);
        assert!(!offsets.ack(1), "an old ack is a no-op");
        assert_eq!(offsets.consume_offset(), 3);
        assert_eq!(offsets.pending_acks(), 0);
        assert!(offsets.ack(5));
        assert!(offsets.is_acked(5) && !offsets.is_acked(4) && !offsets.is_acked(3));
    }

    #[test]
    fn retention_moves_the_consume_offset_forward_only_and_closes_gaps() {
        let mut offsets = GroupOffsets::default();
        assert!(offsets.ack(0));
        assert!(offsets.ack(4));
        assert!(offsets.ack(6));
        offsets.advance_to(3);
        assert_eq!(offsets.consume_offset(), 3);
        assert_eq!(offsets.pending_acks(), 2);
        offsets.advance_to(4);
        assert_eq!(offsets.consume_offset(), 5, "the ack of 4 closes the gap");
        assert_eq!(offsets.pending_acks(), 1);
        offsets.advance_to(2);
        assert_eq!(offsets.consume_offset(), 5, "never back");
        assert!(!offsets.ack(1), "an ack below the start is a no-op");
        assert!(offsets.consistent(7));
        assert!(!offsets.consistent(6), "an ack at or past the end");
        assert!(!offsets.consistent(4), "a consume offset past the end");
        assert_eq!(GroupOffsets::starting_at(9).consume_offset(), 9);
    }

    /// Found by mutation testing: an ack held above the consume offset is never *at* it (the
    /// gap would have closed), so a snapshot holding one is refused.
    #[test]
    fn an_ack_held_at_the_consume_offset_is_inconsistent() {
        let held_at = |consume_offset, acked: &[Offset]| GroupOffsets {
            consume_offset,
            acked_above: acked.iter().copied().collect(),
        };
        assert!(held_at(3, &[4, 6]).consistent(7));
        assert!(!held_at(3, &[3, 6]).consistent(7));
        assert!(!held_at(3, &[2]).consistent(7));
    }

    /// The planted bug `overwrite-consume-offset` must do what it says for its canary to mean
    /// anything: the consume offset lands just past the ack, back as well as forward.
    #[test]
    fn the_planted_overwrite_bug_moves_the_consume_offset_back() {
        let mut offsets = GroupOffsets::default();
        for offset in [0, 1, 2, 5] {
            offsets.ack(offset);
        }
        offsets.overwrite(0);
        assert_eq!((offsets.consume_offset(), offsets.pending_acks()), (1, 0));
        offsets.overwrite(7);
        assert_eq!(offsets.consume_offset(), 8);
    }
}
