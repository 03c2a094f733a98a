//! Opening a group's directory: recovery of its snapshot, log segments, state and synced
//! record, through the core's pure formats (`scan`, `decode_snapshot`, `log_after_snapshot`,
//! `decode_stored_state`), as the simulator's disk recovers.
//!
//! Recovery first decides everything (a [`Plan`]) and only then touches the files, so that a
//! refusing open (`GroupStore::open` on damage) changes nothing, and a repairing one writes the
//! damage marker before it cuts anything.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use holdfast_core::raft::{Damage, Entry, GroupId, HardState, Index, Recovered, Snapshot};
use holdfast_core::storage::{
    LogGap, STATE_BYTES, ScanOutcome, decode_snapshot, decode_stored_state, find_record_after,
    log_after_snapshot, record_len_bytes, scan,
};
use tracing::{error, info, warn};

use super::files::{
    DAMAGE_MARKER, LEGACY_LOG_FILE, Listing, SET_ASIDE_SUFFIX, STATE_FILE, SYNCED_FILE,
    create_dir_durable, io_error, list_dir, open_file, read_damage_marker, read_synced,
    remove_file, segment_name, sync_dir, write_damage_marker,
};
use super::group_store::{GroupStore, Segment};
use super::{StorageConfig, StorageError};

impl GroupStore {
    /// Opens (creating when missing) `dir/group-<id>/` and recovers what it holds.
    ///
    /// A torn tail of the log (bytes of a write that never finished syncing) is cut off.
    /// Damage that may cover acknowledged data is [`StorageError::Corrupt`], and nothing is
    /// changed: see [`GroupStore::open_repairing`] for starting anyway.
    pub fn open(
        dir: &Path,
        group: GroupId,
        config: &StorageConfig,
    ) -> Result<(GroupStore, Recovered), StorageError> {
        Self::open_with(dir, group, config, false).map(|(store, recovered, _)| (store, recovered))
    }

    /// Like [`GroupStore::open`], but damage is not refused: the log is cut back to its valid
    /// prefix and the replica starts [`Damage`]d, so it neither votes nor campaigns until a
    /// leader has repaired it from its peers (the core's rule; see `Replica::damaged_from`). A
    /// `damaged` marker file, synced before the cut, keeps that across restarts until
    /// [`GroupStore::clear_damage`] removes it. A snapshot that fails its checksum is damage
    /// from index 1: the replica starts with no snapshot and no log rather than from an older
    /// state whose log may be gone.
    pub fn open_repairing(
        dir: &Path,
        group: GroupId,
        config: &StorageConfig,
    ) -> Result<(GroupStore, Recovered, Option<Damage>), StorageError> {
        Self::open_with(dir, group, config, true)
    }

