use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_core::raft::{Entry, EntryKind, GroupId, HardState, Index, Term, Write, WriteId};
use holdfast_core::storage::{SLOT_BYTES, record_len_bytes};

use super::{GroupStore, StorageError, StorageThread};

fn noop(index: Index, term: Term) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Noop,
    }
}

fn cmd(index: Index, term: Term, command: &str) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Commands(vec![Bytes::from(command.to_string())]),
    }
}

fn hs(term: Term, vote: Option<u64>, commit: Index) -> HardState {
    HardState { term, vote, commit }
}

fn write(id: WriteId, hard_state: Option<HardState>, entries: Vec<Entry>) -> Write {
    Write {
        id,
        hard_state,
        entries,
    }
}

/// The simulator's semantics of a write (sim/src/disk.rs `apply`).
#[derive(Default)]
struct Model {
    hard_state: HardState,
    log: Vec<Entry>,
}

impl Model {
    fn apply(&mut self, write: &Write) {
        if let Some(first) = write.entries.first() {
            self.log.truncate((first.index - 1) as usize);
            self.log.extend(write.entries.iter().cloned());
        }
        if let Some(hard_state) = write.hard_state {
            self.hard_state = hard_state;
        }
    }
}

fn log_path(dir: &Path, group: GroupId) -> PathBuf {
    dir.join(format!("group-{group}")).join("log")
}

fn state_path(dir: &Path, group: GroupId) -> PathBuf {
    dir.join(format!("group-{group}")).join("state")
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").len()
}

fn set_file_len(path: &Path, len: u64) {
    let file = OpenOptions::new().write(true).open(path).expect("open");
    file.set_len(len).expect("set_len");
}

/// Opens a fresh group 1 in `dir`, applies `writes` with a sync after each, and closes it.
fn write_synced(dir: &Path, writes: &[Write]) {
    let (mut store, recovered) = GroupStore::open(dir, 1).expect("open");
    assert!(recovered.entries.is_empty());
    for w in writes {
        store.write(w).expect("write");
        store.sync().expect("sync");
    }
}

/// Five entries in term 1 with a vote, synced one by one; commit stays 0.
fn five_entries() -> Vec<Write> {
    (1..=5)
        .map(|i| {
            let state = (i == 1).then(|| hs(1, Some(2), 0));
            write(i, state, vec![cmd(i, 1, &format!("entry {i}"))])
        })
        .collect()
}

fn record_starts(entries: &[Entry]) -> Vec<u64> {
    let mut at = 0;
    let mut starts = Vec::new();
    for entry in entries {
        starts.push(at);
        at += record_len_bytes(entry).expect("small entry") as u64;
    }
    starts.push(at);
    starts
}

fn expect_corrupt(
    result: Result<(GroupStore, impl Sized), StorageError>,
) -> (Option<u64>, Option<Index>, String) {
    match result {
        Err(StorageError::Corrupt {
            offset,
            index,
            reason,
            ..
        }) => (offset, index, reason),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a store"),
    }
}

#[test]
fn batches_with_truncation_and_hard_state_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("nested").join("data");
    let (mut store, recovered) = GroupStore::open(&data, 7).expect("open");
    assert!(recovered.entries.is_empty());
    assert_eq!(recovered.hard_state, HardState::default());

    let batches = vec![
        vec![
            write(1, Some(hs(1, Some(1), 0)), vec![noop(1, 1)]),
            write(2, None, vec![cmd(2, 1, "a"), cmd(3, 1, "b")]),
            write(3, None, vec![cmd(4, 1, "c"), cmd(5, 1, "d")]),
        ],
        // Truncates synced bytes (entries 4 and 5), then appends, then truncates staged bytes.
        vec![
            write(4, Some(hs(2, None, 3)), vec![noop(4, 2), cmd(5, 2, "e")]),
            write(5, None, vec![cmd(6, 2, "f"), cmd(7, 2, "g")]),
            write(6, Some(hs(2, Some(3), 3)), vec![cmd(7, 2, "h")]),
        ],
        // A hard-state-only write, then a truncation back to the first entry of a batch.
        vec![
            write(7, Some(hs(3, Some(2), 5)), vec![]),
            write(8, None, vec![noop(8, 3)]),
            write(9, None, vec![noop(8, 3), cmd(9, 3, "i")]),
        ],
    ];
    let mut model = Model::default();
    for batch in &batches {
        for w in batch {
            store.write(w).expect("write");
            model.apply(w);
        }
        store.sync().expect("sync");
    }
    drop(store);

    let (store, recovered) = GroupStore::open(&data, 7).expect("reopen");
    assert_eq!(recovered.entries, model.log);
    assert_eq!(recovered.hard_state, model.hard_state);
    assert_eq!(store.last_index(), 9);
    let starts = record_starts(&model.log);
    assert_eq!(file_len(&log_path(&data, 7)), starts[model.log.len()]);
}

