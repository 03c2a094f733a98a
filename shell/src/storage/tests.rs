use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_core::raft::{
    Damage, Entry, EntryKind, GroupId, HardState, Index, Recovered, Snapshot, Term, Write, WriteId,
};
use holdfast_core::storage::{
    SLOT_BYTES, ScanOutcome, decode_snapshot, encode_snapshot, log_after_snapshot,
    record_len_bytes, scan,
};

use super::{GroupStore, StorageConfig, StorageError, StorageThread};

fn open(dir: &Path, group: GroupId) -> Result<(GroupStore, Recovered), StorageError> {
    GroupStore::open(dir, group, &StorageConfig::default())
}

fn open_repairing(
    dir: &Path,
    group: GroupId,
) -> Result<(GroupStore, Recovered, Option<Damage>), StorageError> {
    GroupStore::open_repairing(dir, group, &StorageConfig::default())
}

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
        snapshot: None,
        discard_log: false,
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

/// The first segment: with the default segment size, the whole log of these small tests.
fn log_path(dir: &Path, group: GroupId) -> PathBuf {
    dir.join(format!("group-{group}"))
        .join("log-00000000000000000001.seg")
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
    let (mut store, recovered) = open(dir, 1).expect("open");
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
    let (mut store, recovered) = open(&data, 7).expect("open");
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

    let (store, recovered) = open(&data, 7).expect("reopen");
    assert_eq!(recovered.entries, model.log);
    assert_eq!(recovered.hard_state, model.hard_state);
    assert_eq!(store.last_index(), 9);
    let starts = record_starts(&model.log);
    assert_eq!(file_len(&log_path(&data, 7)), starts[model.log.len()]);
}

#[test]
fn commit_is_clamped_to_the_log_durable_before_the_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = open(dir.path(), 1).expect("open");
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
    let (mut store, recovered) = open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(1, None, 0));
    assert_eq!(recovered.entries.len(), 2);
    // Once the log is durable the commit goes through with the next state write.
    store
        .write(&write(2, Some(hs(2, None, 2)), vec![]))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    let (_, recovered) = open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(2, None, 2));
}

#[test]
fn commit_alone_is_written_only_every_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = open(dir.path(), 1).expect("open");
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
    let (_, recovered) = open(dir.path(), 1).expect("reopen");
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

        let (_, recovered) = open(dir.path(), 1).expect("reopen after a torn tail");
        assert_eq!(recovered.entries, model.log[..4], "chop {chop}");
        assert_eq!(recovered.hard_state, hs(1, Some(2), 0));
        assert_eq!(file_len(&log), starts[4], "the torn tail is cut off");
        let (mut store, recovered) = open(dir.path(), 1).expect("reopen again");
        assert_eq!(recovered.entries.len(), 4);
        // Appending after the cut lands where the torn record was.
        store
            .write(&write(6, None, vec![noop(5, 1)]))
            .expect("write");
        store.sync().expect("sync");
        drop(store);
        let (_, recovered) = open(dir.path(), 1).expect("reopen after append");
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
    let (_, recovered) = open(dir.path(), 1).expect("reopen");
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

    let (offset, index, reason) = expect_corrupt(open(dir.path(), 1));
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

        let result = open(dir.path(), 1);
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

    let (_, recovered, damage) = open_repairing(dir.path(), 1).expect("opens");
    assert_eq!(damage.map(|d| d.from), Some(3), "damaged from entry 3");
    assert!(damage.is_some_and(|d| !d.votes_lost));
    assert_eq!(recovered.entries, model.log[..2], "the valid prefix");
    assert_eq!(file_len(&log), starts[2], "cut at the damaged record");

    // Now the log looks whole; only the marker says it is not.
    let (_, recovered, damage) = open_repairing(dir.path(), 1).expect("reopens");
    assert_eq!(
        damage.map(|d| d.from),
        Some(3),
        "the damage survives a restart"
    );
    assert_eq!(recovered.entries, model.log[..2]);

    GroupStore::clear_damage(dir.path(), 1).expect("clears");
    let (_, _, damage) = open_repairing(dir.path(), 1).expect("reopens");
    assert_eq!(damage, None, "repaired");
}

fn expect_corrupt_message(dir: &Path) -> String {
    match open(dir, 1) {
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
    let (mut store, recovered) = open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.hard_state, hs(1, Some(1), 0));

    // The next write goes over the torn slot, never over the surviving one.
    store
        .write(&write(3, Some(hs(3, None, 0)), vec![]))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    let (_, recovered) = open(dir.path(), 1).expect("reopen");
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
    let (mut store, _) = open(dir.path(), 1).expect("open");
    store
        .write(&write(1, None, vec![noop(1, 2)]))
        .expect("write");
    let err = store.write(&write(2, None, vec![noop(2, 1)]));
    assert!(
        matches!(err, Err(StorageError::InvalidWrite { .. })),
        "term decrease"
    );
    assert!(matches!(store.sync(), Err(StorageError::Failed { .. })));

    let (mut store, _) = open(dir.path(), 2).expect("open");
    let err = store.write(&write(1, None, vec![noop(1, 1), noop(3, 1)]));
    assert!(
        matches!(err, Err(StorageError::InvalidWrite { .. })),
        "gap inside a write"
    );
    let (mut store, _) = open(dir.path(), 3).expect("open");
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
        let (store, _) = open(dir.path(), group).expect("open");
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
    // Each group's thread: its first write, perhaps a few more before the gate held the
    // report, then everything else at once.
    assert!(thread.batches() <= 6, "{} batches", thread.batches());
    thread.shutdown();

    for group in [1, 2] {
        let (_, recovered) = open(dir.path(), group).expect("reopen");
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
    let (store, _) = open(dir.path(), 1).expect("open");
    let (thread, _wakeups) = spawn_gated(BTreeMap::from([(1, store)]), Gate::new(true));
    for i in 1..=100 {
        // A replica's term is durable before its entries of that term.
        let state = (i == 1).then(|| hs(1, None, 0));
        thread.submit(1, write(i, state, vec![noop(i, 1)]));
    }
    thread.shutdown();
    let (_, recovered) = open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.entries.len(), 100);
}

