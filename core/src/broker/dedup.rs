//! Idempotent append: which batches each producer has written recently, and where.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::{Offset, ProducerId, QueueId, Refusal, Seq};

/// How many of a producer's most recent sequence numbers are remembered. A retry older than
/// this is refused rather than written twice.
pub use crate::limits::DEDUP_WINDOW_SEQS;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Batch {
    queue: QueueId,
    base_offset: Offset,
    len: u64,
}

/// One producer's recent batches, by first sequence number. It outlives the messages it points
/// at: a retry of a batch that retention has dropped still gets the batch's original offsets,
/// not a second copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ProducerWindow {
    batches: BTreeMap<Seq, Batch>,
    seq_max: Seq,
    /// When the producer last wrote a batch, counted in batches the group has recorded: its
    /// place in the least-recently-used order by which producers are forgotten (see
    /// `BrokerState`). Part of the applied state, so every replica forgets the same one.
    pub(super) touched: u64,
}

/// A window as snapshots of version 1 hold it, before `touched`.
#[derive(Deserialize)]
pub(super) struct ProducerWindowV1 {
    batches: BTreeMap<Seq, Batch>,
    seq_max: Seq,
}

impl From<ProducerWindowV1> for ProducerWindow {
    /// Every producer of an old snapshot counts as used at once; ties go by producer id.
    fn from(v1: ProducerWindowV1) -> ProducerWindow {
        ProducerWindow {
            batches: v1.batches,
            seq_max: v1.seq_max,
            touched: 0,
        }
    }
}

/// What the window says about a batch about to be appended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    New,
    /// Written before: these are its original offsets.
    Duplicate {
        queue: QueueId,
        base_offset: Offset,
    },
}

impl ProducerWindow {
    pub(super) fn check(
        &self,
        producer_id: ProducerId,
        first_seq: Seq,
        len: u64,
    ) -> Result<Verdict, Refusal> {
        let last_seq = first_seq.saturating_add(len.saturating_sub(1));
        if let Some(batch) = self.batches.get(&first_seq)
            && batch.len == len
        {
            return Ok(Verdict::Duplicate {
                queue: batch.queue.clone(),
                base_offset: batch.base_offset,
            });
        }
        // Any remembered batch that shares a sequence number with this one?
        let overlapping = self
            .batches
            .range(..=last_seq)
            .next_back()
            .is_some_and(|(first, b)| first + (b.len - 1) >= first_seq);
        if overlapping {
            return Err(Refusal::SequenceOverlap {
                producer_id,
                seq: first_seq,
            });
        }
        if self.seq_max >= DEDUP_WINDOW_SEQS && first_seq <= self.seq_max - DEDUP_WINDOW_SEQS {
            return Err(Refusal::SequenceTooOld {
                producer_id,
                seq: first_seq,
            });
        }
        Ok(Verdict::New)
    }

    /// The planted bug `DedupBySeqMax`: anything numbered at or below the highest sequence
    /// number passes for a retry of the latest batch.
    pub(super) fn check_by_seq_max(&self, first_seq: Seq) -> Verdict {
        match self.batches.iter().next_back() {
            Some((_, batch)) if first_seq <= self.seq_max => Verdict::Duplicate {
                queue: batch.queue.clone(),
                base_offset: batch.base_offset,
            },
            _ => Verdict::New,
        }
    }

    /// Whether every batch is one `record` can have written (at least one sequence number,
    /// none past `Seq::MAX` or `seq_max`), so the arithmetic above cannot overflow on a
    /// restored window.
    pub(super) fn consistent(&self) -> bool {
        self.batches.iter().all(|(first, b)| {
            b.len >= 1
                && first
                    .checked_add(b.len - 1)
                    .is_some_and(|last| last <= self.seq_max)
        })
    }

