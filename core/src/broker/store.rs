//! The queue store: where a broker group's message bytes live, outside the state machine.
//!
//! Applying a command that adds messages hands the driver a [`StoreOp`] to carry out; serving
//! a pull that the cache cannot serve asks the driver to read records back
//! ([`crate::node::StoreRead`]). The record format is pure code here, so the shell's files and
//! the simulator's disk hold the same bytes and every read is checked by the same function
//! before anything reaches a consumer.
//!
//! ```text
//! record = [len u32 LE][crc32c u32 LE][offset u64 LE][postcard StoredMessage]
//! ```
//! `len` counts the bytes after the checksum; the checksum covers exactly those bytes.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

use super::types::{Offset, Origin, QueueId, StoredMessage};
use crate::storage::{QueueSegment, plan_queue_recovery};
use crate::wire::AppendTo;

/// Bytes in front of a record's offset: its length and checksum.
pub const STORE_RECORD_HEADER_BYTES: usize = 8;

/// What the driver's queue store must do for one broker group, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Forget every message of the group: the node starts afresh (every message it retains is
    /// written again, from a snapshot and from its log).
    Reset,
    /// Hold `message` as the record at `(queue, offset)`, encoded by [`encode_record_into`]
    /// straight into whatever buffer the store writes from (an encoded record of its own per
    /// message, allocated and copied again, was a tenth of a publishing node's CPU). A write
    /// to an offset already held carries the same message (the log is deterministic): the
    /// store may keep what it has or overwrite it.
    Write {
        queue: QueueId,
        offset: Offset,
        message: StoredMessage,
    },
    /// Copy the message at `(from, from_offset)` to `(to, offset)` as [`Requeue::record`] says:
    /// a `ReconsumeLater` of a message the cache no longer held.
    Requeue(Requeue),
    /// Retention dropped every message of `queue` below `start`: the store may delete them,
    /// but not below what the newest metadata snapshot it synced for still references (a
    /// restart from that snapshot needs them until a newer one is durable).
    Trim { queue: QueueId, start: Offset },
    /// The node restarted from a metadata snapshot (its state without message bytes): the
    /// store must hold every message of each queue's `start..end` from before the crash
    /// (it was synced before that snapshot was written), else the error names what it
    /// lacks. Whatever it holds at or past a queue's `end` (possibly torn: written after the
    /// snapshot, perhaps never synced) is dropped: replaying the log writes it again. Queues
    /// the snapshot does not know are dropped too, and below `start` the store may delete.
    Recover { queues: Vec<QueueRange> },
    /// The node installed a metadata snapshot from node `from` (its store may hold none of
    /// what the snapshot references): the store must come to hold every message of each
    /// queue's `start..end`, fetching what it lacks from `from` (or another peer that holds
    /// it) and syncing it, before anything the group writes after this operation (the
    /// snapshot's own write first) is made durable, since the replica acknowledges the
    /// snapshot once that write is. What it holds past a queue's `end`, and queues the snapshot
    /// does not know, are dropped, as for [`StoreOp::Recover`].
    CatchUp { from: u64, queues: Vec<QueueRange> },
    /// The queue's topic was deleted: the store forgets every message of `queue` (its files
    /// go, durably by the next sync), and a queue created again with the same name starts
    /// empty.
    DropQueue { queue: QueueId },
}

impl StoreOp {
    /// About what the operation holds in memory until the driver carries it out: a write's
    /// record, a fixed allowance for the rest (a queue name and a few numbers each).
    pub fn weight_bytes(&self) -> u64 {
        const SMALL_BYTES: u64 = 64;
        match self {
            StoreOp::Write { message, .. } => {
                SMALL_BYTES + (message.message.size_bytes() + RECORD_SLACK_BYTES) as u64
            }
            StoreOp::Recover { queues } | StoreOp::CatchUp { queues, .. } => {
                SMALL_BYTES * (1 + queues.len() as u64)
            }
            StoreOp::Reset
            | StoreOp::Requeue(_)
            | StoreOp::Trim { .. }
            | StoreOp::DropQueue { .. } => SMALL_BYTES,
        }
    }
}