#[test]
fn commit_is_clamped_to_the_log_durable_before_the_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = GroupStore::open(dir.path(), 1).expect("open");
    // State and log go in one sync, state first: a crash between the two would leave commit 2
    // without a log to back it, so the slot says 0.
    store
        .write(&write(
            1,
            Some(hs(1, None, 2)),
            vec![noop(1, 1), noop(2, 1)],
        ))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    let (mut store, recovered) = GroupStore::open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(1, None, 0));
    assert_eq!(recovered.entries.len(), 2);
    // Once the log is durable the commit goes through with the next state write.
    store
        .write(&write(2, Some(hs(2, None, 2)), vec![]))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    let (_, recovered) = GroupStore::open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(2, None, 2));
}

#[test]
fn commit_alone_is_written_only_every_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = GroupStore::open(dir.path(), 1).expect("open");
    let entries: Vec<Entry> = (1..=2000).map(|i| noop(i, 1)).collect();
    store
        .write(&write(1, Some(hs(1, None, 0)), entries))
        .expect("write");
    store.sync().expect("sync");
    let fsyncs = store.fsyncs();
    store
        .write(&write(2, Some(hs(1, None, 10)), vec![]))
        .expect("write");
    store.sync().expect("sync");
    assert_eq!(
        store.fsyncs(),
        fsyncs,
        "a small commit advance costs no sync"
    );
    store
        .write(&write(3, Some(hs(1, None, 1500)), vec![]))
        .expect("write");
    store.sync().expect("sync");
    assert_eq!(store.fsyncs(), fsyncs + 1);
    drop(store);
    let (_, recovered) = GroupStore::open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(1, None, 1500));
}

#[test]
fn torn_tail_is_cut_at_every_length() {
    let writes = five_entries();
    let mut model = Model::default();
    writes.iter().for_each(|w| model.apply(w));
    let starts = record_starts(&model.log);
    let last_len = starts[5] - starts[4];
    for chop in [1, 2, 4, 8, 9, 16, 24, last_len - 1] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_synced(dir.path(), &writes);
        let log = log_path(dir.path(), 1);
        set_file_len(&log, starts[5] - chop);

        let (_, recovered) = GroupStore::open(dir.path(), 1).expect("reopen after a torn tail");
        assert_eq!(recovered.entries, model.log[..4], "chop {chop}");
        assert_eq!(recovered.hard_state, hs(1, Some(2), 0));
        assert_eq!(file_len(&log), starts[4], "the torn tail is cut off");
        let (mut store, recovered) = GroupStore::open(dir.path(), 1).expect("reopen again");
        assert_eq!(recovered.entries.len(), 4);
        // Appending after the cut lands where the torn record was.
        store
            .write(&write(6, None, vec![noop(5, 1)]))
            .expect("write");
        store.sync().expect("sync");
        drop(store);
        let (_, recovered) = GroupStore::open(dir.path(), 1).expect("reopen after append");
        assert_eq!(recovered.entries.last(), Some(&noop(5, 1)));
    }
}

