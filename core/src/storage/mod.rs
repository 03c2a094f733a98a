//! The on-disk formats of a replica: its log and its hard state, as pure functions over bytes.
//!
//! The shell's files and the simulator's disk both call these, so a crash recovers through the
//! same code in production and under simulation (DESIGN.md §3).
//!
//! # Log records ([`record`])
//!
//! ```text
//! [len u32 LE][crc32c u32 LE][index u64 LE][term u64 LE][payload]
//! payload = 0x00                                    Noop
//!         | 0x01 [count u32 LE] ([len u32 LE][bytes])*count   Commands
//! ```
//!
//! `len` counts the bytes from `index` to the end of the payload, and the checksum covers
//! exactly those bytes. [`scan`] finds the valid prefix of a log region and separates a torn
//! tail (unsynced bytes, safe to drop) from corruption of synced bytes (never dropped silently).
//!
//! # Snapshots ([`snapshot`])
//!
//! One checksummed file per snapshot, and the rule that says which recovered log entries
//! continue it ([`log_after_snapshot`]).
//!
//! # Recovery ([`recovery`])
//!
//! What a directory's files mean after a crash, and what to cut, delete and report: one pure
//! decision ([`plan_recovery`]) that the shell carries out on its files and the simulator on
//! its disk.
//!
//! # Hard state ([`state`])
//!
//! Two fixed-size slots, written alternately, each with its own sequence number and checksum:
//! a torn write can only damage the slot being written, and the other still holds the previous
//! state.

pub mod record;
pub mod recovery;
pub mod snapshot;
pub mod state;

pub use record::{
    CorruptReason, EncodeError, HEADER_BYTES, PayloadError, RECORD_BYTES_MAX, Scan, ScanOutcome,
    decode_membership_prefix, encode_entry, encode_membership, find_record_after,
    membership_len_bytes, record_len_bytes, scan,
};
pub use recovery::{
    BadRecord, DamageCause, FileRef, FoundDamage, KeptSegment, QueueRecoveryPlan, QueueSegment,
    RecoveryError, RecoveryInput, RecoveryPlan, SegmentFile, SnapshotFile, StateLost, TornTail,
    plan_queue_recovery, plan_recovery, segments_to_read,
};
pub use snapshot::{
    LogGap, SNAPSHOT_HEADER_BYTES, SnapshotFileError, decode_snapshot, encode_snapshot,
    encode_snapshot_header, encode_snapshot_membership, log_after_snapshot,
};
pub use state::{
    SLOT_BYTES, STATE_BYTES, SlotError, StateError, StoredState, decode_state, decode_stored_state,
    encode_state_slot, next_slot, slot_of,
};
