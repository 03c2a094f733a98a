//! End to end: a node whose data directory was wiped rejoins with `--initial-cluster-state
//! existing`, follows and stores data, but never votes or leads; and a node started on another
//! node's data directory is refused. Real `holdfast server` processes on loopback, SIGKILLed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_core::broker::Message;
use holdfast_core::node::protocol::{GroupStatus, Request, Response};
use holdfast_core::storage::decode_stored_state;
use holdfast_shell::client::{Admin, ConsumeStatus, Consumer, Producer};

mod common;
use common::{Net, server_log, wait_for, write_node_config};

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");
/// The metadata group and two broker groups.
const GROUPS: [u64; 3] = [0, 1, 2];
/// What a votes-lost start logs, every time.
const VOTES_LOST: &str = "votes lost: this node's data for these groups was lost";

/// Three nodes on free loopback ports; node n keeps its config, log and data in `dir/node-n`.
struct Cluster {
    dir: PathBuf,
    net: Net,
    children: Vec<Option<Child>>,
}

impl Cluster {
    fn new(dir: &Path) -> Cluster {
        Cluster {
            dir: dir.to_path_buf(),
            net: Net::secure(dir, 3),
            children: (0..3).map(|_| None).collect(),
        }
    }

    fn node_dir(&self, id: usize) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Writes node `id`'s config and returns `holdfast server --config it`, logging to
    /// `node-id/server.log`.
    fn command(&self, id: usize, extra: &[&str]) -> Command {
        let node_dir = self.node_dir(id);
        let path = write_node_config(&node_dir, id, &self.net, "");
        let log = server_log(&node_dir);
        let mut command = Command::new(HOLDFAST);
        command
            .args(["server", "--config"])
            .arg(&path)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log);
        command
    }

    fn start(&mut self, id: usize, extra: &[&str]) {
        let child = self.command(id, extra).spawn().expect("server starts");
        self.children[id - 1] = Some(child);
    }

    /// SIGKILL: no chance to sync or say goodbye.
    fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.children[id - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self, id: usize) -> String {
        std::fs::read_to_string(self.node_dir(id).join("server.log")).unwrap_or_default()
    }

    /// Every group as node `id` reports it, if it answers.
    fn status(&self, id: usize) -> Option<Vec<GroupStatus>> {
        let mut admin = Admin::connect(self.net.admin()).ok()?;
        match admin.ask(id as u64, Request::Status) {
            Some(Response::Status { groups, .. }) => Some(groups),
            _ => None,
        }
    }

    /// The node among `among` that reports itself the leader of `group`.
    fn leader_of(&self, group: u64, among: &[usize]) -> Option<usize> {
        among.iter().copied().find(|id| {
            self.status(*id).is_some_and(|groups| {
                groups
                    .iter()
                    .any(|g| g.group == group && g.role == "Leader")
            })
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=3 {
            self.kill(id);
        }
    }
}

fn produce(cluster: &Cluster, prefix: &str, count: usize, acked: &mut BTreeSet<String>) {
    let mut producer = Producer::connect(cluster.net.admin()).expect("producer");
    for i in 0..count {
        let body = format!("{prefix}{i:04}");
        let message = Message::with_body(Bytes::from(body.clone()));
        match producer.send("orders", vec![message]) {
            Ok(_) => acked.insert(body),
            Err(e) => panic!("a cluster with a majority refused {body}: {e}"),
        };
    }
}

/// Consumes until everything in `expected` was seen, or panics naming what is missing.
fn consume_all(cluster: &Cluster, group: &str, expected: &BTreeSet<String>) {
    let mut consumer = Consumer::connect(cluster.net.admin(), group, "orders").expect("consumer");
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !expected.is_subset(&seen) && Instant::now() < deadline {
        consumer.run(Some(10_000), Duration::from_secs(2), |d| {
            seen.insert(String::from_utf8_lossy(&d.message.message.body).to_string());
            ConsumeStatus::Success
        });
    }
    consumer.close();
    let missing: Vec<_> = expected.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} acked messages never consumed, the first {:?}",
        missing.len(),
        missing.first()
    );
}

