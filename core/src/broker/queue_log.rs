//! One queue's index: a window `start..end` of offsets that only ever slides forward, with a
//! few bytes per retained message and none of their contents. Retention drops messages from
//! the front, but an offset keeps its meaning forever: the message at offset `o` stays at `o`
//! while it is retained, and `o` is never reused.
//!
//! The entries are kept in blocks of [`INDEX_BLOCK_ENTRIES`] offsets, aligned on multiples of
//! it, each packed column by column in the little-endian layout a metadata snapshot writes
//! (see `snapshot.rs`): a time stamp as a 4-byte difference from the block's first, a 4-byte
//! size, and the due time and delivery attempts only in blocks where one is not zero (retry
//! and dead-letter queues). Eight bytes a message instead of the 24 of an unpacked entry
//! (issue 14: about 50 bytes a retained message were resident, the index, its copy for a
//! snapshot job, and the snapshot). A full block never changes again and is shared
//! (`Arc`), so the copy a snapshot job takes costs a reference count per block, and the
//! snapshot writes each block's columns as they are, at the speed of a copy.
//!
//! The message bytes live in the driver's queue store (see [`super::StoreOp`]); the newest of
//! them also in a bounded cache ([`super::BrokerState`] keeps it), so that a consumer that
//! keeps up is served without a read.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;

use super::types::{Offset, StoredMessage};

/// A queue's end offset stays below this, so offset arithmetic (`end + 1`, a pull's
/// `offset + 1`) cannot overflow. Appending that many messages would take centuries; a
/// snapshot claiming a queue beyond it is refused as inconsistent rather than trusted.
pub(super) const END_MAX: Offset = 1 << 63;

/// Offsets per index block. A power of two, so that finding an offset's block is a shift.
/// Larger blocks cost less per block (about 150 bytes of bookkeeping, and a few bytes in a
/// snapshot) and more when a block is copied: the first block of a queue that retention cut
/// is re-encoded by every snapshot, and a block still filling is copied once after each
/// snapshot job took it.
pub(super) const INDEX_BLOCK_ENTRIES: usize = 1_024;
const BLOCK: Offset = INDEX_BLOCK_ENTRIES as Offset;
const _: () = assert!(INDEX_BLOCK_ENTRIES.is_power_of_two() && INDEX_BLOCK_ENTRIES <= 1 << 16);

/// What the state machine keeps of one retained message: what retention (age, size), pull
/// limits, retry due times and `ReconsumeLater` need, and nothing of its contents. The index
/// stores it packed ([`Block`]) and hands it out by value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct IndexEntry {
    pub(super) stored_ms: u64,
    /// Not before this time may it be delivered (retry queues; 0 elsewhere).
    pub(super) due_ms: u64,
    /// [`super::Message::size_bytes`].
    pub(super) size: u32,
    pub(super) reconsume_times: u32,
}

impl IndexEntry {
    pub(super) fn of(stored: &StoredMessage) -> IndexEntry {
        IndexEntry {
            stored_ms: stored.stored_ms,
            due_ms: stored.due_ms,
            size: u32::try_from(stored.message.size_bytes()).unwrap_or(u32::MAX),
            reconsume_times: stored.reconsume_times,
        }
    }
}

/// A block's columns as a snapshot reads them back, to be checked by [`QueueLog::from_blocks`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct BlockImage {
    pub(super) base_ms: u64,
    pub(super) stamps: Vec<u8>,
    pub(super) sizes: Vec<u8>,
    pub(super) due: Vec<u8>,
    pub(super) reconsume: Vec<u8>,
}

/// Up to [`INDEX_BLOCK_ENTRIES`] consecutive entries of one aligned span of offsets, column by
/// column, little-endian: exactly the bytes a metadata snapshot writes for it. A block's
/// layout is a function of its entries alone (the first stamp is the base; a column is wide
/// or present only if some entry needs it), so equal entries give equal bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Block {
    /// Where in its span the first entry sits: 0 but for the first block of a queue that
    /// started (or was restored) in the middle of a span.
    from: u32,
    len: u32,
    /// The first entry's time stamp.
    base_ms: u64,
    /// `i32` differences from `base_ms` while every one fits (stamps come from whichever node
    /// led, whose clocks need not agree, so they may go back), else the `u64` stamps.
    stamps: Vec<u8>,
    wide: bool,
    /// `u32` sizes.
    sizes: Vec<u8>,
    /// `u64` due times; empty while every one is 0 (everywhere but retry queues).
    due: Vec<u8>,
    /// `u32` delivery attempts; empty while every one is 0.
    reconsume: Vec<u8>,
}

