//! One queue's retained messages: a window `start..end` of offsets that only ever slides
//! forward. Retention drops messages from the front, but an offset keeps its meaning forever:
//! the message at offset `o` stays at `o` while it is retained, and `o` is never reused.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::types::{Offset, StoredMessage};

/// A queue's end offset stays below this, so offset arithmetic (`end + 1`, a pull's
/// `offset + 1`) cannot overflow. Appending that many messages would take centuries; a
/// snapshot claiming a queue beyond it is refused as inconsistent rather than trusted.
pub(super) const END_MAX: Offset = 1 << 63;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct QueueLog {
    /// The first retained offset; every offset below it was dropped by retention.
    start: Offset,
    /// The messages at `start..start + messages.len()`.
    messages: VecDeque<StoredMessage>,
    /// `Message::size_bytes` summed over `messages`, for the size limit. Derived, so not in
    /// snapshots: [`QueueLog::recount`] rebuilds it on restore.
    #[serde(skip)]
    bytes: u64,
}

impl QueueLog {
    /// The first retained offset.
    pub(super) fn start(&self) -> Offset {
        self.start
    }

    /// The next offset to be written.
    pub(super) fn end(&self) -> Offset {
        self.start + self.messages.len() as Offset
    }

    /// Bytes of the retained messages.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(super) fn get(&self, offset: Offset) -> Option<&StoredMessage> {
        let index = usize::try_from(offset.checked_sub(self.start)?).ok()?;
        self.messages.get(index)
    }

    /// Appends a message and returns its offset.
    pub(super) fn push(&mut self, stored: StoredMessage) -> Offset {
        let offset = self.end();
        self.bytes += stored.message.size_bytes() as u64;
        self.messages.push_back(stored);
        offset
    }

    /// The retained messages from `from` on (from `start` if `from` is below it), in offset
    /// order.
    pub(super) fn iter_from(
        &self,
        from: Offset,
    ) -> impl Iterator<Item = (Offset, &StoredMessage)> + '_ {
        let skip = usize::try_from(from.saturating_sub(self.start)).unwrap_or(usize::MAX);
        self.messages
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, stored)| (self.start + i as Offset, stored))
    }

    /// The oldest retained message.
    pub(super) fn front(&self) -> Option<&StoredMessage> {
        self.messages.front()
    }

    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }

    /// Drops the oldest retained message; `start` moves past it.
    pub(super) fn pop_front(&mut self) -> Option<StoredMessage> {
        let stored = self.messages.pop_front()?;
        self.start += 1;
        self.bytes -= stored.message.size_bytes() as u64;
        Some(stored)
    }

    /// Rebuilds what a snapshot leaves out and checks what it holds; `Err` says what is wrong.
    pub(super) fn recount(&mut self) -> Result<(), String> {
        let end = self
            .start
            .checked_add(self.messages.len() as Offset)
            .filter(|end| *end < END_MAX);
        if end.is_none() {
            return Err(format!(
                "a queue ends beyond offset {END_MAX} ({} messages from {})",
                self.messages.len(),
                self.start
            ));
        }
        self.bytes = self
            .messages
            .iter()
            .map(|m| m.message.size_bytes() as u64)
            .sum();
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
        assert_eq!(log.push(stored("a")), 0);
        assert_eq!(log.push(stored("bb")), 1);
        assert_eq!(log.push(stored("ccc")), 2);
        assert_eq!((log.start(), log.end(), log.bytes()), (0, 3, 6));
        assert!(log.pop_front().is_some());
        assert_eq!((log.start(), log.end(), log.bytes()), (1, 3, 5));
        assert_eq!(log.get(0), None);
        assert_eq!(log.get(1).map(|m| m.message.body.len()), Some(2));
        assert_eq!(log.get(3), None);
        assert_eq!(log.push(stored("d")), 3, "an offset is never reused");
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
    fn a_queue_ending_too_far_is_refused() {
        let mut log = QueueLog {
            start: END_MAX - 1,
            messages: VecDeque::from([stored("a")]),
            bytes: 0,
        };
        assert!(log.recount().is_err());
        log.start = END_MAX - 2;
        assert_eq!(log.recount(), Ok(()));
        assert_eq!(log.bytes(), 1);
    }
}
