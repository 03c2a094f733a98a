//! A node's configuration: a TOML file, with command-line flags on top.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use holdfast_core::raft::NodeId;
use serde::Deserialize;

/// What `node.toml` holds. Unknown keys are refused, so a typo is an error, not a default.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// This node's id: a key of `nodes`.
    pub id: NodeId,
    /// Every node of the cluster, this one included: id to the address it serves clients on
    /// (`host:port`; a host name is resolved once, at start, to its first address, as the
    /// client commands resolve theirs).
    #[serde(deserialize_with = "resolved_addrs")]
    pub nodes: BTreeMap<NodeId, SocketAddr>,
    /// Every node's address for the other nodes (Raft traffic), a port of its own. A node
    /// missing here listens for peers on its client address's port + [`PEER_PORT_OFFSET`].
    #[serde(default, deserialize_with = "resolved_addrs")]
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// No TLS, no credentials: anyone who reaches a port is a client or a node. Only for
    /// experiments; the server logs a warning at start. Otherwise `[security]` is required.
    #[serde(default)]
    pub no_auth: bool,
    /// Certificates and principals (paths relative to the config file's directory).
    #[serde(default)]
    pub security: Option<Security>,
    /// Connections this node holds at once, peers and clients together; more are refused at
    /// accept. At most (and by default) `limits::CONNECTIONS_MAX`.
    #[serde(default = "default_connections_max")]
    pub connections_max: usize,
    /// Where this node keeps its data (a directory per group).
    pub data_dir: PathBuf,
    /// Broker groups (the metadata group comes on top).
    #[serde(default = "default_broker_groups")]
    pub broker_groups: u64,
    /// What an empty or missing `data_dir` means: `new`, a first start, or `existing`, a node
    /// whose disk was lost. Only read while the data directory holds no identity yet.
    #[serde(default)]
    pub initial_cluster_state: InitialClusterState,
    /// Messages older than this are deleted, consumed or not (RocketMQ's `fileReservedTime`);
    /// 0 keeps them for ever.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// A consumer group whose members a broker group's leader has not heard from for this
    /// long loses its offsets and leases there (Kafka's `offsets.retention.minutes`: 168 hours
    /// by default); 0 keeps them for ever.
    #[serde(default = "default_group_retention_hours")]
    pub group_retention_hours: u64,
    /// Each queue deletes its oldest messages while it holds more message bytes than this
    /// (Kafka's `retention.bytes`); 0 is no limit.
    #[serde(default)]
    pub retention_bytes: u64,
    /// A group's log is compacted into a snapshot once this many entries were applied since
    /// the last one (and they outweigh it); 0 never compacts.
    #[serde(default = "default_snapshot_entries")]
    pub snapshot_entries: u64,
    /// A group's log is also compacted once it holds this many bytes of commands since the
    /// last snapshot: it bounds the memory the log takes per group (entries carry messages
    /// until compaction) and what a restart reads back. 1 MiB to 1 GiB.
    #[serde(default = "default_snapshot_log_bytes")]
    pub snapshot_log_bytes: u64,
    /// Where to serve Prometheus metrics (`/metrics`) and a readiness check (`/healthz`)
    /// over plain HTTP (`host:port`); none by default.
    #[serde(default, deserialize_with = "resolved_opt_addr")]
    pub metrics_addr: Option<SocketAddr>,
    /// On SIGTERM, hand every group this node leads to a peer (leadership transfer) before
    /// exiting, so a rolling restart costs no election timeout. Off: the groups wait for an
    /// election after the node is gone.
    #[serde(default = "default_true")]
    pub hand_over_on_stop: bool,
    /// Spread group leaders evenly over the live nodes: a node leading at least two more
    /// groups than another hands one over (leadership transfer), at most one every few
    /// seconds. Off: leaders stay wherever elections put them.
    #[serde(default = "default_true")]
    pub leader_balance: bool,
    /// Each broker group keeps its newest messages, up to about this many bytes, in memory to
    /// serve consumers that keep up without reading the queue store; the rest of the retained
    /// messages are only on disk. 0 caches none.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// After this many `ReconsumeLater` answers a message goes to its consumer group's
    /// dead-letter queue (`holdfast dlq list`, `dlq redrive`); default 16, RocketMQ's. The same
    /// on every node: applying the log depends on it.
    #[serde(default)]
    pub max_reconsume: Option<u32>,
    /// A group is not shrunk below this many voters by `holdfast node remove` unless forced.
    /// Default: 3, or fewer if `[nodes]` lists fewer.
    #[serde(default)]
    pub replication_factor: Option<usize>,
}

