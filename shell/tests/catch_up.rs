//! End to end: a node that was down while its peers compacted their logs past it comes back,
//! installs the metadata snapshot and fetches only the segments it lacks, in bounded chunks,
//! and its store then holds byte for byte the messages its peers hold. Real `holdfast server`
//! processes on loopback, SIGKILLed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use holdfast_core::broker::{Message, QueueId, StoredMessage};
use holdfast_core::node::protocol::{GroupStatus, Request, Response};
use holdfast_shell::client::{Admin, Producer};
use holdfast_shell::storage::QueueStore;

mod common;
use common::{Net, server_log, wait_for, write_node_config};

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");
const QUEUES: u32 = 2;
/// Messages of this many bytes: the backlog is many times one fetch's 1 MiB.
const BODY_BYTES: usize = 16 << 10;
const MESSAGES: usize = 600;

struct Cluster {
    dir: PathBuf,
    net: Net,
    children: Vec<Option<Child>>,
}

impl Cluster {
    /// Three nodes started in `dir`, topic `orders` of `QUEUES` queues created.
    fn with_orders(dir: &Path) -> Cluster {
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            net: Net::no_auth(3),
            children: (0..3).map(|_| None).collect(),
        };
        for id in 1..=3 {
            cluster.start(id);
        }
        let mut admin = Admin::connect(cluster.net.admin()).expect("admin");
        let created = admin.ask_leader(
            Request::CreateTopic {
                topic: "orders".into(),
                queues: QUEUES,
            },
            Duration::from_secs(20),
        );
        assert!(
            matches!(created, Ok(Response::TopicCreated { .. })),
            "{created:?}"
        );
        cluster
    }

    fn node_dir(&self, id: usize) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    fn start(&mut self, id: usize) {
        let node_dir = self.node_dir(id);
        // Compaction soon, so a node down for a few hundred messages falls behind it.
        let path = write_node_config(&node_dir, id, &self.net, "snapshot_entries = 50");
        let child = Command::new(HOLDFAST)
            .args(["server", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(server_log(&node_dir))
            .spawn()
            .expect("server starts");
        self.children[id - 1] = Some(child);
    }

    fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.children[id - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self, id: usize) -> String {
        std::fs::read_to_string(self.node_dir(id).join("server.log")).unwrap_or_default()
    }

    fn status(&self, id: usize) -> Option<Vec<GroupStatus>> {
        let mut admin = Admin::connect(self.net.admin()).ok()?;
        match admin.ask(id as u64, Request::Status) {
            Some(Response::Status { groups, .. }) => Some(groups),
            _ => None,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=3 {
            self.kill(id);
        }
    }
}

/// Every message of the topic in node `id`'s store, by queue and offset (`None` where it
/// lacks one), read with the files closed (the nodes are down).
fn stored(dir: &Path, count: u64) -> Vec<Option<StoredMessage>> {
    let mut store = QueueStore::open(&dir.join("data")).expect("the store opens");
    let mut all = Vec::new();
    for queue in 0..QUEUES {
        let queue = QueueId::new("orders", queue);
        for offset in 0..count {
            all.push(
                [1, 2]
                    .iter()
                    .find_map(|g| store.message(*g, &queue, offset).ok()),
            );
        }
    }
    all
}

#[test]
fn a_node_behind_compaction_fetches_the_segments_it_lacks_and_holds_the_same_bytes() {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::with_orders(temp.path());
    cluster.kill(3);
    // Both broker groups lead on nodes 1 and 2 before sending: a send that times out on a
    // group led by the killed node makes the producer avoid that group for 10 s, so every
    // message would go to the other group and the first would never compact.
    wait_for(
        Duration::from_secs(30),
        "nodes 1 and 2 lead both groups",
        || {
            let groups: Vec<GroupStatus> = cluster.status(1)?;
            [1, 2]
                .iter()
                .all(|group| {
                    groups
                        .iter()
                        .any(|g| g.group == *group && matches!(g.leader, Some(1 | 2)))
                })
                .then_some(())
        },
    );
    let mut producer = Producer::connect(cluster.net.admin()).expect("producer");
    for i in 0..MESSAGES {
        let body = format!("{i:06}{}", "p".repeat(BODY_BYTES));
        let message = Message::with_body(Bytes::from(body));
        if let Err(e) = producer.send("orders", vec![message]) {
            panic!("a cluster with a majority refused message {i}: {e}");
        }
    }
    // Both broker groups compacted past everything node 3 holds.
    wait_for(Duration::from_secs(60), "nodes 1 and 2 compact", || {
        let groups: Vec<GroupStatus> = [1, 2]
            .iter()
            .filter_map(|id| cluster.status(*id))
            .flatten()
            .collect();
        [1, 2]
            .iter()
            .all(|group| {
                groups
                    .iter()
                    .any(|g| g.group == *group && g.snapshot_index > 20)
            })
            .then_some(())
    });

    cluster.start(3);
    wait_for(
        Duration::from_secs(60),
        "node 3 catches up both broker groups",
        || (cluster.log(3).matches("caught up").count() >= 2).then_some(()),
    );
    let log = cluster.log(3);
    for line in log.lines().filter(|l| l.contains("catch")) {
        eprintln!("node 3: {line}");
    }
    assert!(log.contains("catching up"), "it fetched segments:\n{log}");
    assert!(!log.contains("transfer image"), "no transfer image:\n{log}");
    // Node 3 follows: it acknowledged the snapshots and takes new entries.
    let commits: Vec<(u64, u64)> = wait_for(Duration::from_secs(30), "node 1 answers", || {
        cluster.status(1)
    })
    .iter()
    .map(|g| (g.group, g.commit_index))
    .collect();
    wait_for(Duration::from_secs(60), "node 3 follows", || {
        let mine = cluster.status(3)?;
        commits
            .iter()
            .all(|(group, commit)| {
                mine.iter()
                    .any(|g| g.group == *group && g.applied_index >= *commit)
            })
            .then_some(())
    });
    for id in 1..=3 {
        cluster.kill(id);
    }
    let count = MESSAGES as u64;
    let theirs = stored(&cluster.node_dir(1), count);
    let mine = stored(&cluster.node_dir(3), count);
    let held = theirs.iter().filter(|m| m.is_some()).count();
    assert_eq!(held, MESSAGES, "node 1 holds every message");
    for (i, (a, b)) in theirs.iter().zip(&mine).enumerate() {
        if a.is_some() {
            assert_eq!(a, b, "message {i} (queue-major) differs on node 3");
        }
    }
}

/// A node whose store lost a segment its snapshot references fetches it from its peers at
/// restart, instead of refusing to start the group.
#[test]
fn a_node_missing_a_segment_at_restart_repairs_it_from_its_peers() {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::with_orders(temp.path());
    let mut producer = Producer::connect(cluster.net.admin()).expect("producer");
    for i in 0..MESSAGES / 2 {
        let body = format!("{i:06}{}", "r".repeat(BODY_BYTES));
        if let Err(e) = producer.send("orders", vec![Message::with_body(Bytes::from(body))]) {
            panic!("a cluster with a majority refused message {i}: {e}");
        }
    }
    // Node 3 took a snapshot that references its store.
    wait_for(Duration::from_secs(60), "node 3 compacts", || {
        let groups = cluster.status(3)?;
        [1, 2]
            .iter()
            .all(|group| {
                groups
                    .iter()
                    .any(|g| g.group == *group && g.snapshot_index > 20)
            })
            .then_some(())
    });
    cluster.kill(3);
    let segments: Vec<PathBuf> = walk(&cluster.node_dir(3).join("data/queues"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "qseg"))
        .collect();
    assert!(!segments.is_empty(), "node 3 has segments");
    for segment in &segments {
        std::fs::remove_file(segment).expect("removes");
    }
    cluster.start(3);
    wait_for(
        Duration::from_secs(60),
        "node 3 repairs both broker groups",
        || (cluster.log(3).matches("caught up").count() >= 2).then_some(()),
    );
    assert!(
        cluster
            .log(3)
            .contains("repairing the queue store from peers")
    );
    // Its store holds what it applied: wait until it applied what node 1 committed.
    let commits: Vec<(u64, u64)> = wait_for(Duration::from_secs(30), "node 1 answers", || {
        cluster.status(1)
    })
    .iter()
    .map(|g| (g.group, g.commit_index))
    .collect();
    wait_for(Duration::from_secs(60), "node 3 follows", || {
        let mine = cluster.status(3)?;
        commits
            .iter()
            .all(|(group, commit)| {
                mine.iter()
                    .any(|g| g.group == *group && g.applied_index >= *commit)
            })
            .then_some(())
    });
    for id in 1..=3 {
        cluster.kill(id);
    }
    let count = (MESSAGES / 2) as u64;
    let theirs = stored(&cluster.node_dir(1), count);
    let mine = stored(&cluster.node_dir(3), count);
    assert_eq!(theirs.iter().filter(|m| m.is_some()).count(), MESSAGES / 2);
    for (i, (a, b)) in theirs.iter().zip(&mine).enumerate() {
        assert!(
            a == b,
            "message {i} (queue-major) differs on node 3: node 1 {:?}, node 3 {:?}",
            a.as_ref().map(|m| (m.seq, m.message.body.len())),
            b.as_ref().map(|m| (m.seq, m.message.body.len()))
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