#[test]
fn a_store_handed_over_again_takes_over_once_the_first_has_finished_its_queue() {
    let (first_dir, second_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (first, _) = open(first_dir.path(), 1).expect("open");
    let (thread, _wakeups) = spawn_gated(BTreeMap::from([(1, first)]), Gate::new(true));
    for i in 1..=200 {
        let state = (i == 1).then(|| hs(1, None, 0));
        thread.submit(1, write(i, state, vec![noop(i, 1)]));
    }
    let (second, _) = open(second_dir.path(), 1).expect("open");
    thread.add_store(1, second);
    thread.submit(1, write(1, Some(hs(1, None, 0)), vec![noop(1, 1)]));
    thread.shutdown();
    let (_, recovered) = open(first_dir.path(), 1).expect("reopen");
    assert_eq!(recovered.entries.len(), 200);
    let (_, recovered) = open(second_dir.path(), 1).expect("reopen");
    assert_eq!(recovered.entries, vec![noop(1, 1)]);
}

#[test]
fn thread_reports_a_hole_once_and_nothing_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stores = BTreeMap::new();
    for group in [1, 2] {
        let (store, _) = open(dir.path(), group).expect("open");
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

// ---- Segments, snapshots, crash points and the synced record ----

/// Segments of about three small records each, so a few dozen entries span many files.
fn tiny() -> StorageConfig {
    StorageConfig {
        segment_bytes_max: 100,
    }
}

fn group_dir(dir: &Path) -> PathBuf {
    dir.join("group-1")
}

fn parse_name(name: &str, prefix: &str, suffix: &str) -> Option<Index> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (digits.len() == 20).then(|| digits.parse().ok())?
}

/// `(index, path)` of the group's files named `<prefix><20 digits><suffix>`, sorted.
fn files_named(dir: &Path, prefix: &str, suffix: &str) -> Vec<(Index, PathBuf)> {
    let mut found: Vec<_> = fs::read_dir(group_dir(dir))
        .expect("list")
        .filter_map(|e| {
            let e = e.expect("entry");
            let name = e.file_name().into_string().expect("utf-8");
            parse_name(&name, prefix, suffix).map(|i| (i, e.path()))
        })
        .collect();
    found.sort();
    found
}

fn segment_files(dir: &Path) -> Vec<(Index, PathBuf)> {
    files_named(dir, "log-", ".seg")
}

fn snapshot_files(dir: &Path) -> Vec<(Index, PathBuf)> {
    files_named(dir, "snapshot-", ".snap")
}

/// What the files hold, read independently of the store: the newest snapshot, every segment
/// (each must be whole and continue the one before), and `log_after_snapshot` over them.
fn read_disk(dir: &Path) -> (Option<Snapshot>, Vec<Entry>) {
    let snapshot = snapshot_files(dir).last().map(|(index, path)| {
        let snapshot =
            decode_snapshot(Bytes::from(fs::read(path).expect("read"))).expect("decodes");
        assert_eq!(snapshot.index, *index, "{}", path.display());
        snapshot
    });
    let mut entries: Vec<Entry> = Vec::new();
    for (first, path) in segment_files(dir) {
        let bytes = fs::read(&path).expect("read");
        let found = scan(&bytes, bytes.len() as u64, first);
        assert_eq!(found.outcome, ScanOutcome::Clean, "{}", path.display());
        if let Some(last) = entries.last() {
            assert_eq!(
                first,
                last.index + 1,
                "{} continues the log",
                path.display()
            );
        }
        entries.extend(found.entries);
    }
    let at = snapshot.as_ref().map(|s| (s.index, s.term));
    let kept = log_after_snapshot(at, entries).expect("no gap");
    (snapshot, kept)
}

fn snap(index: Index, term: Term) -> Snapshot {
    Snapshot {
        index,
        term,
        data: Bytes::from(format!("state machine after {index}")),
        membership: None,
    }
}

fn full_write(
    id: WriteId,
    hard_state: Option<HardState>,
    snapshot: Option<Snapshot>,
    discard_log: bool,
    entries: Vec<Entry>,
) -> Write {
    Write {
        id,
        hard_state,
        snapshot,
        discard_log,
        entries,
    }
}

/// Commands `from..=to` in `term`, each naming its index.
fn run(from: Index, to: Index, term: Term) -> Vec<Entry> {
    (from..=to)
        .map(|i| cmd(i, term, &format!("entry {i} of term {term}")))
        .collect()
}

/// A fresh group 1 in `dir` with entries 1..=30 (term 1 to 15, term 2 after), written three
/// per sync, and its synced record up to date: everything in it was reported durable.
fn thirty(dir: &Path, config: &StorageConfig) -> (GroupStore, Vec<Entry>) {
    let (mut store, recovered) = GroupStore::open(dir, 1, config).expect("open");
    assert!(recovered.entries.is_empty());
    let mut log = run(1, 15, 1);
    log.extend(run(16, 30, 2));
    for (i, batch) in log.chunks(3).enumerate() {
        let state = (i == 0).then(|| hs(2, Some(1), 0));
        store
            .write(&write(i as WriteId + 1, state, batch.to_vec()))
            .expect("write");
        store.sync().expect("sync");
    }
    store.record_synced().expect("record synced");
    (store, log)
}

#[test]
fn segments_roll_and_recover_across_many() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = GroupStore::open(dir.path(), 1, &tiny()).expect("open");
    let mut model = Model::default();
    let mut next = 1;
    let mut id = 1;
    // Batches of 1 to 7 entries, each synced: records of one batch span segments too.
    while next <= 80 {
        let len = 1 + (id % 7);
        let w = write(id, Some(hs(1, None, 0)), run(next, next + len - 1, 1));
        store.write(&w).expect("write");
        store.sync().expect("sync");
        model.apply(&w);
        next += len;
        id += 1;
    }
    let segments = segment_files(dir.path());
    assert!(segments.len() > 20, "{} segments", segments.len());
    assert_eq!(store.segment_count(), segments.len());
    let mut expected_first = 1;
    for (k, (first, path)) in segments.iter().enumerate() {
        assert_eq!(*first, expected_first, "named by its first index");
        let bytes = fs::read(path).expect("read");
        let found = scan(&bytes, bytes.len() as u64, *first);
        assert_eq!(found.outcome, ScanOutcome::Clean);
        if k + 1 < segments.len() {
            // Rolled once it passed the maximum: full, but not before its last record.
            let last_len = record_len_bytes(found.entries.last().expect("entries")).expect("len");
            assert!(bytes.len() as u64 >= tiny().segment_bytes_max);
            assert!(((bytes.len() - last_len) as u64) < tiny().segment_bytes_max);
        }
        expected_first += found.entries.len() as Index;
    }
    drop(store);

    let (mut store, recovered) = GroupStore::open(dir.path(), 1, &tiny()).expect("reopen");
    assert_eq!(recovered.entries, model.log);
    assert_eq!(recovered.snapshot, None);
    assert_eq!(store.last_index(), model.log.len() as Index);
    let w = write(id, None, run(next, next + 9, 2));
    store.write(&w).expect("write");
    store.sync().expect("sync");
    model.apply(&w);
    drop(store);
    // The segment size is a policy for writing only: a store with other settings reads it all.
    let (_, recovered) = open(dir.path(), 1).expect("reopen with large segments");
    assert_eq!(recovered.entries, model.log);
    assert_eq!(read_disk(dir.path()).1, model.log);
}