    /// The replica of `group` has been repaired: forget its damage.
    pub fn clear_damage(dir: &Path, group: GroupId) -> Result<(), StorageError> {
        let group_dir = dir.join(format!("group-{group}"));
        let marker = group_dir.join(DAMAGE_MARKER);
        match fs::remove_file(&marker) {
            Ok(()) => sync_dir(&group_dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&marker, "remove", e)),
        }
    }

    fn open_with(
        dir: &Path,
        group: GroupId,
        config: &StorageConfig,
        repair: bool,
    ) -> Result<(GroupStore, Recovered, Option<Damage>), StorageError> {
        let group_dir = dir.join(format!("group-{group}"));
        create_dir_durable(&group_dir)?;
        let state_path = group_dir.join(STATE_FILE);
        let synced_path = group_dir.join(SYNCED_FILE);
        let (state, _) = open_file(&state_path)?;
        let (synced, _) = open_file(&synced_path)?;
        migrate_legacy_log(&group_dir)?;
        let listing = list_dir(&group_dir)?;
        for temp in &listing.temps {
            // A snapshot whose write never finished: nothing refers to it.
            remove_file(temp)?;
        }
        // What a killed process wrote may still be in the page cache only, readable but not
        // durable; the core takes everything in `Recovered` as durable, and the synced record
        // will claim it, so it is synced before anything is trusted or built on. Segments are
        // synced as they are read. Once per start, so the cost does not matter.
        let mut fsyncs = 0;
        for (file, path) in [(&state, &state_path), (&synced, &synced_path)] {
            file.sync_data()
                .map_err(|e| io_error(path, "fdatasync", e))?;
            fsyncs += 1;
        }
        sync_dir(&group_dir)?;
        fsyncs += 1;
        let synced_record = read_synced(&synced, &synced_path)?;
        // The state slot is synced before any segment is written, so a log (or a snapshot,
        // or a synced record) beside a missing, empty or unreadable state file means the
        // state was lost: with it, the memory of this replica's votes. Taking it for a first
        // start could vote twice in one term; it is damage, and the replica never votes again
        // (as with a wiped disk).
        let holds_log = !listing.segments.is_empty()
            || !listing.snapshots.is_empty()
            || synced_record.index.is_some_and(|index| index > 0);
        let (state_sequence, hard_state, state_lost) = match read_state(&state, &state_path)? {
            StateRead::Present(sequence, hard_state) => (sequence, hard_state, None),
            StateRead::Missing if !holds_log => (0, HardState::default(), None),
            StateRead::Missing => (
                0,
                HardState::default(),
                Some(
                    "the state file is missing or empty though the group's directory holds a log"
                        .to_string(),
                ),
            ),
            StateRead::Damaged(reason) => (
                0,
                HardState::default(),
                Some(format!("the state file is damaged ({reason})")),
            ),
        };
        if let Some(reason) = &state_lost {
            if !repair {
                return Err(StorageError::Corrupt {
                    path: state_path,
                    offset: None,
                    index: None,
                    reason: reason.clone(),
                });
            }
            error!(
                path = %state_path.display(),
                "{reason}: this replica's term and votes are lost, so it will never vote or \
                 campaign again (as after a wiped disk); its log is dropped and fetched again \
                 from the leader"
            );
        }
        let synced_index = synced_record.index;
        let marker = group_dir.join(DAMAGE_MARKER);
        let earlier = read_damage_marker(&marker)?;
        let plan = plan(
            &group_dir,
            &listing,
            hard_state.commit,
            synced_index,
            &mut fsyncs,
        )?;
        let (snapshot_index, snapshot_term) =
            plan.snapshot.as_ref().map_or((0, 0), |s| (s.index, s.term));
        let mut store = GroupStore {
            dir: group_dir.clone(),
            state_path,
            state,
            synced_path,
            synced,
            segment_bytes_max: config.segment_bytes_max,
            segments: Vec::new(),
            doomed: Vec::new(),
            discard_staged: false,
            staged_snapshot: None,
            snapshot_index,
            snapshot_term,
            dir_dirty: false,
            durable_floor: 0,
            state_sequence,
            written: hard_state,
            latest: hard_state,
            state_dirty: false,
            synced_record,
            fsyncs,
            failed: None,
            #[cfg(test)]
            crash_after_steps: None,
            #[cfg(test)]
            steps: 0,
        };
        let damage = match plan.damage {
            None => earlier,
            Some(found) if repair => {
                let from = earlier.map_or(found.from, |earlier| earlier.min(found.from));
                error!(
                    path = %found.path.display(),
                    offset = ?found.offset,
                    from,
                    "{}; cutting the log back to its valid prefix: this replica will not vote until its peers have repaired it",
                    found.reason
                );
                write_damage_marker(&group_dir, &marker, from)?;
                // Never above what survives the cut, or the next start would call the cut
                // itself damage (harmlessly, the marker is there, but noisily).
                let keep = found.from.saturating_sub(1);
                if synced_index.is_none_or(|index| index > keep) {
                    store.write_synced(keep)?;
                }
                for path in &plan.set_aside {
                    let mut aside = path.clone().into_os_string();
                    aside.push(SET_ASIDE_SUFFIX);
                    fs::rename(path, &aside).map_err(|e| io_error(path, "rename", e))?;
                    warn!(path = %path.display(), "set the snapshot aside as {}", Path::new(&aside).display());
                }
                if !plan.set_aside.is_empty() {
                    store.sync_dir()?;
                }
                Some(from)
            }
            Some(found) => {
                return Err(StorageError::Corrupt {
                    path: found.path,
                    offset: found.offset,
                    index: found.index,
                    reason: found.reason,
                });
            }
        };
        if !plan.trailing.is_empty() && damage.is_none() {
            info!(
                path = %group_dir.display(),
                segments = plan.trailing.len(),
                snapshot = snapshot_index,
                "removing a log that the snapshot replaced (a crash interrupted its removal)"
            );
        }
        for path in &plan.trailing {
            // Newest first, each durable before the next: a crash leaves a prefix.
            remove_file(path)?;
            store.sync_dir()?;
        }
        let mut segments = plan.segments;
        if let Some(segment) = segments.last_mut().filter(|s| s.cut) {
            let file = segment.file.as_ref().ok_or_else(|| StorageError::Io {
                path: segment.path.clone(),
                op: "truncate",
                source: std::io::Error::other("the segment file is not open"),
            })?;
            file.set_len(segment.written)
                .map_err(|e| io_error(&segment.path, "truncate", e))?;
            file.sync_data()
                .map_err(|e| io_error(&segment.path, "fdatasync", e))?;
            store.fsyncs += 1;
            segment.cut = false;
            if let Some(torn) = plan.torn.as_ref().filter(|_| damage.is_none()) {
                warn!(
                    path = %torn.path.display(),
                    dropped_bytes = torn.dropped_bytes,
                    last_index = segment.last(),
                    "cut a torn tail off the log"
                );
            }
        }
        for path in &plan.leading {
            // Oldest first; the snapshot holds all of them, so any order would do.
            remove_file(path)?;
            store.dir_dirty = true;
        }
        if store.dir_dirty {
            store.sync_dir()?;
        }
        store.segments = segments;
        store.durable_floor = store.last_index();
        Ok((
            store,
            Recovered {
                hard_state,
                snapshot: plan.snapshot,
                entries: plan.entries,
            },
            match state_lost {
                Some(_) => Some(Damage {
                    from: 1,
                    votes_lost: true,
                }),
                None => damage.map(|from| Damage {
                    from,
                    votes_lost: false,
                }),
            },
        ))
    }
}

