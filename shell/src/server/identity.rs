//! The data directory's identity: whose directory it is, and which groups lost their data.
//!
//! A replica's vote promises live in its group's state file. A node whose disk was wiped and
//! that came back as if new could vote a second time in a term it already voted in, and two
//! leaders of one term break Raft. The files alone cannot tell a first start from a wiped disk,
//! so, as etcd's `--initial-cluster-state`, the operator says which while the directory holds
//! nothing, and from then on the directory says it itself:
//!
//! - `identity.toml` is written when the directory is first initialised, before any group's
//!   files exist, through a temporary file, `fsync`, `rename` and a `fsync` of the directory.
//!   It names the node, the cluster's nodes and a cluster id derived from them, and carries a
//!   checksum: a damaged identity is refused, never guessed at.
//! - Present: an ordinary restart, on the node it names only (anything else is refused with
//!   one line naming the file). A group directory that it says was created and that is gone
//!   lost its data: that group's replica starts votes-lost.
//! - Absent, the directory empty or missing: `new` is a first start, `existing` a lost disk:
//!   every group starts votes-lost.
//! - Absent, the directory holding group directories: written by a holdfast from before the
//!   identity; treated as initialised and the identity written.
//!
//! Votes-lost ([`Damage::votes_lost`]) means the replica follows and stores, but its
//! acknowledgements count for no commit or lease, and it never votes or campaigns again (the
//! cluster is made whole by replacing it under a new id: `holdfast node replace`). The identity
//! records it under `votes_lost` before the group's new files are created, so a crash or a
//! restart can never forget it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use holdfast_core::raft::{Damage, GroupId, NodeId, Recovered};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{InitialClusterState, ServerConfig};

/// The identity's name inside the data directory.
pub const IDENTITY_FILE: &str = "identity.toml";
const TEMP_FILE: &str = "identity.toml.tmp";
/// The identity format this build writes and reads.
const FORMAT: u32 = 1;
const CHECKSUM_KEY: &str = "checksum = ";
const HEADER: &str = "# holdfast: the identity of this data directory, written by the server. Do not edit,\n\
# delete or copy it: it keeps this node from voting twice (README.md, \"Running holdfast\").\n";

/// What `identity.toml` holds, after its checksum line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    format: u32,
    /// The node this directory belongs to.
    node: NodeId,
    /// A hash of the node ids and addresses the directory was initialised with: the same on
    /// every node initialised from the same node list.
    cluster: String,
    /// How the directory was initialised: `new`, `existing` (a lost disk) or `older-version`.
    initialised: String,
    /// The groups whose directories were created here. One of them missing lost its data.
    groups: BTreeSet<GroupId>,
    /// The groups whose data, and with it the memory of their votes, was lost: their replicas
    /// never vote again. Never shrinks.
    votes_lost: BTreeSet<GroupId>,
    /// The cluster's nodes (ids as strings: TOML keys are strings).
    nodes: BTreeMap<String, SocketAddr>,
}

/// A data directory whose identity is checked and durable, opened before any group's store.
#[derive(Debug)]
pub struct Identity {
    dir: PathBuf,
    file: IdentityFile,
}

impl Identity {
    /// Reads, checks and (when needed) writes `config.data_dir`'s identity. Must run before
    /// any group's files are opened: it decides, from which group directories exist, which
    /// groups lost their data.
    pub fn open(config: &ServerConfig) -> Result<Identity, String> {
        let dir = config.data_dir.clone();
        let path = dir.join(IDENTITY_FILE);
        let configured: BTreeSet<GroupId> = (0..=config.broker_groups).collect();
        let identity = match read(&path)? {
            Some(file) => {
                check(&file, config, &path)?;
                let mut identity = Identity { dir, file };
                identity.restart(config, &configured)?;
                identity
            }
            None => Identity::initialise(config, &configured)?,
        };
        let lost: Vec<GroupId> = identity.votes_lost().collect();
        if !lost.is_empty() {
            warn!(
                groups = ?lost,
                "votes lost: this node's data for these groups was lost ({}), so their replicas \
                 follow and store data but never vote, campaign or count towards a commit, \
                 until a membership change replaces this node",
                path.display()
            );
        }
        Ok(identity)
    }

