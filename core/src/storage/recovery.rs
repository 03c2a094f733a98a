//! What a replica's files mean after a crash: one pure decision, shared by the shell's
//! `GroupStore` and the simulator's disk, so that the simulator runs the recovery production
//! ships (DESIGN.md §3).
//!
//! # Input ([`RecoveryInput`])
//!
//! What a driver reads from a group's directory, and nothing else:
//!
//! - the bytes of the state file (two hard-state slots, [`super::state`]; empty if missing);
//! - the index the synced record claims (every entry up to it was synced and reported
//!   durable), or `None` when that record is unreadable;
//! - the newest snapshot file, by the index in its name, with its bytes;
//! - every log segment, by the index of its first record (its name), sorted, with its bytes
//!   for those from [`segments_to_read`] on (earlier ones the snapshot holds entirely: they
//!   need not be read).
//!
//! # Output ([`RecoveryPlan`])
//!
//! What the files hold, and what the driver must do to them, in this order:
//!
//! 1. on damage, record it durably (the shell's `damaged` marker) before cutting anything, and
//!    set every snapshot file aside if [`RecoveryPlan::set_aside_snapshots`];
//! 2. delete [`RecoveryPlan::remove_trailing`], newest first, each durable before the next (a
//!    crash half way leaves a prefix of the log);
//! 3. truncate the last kept segment to its `valid_len` if it is `cut` (a torn tail, or the
//!    valid prefix before damage);
//! 4. delete [`RecoveryPlan::remove_leading`] (the snapshot holds every entry they hold).
//!
//! The plan also carries the hard state, the snapshot and the log entries to start the replica
//! with, each kept segment's layout (where each record starts, and its term), the torn tail
//! cut ([`TornTail`]), the damage found ([`FoundDamage`]: the first index that may be lost,
//! where, and why) and whether the state file was lost ([`StateLost`]).
//!
//! # Rules
//!
//! - The newest snapshot must decode and hold the index its name says, or everything is
//!   damage from index 1: no older snapshot is used in its place, since the log it replaced
//!   may be gone.
//! - Segments the snapshot holds entirely (every segment before the last one starting at or
//!   below its index) are skipped: a compaction that a crash interrupted may have removed them
//!   in any order. The rest must each start where the one before ended, and only the last may
//!   end in a torn tail; a bad record followed by a valid one, or by another segment, is damage.
//! - What the scan keeps goes through [`log_after_snapshot`]: a log that does not continue the
//!   snapshot (what an interrupted discard left) is removed; one that misses entries after it
//!   is damage ([`LogGap`]).
//! - The log must reach the commit of the state file and the index of the synced record:
//!   short of either, the "torn tail" was synced data, and that is damage. With the synced
//!   record unreadable, any torn tail may have been synced: damage too. The synced record does
//!   not count for a log that holds the snapshot's index under another term: that log was
//!   replaced, and the record, lowered only once the snapshot is durable (so that a crash
//!   before it keeps the old log's synced entries protected), may still name its end.
//! - A state file that is missing or empty beside a log, a snapshot or a synced record above
//!   0, or that does not decode, lost this replica's votes ([`StateLost`]).
//!
//! The function never fails on bad bytes: bad bytes are torn tails or damage. It fails
//! ([`RecoveryError`]) only when the input lacks a segment's bytes that the decision needs.

use core::fmt;

use bytes::Bytes;

use crate::broker::Offset;
use crate::raft::{Entry, HardState, Index, Snapshot, Term};

use super::record::{CorruptReason, ScanOutcome, find_record_after, record_len_bytes, scan};
use super::snapshot::{LogGap, SnapshotFileError, decode_snapshot, log_after_snapshot};
use super::state::{StateError, decode_stored_state};

/// One log segment file: the index of its first record (from its name) and, if read, its bytes.
#[derive(Clone, Copy, Debug)]
pub struct SegmentFile<'a> {
    pub first: Index,
    /// `None` for a segment the driver did not read (before [`segments_to_read`]).
    pub bytes: Option<&'a [u8]>,
}

/// The newest snapshot file: the index its name carries, and its bytes.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    pub index: Index,
    pub bytes: Bytes,
}

/// What a driver read from a group's directory (see the module's notes).
#[derive(Clone, Debug, Default)]
pub struct RecoveryInput<'a> {
    /// The state file's bytes, empty when it is missing.
    pub state: &'a [u8],
    /// The synced record's index; `None` when it is unreadable.
    pub synced: Option<Index>,
    /// The newest snapshot file, if any.
    pub snapshot: Option<SnapshotFile>,
    /// Every segment, sorted by first index.
    pub segments: Vec<SegmentFile<'a>>,
}

/// The position in `firsts` (segments' first indexes, sorted) of the first segment whose bytes
/// recovery needs, given the index in the newest snapshot file's name: the last segment that
/// starts at or below the snapshot's index holds the snapshot's own entry, which tells a log
/// that continues the snapshot from one that an installed snapshot replaced; every segment
/// before it is held entirely by the snapshot.
pub fn segments_to_read(snapshot: Option<Index>, firsts: &[Index]) -> usize {
    match snapshot {
        Some(base) => firsts.iter().rposition(|first| *first <= base).unwrap_or(0),
        None => 0,
    }
}