#[test]
fn zeroed_tail_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_synced(dir.path(), &five_entries());
    let log = log_path(dir.path(), 1);
    let len = file_len(&log);
    set_file_len(&log, len + 4096);
    let (_, recovered) = GroupStore::open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.entries.len(), 5);
    assert_eq!(file_len(&log), len);
}

#[test]
fn torn_tail_under_the_commit_is_corrupt() {
    let mut writes = five_entries();
    writes.push(write(6, Some(hs(2, None, 5)), vec![]));
    let dir = tempfile::tempdir().expect("tempdir");
    write_synced(dir.path(), &writes);
    let log = log_path(dir.path(), 1);
    let len = file_len(&log);
    set_file_len(&log, len - 3);

    let (offset, index, reason) = expect_corrupt(GroupStore::open(dir.path(), 1));
    assert_eq!(index, Some(5));
    let mut model = Model::default();
    writes.iter().for_each(|w| model.apply(w));
    assert_eq!(offset, Some(record_starts(&model.log)[4]));
    assert!(reason.contains("5 entries are committed"), "{reason}");
    assert_eq!(file_len(&log), len - 3, "nothing is cut");
}

#[test]
fn bit_flip_inside_the_log_is_corrupt() {
    let mut model = Model::default();
    five_entries().iter().for_each(|w| model.apply(w));
    let starts = record_starts(&model.log);
    // A payload byte of entry 3, then its length field.
    for flip_at in [starts[3] - 2, starts[2] + 1] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_synced(dir.path(), &five_entries());
        let log = log_path(dir.path(), 1);
        let mut bytes = fs::read(&log).expect("read");
        bytes[flip_at as usize] ^= 0x10;
        fs::write(&log, &bytes).expect("write");

        let result = GroupStore::open(dir.path(), 1);
        let (offset, index, reason) = expect_corrupt(result);
        assert_eq!(offset, Some(starts[2]));
        assert_eq!(index, Some(3));
        assert!(reason.contains("index 4"), "{reason}");
        assert_eq!(
            fs::read(&log).expect("read"),
            bytes,
            "the file is untouched"
        );
        let message = expect_corrupt_message(dir.path());
        assert!(message.contains(&log.display().to_string()), "{message}");
    }
}

#[test]
fn a_repairing_open_cuts_damage_and_remembers_it_until_cleared() {
    let mut model = Model::default();
    five_entries().iter().for_each(|w| model.apply(w));
    let starts = record_starts(&model.log);
    let dir = tempfile::tempdir().expect("tempdir");
    write_synced(dir.path(), &five_entries());
    let log = log_path(dir.path(), 1);
    let mut bytes = fs::read(&log).expect("read");
    bytes[(starts[3] - 2) as usize] ^= 0x10; // inside entry 3, with entries 4 and 5 after it
    fs::write(&log, &bytes).expect("write");

    let (_, recovered, damage) = GroupStore::open_repairing(dir.path(), 1).expect("opens");
    assert_eq!(damage.map(|d| d.from), Some(3), "damaged from entry 3");
    assert!(damage.is_some_and(|d| !d.votes_lost));
    assert_eq!(recovered.entries, model.log[..2], "the valid prefix");
    assert_eq!(file_len(&log), starts[2], "cut at the damaged record");

    // Now the log looks whole; only the marker says it is not.
    let (_, recovered, damage) = GroupStore::open_repairing(dir.path(), 1).expect("reopens");
    assert_eq!(
        damage.map(|d| d.from),
        Some(3),
        "the damage survives a restart"
    );
    assert_eq!(recovered.entries, model.log[..2]);

    GroupStore::clear_damage(dir.path(), 1).expect("clears");
    let (_, _, damage) = GroupStore::open_repairing(dir.path(), 1).expect("reopens");
    assert_eq!(damage, None, "repaired");
}

