//! End to end under a real network partition: three `holdfast server` processes, each in its
//! own Linux network namespace, wired to a bridge in another namespace. The leader of broker
//! group 1 is cut off by taking its bridge port down while the `holdfast` CLI keeps producing;
//! then the partition heals and every acknowledged message must be consumable.
//!
//! Nothing touches the host's network: the bridge, the client's address and every veth pair
//! live in namespaces this test makes (named after its pid) and deletes again on the way out,
//! failure included. It needs root and `ip`; without them it prints `skipped: <reason>` and
//! passes, unless `HOLDFAST_REQUIRE_NETNS=1` (CI) makes that a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{ADMIN_TOKEN, Pki, wait_for};

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");
const NODES: usize = 3;
/// Every node listens on the same port: each has a network stack of its own.
const PORT: u16 = 7301;
const TOPIC: &str = "orders";
const BATCH: usize = 200;
/// The group whose leader is isolated (group 0 is the metadata group).
const GROUP: u64 = 1;
/// Names inside the namespaces; they cannot clash with the host's, which they never see.
const BRIDGE: &str = "hfbr0";
const CLIENT_HOST: u8 = 254;

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    // The effective uid is the second field of `Uid:` in /proc/self/status.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        return Some(format!("not root (effective uid {euid:?})"));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`ip -V` failed: {}", out.status)),
        Err(e) => Some(format!("no `ip` command: {e}")),
    }
}

