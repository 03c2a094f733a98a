//! Log records and the recovery scan.
//!
//! Every function here must survive arbitrary bytes: recovery reads whatever a crash, a bad
//! disk or a stray write left behind, so a panic would turn a damaged file into a replica that
//! can never start. Reads go through [`Reader`], which only ever returns `None`.

use std::fmt;

use bytes::Bytes;

use crate::raft::{Entry, EntryKind, Index, Membership, Term};

/// The `len` and `crc32c` fields in front of every record.
pub const HEADER_BYTES: usize = 8;
/// The largest record, header included. Bounds what a garbage `len` field can make recovery
/// read or allocate, and what one entry may hold.
pub use crate::limits::RECORD_BYTES_MAX;

const INDEX_TERM_BYTES: usize = 16;
const KIND_NOOP: u8 = 0;
const KIND_COMMANDS: u8 = 1;
const KIND_CONFIG: u8 = 2;
/// A Noop: index, term and the kind byte. No valid record is shorter.
const BODY_BYTES_MIN: usize = INDEX_TERM_BYTES + 1;
const BODY_BYTES_MAX: usize = RECORD_BYTES_MAX - HEADER_BYTES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The entry would exceed [`RECORD_BYTES_MAX`]; recovery would refuse to read it back.
    RecordTooLarge { len_bytes: u64 },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::RecordTooLarge { len_bytes } => write!(
                f,
                "log record of {len_bytes} bytes exceeds the maximum of {RECORD_BYTES_MAX} bytes"
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

/// Why a record's payload does not decode although its checksum matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadError {
    UnknownKind {
        tag: u8,
    },
    /// A count or a command length points past the end of the record.
    Truncated,
    /// Bytes left over after the last command.
    TrailingBytes {
        len_bytes: usize,
    },
    /// A configuration of more members than a group may have.
    TooManyMembers {
        count: u64,
    },
    /// A configuration naming a node twice (as voter and learner, say) or with no voter:
    /// no leader ever writes one.
    MalformedMembership {
        why: &'static str,
        id: u64,
    },
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::UnknownKind { tag } => write!(f, "unknown entry kind {tag}"),
            PayloadError::Truncated => write!(f, "payload ends inside a command"),
            PayloadError::TrailingBytes { len_bytes } => {
                write!(f, "{len_bytes} bytes after the last command")
            }
            PayloadError::TooManyMembers { count } => write!(
                f,
                "a configuration of {count} members, above the maximum of {}",
                crate::limits::GROUP_MEMBERS_MAX
            ),
            PayloadError::MalformedMembership { why, id } => {
                write!(f, "a configuration that {why} (node {id})")
            }
        }
    }
}

impl std::error::Error for PayloadError {}

/// Why the record at some offset is not a valid continuation of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptReason {
    /// The bytes end inside the record (or inside its header).
    Incomplete {
        len_bytes: usize,
        available_bytes: usize,
    },
    /// `len` is below the smallest possible record.
    LengthTooSmall {
        len_bytes: u32,
    },
    /// `len` is above [`RECORD_BYTES_MAX`].
    LengthTooLarge {
        len_bytes: u32,
    },
    Checksum {
        stored: u32,
        computed: u32,
    },
    IndexGap {
        expected: Index,
        found: Index,
    },
    /// A record follows the entry with index `Index::MAX`.
    IndexOverflow {
        found: Index,
    },
    TermDecrease {
        previous: Term,
        found: Term,
    },
    Payload(PayloadError),
    /// The bytes end cleanly, but before `synced_len`: synced records are missing.
    MissingSynced {
        synced_len: u64,
    },
}

impl fmt::Display for CorruptReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorruptReason::Incomplete {
                len_bytes,
                available_bytes,
            } => write!(
                f,
                "record needs {len_bytes} bytes but only {available_bytes} remain"
            ),
            CorruptReason::LengthTooSmall { len_bytes } => {
                write!(
                    f,
                    "record length {len_bytes} is below the minimum {BODY_BYTES_MIN}"
                )
            }
            CorruptReason::LengthTooLarge { len_bytes } => {
                write!(
                    f,
                    "record length {len_bytes} is above the maximum {BODY_BYTES_MAX}"
                )
            }
            CorruptReason::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            CorruptReason::IndexGap { expected, found } => {
                write!(f, "expected index {expected}, found {found}")
            }
            CorruptReason::IndexOverflow { found } => {
                write!(f, "index {found} follows the largest possible index")
            }
            CorruptReason::TermDecrease { previous, found } => {
                write!(f, "term decreases from {previous} to {found}")
            }
            CorruptReason::Payload(e) => write!(f, "undecodable payload: {e}"),
            CorruptReason::MissingSynced { synced_len } => {
                write!(f, "log ends before its synced length of {synced_len} bytes")
            }
        }
    }
}