fn expect_corrupt_message(dir: &Path) -> String {
    match GroupStore::open(dir, 1) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn torn_newer_state_slot_falls_back_to_the_older() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_synced(
        dir.path(),
        &[
            write(1, Some(hs(1, Some(1), 0)), vec![]),
            write(2, Some(hs(2, Some(3), 0)), vec![]),
        ],
    );
    let state = state_path(dir.path(), 1);
    let mut bytes = fs::read(&state).expect("read");
    // Sequence 2 lives in slot 0.
    bytes[8..24].fill(0xAB);
    fs::write(&state, &bytes).expect("write");
    let (mut store, recovered) = GroupStore::open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(1, Some(1), 0));

    // The next write goes over the torn slot, never over the surviving one.
    store
        .write(&write(3, Some(hs(3, None, 0)), vec![]))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    let (_, recovered) = GroupStore::open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(3, None, 0));

    let mut bytes = fs::read(&state).expect("read");
    bytes[8..24].fill(0xAB);
    bytes[SLOT_BYTES + 8..SLOT_BYTES + 24].fill(0xCD);
    fs::write(&state, &bytes).expect("write");
    let message = expect_corrupt_message(dir.path());
    assert!(message.contains("both hard-state slots"), "{message}");
    assert!(message.contains(&state.display().to_string()), "{message}");
}

#[test]
fn invalid_writes_fail_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = GroupStore::open(dir.path(), 1).expect("open");
    store
        .write(&write(1, None, vec![noop(1, 2)]))
        .expect("write");
    let err = store.write(&write(2, None, vec![noop(2, 1)]));
    assert!(
        matches!(err, Err(StorageError::InvalidWrite { .. })),
        "term decrease"
    );
    assert!(matches!(store.sync(), Err(StorageError::Failed { .. })));

    let (mut store, _) = GroupStore::open(dir.path(), 2).expect("open");
    let err = store.write(&write(1, None, vec![noop(1, 1), noop(3, 1)]));
    assert!(
        matches!(err, Err(StorageError::InvalidWrite { .. })),
        "gap inside a write"
    );
    let (mut store, _) = GroupStore::open(dir.path(), 3).expect("open");
    let err = store.write(&write(1, None, vec![noop(2, 1)]));
    let message = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("starts at index 2 but the log ends at 0"),
        "{message}"
    );
}

/// A notify for tests: each call sends on a channel, and the first calls block until the test
/// opens the gate, so the writes submitted meanwhile pile up into one batch.
struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn new(open: bool) -> Arc<Gate> {
        Arc::new(Gate {
            open: Mutex::new(open),
            changed: Condvar::new(),
        })
    }

    fn open(&self) {
        *self.open.lock().expect("lock") = true;
        self.changed.notify_all();
    }

    fn wait(&self) {
        let open = self.open.lock().expect("lock");
        let (open, _) = self
            .changed
            .wait_timeout_while(open, Duration::from_secs(10), |open| !*open)
            .expect("lock");
        drop(open);
    }
}

/// A report with the error as text, so tests can keep and compare them.
type Report = Result<(GroupId, WriteId), (GroupId, String)>;

fn spawn_gated(
    stores: BTreeMap<GroupId, GroupStore>,
    gate: Arc<Gate>,
) -> (StorageThread, mpsc::Receiver<()>) {
    let (notified, wakeups) = mpsc::channel();
    let notify = Box::new(move || {
        gate.wait();
        let _ = notified.send(());
    });
    (StorageThread::spawn(stores, notify), wakeups)
}

/// Collects reports until `until` holds or 10 s pass.
fn collect(
    thread: &StorageThread,
    wakeups: &mpsc::Receiver<()>,
    reports: &mut Vec<Report>,
    until: impl Fn(&[Report]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !until(reports) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; reports so far: {reports:?}");
        let _ = wakeups.recv_timeout(left);
        for done in thread.poll_done() {
            reports.push(done.map_err(|(group, e)| (group, e.to_string())));
        }
    }
}

fn reported(reports: &[Report], group: GroupId, id: WriteId) -> bool {
    reports
        .iter()
        .any(|r| matches!(r, Ok((g, i)) if *g == group && *i >= id))
}