/// Skips loudly, or fails when CI asks for the test to really run. Written to the process's
/// stderr, not through `eprintln!`, so the test harness does not swallow it.
fn skip(reason: &str) {
    if std::env::var("HOLDFAST_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
        panic!("HOLDFAST_REQUIRE_NETNS=1 but the partition test cannot run: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

/// Runs `ip ARGS`; the error is its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must_ip(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// One line of `holdfast status`: what `node` says about `group`.
#[derive(Clone, Debug)]
struct GroupView {
    node: u64,
    group: u64,
    role: String,
    term: u64,
    leader: Option<u64>,
}

/// A parsed `holdfast status`: the nodes that answered and their groups.
#[derive(Debug, Default)]
struct Status {
    answered: BTreeSet<u64>,
    groups: Vec<GroupView>,
}

impl Status {
    fn parse(text: &str) -> Status {
        let mut status = Status::default();
        let mut node = None;
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                // `node 2 (10.1.0.2:7301): no answer` names the position, not who answered.
                ["node", ..] if line.ends_with("no answer") => node = None,
                ["node", id, ..] => {
                    node = id.parse().ok();
                    status.answered.extend(node);
                }
                ["group", group, role, "term", term, "leader", leader, ..] => {
                    if let (Some(node), Ok(group), Ok(term)) = (node, group.parse(), term.parse()) {
                        status.groups.push(GroupView {
                            node,
                            group,
                            role: role.to_string(),
                            term,
                            leader: leader.parse().ok(),
                        });
                    }
                }
                _ => {}
            }
        }
        status
    }

    /// The node that says it leads `group`, with its term (the highest term if several do).
    fn leader(&self, group: u64) -> Option<(u64, u64)> {
        self.groups
            .iter()
            .filter(|g| g.group == group && g.role == "Leader")
            .map(|g| (g.node, g.term))
            .max_by_key(|(_, term)| *term)
    }

    fn view(&self, node: u64, group: u64) -> Option<&GroupView> {
        self.groups
            .iter()
            .find(|g| g.node == node && g.group == group)
    }
}

/// What a CLI run printed.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// What one batch of `produce` ended with.
#[derive(Default)]
struct Batch {
    /// Bodies with the `queue@offset` printed for them.
    acked: Vec<(String, String)>,
    /// Failed with "it may have been written".
    maybe_written: Vec<String>,
    /// Failed with "nothing was written".
    not_written: Vec<String>,
    /// CLI processes it took: the CLI stops at its first failed send.
    runs: usize,
    took: Duration,
}

/// The namespaces, the servers in them and their data: dropping it kills the servers and
/// deletes every namespace it made, whether the test passed or not.
struct Lab {
    pid: u32,
    /// The second octet of every address, from the pid, so concurrent runs do not look alike.
    net: u8,
    namespaces: Vec<String>,
    servers: Vec<Option<Child>>,
    dir: tempfile::TempDir,
    /// The cluster's CA, node certificates and admin principal.
    pki: Pki,
    /// The admin's client file, for every CLI run.
    client_file: PathBuf,
    runs: AtomicUsize,
}

impl Lab {
    /// Builds the network, or says why it cannot (a reason to skip).
    fn create() -> Result<Lab, String> {
        let pid = std::process::id();
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let pki = Pki::create(dir.path(), NODES);
        let mut lab = Lab {
            pid,
            net: (pid % 250) as u8 + 1,
            namespaces: Vec::new(),
            servers: (0..NODES).map(|_| None).collect(),
            dir,
            pki,
            client_file: PathBuf::new(),
            runs: AtomicUsize::new(0),
        };
        let servers: Vec<std::net::SocketAddr> = (1..=NODES)
            .map(|id| lab.addr(id).parse().expect("an address"))
            .collect();
        lab.client_file = lab.pki.client_file(&servers, ADMIN_TOKEN);
        lab.remove_stale();
        // The first namespace is the probe: a container without the privilege fails here.
        let bridge_ns = lab.bridge_ns();
        ip(&["netns", "add", &bridge_ns])?;
        lab.namespaces.push(bridge_ns.clone());
        // The client (this test's CLI runs) sits on the bridge itself, in its namespace.
        let client = format!("10.{}.0.{CLIENT_HOST}/24", lab.net);
        must_ip(&["-n", &bridge_ns, "link", "set", "lo", "up"]);
        must_ip(&["-n", &bridge_ns, "link", "add", BRIDGE, "type", "bridge"]);
        must_ip(&["-n", &bridge_ns, "addr", "add", &client, "dev", BRIDGE]);
        must_ip(&["-n", &bridge_ns, "link", "set", BRIDGE, "up"]);
        for id in 1..=NODES {
            let ns = lab.node_ns(id);
            must_ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            // Made inside the bridge namespace with its peer born in the node's: the pair
            // never appears on the host.
            let port = Lab::port(id);
            must_ip(&[
                "-n", &bridge_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            must_ip(&["-n", &bridge_ns, "link", "set", &port, "master", BRIDGE]);
            must_ip(&["-n", &bridge_ns, "link", "set", &port, "up"]);
            let addr = format!("10.{}.0.{id}/24", lab.net);
            must_ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            must_ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            must_ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        Ok(lab)
    }

    fn bridge_ns(&self) -> String {
        format!("hf-br-{}", self.pid)
    }

    fn node_ns(&self, id: usize) -> String {
        format!("hf-n{id}-{}", self.pid)
    }

    /// Node `id`'s port on the bridge, in the bridge namespace.
    fn port(id: usize) -> String {
        format!("hfv{id}")
    }

    fn addr(&self, id: usize) -> String {
        format!("10.{}.0.{id}:{PORT}", self.net)
    }

    fn all_servers(&self) -> String {
        (1..=NODES)
            .map(|id| self.addr(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A previous run with our pid that died before its Drop (SIGKILL, say) left these
    /// names behind, perhaps with its servers still inside: those go first.
    fn remove_stale(&self) {
        let names = std::iter::once(self.bridge_ns()).chain((1..=NODES).map(|i| self.node_ns(i)));
        for ns in names {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", &ns]);
        }
    }

    fn start_servers(&mut self) {
        for id in 1..=NODES {
            let node_dir = self.dir.path().join(format!("node-{id}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut config = format!(
                "id = {id}\ndata_dir = {:?}\nbroker_groups = 2\n\n[nodes]\n",
                node_dir.join("data").display().to_string()
            );
            for peer in 1..=NODES {
                config.push_str(&format!("{peer} = \"{}\"\n", self.addr(peer)));
            }
            // Peers on the default port (client port + 100), over mutual TLS.
            config.push_str(&self.pki.security_section(id));
            let path = node_dir.join("node.toml");
            std::fs::write(&path, config).expect("config");
            let log = std::fs::File::create(node_dir.join("server.log")).expect("log");
            // `ip netns exec` execs the command in place: the child is the server itself.
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.node_ns(id),
                    HOLDFAST,
                    "server",
                    "--config",
                ])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("server starts");
            self.servers[id - 1] = Some(child);
        }
    }

    /// Runs the CLI inside namespace `ns` with `stdin` (a file) as its input; a run that is
    /// still going after `limit` is killed and fails the test.
    fn cli(&self, ns: &str, args: &[&str], stdin: Option<&Path>, limit: Duration) -> Ran {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let out_path = self.dir.path().join(format!("cli-{n}.out"));
        let err_path = self.dir.path().join(format!("cli-{n}.err"));
        let input = match stdin {
            Some(path) => Stdio::from(std::fs::File::open(path).expect("stdin file")),
            None => Stdio::null(),
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, HOLDFAST])
            .args(args)
            .env("HOLDFAST_CLIENT", &self.client_file)
            .stdin(input)
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .expect("the CLI starts");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let ran = Ran {
            ok: status.is_some_and(|s| s.success()),
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        };
        assert!(
            status.is_some(),
            "`holdfast {}` in {ns} still running after {limit:?}; stderr:\n{}",
            args.join(" "),
            ran.stderr
        );
        ran
    }

    /// `holdfast status` from namespace `ns`, asking `servers` only.
    fn status(&self, ns: &str, servers: &str) -> Status {
        let ran = self.cli(
            ns,
            &["status", "--servers", servers],
            None,
            Duration::from_secs(15),
        );
        assert!(ran.ok, "status failed: {}", ran.stderr);
        Status::parse(&ran.stdout)
    }

    /// Produces `count` messages `PREFIX-NNNN` through the CLI, from the client namespace,
    /// with `--servers` naming every node. The CLI stops at its first failed send, so a
    /// failure is recorded against the message after the last one acked and a new CLI
    /// carries on with the rest.
    fn produce(&self, prefix: &str, count: usize) -> Batch {
        let bodies: Vec<String> = (0..count).map(|i| format!("{prefix}-{i:04}")).collect();
        let servers = self.all_servers();
        let mut batch = Batch::default();
        let started = Instant::now();
        let mut next = 0;
        while next < bodies.len() {
            assert!(
                batch.runs < 20 && started.elapsed() < Duration::from_secs(40),
                "batch {prefix}: {} of {count} sent after {} CLI runs in {:?}",
                next,
                batch.runs,
                started.elapsed()
            );
            let input = self.dir.path().join(format!("{prefix}-{next}.in"));
            std::fs::write(&input, bodies[next..].join("\n") + "\n").expect("input");
            let ran = self.cli(
                &self.bridge_ns(),
                &["produce", TOPIC, "--servers", &servers],
                Some(&input),
                Duration::from_secs(60),
            );
            batch.runs += 1;
            // One `queue@offset` line per acked message, in input order.
            for place in ran.stdout.lines() {
                assert!(
                    next < bodies.len() && place.starts_with(&format!("{TOPIC}/")),
                    "unexpected produce output {place:?}"
                );
                batch.acked.push((bodies[next].clone(), place.to_string()));
                next += 1;
            }
            if ran.ok {
                assert_eq!(next, bodies.len(), "the CLI succeeded without acking all");
                break;
            }
            let error = ran
                .stderr
                .lines()
                .rev()
                .find(|l| l.starts_with("error:"))
                .unwrap_or_else(|| panic!("produce failed without an error:\n{}", ran.stderr));
            assert!(next < bodies.len(), "failed after acking all: {error}");
            let failed = bodies[next].clone();
            next += 1;
            eprintln!("  {failed}: {error}");
            if error.contains("may have been written") {
                batch.maybe_written.push(failed);
            } else if error.contains("nothing was written") {
                batch.not_written.push(failed);
            } else {
                panic!("produce failed in an unexpected way: {error}");
            }
        }
        batch.took = started.elapsed();
        eprintln!(
            "batch {prefix}: {} acked, {} failed maybe written, {} failed not written, {} CLI run(s), {:?}",
            batch.acked.len(),
            batch.maybe_written.len(),
            batch.not_written.len(),
            batch.runs,
            batch.took
        );
        batch
    }

    /// Consumes with a new consumer group until every body of `expected` was seen (a few
    /// rounds at most: duplicates and maybe-written messages count towards `--count`), then
    /// drains whatever is left. Returns each body consumed with how many times it was.
    fn consume(&self, group: &str, expected: &BTreeSet<String>) -> BTreeMap<String, u32> {
        let servers = self.all_servers();
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        let mut drained = false;
        for round in 0..5 {
            let missing = expected.iter().filter(|m| !seen.contains_key(*m)).count();
            // Once all is seen, one round without --count checks nothing else is left.
            let count = missing.to_string();
            let mut args = vec!["consume", TOPIC, "--group", group, "--servers", &servers];
            if missing > 0 {
                args.extend(["--count", &count, "--timeout", "10"]);
            } else {
                args.extend(["--timeout", "2"]);
            }
            let ran = self.cli(&self.bridge_ns(), &args, None, Duration::from_secs(60));
            assert!(ran.ok, "consume failed: {}", ran.stderr);
            let lines = ran.stdout.lines().count();
            for body in ran.stdout.lines() {
                *seen.entry(body.to_string()).or_default() += 1;
            }
            eprintln!("consume round {round}: {lines} message(s), {missing} were missing");
            if missing == 0 {
                drained = true;
                break;
            }
        }
        assert!(drained, "consumed five rounds and still missing messages");
        seen
    }

    fn isolate(&self, id: usize) {
        must_ip(&[
            "-n",
            &self.bridge_ns(),
            "link",
            "set",
            &Lab::port(id),
            "down",
        ]);
    }

    fn heal(&self, id: usize) {
        must_ip(&["-n", &self.bridge_ns(), "link", "set", &Lab::port(id), "up"]);
    }

    fn log_tail(&self, id: usize, lines: usize) -> String {
        let path: PathBuf = self.dir.path().join(format!("node-{id}/server.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for id in 1..=NODES {
            if let Some(mut child) = self.servers[id - 1].take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for id in 1..=NODES {
                eprintln!("--- node {id} server.log (tail)\n{}", self.log_tail(id, 30));
            }
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// The namespaces are named after the pid: the tests of this file take turns.
static LAB_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn acked_messages_survive_a_partitioned_broker_leader() {
    let _turn = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = unsupported() {
        return skip(&reason);
    }
    let mut lab = match Lab::create() {
        Ok(lab) => lab,
        Err(reason) => return skip(&reason),
    };
    let started = Instant::now();
    let client_ns = lab.bridge_ns();
    let all = lab.all_servers();
    lab.start_servers();

    // Every node answers and every group (metadata and both broker groups) has a leader.
    std::thread::sleep(Duration::from_millis(300));
    wait_for(Duration::from_secs(20), "all nodes up with leaders", || {
        let status = lab.status(&client_ns, &all);
        let ready = status.answered.len() == NODES && (0..=2).all(|g| status.leader(g).is_some());
        ready.then_some(())
    });
    let created = lab.cli(
        &client_ns,
        &["topic", "create", TOPIC, "--queues", "4", "--servers", &all],
        None,
        Duration::from_secs(30),
    );
    assert!(created.ok, "topic create: {}", created.stderr);
    let described = lab.cli(
        &client_ns,
        &["topic", "describe", TOPIC, "--servers", &all],
        None,
        Duration::from_secs(30),
    );
    assert!(described.ok, "topic describe: {}", described.stderr);
    eprintln!("{}", described.stdout.trim_end());
    // `  orders/0<TAB>group 1<TAB>leader node 3`: which broker group holds each queue.
    let group_of: BTreeMap<String, u64> = described
        .stdout
        .lines()
        .filter_map(|line| {
            let (queue, rest) = line.trim().split_once('\t')?;
            let group = rest
                .strip_prefix("group ")?
                .split('\t')
                .next()?
                .parse()
                .ok()?;
            Some((queue.to_string(), group))
        })
        .collect();
    assert_eq!(group_of.len(), 4, "four queues: {}", described.stdout);
    let in_group = |batch: &Batch, group: u64| {
        batch
            .acked
            .iter()
            .filter(|(_, place)| {
                let queue = place.split('@').next().unwrap_or_default();
                group_of.get(queue) == Some(&group)
            })
            .count()
    };

    let first = lab.produce("a", BATCH);
    assert_eq!(
        first.acked.len(),
        BATCH,
        "a healthy cluster acks every send"
    );

    let (old_leader, old_term) = lab
        .status(&client_ns, &all)
        .leader(GROUP)
        .expect("group 1 has a leader");
    let old = old_leader as usize;
    eprintln!("isolating node {old}, leader of group {GROUP} in term {old_term}");
    lab.isolate(old);
    let isolated_at = Instant::now();

    // The CLI must fail over: the sends to the lost leader time out and go elsewhere.
    let second = lab.produce("b", BATCH);
    let failed = second.maybe_written.len() + second.not_written.len();
    assert!(
        failed <= 5,
        "{failed} of {BATCH} sends failed while one node of three was cut off"
    );

    // The two healthy nodes elect a new leader for group 1, in a higher term.
    let healthy: String = (1..=NODES)
        .filter(|id| *id != old)
        .map(|id| lab.addr(id))
        .collect::<Vec<_>>()
        .join(",");
    let (new_leader, new_term) = wait_for(
        Duration::from_secs(10),
        "a new leader of group 1 among the healthy nodes",
        || {
            lab.status(&client_ns, &healthy)
                .leader(GROUP)
                .filter(|(_, term)| *term > old_term)
        },
    );
    assert_ne!(new_leader, old_leader);
    eprintln!("node {new_leader} leads group {GROUP} in term {new_term}");

    // CheckQuorum: cut off from both peers, the old leader steps down by itself. Nobody
    // outside can reach it, so ask it from inside its own namespace.
    let own_ns = lab.node_ns(old);
    let own = lab.addr(old);
    let view = wait_for(
        Duration::from_secs(5),
        "the isolated old leader stops claiming group 1",
        || {
            let status = lab.status(&own_ns, &own);
            let view = status.view(old_leader, GROUP).cloned()?;
            (view.role != "Leader").then_some(view)
        },
    );
    eprintln!(
        "isolated node {old} says {} in term {} for group {GROUP}, {:?} after isolation",
        view.role,
        view.term,
        isolated_at.elapsed()
    );
    // PreVote: alone, it cannot even start an election, so its term stays where it was.
    assert_eq!(
        view.term, old_term,
        "the isolated node's term moved: {view:?}"
    );

    // Still partitioned, a fresh CLI (no memory of the timeouts above) writes to group 1
    // through its new leader.
    let partitioned = lab.produce("p", BATCH / 2);
    assert!(
        partitioned.maybe_written.len() + partitioned.not_written.len() <= 5,
        "sends failed with a new leader in place"
    );
    assert!(
        in_group(&partitioned, GROUP) > 0,
        "nothing written to group {GROUP} under its new leader"
    );

    lab.heal(old);
    let healed_at = Instant::now();
    let third = lab.produce("c", BATCH);
    assert!(
        third.maybe_written.len() + third.not_written.len() <= 5,
        "sends failed after healing"
    );

    // The old leader rejoins group 1 as a follower of a leader of at least the new term.
    let rejoined = wait_for(
        Duration::from_secs(20),
        "the healed node follows the new leader of group 1",
        || {
            let status = lab.status(&client_ns, &own);
            let view = status.view(old_leader, GROUP).cloned()?;
            let follows = view.role == "Follower"
                && view.term >= new_term
                && view.leader.is_some_and(|l| l != old_leader);
            follows.then_some(view)
        },
    );
    eprintln!(
        "healed node {old} follows node {:?} in term {} for group {GROUP}, {:?} after healing",
        rejoined.leader,
        rejoined.term,
        healed_at.elapsed()
    );

    let batches = [&first, &second, &partitioned, &third];
    for (name, batch) in ["a", "b", "p", "c"].iter().zip(batches) {
        eprintln!(
            "batch {name}: {} acked in group 1, {} in group 2",
            in_group(batch, 1),
            in_group(batch, 2)
        );
    }
    // Every place handed out belongs to one message only.
    let mut places: BTreeMap<&str, &str> = BTreeMap::new();
    for (body, place) in batches.iter().flat_map(|b| &b.acked) {
        if let Some(other) = places.insert(place, body) {
            panic!("{place} acked for both {other} and {body}");
        }
    }

    let acked: BTreeSet<String> = batches
        .iter()
        .flat_map(|b| b.acked.iter().map(|(body, _)| body.clone()))
        .collect();
    let maybe: BTreeSet<String> = batches
        .iter()
        .flat_map(|b| b.maybe_written.iter().cloned())
        .collect();
    let not_written: BTreeSet<String> = batches
        .iter()
        .flat_map(|b| b.not_written.iter().cloned())
        .collect();
    let consumed = lab.consume("audit", &acked);

    let missing: Vec<&String> = acked
        .iter()
        .filter(|m| !consumed.contains_key(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acked messages never consumed: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let unexpected: Vec<&String> = consumed
        .keys()
        .filter(|m| !acked.contains(*m) && !maybe.contains(*m))
        .collect();
    assert!(
        unexpected.is_empty(),
        "consumed but never sent, or sent with \"nothing was written\" ({} such sends): {unexpected:?}",
        not_written.len()
    );
    let duplicates = consumed.values().filter(|n| **n > 1).count();
    let maybe_seen = maybe.iter().filter(|m| consumed.contains_key(*m)).count();
    eprintln!(
        "consumed {} distinct ({} more than once); {} acked, {} of {} maybe-written seen; {:?} in all",
        consumed.len(),
        duplicates,
        acked.len(),
        maybe_seen,
        maybe.len(),
        started.elapsed()
    );
}

/// How long the node is cut off in `rejoins_soon_after_a_long_partition`: long enough for TCP's
/// retransmission back-off on a link that was open when the partition began to grow past ten
/// seconds (200 ms doubling: 0.2, 0.6, 1.4, 3.0, 6.2, 12.6, 25.4 s after the first loss).
const LONG_PARTITION: Duration = Duration::from_secs(15);

/// Issue 17: a node cut off for a while must follow a leader in every group soon after the
/// partition heals, not whenever TCP next retransmits on a link left open across it (that was
/// up to 13.6 s). Status is asked from inside the healed node's namespace, so what is timed is
/// the node's own view, not the client's reach.
#[test]
fn rejoins_soon_after_a_long_partition() {
    let _turn = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = unsupported() {
        return skip(&reason);
    }
    let mut lab = match Lab::create() {
        Ok(lab) => lab,
        Err(reason) => return skip(&reason),
    };
    let client_ns = lab.bridge_ns();
    let all = lab.all_servers();
    lab.start_servers();
    std::thread::sleep(Duration::from_millis(300));
    wait_for(Duration::from_secs(20), "all nodes up with leaders", || {
        let status = lab.status(&client_ns, &all);
        let ready = status.answered.len() == NODES && (0..=2).all(|g| status.leader(g).is_some());
        ready.then_some(())
    });
    // Some traffic first, so the links carry data when they are cut.
    let created = lab.cli(
        &client_ns,
        &["topic", "create", TOPIC, "--queues", "4", "--servers", &all],
        None,
        Duration::from_secs(30),
    );
    assert!(created.ok, "topic create: {}", created.stderr);
    let first = lab.produce("a", BATCH / 4);
    assert_eq!(
        first.acked.len(),
        BATCH / 4,
        "a healthy cluster acks every send"
    );

    let (leader, _) = lab
        .status(&client_ns, &all)
        .leader(GROUP)
        .expect("group 1 has a leader");
    let cut = leader as usize;
    let own_ns = lab.node_ns(cut);
    let own = lab.addr(cut);
    lab.isolate(cut);
    eprintln!("isolated node {cut} (leader of group {GROUP}) for {LONG_PARTITION:?}");
    std::thread::sleep(LONG_PARTITION);
    let alone = lab.status(&own_ns, &own);
    let campaigning = alone
        .groups
        .iter()
        .filter(|g| g.node == leader && g.role != "Follower")
        .count();
    eprintln!("before healing, node {cut} leads or campaigns in {campaigning} group(s)");
    assert!(campaigning > 0, "cut off, the node still follows everyone");

    lab.heal(cut);
    let healed_at = Instant::now();
    let took = wait_for(
        Duration::from_secs(30),
        "the healed node follows a leader in every group",
        || {
            let status = lab.status(&own_ns, &own);
            let views: Vec<&GroupView> =
                status.groups.iter().filter(|g| g.node == leader).collect();
            let rejoined = views.len() == 3
                && views
                    .iter()
                    .all(|g| g.role == "Follower" && g.leader.is_some_and(|l| l != leader));
            rejoined.then(|| healed_at.elapsed())
        },
    );
    eprintln!("node {cut} follows a leader in every group {took:?} after healing");
    // A loaded machine (the CLI that asks takes a few tens of milliseconds itself) gets slack;
    // before the fix this took up to the next TCP retransmission, about 10 s here.
    assert!(
        took < Duration::from_secs(3),
        "rejoining took {took:?} after a {LONG_PARTITION:?} partition"
    );
}
