//! The snapshot file, and how a log recovered beside a snapshot is read.
//!
//! ```text
//! [magic "HFSN"][crc32c u32 LE][index u64 LE][term u64 LE][len u64 LE][data: len bytes]
//! [magic "HFSM"][crc32c u32 LE][index u64 LE][term u64 LE][len u64 LE][membership][data]
//! ```
//!
//! The second form holds the group's configuration as of the snapshot (`len` then counts the
//! membership's bytes too, see [`crate::storage::encode_membership`]); a snapshot without one
//! is written in the first form, byte for byte as before membership change existed. The
//! checksum covers everything after itself. A snapshot is written whole to a new place and
//! made durable before anything refers to it (the shell: a temporary file, fsync, rename, fsync
//! of the directory), so a torn snapshot is never the latest one a replica relies on: a
//! snapshot that fails its checksum is damage, not a torn tail.

use std::fmt;

use bytes::Bytes;

use crate::raft::{Entry, Index, Snapshot, Term};

pub const SNAPSHOT_MAGIC: [u8; 4] = *b"HFSN";
/// A snapshot file that holds its group's configuration.
pub const SNAPSHOT_MEMBERSHIP_MAGIC: [u8; 4] = *b"HFSM";
pub const SNAPSHOT_HEADER_BYTES: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotFileError {
    /// Fewer bytes than the header, or than the header says the data holds.
    Truncated {
        len_bytes: u64,
        needed_bytes: u64,
    },
    BadMagic,
    ChecksumMismatch {
        stored: u32,
        computed: u32,
    },
    /// Bytes after the data.
    TrailingBytes {
        len_bytes: u64,
    },
    /// The configuration does not decode.
    BadMembership {
        why: String,
    },
}

impl fmt::Display for SnapshotFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotFileError::Truncated {
                len_bytes,
                needed_bytes,
            } => write!(
                f,
                "snapshot file of {len_bytes} bytes is truncated: {needed_bytes} bytes needed"
            ),
            SnapshotFileError::BadMagic => write!(f, "not a snapshot file (bad magic)"),
            SnapshotFileError::ChecksumMismatch { stored, computed } => write!(
                f,
                "snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            SnapshotFileError::TrailingBytes { len_bytes } => {
                write!(f, "{len_bytes} bytes after the snapshot's data")
            }
            SnapshotFileError::BadMembership { why } => {
                write!(f, "the snapshot's configuration does not decode: {why}")
            }
        }
    }
}

impl std::error::Error for SnapshotFileError {}

/// The header to write in front of [`encode_snapshot_membership`] and `snapshot.data`.
pub fn encode_snapshot_header(snapshot: &Snapshot) -> [u8; SNAPSHOT_HEADER_BYTES] {
    let membership = encode_snapshot_membership(snapshot);
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    let magic = match snapshot.membership {
        Some(_) => SNAPSHOT_MEMBERSHIP_MAGIC,
        None => SNAPSHOT_MAGIC,
    };
    header[..4].copy_from_slice(&magic);
    header[8..16].copy_from_slice(&snapshot.index.to_le_bytes());
    header[16..24].copy_from_slice(&snapshot.term.to_le_bytes());
    let len = membership.len() + snapshot.data.len();
    header[24..32].copy_from_slice(&(len as u64).to_le_bytes());
    let crc = crc32c::crc32c(&header[8..]);
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc, &membership), &snapshot.data);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The bytes between the header and the data: the configuration, if the snapshot has one.
pub fn encode_snapshot_membership(snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(membership) = &snapshot.membership {
        crate::storage::encode_membership(membership, &mut out);
    }
    out
}

/// The whole file's bytes (header, membership and data).
pub fn encode_snapshot(snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + snapshot.data.len());
    out.extend_from_slice(&encode_snapshot_header(snapshot));
    out.extend_from_slice(&encode_snapshot_membership(snapshot));
    out.extend_from_slice(&snapshot.data);
    out
}

/// Reads a snapshot file's bytes back; the data is a slice of `bytes`, not a copy.
pub fn decode_snapshot(bytes: Bytes) -> Result<Snapshot, SnapshotFileError> {
    let len_bytes = bytes.len() as u64;
    let truncated = |needed_bytes: u64| SnapshotFileError::Truncated {
        len_bytes,
        needed_bytes,
    };
    let header = bytes
        .get(..SNAPSHOT_HEADER_BYTES)
        .ok_or_else(|| truncated(SNAPSHOT_HEADER_BYTES as u64))?;
    let with_membership = match header[..4].try_into() {
        Ok(SNAPSHOT_MAGIC) => false,
        Ok(SNAPSHOT_MEMBERSHIP_MAGIC) => true,
        _ => return Err(SnapshotFileError::BadMagic),
    };
    let u64_at = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(word)
    };
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&header[4..8]);
    let stored = u32::from_le_bytes(crc);
    let (index, term, data_len) = (u64_at(8), u64_at(16), u64_at(24));
    let needed_bytes = data_len.saturating_add(SNAPSHOT_HEADER_BYTES as u64);
    if len_bytes < needed_bytes {
        return Err(truncated(needed_bytes));
    }
    if len_bytes > needed_bytes {
        return Err(SnapshotFileError::TrailingBytes {
            len_bytes: len_bytes - needed_bytes,
        });
    }
    let data = bytes.slice(SNAPSHOT_HEADER_BYTES..);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&header[8..]), &data);
    if computed != stored {
        return Err(SnapshotFileError::ChecksumMismatch { stored, computed });
    }
    let (membership, data) = if with_membership {
        let (membership, len) = crate::storage::decode_membership_prefix(&data)
            .map_err(|e| SnapshotFileError::BadMembership { why: e.to_string() })?;
        (Some(membership), data.slice(len..))
    } else {
        (None, data)
    };
    Ok(Snapshot {
        index,
        term,
        data,
        membership,
    })
}