#[test]
fn thread_batches_many_writes_into_few_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stores = BTreeMap::new();
    for group in [1, 2] {
        let (store, _) = GroupStore::open(dir.path(), group).expect("open");
        stores.insert(group, store);
    }
    let gate = Gate::new(false);
    let (thread, wakeups) = spawn_gated(stores, gate.clone());
    let writes_per_group: u64 = 500;
    for i in 1..=writes_per_group {
        for group in [1, 2] {
            let term = 1 + i / 100;
            let state = (i % 100 == 0 || i == 1).then(|| hs(term, Some(group), 0));
            let entry = cmd(i, term, &format!("group {group} entry {i}"));
            thread.submit(group, write(i, state, vec![entry]));
        }
    }
    gate.open();
    let mut reports = Vec::new();
    collect(&thread, &wakeups, &mut reports, |r| {
        reported(r, 1, writes_per_group) && reported(r, 2, writes_per_group)
    });
    assert!(reports.iter().all(Result::is_ok), "{reports:?}");
    let writes = 2 * writes_per_group;
    let syncs = thread.syncs();
    assert!(syncs * 10 < writes, "{syncs} syncs for {writes} writes");
    assert!(thread.batches() <= 3, "{} batches", thread.batches());
    thread.shutdown();

    for group in [1, 2] {
        let (_, recovered) = GroupStore::open(dir.path(), group).expect("reopen");
        assert_eq!(recovered.entries.len() as u64, writes_per_group);
        assert_eq!(
            recovered.entries.last(),
            Some(&cmd(500, 6, &format!("group {group} entry 500")))
        );
        assert_eq!(recovered.hard_state, hs(6, Some(group), 0));
    }
}

#[test]
fn shutdown_finishes_submitted_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = GroupStore::open(dir.path(), 1).expect("open");
    let (thread, _wakeups) = spawn_gated(BTreeMap::from([(1, store)]), Gate::new(true));
    for i in 1..=100 {
        thread.submit(1, write(i, None, vec![noop(i, 1)]));
    }
    thread.shutdown();
    let (_, recovered) = GroupStore::open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.entries.len(), 100);
}

#[test]
fn thread_reports_a_hole_once_and_nothing_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stores = BTreeMap::new();
    for group in [1, 2] {
        let (store, _) = GroupStore::open(dir.path(), group).expect("open");
        stores.insert(group, store);
    }
    let (thread, wakeups) = spawn_gated(stores, Gate::new(true));
    thread.submit(1, write(1, None, vec![noop(1, 1)]));
    thread.submit(1, write(2, None, vec![noop(3, 1)]));
    thread.submit(1, write(3, None, vec![noop(2, 1)]));
    thread.submit(2, write(1, None, vec![noop(1, 1)]));
    thread.submit(9, write(1, None, vec![noop(1, 1)]));
    let mut reports = Vec::new();
    collect(&thread, &wakeups, &mut reports, |r| {
        reported(r, 2, 1)
            && r.iter().any(|d| matches!(d, Err((9, _))))
            && r.iter().any(|d| matches!(d, Err((1, _))))
    });
    for i in 4..=10 {
        thread.submit(1, write(i, None, vec![noop(i - 1, 1)]));
    }
    thread.submit(2, write(2, None, vec![noop(2, 1)]));
    collect(&thread, &wakeups, &mut reports, |r| reported(r, 2, 2));
    thread.shutdown();

    let errors: Vec<_> = reports
        .iter()
        .filter_map(|r| match r {
            Err((1, e)) => Some(e.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "{reports:?}");
    assert!(
        errors[0].contains("starts at index 3 but the log ends at 1"),
        "{}",
        errors[0]
    );
    assert!(!reported(&reports, 1, 2), "{reports:?}");
    let unknown = reports.iter().filter(|r| matches!(r, Err((9, _)))).count();
    assert_eq!(unknown, 1);
}
