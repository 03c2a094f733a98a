//! The `plan_recovery` target: the core's recovery decisions over arbitrary directory listings.
//!
//! [`plan_recovery`] decides what a group's directory means after a crash, and
//! [`plan_queue_recovery`] what a queue's store segments must become; both read only what a
//! driver found on disk, so any listing and any bytes must give a plan (or a `RecoveryError`
//! that names what the input lacks), never a panic. Three kinds of input: a listing of raw
//! files (state, synced record, snapshot, segments with arbitrary first indexes and bytes, some
//! not read); a log encoded from entries, split into segments, beside an optional snapshot and
//! a valid state file, then damaged; and a queue's segments against a snapshot's range.
//!
//! Checked on every plan: it removes and keeps only segments the listing has, never one both
//! kept and removed; the entries it starts with are contiguous and follow its snapshot; a kept
//! segment's layout stays within its bytes. For an undamaged encoded log, the plan keeps every
//! entry after the snapshot and reports no damage. For a queue: it removes exactly the
//! segments at or past `end`, and reports a lack exactly when `start..end` is not covered.

use std::collections::BTreeSet;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use holdfast_core::raft::{Entry, EntryKind, HardState, Index, Snapshot};
use holdfast_core::storage::{
    QueueSegment, RecoveryInput, RecoveryPlan, SLOT_BYTES, STATE_BYTES, SegmentFile, SnapshotFile,
    encode_entry, encode_snapshot, encode_state_slot, next_slot, plan_queue_recovery,
    plan_recovery, segments_to_read,
};

/// More segments, entries or damages than this in one input are ignored.
const SEGMENTS_MAX: usize = 16;
const ENTRIES_MAX: usize = 64;
const DAMAGES_MAX: usize = 4;