/// The log found beside a snapshot is not contiguous with it: records the snapshot does not
/// stand for are missing (lost segments), which is damage from `expected`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogGap {
    pub expected: Index,
    pub found: Index,
}

impl fmt::Display for LogGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the log starts at index {} but index {} is the first the snapshot does not hold",
            self.found, self.expected
        )
    }
}

impl std::error::Error for LogGap {}

/// Which recovered log entries (contiguous, as a scan returns them) continue the snapshot at
/// `(index, term)` (`None` without a snapshot), following the order of [`crate::raft::Write`]:
///
/// - entries at or below the snapshot's index are dropped (the driver removes them lazily);
/// - the rest are kept if the log holds the snapshot's own entry `(index, term)`, or starts
///   right after it (written after the snapshot, or the older entries were removed);
/// - otherwise the log is one that an installed snapshot replaced but whose removal a crash
///   interrupted (`Write::discard_log` drops it newest first, so what is left is a prefix of
///   the old log, which never starts right after the snapshot): none of it is kept;
/// - a log that starts above `index + 1` misses entries: [`LogGap`].
pub fn log_after_snapshot(
    snapshot: Option<(Index, Term)>,
    entries: Vec<Entry>,
) -> Result<Vec<Entry>, LogGap> {
    let (index, term) = snapshot.unwrap_or((0, 0));
    let Some(first) = entries.first().map(|e| e.index) else {
        return Ok(entries);
    };
    if first > index + 1 {
        return Err(LogGap {
            expected: index + 1,
            found: first,
        });
    }
    if first == index + 1 {
        return Ok(entries);
    }
    let at = usize::try_from(index - first).unwrap_or(usize::MAX);
    match entries.get(at) {
        Some(entry) if entry.index == index && entry.term == term => {
            Ok(entries.into_iter().skip(at + 1).collect())
        }
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryKind;

    fn entry(index: Index, term: Term) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Noop,
        }
    }

    fn log(first: Index, terms: &[Term]) -> Vec<Entry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, t)| entry(first + i as Index, *t))
            .collect()
    }

    #[test]
    fn snapshot_file_round_trips_and_refuses_damage() {
        let snapshot = Snapshot {
            index: 42,
            term: 7,
            data: Bytes::from_static(b"state machine bytes"),
            membership: None,
        };
        let bytes = encode_snapshot(&snapshot);
        assert_eq!(decode_snapshot(Bytes::from(bytes.clone())), Ok(snapshot));
        for cut in 0..bytes.len() {
            let err = decode_snapshot(Bytes::copy_from_slice(&bytes[..cut]));
            assert!(
                matches!(err, Err(SnapshotFileError::Truncated { .. })),
                "cut {cut}"
            );
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_snapshot(Bytes::from(flipped)).is_err(), "bit {bit}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode_snapshot(Bytes::from(longer)),
            Err(SnapshotFileError::TrailingBytes { len_bytes: 1 })
        );
    }

    #[test]
    fn log_beside_a_snapshot() {
        // No snapshot: the log must start at 1.
        assert_eq!(
            log_after_snapshot(None, log(1, &[1, 1])),
            Ok(log(1, &[1, 1]))
        );
        assert_eq!(
            log_after_snapshot(None, log(3, &[1])),
            Err(LogGap {
                expected: 1,
                found: 3
            })
        );
        // A local compaction whose old segments are not removed yet.
        assert_eq!(
            log_after_snapshot(Some((3, 2)), log(1, &[1, 2, 2, 3, 3])),
            Ok(log(4, &[3, 3]))
        );
        // Written after the snapshot, or the old segments are gone.
        assert_eq!(
            log_after_snapshot(Some((3, 2)), log(4, &[3])),
            Ok(log(4, &[3]))
        );
        // An installed snapshot replaced a conflicting log; the crash came before its removal.
        assert_eq!(
            log_after_snapshot(Some((3, 4)), log(1, &[1, 2, 2, 3, 3])),
            Ok(Vec::new())
        );
        // An old log that ends below the snapshot adds nothing.
        assert_eq!(
            log_after_snapshot(Some((9, 4)), log(1, &[1, 2])),
            Ok(Vec::new())
        );
        assert_eq!(
            log_after_snapshot(Some((3, 2)), log(6, &[3])),
            Err(LogGap {
                expected: 4,
                found: 6
            })
        );
    }
}
