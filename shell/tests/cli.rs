//! The README's walk-through, through the `holdfast` binary: `cluster`, then the client
//! commands, then Ctrl-C, then `cluster` again finding its data.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");

/// Three consecutive free ports, as `cluster --base-port` needs.
fn base_port() -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0").expect("a port");
        let base = first.local_addr().expect("addr").port();
        drop(first);
        let rest_free = (0..3u16).all(|i| {
            base.checked_add(i)
                .is_some_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if rest_free {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

struct LocalCluster {
    child: Child,
}

impl LocalCluster {
    /// Starts `holdfast cluster` and waits for it to print its hints.
    fn start(dir: &Path, base: u16) -> LocalCluster {
        let mut child = Command::new(HOLDFAST)
            .args(["cluster", "--base-port", &base.to_string(), "--dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cluster starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut printed = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            printed.push_str(&line);
            printed.push('\n');
            if line.starts_with("Ctrl-C stops the cluster") {
                break;
            }
        }
        assert!(
            printed.contains(&format!("listening on 127.0.0.1:{base}")),
            "{printed}"
        );
        assert!(printed.contains("holdfast produce"), "{printed}");
        LocalCluster { child }
    }

    /// Ctrl-C: the cluster stops its nodes and exits cleanly.
    fn interrupt(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-INT", &pid]).status();
        assert!(status.is_ok_and(|s| s.success()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "cluster exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

fn holdfast(base: u16, args: &[&str]) -> Output {
    let servers = (0..3)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect::<Vec<_>>()
        .join(",");
    Command::new(HOLDFAST)
        .args(args)
        .env("HOLDFAST_SERVERS", servers)
        .stdin(Stdio::null())
        .output()
        .expect("holdfast runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[test]
fn the_readme_walkthrough_works_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = base_port();
    let cluster = LocalCluster::start(dir.path(), base);

    let created = stdout(&holdfast(
        base,
        &["topic", "create", "orders", "--queues", "4"],
    ));
    assert!(created.contains("created topic orders"), "{created}");
    let listed = stdout(&holdfast(base, &["topic", "list"]));
    assert!(listed.contains("orders\t4 queues"), "{listed}");
    let produced = stdout(&holdfast(base, &["produce", "orders", "hello", "world"]));
    assert_eq!(
        produced.lines().count(),
        2,
        "one offset per message: {produced}"
    );
    assert!(
        produced.lines().all(|l| l.starts_with("orders/")),
        "{produced}"
    );
    let consumed = stdout(&holdfast(
        base,
        &["consume", "orders", "--group", "billing", "--count", "2"],
    ));
    let mut bodies: Vec<&str> = consumed.lines().collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["hello", "world"]);
    let status = stdout(&holdfast(base, &["status"]));
    assert_eq!(status.matches("Leader ").count(), 3, "{status}");
    assert!(status.contains("billing"), "{status}");

    // Unknown topics and oversized messages get an error that says so.
    let unknown = holdfast(base, &["produce", "nosuch", "x"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown topic"));
    // A refused creation is answered at once, says why and exits non-zero; the same creation
    // again says the topic exists.
    let started = Instant::now();
    for (name, queues, why) in [
        ("orders", "5", "exists with 4 queues"),
        ("fresh", "0", "1 to 1024 queues"),
        ("fresh", "100000", "1 to 1024 queues"),
        ("bad name", "1", "topic name"),
    ] {
        let refused = holdfast(base, &["topic", "create", name, "--queues", queues]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(why),
            "{stderr}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusals come at once"
    );
    let again = stdout(&holdfast(
        base,
        &["topic", "create", "orders", "--queues", "4"],
    ));
    assert!(again.contains("already exists with 4 queues"), "{again}");

    cluster.interrupt();
    let cluster = LocalCluster::start(dir.path(), base);
    let again = stdout(&holdfast(
        base,
        &["consume", "orders", "--group", "audit", "--count", "2"],
    ));
    let mut bodies: Vec<&str> = again.lines().collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["hello", "world"], "the data survived the restart");
    cluster.interrupt();
}
