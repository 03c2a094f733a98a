//! A thread that encodes snapshots and writes their files, reads the segment chunks peers
//! fetch, and syncs what a catch-up fetched, so neither the event loop nor the storage thread
//! stalls on them. A broker group's snapshot holds only metadata and refers to the queue
//! store: the thread fsyncs the group's store files ([`QueueStore::sync_group`]) before it
//! writes the snapshot file, and reports the snapshot failed (its log then stays
//! uncompacted) if that sync fails. The file is durable before the core hears of the
//! snapshot, so the storage thread, when the core's write asks for it, finds it in place and
//! only checks its header.
//!
//! A follower behind the leader's compaction point installs the metadata snapshot and fetches
//! the segments it lacks (`catch_up.rs`); this thread serves such fetches one bounded chunk at
//! a time, read straight from the segment files, so the retained bytes never pass through
//! memory at once on either side.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use holdfast_core::broker::{Offset, QueueId};
use holdfast_core::node::SnapshotJob;
use holdfast_core::raft::{GroupId, Index, NodeId, Snapshot};
use holdfast_core::wire::Frame;
use tracing::{debug, warn};

use crate::storage::{QueueStore, SyncPlan, write_snapshot_file};

/// A job done.
pub enum Done {
    /// `(group, index, the data or why not)`.
    Snapshot(GroupId, Index, Result<Bytes, String>),
    /// The answer to a peer's [`Frame::Fetch`], to send to `to`.
    Fetched { to: NodeId, frame: Frame },
    /// What a catch-up of `group` fetched is synced (or why not: the store has failed).
    CatchUpSynced(GroupId, Result<(), String>),
}

/// A peer's request for records of the queue store.
pub struct Fetch {
    pub to: NodeId,
    pub id: u64,
    pub group: GroupId,
    pub queue: QueueId,
    pub from: Offset,
    pub end: Offset,
    pub bytes_max: usize,
}

enum Job {
    Snapshot(Box<SnapshotJob>),
    Fetch(Fetch),
    Sync(GroupId, SyncPlan),
}

pub struct SnapshotEncoder {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotEncoder {
    /// `notify` wakes the event loop when a job is done; `data_dir` holds a directory per
    /// group; `store` holds the messages a broker group's snapshot refers to.
    pub fn spawn(
        data_dir: PathBuf,
        store: Arc<Mutex<QueueStore>>,
        notify: Box<dyn Fn() + Send>,
    ) -> SnapshotEncoder {
        let (jobs, incoming) = mpsc::channel::<Job>();
        let (finished, done) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("holdfast-snapshots".to_string())
            .spawn(move || {
                lower_priority();
                for job in incoming {
                    let result = match job {
                        Job::Snapshot(job) => {
                            let data = snapshot(&data_dir, &store, &job);
                            Done::Snapshot(job.group, job.index, data)
                        }
                        Job::Fetch(fetch) => {
                            let records = match store.lock() {
                                Ok(mut store) => store.chunk(
                                    fetch.group,
                                    &fetch.queue,
                                    fetch.from,
                                    fetch.end,
                                    fetch.bytes_max,
                                ),
                                Err(_) => Err("the queue store is poisoned".to_string()),
                            };
                            if let Err(why) = &records {
                                debug!(group = fetch.group, queue = %fetch.queue, from = fetch.from, "cannot serve a fetch: {why}");
                            }
                            let frame = Frame::Fetched {
                                id: fetch.id,
                                group: fetch.group,
                                queue: fetch.queue,
                                from: fetch.from,
                                records,
                            };
                            Done::Fetched {
                                to: fetch.to,
                                frame,
                            }
                        }
                        Job::Sync(group, plan) => {
                            let synced = plan.run().inspect_err(|why| {
                                if let Ok(mut store) = store.lock() {
                                    store.fail(why);
                                }
                            });
                            Done::CatchUpSynced(group, synced)
                        }
                    };
                    if finished.send(result).is_err() {
                        return;
                    }
                    notify();
                }
            });
        let handle = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without the thread, no log is ever compacted: it grows, nothing is lost.
                warn!("cannot start the snapshot thread, logs will not be compacted: {e}");
                None
            }
        };
        SnapshotEncoder {
            jobs: handle.as_ref().map(|_| jobs),
            done,
            handle,
        }
    }

    pub fn submit(&self, job: SnapshotJob) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Snapshot(Box::new(job)));
        }
    }

    /// Reads the records a peer fetches; [`Done::Fetched`] carries the answer.
    pub fn submit_fetch(&self, fetch: Fetch) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Fetch(fetch));
        }
    }

    /// Runs a catch-up's sync; [`Done::CatchUpSynced`] says how it went. Without the thread
    /// it runs here.
    pub fn submit_sync(&self, group: GroupId, plan: SyncPlan) -> Option<Result<(), String>> {
        match &self.jobs {
            Some(jobs) => match jobs.send(Job::Sync(group, plan)) {
                Ok(()) => None,
                Err(mpsc::SendError(Job::Sync(_, plan))) => Some(plan.run()),
                Err(_) => Some(Err("the snapshot thread is gone".into())),
            },
            None => Some(plan.run()),
        }
    }

    /// Jobs done so far, without blocking.
    pub fn poll_done(&self) -> Vec<Done> {
        self.done.try_iter().collect()
    }
}

