//! Decoding a frame whose bulk bytes stay where they arrived: the commands of a Raft append
//! and the bodies of a send's messages come out as slices of the frame, not copies. A
//! follower decoded (allocated and copied) every command of every append it received, and a
//! leader every message of every send, only to copy them again into log entries.

use bytes::Bytes;
use serde::Deserialize;

use super::Frame;
use crate::broker::{BorrowedMessage, Elsewhere, ProducerId, QueueId, Seq};
use crate::limits::SHARED_FRAME_BYTES_MIN;
use crate::node::protocol::{Request, RequestId};
use crate::raft::{Entry, EntryKind, Envelope, GroupId, Index, Message, NodeId, Term};

/// `payload` (one frame's bytes, header excluded) as a frame, with the append's commands and
/// the send's messages sliced out of it; `None` for any other frame, or bytes that are not a
/// whole frame: the caller decodes those as it always did, errors included.
pub(super) fn decode_sliced(payload: &Bytes) -> Option<Frame> {
    let (frame, rest) = postcard::take_from_bytes::<BorrowedFrame<'_>>(payload).ok()?;
    if !rest.is_empty() {
        return None;
    }
    match frame {
        BorrowedFrame::Peer(envelope) => {
            let BorrowedRaftMessage::Append {
                term,
                prev_index,
                prev_term,
                entries,
                commit,
            } = envelope.message
            else {
                return None;
            };
            let entries = entries.into_iter().map(|e| e.sliced(payload)).collect();
            Some(Frame::Peer(Envelope {
                group: envelope.group,
                from: envelope.from,
                to: envelope.to,
                message: Message::Append {
                    term,
                    prev_index,
                    prev_term,
                    entries,
                    commit,
                },
            }))
        }
        BorrowedFrame::Request {
            id,
            request:
                BorrowedRequest::Send {
                    broker,
                    queue,
                    producer_id,
                    first_seq,
                    messages,
                },
        } => Some(Frame::Request {
            id,
            request: Request::Send {
                broker,
                queue,
                producer_id,
                first_seq,
                messages: messages.into_iter().map(|m| m.sliced(payload)).collect(),
            },
        }),
        _ => None,
    }
}

// The mirrors below copy the leading variants of `Frame`, `Message`, `EntryKind` and
// `Request` in their order: postcard names a variant by its index, so each mirror decodes the
// variant it slices with that variant's fields, and refuses the variants before it (an
// `Elsewhere` in their place) and after it (unknown to the mirror). A test and the `frames`
// fuzz target check the result against the plain decoding.

#[derive(Deserialize)]
enum BorrowedFrame<'a> {
    Hello(Elsewhere),
    Peer(#[serde(borrow)] BorrowedEnvelope<'a>),
    Request {
        id: RequestId,
        #[serde(borrow)]
        request: BorrowedRequest<'a>,
    },
}

#[derive(Deserialize)]
struct BorrowedEnvelope<'a> {
    group: GroupId,
    from: NodeId,
    to: NodeId,
    #[serde(borrow)]
    message: BorrowedRaftMessage<'a>,
}

#[derive(Deserialize)]
enum BorrowedRaftMessage<'a> {
    PreVote(Elsewhere),
    PreVoteResponse(Elsewhere),
    Vote(Elsewhere),
    VoteResponse(Elsewhere),
    Append {
        term: Term,
        prev_index: Index,
        prev_term: Term,
        #[serde(borrow)]
        entries: Vec<BorrowedEntry<'a>>,
        commit: Index,
    },
}

#[derive(Deserialize)]
struct BorrowedEntry<'a> {
    term: Term,
    index: Index,
    #[serde(borrow)]
    kind: BorrowedEntryKind<'a>,
}

#[derive(Deserialize)]
enum BorrowedEntryKind<'a> {
    Noop,
    Commands(#[serde(borrow)] Vec<&'a [u8]>),
}

impl BorrowedEntry<'_> {
    fn sliced(self, source: &Bytes) -> Entry {
        let kind = match self.kind {
            BorrowedEntryKind::Noop => EntryKind::Noop,
            BorrowedEntryKind::Commands(commands) => EntryKind::Commands(
                commands
                    .into_iter()
                    .map(|command| {
                        // The commands of a small frame are copied: they may stay in the
                        // log long after the rest of the frame went, and a slice would keep
                        // the whole read buffer they arrived in.
                        if source.len() >= SHARED_FRAME_BYTES_MIN {
                            source.slice_ref(command)
                        } else {
                            Bytes::copy_from_slice(command)
                        }
                    })
                    .collect(),
            ),
        };
        Entry {
            term: self.term,
            index: self.index,
            kind,
        }
    }
}

#[derive(Deserialize)]
enum BorrowedRequest<'a> {
    Route(Elsewhere),
    Topics(Elsewhere),
    Status(Elsewhere),
    CreateTopic(Elsewhere),
    Heartbeat(Elsewhere),
    Leave(Elsewhere),
    Send {
        broker: GroupId,
        queue: QueueId,
        producer_id: ProducerId,
        first_seq: Seq,
        #[serde(borrow)]
        messages: Vec<BorrowedMessage<'a>>,
    },
}
