//! The queue store in files: where a node's message bytes live, so that its memory holds
//! only the core's per-queue index and a bounded cache of the newest messages.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/queues/group-<id>/<topic|retry|dlq>/n<name>/<queue>/<first offset>.qseg
//!     records [len u32][crc32c u32][offset u64][message]
//! ```
//!
//! Offsets in names are zero-padded to 20 digits. The record format is the core's
//! ([`holdfast_core::broker::encode_record`]); the core checks every record read back against
//! its checksum and offset before a consumer sees it.
//!
//! What the files mean after a crash is simple on purpose: nothing. The core writes every
//! retained message again at start (`StoreOp::Reset`, then the snapshot's messages and the log
//! tail's), so the store is never the only copy of a message and needs no fsync: the Raft log
//! and snapshots are the durable copies. (A store that survives restarts, with snapshots that
//! hold only metadata, is the next step of issue 14.)
//!
//! A queue's records go to its newest segment until it passes [`SEGMENT_BYTES_MAX`]; retention
//! deletes whole segments below a queue's new start. The position of every record in its
//! segment stays in memory: four bytes per message.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use holdfast_core::broker::{Offset, QueueId, StoreOp, StoredMessage, decode_record, record_len};
use holdfast_core::raft::GroupId;

/// A segment takes records until it holds this many bytes; the next record starts another.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;

/// A record read back is refused beyond this length: a damaged length must not allocate
/// gigabytes.
const RECORD_READ_BYTES_MAX: usize = 2 * holdfast_core::limits::COMMAND_BYTES_MAX + 4096;

struct Segment {
    first: Offset,
    path: PathBuf,
    file: File,
    /// Records written but not yet handed to the file: written out at the end of each round
    /// of the event loop ([`QueueStore::flush`]) and before a read of this segment, then freed,
    /// so that idle queues hold no buffer.
    pending: Vec<u8>,
    /// The position of the record of offset `first + i`.
    positions: Vec<u32>,
    len: u64,
}

impl Segment {
    fn end(&self) -> Offset {
        self.first + self.positions.len() as Offset
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
}

/// Every queue's files under `<data_dir>/queues`.
pub struct QueueStore {
    dir: PathBuf,
    queues: BTreeMap<(GroupId, QueueId), QueueFiles>,
    /// Groups whose snapshot is being encoded from the store, and the trims that wait for it:
    /// a snapshot reads every message its image retains.
    held: BTreeMap<GroupId, Vec<(QueueId, Offset)>>,
    /// Queues whose newest segment has pending bytes.
    dirty: BTreeSet<(GroupId, QueueId)>,
}

impl QueueStore {
    /// The store under `data_dir`; what an earlier run left there is removed at the first
    /// `Reset` of each group, which the core asks for at start.
    pub fn open(data_dir: &Path) -> QueueStore {
        QueueStore {
            dir: data_dir.join("queues"),
            queues: BTreeMap::new(),
            held: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        self.dir.join(format!("group-{group}"))
    }

    /// `topic|retry|dlq/n<name>/<queue number>`: names are `[A-Za-z0-9._-]`, at most 249 bytes
    /// (the core checks them), and the `n` in front keeps `.` and `..` from meaning a directory.
    fn queue_dir(&self, group: GroupId, queue: &QueueId) -> PathBuf {
        let topic = queue.topic.as_str();
        let (kind, name) = if let Some(name) = topic.strip_prefix("%RETRY%") {
            ("retry", name)
        } else if let Some(name) = topic.strip_prefix("%DLQ%") {
            ("dlq", name)
        } else {
            ("topic", topic)
        };
        self.group_dir(group)
            .join(kind)
            .join(format!("n{name}"))
            .join(queue.queue.to_string())
    }

    /// Carries out `op` of `group`. An error is an I/O error (the node must stop: its store
    /// no longer holds what its index says) or a requeue whose original does not read.
    pub fn apply(&mut self, group: GroupId, op: StoreOp) -> Result<(), String> {
        match op {
            StoreOp::Reset => {
                self.queues.retain(|(g, _), _| *g != group);
                self.dirty.retain(|(g, _)| *g != group);
                self.held.remove(&group);
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
                record,
            } => self.write(group, queue, offset, &record),
            StoreOp::Requeue(requeue) => {
                let original = self.read_one(group, &requeue.from, requeue.from_offset)?;
                let record = requeue.record(&original).map_err(|e| {
                    format!("requeue of {}@{}: {e}", requeue.from, requeue.from_offset)
                })?;
                self.write(group, requeue.to, requeue.offset, &record)
            }
            StoreOp::Trim { queue, start } => {
                if let Some(waiting) = self.held.get_mut(&group) {
                    waiting.push((queue, start));
                    return Ok(());
                }
                self.trim(group, &queue, start)
            }
        }
    }

    fn write(
        &mut self,
        group: GroupId,
        queue: QueueId,
        offset: Offset,
        record: &[u8],
    ) -> Result<(), String> {
        let dir = self.queue_dir(group, &queue);
        let key = (group, queue);
        if !self.dirty.contains(&key) {
            self.dirty.insert(key.clone());
        }
        let files = self.queues.entry(key).or_default();
        match files.end() {
            // Written before (a log entry applied again): the same bytes are there.
            Some(end) if offset < end => return Ok(()),
            _ => {}
        }
        let roll = match files.segments.values().next_back() {
            None => true,
            Some(last) => last.end() != offset || last.len >= SEGMENT_BYTES_MAX,
        };
        if roll {
            if let Some(last) = files.segments.values_mut().next_back() {
                flush(last)?;
            }
            fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
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
                },
            );
        }
        let Some(segment) = files.segments.values_mut().next_back() else {
            return Err("no segment to write to".into());
        };
        let position = u32::try_from(segment.len)
            .map_err(|_| format!("{} passed 4 GiB", segment.path.display()))?;
        segment.pending.extend_from_slice(record);
        if segment.pending.len() >= PENDING_BYTES_MAX {
            flush(segment)?;
        }
        segment.positions.push(position);
        segment.len += record.len() as u64;
        Ok(())
    }

