//! The hard-state file: term, vote and commit in two alternating slots.
//!
//! A write overwrites only the slot that does not hold the newest copy, so a torn write can
//! damage at most the copy being written while the previous one stays intact. Each slot
//! carries a sequence number; the valid slot with the highest one wins. Sequence `s` always
//! lives in slot `s % 2`, so two valid slots can never tie.
//!
//! Slot layout (little-endian, [`SLOT_BYTES`] bytes):
//!
//! ```text
//!  0..4   magic "HFHS"
//!  4      version (1)
//!  5      vote flag (0 = no vote, 1 = vote holds a node id)
//!  6..8   reserved, zero
//!  8..16  sequence
//! 16..24  term
//! 24..32  vote (zero without a vote)
//! 32..40  commit
//! 40..60  reserved, zero
//! 60..64  crc32c of bytes 0..60
//! ```

use std::fmt;

use crate::raft::{HardState, NodeId};

pub const SLOT_BYTES: usize = 64;
/// The whole file: two slots.
pub const STATE_BYTES: usize = 2 * SLOT_BYTES;

const MAGIC: [u8; 4] = *b"HFHS";
const VERSION: u8 = 1;
const VOTE_NONE: u8 = 0;
const VOTE_SOME: u8 = 1;
const CRC_AT: usize = SLOT_BYTES - 4;
const SEQUENCE_AT: usize = 8;
const TERM_AT: usize = 16;
const VOTE_AT: usize = 24;
const COMMIT_AT: usize = 32;
const FIELDS_END: usize = 40;

/// A decoded hard state with the sequence number of the slot it came from; the next write
/// uses `sequence + 1` in slot [`next_slot`]`(sequence)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredState {
    pub sequence: u64,
    pub hard_state: HardState,
}

/// Why one slot does not hold a valid hard state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotError {
    /// The usual result of a torn write.
    Checksum {
        stored: u32,
        computed: u32,
    },
    BadMagic,
    UnsupportedVersion {
        version: u8,
    },
    BadVoteFlag {
        flag: u8,
    },
    /// Reserved bytes, or the vote field without a vote, are not zero.
    NonZeroReserved,
    /// The slot holds a sequence that belongs in the other slot: a misdirected write.
    WrongSlot {
        sequence: u64,
    },
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotError::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            SlotError::BadMagic => write!(f, "not a hard-state slot (bad magic)"),
            SlotError::UnsupportedVersion { version } => {
                write!(f, "unsupported hard-state version {version}")
            }
            SlotError::BadVoteFlag { flag } => write!(f, "invalid vote flag {flag}"),
            SlotError::NonZeroReserved => write!(f, "reserved bytes are not zero"),
            SlotError::WrongSlot { sequence } => {
                write!(f, "sequence {sequence} belongs in the other slot")
            }
        }
    }
}

impl std::error::Error for SlotError {}

/// Why the hard-state file cannot be trusted. Each one means the replica must not start:
/// guessing could forget a vote and let it vote twice in one term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Longer than [`STATE_BYTES`]: not a file this code wrote.
    TooLong { len_bytes: usize },
    /// Neither slot is empty and neither is valid: more than one torn write, or corruption.
    BothSlotsInvalid { first: SlotError, second: SlotError },
    /// A slot with a correct checksum was written by a newer format; falling back to the
    /// other slot would silently roll the state back.
    UnsupportedVersion { slot: usize, version: u8 },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::TooLong { len_bytes } => write!(
                f,
                "hard-state file is {len_bytes} bytes, longer than {STATE_BYTES}"
            ),
            StateError::BothSlotsInvalid { first, second } => write!(
                f,
                "both hard-state slots are invalid (slot 0: {first}; slot 1: {second})"
            ),
            StateError::UnsupportedVersion { slot, version } => {
                write!(
                    f,
                    "hard-state slot {slot} has unsupported version {version}"
                )
            }
        }
    }
}

impl std::error::Error for StateError {}

/// The slot that holds sequence `sequence`.
pub fn slot_of(sequence: u64) -> usize {
    usize::from(sequence % 2 == 1)
}

