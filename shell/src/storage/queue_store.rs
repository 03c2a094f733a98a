//! The queue store in files: where a node's message bytes live, so that its memory holds
//! only the core's per-queue index and a bounded cache of the newest messages.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/queues/group-<id>/<topic|retry|dlq>/n<name>/<queue>/<first offset>.qseg
//!     records [len u32][crc32c u32][offset u64][message]
//! <data_dir>/queues/group-<id>/<topic|retry|dlq>/n<name>/<queue>/<first offset>.qidx
//!     a sealed segment's index: [count u64][position u32 × count][length u64][crc32c u32]
//! ```
//!
//! Offsets in names are zero-padded to 20 digits. The record format is the core's
//! ([`holdfast_core::broker::encode_record`]); the core checks every record read back against
//! its checksum and offset before a consumer sees it.
//!
//! # Durability
//!
//! A broker group's snapshots hold only metadata (the index, offsets, acks, dedup windows):
//! they stand for the state only together with this store. So before a snapshot is written,
//! [`QueueStore::sync_group`] fsyncs every segment, sealed-segment index and directory the
//! group wrote since its last sync; an fsync error fails the store for good (a retry that
//! "succeeds" would lie: fsyncgate) and the snapshot is never written. At a restart the core
//! asks ([`StoreOp::Recover`]) for exactly what the snapshot references: the store drops
//! anything at or past each queue's end (written after the snapshot, maybe torn; replaying
//! the log writes it again) and refuses to go on, naming the offset, if it lacks anything
//! before. Retention deletes whole segments, never below the queue starts of the newest
//! snapshot a restart could read ([`QueueStore::snapshot_written`]).
//!
//! # Opening
//!
//! [`QueueStore::open`] does not read every record: a sealed segment's positions come from its
//! `.qidx` (checked by its checksum and length), and only the newest segment of each queue,
//! and any sealed one whose index is missing or damaged, is scanned, checking each record,
//! up to the first that does not check (the newest segment's file is cut there: a torn tail).
//! The position of every record stays in memory: four bytes per message.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use holdfast_core::broker::{
    Offset, QueueId, QueueRange, StoreOp, StoredMessage, check_record, decode_record,
    encode_record_into, record_len,
};
use holdfast_core::raft::GroupId;
use holdfast_core::storage::{QueueRecoveryPlan, QueueSegment, plan_queue_recovery};

/// A segment takes records until it holds this many bytes; the next record starts another.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;

/// A record read back is refused beyond this length: a damaged length must not allocate
/// gigabytes.
const RECORD_READ_BYTES_MAX: usize = 2 * holdfast_core::limits::COMMAND_BYTES_MAX + 4096;

/// Consecutive records are read back together, up to this many bytes in one read (a record
/// longer than this is read alone).
const RUN_READ_BYTES_MAX: usize = 1 << 20;

/// A sealed segment's index is refused beyond this many positions (a damaged count must not
/// allocate gigabytes): more than a segment of [`SEGMENT_BYTES_MAX`] can hold.
const INDEX_POSITIONS_MAX: u64 = SEGMENT_BYTES_MAX / 16 + 1;

struct Segment {
    first: Offset,
    path: PathBuf,
    file: File,
    /// Records written but not yet handed to the file: written out at the end of each round
    /// of the event loop ([`QueueStore::flush`], which takes the buffer back into the store's
    /// spares) and before a read of this segment, so that idle queues hold no buffer.
    pending: Vec<u8>,
    /// The position of the record of offset `first + i`.
    positions: Vec<u32>,
    len: u64,
    /// Bytes below this were handed to the kernel's writeback ([`start_writeback`]).
    writeback_from: u64,
    /// Written since its last fsync.
    unsynced: bool,
    /// Sealed, with its `.qidx` written but not yet fsynced.
    index_unsynced: bool,
}

impl Segment {
    fn end(&self) -> Offset {
        self.first + self.positions.len() as Offset
    }

    fn index_path(&self) -> PathBuf {
        self.path.with_extension("qidx")
    }
}

#[derive(Default)]
struct QueueFiles {
    segments: BTreeMap<Offset, Segment>,
}

impl QueueFiles {
    fn end(&self) -> Option<Offset> {
        self.segments.values().next_back().map(Segment::end)
    }

    /// The segments as the core's [`plan_queue_recovery`] sees them.
    fn views(&self) -> Vec<QueueSegment> {
        self.segments
            .values()
            .map(|s| QueueSegment {
                first: s.first,
                count: s.positions.len() as u64,
            })
            .collect()
    }
}