    fn trim(&mut self, group: GroupId, queue: &QueueId, start: Offset) -> Result<(), String> {
        let Some(files) = self.queues.get_mut(&(group, queue.clone())) else {
            return Ok(());
        };
        // Whole segments only, and never the newest (it takes the next writes).
        while files.segments.len() > 1 {
            let Some(first) = files.segments.values().next() else {
                break;
            };
            if first.end() > start {
                break;
            }
            let first = first.first;
            if let Some(segment) = files.segments.remove(&first) {
                fs::remove_file(&segment.path)
                    .map_err(|e| format!("cannot remove {}: {e}", segment.path.display()))?;
            }
        }
        Ok(())
    }

    /// A snapshot of `group` is being encoded: trims wait until [`QueueStore::release`].
    pub fn hold(&mut self, group: GroupId) {
        self.held.entry(group).or_default();
    }

    /// The snapshot of `group` is encoded: the trims that waited are carried out.
    pub fn release(&mut self, group: GroupId) -> Result<(), String> {
        for (queue, start) in self.held.remove(&group).unwrap_or_default() {
            self.trim(group, &queue, start)?;
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
        let missing = || format!("{queue}@{offset} is not in the queue store");
        let files = self
            .queues
            .get_mut(&(group, queue.clone()))
            .ok_or_else(missing)?;
        let segment = files
            .segments
            .range_mut(..=offset)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| offset < s.end())
            .ok_or_else(missing)?;
        let index = (offset - segment.first) as usize;
        let position = u64::from(segment.positions[index]);
        let next = segment
            .positions
            .get(index + 1)
            .map_or(segment.len, |p| u64::from(*p));
        flush(segment)?;
        let file = &segment.file;
        let mut header = [0u8; 4];
        file.read_exact_at(&mut header, position)
            .map_err(|e| format!("cannot read {}: {e}", segment.path.display()))?;
        let len = record_len(&header).unwrap_or(0);
        let expected = (next - position) as usize;
        if len != expected || len > RECORD_READ_BYTES_MAX {
            return Err(format!(
                "{}: the record of offset {offset} claims {len} bytes where {expected} were written",
                segment.path.display()
            ));
        }
        let mut record = vec![0u8; len];
        file.read_exact_at(&mut record, position)
            .map_err(|e| format!("cannot read {}: {e}", segment.path.display()))?;
        Ok(Bytes::from(record))
    }

    /// The records of `offsets`, up to the first that cannot be read (and why).
    pub fn read(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        offsets: &[Offset],
    ) -> (Vec<Bytes>, Option<String>) {
        let mut records = Vec::with_capacity(offsets.len());
        for offset in offsets {
            match self.read_one(group, queue, *offset) {
                Ok(record) => records.push(record),
                Err(why) => return (records, Some(why)),
            }
        }
        (records, None)
    }

    /// The message of `(queue, offset)`, checked: for snapshots.
    pub fn message(
        &mut self,
        group: GroupId,
        queue: &QueueId,
        offset: Offset,
    ) -> Result<StoredMessage, String> {
        let record = self.read_one(group, queue, offset)?;
        decode_record(&record, offset).map_err(|e| format!("{queue}@{offset}: {e}"))
    }

    /// Hands every pending record to its file (no fsync: see the module's notes) and frees
    /// the buffers.
    pub fn flush(&mut self) -> Result<(), String> {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(segment) = self
                .queues
                .get_mut(&key)
                .and_then(|q| q.segments.values_mut().next_back())
            {
                flush(segment)?;
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

/// Pending bytes beyond this are written out at once.
const PENDING_BYTES_MAX: usize = 1 << 20;

fn flush(segment: &mut Segment) -> Result<(), String> {
    if segment.pending.is_empty() {
        return Ok(());
    }
    segment
        .file
        .write_all(&segment.pending)
        .map_err(|e| format!("cannot write {}: {e}", segment.path.display()))?;
    segment.pending = Vec::new();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_core::broker::{Message, Requeue, encode_record};

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
            record: encode_record(offset, &stored(body)),
        };
        store.apply(1, op).expect("writes");
    }

    #[test]
    fn records_read_back_across_segments_and_retention_deletes_whole_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = QueueStore::open(dir.path());
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
        store.hold(1);
        let trim = StoreOp::Trim {
            queue: queue.clone(),
            start: 129,
        };
        store.apply(1, trim).expect("trims");
        assert!(
            store.message(1, &queue, 0).is_ok(),
            "a held group keeps its segments"
        );
        store.release(1).expect("trims");
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
        let mut store = QueueStore::open(dir.path());
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
}