/// The slot to overwrite next when the newest valid copy has `current_sequence` (0 for a
/// fresh file): always the other one. The write carries sequence `current_sequence + 1`.
pub fn next_slot(current_sequence: u64) -> usize {
    1 - slot_of(current_sequence)
}

/// The bytes of one slot; the caller writes them at offset `slot_of(sequence) * SLOT_BYTES`.
pub fn encode_state_slot(sequence: u64, hard_state: &HardState) -> [u8; SLOT_BYTES] {
    let mut slot = [0; SLOT_BYTES];
    let (flag, vote) = match hard_state.vote {
        None => (VOTE_NONE, 0u64),
        Some(node) => (VOTE_SOME, node),
    };
    put(&mut slot, 0, &MAGIC);
    put(&mut slot, 4, &[VERSION, flag]);
    put(&mut slot, SEQUENCE_AT, &sequence.to_le_bytes());
    put(&mut slot, TERM_AT, &hard_state.term.to_le_bytes());
    put(&mut slot, VOTE_AT, &vote.to_le_bytes());
    put(&mut slot, COMMIT_AT, &hard_state.commit.to_le_bytes());
    let crc = crc32c::crc32c(slot.get(..CRC_AT).unwrap_or_default());
    put(&mut slot, CRC_AT, &crc.to_le_bytes());
    slot
}

/// The newest hard state in the file, or `None` for a fresh (empty or all-zero) file.
pub fn decode_state(bytes: &[u8]) -> Result<Option<HardState>, StateError> {
    Ok(decode_stored_state(bytes)?.map(|stored| stored.hard_state))
}

/// Like [`decode_state`], with the sequence number the next write must follow.
///
/// A file shorter than [`STATE_BYTES`] reads as if zero-padded: a first write can extend a
/// fresh file and be torn. One empty slot beside an invalid one is read as the empty state,
/// because that is what a torn first write leaves; the price is that damage to the only copy
/// before the second write ever lands also reads as fresh.
pub fn decode_stored_state(bytes: &[u8]) -> Result<Option<StoredState>, StateError> {
    if bytes.len() > STATE_BYTES {
        return Err(StateError::TooLong {
            len_bytes: bytes.len(),
        });
    }
    let mut file = [0; STATE_BYTES];
    put(&mut file, 0, bytes);
    let (first, second) = file.split_at(SLOT_BYTES);
    let slots = [decode_slot(0, first), decode_slot(1, second)];
    for (slot, content) in slots.iter().enumerate() {
        if let Slot::Invalid(SlotError::UnsupportedVersion { version }) = content {
            return Err(StateError::UnsupportedVersion {
                slot,
                version: *version,
            });
        }
    }
    match slots {
        [Slot::Valid(a), Slot::Valid(b)] => Ok(Some(if a.sequence > b.sequence { a } else { b })),
        [Slot::Valid(only), _] | [_, Slot::Valid(only)] => Ok(Some(only)),
        [Slot::Invalid(first), Slot::Invalid(second)] => {
            Err(StateError::BothSlotsInvalid { first, second })
        }
        [Slot::Empty, _] | [_, Slot::Empty] => Ok(None),
    }
}

enum Slot {
    Empty,
    Valid(StoredState),
    Invalid(SlotError),
}

fn decode_slot(slot: usize, bytes: &[u8]) -> Slot {
    if bytes.iter().all(|&b| b == 0) {
        return Slot::Empty;
    }
    match check_slot(slot, bytes) {
        Ok(stored) => Slot::Valid(stored),
        Err(e) => Slot::Invalid(e),
    }
}