/// What a metadata snapshot says a queue holds: offsets `start..end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRange {
    pub queue: QueueId,
    pub start: Offset,
    pub end: Offset,
}

/// A message moved to a retry or dead-letter queue, by a store that holds its original.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requeue {
    pub from: QueueId,
    pub from_offset: Offset,
    pub to: QueueId,
    pub offset: Offset,
    pub reconsume_times: u32,
    pub due_ms: u64,
    pub stored_ms: u64,
}

impl Requeue {
    /// The record of the copy, from the original's record. A damaged original is an error:
    /// the store must report it, never write a guess.
    pub fn record(&self, original: &[u8]) -> Result<Bytes, StoreRecordError> {
        let stored = decode_record(original, self.from_offset)?;
        Ok(encode_record(self.offset, &self.copy_of(stored)))
    }

    /// The copy of `stored`, the message at `(from, from_offset)`.
    pub fn copy_of(&self, mut stored: StoredMessage) -> StoredMessage {
        // Its own bytes: a cached original's body is a slice of the whole Raft entry it came
        // in, which a copy in a retry queue could otherwise keep alive long after.
        stored.message.body = Bytes::copy_from_slice(&stored.message.body);
        stored.message.key = stored.message.key.map(|k| Bytes::copy_from_slice(&k));
        let origin = stored.origin.clone().unwrap_or(Origin {
            queue: self.from.clone(),
            offset: self.from_offset,
        });
        StoredMessage {
            reconsume_times: self.reconsume_times,
            due_ms: self.due_ms,
            origin: Some(origin),
            stored_ms: self.stored_ms,
            ..stored
        }
    }
}

/// Why stored bytes are not the message asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreRecordError {
    Truncated { len: usize },
    Checksum { stored: u32, computed: u32 },
    WrongOffset { expected: Offset, found: Offset },
    Undecodable(String),
}

impl fmt::Display for StoreRecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreRecordError::Truncated { len } => {
                write!(f, "stored record truncated: {len} bytes")
            }
            StoreRecordError::Checksum { stored, computed } => write!(
                f,
                "stored record damaged: checksum {stored:#010x}, computed {computed:#010x}"
            ),
            StoreRecordError::WrongOffset { expected, found } => write!(
                f,
                "stored record is offset {found} where offset {expected} was asked for"
            ),
            StoreRecordError::Undecodable(why) => write!(f, "stored record does not decode: {why}"),
        }
    }
}

impl std::error::Error for StoreRecordError {}

/// Room beyond a message's [`super::Message::size_bytes`] for what postcard adds around it: length
/// prefixes, time stamps, counts.
const RECORD_SLACK_BYTES: usize = 64;

/// The record of `stored` at `offset`, in a buffer of its own.
pub fn encode_record(offset: Offset, stored: &StoredMessage) -> Bytes {
    let mut bytes = Vec::new();
    encode_record_into(&mut bytes, offset, stored);
    Bytes::from(bytes)
}