#[test]
fn a_wiped_node_rejoins_votes_lost_stores_data_and_never_votes_or_leads() {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::new(temp.path());
    for id in 1..=3 {
        cluster.start(id, &[]);
    }
    let mut admin = Admin::connect(cluster.net.admin()).expect("admin");
    let created = admin.ask_leader(
        Request::CreateTopic {
            topic: "orders".into(),
            queues: 4,
        },
        Duration::from_secs(20),
    );
    assert!(
        matches!(created, Ok(Response::TopicCreated { .. })),
        "{created:?}"
    );
    let mut acked = BTreeSet::new();
    produce(&cluster, "before", 200, &mut acked);

    // Node 3 loses its disk and comes back, told so.
    cluster.kill(3);
    std::fs::remove_dir_all(cluster.node_dir(3).join("data")).expect("wipe node 3");
    cluster.start(3, &["--initial-cluster-state", "existing"]);
    wait_for(
        Duration::from_secs(10),
        "node 3 logs its votes-lost start",
        || cluster.log(3).contains(VOTES_LOST).then_some(()),
    );
    let log = cluster.log(3);
    assert!(log.contains("initial_cluster_state = existing"), "{log}");
    assert!(log.contains("WARN"), "{log}");
    let identity = std::fs::read_to_string(cluster.node_dir(3).join("data/identity.toml"))
        .expect("node 3's new identity");
    assert!(
        identity.contains("votes_lost = [0, 1, 2]"),
        "the note is durable:\n{identity}"
    );

    produce(&cluster, "after", 200, &mut acked);

    // Node 3 stores what the leaders have committed, as a follower.
    wait_for(Duration::from_secs(30), "node 3 catches up", || {
        let leaders: Vec<GroupStatus> = [1, 2]
            .iter()
            .filter_map(|id| cluster.status(*id))
            .flatten()
            .filter(|g| g.role == "Leader")
            .collect();
        let mine = cluster.status(3)?;
        let caught_up = leaders.len() == GROUPS.len()
            && leaders.iter().all(|l| {
                mine.iter()
                    .any(|g| g.group == l.group && g.last_index >= l.commit_index)
            });
        caught_up.then_some(())
    });

    // Take down the metadata group's leader: the other voter alone is no majority, and node 3
    // grants no vote, so group 0 stays leaderless, and node 3 never even campaigns.
    let leader = wait_for(Duration::from_secs(10), "group 0 has a leader", || {
        cluster.leader_of(0, &[1, 2, 3])
    });
    assert_ne!(leader, 3, "a votes-lost node leads group 0");
    let other = 3 - leader;
    cluster.kill(leader);
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        if let Some(groups) = cluster.status(3) {
            for g in &groups {
                assert_eq!(g.role, "Follower", "node 3 left the follower role: {g:?}");
            }
        }
        if let Some(groups) = cluster.status(other) {
            let g0 = groups.iter().find(|g| g.group == 0).expect("group 0");
            assert_ne!(
                g0.role, "Leader",
                "node {other} won group 0 without node {leader}: node 3 voted"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.start(leader, &[]);
    for group in GROUPS {
        let found = wait_for(Duration::from_secs(20), "a leader again", || {
            cluster.leader_of(group, &[1, 2, 3])
        });
        assert_ne!(found, 3, "node 3 leads group {group}");
    }

    consume_all(&cluster, "billing", &acked);

    // Node 3 never voted: no group's state file holds a vote.
    cluster.kill(3);
    for group in GROUPS {
        let path = cluster
            .node_dir(3)
            .join(format!("data/group-{group}/state"));
        let bytes = std::fs::read(&path).expect("state file");
        let stored = decode_stored_state(&bytes).expect("a readable state file");
        let vote = stored.and_then(|s| s.hard_state.vote);
        assert_eq!(vote, None, "node 3 voted in group {group}");
    }

    // A plain restart remembers: still votes-lost, still a follower that stores data.
    cluster.start(3, &[]);
    wait_for(
        Duration::from_secs(10),
        "node 3 restarts votes-lost",
        || (cluster.log(3).matches(VOTES_LOST).count() == 2).then_some(()),
    );
    produce(&cluster, "restarted", 20, &mut acked);
    consume_all(&cluster, "audit", &acked);
    let groups = wait_for(Duration::from_secs(10), "node 3 answers", || {
        cluster.status(3)
    });
    assert!(groups.iter().all(|g| g.role == "Follower"), "{groups:?}");
}

#[test]
fn a_node_started_on_another_nodes_data_directory_is_refused() {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::new(temp.path());
    cluster.start(1, &[]);
    let identity = cluster.node_dir(1).join("data/identity.toml");
    wait_for(Duration::from_secs(10), "node 1 initialises", || {
        identity.exists().then_some(())
    });
    cluster.kill(1);

    let node_1_data = cluster.node_dir(1).join("data");
    let mut child = cluster
        .command(2, &["--data-dir", node_1_data.to_str().expect("utf-8")])
        .spawn()
        .expect("starts");
    let status = wait_for(Duration::from_secs(10), "node 2 refuses", || {
        child.try_wait().expect("wait")
    });
    assert!(!status.success(), "node 2 ran on node 1's data");
    let log = cluster.log(2);
    let line = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(line.contains("belongs to node 1"), "{line}");
    assert!(line.contains(&identity.display().to_string()), "{line}");
    let text = std::fs::read_to_string(&identity).expect("node 1's identity");
    assert!(
        text.contains("node = 1"),
        "node 1's identity is untouched:\n{text}"
    );

    // An unknown initial cluster state is a one-line config error naming the key.
    let config = temp.path().join("bad.toml");
    std::fs::write(
        &config,
        "id = 3\ndata_dir = \"/nonexistent\"\ninitial_cluster_state = \"old\"\n[nodes]\n3 = \"127.0.0.1:1\"\n",
    )
    .expect("config");
    let out = Command::new(HOLDFAST)
        .args(["server", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("initial_cluster_state"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