/// What a write puts at its offset: a record already encoded (copied from a peer, a requeue's
/// copy), or a message encoded straight into the segment's pending bytes.
enum Record<'a> {
    Encoded(&'a [u8]),
    Message(&'a StoredMessage),
}

/// Every queue's files under `<data_dir>/queues`.
pub struct QueueStore {
    dir: PathBuf,
    queues: BTreeMap<(GroupId, QueueId), QueueFiles>,
    /// Queues whose newest segment has pending bytes.
    dirty: BTreeSet<(GroupId, QueueId)>,
    /// Directories whose entries changed since the last sync.
    unsynced_dirs: BTreeSet<PathBuf>,
    /// Groups whose newest snapshot on disk refers to this store, and below which offset of
    /// each queue retention may delete (the starts of that snapshot, or lower while a newer
    /// one is being written).
    floors: BTreeMap<GroupId, BTreeMap<QueueId, Offset>>,
    /// Each queue's start as retention last set it.
    trimmed: BTreeMap<(GroupId, QueueId), Offset>,
    /// The first error of a sync: the store cannot be trusted after it.
    failed: Option<String>,
    /// Emptied write buffers, kept for the next round's writes: a buffer freed after every
    /// round and grown again from nothing cost a fresh (huge) page from the system, zeroed,
    /// each round: 14% of a publishing node's main thread.
    spare: Vec<Vec<u8>>,
}

impl QueueStore {
    /// The store under `data_dir`, with what earlier runs left there: see the module's notes.
    /// An error if a directory or file cannot be read.
    pub fn open(data_dir: &Path) -> Result<QueueStore, String> {
        let mut store = QueueStore {
            dir: data_dir.join("queues"),
            queues: BTreeMap::new(),
            dirty: BTreeSet::new(),
            unsynced_dirs: BTreeSet::new(),
            floors: BTreeMap::new(),
            trimmed: BTreeMap::new(),
            failed: None,
            spare: Vec::new(),
        };
        for (group, group_dir) in entries(&store.dir)? {
            let Some(group) = group
                .strip_prefix("group-")
                .and_then(|g| g.parse::<GroupId>().ok())
            else {
                continue;
            };
            for (kind, kind_dir) in entries(&group_dir)? {
                let prefix = match kind.as_str() {
                    "topic" => "",
                    "retry" => "%RETRY%",
                    "dlq" => "%DLQ%",
                    _ => continue,
                };
                for (name, name_dir) in entries(&kind_dir)? {
                    let Some(name) = name.strip_prefix('n') else {
                        continue;
                    };
                    for (number, queue_dir) in entries(&name_dir)? {
                        let Ok(number) = number.parse::<u32>() else {
                            continue;
                        };
                        let queue = QueueId::new(format!("{prefix}{name}"), number);
                        let files = open_queue(&queue_dir)?;
                        store.queues.insert((group, queue), files);
                    }
                }
            }
        }
        Ok(store)
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        group_dir_under(&self.dir, group)
    }

    fn queue_dir(&self, group: GroupId, queue: &QueueId) -> PathBuf {
        queue_dir_under(&self.dir, group, queue)
    }

    fn check(&self) -> Result<(), String> {
        match &self.failed {
            Some(first) => Err(format!("the queue store failed earlier: {first}")),
            None => Ok(()),
        }
    }

    /// Carries out `op` of `group`. An error is an I/O error (the node must stop: its store
    /// no longer holds what its index says), a requeue whose original does not read, or a
    /// recovery that finds the store lacking what the snapshot references.
    pub fn apply(&mut self, group: GroupId, op: StoreOp) -> Result<(), String> {
        self.check()?;
        match op {
            StoreOp::Reset => {
                self.queues.retain(|(g, _), _| *g != group);
                self.dirty.retain(|(g, _)| *g != group);
                self.trimmed.retain(|(g, _), _| *g != group);
                self.floors.remove(&group);
                let dir = self.group_dir(group);
                match fs::remove_dir_all(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
                }
            }
            StoreOp::Write {
                queue,
                offset,
                message,
            } => self.write(group, queue, offset, Record::Message(&message)),
            StoreOp::Requeue(requeue) => {
                let original = self.read_one(group, &requeue.from, requeue.from_offset)?;
                let record = requeue.record(&original).map_err(|e| {
                    format!("requeue of {}@{}: {e}", requeue.from, requeue.from_offset)
                })?;
                self.write(group, requeue.to, requeue.offset, Record::Encoded(&record))
            }
            StoreOp::Trim { queue, start } => {
                self.trimmed.insert((group, queue.clone()), start);
                self.trim(group, &queue)
            }
            StoreOp::Recover { queues } => self.recover(group, &queues),
            StoreOp::CatchUp { from, .. } => Err(format!(
                "a catch-up from node {from} is planned with QueueStore::catch_up_plan, and the \
                 group's writes held until it is done"
            )),
            StoreOp::DropQueue { queue } => self.drop_queue(group, &queue),
        }
    }

    /// What `group`'s store lacks of `ranges` (a metadata snapshot installed from a peer),
    /// as `(queue, from, end)` ranges to fetch, oldest first. Like a recovery, it drops
    /// queues the snapshot does not know and whatever lies at or past a queue's end. A queue
    /// whose records do not run without a hole from at or below its start is emptied and
    /// fetched whole (it happens only to a store that lost files): records then always arrive
    /// at a queue's end ([`QueueStore::fill`]). Nothing is deleted below a queue's start until
    /// a snapshot that no longer references it is durable.
    pub fn catch_up_plan(
        &mut self,
        group: GroupId,
        ranges: &[QueueRange],
    ) -> Result<Vec<(QueueId, Offset, Offset)>, String> {
        self.check()?;
        let wanted: BTreeMap<&QueueId, &QueueRange> =
            ranges.iter().map(|r| (&r.queue, r)).collect();
        let unknown: Vec<(GroupId, QueueId)> = self
            .queues
            .keys()
            .filter(|(g, q)| *g == group && !wanted.contains_key(q))
            .cloned()
            .collect();
        for key in unknown {
            self.drop_queue_files(&key)?;
        }
        let mut missing = Vec::new();
        for range in ranges {
            let key = (group, range.queue.clone());
            self.cut_at(&key, range.end)?;
            // The run of records held without a hole, from the newest segment back.
            let held = self.queues.get(&key).and_then(|files| {
                let mut segments = files.segments.values().rev();
                let last = segments.next()?;
                let mut first = last.first;
                for segment in segments {
                    if segment.end() != first {
                        break;
                    }
                    first = segment.first;
                }
                Some((first, last.end()))
            });
            let from = match held {
                Some((first, end)) if first <= range.start && end >= range.start => end,
                Some((_, end)) if end <= range.start => range.start,
                Some(_) => {
                    self.drop_queue_files(&key)?;
                    range.start
                }
                None => range.start,
            };
            if from < range.end {
                missing.push((range.queue.clone(), from, range.end));
            }
            self.trimmed.insert(key, range.start);
        }
        Ok(missing)
    }

    /// Removes every file of a queue (the directory stays).
    fn drop_queue_files(&mut self, key: &(GroupId, QueueId)) -> Result<(), String> {
        self.dirty.remove(key);
        if let Some(files) = self.queues.remove(key) {
            for segment in files.segments.values() {
                remove(&segment.path)?;
                remove(&segment.index_path())?;
                if let Some(dir) = segment.path.parent() {
                    self.unsynced_dirs.insert(dir.to_path_buf());
                }
            }
        }
        Ok(())
    }

    /// Drops every record of the queue at or past `end`.
    fn cut_at(&mut self, key: &(GroupId, QueueId), end: Offset) -> Result<(), String> {
        let Some(files) = self.queues.get(key) else {
            return Ok(());
        };
        let plan = plan_queue_recovery(&files.views(), end, end);
        self.carry_out(key, &plan)?;
        if self.queues.get(key).is_some_and(|f| f.segments.is_empty()) {
            self.queues.remove(key);
        }
        Ok(())
    }

    /// Deletes the segments `plan` removes and cuts the one it cuts (see
    /// [`plan_queue_recovery`]).
    fn carry_out(
        &mut self,
        key: &(GroupId, QueueId),
        plan: &QueueRecoveryPlan,
    ) -> Result<(), String> {
        let Some(files) = self.queues.get_mut(key) else {
            return Ok(());
        };
        for first in &plan.remove {
            // Past the end: written after the snapshot (maybe torn); the log writes it again.
            if let Some(segment) = files.segments.remove(first) {
                remove(&segment.path)?;
                remove(&segment.index_path())?;
            }
        }
        if let Some((first, keep)) = plan.cut
            && let Some(last) = files.segments.get_mut(&first)
        {
            flush(last)?;
            let keep = usize::try_from(keep).unwrap_or(usize::MAX);
            let Some(cut) = last.positions.get(keep).copied() else {
                return Err(format!(
                    "cannot cut {} at record {keep}: it holds {}",
                    last.path.display(),
                    last.positions.len()
                ));
            };
            let cut = u64::from(cut);
            last.positions.truncate(keep);
            last.len = cut;
            last.file
                .set_len(cut)
                .map_err(|e| format!("cannot cut {}: {e}", last.path.display()))?;
            last.unsynced = true;
            remove(&last.index_path())?;
            last.index_unsynced = false;
        }
        Ok(())
    }

    /// Up to `bytes_max` bytes of consecutive records of `queue` from offset `from` on, below
    /// `end`, as they lie in one segment (one read; at least one record, whatever its size):
    /// what a peer catching up fetches. Unchecked: the receiver checks every record.
    pub fn chunk(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        from: Offset,
        end: Offset,
        bytes_max: usize,
    ) -> Result<Bytes, String> {
        self.check()?;
        let missing = || format!("{queue}@{from} is not in this node's queue store");
        let files = self
            .queues
            .get_mut(&(group, queue.clone()))
            .ok_or_else(missing)?;
        let segment = files
            .segments
            .range_mut(..=from)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| from < s.end() && from < end)
            .ok_or_else(missing)?;
        flush(segment)?;
        let first = (from - segment.first) as usize;
        let last = ((end.min(segment.end()) - segment.first) as usize).max(first + 1);
        let start = u64::from(segment.positions[first]);
        let position = |i: usize| {
            segment
                .positions
                .get(i)
                .map_or(segment.len, |p| u64::from(*p))
        };
        let mut stop = first + 1;
        while stop < last && position(stop + 1) - start <= bytes_max as u64 {
            stop += 1;
        }
        let len = position(stop) - start;
        if len > (bytes_max.max(RECORD_READ_BYTES_MAX)) as u64 {
            return Err(format!(
                "{}: the record of offset {from} claims {len} bytes",
                segment.path.display()
            ));
        }
        let mut bytes = vec![0u8; len as usize];
        segment
            .file
            .read_exact_at(&mut bytes, start)
            .map_err(|e| format!("cannot read {}: {e}", segment.path.display()))?;
        Ok(Bytes::from(bytes))
    }

    /// Writes `records` (consecutive records from offset `from` on, sent by a peer) at the
    /// end of `queue`, where `from` must be, after checking every one of them (length,
    /// crc32c, offset): bad bytes are refused whole, with the reason, and nothing is written.
    /// Returns the offset after the last record.
    pub fn fill(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        from: Offset,
        records: &[u8],
    ) -> Result<Offset, String> {
        self.check()?;
        let end = self
            .queues
            .get(&(group, queue.clone()))
            .and_then(QueueFiles::end);
        if end.is_some_and(|end| end > from) {
            return Err(format!(
                "records of {queue} from {from} on, where the store holds up to {}",
                end.unwrap_or(0)
            ));
        }
        let mut bounds = Vec::new();
        let mut at = 0usize;
        let mut offset = from;
        while at < records.len() {
            let len = record_len(&records[at..])
                .filter(|l| *l <= RECORD_READ_BYTES_MAX && at + l <= records.len())
                .ok_or_else(|| {
                    format!(
                        "{queue}@{offset}: a record cut short or longer than \
                         {RECORD_READ_BYTES_MAX} bytes at byte {at} of {}",
                        records.len()
                    )
                })?;
            check_record(&records[at..at + len], offset)
                .map_err(|e| format!("{queue}@{offset}: {e}"))?;
            bounds.push((offset, at, at + len));
            at += len;
            offset += 1;
        }
        for (offset, start, stop) in bounds {
            // An I/O error fails the store (the node stops); bad bytes above only refuse.
            self.write(
                group,
                queue.clone(),
                offset,
                Record::Encoded(&records[start..stop]),
            )
            .inspect_err(|e| self.fail(e))?;
        }
        Ok(offset)
    }

    /// Whether an error failed the store for good.
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The queue's topic was deleted: its files go at once, and the directory that held them
    /// is synced before this returns, so a queue created again under the same name starts
    /// empty and a restart never finds the old messages. An error fails the store.
    fn drop_queue(&mut self, group: GroupId, queue: &QueueId) -> Result<(), String> {
        let key = (group, queue.clone());
        self.queues.remove(&key);
        self.dirty.remove(&key);
        self.trimmed.remove(&key);
        if let Some(floors) = self.floors.get_mut(&group) {
            floors.remove(queue);
        }
        let dir = self.queue_dir(group, queue);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                let why = format!("cannot remove {}: {e}", dir.display());
                self.fail(&why);
                return Err(why);
            }
        }
        self.unsynced_dirs.retain(|d| !d.starts_with(&dir));
        let Some(topic_dir) = dir.parent() else {
            return Ok(());
        };
        // The topic's directory goes with its last queue; while other queues of the topic
        // are there (not yet dropped), removing it fails and it stays, which is fine.
        let parent = match fs::remove_dir(topic_dir) {
            Ok(()) => {
                self.unsynced_dirs.remove(topic_dir);
                topic_dir.parent().unwrap_or(topic_dir)
            }
            Err(_) => topic_dir,
        };
        let synced = File::open(parent).and_then(|d| d.sync_all());
        synced.map_err(|e| {
            let why = format!("cannot sync {}: {e}", parent.display());
            self.fail(&why);
            why
        })
    }

    fn write(
        &mut self,
        group: GroupId,
        queue: QueueId,
        offset: Offset,
        record: Record<'_>,
    ) -> Result<(), String> {
        let key = (group, queue);
        if !self.dirty.contains(&key) {
            self.dirty.insert(key.clone());
        }
        // One lookup per record (the key's clone is a reference count): the map's entry and
        // the directory's fields are borrowed apart.
        let files = self.queues.entry(key.clone()).or_default();
        // Written before (a log entry applied again): the same bytes are there.
        if files.end().is_some_and(|end| offset < end) {
            return Ok(());
        }
        let roll = match files.segments.values().next_back() {
            None => true,
            Some(last) => last.end() != offset || last.len >= SEGMENT_BYTES_MAX,
        };
        // The directory's path is built only when a segment is created: building it for
        // every record cost allocations per message.
        let dir = roll.then(|| queue_dir_under(&self.dir, group, &key.1));
        if let Some(dir) = dir {
            if let Some(last) = files.segments.values_mut().next_back() {
                flush(last)?;
                seal(last)?;
            }
            if !dir.is_dir() {
                // Each new directory's entry lives in its parent, which the next sync syncs.
                let mut created = dir.as_path();
                while !created.is_dir() {
                    let Some(parent) = created.parent() else {
                        break;
                    };
                    self.unsynced_dirs.insert(parent.to_path_buf());
                    created = parent;
                }
                fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            self.unsynced_dirs.insert(dir.clone());
            let path = dir.join(format!("{offset:020}.qseg"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            files.segments.insert(
                offset,
                Segment {
                    first: offset,
                    path,
                    file,
                    pending: Vec::new(),
                    positions: Vec::new(),
                    len: 0,
                    writeback_from: 0,
                    unsynced: true,
                    index_unsynced: false,
                },
            );
        }
        let Some(segment) = files.segments.values_mut().next_back() else {
            return Err("no segment to write to".into());
        };
        let position = u32::try_from(segment.len)
            .map_err(|_| format!("{} passed 4 GiB", segment.path.display()))?;
        if segment.pending.capacity() == 0 {
            segment.pending = self
                .spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(PENDING_BYTES_MAX));
        }
        let len = match record {
            Record::Encoded(bytes) => {
                segment.pending.extend_from_slice(bytes);
                bytes.len()
            }
            Record::Message(stored) => encode_record_into(&mut segment.pending, offset, stored),
        };
        segment.unsynced = true;
        segment.positions.push(position);
        segment.len += len as u64;
        if segment.pending.len() >= PENDING_BYTES_MAX {
            write_pending(segment)?;
        }
        Ok(())
    }

    /// Deletes the queue's whole segments below both retention's start and the newest
    /// snapshot's start (a restart from that snapshot needs them), never the newest segment.
    fn trim(&mut self, group: GroupId, queue: &QueueId) -> Result<(), String> {
        let key = (group, queue.clone());
        let mut below = self.trimmed.get(&key).copied().unwrap_or(0);
        if let Some(floors) = self.floors.get(&group) {
            below = below.min(floors.get(queue).copied().unwrap_or(0));
        }
        let Some(files) = self.queues.get_mut(&key) else {
            return Ok(());
        };
        while files.segments.len() > 1 {
            let Some(first) = files.segments.values().next() else {
                break;
            };
            if first.end() > below {
                break;
            }
            let first = first.first;
            if let Some(segment) = files.segments.remove(&first) {
                remove(&segment.path)?;
                remove(&segment.index_path())?;
            }
        }
        Ok(())
    }

    fn recover(&mut self, group: GroupId, ranges: &[QueueRange]) -> Result<(), String> {
        let wanted: BTreeMap<&QueueId, &QueueRange> =
            ranges.iter().map(|r| (&r.queue, r)).collect();
        let unknown: Vec<(GroupId, QueueId)> = self
            .queues
            .keys()
            .filter(|(g, q)| *g == group && !wanted.contains_key(q))
            .cloned()
            .collect();
        for key in unknown {
            if let Some(files) = self.queues.remove(&key) {
                for segment in files.segments.values() {
                    remove(&segment.path)?;
                    remove(&segment.index_path())?;
                }
            }
        }
        self.floors.insert(
            group,
            ranges.iter().map(|r| (r.queue.clone(), r.start)).collect(),
        );
        for range in ranges {
            let key = (group, range.queue.clone());
            let files = self.queues.entry(key.clone()).or_default();
            // What the segments must become is the core's decision; this carries it out.
            let plan = plan_queue_recovery(&files.views(), range.start, range.end);
            self.carry_out(&key, &plan)?;
            if let Some(next) = plan.lacks {
                return Err(format!(
                    "group {group}: the queue store lacks {}@{next} (of {}..{}), which the \
                     snapshot on disk references: its files under {} are damaged or were \
                     removed",
                    range.queue,
                    range.start,
                    range.end,
                    self.queue_dir(group, &range.queue).display()
                ));
            }
            self.trimmed.insert(key, range.start);
            self.trim(group, &range.queue)?;
        }
        Ok(())
    }

    /// Makes everything `group` wrote durable, before a snapshot that refers to it is written:
    /// every segment and sealed-segment index written since the last sync, and every
    /// directory whose entries changed. `starts` are that snapshot's queue starts: until it
    /// is written ([`QueueStore::snapshot_written`]), retention deletes below neither them nor
    /// the previous snapshot's. An error fails the store for good.
    pub fn sync_group(
        &mut self,
        group: GroupId,
        starts: &[(QueueId, Offset)],
    ) -> Result<(), String> {
        let plan = self.sync_plan(group, starts)?;
        plan.run().inspect_err(|e| self.fail(e))
    }

    /// [`QueueStore::sync_group`] in two steps, so that the fsyncs run without the store's
    /// lock: this hands every pending byte of `group` to its file and returns what to fsync;
    /// [`SyncPlan::run`] fsyncs it; on its error the caller must [`QueueStore::fail`] the store.
    pub fn sync_plan(
        &mut self,
        group: GroupId,
        starts: &[(QueueId, Offset)],
    ) -> Result<SyncPlan, String> {
        self.check()?;
        let result = self.sync_plan_inner(group, starts);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Fails the store for good: every later operation is refused with `why`.
    pub fn fail(&mut self, why: &str) {
        if self.failed.is_none() {
            self.failed = Some(why.to_string());
        }
    }

    fn sync_plan_inner(
        &mut self,
        group: GroupId,
        starts: &[(QueueId, Offset)],
    ) -> Result<SyncPlan, String> {
        let floors = self.floors.entry(group).or_default();
        for (queue, start) in starts {
            let floor = floors.entry(queue.clone()).or_insert(*start);
            *floor = (*floor).min(*start);
        }
        let mut plan = SyncPlan::default();
        let dup = |path: &Path, file: &File| {
            file.try_clone()
                .map(|f| (path.to_path_buf(), f))
                .map_err(|e| format!("cannot reopen {}: {e}", path.display()))
        };
        for ((g, _), files) in self.queues.iter_mut() {
            if *g != group {
                continue;
            }
            for segment in files.segments.values_mut() {
                flush(segment)?;
                if segment.unsynced {
                    plan.files.push(dup(&segment.path, &segment.file)?);
                    segment.unsynced = false;
                }
                if segment.index_unsynced {
                    let path = segment.index_path();
                    let file = File::open(&path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                    plan.files.push((path, file));
                    segment.index_unsynced = false;
                }
            }
        }
        self.dirty.retain(|(g, _)| *g != group);
        // Deepest first, so that each directory's own entry is synced after what it holds.
        plan.dirs = std::mem::take(&mut self.unsynced_dirs)
            .into_iter()
            .rev()
            .collect();
        Ok(plan)
    }

    /// The snapshot of `group` whose queue starts are `starts` is durable: retention may now
    /// delete below them, and it carries out what waited.
    pub fn snapshot_written(
        &mut self,
        group: GroupId,
        starts: &[(QueueId, Offset)],
    ) -> Result<(), String> {
        self.check()?;
        self.floors.insert(group, starts.iter().cloned().collect());
        let queues: Vec<QueueId> = self
            .queues
            .keys()
            .filter(|(g, _)| *g == group)
            .map(|(_, q)| q.clone())
            .collect();
        for queue in queues {
            self.trim(group, &queue)?;
        }
        Ok(())
    }

    /// The record of `(queue, offset)`, unchecked (the core checks it).
    fn read_one(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        offset: Offset,
    ) -> Result<Bytes, String> {
        let mut run = self.read_run(group, queue, &[offset])?;
        run.pop()
            .ok_or_else(|| format!("{queue}@{offset} is not in the queue store"))
    }

    /// The records of the longest prefix of `offsets` (not empty) that runs on consecutively
    /// in one segment, up to [`RUN_READ_BYTES_MAX`], read with one `pread`: a pull of
    /// thousands of small messages read each one's header and then its record, two system
    /// calls and an allocation per message. Each record's header must claim the length the
    /// segment's positions give it; the records before the first that does not are returned,
    /// and that one alone is the next run's, whose error says why. Unchecked (the core checks
    /// them).
    fn read_run(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        offsets: &[Offset],
    ) -> Result<Vec<Bytes>, String> {
        let Some(&first) = offsets.first() else {
            return Ok(Vec::new());
        };
        let missing = || format!("{queue}@{first} is not in the queue store");
        let files = self
            .queues
            .get_mut(&(group, queue.clone()))
            .ok_or_else(missing)?;
        let segment = files
            .segments
            .range_mut(..=first)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| first < s.end())
            .ok_or_else(missing)?;
        flush(segment)?;
        let index = (first - segment.first) as usize;
        let position = |i: usize| {
            segment
                .positions
                .get(i)
                .map_or(segment.len, |p| u64::from(*p))
        };
        let start = position(index);
        let mut count = 1;
        while let Some(&offset) = offsets.get(count) {
            let consecutive = offset == first + count as u64 && offset < segment.end();
            if !consecutive || position(index + count + 1) - start > RUN_READ_BYTES_MAX as u64 {
                break;
            }
            count += 1;
        }
        let len = position(index + count) - start;
        if count == 1 && len > RECORD_READ_BYTES_MAX as u64 {
            return Err(format!(
                "{}: the record of offset {first} claims {len} bytes",
                segment.path.display()
            ));
        }
        let mut bytes = vec![0u8; len as usize];
        if let Err(e) = segment.file.read_exact_at(&mut bytes, start) {
            if count == 1 {
                return Err(format!("cannot read {}: {e}", segment.path.display()));
            }
            // The records before a cut file's end are still there: one at a time.
            return self.read_run(group, queue, &offsets[..1]);
        }
        let bytes = Bytes::from(bytes);
        let mut records = Vec::with_capacity(count);
        for i in index..index + count {
            let (from, to) = (position(i) - start, position(i + 1) - start);
            let record = bytes.slice(from as usize..to as usize);
            let claimed = record_len(&record).unwrap_or(0);
            if claimed as u64 != to - from {
                if records.is_empty() {
                    return Err(format!(
                        "{}: the record of offset {} claims {claimed} bytes where {} were written",
                        segment.path.display(),
                        segment.first + i as u64,
                        to - from
                    ));
                }
                break;
            }
            records.push(record);
        }
        Ok(records)
    }

    /// The records of `offsets`, up to the first that cannot be read (and why).
    pub fn read(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        offsets: &[Offset],
    ) -> (Vec<Bytes>, Option<String>) {
        let mut records = Vec::with_capacity(offsets.len());
        while records.len() < offsets.len() {
            match self.read_run(group, queue, &offsets[records.len()..]) {
                Ok(run) => records.extend(run),
                Err(why) => return (records, Some(why)),
            }
        }
        (records, None)
    }

    /// The message of `(queue, offset)`, checked: for transfer images.
    pub fn message(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        offset: Offset,
    ) -> Result<StoredMessage, String> {
        let record = self.read_one(group, queue, offset)?;
        decode_record(&record, offset).map_err(|e| format!("{queue}@{offset}: {e}"))
    }

    /// Hands every pending record to its file (fsynced only by [`QueueStore::sync_group`]: the
    /// Raft log is the durable copy of everything no snapshot covers yet) and takes the
    /// buffers back: a few are kept for the next round, so idle queues hold none.
    pub fn flush(&mut self) -> Result<(), String> {
        self.check()?;
        for key in std::mem::take(&mut self.dirty) {
            if let Some(segment) = self
                .queues
                .get_mut(&key)
                .and_then(|q| q.segments.values_mut().next_back())
            {
                write_pending(segment)?;
                let buffer = std::mem::take(&mut segment.pending);
                if self.spare.len() < SPARE_BUFFERS_MAX && buffer.capacity() <= SPARE_BYTES_MAX {
                    self.spare.push(buffer);
                }
            }
        }
        Ok(())
    }

    /// Bytes written to segments still held.
    pub fn bytes(&self) -> u64 {
        self.queues
            .values()
            .flat_map(|q| q.segments.values())
            .map(|s| s.len)
            .sum()
    }
}

/// What [`QueueStore::sync_plan`] found to fsync.
#[derive(Default)]
pub struct SyncPlan {
    files: Vec<(PathBuf, File)>,
    dirs: Vec<PathBuf>,
}

impl SyncPlan {
    /// Fsyncs the files, then the directories; the first error, which the caller must not
    /// swallow (the store is no longer known to hold what it wrote).
    pub fn run(self) -> Result<(), String> {
        for (path, file) in self.files {
            file.sync_data()
                .map_err(|e| format!("fdatasync {} failed: {e}", path.display()))?;
        }
        for dir in self.dirs {
            match File::open(&dir).and_then(|d| d.sync_all()) {
                Ok(()) => {}
                // Removed since (a Reset): nothing there to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("fsync directory {} failed: {e}", dir.display())),
            }
        }
        Ok(())
    }
}

/// Pending bytes beyond this are written out at once.
const PENDING_BYTES_MAX: usize = 1 << 20;
/// Emptied write buffers kept between rounds, and the largest kept (one that took a large
/// record is let go): at most 16 MiB held for writes to come.
const SPARE_BUFFERS_MAX: usize = 8;
const SPARE_BYTES_MAX: usize = 2 * PENDING_BYTES_MAX;

fn group_dir_under(root: &Path, group: GroupId) -> PathBuf {
    root.join(format!("group-{group}"))
}

/// `topic|retry|dlq/n<name>/<queue number>`: names are `[A-Za-z0-9._-]`, at most 249 bytes
/// (the core checks them), and the `n` in front keeps `.` and `..` from meaning a directory.
fn queue_dir_under(root: &Path, group: GroupId, queue: &QueueId) -> PathBuf {
    let topic = queue.topic.as_ref();
    let (kind, name) = if let Some(name) = topic.strip_prefix("%RETRY%") {
        ("retry", name)
    } else if let Some(name) = topic.strip_prefix("%DLQ%") {
        ("dlq", name)
    } else {
        ("topic", topic)
    };
    group_dir_under(root, group)
        .join(kind)
        .join(format!("n{name}"))
        .join(queue.queue.to_string())
}

/// Writes the segment's pending records and frees their buffer.
fn flush(segment: &mut Segment) -> Result<(), String> {
    write_pending(segment)?;
    segment.pending = Vec::new();
    Ok(())
}

/// Writes the segment's pending records, keeping their buffer's capacity.
fn write_pending(segment: &mut Segment) -> Result<(), String> {
    if segment.pending.is_empty() {
        return Ok(());
    }
    // At the place they belong, whatever the file's cursor: a recovery may have cut the file.
    let at = segment.len - segment.pending.len() as u64;
    segment
        .file
        .write_all_at(&segment.pending, at)
        .map_err(|e| format!("cannot write {}: {e}", segment.path.display()))?;
    segment.pending.clear();
    start_writeback(segment);
    Ok(())
}

/// Written bytes the kernel is asked to start writing out at once.
const WRITEBACK_BYTES_MIN: u64 = 1 << 20;

/// Starts the disk writing what was written to the segment, once a megabyte has gathered,
/// without waiting for it (RocksDB's `bytes_per_sync`). Left to the kernel, tens of megabytes
/// stayed dirty until the fsync a snapshot waits for, which then held the disk for 40-90 ms
/// while the Raft logs' fdatasyncs queued behind it: the publishers' p99. Only a hint: the
/// fsync of [`QueueStore::sync_group`] is what makes the bytes durable, and reports errors.
fn start_writeback(segment: &mut Segment) {
    let from = segment.writeback_from;
    if segment.len < from + WRITEBACK_BYTES_MIN {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(from),
            libc::off64_t::try_from(segment.len - from),
        ) else {
            return;
        };
        // SAFETY: the descriptor is the segment's open file; the call reads no memory of ours.
        let _ = unsafe {
            libc::sync_file_range(
                segment.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    segment.writeback_from = segment.len;
}

/// Writes a sealed segment's `.qidx` (fsynced with the segment at the next sync).
fn seal(segment: &mut Segment) -> Result<(), String> {
    let mut bytes = Vec::with_capacity(20 + 4 * segment.positions.len());
    bytes.extend_from_slice(&(segment.positions.len() as u64).to_le_bytes());
    for position in &segment.positions {
        bytes.extend_from_slice(&position.to_le_bytes());
    }
    bytes.extend_from_slice(&segment.len.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let path = segment.index_path();
    fs::write(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    segment.index_unsynced = true;
    Ok(())
}

/// The positions a sealed segment's `.qidx` holds, if it is whole and fits a file of `len`
/// bytes.
fn read_index(path: &Path, file_len: u64) -> Option<(Vec<u32>, u64)> {
    let bytes = fs::read(path).ok()?;
    let (body, crc) = bytes.split_at(bytes.len().checked_sub(4)?);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let count = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    if count > INDEX_POSITIONS_MAX || body.len() as u64 != 16 + 4 * count {
        return None;
    }
    let positions: Vec<u32> = body[8..8 + 4 * count as usize]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let len = u64::from_le_bytes(body[body.len() - 8..].try_into().ok()?);
    let ordered =
        positions.first().is_none_or(|p| *p == 0) && positions.windows(2).all(|w| w[0] < w[1]);
    let fits = positions.last().is_none_or(|p| u64::from(*p) < len) && len <= file_len;
    (ordered && fits).then_some((positions, len))
}

/// Scans a segment's records from the start, checking each (length, checksum, offset), up
/// to the first that does not check or the end; returns their positions and where they end.
fn scan(path: &Path, file: &File, first: Offset) -> Result<(Vec<u32>, u64), String> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut positions = Vec::new();
    let mut at = 0u64;
    let mut record = Vec::new();
    loop {
        let mut header = [0u8; 8];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        let Some(len) = record_len(&header).filter(|l| *l <= RECORD_READ_BYTES_MAX && *l >= 16)
        else {
            break;
        };
        record.clear();
        record.extend_from_slice(&header);
        record.resize(len, 0);
        match reader.read_exact(&mut record[8..]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        let offset = first + positions.len() as Offset;
        if decode_record(&record, offset).is_err() {
            break;
        }
        let Ok(position) = u32::try_from(at) else {
            break;
        };
        positions.push(position);
        at += len as u64;
    }
    Ok((positions, at))
}

/// A queue's segments as an earlier run left them; the newest one's torn tail is cut off.
fn open_queue(dir: &Path) -> Result<QueueFiles, String> {
    let mut firsts: Vec<(Offset, PathBuf)> = entries(dir)?
        .into_iter()
        .filter_map(|(name, path)| {
            let first = name.strip_suffix(".qseg")?.parse::<Offset>().ok()?;
            Some((first, path))
        })
        .collect();
    firsts.sort();
    let count = firsts.len();
    let mut files = QueueFiles::default();
    for (i, (first, path)) in firsts.into_iter().enumerate() {
        let newest = i + 1 == count;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let file_len = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
            .len();
        let index_path = path.with_extension("qidx");
        let indexed = if newest {
            None
        } else {
            read_index(&index_path, file_len)
        };
        let (positions, len) = match indexed {
            Some(indexed) => indexed,
            None => scan(&path, &file, first)?,
        };
        if newest && len < file_len {
            // A torn tail, or records written after the last sync that did not all land.
            file.set_len(len)
                .map_err(|e| format!("cannot cut {}: {e}", path.display()))?;
            remove(&index_path)?;
        }
        files.segments.insert(
            first,
            Segment {
                first,
                path,
                file,
                pending: Vec::new(),
                positions,
                len,
                writeback_from: len,
                unsynced: true,
                index_unsynced: false,
            },
        );
    }
    Ok(files)
}

/// The entries of `dir` (none if it does not exist), by name.
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let read = match fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot list {}: {e}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        if let Some(name) = entry.file_name().to_str() {
            found.push((name.to_string(), entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes a file; one already gone is fine.
fn remove(path: &Path) -> Result<(), String> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_core::broker::{Message, Requeue};
    use std::io::Write;

    fn stored(body: &str) -> StoredMessage {
        StoredMessage {
            producer_id: 1,
            seq: 2,
            message: Message::with_body(body.to_string()),
            stored_ms: 3,
            reconsume_times: 0,
            due_ms: 0,
            origin: None,
        }
    }

    fn write(store: &mut QueueStore, queue: &QueueId, offset: Offset, body: &str) {
        let op = StoreOp::Write {
            queue: queue.clone(),
            offset,
            message: stored(body),
        };
        store.apply(1, op).expect("writes");
    }

    #[test]
    fn records_read_back_across_segments_and_retention_deletes_whole_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = QueueStore::open(dir.path()).expect("opens");
        store.apply(1, StoreOp::Reset).expect("resets");
        let queue = QueueId::new("orders", 0);
        let big = "x".repeat(1 << 20);
        for offset in 0..130 {
            write(&mut store, &queue, offset, &big);
        }
        write(&mut store, &queue, 5, "ignored: offset 5 is held");
        let (records, error) = store.read(1, &queue, &[0, 5, 64, 129]);
        assert_eq!(error, None);
        for (record, offset) in records.iter().zip([0, 5, 64, 129]) {
            assert_eq!(decode_record(record, offset), Ok(stored(&big)));
        }
        let segments = |store: &QueueStore| store.queues[&(1, queue.clone())].segments.len();
        assert!(segments(&store) >= 2, "the records span segments");
        // A snapshot that still references offset 0 is being written: retention waits for it.
        store.sync_group(1, &[(queue.clone(), 0)]).expect("syncs");
        let trim = StoreOp::Trim {
            queue: queue.clone(),
            start: 129,
        };
        store.apply(1, trim).expect("trims");
        assert!(
            store.message(1, &queue, 0).is_ok(),
            "a snapshot that references them keeps the segments"
        );
        store
            .snapshot_written(1, &[(queue.clone(), 129)])
            .expect("trims");
        assert!(store.message(1, &queue, 0).is_err());
        assert!(store.message(1, &queue, 129).is_ok());
        assert_eq!(segments(&store), 1);
        let (records, error) = store.read(1, &queue, &[129, 130]);
        assert_eq!(records.len(), 1);
        assert!(error.is_some_and(|e| e.contains("not in the queue store")));
    }

    #[test]
    fn a_damaged_record_is_refused_by_its_checksum_and_a_requeue_copies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = QueueStore::open(dir.path()).expect("opens");
        let queue = QueueId::new("orders", 0);
        write(&mut store, &queue, 0, "hello");
        write(&mut store, &queue, 1, "world");
        let requeue = Requeue {
            from: queue.clone(),
            from_offset: 1,
            to: QueueId::retry("g", 0),
            offset: 0,
            reconsume_times: 1,
            due_ms: 10,
            stored_ms: 5,
        };
        store.apply(1, StoreOp::Requeue(requeue)).expect("copies");
        let copy = store.message(1, &QueueId::retry("g", 0), 0).expect("reads");
        assert_eq!(
            (copy.message.body.as_ref(), copy.due_ms),
            (&b"world"[..], 10)
        );
        // Flip a byte of the first record's body on disk.
        let files = &mut store.queues.get_mut(&(1, queue.clone())).expect("queue");
        let segment = files.segments.values_mut().next().expect("segment");
        flush(segment).expect("flushes");
        let path = segment.path.clone();
        let mut bytes = fs::read(&path).expect("reads");
        bytes[20] ^= 0x40;
        fs::write(&path, &bytes).expect("writes");
        let (records, error) = store.read(1, &queue, &[0, 1]);
        assert_eq!(
            (records.len(), error),
            (2, None),
            "the store hands bytes over unchecked"
        );
        assert!(
            decode_record(&records[0], 0).is_err(),
            "the core's check refuses them"
        );
        assert!(store.message(1, &queue, 0).is_err());
        assert!(store.message(1, &queue, 1).is_ok());
        // A Reset removes every file of the group.
        store.apply(1, StoreOp::Reset).expect("resets");
        assert!(!dir.path().join("queues/group-1").exists());
    }

    #[test]
    fn consecutive_records_are_read_together_and_a_bad_one_ends_the_read_at_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = QueueStore::open(dir.path()).expect("opens");
        let queue = QueueId::new("orders", 0);
        // Small records in one segment, and bodies of 300 KiB that pass a run's byte limit.
        let body = |offset: Offset| {
            if (40..48).contains(&offset) {
                format!("{offset}:{}", "y".repeat(300 << 10))
            } else {
                format!("message {offset}")
            }
        };
        for offset in 0..100 {
            write(&mut store, &queue, offset, &body(offset));
        }
        let wanted: Vec<Offset> = (0..60).chain([62, 63, 70]).chain(90..100).collect();
        let (records, error) = store.read(1, &queue, &wanted);
        assert_eq!((records.len(), error), (wanted.len(), None));
        for (record, offset) in records.iter().zip(&wanted) {
            let found = decode_record(record, *offset).expect("decodes");
            assert_eq!(found, stored(&body(*offset)), "offset {offset}");
        }

        // A record whose header claims another length, in the middle of a run: the records
        // before it come back, and the error names it.
        let files = store.queues.get_mut(&(1, queue.clone())).expect("queue");
        let segment = files.segments.values_mut().next().expect("segment");
        flush(segment).expect("flushes");
        let (path, at) = (segment.path.clone(), segment.positions[20] as usize);
        let mut bytes = fs::read(&path).expect("reads");
        bytes[at] ^= 0x01;
        fs::write(&path, &bytes).expect("writes");
        let (records, error) = store.read(1, &queue, &(10..30).collect::<Vec<_>>());
        assert_eq!(records.len(), 10);
        assert!(
            error
                .as_ref()
                .is_some_and(|e| e.contains("offset 20 claims")),
            "{error:?}"
        );

        // A file cut short: the records before the cut still come back.
        let cut = segment_len_before(&store, &queue, 80);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(cut))
            .expect("cuts");
        let (records, error) = store.read(1, &queue, &(70..90).collect::<Vec<_>>());
        assert_eq!(records.len(), 10);
        assert!(error.is_some_and(|e| e.contains("cannot read")));
        for (record, offset) in records.iter().zip(70..) {
            assert_eq!(decode_record(record, offset), Ok(stored(&body(offset))));
        }
    }

    /// Where `offset`'s record starts in its segment, which must be the queue's first.
    fn segment_len_before(store: &QueueStore, queue: &QueueId, offset: Offset) -> u64 {
        let segment = store.queues[&(1, queue.clone())]
            .segments
            .values()
            .next()
            .expect("segment");
        assert!(offset < segment.end());
        u64::from(segment.positions[(offset - segment.first) as usize])
    }

    fn range(queue: &QueueId, start: Offset, end: Offset) -> QueueRange {
        QueueRange {
            queue: queue.clone(),
            start,
            end,
        }
    }

    /// What a synced store held comes back at the next open without a scan of its sealed
    /// segments; a recovery cuts what lies past the snapshot's end (a torn tail included)
    /// and the log's writes land after it.
    #[test]
    fn a_synced_store_survives_a_restart_and_its_tail_is_cut_to_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = QueueId::new("orders", 3);
        let retry = QueueId::retry("billing", 1);
        let big = "y".repeat(300_000);
        {
            let mut store = QueueStore::open(dir.path()).expect("opens");
            for offset in 0..500 {
                write(&mut store, &queue, offset, &big);
            }
            write(&mut store, &retry, 0, "again");
            store.sync_group(1, &[(queue.clone(), 0)]).expect("syncs");
            // Written after the snapshot, then a torn record.
            write(&mut store, &queue, 500, "after");
            store.flush().expect("flushes");
            let files = &store.queues[&(1, queue.clone())];
            let last = files.segments.values().next_back().expect("segment");
            let mut file = OpenOptions::new()
                .append(true)
                .open(&last.path)
                .expect("opens");
            file.write_all(&[9, 0, 0, 0, 1, 2]).expect("tears");
        }
        let index_files = fs::read_dir(dir.path().join("queues/group-1/topic/norders/3"))
            .expect("lists")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "qidx"))
            })
            .count();
        assert!(
            index_files >= 2,
            "sealed segments have indexes: {index_files}"
        );
        let mut store = QueueStore::open(dir.path()).expect("opens again");
        assert_eq!(
            store.queues[&(1, queue.clone())].end(),
            Some(501),
            "the torn record is cut"
        );
        let recover = StoreOp::Recover {
            queues: vec![range(&queue, 0, 500), range(&retry, 0, 1)],
        };
        store.apply(1, recover).expect("recovers");
        assert_eq!(store.queues[&(1, queue.clone())].end(), Some(500));
        write(&mut store, &queue, 500, "replayed");
        let replayed = store.message(1, &queue, 500).expect("reads");
        assert_eq!(replayed.message.body.as_ref(), b"replayed");
        assert_eq!(
            store
                .message(1, &queue, 0)
                .expect("reads")
                .message
                .body
                .len(),
            big.len()
        );
        assert_eq!(
            store
                .message(1, &queue, 499)
                .expect("reads")
                .message
                .body
                .len(),
            big.len()
        );
        assert!(store.message(1, &retry, 0).is_ok());
    }

    /// A store that lacks what a snapshot references refuses to recover, naming the offset;
    /// a damaged index is not trusted (the segment is scanned instead).
    #[test]
    fn a_store_missing_a_segment_the_snapshot_needs_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = QueueId::new("orders", 0);
        let big = "z".repeat(1 << 20);
        let paths: Vec<PathBuf> = {
            let mut store = QueueStore::open(dir.path()).expect("opens");
            for offset in 0..200 {
                write(&mut store, &queue, offset, &big);
            }
            store.sync_group(1, &[(queue.clone(), 0)]).expect("syncs");
            store.queues[&(1, queue.clone())]
                .segments
                .values()
                .map(|s| s.path.clone())
                .collect()
        };
        assert!(paths.len() >= 3);
        // A damaged index: the segment is scanned, and reads the same.
        let index = paths[0].with_extension("qidx");
        let mut bytes = fs::read(&index).expect("reads");
        bytes[9] ^= 1;
        fs::write(&index, &bytes).expect("writes");
        let mut store = QueueStore::open(dir.path()).expect("opens");
        store
            .apply(
                1,
                StoreOp::Recover {
                    queues: vec![range(&queue, 0, 200)],
                },
            )
            .expect("recovers");
        assert!(store.message(1, &queue, 1).is_ok());
        drop(store);
        fs::remove_file(&paths[1]).expect("removes");
        let mut store = QueueStore::open(dir.path()).expect("opens");
        let error = store
            .apply(
                1,
                StoreOp::Recover {
                    queues: vec![range(&queue, 0, 200)],
                },
            )
            .expect_err("refused");
        assert!(error.contains("lacks orders/0@"), "{error}");
    }

    /// A follower's store catches up from a peer's in bounded chunks read from its files:
    /// the plan names only what it lacks, every chunk is at most the bound (but for one
    /// larger record), a chunk with a flipped byte is refused whole and writes nothing, and
    /// what was fetched reads back the same.
    #[test]
    fn a_store_catches_up_from_a_peers_segments_in_bounded_chunks() {
        let leader_dir = tempfile::tempdir().expect("tempdir");
        let follower_dir = tempfile::tempdir().expect("tempdir");
        let queue = QueueId::new("orders", 1);
        let gone = QueueId::new("gone", 0);
        let mut leader = QueueStore::open(leader_dir.path()).expect("opens");
        let mut follower = QueueStore::open(follower_dir.path()).expect("opens");
        let body = |offset: Offset| format!("{offset}:{}", "m".repeat(40_000));
        for offset in 0..300 {
            write(&mut leader, &queue, offset, &body(offset));
        }
        // The follower holds the first 20 (as it applied them before it fell behind), and a
        // queue the snapshot no longer knows.
        for offset in 0..20 {
            write(&mut follower, &queue, offset, &body(offset));
        }
        write(&mut follower, &gone, 0, "dropped");
        let plan = follower
            .catch_up_plan(1, &[range(&queue, 10, 300)])
            .expect("plans");
        assert_eq!(plan, vec![(queue.clone(), 20, 300)], "only what it lacks");
        assert!(follower.message(1, &gone, 0).is_err(), "unknown queues go");
        let bytes_max = 256 << 10;
        let (mut next, mut chunks) = (20, 0);
        while next < 300 {
            let chunk = leader
                .chunk(1, &queue, next, 300, bytes_max)
                .expect("reads");
            assert!(chunk.len() <= bytes_max, "{} bytes", chunk.len());
            if chunks == 3 {
                let mut bad = chunk.to_vec();
                bad[chunk.len() / 2] ^= 0x10;
                let refused = follower.fill(1, &queue, next, &bad).expect_err("refused");
                assert!(refused.contains("checksum"), "{refused}");
                assert!(
                    !follower.failed(),
                    "bad bytes from a peer do not fail the store"
                );
            }
            next = follower.fill(1, &queue, next, &chunk).expect("fills");
            chunks += 1;
        }
        assert!(chunks > 20, "{chunks} chunks");
        assert!(
            follower
                .fill(
                    1,
                    &queue,
                    5,
                    &leader.chunk(1, &queue, 5, 6, bytes_max).expect("reads")
                )
                .is_err(),
            "records below what the store holds are refused"
        );
        // A chunk that claims to start elsewhere is refused by its offsets.
        let misplaced = leader.chunk(1, &queue, 250, 251, bytes_max).expect("reads");
        assert!(
            follower
                .fill(1, &QueueId::new("orders", 2), 0, &misplaced)
                .is_err()
        );
        follower.sync_group(1, &[]).expect("syncs");
        for offset in [10, 19, 20, 150, 299] {
            let message = follower.message(1, &queue, offset).expect("reads");
            assert_eq!(message.message.body.as_ref(), body(offset).as_bytes());
        }
        drop(follower);
        let mut reopened = QueueStore::open(follower_dir.path()).expect("reopens");
        reopened
            .apply(
                1,
                StoreOp::Recover {
                    queues: vec![range(&queue, 10, 300)],
                },
            )
            .expect("what was fetched is there after a restart");
        let plan = reopened
            .catch_up_plan(1, &[range(&queue, 10, 400)])
            .expect("plans");
        assert_eq!(
            plan,
            vec![(queue.clone(), 300, 400)],
            "resumes where it was"
        );
        // A queue with a hole in front of what it holds is fetched whole.
        let holed = QueueId::new("holed", 0);
        let records = leader.chunk(1, &queue, 50, 60, 1 << 20).expect("reads");
        assert_eq!(reopened.fill(1, &holed, 50, &records), Ok(60));
        let plan = reopened
            .catch_up_plan(1, &[range(&queue, 10, 400), range(&holed, 0, 100)])
            .expect("plans");
        assert_eq!(
            plan,
            vec![(queue.clone(), 300, 400), (holed.clone(), 0, 100)]
        );
        assert!(reopened.message(1, &holed, 55).is_err(), "emptied");
    }
}