fn check_slot(slot: usize, bytes: &[u8]) -> Result<StoredState, SlotError> {
    let stored = u32::from_le_bytes(field(bytes, CRC_AT));
    let computed = crc32c::crc32c(bytes.get(..CRC_AT).unwrap_or_default());
    // The checksum comes first: every later check then speaks about bytes that were
    // written whole, so a torn write always reports as one.
    if stored != computed {
        return Err(SlotError::Checksum { stored, computed });
    }
    if field::<4>(bytes, 0) != MAGIC {
        return Err(SlotError::BadMagic);
    }
    let [version, flag] = field(bytes, 4);
    if version != VERSION {
        return Err(SlotError::UnsupportedVersion { version });
    }
    let sequence = u64::from_le_bytes(field(bytes, SEQUENCE_AT));
    let term = u64::from_le_bytes(field(bytes, TERM_AT));
    let vote: NodeId = u64::from_le_bytes(field(bytes, VOTE_AT));
    let commit = u64::from_le_bytes(field(bytes, COMMIT_AT));
    let vote = match flag {
        VOTE_NONE if vote == 0 => None,
        VOTE_NONE => return Err(SlotError::NonZeroReserved),
        VOTE_SOME => Some(vote),
        flag => return Err(SlotError::BadVoteFlag { flag }),
    };
    let reserved_zero = field::<2>(bytes, 6) == [0; 2]
        && bytes
            .get(FIELDS_END..CRC_AT)
            .is_some_and(|r| r.iter().all(|&b| b == 0));
    if !reserved_zero {
        return Err(SlotError::NonZeroReserved);
    }
    if slot_of(sequence) != slot {
        return Err(SlotError::WrongSlot { sequence });
    }
    Ok(StoredState {
        sequence,
        hard_state: HardState { term, vote, commit },
    })
}

/// Copies `src` into `dst` at `at`; callers only pass ranges that fit.
fn put(dst: &mut [u8], at: usize, src: &[u8]) {
    if let Some(range) = dst.get_mut(at..at.saturating_add(src.len())) {
        range.copy_from_slice(src);
    }
}

