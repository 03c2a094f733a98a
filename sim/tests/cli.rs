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
}

#[cfg(not(feature = "canaries"))]
#[test]
fn a_canary_needs_the_feature() {
    let output = sim(&["run", "--seeds", "1", "--canary", "commit-from-minority"]);
    assert_eq!(output.status.code(), Some(2));
}