/// The input lacks what the decision needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryError {
    /// The bytes of the segment starting at `first` were not read, and are needed.
    NotRead { first: Index },
    /// A record of a segment decoded but cannot be laid out again (its length overflows).
    RecordLen {
        first: Index,
        offset: u64,
        index: Index,
    },
}

impl fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryError::NotRead { first } => write!(
                f,
                "recovery needs the segment starting at index {first}, which was not read"
            ),
            RecoveryError::RecordLen {
                first,
                offset,
                index,
            } => write!(
                f,
                "the record of index {index} at byte {offset} of segment {first} is too long to lay out"
            ),
        }
    }
}

impl std::error::Error for RecoveryError {}

/// A file of the group's directory that a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRef {
    /// The segment whose first index this is.
    Segment(Index),
    /// The snapshot file named for this index.
    Snapshot(Index),
    /// The directory itself (no file holds what is missing).
    Directory,
}

/// Why a record does not read: the scan's verdict when every byte counts as synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRecord(pub ScanOutcome);

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ScanOutcome::Corrupt { reason, .. } => reason.fmt(f),
            other => other.fmt(f),
        }
    }
}

impl BadRecord {
    fn of(bytes: &[u8], first: Index) -> BadRecord {
        BadRecord(scan(bytes, bytes.len() as u64, first).outcome)
    }

    /// The reason, when the scan found a corrupt record.
    pub fn reason(&self) -> Option<CorruptReason> {
        match self.0 {
            ScanOutcome::Corrupt { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Why the files hold less than was durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DamageCause {
    /// The newest snapshot does not decode.
    SnapshotUnreadable(SnapshotFileError),
    /// The newest snapshot holds another index than its name says.
    SnapshotMisnamed { named: Index, holds: Index },
    /// A segment does not start where the one before it ends.
    Misplaced { first: Index, expected: Index },
    /// The log does not reach back to the snapshot.
    Gap(LogGap),
    /// A bad record with a valid one after it in the same segment.
    BadRecordBeforeRecord {
        why: BadRecord,
        index: Index,
        offset: u64,
    },
    /// A bad record with another segment after its own.
    BadRecordBeforeSegment { why: BadRecord, later: Index },
    /// The log ends (cleanly, or in a torn tail) before the state file's commit.
    ShortOfCommit {
        commit: Index,
        last: Index,
        why: Option<BadRecord>,
    },
    /// The log ends before the synced record's index.
    ShortOfSynced {
        synced: Index,
        last: Index,
        why: Option<BadRecord>,
    },
    /// A torn tail, and no synced record to tell that it was not synced.
    SyncedUnreadable { why: Option<BadRecord> },
}

fn why_text(why: &Option<BadRecord>) -> String {
    match why {
        Some(why) => why.to_string(),
        None => "the log ends cleanly".to_string(),
    }
}

impl fmt::Display for DamageCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NO_OLDER: &str =
            "no older state is used in its place, since the log it replaced may be gone";
        match self {
            DamageCause::SnapshotUnreadable(e) => {
                write!(f, "the snapshot is unreadable ({e}); {NO_OLDER}")
            }
            DamageCause::SnapshotMisnamed { named, holds } => write!(
                f,
                "the snapshot is unreadable (it holds the snapshot at index {holds} but is named for index {named}); {NO_OLDER}"
            ),
            DamageCause::Misplaced { first, expected } => write!(
                f,
                "the segment starts at index {first} but the one before it ends at index {}: segments are missing or misplaced",
                expected.saturating_sub(1)
            ),
            DamageCause::Gap(gap) => gap.fmt(f),
            DamageCause::BadRecordBeforeRecord { why, index, offset } => write!(
                f,
                "{why}; a valid record (index {index}) follows at byte {offset}, so this is damage inside the log, not a torn tail"
            ),
            DamageCause::BadRecordBeforeSegment { why, later } => write!(
                f,
                "{why}; segment {later} follows, so this is damage inside the log, not a torn tail"
            ),
            DamageCause::ShortOfCommit { commit, last, why } => write!(
                f,
                "the state file says {commit} entries are committed but only {last} are readable ({})",
                why_text(why)
            ),
            DamageCause::ShortOfSynced { synced, last, why } => write!(
                f,
                "the synced record says the log was synced through index {synced} but only {last} entries are readable ({})",
                why_text(why)
            ),
            DamageCause::SyncedUnreadable { why } => write!(
                f,
                "the synced record is unreadable, so the torn tail may have been synced ({})",
                why_text(why)
            ),
        }
    }
}

/// Damage that recovery found: the first index that may be lost, and where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundDamage {
    /// Every entry from here on may be lost (one past the last entry kept).
    pub from: Index,
    pub file: FileRef,
    /// The byte of `file` where the damage starts, when known.
    pub offset: Option<u64>,
    /// The log index the finding is about.
    pub index: Option<Index>,
    pub cause: DamageCause,
}

/// A torn tail: bytes of a write that never finished syncing, cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The segment it ends.
    pub segment: Index,
    /// Where the first bad record starts (the segment's new length).
    pub at: u64,
    pub dropped_bytes: u64,
    /// Why the record at `at` does not read.
    pub why: BadRecord,
}

