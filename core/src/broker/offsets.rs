//! A consumer group's progress on one queue.

use std::collections::BTreeSet;

use super::types::Offset;

/// The consume offset is the lowest offset not yet acknowledged; acknowledgements above it are
/// kept until the gap below them closes. It never moves back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

    /// Acknowledges `offset`; returns whether it was new.
    pub fn ack(&mut self, offset: Offset) -> bool {
        if self.is_acked(offset) {
            return false;
        }
        self.acked_above.insert(offset);
        while self.acked_above.remove(&self.consume_offset) {
            self.consume_offset += 1;
        }
        true
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
}
