//! A broker group's queue store catching up from peers, after its replica installed a
//! metadata snapshot from the leader ([`StoreOp::CatchUp`]): the snapshot references messages
//! this node's store may lack, and the replica acknowledges the snapshot once its write is
//! durable, so nothing the group writes after the catch-up began (the snapshot's write first)
//! goes to the storage thread until the store holds every referenced message and has synced
//! it.
//!
//! The store says what it lacks ([`QueueStore::catch_up_plan`]: per queue, the offsets past
//! the end of what it holds); this node asks one peer at a time for one chunk at a time
//! ([`Frame::Fetch`], at most [`CATCH_UP_CHUNK_BYTES_MAX`] bytes, read by the peer straight from
//! its segment files), checks every record of the answer (length, crc32c, offset) and writes
//! them at the queue's end ([`QueueStore::fill`]). A chunk with a bad record is refused whole,
//! logged with the reason, and asked of the next peer. An answer that does not come within
//! [`FETCH_WAIT_MS`], or a peer that cannot serve it, moves on to the next peer after
//! [`FETCH_RETRY_MS`]. A newer snapshot installed meanwhile replaces the plan; what was
//! already fetched counts (the store keeps it), so a catch-up resumes where it was.
//!
//! Memory: one chunk in flight per group, plus the writes and store operations held meanwhile,
//! at most [`CATCH_UP_HELD_BYTES_MAX`] per group (and one step of input past it). A leader
//! that waits for the snapshot's answer sends few entries, but a repair at start holds the
//! whole replay of the log, and a replica that leads, or follows a leader that goes on sending,
//! holds whatever a busy group commits until the slowest fetch ends. Once a catch-up holds
//! that much ([`CatchUps::full`]), the server pauses the group ([`BrokerNode::pause`]) until
//! the catch-up ends. Pausing takes no input that adds to the hold and drops nothing already
//! taken:
//! - the node applies no committed entry (the entries stay in the Raft log, which is durable
//!   on the majority that committed them, and apply after the pause, in order, as a replay
//!   step would); the answers to their proposals wait for that apply;
//! - it proposes nothing: clients are answered `Busy` (or sent to the peer it hands its
//!   leadership to) and try again, so nothing is acknowledged that was not taken;
//! - it drops a leader's Appends that carry entries, a message loss Raft repairs: a follower
//!   whose writes are held has acknowledged none of them (its answers wait in the replica for
//!   the write's sync), so the leader counts none of them here and sends them again.
//!
//! Nothing held is dropped either: every held write goes to the storage thread, in order, and
//! only after the fetched segments are synced, and only its sync lets the replica answer for
//! it. So no acknowledgement leaves this node for anything that is not durable on it.
//!
//! [`BrokerNode::pause`]: holdfast_core::node::BrokerNode::pause

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use holdfast_core::broker::{Offset, QueueId, StoreOp};
use holdfast_core::node::BrokerNode;
use holdfast_core::raft::{GroupId, NodeId, Write};
use holdfast_core::wire::Frame;
use tracing::{info, warn};

use crate::storage::{QueueStore, SyncPlan};

/// The most record bytes one fetch asks for (and one answer carries, but for a single larger
/// record): what a catch-up holds in memory per group.
pub const CATCH_UP_CHUNK_BYTES_MAX: usize = 1 << 20;
/// A fetch not answered within this long is asked of the next peer.
pub const FETCH_WAIT_MS: u64 = 5_000;
/// After a peer could not serve a fetch (or sent bad bytes), the next one is asked this much
/// later, so a cluster that lacks the records is not asked in a tight loop.
pub const FETCH_RETRY_MS: u64 = 500;
/// Fetches of one peer a node serves at once; more are refused, with the reason.
pub const FETCHES_PENDING_PER_PEER_MAX: usize = 4;
/// The most bytes of Raft writes and store operations one group's catch-up holds before the
/// group is paused (see the module's comment): twice the default replay step
/// (`replay_store_bytes_max`), since it holds both the log's entries and their store writes.
pub const CATCH_UP_HELD_BYTES_MAX: u64 = 32 << 20;

/// What the server must do for the catch-ups.
pub enum Action {
    Send(NodeId, Frame),
    /// Everything is fetched: sync it, then report [`CatchUps::synced`].
    Sync(GroupId, SyncPlan),
}

struct Asked {
    id: u64,
    to: NodeId,
    at: Instant,
}

