//! Replays the committed fuzz corpus through the fuzz entry points, so every input that once
//! mattered stays checked by a plain `cargo test`, with no fuzzer installed.

use std::path::{Path, PathBuf};

use holdfast_fuzz::{
    BrokerStats, FramesStats, LogStats, PlanStats, RaftStats, SimStats, broker, frames,
    log_recovery, plan_recovery, raft_messages, run_broker, run_frames, run_log_recovery,
    run_plan_recovery, run_raft_messages, run_sim_schedule, sim_schedule,
};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {dir:?}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            (path, data)
        })
        .collect()
}

#[test]
fn raft_messages_corpus_replays_cleanly() {
    let files = corpus("raft_messages");
    assert!(!files.is_empty(), "the raft_messages corpus is empty");
    let mut total = RaftStats::default();
    for (path, data) in &files {
        // A panic here names the file: the default hook prints the message, this the input.
        eprintln!("replaying {}", path.display());
        raft_messages(data);
        let stats = run_raft_messages(data);
        total.ops += stats.ops;
        total.forged += stats.forged;
        total.restarts += stats.restarts;
        total.leaders += stats.leaders;
        total.max_commit = total.max_commit.max(stats.max_commit);
        total.proposals_committed += stats.proposals_committed;
    }
    eprintln!("{} inputs: {total:?}", files.len());
    // The corpus must exercise more than the start-up path.
    assert!(total.leaders > 0, "no input elects a leader: {total:?}");
    assert!(
        total.proposals_committed > 0,
        "no input commits a proposal: {total:?}"
    );
    assert!(total.restarts > 0, "no input restarts a node: {total:?}");
    assert!(total.forged > 0, "no input forges a message: {total:?}");
}

/// Random inputs that forge messages of terms near the end of the term space: every run
/// ends with the check that the replicas still elect (in `run_raft_messages`), and enough of
/// them reach such terms for that to mean something.
#[test]
fn raft_messages_far_terms_leave_the_group_able_to_elect() {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut far = 0;
    for _ in 0..200 {
        let data: Vec<u8> = (0..512).map(|_| rng.next() as u8).collect();
        far += run_raft_messages(&data).far_terms;
    }
    assert!(far > 0, "no input forged a far term");
}

#[test]
fn raft_messages_survives_degenerate_inputs() {
    for data in [
        &[][..],
        &[0],
        &[0xff; 7],
        &[0; 64],
        &[0xff; 64],
        &[0x55; 4096],
    ] {
        raft_messages(data);
    }
}

