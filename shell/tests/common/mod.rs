//! What the end-to-end tests share: the cluster's addresses and credentials, a node's config on
//! disk, and polling until something holds.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use holdfast_shell::auth::{admin_file, token_sha256_hex};
use holdfast_shell::client::ClientConfig;
use holdfast_shell::tls::{generate_ca, issue_node_certificate};

/// The admin token every test cluster accepts.
pub const ADMIN_TOKEN: &str = "hf_test-admin-token";

/// A cluster's credentials under `dir/pki`: a CA, a certificate per node, and `auth.toml`
/// with the admin principal and whatever other principals a test adds.
#[derive(Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub ca_key_pem: String,
}

impl Pki {
    pub fn create(dir: &Path, nodes: usize) -> Pki {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).expect("pki dir");
        let (ca_pem, ca_key_pem) = generate_ca().expect("a CA");
        std::fs::write(dir.join("ca.pem"), &ca_pem).expect("ca");
        for id in 1..=nodes {
            let (cert, key) = issue_node_certificate(&ca_key_pem, id as u64).expect("a cert");
            std::fs::write(dir.join(format!("node-{id}.pem")), cert).expect("cert");
            std::fs::write(dir.join(format!("node-{id}.key")), key).expect("key");
        }
        std::fs::write(dir.join("auth.toml"), admin_file("admin", ADMIN_TOKEN)).expect("auth");
        Pki {
            dir,
            ca_pem,
            ca_key_pem,
        }
    }

    /// Adds a principal to `auth.toml` (`acl`: its TOML lines); nodes read it at start.
    pub fn add_principal(&self, name: &str, token: &str, acl: &str) {
        let path = self.dir.join("auth.toml");
        let mut text = std::fs::read_to_string(&path).expect("auth");
        text.push_str(&format!(
            "\n[principals.{name}]\ntoken_sha256 = \"{}\"\n{acl}\n",
            token_sha256_hex(token)
        ));
        std::fs::write(&path, text).expect("auth");
    }

    /// node.toml's `[security]` section for node `id`.
    pub fn security_section(&self, id: usize) -> String {
        let path = |name: &str| format!("{:?}", self.dir.join(name).display().to_string());
        format!(
            "\n[security]\nca_cert = {}\ncert = {}\nkey = {}\nprincipals = {}\n",
            path("ca.pem"),
            path(&format!("node-{id}.pem")),
            path(&format!("node-{id}.key")),
            path("auth.toml"),
        )
    }

    pub fn client(&self, servers: &[SocketAddr], token: &str) -> ClientConfig {
        ClientConfig::secure(servers.to_vec(), &self.ca_pem, token).expect("client config")
    }

    /// A client file for `token` (as `holdfast cluster` writes one), for the CLI.
    pub fn client_file(&self, servers: &[SocketAddr], token: &str) -> PathBuf {
        let path = self
            .dir
            .join(format!("client-{}.toml", token_sha256_hex(token)));
        let text = holdfast_shell::client::client_file_text(servers, Some("ca.pem"), Some(token));
        std::fs::write(&path, text).expect("client file");
        path
    }
}

/// Test servers listen on ports from here, below Linux's ephemeral range (32768-60999 by
/// default). Every outgoing connection (a client, a node dialling its peers) takes its local
/// port from that range, so a port picked there and released could be taken before the server
/// bound it, or while a killed node was down before its restart; and two tests picking ports
/// at once could be handed the same one. Seen in CI: a node's metrics port answered by a
/// server of another test.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// The next port of [`TEST_PORTS`] this process has not handed out; `None` before the first.
static NEXT_TEST_PORT: Mutex<Option<u16>> = Mutex::new(None);

/// A first port such that `first + o` is free for each of `offsets`, from a run of ports no
/// other test of this process has been given (test binaries run one at a time; the start
/// depends on the process id, so processes run side by side, as nextest does, start apart).
pub fn free_port_run(offsets: &[u16]) -> u16 {
    let span = offsets.iter().max().map_or(1, |m| m + 1);
    let len = TEST_PORTS.end - TEST_PORTS.start;
    assert!(
        span < len,
        "a run of {span} ports does not fit in {TEST_PORTS:?}"
    );
    for _ in 0..1_000 {
        let first = {
            let mut next = NEXT_TEST_PORT.lock().unwrap_or_else(|e| e.into_inner());
            let start = next.unwrap_or_else(|| {
                let offset = (std::process::id() % u32::from(len / 64)) * 64;
                TEST_PORTS.start + u16::try_from(offset).expect("within the range")
            });
            let first = if start + span > TEST_PORTS.end {
                TEST_PORTS.start
            } else {
                start
            };
            *next = Some(first + span);
            first
        };
        let all_free = offsets
            .iter()
            .all(|o| TcpListener::bind(("127.0.0.1", first + o)).is_ok());
        if all_free {
            return first;
        }
    }
    panic!("no free run of ports {offsets:?} in {TEST_PORTS:?}");
}

/// `n` distinct free loopback ports (see [`TEST_PORTS`]).
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port_run(&[0]))))
        .collect()
}

/// The first of three consecutive free ports with the three 100 and 200 above them free too,
/// as `holdfast cluster --base-port` needs (clients, peers, metrics).
pub fn cluster_base_port() -> u16 {
    free_port_run(&[0, 1, 2, 100, 101, 102, 200, 201, 202])
}

/// Where a test cluster's nodes listen and how it is secured.
#[derive(Clone)]
pub struct Net {
    /// Node n serves clients at `clients[n - 1]`.
    pub clients: Vec<SocketAddr>,
    /// Node n listens for peers at `peers[n - 1]`.
    pub peers: Vec<SocketAddr>,
    /// `None`: the cluster runs with `no_auth`.
    pub pki: Option<Pki>,
}

impl Net {
    /// `nodes` nodes on free loopback ports, secured with a new CA under `dir`.
    pub fn secure(dir: &Path, nodes: usize) -> Net {
        let mut net = Net::no_auth(nodes);
        net.pki = Some(Pki::create(dir, nodes));
        net
    }

    pub fn no_auth(nodes: usize) -> Net {
        let addrs = free_addrs(2 * nodes);
        Net {
            clients: addrs[..nodes].to_vec(),
            peers: addrs[nodes..].to_vec(),
            pki: None,
        }
    }

    /// The admin's client settings (plaintext without security).
    pub fn admin(&self) -> ClientConfig {
        match &self.pki {
            Some(pki) => pki.client(&self.clients, ADMIN_TOKEN),
            None => ClientConfig::plaintext(self.clients.clone()),
        }
    }
}

/// Writes `node_dir/node.toml` for node `id` of `net`, with data in `node_dir/data`, two broker
/// groups and `extra_config` lines; returns its path.
pub fn write_node_config(node_dir: &Path, id: usize, net: &Net, extra_config: &str) -> PathBuf {
    std::fs::create_dir_all(node_dir).expect("node dir");
    let mut config = format!(
        "id = {id}\ndata_dir = {:?}\nbroker_groups = 2\n{extra_config}\n",
        node_dir.join("data").display().to_string()
    );
    if net.pki.is_none() {
        config.push_str("no_auth = true\n");
    }
    config.push_str("[nodes]\n");
    for (i, addr) in net.clients.iter().enumerate() {
        config.push_str(&format!("{} = \"{addr}\"\n", i + 1));
    }
    config.push_str("[peers]\n");
    for (i, addr) in net.peers.iter().enumerate() {
        config.push_str(&format!("{} = \"{addr}\"\n", i + 1));
    }
    if let Some(pki) = &net.pki {
        config.push_str(&pki.security_section(id));
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
