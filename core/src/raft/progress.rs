//! What a leader knows about one follower (etcd's tracker/progress.go, reduced).

use std::collections::VecDeque;

use super::types::Index;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProgressState {
    /// Next index unknown: one Append at a time until one is accepted.
    Probe,
    /// The follower is known to match: stream Appends up to the in-flight window.
    Replicate,
    /// The follower needs entries the leader has compacted: send it the snapshot, one chunk
    /// at a time.
    Snapshot,
}

#[derive(Clone, Debug)]
pub(super) struct Progress {
    pub(super) match_index: Index,
    pub(super) next_index: Index,
    pub(super) state: ProgressState,
    /// In Probe: an Append is out and unanswered, so wait before sending another.
    pub(super) probe_sent: bool,
    /// In Replicate: the last index of each Append in flight, oldest first.
    pub(super) inflight: VecDeque<Index>,
    /// Heard from since the last CheckQuorum round.
    pub(super) recent_active: bool,
    /// The latest heartbeat `context` (leader clock, micros) the follower answered.
    pub(super) lease_context_us: u64,
    /// In Snapshot: which snapshot is being sent and how far.
    pub(super) snapshot: SnapshotTransfer,
    /// The follower's last acknowledgement said it lost its disk
    /// ([`AppendResult::AcceptedVotesLost`](super::AppendResult::AcceptedVotesLost)): its
    /// match index serves replication only, never a commit, a lease or CheckQuorum.
    pub(super) votes_lost: bool,
}

/// A leader's progress in sending one snapshot to one follower.
#[derive(Clone, Debug, Default)]
pub(super) struct SnapshotTransfer {
    pub(super) index: Index,
    /// Bytes the follower confirmed holding; the next chunk starts here.
    pub(super) offset: u64,
    /// A chunk is out and unanswered.
    pub(super) in_flight: bool,
    /// Heartbeat answers to wait for before sending an unanswered chunk again.
    pub(super) wait_heartbeats: u32,
    /// The lowest `received` an answer reported that did not move the transfer forward: a
    /// copy of an earlier answer, or a follower that lost what it held (a restart). The
    /// chunk sent again after the wait starts here, so a follower that lost its bytes is
    /// served from where it now is.
    pub(super) rewind_to: Option<u64>,
}

impl Progress {
    pub(super) fn new(next_index: Index) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            recent_active: true,
            lease_context_us: 0,
            snapshot: SnapshotTransfer::default(),
            votes_lost: false,
        }
    }

    /// Starts sending the snapshot at `index` from its first byte.
    pub(super) fn send_snapshot(&mut self, index: Index) {
        self.state = ProgressState::Snapshot;
        self.probe_sent = false;
        self.inflight.clear();
        self.snapshot = SnapshotTransfer {
            index,
            ..SnapshotTransfer::default()
        };
    }

    /// Records that the follower holds everything up to `index`. Returns true if that is news.
    pub(super) fn accept(&mut self, index: Index) -> bool {
        while self.inflight.front().is_some_and(|&last| last <= index) {
            self.inflight.pop_front();
        }
        self.probe_sent = false;
        match self.state {
            ProgressState::Probe => {
                self.state = ProgressState::Replicate;
                self.next_index = self.next_index.max(index + 1);
            }
            // An answer from before the snapshot was needed must not restart its transfer.
            ProgressState::Snapshot if index >= self.snapshot.index => {
                self.state = ProgressState::Replicate;
                self.next_index = index + 1;
            }
            ProgressState::Snapshot | ProgressState::Replicate => {}
        }
        if index > self.match_index {
            self.match_index = index;
            self.next_index = self.next_index.max(index + 1);
            true
        } else {
            false
        }
    }

    /// Falls back to probing from `next_index` after a rejection.
    ///
    /// A probe at or below `match_index` means the follower no longer holds what it once
    /// acknowledged: its disk was damaged and it restarted with only a valid prefix (see
    /// `Replica::damaged_from`). The match falls back with it, or the leader would probe
    /// above the follower's log forever; lowering a match only ever delays a commit.
    pub(super) fn probe_from(&mut self, next_index: Index) {
        self.state = ProgressState::Probe;
        if next_index <= self.match_index {
            self.match_index = next_index.saturating_sub(1);
        }
        self.next_index = next_index.max(self.match_index + 1);
        self.probe_sent = false;
        self.inflight.clear();
    }
}
