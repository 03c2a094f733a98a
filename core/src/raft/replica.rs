//! The replica: election, replication, commit. See the module docs of `raft` for the contract.

use bytes::Bytes;

use super::types::*;
use crate::time::Instant;

pub struct Replica {
    _config: Config,
}

impl Replica {
    /// Starts a replica from what its disk holds. `seed` drives its randomised election
    /// timeouts; a driver passes a fresh seed on every start.
    pub fn new(config: Config, recovered: Recovered, seed: u64, now: Instant) -> Replica {
        let _ = (recovered, seed, now);
        todo!("{config:?}")
    }

    /// Handles one message from the replica of node `from`.
    pub fn step(&mut self, now: Instant, from: NodeId, message: Message) {
        let _ = (now, from, message);
        todo!()
    }

    /// Fires every timer due at `now`; harmless if none is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }

    /// Appends one entry holding `commands`, on a leader. Returns the entry's index; the
    /// proposal's fate comes later through `poll_proposal` tagged with `id`.
    pub fn propose(
        &mut self,
        now: Instant,
        id: ProposalId,
        commands: Vec<Bytes>,
    ) -> Result<Index, ProposeError> {
        let _ = (now, id, commands);
        todo!()
    }

    /// The driver has synced the write `id` and every write before it.
    pub fn persisted(&mut self, now: Instant, id: WriteId) {
        let _ = (now, id);
        todo!()
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Instant {
        todo!()
    }

    /// The next write to perform and sync, coalescing every change made since the last call.
    pub fn poll_write(&mut self) -> Option<Write> {
        todo!()
    }

    /// The next message that may be sent now.
    pub fn poll_message(&mut self) -> Option<Envelope> {
        todo!()
    }

    /// The next committed entry to apply, in index order.
    pub fn poll_committed(&mut self) -> Option<Entry> {
        todo!()
    }

    /// The next proposal whose fate is known.
    pub fn poll_proposal(&mut self) -> Option<ProposalFate> {
        todo!()
    }

    pub fn status(&self) -> Status {
        todo!()
    }

    pub fn config(&self) -> &Config {
        &self._config
    }

    /// The entry at `index` in this replica's (possibly not yet durable) log.
    pub fn entry(&self, index: Index) -> Option<&Entry> {
        let _ = index;
        todo!()
    }
}
