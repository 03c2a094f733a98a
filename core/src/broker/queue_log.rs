//! One queue's index: a window `start..end` of offsets that only ever slides forward, with a
//! few bytes per retained message and none of their contents. Retention drops messages from
//! the front, but an offset keeps its meaning forever: the message at offset `o` stays at `o`
//! while it is retained, and `o` is never reused.
//!
//! The message bytes live in the driver's queue store (see [`super::StoreOp`]); the newest of
//! them also in a bounded cache ([`super::BrokerState`] keeps it), so that a consumer that
//! keeps up is served without a read.

use std::collections::VecDeque;

use super::types::{Offset, StoredMessage};

/// A queue's end offset stays below this, so offset arithmetic (`end + 1`, a pull's
/// `offset + 1`) cannot overflow. Appending that many messages would take centuries; a
/// snapshot claiming a queue beyond it is refused as inconsistent rather than trusted.
pub(super) const END_MAX: Offset = 1 << 63;

/// What the state machine keeps of one retained message: what retention (age, size), pull
/// limits, retry due times and `ReconsumeLater` need, and nothing of its contents.
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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct QueueLog {
    /// The first retained offset; every offset below it was dropped by retention.
    start: Offset,
    /// The index entries of `start..start + entries.len()`.
    entries: VecDeque<IndexEntry>,
    /// `size` summed over `entries`, for the size limit.
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
            ..QueueLog::default()
        }
    }

    /// The first retained offset.
    pub(super) fn start(&self) -> Offset {
        self.start
    }

    /// The next offset to be written.
    pub(super) fn end(&self) -> Offset {
        self.start + self.entries.len() as Offset
    }

    /// Bytes of the retained messages.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The first retained offset whose message was stored at or after `ms`; the end if none
    /// was. A scan, not a search: stamps come from whichever node led, and clocks of two
    /// nodes need not agree, so they need not rise with the offset.
    pub(super) fn first_stored_at_or_after(&self, ms: u64) -> Offset {
        self.entries
            .iter()
            .position(|e| e.stored_ms >= ms)
            .map_or(self.end(), |i| self.start + i as Offset)
    }

    pub(super) fn entry(&self, offset: Offset) -> Option<&IndexEntry> {
        let index = usize::try_from(offset.checked_sub(self.start)?).ok()?;
        self.entries.get(index)
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
        let offset = self.end();
        self.bytes += u64::from(entry.size);
        self.entries.push_back(entry);
        offset
    }

    /// Empties the cache; returns the bytes it held.
    pub(super) fn drop_cache(&mut self) -> u64 {
        let freed = self
            .cached
            .iter()
            .map(|m| m.message.size_bytes() as u64)
            .sum();
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
    pub(super) fn iter_from(&self, from: Offset) -> impl Iterator<Item = (Offset, &IndexEntry)> {
        let skip = usize::try_from(from.saturating_sub(self.start)).unwrap_or(usize::MAX);
        self.entries
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, entry)| (self.start + i as Offset, entry))
    }

    /// The oldest retained message's entry.
    pub(super) fn front(&self) -> Option<&IndexEntry> {
        self.entries.front()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops the oldest retained message; `start` moves past it. Returns the cache bytes freed.
    pub(super) fn pop_front(&mut self) -> u64 {
        let freed = self.evict(self.start);
        if let Some(entry) = self.entries.pop_front() {
            self.start += 1;
            self.bytes -= u64::from(entry.size);
        }
        freed
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

    #[test]
    fn a_queue_ending_too_far_is_refused() {
        assert!(QueueLog::check_end(END_MAX - 1, 1).is_err());
        assert_eq!(QueueLog::check_end(END_MAX - 2, 1), Ok(()));
    }
}
