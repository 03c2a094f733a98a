//! End to end: `holdfast group add` on a running 3-node cluster. The new broker group lives on
//! the voters named (two of three, forced), a topic created afterwards places queues in it,
//! messages go through it both ways, and a voter restarted with SIGTERM brings the group back
//! from its directory and the metadata table (not from node.toml, which never names it).
//! Real `holdfast server` processes on loopback, with TLS.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_core::broker::Message;
use holdfast_core::node::protocol::{GroupStatus, Request, Response};
use holdfast_shell::client::{Admin, ClientError, ConsumeStatus, Consumer, Producer};

mod common;
use common::{ADMIN_TOKEN, Net, server_log, wait_for, write_node_config};

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");
/// `write_node_config` gives every node broker groups 1 and 2; the one added is 3.
const ADDED: u64 = 3;

struct Cluster {
    dir: PathBuf,
    net: Net,
    children: Vec<Option<Child>>,
}

impl Cluster {
    fn node_dir(&self, id: usize) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    fn start(&mut self, id: usize) {
        let node_dir = self.node_dir(id);
        let path = write_node_config(&node_dir, id, &self.net, "");
        let child = Command::new(HOLDFAST)
            .args(["server", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(server_log(&node_dir))
            .spawn()
            .expect("server starts");
        self.children[id - 1] = Some(child);
    }

    fn terminate(&mut self, id: usize) {
        let Some(mut child) = self.children[id - 1].take() else {
            return;
        };
        // SAFETY: kill only sends a signal to the pid of a child we started.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("node {id} did not stop within 15 s of SIGTERM");
    }

    fn status(&self, id: usize) -> Option<Vec<GroupStatus>> {
        let mut admin = Admin::connect(self.net.admin()).ok()?;
        match admin.ask(id as u64, Request::Status)? {
            Response::Status { groups, .. } => Some(groups),
            _ => None,
        }
    }

    /// The CLI's exit status and stdout.
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let pki = self.net.pki.as_ref().expect("secure");
        let output = Command::new(HOLDFAST)
            .args(args)
            .arg("--client-file")
            .arg(pki.client_file(&self.net.clients, ADMIN_TOKEN))
            .output()
            .expect("the CLI runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Node `id` answers and every group it hosts has a leader; `added` says whether it hosts
/// the added group.
fn settled(cluster: &Cluster, id: usize, added: bool) -> bool {
    cluster.status(id).is_some_and(|groups| {
        groups.iter().any(|g| g.group == ADDED) == added
            && groups.iter().all(|g| g.leader.is_some())
    })
}

/// Sends `count` messages `prefix-N` to `topic`, each acknowledged.
fn produce(cluster: &Cluster, topic: &str, prefix: &str, count: usize) -> BTreeSet<String> {
    let mut producer = Producer::connect(cluster.net.admin()).expect("producer");
    let mut sent = BTreeSet::new();
    for i in 0..count {
        let body = format!("{prefix}-{i}");
        let message = Message::with_body(Bytes::from(body.clone()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match producer.send(topic, vec![message.clone()]) {
                Ok(_) => break,
                Err(ClientError::Refused(why)) => panic!("send refused: {why}"),
                Err(e) if Instant::now() > deadline => panic!("send failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        sent.insert(body);
    }
    sent
}

fn consume_all(cluster: &Cluster, topic: &str, group: &str, expected: &BTreeSet<String>) {
    let mut consumer = Consumer::connect(cluster.net.admin(), group, topic).expect("consumer");
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !expected.is_subset(&seen) && Instant::now() < deadline {
        consumer.run(Some(10_000), Duration::from_secs(2), |d| {
            seen.insert(String::from_utf8_lossy(&d.message.message.body).to_string());
            ConsumeStatus::Success
        });
    }
    consumer.close();
    let missing: Vec<_> = expected.difference(&seen).collect();
    assert!(missing.is_empty(), "never consumed: {missing:?}");
}

#[test]
fn a_broker_group_added_at_runtime_serves_new_topics_and_survives_a_restart() {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().to_path_buf();
    let mut cluster = Cluster {
        net: Net::secure(&dir, 3),
        dir,
        children: (0..3).map(|_| None).collect(),
    };
    for id in 1..=3 {
        cluster.start(id);
    }
    wait_for(Duration::from_secs(15), "the nodes elect leaders", || {
        (1..=3).all(|id| settled(&cluster, id, false)).then_some(())
    });
    let (ok, out) = cluster.cli(&["topic", "create", "before", "--queues", "4"]);
    assert!(ok, "{out}");

    // Two voters of three is below the replication factor: refused unless forced.
    let (ok, out) = cluster.cli(&["group", "add", "--nodes", "2,3"]);
    assert!(!ok && out.contains("replication factor"), "{out}");
    let (ok, out) = cluster.cli(&[
        "group", "add", "--nodes", "2,3", "--force", "--output", "json",
    ]);
    assert!(ok, "{out}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(line["group"], ADDED, "{out}");
    assert_eq!(line["voters"], serde_json::json!([2, 3]));
    let (ok, out) = cluster.cli(&["group", "add", "2", "--nodes", "1,2,3"]);
    assert!(!ok && out.contains("exists already"), "{out}");

    wait_for(
        Duration::from_secs(15),
        "the voters host the new group",
        || {
            (settled(&cluster, 2, true)
                && settled(&cluster, 3, true)
                && settled(&cluster, 1, false))
            .then_some(())
        },
    );
    // The voters made its directory; node 1 did not.
    let group_dir = |id: usize| {
        cluster
            .node_dir(id)
            .join("data")
            .join(format!("group-{ADDED}"))
    };
    assert!(group_dir(2).is_dir() && group_dir(3).is_dir());
    assert!(!group_dir(1).exists());

    // A topic created now places queues in it; the older topic stays where it was.
    let routes = |topic: &str| {
        let mut admin = Admin::connect(cluster.net.admin()).expect("admin");
        // A follower that has not applied the topic yet sends the asker to the leader.
        let request = Request::Route {
            topic: topic.into(),
        };
        match admin.ask_leader(request, Duration::from_secs(10)) {
            Ok(Response::Routes { routes, .. }) => routes,
            other => panic!("{other:?}"),
        }
    };
    let (ok, out) = cluster.cli(&["topic", "create", "after", "--queues", "6"]);
    assert!(ok, "{out}");
    assert!(routes("before").iter().all(|r| r.group != ADDED));
    let after = routes("after");
    assert_eq!(
        after.iter().filter(|r| r.group == ADDED).count(),
        2,
        "{after:?}"
    );

    let sent = produce(&cluster, "after", "one", 60);
    consume_all(&cluster, "after", "readers", &sent);

    // A voter stops and comes back: the group returns from its directory and the table.
    cluster.terminate(2);
    cluster.start(2);
    wait_for(
        Duration::from_secs(20),
        "node 2 brings the group back",
        || settled(&cluster, 2, true).then_some(()),
    );
    let config = std::fs::read_to_string(cluster.node_dir(2).join("node.toml")).expect("config");
    assert!(
        config.contains("broker_groups = 2"),
        "node.toml never names group {ADDED}"
    );
    let log = std::fs::read_to_string(cluster.node_dir(2).join("server.log")).expect("log");
    assert_eq!(
        log.matches("broker group added: replica created").count(),
        1,
        "the restart recovered the group rather than creating it again"
    );
    // Its leadership moves to the other voter (`group transfer` through node 1, which hosts
    // no replica of it and points at a voter); then send and read through it again.
    let leader = wait_for(Duration::from_secs(10), "group 3's leader", || {
        cluster
            .status(3)?
            .iter()
            .find(|g| g.group == ADDED)
            .and_then(|g| g.leader)
    });
    let other = if leader == 2 { "3" } else { "2" };
    let (ok, out) = cluster.cli(&["group", "transfer", &ADDED.to_string(), "--to", other]);
    assert!(ok, "{out}");
    let sent = produce(&cluster, "after", "two", 30);
    consume_all(&cluster, "after", "readers", &sent);

    let (ok, out) = cluster.cli(&["status", "--output", "json"]);
    assert!(ok && out.contains(&format!("\"group\":{ADDED}")), "{out}");
}
