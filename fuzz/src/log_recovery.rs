//! The `log_recovery` target: the storage format's recovery over arbitrary and damaged bytes.
//!
//! [`scan`] reads whatever a crash, a bad disk or a stray write left in a log segment, and
//! [`decode_stored_state`] the hard-state file. Five kinds of input: raw bytes; records with
//! correct lengths and checksums around fuzzer-chosen bodies (to reach the checks behind the
//! checksum); a log encoded from arbitrary entries, then truncated, bit-flipped and
//! zero-filled; a raw hard-state file; a hard-state file written through its protocol
//! with the last write torn; a snapshot file, raw or encoded then damaged; and a recovered log
//! beside a snapshot, through `log_after_snapshot`.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use holdfast_core::raft::{Entry, EntryKind, HardState, Index, Snapshot, Term};
use holdfast_core::storage::{
    SLOT_BYTES, STATE_BYTES, Scan, ScanOutcome, StateError, StoredState, decode_snapshot,
    decode_state, decode_stored_state, encode_entry, encode_snapshot, encode_state_slot,
    log_after_snapshot, next_slot, scan, slot_of,
};

/// More records or damages than this in one input are ignored.
const RECORDS_MAX: usize = 64;
const DAMAGES_MAX: usize = 8;

#[derive(Arbitrary, Debug)]
enum Input {
    Raw {
        synced_len: u16,
        first_index: u64,
        cut: u16,
        bytes: Vec<u8>,
    },
    Sealed {
        synced_len: u16,
        first_index: FirstIndex,
        cut: u16,
        records: Vec<SealedRecord>,
    },
    Damaged {
        first_index: FirstIndex,
        first_term: u8,
        synced: Synced,
        damages: Vec<Damage>,
        entries: Vec<EntrySeed>,
    },
    State {
        bytes: Vec<u8>,
    },
    TornState {
        history: Vec<ArbitraryHardState>,
        new: ArbitraryHardState,
        /// Which bytes of the torn write reached the disk.
        written: [bool; SLOT_BYTES],
        /// The file is cut to this length (`% (STATE_BYTES + 1)`) after the write, if set.
        cut: Option<u8>,
    },
    SnapshotRaw {
        bytes: Vec<u8>,
    },
    SnapshotDamaged {
        index: u64,
        term: u64,
        data: Vec<u8>,
        damages: Vec<Damage>,
    },
    BesideSnapshot {
        /// `(index, term)` of the snapshot, if any.
        snapshot: Option<(u8, u8)>,
        first_index: u8,
        terms: Vec<u8>,
    },
}

/// Small first indexes are the common case; the largest ones reach index overflow.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum FirstIndex {
    Small(u8),
    NearMax(u8),
    Any(u64),
}

impl FirstIndex {
    fn get(self) -> Index {
        match self {
            FirstIndex::Small(i) => Index::from(i),
            FirstIndex::NearMax(i) => Index::MAX - Index::from(i % 8),
            FirstIndex::Any(i) => i,
        }
    }
}

/// A record whose length and checksum are right, around a chosen body.
#[derive(Arbitrary, Debug)]
struct SealedRecord {
    /// `None`: the index the scan expects next.
    index: Option<u64>,
    term: TermStep,
    payload: Payload,
}

#[derive(Arbitrary, Debug)]
enum TermStep {
    Same,
    Up(u8),
    Down(u8),
    Exactly(u64),
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Noop,
    Commands(Vec<Vec<u8>>),
    /// Anything after index and term: unknown kinds, lying counts and lengths, trailing bytes.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Synced {
    /// Synced up to the end of this many of the original records (modulo their number + 1).
    Records(u8),
    Bytes(u16),
}

