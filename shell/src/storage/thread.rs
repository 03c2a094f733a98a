//! The storage thread: group commit for every group of a node.
//!
//! The event loop must never wait on a disk, and an fsync per message would cap a node at the
//! disk's sync rate. So the loop hands writes over a channel, and this thread takes everything
//! queued at once, applies it, syncs each touched group once, and reports per group only the
//! highest write id (the core reads `persisted(id)` as "this and every earlier write"). The
//! longer a sync takes, the more the next batch holds.
//!
//! Once the queue has stayed empty for [`SYNCED_RECORD_DELAY`], the thread records in each
//! group's synced record how far its log is synced (one more fdatasync per group that wrote).
//! That record is what lets recovery call a bad last record damage rather than a torn tail;
//! a busy node never waits for it, since a batch that follows makes the previous one's records
//! detectable anyway (a valid record behind damage is damage). What stays unprotected is the
//! last batch before a crash that came within the delay.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use holdfast_core::raft::{GroupId, Write, WriteId};
use tracing::{error, warn};

use super::{GroupStore, StorageError};

/// At most this many writes go into one batch, so a producer that never lets the queue run
/// empty still gets syncs (and reports).
const BATCH_WRITES_MAX: usize = 4096;

/// How long the queue must stay empty before the synced records are brought up to date. Short
/// enough that an idle node soon has every acknowledged record covered, long enough that a
/// steady stream of small writes (one at a time, every millisecond or so) never pays an extra
/// fdatasync between two of its batches.
const SYNCED_RECORD_DELAY: Duration = Duration::from_millis(20);

type Done = Result<(GroupId, WriteId), (GroupId, StorageError)>;

#[derive(Default)]
struct Shared {
    done: Mutex<Vec<Done>>,
    fsyncs: AtomicU64,
    batches: AtomicU64,
    /// Where sync latencies and sizes go, when the server exports metrics.
    metrics: Option<crate::metrics::ShellMetrics>,
}

impl Shared {
    fn report(&self, reports: Vec<Done>) {
        // A poisoned lock only means another thread panicked while holding it; the Vec is
        // still a valid list of reports.
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        done.extend(reports);
    }
}

/// Owns every group's [`GroupStore`] on a thread of its own.
pub struct StorageThread {
    sender: Sender<(GroupId, Write)>,
    /// Stores of groups created at runtime (broker groups added to a running cluster). Sent
    /// before any write of theirs, so the thread finds each when it takes the first write.
    stores: Sender<(GroupId, GroupStore)>,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
    /// Files the groups' logs no longer need, for the remover thread; `None` when it could
    /// not start (the stores then remove them in their syncs).
    remover: Option<Sender<PathBuf>>,
    remover_handle: Option<JoinHandle<()>>,
}

impl StorageThread {
    /// Starts the thread. `notify` runs on it after each batch that produced reports, to wake
    /// the event loop, which then calls [`StorageThread::poll_done`].
    pub fn spawn(
        stores: BTreeMap<GroupId, GroupStore>,
        notify: Box<dyn Fn() + Send>,
    ) -> StorageThread {
        StorageThread::spawn_measured(stores, notify, None)
    }

    /// [`StorageThread::spawn`], recording each sync's latency, entries and bytes in `metrics`.
    pub fn spawn_measured(
        mut stores: BTreeMap<GroupId, GroupStore>,
        notify: Box<dyn Fn() + Send>,
        metrics: Option<crate::metrics::ShellMetrics>,
    ) -> StorageThread {
        let (remover, remover_handle) = match spawn_remover() {
            Some((remover, handle)) => (Some(remover), Some(handle)),
            None => (None, None),
        };
        if let Some(remover) = &remover {
            for store in stores.values_mut() {
                store.remove_unneeded_with(remover.clone());
            }
        }
        let (sender, receiver) = mpsc::channel();
        let (stores_sender, stores_receiver) = mpsc::channel();
        let shared = Arc::new(Shared {
            metrics,
            ..Shared::default()
        });
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("holdfast-storage".to_string())
            .spawn(move || {
                run(
                    stores,
                    &receiver,
                    &stores_receiver,
                    &thread_shared,
                    &*notify,
                )
            });
        let handle = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // The receiver is gone with the closure, so every submit reports ThreadGone.
                error!("cannot start the storage thread: {e}");
                None
            }
        };
        StorageThread {
            sender,
            stores: stores_sender,
            shared,
            handle,
            remover,
            remover_handle,
        }
    }

    /// Hands the thread the store of a group created at runtime; submit its writes after.
    pub fn add_store(&self, group: GroupId, mut store: GroupStore) {
        if let Some(remover) = &self.remover {
            store.remove_unneeded_with(remover.clone());
        }
        if self.stores.send((group, store)).is_err() {
            self.shared
                .report(vec![Err((group, StorageError::ThreadGone))]);
        }
    }

    /// Queues `write` for `group`; never blocks on the disk.
    pub fn submit(&self, group: GroupId, write: Write) {
        if self.sender.send((group, write)).is_err() {
            self.shared
                .report(vec![Err((group, StorageError::ThreadGone))]);
        }
    }

    /// Takes the reports so far, without blocking: `Ok((group, id))` means every write of
    /// `group` up to `id` is durable; `Err` comes once per failed group, and no later write of
    /// that group is ever reported.
    pub fn poll_done(&self) -> Vec<Result<(GroupId, WriteId), (GroupId, StorageError)>> {
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *done)
    }

    /// How many `fdatasync`s the thread has made (state, synced record, snapshot and log files,
    /// and directories, together).
    pub fn syncs(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// How many batches the thread has taken off the queue.
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Writes and syncs everything submitted so far, then joins the thread.
    pub fn shutdown(self) {
        let StorageThread {
            sender,
            stores,
            handle,
            remover,
            remover_handle,
            ..
        } = self;
        // The thread sees the channel close only after it has drained every queued write.
        drop(sender);
        drop(stores);
        if let Some(Err(_)) = handle.map(JoinHandle::join) {
            error!("the storage thread panicked");
        }
        // The stores, and their senders, went with the storage thread: the remover ends once
        // it has removed what they sent.
        drop(remover);
        if let Some(Err(_)) = remover_handle.map(JoinHandle::join) {
            error!("the file remover thread panicked");
        }
    }
}