struct CatchUp {
    /// Peers to fetch from: the snapshot's sender first.
    sources: Vec<NodeId>,
    source: usize,
    /// `(queue, next offset to fetch, end)`, the first one being fetched.
    missing: VecDeque<(QueueId, Offset, Offset)>,
    asked: Option<Asked>,
    retry_at: Option<Instant>,
    /// The group's Raft writes since the catch-up began, in order.
    writes: VecDeque<Write>,
    /// What `writes` weigh ([`write_bytes`]).
    writes_bytes: u64,
    /// The group's store operations since the catch-up began, in order (entries applied
    /// after a leader change; carried out once every fetched record is written).
    ops: Vec<StoreOp>,
    /// What `ops` weigh ([`StoreOp::weight_bytes`]).
    ops_bytes: u64,
    syncing: bool,
    started: Instant,
    bytes: u64,
    refused: u64,
}

pub struct CatchUps {
    groups: BTreeMap<GroupId, CatchUp>,
    next_id: u64,
    /// [`CATCH_UP_HELD_BYTES_MAX`], but in tests.
    held_bytes_max: u64,
}

impl Default for CatchUps {
    fn default() -> CatchUps {
        CatchUps {
            groups: BTreeMap::new(),
            next_id: 0,
            held_bytes_max: CATCH_UP_HELD_BYTES_MAX,
        }
    }
}

/// What a held write weighs in memory: its entries' commands and its snapshot.
fn write_bytes(write: &Write) -> u64 {
    const SMALL_BYTES: u64 = 64;
    let entries: u64 = write
        .entries
        .iter()
        .map(|e| SMALL_BYTES + e.command_bytes() as u64)
        .sum();
    let snapshot = write.snapshot.as_ref().map_or(0, |s| s.data.len() as u64);
    SMALL_BYTES + entries + snapshot
}

impl CatchUps {
    /// `group`'s store must come to hold `missing` (from [`QueueStore::catch_up_plan`]),
    /// fetched from `from` first, else from the other `peers`. A catch-up already under way
    /// for the group takes the new plan (a newer snapshot covers everything its held
    /// operations did) and keeps its held writes.
    pub fn start(
        &mut self,
        now: Instant,
        group: GroupId,
        from: NodeId,
        peers: &[NodeId],
        missing: Vec<(QueueId, Offset, Offset)>,
    ) {
        let mut sources = vec![from];
        sources.extend(peers.iter().copied().filter(|p| *p != from));
        let records: u64 = missing.iter().map(|(_, from, end)| end - from).sum();
        info!(
            group,
            from,
            queues = missing.len(),
            records,
            "catching up: fetching the segments this node lacks of a snapshot from the leader"
        );
        let catch_up = self.groups.entry(group).or_insert_with(|| CatchUp {
            sources: Vec::new(),
            source: 0,
            missing: VecDeque::new(),
            asked: None,
            retry_at: None,
            writes: VecDeque::new(),
            writes_bytes: 0,
            ops: Vec::new(),
            ops_bytes: 0,
            syncing: false,
            started: now,
            bytes: 0,
            refused: 0,
        });
        catch_up.sources = sources;
        catch_up.source = 0;
        catch_up.missing = missing.into();
        catch_up.asked = None;
        catch_up.retry_at = None;
        catch_up.ops.clear();
        catch_up.ops_bytes = 0;
    }

