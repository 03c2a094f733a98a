//! End to end: a 3-node cluster under load grows to 5 (`holdfast node add`, the new nodes
//! started with `initial_cluster_state = "join"`), two original nodes are removed (`holdfast
//! node remove`) and stopped, then every remaining node is restarted one by one with SIGTERM.
//! Every acknowledged message is consumed afterwards, and the longest time without an
//! acknowledged send is reported. Real `holdfast server` processes on loopback, with TLS.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_core::broker::Message;
use holdfast_core::node::protocol::{GroupStatus, Request, Response};
use holdfast_shell::client::{Admin, ConsumeStatus, Consumer, Producer, ProducerSettings};

mod common;
use common::{ADMIN_TOKEN, Net, server_log, wait_for, write_node_config};

const HOLDFAST: &str = env!("CARGO_BIN_EXE_holdfast");
const GROUPS: [u64; 3] = [0, 1, 2];
const TOPIC: &str = "grow";

struct Cluster {
    dir: PathBuf,
    /// Every node's addresses and the CA with a certificate for each of the five.
    full: Net,
    children: Vec<Option<Child>>,
}

impl Cluster {
    /// What node `id`'s `[nodes]` lists: the three first nodes, or for a node that joins,
    /// those and itself (and the nodes before it).
    fn net_for(&self, id: usize) -> Net {
        let listed = id.max(3);
        Net {
            clients: self.full.clients[..listed].to_vec(),
            peers: self.full.peers[..listed].to_vec(),
            pki: self.full.pki.clone(),
        }
    }