/// Starts the thread that removes files the groups' logs no longer need: compacted segments
/// and older snapshots. Their removal is never waited for: recovery skips and removes segments
/// the newest snapshot holds entirely, and the next snapshot removes every older one, so a
/// crash (or a failed unlink) leaves only disk space to reclaim later.
fn spawn_remover() -> Option<(Sender<PathBuf>, JoinHandle<()>)> {
    let (remover, unneeded) = mpsc::channel::<PathBuf>();
    let spawned = std::thread::Builder::new()
        .name("holdfast-remover".to_string())
        .spawn(move || {
            for path in unneeded {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => warn!(
                        path = %path.display(),
                        "cannot remove a file the log no longer needs ({e}); the next start (a segment) or snapshot (an older snapshot) removes it"
                    ),
                }
            }
        });
    match spawned {
        Ok(handle) => Some((remover, handle)),
        Err(e) => {
            error!("cannot start the file remover thread ({e}); files are removed in syncs");
            None
        }
    }
}

fn run(
    mut stores: BTreeMap<GroupId, GroupStore>,
    receiver: &Receiver<(GroupId, Write)>,
    added: &Receiver<(GroupId, GroupStore)>,
    shared: &Shared,
    notify: &dyn Fn(),
) {
    let mut failed: BTreeSet<GroupId> = BTreeSet::new();
    // Recovery leaves the synced position in memory; record it once the node settles.
    let mut record_due = true;
    loop {
        let received = if record_due {
            match receiver.recv_timeout(SYNCED_RECORD_DELAY) {
                Err(RecvTimeoutError::Timeout) => {
                    record_synced(&mut stores, &mut failed, shared, notify);
                    record_due = false;
                    continue;
                }
                other => other.ok(),
            }
        } else {
            receiver.recv().ok()
        };
        // The channel closed (shutdown) once every queued write was taken.
        let Some(first) = received else {
            break;
        };
        record_due = true;
        // A store is sent before the first write of its group, so it is here by now.
        stores.extend(added.try_iter());
        let mut reports = Vec::new();
        let mut last_ids: BTreeMap<GroupId, WriteId> = BTreeMap::new();
        // Per group: when its first write of the batch started, entries and command bytes.
        let mut sizes: BTreeMap<GroupId, (std::time::Instant, u64, u64)> = BTreeMap::new();
        let queued = receiver.try_iter().take(BATCH_WRITES_MAX - 1);
        for (group, write) in std::iter::once(first).chain(queued) {
            if failed.contains(&group) {
                continue;
            }
            let size = sizes
                .entry(group)
                .or_insert((std::time::Instant::now(), 0, 0));
            size.1 += write.entries.len() as u64;
            size.2 += write
                .entries
                .iter()
                .map(|e| e.command_bytes() as u64)
                .sum::<u64>();
            let result = match stores.get_mut(&group) {
                Some(store) => store.write(&write),
                None => Err(StorageError::UnknownGroup { group }),
            };
            match result {
                Ok(()) => {
                    last_ids.insert(group, write.id);
                }
                Err(e) => {
                    failed.insert(group);
                    last_ids.remove(&group);
                    reports.push(Err((group, e)));
                }
            }
        }
        for (group, id) in last_ids {
            let Some(store) = stores.get_mut(&group) else {
                continue;
            };
            let before = store.fsyncs();
            let result = store.sync();
            let synced = store.fsyncs().saturating_sub(before);
            shared.fsyncs.fetch_add(synced, Ordering::Relaxed);
            if let Some(metrics) = &shared.metrics {
                metrics.fsyncs.inc_by(synced);
                if let (Ok(()), Some((started, entries, bytes))) = (&result, sizes.get(&group)) {
                    metrics.synced(started.elapsed(), *entries, *bytes);
                }
            }
            match result {
                Ok(()) => reports.push(Ok((group, id))),
                Err(e) => {
                    failed.insert(group);
                    reports.push(Err((group, e)));
                }
            }
        }
        shared.batches.fetch_add(1, Ordering::Relaxed);
        if !reports.is_empty() {
            shared.report(reports);
            notify();
        }
    }
    // A clean stop leaves every group's synced position recorded.
    record_synced(&mut stores, &mut failed, shared, notify);
}

/// Brings every healthy group's synced record up to date; a failure is that group's end, as
/// any other I/O error is.
fn record_synced(
    stores: &mut BTreeMap<GroupId, GroupStore>,
    failed: &mut BTreeSet<GroupId>,
    shared: &Shared,
    notify: &dyn Fn(),
) {
    let mut reports = Vec::new();
    for (group, store) in stores.iter_mut() {
        if failed.contains(group) {
            continue;
        }
        let before = store.fsyncs();
        let result = store.record_synced();
        let synced = store.fsyncs().saturating_sub(before);
        shared.fsyncs.fetch_add(synced, Ordering::Relaxed);
        if let Some(metrics) = &shared.metrics {
            metrics.fsyncs.inc_by(synced);
        }
        if let Err(e) = result {
            failed.insert(*group);
            reports.push(Err((*group, e)));
        }
    }
    if !reports.is_empty() {
        shared.report(reports);
        notify();
    }
}