#[derive(Arbitrary, Debug)]
enum Damage {
    /// The region ends at this byte (modulo its length + 1).
    Truncate(u16),
    FlipBit {
        at: u16,
        bit: u8,
    },
    /// Bytes that never reached the disk read back as zeros.
    Zero {
        at: u16,
        len: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct EntrySeed {
    /// `% 3`: how much the term rises from the previous entry.
    term_step: u8,
    /// `None`: a Noop.
    commands: Option<Vec<Vec<u8>>>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct ArbitraryHardState {
    term: u64,
    vote: Option<u64>,
    commit: u64,
}

impl From<ArbitraryHardState> for HardState {
    fn from(s: ArbitraryHardState) -> HardState {
        HardState {
            term: s.term,
            vote: s.vote,
            commit: s.commit,
        }
    }
}

impl Damage {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match *self {
            Damage::Truncate(at) => bytes.truncate(usize::from(at) % (bytes.len() + 1)),
            Damage::FlipBit { at, bit } => {
                if !bytes.is_empty() {
                    let at = usize::from(at) % bytes.len();
                    bytes[at] ^= 1 << (bit % 8);
                }
            }
            Damage::Zero { at, len } => {
                let from = usize::from(at).min(bytes.len());
                let to = (from + usize::from(len)).min(bytes.len());
                bytes[from..to].fill(0);
            }
        }
    }
}

/// What one run reached; used by the corpus test to show the corpus is not trivial.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub entries: usize,
    pub clean: usize,
    pub torn: usize,
    pub corrupt: usize,
    pub damaged_logs: usize,
    pub states_decoded: usize,
    pub states_refused: usize,
    pub snapshots_decoded: usize,
    pub snapshots_refused: usize,
    /// Logs beside a snapshot of which `log_after_snapshot` kept some entries.
    pub logs_kept_beside_snapshot: usize,
}

impl LogStats {
    fn count(&mut self, scan: &Scan) {
        self.entries += scan.entries.len();
        match scan.outcome {
            ScanOutcome::Clean => self.clean += 1,
            ScanOutcome::TornTail { .. } => self.torn += 1,
            ScanOutcome::Corrupt { .. } => self.corrupt += 1,
        }
    }
}

fn encoded(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    encode_entry(entry, &mut out).expect("fuzz-sized entries encode");
    out
}

/// Scans `bytes` and checks everything that holds whatever the bytes are:
///
/// - the valid prefix re-encodes with [`encode_entry`] to exactly `bytes[..valid_len]`;
/// - the entries are contiguous from `first_index`, with terms that never decrease;
/// - the outcome agrees with `synced_len`: `Clean` only for a whole region at least
///   `synced_len` long, `TornTail` only at or after `synced_len`, `Corrupt` only before it,
///   each at `valid_len`, and `Corrupt` names the first index to repair;
/// - `synced_len` changes only the outcome, never what is read;
/// - the scan of any prefix `bytes[..cut]` reads exactly the records that end within it.
fn checked_scan(bytes: &[u8], synced_len: u64, first_index: Index, cut: usize) -> Scan {
    let result = scan(bytes, synced_len, first_index);
    let len = bytes.len() as u64;
    assert!(result.valid_len <= len);

    let mut ends = Vec::with_capacity(result.entries.len());
    let mut reencoded = Vec::new();
    for (i, entry) in result.entries.iter().enumerate() {
        assert_eq!(
            Some(entry.index),
            first_index.checked_add(i as Index),
            "entries are not contiguous from the first index"
        );
        if let Some(previous) = i.checked_sub(1).and_then(|p| result.entries.get(p)) {
            assert!(entry.term >= previous.term, "the term decreases");
        }
        encode_entry(entry, &mut reencoded).expect("a scanned entry re-encodes");
        ends.push(reencoded.len());
    }
    assert_eq!(
        &reencoded[..],
        bytes.get(..result.valid_len as usize).unwrap_or_default(),
        "the valid prefix does not re-encode to its own bytes"
    );

    let next_index = match result.entries.last() {
        None => Some(first_index),
        Some(last) => last.index.checked_add(1),
    };
    match result.outcome {
        ScanOutcome::Clean => {
            assert_eq!(result.valid_len, len, "clean but not whole");
            assert!(len >= synced_len, "clean but shorter than synced");
        }
        ScanOutcome::TornTail { at } => {
            assert_eq!(at, result.valid_len);
            assert!(at >= synced_len, "a torn tail inside the synced region");
            assert!(at < len, "a torn tail at the end of the region");
        }
        ScanOutcome::Corrupt { at, index_hint, .. } => {
            assert_eq!(at, result.valid_len);
            assert!(
                at < synced_len,
                "corruption reported after the synced region"
            );
            assert_eq!(index_hint, next_index.unwrap_or(Index::MAX));
        }
    }

    let unsynced = scan(bytes, 0, first_index);
    assert_eq!(
        (&unsynced.entries, unsynced.valid_len),
        (&result.entries, result.valid_len),
        "the synced length changed what was read"
    );
    assert!(!matches!(unsynced.outcome, ScanOutcome::Corrupt { .. }));

    let cut = cut.min(bytes.len());
    let prefix = scan(bytes.get(..cut).unwrap_or_default(), 0, first_index);
    let whole = ends.iter().take_while(|&&end| end <= cut).count();
    assert_eq!(
        prefix.entries,
        result.entries[..whole],
        "a prefix of the region reads other records"
    );
    result
}

fn run_sealed(synced_len: u16, first_index: Index, cut: u16, records: Vec<SealedRecord>) -> Scan {
    let mut bytes = Vec::new();
    let mut index = first_index;
    let mut term: Term = 1;
    for record in records.into_iter().take(RECORDS_MAX) {
        let record_index = record.index.unwrap_or(index);
        term = match record.term {
            TermStep::Same => term,
            TermStep::Up(by) => term.saturating_add(Term::from(by)),
            TermStep::Down(by) => term.saturating_sub(Term::from(by)),
            TermStep::Exactly(t) => t,
        };
        let mut body = Vec::new();
        body.extend_from_slice(&record_index.to_le_bytes());
        body.extend_from_slice(&term.to_le_bytes());
        match record.payload {
            Payload::Noop => body.push(0),
            Payload::Commands(commands) => {
                body.push(1);
                body.extend_from_slice(&(commands.len() as u32).to_le_bytes());
                for command in commands {
                    body.extend_from_slice(&(command.len() as u32).to_le_bytes());
                    body.extend_from_slice(&command);
                }
            }
            Payload::Raw(raw) => body.extend_from_slice(&raw),
        }
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        index = record_index.wrapping_add(1);
    }
    checked_scan(&bytes, u64::from(synced_len), first_index, usize::from(cut))
}

/// Encodes a log, damages it, and checks that recovery reads exactly the records before the
/// first damaged byte: never a misread entry, never a lost intact one.
fn run_damaged(
    first_index: Index,
    first_term: u8,
    synced: Synced,
    damages: Vec<Damage>,
    seeds: Vec<EntrySeed>,
) -> Scan {
    let mut term = Term::from(first_term);
    let originals: Vec<Entry> = seeds
        .into_iter()
        .take(RECORDS_MAX)
        .zip(0..)
        .map_while(|(seed, i)| {
            term += Term::from(seed.term_step % 3);
            Some(Entry {
                term,
                index: first_index.checked_add(i)?,
                kind: match seed.commands {
                    None => EntryKind::Noop,
                    Some(commands) => {
                        EntryKind::Commands(commands.into_iter().map(Bytes::from).collect())
                    }
                },
            })
        })
        .collect();
    let mut original = Vec::new();
    let mut ends = Vec::new();
    for entry in &originals {
        original.extend_from_slice(&encoded(entry));
        ends.push(original.len());
    }
    let synced_len = match synced {
        Synced::Records(n) => {
            let n = usize::from(n) % (ends.len() + 1);
            n.checked_sub(1).map_or(0, |last| ends[last]) as u64
        }
        Synced::Bytes(n) => u64::from(n),
    };

    let mut bytes = original.clone();
    for damage in damages.into_iter().take(DAMAGES_MAX) {
        damage.apply(&mut bytes);
    }
    let first_difference = bytes
        .iter()
        .zip(&original)
        .position(|(a, b)| a != b)
        .unwrap_or(bytes.len());
    let intact = ends
        .iter()
        .take_while(|&&end| end <= first_difference)
        .count();

    let result = checked_scan(&bytes, synced_len, first_index, first_difference);
    // A damaged record passes its checksum with probability 2^-32.
    assert_eq!(
        result.entries,
        originals[..intact],
        "recovery of a damaged log read other than its intact records \
         (first damaged byte {first_difference}, {} bytes left)",
        bytes.len()
    );
    result
}

/// Checks what holds for any hard-state file:
///
/// - longer than [`STATE_BYTES`] is refused as too long, and nothing else is;
/// - a decoded state is exactly what [`encode_state_slot`] writes in its slot, and the other
///   slot holds no valid state with a higher sequence;
/// - "fresh" (`None`) only with an empty slot and no valid one; both slots invalid only when
///   neither is empty.
fn checked_state(bytes: &[u8]) -> Result<Option<StoredState>, StateError> {
    let stored = decode_stored_state(bytes);
    assert_eq!(decode_state(bytes), stored.map(|s| s.map(|s| s.hard_state)));
    if bytes.len() > STATE_BYTES {
        assert_eq!(
            stored,
            Err(StateError::TooLong {
                len_bytes: bytes.len()
            })
        );
        return stored;
    }
    let mut file = [0u8; STATE_BYTES];
    file[..bytes.len()].copy_from_slice(bytes);
    let empty = |slot: usize| {
        file[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES]
            .iter()
            .all(|&b| b == 0)
    };
    match stored {
        Ok(Some(s)) => {
            let slot = slot_of(s.sequence);
            assert_eq!(
                file[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES],
                encode_state_slot(s.sequence, &s.hard_state),
                "decoded a state its slot does not hold"
            );
            let mut other_only = file;
            other_only[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES].fill(0);
            if let Ok(Some(other)) = decode_stored_state(&other_only) {
                assert!(
                    other.sequence < s.sequence,
                    "an older slot won over a newer one"
                );
            }
        }
        Ok(None) => {
            assert!(empty(0) || empty(1), "fresh, but neither slot is empty");
            for slot in [0, 1] {
                let mut only = [0u8; STATE_BYTES];
                only[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES]
                    .copy_from_slice(&file[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES]);
                assert!(
                    !matches!(decode_stored_state(&only), Ok(Some(_))),
                    "fresh, but slot {slot} holds a valid state"
                );
            }
        }
        Err(StateError::BothSlotsInvalid { .. }) => {
            assert!(!empty(0) && !empty(1), "an empty slot read as invalid");
        }
        Err(StateError::UnsupportedVersion { slot, .. }) => assert!(slot < 2),
        Err(e @ StateError::TooLong { .. }) => panic!("{e:?} for {} bytes", bytes.len()),
    }
    stored
}

/// Writes `history` through the two-slot protocol, tears the next write, and checks the file
/// reads as the state before it or the state it wrote.
fn run_torn_state(
    history: Vec<ArbitraryHardState>,
    new: ArbitraryHardState,
    written: [bool; SLOT_BYTES],
    cut: Option<u8>,
) -> Result<Option<StoredState>, StateError> {
    let mut file = [0u8; STATE_BYTES];
    let mut current = None;
    for state in history.into_iter().take(16) {
        let sequence = current.map_or(0, |s: StoredState| s.sequence) + 1;
        let slot = next_slot(sequence - 1);
        assert_eq!(slot, slot_of(sequence));
        file[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES]
            .copy_from_slice(&encode_state_slot(sequence, &state.into()));
        current = Some(StoredState {
            sequence,
            hard_state: state.into(),
        });
        assert_eq!(checked_state(&file), Ok(current));
    }
    let sequence = current.map_or(0, |s| s.sequence) + 1;
    let at = next_slot(sequence - 1) * SLOT_BYTES;
    let new_slot = encode_state_slot(sequence, &new.into());
    for (i, byte) in new_slot.iter().enumerate() {
        if written[i] {
            file[at + i] = *byte;
        }
    }
    let len = cut.map_or(STATE_BYTES, |c| usize::from(c) % (STATE_BYTES + 1));
    let decoded = checked_state(&file[..len]);
    let new = StoredState {
        sequence,
        hard_state: new.into(),
    };
    if len == STATE_BYTES {
        assert!(
            decoded == Ok(current) || decoded == Ok(Some(new)),
            "a torn write read as {decoded:?}, neither the old {current:?} nor the new {new:?}"
        );
        if written.iter().all(|&w| w) {
            assert_eq!(decoded, Ok(Some(new)));
        }
    }
    decoded
}

/// A snapshot file decodes to exactly what was encoded, or is refused: never a partial or
/// altered snapshot.
fn run_snapshot_damaged(index: u64, term: u64, data: Vec<u8>, damages: Vec<Damage>) -> bool {
    let snapshot = Snapshot {
        index,
        term,
        data: Bytes::from(data),
        membership: None,
    };
    let mut bytes = encode_snapshot(&snapshot);
    let original = bytes.clone();
    for damage in damages.into_iter().take(DAMAGES_MAX) {
        damage.apply(&mut bytes);
    }
    match decode_snapshot(Bytes::from(bytes.clone())) {
        Ok(decoded) => {
            assert_eq!(bytes, original, "a damaged snapshot file decoded");
            assert_eq!(decoded, snapshot);
            true
        }
        Err(_) => {
            assert_ne!(bytes, original, "an intact snapshot file was refused");
            false
        }
    }
}

/// `log_after_snapshot` keeps a suffix of the recovered log that continues the snapshot, or
/// nothing, or reports a gap exactly when the log starts past the snapshot's next index.
fn run_beside_snapshot(snapshot: Option<(u8, u8)>, first_index: u8, terms: Vec<u8>) -> bool {
    let first = Index::from(first_index).max(1);
    let entries: Vec<Entry> = terms
        .iter()
        .take(RECORDS_MAX)
        .enumerate()
        .map(|(i, t)| Entry {
            term: Term::from(*t),
            index: first + i as Index,
            kind: EntryKind::Noop,
        })
        .collect();
    let snapshot = snapshot.map(|(i, t)| (Index::from(i), Term::from(t)));
    let (index, term) = snapshot.unwrap_or((0, 0));
    match log_after_snapshot(snapshot, entries.clone()) {
        Err(gap) => {
            assert!(!entries.is_empty() && first > index + 1, "{gap:?}");
            assert_eq!((gap.expected, gap.found), (index + 1, first));
            false
        }
        Ok(kept) => {
            let Some(head) = kept.first() else {
                return false;
            };
            assert_eq!(head.index, index + 1, "kept entries continue the snapshot");
            assert!(
                entries.ends_with(&kept),
                "kept entries are a suffix of the log"
            );
            let continues =
                first == index + 1 || entries.iter().any(|e| e.index == index && e.term == term);
            assert!(continues, "kept a log that does not continue the snapshot");
            true
        }
    }
}

/// Runs one input decoded from `data`; panics if recovery breaks one of the properties above.
pub fn run_log_recovery(data: &[u8]) -> LogStats {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return LogStats::default();
    };
    let mut stats = LogStats::default();
    match input {
        Input::Raw {
            synced_len,
            first_index,
            cut,
            bytes,
        } => stats.count(&checked_scan(
            &bytes,
            u64::from(synced_len),
            first_index,
            usize::from(cut),
        )),
        Input::Sealed {
            synced_len,
            first_index,
            cut,
            records,
        } => stats.count(&run_sealed(synced_len, first_index.get(), cut, records)),
        Input::Damaged {
            first_index,
            first_term,
            synced,
            damages,
            entries,
        } => {
            stats.damaged_logs += 1;
            stats.count(&run_damaged(
                first_index.get(),
                first_term,
                synced,
                damages,
                entries,
            ));
        }
        Input::State { bytes } => match checked_state(&bytes) {
            Ok(Some(_)) => stats.states_decoded += 1,
            Ok(None) => {}
            Err(_) => stats.states_refused += 1,
        },
        Input::TornState {
            history,
            new,
            written,
            cut,
        } => match run_torn_state(history, new, written, cut) {
            Ok(Some(_)) => stats.states_decoded += 1,
            Ok(None) => {}
            Err(_) => stats.states_refused += 1,
        },
        Input::SnapshotRaw { bytes } => match decode_snapshot(Bytes::from(bytes)) {
            Ok(snapshot) => {
                assert_eq!(
                    decode_snapshot(Bytes::from(encode_snapshot(&snapshot))).as_ref(),
                    Ok(&snapshot),
                    "a decoded snapshot re-encodes to itself"
                );
                stats.snapshots_decoded += 1;
            }
            Err(_) => stats.snapshots_refused += 1,
        },
        Input::SnapshotDamaged {
            index,
            term,
            data,
            damages,
        } => {
            if run_snapshot_damaged(index, term, data, damages) {
                stats.snapshots_decoded += 1;
            } else {
                stats.snapshots_refused += 1;
            }
        }
        Input::BesideSnapshot {
            snapshot,
            first_index,
            terms,
        } => {
            if run_beside_snapshot(snapshot, first_index, terms) {
                stats.logs_kept_beside_snapshot += 1;
            }
        }
    }
    stats
}

/// The `log_recovery` fuzz target: see [`run_log_recovery`].
pub fn log_recovery(data: &[u8]) {
    run_log_recovery(data);
}
