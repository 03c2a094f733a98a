//! Commands as bytes inside Raft entries (postcard).

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;

use super::types::{Command, Message, ProducerId, QueueId, Seq};
use crate::wire::AppendTo;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot decode a broker command: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

/// Room for a command's fields besides its messages.
const COMMAND_SLACK_BYTES: usize = 64;

/// About what postcard adds around a message's bytes: a length prefix per field and per tag
/// and property string, counts, the key's tag. A little over, so the vector never grows;
/// not much over, as a Raft log holds the entry in memory until it is compacted.
fn message_slack_bytes(message: &Message) -> usize {
    16 + 5 * (message.tags.len() + 2 * message.properties.len())
}

/// What to reserve for `command`'s encoding.
fn capacity_bytes(command: &Command) -> usize {
    let messages = match command {
        Command::Append { messages, .. } => messages
            .iter()
            .map(|m| m.size_bytes() + message_slack_bytes(m))
            .sum(),
        _ => 0,
    };
    messages + COMMAND_SLACK_BYTES
}

pub fn encode_command(command: &Command) -> Bytes {
    // Sized for the whole command at once: grown from empty, an append of 256 messages of
    // 1 KiB reallocated and copied a dozen times, and it was 8 % of a publishing node's CPU.
    let mut bytes = Vec::with_capacity(capacity_bytes(command));
    // Serialising an in-memory value cannot fail for these plain types; if serde ever
    // reports an error, an empty entry decodes as malformed and is refused on apply.
    if postcard::serialize_with_flavor(command, AppendTo(&mut bytes)).is_err() {
        bytes.clear();
    }
    Bytes::from(bytes)
}

pub fn decode_command(bytes: &[u8]) -> Result<Command, CodecError> {
    postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()))
}

/// [`decode_command`] for a command held in `bytes`, whose appended messages' bodies and keys
/// come out as slices of `bytes` rather than copies: every replica decodes every message of
/// every entry it applies, and allocating and copying each body again was a large part of
/// a publishing node's work (the page faults of fresh allocations most of all). A cached
/// message thus keeps its entry's buffer alive; the cache evicts in the order messages were
/// written, so at most the one entry being evicted is held partly.
pub fn decode_command_shared(bytes: &Bytes) -> Result<Command, CodecError> {
    match postcard::from_bytes::<BorrowedCommand<'_>>(bytes) {
        Ok(BorrowedCommand::Append {
            queue,
            producer_id,
            first_seq,
            messages,
            stamp_ms,
        }) => Ok(Command::Append {
            queue,
            producer_id,
            first_seq,
            messages: messages.into_iter().map(|m| m.sliced(bytes)).collect(),
            stamp_ms,
        }),
        // Any other command (or bytes that are none): as `decode_command` sees it.
        Ok(BorrowedCommand::CreateQueues(_)) | Err(_) => decode_command(bytes),
    }
}

/// The first two variants of [`Command`] in its order, `Append` with its fields, borrowing
/// the bytes of messages: postcard names a variant by its index, so this decodes exactly the
/// `Append` commands and refuses the others (a test checks it against `decode_command` on
/// arbitrary commands).
#[derive(Deserialize)]
enum BorrowedCommand<'a> {
    CreateQueues(Elsewhere),
    Append {
        queue: QueueId,
        producer_id: ProducerId,
        first_seq: Seq,
        #[serde(borrow)]
        messages: Vec<BorrowedMessage<'a>>,
        stamp_ms: u64,
    },
}

/// [`Message`], borrowing its key and body.
#[derive(Deserialize)]
pub(crate) struct BorrowedMessage<'a> {
    #[serde(borrow)]
    key: Option<&'a [u8]>,
    tags: Vec<String>,
    properties: BTreeMap<String, String>,
    #[serde(borrow)]
    body: &'a [u8],
}

/// In a mirror of an enum, the place of a variant that the mirror leaves to the plain
/// decoding: refuses to decode, so the mirror's decoding fails there.
pub(crate) struct Elsewhere;

impl<'de> Deserialize<'de> for Elsewhere {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Elsewhere, D::Error> {
        Err(serde::de::Error::custom("decoded elsewhere"))
    }
}

impl BorrowedMessage<'_> {
    /// The message, its key and body slices of `source`, the bytes it was decoded from.
    pub(crate) fn sliced(self, source: &Bytes) -> Message {
        Message {
            key: self.key.map(|key| source.slice_ref(key)),
            tags: self.tags,
            properties: self.properties,
            body: source.slice_ref(self.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::QueueId;

    #[test]
    fn a_command_encodes_as_postcard_does_within_the_room_reserved_and_decodes_back() {
        let mut tagged = Message::with_body(vec![7u8; 300]);
        tagged.key = Some(Bytes::from_static(b"key"));
        tagged.tags = vec!["a".into(), "bb".into()];
        tagged.properties.insert("trace".into(), "x".repeat(200));
        let append = Command::Append {
            queue: QueueId::new("orders", 3),
            producer_id: u64::MAX,
            first_seq: u64::MAX - 5,
            messages: vec![
                Message::with_body(vec![1u8; 1024]),
                tagged,
                Message::default(),
            ],
            stamp_ms: u64::MAX,
        };
        let bytes = encode_command(&append);
        assert_eq!(
            &bytes[..],
            &postcard::to_allocvec(&append).expect("encodes")[..]
        );
        let reserved = capacity_bytes(&append);
        assert!(bytes.len() <= reserved, "{} > {reserved}", bytes.len());
        assert!(
            reserved <= bytes.len() + 200,
            "{reserved} reserved for {}",
            bytes.len()
        );
        assert_eq!(decode_command(&bytes), Ok(append));
        let ack = Command::Ack {
            group: "billing".into(),
            queue: QueueId::new("orders", 0),
            offsets: (0..100).collect(),
        };
        assert_eq!(decode_command(&encode_command(&ack)), Ok(ack));
    }
}
