//! `holdfast cluster`: a local cluster of real server processes on loopback, one command.
//!
//! It creates what a secure cluster needs under its directory, once, and reuses it when
//! started again: a cluster CA and a certificate per node (`tls/`), an admin principal
//! (`auth.toml`, the token's hash only) and a client file (`client.toml`: the servers, the CA
//! and the admin token) that client commands find by themselves or through `HOLDFAST_CLIENT`.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What `holdfast cluster` is asked for.
#[derive(Clone, Debug)]
pub struct ClusterArgs {
    pub nodes: u16,
    pub dir: PathBuf,
    /// Node n serves clients on `base_port + n - 1`.
    pub base_port: u16,
    /// Node n listens for peers on `peer_base_port + n - 1`.
    pub peer_base_port: u16,
    pub broker_groups: u64,
    /// Plaintext and no credentials (experiments only).
    pub no_auth: bool,
}

/// The client file `holdfast cluster` writes into its directory.
pub const CLIENT_FILE: &str = "client.toml";

/// Writes each node's config under `dir`, starts the nodes, and stops them when `stop` is set.
pub fn run(args: &ClusterArgs, stop: Arc<AtomicBool>) -> Result<(), String> {
    let nodes = args.nodes;
    if nodes == 0 || nodes > 9 {
        return Err(format!("--nodes {nodes}: a local cluster has 1 to 9 nodes"));
    }
    let ports = |base: u16| -> Result<Vec<SocketAddr>, String> {
        (0..nodes)
            .map(|i| {
                base.checked_add(i)
                    .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                    .ok_or_else(|| format!("port {base} + {i} is past 65535"))
            })
            .collect()
    };
    let addrs = ports(args.base_port)?;
    let peers = ports(args.peer_base_port)?;
    if let Some(clash) = peers.iter().find(|p| addrs.contains(p)) {
        return Err(format!(
            "peer address {clash} is also a client address: choose --peer-base-port apart from --base-port"
        ));
    }
    fs::create_dir_all(&args.dir)
        .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .map_err(|e| format!("cannot find {}: {e}", args.dir.display()))?;
    let dir = dir.as_path();
    let security = if args.no_auth {
        None
    } else {
        Some(secure(dir, nodes)?)
    };
    let client_file = dir.join(CLIENT_FILE);
    let token = security.as_ref().map(|s| s.token.as_str());
    let ca = security.as_ref().map(|_| "tls/ca.pem");
    // It holds the admin token: the owner's only, like the keys.
    write_file(
        &client_file,
        &crate::client::client_file_text(&addrs, ca, token),
        false,
    )?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let mut children: Vec<(u16, Child, PathBuf)> = Vec::new();
    for id in 1..=nodes {
        let node_dir = dir.join(format!("node-{id}"));
        fs::create_dir_all(&node_dir)
            .map_err(|e| format!("cannot create {}: {e}", node_dir.display()))?;
        let config = node_dir.join("node.toml");
        let text = config_text(
            id,
            &addrs,
            &peers,
            &node_dir.join("data"),
            args.broker_groups,
            security.is_some().then_some(dir),
        );
        fs::write(&config, text).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
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
    crate::out!("holdfast cluster: {nodes} nodes, data in {}", dir.display());
    for (i, addr) in addrs.iter().enumerate() {
        crate::out!(
            "  node {} clients on {addr}, peers on {}  (log: {})",
            i + 1,
            peers[i],
            children[i].2.display()
        );
    }
    match &security {
        Some(_) => crate::out!(
            "security: mutual TLS between nodes (CA in {}), TLS and an admin token for clients",
            dir.join("tls").display()
        ),
        None => crate::out!("security: OFF (--no-auth): plaintext, no credentials"),
    }
    crate::out!();
    crate::out!(
        "In another terminal (from this directory the client commands find {} by themselves; \
         elsewhere, or with another --dir, first):",
        crate::client::DEFAULT_CLIENT_FILE
    );
    crate::out!(
        "  export {}={}",
        crate::client::CLIENT_FILE_ENV,
        client_file.display()
    );
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

/// The credentials of a secure local cluster.
struct Secure {
    token: String,
}

/// Creates (or finds, from an earlier run) the CA, each node's certificate, the admin
/// principal and its token.
fn secure(dir: &Path, nodes: u16) -> Result<Secure, String> {
    let tls = dir.join("tls");
    fs::create_dir_all(&tls).map_err(|e| format!("cannot create {}: {e}", tls.display()))?;
    let (ca_cert, ca_key) = (tls.join("ca.pem"), tls.join("ca.key"));
    let fresh_ca = !(ca_cert.exists() && ca_key.exists());
    if fresh_ca {
        let (cert, key) = crate::tls::generate_ca()?;
        write_file(&ca_key, &key, false)?;
        write_file(&ca_cert, &cert, true)?;
    }
    let ca_key_pem = fs::read_to_string(&ca_key)
        .map_err(|e| format!("cannot read {}: {e}", ca_key.display()))?;
    for id in 1..=nodes {
        let (cert, key) = node_files(dir, id);
        if fresh_ca || !(cert.exists() && key.exists()) {
            let (cert_pem, key_pem) = crate::tls::issue_node_certificate(&ca_key_pem, id.into())?;
            write_file(&key, &key_pem, false)?;
            write_file(&cert, &cert_pem, true)?;
        }
    }
    // The admin token: the one of the client file an earlier run wrote, if auth.toml still
    // accepts it; else a new one.
    let auth = dir.join("auth.toml");
    let earlier = crate::client::ClientConfig::from_file(&dir.join(CLIENT_FILE))
        .ok()
        .and_then(|c| c.token);
    let accepted = |token: &String| {
        crate::auth::Principals::from_file(&auth)
            .ok()
            .is_some_and(|p| p.authenticate(token).is_some())
    };
    let token = match earlier.filter(accepted) {
        Some(token) => token,
        None => {
            let token = crate::auth::new_token()?;
            write_file(&auth, &crate::auth::admin_file("admin", &token), false)?;
            token
        }
    };
    Ok(Secure { token })
}

fn node_files(dir: &Path, id: u16) -> (PathBuf, PathBuf) {
    let tls = dir.join("tls");
    (
        tls.join(format!("node-{id}.pem")),
        tls.join(format!("node-{id}.key")),
    )
}

/// Writes `text` to `path` through a temporary file; `public: false` makes it readable by the
/// owner only (keys, tokens).
fn write_file(path: &Path, text: &str, public: bool) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if public { 0o644 } else { 0o600 })
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn config_text(
    id: u16,
    addrs: &[SocketAddr],
    peers: &[SocketAddr],
    data_dir: &Path,
    broker_groups: u64,
    secure_dir: Option<&Path>,
) -> String {
    let mut text = format!(
        "id = {id}\ndata_dir = {:?}\nbroker_groups = {broker_groups}\n",
        data_dir.display().to_string()
    );
    if secure_dir.is_none() {
        text.push_str("no_auth = true\n");
    }
    text.push_str("\n[nodes]\n");
    for (i, addr) in addrs.iter().enumerate() {
        let _ = writeln!(text, "{} = \"{addr}\"", i + 1);
    }
    text.push_str("\n[peers]\n");
    for (i, addr) in peers.iter().enumerate() {
        let _ = writeln!(text, "{} = \"{addr}\"", i + 1);
    }
    if let Some(dir) = secure_dir {
        let (cert, key) = node_files(dir, id);
        let path = |p: &Path| format!("{:?}", p.display().to_string());
        let _ = write!(
            text,
            "\n[security]\nca_cert = {}\ncert = {}\nkey = {}\nprincipals = {}\n",
            path(&dir.join("tls").join("ca.pem")),
            path(&cert),
            path(&key),
            path(&dir.join("auth.toml")),
        );
    }
    text
}