#[test]
fn truncation_into_an_older_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, log) = thirty(dir.path(), &tiny());
    let before = segment_files(dir.path());
    let holder = before
        .iter()
        .rposition(|(first, _)| *first <= 8)
        .expect("a segment holds entry 8");
    assert!(
        before.len() > holder + 3,
        "the cut is several segments back"
    );
    let mut model = Model {
        hard_state: hs(2, Some(1), 0),
        log,
    };
    let w = write(100, Some(hs(3, None, 0)), run(8, 10, 3));
    store.write(&w).expect("write");
    store.sync().expect("sync");
    model.apply(&w);
    // A truncation of staged records across a segment boundary, in one batch.
    let w = write(101, None, run(11, 20, 3));
    store.write(&w).expect("write");
    model.apply(&w);
    let w = write(102, None, run(14, 16, 4));
    store.write(&w).expect("write");
    model.apply(&w);
    store.sync().expect("sync");
    drop(store);

    let after = segment_files(dir.path());
    assert_eq!(after[..=holder], before[..=holder], "older segments stay");
    let (_, recovered, damage) =
        GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("reopen");
    assert_eq!(damage, None);
    assert_eq!(recovered.entries, model.log);
    assert_eq!(recovered.hard_state, model.hard_state);
    assert_eq!(read_disk(dir.path()).1, model.log);
}

/// Applies `change` to a store built by `setup` with the sync stopped after 1, 2, … durable
/// steps until it completes; after each stop the files must recover, undamaged, exactly what
/// the independent reader (`log_after_snapshot` over the files) says, `check` must accept it,
/// and the recovered store must take the next append.
fn at_every_crash_point(
    config: &StorageConfig,
    setup: impl Fn(&Path) -> GroupStore,
    change: &[Write],
    check: impl Fn(&Recovered, bool),
) -> u32 {
    for crash_after in 1.. {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = setup(dir.path());
        store.crash_after_steps = Some(store.steps + crash_after);
        for w in change {
            store.write(w).expect("write");
        }
        let crashed = match store.sync() {
            Ok(()) => false,
            Err(StorageError::Io {
                op: "crash (test)", ..
            }) => true,
            Err(e) => panic!("step {crash_after}: {e}"),
        };
        drop(store);
        let on_disk = read_disk(dir.path());
        let (mut store, recovered, damage) =
            GroupStore::open_repairing(dir.path(), 1, config).expect("recovers");
        let context = format!("crash after step {crash_after} (crashed: {crashed})");
        assert_eq!(damage, None, "{context}");
        assert_eq!(recovered.snapshot, on_disk.0, "{context}");
        assert_eq!(recovered.entries, on_disk.1, "{context}");
        check(&recovered, crashed);

        let last = recovered
            .entries
            .last()
            .map(|e| e.index)
            .or(recovered.snapshot.as_ref().map(|s| s.index))
            .unwrap_or(0);
        let next = noop(last + 1, 9);
        store
            .write(&write(1000, Some(hs(9, None, 0)), vec![next.clone()]))
            .expect("appends after recovery");
        store.sync().expect("sync");
        drop(store);
        let (_, again, damage) =
            GroupStore::open_repairing(dir.path(), 1, config).expect("recovers again");
        assert_eq!(damage, None, "{context}");
        assert_eq!(again.entries.last(), Some(&next), "{context}");
        if !crashed {
            return crash_after;
        }
    }
    unreachable!()
}

/// `recovered` holds every entry of `log` up to `index` (in the log or under the snapshot).
fn holds_through(recovered: &Recovered, log: &[Entry], index: Index) -> bool {
    let base = recovered.snapshot.as_ref().map_or(0, |s| s.index);
    log.iter()
        .filter(|e| e.index <= index && e.index > base)
        .all(|e| recovered.entries.get((e.index - base - 1) as usize) == Some(e))
}

#[test]
fn compaction_survives_a_crash_at_every_step() {
    let (_, log) = thirty(tempfile::tempdir().expect("tempdir").path(), &tiny());
    let change = [full_write(
        100,
        Some(hs(2, Some(1), 20)),
        Some(snap(20, 2)),
        false,
        vec![cmd(31, 2, "31")],
    )];
    let steps = at_every_crash_point(
        &tiny(),
        |dir| thirty(dir, &tiny()).0,
        &change,
        |recovered, _| {
            // Nothing reported durable is lost, whether or not the snapshot made it.
            assert!(holds_through(recovered, &log, 30));
            match &recovered.snapshot {
                None => assert!(recovered.entries.len() >= 30),
                Some(s) => assert_eq!(s, &snap(20, 2)),
            }
        },
    );
    assert!(steps > 4, "{steps} steps");

    // The finished state: the snapshot, the log after it, no segment wholly below it.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = thirty(dir.path(), &tiny());
    store.write(&change[0]).expect("write");
    store.sync().expect("sync");
    let segments = segment_files(dir.path());
    assert!(segments[0].0 <= 21 && segments.get(1).is_none_or(|s| s.0 > 21));
    assert_eq!(
        snapshot_files(dir.path())
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        [20]
    );
    // A second snapshot replaces the first file.
    store
        .write(&full_write(101, None, Some(snap(28, 2)), false, vec![]))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    assert_eq!(
        snapshot_files(dir.path())
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        [28]
    );
    let (_, recovered) = GroupStore::open(dir.path(), 1, &tiny()).expect("reopen");
    assert_eq!(recovered.snapshot, Some(snap(28, 2)));
    let mut expected = log[28..].to_vec();
    expected.push(cmd(31, 2, "31"));
    assert_eq!(recovered.entries, expected);
    // A commit advance alone is not worth a state sync (COMMIT_WRITE_INTERVAL); the snapshot
    // stands for it anyway.
    assert_eq!(recovered.hard_state, hs(2, Some(1), 0));
}

