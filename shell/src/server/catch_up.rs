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
//! Memory: one chunk in flight per group, plus the writes and store operations held meanwhile
//! (the replica gets no new entries from a leader that waits for its snapshot answer).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use holdfast_core::broker::{Offset, QueueId, StoreOp};
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
    /// The group's store operations since the catch-up began, in order (entries applied
    /// after a leader change; carried out once every fetched record is written).
    ops: Vec<StoreOp>,
    syncing: bool,
    started: Instant,
    bytes: u64,
    refused: u64,
}

#[derive(Default)]
pub struct CatchUps {
    groups: BTreeMap<GroupId, CatchUp>,
    next_id: u64,
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
            ops: Vec::new(),
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
    }

    /// Whether `group` is catching up: its writes and store operations must be held.
    pub fn holds(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    pub fn hold_write(&mut self, group: GroupId, write: Write) {
        if let Some(c) = self.groups.get_mut(&group) {
            c.writes.push_back(write);
        }
    }

    pub fn hold_op(&mut self, group: GroupId, op: StoreOp) {
        if let Some(c) = self.groups.get_mut(&group) {
            c.ops.push(op);
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
    use holdfast_core::broker::{Message, QueueRange, StoredMessage, encode_record};

    fn write(store: &mut QueueStore, queue: &QueueId, offset: Offset) {
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
            record: encode_record(offset, &stored),
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
}
