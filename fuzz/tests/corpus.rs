//! Replays the committed fuzz corpus through the fuzz entry points, so every input that once
//! mattered stays checked by a plain `cargo test`, with no fuzzer installed.

use std::path::{Path, PathBuf};

use holdfast_fuzz::{RaftStats, raft_messages, run_raft_messages};

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