fn default_true() -> bool {
    true
}

fn default_cache_bytes() -> u64 {
    holdfast_core::broker::CACHE_BYTES_DEFAULT
}

/// Where a node's certificates and principals are.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// The cluster CA's certificate (PEM): peers and this node's clients are verified
    /// against it.
    pub ca_cert: PathBuf,
    /// This node's certificate (PEM), for the name `node-<id>.holdfast`, signed by the CA.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The principals file (`auth.toml`): clients' token hashes and ACLs.
    pub principals: PathBuf,
}

/// A node without a `[peers]` entry takes its client port plus this for its peer port.
pub const PEER_PORT_OFFSET: u16 = 100;

/// `id = "host:port"` entries, each resolved to its first socket address.
fn resolved_addrs<'de, D>(deserializer: D) -> Result<BTreeMap<NodeId, SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw = BTreeMap::<NodeId, String>::deserialize(deserializer)?;
    raw.into_iter()
        .map(|(id, text)| resolve_addr(&text).map(|addr| (id, addr)))
        .collect::<Result<_, String>>()
        .map_err(serde::de::Error::custom)
}

fn resolved_opt_addr<'de, D>(deserializer: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    resolve_addr(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `host:port` or `ip:port` to one address; port 0 is refused (it would mean "any port",
/// and no other node could find this one).
pub fn resolve_addr(text: &str) -> Result<SocketAddr, String> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("address {text:?}: {e} (expected host:port, port 1-65535)"))?
        .next()
        .ok_or_else(|| format!("address {text:?}: the name resolves to no address"))?;
    if addr.port() == 0 {
        return Err(format!(
            "address {text:?}: port 0 is not a port a node can be found on"
        ));
    }
    Ok(addr)
}

fn default_connections_max() -> usize {
    holdfast_core::limits::CONNECTIONS_MAX
}

fn default_retention_hours() -> u64 {
    72
}

fn default_group_retention_hours() -> u64 {
    holdfast_core::limits::GROUP_RETENTION_MS_DEFAULT / 3_600_000
}

fn default_snapshot_entries() -> u64 {
    10_000
}

fn default_snapshot_log_bytes() -> u64 {
    holdfast_core::limits::SNAPSHOT_LOG_BYTES_DEFAULT
}

/// What a node's empty data directory means, as etcd's `--initial-cluster-state`: the server
/// cannot tell a first start from a wiped disk, so the operator says which. Once the directory
/// holds its identity file (`server::identity`), the directory says it itself and this is not
/// read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InitialClusterState {
    /// The cluster is being created: an empty data directory is a first start.
    #[default]
    New,
    /// The cluster already runs: an empty data directory means this node lost its disk, so
    /// it rejoins without ever voting again (its vote promises went with the disk).
    Existing,
    /// The cluster already runs and this node is new to it (`holdfast node add` adds it): its
    /// replicas start with no configuration of their own, never campaign, and learn each
    /// group's configuration from its leader. `[nodes]` lists the nodes it can reach first,
    /// itself included.
    Join,
}

impl std::fmt::Display for InitialClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InitialClusterState::New => "new",
            InitialClusterState::Existing => "existing",
            InitialClusterState::Join => "join",
        })
    }
}

/// The 1-based number and the trimmed text of the line holding byte `at`.
fn line_of(text: &str, at: usize) -> Option<(usize, &str)> {
    let before = text.get(..at)?;
    let number = before.matches('\n').count() + 1;
    let line = text.lines().nth(number - 1)?.trim();
    Some((number, line))
}