#[test]
fn compacted_files_go_to_the_remover_and_a_crash_before_their_removal_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, log) = thirty(dir.path(), &tiny());
    let (remover, unneeded) = mpsc::channel();
    store.remove_unneeded_with(remover);
    let segments_before = segment_files(dir.path());
    store
        .write(&full_write(
            100,
            Some(hs(2, Some(1), 20)),
            Some(snap(20, 2)),
            false,
            vec![cmd(31, 2, "31")],
        ))
        .expect("write");
    store.sync().expect("sync");
    store
        .write(&full_write(101, None, Some(snap(28, 2)), false, vec![]))
        .expect("write");
    store.sync().expect("sync");
    // The sync left the removal to the remover: every file sent is still there, and they are
    // exactly the segments the snapshot holds entirely and the older snapshot.
    let sent: Vec<PathBuf> = unneeded.try_iter().collect();
    assert!(sent.iter().all(|path| path.exists()), "{sent:?}");
    let mut expected: Vec<PathBuf> = segments_before
        .iter()
        .zip(segments_before.iter().skip(1))
        .filter(|(_, next)| next.0 <= 29)
        .map(|(segment, _)| segment.1.clone())
        .collect();
    expected.push(snapshot_files(dir.path())[0].1.clone());
    let (mut sent_sorted, mut expected_sorted) = (sent.clone(), expected);
    sent_sorted.sort();
    expected_sorted.sort();
    assert_eq!(sent_sorted, expected_sorted);
    assert!(sent.len() >= 3, "{sent:?}");

    // A crash before the remover ran: recovery takes the newest snapshot, skips and removes
    // the compacted segments, and recovers what the finished compaction would have left.
    drop(store);
    let (_, recovered) = GroupStore::open(dir.path(), 1, &tiny()).expect("reopen");
    assert_eq!(recovered.snapshot, Some(snap(28, 2)));
    let mut kept = log[28..].to_vec();
    kept.push(cmd(31, 2, "31"));
    assert_eq!(recovered.entries, kept);
    // Recovery keeps the segment holding the snapshot's own entry; the ones below it are gone.
    let segments = segment_files(dir.path());
    assert_eq!(
        segments.iter().filter(|s| s.0 <= 28).count(),
        1,
        "{segments:?}"
    );
}

#[test]
fn the_storage_thread_removes_compacted_files_beside_its_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = thirty(dir.path(), &tiny());
    let segments_before = segment_files(dir.path()).len();
    let (thread, _wakeups) = spawn_gated(BTreeMap::from([(1, store)]), Gate::new(true));
    thread.submit(
        1,
        full_write(
            100,
            Some(hs(2, Some(1), 28)),
            Some(snap(28, 2)),
            false,
            vec![],
        ),
    );
    thread.shutdown();
    // Shutting down waits for the remover too: the compacted segments are gone.
    let segments = segment_files(dir.path());
    assert!(segments.len() < segments_before, "{segments:?}");
    assert!(segments[0].0 <= 29 && segments.get(1).is_none_or(|s| s.0 > 29));
    let (_, recovered) = GroupStore::open(dir.path(), 1, &tiny()).expect("reopen");
    assert_eq!(recovered.snapshot, Some(snap(28, 2)));
    assert_eq!(recovered.entries.len(), 2);
}

#[test]
fn an_installed_snapshot_discards_the_log_safely_at_every_step() {
    let (_, log) = thirty(tempfile::tempdir().expect("tempdir").path(), &tiny());
    let new_entries = vec![noop(26, 3), cmd(27, 3, "27")];
    let change = [full_write(
        100,
        Some(hs(3, None, 0)),
        Some(snap(25, 3)),
        true,
        new_entries.clone(),
    )];
    let steps = at_every_crash_point(
        &tiny(),
        |dir| thirty(dir, &tiny()).0,
        &change,
        |recovered, crashed| match &recovered.snapshot {
            // Before the snapshot is durable, nothing of the write happened.
            None => {
                assert_eq!(recovered.entries, log);
                assert_eq!(recovered.hard_state, hs(2, Some(1), 0));
            }
            // After it, the old log is gone (a crash part way through its removal leaves a
            // prefix, which `log_after_snapshot` drops) and the new one is a prefix of the
            // write's entries.
            Some(s) => {
                assert_eq!(s, &snap(25, 3));
                assert!(new_entries.starts_with(&recovered.entries));
                if !crashed {
                    assert_eq!(recovered.entries, new_entries);
                    assert_eq!(recovered.hard_state, hs(3, None, 0));
                }
            }
        },
    );
    // One step per old segment removed, newest first, among others.
    let dir = tempfile::tempdir().expect("tempdir");
    drop(thirty(dir.path(), &tiny()));
    let old_segments = segment_files(dir.path()).len() as u32;
    assert!(
        steps > old_segments,
        "{steps} steps for {old_segments} segments"
    );

    // The crash state with only the newest old segment removed, built by hand as the sync
    // leaves it: the snapshot first, then the synced record lowered to it, then the removal.
    // (The record is lowered before any segment goes, so a prefix of the old log never meets
    // a record naming entries that are gone.)
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = thirty(dir.path(), &tiny());
    store.write_synced(25).expect("lower the record");
    drop(store);
    let old = segment_files(dir.path());
    fs::write(
        group_dir(dir.path()).join("snapshot-00000000000000000025.snap"),
        encode_snapshot(&snap(25, 3)),
    )
    .expect("write snapshot");
    fs::remove_file(&old.last().expect("segments").1).expect("remove");
    let (_, recovered, damage) =
        GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("recovers");
    assert_eq!(damage, None);
    assert_eq!(recovered.snapshot, Some(snap(25, 3)));
    assert!(
        recovered.entries.is_empty(),
        "the old log's prefix is dropped"
    );
    assert!(
        segment_files(dir.path()).is_empty(),
        "and its removal finished"
    );
}

