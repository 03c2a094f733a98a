//! The applied state as bytes, for Raft log compaction: `[version][postcard body][crc32c]`.
//!
//! The bytes replace every applied entry up to some index and may be sent to a replica that
//! restores from them, so they must be a function of the state alone (ordered maps only, and
//! nothing derived), and bad bytes must come back as an error, never as a panic or as a state
//! `apply` could not have built.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::ser::{Error as _, SerializeMap, SerializeSeq, SerializeStruct, SerializeTuple};
use serde::{Deserialize, Serialize, Serializer};

use super::dedup::{ProducerWindow, ProducerWindowV1};
use super::offsets::GroupOffsets;
use super::queue_log::{Block, BlockImage, IndexEntry, QueueLog};
use super::types::{Lease, Offset, ProducerId, QueueId, StoredMessage, TopicMark};

/// Reads the retained message at `(queue, offset)` for a snapshot: from the cache or the
/// driver's queue store.
pub type ReadMessage<'r> = dyn FnMut(&QueueId, Offset) -> Result<StoredMessage, String> + 'r;

/// The format of [`crate::broker::BrokerState::snapshot`]'s bytes, the state with every
/// retained message in it: what a leader sends a follower that needs a snapshot (the
/// follower's store may hold none of the messages). Bump it when the image changes shape, so
/// an old build refuses a new snapshot instead of misreading it. Version 8 gives each lease
/// its holder's tenure. The two formats share one numbering (the version byte says which
/// format the bytes are in): a new version of either takes the next number unused by both.
pub const SNAPSHOT_VERSION: u8 = 8;
/// The format before leases carried tenures ([`LeaseV1`]); still read (with tenure 0).
const SNAPSHOT_VERSION_V4: u8 = 4;
/// The format of [`crate::broker::BrokerState::metadata_snapshot`]'s bytes: the state with a
/// few bytes per retained message and none of their contents, which stay in the node's queue
/// store. Valid only together with that store, synced before the snapshot was written: what a
/// node compacts its own log into and restarts from, never what it sends another node.
/// Version 6 writes each queue's index in blocks of packed columns (see `queue_log.rs`);
/// version 7 gives each lease its holder's tenure.
pub const METADATA_SNAPSHOT_VERSION: u8 = 7;
/// Version 7 with [`LeaseV1`]s; still read (with tenure 0).
pub(super) const METADATA_SNAPSHOT_VERSION_V6: u8 = 6;
/// The metadata format with each index entry encoded on its own; still read.
const METADATA_SNAPSHOT_VERSION_V5: u8 = 5;
/// The formats before topics' incarnations ([`TopicMark`]); still read (with no marks).
const SNAPSHOT_VERSION_V2: u8 = 2;
const METADATA_SNAPSHOT_VERSION_V3: u8 = 3;
/// The format before producers' windows carried their place in the least-recently-used order
/// and before queue leases; still read (with no leases).
const SNAPSHOT_VERSION_V1: u8 = 1;

/// [`Lease`] before tenures: what every snapshot format before [`SNAPSHOT_VERSION`] and
/// [`METADATA_SNAPSHOT_VERSION`] holds. Only tests write it (as an older build did).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(super) struct LeaseV1 {
    owner: Option<String>,
    generation: u64,
    since: u64,
}

impl From<LeaseV1> for Lease {
    fn from(old: LeaseV1) -> Lease {
        Lease {
            owner: old.owner,
            generation: old.generation,
            since: old.since,
            tenure: 0,
        }
    }
}

#[cfg(test)]
impl From<&Lease> for LeaseV1 {
    fn from(lease: &Lease) -> LeaseV1 {
        LeaseV1 {
            owner: lease.owner.clone(),
            generation: lease.generation,
            since: lease.since,
        }
    }
}

type Leases<L> = BTreeMap<(String, QueueId), L>;