    /// Whether this directory was initialised for a node joining a running cluster: its
    /// replicas start with no configuration of their own on every start.
    pub fn joined(&self) -> bool {
        self.file.initialised == "join"
    }

    /// The groups to open on a start: the configured ones, and those added at runtime (whose
    /// directories the identity records, or that exist: a crash may come between a directory's
    /// creation and its record).
    pub fn groups_to_open(&self, configured: u64) -> Result<BTreeSet<GroupId>, String> {
        let mut groups: BTreeSet<GroupId> = (0..=configured).collect();
        groups.extend(self.file.groups.iter().copied());
        groups.extend(groups_on_disk(&self.dir)?);
        Ok(groups)
    }

    /// A broker group added at runtime got its directory (created and synced): recorded
    /// durably, so that its directory gone later reads as lost data, not as a group never
    /// created.
    /// A node whose metadata replica lost its votes lost its disk, and may have voted in the
    /// new group before: the group is recorded votes-lost too (the core started it so).
    pub fn group_created(&mut self, group: GroupId) -> Result<(), String> {
        let mut changed = self.file.groups.insert(group);
        if self.file.votes_lost.contains(&0) {
            changed |= self.file.votes_lost.insert(group);
        }
        if changed {
            self.write()?;
        }
        Ok(())
    }

    /// The groups recorded as votes-lost: their replicas start so on every start.
    pub fn votes_lost(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.file.votes_lost.iter().copied()
    }

    /// Once every group's store is open (so its directory exists and is synced): records the
    /// groups created, and starts each votes-lost group with `Damage { votes_lost: true }`
    /// from just past the log it recovered (from 1 at the start after the loss; afterwards
    /// what it has stored since stays, as with any restart).
    pub fn opened(
        &mut self,
        recovered: &BTreeMap<GroupId, Recovered>,
        damaged: &mut BTreeMap<GroupId, Damage>,
    ) -> Result<(), String> {
        // A group whose store found its state lost (recovery said votes-lost) is recorded
        // here before the replica starts, so that it stays votes-lost once the replica has
        // written a new state file.
        let mut changed = false;
        for (group, damage) in damaged.iter() {
            if damage.votes_lost && self.file.votes_lost.insert(*group) {
                warn!(
                    group,
                    "the group's state file was lost: recording its votes as lost in {}",
                    IDENTITY_FILE
                );
                changed = true;
            }
        }
        for (group, disk) in recovered {
            if !self.file.votes_lost.contains(group) {
                continue;
            }
            let last = disk.entries.last().map_or_else(
                || disk.snapshot.as_ref().map_or(0, |s| s.index),
                |e| e.index,
            );
            let from = damaged
                .get(group)
                .map_or(last + 1, |d| d.from.min(last + 1));
            damaged.insert(
                *group,
                Damage {
                    from,
                    votes_lost: true,
                },
            );
        }
        let before = self.file.groups.len();
        self.file.groups.extend(recovered.keys().copied());
        if changed || self.file.groups.len() != before {
            self.write()?;
        }
        Ok(())
    }

    /// A restart: the groups whose directories are gone lost their data.
    fn restart(
        &mut self,
        config: &ServerConfig,
        configured: &BTreeSet<GroupId>,
    ) -> Result<(), String> {
        let mut changed = false;
        let nodes = node_names(&config.nodes);
        if nodes != self.file.nodes {
            info!(
                was = ?self.file.nodes,
                now = ?nodes,
                "node addresses changed since the data directory was initialised: recording them"
            );
            self.file.nodes = nodes;
            changed = true;
        }
        // Broker groups added at runtime are in the identity only.
        let recorded: Vec<GroupId> = self.file.groups.iter().copied().collect();
        for group in configured.iter().chain(recorded.iter()) {
            let group_dir = self.dir.join(format!("group-{group}"));
            if !self.file.groups.contains(group) || group_dir.exists() {
                continue;
            }
            warn!(
                group,
                "{} is gone though {} says it was created: this group's data was lost; its \
                 replica rejoins with its votes lost",
                group_dir.display(),
                IDENTITY_FILE
            );
            changed |= self.file.votes_lost.insert(*group);
        }
        if changed {
            self.write()?;
        }
        Ok(())
    }

