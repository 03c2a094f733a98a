//! `holdfast cluster`: a local cluster of real server processes on loopback, one command.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Writes each node's config under `dir`, starts the nodes, and stops them when `stop` is set.
pub fn run(
    nodes: u16,
    dir: &Path,
    base_port: u16,
    broker_groups: u64,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    if nodes == 0 || nodes > 9 {
        return Err(format!("--nodes {nodes}: a local cluster has 1 to 9 nodes"));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let addrs: Vec<String> = (0..nodes)
        .map(|i| format!("127.0.0.1:{}", base_port + i))
        .collect();
    let mut children: Vec<(u16, Child, PathBuf)> = Vec::new();
    for id in 1..=nodes {
        let node_dir = dir.join(format!("node-{id}"));
        fs::create_dir_all(&node_dir)
            .map_err(|e| format!("cannot create {}: {e}", node_dir.display()))?;
        let config = node_dir.join("node.toml");
        fs::write(
            &config,
            config_text(id, &addrs, &node_dir.join("data"), broker_groups),
        )
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log_path = node_dir.join("server.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let child = Command::new(&exe)
            .arg("server")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start node {id}: {e}"))?;
        children.push((id, child, log_path));
    }
    let servers = addrs.join(",");
    crate::out!("holdfast cluster: {nodes} nodes, data in {}", dir.display());
    for (i, addr) in addrs.iter().enumerate() {
        crate::out!(
            "  node {} listening on {addr}  (log: {})",
            i + 1,
            children[i].2.display()
        );
    }
    crate::out!();
    crate::out!("In another terminal (add --servers {servers} if you changed the ports):");
    crate::out!("  holdfast topic create orders --queues 4");
    crate::out!("  holdfast produce orders hello world");
    crate::out!("  holdfast consume orders --group billing --count 2");
    crate::out!("  holdfast status");
    crate::out!("(with cargo: cargo run --release -p holdfast-shell -- <command>)");
    crate::out!("Ctrl-C stops the cluster; started again, it finds its data.");

    while !stop.load(Ordering::Relaxed) {
        for (id, child, log) in &mut children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "node {id} stopped ({status}); see {}",
                    log.display()
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    crate::out!("stopping the cluster");
    for (_, child, _) in &children {
        // SIGTERM: each node finishes its queued writes and syncs before it exits.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (id, child, _) in &mut children {
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() >= deadline => {
                    eprintln!("node {id} did not stop in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(())
}

fn config_text(id: u16, addrs: &[String], data_dir: &Path, broker_groups: u64) -> String {
    let mut text = format!(
        "id = {id}\ndata_dir = {:?}\nbroker_groups = {broker_groups}\n\n[nodes]\n",
        data_dir.display().to_string()
    );
    for (i, addr) in addrs.iter().enumerate() {
        let _ = writeln!(text, "{} = {addr:?}", i + 1);
    }
    text
}
