//! A thread that encodes snapshots and writes their files, so neither the event loop nor the
//! storage thread stalls on a large state. Encoding a few hundred megabytes of messages takes
//! longer than an election timeout, and so does writing them: a loop that sends no heartbeats
//! meanwhile, or a follower whose heartbeat answers wait behind that write, deposes leaders.
//! The file is durable before the core hears of the snapshot, so the storage thread, when the
//! core's write asks for it, finds it in place and only checks its header.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use holdfast_core::node::SnapshotJob;
use holdfast_core::raft::{GroupId, Index, Snapshot};
use tracing::{debug, warn};

use crate::storage::{QueueStore, write_snapshot_file};

/// A job done: the snapshot's data, or why a message it needed did not read.
pub type Encoded = (GroupId, Index, Result<Bytes, String>);

pub struct SnapshotEncoder {
    jobs: Option<Sender<SnapshotJob>>,
    done: Receiver<Encoded>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotEncoder {
    /// `notify` wakes the event loop when an encoded snapshot is ready; `data_dir` holds a
    /// directory per group; `store` holds the messages a broker group's snapshot carries
    /// (the event loop holds the group's trims back until its job is done, see
    /// [`QueueStore::hold`]).
    pub fn spawn(
        data_dir: PathBuf,
        store: Arc<Mutex<QueueStore>>,
        notify: Box<dyn Fn() + Send>,
    ) -> SnapshotEncoder {
        let (jobs, incoming) = mpsc::channel::<SnapshotJob>();
        let (finished, done) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("holdfast-snapshots".to_string())
            .spawn(move || {
                lower_priority();
                for job in incoming {
                    let started = std::time::Instant::now();
                    // One message per lock: the event loop's writes and reads go between.
                    let encoded = job.encode(&mut |queue, offset| {
                        let mut store = store
                            .lock()
                            .map_err(|_| "the queue store is poisoned".to_string())?;
                        store.message(job.group, queue, offset)
                    });
                    if job.reads_messages() {
                        let released = match store.lock() {
                            Ok(mut store) => store.release(job.group),
                            Err(_) => Err("the queue store is poisoned".to_string()),
                        };
                        if let Err(e) = released {
                            warn!(group = job.group, "retention after a snapshot: {e}");
                        }
                    }
                    let data = match encoded {
                        Ok(data) => Bytes::from(data),
                        Err(why) => {
                            warn!(
                                group = job.group,
                                index = job.index,
                                "cannot snapshot: {why}"
                            );
                            if finished.send((job.group, job.index, Err(why))).is_err() {
                                return;
                            }
                            notify();
                            continue;
                        }
                    };
                    let snapshot = Snapshot {
                        index: job.index,
                        term: job.term,
                        data,
                        membership: job.membership.clone(),
                    };
                    let encoded_ms = started.elapsed().as_millis() as u64;
                    let dir = data_dir.join(format!("group-{}", job.group));
                    // On failure the storage thread writes it itself, and reports any error.
                    if let Err(e) = write_snapshot_file(&dir, &snapshot) {
                        warn!(
                            group = job.group,
                            "cannot write the snapshot file early: {e}"
                        );
                    }
                    debug!(
                        group = job.group,
                        index = job.index,
                        bytes = snapshot.data.len(),
                        encoded_ms,
                        written_ms = started.elapsed().as_millis() as u64 - encoded_ms,
                        "snapshot encoded"
                    );
                    if finished
                        .send((job.group, job.index, Ok(snapshot.data)))
                        .is_err()
                    {
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

    /// Whether the thread runs (else jobs are dropped and logs never compacted).
    pub fn running(&self) -> bool {
        self.jobs.is_some()
    }

    pub fn submit(&self, job: SnapshotJob) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    /// Snapshots encoded so far, without blocking.
    pub fn poll_done(&self) -> Vec<Encoded> {
        self.done.try_iter().collect()
    }
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