/// Encodes `job`, syncs the store it refers to, writes the file; the data, or why not.
fn snapshot(
    data_dir: &std::path::Path,
    store: &Mutex<QueueStore>,
    job: &SnapshotJob,
) -> Result<Bytes, String> {
    let started = std::time::Instant::now();
    let data = Bytes::from(job.encode().inspect_err(|why| {
        warn!(
            group = job.group,
            index = job.index,
            "cannot snapshot: {why}"
        );
    })?);
    let encoded_ms = started.elapsed().as_millis() as u64;
    let starts = job.queue_starts();
    if job.needs_store() {
        // The fsyncs run without the lock: the event loop goes on writing meanwhile.
        let plan = match store.lock() {
            Ok(mut store) => store.sync_plan(job.group, &starts),
            Err(_) => Err("the queue store is poisoned".to_string()),
        };
        let synced = plan.and_then(|plan| {
            plan.run().inspect_err(|why| {
                if let Ok(mut store) = store.lock() {
                    store.fail(why);
                }
            })
        });
        if let Err(why) = synced {
            // Never swallowed: the store refuses every later operation, which stops the node.
            warn!(
                group = job.group,
                "cannot sync the queue store for a snapshot: {why}"
            );
            return Err(why);
        }
    }
    let synced_ms = started.elapsed().as_millis() as u64 - encoded_ms;
    let snapshot = Snapshot {
        index: job.index,
        term: job.term,
        data,
        membership: job.membership.clone(),
    };
    let dir = data_dir.join(format!("group-{}", job.group));
    // On failure the storage thread writes it itself, and reports any error; retention then
    // waits for the next snapshot.
    match write_snapshot_file(&dir, &snapshot) {
        Ok(()) if job.needs_store() => {
            let written = match store.lock() {
                Ok(mut store) => store.snapshot_written(job.group, &starts),
                Err(_) => Err("the queue store is poisoned".to_string()),
            };
            if let Err(e) = written {
                warn!(group = job.group, "retention after a snapshot: {e}");
            }
        }
        Ok(()) => {}
        Err(e) => warn!(
            group = job.group,
            "cannot write the snapshot file early: {e}"
        ),
    }
    debug!(
        group = job.group,
        index = job.index,
        bytes = snapshot.data.len(),
        encoded_ms,
        synced_ms,
        written_ms = started.elapsed().as_millis() as u64 - encoded_ms - synced_ms,
        "snapshot encoded"
    );
    Ok(snapshot.data)
}

/// Encoding is background work: the event loop's heartbeats must win any fight for a core,
/// or a busy machine deposes its leaders while it snapshots. On Linux a nice value is per
/// thread, so this leaves the rest of the process alone.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority has no memory-safety preconditions; who = 0 is this thread.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        if result != 0 {
            debug!(
                "cannot lower the snapshot thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Drop for SnapshotEncoder {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