fn with_tenures(old: Leases<LeaseV1>) -> Leases<Lease> {
    old.into_iter()
        .map(|(key, lease)| (key, lease.into()))
        .collect()
}

/// The version byte in front, the checksum behind.
const CHECKSUM_LEN: usize = 4;

/// Why bytes are not a snapshot this build can restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// Too short to hold a version byte and a checksum.
    Truncated { len: usize },
    /// Written in a format this build does not know.
    UnknownVersion(u8),
    /// The checksum does not match: the bytes were damaged (or cut short) after writing.
    Checksum { stored: u32, computed: u32 },
    /// The checksum matches but the body does not decode.
    Undecodable(String),
    /// The body decodes with this many bytes left over.
    TrailingBytes(usize),
    /// The body decodes to a state no sequence of commands builds.
    Inconsistent(String),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Truncated { len } => {
                write!(f, "broker snapshot truncated: {len} bytes")
            }
            SnapshotError::UnknownVersion(v) => write!(
                f,
                "broker snapshot of version {v}; this build reads version {SNAPSHOT_VERSION}"
            ),
            SnapshotError::Checksum { stored, computed } => write!(
                f,
                "broker snapshot damaged: checksum {stored:#010x}, computed {computed:#010x}"
            ),
            SnapshotError::Undecodable(why) => write!(f, "broker snapshot does not decode: {why}"),
            SnapshotError::TrailingBytes(n) => {
                write!(f, "broker snapshot has {n} bytes after its body")
            }
            SnapshotError::Inconsistent(why) => write!(f, "broker snapshot inconsistent: {why}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// The state as it is written: borrowed, so taking a snapshot copies nothing but the bytes.
/// Field for field the same shape as [`Image`], which is how it is read back.
#[derive(Serialize)]
pub(super) struct ImageRef<'a, 'r> {
    pub(super) queues: QueuesRef<'a, 'r>,
    pub(super) offsets: &'a BTreeMap<(String, QueueId), GroupOffsets>,
    pub(super) producers: ProducersRef<'a>,
    pub(super) leases: &'a BTreeMap<(String, QueueId), Lease>,
    pub(super) marks: &'a BTreeMap<String, TopicMark>,
}

/// The producers' windows, written as a map of the windows themselves (the same bytes as
/// before they were shared).
pub(super) struct ProducersRef<'a>(pub(super) &'a BTreeMap<ProducerId, Arc<ProducerWindow>>);

impl Serialize for ProducersRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, window) in self.0 {
            map.serialize_entry(id, &**window)?;
        }
        map.end()
    }
}

/// The queues as the image holds them: each queue's window with the messages in it, read one
/// by one while the bytes are written, so a snapshot never holds the retained messages in
/// memory twice. (The same layout as before the messages moved out of the state machine, so
/// the snapshot format did not change.)
pub(super) struct QueuesRef<'a, 'r> {
    pub(super) queues: &'a BTreeMap<QueueId, QueueLog>,
    pub(super) read: RefCell<&'a mut ReadMessage<'r>>,
}

struct QueueRef<'q, 'a, 'r> {
    queue: &'q QueueId,
    log: &'q QueueLog,
    read: &'q RefCell<&'a mut ReadMessage<'r>>,
}

struct MessagesRef<'q, 'a, 'r>(&'q QueueRef<'q, 'a, 'r>);

impl Serialize for QueuesRef<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.queues.len()))?;
        for (queue, log) in self.queues {
            map.serialize_entry(
                queue,
                &QueueRef {
                    queue,
                    log,
                    read: &self.read,
                },
            )?;
        }
        map.end()
    }
}

impl Serialize for QueueRef<'_, '_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut fields = serializer.serialize_struct("QueueLog", 2)?;
        fields.serialize_field("start", &self.log.start())?;
        fields.serialize_field("messages", &MessagesRef(self))?;
        fields.end()
    }
}

