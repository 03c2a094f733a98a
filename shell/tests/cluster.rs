//! End to end: real `holdfast server` processes on loopback, killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_core::broker::Message;
use holdfast_core::node::protocol::{GroupStatus, Request, Response};
use holdfast_core::wire::{Frame, PROTOCOL_VERSION, encode_frame};
use holdfast_shell::client::{Admin, ClientConfig, ConsumeStatus, Consumer, Producer};

mod common;
use common::{Net, server_log, write_node_config};

/// Three nodes on free loopback ports, each with its own data directory under `dir`.
struct Cluster {
    dir: PathBuf,
    net: Net,
    children: Vec<Option<Child>>,
    /// Config lines every node gets besides the defaults.
    extra_config: String,
}

impl Cluster {
    fn start(dir: &Path, nodes: usize) -> Cluster {
        Cluster::start_with(dir, nodes, "")
    }

    fn start_with(dir: &Path, nodes: usize, extra_config: &str) -> Cluster {
        Cluster::start_on(dir, Net::secure(dir, nodes), extra_config)
    }

    /// Without TLS and credentials (`no_auth`), to reach the framing with raw bytes.
    fn start_no_auth(dir: &Path, nodes: usize) -> Cluster {
        Cluster::start_on(dir, Net::no_auth(nodes), "")
    }

