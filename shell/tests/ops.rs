//! Operating holdfast through the binary: data directory locks, the supervising local cluster,
//! exit codes and machine-readable output.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Net, wait_for, write_node_config};

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");

fn start_server(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    Command::new(HOLDFAST)
        .args(["server", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("server starts")
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

fn alive(pid: u32) -> bool {
    // Signal 0: exists (a zombie still counts, so the caller reaps its own children first).
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_second_server_on_a_locked_data_directory_refuses_at_once_naming_the_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::no_auth(1);
    let node_dir = dir.path().join("node-1");
    let config = write_node_config(&node_dir, 1, &net, "");
    let mut first = start_server(&config, &node_dir.join("first.log"));
    let data = node_dir.join("data");
    wait_for(Duration::from_secs(20), "the first server locks", || {
        std::fs::read_to_string(data.join("LOCK"))
            .ok()
            .filter(|t| t.trim() == first.id().to_string())
    });
    // The second one shares the config (same ports too): it must fail on the lock, before it
    // gets anywhere near the ports or the files.
    let started = Instant::now();
    let second = Command::new(HOLDFAST)
        .args(["server", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("second server runs");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let error_line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        error_line.contains(&data.display().to_string()),
        "{error_line}"
    );
    assert!(
        error_line.contains(&format!("process {}", first.id())),
        "{error_line}"
    );
    assert!(alive(first.id()), "the first server must be untouched");
    // Killed without a chance to clean up, the first one leaves no stale lock.
    let _ = first.kill();
    let _ = first.wait();
    let mut third = start_server(&config, &node_dir.join("third.log"));
    wait_for(
        Duration::from_secs(20),
        "a new server takes the lock",
        || {
            std::fs::read_to_string(data.join("LOCK"))
                .ok()
                .filter(|t| t.trim() == third.id().to_string())
        },
    );
    kill(third.id(), "-TERM");
    let _ = third.wait();
}