    /// Whether `group` is catching up: its writes and store operations must be held.
    pub fn holds(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    pub fn hold_write(&mut self, group: GroupId, write: Write) {
        if let Some(c) = self.groups.get_mut(&group) {
            c.writes_bytes += write_bytes(&write);
            c.writes.push_back(write);
        }
    }

    pub fn hold_op(&mut self, group: GroupId, op: StoreOp) {
        if let Some(c) = self.groups.get_mut(&group) {
            c.ops_bytes += op.weight_bytes();
            c.ops.push(op);
        }
    }

    /// What `group`'s catch-up holds: its writes and store operations, in bytes.
    pub fn held_bytes(&self, group: GroupId) -> u64 {
        self.groups
            .get(&group)
            .map_or(0, |c| c.writes_bytes + c.ops_bytes)
    }

    /// Whether `group`'s catch-up holds [`CATCH_UP_HELD_BYTES_MAX`] or more: the group must
    /// take no more input until it ends (see the module's comment).
    pub fn full(&self, group: GroupId) -> bool {
        self.held_bytes(group) >= self.held_bytes_max
    }

    /// Pauses `group` on `node` once its catch-up is [`CatchUps::full`]; the server resumes
    /// it when the catch-up's writes are released ([`CatchUps::synced`]).
    pub fn pause_if_full(
        &self,
        node: &mut BrokerNode,
        now: holdfast_core::time::Instant,
        group: GroupId,
    ) {
        if self.full(group) && !node.paused(group) {
            warn!(
                group,
                held_bytes = self.held_bytes(group),
                "catching up: the writes held for the fetch reached {} bytes \
                 (CATCH_UP_HELD_BYTES_MAX); the group applies and accepts nothing more \
                 (clients are answered Busy) until the fetch ends",
                self.held_bytes_max
            );
            node.pause(now, group);
        }
    }

    /// The fetches to send (one per group, none while one is out), fetches that waited too
    /// long given up, and the syncs of catch-ups that fetched everything (their held store
    /// operations carried out first). An error is the store's: the node must stop.
    pub fn poll(&mut self, now: Instant, store: &mut QueueStore) -> Result<Vec<Action>, String> {
        let mut actions = Vec::new();
        let next_id = &mut self.next_id;
        for (group, c) in &mut self.groups {
            if c.syncing {
                continue;
            }
            if let Some(asked) = &c.asked {
                if now.duration_since(asked.at) < Duration::from_millis(FETCH_WAIT_MS) {
                    continue;
                }
                warn!(
                    group = *group,
                    peer = asked.to,
                    "catching up: no answer to a fetch within {FETCH_WAIT_MS} ms; asking another peer"
                );
                c.asked = None;
                c.source += 1;
            }
            if c.retry_at.is_some_and(|at| now < at) {
                continue;
            }
            c.retry_at = None;
            let Some((queue, from, end)) = c.missing.front().cloned() else {
                c.ops_bytes = 0;
                for op in std::mem::take(&mut c.ops) {
                    store.apply(*group, op)?;
                }
                let plan = store.sync_plan(*group, &[])?;
                c.syncing = true;
                actions.push(Action::Sync(*group, plan));
                continue;
            };
            if c.sources.is_empty() {
                continue;
            }
            let to = c.sources[c.source % c.sources.len()];
            *next_id += 1;
            c.asked = Some(Asked {
                id: *next_id,
                to,
                at: now,
            });
            let frame = Frame::Fetch {
                id: *next_id,
                group: *group,
                queue,
                from,
                end,
                bytes_max: CATCH_UP_CHUNK_BYTES_MAX as u32,
            };
            actions.push(Action::Send(to, frame));
        }
        Ok(actions)
    }

    /// A peer's answer to a fetch: its records are checked and written, or refused (logged);
    /// an answer nobody waits for (late, or from before a newer plan) is dropped. An error
    /// is the store's: the node must stop.
    #[allow(clippy::too_many_arguments)]
    pub fn fetched(
        &mut self,
        now: Instant,
        peer: NodeId,
        id: u64,
        group: GroupId,
        queue: &QueueId,
        from: Offset,
        records: Result<bytes::Bytes, String>,
        store: &mut QueueStore,
    ) -> Result<(), String> {
        let Some(c) = self.groups.get_mut(&group) else {
            return Ok(());
        };
        if c.asked.as_ref().is_none_or(|a| a.id != id || a.to != peer) {
            return Ok(());
        }
        c.asked = None;
        let Some((wanted, next, end)) = c.missing.front_mut() else {
            return Ok(());
        };
        let refusal = match records {
            _ if wanted != queue || *next != from => {
                Some(format!("an answer for {queue}@{from}, not {wanted}@{next}"))
            }
            Err(why) => Some(format!("the peer cannot serve it: {why}")),
            Ok(bytes) if bytes.is_empty() => Some("an empty answer".to_string()),
            Ok(bytes) => match store.fill(group, queue, from, &bytes) {
                Ok(after) if after > *end => {
                    // Checked before anything was written, so this cannot happen unless the
                    // peer's store differs from the snapshot; the extra records are cut
                    // before the sync by the next plan or restart (they lie past the end).
                    Some(format!(
                        "records up to {after}, past the snapshot's end {end}"
                    ))
                }
                Ok(after) => {
                    c.bytes += bytes.len() as u64;
                    *next = after;
                    if after == *end {
                        c.missing.pop_front();
                    }
                    None
                }
                // A store that failed stops the node; bad bytes only this peer.
                Err(why) if store.failed() => return Err(why),
                Err(why) => Some(format!("refused its records: {why}")),
            },
        };
        if let Some(why) = refusal {
            c.refused += 1;
            warn!(
                group,
                peer,
                %queue,
                from,
                "catching up: a fetch from this peer failed, asking the next one: {why}"
            );
            c.source += 1;
            c.retry_at = Some(now + Duration::from_millis(FETCH_RETRY_MS));
        }
        Ok(())
    }

    /// The sync of `group`'s catch-up ended: on success (and nothing more to fetch) the held
    /// writes, to hand to the storage thread in order; an error is fatal (fsync).
    pub fn synced(
        &mut self,
        now: Instant,
        group: GroupId,
        result: Result<(), String>,
    ) -> Result<Option<VecDeque<Write>>, String> {
        result?;
        let Some(c) = self.groups.get_mut(&group) else {
            return Ok(None);
        };
        c.syncing = false;
        if !c.missing.is_empty() || !c.ops.is_empty() {
            // A newer plan came while it synced.
            return Ok(None);
        }
        let Some(c) = self.groups.remove(&group) else {
            return Ok(None);
        };
        let ms = now.duration_since(c.started).as_millis() as u64;
        let mb_per_s = c.bytes as f64 / 1e6 / (ms.max(1) as f64 / 1000.0);
        info!(
            group,
            bytes = c.bytes,
            ms,
            mb_per_s = format!("{mb_per_s:.1}"),
            refused = c.refused,
            "caught up: the segments are synced; the snapshot's write goes ahead"
        );
        Ok(Some(c.writes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_core::broker::{Message, QueueRange, StoredMessage};

    pub(super) fn write(store: &mut QueueStore, queue: &QueueId, offset: Offset) {
        let stored = StoredMessage {
            producer_id: 1,
            seq: offset,
            message: Message::with_body(format!("{offset}{}", "b".repeat(30_000))),
            stored_ms: 3,
            reconsume_times: 0,
            due_ms: 0,
            origin: None,
        };
        let op = StoreOp::Write {
            queue: queue.clone(),
            offset,
            message: stored,
        };
        store.apply(1, op).expect("writes");
    }

    /// The peer's side of a fetch, with the bytes `damage` makes of the records.
    fn serve(
        peer: &mut QueueStore,
        frame: &Frame,
        damage: bool,
    ) -> (u64, QueueId, Offset, bytes::Bytes) {
        let Frame::Fetch {
            id,
            group,
            queue,
            from,
            end,
            bytes_max,
        } = frame
        else {
            panic!("not a fetch: {frame:?}");
        };
        let mut records = peer
            .chunk(*group, queue, *from, *end, *bytes_max as usize)
            .expect("reads")
            .to_vec();
        assert!(records.len() <= CATCH_UP_CHUNK_BYTES_MAX);
        if damage {
            let middle = records.len() / 2;
            records[middle] ^= 1;
        }
        (*id, queue.clone(), *from, records.into())
    }

    /// A follower fetches a backlog of many chunks; a damaged chunk is refused and asked of
    /// the next peer; the held writes come back only after the sync, in order.
    #[test]
    fn a_catch_up_fetches_chunk_by_chunk_refuses_damage_and_releases_writes_after_its_sync() {
        let dirs: Vec<_> = (0..2)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let queue = QueueId::new("orders", 0);
        let mut peer = QueueStore::open(dirs[0].path()).expect("opens");
        let mut store = QueueStore::open(dirs[1].path()).expect("opens");
        for offset in 0..400 {
            write(&mut peer, &queue, offset);
        }
        let ranges = [QueueRange {
            queue: queue.clone(),
            start: 0,
            end: 400,
        }];
        let missing = store.catch_up_plan(1, &ranges).expect("plans");
        let mut catch_ups = CatchUps::default();
        let mut now = Instant::now();
        catch_ups.start(now, 1, 2, &[2, 3], missing);
        assert!(catch_ups.holds(1));
        for id in 0..3 {
            catch_ups.hold_write(
                1,
                Write {
                    id,
                    hard_state: None,
                    snapshot: None,
                    discard_log: false,
                    entries: Vec::new(),
                },
            );
        }
        let (mut fetches, mut damaged) = (0, false);
        let plan = loop {
            let mut actions = catch_ups.poll(now, &mut store).expect("polls");
            assert!(actions.len() <= 1, "one fetch at a time");
            match actions.pop() {
                Some(Action::Send(to, frame)) => {
                    fetches += 1;
                    let damage = fetches == 5;
                    damaged |= damage;
                    let (id, queue, from, records) = serve(&mut peer, &frame, damage);
                    catch_ups
                        .fetched(now, to, id, 1, &queue, from, Ok(records), &mut store)
                        .expect("the store is fine");
                    if damage {
                        assert!(
                            catch_ups.poll(now, &mut store).expect("polls").is_empty(),
                            "the next peer is asked after a pause"
                        );
                        now += Duration::from_millis(FETCH_RETRY_MS);
                        let Some(Action::Send(next, _)) =
                            catch_ups.poll(now, &mut store).expect("polls").pop()
                        else {
                            panic!("no fetch after the pause");
                        };
                        assert_eq!(next, 3, "the next peer");
                        // That fetch is lost: after the wait, the one after is asked.
                        now += Duration::from_millis(FETCH_WAIT_MS);
                    }
                }
                Some(Action::Sync(group, plan)) => break (group, plan),
                None => panic!("neither a fetch nor a sync"),
            }
            assert!(fetches < 100, "no progress");
        };
        assert!(damaged && fetches > 10, "{fetches} fetches");
        assert!(catch_ups.holds(1), "writes wait for the sync");
        plan.1.run().expect("syncs");
        let writes = catch_ups
            .synced(now, plan.0, Ok(()))
            .expect("synced")
            .expect("released");
        assert_eq!(
            writes.iter().map(|w| w.id).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(!catch_ups.holds(1));
        for offset in [0, 133, 399] {
            assert_eq!(
                store.message(1, &queue, offset).expect("reads"),
                peer.message(1, &queue, offset).expect("reads")
            );
        }
    }
    /// A catch-up whose peer dies half-way goes on from the next peer where it stopped, and a
    /// new plan (a newer snapshot installed meanwhile) asks only for what the store still
    /// lacks: no record is fetched twice. A chunk with a bad checksum writes nothing and is asked again from the
    /// same offset.
    #[test]
    fn an_interrupted_catch_up_resumes_where_it_stopped_and_refetches_only_a_bad_chunk() {
        let dirs: Vec<_> = (0..3)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let queue = QueueId::new("orders", 0);
        let mut peer = QueueStore::open(dirs[0].path()).expect("opens");
        let mut store = QueueStore::open(dirs[1].path()).expect("opens");
        for offset in 0..400 {
            write(&mut peer, &queue, offset);
        }
        let ranges = [QueueRange {
            queue: queue.clone(),
            start: 0,
            end: 400,
        }];
        let mut now = Instant::now();
        let mut catch_ups = CatchUps::default();
        let missing = store.catch_up_plan(1, &ranges).expect("plans");
        catch_ups.start(now, 1, 2, &[2, 3], missing);
        // Every record fetched and written, by offset: none twice.
        let mut written: BTreeMap<Offset, u32> = BTreeMap::new();
        let mut fetch = |catch_ups: &mut CatchUps, store: &mut QueueStore, now, damage| {
            let mut actions = catch_ups.poll(now, store).expect("polls");
            let Some(Action::Send(to, frame)) = actions.pop() else {
                panic!("no fetch");
            };
            let (id, queue, from, records) = serve(&mut peer, &frame, damage);
            catch_ups
                .fetched(now, to, id, 1, &queue, from, Ok(records), store)
                .expect("the store is fine");
            let end = store.catch_up_plan(1, &ranges).expect("plans");
            let end = end.first().map_or(400, |(_, from, _)| *from);
            for offset in from..end {
                *written.entry(offset).or_default() += 1;
            }
            (to, from, end)
        };
        // Peer 2 serves three chunks, then dies: its fourth fetch is never answered.
        let mut stopped = 0;
        for _ in 0..3 {
            let (to, from, end) = fetch(&mut catch_ups, &mut store, now, false);
            assert_eq!((to, from), (2, stopped));
            stopped = end;
        }
        assert!(stopped > 0 && stopped < 400, "{stopped}");
        let Some(Action::Send(2, _)) = catch_ups.poll(now, &mut store).expect("polls").pop() else {
            panic!("no fourth fetch");
        };
        now += Duration::from_millis(FETCH_WAIT_MS);
        // Peer 3 is asked from where peer 2 stopped; its chunk arrives damaged and is refused
        // whole, then asked again (of the next peer in turn) from the same place.
        let (to, from, end) = fetch(&mut catch_ups, &mut store, now, true);
        assert_eq!(
            (to, from, end),
            (3, stopped, stopped),
            "a bad chunk wrote nothing"
        );
        now += Duration::from_millis(FETCH_RETRY_MS);
        let (_, from, end) = fetch(&mut catch_ups, &mut store, now, false);
        assert_eq!(from, stopped);
        assert!(end > stopped);
        stopped = end;
        // A newer snapshot comes meanwhile (here with the same ranges): its plan asks only for
        // what the store lacks.
        let missing = store.catch_up_plan(1, &ranges).expect("plans");
        assert_eq!(missing, vec![(queue.clone(), stopped, 400)]);
        catch_ups.start(now, 1, 3, &[2, 3], missing);
        loop {
            let (_, from, end) = fetch(&mut catch_ups, &mut store, now, false);
            assert_eq!(from, stopped);
            stopped = end;
            if stopped == 400 {
                break;
            }
        }
        assert!(matches!(
            catch_ups.poll(now, &mut store).expect("polls").pop(),
            Some(Action::Sync(1, _))
        ));
        assert_eq!(written.len(), 400);
        assert!(written.values().all(|n| *n == 1), "a record fetched twice");
        for offset in [0, stopped - 1, 399] {
            assert_eq!(
                store.message(1, &queue, offset).expect("reads"),
                peer.message(1, &queue, offset).expect("reads")
            );
        }
    }
}

/// The hold's bound: a catch-up that holds [`CatchUps::full`] pauses its group, which then takes
/// no input that adds to the hold, loses nothing, and answers nothing that is not durable.
#[cfg(test)]
mod bound_tests {
    use super::*;
    use holdfast_core::broker::{Command, Message, encode_command};
    use holdfast_core::node::NodeConfig;
    use holdfast_core::node::protocol::{Request, Response};
    use holdfast_core::raft::{Entry, EntryKind, HardState, Recovered, Role};
    use holdfast_core::time::Instant as CoreInstant;

    const HELD_BYTES_MAX: u64 = 64 << 10;

    /// The server's `drain` in small: store operations and writes of a group that catches up
    /// are held (and the group paused once the hold is full); the rest are carried out, every
    /// write synced at once.
    struct Driver {
        node: BrokerNode,
        store: QueueStore,
        catch_ups: CatchUps,
        now: CoreInstant,
        responses: Vec<Response>,
        /// The most the catch-up held after any step.
        held_most: u64,
    }

    impl Driver {
        fn drain(&mut self) {
            for _ in 0..100_000 {
                let mut quiet = true;
                while let Some((group, op)) = self.node.poll_store() {
                    quiet = false;
                    if self.catch_ups.holds(group) {
                        self.catch_ups.hold_op(group, op);
                        self.catch_ups
                            .pause_if_full(&mut self.node, self.now, group);
                    } else {
                        self.store.apply(group, op).expect("applies");
                    }
                }
                if self.node.replaying() {
                    self.node.replay(self.now);
                    continue;
                }
                while let Some((group, write)) = self.node.poll_write() {
                    quiet = false;
                    if self.catch_ups.holds(group) {
                        self.catch_ups.hold_write(group, write);
                        self.catch_ups
                            .pause_if_full(&mut self.node, self.now, group);
                    } else {
                        self.node.persisted(self.now, group, write.id);
                    }
                }
                while let Some((_, _, response)) = self.node.poll_response() {
                    self.responses.push(response);
                }
                self.held_most = self.held_most.max(self.catch_ups.held_bytes(1));
                if quiet {
                    return;
                }
            }
            panic!("the node never settles");
        }

        /// Serves every fetch from `peer`, syncs, releases the held writes and resumes the
        /// group, as the server does.
        fn finish_catch_up(&mut self, peer: &mut QueueStore) {
            let started = Instant::now();
            for _ in 0..1000 {
                let actions = self
                    .catch_ups
                    .poll(started, &mut self.store)
                    .expect("polls");
                for action in actions {
                    match action {
                        Action::Send(to, frame) => {
                            let Frame::Fetch {
                                id,
                                group,
                                queue,
                                from,
                                end,
                                bytes_max,
                            } = frame
                            else {
                                panic!("not a fetch");
                            };
                            let records = peer
                                .chunk(group, &queue, from, end, bytes_max as usize)
                                .expect("reads");
                            self.catch_ups
                                .fetched(
                                    started,
                                    to,
                                    id,
                                    group,
                                    &queue,
                                    from,
                                    Ok(records),
                                    &mut self.store,
                                )
                                .expect("fills");
                        }
                        Action::Sync(group, plan) => {
                            plan.run().expect("syncs");
                            let released = self
                                .catch_ups
                                .synced(started, group, Ok(()))
                                .expect("synced")
                                .expect("released");
                            // The server: the held writes go to the storage thread, in order,
                            // and only their sync answers for them.
                            for write in released {
                                self.node.persisted(self.now, group, write.id);
                            }
                            if self.node.paused(group) {
                                self.node.resume(self.now, group);
                            }
                            self.drain();
                            return;
                        }
                    }
                }
            }
            panic!("the catch-up never ends");
        }
    }

    /// A peer's store holding `records` messages of `fetched`, and the plan of a store that
    /// lacks them all.
    fn peer_with(
        dir: &std::path::Path,
        store: &mut QueueStore,
        fetched: &QueueId,
        records: Offset,
    ) -> (QueueStore, Vec<(QueueId, Offset, Offset)>) {
        let mut peer = QueueStore::open(dir).expect("opens");
        for offset in 0..records {
            super::tests::write(&mut peer, fetched, offset);
        }
        let range = holdfast_core::broker::QueueRange {
            queue: fetched.clone(),
            start: 0,
            end: records,
        };
        let missing = store.catch_up_plan(1, &[range]).expect("plans");
        (peer, missing)
    }

    /// A repair at start (the snapshot's segments are fetched while the recovered log
    /// replays): the replay's store writes are held up to the bound, then the replay waits;
    /// once the catch-up ends, it goes on and the store ends with every message of the log.
    #[test]
    fn a_repair_at_start_holds_at_most_its_bound_of_the_replay_and_then_waits() {
        let dirs: Vec<_> = (0..2)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let queue = QueueId::new("orders", 0);
        let body = "m".repeat(1024);
        let mut entries = vec![Entry {
            term: 1,
            index: 1,
            kind: EntryKind::Commands(vec![encode_command(&Command::CreateQueues {
                queues: vec![queue.clone()],
            })]),
        }];
        for index in 2..=300u64 {
            let append = Command::Append {
                queue: queue.clone(),
                producer_id: 7,
                first_seq: index * 4,
                messages: (0..4).map(|_| Message::with_body(body.clone())).collect(),
                stamp_ms: index,
            };
            entries.push(Entry {
                term: 1,
                index,
                kind: EntryKind::Commands(vec![encode_command(&append)]),
            });
        }
        let disk = Recovered {
            hard_state: HardState {
                term: 1,
                vote: None,
                commit: 300,
            },
            snapshot: None,
            entries,
        };
        let mut config = NodeConfig::new(1, vec![1, 2, 3], 1);
        config.replay_store_bytes_max = 16 << 10;
        let mut node = BrokerNode::new(config, BTreeMap::from([(1, disk)]), 5, CoreInstant::ZERO);
        let mut store = QueueStore::open(dirs[1].path()).expect("opens");
        // The state's start comes first (where a snapshot's `Recover` would start the repair).
        let first = node.poll_store();
        assert!(matches!(first, Some((1, StoreOp::Reset))), "{first:?}");
        store.apply(1, StoreOp::Reset).expect("resets");
        let fetched = QueueId::new("fetched", 0);
        let (mut peer, missing) = peer_with(dirs[0].path(), &mut store, &fetched, 10);
        let mut catch_ups = CatchUps {
            held_bytes_max: HELD_BYTES_MAX,
            ..CatchUps::default()
        };
        catch_ups.start(Instant::now(), 1, 2, &[2, 3], missing);
        let mut driver = Driver {
            node,
            store,
            catch_ups,
            now: CoreInstant::ZERO,
            responses: Vec::new(),
            held_most: 0,
        };
        driver.drain();
        // One replay step past the bound at most: 16 KiB and an entry of four 1 KiB records.
        let step_max = (16 << 10) + 4 * (64 + 1024 + 256);
        assert!(driver.catch_ups.full(1), "the hold filled");
        assert!(
            driver.held_most <= HELD_BYTES_MAX + step_max,
            "held {} bytes, over {HELD_BYTES_MAX} + {step_max}",
            driver.held_most
        );
        assert!(driver.node.paused(1));
        let status = driver.node.replica(1).expect("group 1").status();
        assert!(
            status.applied_index < 150,
            "the replay went on past the hold: {}",
            status.applied_index
        );
        // Time passes, timers fire: still nothing more is applied or held.
        let held = driver.catch_ups.held_bytes(1);
        for _ in 0..20 {
            driver.now = driver.now + std::time::Duration::from_millis(100);
            driver.node.handle_timeout(driver.now);
            driver.drain();
        }
        assert_eq!(
            driver
                .node
                .replica(1)
                .expect("group 1")
                .status()
                .applied_index,
            status.applied_index
        );
        assert!(
            driver.catch_ups.held_bytes(1) <= held + 1024,
            "held grew while paused"
        );
        driver.finish_catch_up(&mut peer);
        assert!(!driver.node.paused(1) && !driver.catch_ups.holds(1));
        assert!(!driver.node.replaying());
        let status = driver.node.replica(1).expect("group 1").status();
        assert_eq!(status.applied_index, 300, "the replay ended");
        // Every message of the log is in the store, in order, and the fetched ones too.
        for offset in 0..299 * 4 {
            let stored = driver.store.message(1, &queue, offset).expect("stored");
            assert_eq!(stored.seq, 8 + offset, "orders@{offset}");
        }
        assert!(driver.store.message(1, &queue, 299 * 4).is_err());
        assert_eq!(
            driver.store.message(1, &fetched, 9).expect("reads"),
            peer.message(1, &fetched, 9).expect("reads")
        );
    }

    /// A leader whose store catches up while producers send: its writes are held up to the
    /// bound, then sends are answered `Busy` (nothing taken, so nothing lost); what it took is
    /// answered only once its write is synced, after the catch-up, and then it takes sends
    /// again.
    #[test]
    fn a_leader_catching_up_answers_busy_past_its_bound_and_acks_only_what_is_durable() {
        let dirs: Vec<_> = (0..2)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let node = BrokerNode::new(
            NodeConfig::new(1, vec![1], 1),
            BTreeMap::new(),
            5,
            CoreInstant::ZERO,
        );
        let mut driver = Driver {
            node,
            store: QueueStore::open(dirs[1].path()).expect("opens"),
            catch_ups: CatchUps {
                held_bytes_max: HELD_BYTES_MAX,
                ..CatchUps::default()
            },
            now: CoreInstant::ZERO,
            responses: Vec::new(),
            held_most: 0,
        };
        let tick = |driver: &mut Driver| {
            driver.now = driver.now + std::time::Duration::from_millis(10);
            driver.node.handle_timeout(driver.now);
            driver.drain();
        };
        for _ in 0..100 {
            tick(&mut driver);
        }
        for group in [0, 1] {
            let role = driver.node.replica(group).expect("a group").status().role;
            assert_eq!(role, Role::Leader, "group {group}");
        }
        let queue = QueueId::new("orders", 0);
        let mut next_request = 1;
        let mut request = |driver: &mut Driver, request: Request| {
            next_request += 1;
            driver
                .node
                .handle_request(driver.now, 1, next_request, request);
            driver.drain();
            driver.responses.drain(..).collect::<Vec<_>>()
        };
        let answers = request(
            &mut driver,
            Request::CreateTopic {
                topic: "orders".into(),
                queues: 1,
            },
        );
        assert!(
            matches!(answers.as_slice(), [Response::TopicCreated { .. }]),
            "{answers:?}"
        );
        for _ in 0..10 {
            tick(&mut driver);
        }
        let body = "s".repeat(4096);
        let mut seq = 0;
        let mut send = |driver: &mut Driver| {
            seq += 4;
            request(
                driver,
                Request::Send {
                    broker: 1,
                    queue: queue.clone(),
                    producer_id: 9,
                    first_seq: seq,
                    messages: (0..4).map(|_| Message::with_body(body.clone())).collect(),
                },
            )
        };
        let answers = send(&mut driver);
        assert!(
            matches!(answers.as_slice(), [Response::Sent { base_offset: 0, .. }]),
            "{answers:?}"
        );
        // The store catches up (from a peer that does not answer yet) while producers send.
        let fetched = QueueId::new("fetched", 0);
        let (mut peer, missing) = peer_with(dirs[0].path(), &mut driver.store, &fetched, 10);
        driver.catch_ups.start(Instant::now(), 1, 2, &[2], missing);
        let (mut taken, mut busy) = (0, 0);
        for _ in 0..200 {
            let answers = send(&mut driver);
            match answers.as_slice() {
                [] => taken += 1,
                [Response::Busy] => busy += 1,
                other => panic!("answered before its write is durable: {other:?}"),
            }
        }
        // One send's entry past the bound at most: four 4 KiB messages and their framing.
        let entry_max = 4 * (4096 + 256) + 256;
        assert!(
            driver.held_most <= HELD_BYTES_MAX + entry_max,
            "held {} bytes, over {HELD_BYTES_MAX} + {entry_max}",
            driver.held_most
        );
        assert!(driver.node.paused(1), "the hold filled");
        assert!(taken > 0 && busy > 150, "{taken} taken, {busy} busy");
        driver.finish_catch_up(&mut peer);
        assert!(!driver.node.paused(1));
        // Everything taken is answered now that its write is synced, and stored.
        let answers: Vec<Response> = driver.responses.drain(..).collect();
        assert_eq!(answers.len(), taken, "{answers:?}");
        for (n, answer) in answers.iter().enumerate() {
            let Response::Sent { base_offset, .. } = answer else {
                panic!("{answer:?}");
            };
            assert_eq!(*base_offset, 4 * (n as Offset + 1));
        }
        assert!(
            driver
                .store
                .message(1, &queue, 4 * taken as Offset + 3)
                .is_ok()
        );
        // And it takes sends again.
        let answers = send(&mut driver);
        assert!(
            matches!(answers.as_slice(), [Response::Sent { .. }]),
            "{answers:?}"
        );
    }
}