/// A segment that stays, and its layout after the plan is carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptSegment {
    pub first: Index,
    /// Where the record of index `first + i` starts.
    pub starts: Vec<u64>,
    /// That record's term.
    pub terms: Vec<Term>,
    /// The bytes that stay.
    pub valid_len: u64,
    /// The file is longer than `valid_len`: truncate it there.
    pub cut: bool,
}

impl KeptSegment {
    /// The index of the record after its last.
    pub fn next_index(&self) -> Index {
        self.first + self.starts.len() as Index
    }
}

/// The state file cannot say what this replica voted: its votes are lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateLost {
    /// Missing or empty, though the directory holds a log, a snapshot or a synced record.
    MissingBesideLog,
    /// Written, and unreadable now.
    Damaged(StateError),
}

impl fmt::Display for StateLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateLost::MissingBesideLog => write!(
                f,
                "the state file is missing or empty though the group's directory holds a log"
            ),
            StateLost::Damaged(e) => write!(f, "the state file is damaged ({e})"),
        }
    }
}

/// What recovery decided (see the module's notes for the order in which a driver carries it
/// out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryPlan {
    /// The hard state to start with (the default when the state file is missing or lost).
    pub hard_state: HardState,
    /// The sequence of the state file's newest valid slot (0 without one).
    pub state_sequence: u64,
    pub state_lost: Option<StateLost>,
    /// The snapshot to start with.
    pub snapshot: Option<Snapshot>,
    /// The log after the snapshot, contiguous.
    pub entries: Vec<Entry>,
    /// The segments that stay, oldest first; only the last may be `cut`.
    pub segments: Vec<KeptSegment>,
    /// Segments to delete, newest first: behind damage, or a whole log that the snapshot
    /// replaced.
    pub remove_trailing: Vec<Index>,
    /// Segments whose every entry the snapshot holds, oldest first.
    pub remove_leading: Vec<Index>,
    /// Every snapshot file is refused: set them aside.
    pub set_aside_snapshots: bool,
    pub damage: Option<FoundDamage>,
    pub torn: Option<TornTail>,
}

/// Decides what `input` holds and what to do with the files: see the module's notes.
pub fn plan_recovery(input: &RecoveryInput<'_>) -> Result<RecoveryPlan, RecoveryError> {
    let holds_log = !input.segments.is_empty()
        || input.snapshot.is_some()
        || input.synced.is_some_and(|index| index > 0);
    let (state_sequence, hard_state, state_lost) = match decode_stored_state(input.state) {
        Ok(Some(stored)) => (stored.sequence, stored.hard_state, None),
        Ok(None) if !holds_log => (0, HardState::default(), None),
        Ok(None) => (0, HardState::default(), Some(StateLost::MissingBesideLog)),
        Err(e) => (0, HardState::default(), Some(StateLost::Damaged(e))),
    };
    let mut plan = plan_log(input, hard_state.commit)?;
    plan.hard_state = hard_state;
    plan.state_sequence = state_sequence;
    plan.state_lost = state_lost;
    Ok(plan)
}