    /// No identity yet: a first start, a lost disk, or a directory of an older holdfast.
    fn initialise(
        config: &ServerConfig,
        configured: &BTreeSet<GroupId>,
    ) -> Result<Identity, String> {
        let dir = &config.data_dir;
        let present = groups_on_disk(dir)?;
        let (initialised, votes_lost) = if !present.is_empty() {
            info!(
                dir = %dir.display(),
                groups = ?present,
                "no {IDENTITY_FILE} but group data: written by an older holdfast; treating it as \
                 initialised and writing its identity"
            );
            ("older-version", BTreeSet::new())
        } else {
            match config.initial_cluster_state {
                InitialClusterState::New => {
                    info!(
                        dir = %dir.display(),
                        "first start (initial_cluster_state = new): initialising the data directory"
                    );
                    ("new", BTreeSet::new())
                }
                InitialClusterState::Join => {
                    info!(
                        dir = %dir.display(),
                        "first start of a node joining a running cluster (initial_cluster_state \
                         = join): its groups learn their configuration from their leaders"
                    );
                    ("join", BTreeSet::new())
                }
                InitialClusterState::Existing => {
                    warn!(
                        dir = %dir.display(),
                        "the data directory is empty and initial_cluster_state = existing: this \
                         node lost its disk; it rejoins with its votes lost in every group"
                    );
                    ("existing", configured.clone())
                }
            }
        };
        let identity = Identity {
            dir: dir.clone(),
            file: IdentityFile {
                format: FORMAT,
                node: config.id,
                cluster: cluster_id(&config.nodes),
                initialised: initialised.into(),
                groups: present,
                votes_lost,
                nodes: node_names(&config.nodes),
            },
        };
        create_dir_durable(dir)?;
        identity.write()?;
        Ok(identity)
    }

    /// Replaces the identity atomically and durably: a temporary file, synced, renamed over
    /// it, and the directory synced.
    fn write(&self) -> Result<(), String> {
        let temp = self.dir.join(TEMP_FILE);
        let path = self.dir.join(IDENTITY_FILE);
        let fail = |op: &str, p: &Path, e: io::Error| format!("{op} {} failed: {e}", p.display());
        let text = encode(&self.file)?;
        let mut file = File::create(&temp).map_err(|e| fail("create", &temp, e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| fail("write", &temp, e))?;
        file.sync_all().map_err(|e| fail("fsync", &temp, e))?;
        drop(file);
        fs::rename(&temp, &path).map_err(|e| fail("rename", &path, e))?;
        sync_dir(&self.dir)
    }
}

/// Refuses an identity that is not this node's.
fn check(file: &IdentityFile, config: &ServerConfig, path: &Path) -> Result<(), String> {
    if file.format > FORMAT {
        return Err(format!(
            "{}: format {} is newer than this holdfast reads ({FORMAT}): refusing to start",
            path.display(),
            file.format
        ));
    }
    if file.node != config.id {
        return Err(format!(
            "{}: this data directory belongs to node {}, but the config says id = {}: refusing \
             to start (a node must never run on another node's data)",
            path.display(),
            file.node,
            config.id
        ));
    }
    let recorded: BTreeSet<&str> = file.nodes.keys().map(String::as_str).collect();
    let names = node_names(&config.nodes);
    let configured: BTreeSet<&str> = names.keys().map(String::as_str).collect();
    if recorded != configured {
        return Err(format!(
            "{}: this data directory was initialised for nodes {recorded:?}, but the config \
             lists {configured:?}: refusing to start (keep `[nodes]` as it was at this node's first \
             start: nodes added or removed since are learned from the cluster's node table)",
            path.display()
        ));
    }
    Ok(())
}

/// The identity at `path`, or `None` if there is none.
fn read(path: &Path) -> Result<Option<IdentityFile>, String> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    decode(&text)
        .map(Some)
        .map_err(|why| format!("{}: {why}: refusing to start", path.display()))
}

fn encode(file: &IdentityFile) -> Result<String, String> {
    let body = toml::to_string(file).map_err(|e| format!("cannot encode the identity: {e}"))?;
    Ok(format!(
        "{HEADER}{CHECKSUM_KEY}\"{:016x}\"\n{body}",
        fnv1a(body.as_bytes())
    ))
}

