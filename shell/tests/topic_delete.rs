//! `holdfast topic delete` against a real local cluster: the topic's queue files leave every
//! node's disk, producers and a second deletion are refused, and the topic created again
//! under the same name starts empty, so a consumer group that read the old one sees only
//! new messages.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");

/// `holdfast cluster`, stopped with Ctrl-C when dropped.
struct LocalCluster {
    child: Child,
    base: u16,
    client_file: String,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
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

    fn produce(&self, topic: &str, lines: &[String]) -> Output {
        let mut child = self
            .command(&["produce", topic])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("produce runs");
        let mut stdin = child.stdin.take().expect("stdin");
        for line in lines {
            writeln!(stdin, "{line}").expect("write");
        }
        drop(stdin);
        child.wait_with_output().expect("produce ends")
    }

    fn consume(&self, topic: &str, group: &str) -> Vec<String> {
        let output = self.run(&["consume", topic, "--group", group, "--timeout", "3"]);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Every directory of `topic`'s queues in any node's queue store.
fn queue_dirs(dir: &Path, topic: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().and_then(|n| n.to_str()) == Some(&format!("n{topic}"))
                    && path.components().any(|c| c.as_os_str() == "queues")
                {
                    found.push(path.clone());
                }
                stack.push(path);
            }
        }
    }
    found
}

#[test]
fn a_deleted_topic_leaves_no_files_and_comes_back_empty() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = LocalCluster::start(dir.path());
    let created = cluster.run(&["topic", "create", "doomed", "--queues", "2"]);
    assert!(created.status.success(), "{created:?}");
    let old: Vec<String> = (0..50).map(|i| format!("old-{i}")).collect();
    let produced = cluster.produce("doomed", &old);
    assert!(produced.status.success(), "{produced:?}");
    let mut consumed = cluster.consume("doomed", "g");
    consumed.sort();
    let mut expected = old.clone();
    expected.sort();
    assert_eq!(consumed, expected);
    assert!(
        !queue_dirs(dir.path(), "doomed").is_empty(),
        "the queues' files are on disk"
    );

    let deleted = cluster.run(&["topic", "delete", "doomed", "--json"]);
    assert!(deleted.status.success(), "{deleted:?}");
    let said: serde_json::Value = serde_json::from_slice(&deleted.stdout).expect("one JSON object");
    assert_eq!(said["topic"], "doomed");
    assert_eq!(said["queues"], 2);
    assert_eq!(said["deleted"], true);

    // Every node's broker groups drop the queues' files soon after.
    let started = Instant::now();
    while !queue_dirs(dir.path(), "doomed").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "files left: {:?}",
            queue_dirs(dir.path(), "doomed")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let again = cluster.run(&["topic", "delete", "doomed"]);
    assert!(!again.status.success());
    let why = String::from_utf8_lossy(&again.stderr);
    assert!(why.contains("unknown topic"), "{why}");
    let late = cluster.produce("doomed", &["late".to_string()]);
    assert!(!late.status.success(), "{late:?}");
    let why = String::from_utf8_lossy(&late.stderr);
    assert!(why.contains("unknown topic"), "{why}");

    // The same name again: a new, empty topic. Group g's offsets went with the old one, and
    // none of the old messages can be delivered.
    let created = cluster.run(&["topic", "create", "doomed", "--queues", "1"]);
    assert!(created.status.success(), "{created:?}");
    let new: Vec<String> = (0..3).map(|i| format!("new-{i}")).collect();
    let produced = cluster.produce("doomed", &new);
    assert!(produced.status.success(), "{produced:?}");
    let consumed = cluster.consume("doomed", "g");
    assert_eq!(consumed, new);
}