fn plan_log(input: &RecoveryInput<'_>, commit: Index) -> Result<RecoveryPlan, RecoveryError> {
    let firsts: Vec<Index> = input.segments.iter().map(|s| s.first).collect();
    let mut plan = RecoveryPlan {
        hard_state: HardState::default(),
        state_sequence: 0,
        state_lost: None,
        snapshot: None,
        entries: Vec::new(),
        segments: Vec::new(),
        remove_trailing: Vec::new(),
        remove_leading: Vec::new(),
        set_aside_snapshots: false,
        damage: None,
        torn: None,
    };
    if let Some(file) = &input.snapshot {
        let refused = match decode_snapshot(file.bytes.clone()) {
            Ok(snapshot) if snapshot.index == file.index => {
                plan.snapshot = Some(snapshot);
                None
            }
            Ok(snapshot) => Some(DamageCause::SnapshotMisnamed {
                named: file.index,
                holds: snapshot.index,
            }),
            Err(e) => Some(DamageCause::SnapshotUnreadable(e)),
        };
        if let Some(cause) = refused {
            plan.remove_trailing = firsts.iter().rev().copied().collect();
            plan.set_aside_snapshots = true;
            plan.damage = Some(FoundDamage {
                from: 1,
                file: FileRef::Snapshot(file.index),
                offset: None,
                index: Some(file.index),
                cause,
            });
            return Ok(plan);
        }
    }
    let (base, base_term) = plan.snapshot.as_ref().map_or((0, 0), |s| (s.index, s.term));
    let start = segments_to_read(plan.snapshot.as_ref().map(|s| s.index), &firsts);
    plan.remove_leading = firsts.get(..start).unwrap_or_default().to_vec();
    let candidates = input.segments.get(start..).unwrap_or_default();

    let mut segments: Vec<KeptSegment> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut trailing: Vec<Index> = Vec::new();
    let mut problem: Option<FoundDamage> = None;
    let mut torn: Option<TornTail> = None;
    for (k, file) in candidates.iter().enumerate() {
        let first = file.first;
        let later = candidates.get(k + 1..).unwrap_or_default();
        let misplaced = match segments.last().map(KeptSegment::next_index) {
            Some(expected) if first != expected => {
                Some((expected, DamageCause::Misplaced { first, expected }))
            }
            None if first > base.saturating_add(1) => {
                let gap = LogGap {
                    expected: base.saturating_add(1),
                    found: first,
                };
                Some((gap.expected, DamageCause::Gap(gap)))
            }
            _ => None,
        };
        if let Some((index, cause)) = misplaced {
            problem = Some(FoundDamage {
                from: index,
                file: FileRef::Segment(first),
                offset: Some(0),
                index: Some(index),
                cause,
            });
            trailing.extend(
                candidates
                    .get(k..)
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s.first),
            );
            break;
        }
        let bytes = file.bytes.ok_or(RecoveryError::NotRead { first })?;
        let found = scan(bytes, 0, first);
        let last_term = found
            .entries
            .last()
            .or(entries.last())
            .map_or(0, |e| e.term);
        let mut segment = KeptSegment {
            first,
            starts: Vec::with_capacity(found.entries.len()),
            terms: Vec::with_capacity(found.entries.len()),
            valid_len: found.valid_len,
            cut: false,
        };
        let mut offset = 0u64;
        for entry in &found.entries {
            segment.starts.push(offset);
            segment.terms.push(entry.term);
            let len = record_len_bytes(entry).map_err(|_| RecoveryError::RecordLen {
                first,
                offset,
                index: entry.index,
            })?;
            offset += len as u64;
        }
        entries.extend(found.entries);
        let next = segment.next_index();
        let at = match found.outcome {
            ScanOutcome::Clean => {
                segments.push(segment);
                continue;
            }
            ScanOutcome::TornTail { at } => at,
            // Unreachable with a synced length of 0, but never ignored.
            ScanOutcome::Corrupt { at, .. } => at,
        };
        segment.cut = true;
        let why = BadRecord::of(bytes, first);
        match (find_record_after(bytes, at, next, last_term), later.first()) {
            (None, None) => {
                torn = Some(TornTail {
                    segment: first,
                    at,
                    dropped_bytes: (bytes.len() as u64).saturating_sub(at),
                    why,
                });
            }
            (Some((offset, index)), _) => {
                problem = Some(FoundDamage {
                    from: next,
                    file: FileRef::Segment(first),
                    offset: Some(at),
                    index: Some(next),
                    cause: DamageCause::BadRecordBeforeRecord { why, index, offset },
                });
            }
            (None, Some(later)) => {
                problem = Some(FoundDamage {
                    from: next,
                    file: FileRef::Segment(first),
                    offset: Some(at),
                    index: Some(next),
                    cause: DamageCause::BadRecordBeforeSegment {
                        why,
                        later: later.first,
                    },
                });
            }
        }
        segments.push(segment);
        trailing.extend(later.iter().map(|s| s.first));
        break;
    }

    let snapshot_at = plan.snapshot.as_ref().map(|_| (base, base_term));
    // A log holding the snapshot's index under another term is one the snapshot was installed
    // over (the two cannot share a later entry): the synced record may still describe it, as
    // the record is lowered only once the snapshot is durable.
    let replaced = snapshot_at.is_some()
        && entries
            .iter()
            .any(|e| e.index == base && e.term != base_term);
    let kept = match log_after_snapshot(snapshot_at, entries) {
        Ok(kept) => kept,
        Err(gap) => {
            if problem.is_none() {
                problem = Some(FoundDamage {
                    from: gap.expected,
                    file: segments
                        .first()
                        .map_or(FileRef::Directory, |s| FileRef::Segment(s.first)),
                    offset: Some(0),
                    index: Some(gap.expected),
                    cause: DamageCause::Gap(gap),
                });
            }
            Vec::new()
        }
    };
    let last = kept.last().map_or(base, |e| e.index);
    if kept.is_empty() {
        // Nothing continues the snapshot: what is left is a log that an installed snapshot
        // replaced (its removal was interrupted), entries the snapshot holds, or nothing.
        // All of it goes, so that the next append starts a fresh segment after the snapshot.
        let mut all: Vec<Index> = segments.drain(..).map(|s| s.first).collect();
        all.append(&mut trailing);
        trailing = all;
        torn = None;
    }
    trailing.reverse();

    let damage = match problem {
        // Whatever the scan found, everything after the last entry kept may be lost.
        Some(found) => Some(FoundDamage {
            from: last.saturating_add(1),
            ..found
        }),
        None => {
            let why = torn.map(|t| t.why);
            let cause = if last < commit {
                Some(DamageCause::ShortOfCommit { commit, last, why })
            } else if let Some(synced) = input.synced.filter(|synced| last < *synced && !replaced) {
                Some(DamageCause::ShortOfSynced { synced, last, why })
            } else if input.synced.is_none() && torn.is_some() {
                Some(DamageCause::SyncedUnreadable { why })
            } else {
                None
            };
            cause.map(|cause| {
                let (file, offset) = match &torn {
                    Some(torn) => (FileRef::Segment(torn.segment), Some(torn.at)),
                    None => (
                        segments
                            .last()
                            .map_or(FileRef::Directory, |s| FileRef::Segment(s.first)),
                        segments.last().map(|s| s.valid_len),
                    ),
                };
                FoundDamage {
                    from: last.saturating_add(1),
                    file,
                    offset,
                    index: Some(last.saturating_add(1)),
                    cause,
                }
            })
        }
    };
    plan.entries = kept;
    plan.segments = segments;
    plan.remove_trailing = trailing;
    plan.damage = damage;
    plan.torn = torn;
    Ok(plan)
}

