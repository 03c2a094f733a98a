//! What the end-to-end tests share: a node's config on disk, and polling until something holds.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Writes `node_dir/node.toml` for node `id` of the nodes at `addrs` (node `i + 1` at
/// `addrs[i]`), with data in `node_dir/data`, two broker groups and `extra_config` lines;
/// returns its path.
pub fn write_node_config(
    node_dir: &Path,
    id: usize,
    addrs: &[SocketAddr],
    extra_config: &str,
) -> PathBuf {
    std::fs::create_dir_all(node_dir).expect("node dir");
    let mut config = format!(
        "id = {id}\ndata_dir = {:?}\nbroker_groups = 2\n{extra_config}\n[nodes]\n",
        node_dir.join("data").display().to_string()
    );
    for (i, addr) in addrs.iter().enumerate() {
        config.push_str(&format!("{} = \"{addr}\"\n", i + 1));
    }
    let path = node_dir.join("node.toml");
    std::fs::write(&path, config).expect("config");
    path
}

/// `node_dir/server.log`, appended to, so a restarted node's lines follow its earlier ones.
pub fn server_log(node_dir: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_dir.join("server.log"))
        .expect("log")
}

/// Polls `probe` every 100 ms until it yields, or panics naming `what` after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "waited {limit:?} in vain: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
