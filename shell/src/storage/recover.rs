//! Opening a group's directory: the shell reads the files (the state file, the synced record,
//! the newest snapshot, the segments the snapshot does not hold entirely) and carries out the
//! plan that the core's pure [`plan_recovery`] returns for them, the same decision the
//! simulator's disk runs.
//!
//! The plan is decided before any file is touched, so that a refusing open
//! (`GroupStore::open` on damage) changes nothing, and a repairing one writes the damage marker
//! before it cuts anything.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use holdfast_core::raft::{Damage, GroupId, Index, Recovered};
use holdfast_core::storage::{
    FileRef, RecoveryInput, STATE_BYTES, SegmentFile, SnapshotFile, plan_recovery, segments_to_read,
};
use tracing::{error, info, warn};

use super::files::{
    DAMAGE_MARKER, LEGACY_LOG_FILE, SET_ASIDE_SUFFIX, STATE_FILE, SYNCED_FILE, create_dir_durable,
    io_error, list_dir, open_file, read_damage_marker, read_synced, remove_file, segment_name,
    snapshot_name, sync_dir, write_damage_marker,
};
use super::group_store::{GroupStore, Segment, SpareBuffers};
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
        let synced_index = synced_record.index;
        let state_bytes = read_state(&state, &state_path)?;
        let marker = group_dir.join(DAMAGE_MARKER);
        let earlier = read_damage_marker(&marker)?;

        // The shell only reads; what the files mean is the core's decision.
        let snapshot = match listing.snapshots.last() {
            None => None,
            Some((index, path)) => Some(SnapshotFile {
                index: *index,
                bytes: Bytes::from(fs::read(path).map_err(|e| io_error(path, "read", e))?),
            }),
        };
        let firsts: Vec<Index> = listing.segments.iter().map(|(first, _)| *first).collect();
        let read_from = segments_to_read(snapshot.as_ref().map(|s| s.index), &firsts);
        let mut opened: BTreeMap<Index, (File, Vec<u8>)> = BTreeMap::new();
        for (first, path) in listing.segments.get(read_from..).unwrap_or_default() {
            opened.insert(*first, read_segment(path, &mut fsyncs)?);
        }
        let input = RecoveryInput {
            state: &state_bytes,
            synced: synced_index,
            snapshot,
            segments: listing
                .segments
                .iter()
                .map(|(first, _)| SegmentFile {
                    first: *first,
                    bytes: opened.get(first).map(|(_, bytes)| bytes.as_slice()),
                })
                .collect(),
        };
        let plan = plan_recovery(&input).map_err(|e| StorageError::Corrupt {
            path: group_dir.clone(),
            offset: None,
            index: None,
            reason: e.to_string(),
        })?;
        drop(input);
        let path_of = |file: FileRef| -> PathBuf {
            match file {
                FileRef::Segment(first) => group_dir.join(segment_name(first)),
                FileRef::Snapshot(index) => group_dir.join(snapshot_name(index)),
                FileRef::Directory => group_dir.clone(),
            }
        };
        let hard_state = plan.hard_state;
        if let Some(lost) = &plan.state_lost {
            let reason = lost.to_string();
            if !repair {
                return Err(StorageError::Corrupt {
                    path: state_path,
                    offset: None,
                    index: None,
                    reason,
                });
            }
            error!(
                path = %state_path.display(),
                "{reason}: this replica's term and votes are lost, so it will never vote or \
                 campaign again (as after a wiped disk); its log is dropped and fetched again \
                 from the leader"
            );
        }
        let state_sequence = plan.state_sequence;
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
            buffers: SpareBuffers::default(),
            remover: None,
            #[cfg(test)]
            crash_after_steps: None,
            #[cfg(test)]
            steps: 0,
        };
        let damage = match &plan.damage {
            None => earlier,
            Some(found) if repair => {
                let from = earlier.map_or(found.from, |earlier| earlier.min(found.from));
                error!(
                    path = %path_of(found.file).display(),
                    offset = ?found.offset,
                    from,
                    "{}; cutting the log back to its valid prefix: this replica will not vote until its peers have repaired it",
                    found.cause
                );
                write_damage_marker(&group_dir, &marker, from)?;
                // Never above what survives the cut, or the next start would call the cut
                // itself damage (harmlessly, the marker is there, but noisily).
                let keep = found.from.saturating_sub(1);
                if synced_index.is_none_or(|index| index > keep) {
                    store.write_synced(keep)?;
                }
                if plan.set_aside_snapshots {
                    for (_, path) in &listing.snapshots {
                        let mut aside = path.clone().into_os_string();
                        aside.push(SET_ASIDE_SUFFIX);
                        fs::rename(path, &aside).map_err(|e| io_error(path, "rename", e))?;
                        warn!(path = %path.display(), "set the snapshot aside as {}", Path::new(&aside).display());
                    }
                    if !listing.snapshots.is_empty() {
                        store.sync_dir()?;
                    }
                }
                Some(from)
            }
            Some(found) => {
                return Err(StorageError::Corrupt {
                    path: path_of(found.file),
                    offset: found.offset,
                    index: found.index,
                    reason: found.cause.to_string(),
                });
            }
        };
        if !plan.remove_trailing.is_empty() && damage.is_none() {
            info!(
                path = %group_dir.display(),
                segments = plan.remove_trailing.len(),
                snapshot = snapshot_index,
                "removing a log that the snapshot replaced (a crash interrupted its removal)"
            );
        }
        for first in &plan.remove_trailing {
            // Newest first, each durable before the next: a crash leaves a prefix.
            opened.remove(first);
            remove_file(&path_of(FileRef::Segment(*first)))?;
            store.sync_dir()?;
        }
        let mut segments = Vec::with_capacity(plan.segments.len());
        for kept in plan.segments {
            let path = path_of(FileRef::Segment(kept.first));
            let file = opened.remove(&kept.first).map(|(file, _)| file);
            let Some(file) = file else {
                return Err(StorageError::Io {
                    path,
                    op: "recover",
                    source: std::io::Error::other("the plan keeps a segment that was not read"),
                });
            };
            if kept.cut {
                file.set_len(kept.valid_len)
                    .map_err(|e| io_error(&path, "truncate", e))?;
                file.sync_data()
                    .map_err(|e| io_error(&path, "fdatasync", e))?;
                store.fsyncs += 1;
                if let Some(torn) = plan.torn.as_ref().filter(|_| damage.is_none()) {
                    warn!(
                        path = %path.display(),
                        dropped_bytes = torn.dropped_bytes,
                        last_index = kept.next_index().saturating_sub(1),
                        "cut a torn tail off the log"
                    );
                }
            }
            let mut segment = Segment::staged(&group_dir, kept.first);
            segment.path = path;
            segment.file = Some(file);
            segment.starts = kept.starts;
            segment.terms = kept.terms;
            segment.written = kept.valid_len;
            segments.push(segment);
        }
        for first in &plan.remove_leading {
            // Oldest first; the snapshot holds all of them, so any order would do.
            remove_file(&path_of(FileRef::Segment(*first)))?;
            store.dir_dirty = true;
        }
        if store.dir_dirty {
            store.sync_dir()?;
        }
        store.segments = segments;
        store.durable_floor = store.last_index();
        // Everything kept was fsynced as it was read: the synced record says so now, not
        // when the store is next idle, so that a bit flip in it before then is damage, never
        // a torn tail cut silently (the simulator's disk found that window).
        if store
            .synced_record
            .index
            .is_none_or(|index| index < store.durable_floor)
        {
            store.write_synced(store.durable_floor)?;
        }
        Ok((
            store,
            Recovered {
                hard_state,
                snapshot: plan.snapshot,
                entries: plan.entries,
            },
            match plan.state_lost {
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

/// Opens a segment, reads it whole and syncs it (see `open_with`).
fn read_segment(path: &Path, fsyncs: &mut u64) -> Result<(File, Vec<u8>), StorageError> {
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
    Ok((file, bytes))
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

/// The state file's bytes, for the core to decode.
fn read_state(file: &File, path: &Path) -> Result<Vec<u8>, StorageError> {
    let mut bytes = Vec::new();
    // One byte more than a valid file, so a longer one is refused without reading it all.
    file.take(STATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, "read", e))?;
    Ok(bytes)
}
