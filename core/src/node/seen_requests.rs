//! Which client requests this node has already taken, so a copy of one is dropped unanswered.
//!
//! A request's answer speaks for the one copy it answers. A network that duplicates (the
//! simulator's does; a client library that resent on the same connection would too) can
//! deliver a second copy after the first was proposed and the node stepped down: the copy is
//! answered `NotLeader` ("nothing was written") while the first may still commit, and a
//! producer that hears only that answer reports a send that failed definitively although it is
//! in the log (a phantom, DESIGN §1.2). TCP gives the shell this guarantee per connection; the
//! node keeps it itself so it holds for every driver. Request ids grow per client, and every
//! client of the shell is one connection, so a remembered pair is never reused legitimately.

use std::collections::{BTreeSet, VecDeque};

use super::protocol::{ClientId, RequestId};
use crate::limits::REQUESTS_REMEMBERED_MAX;

#[derive(Debug, Default)]
pub struct SeenRequests {
    seen: BTreeSet<(ClientId, RequestId)>,
    /// Arrival order, to forget the oldest first.
    order: VecDeque<(ClientId, RequestId)>,
}

impl SeenRequests {
    /// Whether `(client, id)` is new; remembers it. At the limit the oldest is forgotten: a
    /// copy delayed past `REQUESTS_REMEMBERED_MAX` later requests is taken again.
    pub fn first_time(&mut self, client: ClientId, id: RequestId) -> bool {
        if !self.seen.insert((client, id)) {
            return false;
        }
        self.order.push_back((client, id));
        while self.order.len() > REQUESTS_REMEMBERED_MAX {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        debug_assert_eq!(self.seen.len(), self.order.len());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_refused_and_the_oldest_forgotten_at_the_limit() {
        let mut seen = SeenRequests::default();
        assert!(seen.first_time(1, 1));
        assert!(!seen.first_time(1, 1));
        assert!(seen.first_time(2, 1), "another client's id is its own");
        for id in 2..=REQUESTS_REMEMBERED_MAX as u64 + 1 {
            assert!(seen.first_time(1, id));
        }
        assert_eq!(seen.seen.len(), REQUESTS_REMEMBERED_MAX);
        assert!(seen.first_time(1, 1), "the oldest was forgotten");
        assert!(!seen.first_time(1, 5));
    }
}