    pub(super) fn record(&mut self, first_seq: Seq, len: u64, queue: QueueId, base_offset: Offset) {
        self.batches.insert(
            first_seq,
            Batch {
                queue,
                base_offset,
                len,
            },
        );
        self.seq_max = self.seq_max.max(first_seq + len.saturating_sub(1));
        if self.seq_max >= DEDUP_WINDOW_SEQS {
            let floor = self.seq_max - DEDUP_WINDOW_SEQS;
            // Keep batches that still hold a sequence number inside the window.
            let keep_from = self
                .batches
                .range(..=floor)
                .next_back()
                .filter(|(first, b)| *first + (b.len - 1) >= floor)
                .map_or(floor + 1, |(first, _)| *first);
            // Usually one batch goes, or none: popped in place, where `split_off` built a
            // new tree for each batch recorded (2.7 % of a publishing node's CPU).
            while let Some(first) = self.batches.first_entry() {
                if *first.key() >= keep_from {
                    break;
                }
                first.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Seq = DEDUP_WINDOW_SEQS;

    fn q() -> QueueId {
        QueueId::new("orders", 0)
    }

    fn window(batches: &[(Seq, u64)]) -> ProducerWindow {
        let mut window = ProducerWindow::default();
        for (i, &(first, len)) in batches.iter().enumerate() {
            window.record(first, len, q(), i as Offset * 100);
        }
        window
    }

    fn check(window: &ProducerWindow, first_seq: Seq, len: u64) -> Result<Verdict, Refusal> {
        window.check(1, first_seq, len)
    }

    fn duplicate_at(base_offset: Offset) -> Result<Verdict, Refusal> {
        Ok(Verdict::Duplicate {
            queue: q(),
            base_offset,
        })
    }

    fn too_old(seq: Seq) -> Result<Verdict, Refusal> {
        Err(Refusal::SequenceTooOld {
            producer_id: 1,
            seq,
        })
    }

    /// Found by mutation testing: a batch that starts right after the last one, or anywhere
    /// past its end, is new (no mutant of the overlap arithmetic may refuse it), and one
    /// sharing a sequence number with it is not.
    #[test]
    fn batches_that_follow_each_other_are_new_and_overlapping_ones_refused() {
        let window = window(&[(0, 3), (3, 2), (5, 4)]);
        assert_eq!(check(&window, 9, 1), Ok(Verdict::New), "right after (5, 4)");
        assert_eq!(check(&window, 11, 3), Ok(Verdict::New), "a gap is allowed");
        assert_eq!(check(&window, 5, 4), duplicate_at(200));
        assert_eq!(
            check(&window, 8, 2),
            Err(Refusal::SequenceOverlap {
                producer_id: 1,
                seq: 8
            })
        );
    }

    /// Found by mutation testing: the window slides exactly `DEDUP_WINDOW_SEQS` behind the
    /// highest sequence number. A retry of a batch that still holds a sequence number above
    /// the floor gets its original offsets; a retry of one wholly at or below it is refused as
    /// too old (never written twice), and so is a new batch there; above it, new batches are
    /// written.
    #[test]
    fn the_window_keeps_exactly_the_batches_that_reach_its_floor() {
        // Every case below has the floor at seq_max - W = 14.
        let latest = (W + 14, 1);
        let spanning = window(&[(10, 5), latest]);
        assert_eq!(
            check(&spanning, 10, 5),
            duplicate_at(0),
            "ends at the floor"
        );
        assert_eq!(check(&spanning, W + 14, 1), duplicate_at(100), "the latest");
        assert_eq!(check(&spanning, W + 15, 1), Ok(Verdict::New));
        assert_eq!(
            check(&spanning, 15, 1),
            Ok(Verdict::New),
            "just above the floor"
        );
        assert_eq!(
            check(&spanning, 14, 1),
            Err(Refusal::SequenceOverlap {
                producer_id: 1,
                seq: 14
            })
        );

        let below = window(&[(10, 4), latest]);
        assert_eq!(
            check(&below, 10, 4),
            too_old(10),
            "ends just below the floor"
        );
        assert_eq!(check(&below, 14, 1), too_old(14), "at the floor");
        let single = window(&[(13, 1), latest]);
        assert_eq!(check(&single, 13, 1), too_old(13));
        assert_eq!(single.batches.len(), 1, "only the latest is remembered");
    }

    #[test]
    fn a_window_from_a_version_1_snapshot_keeps_its_batches() {
        let old = window(&[(0, 3), (3, 2)]);
        let v1 = ProducerWindowV1 {
            batches: old.batches.clone(),
            seq_max: old.seq_max,
        };
        let restored = ProducerWindow::from(v1);
        assert_eq!(restored, ProducerWindow { touched: 0, ..old });
        assert_eq!(check(&restored, 3, 2), duplicate_at(100));
    }

    /// The planted bug `dedup-by-seq-max` must do what it says for its canary to mean
    /// anything: a batch at or below the highest sequence number passes for a retry of the
    /// latest batch.
    #[test]
    fn the_planted_dedup_bug_takes_any_old_sequence_number_for_the_latest_batch() {
        let window = window(&[(0, 3), (3, 2)]);
        assert_eq!(
            window.check_by_seq_max(0),
            Verdict::Duplicate {
                queue: q(),
                base_offset: 100
            }
        );
        assert_eq!(
            window.check_by_seq_max(4),
            Verdict::Duplicate {
                queue: q(),
                base_offset: 100
            }
        );
        assert_eq!(window.check_by_seq_max(5), Verdict::New);
        assert_eq!(ProducerWindow::default().check_by_seq_max(0), Verdict::New);
    }
}