/// Until an installed snapshot is durable a crash keeps the old log, and its synced entries
/// stay protected: the synced record is lowered for the discard only after the snapshot, so a
/// bit flip in the old log's last record is damage, never a torn tail to cut (seed 91300527
/// of the raft workload).
#[test]
fn a_crash_before_an_installed_snapshot_keeps_the_old_logs_tail_protected() {
    let change = full_write(100, Some(hs(3, None, 0)), Some(snap(25, 3)), true, vec![]);
    for crash_after in 0..3 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, log) = thirty(dir.path(), &tiny());
        store.crash_after_steps = Some(store.steps + crash_after);
        store.write(&change).expect("write");
        if crash_after > 0 {
            assert!(store.sync().is_err(), "crashes after step {crash_after}");
        }
        drop(store);
        if read_disk(dir.path()).0.is_some() {
            continue;
        }
        let (_, last) = segment_files(dir.path()).pop().expect("the old log");
        let mut bytes = fs::read(&last).expect("read");
        let at = bytes.len() - 2;
        bytes[at] ^= 0x10;
        fs::write(&last, &bytes).expect("write");
        let (_, recovered, damage) =
            GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("opens damaged");
        assert_eq!(
            damage.map(|d| d.from),
            Some(30),
            "crash after step {crash_after}"
        );
        assert_eq!(recovered.entries, log[..29]);
    }
}

#[test]
fn truncation_into_an_older_segment_survives_a_crash_at_every_step() {
    let (_, log) = thirty(tempfile::tempdir().expect("tempdir").path(), &tiny());
    let new_entries = run(8, 10, 3);
    let change = [write(100, Some(hs(3, None, 0)), new_entries.clone())];
    at_every_crash_point(
        &tiny(),
        |dir| thirty(dir, &tiny()).0,
        &change,
        |recovered, crashed| {
            assert!(
                holds_through(recovered, &log, 7),
                "entries below the cut stay"
            );
            let entries = &recovered.entries;
            let old_prefix = log.starts_with(entries);
            let new_prefix =
                entries.len() >= 7 && new_entries.starts_with(&entries[7..]) && entries.len() > 7;
            assert!(old_prefix || new_prefix, "{entries:?}");
            if !crashed {
                assert_eq!(entries[7..], new_entries);
            }
        },
    );
}

#[test]
fn a_snapshot_after_a_truncation_in_one_batch_survives_a_crash_at_every_step() {
    // The snapshot's entry (10, term 3) only exists once the truncation is written: a crash
    // after the snapshot but before the log leaves an old log the snapshot does not continue,
    // shorter than the synced record had said. The record is lowered first, so that is no
    // damage.
    let (_, log) = thirty(tempfile::tempdir().expect("tempdir").path(), &tiny());
    let change = [
        write(100, Some(hs(3, None, 0)), run(8, 12, 3)),
        full_write(101, None, Some(snap(10, 3)), false, vec![]),
    ];
    at_every_crash_point(
        &tiny(),
        |dir| thirty(dir, &tiny()).0,
        &change,
        |recovered, crashed| {
            assert!(holds_through(recovered, &log, 7));
            if !crashed {
                assert_eq!(recovered.snapshot, Some(snap(10, 3)));
                assert_eq!(recovered.entries, run(11, 12, 3));
            }
        },
    );
}

#[test]
fn a_corrupt_snapshot_is_damage_from_index_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = thirty(dir.path(), &tiny());
    store
        .write(&full_write(100, None, Some(snap(20, 2)), false, vec![]))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    // An older, valid snapshot beside it must not be used in its place either.
    let older = group_dir(dir.path()).join("snapshot-00000000000000000012.snap");
    fs::write(&older, encode_snapshot(&snap(12, 1))).expect("write");
    let (_, path) = snapshot_files(dir.path()).pop().expect("snapshot");
    let mut bytes = fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).expect("write");

    let (offset, index, reason) = expect_corrupt(GroupStore::open(dir.path(), 1, &tiny()));
    assert_eq!((offset, index), (None, Some(20)));
    assert!(reason.contains("checksum"), "{reason}");
    let message = match GroupStore::open(dir.path(), 1, &tiny()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened"),
    };
    assert!(message.contains(&path.display().to_string()), "{message}");

    let (mut store, recovered, damage) =
        GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("opens damaged");
    assert_eq!(
        damage,
        Some(Damage {
            from: 1,
            votes_lost: false
        })
    );
    assert_eq!(recovered.snapshot, None);
    assert!(recovered.entries.is_empty());
    assert_eq!(recovered.hard_state, hs(2, Some(1), 0), "the votes survive");
    assert!(snapshot_files(dir.path()).is_empty(), "set aside");
    assert!(
        fs::exists(format!("{}.damaged", path.display())).expect("exists"),
        "kept for inspection"
    );
    assert!(segment_files(dir.path()).is_empty());

    // The leader repairs it with its snapshot.
    store
        .write(&full_write(
            200,
            Some(hs(3, None, 0)),
            Some(snap(25, 3)),
            true,
            vec![noop(26, 3)],
        ))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    let (_, recovered, damage) =
        GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("reopens");
    assert_eq!(
        damage.map(|d| d.from),
        Some(1),
        "until the core says repaired"
    );
    assert_eq!(recovered.snapshot, Some(snap(25, 3)));
    assert_eq!(recovered.entries, vec![noop(26, 3)]);
}

#[test]
fn a_missing_or_misplaced_middle_segment_is_damage() {
    for misplace in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, log) = thirty(dir.path(), &tiny());
        let segments = segment_files(dir.path());
        let (gone_first, gone) = segments[3].clone();
        if misplace {
            // A segment that does not start where the one before ends.
            let wrong = group_dir(dir.path()).join(format!("log-{:020}.seg", gone_first + 1));
            fs::rename(&gone, wrong).expect("rename");
        } else {
            fs::remove_file(&gone).expect("remove");
        }
        let (offset, index, reason) = expect_corrupt(GroupStore::open(dir.path(), 1, &tiny()));
        assert_eq!((offset, index), (Some(0), Some(gone_first)));
        assert!(reason.contains("segments are missing"), "{reason}");
        assert_eq!(
            segment_files(dir.path()).len(),
            segments.len() - usize::from(!misplace)
        );

        let (mut store, recovered, damage) =
            GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("opens damaged");
        assert_eq!(damage.map(|d| d.from), Some(gone_first));
        assert_eq!(recovered.entries, log[..gone_first as usize - 1]);
        assert_eq!(segment_files(dir.path()), segments[..3], "later ones go");
        store
            .write(&write(100, None, vec![noop(gone_first, 3)]))
            .expect("write");
        store.sync().expect("sync");
        drop(store);
        let (_, recovered, _) = GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("reopen");
        assert_eq!(recovered.entries.last(), Some(&noop(gone_first, 3)));
    }
}