fn decode(text: &str) -> Result<IdentityFile, String> {
    let at = text
        .match_indices(CHECKSUM_KEY)
        .map(|(at, _)| at)
        .find(|at| *at == 0 || text.as_bytes()[at - 1] == b'\n')
        .ok_or("no checksum line")?;
    let line_end = text[at..].find('\n').ok_or("no checksum line")? + at;
    let stored = text[at + CHECKSUM_KEY.len()..line_end]
        .trim()
        .trim_matches('"');
    let body = &text[line_end + 1..];
    if stored != format!("{:016x}", fnv1a(body.as_bytes())) {
        return Err("damaged (checksum mismatch)".into());
    }
    toml::from_str(body).map_err(|e| format!("unreadable: {}", e.message().replace('\n', " ")))
}

/// The node list as the identity spells it.
fn node_names(nodes: &BTreeMap<NodeId, SocketAddr>) -> BTreeMap<String, SocketAddr> {
    nodes.iter().map(|(id, a)| (id.to_string(), *a)).collect()
}

/// A cluster id from the node ids and addresses: the same on every node of one config.
fn cluster_id(nodes: &BTreeMap<NodeId, SocketAddr>) -> String {
    let spelled: String = nodes.iter().map(|(id, a)| format!("{id}={a};")).collect();
    format!("{:016x}", fnv1a(spelled.as_bytes()))
}

/// FNV-1a, 64 bits: any one changed byte changes it (each step is a bijection of the state).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The groups with a `group-<id>` directory under `dir` (none if `dir` is missing).
fn groups_on_disk(dir: &Path) -> Result<BTreeSet<GroupId>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(format!("cannot list {}: {e}", dir.display())),
    };
    let mut groups = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        if let Some(group) = name
            .to_str()
            .and_then(|n| n.strip_prefix("group-"))
            .and_then(|n| n.parse::<GroupId>().ok())
        {
            groups.insert(group);
        }
    }
    Ok(groups)
}