/// `N` bytes of `bytes` at `at`, zeros if out of range; callers only pass ranges that fit.
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    bytes
        .get(at..at.saturating_add(N))
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; N])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hs(term: u64, vote: Option<NodeId>, commit: u64) -> HardState {
        HardState { term, vote, commit }
    }

    /// Applies one write to `file` the way the shell will: the next sequence into the slot
    /// `next_slot` names.
    fn write(file: &mut [u8; STATE_BYTES], hard_state: &HardState) -> StoredState {
        let current = decode_stored_state(file)
            .expect("file is valid")
            .map_or(0, |s| s.sequence);
        let sequence = current + 1;
        let slot = next_slot(current);
        assert_eq!(slot, slot_of(sequence));
        let at = slot * SLOT_BYTES;
        file[at..at + SLOT_BYTES].copy_from_slice(&encode_state_slot(sequence, hard_state));
        StoredState {
            sequence,
            hard_state: *hard_state,
        }
    }

    /// A slot whose checksum is right around arbitrary content, to reach later checks.
    fn resealed(mut slot: [u8; SLOT_BYTES]) -> [u8; SLOT_BYTES] {
        let crc = crc32c::crc32c(&slot[..CRC_AT]);
        slot[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        slot
    }

    fn file_with(slot: usize, bytes: &[u8; SLOT_BYTES]) -> [u8; STATE_BYTES] {
        let mut file = [0; STATE_BYTES];
        file[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES].copy_from_slice(bytes);
        file
    }

    #[test]
    fn fresh_files_decode_to_none() {
        assert_eq!(decode_state(&[]), Ok(None));
        assert_eq!(decode_state(&[0; SLOT_BYTES]), Ok(None));
        assert_eq!(decode_state(&[0; STATE_BYTES]), Ok(None));
    }

    #[test]
    fn slot_layout() {
        let slot = encode_state_slot(5, &hs(7, Some(3), 4));
        assert_eq!(&slot[0..4], b"HFHS");
        assert_eq!(slot[4..8], [VERSION, VOTE_SOME, 0, 0]);
        assert_eq!(slot[8..16], 5u64.to_le_bytes());
        assert_eq!(slot[16..24], 7u64.to_le_bytes());
        assert_eq!(slot[24..32], 3u64.to_le_bytes());
        assert_eq!(slot[32..40], 4u64.to_le_bytes());
        assert!(slot[40..60].iter().all(|&b| b == 0));
        assert_eq!(slot[60..64], crc32c::crc32c(&slot[..60]).to_le_bytes());
    }

    #[test]
    fn writes_alternate_and_the_newest_wins() {
        let mut file = [0; STATE_BYTES];
        let states = [
            hs(1, None, 0),
            hs(1, Some(2), 0),
            hs(2, Some(0), 5),
            hs(3, None, 9),
            hs(u64::MAX, Some(u64::MAX), u64::MAX),
        ];
        let mut slots = Vec::new();
        for state in &states {
            let stored = write(&mut file, state);
            slots.push(slot_of(stored.sequence));
            assert_eq!(decode_stored_state(&file), Ok(Some(stored)));
            assert_eq!(decode_state(&file), Ok(Some(*state)));
        }
        assert_eq!(slots, [1, 0, 1, 0, 1]);
    }

    #[test]
    fn first_write_into_a_short_file() {
        // Only slot 1's bytes follow a hole: the file was never preallocated.
        let mut file = vec![0; SLOT_BYTES];
        file.extend_from_slice(&encode_state_slot(1, &hs(4, Some(1), 2)));
        assert_eq!(decode_state(&file), Ok(Some(hs(4, Some(1), 2))));
        file.truncate(SLOT_BYTES + 10);
        assert_eq!(decode_state(&file), Ok(None));
    }

    #[test]
    fn too_long_is_refused() {
        assert_eq!(
            decode_state(&[0; STATE_BYTES + 1]),
            Err(StateError::TooLong {
                len_bytes: STATE_BYTES + 1
            })
        );
    }

    #[test]
    fn both_slots_invalid_is_refused() {
        let mut file = [0; STATE_BYTES];
        write(&mut file, &hs(1, Some(1), 0));
        write(&mut file, &hs(2, Some(2), 0));
        file[20] ^= 1;
        file[SLOT_BYTES + 20] ^= 1;
        let err = decode_state(&file).unwrap_err();
        assert!(matches!(
            err,
            StateError::BothSlotsInvalid {
                first: SlotError::Checksum { .. },
                second: SlotError::Checksum { .. },
            }
        ));
        assert!(
            err.to_string()
                .starts_with("both hard-state slots are invalid")
        );
    }

    #[test]
    fn one_damaged_slot_falls_back_to_the_other() {
        let mut file = [0; STATE_BYTES];
        write(&mut file, &hs(1, Some(1), 0));
        write(&mut file, &hs(2, Some(2), 0));
        file[SLOT_BYTES - 1] ^= 0x80; // slot 0 holds sequence 2
        assert_eq!(decode_state(&file), Ok(Some(hs(1, Some(1), 0))));
    }

    #[test]
    fn future_version_is_refused_not_skipped() {
        let mut file = [0; STATE_BYTES];
        write(&mut file, &hs(1, Some(1), 0));
        let mut newer = encode_state_slot(2, &hs(2, None, 0));
        newer[4] = 2;
        file[..SLOT_BYTES].copy_from_slice(&resealed(newer));
        assert_eq!(
            decode_state(&file),
            Err(StateError::UnsupportedVersion {
                slot: 0,
                version: 2
            })
        );
    }

    #[test]
    fn malformed_slots_are_invalid() {
        let good = encode_state_slot(1, &hs(3, None, 1));
        let mut cases = Vec::new();
        let mut magic = good;
        magic[0] = b'X';
        cases.push((magic, SlotError::BadMagic));
        let mut flag = good;
        flag[5] = 7;
        cases.push((flag, SlotError::BadVoteFlag { flag: 7 }));
        let mut stray_vote = good;
        stray_vote[VOTE_AT] = 1;
        cases.push((stray_vote, SlotError::NonZeroReserved));
        let mut reserved = good;
        reserved[50] = 1;
        cases.push((reserved, SlotError::NonZeroReserved));
        let mut reserved_header = good;
        reserved_header[6] = 1;
        cases.push((reserved_header, SlotError::NonZeroReserved));
        for (bytes, expected) in cases {
            let bytes = resealed(bytes);
            assert_eq!(check_slot(1, &bytes), Err(expected));
            // Beside a damaged copy of the same slot shape, the file is refused.
            let mut file = file_with(1, &bytes);
            file[..SLOT_BYTES].copy_from_slice(&bytes);
            assert!(matches!(
                decode_state(&file),
                Err(StateError::BothSlotsInvalid { .. })
            ));
        }
    }

    #[test]
    fn sequence_in_the_wrong_slot_is_invalid() {
        let slot = encode_state_slot(2, &hs(1, None, 0));
        assert_eq!(
            check_slot(1, &slot),
            Err(SlotError::WrongSlot { sequence: 2 })
        );
        let mut file = file_with(1, &slot);
        file[..SLOT_BYTES].copy_from_slice(&encode_state_slot(4, &hs(9, None, 0)));
        assert_eq!(decode_state(&file), Ok(Some(hs(9, None, 0))));
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            StateError::UnsupportedVersion {
                slot: 1,
                version: 3
            }
            .to_string(),
            "hard-state slot 1 has unsupported version 3"
        );
        assert_eq!(
            SlotError::WrongSlot { sequence: 4 }.to_string(),
            "sequence 4 belongs in the other slot"
        );
    }

    fn arb_hard_state() -> impl Strategy<Value = HardState> {
        (any::<u64>(), any::<Option<u64>>(), any::<u64>())
            .prop_map(|(term, vote, commit)| HardState { term, vote, commit })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_write_decodes_to_itself(states in prop::collection::vec(arb_hard_state(), 1..8)) {
            let mut file = [0; STATE_BYTES];
            for state in &states {
                let stored = write(&mut file, state);
                prop_assert_eq!(decode_stored_state(&file), Ok(Some(stored)));
            }
        }

        #[test]
        fn torn_write_keeps_the_old_or_the_new_state(
            history in prop::collection::vec(arb_hard_state(), 0..6),
            new in arb_hard_state(),
            written_bytes in 0..=SLOT_BYTES,
        ) {
            let mut file = [0; STATE_BYTES];
            for state in &history {
                write(&mut file, state);
            }
            let old = decode_state(&file).unwrap();
            let current = decode_stored_state(&file).unwrap().map_or(0, |s| s.sequence);
            let at = next_slot(current) * SLOT_BYTES;
            let slot = encode_state_slot(current + 1, &new);
            file[at..at + written_bytes].copy_from_slice(&slot[..written_bytes]);
            let decoded = decode_state(&file);
            prop_assert!(
                decoded == Ok(old) || decoded == Ok(Some(new)),
                "decoded {:?}, old {:?}, new {:?}", decoded, old, new
            );
            if written_bytes == SLOT_BYTES {
                prop_assert_eq!(decoded, Ok(Some(new)));
            }
        }

        #[test]
        fn any_byte_mix_of_a_write_keeps_the_old_or_the_new_state(
            history in prop::collection::vec(arb_hard_state(), 0..6),
            new in arb_hard_state(),
            written in prop::collection::vec(any::<bool>(), SLOT_BYTES),
        ) {
            // Disks may persist the sectors of one write in any order.
            let mut file = [0; STATE_BYTES];
            for state in &history {
                write(&mut file, state);
            }
            let old = decode_state(&file).unwrap();
            let current = decode_stored_state(&file).unwrap().map_or(0, |s| s.sequence);
            let at = next_slot(current) * SLOT_BYTES;
            let slot = encode_state_slot(current + 1, &new);
            for (i, _) in written.iter().enumerate().filter(|(_, w)| **w) {
                file[at + i] = slot[i];
            }
            let decoded = decode_state(&file);
            prop_assert!(decoded == Ok(old) || decoded == Ok(Some(new)));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..=STATE_BYTES + 8)) {
            let _ = decode_stored_state(&bytes);
        }

        #[test]
        fn garbage_beside_a_valid_slot_is_ignored(
            state in arb_hard_state(),
            sequence in any::<u64>(),
            garbage in prop::collection::vec(any::<u8>(), SLOT_BYTES),
        ) {
            let slot = slot_of(sequence);
            let mut file = file_with(slot, &encode_state_slot(sequence, &state));
            let other = (1 - slot) * SLOT_BYTES;
            file[other..other + SLOT_BYTES].copy_from_slice(&garbage);
            // Random bytes pass the checksum with probability 2^-32.
            prop_assert_eq!(decode_state(&file), Ok(Some(state)));
        }
    }
}
