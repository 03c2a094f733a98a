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

/// A `holdfast cluster` process that is stopped (SIGTERM, then SIGKILL after 5 s) when the
/// test ends, passed or not: a dropped `Child` is left running, and a supervisor left behind
/// keeps restarting nodes on a directory that is gone.
struct ClusterProcess(Child);

impl std::ops::Deref for ClusterProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ClusterProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ClusterProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            kill(self.0.id(), "-TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// `holdfast cluster` in `dir`, its stdout read line by line into a channel.
fn start_cluster(dir: &Path, base: u16) -> (ClusterProcess, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead as _;
    let mut child = Command::new(HOLDFAST)
        .args(["cluster", "--base-port", &base.to_string(), "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cluster starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (ClusterProcess(child), rx)
}

/// Reads lines until one contains `what`; returns it.
fn expect_line(lines: &std::sync::mpsc::Receiver<String>, what: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(what) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {what:?} in {limit:?}: {e}"),
        }
    }
}

fn lock_pid(node_data: &Path) -> Option<u32> {
    std::fs::read_to_string(node_data.join("LOCK"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `holdfast status` against the cluster in `dir`: node `id`'s section, if it answered.
fn node_answers(dir: &Path, id: usize) -> bool {
    let output = Command::new(HOLDFAST)
        .arg("status")
        .env("HOLDFAST_CLIENT", dir.join("client.toml"))
        .env_remove("HOLDFAST_SERVERS")
        .stdin(Stdio::null())
        .output()
        .expect("status runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with(&format!("node {id} ")));
    lines.next().is_some_and(|l| !l.contains("no answer"))
        && lines
            .next()
            .is_some_and(|l| l.trim_start().starts_with("group"))
}

/// Kills, when dropped, whichever processes hold these data directories' locks.
struct Reaper(Vec<std::path::PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for data in &self.0 {
            if let Some(pid) = lock_pid(data).filter(|p| alive(*p)) {
                kill(pid, "-KILL");
            }
        }
    }
}

#[test]
fn the_local_cluster_restarts_a_killed_node_and_its_nodes_die_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = common::cluster_base_port();
    let (mut cluster, lines) = start_cluster(dir.path(), base);
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    // Whatever happens, the test leaves no node behind.
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    let pids: Vec<u32> = (1..=3)
        .map(|id| {
            wait_for(Duration::from_secs(20), "a node locks", || {
                lock_pid(&data(id))
            })
        })
        .collect();
    wait_for(Duration::from_secs(30), "node 2 answers", || {
        node_answers(dir.path(), 2).then_some(())
    });

    // A second cluster on the same directory refuses instead of rewriting its files.
    let second = Command::new(HOLDFAST)
        .args([
            "cluster",
            "--base-port",
            &common::cluster_base_port().to_string(),
            "--dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("second cluster runs");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("process {}", cluster.id())),
        "{stderr}"
    );

    kill(pids[1], "-KILL");
    let line = expect_line(&lines, "node 2 exited", Duration::from_secs(10));
    assert!(line.contains("signal: 9"), "{line}");
    assert!(line.contains("restarting in"), "{line}");
    expect_line(&lines, "node 2 restarted", Duration::from_secs(10));
    let new_pid = wait_for(Duration::from_secs(20), "node 2 locks again", || {
        lock_pid(&data(2)).filter(|p| *p != pids[1])
    });
    wait_for(
        Duration::from_secs(30),
        "the restarted node 2 answers",
        || node_answers(dir.path(), 2).then_some(()),
    );

    // The cluster process killed outright: its nodes follow it.
    let _ = cluster.kill();
    let _ = cluster.wait();
    let nodes = [pids[0], new_pid, pids[2]];
    wait_for(Duration::from_secs(20), "every node exits", || {
        nodes.iter().all(|p| !alive(*p)).then_some(())
    });
}

/// Runs a client command from an empty directory, with only the settings given in `args`
/// and `client_file`.
fn client(client_file: Option<&Path>, args: &[&str]) -> std::process::Output {
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(HOLDFAST);
    command
        .args(args)
        .current_dir(cwd.path())
        .env_remove("HOLDFAST_CLIENT")
        .env_remove("HOLDFAST_SERVERS")
        .stdin(Stdio::null());
    if let Some(file) = client_file {
        command.env("HOLDFAST_CLIENT", file);
    }
    command.output().expect("holdfast runs")
}

/// A port nothing listens on: no other test of this process is given it.
fn closed_port() -> std::net::SocketAddr {
    common::free_addrs(1)[0]
}

#[test]
fn an_unreachable_cluster_fails_at_once_with_code_3_naming_each_address_and_why() {
    let (a, b) = (closed_port(), closed_port());
    let servers = format!("{a},{b}");
    for args in [
        vec!["status", "--servers", &servers],
        vec!["topic", "list", "--servers", &servers],
        vec!["topic", "create", "t", "--servers", &servers],
        vec!["produce", "t", "hello", "--servers", &servers],
        vec!["bench", "--servers", &servers],
    ] {
        let started = Instant::now();
        let output = client(None, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(3), "{args:?}: slow");
        for addr in [a, b] {
            assert!(
                stderr.contains(&format!("{addr} (connection refused)")),
                "{args:?}: {stderr}"
            );
        }
    }
}

#[test]
fn servers_that_accept_but_never_answer_are_a_timeout_code_5() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let addr = silent.local_addr().expect("addr").to_string();
    // Accepts and holds every connection, says nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let output = client(None, &["status", "--servers", &addr]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("no server answered"), "{stderr}");
}

#[test]
fn refusals_exit_4_and_json_output_parses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = common::cluster_base_port();
    let (_cluster, lines) = start_cluster(dir.path(), base);
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    let file = dir.path().join("client.toml");
    let good = Some(file.as_path());

    let created = wait_for(Duration::from_secs(30), "the topic is created", || {
        let output = client(good, &["topic", "create", "orders", "--queues", "2"]);
        output.status.success().then_some(output)
    });
    assert!(String::from_utf8_lossy(&created.stdout).contains("created topic orders"));

    let produced = client(good, &["produce", "orders", "a", "b", "--output", "json"]);
    assert!(produced.status.success(), "{produced:?}");
    let receipts: Vec<serde_json::Value> = String::from_utf8_lossy(&produced.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(receipts.len(), 2);
    for r in &receipts {
        assert_eq!(r["topic"], "orders", "{r}");
        assert!(r["queue"].as_u64().is_some_and(|q| q < 2), "{r}");
        assert!(r["offset"].is_u64(), "{r}");
        assert_eq!(r["ambiguous"], serde_json::Value::Bool(false), "{r}");
    }

    let listed = client(good, &["topic", "list", "--json"]);
    let listed: serde_json::Value =
        serde_json::from_slice(&listed.stdout).expect("topic list JSON");
    assert_eq!(
        listed["topics"],
        serde_json::json!([{"name": "orders", "queues": 2}])
    );
    let described = client(good, &["topic", "describe", "orders", "--json"]);
    let described: serde_json::Value =
        serde_json::from_slice(&described.stdout).expect("topic describe JSON");
    assert_eq!(described["topic"], "orders");
    assert_eq!(described["queues"].as_array().map(Vec::len), Some(2));
    assert_eq!(described["queues"][1]["queue"], 1);

    let status = wait_for(Duration::from_secs(30), "every node knows a leader", || {
        let output = client(good, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        let nodes = status["nodes"].as_array()?.clone();
        let all_led = nodes.iter().all(|n| {
            n["answered"] == true
                && n["groups"]
                    .as_array()
                    .is_some_and(|g| g.iter().all(|g| g["leader"].is_u64()))
        });
        (output.status.success() && nodes.len() == 3 && all_led).then_some(status)
    });
    assert_eq!(status["nodes"][0]["node"], 1);

    // An operator moves broker group 1's leader to another node: the command returns once
    // that node leads. A node outside the cluster is refused, exit 4.
    let leader = status["nodes"][0]["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["group"] == 1))
        .and_then(|g| g["leader"].as_u64())
        .expect("group 1's leader");
    let to = (leader % 3 + 1).to_string();
    let moved = client(good, &["group", "transfer", "1", "--to", &to]);
    let said = String::from_utf8_lossy(&moved.stdout);
    assert!(moved.status.success(), "{moved:?}");
    assert!(said.contains(&format!("led by node {to}")), "{said}");
    let nowhere = client(good, &["group", "transfer", "1", "--to", "9"]);
    assert_eq!(nowhere.status.code(), Some(4), "{nowhere:?}");

    // `bench` deletes the topic it created and its consumer group, unless `--keep`; a topic
    // that existed before is the user's and stays.
    let topics = || {
        let listed = client(good, &["topic", "list", "--json"]);
        let listed: serde_json::Value =
            serde_json::from_slice(&listed.stdout).expect("topic list JSON");
        let names: Vec<String> = listed["topics"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        names
    };
    let bench = |topic: &str, keep: bool| {
        let mut args = vec![
            "bench",
            "--messages",
            "200",
            "--producers",
            "1",
            "--topic",
            topic,
            "--queues",
            "2",
        ];
        if keep {
            args.push("--keep");
        }
        let output = client(good, &args);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let said = bench("bench-gone", false);
    assert!(said.contains("deleted topic bench-gone"), "{said}");
    assert!(
        !topics().contains(&"bench-gone".to_string()),
        "{:?}",
        topics()
    );
    let said = bench("orders", false);
    assert!(!said.contains("deleted topic"), "{said}");
    assert!(topics().contains(&"orders".to_string()));
    bench("bench-kept", true);
    assert!(
        topics().contains(&"bench-kept".to_string()),
        "{:?}",
        topics()
    );
    let groups = client(good, &["group", "list", "--json"]);
    let groups: serde_json::Value = serde_json::from_slice(&groups.stdout).expect("JSON");
    let benches = groups["groups"].as_array().map(|g| {
        g.iter()
            .filter(|g| g["group"].as_str().is_some_and(|n| n.starts_with("bench-")))
            .count()
    });
    assert_eq!(
        benches,
        Some(1),
        "only the kept run's group stays: {groups}"
    );

    // A send to a topic that does not exist is a refusal (4), not a timeout (5).
    let unknown = client(good, &["produce", "no-such-topic", "x"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("unknown topic"), "{stderr}");

    // The wrong token: the cluster refuses, exit 4.
    let text = std::fs::read_to_string(&file).expect("client file");
    let token_line = text
        .lines()
        .find(|l| l.starts_with("token"))
        .expect("a token line");
    let bad = dir.path().join("bad-client.toml");
    std::fs::write(&bad, text.replace(token_line, "token = \"not-the-token\"")).expect("write");
    for args in [
        vec!["status"],
        vec!["topic", "list"],
        vec!["produce", "orders", "x"],
    ] {
        let output = client(Some(&bad), &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains("refused"), "{args:?}: {stderr}");
    }
}

#[test]
fn the_local_cluster_refuses_ports_past_65535_or_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        vec!["--base-port", "65534"],
        vec!["--base-port", "65534", "--peer-base-port", "1000"],
        vec!["--base-port", "1000", "--peer-base-port", "65535"],
        vec!["--base-port", "0", "--peer-base-port", "1000"],
    ] {
        let output = Command::new(HOLDFAST)
            .arg("cluster")
            .args(&args)
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("cluster runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
    assert!(
        !dir.path().join("node-1").exists(),
        "nothing is started or written before the ports are checked"
    );
}

#[test]
fn produce_from_stdin_pipelines_and_prints_every_receipt_once() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = common::cluster_base_port();
    let (_cluster, lines) = start_cluster(dir.path(), base);
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    let file = dir.path().join("client.toml");
    wait_for(Duration::from_secs(30), "the topic is created", || {
        let output = client(Some(&file), &["topic", "create", "lines", "--queues", "4"]);
        output.status.success().then_some(())
    });
    let count = 10_000;
    let input: String = (0..count).map(|i| format!("line {i}\n")).collect();
    let started = Instant::now();
    let mut child = Command::new(HOLDFAST)
        .args(["produce", "lines", "--json"])
        .env("HOLDFAST_CLIENT", &file)
        .env_remove("HOLDFAST_SERVERS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("produce runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("produce ends");
    writer.join().expect("writer").expect("stdin written");
    let elapsed = started.elapsed();
    assert!(output.status.success(), "{output:?}");
    let mut seen = std::collections::BTreeSet::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let r: serde_json::Value = serde_json::from_str(line).expect("JSON receipt");
        let place = (
            r["queue"].as_u64().expect("queue"),
            r["offset"].as_u64().expect("offset"),
        );
        assert!(seen.insert(place), "two receipts for one place: {place:?}");
    }
    assert_eq!(seen.len(), count, "one receipt per line");
    eprintln!(
        "produce: {count} lines from stdin in {elapsed:?}, {:.0} lines/s",
        count as f64 / elapsed.as_secs_f64()
    );
}

/// One HTTP/1.1 request to `addr`: (status code, body).
fn http(addr: &str, request: &[u8]) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(request);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sample_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or("");
        if metric == name && labels.iter().all(|l| series.contains(l)) {
            let v: f64 = value.parse().ok()?;
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[test]
fn every_node_serves_prometheus_metrics_from_the_core_and_the_shell_and_a_health_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = common::cluster_base_port();
    let (_cluster, lines) = start_cluster(dir.path(), base);
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    let banner = expect_line(&lines, "node 1 clients on", Duration::from_secs(60));
    let metrics: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", base + 200 + i))
        .collect();
    assert!(
        banner.contains(&format!("metrics on http://{}/metrics", metrics[0])),
        "{banner}"
    );
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    for addr in &metrics {
        wait_for(Duration::from_secs(30), "healthz is ready", || {
            let (status, body) = get(addr, "/healthz");
            (status == 200 && body.trim() == "ok").then_some(())
        });
    }
    let file = dir.path().join("client.toml");
    wait_for(Duration::from_secs(30), "the topic is created", || {
        let output = client(Some(&file), &["topic", "create", "orders", "--queues", "2"]);
        output.status.success().then_some(())
    });
    let bodies: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let mut args = vec!["produce", "orders"];
    args.extend(bodies.iter().map(String::as_str));
    assert!(client(Some(&file), &args).status.success());
    let consumed = client(
        Some(&file),
        &[
            "consume",
            "orders",
            "--group",
            "g",
            "--count",
            "10",
            "--timeout",
            "30",
        ],
    );
    assert!(consumed.status.success(), "{consumed:?}");

    // Every replica has applied the ten messages and the group's acks (within a publish
    // interval or two); the counters agree with what was done.
    let scrapes: Vec<String> = metrics
        .iter()
        .map(|addr| {
            wait_for(
                Duration::from_secs(30),
                "the node reports the traffic",
                || {
                    let (status, text) = get(addr, "/metrics");
                    assert_eq!(status, 200);
                    let stored =
                        sample_sum(&text, "holdfast_queue_next_offset", &["topic=\"orders\""]);
                    let lag = sample_sum(&text, "holdfast_consumer_lag", &["consumer_group=\"g\""]);
                    (stored == Some(10.0) && lag == Some(0.0)).then_some(text)
                },
            )
        })
        .collect();
    for text in &scrapes {
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text");
        assert!(sample_sum(text, "holdfast_fsyncs_total", &[]).is_some_and(|n| n > 0.0));
        assert!(sample_sum(text, "holdfast_sync_seconds_count", &[]).is_some_and(|n| n > 0.0));
        assert!(sample_sum(text, "holdfast_raft_term", &["group=\"0\""]).is_some_and(|n| n >= 1.0));
        assert!(
            sample_sum(
                text,
                "holdfast_raft_entries_applied_total",
                &["group=\"1\""]
            )
            .is_some_and(|n| n > 0.0)
        );
    }
    let total = |name: &str, labels: &[&str]| -> f64 {
        scrapes
            .iter()
            .filter_map(|t| sample_sum(t, name, labels))
            .sum()
    };
    for group in 0..3 {
        let label = format!("group=\"{group}\"");
        assert_eq!(
            total("holdfast_raft_leader", &[&label]),
            1.0,
            "one leader per group"
        );
    }
    assert_eq!(
        total("holdfast_topic_send_messages_total", &["topic=\"orders\""]),
        10.0
    );
    assert!(
        total(
            "holdfast_topic_pulled_messages_total",
            &["topic=\"orders\""]
        ) >= 10.0
    );
    assert!(total("holdfast_request_seconds_count", &["kind=\"send\""]) >= 1.0);
    assert!(total("holdfast_connections_accepted_total", &["port=\"client\""]) >= 1.0);

    // Junk and oversized requests are answered and closed; the endpoint goes on serving.
    let (status, _) = http(&metrics[0], b"\xff\xfe garbage\r\n\r\n");
    assert_eq!(status, 400);
    let (status, _) = http(&metrics[0], b"DELETE /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 405);
    let (status, _) = get(&metrics[0], "/nothing");
    assert_eq!(status, 404);
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    let (status, _) = http(&metrics[0], &huge);
    assert_eq!(status, 431);
    assert_eq!(get(&metrics[0], "/metrics").0, 200);
}

fn json_of(output: &std::process::Output) -> serde_json::Value {
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// `group describe G --json`: (sum of committed offsets, sum of lag) over `topic`'s queues.
fn committed_and_lag(file: &Path, group: &str, topic: &str) -> (u64, u64) {
    let described = json_of(&client(Some(file), &["group", "describe", group, "--json"]));
    let queues = described["queues"].as_array().cloned().unwrap_or_default();
    queues
        .iter()
        .filter(|q| q["topic"] == topic)
        .fold((0, 0), |(c, l), q| {
            (
                c + q["committed_offset"].as_u64().unwrap_or(0),
                l + q["lag"].as_u64().unwrap_or(0),
            )
        })
}

#[test]
fn consumer_groups_are_listed_described_sought_and_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, lines) = start_cluster(dir.path(), common::cluster_base_port());
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    let file = dir.path().join("client.toml");
    let good = Some(file.as_path());
    wait_for(Duration::from_secs(30), "the topic is created", || {
        let output = client(good, &["topic", "create", "orders", "--queues", "2"]);
        output.status.success().then_some(())
    });
    let produce = client(good, &["produce", "orders", "a", "b", "c", "d", "e", "f"]);
    assert!(produce.status.success(), "{produce:?}");
    let consume = |count: &str| {
        client(
            good,
            &[
                "consume",
                "orders",
                "--group",
                "g",
                "--count",
                count,
                "--timeout",
                "30",
            ],
        )
    };
    assert!(consume("6").status.success());

    let listed = json_of(&client(good, &["group", "list", "--json"]));
    let g = listed["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|x| x["group"] == "g").cloned())
        .unwrap_or_else(|| panic!("group g listed: {listed}"));
    assert_eq!(g["lag"], 0, "{g}");
    assert_eq!(committed_and_lag(&file, "g", "orders"), (6, 0));

    // Back to the start: the six messages wait again, and a consumer gets them again.
    let sought = client(
        good,
        &["group", "seek", "g", "--topic", "orders", "--to-earliest"],
    );
    assert!(sought.status.success(), "{sought:?}");
    assert_eq!(committed_and_lag(&file, "g", "orders"), (0, 6));
    let again = consume("6");
    assert!(again.status.success(), "{again:?}");
    let mut bodies: Vec<String> = String::from_utf8_lossy(&again.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["a", "b", "c", "d", "e", "f"]);
    // By time: to before every message (RFC 3339) is the start, to after them the end.
    let by_time = |to: &str| {
        client(
            good,
            &["group", "seek", "g", "--topic", "orders", "--to-time", to],
        )
    };
    assert!(by_time("2000-01-01T00:00:00Z").status.success());
    assert_eq!(committed_and_lag(&file, "g", "orders"), (0, 6));
    assert!(by_time("4102444800000").status.success()); // 2100-01-01, in milliseconds
    assert_eq!(committed_and_lag(&file, "g", "orders"), (6, 0));
    let wrong = by_time("yesterday");
    assert_eq!(wrong.status.code(), Some(2), "{wrong:?}");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("RFC 3339"));
    // One queue that holds messages (a send retried under load may land on either queue).
    let described = json_of(&client(good, &["group", "describe", "g", "--json"]));
    let (queue, held) = described["queues"]
        .as_array()
        .and_then(|qs| {
            qs.iter()
                .find(|q| q["topic"] == "orders" && q["committed_offset"].as_u64() > Some(0))
                .and_then(|q| Some((q["queue"].as_u64()?, q["committed_offset"].as_u64()?)))
        })
        .unwrap_or_else(|| panic!("a queue of orders with messages: {described}"));
    let queue = queue.to_string();
    let one = client(
        good,
        &[
            "group",
            "seek",
            "g",
            "--topic",
            "orders",
            "--queue",
            &queue,
            "--to-offset",
            "0",
        ],
    );
    assert!(one.status.success(), "{one:?}");
    // `describe` reads each broker group's leader as it is now; a leader that just took over
    // (the balancer moves leaders) may not have applied the seek yet, so look until it has.
    let lag = wait_for(
        Duration::from_secs(15),
        "the one queue's seek shows",
        || {
            let (_, lag) = committed_and_lag(&file, "g", "orders");
            (lag > 0).then_some(lag)
        },
    );
    assert_eq!(lag, held, "only queue {queue} moved");

    // A member holding the queues: seek and delete are refused (exit 4) unless forced.
    let mut holder = Command::new(HOLDFAST)
        .args(["consume", "orders", "--group", "g", "--timeout", "120"])
        .env("HOLDFAST_CLIENT", &file)
        .env_remove("HOLDFAST_SERVERS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("consumer starts");
    wait_for(
        Duration::from_secs(30),
        "the consumer holds a queue",
        || {
            let described = json_of(&client(good, &["group", "describe", "g", "--json"]));
            described["queues"]
                .as_array()?
                .iter()
                .any(|q| q["holder"].is_string())
                .then_some(())
        },
    );
    let refused = client(
        good,
        &["group", "seek", "g", "--topic", "orders", "--to-latest"],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    let refused = client(good, &["group", "delete", "g"]);
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    let forced = client(
        good,
        &[
            "group",
            "seek",
            "g",
            "--topic",
            "orders",
            "--to-latest",
            "--force",
        ],
    );
    assert!(forced.status.success(), "{forced:?}");
    assert_eq!(committed_and_lag(&file, "g", "orders").1, 0);
    kill(holder.id(), "-TERM");
    let _ = holder.wait();

    let deleted = client(good, &["group", "delete", "g", "--force"]);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(String::from_utf8_lossy(&deleted.stdout).contains("deleted consumer group g"));
    let listed = json_of(&client(good, &["group", "list", "--json"]));
    assert!(
        listed["groups"]
            .as_array()
            .is_some_and(|gs| gs.iter().all(|x| x["group"] != "g")),
        "{listed}"
    );
    let unknown = client(good, &["group", "describe", "g"]);
    assert_eq!(unknown.status.code(), Some(4), "{unknown:?}");
}

#[test]
fn consume_prints_formats_and_answers_reconsume_later_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, lines) = start_cluster(dir.path(), common::cluster_base_port());
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    let file = dir.path().join("client.toml");
    let good = Some(file.as_path());
    wait_for(Duration::from_secs(30), "the topic is created", || {
        let output = client(good, &["topic", "create", "notes", "--queues", "1"]);
        output.status.success().then_some(())
    });
    assert!(
        client(good, &["produce", "notes", "two\nlines\\"])
            .status
            .success()
    );

    let json = client(
        good,
        &[
            "consume", "notes", "--group", "j", "--count", "1", "--format", "json",
        ],
    );
    assert!(json.status.success(), "{json:?}");
    let stdout = String::from_utf8_lossy(&json.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line per message: {stdout}");
    let m: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON line");
    assert_eq!(m["body"], "two\nlines\\");
    assert_eq!(
        (m["topic"].clone(), m["queue"].clone(), m["offset"].clone()),
        ("notes".into(), 0.into(), 0.into())
    );
    assert_eq!(m["reconsume_times"], 0);
    assert_eq!(m["answer"], "success");

    let line = client(
        good,
        &[
            "consume", "notes", "--group", "l", "--count", "1", "--format", "line",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&line.stdout),
        "notes/0@0 redeliveries=0 two\\nlines\\\\\n"
    );

    // Every message answered ReconsumeLater comes back from the retry queue, counted.
    let later = client(
        good,
        &[
            "consume",
            "notes",
            "--group",
            "r",
            "--count",
            "1",
            "--reconsume-later",
            "--format",
            "json",
        ],
    );
    assert!(later.status.success(), "{later:?}");
    let m: serde_json::Value = serde_json::from_slice(&later.stdout).expect("JSON");
    assert_eq!(m["answer"], "reconsume_later");
    assert!(String::from_utf8_lossy(&later.stderr).contains("answered ReconsumeLater for 1"));
    let again = client(
        good,
        &[
            "consume",
            "notes",
            "--group",
            "r",
            "--count",
            "1",
            "--timeout",
            "20",
            "--format",
            "json",
        ],
    );
    let m: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(m["body"], "two\nlines\\");
    assert_eq!(m["reconsume_times"], 1, "{m}");
    assert_eq!(m["redelivered"], true, "{m}");
    assert!(
        m["topic"]
            .as_str()
            .is_some_and(|t| t.starts_with("%RETRY%")),
        "{m}"
    );

    let bad = client(
        good,
        &["consume", "notes", "--group", "x", "--reconsume-later", "2"],
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "clap refuses a fraction above 1"
    );
}

/// The smallest executor: poll, park until woken.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut future = std::pin::pin!(future);
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

#[test]
fn async_sends_resolve_as_futures_with_settings_from_a_builder() {
    use holdfast_shell::client::{AsyncProducer, ClientConfig, ProducerSettings};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, lines) = start_cluster(dir.path(), common::cluster_base_port());
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    let file = dir.path().join("client.toml");
    wait_for(Duration::from_secs(30), "the topic is created", || {
        let output = client(Some(&file), &["topic", "create", "events", "--queues", "2"]);
        output.status.success().then_some(())
    });
    let config = ClientConfig::from_file(&file).expect("client file");
    let settings = ProducerSettings::default()
        .send_timeout(Duration::from_secs(20))
        .retries(10);
    let producer = AsyncProducer::spawn(config, settings).expect("connects");
    let count = 500;
    // All in flight at once, awaited afterwards.
    let sends: Vec<_> = (0..count)
        .map(|i| {
            let body = holdfast_core::broker::Message::with_body(format!("e{i}"));
            producer.send("events", vec![body])
        })
        .collect();
    let mut places = std::collections::BTreeSet::new();
    for send in sends {
        let receipt = block_on(send).expect("acked");
        assert!(places.insert((receipt.queue.queue, receipt.offset)));
    }
    assert_eq!(places.len(), count);
    drop(producer);

    // The send timeout set in the builder is the one the producer keeps: a send that cannot
    // succeed (an unknown topic is retried, as a topic being created would be) ends by then.
    let quick = ProducerSettings::default().send_timeout(Duration::from_millis(500));
    let config = ClientConfig::from_file(&file).expect("client file");
    let producer = AsyncProducer::spawn(config, quick).expect("connects");
    let started = Instant::now();
    let unknown = block_on(producer.send(
        "no-such-topic",
        vec![holdfast_core::broker::Message::with_body("x")],
    ));
    assert!(unknown.is_err(), "{unknown:?}");
    assert!(
        // The default is 3 s: a bound below it shows the setting took.
        started.elapsed() < Duration::from_millis(2_500),
        "gave up after {:?}, not after the 500 ms set",
        started.elapsed()
    );
}

/// Three `holdfast server` processes of `net` with `extra` config lines; killed when dropped.
struct Servers(Vec<Child>);

impl Servers {
    fn start(dir: &Path, net: &Net, extra: &str) -> Servers {
        Servers::start_each(dir, net, |_| extra.to_string())
    }

    /// With config lines of each node's own (`extra(id)`).
    fn start_each(dir: &Path, net: &Net, extra: impl Fn(usize) -> String) -> Servers {
        Servers(
            (1..=net.clients.len())
                .map(|id| {
                    let node_dir = dir.join(format!("node-{id}"));
                    let config = write_node_config(&node_dir, id, net, &extra(id));
                    start_server(&config, &node_dir.join("server.log"))
                })
                .collect(),
        )
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// JSON lines of a command's stdout.
fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn dead_letters_are_listed_and_redriven_to_the_group_once_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::secure(dir.path(), 3);
    let pki = net.pki.clone().expect("pki");
    pki.add_principal(
        "worker",
        "hf_worker",
        "produce = [\"jobs\"]\nconsume_groups = [\"w\"]\nconsume_topics = [\"jobs\"]",
    );
    // No retry at all: the first ReconsumeLater dead-letters a message.
    let _servers = Servers::start(dir.path(), &net, "max_reconsume = 0");
    let admin = pki.client_file(&net.clients, common::ADMIN_TOKEN);
    let worker = pki.client_file(&net.clients, "hf_worker");
    let good = Some(admin.as_path());
    wait_for(Duration::from_secs(60), "the topic is created", || {
        let output = client(good, &["topic", "create", "jobs", "--queues", "2"]);
        output.status.success().then_some(())
    });
    let again = json_of(&client(
        good,
        &["topic", "create", "jobs", "--queues", "2", "--json"],
    ));
    assert_eq!(
        again,
        serde_json::json!({"topic": "jobs", "queues": 2, "created": false})
    );
    let bodies = ["j1", "j2\nsecond line", "j3", "j4"];
    let mut produce = vec!["produce", "jobs"];
    produce.extend(bodies);
    assert!(client(good, &produce).status.success());
    let consume = |args: &[&str]| {
        let mut all = vec!["consume", "jobs", "--group", "w", "--timeout", "30"];
        all.extend(args);
        client(Some(worker.as_path()), &all)
    };
    // Every message answered ReconsumeLater: all four go to w's dead-letter queue. (A send
    // retried under load may have stored a message twice: count what was consumed.)
    let failed = json_lines(&consume(&[
        "--count",
        "4",
        "--reconsume-later",
        "--format",
        "json",
    ]));
    assert_eq!(failed.len(), 4);

    // Listed with their origin, in whichever broker groups they went to.
    let listed = wait_for(Duration::from_secs(15), "four dead letters listed", || {
        let lines = json_lines(&client(good, &["dlq", "list", "w", "--json"]));
        (lines.len() >= 4).then_some(lines)
    });
    let mut listed_bodies: Vec<String> = listed
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    listed_bodies.sort();
    listed_bodies.dedup();
    assert_eq!(listed_bodies, bodies, "{listed:?}");
    for m in &listed {
        assert_eq!(m["origin_topic"], "jobs", "{m}");
        assert_eq!(m["reconsume_times"], 1, "{m}");
    }
    let text = client(good, &["dlq", "list", "w"]);
    let text_out = String::from_utf8_lossy(&text.stdout);
    assert!(
        text_out.contains("from jobs/") && text_out.contains("j2\\nsecond line"),
        "{text_out}"
    );
    let filtered = client(good, &["dlq", "list", "w", "--topic", "other", "--json"]);
    assert!(json_lines(&filtered).is_empty());
    // Admin only: the worker may consume as w but not read or move its dead letters.
    let refused = client(Some(worker.as_path()), &["dlq", "redrive", "w"]);
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not admin"));

    let redriven = json_of(&client(good, &["dlq", "redrive", "w", "--json"]));
    assert_eq!(redriven["redriven"].as_u64(), Some(listed.len() as u64));
    assert!(json_lines(&client(good, &["dlq", "list", "w", "--json"])).is_empty());
    let again = json_of(&client(good, &["dlq", "redrive", "w", "--json"]));
    assert_eq!(again["redriven"], 0, "nothing is moved twice");

    // The group's members get them again, from its retry queue, redelivery count reset.
    let back = json_lines(&consume(&[
        "--count",
        &listed.len().to_string(),
        "--format",
        "json",
    ]));
    let mut back_bodies: Vec<String> = back
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    back_bodies.sort();
    back_bodies.dedup();
    assert_eq!(back_bodies, bodies);
    for m in &back {
        assert!(m["topic"].as_str().is_some_and(|t| t == "%RETRY%w"), "{m}");
        assert_eq!(m["reconsume_times"], 0, "{m}");
    }
    let deleted = json_of(&client(
        good,
        &["group", "delete", "w", "--force", "--json"],
    ));
    assert_eq!(deleted["group"], "w");
    assert!(deleted["offsets"].as_u64() > Some(0), "{deleted}");
}

/// A ReconsumeLater and a dead letter show in every node's /metrics per consumer group and
/// queue (labelled like the lag: broker `group`, `topic`, `queue`, `consumer_group`), and
/// the series end when the consumer group is deleted.
#[test]
fn retries_and_dead_letters_are_counted_per_consumer_group_and_queue_in_the_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::no_auth(3);
    let metrics = common::free_addrs(3);
    // One retry, then the dead-letter queue: a message's second ReconsumeLater goes there.
    let _servers = Servers::start_each(dir.path(), &net, |id| {
        format!("max_reconsume = 1\nmetrics_addr = \"{}\"", metrics[id - 1])
    });
    let servers = net
        .clients
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--servers", servers.as_str()]);
        client(None, &all)
    };
    wait_for(Duration::from_secs(60), "the topic is created", || {
        let output = run(&["topic", "create", "jobs", "--queues", "1"]);
        output.status.success().then_some(())
    });
    assert!(run(&["produce", "jobs", "j1"]).status.success());
    // Answered ReconsumeLater from jobs (to the retry queue), then from the retry queue once
    // it is due (to the dead-letter queue). A send retried under load may have stored j1
    // twice: consume until something is dead-lettered.
    wait_for(Duration::from_secs(90), "a dead letter", || {
        let consumed = run(&[
            "consume",
            "jobs",
            "--group",
            "w",
            "--count",
            "2",
            "--reconsume-later",
            "--timeout",
            "20",
        ]);
        assert!(consumed.status.success(), "{consumed:?}");
        let listed = json_lines(&run(&["dlq", "list", "w", "--json"]));
        (!listed.is_empty()).then_some(())
    });
    let jobs = ["consumer_group=\"w\"", "topic=\"jobs\"", "queue=\"0\""];
    let retry = ["consumer_group=\"w\"", "topic=\"%RETRY%w\""];
    for addr in &metrics {
        let addr = addr.to_string();
        wait_for(Duration::from_secs(30), "per consumer group counts", || {
            let (status, text) = get(&addr, "/metrics");
            assert_eq!(status, 200);
            let reconsumed = sample_sum(&text, "holdfast_consumer_reconsumed_total", &jobs);
            let dead = sample_sum(&text, "holdfast_consumer_dead_lettered_total", &retry);
            (reconsumed >= Some(1.0) && dead >= Some(1.0)).then_some(())
        });
    }
    let (_, text) = get(&metrics[0].to_string(), "/metrics");
    assert_eq!(
        sample_sum(&text, "holdfast_consumer_dead_lettered_total", &jobs),
        Some(0.0),
        "jobs' messages went to the retry queue first: {text}"
    );
    assert_eq!(
        sample_sum(&text, "holdfast_consumer_counters_uncounted_total", &[]),
        Some(0.0)
    );

    let deleted = run(&["group", "delete", "w", "--force"]);
    assert!(deleted.status.success(), "{deleted:?}");
    for addr in &metrics {
        let addr = addr.to_string();
        wait_for(Duration::from_secs(30), "the group's series gone", || {
            let (_, text) = get(&addr, "/metrics");
            let left = [
                "holdfast_consumer_reconsumed_total",
                "holdfast_consumer_dead_lettered_total",
            ]
            .iter()
            .any(|name| sample_sum(&text, name, &["consumer_group=\"w\""]).is_some());
            let retry_topic = sample_sum(
                &text,
                "holdfast_topic_pulled_messages_total",
                &["topic=\"%RETRY%w\""],
            );
            (!left && retry_topic.is_none()).then_some(())
        });
    }
}

#[test]
fn an_async_consumer_streams_deliveries_answers_them_and_says_when_acks_are_confirmed() {
    use holdfast_shell::client::{AsyncConsumer, ClientConfig, ConsumerSettings};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, lines) = start_cluster(dir.path(), common::cluster_base_port());
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
    let file = dir.path().join("client.toml");
    let good = Some(file.as_path());
    wait_for(Duration::from_secs(30), "the topic is created", || {
        let output = client(good, &["topic", "create", "tasks", "--queues", "2"]);
        output.status.success().then_some(())
    });
    let bodies: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let mut produce = vec!["produce", "tasks"];
    produce.extend(bodies.iter().map(String::as_str));
    let receipts = client(good, &produce);
    assert!(receipts.status.success(), "{receipts:?}");
    // A send retried under load may be stored twice: count what the queues hold.
    let stored = String::from_utf8_lossy(&receipts.stdout).lines().count();

    let config = ClientConfig::from_file(&file).expect("client file");
    let mut consumer =
        AsyncConsumer::spawn(config, "a", "tasks", ConsumerSettings::default()).expect("connects");
    let mut seen = Vec::new();
    let mut later = None;
    while seen.len() < stored {
        let delivery = block_on(consumer.recv()).expect("a delivery before the stream ends");
        let body = String::from_utf8_lossy(&delivery.message().body).into_owned();
        // One message is answered ReconsumeLater; it comes back from the retry queue.
        if body == "t7" && later.is_none() {
            later = Some(delivery.delivery().offset);
            delivery.reconsume_later();
            continue;
        }
        seen.push(body);
        delivery.ack();
    }
    block_on(consumer.acks_confirmed()).expect("confirmed");
    seen.sort();
    seen.dedup();
    let mut expected = bodies.clone();
    expected.sort();
    assert_eq!(
        seen, expected,
        "every message, t7 again from the retry queue"
    );
    block_on(consumer.close());

    // Confirmed means committed: nothing of topic tasks waits for group a. (`describe` reads
    // each broker group's leader as it is now; one that just took over may still be applying.)
    wait_for(
        Duration::from_secs(15),
        "group a's lag on tasks is 0",
        || {
            let (_, lag) = committed_and_lag(&file, "a", "tasks");
            (lag == 0).then_some(())
        },
    );
    // Closed: the stream has ended, and acks_confirmed says so rather than wait.
    let config = ClientConfig::from_file(&file).expect("client file");
    let mut stopped =
        AsyncConsumer::spawn(config, "b", "tasks", ConsumerSettings::default()).expect("connects");
    stopped.stop();
    assert!(block_on(stopped.recv()).is_none());
}

/// The async client in a tokio application: sends spawned as tasks, the consumer's `Stream`
/// read in a task of its own, its acks awaited as confirmed, then stopped; a producer dropped
/// on a runtime thread does not hold the thread.
#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_client_runs_under_tokio_with_a_stream_of_deliveries() {
    use holdfast_core::broker::Message;
    use holdfast_shell::client::{
        AsyncConsumer, AsyncProducer, ClientConfig, ConsumerSettings, ProducerSettings,
    };
    use tokio_stream::StreamExt as _;

    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, lines) = start_cluster(dir.path(), common::cluster_base_port());
    let data = |id: usize| dir.path().join(format!("node-{id}")).join("data");
    let _reaper = Reaper(vec![data(1), data(2), data(3)]);
    let file = dir.path().join("client.toml");
    let ready = file.clone();
    tokio::task::spawn_blocking(move || {
        expect_line(&lines, "Ctrl-C stops the cluster", Duration::from_secs(60));
        wait_for(Duration::from_secs(30), "the topic is created", || {
            let output = client(Some(&ready), &["topic", "create", "ticks", "--queues", "2"]);
            output.status.success().then_some(())
        });
    })
    .await
    .expect("the cluster starts");

    let config = ClientConfig::from_file(&file).expect("client file");
    let settings = ProducerSettings::default()
        .send_timeout(Duration::from_secs(20))
        .retries(10);
    let producer = AsyncProducer::spawn(config.clone(), settings).expect("connects");
    let count = 200;
    let sends: Vec<_> = (0..count)
        .map(|i| tokio::spawn(producer.send("ticks", vec![Message::with_body(format!("t{i}"))])))
        .collect();
    let mut places = std::collections::BTreeSet::new();
    for send in sends {
        let receipt = send.await.expect("the task ran").expect("acked");
        assert!(places.insert((receipt.queue.queue, receipt.offset)));
    }
    producer.close().await;

    let mut consumer = AsyncConsumer::spawn(config.clone(), "tick-readers", "ticks", {
        ConsumerSettings::default()
    })
    .expect("connects");
    let reader = tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < count {
            let next = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await;
            let delivery = next
                .expect("a delivery within 30 s")
                .expect("the stream goes on");
            seen.insert(String::from_utf8_lossy(&delivery.message().body).into_owned());
            delivery.ack();
        }
        consumer.acks_confirmed().await.expect("confirmed");
        consumer.stop();
        assert!(consumer.next().await.is_none(), "stopped: the stream ends");
        consumer.close().await;
        seen
    });
    let seen = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("read within 2 minutes")
        .expect("the reader ran");
    let expected: std::collections::BTreeSet<String> =
        (0..count).map(|i| format!("t{i}")).collect();
    assert_eq!(seen, expected);

    // Confirmed means committed: nothing of ticks waits for the group.
    let described = file.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(
            Duration::from_secs(15),
            "the group's lag on ticks is 0",
            || {
                let (_, lag) = committed_and_lag(&described, "tick-readers", "ticks");
                (lag == 0).then_some(())
            },
        );
    })
    .await
    .expect("described");

    // Dropped with a send in flight, on a runtime thread: it returns before the send ends
    // (the topic does not exist, so the send is retried until its 3 s timeout).
    let producer = AsyncProducer::spawn(config, ProducerSettings::default()).expect("connects");
    let send = producer.send("no-such-topic", vec![Message::with_body("x")]);
    let started = Instant::now();
    drop(producer);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the drop held a runtime thread for {:?}",
        started.elapsed()
    );
    assert!(send.await.is_err(), "the send still ends, refused");
}
