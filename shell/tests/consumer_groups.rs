//! Consumer groups with real processes: members that start together share the backlog with
//! at most a pull batch each delivered twice, a member stopped with Ctrl-C hands its queues
//! over at once, and consuming a topic that does not exist fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");
/// The client library's messages per pull.
const PULL_BATCH: usize = 32;

/// `holdfast cluster`, stopped with Ctrl-C when dropped.
struct LocalCluster {
    child: Child,
    base: u16,
    /// The credential file `holdfast cluster` wrote (its `export HOLDFAST_CLIENT=` line).
    client_file: String,
}

impl LocalCluster {
    fn start(dir: &Path) -> LocalCluster {
        let base = common::cluster_base_port();
        let mut child = Command::new(HOLDFAST)
            .args(["cluster", "--base-port", &base.to_string(), "--dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cluster starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut client_file = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(path) = line.trim().strip_prefix("export HOLDFAST_CLIENT=") {
                client_file = Some(path.to_string());
            }
            if line.starts_with("Ctrl-C stops the cluster") {
                break;
            }
        }
        let client_file = client_file.expect("the cluster prints its client file");
        LocalCluster {
            child,
            base,
            client_file,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let servers = (0..3)
            .map(|i| format!("127.0.0.1:{}", self.base + i))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new(HOLDFAST);
        command
            .args(args)
            .env("HOLDFAST_SERVERS", servers)
            .env("HOLDFAST_CLIENT", &self.client_file);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("holdfast runs")
    }

    /// Produces `count` messages `{prefix}-{i}{pad}` in one process.
    fn produce(&self, topic: &str, prefix: &str, count: usize, pad: &str) {
        let mut child = self
            .command(&["produce", topic])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("produce runs");
        let mut stdin = child.stdin.take().expect("stdin");
        for i in 0..count {
            writeln!(stdin, "{prefix}-{i}{pad}").expect("write");
        }
        drop(stdin);
        let output = child.wait_with_output().expect("produce ends");
        assert!(
            output.status.success(),
            "produce failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn consume(&self, topic: &str, group: &str, timeout_s: u64) -> Child {
        self.command(&[
            "consume",
            topic,
            "--group",
            group,
            "--timeout",
            &timeout_s.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("consume runs")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// How often each message was printed, over all consumers.
fn tally(outputs: &[Output]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for output in outputs {
        for line in lines(output) {
            *seen.entry(line).or_insert(0) += 1;
        }
    }
    seen
}

fn wait(child: Child) -> Output {
    let output = child.wait_with_output().expect("consume ends");
    assert!(
        output.status.success(),
        "consume failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn members_share_a_backlog_hand_over_on_ctrl_c_and_refuse_an_unknown_topic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = LocalCluster::start(dir.path());
    let created = cluster.run(&["topic", "create", "work", "--queues", "8"]);
    assert!(created.status.success(), "{created:?}");

    // Scale-out: four members start together on a backlog.
    let backlog = 12_000;
    cluster.produce("work", "a", backlog, "");
    // Members give up after 15 s without a message: a member that joins while another
    // still holds its queues can wait for their handover (see BENCHMARKS.md, consumer groups).
    let members: Vec<Child> = (0..4).map(|_| cluster.consume("work", "g", 15)).collect();
    let outputs: Vec<Output> = members.into_iter().map(wait).collect();
    let seen = tally(&outputs);
    assert_eq!(seen.len(), backlog, "every message consumed");
    let twice: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "4 members on {backlog}: {:?} each, {twice} delivered twice",
        outputs.iter().map(|o| lines(o).len()).collect::<Vec<_>>()
    );
    assert!(
        twice <= 4 * PULL_BATCH,
        "{twice} messages delivered twice, more than a pull batch per member"
    );
    assert!(
        outputs.iter().all(|o| !lines(o).is_empty()),
        "every member got a share"
    );
    for output in &outputs {
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains("redelivered"), "{said}");
    }

    // A member stopped with Ctrl-C releases its queues: the next one gets the whole rest at
    // once, not after the session timeout. Long lines and an unread pipe hold the first one
    // back, so that it stops with most of the backlog left.
    let created = cluster.run(&["topic", "create", "rest", "--queues", "4"]);
    assert!(created.status.success(), "{created:?}");
    let rest = 2_000;
    cluster.produce("rest", "b", rest, &format!("-{}", "x".repeat(200)));
    let first = cluster.consume("rest", "h", 30);
    std::thread::sleep(Duration::from_millis(1_500));
    let _ = Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status();
    let started = Instant::now();
    let first = wait(first);
    let second = wait(cluster.consume("rest", "h", 3));
    let (by_first, by_second) = (lines(&first).len(), lines(&second).len());
    println!("Ctrl-C after {by_first}; the next member got {by_second}");
    assert!(by_first < rest, "the first member stopped early");
    let seen = tally(&[first, second]);
    assert_eq!(seen.len(), rest, "the second member got everything left");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "handed over before a session timeout: {:?}",
        started.elapsed()
    );

    // A topic that does not exist: nothing consumed, and a failure that says why.
    let unknown = cluster.run(&["consume", "nope", "--group", "g", "--timeout", "1"]);
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(said.contains("unknown topic"), "{said}");
}
