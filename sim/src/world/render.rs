//! Messages as hash fields and as readable trace text.

use holdfast_core::raft::{AppendResult, Message};

/// A message as a kind code, its term, and one more distinguishing number, for the hash.
pub(super) fn fields(message: &Message) -> (u64, u64, u64) {
    match message {
        Message::PreVote {
            term, last_index, ..
        } => (1, *term, *last_index),
        Message::PreVoteResponse { term, granted } => (2, *term, *granted as u64),
        Message::Vote {
            term, last_index, ..
        } => (3, *term, *last_index),
        Message::VoteResponse { term, granted } => (4, *term, *granted as u64),
        Message::Append {
            term,
            prev_index,
            entries,
            ..
        } => (5, *term, prev_index << 16 | entries.len() as u64),
        Message::AppendResponse { term, result } => match result {
            AppendResult::Accepted { match_index } => (6, *term, *match_index),
            AppendResult::Rejected { rejected_index, .. } => (7, *term, *rejected_index),
            AppendResult::RejectedDamaged { rejected_index, .. } => (10, *term, *rejected_index),
            AppendResult::AcceptedVotesLost { match_index } => (11, *term, *match_index),
        },
        Message::Heartbeat { term, commit, .. } => (8, *term, *commit),
        Message::HeartbeatResponse { term, context } => (9, *term, *context),
        Message::InstallSnapshot {
            term,
            index,
            offset,
            ..
        } => (11, *term, index << 24 | offset),
        Message::SnapshotResponse {
            term,
            index,
            received,
        } => (12, *term, index << 24 | received),
        Message::TimeoutNow { term } => (13, *term, 0),
        Message::TransferVote {
            term, last_index, ..
        } => (14, *term, *last_index),
    }
}

/// A message in a few words, for the readable trace.
pub(super) fn describe(message: &Message) -> String {
    match message {
        Message::PreVote {
            term,
            last_index,
            last_term,
        } => format!("PreVote t{term} last={last_index}@{last_term}"),
        Message::PreVoteResponse { term, granted } => {
            format!("PreVoteResponse t{term} granted={granted}")
        }
        Message::Vote {
            term,
            last_index,
            last_term,
        } => format!("Vote t{term} last={last_index}@{last_term}"),
        Message::VoteResponse { term, granted } => {
            format!("VoteResponse t{term} granted={granted}")
        }
        Message::Append {
            term,
            prev_index,
            prev_term,
            entries,
            commit,
        } => format!(
            "Append t{term} prev={prev_index}@{prev_term} entries={} commit={commit}",
            entries.len()
        ),
        Message::AppendResponse { term, result } => match result {
            AppendResult::Accepted { match_index } => {
                format!("AppendResponse t{term} match={match_index}")
            }
            AppendResult::AcceptedVotesLost { match_index } => {
                format!("AppendResponse t{term} match={match_index} (votes lost: not counted)")
            }
            AppendResult::Rejected {
                rejected_index,
                hint_index,
                hint_term,
            } => format!(
                "AppendResponse t{term} REJECT at={rejected_index} hint={hint_index}@{hint_term}"
            ),
            AppendResult::RejectedDamaged {
                rejected_index,
                hint_index,
                hint_term,
            } => format!(
                "AppendResponse t{term} REJECT(damaged) at={rejected_index} \
                 hint={hint_index}@{hint_term}"
            ),
        },
        Message::Heartbeat { term, commit, .. } => format!("Heartbeat t{term} commit={commit}"),
        Message::HeartbeatResponse { term, .. } => format!("HeartbeatResponse t{term}"),
        Message::InstallSnapshot {
            term,
            index,
            snapshot_term,
            offset,
            total,
            chunk,
            ..
        } => format!(
            "InstallSnapshot t{term} {index}@{snapshot_term} bytes {offset}..{} of {total}",
            offset + chunk.len() as u64
        ),
        Message::SnapshotResponse {
            term,
            index,
            received,
        } => format!("SnapshotResponse t{term} {index} received={received}"),
        Message::TimeoutNow { term } => format!("TimeoutNow t{term}"),
        Message::TransferVote {
            term,
            last_index,
            last_term,
        } => format!("TransferVote t{term} last={last_index}@{last_term}"),
    }
}