impl std::error::Error for CorruptReason {}

/// How a scanned region ends, after its valid prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanOutcome {
    /// The region ends exactly after a valid record (or is empty).
    Clean,
    /// A bad or incomplete record starts at `at`, at or after the synced length: it was never
    /// acknowledged as durable, so the caller truncates the region to `at`.
    TornTail { at: u64 },
    /// A bad record starts at `at`, before the synced length: data that was reported durable is
    /// damaged. The caller must not truncate it away; entries from `index_hint` on must be
    /// repaired (from peers) before this replica votes or leads on them.
    Corrupt {
        at: u64,
        index_hint: Index,
        reason: CorruptReason,
    },
}

impl fmt::Display for ScanOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanOutcome::Clean => write!(f, "clean"),
            ScanOutcome::TornTail { at } => write!(f, "torn tail at byte {at}"),
            ScanOutcome::Corrupt {
                at,
                index_hint,
                reason,
            } => write!(
                f,
                "corrupt record at byte {at} (index {index_hint}): {reason}"
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The decoded records of the valid prefix, contiguous from the expected first index.
    pub entries: Vec<Entry>,
    /// The byte length of the valid prefix.
    pub valid_len: u64,
    pub outcome: ScanOutcome,
}

/// The size of `entry`'s record, header included.
pub fn record_len_bytes(entry: &Entry) -> Result<usize, EncodeError> {
    let body_len_bytes = body_len_bytes(entry);
    match usize::try_from(body_len_bytes) {
        Ok(body) if body <= BODY_BYTES_MAX => Ok(HEADER_BYTES + body),
        _ => Err(EncodeError::RecordTooLarge {
            len_bytes: body_len_bytes.saturating_add(HEADER_BYTES as u64),
        }),
    }
}

/// Saturating so a pathological entry reports "too large" instead of wrapping to a small size.
fn body_len_bytes(entry: &Entry) -> u64 {
    let payload: u64 = match &entry.kind {
        EntryKind::Noop => 1,
        EntryKind::Commands(commands) => commands.iter().fold(1 + 4, |sum: u64, c| {
            sum.saturating_add(4).saturating_add(c.len() as u64)
        }),
        EntryKind::Config(membership) => 1 + membership_len_bytes(membership) as u64,
    };
    payload.saturating_add(INDEX_TERM_BYTES as u64)
}