    fn node_dir(&self, id: usize) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    fn start(&mut self, id: usize) {
        let node_dir = self.node_dir(id);
        let extra = if id > 3 {
            "initial_cluster_state = \"join\""
        } else {
            ""
        };
        let path = write_node_config(&node_dir, id, &self.net_for(id), extra);
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

    /// SIGTERM, and waits (bounded) for the node to hand over and exit.
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

    fn client_file(&self) -> PathBuf {
        let pki = self.full.pki.as_ref().expect("secure");
        pki.client_file(&self.full.clients[..3], ADMIN_TOKEN)
    }

    /// The admin's settings: only the three first nodes; the rest come from the node table.
    fn admin_config(&self) -> holdfast_shell::client::ClientConfig {
        self.net_for(3).admin()
    }

    fn status(&self, id: usize) -> Option<Vec<GroupStatus>> {
        let mut admin = Admin::connect(self.admin_config()).ok()?;
        match admin.ask(id as u64, Request::Status)? {
            Response::Status { groups, .. } => Some(groups),
            _ => None,
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(HOLDFAST)
            .args(args)
            .arg("--client-file")
            .arg(self.client_file())
            .output()
            .expect("the CLI runs");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "holdfast {args:?} failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
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

/// Every group of node `id` knows a leader among `among`, and `id` answers.
fn settled(cluster: &Cluster, id: usize, among: &[u64]) -> bool {
    cluster.status(id).is_some_and(|groups| {
        groups.len() == GROUPS.len()
            && groups
                .iter()
                .all(|g| g.leader.is_some_and(|l| among.contains(&l)))
    })
}

#[test]
fn a_cluster_under_load_grows_to_five_drops_two_originals_and_restarts_node_by_node() {
    let temp = tempfile::tempdir().expect("temp dir");
    // HOLDFAST_KEEP_TEST_DIR=1 keeps the nodes' logs and data for a look after a failure.
    let (_temp, dir) = if std::env::var_os("HOLDFAST_KEEP_TEST_DIR").is_some() {
        let dir = temp.keep();
        eprintln!("keeping {}", dir.display());
        (None, dir)
    } else {
        let dir = temp.path().to_path_buf();
        (Some(temp), dir)
    };
    let mut cluster = Cluster {
        full: Net::secure(&dir, 5),
        dir,
        children: (0..5).map(|_| None).collect(),
    };
    let started = Instant::now();
    for id in 1..=3 {
        cluster.start(id);
    }
    wait_for(
        Duration::from_secs(15),
        "the first three nodes elect leaders",
        || {
            (1..=3)
                .all(|id| settled(&cluster, id, &[1, 2, 3]))
                .then_some(())
        },
    );
    cluster.cli(&["topic", "create", TOPIC, "--queues", "4"]);

    // Load: one send at a time, each acknowledged or not; the longest gap between acks.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let producer = {
        let (stop, acked, config) = (stop.clone(), acked.clone(), cluster.admin_config());
        std::thread::spawn(move || {
            let settings = ProducerSettings::default().send_timeout(Duration::from_secs(5));
            let mut producer = Producer::with_settings(config, settings).expect("producer");
            let mut i = 0u64;
            let mut failed = 0u64;
            let mut first_failure = None;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("m{i:06}");
                i += 1;
                let message = Message::with_body(Bytes::from(body.clone()));
                match producer.send(TOPIC, vec![message]) {
                    Ok(_) => acked.lock().expect("acked").push((body, Instant::now())),
                    Err(e) => {
                        failed += 1;
                        first_failure.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (failed, first_failure)
        })
    };
    let acks = || acked.lock().expect("acked").len();
    wait_for(Duration::from_secs(10), "sends are acknowledged", || {
        (acks() >= 20).then_some(())
    });

    // Grow: 4 and 5 join, then the operator adds them.
    // What the cluster went through when, to say where the longest gap fell.
    let mut phases: Vec<(Instant, String)> = vec![(Instant::now(), "steady".into())];
    for id in [4, 5] {
        phases.push((Instant::now(), format!("adding node {id}")));
        cluster.start(id);
        let addr = cluster.full.clients[id - 1].to_string();
        let peer = cluster.full.peers[id - 1].to_string();
        let out = cluster.cli(&[
            "node",
            "add",
            &id.to_string(),
            &addr,
            "--peer-addr",
            &peer,
            "--timeout",
            "30",
        ]);
        assert!(
            out.contains(&format!("node {id} is a voter of every group")),
            "{out}"
        );
    }
    let status = cluster.status(3).expect("node 3 answers");
    for g in &status {
        assert_eq!(g.voters, vec![1, 2, 3, 4, 5], "group {}", g.group);
    }
    // Removing an original node: 5 voters to 4, then to 3, both within the factor of 3.
    let before = acks();
    for id in [1, 2] {
        phases.push((Instant::now(), format!("removing node {id}")));
        let out = cluster.cli(&["node", "remove", &id.to_string(), "--timeout", "30"]);
        assert!(
            out.contains(&format!("node {id} removed from the cluster")),
            "{out}"
        );
        cluster.terminate(id);
    }
    // A third removal would leave 2 voters: refused before anything changes.
    let refused = Command::new(HOLDFAST)
        .args(["node", "remove", "3", "--client-file"])
        .arg(cluster.client_file())
        .output()
        .expect("the CLI runs");
    assert_eq!(refused.status.code(), Some(4), "refused by the cluster");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("replication factor"), "{said}");
    let status = cluster.status(3).expect("node 3 answers");
    for g in &status {
        assert_eq!(g.voters, vec![3, 4, 5], "group {}", g.group);
        assert!(g.learners.is_empty(), "group {}", g.group);
    }
    wait_for(
        Duration::from_secs(10),
        "sends go on after the removals",
        || (acks() > before + 10).then_some(()),
    );

    // Rolling restart: SIGTERM each node, start it again, wait until it is back.
    for id in [3, 4, 5] {
        phases.push((Instant::now(), format!("restarting node {id}")));
        let before = acks();
        cluster.terminate(id);
        cluster.start(id);
        wait_for(
            Duration::from_secs(15),
            "the restarted node rejoins",
            || settled(&cluster, id, &[3, 4, 5]).then_some(()),
        );
        wait_for(
            Duration::from_secs(10),
            "sends go on after a restart",
            || (acks() > before + 5).then_some(()),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (failed, first_failure) = producer.join().expect("producer thread");
    if let Some(why) = first_failure {
        eprintln!("membership e2e: the first failed send: {why}");
    }
    let acked = std::mem::take(&mut *acked.lock().expect("acked"));
    let (longest, gap_end) = acked
        .windows(2)
        .map(|w| (w[1].1.duration_since(w[0].1), w[1].1))
        .max()
        .unwrap_or((Duration::ZERO, started));
    let gap_start = gap_end - longest;
    let during = phases
        .iter()
        .rev()
        .find(|(at, _)| *at <= gap_start)
        .map_or("steady", |(_, what)| what.as_str());
    eprintln!(
        "membership e2e: {} sends acknowledged, {failed} failed (timed out or refused); longest \
         time without an acknowledged send {} ms, beginning while {during}; {:.1} s in all",
        acked.len(),
        longest.as_millis(),
        started.elapsed().as_secs_f64()
    );

    // Every acknowledged message is there, read through the nodes the client learned.
    let expected: BTreeSet<String> = acked.into_iter().map(|(body, _)| body).collect();
    let mut consumer = Consumer::connect(cluster.admin_config(), "check", TOPIC).expect("consumer");
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !expected.is_subset(&seen) && Instant::now() < deadline {
        consumer.run(Some(100_000), Duration::from_secs(2), |d| {
            seen.insert(String::from_utf8_lossy(&d.message.message.body).to_string());
            ConsumeStatus::Success
        });
    }
    consumer.close();
    let missing: Vec<_> = expected.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages never consumed, the first {:?}",
        missing.len(),
        missing.first()
    );
    assert!(
        longest < Duration::from_secs(10),
        "no send acknowledged for {longest:?}"
    );
    for id in 3..=5 {
        cluster.terminate(id);
    }
    let log = |id: usize| {
        std::fs::read_to_string(cluster.node_dir(id).join("server.log")).unwrap_or_default()
    };
    assert!(
        log(3).contains("node removed from the cluster"),
        "node 3 forgot the removed nodes"
    );
    assert!(log(3).contains("node added to the cluster: linking to it"));
}
