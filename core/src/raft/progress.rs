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
        // Every path keeps the next index above the match, so moving the match below is all
        // an acceptance does to the next index. (Mutation testing found the separate `max`
        // each state change here once did redundant: those mutants could not be caught.)
        debug_assert!(self.next_index > self.match_index, "{self:?}");
        while self.inflight.front().is_some_and(|&last| last <= index) {
            self.inflight.pop_front();
        }
        self.probe_sent = false;
        match self.state {
            ProgressState::Probe => self.state = ProgressState::Replicate,
            // An answer from before the snapshot was needed must not restart its transfer.
            ProgressState::Snapshot if index >= self.snapshot.index => {
                self.state = ProgressState::Replicate;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by mutation testing (`index > match_index` as `>=`, and `index + 1` as
    /// `index - 1` in the next index): an acceptance moves the next index just past the match,
    /// no further back (entries the follower holds sent again), and only a higher match is
    /// news, on which the leader counts its commit again and may send `TimeoutNow`.
    #[test]
    fn an_acceptance_moves_next_just_past_the_match_and_only_a_higher_match_is_news() {
        let mut progress = Progress::new(3);
        assert!(progress.accept(7), "a probe that carried entries 3 to 7");
        let at = |p: &Progress| (p.state, p.match_index, p.next_index);
        assert_eq!(at(&progress), (ProgressState::Replicate, 7, 8));
        assert!(!progress.accept(7), "a copy of the answer");
        assert!(!progress.accept(4), "a late answer");
        assert_eq!(at(&progress), (ProgressState::Replicate, 7, 8));
        progress.inflight.extend([9, 12]);
        progress.next_index = 13;
        assert!(progress.accept(9));
        assert_eq!(at(&progress), (ProgressState::Replicate, 9, 13));
        assert_eq!(progress.inflight, [12]);
    }

    /// A rejection below the match lowers it (a follower that lost part of its log), and the
    /// next index stays above the match and above 0, which `send_append` subtracts 1 from.
    /// Mutation testing: `match_index + 1` as `* 1` differs only here, at 0.
    #[test]
    fn a_probe_keeps_the_next_index_above_the_match_and_zero() {
        let mut progress = Progress::new(3);
        progress.accept(7);
        progress.probe_from(5);
        let at = |p: &Progress| (p.state, p.match_index, p.next_index);
        assert_eq!(at(&progress), (ProgressState::Probe, 4, 5));
        progress.probe_from(9);
        assert_eq!(at(&progress), (ProgressState::Probe, 4, 9));
        progress.probe_from(0);
        assert_eq!(at(&progress), (ProgressState::Probe, 0, 1));
    }

    #[test]
    fn a_snapshot_transfer_ends_only_at_the_snapshot() {
        let mut progress = Progress::new(3);
        progress.send_snapshot(10);
        assert!(progress.accept(5), "a late answer from before the snapshot");
        assert_eq!(progress.state, ProgressState::Snapshot);
        assert!(progress.accept(10));
        let at = (progress.state, progress.match_index, progress.next_index);
        assert_eq!(at, (ProgressState::Replicate, 10, 11));
    }
}