fn create_dir_durable(path: &Path) -> Result<(), String> {
    crate::storage::create_dir_durable(path).map_err(|e| e.to_string())
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    crate::storage::sync_dir(dir).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, id: NodeId, state: &str) -> ServerConfig {
        let text = format!(
            "id = {id}\ndata_dir = {:?}\ninitial_cluster_state = \"{state}\"\nno_auth = true\n[nodes]\n\
             1 = \"127.0.0.1:7301\"\n2 = \"127.0.0.1:7302\"\n3 = \"127.0.0.1:7303\"\n",
            dir.display().to_string()
        );
        ServerConfig::from_toml(&text).expect("a config")
    }

    /// Opens the identity and makes the group directories as the stores would.
    fn start(config: &ServerConfig) -> Result<(Identity, BTreeMap<GroupId, Damage>), String> {
        let mut identity = Identity::open(config)?;
        let mut recovered = BTreeMap::new();
        for group in 0..=config.broker_groups {
            fs::create_dir_all(config.data_dir.join(format!("group-{group}"))).expect("mkdir");
            recovered.insert(group, Recovered::default());
        }
        let mut damaged = BTreeMap::new();
        identity.opened(&recovered, &mut damaged)?;
        Ok((identity, damaged))
    }

    const LOST: Damage = Damage {
        from: 1,
        votes_lost: true,
    };

    #[test]
    fn a_first_start_and_its_restarts_are_undamaged_and_only_for_their_node() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        let (_, damaged) = start(&config(&dir, 1, "new")).expect("first start");
        assert!(damaged.is_empty());
        let text = fs::read_to_string(dir.join(IDENTITY_FILE)).expect("identity written");
        assert!(text.contains("node = 1"), "{text}");
        // Restarts ignore the flag: the directory says what it is.
        let (_, damaged) = start(&config(&dir, 1, "existing")).expect("restart");
        assert!(damaged.is_empty());
        let error = Identity::open(&config(&dir, 2, "new")).expect_err("node 2 refused");
        assert!(error.contains("belongs to node 1"), "{error}");
        assert!(error.contains(IDENTITY_FILE), "{error}");
        assert!(!error.contains('\n'), "{error}");
    }

    #[test]
    fn a_lost_disk_starts_votes_lost_and_stays_so() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        let (_, damaged) = start(&config(&dir, 3, "existing")).expect("lost disk");
        assert_eq!(damaged.len(), 3);
        assert!(damaged.values().all(|d| *d == LOST), "{damaged:?}");
        let (_, damaged) = start(&config(&dir, 3, "new")).expect("restart");
        assert!(damaged.values().all(|d| d.votes_lost), "{damaged:?}");
        assert_eq!(damaged.len(), 3);
    }

    #[test]
    fn a_group_directory_gone_under_an_identity_lost_its_votes() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        start(&config(&dir, 1, "new")).expect("first start");
        fs::remove_dir_all(dir.join("group-1")).expect("rm");
        let (_, damaged) = start(&config(&dir, 1, "new")).expect("restart");
        assert_eq!(damaged.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(damaged[&1], LOST);
        let (_, damaged) = start(&config(&dir, 1, "new")).expect("restart again");
        assert_eq!(damaged.keys().copied().collect::<Vec<_>>(), vec![1]);
        // A whole directory gone under a surviving identity: every group lost.
        for group in 0..=2 {
            fs::remove_dir_all(dir.join(format!("group-{group}"))).expect("rm");
        }
        let (_, damaged) = start(&config(&dir, 1, "new")).expect("restart");
        assert_eq!(damaged.len(), 3);
    }

    #[test]
    fn a_group_whose_state_file_was_lost_stays_votes_lost() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        let config = config(&dir, 1, "new");
        start(&config).expect("first start");
        // Recovery of group 2 found its state file lost.
        let mut identity = Identity::open(&config).expect("restart");
        let recovered: BTreeMap<GroupId, Recovered> =
            (0..=2).map(|group| (group, Recovered::default())).collect();
        let mut damaged = BTreeMap::from([(2, LOST)]);
        identity.opened(&recovered, &mut damaged).expect("recorded");
        assert_eq!(damaged, BTreeMap::from([(2, LOST)]));
        // Later starts find a state file again, and the identity still says so.
        let (_, damaged) = start(&config).expect("restart");
        assert_eq!(damaged.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert!(damaged[&2].votes_lost);
    }

    #[test]
    fn a_crash_before_the_groups_were_created_is_still_a_first_start() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        Identity::open(&config(&dir, 1, "new")).expect("identity, then a crash");
        let (_, damaged) = start(&config(&dir, 1, "new")).expect("restart");
        assert!(damaged.is_empty(), "{damaged:?}");
    }

    #[test]
    fn an_older_directory_is_adopted_and_a_damaged_identity_refused() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        for group in 0..=2 {
            fs::create_dir_all(dir.join(format!("group-{group}"))).expect("mkdir");
        }
        let (_, damaged) = start(&config(&dir, 2, "existing")).expect("adopted");
        assert!(damaged.is_empty(), "{damaged:?}");
        let path = dir.join(IDENTITY_FILE);
        let text = fs::read_to_string(&path).expect("identity written");
        assert!(text.contains("older-version"), "{text}");

        fs::write(&path, text.replace("node = 2", "node = 3")).expect("tamper");
        let error = Identity::open(&config(&dir, 2, "new")).expect_err("damaged refused");
        assert!(error.contains("checksum mismatch"), "{error}");
        let newer = IdentityFile {
            format: FORMAT + 1,
            ..decode(&text).expect("decodes")
        };
        fs::write(&path, encode(&newer).expect("encodes")).expect("write");
        let error = Identity::open(&config(&dir, 2, "new")).expect_err("newer refused");
        assert!(error.contains("newer"), "{error}");
    }

    #[test]
    fn another_node_list_is_refused_and_new_addresses_recorded() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("data");
        let first = config(&dir, 1, "new");
        start(&first).expect("first start");
        let mut moved = first.clone();
        moved
            .nodes
            .insert(3, "127.0.0.1:9999".parse().expect("addr"));
        start(&moved).expect("new address accepted");
        let text = fs::read_to_string(dir.join(IDENTITY_FILE)).expect("identity");
        assert!(text.contains("9999"), "{text}");
        let mut grown = first;
        grown
            .nodes
            .insert(4, "127.0.0.1:7304".parse().expect("addr"));
        let error = Identity::open(&grown).expect_err("another node list");
        assert!(error.contains("keep `[nodes]`"), "{error}");
    }
}