impl Serialize for MessagesRef<'_, '_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let QueueRef { queue, log, read } = self.0;
        let mut seq = serializer.serialize_seq(Some(log.len()))?;
        for offset in log.start()..log.end() {
            let stored = (read.borrow_mut())(queue, offset).map_err(|why| {
                S::Error::custom(format!("the message at {queue}@{offset}: {why}"))
            })?;
            seq.serialize_element(&stored)?;
        }
        seq.end()
    }
}

/// A queue as a snapshot holds it.
#[derive(Deserialize)]
pub(super) struct QueueImage {
    pub(super) start: Offset,
    pub(super) messages: Vec<StoredMessage>,
}

/// `L`: [`LeaseV1`] in version 4.
#[derive(Deserialize)]
pub(super) struct Image<L = Lease> {
    pub(super) queues: BTreeMap<QueueId, QueueImage>,
    pub(super) offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    pub(super) producers: BTreeMap<ProducerId, ProducerWindow>,
    pub(super) leases: Leases<L>,
    pub(super) marks: BTreeMap<String, TopicMark>,
}

/// [`Image`] before topics' marks.
#[derive(Deserialize)]
struct ImageV2 {
    queues: BTreeMap<QueueId, QueueImage>,
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    producers: BTreeMap<ProducerId, ProducerWindow>,
    leases: Leases<LeaseV1>,
}

#[derive(Deserialize)]
struct ImageV1 {
    queues: BTreeMap<QueueId, QueueImage>,
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    producers: BTreeMap<ProducerId, ProducerWindowV1>,
}

/// What a snapshot's bytes held: the state with its messages, or with its index only.
pub(super) enum Decoded {
    Full(Image),
    Index(IndexImage),
}

/// The state as a metadata snapshot writes it: borrowed, as [`ImageRef`] is; the same shape as
/// [`IndexImageWire`].
#[derive(Serialize)]
/// `L`: [`LeaseV1`] when tests write version 6.
pub(super) struct IndexImageRef<'a, L = Lease> {
    pub(super) queues: QueueIndexesRef<'a>,
    pub(super) offsets: &'a BTreeMap<(String, QueueId), GroupOffsets>,
    pub(super) producers: ProducersRef<'a>,
    pub(super) leases: &'a Leases<L>,
    pub(super) marks: &'a BTreeMap<String, TopicMark>,
}

pub(super) struct QueueIndexesRef<'a>(pub(super) &'a BTreeMap<QueueId, QueueLog>);

struct QueueIndexRef<'a>(&'a QueueLog);

struct BlocksRef<'a>(&'a QueueLog);

/// One index block as a snapshot holds it: the first entry's time stamp, then the block's
/// columns as bytes, each written with one copy (see `queue_log.rs` for the layout).
struct BlockRef<'a>(&'a Block);

/// Bytes written as bytes (a length and the bytes), not as a sequence of numbers.
struct Raw<'a>(&'a [u8]);

impl Serialize for QueueIndexesRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (queue, log) in self.0 {
            map.serialize_entry(queue, &QueueIndexRef(log))?;
        }
        map.end()
    }
}

impl Serialize for QueueIndexRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut fields = serializer.serialize_struct("QueueIndex", 2)?;
        fields.serialize_field("start", &self.0.start())?;
        fields.serialize_field("blocks", &BlocksRef(self.0))?;
        fields.end()
    }
}

impl Serialize for BlocksRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let blocks: Vec<_> = self.0.snapshot_blocks().collect();
        let mut seq = serializer.serialize_seq(Some(blocks.len()))?;
        for block in &blocks {
            seq.serialize_element(&BlockRef(block))?;
        }
        seq.end()
    }
}

impl Serialize for BlockRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (base_ms, [stamps, sizes, due, reconsume]) = self.0.columns();
        let mut tuple = serializer.serialize_tuple(5)?;
        tuple.serialize_element(&base_ms)?;
        tuple.serialize_element(&Raw(stamps))?;
        tuple.serialize_element(&Raw(sizes))?;
        tuple.serialize_element(&Raw(due))?;
        tuple.serialize_element(&Raw(reconsume))?;
        tuple.end()
    }
}

