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
            self.batches = self.batches.split_off(&keep_from);
        }
    }
}