/// Appends the record of `stored` at `offset` to `out`; returns its length.
pub fn encode_record_into(out: &mut Vec<u8>, offset: Offset, stored: &StoredMessage) -> usize {
    // Room for the whole record at once: grown from the header, a 1 KiB message took seven
    // reallocations, and those were a tenth of a busy node's CPU.
    out.reserve(STORE_RECORD_HEADER_BYTES + 8 + stored.message.size_bytes() + RECORD_SLACK_BYTES);
    let start = out.len();
    out.resize(start + STORE_RECORD_HEADER_BYTES, 0);
    out.extend_from_slice(&offset.to_le_bytes());
    // A message of plain values always serialises; were serde ever to fail, the record is
    // left a bare header of length 0, which every read refuses as truncated, never misreads.
    let body_at = start + STORE_RECORD_HEADER_BYTES;
    if postcard::serialize_with_flavor(stored, AppendTo(out)).is_err() {
        out.truncate(body_at);
        return STORE_RECORD_HEADER_BYTES;
    }
    let len = (out.len() - body_at) as u32;
    let crc = crc32c::crc32c(&out[body_at..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..body_at].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// The length of the record starting `bytes`, header included, if the header is there.
pub fn record_len(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    Some(STORE_RECORD_HEADER_BYTES + len as usize)
}

/// The message in `record`, which must be exactly one record, checked against its checksum
/// and against the offset it is read for.
pub fn decode_record(record: &[u8], offset: Offset) -> Result<StoredMessage, StoreRecordError> {
    decode_record_checking(record, offset, true)
}

/// Checks `record` as [`decode_record`] does (one whole record, its checksum, its offset)
/// without decoding the message: for bytes copied from store to store whole, such as the
/// segments a peer sends to a follower catching up.
pub fn check_record(record: &[u8], offset: Offset) -> Result<(), StoreRecordError> {
    if record.len() < STORE_RECORD_HEADER_BYTES + 8 || record_len(record) != Some(record.len()) {
        return Err(StoreRecordError::Truncated { len: record.len() });
    }
    let (header, body) = record.split_at(STORE_RECORD_HEADER_BYTES);
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(StoreRecordError::Checksum { stored, computed });
    }
    let mut found = [0; 8];
    found.copy_from_slice(&body[..8]);
    let found = u64::from_le_bytes(found);
    if found != offset {
        return Err(StoreRecordError::WrongOffset {
            expected: offset,
            found,
        });
    }
    Ok(())
}

/// [`decode_record`], skipping the checksum when `check` is off: the planted bug
/// `Canary::ServeUncheckedRead`, which the simulator's read faults must reveal.
pub(crate) fn decode_record_checking(
    record: &[u8],
    offset: Offset,
    check: bool,
) -> Result<StoredMessage, StoreRecordError> {
    let truncated = StoreRecordError::Truncated { len: record.len() };
    if record.len() < STORE_RECORD_HEADER_BYTES + 8 || record_len(record) != Some(record.len()) {
        return Err(truncated);
    }
    let (header, body) = record.split_at(STORE_RECORD_HEADER_BYTES);
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let computed = crc32c::crc32c(body);
    if stored != computed && check {
        return Err(StoreRecordError::Checksum { stored, computed });
    }
    let (offset_bytes, payload) = body.split_at(8);
    let mut found = [0; 8];
    found.copy_from_slice(offset_bytes);
    let found = u64::from_le_bytes(found);
    if found != offset {
        return Err(StoreRecordError::WrongOffset {
            expected: offset,
            found,
        });
    }
    postcard::from_bytes(payload).map_err(|e| StoreRecordError::Undecodable(e.to_string()))
}

/// The runs of consecutive offsets in `records`, as a file store's segments.
fn runs(records: &BTreeMap<Offset, Bytes>) -> Vec<QueueSegment> {
    let mut runs: Vec<QueueSegment> = Vec::new();
    for offset in records.keys() {
        match runs.last_mut() {
            Some(run) if run.first.saturating_add(run.count) == *offset => run.count += 1,
            _ => runs.push(QueueSegment {
                first: *offset,
                count: 1,
            }),
        }
    }
    runs
}

/// A queue store in memory, for drivers that hold no files: the core's tests, fuzzing and
/// the simulator (whose disk keeps a copy per node taken at each sync, what a crash leaves).
/// It carries out [`StoreOp`]s and reads records back as a file store does, damage included.
/// Retention deletes nothing here: the simulator's runs are short, and keeping every record
/// makes "a restart from an older snapshot finds what it references" trivially true.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    queues: BTreeMap<(u64, QueueId), BTreeMap<Offset, Bytes>>,
}