impl Serialize for Raw<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Bytes read back as bytes: [`Raw`]'s other half.
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ByteBuf, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(bytes.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(bytes))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// [`BlockRef`] read back.
#[derive(Deserialize)]
struct BlockWire(u64, ByteBuf, ByteBuf, ByteBuf, ByteBuf);

impl From<BlockWire> for BlockImage {
    fn from(wire: BlockWire) -> BlockImage {
        let BlockWire(base_ms, stamps, sizes, due, reconsume) = wire;
        BlockImage {
            base_ms,
            stamps: stamps.0,
            sizes: sizes.0,
            due: due.0,
            reconsume: reconsume.0,
        }
    }
}

/// A queue as a metadata snapshot holds it.
#[derive(Deserialize)]
struct QueueBlocksWire {
    start: Offset,
    blocks: Vec<BlockWire>,
}

/// One retained message in a metadata snapshot of version 5 or 3: its time stamp as the
/// difference from the previous message's (zigzag varints), then its due time, size and
/// delivery attempts. About five bytes a message, but encoded and decoded one by one, which
/// took a snapshot hundreds of milliseconds with a million messages retained.
type EntryImage = (i64, u64, u32, u32);

/// A queue as a metadata snapshot of version 5 or 3 holds it.
#[derive(Deserialize)]
struct QueueEntriesWire {
    start: Offset,
    entries: Vec<EntryImage>,
}

impl QueueEntriesWire {
    fn into_log(self) -> Result<QueueLog, String> {
        QueueLog::check_end(self.start, self.entries.len())?;
        let mut log = QueueLog::starting_at(self.start);
        let mut previous = 0u64;
        for (delta, due_ms, size, reconsume_times) in self.entries {
            previous = previous.wrapping_add(delta as u64);
            log.push_uncached(IndexEntry {
                stored_ms: previous,
                due_ms,
                size,
                reconsume_times,
            });
        }
        Ok(log)
    }
}

/// What a metadata snapshot restores: each queue's index, rebuilt.
pub(super) struct IndexImage {
    pub(super) queues: BTreeMap<QueueId, QueueLog>,
    pub(super) offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    pub(super) producers: BTreeMap<ProducerId, ProducerWindow>,
    pub(super) leases: BTreeMap<(String, QueueId), Lease>,
    pub(super) marks: BTreeMap<String, TopicMark>,
}

/// [`IndexImageRef`] read back; `L`: [`LeaseV1`] in version 6.
#[derive(Deserialize)]
struct IndexImageWire<L> {
    queues: BTreeMap<QueueId, QueueBlocksWire>,
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    producers: BTreeMap<ProducerId, ProducerWindow>,
    leases: Leases<L>,
    marks: BTreeMap<String, TopicMark>,
}

/// The metadata snapshot before index blocks (version 5).
#[derive(Deserialize)]
struct IndexImageV5 {
    queues: BTreeMap<QueueId, QueueEntriesWire>,
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    producers: BTreeMap<ProducerId, ProducerWindow>,
    leases: Leases<LeaseV1>,
    marks: BTreeMap<String, TopicMark>,
}

/// [`IndexImageV5`] before topics' marks.
#[derive(Deserialize)]
struct IndexImageV3 {
    queues: BTreeMap<QueueId, QueueEntriesWire>,
    offsets: BTreeMap<(String, QueueId), GroupOffsets>,
    producers: BTreeMap<ProducerId, ProducerWindow>,
    leases: Leases<LeaseV1>,
}

