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
    /// Node n serves metrics on `metrics_base_port + n - 1`; `None`: no metrics.
    pub metrics_base_port: Option<u16>,
}

/// The client file `holdfast cluster` writes into its directory.
pub const CLIENT_FILE: &str = "client.toml";

/// Writes each node's config under `dir`, starts the nodes, and stops them when `stop` is set.
pub fn run(args: &ClusterArgs, stop: Arc<AtomicBool>) -> Result<(), String> {
    let nodes = args.nodes;
    if nodes == 0 || nodes > 9 {
        return Err(format!("--nodes {nodes}: a local cluster has 1 to 9 nodes"));
    }
    if args.base_port == 0 || args.peer_base_port == 0 {
        return Err("--base-port and --peer-base-port must be 1 to 65535".into());
    }
    let ports = |base: u16| -> Result<Vec<SocketAddr>, String> {
        (0..nodes)
            .map(|i| {
                base.checked_add(i)
                    .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                    .ok_or_else(|| {
                        format!(
                            "node {}'s port would be {base} + {i}, past 65535: choose a lower \
                             base port",
                            i + 1
                        )
                    })
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
    let metrics = match args.metrics_base_port {
        Some(0) => return Err("--metrics-base-port must be 1 to 65535".into()),
        Some(base) => ports(base)?.into_iter().map(Some).collect(),
        None => vec![None; usize::from(nodes)],
    };
    if let Some(clash) = metrics
        .iter()
        .flatten()
        .find(|m| addrs.contains(m) || peers.contains(m))
    {
        return Err(format!(
            "metrics address {clash} is also a client or peer address: choose \
             --metrics-base-port apart from the others"
        ));
    }
    fs::create_dir_all(&args.dir)
        .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .map_err(|e| format!("cannot find {}: {e}", args.dir.display()))?;
    let dir = dir.as_path();
    // A second `holdfast cluster` on this directory would rewrite the keys and the client file
    // under the first one's nodes.
    let _lock = crate::server::lock::DataDirLock::acquire(dir)?;
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
    let mut children: Vec<Supervised> = Vec::new();
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
            metrics[usize::from(id - 1)],
        );
        fs::write(&config, text).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let mut node = Supervised {
            id,
            exe: exe.clone(),
            config,
            log: node_dir.join("server.log"),
            child: None,
            started: Instant::now(),
            backoff: BACKOFF_MIN,
            restart_at: None,
        };
        if let Err(e) = node.spawn() {
            stop_all(&mut children);
            return Err(e);
        }
        children.push(node);
    }
    // The banner says "in another terminal ...": by then the client ports must accept, or the
    // first command would be told the cluster is unreachable.
    let ready_by = Instant::now() + READY_WAIT;
    for (node, addr) in children.iter_mut().zip(&addrs) {
        while std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_err() {
            if stop.load(Ordering::Relaxed) || Instant::now() >= ready_by {
                break;
            }
            node.supervise();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    crate::out!("holdfast cluster: {nodes} nodes, data in {}", dir.display());
    for (i, addr) in addrs.iter().enumerate() {
        let metrics = match metrics[i] {
            Some(m) => format!(", metrics on http://{m}/metrics"),
            None => String::new(),
        };
        crate::out!(
            "  node {} clients on {addr}, peers on {}{metrics}  (pid {}, log: {})",
            i + 1,
            peers[i],
            children[i].child.as_ref().map_or(0, Child::id),
            children[i].log.display()
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
    crate::out!("A node that dies is restarted, with back-off; its log says why it died.");
    crate::out!("Ctrl-C stops the cluster; started again, it finds its data.");

    while !stop.load(Ordering::Relaxed) {
        for node in &mut children {
            node.supervise();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::out!("stopping the cluster");
    stop_all(&mut children);
    Ok(())
}

/// The first wait before restarting a node that died; it doubles on each death up to
/// [`BACKOFF_MAX`], and is back to this once the node has stayed up [`BACKOFF_RESET`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// How long the banner waits for every node's client port to accept.
const READY_WAIT: Duration = Duration::from_secs(15);
/// How long a node has to finish its writes after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// One node's process, restarted when it dies.
struct Supervised {
    id: u16,
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// `None` while waiting to restart it.
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

impl Supervised {
    fn spawn(&mut self) -> Result<(), String> {
        let id = self.id;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let mut command = Command::new(&self.exe);
        command
            .arg("server")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start node {id}: {e}"))?;
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    /// Notices a death and schedules the restart, or restarts when it is due.
    fn supervise(&mut self) {
        let id = self.id;
        match &mut self.child {
            Some(child) => {
                let Ok(Some(status)) = child.try_wait() else {
                    return;
                };
                if self.started.elapsed() >= BACKOFF_RESET {
                    self.backoff = BACKOFF_MIN;
                }
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.child = None;
                self.restart_at = Some(Instant::now() + wait);
                crate::out!(
                    "node {id} exited ({status}); restarting in {} (log: {})",
                    seconds(wait),
                    self.log.display()
                );
            }
            None => {
                if self.restart_at.is_some_and(|at| Instant::now() >= at) {
                    match self.spawn() {
                        Ok(()) => crate::out!(
                            "node {id} restarted (pid {})",
                            self.child.as_ref().map_or(0, Child::id)
                        ),
                        Err(e) => {
                            let wait = self.backoff;
                            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                            self.restart_at = Some(Instant::now() + wait);
                            crate::out!("{e}; trying again in {}", seconds(wait));
                        }
                    }
                }
            }
        }
    }
}

fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// SIGTERM to every node (each finishes its queued writes and syncs before it exits), then
/// SIGKILL to those still running after [`STOP_GRACE`].
fn stop_all(children: &mut [Supervised]) {
    for node in children.iter() {
        if let Some(child) = &node.child
            && let Ok(pid) = libc::pid_t::try_from(child.id())
        {
            // SAFETY: a signal to our own child, not yet reaped, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for node in children.iter_mut() {
        let Some(child) = &mut node.child else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() >= deadline => {
                    eprintln!("node {} did not stop in time; killing it", node.id);
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        node.child = None;
    }
}

/// The node gets SIGTERM when the cluster process dies, however it dies (even SIGKILL), so a
/// killed cluster leaves no nodes holding its ports and directories.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: getpid before the fork; prctl and getppid are async-signal-safe and touch no
    // memory of the parent's.
    let parent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between the fork and the prctl.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the cluster process is gone"));
            }
            Ok(())
        });
    }
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
    metrics: Option<SocketAddr>,
) -> String {
    let mut text = format!(
        "id = {id}\ndata_dir = {:?}\nbroker_groups = {broker_groups}\n",
        data_dir.display().to_string()
    );
    if let Some(addr) = metrics {
        let _ = writeln!(text, "metrics_addr = \"{addr}\"");
    }
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