#[test]
fn a_torn_tail_is_allowed_only_in_the_last_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, log) = thirty(dir.path(), &tiny());
    drop(store);
    let segments = segment_files(dir.path());
    let (last_first, last) = segments.last().cloned().expect("segments");
    set_file_len(&last, file_len(&last) - 3);
    // The synced record covers the last segment: even there this is damage now.
    let (_, index, _) = expect_corrupt(GroupStore::open(dir.path(), 1, &tiny()));
    assert_eq!(index, Some(30));
    // Without the record (as if it had not been written yet), it is a torn tail.
    fs::write(group_dir(dir.path()).join("synced"), []).expect("reset");
    let (_, recovered) = GroupStore::open(dir.path(), 1, &tiny()).expect("a torn tail");
    assert_eq!(recovered.entries, log[..29]);
    assert!(last_first <= 30);

    let (middle_first, middle) = segments[2].clone();
    set_file_len(&middle, file_len(&middle) - 3);
    let (offset, index, reason) = expect_corrupt(GroupStore::open(dir.path(), 1, &tiny()));
    let next_first = segments[3].0;
    assert_eq!(index, Some(next_first - 1));
    assert!(offset.is_some());
    assert!(reason.contains("follows, so this is damage"), "{reason}");
    assert!(middle_first < next_first);
}

/// An open syncs every segment it reads and then says so in the synced record, before the
/// store is idle: a bit flip in what it recovered is damage even if the process stops first.
#[test]
fn an_open_records_what_it_recovered_as_synced() {
    let mut model = Model::default();
    five_entries().iter().for_each(|w| model.apply(w));
    let starts = record_starts(&model.log);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = open(dir.path(), 1).expect("open");
    for w in five_entries() {
        store.write(&w).expect("write");
        store.sync().expect("sync");
    }
    // Stopped before the synced record was written: a flip now would read as a torn tail.
    drop(store);
    let (store, recovered) = open(dir.path(), 1).expect("reopen");
    assert_eq!(recovered.entries, model.log);
    assert_eq!(store.synced_record.index, Some(5));
    drop(store);
    let log = log_path(dir.path(), 1);
    let mut bytes = fs::read(&log).expect("read");
    bytes[(starts[5] - 2) as usize] ^= 0x10;
    fs::write(&log, &bytes).expect("write");
    let (_, index, reason) = expect_corrupt(open(dir.path(), 1));
    assert_eq!(index, Some(5));
    assert!(reason.contains("synced through index 5"), "{reason}");
}

#[test]
fn a_bit_flip_in_the_last_synced_record_is_damage() {
    let mut model = Model::default();
    five_entries().iter().for_each(|w| model.apply(w));
    let starts = record_starts(&model.log);
    let flip = |dir: &Path| {
        let log = log_path(dir, 1);
        let mut bytes = fs::read(&log).expect("read");
        bytes[(starts[5] - 2) as usize] ^= 0x10; // inside entry 5, nothing after it
        fs::write(&log, &bytes).expect("write");
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = open(dir.path(), 1).expect("open");
    for w in five_entries() {
        store.write(&w).expect("write");
        store.sync().expect("sync");
    }
    store.record_synced().expect("record");
    drop(store);
    flip(dir.path());
    let (offset, index, reason) = expect_corrupt(open(dir.path(), 1));
    assert_eq!((offset, index), (Some(starts[4]), Some(5)));
    assert!(reason.contains("synced through index 5"), "{reason}");
    let (_, recovered, damage) = open_repairing(dir.path(), 1).expect("opens damaged");
    assert_eq!(damage.map(|d| d.from), Some(5));
    assert_eq!(recovered.entries, model.log[..4]);

    // Through the storage thread, which records the position when idle or stopping.
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path(), 1).expect("open");
    let (thread, _wakeups) = spawn_gated(BTreeMap::from([(1, store)]), Gate::new(true));
    for w in five_entries() {
        thread.submit(1, w);
    }
    thread.shutdown();
    flip(dir.path());
    let (_, index, _) = expect_corrupt(open(dir.path(), 1));
    assert_eq!(index, Some(5));

    // Records synced after the last recorded position can still be torn.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = open(dir.path(), 1).expect("open");
    let writes = five_entries();
    for (i, w) in writes.iter().enumerate() {
        store.write(w).expect("write");
        store.sync().expect("sync");
        if i == 2 {
            store.record_synced().expect("record");
        }
    }
    drop(store);
    flip(dir.path());
    let (_, recovered) = open(dir.path(), 1).expect("a torn tail above the record");
    assert_eq!(recovered.entries, model.log[..4]);
}

#[test]
fn an_unreadable_synced_record_fails_safe() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_synced(dir.path(), &five_entries());
    let synced = group_dir(dir.path()).join("synced");
    fs::write(&synced, [0xAB; 2 * SLOT_BYTES]).expect("garble");
    // A clean log opens; the record is rewritten.
    let (mut store, recovered) = open(dir.path(), 1).expect("clean log");
    assert_eq!(recovered.entries.len(), 5);
    store.record_synced().expect("record");
    drop(store);
    let log = log_path(dir.path(), 1);
    set_file_len(&log, file_len(&log) - 3);
    let (_, index, _) = expect_corrupt(open(dir.path(), 1));
    assert_eq!(index, Some(5), "the rewritten record covers entry 5");
    // Unreadable again: a torn tail might be synced data, so it is damage.
    fs::write(&synced, [0xCD; 2 * SLOT_BYTES]).expect("garble");
    let (_, _, reason) = expect_corrupt(open(dir.path(), 1));
    assert!(reason.contains("synced record is unreadable"), "{reason}");
}

#[test]
fn a_truncation_lowers_the_synced_record_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, log) = thirty(dir.path(), &tiny());
    store
        .write(&write(100, Some(hs(3, None, 0)), run(5, 6, 3)))
        .expect("write");
    store.sync().expect("sync");
    drop(store);
    let (mut store, recovered, damage) =
        GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("reopen");
    assert_eq!(
        damage, None,
        "the cut below the recorded index is no damage"
    );
    let mut expected = log[..4].to_vec();
    expected.extend(run(5, 6, 3));
    assert_eq!(recovered.entries, expected);
    // And the record still guards what is below the cut.
    store.record_synced().expect("record");
    drop(store);
    let last = segment_files(dir.path()).pop().expect("segment").1;
    set_file_len(&last, file_len(&last) - 1);
    let (_, index, _) = expect_corrupt(GroupStore::open(dir.path(), 1, &tiny()));
    assert_eq!(index, Some(6));
}

