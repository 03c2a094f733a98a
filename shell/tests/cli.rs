//! The README's walk-through, through the `holdfast` binary: `cluster`, then the client
//! commands, then Ctrl-C, then `cluster` again finding its data.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");

struct LocalCluster {
    child: Child,
    /// The client file named by the `export HOLDFAST_CLIENT=…` line the cluster printed.
    client_file: String,
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
            printed.contains(&format!("clients on 127.0.0.1:{base}")),
            "{printed}"
        );
        assert!(printed.contains("holdfast produce"), "{printed}");
        let client_file = printed
            .lines()
            .find_map(|l| l.trim().strip_prefix("export HOLDFAST_CLIENT="))
            .unwrap_or_else(|| panic!("no export line: {printed}"))
            .to_string();
        LocalCluster { child, client_file }
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

/// Runs a client command the way the cluster's printed hint says: with `HOLDFAST_CLIENT`.
fn holdfast(cluster: &LocalCluster, args: &[&str]) -> Output {
    Command::new(HOLDFAST)
        .args(args)
        .env("HOLDFAST_CLIENT", &cluster.client_file)
        .env_remove("HOLDFAST_SERVERS")
        .stdin(Stdio::null())
        .output()
        .expect("holdfast runs")
}

/// Runs a client command in `cwd` with no client settings at all: it must find
/// `holdfast-data/client.toml` by itself.
fn holdfast_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(HOLDFAST)
        .args(args)
        .current_dir(cwd)
        .env_remove("HOLDFAST_CLIENT")
        .env_remove("HOLDFAST_SERVERS")
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
    let top = tempfile::tempdir().expect("temp dir");
    let dir = top.path().join("holdfast-data");
    let base = common::cluster_base_port();
    let cluster = LocalCluster::start(&dir, base);

    let created = stdout(&holdfast(
        &cluster,
        &["topic", "create", "orders", "--queues", "4"],
    ));
    assert!(created.contains("created topic orders"), "{created}");
    // From the directory holding holdfast-data, with no flag and no variable.
    let listed = stdout(&holdfast_in(top.path(), &["topic", "list"]));
    assert!(listed.contains("orders\t4 queues"), "{listed}");
    let produced = stdout(&holdfast(
        &cluster,
        &["produce", "orders", "hello", "world"],
    ));
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
        &cluster,
        &["consume", "orders", "--group", "billing", "--count", "2"],
    ));
    let mut bodies: Vec<&str> = consumed.lines().collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["hello", "world"]);
    let status = stdout(&holdfast(&cluster, &["status"]));
    assert_eq!(status.matches("Leader ").count(), 3, "{status}");
    assert!(status.contains("billing"), "{status}");

    // A wrong credential is refused at once, the CLI says why and exits non-zero.
    let text = std::fs::read_to_string(&cluster.client_file).expect("client file");
    let token_line = text
        .lines()
        .find(|l| l.starts_with("token"))
        .expect("a token line");
    let forged = dir.join("forged.toml");
    std::fs::write(&forged, text.replace(token_line, "token = \"hf_guess\"")).expect("write");
    let started = Instant::now();
    let refused = Command::new(HOLDFAST)
        .args(["topic", "list", "--client-file"])
        .arg(&forged)
        .env_remove("HOLDFAST_CLIENT")
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("bad credential"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );

    // Unknown topics and oversized messages get an error that says so.
    let unknown = holdfast(&cluster, &["produce", "nosuch", "x"]);
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
        let refused = holdfast(&cluster, &["topic", "create", name, "--queues", queues]);
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
        &cluster,
        &["topic", "create", "orders", "--queues", "4"],
    ));
    assert!(again.contains("already exists with 4 queues"), "{again}");

    let first_client_file = std::fs::read_to_string(&cluster.client_file).expect("client file");
    cluster.interrupt();
    let cluster = LocalCluster::start(&dir, base);
    assert_eq!(
        std::fs::read_to_string(&cluster.client_file).expect("client file"),
        first_client_file,
        "a restart reuses the CA and the admin token"
    );
    let again = stdout(&holdfast(
        &cluster,
        &["consume", "orders", "--group", "audit", "--count", "2"],
    ));
    let mut bodies: Vec<&str> = again.lines().collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["hello", "world"], "the data survived the restart");
    cluster.interrupt();
}