#[derive(Arbitrary, Debug)]
enum Input {
    Listing {
        state: Vec<u8>,
        synced: Option<u64>,
        snapshot: Option<(u64, Vec<u8>)>,
        /// First index (small or any), bytes (`None`: not read).
        segments: Vec<(SmallIndex, Option<Vec<u8>>)>,
        /// Read only the segments `segments_to_read` asks for, as the drivers do.
        read_as_drivers_do: bool,
    },
    Encoded {
        /// `% 3`: how much each entry's term rises.
        term_steps: Vec<u8>,
        /// A new segment starts before the entries at these positions.
        splits: Vec<u8>,
        /// The snapshot's index (`% (entries + 1)`; 0: none).
        snapshot_at: u8,
        /// The state file's commit (`% (entries + 1)`).
        commit: u8,
        /// The synced record: `None` unreadable, else `% (entries + 1)`.
        synced: Option<u8>,
        /// Damage to one segment: which (`% segments`), and how.
        damages: Vec<(u8, Damage)>,
    },
    Queue {
        segments: Vec<(u16, u16)>,
        start: u16,
        end: u16,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SmallIndex {
    Small(u8),
    Any(u64),
}

impl SmallIndex {
    fn get(self) -> Index {
        match self {
            SmallIndex::Small(i) => Index::from(i),
            SmallIndex::Any(i) => i,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Damage {
    /// The segment ends at this byte (modulo its length + 1).
    Truncate(u16),
    FlipBit {
        at: u16,
        bit: u8,
    },
    Zero {
        at: u16,
        len: u8,
    },
}

impl Damage {
    fn apply(self, bytes: &mut Vec<u8>) {
        match self {
            Damage::Truncate(at) => bytes.truncate(usize::from(at) % (bytes.len() + 1)),
            Damage::FlipBit { at, bit } => {
                if !bytes.is_empty() {
                    let at = usize::from(at) % bytes.len();
                    bytes[at] ^= 1 << (bit % 8);
                }
            }
            Damage::Zero { at, len } => {
                let from = usize::from(at).min(bytes.len());
                let to = (from + usize::from(len)).min(bytes.len());
                bytes[from..to].fill(0);
            }
        }
    }
}

/// What one run reached; used by the corpus test to show the corpus is not trivial.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub plans: usize,
    pub refused: usize,
    pub entries_kept: usize,
    pub damaged: usize,
    pub torn: usize,
    pub state_lost: usize,
    pub snapshots_used: usize,
    pub removed_trailing: usize,
    pub removed_leading: usize,
    pub queue_plans: usize,
    pub queue_cuts: usize,
    pub queue_lacks: usize,
}

/// The properties every plan of `input` has.
fn check_plan(input: &RecoveryInput<'_>, plan: &RecoveryPlan) {
    let listed: BTreeSet<Index> = input.segments.iter().map(|s| s.first).collect();
    let kept: BTreeSet<Index> = plan.segments.iter().map(|s| s.first).collect();
    for first in plan
        .remove_trailing
        .iter()
        .chain(&plan.remove_leading)
        .chain(&kept)
    {
        assert!(
            listed.contains(first),
            "the plan names segment {first}, which is not listed"
        );
    }
    for first in plan.remove_trailing.iter().chain(&plan.remove_leading) {
        assert!(
            !kept.contains(first),
            "segment {first} both kept and removed"
        );
    }
    let base = plan.snapshot.as_ref().map_or(0, |s| s.index);
    for (i, entry) in plan.entries.iter().enumerate() {
        assert_eq!(
            Some(entry.index),
            base.checked_add(i as Index + 1),
            "the log the plan starts with is not contiguous after its snapshot at {base}"
        );
    }
    for segment in &plan.segments {
        assert_eq!(segment.starts.len(), segment.terms.len());
        let len = input
            .segments
            .iter()
            .find(|s| s.first == segment.first)
            .and_then(|s| s.bytes)
            .map(|b| b.len() as u64);
        if let Some(len) = len {
            assert!(
                segment.valid_len <= len,
                "segment {} keeps {} bytes of {len}",
                segment.first,
                segment.valid_len
            );
            for start in &segment.starts {
                assert!(*start < segment.valid_len.max(1));
            }
        }
    }
}

fn count(stats: &mut PlanStats, plan: &RecoveryPlan) {
    stats.plans += 1;
    stats.entries_kept += plan.entries.len();
    stats.damaged += usize::from(plan.damage.is_some());
    stats.torn += usize::from(plan.torn.is_some());
    stats.state_lost += usize::from(plan.state_lost.is_some());
    stats.snapshots_used += usize::from(plan.snapshot.is_some());
    stats.removed_trailing += plan.remove_trailing.len();
    stats.removed_leading += plan.remove_leading.len();
}

fn state_file(commit: Index) -> Vec<u8> {
    let mut file = vec![0u8; STATE_BYTES];
    let at = next_slot(0) * SLOT_BYTES;
    let hard_state = HardState {
        term: 1,
        vote: Some(1),
        commit,
    };
    file[at..at + SLOT_BYTES].copy_from_slice(&encode_state_slot(1, &hard_state));
    file
}

fn listing(stats: &mut PlanStats, input: &RecoveryInput<'_>) {
    match plan_recovery(input) {
        Ok(plan) => {
            check_plan(input, &plan);
            count(stats, &plan);
        }
        Err(_) => stats.refused += 1,
    }
}

#[allow(clippy::too_many_arguments)]
fn encoded(
    stats: &mut PlanStats,
    term_steps: &[u8],
    splits: &[u8],
    snapshot_at: u8,
    commit: u8,
    synced: Option<u8>,
    damages: &[(u8, Damage)],
) {
    let mut term = 1;
    let entries: Vec<Entry> = term_steps
        .iter()
        .take(ENTRIES_MAX)
        .enumerate()
        .map(|(i, step)| {
            term += u64::from(step % 3);
            Entry {
                term,
                index: i as Index + 1,
                kind: if step % 2 == 0 {
                    EntryKind::Noop
                } else {
                    EntryKind::Commands(vec![Bytes::from(vec![*step; usize::from(*step % 16)])])
                },
            }
        })
        .collect();
    let n = entries.len() as u64;
    let cut_before: BTreeSet<usize> = splits
        .iter()
        .take(SEGMENTS_MAX)
        .map(|s| usize::from(*s) % (entries.len() + 1))
        .filter(|at| *at > 0)
        .collect();
    let mut segments: Vec<(Index, Vec<u8>)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if i == 0 || cut_before.contains(&i) {
            segments.push((entry.index, Vec::new()));
        }
        if let Some((_, bytes)) = segments.last_mut()
            && encode_entry(entry, bytes).is_err()
        {
            return;
        }
    }
    let snapshot_index = u64::from(snapshot_at) % (n + 1);
    let snapshot = (snapshot_index > 0).then(|| {
        let at = entries[(snapshot_index - 1) as usize].term;
        let snapshot = Snapshot {
            index: snapshot_index,
            term: at,
            data: Bytes::from_static(b"state"),
            membership: None,
        };
        SnapshotFile {
            index: snapshot_index,
            bytes: Bytes::from(encode_snapshot(&snapshot)),
        }
    });
    let clean = damages.is_empty();
    for (which, damage) in damages.iter().take(DAMAGES_MAX) {
        if segments.is_empty() {
            break;
        }
        let at = usize::from(*which) % segments.len();
        damage.apply(&mut segments[at].1);
    }
    let state = state_file(u64::from(commit) % (n + 1));
    let synced = synced.map(|s| u64::from(s) % (n + 1));
    let firsts: Vec<Index> = segments.iter().map(|(f, _)| *f).collect();
    let from = segments_to_read(snapshot.as_ref().map(|s| s.index), &firsts);
    let input = RecoveryInput {
        state: &state,
        synced,
        snapshot,
        segments: segments
            .iter()
            .enumerate()
            .map(|(i, (first, bytes))| SegmentFile {
                first: *first,
                bytes: (i >= from).then_some(bytes.as_slice()),
            })
            .collect(),
    };
    let plan = match plan_recovery(&input) {
        Ok(plan) => plan,
        Err(e) => {
            assert!(!clean, "an undamaged log read as the drivers read it: {e}");
            stats.refused += 1;
            return;
        }
    };
    check_plan(&input, &plan);
    count(stats, &plan);
    if clean && synced.is_some() {
        assert!(plan.damage.is_none(), "an undamaged log: {:?}", plan.damage);
        assert!(plan.torn.is_none(), "an undamaged log: {:?}", plan.torn);
        assert_eq!(
            plan.entries.len() as u64,
            n - snapshot_index,
            "every entry kept"
        );
    }
}

fn queue(stats: &mut PlanStats, segments: &[(u16, u16)], start: u16, end: u16) {
    // Sorted by first offset and not overlapping, as a store's file names make them.
    let mut listed: Vec<QueueSegment> = Vec::new();
    let mut next = 0u64;
    for (gap, count) in segments.iter().take(SEGMENTS_MAX) {
        let first = next + u64::from(*gap % 8);
        let count = 1 + u64::from(*count % 64);
        listed.push(QueueSegment { first, count });
        next = first + count;
    }
    let (start, end) = (u64::from(start % 512), u64::from(end % 512));
    let (start, end) = (start.min(end), start.max(end));
    let plan = plan_queue_recovery(&listed, start, end);
    stats.queue_plans += 1;
    stats.queue_cuts += usize::from(plan.cut.is_some());
    stats.queue_lacks += usize::from(plan.lacks.is_some());
    let at_or_past: Vec<u64> = listed
        .iter()
        .filter(|s| s.first >= end)
        .map(|s| s.first)
        .collect();
    assert_eq!(
        plan.remove, at_or_past,
        "removes exactly what starts at or past the end"
    );
    if let Some((first, keep)) = plan.cut {
        assert!(first + keep == end, "a cut keeps up to the end");
    }
    let held = |offset: u64| {
        listed
            .iter()
            .any(|s| s.first <= offset && offset < s.first + s.count)
    };
    let first_missing = (start..end).find(|o| !held(*o));
    assert_eq!(
        plan.lacks, first_missing,
        "lacks the first offset no segment holds"
    );
}

pub fn run_plan_recovery(data: &[u8]) -> PlanStats {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return PlanStats::default();
    };
    let mut stats = PlanStats::default();
    match input {
        Input::Listing {
            state,
            synced,
            snapshot,
            mut segments,
            read_as_drivers_do,
        } => {
            segments.truncate(SEGMENTS_MAX);
            let mut files: Vec<(Index, Option<Vec<u8>>)> =
                segments.into_iter().map(|(f, b)| (f.get(), b)).collect();
            files.sort_by_key(|(first, _)| *first);
            files.dedup_by_key(|(first, _)| *first);
            let snapshot = snapshot.map(|(index, bytes)| SnapshotFile {
                index,
                bytes: Bytes::from(bytes),
            });
            let from = if read_as_drivers_do {
                let firsts: Vec<Index> = files.iter().map(|(f, _)| *f).collect();
                segments_to_read(snapshot.as_ref().map(|s| s.index), &firsts)
            } else {
                0
            };
            let input = RecoveryInput {
                state: &state,
                synced,
                snapshot,
                segments: files
                    .iter()
                    .enumerate()
                    .map(|(i, (first, bytes))| SegmentFile {
                        first: *first,
                        bytes: if read_as_drivers_do && i < from {
                            None
                        } else {
                            bytes.as_deref()
                        },
                    })
                    .collect(),
            };
            listing(&mut stats, &input);
        }
        Input::Encoded {
            term_steps,
            splits,
            snapshot_at,
            commit,
            synced,
            damages,
        } => encoded(
            &mut stats,
            &term_steps,
            &splits,
            snapshot_at,
            commit,
            synced,
            &damages,
        ),
        Input::Queue {
            segments,
            start,
            end,
        } => queue(&mut stats, &segments, start, end),
    }
    stats
}

pub fn plan_recovery_target(data: &[u8]) {
    run_plan_recovery(data);
}