/// What the state file holds.
enum StateRead {
    Present(u64, HardState),
    /// Missing or empty: nothing was ever written to it.
    Missing,
    /// Written, and unreadable now.
    Damaged(String),
}

/// Damage that recovery found: where, and the first index that may be lost.
struct Found {
    from: Index,
    path: PathBuf,
    offset: Option<u64>,
    index: Option<Index>,
    reason: String,
}

struct Torn {
    path: PathBuf,
    at: u64,
    dropped_bytes: u64,
    /// Why the record at `at` does not read, for a message should this be damage after all.
    why: String,
}

/// What recovery decided, before any file is changed.
struct Plan {
    snapshot: Option<Snapshot>,
    /// The segments that stay, with their layout; the last is cut to `written` if `cut`.
    segments: Vec<Segment>,
    /// The log after the snapshot, as `log_after_snapshot` has it.
    entries: Vec<Entry>,
    /// Segment files to delete, newest first: behind damage, or a whole log that the snapshot
    /// replaced.
    trailing: Vec<PathBuf>,
    /// Segment files whose every entry the snapshot holds, oldest first.
    leading: Vec<PathBuf>,
    /// Snapshot files recovery refuses to use.
    set_aside: Vec<PathBuf>,
    damage: Option<Found>,
    torn: Option<Torn>,
}