    fn start_on(dir: &Path, net: Net, extra_config: &str) -> Cluster {
        let nodes = net.clients.len();
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            net,
            children: (0..nodes).map(|_| None).collect(),
            extra_config: extra_config.to_string(),
        };
        for id in 1..=nodes {
            cluster.start_node(id);
        }
        cluster
    }

    fn start_node(&mut self, id: usize) {
        let node_dir = self.dir.join(format!("node-{id}"));
        let path = write_node_config(&node_dir, id, &self.net, &self.extra_config);
        let log = server_log(&node_dir);
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["server", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("server starts");
        self.children[id - 1] = Some(child);
    }

    /// SIGKILL: no chance to sync or say goodbye.
    fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.children[id - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn kill_all(&mut self) {
        for id in 1..=self.children.len() {
            self.kill(id);
        }
    }

    /// The admin's client settings.
    fn servers(&self) -> ClientConfig {
        self.net.admin()
    }

    /// What `node` reports of `group`.
    fn group_status(&self, node: usize, group: u64) -> Option<GroupStatus> {
        let mut admin = Admin::connect(self.servers()).ok()?;
        match admin.ask(node as u64, Request::Status) {
            Some(Response::Status { groups, .. }) => groups.into_iter().find(|g| g.group == group),
            _ => None,
        }
    }

    /// The node that leads broker group `group`, as the nodes report it.
    fn leader_of(&self, group: u64) -> Option<usize> {
        let mut admin = Admin::connect(self.servers()).ok()?;
        for node in 1..=self.net.clients.len() as u64 {
            if let Some(Response::Status { groups, .. }) = admin.ask(node, Request::Status)
                && let Some(g) = groups.iter().find(|g| g.group == group)
                && g.role == "Leader"
            {
                return Some(node as usize);
            }
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn create_topic(cluster: &Cluster, topic: &str) {
    let mut admin = Admin::connect(cluster.servers()).expect("admin");
    let request = Request::CreateTopic {
        topic: topic.into(),
        queues: 4,
    };
    let answer = admin.ask_leader(request, Duration::from_secs(20));
    assert!(
        matches!(answer, Ok(Response::TopicCreated { .. })),
        "{answer:?}"
    );
}

/// What one consumer group saw.
#[derive(Default)]
struct Consumed {
    /// Bodies answered `Success`, with how many times each was.
    succeeded: BTreeMap<String, u32>,
    reconsumed: usize,
}

/// Consumes until every message of `expected` was seen (or a minute passes), handing the
/// listener `batch_max` messages at a time. A batch holding a first delivery of a body ending
/// in 7 is answered `ReconsumeLater` whole, so all of it must come back.
fn consume_all(
    cluster: &Cluster,
    group: &str,
    expected: &BTreeSet<String>,
    batch_max: usize,
) -> Consumed {
    let mut consumer = Consumer::connect(cluster.servers(), group, "orders").expect("consumer");
    let mut consumed = Consumed::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = |c: &Consumed| expected.iter().all(|m| c.succeeded.contains_key(m));
    while !done(&consumed) && Instant::now() < deadline {
        consumer.run_batches(Some(10_000), Duration::from_secs(2), batch_max, |batch| {
            let body = |d: &holdfast_core::client::Delivery| {
                String::from_utf8_lossy(&d.message.message.body).to_string()
            };
            let nack = batch
                .iter()
                .any(|d| d.message.reconsume_times == 0 && body(d).ends_with('7'));
            if nack {
                consumed.reconsumed += batch.len();
                return ConsumeStatus::ReconsumeLater;
            }
            for d in batch {
                *consumed.succeeded.entry(body(d)).or_default() += 1;
            }
            ConsumeStatus::Success
        });
    }
    consumer.close();
    consumed
}

/// Nothing acked is missing, nothing was consumed that was never sent, and a message was
/// consumed twice only if its send was ambiguous or failed (so a retry may have written it
/// twice): a single consumer of a stable cluster has no other excuse.
fn check(consumed: &Consumed, sent: &Sent, when: &str) {
    let missing: Vec<_> = sent
        .acked
        .keys()
        .filter(|m| !consumed.succeeded.contains_key(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "{when}: {} acked messages never consumed, the first {:?}",
        missing.len(),
        missing.first()
    );
    let unexpected: Vec<_> = consumed
        .succeeded
        .keys()
        .filter(|m| !sent.acked.contains_key(*m) && !sent.failed.contains(*m))
        .collect();
    assert!(unexpected.is_empty(), "{when}: never sent: {unexpected:?}");
    let unexplained: Vec<_> = consumed
        .succeeded
        .iter()
        .filter(|(m, n)| **n > 1 && sent.acked.get(*m) == Some(&false))
        .collect();
    assert!(
        unexplained.is_empty(),
        "{when}: consumed twice though sent once: {unexplained:?}"
    );
    assert!(consumed.reconsumed > 0, "{when}: nothing was reconsumed");
}

#[derive(Default)]
struct Sent {
    /// Acked bodies, with whether the send was ambiguous.
    acked: BTreeMap<String, bool>,
    /// Sends given up: they may or may not have been written.
    failed: BTreeSet<String>,
}

#[test]
fn acked_messages_survive_a_leader_killed_mid_stream_and_a_whole_cluster_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic(&cluster, "orders");

    let total = 100_000;
    let mut producer = Producer::connect(cluster.servers()).expect("producer");
    let mut sent = Sent::default();
    let mut killed = None;
    let mut issued = 0;
    let mut in_flight = BTreeMap::new();
    let started = Instant::now();
    while (issued < total || producer.in_flight() > 0)
        && started.elapsed() < Duration::from_secs(300)
    {
        while issued < total && producer.in_flight() < 256 {
            let body = format!("m{issued:06}");
            let id = producer
                .send_async(
                    "orders",
                    vec![Message::with_body(Bytes::from(body.clone()))],
                )
                .expect("a small message");
            in_flight.insert(id, body);
            issued += 1;
        }
        for (id, result) in producer.poll(Duration::from_millis(20)) {
            let body = in_flight.remove(&id).expect("a send we made");
            match result {
                Ok(receipt) => {
                    sent.acked.insert(body, receipt.ambiguous);
                }
                Err(_) => {
                    sent.failed.insert(body);
                }
            }
        }
        // A third of the way in, SIGKILL the leader of broker group 1; two thirds in, bring
        // it back, so it recovers and catches up while the stream goes on.
        if killed.is_none() && issued >= total / 3 {
            let leader = cluster.leader_of(1).expect("group 1 has a leader");
            cluster.kill(leader);
            killed = Some(leader);
        }
        if let Some(node) = killed
            && issued >= total * 2 / 3
            && cluster.children[node - 1].is_none()
        {
            cluster.start_node(node);
        }
    }
    assert!(killed.is_some(), "the leader was never killed");
    assert_eq!(
        sent.acked.len() + sent.failed.len(),
        total,
        "every send ends, acked or failed"
    );
    assert!(
        sent.acked.len() > total * 9 / 10,
        "only {} of {total} acked",
        sent.acked.len()
    );
    eprintln!(
        "{} acked ({} ambiguous), {} failed, in {:?}",
        sent.acked.len(),
        sent.acked.values().filter(|a| **a).count(),
        sent.failed.len(),
        started.elapsed()
    );

    let consumed = consume_all(
        &cluster,
        "billing",
        &sent.acked.keys().cloned().collect(),
        1,
    );
    check(&consumed, &sent, "after the leader was killed");

    // Everything down at once, then up again: the data is all there.
    cluster.kill_all();
    for id in 1..=3 {
        cluster.start_node(id);
    }
    let consumed = consume_all(&cluster, "audit", &sent.acked.keys().cloned().collect(), 16);
    check(&consumed, &sent, "after the whole cluster was killed");
}

#[test]
fn garbage_on_one_connection_closes_only_that_connection() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start_no_auth(dir.path(), 3);
    create_topic(&cluster, "orders");
    let hello = {
        let mut out = Vec::new();
        let frame = Frame::Hello {
            version: PROTOCOL_VERSION,
            node: None,
            token: None,
        };
        encode_frame(&frame, &mut out).expect("encodes");
        out
    };
    let unknown_variant = {
        let payload = [200u8, 1, 2, 3];
        let mut out = hello.clone();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    };
    let wrong_version = {
        let mut out = Vec::new();
        let frame = Frame::Hello {
            version: PROTOCOL_VERSION + 1,
            node: None,
            token: None,
        };
        encode_frame(&frame, &mut out).expect("encodes");
        out
    };
    let truncated = {
        let mut out = hello.clone();
        out.extend_from_slice(&[100, 0, 0, 0, 1, 2, 3, 4, 5]); // 100 bytes announced, 1 sent
        out
    };
    let garbage: [(&str, &[u8]); 6] = [
        ("http", b"GET / HTTP/1.1\r\n\r\n"),
        ("oversized", &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]),
        ("bad checksum", &[5, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9]),
        ("unknown variant", &unknown_variant),
        ("wrong version", &wrong_version),
        ("truncated", &truncated),
    ];
    for (what, bytes) in garbage {
        let mut stream = TcpStream::connect(cluster.net.clients[0]).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream.write_all(bytes).expect("write");
        // A truncated frame ends with the connection: the server must not wait for the rest.
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut buf = Vec::new();
        let read = stream.read_to_end(&mut buf);
        // The server answers our garbage by closing: the read ends (after its Hello).
        assert!(read.is_ok(), "{what}: the server did not close: {read:?}");
    }
    let log = std::fs::read_to_string(dir.path().join("node-1/server.log")).expect("log");
    for reason in [
        "frame of",
        "checksum mismatch",
        "malformed frame",
        "protocol version mismatch",
        "inside a frame",
    ] {
        assert!(log.contains(reason), "no {reason:?} in the log:\n{log}");
    }
    // The node still serves everyone else.
    let mut producer = Producer::connect(cluster.servers()).expect("producer");
    let receipt = producer.send(
        "orders",
        vec![Message::with_body(Bytes::from("still here"))],
    );
    assert!(receipt.is_ok(), "{receipt:?}");
}

/// A bit flipped inside one node's synced log: that node cuts its log back, stays out of
/// elections until a leader of a newer term has repaired it from its peers, and nothing acked
/// is lost.
#[test]
fn a_bit_flip_on_one_node_is_repaired_from_its_peers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic(&cluster, "orders");
    let mut producer = Producer::connect(cluster.servers()).expect("producer");
    let mut sent = Sent::default();
    for i in 0..300 {
        let body = format!("f{i:04}");
        let message = Message::with_body(Bytes::from(body.clone()));
        match producer.send("orders", vec![message]) {
            Ok(receipt) => sent.acked.insert(body, receipt.ambiguous),
            Err(e) => panic!("a healthy cluster refused {body}: {e}"),
        };
    }

    cluster.kill_all();
    let log = dir
        .path()
        .join("node-2/data/group-1/log-00000000000000000001.seg");
    let mut bytes = std::fs::read(&log).expect("node 2 holds group 1");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&log, &bytes).expect("flip a bit");
    for id in 1..=3 {
        cluster.start_node(id);
    }

    let server_log = dir.path().join("node-2/server.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let logged =
        |what: &str| std::fs::read_to_string(&server_log).is_ok_and(|text| text.contains(what));
    while !logged("repaired from peers") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(logged("damage inside the log"), "node 2 saw the damage");
    assert!(logged("repaired from peers"), "node 2 was repaired");
    assert!(
        !dir.path().join("node-2/data/group-1/damaged").exists(),
        "the damage marker is gone once repaired"
    );

    let consumed = consume_all(
        &cluster,
        "after-flip",
        &sent.acked.keys().cloned().collect(),
        8,
    );
    let missing: Vec<_> = sent
        .acked
        .keys()
        .filter(|m| !consumed.succeeded.contains_key(*m))
        .collect();
    assert!(missing.is_empty(), "lost after the flip: {missing:?}");
}

/// The snapshot files in a node's group directory.
fn snapshot_files(cluster: &Cluster, node: usize, group: u64) -> Vec<String> {
    let dir = cluster.dir.join(format!("node-{node}/data/group-{group}"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("snapshot-") && n.ends_with(".snap"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_node_that_missed_compacted_entries_is_brought_up_by_a_snapshot_and_all_recover_from_theirs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start_with(dir.path(), 3, "snapshot_entries = 20");
    create_topic(&cluster, "orders");
    let mut producer = Producer::connect(cluster.servers()).expect("producer");
    let mut sent = Sent::default();
    let send = |producer: &mut Producer, sent: &mut Sent, n: usize| {
        let body = format!("s{n:05}");
        let message = vec![Message::with_body(Bytes::from(body.clone()))];
        match producer.send("orders", message) {
            Ok(receipt) => {
                sent.acked.insert(body, receipt.ambiguous);
            }
            Err(_) => {
                sent.failed.insert(body);
            }
        }
    };
    send(&mut producer, &mut sent, 0);
    let leader = cluster.leader_of(1).expect("group 1 has a leader");
    let absent = (1..=3).find(|n| *n != leader).unwrap_or(3);
    cluster.kill(absent);
    // One message per send, so one entry each: many compactions of a small state.
    for n in 1..1_500 {
        send(&mut producer, &mut sent, n);
    }
    let compacted = cluster
        .group_status(leader, 1)
        .map_or(0, |g| g.snapshot_index);
    assert!(
        compacted > 20,
        "the leader compacted: snapshot at {compacted}"
    );
    assert!(!snapshot_files(&cluster, leader, 1).is_empty());

    cluster.start_node(absent);
    let deadline = Instant::now() + Duration::from_secs(30);
    let caught_up = loop {
        let ours = cluster.group_status(absent, 1);
        let theirs = cluster.group_status(leader, 1);
        if let (Some(ours), Some(theirs)) = (&ours, &theirs)
            && ours.applied_index >= theirs.commit_index
            && ours.snapshot_index >= compacted
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        caught_up,
        "node {absent} never caught up past the leader's snapshot"
    );
    assert!(!snapshot_files(&cluster, absent, 1).is_empty());

    // Everything down at once: each node recovers from its snapshot and the log after it.
    cluster.kill_all();
    for id in 1..=3 {
        cluster.start_node(id);
    }
    let consumed = consume_all(
        &cluster,
        "billing",
        &sent.acked.keys().cloned().collect(),
        4,
    );
    check(&consumed, &sent, "after restarting from snapshots");
}