/// Appends `entry`'s record to `out` and returns its size. On error `out` is unchanged.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    let record_len = record_len_bytes(entry)?;
    // The size check above bounds every length below by BODY_BYTES_MAX, so none saturates.
    let body_len = len_u32(record_len - HEADER_BYTES);
    out.reserve(record_len);
    out.extend_from_slice(&body_len.to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    out.extend_from_slice(&entry.index.to_le_bytes());
    out.extend_from_slice(&entry.term.to_le_bytes());
    match &entry.kind {
        EntryKind::Noop => out.push(KIND_NOOP),
        EntryKind::Commands(commands) => {
            out.push(KIND_COMMANDS);
            out.extend_from_slice(&len_u32(commands.len()).to_le_bytes());
            for command in commands {
                out.extend_from_slice(&len_u32(command.len()).to_le_bytes());
                out.extend_from_slice(command);
            }
        }
        EntryKind::Config(membership) => {
            out.push(KIND_CONFIG);
            encode_membership(membership, out);
        }
    }
    let crc = out.get(body_at..).map_or(0, crc32c::crc32c);
    if let Some(field) = out.get_mut(crc_at..body_at) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
    Ok(record_len)
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Finds the valid prefix of a log region whose first record should have index
/// `expected_first_index`. `synced_len` is how many leading bytes of the region are known to
/// have been synced: a bad record starting there or later is a torn tail, one starting earlier
/// is corruption.
pub fn scan(bytes: &[u8], synced_len: u64, expected_first_index: Index) -> Scan {
    let mut entries = Vec::new();
    let mut pos: usize = 0;
    let mut next_index = Some(expected_first_index);
    let mut last_term: Option<Term> = None;
    let outcome = loop {
        let at = pos as u64;
        let rest = bytes.get(pos..).unwrap_or_default();
        let result = if rest.is_empty() {
            if at >= synced_len {
                break ScanOutcome::Clean;
            }
            Err(CorruptReason::MissingSynced { synced_len })
        } else {
            read_record(rest, next_index, last_term)
        };
        match result {
            Ok((entry, record_len)) => {
                pos = pos.saturating_add(record_len);
                next_index = entry.index.checked_add(1);
                last_term = Some(entry.term);
                entries.push(entry);
            }
            Err(_) if at >= synced_len => break ScanOutcome::TornTail { at },
            Err(reason) => {
                break ScanOutcome::Corrupt {
                    at,
                    index_hint: next_index.unwrap_or(Index::MAX),
                    reason,
                };
            }
        }
    };
    Scan {
        entries,
        valid_len: pos as u64,
        outcome,
    }
}

/// Decodes the record at the start of `bytes` and returns it with its size.
fn read_record(
    bytes: &[u8],
    next_index: Option<Index>,
    last_term: Option<Term>,
) -> Result<(Entry, usize), CorruptReason> {
    let mut header = Reader::new(bytes);
    let incomplete = |len_bytes| CorruptReason::Incomplete {
        len_bytes,
        available_bytes: bytes.len(),
    };
    let body_len = header.u32().ok_or(incomplete(HEADER_BYTES))?;
    let body_len_bytes = usize::try_from(body_len).unwrap_or(usize::MAX);
    if body_len_bytes < BODY_BYTES_MIN {
        return Err(CorruptReason::LengthTooSmall {
            len_bytes: body_len,
        });
    }
    if body_len_bytes > BODY_BYTES_MAX {
        return Err(CorruptReason::LengthTooLarge {
            len_bytes: body_len,
        });
    }
    let record_len = HEADER_BYTES + body_len_bytes;
    let stored = header.u32().ok_or(incomplete(record_len))?;
    let body = header.take(body_len_bytes).ok_or(incomplete(record_len))?;
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(CorruptReason::Checksum { stored, computed });
    }

    let mut body = Reader::new(body);
    let (Some(index), Some(term)) = (body.u64(), body.u64()) else {
        // Unreachable: the length check guarantees both fields; kept total for safety.
        return Err(CorruptReason::LengthTooSmall {
            len_bytes: body_len,
        });
    };
    match next_index {
        Some(expected) if index != expected => {
            return Err(CorruptReason::IndexGap {
                expected,
                found: index,
            });
        }
        Some(_) => {}
        None => return Err(CorruptReason::IndexOverflow { found: index }),
    }
    match last_term {
        Some(previous) if term < previous => {
            return Err(CorruptReason::TermDecrease {
                previous,
                found: term,
            });
        }
        _ => {}
    }
    let kind = decode_kind(body).map_err(CorruptReason::Payload)?;
    Ok((Entry { term, index, kind }, record_len))
}

fn decode_kind(mut payload: Reader<'_>) -> Result<EntryKind, PayloadError> {
    let kind = match payload.u8().ok_or(PayloadError::Truncated)? {
        KIND_NOOP => EntryKind::Noop,
        KIND_COMMANDS => {
            let count = payload.u32().ok_or(PayloadError::Truncated)?;
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            // Every command takes at least its 4-byte length, so a garbage count cannot
            // reserve more than the payload could hold.
            let mut commands = Vec::with_capacity(count.min(payload.remaining() / 4));
            for _ in 0..count {
                let len = payload.u32().ok_or(PayloadError::Truncated)?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let command = payload.take(len).ok_or(PayloadError::Truncated)?;
                commands.push(Bytes::copy_from_slice(command));
            }
            EntryKind::Commands(commands)
        }
        KIND_CONFIG => EntryKind::Config(decode_membership(&mut payload)?),
        tag => return Err(PayloadError::UnknownKind { tag }),
    };
    match payload.remaining() {
        0 => Ok(kind),
        len_bytes => Err(PayloadError::TrailingBytes { len_bytes }),
    }
}

/// What [`encode_membership`] writes: `[voters u32 LE][voter ids u64 LE...][learners u32
/// LE][learner ids u64 LE...]`.
pub fn membership_len_bytes(membership: &Membership) -> usize {
    8 + 8 * membership.len()
}

