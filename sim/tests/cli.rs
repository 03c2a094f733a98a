//! The command line, as scripts rely on it.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_holdfast-sim"))
        .args(args)
        .output()
        .expect("the holdfast-sim binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn run_summarises_and_exits_zero_when_every_seed_passes() {
    let output = sim(&["run", "--seeds", "20", "--from", "40"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    for expected in [
        "seeds passed: 20",
        "seeds failed: 0",
        "faults injected:",
        "crash",
        "elections won:",
        "entries committed:",
        "simulated s per wall s",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
}

#[test]
fn replay_ends_with_the_same_trace_hash_every_time() {
    let first = stdout(&sim(&["replay", "9", "--trace"]));
    let again = stdout(&sim(&["replay", "9"]));
    let last = |text: &str| text.lines().last().unwrap_or_default().to_string();
    assert!(last(&first).starts_with("trace_hash="), "{}", last(&first));
    assert_eq!(last(&first), last(&again));
    assert!(first.lines().count() > 100, "--trace printed no events");
}

#[test]
fn canaries_lists_one_name_a_line() {
    let text = stdout(&sim(&["canaries"]));
    let names: Vec<_> = text.lines().collect();
    assert_eq!(names.len(), holdfast_core::raft::Canary::ALL.len());
    assert!(names.contains(&"commit-old-term"));
}

#[test]
fn bad_arguments_are_refused() {
    assert_eq!(
        sim(&["run", "--seeds", "1", "--nodes", "4"]).status.code(),
        Some(2)
    );
    let unknown = sim(&["run", "--seeds", "1", "--canary", "no-such-bug"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("holdfast-sim canaries"));
}

#[cfg(feature = "canaries")]
#[test]
fn a_caught_canary_fails_the_run_and_names_a_replay() {
    let output = sim(&["run", "--seeds", "10", "--canary", "commit-from-minority"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("replay the first failure: holdfast-sim replay"),
        "{text}"
    );
    // Every option spelled out, ready for the regression list.
    let regression = text
        .lines()
        .find(|l| l.starts_with("regression: "))
        .unwrap_or_default();
    assert!(
        regression.contains(
            " --workload queue --nodes 3 --groups 2 --fault-phase-ms 10000 \
             --liveness-limit-ms 20000 --canary commit-from-minority # "
        ),
        "{text}"
    );
}

#[cfg(not(feature = "canaries"))]
#[test]
fn a_canary_needs_the_feature() {
    let output = sim(&["run", "--seeds", "1", "--canary", "commit-from-minority"]);
    assert_eq!(output.status.code(), Some(2));
}

/// A regression list written for one test, removed when dropped.
struct List(std::path::PathBuf);

impl List {
    fn new(name: &str, text: &str) -> List {
        let path =
            std::env::temp_dir().join(format!("holdfast-sim-{}-{name}.txt", std::process::id()));
        std::fs::write(&path, text).expect("the temporary directory is writable");
        List(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for List {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_regression_list_in_the_repository_passes() {
    let list = concat!(env!("CARGO_MANIFEST_DIR"), "/regressions.txt");
    let output = sim(&["regress", list]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("ok    3018330 --workload queue"), "{text}");
    assert!(text.contains("failed: 0"), "{text}");
}

#[test]
fn a_failing_regression_seed_fails_the_run_and_names_its_replay() {
    let list = List::new(
        "failing",
        "# a liveness limit no run meets\n\
         5 --workload queue --liveness-limit-ms 1 # fails on purpose\n\
         40 --workload raft # passes\n",
    );
    let output = sim(&["regress", list.path(), "--jobs", "1"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  5 --workload queue --liveness-limit-ms 1"),
        "{text}"
    );
    assert!(
        text.contains("replay: holdfast-sim replay 5 --workload queue --liveness-limit-ms 1"),
        "{text}"
    );
    assert!(text.contains("ok    40 --workload raft"), "{text}");
    assert!(
        text.contains("regressions passed: 1, open (failing as recorded): 0, failed: 1"),
        "{text}"
    );
}

#[test]
fn an_open_regression_must_go_on_failing_with_its_checker() {
    let open = "5 --workload queue --liveness-limit-ms 1 # OPEN liveness: not fixed yet\n";
    let list = List::new("open", open);
    let output = sim(&["regress", list.path(), "--jobs", "1"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("open  5 --workload queue"), "{text}");
    assert!(
        text.contains("open (failing as recorded): 1, failed: 0"),
        "{text}"
    );
    for (name, line, expected) in [
        (
            "other-checker",
            "5 --workload queue --liveness-limit-ms 1 # OPEN lost: another bug\n",
            "at ",
        ),
        (
            "fixed",
            "40 --workload raft # OPEN liveness: fixed meanwhile\n",
            "drop the `OPEN` from line 1",
        ),
    ] {
        let list = List::new(name, line);
        let output = sim(&["regress", list.path(), "--jobs", "1"]);
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(1), "{name}: {text}");
        assert!(text.contains(expected), "{name}: {text}");
    }
}

#[test]
fn a_bad_regression_list_is_refused_with_its_line() {
    for (name, text, expected) in [
        ("no-why", "7 --workload raft\n", ":1: say why"),
        (
            "empty-why",
            "# fine\n7 --workload raft #  \n",
            ":2: say why",
        ),
        ("bad-option", "7 --nodes 4 # why\n", ":1: error"),
        (
            "canary",
            "7 --canary no-dedup # why\n",
            ":1: a regression seed must pass",
        ),
        ("empty", "# nothing\n\n", "no seeds"),
        (
            "open-no-checker",
            "7 # OPEN: a bug\n",
            ":1: an open failure says which",
        ),
    ] {
        let list = List::new(name, text);
        let output = sim(&["regress", list.path()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    assert_eq!(
        sim(&["regress", "/no/such/list.txt"]).status.code(),
        Some(2)
    );
}

#[test]
fn explore_runs_a_window_derived_from_its_text() {
    let output = sim(&["run", "--seeds", "2", "--explore", "0123abcd 2026-12-02"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let start = holdfast_sim::runner::explore_start("0123abcd 2026-12-02");
    assert!(start >= 1 << 32, "{start}");
    assert!(
        text.contains(&format!("exploring seeds {start}..{}", start + 2)),
        "{text}"
    );
    assert!(text.contains("seeds passed: 2"), "{text}");
    assert_ne!(
        start,
        holdfast_sim::runner::explore_start("0123abcd 2026-12-03")
    );
    assert_eq!(
        sim(&["run", "--seeds", "1", "--from", "3", "--explore", "x"])
            .status
            .code(),
        Some(2),
        "--from and --explore name the first seed twice"
    );
}

#[test]
fn a_pinned_fault_mix_is_shown_and_a_bad_one_refused() {
    let text = stdout(&sim(&["replay", "9", "--faults", "crash=5,isolate=3"]));
    assert!(text.contains("fault mix: isolate=3,crash=5"), "{text}");
    let drawn = stdout(&sim(&["replay", "9"]));
    assert!(drawn.contains("fault mix: "), "{drawn}");
    let bad = sim(&["replay", "9", "--faults", "meteor=3"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown fault kind"));
}

#[test]
fn only_faults_leaves_the_others_out() {
    let none = stdout(&sim(&[
        "replay",
        "9",
        "--workload",
        "raft",
        "--only-faults",
        "none",
        "--trace",
    ]));
    assert!(!none.contains("FAULT #"), "a fault was applied:\n{none}");
    let two = stdout(&sim(&[
        "replay",
        "9",
        "--workload",
        "raft",
        "--only-faults",
        "1,3",
        "--trace",
    ]));
    let applied: Vec<&str> = two.lines().filter(|l| l.contains(" FAULT #")).collect();
    assert_eq!(applied.len(), 2, "{applied:?}");
    assert!(
        applied[0].contains("FAULT #1 ") && applied[1].contains("FAULT #3 "),
        "{applied:?}"
    );
}

#[test]
fn replay_draws_a_timeline() {
    let path = std::env::temp_dir().join(format!("holdfast-timeline-{}.html", std::process::id()));
    let output = sim(&[
        "replay",
        "9",
        "--workload",
        "raft",
        "--timeline",
        path.to_str().unwrap_or_default(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let page = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    for expected in ["<svg", "leads from", "FAULT #", "heal"] {
        assert!(page.contains(expected), "no {expected:?} in the timeline");
    }
}

#[cfg(feature = "canaries")]
#[test]
fn shrink_keeps_fewer_faults_that_fail_with_the_same_checker() {
    let output = sim(&[
        "shrink",
        "19",
        "--workload",
        "raft",
        "--canary",
        "skip-prev-log-check",
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("holdfast-sim replay "))
        .unwrap_or_else(|| panic!("no replay line in:\n{text}"));
    assert!(line.contains("--only-faults"), "{line}");
    let args: Vec<&str> = std::iter::once("replay")
        .chain(line.split_whitespace().filter(|a| *a != "--trace"))
        .collect();
    let again = stdout(&sim(&args));
    assert!(
        again.contains("FAILED") && again.contains("log-matching"),
        "{again}"
    );
    let applied = again.lines().filter(|l| l.contains("faults {")).count();
    assert_eq!(applied, 1);
}

#[test]
fn require_coverage_fails_a_run_that_never_reaches_a_fault_kind() {
    // Crashes only: no partition, disk fault or consumer crash is ever injected.
    let narrow = sim(&[
        "run",
        "--seeds",
        "2",
        "--workload",
        "raft",
        "--faults",
        "crash=1",
        "--require-coverage",
    ]);
    let text = stdout(&narrow);
    assert_eq!(narrow.status.code(), Some(1), "{text}");
    assert!(text.contains("seeds failed: 0"), "{text}");
    assert!(
        text.contains("--require-coverage: FAILED: never reached:"),
        "{text}"
    );
    assert!(text.contains(" partition"), "{text}");
    // Without the flag the same run passes, and still lists what it missed.
    let lenient = sim(&[
        "run",
        "--seeds",
        "2",
        "--workload",
        "raft",
        "--faults",
        "crash=1",
    ]);
    assert_eq!(lenient.status.code(), Some(0));
    assert!(stdout(&lenient).contains("coverage: NEVER REACHED:"));
}

#[test]
fn shards_write_summaries_that_merge_into_the_whole_run() {
    let dir = std::env::temp_dir().join(format!("holdfast-sim-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    for k in 0..2 {
        let shard = format!("{k}/2");
        let out = sim(&[
            "run",
            "--seeds",
            "6",
            "--from",
            "30",
            "--workload",
            "raft",
            "--shard",
            &shard,
            "--summary-json",
            &file(&format!("s{k}.json")),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    }
    let merged = sim(&[
        "merge",
        &file("s0.json"),
        &file("s1.json"),
        "--summary-json",
        &file("all.json"),
    ]);
    let text = stdout(&merged);
    assert_eq!(merged.status.code(), Some(0), "{text}");
    assert!(text.contains("seeds: 6 (30..36)"), "{text}");
    assert!(text.contains("seeds passed: 6"), "{text}");
    let all = std::fs::read_to_string(file("all.json")).unwrap();
    assert!(all.contains("\"seeds\": 6"), "{all}");
    // A shard merged twice is refused, not counted twice.
    let twice = sim(&["merge", &file("s0.json"), &file("s0.json")]);
    assert_eq!(twice.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(feature = "canaries")]
#[test]
fn the_canary_table_names_the_first_catching_seed_per_workload() {
    let output = sim(&[
        "canaries",
        "--seeds",
        "3",
        "--only",
        "commit-from-minority,write-despite-refusal",
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("| canary | queue workload | raft workload |"),
        "{text}"
    );
    assert!(
        text.contains("| `commit-from-minority` | 0 (commit-safety) | 0 (commit-safety) |"),
        "{text}"
    );
    // A queue canary is out of the raft workload's reach.
    assert!(
        text.contains("| `write-despite-refusal` | 0 (unexpected) | not in 3 |"),
        "{text}"
    );
}

#[cfg(feature = "canaries")]
#[test]
fn the_canary_table_fails_when_the_default_workload_misses_one() {
    // No seed at all: nothing can be caught.
    let output = sim(&["canaries", "--seeds", "0", "--only", "commit-from-minority"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("misses within 0 seeds: commit-from-minority"),
        "{text}"
    );
}
