//! What the end-to-end tests share: the cluster's addresses and credentials, a node's config on
//! disk, and polling until something holds.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
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

/// `n` distinct free loopback ports.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    // All held at once, so they differ.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("an address"))
        .collect()
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
