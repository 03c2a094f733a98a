//! The storage threads: group commit for every group of a node, one thread per group.
//!
//! The event loop must never wait on a disk, and an fsync per message would cap a node at the
//! disk's sync rate. So the loop hands writes over a channel, and each group's thread takes
//! everything queued for it at once, applies it, syncs once, and reports only the highest
//! write id (the core reads `persisted(id)` as "this and every earlier write"). The longer a
//! sync takes, the more the next batch holds.
//!
//! One thread per group rather than one for the node: each group's log is its own file, and
//! no group's durability depends on another's, so their fdatasyncs need not queue behind one
//! another. On the virtio disk of BENCHMARKS.md's machine a lone thread's append-and-fdatasync
//! took 3.6 ms, while two threads doing the same each completed one every 0.6-1.3 ms: the
//! file system commits concurrent syncs together.
//!
//! Once a group's queue has stayed empty for [`SYNCED_RECORD_DELAY`], its thread records in
//! the group's synced record how far its log is synced (one more fdatasync). That record is
//! what lets recovery call a bad last record damage rather than a torn tail; a busy group
//! never waits for it, since a batch that follows makes the previous one's records detectable
//! anyway (a valid record behind damage is damage). What stays unprotected is the last batch
//! before a crash that came within the delay.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// What the event loop runs after reports were added, to wake itself.
type Notify = Mutex<Box<dyn Fn() + Send>>;

struct Shared {
    done: Mutex<Vec<Done>>,
    fsyncs: AtomicU64,
    batches: AtomicU64,
    /// Where sync latencies and sizes go, when the server exports metrics.
    metrics: Option<crate::metrics::ShellMetrics>,
    notify: Notify,
    /// Groups an error was reported for: nothing of theirs is reported again.
    failed: Mutex<BTreeSet<GroupId>>,
}

impl Shared {
    /// Adds `report` and wakes the event loop.
    fn report(&self, report: Done) {
        if let Err((group, _)) = &report {
            self.failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(*group);
        }
        {
            // A poisoned lock only means another thread panicked while holding it; the Vec
            // is still a valid list of reports.
            let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
            done.push(report);
        }
        let notify = self.notify.lock().unwrap_or_else(PoisonError::into_inner);
        notify();
    }

    fn count_fsyncs(&self, synced: u64) {
        self.fsyncs.fetch_add(synced, Ordering::Relaxed);
        if let Some(metrics) = &self.metrics {
            metrics.fsyncs.inc_by(synced);
        }
    }
}

/// One group's thread and the way to it.
struct Worker {
    sender: Sender<Write>,
    handle: Option<JoinHandle<()>>,
}

/// Owns every group's [`GroupStore`], each on a thread of its own.
pub struct StorageThread {
    workers: Mutex<BTreeMap<GroupId, Worker>>,
    shared: Arc<Shared>,
    /// Files the groups' logs no longer need, for the remover thread; `None` when it could
    /// not start (the stores then remove them in their syncs).
    remover: Option<Sender<PathBuf>>,
    remover_handle: Option<JoinHandle<()>>,
}

impl StorageThread {
    /// Starts the threads. `notify` runs on one of them after each batch that produced
    /// reports, to wake the event loop, which then calls [`StorageThread::poll_done`].
    pub fn spawn(
        stores: BTreeMap<GroupId, GroupStore>,
        notify: Box<dyn Fn() + Send>,
    ) -> StorageThread {
        StorageThread::spawn_measured(stores, notify, None)
    }