impl MemoryStore {
    /// Carries out `op` for broker group `group`. An error when a requeue's original is
    /// missing or damaged: the store cannot make the copy.
    pub fn apply(&mut self, group: u64, op: StoreOp) -> Result<(), String> {
        match op {
            StoreOp::Reset => {
                self.queues.retain(|(g, _), _| *g != group);
            }
            StoreOp::Write {
                queue,
                offset,
                message,
            } => self.insert_record(group, queue, offset, encode_record(offset, &message)),
            StoreOp::Requeue(requeue) => {
                let original = self
                    .record(group, &requeue.from, requeue.from_offset)
                    .ok_or_else(|| {
                        format!(
                            "requeue: the store does not hold {}@{}",
                            requeue.from, requeue.from_offset
                        )
                    })?;
                let record = requeue.record(original).map_err(|e| {
                    format!("requeue of {}@{}: {e}", requeue.from, requeue.from_offset)
                })?;
                self.insert_record(group, requeue.to, requeue.offset, record);
            }
            StoreOp::Trim { .. } => {}
            // Drivers with a memory store (the simulator) send transfer images instead.
            StoreOp::CatchUp { from, .. } => {
                return Err(format!(
                    "a memory store cannot fetch segments from node {from}: use transfer images"
                ));
            }
            StoreOp::DropQueue { queue } => {
                self.queues.remove(&(group, queue));
            }
            StoreOp::Recover { queues } => {
                let wanted: BTreeMap<&QueueId, &QueueRange> =
                    queues.iter().map(|r| (&r.queue, r)).collect();
                self.queues
                    .retain(|(g, q), _| *g != group || wanted.contains_key(q));
                for range in &queues {
                    let records = self.queues.entry((group, range.queue.clone())).or_default();
                    // The decision the shell's file store takes too, over runs of consecutive
                    // records as its segments.
                    let plan = plan_queue_recovery(&runs(records), range.start, range.end);
                    if let Some(first) = plan.remove.iter().min() {
                        records.split_off(first);
                    }
                    if let Some((first, keep)) = plan.cut {
                        records.split_off(&first.saturating_add(keep));
                    }
                    *records = records.split_off(&range.start);
                    if let Some(missing) = plan.lacks {
                        return Err(format!(
                            "the store lacks {}@{missing}, which the snapshot references \
                             ({}..{})",
                            range.queue, range.start, range.end
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Holds `record` as it is at `(queue, offset)` of `group`: a record copied whole from
    /// another store (a catch-up), or bytes a test makes up.
    pub fn insert_record(&mut self, group: u64, queue: QueueId, offset: Offset, record: Bytes) {
        self.queues
            .entry((group, queue))
            .or_default()
            .insert(offset, record);
    }

    /// The record at `(queue, offset)` of `group`, unchecked.
    pub fn record(&self, group: u64, queue: &QueueId, offset: Offset) -> Option<&Bytes> {
        self.queues.get(&(group, queue.clone()))?.get(&offset)
    }

    /// The records of `offsets`, up to the first the store does not hold (with the reason).
    pub fn read(
        &self,
        group: u64,
        queue: &QueueId,
        offsets: &[Offset],
    ) -> (Vec<Bytes>, Option<String>) {
        let mut records = Vec::with_capacity(offsets.len());
        for offset in offsets {
            match self.record(group, queue, *offset) {
                Some(record) => records.push(record.clone()),
                None => {
                    return (
                        records,
                        Some(format!("{queue}@{offset} is not in the store")),
                    );
                }
            }
        }
        (records, None)
    }

    /// The message at `(queue, offset)` of `group`, checked; `None` if missing or damaged.
    pub fn message(&self, group: u64, queue: &QueueId, offset: Offset) -> Option<StoredMessage> {
        decode_record(self.record(group, queue, offset)?, offset).ok()
    }

    /// Replaces the record at `(queue, offset)` (a fault: damage under the checksum).
    pub fn replace(&mut self, group: u64, queue: &QueueId, offset: Offset, record: Bytes) -> bool {
        match self
            .queues
            .get_mut(&(group, queue.clone()))
            .and_then(|q| q.get_mut(&offset))
        {
            Some(held) => {
                *held = record;
                true
            }
            None => false,
        }
    }

    /// Every `(group, queue, offset)` held, in order.
    pub fn places(&self) -> impl Iterator<Item = (u64, &QueueId, Offset)> {
        self.queues
            .iter()
            .flat_map(|((g, q), records)| records.keys().map(move |o| (*g, q, *o)))
    }

    /// Bytes of every record held.
    pub fn bytes(&self) -> usize {
        self.queues
            .values()
            .flat_map(|r| r.values())
            .map(Bytes::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Message;

    fn stored() -> StoredMessage {
        StoredMessage {
            producer_id: 7,
            seq: 3,
            message: Message::with_body("hello"),
            stored_ms: 10,
            reconsume_times: 0,
            due_ms: 0,
            origin: None,
        }
    }

    #[test]
    fn a_record_reads_back_and_every_damage_is_refused() {
        let record = encode_record(42, &stored());
        assert_eq!(record_len(&record), Some(record.len()));
        assert_eq!(decode_record(&record, 42), Ok(stored()));
        assert!(matches!(
            decode_record(&record, 41),
            Err(StoreRecordError::WrongOffset { .. })
        ));
        for i in 0..record.len() {
            let mut bad = record.to_vec();
            bad[i] ^= 0x10;
            assert!(
                decode_record(&bad, 42).is_err(),
                "a flip at byte {i} passed"
            );
        }
        for cut in 0..record.len() {
            assert!(
                decode_record(&record[..cut], 42).is_err(),
                "cut at {cut} passed"
            );
        }
    }

    #[test]
    fn records_encoded_into_a_buffer_follow_what_it_holds_and_read_back() {
        let mut pending = b"earlier records".to_vec();
        let len = encode_record_into(&mut pending, 42, &stored());
        let mut other = stored();
        other.message.body = Bytes::from_static(b"a second one");
        let second = encode_record_into(&mut pending, 43, &other);
        let first_at = b"earlier records".len();
        assert_eq!(&pending[..first_at], b"earlier records");
        let record = &pending[first_at..first_at + len];
        assert_eq!(record, &encode_record(42, &stored())[..]);
        assert_eq!(decode_record(record, 42), Ok(stored()));
        assert_eq!(pending.len(), first_at + len + second);
        assert_eq!(decode_record(&pending[first_at + len..], 43), Ok(other));
    }

    #[test]
    fn a_requeued_copy_keeps_its_first_origin() {
        let requeue = Requeue {
            from: QueueId::new("t", 0),
            from_offset: 42,
            to: QueueId::retry("g", 0),
            offset: 0,
            reconsume_times: 1,
            due_ms: 1_010,
            stored_ms: 10,
        };
        let copy = requeue
            .record(&encode_record(42, &stored()))
            .expect("copies");
        let copy = decode_record(&copy, 0).expect("reads");
        let origin = copy.origin.clone().expect("origin");
        assert_eq!((origin.queue, origin.offset), (QueueId::new("t", 0), 42));
        assert_eq!((copy.reconsume_times, copy.due_ms), (1, 1_010));
        let again = Requeue {
            from: QueueId::retry("g", 0),
            from_offset: 0,
            offset: 5,
            reconsume_times: 2,
            ..requeue.clone()
        };
        let twice = again.record(&encode_record(0, &copy)).expect("copies");
        let twice = decode_record(&twice, 5).expect("reads");
        assert_eq!(twice.origin.map(|o| o.offset), Some(42));
        assert!(requeue.record(b"garbage").is_err());
    }
}