/// Reads the newest snapshot and the segments after it and decides what they hold.
///
/// Rules: the newest snapshot must decode, or everything is damage from index 1. Segments the
/// snapshot holds entirely (every segment before the last one starting at or below its index)
/// are skipped, unread: a compaction that a crash interrupted may have removed them in any
/// order. The rest must each start where the one before ended, and only the
/// last may end in a torn tail; a bad record followed by a valid one is damage too. What the
/// scan keeps goes through `log_after_snapshot`. Last, the log must reach the commit of the
/// state file and the index of the synced record: short of either, the "torn tail" was synced
/// data, and that is damage.
fn plan(
    dir: &Path,
    listing: &Listing,
    commit: Index,
    synced: Option<Index>,
    fsyncs: &mut u64,
) -> Result<Plan, StorageError> {
    let paths = |list: &[(Index, PathBuf)]| -> Vec<PathBuf> {
        list.iter().map(|(_, path)| path.clone()).collect()
    };
    let snapshot = match listing.snapshots.last() {
        None => None,
        Some((index, path)) => match read_snapshot(path, *index)? {
            Ok(snapshot) => Some(snapshot),
            Err(reason) => {
                let mut trailing = paths(&listing.segments);
                trailing.reverse();
                return Ok(Plan {
                    snapshot: None,
                    segments: Vec::new(),
                    entries: Vec::new(),
                    trailing,
                    leading: Vec::new(),
                    set_aside: paths(&listing.snapshots),
                    damage: Some(Found {
                        from: 1,
                        path: path.clone(),
                        offset: None,
                        index: Some(*index),
                        reason: format!(
                            "the snapshot is unreadable ({reason}); no older state is used in its place, since the log it replaced may be gone"
                        ),
                    }),
                    torn: None,
                });
            }
        },
    };
    let (base, base_term) = snapshot.as_ref().map_or((0, 0), |s| (s.index, s.term));
    // The scan starts at the segment holding the snapshot's own entry, if any does: that entry
    // is what tells `log_after_snapshot` a log that continues the snapshot from one that an
    // installed snapshot replaced, so starting after it could keep a replaced log.
    let start = match &snapshot {
        Some(_) => listing
            .segments
            .iter()
            .rposition(|(first, _)| *first <= base)
            .unwrap_or(0),
        None => 0,
    };
    let leading = paths(listing.segments.get(..start).unwrap_or_default());
    let candidates = listing.segments.get(start..).unwrap_or_default();

    let mut segments: Vec<Segment> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut trailing: Vec<PathBuf> = Vec::new();
    let mut problem: Option<Found> = None;
    let mut torn: Option<Torn> = None;
    for (k, (first, path)) in candidates.iter().enumerate() {
        let later = candidates.get(k + 1..).unwrap_or_default();
        let expected = segments.last().map(Segment::next_index);
        let misplaced = match expected {
            Some(expected) if *first != expected => Some((
                expected,
                format!(
                    "the segment starts at index {first} but the one before it ends at index {}: segments are missing or misplaced",
                    expected.saturating_sub(1)
                ),
            )),
            None if *first > base.saturating_add(1) => {
                let gap = LogGap {
                    expected: base.saturating_add(1),
                    found: *first,
                };
                Some((gap.expected, gap.to_string()))
            }
            _ => None,
        };
        if let Some((index, reason)) = misplaced {
            problem = Some(Found {
                from: index,
                path: path.clone(),
                offset: Some(0),
                index: Some(index),
                reason,
            });
            trailing.extend(paths(candidates.get(k..).unwrap_or_default()));
            break;
        }
        let (mut segment, bytes) = read_segment(*first, path, fsyncs)?;
        let found = scan(&bytes, 0, *first);
        let last_term = found
            .entries
            .last()
            .or(entries.last())
            .map_or(0, |e| e.term);
        let mut offset = 0;
        for entry in &found.entries {
            segment.starts.push(offset);
            segment.terms.push(entry.term);
            let len = record_len_bytes(entry).map_err(|e| StorageError::Corrupt {
                path: path.clone(),
                offset: Some(offset),
                index: Some(entry.index),
                reason: e.to_string(),
            })?;
            offset += len as u64;
        }
        segment.written = found.valid_len;
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
        let why = damage_reason(&bytes, *first);
        let after = find_record_after(&bytes, at, next, last_term);
        match (after, later.first()) {
            (None, None) => {
                torn = Some(Torn {
                    path: path.clone(),
                    at,
                    dropped_bytes: (bytes.len() as u64).saturating_sub(at),
                    why,
                });
            }
            (Some((offset, index)), _) => {
                problem = Some(Found {
                    from: next,
                    path: path.clone(),
                    offset: Some(at),
                    index: Some(next),
                    reason: format!(
                        "{why}; a valid record (index {index}) follows at byte {offset}, so this is damage inside the log, not a torn tail"
                    ),
                });
            }
            (None, Some((_, later_path))) => {
                problem = Some(Found {
                    from: next,
                    path: path.clone(),
                    offset: Some(at),
                    index: Some(next),
                    reason: format!(
                        "{why}; segment {} follows, so this is damage inside the log, not a torn tail",
                        later_path.display()
                    ),
                });
            }
        }
        segments.push(segment);
        trailing.extend(paths(later));
        break;
    }

    let snapshot_at = snapshot.as_ref().map(|_| (base, base_term));
    let kept = match log_after_snapshot(snapshot_at, entries) {
        Ok(kept) => kept,
        Err(gap) => {
            if problem.is_none() {
                problem = Some(Found {
                    from: gap.expected,
                    path: segments
                        .first()
                        .map_or_else(|| dir.to_path_buf(), |s| s.path.clone()),
                    offset: Some(0),
                    index: Some(gap.expected),
                    reason: gap.to_string(),
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
        let mut all: Vec<PathBuf> = segments.drain(..).map(|s| s.path).collect();
        all.append(&mut trailing);
        trailing = all;
        torn = None;
    }
    trailing.reverse();

    let damage = match problem {
        // Whatever the scan found, everything after the last entry kept may be lost.
        Some(found) => Some(Found {
            from: last.saturating_add(1),
            ..found
        }),
        None => {
            let short = if last < commit {
                Some(format!(
                    "the state file says {commit} entries are committed but only {last} are readable"
                ))
            } else if let Some(synced) = synced.filter(|synced| last < *synced) {
                Some(format!(
                    "the synced record says the log was synced through index {synced} but only {last} entries are readable"
                ))
            } else if synced.is_none() && torn.is_some() {
                Some(
                    "the synced record is unreadable, so the torn tail may have been synced".into(),
                )
            } else {
                None
            };
            short.map(|reason| {
                let (path, offset, why) = match &torn {
                    Some(torn) => (torn.path.clone(), Some(torn.at), torn.why.clone()),
                    None => (
                        segments
                            .last()
                            .map_or_else(|| dir.to_path_buf(), |s| s.path.clone()),
                        segments.last().map(|s| s.written),
                        "the log ends cleanly".to_string(),
                    ),
                };
                Found {
                    from: last.saturating_add(1),
                    path,
                    offset,
                    index: Some(last.saturating_add(1)),
                    reason: format!("{reason} ({why})"),
                }
            })
        }
    };
    Ok(Plan {
        snapshot,
        segments,
        entries: kept,
        trailing,
        leading,
        set_aside: Vec::new(),
        damage,
        torn,
    })
}

/// The newest snapshot file: `Err` with the reason when it does not decode (damage, never a
/// torn write: it was renamed into place only once whole and synced).
fn read_snapshot(path: &Path, index: Index) -> Result<Result<Snapshot, String>, StorageError> {
    let bytes = fs::read(path).map_err(|e| io_error(path, "read", e))?;
    Ok(match decode_snapshot(Bytes::from(bytes)) {
        Ok(snapshot) if snapshot.index == index => Ok(snapshot),
        Ok(snapshot) => Err(format!(
            "it holds the snapshot at index {} but is named for index {index}",
            snapshot.index
        )),
        Err(e) => Err(e.to_string()),
    })
}

/// Opens a segment, reads it whole and syncs it (see `open_with`).
fn read_segment(
    first: Index,
    path: &Path,
    fsyncs: &mut u64,
) -> Result<(Segment, Vec<u8>), StorageError> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, "open", e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| io_error(path, "read", e))?;
    file.sync_data()
        .map_err(|e| io_error(path, "fdatasync", e))?;
    *fsyncs += 1;
    let mut segment = Segment::staged(path.parent().unwrap_or(path), first);
    segment.path = path.to_path_buf();
    segment.file = Some(file);
    Ok((segment, bytes))
}

/// Why a segment's first bad record is bad: the scan again, now calling every byte synced.
/// Only runs on the way to a cut or an error.
fn damage_reason(bytes: &[u8], first: Index) -> String {
    match scan(bytes, bytes.len() as u64, first).outcome {
        ScanOutcome::Corrupt { reason, .. } => reason.to_string(),
        other => other.to_string(),
    }
}

/// The layout before segments kept the whole log in one file from index 1: that file is the
/// first segment, renamed.
fn migrate_legacy_log(dir: &Path) -> Result<(), StorageError> {
    let legacy = dir.join(LEGACY_LOG_FILE);
    match fs::symlink_metadata(&legacy) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(&legacy, "stat", e)),
    }
    if !list_dir(dir)?.segments.is_empty() {
        return Err(StorageError::Corrupt {
            path: legacy,
            offset: None,
            index: None,
            reason: "a single log file beside log segments: which one holds the log is unknown"
                .to_string(),
        });
    }
    let first = dir.join(segment_name(1));
    fs::rename(&legacy, &first).map_err(|e| io_error(&legacy, "rename", e))?;
    sync_dir(dir)?;
    info!(path = %first.display(), "moved the single log file to the first segment");
    Ok(())
}

/// The newest hard state and its slot sequence, if the file holds one.
fn read_state(file: &File, path: &Path) -> Result<StateRead, StorageError> {
    let mut bytes = Vec::new();
    // One byte more than a valid file, so a longer one is refused without reading it all.
    file.take(STATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, "read", e))?;
    Ok(match decode_stored_state(&bytes) {
        Ok(None) => StateRead::Missing,
        Ok(Some(stored)) => StateRead::Present(stored.sequence, stored.hard_state),
        Err(e) => StateRead::Damaged(e.to_string()),
    })
}