    /// [`StorageThread::spawn`], recording each sync's latency, entries and bytes in `metrics`.
    pub fn spawn_measured(
        stores: BTreeMap<GroupId, GroupStore>,
        notify: Box<dyn Fn() + Send>,
        metrics: Option<crate::metrics::ShellMetrics>,
    ) -> StorageThread {
        let (remover, remover_handle) = match spawn_remover() {
            Some((remover, handle)) => (Some(remover), Some(handle)),
            None => (None, None),
        };
        let thread = StorageThread {
            workers: Mutex::new(BTreeMap::new()),
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::new()),
                fsyncs: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                metrics,
                notify: Mutex::new(notify),
                failed: Mutex::new(BTreeSet::new()),
            }),
            remover,
            remover_handle,
        };
        for (group, store) in stores {
            thread.add_store(group, store);
        }
        thread
    }

    /// Hands over the store of a group created at runtime, on a thread of its own; submit its
    /// writes after.
    pub fn add_store(&self, group: GroupId, mut store: GroupStore) {
        if let Some(remover) = &self.remover {
            store.remove_unneeded_with(remover.clone());
        }
        // Never two threads on one group's files: a store handed over again (which the server
        // does not do) takes over only once the first one's thread has finished its queue.
        let replaced = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&group);
        if let Some(Worker {
            sender,
            handle: Some(handle),
        }) = replaced
        {
            drop(sender);
            if handle.join().is_err() {
                error!(group, "the group's storage thread panicked");
            }
        }
        let (sender, receiver) = mpsc::channel();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            // Thread names are cut at 15 bytes: "holdfast-log-12".
            .name(format!("holdfast-log-{group}"))
            .spawn(move || run(group, store, &receiver, &shared));
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        match spawned {
            Ok(handle) => {
                let worker = Worker {
                    sender,
                    handle: Some(handle),
                };
                workers.insert(group, worker);
            }
            Err(e) => {
                error!(group, "cannot start the group's storage thread: {e}");
                // Every write of the group is refused (the receiver went with the closure).
                workers.insert(
                    group,
                    Worker {
                        sender,
                        handle: None,
                    },
                );
            }
        }
    }

    /// Queues `write` for `group`; never blocks on the disk.
    pub fn submit(&self, group: GroupId, write: Write) {
        let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        let error = match workers.get(&group) {
            Some(worker) => match worker.sender.send(write) {
                Ok(()) => return,
                // The thread ended: after a failure it reported, or it never started, or it
                // panicked (and the write can never become durable).
                Err(_) => StorageError::ThreadGone,
            },
            None => StorageError::UnknownGroup { group },
        };
        drop(workers);
        let reported = self
            .shared
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&group);
        if !reported {
            self.shared.report(Err((group, error)));
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

    /// How many `fdatasync`s the threads have made (state, synced record, snapshot and log
    /// files, and directories, together).
    pub fn syncs(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// How many batches the threads have taken off their queues.
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Writes and syncs everything submitted so far, then joins the threads.
    pub fn shutdown(self) {
        let StorageThread {
            workers,
            remover,
            remover_handle,
            ..
        } = self;
        let workers = workers.into_inner().unwrap_or_else(PoisonError::into_inner);
        // Each thread sees its channel close only after it has drained every queued write.
        // Every channel closes before the first join, so the groups finish side by side.
        let handles: Vec<(GroupId, Option<JoinHandle<()>>)> = workers
            .into_iter()
            .map(|(group, worker)| (group, worker.handle))
            .collect();
        for (group, handle) in handles {
            if let Some(Err(_)) = handle.map(JoinHandle::join) {
                error!(group, "the group's storage thread panicked");
            }
        }
        // The stores, and their senders, went with their threads: the remover ends once it
        // has removed what they sent.
        drop(remover);
        if let Some(Err(_)) = remover_handle.map(JoinHandle::join) {
            error!("the file remover thread panicked");
        }
    }
}

/// One group's thread: batches, syncs and reports until its channel closes or its store
/// fails (after which nothing of the group is reported again).
fn run(group: GroupId, mut store: GroupStore, receiver: &Receiver<Write>, shared: &Shared) {
    // Recovery leaves the synced position in memory; record it once the group settles.
    let mut record_due = true;
    loop {
        let received = if record_due {
            match receiver.recv_timeout(SYNCED_RECORD_DELAY) {
                Err(RecvTimeoutError::Timeout) => {
                    if !record_synced(group, &mut store, shared) {
                        return;
                    }
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
        let started = Instant::now();
        let (mut entries, mut bytes) = (0u64, 0u64);
        let mut last_id = first.id;
        let queued = receiver.try_iter().take(BATCH_WRITES_MAX - 1);
        for write in std::iter::once(first).chain(queued) {
            entries += write.entries.len() as u64;
            bytes += write
                .entries
                .iter()
                .map(|e| e.command_bytes() as u64)
                .sum::<u64>();
            if let Err(e) = store.write(&write) {
                shared.report(Err((group, e)));
                return;
            }
            last_id = write.id;
        }
        shared.batches.fetch_add(1, Ordering::Relaxed);
        let before = store.fsyncs();
        let result = store.sync();
        shared.count_fsyncs(store.fsyncs().saturating_sub(before));
        match result {
            Ok(()) => {
                if let Some(metrics) = &shared.metrics {
                    metrics.synced(started.elapsed(), entries, bytes);
                }
                shared.report(Ok((group, last_id)));
            }
            Err(e) => {
                shared.report(Err((group, e)));
                return;
            }
        }
    }
    // A clean stop leaves the group's synced position recorded.
    record_synced(group, &mut store, shared);
}

/// Brings the group's synced record up to date; a failure is the group's end, as any other
/// I/O error is (reported, and false returned).
fn record_synced(group: GroupId, store: &mut GroupStore, shared: &Shared) -> bool {
    let before = store.fsyncs();
    let result = store.record_synced();
    shared.count_fsyncs(store.fsyncs().saturating_sub(before));
    match result {
        Ok(()) => true,
        Err(e) => {
            shared.report(Err((group, e)));
            false
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