pub fn encode_membership(membership: &Membership, out: &mut Vec<u8>) {
    for set in [&membership.voters, &membership.learners] {
        out.extend_from_slice(&len_u32(set.len()).to_le_bytes());
        for id in set {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
}

/// Reads back what [`encode_membership`] wrote, at most `GROUP_MEMBERS_MAX` members.
fn decode_membership(payload: &mut Reader<'_>) -> Result<Membership, PayloadError> {
    let mut membership = Membership::default();
    let mut total = 0u64;
    for learners in [false, true] {
        let count = u64::from(payload.u32().ok_or(PayloadError::Truncated)?);
        total += count;
        if total > crate::limits::GROUP_MEMBERS_MAX as u64 {
            return Err(PayloadError::TooManyMembers { count: total });
        }
        for _ in 0..count {
            let id = payload.u64().ok_or(PayloadError::Truncated)?;
            if membership.voters.contains(&id) || membership.learners.contains(&id) {
                return Err(PayloadError::MalformedMembership {
                    why: "names a node twice",
                    id,
                });
            }
            if learners {
                membership.learners.insert(id);
            } else {
                membership.voters.insert(id);
            }
        }
    }
    if membership.voters.is_empty() {
        return Err(PayloadError::MalformedMembership {
            why: "has no voter",
            id: 0,
        });
    }
    Ok(membership)
}

/// [`decode_membership`] of a whole byte slice, returning what follows it.
pub fn decode_membership_prefix(bytes: &[u8]) -> Result<(Membership, usize), PayloadError> {
    let mut reader = Reader::new(bytes);
    let membership = decode_membership(&mut reader)?;
    Ok((membership, bytes.len() - reader.remaining()))
}

/// The shortest valid record: a Noop.
const RECORD_BYTES_MIN: usize = HEADER_BYTES + BODY_BYTES_MIN;

/// The first record with a good checksum that starts after the damaged one at `at` and could
/// belong to this log: a torn write only ever damages the end of the file, so such a record
/// means the damage is inside the log (a bit flip, a lost sector) and must not be cut away.
///
/// Cost: one pass over the bytes after `at`, reading a header at each offset. The checksum
/// (a pass over one record) only runs where the length fits in the file, the index lies in the
/// range the remaining bytes could hold after `next_index`, and the term does not decrease;
/// zeroed or random bytes almost never pass that. The search ends at the first hit, so a real
/// mid-log flip costs about one record, and a torn tail is at most one batch long.
///
/// A torn write that persisted a later page but not an earlier one also looks like this; it is
/// reported as corruption (failing safe) because without a recorded synced length the two
/// cannot be told apart.
pub fn find_record_after(
    bytes: &[u8],
    at: u64,
    next_index: Index,
    min_term: Term,
) -> Option<(u64, Index)> {
    let start = usize::try_from(at).ok()?.checked_add(1)?;
    let most_records = (bytes.len().saturating_sub(start) / RECORD_BYTES_MIN) as Index;
    let indexes = next_index..=next_index.saturating_add(most_records);
    for pos in start..bytes.len() {
        let (Some(len), Some(index), Some(term)) = (
            le_u32(bytes, pos),
            le_u64(bytes, pos + HEADER_BYTES),
            le_u64(bytes, pos + HEADER_BYTES + 8),
        ) else {
            break;
        };
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|len| pos.checked_add(HEADER_BYTES)?.checked_add(len))
        else {
            continue;
        };
        if end - pos < RECORD_BYTES_MIN || !indexes.contains(&index) || term < min_term {
            continue;
        }
        let Some(record) = bytes.get(pos..end) else {
            continue;
        };
        let one = scan(record, 0, index);
        if one.entries.len() == 1 && one.outcome == ScanOutcome::Clean {
            return Some((pos as u64, index));
        }
    }
    None
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

/// A cursor whose reads return `None` instead of panicking when the bytes run out.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(len_bytes)?;
        self.rest = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn noop(index: Index, term: Term) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Noop,
        }
    }

    fn commands(index: Index, term: Term, commands: &[&[u8]]) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Commands(commands.iter().map(|c| Bytes::copy_from_slice(c)).collect()),
        }
    }

    fn encode_all(entries: &[Entry]) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for entry in entries {
            encode_entry(entry, &mut out).expect("test entries are small");
            ends.push(out.len() as u64);
        }
        (out, ends)
    }

    /// Builds a record with a correct length and checksum around an arbitrary body, to reach
    /// the checks behind the checksum.
    fn raw_record(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    fn body(index: Index, term: Term, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn sample_log() -> Vec<Entry> {
        vec![
            noop(1, 1),
            commands(2, 1, &[b"a", b"", b"hello"]),
            commands(3, 2, &[]),
            noop(4, 3),
            commands(5, 3, &[b"xyz"]),
        ]
    }

    #[test]
    fn noop_record_layout() {
        let mut out = Vec::new();
        let len = encode_entry(&noop(7, 9), &mut out).unwrap();
        assert_eq!(len, 25);
        assert_eq!(out.len(), 25);
        assert_eq!(out[0..4], 17u32.to_le_bytes());
        assert_eq!(out[4..8], crc32c::crc32c(&out[8..]).to_le_bytes());
        assert_eq!(out[8..16], 7u64.to_le_bytes());
        assert_eq!(out[16..24], 9u64.to_le_bytes());
        assert_eq!(out[24], KIND_NOOP);
    }

    #[test]
    fn commands_record_layout() {
        let mut out = vec![0xAA];
        let len = encode_entry(&commands(1, 1, &[b"ab", b""]), &mut out).unwrap();
        assert_eq!(len, 8 + 16 + 1 + 4 + (4 + 2) + 4);
        assert_eq!(out[0], 0xAA, "appends without touching earlier bytes");
        let payload = &out[1 + 8 + 16..];
        assert_eq!(
            payload,
            &[1, 2, 0, 0, 0, 2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]
        );
        assert_eq!(record_len_bytes(&commands(1, 1, &[b"ab", b""])), Ok(len));
    }

    #[test]
    fn oversized_entry_is_refused_and_leaves_out_unchanged() {
        let big = Entry {
            term: 1,
            index: 1,
            kind: EntryKind::Commands(vec![Bytes::from(vec![0; RECORD_BYTES_MAX])]),
        };
        let mut out = vec![1, 2, 3];
        let err = encode_entry(&big, &mut out).unwrap_err();
        assert_eq!(out, [1, 2, 3]);
        assert!(
            matches!(err, EncodeError::RecordTooLarge { len_bytes } if len_bytes > RECORD_BYTES_MAX as u64)
        );
        assert!(err.to_string().contains("exceeds"));
    }

    #[test]
    fn largest_record_round_trips() {
        // Header, index, term, kind, count and one command length.
        let command_len = RECORD_BYTES_MAX - HEADER_BYTES - INDEX_TERM_BYTES - 1 - 4 - 4;
        let entry = Entry {
            term: 1,
            index: 1,
            kind: EntryKind::Commands(vec![Bytes::from(vec![7; command_len])]),
        };
        let mut out = Vec::new();
        assert_eq!(encode_entry(&entry, &mut out), Ok(RECORD_BYTES_MAX));
        let scan = scan(&out, 0, 1);
        assert_eq!(scan.outcome, ScanOutcome::Clean);
        assert_eq!(scan.entries, vec![entry]);
    }

    #[test]
    fn empty_region_is_clean() {
        let scan = scan(&[], 0, 1);
        assert_eq!(
            scan,
            Scan {
                entries: vec![],
                valid_len: 0,
                outcome: ScanOutcome::Clean
            }
        );
    }

    #[test]
    fn round_trip_from_a_later_first_index() {
        let entries: Vec<Entry> = sample_log()
            .into_iter()
            .map(|e| Entry {
                index: e.index + 99,
                ..e
            })
            .collect();
        let (bytes, _) = encode_all(&entries);
        let scan = scan(&bytes, bytes.len() as u64, 100);
        assert_eq!(scan.outcome, ScanOutcome::Clean);
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert_eq!(scan.entries, entries);
    }

    #[test]
    fn zero_fill_after_the_synced_end_is_a_torn_tail() {
        let (mut bytes, ends) = encode_all(&sample_log());
        bytes.extend_from_slice(&[0; 4096]);
        let scan = scan(&bytes, ends[4], 1);
        assert_eq!(scan.outcome, ScanOutcome::TornTail { at: ends[4] });
        assert_eq!(scan.valid_len, ends[4]);
        assert_eq!(scan.entries, sample_log());
    }

    #[test]
    fn torn_record_inside_the_synced_region_is_corrupt() {
        let (bytes, ends) = encode_all(&sample_log());
        let cut = &bytes[..ends[3] as usize - 3];
        let scan = scan(cut, ends[3], 1);
        assert_eq!(scan.entries, sample_log()[..3]);
        assert_eq!(scan.valid_len, ends[2]);
        assert_eq!(
            scan.outcome,
            ScanOutcome::Corrupt {
                at: ends[2],
                index_hint: 4,
                reason: CorruptReason::Incomplete {
                    len_bytes: (ends[3] - ends[2]) as usize,
                    available_bytes: (ends[3] - ends[2]) as usize - 3,
                },
            }
        );
    }

    #[test]
    fn region_shorter_than_synced_is_corrupt_even_at_a_boundary() {
        let (bytes, ends) = encode_all(&sample_log());
        let scan = scan(&bytes[..ends[1] as usize], ends[3], 1);
        assert_eq!(scan.entries, sample_log()[..2]);
        assert_eq!(
            scan.outcome,
            ScanOutcome::Corrupt {
                at: ends[1],
                index_hint: 3,
                reason: CorruptReason::MissingSynced {
                    synced_len: ends[3]
                },
            }
        );
    }

    #[test]
    fn checksum_mismatch_in_synced_region_is_corrupt() {
        let (mut bytes, ends) = encode_all(&sample_log());
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let scan = scan(&bytes, bytes.len() as u64, 1);
        assert_eq!(scan.entries, sample_log()[..4]);
        assert!(matches!(
            scan.outcome,
            ScanOutcome::Corrupt {
                at,
                index_hint: 5,
                reason: CorruptReason::Checksum { .. },
            } if at == ends[3]
        ));
    }

    #[test]
    fn impossible_lengths() {
        let mut tiny = raw_record(&body(1, 1, &[]));
        assert_eq!(
            scan(&tiny, 1, 1).outcome,
            ScanOutcome::Corrupt {
                at: 0,
                index_hint: 1,
                reason: CorruptReason::LengthTooSmall { len_bytes: 16 },
            }
        );
        tiny[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            scan(&tiny, 1, 1).outcome,
            ScanOutcome::Corrupt {
                at: 0,
                index_hint: 1,
                reason: CorruptReason::LengthTooLarge {
                    len_bytes: u32::MAX
                },
            }
        );
        assert_eq!(scan(&tiny, 0, 1).outcome, ScanOutcome::TornTail { at: 0 });
    }

    #[test]
    fn index_gap_is_corrupt() {
        let (mut bytes, ends) = encode_all(&[noop(1, 1)]);
        encode_entry(&noop(3, 1), &mut bytes).unwrap();
        let scan = scan(&bytes, bytes.len() as u64, 1);
        assert_eq!(scan.entries, vec![noop(1, 1)]);
        assert_eq!(
            scan.outcome,
            ScanOutcome::Corrupt {
                at: ends[0],
                index_hint: 2,
                reason: CorruptReason::IndexGap {
                    expected: 2,
                    found: 3
                },
            }
        );
    }

    #[test]
    fn wrong_first_index_is_corrupt() {
        let (bytes, _) = encode_all(&sample_log());
        let scan = scan(&bytes, bytes.len() as u64, 2);
        assert!(scan.entries.is_empty());
        assert_eq!(
            scan.outcome,
            ScanOutcome::Corrupt {
                at: 0,
                index_hint: 2,
                reason: CorruptReason::IndexGap {
                    expected: 2,
                    found: 1
                },
            }
        );
    }

    #[test]
    fn index_after_max_is_corrupt() {
        let (bytes, ends) = encode_all(&[noop(Index::MAX, 1), noop(0, 1)]);
        let scan = scan(&bytes, bytes.len() as u64, Index::MAX);
        assert_eq!(scan.entries, vec![noop(Index::MAX, 1)]);
        assert_eq!(
            scan.outcome,
            ScanOutcome::Corrupt {
                at: ends[0],
                index_hint: Index::MAX,
                reason: CorruptReason::IndexOverflow { found: 0 },
            }
        );
    }

    #[test]
    fn term_decrease_is_corrupt() {
        let (bytes, ends) = encode_all(&[noop(1, 5), noop(2, 5), noop(3, 4)]);
        let scan = scan(&bytes, bytes.len() as u64, 1);
        assert_eq!(scan.entries.len(), 2);
        assert_eq!(
            scan.outcome,
            ScanOutcome::Corrupt {
                at: ends[1],
                index_hint: 3,
                reason: CorruptReason::TermDecrease {
                    previous: 5,
                    found: 4
                },
            }
        );
    }

    #[test]
    fn undecodable_payloads_are_corrupt() {
        let cases: [(&[u8], PayloadError); 5] = [
            (&[9], PayloadError::UnknownKind { tag: 9 }),
            (
                &[KIND_NOOP, 0],
                PayloadError::TrailingBytes { len_bytes: 1 },
            ),
            (&[KIND_COMMANDS, 1, 0], PayloadError::Truncated),
            (
                &[KIND_COMMANDS, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0],
                PayloadError::Truncated,
            ),
            (
                &[KIND_COMMANDS, 1, 0, 0, 0, 2, 0, 0, 0, b'a'],
                PayloadError::Truncated,
            ),
        ];
        for (payload, expected) in cases {
            let bytes = raw_record(&body(1, 1, payload));
            let scan = scan(&bytes, bytes.len() as u64, 1);
            assert!(scan.entries.is_empty());
            assert_eq!(
                scan.outcome,
                ScanOutcome::Corrupt {
                    at: 0,
                    index_hint: 1,
                    reason: CorruptReason::Payload(expected),
                },
                "payload {payload:?}"
            );
        }
    }

    #[test]
    fn outcomes_display() {
        let corrupt = ScanOutcome::Corrupt {
            at: 40,
            index_hint: 3,
            reason: CorruptReason::Checksum {
                stored: 1,
                computed: 2,
            },
        };
        assert_eq!(
            corrupt.to_string(),
            "corrupt record at byte 40 (index 3): checksum mismatch: stored 0x00000001, computed 0x00000002"
        );
        assert_eq!(
            ScanOutcome::TornTail { at: 7 }.to_string(),
            "torn tail at byte 7"
        );
        assert_eq!(ScanOutcome::Clean.to_string(), "clean");
    }

    fn arb_kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            1 => Just(EntryKind::Noop),
            3 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 0..4)
                .prop_map(|cs| EntryKind::Commands(cs.into_iter().map(Bytes::from).collect())),
            1 => (
                prop::collection::btree_set(0..8u64, 1..4),
                prop::collection::btree_set(8..16u64, 0..3)
            )
                .prop_map(|(voters, learners)| EntryKind::Config(Membership { voters, learners })),
        ]
    }

    /// A log as Raft writes it: contiguous indexes from `first`, terms that never decrease.
    fn arb_log() -> impl Strategy<Value = (Index, Vec<Entry>)> {
        (
            1..1_000u64,
            1..100u64,
            prop::collection::vec((0..3u64, arb_kind()), 0..12),
        )
            .prop_map(|(first, first_term, steps)| {
                let mut term = first_term;
                let entries = steps
                    .into_iter()
                    .zip(first..)
                    .map(|((bump, kind), index)| {
                        term += bump;
                        Entry { term, index, kind }
                    })
                    .collect();
                (first, entries)
            })
    }

    /// The outcome is consistent with the rest of the scan.
    fn check_invariants(scan: &Scan, bytes: &[u8], synced_len: u64) {
        assert!(scan.valid_len <= bytes.len() as u64);
        match scan.outcome {
            ScanOutcome::Clean => {
                assert_eq!(scan.valid_len, bytes.len() as u64);
                assert!(scan.valid_len >= synced_len);
            }
            ScanOutcome::TornTail { at } => {
                assert_eq!(at, scan.valid_len);
                assert!(at >= synced_len);
            }
            ScanOutcome::Corrupt { at, .. } => {
                assert_eq!(at, scan.valid_len);
                assert!(at < synced_len);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encode_then_scan_is_clean((first, entries) in arb_log(), synced_fraction in 0.0..=1.0f64) {
            let (bytes, _) = encode_all(&entries);
            let synced_len = (bytes.len() as f64 * synced_fraction) as u64;
            let scan = scan(&bytes, synced_len, first);
            prop_assert_eq!(scan.outcome, ScanOutcome::Clean);
            prop_assert_eq!(scan.valid_len, bytes.len() as u64);
            prop_assert_eq!(scan.entries, entries);
        }

        #[test]
        fn any_truncation_recovers_a_prefix((first, entries) in arb_log(), cut_seed in any::<prop::sample::Index>()) {
            let (bytes, ends) = encode_all(&entries);
            let cut = cut_seed.index(bytes.len() + 1);
            let scan = scan(&bytes[..cut], 0, first);
            check_invariants(&scan, &bytes[..cut], 0);
            let whole = ends.iter().take_while(|&&end| end <= cut as u64).count();
            prop_assert_eq!(&scan.entries[..], &entries[..whole]);
            let boundary = if whole == 0 { 0 } else { ends[whole - 1] };
            prop_assert_eq!(scan.valid_len, boundary);
            if boundary == cut as u64 {
                prop_assert_eq!(scan.outcome, ScanOutcome::Clean);
            } else {
                prop_assert_eq!(scan.outcome, ScanOutcome::TornTail { at: boundary });
            }
        }

        #[test]
        fn truncation_past_the_synced_records_is_a_torn_tail(
            (first, entries) in arb_log(),
            synced_seed in any::<prop::sample::Index>(),
            cut_seed in any::<prop::sample::Index>(),
        ) {
            let (bytes, ends) = encode_all(&entries);
            let synced_records = synced_seed.index(entries.len() + 1);
            let synced_len = if synced_records == 0 { 0 } else { ends[synced_records - 1] };
            let cut = synced_len as usize + cut_seed.index(bytes.len() - synced_len as usize + 1);
            let scan = scan(&bytes[..cut], synced_len, first);
            check_invariants(&scan, &bytes[..cut], synced_len);
            let is_corrupt = matches!(scan.outcome, ScanOutcome::Corrupt { .. });
            prop_assert!(!is_corrupt);
            prop_assert!(scan.entries.len() >= synced_records);
            prop_assert!(entries.starts_with(&scan.entries));
        }

        #[test]
        fn any_bit_flip_never_yields_a_wrong_entry(
            (first, entries) in arb_log(),
            flip_seed in any::<prop::sample::Index>(),
            bit in 0..8u8,
            synced_fraction in 0.0..=1.0f64,
        ) {
            let (mut bytes, ends) = encode_all(&entries);
            prop_assume!(!bytes.is_empty());
            let flip = flip_seed.index(bytes.len());
            bytes[flip] ^= 1 << bit;
            let synced_len = (bytes.len() as f64 * synced_fraction) as u64;
            let scan = scan(&bytes, synced_len, first);
            check_invariants(&scan, &bytes, synced_len);
            let flipped_record = ends.iter().take_while(|&&end| end <= flip as u64).count();
            let flipped_start = if flipped_record == 0 { 0 } else { ends[flipped_record - 1] };
            // Detected at the flipped record, or at an earlier one whose length field now
            // points into it; never accepted.
            prop_assert!(scan.outcome != ScanOutcome::Clean);
            prop_assert!(scan.valid_len <= flipped_start);
            prop_assert!(entries.starts_with(&scan.entries));
            if scan.valid_len < synced_len {
                let is_corrupt = matches!(scan.outcome, ScanOutcome::Corrupt { .. });
                prop_assert!(is_corrupt);
            }
        }

        #[test]
        fn bit_flip_in_the_synced_region_is_corrupt(
            (first, entries) in arb_log(),
            flip_seed in any::<prop::sample::Index>(),
            bit in 0..8u8,
        ) {
            let (mut bytes, ends) = encode_all(&entries);
            prop_assume!(!bytes.is_empty());
            let flip = flip_seed.index(bytes.len());
            bytes[flip] ^= 1 << bit;
            let scan = scan(&bytes, bytes.len() as u64, first);
            let flipped_record = ends.iter().take_while(|&&end| end <= flip as u64).count();
            match scan.outcome {
                ScanOutcome::Corrupt { at, index_hint, .. } => {
                    prop_assert!(at as usize <= flip);
                    prop_assert_eq!(index_hint, first + scan.entries.len() as u64);
                    prop_assert!(scan.entries.len() <= flipped_record);
                }
                other => prop_assert!(false, "expected corruption, got {other}"),
            }
            prop_assert!(entries.starts_with(&scan.entries));
        }

        #[test]
        fn garbage_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            synced_len in 0..300u64,
            first in any::<u64>(),
        ) {
            let scan = scan(&bytes, synced_len, first);
            check_invariants(&scan, &bytes, synced_len);
        }

        #[test]
        fn garbage_after_valid_records_never_panics(
            (first, entries) in arb_log(),
            garbage in prop::collection::vec(any::<u8>(), 0..128),
            synced_fraction in 0.0..=1.0f64,
        ) {
            let (mut bytes, _) = encode_all(&entries);
            bytes.extend_from_slice(&garbage);
            let synced_len = (bytes.len() as f64 * synced_fraction) as u64;
            let scan = scan(&bytes, synced_len, first);
            check_invariants(&scan, &bytes, synced_len);
            prop_assert!(scan.entries.starts_with(&entries));
        }
    }

    #[test]
    fn a_configuration_naming_a_node_twice_or_without_a_voter_is_refused() {
        let raw = |voters: &[u64], learners: &[u64]| {
            let mut out = Vec::new();
            for set in [voters, learners] {
                out.extend_from_slice(&(set.len() as u32).to_le_bytes());
                for id in set {
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
            out
        };
        let (good, len) = decode_membership_prefix(&raw(&[1, 2, 3], &[4])).expect("valid");
        assert_eq!(len, 4 + 3 * 8 + 4 + 8);
        assert!(good.is_learner(4) && good.is_voter(3));
        for (voters, learners) in [
            (&[1u64, 2, 3][..], &[3u64][..]),
            (&[1, 1, 2][..], &[][..]),
            (&[1][..], &[4, 4][..]),
            (&[][..], &[4][..]),
        ] {
            let refused = decode_membership_prefix(&raw(voters, learners));
            assert!(
                matches!(refused, Err(PayloadError::MalformedMembership { .. })),
                "{voters:?} {learners:?}: {refused:?}"
            );
        }
    }
}