impl<L> IndexImageWire<L> {
    fn into_image(
        self,
        leases: impl FnOnce(Leases<L>) -> Leases<Lease>,
    ) -> Result<IndexImage, SnapshotError> {
        Ok(IndexImage {
            queues: rebuild(self.queues, |queue| {
                let blocks = queue.blocks.into_iter().map(BlockImage::from).collect();
                QueueLog::from_blocks(queue.start, blocks)
            })?,
            offsets: self.offsets,
            producers: self.producers,
            leases: leases(self.leases),
            marks: self.marks,
        })
    }
}

/// Each queue's index rebuilt from its image; `Err` names the queue that does not fit.
fn rebuild<W>(
    queues: BTreeMap<QueueId, W>,
    into_log: impl Fn(W) -> Result<QueueLog, String>,
) -> Result<BTreeMap<QueueId, QueueLog>, SnapshotError> {
    queues
        .into_iter()
        .map(|(queue, wire)| match into_log(wire) {
            Ok(log) => Ok((queue, log)),
            Err(why) => Err(SnapshotError::Inconsistent(format!("{queue}: {why}"))),
        })
        .collect()
}

/// A metadata snapshot's bytes; it reads nothing, so it fails only if serde does.
pub(super) fn encode_index(image: &IndexImageRef<'_>) -> Result<Vec<u8>, String> {
    let mut bytes =
        postcard::to_extend(image, vec![METADATA_SNAPSHOT_VERSION]).map_err(|e| e.to_string())?;
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    Ok(bytes)
}