#[test]
fn writes_that_do_not_fit_the_snapshot_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(Vec<Write>, &str)> = vec![
        (
            vec![full_write(100, None, None, true, vec![])],
            "without a snapshot",
        ),
        (
            vec![
                full_write(100, None, Some(snap(20, 2)), false, vec![]),
                full_write(101, None, Some(snap(20, 2)), false, vec![]),
            ],
            "is not past the snapshot at 20",
        ),
        (
            vec![full_write(100, None, Some(snap(20, 1)), false, vec![])],
            "whose entry there has term Some(2)",
        ),
        (
            vec![full_write(100, None, Some(snap(40, 2)), false, vec![])],
            "whose entry there has term None",
        ),
        (
            vec![
                full_write(100, None, Some(snap(20, 2)), false, vec![]),
                write(101, None, vec![noop(20, 3)]),
            ],
            "the snapshot holds everything up to 20",
        ),
        (
            vec![full_write(
                100,
                None,
                Some(snap(40, 3)),
                true,
                vec![noop(42, 3)],
            )],
            "starts at index 42 but the log ends at 40",
        ),
    ];
    for (group, (writes, expected)) in cases.into_iter().enumerate() {
        let group = group as GroupId + 1;
        let (mut store, _) = GroupStore::open(dir.path(), group, &tiny()).expect("open");
        let log = {
            let mut log = run(1, 15, 1);
            log.extend(run(16, 30, 2));
            log
        };
        store.write(&write(1, None, log)).expect("write");
        let results: Vec<_> = writes.iter().map(|w| store.write(w)).collect();
        let message = results
            .into_iter()
            .find_map(|r| r.err())
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains(expected), "{expected}: {message}");
        assert!(matches!(store.sync(), Err(StorageError::Failed { .. })));
    }
}

#[test]
fn leftovers_of_an_interrupted_snapshot_write_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(thirty(dir.path(), &tiny()));
    let temp = group_dir(dir.path()).join("snapshot-00000000000000000020.snap.tmp");
    fs::write(&temp, b"half a snap").expect("write");
    let (_, recovered, damage) = GroupStore::open_repairing(dir.path(), 1, &tiny()).expect("opens");
    assert_eq!(damage, None);
    assert_eq!(recovered.snapshot, None);
    assert_eq!(recovered.entries.len(), 30);
    assert!(!fs::exists(&temp).expect("exists"), "removed");
}

#[test]
fn a_log_of_the_single_file_layout_becomes_the_first_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = run(1, 5, 1);
    let mut bytes = Vec::new();
    for entry in &entries {
        holdfast_core::storage::encode_entry(entry, &mut bytes).expect("encode");
    }
    // The layout had a state file too, written before the log.
    write_synced(dir.path(), &[write(1, Some(hs(1, None, 0)), vec![])]);
    fs::write(group_dir(dir.path()).join("log"), &bytes).expect("write");
    let (_, recovered) = open(dir.path(), 1).expect("opens");
    assert_eq!(recovered.entries, entries);
    assert!(!fs::exists(group_dir(dir.path()).join("log")).expect("exists"));
    assert_eq!(fs::read(log_path(dir.path(), 1)).expect("read"), bytes);
}

/// A tiny deterministic generator, so the model test needs no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// What a disk holds after a sequence of writes: the `Write` doc's rules, applied literally.
#[derive(Clone, Debug, Default)]
struct SnapModel {
    hard_state: HardState,
    snapshot: Option<(Index, Term)>,
    /// The entries after the snapshot.
    log: Vec<Entry>,
}

impl SnapModel {
    fn base(&self) -> Index {
        self.snapshot.map_or(0, |s| s.0)
    }

    fn last(&self) -> Index {
        self.log.last().map_or(self.base(), |e| e.index)
    }

    fn last_term(&self) -> Term {
        self.log
            .last()
            .map(|e| e.term)
            .or(self.snapshot.map(|s| s.1))
            .unwrap_or(0)
    }

    fn term_at(&self, index: Index) -> Term {
        self.log
            .iter()
            .find(|e| e.index == index)
            .map(|e| e.term)
            .or(self.snapshot.filter(|s| s.0 == index).map(|s| s.1))
            .unwrap_or(0)
    }

    fn apply(&mut self, write: &Write) {
        if let Some(s) = &write.snapshot {
            let base = self.base();
            self.snapshot = Some((s.index, s.term));
            if write.discard_log {
                self.log.clear();
            } else {
                self.log
                    .drain(..((s.index - base) as usize).min(self.log.len()));
            }
        }
        if let Some(first) = write.entries.first() {
            self.log.truncate((first.index - self.base() - 1) as usize);
            self.log.extend(write.entries.iter().cloned());
        }
        if let Some(hard_state) = write.hard_state {
            self.hard_state = hard_state;
        }
    }

    /// A write such as a replica hands out: appends, truncations by a newer term, compactions
    /// and installed snapshots that replace the log.
    fn next_write(&self, rng: &mut Rng, id: WriteId) -> Write {
        let term = self.last_term().max(1);
        match rng.below(10) {
            0 if self.last() > self.base() => {
                let index = self.base() + 1 + rng.below(self.last() - self.base());
                full_write(
                    id,
                    None,
                    Some(snap(index, self.term_at(index))),
                    false,
                    vec![],
                )
            }
            1 => {
                let index = self.last() + 1 + rng.below(8);
                let new_term = term + 1;
                let entries = run(index + 1, index + rng.below(4), new_term);
                full_write(
                    id,
                    Some(hs(new_term, None, 0)),
                    Some(snap(index, new_term)),
                    true,
                    entries,
                )
            }
            2 | 3 if self.last() > self.base() => {
                let from = self.base() + 1 + rng.below(self.last() - self.base());
                let new_term = term + 1;
                let to = from + rng.below(6);
                write(id, Some(hs(new_term, Some(1), 0)), run(from, to, new_term))
            }
            _ => {
                let from = self.last() + 1;
                write(id, None, run(from, from + rng.below(5), term))
            }
        }
    }
}