/// The `i`-th `N`-byte value of a column (zeros past its end, which the block's own
/// bookkeeping never asks for).
fn read<const N: usize>(column: &[u8], i: usize) -> [u8; N] {
    let mut bytes = [0; N];
    if let Some(value) = column.get(i * N..(i + 1) * N) {
        bytes.copy_from_slice(value);
    }
    bytes
}

impl Block {
    fn starting(from: u32) -> Block {
        Block {
            from,
            ..Block::default()
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether its span holds no room for another entry.
    fn is_full(&self) -> bool {
        self.from as usize + self.len() >= INDEX_BLOCK_ENTRIES
    }

    fn push(&mut self, entry: IndexEntry) {
        if self.len == 0 {
            self.base_ms = entry.stored_ms;
        }
        let delta = i128::from(entry.stored_ms) - i128::from(self.base_ms);
        match i32::try_from(delta) {
            Ok(delta) if !self.wide => self.stamps.extend_from_slice(&delta.to_le_bytes()),
            _ => {
                if !self.wide {
                    self.widen();
                }
                self.stamps
                    .extend_from_slice(&entry.stored_ms.to_le_bytes());
            }
        }
        self.sizes.extend_from_slice(&entry.size.to_le_bytes());
        // A column comes into being with its first non-zero value (zeros for the entries
        // before), so an empty one means all zeros.
        if entry.due_ms != 0 || !self.due.is_empty() {
            self.due.resize(self.len() * 8, 0);
            self.due.extend_from_slice(&entry.due_ms.to_le_bytes());
        }
        if entry.reconsume_times != 0 || !self.reconsume.is_empty() {
            self.reconsume.resize(self.len() * 4, 0);
            self.reconsume
                .extend_from_slice(&entry.reconsume_times.to_le_bytes());
        }
        self.len += 1;
    }

    /// Rewrites the stamps as `u64`s: a stamp more than 24 days from the block's first.
    fn widen(&mut self) {
        let stamps = (0..self.len()).flat_map(|i| self.stamp(i).to_le_bytes());
        self.stamps = stamps.collect();
        self.wide = true;
    }

    fn stamp(&self, i: usize) -> u64 {
        if self.wide {
            u64::from_le_bytes(read(&self.stamps, i))
        } else {
            let delta = i32::from_le_bytes(read(&self.stamps, i));
            self.base_ms.wrapping_add_signed(i64::from(delta))
        }
    }

    /// The `i`-th entry it holds (`i < len`).
    fn get(&self, i: usize) -> IndexEntry {
        IndexEntry {
            stored_ms: self.stamp(i),
            due_ms: u64::from_le_bytes(read(&self.due, i)),
            size: u32::from_le_bytes(read(&self.sizes, i)),
            reconsume_times: u32::from_le_bytes(read(&self.reconsume, i)),
        }
    }

    /// The block of its entries from the `skip`-th on, laid out as if built from them alone.
    fn suffix(&self, skip: usize) -> Block {
        let from = self.from + u32::try_from(skip).unwrap_or(u32::MAX);
        let mut block = Block::starting(from);
        for i in skip..self.len() {
            block.push(self.get(i));
        }
        block
    }

    /// The base stamp and the columns, as a snapshot writes them: a column's width says
    /// what it holds (stamps of 4 bytes are differences, of 8 the stamps; an absent column is
    /// all zeros).
    pub(super) fn columns(&self) -> (u64, [&[u8]; 4]) {
        (
            self.base_ms,
            [&self.stamps, &self.sizes, &self.due, &self.reconsume],
        )
    }

    /// A block read back from a snapshot, its first entry at `from` in its span; `Err` says
    /// which column does not fit the others.
    fn from_image(from: u32, image: BlockImage) -> Result<Block, String> {
        let BlockImage {
            base_ms,
            stamps,
            sizes,
            due,
            reconsume,
        } = image;
        let len = sizes.len() / 4;
        let room = INDEX_BLOCK_ENTRIES - from as usize;
        if sizes.len() % 4 != 0 || len == 0 || len > room {
            return Err(format!(
                "an index block of {} bytes of sizes, for 1 to {room} entries",
                sizes.len()
            ));
        }
        let wide = stamps.len() == len * 8;
        if !wide && stamps.len() != len * 4 {
            return Err(format!(
                "an index block of {len} entries with {} bytes of stamps",
                stamps.len()
            ));
        }
        if ![0, len * 8].contains(&due.len()) || ![0, len * 4].contains(&reconsume.len()) {
            return Err(format!(
                "an index block of {len} entries with {} bytes of due times and {} of attempts",
                due.len(),
                reconsume.len()
            ));
        }
        Ok(Block {
            from,
            len: len as u32,
            base_ms,
            stamps,
            wide,
            sizes,
            due,
            reconsume,
        })
    }

    /// Heap bytes the columns hold.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.stamps.capacity()
            + self.sizes.capacity()
            + self.due.capacity()
            + self.reconsume.capacity()
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct QueueLog {
    /// The first retained offset; every offset below it was dropped by retention.
    start: Offset,
    /// The next offset to be written.
    end: Offset,
    /// The blocks from the one whose span holds `start` (when there is one: none once every
    /// entry is dropped on a span's boundary) to the one `end - 1` is in. The first may still
    /// hold entries retention dropped, until `start` leaves its span.
    blocks: VecDeque<Arc<Block>>,
    /// `size` summed over the retained entries, for the size limit.
    bytes: u64,
    /// The newest messages, at `end - cached.len()..end`: a suffix of the queue, so a pull
    /// either finds all it needs here or reads from the store.
    cached: VecDeque<StoredMessage>,
}

impl QueueLog {
    /// A queue starting at `start` (restored from a snapshot), empty.
    pub(super) fn starting_at(start: Offset) -> QueueLog {
        QueueLog {
            start,
            end: start,
            ..QueueLog::default()
        }
    }

    /// The same index without the cache, sharing every block: what a snapshot job copies.
    pub(super) fn index_only(&self) -> QueueLog {
        QueueLog {
            start: self.start,
            end: self.end,
            blocks: self.blocks.clone(),
            bytes: self.bytes,
            cached: VecDeque::new(),
        }
    }

    /// What the index and the cache must agree on, or the first disagreement: the cache a
    /// suffix of the retained messages, each as the index holds it; with `every_entry`, also
    /// every retained offset indexed and `bytes` their sizes summed (a pass over them all).
    pub(super) fn check_invariants(&self, every_entry: bool) -> Result<(), String> {
        if self.start > self.end {
            return Err(format!("start {} past end {}", self.start, self.end));
        }
        if self.cached.len() as u64 > self.end - self.start {
            return Err(format!(
                "{} cached of {} retained",
                self.cached.len(),
                self.end - self.start
            ));
        }
        for (offset, stored) in (self.cached_from()..).zip(&self.cached) {
            let entry = self.entry(offset);
            if entry != Some(IndexEntry::of(stored)) {
                return Err(format!(
                    "offset {offset}: cached {stored:?}, indexed {entry:?}"
                ));
            }
        }
        if every_entry {
            let mut bytes = 0;
            for offset in self.start..self.end {
                let entry = self
                    .entry(offset)
                    .ok_or_else(|| format!("no index entry for retained offset {offset}"))?;
                bytes += u64::from(entry.size);
            }
            if bytes != self.bytes {
                return Err(format!("{} bytes counted, {bytes} retained", self.bytes));
            }
        }
        Ok(())
    }

    /// The cached messages' sizes summed.
    pub(super) fn cached_bytes(&self) -> u64 {
        self.cached
            .iter()
            .map(|m| m.message.size_bytes() as u64)
            .sum()
    }

    /// The first retained offset.
    pub(super) fn start(&self) -> Offset {
        self.start
    }

    /// The next offset to be written.
    pub(super) fn end(&self) -> Offset {
        self.end
    }

    /// Bytes of the retained messages.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The first retained offset whose message was stored at or after `ms`; the end if none
    /// was. A scan, not a search: stamps come from whichever node led, and clocks of two
    /// nodes need not agree, so they need not rise with the offset.
    pub(super) fn first_stored_at_or_after(&self, ms: u64) -> Offset {
        self.iter_from(self.start)
            .find(|(_, e)| e.stored_ms >= ms)
            .map_or(self.end, |(offset, _)| offset)
    }

    pub(super) fn entry(&self, offset: Offset) -> Option<IndexEntry> {
        if offset < self.start || offset >= self.end {
            return None;
        }
        let k = usize::try_from(offset / BLOCK - self.start / BLOCK).ok()?;
        let block = self.blocks.get(k)?;
        let i = ((offset % BLOCK) as usize).checked_sub(block.from as usize)?;
        (i < block.len()).then(|| block.get(i))
    }

    /// The message at `offset` if the cache holds it.
    pub(super) fn cached(&self, offset: Offset) -> Option<&StoredMessage> {
        let first = self.end() - self.cached.len() as Offset;
        let index = usize::try_from(offset.checked_sub(first)?).ok()?;
        self.cached.get(index)
    }

    /// The first offset the cache holds (`end` when it holds none).
    pub(super) fn cached_from(&self) -> Offset {
        self.end() - self.cached.len() as Offset
    }

    /// Appends a message, caching it when `cache` is set (else the cache is emptied, since it
    /// must stay a suffix), and returns its offset.
    pub(super) fn push(&mut self, stored: &StoredMessage, cache: bool) -> (Offset, u64) {
        if cache {
            let offset = self.push_index(IndexEntry::of(stored));
            self.cached.push_back(stored.clone());
            (offset, 0)
        } else {
            self.push_uncached(IndexEntry::of(stored))
        }
    }

    /// Appends a message whose bytes only the store holds; returns its offset and the cache
    /// bytes freed.
    pub(super) fn push_uncached(&mut self, entry: IndexEntry) -> (Offset, u64) {
        let freed = self.drop_cache();
        (self.push_index(entry), freed)
    }

    fn push_index(&mut self, entry: IndexEntry) -> Offset {
        let offset = self.end;
        match self.blocks.back_mut().filter(|block| !block.is_full()) {
            // Shared with a snapshot job, the block is copied first (once per snapshot).
            Some(block) => Arc::make_mut(block).push(entry),
            None => {
                let mut block = Block::starting((offset % BLOCK) as u32);
                block.push(entry);
                self.blocks.push_back(Arc::new(block));
            }
        }
        self.end += 1;
        self.bytes += u64::from(entry.size);
        offset
    }

    /// Empties the cache; returns the bytes it held.
    pub(super) fn drop_cache(&mut self) -> u64 {
        let freed = self.cached_bytes();
        self.cached.clear();
        freed
    }

    /// Drops the oldest cached message, if it is the one at `offset`; returns its size.
    pub(super) fn evict(&mut self, offset: Offset) -> u64 {
        if self.cached_from() != offset || self.cached.is_empty() {
            return 0;
        }
        self.cached
            .pop_front()
            .map_or(0, |m| m.message.size_bytes() as u64)
    }

    /// The index entries from `from` on (from `start` if `from` is below it), in offset order.
    pub(super) fn iter_from(&self, from: Offset) -> impl Iterator<Item = (Offset, IndexEntry)> {
        (from.max(self.start)..self.end).filter_map(|offset| Some((offset, self.entry(offset)?)))
    }

    /// The oldest retained message's entry.
    pub(super) fn front(&self) -> Option<IndexEntry> {
        self.entry(self.start)
    }

    pub(super) fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Drops the oldest retained message; `start` moves past it. Returns the cache bytes freed.
    pub(super) fn pop_front(&mut self) -> u64 {
        let freed = self.evict(self.start);
        if let Some(entry) = self.front() {
            self.start += 1;
            self.bytes -= u64::from(entry.size);
            if self.start.is_multiple_of(BLOCK) {
                self.blocks.pop_front();
            }
        }
        freed
    }

    /// The blocks of the retained entries as a snapshot writes them: as they are, but the
    /// first if retention cut into it, which is laid out again from its retained entries, so
    /// that the bytes depend on what is retained and not on what was.
    pub(super) fn snapshot_blocks(&self) -> impl Iterator<Item = Cow<'_, Block>> {
        let skip = ((self.start % BLOCK) as usize)
            .saturating_sub(self.blocks.front().map_or(0, |b| b.from as usize));
        let retained = if self.start < self.end {
            self.blocks.len()
        } else {
            0
        };
        self.blocks
            .iter()
            .take(retained)
            .enumerate()
            .map(move |(k, block)| {
                if k == 0 && skip > 0 {
                    Cow::Owned(block.suffix(skip))
                } else {
                    Cow::Borrowed(&**block)
                }
            })
    }

    /// A queue from `start` with the entries of `images`, as [`QueueLog::snapshot_blocks`]
    /// wrote them; `Err` says what does not fit.
    pub(super) fn from_blocks(start: Offset, images: Vec<BlockImage>) -> Result<QueueLog, String> {
        QueueLog::check_end(start, 0)?;
        let mut log = QueueLog::starting_at(start);
        let count = images.len();
        for (k, image) in images.into_iter().enumerate() {
            let block = Block::from_image((log.end % BLOCK) as u32, image)
                .map_err(|why| format!("block {k}: {why}"))?;
            if k + 1 < count && !block.is_full() {
                return Err(format!(
                    "block {k} of {count} holds {} entries and is not the last",
                    block.len()
                ));
            }
            QueueLog::check_end(start, log.len() + block.len())?;
            log.bytes += (0..block.len())
                .map(|i| u64::from(u32::from_le_bytes(read(&block.sizes, i))))
                .sum::<u64>();
            log.end += block.len() as Offset;
            log.blocks.push_back(Arc::new(block));
        }
        Ok(log)
    }

    /// Checks a restored window; `Err` says what is wrong.
    pub(super) fn check_end(start: Offset, len: usize) -> Result<(), String> {
        let end = start
            .checked_add(len as Offset)
            .filter(|end| *end < END_MAX);
        if end.is_none() {
            return Err(format!(
                "a queue ends beyond offset {END_MAX} ({len} messages from {start})"
            ));
        }
        Ok(())
    }

    /// Heap bytes of the index (not of the cache).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.heap_bytes() + std::mem::size_of::<Block>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Message;

    fn stored(body: &str) -> StoredMessage {
        StoredMessage {
            producer_id: 1,
            seq: 0,
            message: Message::with_body(body.to_string()),
            stored_ms: 0,
            reconsume_times: 0,
            due_ms: 0,
            origin: None,
        }
    }

    #[test]
    fn offsets_keep_their_meaning_when_the_front_is_dropped() {
        let mut log = QueueLog::default();
        assert_eq!(log.push(&stored("a"), true).0, 0);
        assert_eq!(log.push(&stored("bb"), true).0, 1);
        assert_eq!(log.push(&stored("ccc"), true).0, 2);
        assert_eq!((log.start(), log.end(), log.bytes()), (0, 3, 6));
        assert_eq!(log.pop_front(), 1, "the cached copy goes with it");
        assert_eq!((log.start(), log.end(), log.bytes()), (1, 3, 5));
        assert_eq!(log.entry(0), None);
        assert_eq!(log.entry(1).map(|e| e.size), Some(2));
        assert_eq!(log.cached(1).map(|m| m.message.body.len()), Some(2));
        assert_eq!(log.entry(3), None);
        assert_eq!(
            log.push(&stored("d"), true).0,
            3,
            "an offset is never reused"
        );
        let from: Vec<Offset> = log.iter_from(0).map(|(o, _)| o).collect();
        assert_eq!(
            from,
            vec![1, 2, 3],
            "from below the start means from the start"
        );
        let from: Vec<Offset> = log.iter_from(3).map(|(o, _)| o).collect();
        assert_eq!(from, vec![3]);
        assert_eq!(log.iter_from(u64::MAX).count(), 0);
    }

    #[test]
    fn the_cache_stays_a_suffix() {
        let mut log = QueueLog::default();
        log.push(&stored("a"), true);
        log.push(&stored("b"), true);
        assert_eq!(log.evict(1), 0, "only the oldest cached message is evicted");
        assert_eq!(log.evict(0), 1);
        assert_eq!((log.cached_from(), log.cached(0), log.len()), (1, None, 2));
        assert_eq!(
            log.push(&stored("cc"), false).1,
            1,
            "an uncached write empties it"
        );
        assert_eq!((log.cached_from(), log.cached(2)), (3, None));
        assert!(log.entry(2).is_some(), "the index keeps it all the same");
    }

    /// The core's unit tests run the check after every command, so it must pass on every
    /// state `apply` builds; and it must fail, never panic, on each disagreement it names
    /// (the simulator reports what it returns).
    #[test]
    fn the_invariant_check_reports_each_disagreement_of_index_and_cache() {
        let mut good = QueueLog::default();
        for body in ["a", "bb", "ccc"] {
            good.push(&stored(body), true);
        }
        good.pop_front();
        assert_eq!(good.check_invariants(true), Ok(()));
        // The start past the end.
        let mut bad = good.clone();
        bad.start = bad.end + 1;
        assert!(bad.check_invariants(false).is_err());
        // More cached than retained, by fewer than the start: the first cached offset would
        // be below 0.
        let mut bad = good.clone();
        bad.start = 2;
        bad.cached.push_front(stored("z"));
        bad.cached.push_front(stored("y"));
        assert_eq!(
            (
                bad.cached.len() as Offset,
                bad.end - bad.start,
                bad.end + bad.start
            ),
            (4, 1, 5)
        );
        assert_eq!(
            bad.check_invariants(false),
            Err("4 cached of 1 retained".to_string())
        );
        // A cached message the index holds otherwise.
        let mut bad = good.clone();
        bad.cached[1] = stored("cc");
        assert!(bad.check_invariants(false).is_err());
        // The byte count off: only the full pass looks.
        let mut bad = good.clone();
        bad.bytes += 1;
        assert_eq!(bad.check_invariants(false), Ok(()));
        assert!(bad.check_invariants(true).is_err());
        // A retained offset with no entry.
        let mut bad = good.clone();
        bad.drop_cache();
        bad.end += 1;
        assert!(bad.check_invariants(true).is_err());
    }

    #[test]
    fn a_queue_ending_too_far_is_refused() {
        assert!(QueueLog::check_end(END_MAX - 1, 1).is_err());
        assert_eq!(QueueLog::check_end(END_MAX - 2, 1), Ok(()));
    }

    const B: Offset = INDEX_BLOCK_ENTRIES as Offset;

    /// An entry whose every field depends on its offset, so a misplaced one shows.
    fn entry_at(offset: Offset) -> IndexEntry {
        IndexEntry {
            stored_ms: 1_700_000_000_000 + offset * 3,
            due_ms: 0,
            size: 100 + (offset % 7) as u32,
            reconsume_times: 0,
        }
    }

    fn filled(start: Offset, end: Offset, entry: impl Fn(Offset) -> IndexEntry) -> QueueLog {
        let mut log = QueueLog::starting_at(start);
        for offset in start..end {
            assert_eq!(log.push_uncached(entry(offset)).0, offset);
        }
        log
    }

    fn all(log: &QueueLog) -> Vec<(Offset, IndexEntry)> {
        log.iter_from(0).collect()
    }

    /// Written as a snapshot writes it, read back as a restore does.
    fn round_trip(log: &QueueLog) -> QueueLog {
        QueueLog::from_blocks(log.start(), round_trip_images(log)).expect("reads back")
    }

    #[test]
    fn entries_cross_block_boundaries_unchanged() {
        let end = 3 * B + 5;
        let log = filled(0, end, entry_at);
        assert_eq!(log.blocks.len(), 4);
        assert!(log.blocks.iter().take(3).all(|b| b.is_full()));
        for offset in [0, 1, B - 1, B, B + 1, 2 * B - 1, 2 * B, 3 * B, end - 1] {
            assert_eq!(log.entry(offset), Some(entry_at(offset)), "offset {offset}");
        }
        assert_eq!(log.entry(end), None);
        let from: Vec<Offset> = log.iter_from(B - 2).map(|(o, _)| o).take(4).collect();
        assert_eq!(from, vec![B - 2, B - 1, B, B + 1]);
        assert_eq!(
            log.bytes(),
            (0..end).map(|o| u64::from(entry_at(o).size)).sum::<u64>()
        );
        // Stamps rise by 3 ms an offset: the first at or after offset 1,500's is its own.
        assert_eq!(
            log.first_stored_at_or_after(entry_at(1_500).stored_ms),
            1_500
        );
        assert_eq!(
            log.first_stored_at_or_after(entry_at(1_500).stored_ms - 1),
            1_500
        );
        assert_eq!(log.first_stored_at_or_after(u64::MAX), end);
    }

    #[test]
    fn a_message_costs_eight_bytes_of_index_outside_retry_queues() {
        let n = 16 * B;
        let log = filled(0, n, entry_at);
        let per_message = log.heap_bytes() as f64 / n as f64;
        assert!(per_message < 8.2, "{per_message} bytes a message");
        // A retry queue's entries carry a due time and attempts: 20 bytes.
        let retry = filled(0, n, |o| IndexEntry {
            due_ms: 5 + o,
            reconsume_times: 2,
            ..entry_at(o)
        });
        let per_message = retry.heap_bytes() as f64 / n as f64;
        assert!(per_message < 20.2, "{per_message} bytes a message");
    }

    #[test]
    fn retention_drops_across_blocks_and_frees_them() {
        let end = 3 * B + 5;
        let mut log = filled(0, end, entry_at);
        let mut bytes = log.bytes();
        for offset in 0..B + 10 {
            bytes -= u64::from(entry_at(offset).size);
            log.pop_front();
        }
        assert_eq!((log.start(), log.end(), log.bytes()), (B + 10, end, bytes));
        assert_eq!(
            log.blocks.len(),
            3,
            "the first block went when the start left it"
        );
        assert_eq!(log.entry(B + 9), None);
        assert_eq!(log.front(), Some(entry_at(B + 10)));
        assert_eq!(all(&log).len(), log.len());
        // Dropped to the end, in the middle of a block: the next entry goes on where the
        // offsets are.
        while log.len() > 0 {
            log.pop_front();
        }
        assert_eq!((log.start(), log.bytes(), log.front()), (end, 0, None));
        assert_eq!(log.push_uncached(entry_at(end)).0, end);
        assert_eq!(all(&log), vec![(end, entry_at(end))]);
        // And on a boundary, with no block left at all.
        let mut log = filled(0, B, entry_at);
        while log.len() > 0 {
            log.pop_front();
        }
        assert!(log.blocks.is_empty());
        log.push_uncached(entry_at(B));
        assert_eq!(all(&log), vec![(B, entry_at(B))]);
    }

    #[test]
    fn stamps_going_back_or_far_ahead_and_retry_fields_are_kept_exactly() {
        let stamps = [
            5_000_000_000_000u64,
            4_999_999_999_000, // a new leader's clock behind
            5_000_000_000_001,
            5_000_000_000_000 + (1 << 31) + 7, // 25 days later: past an i32 of difference
            0,
            u64::MAX,
            5_000_000_000_002,
        ];
        let entry = |o: Offset| IndexEntry {
            stored_ms: stamps[(o % stamps.len() as Offset) as usize],
            due_ms: if o % 3 == 1 { u64::MAX - o } else { 0 },
            size: u32::MAX - o as u32,
            reconsume_times: if o == 2 { u32::MAX } else { 0 },
        };
        let log = filled(B - 3, 2 * B + 3, entry);
        for (offset, got) in all(&log) {
            assert_eq!(got, entry(offset), "offset {offset}");
        }
        let back = round_trip(&log);
        assert_eq!(all(&back), all(&log));
        // Only where a column is needed is it there.
        let plain = filled(0, 10, entry_at);
        let (_, [stamps, sizes, due, reconsume]) = plain.blocks[0].columns();
        assert_eq!(
            (stamps.len(), sizes.len(), due.len(), reconsume.len()),
            (40, 40, 0, 0)
        );
    }

    #[test]
    fn a_snapshot_writes_what_is_retained_however_it_was_reached() {
        // Cut by retention in its second block...
        let mut cut = filled(0, 3 * B + 5, entry_at);
        for _ in 0..B + 10 {
            cut.pop_front();
        }
        // ...and built from the retained entries only (restored from a transfer image).
        let fresh = filled(B + 10, 3 * B + 5, entry_at);
        let blocks = |log: &QueueLog| -> Vec<Block> {
            log.snapshot_blocks().map(|b| b.into_owned()).collect()
        };
        assert_eq!(blocks(&cut), blocks(&fresh));
        assert_eq!(blocks(&cut)[0].len(), (B - 10) as usize);
        let back = round_trip(&cut);
        assert_eq!(all(&back), all(&cut));
        assert_eq!(
            (back.start(), back.end(), back.bytes()),
            (cut.start(), cut.end(), cut.bytes())
        );
        assert_eq!(blocks(&back), blocks(&cut), "the same bytes again");
        // A restored queue grows on as the original does.
        let (mut back, mut cut) = (back, cut);
        for offset in 3 * B + 5..4 * B + 1 {
            back.push_uncached(entry_at(offset));
            cut.push_uncached(entry_at(offset));
        }
        assert_eq!(all(&back), all(&cut));
        assert_eq!(blocks(&back), blocks(&cut));
        // Nothing retained, nothing written.
        while cut.len() > 0 {
            cut.pop_front();
        }
        assert_eq!(cut.snapshot_blocks().count(), 0);
        assert_eq!(all(&round_trip(&cut)), vec![]);
    }

    /// Writing a snapshot copies each block's columns as they are: only a first block that
    /// retention cut into is laid out again (once a snapshot, the module's doc says), not a
    /// queue's blocks that hold no dropped entry, nor a restored queue's first block that
    /// starts in the middle of its span.
    #[test]
    fn a_snapshot_lays_out_again_only_a_first_block_retention_cut_into() {
        let relaid = |log: &QueueLog| -> Vec<bool> {
            log.snapshot_blocks()
                .map(|b| matches!(b, Cow::Owned(_)))
                .collect()
        };
        let mut log = filled(0, 2 * B + 3, entry_at);
        assert_eq!(relaid(&log), vec![false, false, false]);
        log.pop_front();
        assert_eq!(relaid(&log), vec![true, false, false]);
        let fresh = filled(B + 10, 2 * B + 3, entry_at);
        assert_eq!(relaid(&fresh), vec![false, false]);
    }

    #[test]
    fn a_snapshot_job_shares_full_blocks_and_sees_no_later_change() {
        let mut log = filled(0, 2 * B + 3, entry_at);
        let copy = log.index_only();
        assert!(Arc::ptr_eq(&log.blocks[0], &copy.blocks[0]));
        log.push_uncached(entry_at(2 * B + 3));
        log.pop_front();
        assert!(Arc::ptr_eq(&log.blocks[1], &copy.blocks[1]));
        assert!(
            !Arc::ptr_eq(&log.blocks[2], &copy.blocks[2]),
            "the open block is copied"
        );
        assert_eq!((copy.start(), copy.end()), (0, 2 * B + 3));
        assert_eq!(copy.entry(2 * B + 3), None);
        assert_eq!(copy.entry(0), Some(entry_at(0)));
    }

    #[test]
    fn blocks_that_do_not_fit_are_refused() {
        let log = filled(0, B + 4, entry_at);
        let images: Vec<BlockImage> = round_trip_images(&log);
        assert!(QueueLog::from_blocks(0, images.clone()).is_ok());
        // A short block before the last.
        let mut short = images.clone();
        short.swap(0, 1);
        assert!(QueueLog::from_blocks(0, short).is_err());
        // Columns of different lengths, or of no known width.
        for damage in 0..4 {
            let mut bad = images.clone();
            match damage {
                0 => bad[1].stamps.push(0),
                1 => bad[1].sizes.extend_from_slice(&[0; 4]),
                2 => bad[1].due = vec![0; 8],
                _ => bad[1].reconsume = vec![0; 3],
            }
            assert!(QueueLog::from_blocks(0, bad).is_err(), "damage {damage}");
        }
        // A first block too long for where the queue starts in its span.
        assert!(QueueLog::from_blocks(5, images.clone()).is_err());
        // An end past the maximum.
        assert!(QueueLog::from_blocks(END_MAX - 2, images[1..].to_vec()).is_err());
        assert!(QueueLog::from_blocks(END_MAX, Vec::new()).is_err());
    }

    /// `snapshot_blocks` writes no empty block and sizes of whole entries only, so an image
    /// with either is damaged: refused, not restored into an index whose next snapshot writes
    /// other bytes (an empty block) or whose sizes are read out of step (a partial size).
    #[test]
    fn a_block_of_no_entries_or_of_a_partial_size_is_refused() {
        let log = filled(0, B + 4, entry_at);
        let images = round_trip_images(&log);
        assert!(QueueLog::from_blocks(0, images.clone()).is_ok());
        // After a full block, or alone.
        let empty = vec![images[0].clone(), BlockImage::default()];
        assert!(QueueLog::from_blocks(0, images[..1].to_vec()).is_ok());
        assert!(QueueLog::from_blocks(0, empty).is_err());
        assert!(QueueLog::from_blocks(B, vec![BlockImage::default()]).is_err());
        for extra in 1..4 {
            let mut partial = images.clone();
            partial[1].sizes.extend(std::iter::repeat_n(0, extra));
            assert!(
                QueueLog::from_blocks(0, partial).is_err(),
                "{extra} bytes of a size"
            );
        }
    }

    /// Only the last block may be short: a short one before it, even with the next one
    /// starting where it stops, leaves offsets no block's span indexes.
    #[test]
    fn a_short_block_before_the_last_is_refused_even_where_the_next_one_follows_it() {
        let first = round_trip_images(&filled(0, 4, entry_at));
        let next = round_trip_images(&filled(4, 8, entry_at));
        assert_eq!((first.len(), next.len()), (1, 1));
        let mut images = first.clone();
        images.extend(next.clone());
        assert!(QueueLog::from_blocks(0, images).is_err());
        // The same entries as one block are fine.
        let whole = filled(0, 8, entry_at);
        let back = QueueLog::from_blocks(0, round_trip_images(&whole)).expect("reads back");
        assert_eq!(all(&back), all(&whole));
    }

    /// `from_blocks` checks the end itself (a caller other than the snapshot's decoding, which
    /// checks again, gets no index past the maximum): a first block that ends exactly at
    /// [`END_MAX`] is refused, one that ends just below it is not.
    #[test]
    fn a_restored_queue_ending_at_the_maximum_is_refused() {
        let at = filled(END_MAX - 2, END_MAX, |_| entry_at(0));
        assert!(QueueLog::from_blocks(END_MAX - 2, round_trip_images(&at)).is_err());
        let below = filled(END_MAX - 3, END_MAX - 1, |_| entry_at(0));
        let back = QueueLog::from_blocks(END_MAX - 3, round_trip_images(&below));
        assert_eq!(back.map(|log| log.end()), Ok(END_MAX - 1));
    }

    fn round_trip_images(log: &QueueLog) -> Vec<BlockImage> {
        log.snapshot_blocks()
            .map(|block| {
                let (base_ms, [stamps, sizes, due, reconsume]) = block.columns();
                BlockImage {
                    base_ms,
                    stamps: stamps.to_vec(),
                    sizes: sizes.to_vec(),
                    due: due.to_vec(),
                    reconsume: reconsume.to_vec(),
                }
            })
            .collect()
    }
}