/// Version 6's bytes, written by tests only: what a node of the build before tenures left on
/// disk.
#[cfg(test)]
pub(super) fn encode_index_v6(image: &IndexImageRef<'_, LeaseV1>) -> Vec<u8> {
    let mut bytes =
        postcard::to_extend(image, vec![METADATA_SNAPSHOT_VERSION_V6]).unwrap_or_default();
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

/// The image's bytes; an error if a retained message could not be read.
pub(super) fn encode(image: &ImageRef<'_, '_>) -> Result<Vec<u8>, String> {
    let mut bytes =
        postcard::to_extend(image, vec![SNAPSHOT_VERSION]).map_err(|e| e.to_string())?;
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    Ok(bytes)
}

pub(super) fn decode(bytes: &[u8]) -> Result<Decoded, SnapshotError> {
    // The version first: another version may lay out (and checksum) its bytes differently.
    let Some(&version) = bytes.first() else {
        return Err(SnapshotError::Truncated { len: 0 });
    };
    if ![
        SNAPSHOT_VERSION,
        SNAPSHOT_VERSION_V4,
        SNAPSHOT_VERSION_V2,
        SNAPSHOT_VERSION_V1,
        METADATA_SNAPSHOT_VERSION,
        METADATA_SNAPSHOT_VERSION_V6,
        METADATA_SNAPSHOT_VERSION_V5,
        METADATA_SNAPSHOT_VERSION_V3,
    ]
    .contains(&version)
    {
        return Err(SnapshotError::UnknownVersion(version));
    }
    let Some(body_end) = bytes
        .len()
        .checked_sub(CHECKSUM_LEN)
        .filter(|&end| end >= 1)
    else {
        return Err(SnapshotError::Truncated { len: bytes.len() });
    };
    let (checked, tail) = bytes.split_at(body_end);
    let mut stored = [0; CHECKSUM_LEN];
    stored.copy_from_slice(tail);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32c::crc32c(checked);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let undecodable = |e: postcard::Error| SnapshotError::Undecodable(e.to_string());
    if [
        METADATA_SNAPSHOT_VERSION,
        METADATA_SNAPSHOT_VERSION_V6,
        METADATA_SNAPSHOT_VERSION_V5,
        METADATA_SNAPSHOT_VERSION_V3,
    ]
    .contains(&version)
    {
        let body = &checked[1..];
        let (image, rest) = if version == METADATA_SNAPSHOT_VERSION_V3 {
            let (v3, rest): (IndexImageV3, &[u8]) =
                postcard::take_from_bytes(body).map_err(undecodable)?;
            let image = IndexImage {
                queues: rebuild(v3.queues, QueueEntriesWire::into_log)?,
                offsets: v3.offsets,
                producers: v3.producers,
                leases: with_tenures(v3.leases),
                marks: BTreeMap::new(),
            };
            (image, rest)
        } else if version == METADATA_SNAPSHOT_VERSION_V5 {
            let (v5, rest): (IndexImageV5, &[u8]) =
                postcard::take_from_bytes(body).map_err(undecodable)?;
            let image = IndexImage {
                queues: rebuild(v5.queues, QueueEntriesWire::into_log)?,
                offsets: v5.offsets,
                producers: v5.producers,
                leases: with_tenures(v5.leases),
                marks: v5.marks,
            };
            (image, rest)
        } else if version == METADATA_SNAPSHOT_VERSION_V6 {
            let (wire, rest): (IndexImageWire<LeaseV1>, &[u8]) =
                postcard::take_from_bytes(body).map_err(undecodable)?;
            (wire.into_image(with_tenures)?, rest)
        } else {
            let (wire, rest): (IndexImageWire<Lease>, &[u8]) =
                postcard::take_from_bytes(body).map_err(undecodable)?;
            (wire.into_image(|leases| leases)?, rest)
        };
        if !rest.is_empty() {
            return Err(SnapshotError::TrailingBytes(rest.len()));
        }
        let queues = image
            .queues
            .iter()
            .map(|(q, log)| (q, log.start(), log.len()));
        validate(queues, &image.offsets, &image.leases, &image.producers)
            .map_err(SnapshotError::Inconsistent)?;
        return Ok(Decoded::Index(image));
    }
    let (image, rest): (Image, &[u8]) = if version == SNAPSHOT_VERSION_V1 {
        let (v1, rest): (ImageV1, &[u8]) =
            postcard::take_from_bytes(&checked[1..]).map_err(undecodable)?;
        let image = Image {
            queues: v1.queues,
            offsets: v1.offsets,
            producers: v1
                .producers
                .into_iter()
                .map(|(id, window)| (id, window.into()))
                .collect(),
            leases: BTreeMap::new(),
            marks: BTreeMap::new(),
        };
        (image, rest)
    } else if version == SNAPSHOT_VERSION_V2 {
        let (v2, rest): (ImageV2, &[u8]) =
            postcard::take_from_bytes(&checked[1..]).map_err(undecodable)?;
        let image = Image {
            queues: v2.queues,
            offsets: v2.offsets,
            producers: v2.producers,
            leases: with_tenures(v2.leases),
            marks: BTreeMap::new(),
        };
        (image, rest)
    } else if version == SNAPSHOT_VERSION_V4 {
        let (v4, rest): (Image<LeaseV1>, &[u8]) =
            postcard::take_from_bytes(&checked[1..]).map_err(undecodable)?;
        let image = Image {
            queues: v4.queues,
            offsets: v4.offsets,
            producers: v4.producers,
            leases: with_tenures(v4.leases),
            marks: v4.marks,
        };
        (image, rest)
    } else {
        postcard::take_from_bytes(&checked[1..]).map_err(undecodable)?
    };
    if !rest.is_empty() {
        return Err(SnapshotError::TrailingBytes(rest.len()));
    }
    let queues = image
        .queues
        .iter()
        .map(|(q, log)| (q, log.start, log.messages.len()));
    validate(queues, &image.offsets, &image.leases, &image.producers)
        .map_err(SnapshotError::Inconsistent)?;
    Ok(Decoded::Full(image))
}

/// Whether `bytes` claim to be a snapshot that holds its messages (any version but
/// [`METADATA_SNAPSHOT_VERSION`]): one a replica can install whatever its store holds.
pub fn holds_messages(bytes: &[u8]) -> bool {
    !matches!(
        bytes.first(),
        Some(
            &METADATA_SNAPSHOT_VERSION
                | &METADATA_SNAPSHOT_VERSION_V6
                | &METADATA_SNAPSHOT_VERSION_V5
                | &METADATA_SNAPSHOT_VERSION_V3
        )
    )
}

/// Rebuilds what the image leaves out and refuses what `apply` never builds, so a restored
/// state cannot make a later command overflow or index out of range.
fn validate<'q>(
    queues: impl Iterator<Item = (&'q QueueId, Offset, usize)>,
    offsets: &BTreeMap<(String, QueueId), GroupOffsets>,
    leases: &BTreeMap<(String, QueueId), Lease>,
    producers: &BTreeMap<ProducerId, ProducerWindow>,
) -> Result<(), String> {
    let mut ends = BTreeMap::new();
    for (queue, start, len) in queues {
        QueueLog::check_end(start, len).map_err(|why| format!("{queue}: {why}"))?;
        ends.insert(queue, start + len as Offset);
    }
    for ((group, queue), progress) in offsets {
        // Offsets are only ever recorded on a queue that exists, below its end.
        let Some(&end) = ends.get(queue) else {
            return Err(format!(
                "group {group} has offsets on the unknown queue {queue}"
            ));
        };
        if !progress.consistent(end) {
            return Err(format!(
                "group {group} on {queue}: acks beyond the end {end} or below the consume offset"
            ));
        }
    }
    for ((group, queue), lease) in leases {
        if lease.since > lease.generation {
            return Err(format!(
                "group {group} on {queue}: a tenure from generation {} past the queue's {}",
                lease.since, lease.generation
            ));
        }
    }
    for (producer_id, window) in producers {
        if !window.consistent() {
            return Err(format!(
                "producer {producer_id}: a batch past its sequence numbers"
            ));
        }
    }
    Ok(())
}

/// Version 5's layout, written by tests only: what a node of the previous build left on disk.
#[cfg(test)]
pub(super) mod v5 {
    use super::*;

    #[derive(Serialize)]
    pub(in crate::broker) struct IndexImageRef<'a> {
        pub(in crate::broker) queues: QueueIndexesRef<'a>,
        pub(in crate::broker) offsets: &'a BTreeMap<(String, QueueId), GroupOffsets>,
        pub(in crate::broker) producers: ProducersRef<'a>,
        pub(in crate::broker) leases: &'a BTreeMap<(String, QueueId), LeaseV1>,
        pub(in crate::broker) marks: &'a BTreeMap<String, TopicMark>,
    }

    pub(in crate::broker) struct QueueIndexesRef<'a>(
        pub(in crate::broker) &'a BTreeMap<QueueId, QueueLog>,
    );

    struct QueueIndexRef<'a>(&'a QueueLog);

    struct EntriesRef<'a>(&'a QueueLog);

    impl Serialize for QueueIndexesRef<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(self.0.len()))?;
            for (queue, log) in self.0 {
                map.serialize_entry(queue, &QueueIndexRef(log))?;
            }
            map.end()
        }
    }

    impl Serialize for QueueIndexRef<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut fields = serializer.serialize_struct("QueueIndex", 2)?;
            fields.serialize_field("start", &self.0.start())?;
            fields.serialize_field("entries", &EntriesRef(self.0))?;
            fields.end()
        }
    }

    impl Serialize for EntriesRef<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
            let mut previous = 0u64;
            for (_, entry) in self.0.iter_from(0) {
                let delta = entry.stored_ms.wrapping_sub(previous) as i64;
                previous = entry.stored_ms;
                let image: EntryImage = (delta, entry.due_ms, entry.size, entry.reconsume_times);
                seq.serialize_element(&image)?;
            }
            seq.end()
        }
    }

    pub(in crate::broker) fn encode(image: &IndexImageRef<'_>) -> Vec<u8> {
        let mut bytes =
            postcard::to_extend(image, vec![METADATA_SNAPSHOT_VERSION_V5]).unwrap_or_default();
        let checksum = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }
}