#[test]
fn random_writes_recover_as_the_model_says() {
    for seed in 1..=12u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            segment_bytes_max: 40 + 30 * (seed % 4),
        };
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut model = SnapModel::default();
        let (mut store, _) = GroupStore::open(dir.path(), 1, &config).expect("open");
        // A replica's term is durable before any entry of it (recovery relies on it).
        let first = write(1, Some(hs(1, None, 0)), vec![]);
        store.write(&first).expect("write");
        store.sync().expect("sync");
        model.apply(&first);
        let mut id = 1;
        for round in 0..40 {
            for _ in 0..1 + rng.below(4) {
                id += 1;
                let w = model.next_write(&mut rng, id);
                store
                    .write(&w)
                    .unwrap_or_else(|e| panic!("seed {seed}: {w:?}: {e}"));
                model.apply(&w);
            }
            store.sync().expect("sync");
            if rng.below(3) == 0 {
                store.record_synced().expect("record");
            }
            if round % 5 == 4 {
                drop(store);
                let (reopened, recovered, damage) =
                    GroupStore::open_repairing(dir.path(), 1, &config).expect("reopen");
                let context = format!("seed {seed}, round {round}");
                assert_eq!(damage, None, "{context}");
                assert_eq!(
                    recovered.snapshot.as_ref().map(|s| (s.index, s.term)),
                    model.snapshot,
                    "{context}"
                );
                assert_eq!(recovered.entries, model.log, "{context}");
                assert_eq!(recovered.hard_state, model.hard_state, "{context}");
                assert_eq!(read_disk(dir.path()).1, model.log, "{context}");
                store = reopened;
            }
        }
    }
}

#[test]
fn the_synced_record_costs_no_fsync_per_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = open(dir.path(), 1).expect("open");
    let mut id = 0;
    let mut batch = |store: &mut GroupStore, entries: Vec<Entry>| {
        id += 1;
        let before = store.fsyncs();
        store.write(&write(id, None, entries)).expect("write");
        store.sync().expect("sync");
        store.fsyncs() - before
    };
    assert_eq!(
        batch(&mut store, run(1, 10, 1)),
        2,
        "the first append creates the segment: its data, then the directory"
    );
    let before = store.fsyncs();
    store.record_synced().expect("record");
    store.record_synced().expect("record");
    assert_eq!(store.fsyncs() - before, 1, "recorded once, then current");
    for i in 0..5 {
        let from = 11 + i * 10;
        assert_eq!(
            batch(&mut store, run(from, from + 9, 1)),
            1,
            "one fdatasync"
        );
    }
    // A cut below the record: lower the record, cut the segment, append.
    assert_eq!(batch(&mut store, run(5, 6, 2)), 3);
}

#[test]
fn a_snapshot_file_written_early_is_found_in_place_and_a_wrong_one_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, _) = thirty(dir.path(), &tiny());
    // The snapshot thread wrote the file before the core compacted.
    super::write_snapshot_file(&group_dir(dir.path()), &snap(20, 2)).expect("early write");
    let written = fs::read(&snapshot_files(dir.path())[0].1).expect("read");
    let before = store.fsyncs();
    store
        .write(&full_write(100, None, Some(snap(20, 2)), false, vec![]))
        .expect("write");
    store.sync().expect("sync");
    let in_place = store.fsyncs() - before;
    assert_eq!(
        fs::read(&snapshot_files(dir.path())[0].1).expect("read"),
        written
    );

    // A file of the same name with other bytes is not taken for the snapshot.
    let other = Snapshot {
        data: Bytes::from_static(b"another state"),
        ..snap(25, 2)
    };
    super::write_snapshot_file(&group_dir(dir.path()), &other).expect("early write");
    let before = store.fsyncs();
    store
        .write(&full_write(101, None, Some(snap(25, 2)), false, vec![]))
        .expect("write");
    store.sync().expect("sync");
    let rewritten = store.fsyncs() - before;
    assert!(
        rewritten >= in_place + 2,
        "the wrong file was rewritten: {rewritten} syncs against {in_place}"
    );
    drop(store);
    let (_, recovered) = GroupStore::open(dir.path(), 1, &tiny()).expect("open");
    assert_eq!(recovered.snapshot, Some(snap(25, 2)));
    assert_eq!(read_disk(dir.path()).0, Some(snap(25, 2)));
}

#[test]
fn a_lost_or_damaged_state_file_beside_a_log_is_votes_lost_damage() {
    let lost = Damage {
        from: 1,
        votes_lost: true,
    };
    type Harm = fn(&Path);
    let harms: [(&str, Harm); 3] = [
        ("deleted", |state| fs::remove_file(state).expect("rm")),
        ("truncated", |state| set_file_len(state, 0)),
        ("overwritten", |state| {
            fs::write(state, vec![0xAB; 2 * SLOT_BYTES]).expect("write")
        }),
    ];
    for (what, harm) in harms {
        let dir = tempfile::tempdir().expect("tempdir");
        write_synced(dir.path(), &five_entries());
        let state = state_path(dir.path(), 1);
        harm(&state);

        // Not a first start: refused by a plain open, naming the file...
        let message = expect_corrupt_message(dir.path());
        assert!(message.contains("state file"), "{what}: {message}");
        assert!(
            message.contains(&state.display().to_string()),
            "{what}: {message}"
        );
        // ...and the wiped-disk case for a repairing one: it will never vote again.
        let (mut store, recovered, damage) = open_repairing(dir.path(), 1).expect("opens");
        assert_eq!(damage, Some(lost), "{what}");
        assert_eq!(recovered.hard_state, HardState::default(), "{what}");
        // The replica writes a state again; the directory alone then looks whole, which is
        // why the server records the loss in its identity (`identity.rs`).
        store
            .write(&write(6, Some(hs(4, None, 0)), vec![]))
            .expect("write");
        store.sync().expect("sync");
        drop(store);
        let (_, recovered, damage) = open_repairing(dir.path(), 1).expect("reopens");
        assert_eq!(recovered.hard_state, hs(4, None, 0), "{what}");
        assert_eq!(damage, None, "{what}");
    }
    // A missing state file and nothing else is a first start.
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, recovered, damage) = open_repairing(dir.path(), 1).expect("opens");
    assert_eq!((recovered.hard_state, damage), (HardState::default(), None));
    fs::remove_file(state_path(dir.path(), 1)).expect("rm");
    let (_, _, damage) = open_repairing(dir.path(), 1).expect("opens");
    assert_eq!(damage, None);
}