/// A tiny deterministic generator (xorshift), so the corpus can be made again.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes the seed corpus: from many random inputs, keeps for each of a few goals the one
/// that reaches furthest. Run once with
/// `cargo test -p holdfast-fuzz --test corpus -- --ignored generate_raft_messages_corpus`;
/// the files are committed. Existing files of the same names are overwritten.
#[test]
#[ignore = "writes the committed seed corpus; run by hand"]
fn generate_raft_messages_corpus() {
    type Goal = (&'static str, fn(&RaftStats) -> u64);
    let goals: [Goal; 9] = [
        ("commit", |s| s.max_commit),
        ("committed-proposals", |s| s.proposals_committed as u64),
        ("leaders", |s| s.leaders as u64),
        ("restarts-commit", |s| {
            (s.restarts.min(4) as u64) * 100 + s.max_commit
        }),
        ("honest-commit", |s| {
            if s.forged == 0 { s.max_commit } else { 0 }
        }),
        ("honest-restarts-commit", |s| {
            if s.forged == 0 {
                (s.restarts.min(4) as u64) * 100 + s.max_commit
            } else {
                0
            }
        }),
        ("forged-commit", |s| {
            (s.forged.min(20) as u64) * 100 + s.max_commit
        }),
        ("forged-leaders", |s| {
            (s.forged.min(20) as u64) * 100 + s.leaders as u64
        }),
        ("long", |s| s.ops as u64),
    ];
    let lengths = [64usize, 256, 1024, 4096];
    let mut best: Vec<(u64, Vec<u8>)> = vec![(0, Vec::new()); goals.len() * lengths.len()];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..4000 {
        let length = lengths[(rng.next() % lengths.len() as u64) as usize];
        let slot = lengths.iter().position(|&l| l == length).expect("a length");
        let data: Vec<u8> = (0..length).map(|_| rng.next() as u8).collect();
        let stats = run_raft_messages(&data);
        for (g, (_, score)) in goals.iter().enumerate() {
            let entry = &mut best[g * lengths.len() + slot];
            let s = score(&stats);
            if s > entry.0 {
                *entry = (s, data.clone());
            }
        }
    }
    let dir = corpus_dir("raft_messages");
    std::fs::create_dir_all(&dir).expect("corpus directory");
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut write = |name: String, score: u64, data: &Vec<u8>| {
        if score == 0 || written.contains(data) {
            return;
        }
        let path = dir.join(name);
        std::fs::write(&path, data).expect("write corpus file");
        eprintln!(
            "{}: score {score}, {:?}",
            path.display(),
            run_raft_messages(data)
        );
        written.push(data.clone());
    };
    for (g, (name, _)) in goals.iter().enumerate() {
        // The best of the lengths up to 1 KiB (4 KiB for "long") keeps the replay fast.
        let slots = &best[g * lengths.len()..(g + 1) * lengths.len()];
        let candidates = if *name == "long" {
            &slots[3..]
        } else {
            &slots[..3]
        };
        if let Some((score, data)) = candidates.iter().max_by_key(|(score, _)| *score) {
            write(format!("seed-{name}"), *score, data);
        }
        // Short ones too: small inputs are what the fuzzer mutates best.
        let (score, data) = &slots[0];
        write(format!("seed-short-{name}"), *score, data);
    }
}

/// Replays every file of `target`'s corpus through `fuzz` (the entry point the fuzzer calls)
/// and `run`, and returns what each run reached.
fn replay<S>(target: &str, fuzz: fn(&[u8]), run: fn(&[u8]) -> S) -> Vec<S> {
    let files = corpus(target);
    assert!(!files.is_empty(), "the {target} corpus is empty");
    let total: usize = files.iter().map(|(_, data)| data.len()).sum();
    assert!(
        total <= 64 << 10,
        "the {target} corpus holds {total} bytes: keep it small"
    );
    files
        .iter()
        .map(|(path, data)| {
            eprintln!("replaying {}", path.display());
            fuzz(data);
            run(data)
        })
        .collect()
}

/// How many runs reached each goal; every goal must be reached by some input.
fn assert_reached<S: std::fmt::Debug>(target: &str, stats: &[S], goals: &[Goal<S>]) {
    for (name, score) in goals {
        let reached = stats.iter().filter(|s| score(s) > 0).count();
        assert!(
            reached > 0,
            "no input of the {target} corpus reaches {name}: {stats:#?}"
        );
    }
    eprintln!("{target}: {} inputs reach every goal", stats.len());
}

type Goal<S> = (&'static str, fn(&S) -> u64);

fn frames_goals() -> Vec<Goal<FramesStats>> {
    vec![
        ("frames", |s| s.frames as u64),
        ("hello", |s| s.hellos_accepted as u64),
        (
            "clean-end",
            |s| {
                if s.clean_end { s.frames as u64 } else { 0 }
            },
        ),
        ("checksum", |s| {
            u64::from(s.checksum) * (1 + s.frames as u64)
        }),
        ("too-large", |s| {
            u64::from(s.too_large) * (1 + s.frames as u64)
        }),
        ("malformed", |s| {
            u64::from(s.malformed) * (1 + s.frames as u64)
        }),
        ("peer-accepted", |s| u64::from(s.node_accepted)),
        ("client-accepted", |s| u64::from(s.client_accepted)),
        ("hello-refused", |s| u64::from(s.hello_refused)),
        ("tls-refused", |s| u64::from(s.tls_refused)),
    ]
}

fn log_recovery_goals() -> Vec<Goal<LogStats>> {
    vec![
        ("entries", |s| s.entries as u64),
        ("clean", |s| s.clean as u64 * (1 + s.entries as u64)),
        ("torn", |s| s.torn as u64 * (1 + s.entries as u64)),
        ("corrupt", |s| s.corrupt as u64 * (1 + s.entries as u64)),
        ("damaged", |s| {
            s.damaged_logs as u64 * (1 + s.entries as u64)
        }),
        ("state-decoded", |s| s.states_decoded as u64),
        ("state-refused", |s| s.states_refused as u64),
        ("snapshot-decoded", |s| s.snapshots_decoded as u64),
        ("snapshot-refused", |s| s.snapshots_refused as u64),
        ("kept-beside-snapshot", |s| {
            s.logs_kept_beside_snapshot as u64
        }),
    ]
}

fn plan_recovery_goals() -> Vec<Goal<PlanStats>> {
    vec![
        ("plans", |s| s.plans as u64),
        ("refused", |s| s.refused as u64),
        ("entries-kept", |s| s.entries_kept as u64),
        ("damaged", |s| {
            s.damaged as u64 * (1 + s.entries_kept as u64)
        }),
        ("torn", |s| s.torn as u64 * (1 + s.entries_kept as u64)),
        ("state-lost", |s| s.state_lost as u64),
        ("snapshot-used", |s| {
            s.snapshots_used as u64 * (1 + s.entries_kept as u64)
        }),
        ("removed-trailing", |s| s.removed_trailing as u64),
        ("removed-leading", |s| s.removed_leading as u64),
        ("queue-cut", |s| s.queue_cuts as u64),
        ("queue-lacks", |s| s.queue_lacks as u64),
    ]
}

fn broker_goals() -> Vec<Goal<BrokerStats>> {
    vec![
        ("appended", |s| s.appended as u64),
        ("duplicates", |s| s.duplicates as u64),
        ("pulled", |s| s.pulled as u64),
        ("acked", |s| s.acked as u64),
        ("requeued", |s| s.requeued as u64),
        ("dead-lettered", |s| s.dead_lettered as u64),
        ("refused", |s| s.refused as u64),
        ("raw-decoded", |s| s.raw_decoded as u64),
        ("topics", |s| s.topics_created as u64),
        ("trimmed", |s| s.trimmed as u64),
        ("restores", |s| s.restores as u64),
        ("leases", |s| s.lease_commands as u64),
    ]
}

fn sim_schedule_goals() -> Vec<Goal<SimStats>> {
    vec![
        ("faults", |s| s.faults),
        ("elections", |s| s.elections),
        ("acked", |s| s.messages_acked),
        ("committed", |s| s.entries_committed),
    ]
}

#[test]
fn frames_corpus_replays_cleanly() {
    let stats = replay("frames", frames, run_frames);
    assert_reached("frames", &stats, &frames_goals());
}

#[test]
fn log_recovery_corpus_replays_cleanly() {
    let stats = replay("log_recovery", log_recovery, run_log_recovery);
    assert_reached("log_recovery", &stats, &log_recovery_goals());
}

#[test]
fn plan_recovery_corpus_replays_cleanly() {
    let stats = replay("plan_recovery", plan_recovery, run_plan_recovery);
    assert_reached("plan_recovery", &stats, &plan_recovery_goals());
}

#[test]
fn broker_corpus_replays_cleanly() {
    let stats = replay("broker", broker, run_broker);
    assert_reached("broker", &stats, &broker_goals());
}

#[test]
fn sim_schedule_corpus_replays_cleanly() {
    let stats = replay("sim_schedule", sim_schedule, run_sim_schedule);
    assert_reached("sim_schedule", &stats, &sim_schedule_goals());
}

#[test]
fn new_targets_survive_degenerate_inputs() {
    for data in [
        &[][..],
        &[0],
        &[0xff; 7],
        &[0; 64],
        &[0xff; 64],
        &[0x55; 4096],
    ] {
        frames(data);
        log_recovery(data);
        plan_recovery(data);
        broker(data);
    }
    for data in [&[][..], &[0xff; 16], &[0x55; 64]] {
        sim_schedule(data);
    }
}

/// Writes `target`'s seed corpus: from `samples` random inputs of each length, and from the
/// files (up to 2 KiB) in `$HOLDFAST_FUZZ_CANDIDATES/<target>/` if that is set (say, the
/// scratch corpus of a long fuzzing run), keeps for each goal the shortest input among those
/// that reach it furthest. Files of the same names are overwritten; others (regressions) are
/// left alone.
fn generate<S>(
    target: &str,
    run: fn(&[u8]) -> S,
    goals: &[Goal<S>],
    lengths: &[usize],
    samples: usize,
) {
    let mut best: Vec<(u64, Vec<u8>)> = vec![(0, Vec::new()); goals.len()];
    let mut consider = |data: Vec<u8>| {
        let stats = run(&data);
        for ((_, score), best) in goals.iter().zip(&mut best) {
            let s = score(&stats);
            if s > best.0 || (s > 0 && s == best.0 && data.len() < best.1.len()) {
                *best = (s, data.clone());
            }
        }
    };
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for &length in lengths {
        for _ in 0..samples {
            consider((0..length).map(|_| rng.next() as u8).collect());
        }
    }
    if let Some(dir) = std::env::var_os("HOLDFAST_FUZZ_CANDIDATES") {
        let dir = Path::new(&dir).join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {dir:?}: {e}"))
            .map(|entry| entry.expect("directory entry").path())
            .collect();
        files.sort();
        for path in files {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            if data.len() <= 2048 {
                consider(data);
            }
        }
    }
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    let mut written: Vec<Vec<u8>> = Vec::new();
    for ((name, _), (score, data)) in goals.iter().zip(&best) {
        if *score == 0 || written.contains(data) {
            continue;
        }
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, data).expect("write corpus file");
        eprintln!("{}: score {score}, {} bytes", path.display(), data.len());
        written.push(data.clone());
    }
}

/// `cargo test -p holdfast-fuzz --test corpus -- --ignored generate_frames_corpus`: the
/// frames target's alone, for a change of the wire format.
#[test]
#[ignore = "writes the committed seed corpus of the frames target; run by hand"]
fn generate_frames_corpus() {
    generate(
        "frames",
        run_frames,
        &frames_goals(),
        &[64, 256, 1024],
        3000,
    );
}

/// `cargo test -p holdfast-fuzz --test corpus -- --ignored generate_corpus`; the files are
/// committed.
#[test]
#[ignore = "writes the committed seed corpus of the frames, log_recovery, plan_recovery, \
            broker and sim_schedule targets; run by hand"]
fn generate_corpus() {
    generate(
        "frames",
        run_frames,
        &frames_goals(),
        &[64, 256, 1024],
        3000,
    );
    generate(
        "log_recovery",
        run_log_recovery,
        &log_recovery_goals(),
        &[64, 256, 1024],
        3000,
    );
    generate(
        "plan_recovery",
        run_plan_recovery,
        &plan_recovery_goals(),
        &[64, 256, 1024],
        3000,
    );
    generate(
        "broker",
        run_broker,
        &broker_goals(),
        &[64, 256, 1024],
        3000,
    );
    generate(
        "sim_schedule",
        run_sim_schedule,
        &sim_schedule_goals(),
        &[16],
        200,
    );
}