fn default_broker_groups() -> u64 {
    2
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl ServerConfig {
    pub fn from_file(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        let mut config = Self::from_toml(&text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))?;
        if let (Some(security), Some(dir)) = (&mut config.security, path.parent()) {
            for file in [
                &mut security.ca_cert,
                &mut security.cert,
                &mut security.key,
                &mut security.principals,
            ] {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<ServerConfig, ConfigError> {
        let config: ServerConfig = toml::from_str(text)
            .map_err(|e| {
                let message = e.message().replace('\n', " ");
                // Name the offending line: serde's messages about values omit the key.
                match e.span().and_then(|span| line_of(text, span.start)) {
                    Some((number, line)) => {
                        ConfigError(format!("line {number} `{line}`: {message}"))
                    }
                    None => ConfigError(message),
                }
            })
            .map_err(|e| match e.0.as_str() {
                m if m.contains("unknown field") => ConfigError(format!("bad config key: {m}")),
                _ => e,
            })?;
        let mut config = config;
        config.fill_peers()?;
        config.validate()?;
        Ok(config)
    }

    /// Gives every node without a `[peers]` entry its default peer address.
    pub fn fill_peers(&mut self) -> Result<(), ConfigError> {
        for (id, addr) in &self.nodes {
            if self.peers.contains_key(id) {
                continue;
            }
            let port = addr.port().checked_add(PEER_PORT_OFFSET).ok_or_else(|| {
                ConfigError(format!(
                    "node {id}: client port {} leaves no default peer port (+{PEER_PORT_OFFSET}); \
                     give one in [peers]",
                    addr.port()
                ))
            })?;
            self.peers.insert(*id, SocketAddr::new(addr.ip(), port));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.nodes.contains_key(&self.id) {
            return Err(ConfigError(format!(
                "key `id`: node {} is not among `nodes` ({:?})",
                self.id,
                self.nodes.keys().collect::<Vec<_>>()
            )));
        }
        if self.nodes.contains_key(&0) {
            return Err(ConfigError("key `nodes`: node ids start at 1".into()));
        }
        let log_bytes_max = holdfast_core::limits::SNAPSHOT_LOG_BYTES_MAX;
        if !(1 << 20..=log_bytes_max).contains(&self.snapshot_log_bytes) {
            return Err(ConfigError(format!(
                "key `snapshot_log_bytes`: {} is not in {}..={log_bytes_max}",
                self.snapshot_log_bytes,
                1 << 20
            )));
        }
        if !(1..=64).contains(&self.broker_groups) {
            return Err(ConfigError(format!(
                "key `broker_groups`: {} is not in 1..=64",
                self.broker_groups
            )));
        }
        if let Some(stranger) = self.peers.keys().find(|id| !self.nodes.contains_key(id)) {
            return Err(ConfigError(format!(
                "key `peers`: node {stranger} is not among `nodes`"
            )));
        }
        for (kind, map) in [("nodes", &self.nodes), ("peers", &self.peers)] {
            let mut seen: BTreeMap<SocketAddr, NodeId> = BTreeMap::new();
            for (id, addr) in map {
                if addr.port() == 0 {
                    return Err(ConfigError(format!("key `{kind}`: node {id} has port 0")));
                }
                if let Some(other) = seen.insert(*addr, *id) {
                    return Err(ConfigError(format!(
                        "key `{kind}`: nodes {other} and {id} have the same address {addr}"
                    )));
                }
            }
        }
        for (id, peer) in &self.peers {
            if let Some((other, _)) = self.nodes.iter().find(|(_, a)| *a == peer) {
                return Err(ConfigError(format!(
                    "key `peers`: node {id}'s peer address {peer} is node {other}'s client \
                     address; peers and clients need ports of their own"
                )));
            }
        }
        let most = holdfast_core::limits::CONNECTIONS_MAX;
        if !(self.nodes.len()..=most).contains(&self.connections_max) {
            return Err(ConfigError(format!(
                "key `connections_max`: {} is not in {}..={most} (one link per node at least, \
                 CONNECTIONS_MAX at most)",
                self.connections_max,
                self.nodes.len()
            )));
        }
        if !self.no_auth && self.security.is_none() {
            return Err(ConfigError(
                "no [security] section (ca_cert, cert, key, principals): give one, or set \
                 `no_auth = true` to run without TLS and credentials (experiments only)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Where clients connect.
    pub fn listen(&self) -> SocketAddr {
        self.nodes[&self.id]
    }

    /// Where the other nodes connect.
    pub fn listen_peers(&self) -> SocketAddr {
        self.peers
            .get(&self.id)
            .copied()
            .unwrap_or_else(|| self.listen())
    }

    /// The node's settings that come from this file.
    pub fn node_config(&self) -> holdfast_core::node::NodeConfig {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut config = holdfast_core::node::NodeConfig::new(self.id, ids, self.broker_groups);
        config.broker.retention_ms =
            (self.retention_hours > 0).then(|| self.retention_hours.saturating_mul(3_600_000));
        config.broker.retention_bytes = (self.retention_bytes > 0).then_some(self.retention_bytes);
        config.group_retention_ms = (self.group_retention_hours > 0)
            .then(|| self.group_retention_hours.saturating_mul(3_600_000));
        config.snapshot_entries_min = (self.snapshot_entries > 0).then_some(self.snapshot_entries);
        config.snapshot_log_bytes = self.snapshot_log_bytes;
        // Followers behind compaction fetch the segments they lack (server/catch_up.rs).
        config.segment_catch_up = true;
        if !self.leader_balance {
            config.leader_balance_interval_ms = None;
        }
        config.broker.cache_bytes_max = self.cache_bytes;
        if let Some(max) = self.max_reconsume {
            config.broker.max_reconsume = max;
        }
        if let Some(factor) = self.replication_factor {
            config.replication_factor = factor.max(1);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_config_parses_and_a_bad_one_names_the_key() {
        let good = r#"
            id = 2
            data_dir = "/tmp/x"
            no_auth = true
            [nodes]
            1 = "127.0.0.1:7301"
            2 = "127.0.0.1:7302"
        "#;
        let config = ServerConfig::from_toml(good).expect("parses");
        assert_eq!(config.listen().port(), 7302);
        assert_eq!(
            config.listen_peers().port(),
            7402,
            "default peer port: client + 100"
        );
        assert_eq!(config.broker_groups, 2);

        let typo = good.replace("data_dir", "datadir");
        let error = ServerConfig::from_toml(&typo)
            .expect_err("typo refused")
            .to_string();
        assert!(error.contains("datadir"), "{error}");
        let stranger = good.replace("id = 2", "id = 9");
        let error = ServerConfig::from_toml(&stranger)
            .expect_err("unknown id")
            .to_string();
        assert!(error.contains("key `id`"), "{error}");
        let wrong_type = good.replace("id = 2", "id = \"two\"");
        assert!(ServerConfig::from_toml(&wrong_type).is_err());
    }

    #[test]
    fn initial_cluster_state_defaults_to_new_and_refuses_unknown_values() {
        let base = "id = 1\ndata_dir = \"/tmp/x\"\nno_auth = true\n";
        let nodes = "[nodes]\n1 = \"127.0.0.1:7301\"\n";
        let parse = |extra: &str| ServerConfig::from_toml(&format!("{base}{extra}{nodes}"));
        let default = parse("").expect("parses");
        assert_eq!(default.initial_cluster_state, InitialClusterState::New);
        let existing = parse("initial_cluster_state = \"existing\"\n").expect("parses");
        assert_eq!(
            existing.initial_cluster_state,
            InitialClusterState::Existing
        );
        let defaults = default.node_config();
        assert_eq!(defaults.broker.retention_ms, Some(72 * 3_600_000));
        assert_eq!(defaults.broker.retention_bytes, None);
        assert_eq!(defaults.snapshot_entries_min, Some(10_000));
        let tuned = parse("retention_hours = 0\nretention_bytes = 1024\nsnapshot_entries = 0\n")
            .expect("parses")
            .node_config();
        assert_eq!(tuned.broker.retention_ms, None, "0 keeps messages for ever");
        assert_eq!(tuned.broker.retention_bytes, Some(1024));
        assert_eq!(tuned.snapshot_entries_min, None);
        assert_eq!(
            defaults.snapshot_log_bytes,
            holdfast_core::limits::SNAPSHOT_LOG_BYTES_DEFAULT
        );
        let small = parse(
            "snapshot_log_bytes = 1048576
",
        )
        .expect("parses");
        assert_eq!(small.node_config().snapshot_log_bytes, 1 << 20);
        for wrong in [
            "snapshot_log_bytes = 0
",
            "snapshot_log_bytes = 2147483648
",
        ] {
            let error = parse(wrong).expect_err("refused").to_string();
            assert!(error.contains("snapshot_log_bytes"), "{error}");
        }
        let error = parse("initial_cluster_state = \"old\"\n")
            .expect_err("unknown value refused")
            .to_string();
        assert!(error.contains("initial_cluster_state"), "{error}");
        assert!(error.contains("existing"), "{error}");
    }

    #[test]
    fn peers_get_ports_of_their_own_and_security_is_required_unless_refused() {
        let nodes = "[nodes]\n1 = \"127.0.0.1:7301\"\n2 = \"127.0.0.1:7302\"\n";
        let parse = |top: &str, rest: &str| {
            ServerConfig::from_toml(&format!("id = 1\ndata_dir = \"/x\"\n{top}{nodes}{rest}"))
        };
        let error = parse("", "").expect_err("no security").to_string();
        assert!(
            error.contains("[security]") && error.contains("no_auth"),
            "{error}"
        );
        let secure = parse(
            "",
            "[peers]\n1 = \"127.0.0.1:9001\"\n[security]\nca_cert = \"ca.pem\"\n\
             cert = \"n.pem\"\nkey = \"n.key\"\nprincipals = \"auth.toml\"\n",
        )
        .expect("parses");
        assert_eq!(secure.listen_peers().port(), 9001);
        assert_eq!(secure.peers[&2].port(), 7402);
        let clash = parse("no_auth = true\n", "[peers]\n1 = \"127.0.0.1:7302\"\n")
            .expect_err("peer port = a client port")
            .to_string();
        assert!(clash.contains("ports of their own"), "{clash}");
        let stranger = parse("no_auth = true\n", "[peers]\n5 = \"127.0.0.1:9005\"\n")
            .expect_err("unknown node")
            .to_string();
        assert!(stranger.contains("node 5"), "{stranger}");
        let open = parse("no_auth = true\n", "").expect("parses");
        assert_eq!(open.connections_max, holdfast_core::limits::CONNECTIONS_MAX);
        let error = parse("no_auth = true\nconnections_max = 1\n", "")
            .expect_err("fewer than the nodes")
            .to_string();
        assert!(error.contains("connections_max"), "{error}");
    }

    #[test]
    fn host_names_resolve_and_duplicate_or_zero_ports_are_refused() {
        let parse = |nodes: &str, peers: &str| {
            ServerConfig::from_toml(&format!(
                "id = 1\ndata_dir = \"/x\"\nno_auth = true\n[nodes]\n{nodes}[peers]\n{peers}"
            ))
        };
        let named = parse("1 = \"localhost:7401\"\n2 = \"127.0.0.1:7402\"\n", "")
            .expect("a host name is accepted");
        assert_eq!(named.listen().port(), 7401);
        assert!(named.listen().ip().is_loopback(), "{}", named.listen());

        let twice = parse("1 = \"127.0.0.1:7401\"\n2 = \"127.0.0.1:7401\"\n", "")
            .expect_err("two nodes, one address")
            .to_string();
        assert!(twice.contains("same address 127.0.0.1:7401"), "{twice}");
        let peers_twice = parse(
            "1 = \"127.0.0.1:7401\"\n2 = \"127.0.0.1:7402\"\n",
            "1 = \"127.0.0.1:9000\"\n2 = \"127.0.0.1:9000\"\n",
        )
        .expect_err("two peers, one address")
        .to_string();
        assert!(peers_twice.contains("`peers`"), "{peers_twice}");
        let zero = parse("1 = \"127.0.0.1:0\"\n", "")
            .expect_err("port 0")
            .to_string();
        assert!(zero.contains("port 0"), "{zero}");
        let past = parse("1 = \"127.0.0.1:65536\"\n", "")
            .expect_err("no such port")
            .to_string();
        assert!(past.contains("65536"), "{past}");
        let unknown = parse("1 = \"no-such-host.invalid:7401\"\n", "")
            .expect_err("a name that resolves to nothing")
            .to_string();
        assert!(unknown.contains("no-such-host.invalid"), "{unknown}");
    }
}