/// One segment of a queue in the queue store: its first offset (from its name) and how many
/// records it holds (its torn tail, if any, already cut: see the shell's `queue_store.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSegment {
    pub first: Offset,
    pub count: u64,
}

impl QueueSegment {
    fn end(&self) -> Offset {
        self.first.saturating_add(self.count)
    }
}

/// What a queue's segments must become for a restart from a metadata snapshot that says the
/// queue holds `start..end` ([`crate::broker::StoreOp::Recover`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueRecoveryPlan {
    /// Segments (by first offset) that start at or past `end`: written after the snapshot,
    /// maybe torn; replaying the log writes them again. Delete them (and their indexes).
    pub remove: Vec<Offset>,
    /// The newest segment that stays holds records at or past `end`: keep only its first
    /// `keep` records (`(first offset, keep)`), and drop its sealed index.
    pub cut: Option<(Offset, u64)>,
    /// The first offset of `start..end` that no segment holds: the store lacks what the
    /// snapshot references, and the restart must be refused.
    pub lacks: Option<Offset>,
}

/// Decides what a queue's `segments` (sorted by first offset) must become for a restart from a
/// snapshot whose range of the queue is `start..end`: see [`QueueRecoveryPlan`].
pub fn plan_queue_recovery(
    segments: &[QueueSegment],
    start: Offset,
    end: Offset,
) -> QueueRecoveryPlan {
    let mut plan = QueueRecoveryPlan::default();
    let mut kept: Vec<QueueSegment> = Vec::with_capacity(segments.len());
    for segment in segments {
        if segment.first >= end {
            plan.remove.push(segment.first);
        } else {
            kept.push(*segment);
        }
    }
    if let Some(last) = kept.last_mut()
        && last.end() > end
    {
        last.count = end - last.first;
        plan.cut = Some((last.first, last.count));
    }
    // Every offset of start..end must be there, in segments that follow each other.
    let mut next = start;
    for segment in &kept {
        if segment.end() <= next {
            continue;
        }
        if segment.first > next {
            break;
        }
        next = segment.end();
    }
    if next < end {
        plan.lacks = Some(next);
    }
    plan
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::raft::EntryKind;
    use crate::storage::record::encode_entry;
    use crate::storage::snapshot::encode_snapshot;
    use crate::storage::state::{SLOT_BYTES, STATE_BYTES, encode_state_slot, next_slot};

    fn entry(index: Index, term: Term) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Noop,
        }
    }

    /// A segment of `entries` and where each record ends.
    fn segment(entries: &[Entry]) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for e in entries {
            encode_entry(e, &mut bytes).expect("encodes");
            ends.push(bytes.len() as u64);
        }
        (bytes, ends)
    }

    fn state(commit: Index) -> Vec<u8> {
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

    fn one<'a>(
        state: &'a [u8],
        synced: Option<Index>,
        first: Index,
        bytes: &'a [u8],
    ) -> RecoveryInput<'a> {
        RecoveryInput {
            state,
            synced,
            snapshot: None,
            segments: vec![SegmentFile {
                first,
                bytes: Some(bytes),
            }],
        }
    }

    fn ids(entries: &[Entry]) -> Vec<Index> {
        entries.iter().map(|e| e.index).collect()
    }

    fn log(n: Index) -> Vec<Entry> {
        (1..=n).map(|i| entry(i, 1)).collect()
    }

    #[test]
    fn an_empty_directory_is_a_first_start() {
        let plan = plan_recovery(&RecoveryInput::default()).expect("plans");
        assert_eq!(plan.hard_state, HardState::default());
        assert_eq!(plan.state_lost, None);
        assert_eq!(plan.damage, None);
        assert!(plan.entries.is_empty() && plan.segments.is_empty());
    }

    #[test]
    fn a_torn_tail_past_the_synced_record_is_cut() {
        let (mut bytes, ends) = segment(&log(5));
        bytes.truncate(ends[3] as usize + 7);
        let state = state(2);
        let plan = plan_recovery(&one(&state, Some(3), 1, &bytes)).expect("plans");
        assert_eq!(plan.damage, None);
        assert_eq!(ids(&plan.entries), vec![1, 2, 3, 4]);
        let kept = &plan.segments[0];
        assert!(kept.cut);
        assert_eq!(kept.valid_len, ends[3]);
        assert_eq!(kept.starts.len(), 4);
        assert_eq!(
            plan.torn.map(|t| (t.segment, t.at, t.dropped_bytes)),
            Some((1, ends[3], 7))
        );
    }

    #[test]
    fn a_tail_the_synced_record_claims_is_damage() {
        let (mut bytes, ends) = segment(&log(5));
        bytes.truncate(ends[3] as usize + 7);
        let state = state(2);
        let plan = plan_recovery(&one(&state, Some(5), 1, &bytes)).expect("plans");
        let damage = plan.damage.expect("damage");
        assert_eq!(damage.from, 5);
        assert_eq!(damage.file, FileRef::Segment(1));
        assert_eq!(damage.offset, Some(ends[3]));
        assert!(damage.cause.to_string().contains("synced through index 5"));
        // The valid prefix is what the replica starts with, and the tail is cut.
        assert_eq!(ids(&plan.entries), vec![1, 2, 3, 4]);
        assert!(plan.segments[0].cut);
    }

    #[test]
    fn a_log_short_of_the_commit_is_damage_and_an_unreadable_synced_record_makes_a_tail_damage() {
        let (bytes, _) = segment(&log(3));
        let state5 = state(5);
        let plan = plan_recovery(&one(&state5, Some(0), 1, &bytes)).expect("plans");
        let cause = plan.damage.expect("damage").cause;
        assert!(
            matches!(
                cause,
                DamageCause::ShortOfCommit {
                    commit: 5,
                    last: 3,
                    ..
                }
            ),
            "{cause}"
        );

        let (mut bytes, _) = segment(&log(3));
        bytes.push(9);
        let state0 = state(0);
        let plan = plan_recovery(&one(&state0, None, 1, &bytes)).expect("plans");
        let cause = plan.damage.expect("damage").cause;
        assert!(
            matches!(cause, DamageCause::SyncedUnreadable { .. }),
            "{cause}"
        );
    }

    #[test]
    fn a_bad_record_followed_by_a_valid_one_is_damage_not_a_torn_tail() {
        let (mut bytes, ends) = segment(&log(5));
        bytes[ends[1] as usize + 10] ^= 0x40;
        let state = state(0);
        let plan = plan_recovery(&one(&state, Some(0), 1, &bytes)).expect("plans");
        let damage = plan.damage.expect("damage");
        assert_eq!(damage.from, 3);
        assert!(
            matches!(
                damage.cause,
                DamageCause::BadRecordBeforeRecord { index: 4, .. }
            ),
            "{}",
            damage.cause
        );
        assert_eq!(ids(&plan.entries), vec![1, 2]);
    }

    #[test]
    fn a_bad_record_before_another_segment_is_damage_and_the_later_segments_go() {
        let (mut a, ends) = segment(&log(3));
        let (b, _) = segment(&[entry(4, 1), entry(5, 1)]);
        let (c, _) = segment(&[entry(6, 1)]);
        a.truncate(ends[2] as usize - 1);
        let state = state(0);
        let input = RecoveryInput {
            state: &state,
            synced: Some(0),
            snapshot: None,
            segments: vec![
                SegmentFile {
                    first: 1,
                    bytes: Some(&a),
                },
                SegmentFile {
                    first: 4,
                    bytes: Some(&b),
                },
                SegmentFile {
                    first: 6,
                    bytes: Some(&c),
                },
            ],
        };
        let plan = plan_recovery(&input).expect("plans");
        let damage = plan.damage.expect("damage");
        assert_eq!(damage.from, 3);
        assert!(matches!(
            damage.cause,
            DamageCause::BadRecordBeforeSegment { later: 4, .. }
        ));
        assert_eq!(plan.remove_trailing, vec![6, 4]);
        assert_eq!(plan.segments.len(), 1);
    }

    #[test]
    fn a_missing_segment_is_damage_from_where_the_log_breaks() {
        let (a, _) = segment(&log(3));
        let (c, _) = segment(&[entry(6, 1)]);
        let state = state(0);
        let input = RecoveryInput {
            state: &state,
            synced: Some(0),
            snapshot: None,
            segments: vec![
                SegmentFile {
                    first: 1,
                    bytes: Some(&a),
                },
                SegmentFile {
                    first: 6,
                    bytes: Some(&c),
                },
            ],
        };
        let plan = plan_recovery(&input).expect("plans");
        let damage = plan.damage.expect("damage");
        assert_eq!((damage.from, damage.file), (4, FileRef::Segment(6)));
        assert!(damage.cause.to_string().contains("segments are missing"));
        assert_eq!(plan.remove_trailing, vec![6]);
        assert_eq!(ids(&plan.entries), vec![1, 2, 3]);
    }

    fn snapshot_at(index: Index, term: Term) -> Snapshot {
        Snapshot {
            index,
            term,
            data: Bytes::from_static(b"state"),
            membership: None,
        }
    }

    #[test]
    fn segments_the_snapshot_holds_are_removed_unread_and_the_log_continues_it() {
        let (b, _) = segment(&[entry(4, 1), entry(5, 1), entry(6, 1)]);
        let (c, _) = segment(&[entry(7, 1)]);
        let state = state(6);
        let firsts = [1, 4, 7];
        assert_eq!(segments_to_read(Some(5), &firsts), 1);
        let input = RecoveryInput {
            state: &state,
            synced: Some(7),
            snapshot: Some(SnapshotFile {
                index: 5,
                bytes: Bytes::from(encode_snapshot(&snapshot_at(5, 1))),
            }),
            segments: vec![
                SegmentFile {
                    first: 1,
                    bytes: None,
                },
                SegmentFile {
                    first: 4,
                    bytes: Some(&b),
                },
                SegmentFile {
                    first: 7,
                    bytes: Some(&c),
                },
            ],
        };
        let plan = plan_recovery(&input).expect("plans");
        assert_eq!(plan.damage, None);
        assert_eq!(plan.remove_leading, vec![1]);
        assert_eq!(ids(&plan.entries), vec![6, 7]);
        assert_eq!(
            plan.segments.iter().map(|s| s.first).collect::<Vec<_>>(),
            vec![4, 7]
        );
    }

    #[test]
    fn an_unreadable_snapshot_is_damage_from_one_and_everything_goes() {
        let (b, _) = segment(&[entry(6, 1)]);
        let mut snap = encode_snapshot(&snapshot_at(5, 1));
        let last = snap.len() - 1;
        snap[last] ^= 1;
        let state = state(5);
        let input = RecoveryInput {
            state: &state,
            synced: Some(6),
            snapshot: Some(SnapshotFile {
                index: 5,
                bytes: Bytes::from(snap),
            }),
            segments: vec![SegmentFile {
                first: 6,
                bytes: Some(&b),
            }],
        };
        let plan = plan_recovery(&input).expect("plans");
        let damage = plan.damage.expect("damage");
        assert_eq!((damage.from, damage.file), (1, FileRef::Snapshot(5)));
        assert!(plan.set_aside_snapshots);
        assert_eq!(plan.remove_trailing, vec![6]);
        assert!(plan.snapshot.is_none() && plan.entries.is_empty());
    }

    /// One segment from index 1 beside `snapshot`, with the synced record at `synced`.
    fn beside<'a>(
        state: &'a [u8],
        synced: Index,
        snapshot: Snapshot,
        log: &'a [u8],
    ) -> RecoveryInput<'a> {
        RecoveryInput {
            state,
            synced: Some(synced),
            snapshot: Some(SnapshotFile {
                index: snapshot.index,
                bytes: Bytes::from(encode_snapshot(&snapshot)),
            }),
            segments: vec![SegmentFile {
                first: 1,
                bytes: Some(log),
            }],
        }
    }

    #[test]
    fn a_replaced_log_beside_an_installed_snapshot_goes_without_damage() {
        // An installed snapshot at 10@3 replaced a log whose removal stopped half way.
        let (a, _) = segment(&[entry(1, 1), entry(2, 1)]);
        let state = state(10);
        let plan = plan_recovery(&beside(&state, 2, snapshot_at(10, 3), &a)).expect("plans");
        assert_eq!(plan.damage, None);
        assert_eq!(plan.remove_trailing, vec![1]);
        assert!(plan.segments.is_empty() && plan.entries.is_empty());
    }

    #[test]
    fn a_replaced_log_the_synced_record_still_describes_goes_without_damage() {
        // A crash after the installed snapshot at 3@3 was renamed into place and before the
        // synced record was lowered for the discard: the record still names the old log's end.
        let (a, _) = segment(&[entry(1, 1), entry(2, 1), entry(3, 1), entry(4, 1)]);
        let state = state(3);
        let plan = plan_recovery(&beside(&state, 4, snapshot_at(3, 3), &a)).expect("plans");
        assert_eq!(plan.damage, None);
        assert_eq!(plan.remove_trailing, vec![1]);
        assert!(plan.entries.is_empty());

        // The same files with the snapshot's own entry in the log: a log that continues the
        // snapshot and lost a synced entry, which is damage.
        let (b, _) = segment(&[entry(1, 1), entry(2, 1), entry(3, 3)]);
        let plan = plan_recovery(&beside(&state, 4, snapshot_at(3, 3), &b)).expect("plans");
        let damage = plan.damage.expect("damage");
        assert_eq!(damage.from, 4);
        assert!(damage.cause.to_string().contains("synced through index 4"));
    }

    #[test]
    fn a_segment_it_needs_and_was_not_given_is_an_error() {
        let state = state(0);
        let input = RecoveryInput {
            state: &state,
            synced: Some(0),
            snapshot: None,
            segments: vec![SegmentFile {
                first: 1,
                bytes: None,
            }],
        };
        assert_eq!(
            plan_recovery(&input),
            Err(RecoveryError::NotRead { first: 1 })
        );
    }

    #[test]
    fn a_lost_state_file_beside_a_log_loses_the_votes() {
        let (a, _) = segment(&log(2));
        let plan = plan_recovery(&one(&[], Some(2), 1, &a)).expect("plans");
        assert_eq!(plan.state_lost, Some(StateLost::MissingBesideLog));
        let garbage = vec![0xAB; STATE_BYTES];
        let plan = plan_recovery(&one(&garbage, Some(2), 1, &a)).expect("plans");
        assert!(matches!(plan.state_lost, Some(StateLost::Damaged(_))));
    }

    #[test]
    fn a_queue_keeps_its_range_and_drops_what_follows_it() {
        let seg = |first, count| QueueSegment { first, count };
        // Segments 0..10, 10..20 (of which 15.. were written after the snapshot), 20..25.
        let plan = plan_queue_recovery(&[seg(0, 10), seg(10, 10), seg(20, 5)], 3, 15);
        assert_eq!(plan.remove, vec![20]);
        assert_eq!(plan.cut, Some((10, 5)));
        assert_eq!(plan.lacks, None);
        // A segment missing in the middle of the range is refused, naming the first offset.
        let plan = plan_queue_recovery(&[seg(0, 10), seg(12, 10)], 3, 15);
        assert_eq!(plan.lacks, Some(10));
        // Retention may have deleted what lies below the start.
        let plan = plan_queue_recovery(&[seg(10, 10)], 12, 20);
        assert_eq!(plan, QueueRecoveryPlan::default());
        // An empty range needs nothing; a store that holds nothing of a range lacks its start.
        assert_eq!(plan_queue_recovery(&[], 5, 5), QueueRecoveryPlan::default());
        assert_eq!(plan_queue_recovery(&[], 5, 7).lacks, Some(5));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any crash leaves the synced records whole and some prefix of the bytes after them:
        /// recovery keeps a prefix of the log holding every synced record, and reports no damage.
        #[test]
        fn a_torn_tail_recovers_a_prefix_holding_every_synced_record(
            terms in proptest::collection::vec(1u64..4, 1..20),
            synced_frac in 0.0f64..=1.0,
            landed_frac in 0.0f64..=1.0,
            noise in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut terms = terms;
            terms.sort();
            let entries: Vec<Entry> = terms.iter().enumerate().map(|(i, t)| entry(i as Index + 1, *t)).collect();
            let (bytes, ends) = segment(&entries);
            let synced = ((entries.len() as f64) * synced_frac) as usize;
            let synced_len = if synced == 0 { 0 } else { ends[synced - 1] as usize };
            let landed = synced_len + ((bytes.len() - synced_len) as f64 * landed_frac) as usize;
            let mut file = bytes[..landed].to_vec();
            // What the platter held past the landed bytes: a torn write leaves garbage.
            file.extend_from_slice(&noise);
            let state = state(synced as Index);
            let plan = plan_recovery(&one(&state, Some(synced as Index), 1, &file)).expect("plans");
            prop_assert_eq!(plan.damage.as_ref().map(|d| d.cause.to_string()), None);
            let got = ids(&plan.entries);
            prop_assert!(got.len() >= synced, "{} < {}", got.len(), synced);
            prop_assert_eq!(&plan.entries[..], &entries[..got.len()]);
            prop_assert_eq!(plan.segments.first().map_or(0, |s| s.valid_len), if got.is_empty() { 0 } else { ends[got.len() - 1] });
            // Nothing kept: the whole segment goes, so the next append starts a fresh one.
            prop_assert_eq!(plan.segments.is_empty(), got.is_empty());
        }

        /// A flipped bit in a synced record is reported as damage, never silently dropped.
        #[test]
        fn a_flipped_bit_in_a_synced_record_is_damage(
            terms in proptest::collection::vec(1u64..4, 1..20),
            synced_frac in 0.0f64..=1.0,
            at_frac in 0.0f64..1.0,
            bit in 0u8..8,
            unsynced_landed in any::<bool>(),
        ) {
            let mut terms = terms;
            terms.sort();
            let entries: Vec<Entry> = terms.iter().enumerate().map(|(i, t)| entry(i as Index + 1, *t)).collect();
            let (bytes, ends) = segment(&entries);
            let synced = (((entries.len() as f64) * synced_frac) as usize).max(1);
            let synced_len = ends[synced - 1] as usize;
            let mut file = if unsynced_landed { bytes.clone() } else { bytes[..synced_len].to_vec() };
            let at = ((synced_len as f64) * at_frac) as usize;
            file[at] ^= 1 << bit;
            let state = state(0);
            let plan = plan_recovery(&one(&state, Some(synced as Index), 1, &file)).expect("plans");
            let damage = plan.damage.as_ref();
            prop_assert!(damage.is_some(), "a flipped bit at byte {} of {} synced bytes went unreported", at, synced_len);
            let from = damage.map_or(0, |d| d.from);
            // Everything before the damaged record is kept, and nothing from it on.
            let hit = ends.iter().position(|end| (at as u64) < *end).unwrap_or(0) as Index + 1;
            prop_assert!(from <= hit, "damage from {} but the flip is in record {}", from, hit);
            prop_assert_eq!(ids(&plan.entries), (1..from).collect::<Vec<_>>());
        }
    }
}
