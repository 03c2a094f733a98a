//! The metadata group's state machine: the topic table, where each queue lives, and the
//! node table (the addresses of nodes added at runtime, and the ids removed).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::broker::QueueId;
use crate::limits::{
    BROKER_GROUPS_MAX, GROUP_MEMBERS_MAX, QUEUES_MAX, TOMBSTONES_MAX, TOPICS_MAX, check_name,
};
use crate::raft::{GroupId, NodeId};

/// The Raft group that holds the topic table; broker groups are numbered from 1.
pub const METADATA_GROUP: GroupId = 0;
/// More queues than this in one topic is a mistake, not a plan.
pub use crate::limits::QUEUES_PER_TOPIC_MAX;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    CreateTopic {
        topic: String,
        queues: u32,
    },
    /// An operator deletes `topic`: it leaves the table, and a tombstone with its epoch
    /// stays, so that every broker group drops the topic's queues (see `DropTopic` in the
    /// broker) and none re-creates them from a lagging copy of the table. The last variant:
    /// postcard numbers variants in order, so the earlier ones keep their encodings in logs.
    DeleteTopic {
        topic: String,
    },
    /// Records where node `id` serves clients and peers, before any group adds it: every node
    /// that applies it can reach the new node. New variants go last.
    AddNode {
        id: NodeId,
        client_addr: String,
        peer_addr: String,
    },
    /// Node `id` left the cluster for good (after every group removed it): nodes forget its
    /// address and refuse its links, and its id is never used again.
    RemoveNode {
        id: NodeId,
    },
    /// A broker group added at runtime: `voters` (its first configuration) each create a
    /// replica of it, and topics created from then on place queues in it too.
    AddBrokerGroup {
        group: GroupId,
        voters: Vec<NodeId>,
    },
}

/// A node of the node table: added at runtime (with its addresses), or removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// `host:port` for clients and for peers, as the operator gave them (empty for a node of
    /// the initial configuration that was removed: its addresses were never in the table).
    pub client_addr: String,
    pub peer_addr: String,
    /// Removed for good: its id is never reused (its vote promises of old terms could still
    /// count somewhere, see `Replica::propose_membership`).
    pub removed: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetaState {
    /// Topic to the broker group of each of its queues.
    topics: BTreeMap<String, Vec<GroupId>>,
    /// Queues over all topics (derived from `topics`, so not in the snapshot).
    #[serde(skip)]
    queues_total: usize,
    /// The epoch of each live topic: topics created before epochs existed have none (epoch 0).
    epochs: BTreeMap<String, u64>,
    /// Deleted topics: the epoch of the incarnation deleted. A topic created again with the
    /// same name gets a newer epoch and keeps its tombstone (the old queues must still go).
    tombstones: BTreeMap<String, u64>,
    /// The last epoch handed out; epochs rise with every creation and deletion.
    epoch: u64,
    /// The node table, at most `NODES_RECORDED_MAX` records. Encoded after the topic table
    /// (snapshot version 2), so version 1 snapshots still read.
    #[serde(skip)]
    nodes: BTreeMap<NodeId, NodeRecord>,
    /// Broker groups added at runtime, with their first voters; encoded after the node table
    /// (snapshot version 3). Those of the first configuration come from each node's config.
    #[serde(skip)]
    broker_groups: BTreeMap<GroupId, Vec<NodeId>>,
}

/// What applying a node-table command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeApplied {
    /// The table changed: nodes should update their links.
    Changed,
    /// It already said so; nothing changed.
    Unchanged,
}

/// The table as version 1 snapshots held it, before deletion.
#[derive(Deserialize)]
struct MetaStateV1 {
    topics: BTreeMap<String, Vec<GroupId>>,
}

/// What applying a `CreateTopic` or `DeleteTopic` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicApplied {
    Created,
    /// The topic already existed with the same queue count; nothing changed.
    Existed,
    /// The topic and its `queues` queues left the table.
    Deleted {
        queues: u32,
    },
}

/// The first byte of a metadata snapshot: 1, the topic table alone; 2, the topic table with
/// epochs and tombstones, then the node table; 3, as 2, then the broker groups added at
/// runtime.
const META_SNAPSHOT_VERSION: u8 = 3;
/// Before broker groups could be added: the topic table and the node table, still read.
const META_SNAPSHOT_VERSION_V2: u8 = 2;
/// Before deletion and the node table: the topic table alone, still read.
const META_SNAPSHOT_VERSION_V1: u8 = 1;
/// Records the node table holds, removed ones included (ids are never reused, so removals
/// accumulate): bounds what the metadata log can make every node keep.
pub use crate::limits::NODES_RECORDED_MAX;
/// The longest address a node record holds, in bytes.
pub const NODE_ADDR_BYTES_MAX: usize = 255;

impl MetaState {
    /// The topic table's encoding, for a Raft snapshot; equal tables give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![META_SNAPSHOT_VERSION];
        // Tables of strings and numbers always encode.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out.extend(postcard::to_allocvec(&self.nodes).unwrap_or_default());
        out.extend(postcard::to_allocvec(&self.broker_groups).unwrap_or_default());
        out
    }

    pub fn restore(bytes: &[u8]) -> Result<MetaState, String> {
        match bytes.split_first() {
            Some((&META_SNAPSHOT_VERSION_V1, body)) => {
                let (old, rest) = postcard::take_from_bytes::<MetaStateV1>(body)
                    .map_err(|e| format!("metadata snapshot does not decode: {e}"))?;
                let mut state = MetaState {
                    topics: old.topics,
                    ..MetaState::default()
                };
                state.queues_total = state.topics.values().map(Vec::len).sum();
                if rest.is_empty() {
                    Ok(state)
                } else {
                    Err(format!("{} bytes after the metadata snapshot", rest.len()))
                }
            }
            Some((&version @ (META_SNAPSHOT_VERSION_V2 | META_SNAPSHOT_VERSION), body)) => {
                let (mut state, rest) = postcard::take_from_bytes::<MetaState>(body)
                    .map_err(|e| format!("metadata snapshot does not decode: {e}"))?;
                state.queues_total = state.topics.values().map(Vec::len).sum();
                let (nodes, rest) = postcard::take_from_bytes::<BTreeMap<NodeId, NodeRecord>>(rest)
                    .map_err(|e| format!("metadata snapshot's node table: {e}"))?;
                if nodes.len() > NODES_RECORDED_MAX {
                    return Err(format!(
                        "metadata snapshot's node table holds {} records, more than \
                         {NODES_RECORDED_MAX}",
                        nodes.len()
                    ));
                }
                state.nodes = nodes;
                let rest = if version == META_SNAPSHOT_VERSION {
                    let (groups, rest) =
                        postcard::take_from_bytes::<BTreeMap<GroupId, Vec<NodeId>>>(rest)
                            .map_err(|e| format!("metadata snapshot's broker groups: {e}"))?;
                    if groups.len() > BROKER_GROUPS_MAX
                        || groups.values().any(|v| v.len() > GROUP_MEMBERS_MAX)
                    {
                        return Err(format!(
                            "metadata snapshot's {} broker groups exceed {BROKER_GROUPS_MAX} \
                             groups of {GROUP_MEMBERS_MAX} voters",
                            groups.len()
                        ));
                    }
                    state.broker_groups = groups;
                    rest
                } else {
                    rest
                };
                if rest.is_empty() {
                    Ok(state)
                } else {
                    Err(format!("{} bytes after the metadata snapshot", rest.len()))
                }
            }
            Some((version, _)) => Err(format!("metadata snapshot of unknown version {version}")),
            None => Err("empty metadata snapshot".into()),
        }
    }

    /// Why a `CreateTopic` of `queues` queues named `topic` would be refused, checked against
    /// the applied table; `Ok(Existed)` when it exists with that count. The node checks it
    /// before proposing, and `apply` again, as two creations may race in one batch.
    pub fn check_create(
        &self,
        topic: &str,
        queues: u32,
        broker_groups: &[GroupId],
    ) -> Result<TopicApplied, String> {
        check_name("topic", topic)?;
        self.check_table(topic, queues, broker_groups)
    }

    /// What `apply` checks: everything but the name. A name cannot race (the node checks it
    /// before proposing), and a rule that refused names committed under an older build would
    /// drop their topics from a replica that replays its log but not from one that restored a
    /// snapshot holding them: replicas must never diverge, so names are not checked here.
    fn check_table(
        &self,
        topic: &str,
        queues: u32,
        broker_groups: &[GroupId],
    ) -> Result<TopicApplied, String> {
        if let Some(existing) = self.topics.get(topic) {
            let count = existing.len();
            return if count == queues as usize {
                Ok(TopicApplied::Existed)
            } else {
                Err(format!(
                    "topic {topic} exists with {count} queues, not the {queues} asked for"
                ))
            };
        }
        if queues == 0 || queues > QUEUES_PER_TOPIC_MAX {
            return Err(format!(
                "a topic has 1 to {QUEUES_PER_TOPIC_MAX} queues, not {queues}"
            ));
        }
        if broker_groups.is_empty() && self.broker_groups.is_empty() {
            return Err("the cluster has no broker group to place queues in".into());
        }
        if self.topics.len() >= TOPICS_MAX {
            return Err(format!(
                "the cluster holds the maximum of {TOPICS_MAX} topics"
            ));
        }
        if self.queues_total + queues as usize > QUEUES_MAX {
            return Err(format!(
                "{queues} more queues would exceed the maximum of {QUEUES_MAX} over all topics \
                 ({} exist)",
                self.queues_total
            ));
        }
        Ok(TopicApplied::Created)
    }

    /// Places the topic's queues round-robin over `broker_groups`, starting after the
    /// previous topic's start so that topics spread too. Creating an existing topic with the
    /// same count keeps its placement; everything [`MetaState::check_create`] refuses but the
    /// name changes nothing and comes back as the reason.
    pub fn apply(
        &mut self,
        command: MetaCommand,
        broker_groups: &[GroupId],
    ) -> Result<TopicApplied, String> {
        match command {
            MetaCommand::CreateTopic { topic, queues } => {
                let applied = self.check_table(&topic, queues, broker_groups)?;
                if applied == TopicApplied::Existed {
                    return Ok(applied);
                }
                let start = self.topics.len();
                // Those added at runtime too (the first configuration's alone, as before, until
                // one is): existing topics' queues stay where they are.
                let groups = self.all_broker_groups(broker_groups);
                let placement = (0..queues as usize)
                    .map(|q| groups[(start + q) % groups.len()])
                    .collect();
                self.epoch += 1;
                self.epochs.insert(topic.clone(), self.epoch);
                self.topics.insert(topic, placement);
                self.queues_total += queues as usize;
                Ok(applied)
            }
            MetaCommand::DeleteTopic { topic } => {
                let Some(groups) = self.topics.remove(&topic) else {
                    return Err(format!("unknown topic {topic:?}"));
                };
                self.queues_total -= groups.len();
                let epoch = self.epochs.remove(&topic).unwrap_or(0);
                self.epoch += 1;
                if !self.tombstones.contains_key(&topic) && self.tombstones.len() >= TOMBSTONES_MAX
                {
                    // The tombstone deleted longest ago (lowest epoch) is forgotten.
                    if let Some(oldest) = self
                        .tombstones
                        .iter()
                        .min_by_key(|(_, e)| **e)
                        .map(|(t, _)| t.clone())
                    {
                        self.tombstones.remove(&oldest);
                    }
                }
                self.tombstones.insert(topic, epoch);
                Ok(TopicApplied::Deleted {
                    queues: groups.len() as u32,
                })
            }
            MetaCommand::AddNode { .. }
            | MetaCommand::RemoveNode { .. }
            | MetaCommand::AddBrokerGroup { .. } => {
                Err("a node-table command is applied by apply_node".into())
            }
        }
    }

    /// Why deleting `topic` would be refused on the applied table (it does not exist).
    pub fn check_delete(&self, topic: &str) -> Result<u32, String> {
        check_name("topic", topic)?;
        match self.topics.get(topic) {
            Some(groups) => Ok(groups.len() as u32),
            None => Err(format!("unknown topic {topic:?}")),
        }
    }

    /// The epoch of live `topic`'s incarnation (0 for a topic created before epochs).
    pub fn epoch_of(&self, topic: &str) -> u64 {
        self.epochs.get(topic).copied().unwrap_or(0)
    }

    /// Every deleted topic with the epoch of its deleted incarnation: queues of that epoch or
    /// older must not exist in any broker group.
    pub fn tombstones(&self) -> impl Iterator<Item = (&str, u64)> {
        self.tombstones.iter().map(|(t, e)| (t.as_str(), *e))
    }

    /// Why adding node `id` at these addresses would be refused, against the applied table;
    /// `Ok(Unchanged)` when it is there already with them. `initial` are the nodes of the
    /// cluster's first configuration, whose addresses come from their configs.
    pub fn check_add_node(
        &self,
        id: NodeId,
        client_addr: &str,
        peer_addr: &str,
    ) -> Result<NodeApplied, String> {
        if id == 0 {
            return Err("node ids start at 1".into());
        }
        for (what, addr) in [("client", client_addr), ("peer", peer_addr)] {
            if addr.is_empty()
                || addr.len() > NODE_ADDR_BYTES_MAX
                || addr.chars().any(char::is_whitespace)
            {
                return Err(format!(
                    "node {id}'s {what} address {addr:?} is not host:port of at most \
                     {NODE_ADDR_BYTES_MAX} bytes"
                ));
            }
        }
        match self.nodes.get(&id) {
            Some(record) if record.removed => Err(format!(
                "node {id} was removed from this cluster and its id is never used again: give \
                 the new node another id"
            )),
            Some(record) if record.client_addr == client_addr && record.peer_addr == peer_addr => {
                Ok(NodeApplied::Unchanged)
            }
            Some(record) => Err(format!(
                "node {id} is recorded at {} (peers {}), not {client_addr} (peers {peer_addr}); \
                 remove it first",
                record.client_addr, record.peer_addr
            )),
            None if self.nodes.len() >= NODES_RECORDED_MAX => Err(format!(
                "the node table holds the maximum of {NODES_RECORDED_MAX} records"
            )),
            None => {
                let clash = self.nodes.values().find(|r| {
                    !r.removed
                        && (r.client_addr == client_addr
                            || r.peer_addr == peer_addr
                            || r.client_addr == peer_addr
                            || r.peer_addr == client_addr)
                });
                match clash {
                    Some(r) => Err(format!(
                        "node {} already uses address {client_addr} or {peer_addr}",
                        r.id
                    )),
                    None => Ok(NodeApplied::Changed),
                }
            }
        }
    }

    /// Applies a node-table command (`AddNode`, `RemoveNode`, `AddBrokerGroup`; `initial_groups`
    /// are the broker groups of the first configuration); a refusal changes nothing.
    pub fn apply_node(
        &mut self,
        command: MetaCommand,
        initial_groups: &[GroupId],
    ) -> Result<NodeApplied, String> {
        match command {
            MetaCommand::AddNode {
                id,
                client_addr,
                peer_addr,
            } => {
                let applied = self.check_add_node(id, &client_addr, &peer_addr)?;
                if applied == NodeApplied::Changed {
                    self.nodes.insert(
                        id,
                        NodeRecord {
                            id,
                            client_addr,
                            peer_addr,
                            removed: false,
                        },
                    );
                }
                Ok(applied)
            }
            MetaCommand::RemoveNode { id } => match self.nodes.get(&id).map(|r| r.removed) {
                Some(true) => Ok(NodeApplied::Unchanged),
                Some(false) => {
                    if let Some(record) = self.nodes.get_mut(&id) {
                        record.removed = true;
                    }
                    Ok(NodeApplied::Changed)
                }
                None if self.nodes.len() >= NODES_RECORDED_MAX => Err(format!(
                    "the node table holds the maximum of {NODES_RECORDED_MAX} records"
                )),
                None => {
                    self.nodes.insert(
                        id,
                        NodeRecord {
                            id,
                            client_addr: String::new(),
                            peer_addr: String::new(),
                            removed: true,
                        },
                    );
                    Ok(NodeApplied::Changed)
                }
            },
            MetaCommand::AddBrokerGroup { group, voters } => {
                let applied = self.check_add_group(group, &voters, initial_groups)?;
                if applied == NodeApplied::Changed {
                    self.broker_groups.insert(group, voters);
                }
                Ok(applied)
            }
            MetaCommand::CreateTopic { .. } | MetaCommand::DeleteTopic { .. } => {
                Err("a topic command is applied by apply".into())
            }
        }
    }

    /// Every broker group in id order: `initial` (the first configuration's, from the node's
    /// config) and those added at runtime.
    pub fn all_broker_groups(&self, initial: &[GroupId]) -> Vec<GroupId> {
        let mut all: Vec<GroupId> = initial.to_vec();
        all.extend(self.broker_groups.keys().copied());
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The broker groups added at runtime, with their first voters.
    pub fn added_broker_groups(&self) -> impl Iterator<Item = (GroupId, &[NodeId])> {
        self.broker_groups.iter().map(|(g, v)| (*g, v.as_slice()))
    }

    /// The id a new broker group gets when the operator names none: one past the highest.
    pub fn next_broker_group(&self, initial: &[GroupId]) -> GroupId {
        self.all_broker_groups(initial)
            .last()
            .map_or(1, |g| g.saturating_add(1))
    }

    /// Why adding broker group `group` with `voters` would be refused against the applied
    /// table; `Ok(Unchanged)` when it was added already with those voters (a retry). Whether
    /// the voters are nodes of the cluster is the proposer's check (it needs the first
    /// configuration's nodes, which a joined node's config may not list the same way), so
    /// `apply` checks only what the table alone decides.
    pub fn check_add_group(
        &self,
        group: GroupId,
        voters: &[NodeId],
        initial_groups: &[GroupId],
    ) -> Result<NodeApplied, String> {
        if group == METADATA_GROUP {
            return Err("group 0 is the metadata group; broker groups are numbered from 1".into());
        }
        if let Some(existing) = self.broker_groups.get(&group) {
            return if existing == voters {
                Ok(NodeApplied::Unchanged)
            } else {
                Err(format!(
                    "broker group {group} exists already, with voters {existing:?}"
                ))
            };
        }
        if initial_groups.contains(&group) {
            return Err(format!(
                "broker group {group} exists already (a group of the first configuration)"
            ));
        }
        let total = self.all_broker_groups(initial_groups).len();
        if total >= BROKER_GROUPS_MAX {
            return Err(format!(
                "the cluster has {total} broker groups, the maximum of {BROKER_GROUPS_MAX}"
            ));
        }
        if voters.is_empty() || voters.len() > GROUP_MEMBERS_MAX {
            return Err(format!(
                "a broker group has 1 to {GROUP_MEMBERS_MAX} voters, not {}",
                voters.len()
            ));
        }
        let mut sorted = voters.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != voters.len() {
            return Err(format!("voters {voters:?} name a node twice"));
        }
        if let Some(removed) = voters
            .iter()
            .find(|v| self.nodes.get(v).is_some_and(|r| r.removed))
        {
            return Err(format!(
                "node {removed} was removed from this cluster and cannot be a voter"
            ));
        }
        Ok(NodeApplied::Changed)
    }

    /// The node table: nodes added at runtime, and ids removed, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// The broker group that holds `queue`, if the table has it.
    pub fn group_of(&self, queue: &QueueId) -> Option<GroupId> {
        self.topics
            .get(&*queue.topic)?
            .get(usize::try_from(queue.queue).ok()?)
            .copied()
    }

    /// Each queue of `topic` with the broker group that holds it.
    pub fn placement(&self, topic: &str) -> Option<Vec<(QueueId, GroupId)>> {
        let groups = self.topics.get(topic)?;
        Some(
            groups
                .iter()
                .enumerate()
                .map(|(q, g)| (QueueId::new(topic, q as u32), *g))
                .collect(),
        )
    }

    /// Every topic with its queue count.
    pub fn topics(&self) -> Vec<(String, u32)> {
        self.topics
            .iter()
            .map(|(name, groups)| (name.clone(), groups.len() as u32))
            .collect()
    }

    /// Every queue placed in `group`.
    pub fn queues_of(&self, group: GroupId) -> Vec<QueueId> {
        self.topics
            .iter()
            .flat_map(|(topic, groups)| {
                groups
                    .iter()
                    .enumerate()
                    .filter(move |(_, g)| **g == group)
                    .map(move |(q, _)| QueueId::new(topic.clone(), q as u32))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_queues_over_all_topics_are_bounded() {
        let groups = [1, 2, 3];
        let mut meta = MetaState::default();
        let per_topic = QUEUES_PER_TOPIC_MAX as usize;
        for t in 0..QUEUES_MAX / per_topic {
            let command = MetaCommand::CreateTopic {
                topic: format!("big{t}"),
                queues: QUEUES_PER_TOPIC_MAX,
            };
            assert_eq!(meta.apply(command, &groups), Ok(TopicApplied::Created));
        }
        let one_more = MetaCommand::CreateTopic {
            topic: "one-more".into(),
            queues: 1,
        };
        let refused = meta.apply(one_more, &groups);
        assert!(
            refused
                .as_ref()
                .is_err_and(|why| why.contains("maximum of 65536")),
            "{refused:?}"
        );
        // The count survives a snapshot, where it is not stored.
        let restored = MetaState::restore(&meta.snapshot()).expect("restores");
        assert_eq!(restored.queues_total, QUEUES_MAX);

        let mut meta = MetaState::default();
        for t in 0..TOPICS_MAX {
            let command = MetaCommand::CreateTopic {
                topic: format!("t{t}"),
                queues: 1,
            };
            assert_eq!(meta.apply(command, &groups), Ok(TopicApplied::Created));
        }
        let refused = meta.check_create("late", 1, &groups);
        assert!(
            refused
                .as_ref()
                .is_err_and(|why| why.contains("maximum of 10000 topics")),
            "{refused:?}"
        );
        // An existing one is still answered as such.
        assert_eq!(
            meta.check_create("t7", 1, &groups),
            Ok(TopicApplied::Existed)
        );
        assert!(meta.check_create("t7", 2, &groups).is_err());
        assert!(meta.check_create("fresh", 1, &[]).is_err());
    }

    #[test]
    fn a_name_committed_by_an_older_build_applies_as_it_did() {
        let mut meta = MetaState::default();
        assert!(meta.check_create("old name/1", 2, &[1]).is_err());
        let command = MetaCommand::CreateTopic {
            topic: "old name/1".into(),
            queues: 2,
        };
        // Replaying the log gives the table a snapshot of it holds.
        assert_eq!(meta.apply(command, &[1]), Ok(TopicApplied::Created));
        assert_eq!(meta.topics(), vec![("old name/1".to_string(), 2)]);
    }

    #[test]
    fn a_deleted_topic_leaves_a_tombstone_and_comes_back_as_a_newer_incarnation() {
        let mut meta = MetaState::default();
        let create = |queues| MetaCommand::CreateTopic {
            topic: "orders".into(),
            queues,
        };
        let delete = || MetaCommand::DeleteTopic {
            topic: "orders".into(),
        };
        assert_eq!(meta.apply(create(3), &[1, 2]), Ok(TopicApplied::Created));
        let first = meta.epoch_of("orders");
        assert!(first > 0);
        assert_eq!(meta.check_delete("orders"), Ok(3));
        assert_eq!(
            meta.apply(delete(), &[1, 2]),
            Ok(TopicApplied::Deleted { queues: 3 })
        );
        assert!(meta.placement("orders").is_none());
        assert!(meta.topics().is_empty());
        assert_eq!(meta.queues_total, 0);
        assert_eq!(
            meta.tombstones().collect::<Vec<_>>(),
            vec![("orders", first)]
        );
        // Deleting again, or something never created, is refused and changes nothing.
        assert!(meta.apply(delete(), &[1, 2]).is_err());
        assert!(meta.check_delete("orders").is_err());
        assert!(meta.check_delete("bad name").is_err());
        // Another queue count is fine now: it is a new topic.
        assert_eq!(meta.apply(create(2), &[1, 2]), Ok(TopicApplied::Created));
        assert!(meta.epoch_of("orders") > first);
        assert_eq!(
            meta.tombstones().collect::<Vec<_>>(),
            vec![("orders", first)]
        );
        // Epochs and tombstones survive a snapshot; the count of queues is rebuilt.
        let restored = MetaState::restore(&meta.snapshot()).expect("restores");
        assert_eq!(restored.epoch_of("orders"), meta.epoch_of("orders"));
        assert_eq!(restored.tombstones().count(), 1);
        assert_eq!(restored.queues_total, 2);
        assert_eq!(restored.epoch, meta.epoch);
    }

    #[test]
    fn a_version_1_snapshot_restores_with_topics_of_epoch_0() {
        #[derive(Serialize)]
        struct V1<'a> {
            topics: &'a BTreeMap<String, Vec<GroupId>>,
        }
        let topics: BTreeMap<String, Vec<GroupId>> =
            [("orders".to_string(), vec![1, 2])].into_iter().collect();
        let mut bytes = vec![1];
        bytes.extend(postcard::to_allocvec(&V1 { topics: &topics }).expect("encodes"));
        let mut meta = MetaState::restore(&bytes).expect("restores");
        assert_eq!(meta.topics(), vec![("orders".to_string(), 2)]);
        assert_eq!(meta.epoch_of("orders"), 0);
        assert_eq!(
            meta.apply(
                MetaCommand::DeleteTopic {
                    topic: "orders".into()
                },
                &[1]
            ),
            Ok(TopicApplied::Deleted { queues: 2 })
        );
        assert_eq!(meta.tombstones().collect::<Vec<_>>(), vec![("orders", 0)]);
    }

    #[test]
    fn tombstones_are_bounded() {
        let mut meta = MetaState::default();
        for t in 0..TOMBSTONES_MAX + 5 {
            let topic = format!("t{t}");
            let create = MetaCommand::CreateTopic {
                topic: topic.clone(),
                queues: 1,
            };
            assert_eq!(meta.apply(create, &[1]), Ok(TopicApplied::Created));
            let delete = MetaCommand::DeleteTopic { topic };
            assert!(meta.apply(delete, &[1]).is_ok());
        }
        assert_eq!(meta.tombstones().count(), TOMBSTONES_MAX);
        // The oldest went first.
        assert!(meta.tombstones().all(|(t, _)| t != "t0" && t != "t4"));
        assert!(meta.tombstones().any(|(t, _)| t == "t5"));
    }

    #[test]
    fn the_node_table_survives_a_snapshot_and_a_version_1_snapshot_still_reads() {
        let mut meta = MetaState::default();
        let create = MetaCommand::CreateTopic {
            topic: "orders".into(),
            queues: 2,
        };
        assert_eq!(meta.apply(create, &[1]), Ok(TopicApplied::Created));
        // A version 1 snapshot: the topic table alone.
        #[derive(Serialize)]
        struct V1<'a> {
            topics: &'a BTreeMap<String, Vec<GroupId>>,
        }
        let mut v1 = vec![1];
        v1.extend(
            postcard::to_allocvec(&V1 {
                topics: &meta.topics,
            })
            .expect("encodes"),
        );
        let add = MetaCommand::AddNode {
            id: 4,
            client_addr: "h:1".into(),
            peer_addr: "h:2".into(),
        };
        assert_eq!(meta.apply_node(add, &[1]), Ok(NodeApplied::Changed));
        assert_eq!(
            meta.apply_node(MetaCommand::RemoveNode { id: 2 }, &[1]),
            Ok(NodeApplied::Changed)
        );
        let restored = MetaState::restore(&meta.snapshot()).expect("restores");
        let nodes: Vec<_> = restored.nodes().map(|r| (r.id, r.removed)).collect();
        assert_eq!(nodes, vec![(2, true), (4, false)]);
        assert_eq!(restored.topics(), meta.topics());
        let old = MetaState::restore(&v1).expect("a version 1 snapshot reads");
        assert_eq!(old.nodes().count(), 0);
        assert_eq!(old.topics(), meta.topics());
        // Bad addresses and a removed id are refused.
        assert!(meta.check_add_node(5, "a b:1", "h:3").is_err());
        assert!(
            meta.check_add_node(5, "h:1", "h:9").is_err(),
            "node 4 uses h:1"
        );
        assert!(
            meta.check_add_node(2, "h:5", "h:6").is_err(),
            "2 was removed"
        );
    }

    #[test]
    fn an_added_broker_group_takes_new_topics_survives_a_snapshot_and_a_v2_snapshot_reads() {
        let initial = [1, 2];
        let mut meta = MetaState::default();
        let create = |topic: &str, queues| MetaCommand::CreateTopic {
            topic: topic.into(),
            queues,
        };
        assert_eq!(
            meta.apply(create("old", 3), &initial),
            Ok(TopicApplied::Created)
        );
        // A version 2 snapshot as that build wrote it: the topic table with epochs and
        // tombstones, then the node table, nothing after.
        #[derive(Serialize)]
        struct V2<'a> {
            topics: &'a BTreeMap<String, Vec<GroupId>>,
            epochs: &'a BTreeMap<String, u64>,
            tombstones: &'a BTreeMap<String, u64>,
            epoch: u64,
        }
        let add_node = MetaCommand::AddNode {
            id: 4,
            client_addr: "h:1".into(),
            peer_addr: "h:2".into(),
        };
        assert_eq!(
            meta.apply_node(add_node, &initial),
            Ok(NodeApplied::Changed)
        );
        let mut v2 = vec![2];
        v2.extend(
            postcard::to_allocvec(&V2 {
                topics: &meta.topics,
                epochs: &meta.epochs,
                tombstones: &meta.tombstones,
                epoch: meta.epoch,
            })
            .expect("encodes"),
        );
        v2.extend(postcard::to_allocvec(&meta.nodes).expect("encodes"));

        assert_eq!(meta.next_broker_group(&initial), 3);
        let add = |group, voters: &[NodeId]| MetaCommand::AddBrokerGroup {
            group,
            voters: voters.to_vec(),
        };
        assert_eq!(
            meta.apply_node(add(3, &[1, 2, 4]), &initial),
            Ok(NodeApplied::Changed)
        );
        // The same again (a retry) changes nothing; other voters for it are refused.
        assert_eq!(
            meta.apply_node(add(3, &[1, 2, 4]), &initial),
            Ok(NodeApplied::Unchanged)
        );
        let refusal = |result: Result<NodeApplied, String>, needle: &str| {
            assert!(
                result.as_ref().is_err_and(|why| why.contains(needle)),
                "{result:?} does not say {needle:?}"
            );
        };
        refusal(meta.apply_node(add(3, &[1]), &initial), "exists already");
        refusal(
            meta.apply_node(add(2, &[1]), &initial),
            "first configuration",
        );
        refusal(meta.apply_node(add(0, &[1]), &initial), "metadata group");
        refusal(meta.apply_node(add(5, &[]), &initial), "voters");
        refusal(meta.apply_node(add(5, &[1, 1]), &initial), "twice");
        assert_eq!(
            meta.apply_node(MetaCommand::RemoveNode { id: 4 }, &initial),
            Ok(NodeApplied::Changed)
        );
        refusal(meta.apply_node(add(5, &[1, 4]), &initial), "removed");
        assert_eq!(meta.all_broker_groups(&initial), vec![1, 2, 3]);

        // Topics created from now on place over the three; the old one stays where it was.
        let old_placement = meta.placement("old");
        assert_eq!(
            meta.apply(create("new", 3), &initial),
            Ok(TopicApplied::Created)
        );
        let mut groups: Vec<GroupId> = meta
            .placement("new")
            .expect("placed")
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        groups.sort_unstable();
        assert_eq!(groups, vec![1, 2, 3]);
        assert_eq!(meta.placement("old"), old_placement);
        assert!(old_placement.expect("placed").iter().all(|(_, g)| *g != 3));

        // Version 3 round trip; version 2 reads with no added group.
        let restored = MetaState::restore(&meta.snapshot()).expect("restores");
        assert_eq!(
            restored.added_broker_groups().collect::<Vec<_>>(),
            vec![(3, &[1, 2, 4][..])]
        );
        assert_eq!(restored.placement("new"), meta.placement("new"));
        assert_eq!(restored.snapshot(), meta.snapshot());
        let old = MetaState::restore(&v2).expect("a version 2 snapshot reads");
        assert_eq!(old.added_broker_groups().count(), 0);
        assert_eq!(old.topics(), vec![("old".to_string(), 3)]);
        assert_eq!(old.nodes().count(), 1);
        assert_eq!(old.epoch_of("old"), meta.epoch_of("old"));
        // Trailing bytes after a version 2 body are still refused.
        let mut long = v2.clone();
        long.push(0);
        assert!(MetaState::restore(&long).is_err());
    }

    #[test]
    fn broker_groups_are_bounded() {
        let initial: Vec<GroupId> = (1..=60).collect();
        let mut meta = MetaState::default();
        for group in 61..=BROKER_GROUPS_MAX as GroupId {
            let command = MetaCommand::AddBrokerGroup {
                group,
                voters: vec![1, 2, 3],
            };
            assert_eq!(meta.apply_node(command, &initial), Ok(NodeApplied::Changed));
        }
        let group = meta.next_broker_group(&initial);
        let refused = meta.check_add_group(group, &[1, 2, 3], &initial);
        assert!(
            refused
                .as_ref()
                .is_err_and(|why| why.contains("maximum of 64")),
            "{refused:?}"
        );
        // A snapshot claiming more is refused, not believed.
        let mut bytes = meta.snapshot();
        let mut too_many = meta.clone();
        too_many.broker_groups.insert(1_000, vec![1]);
        too_many
            .broker_groups
            .extend((2_000..2_100).map(|g| (g, vec![1])));
        assert!(MetaState::restore(&too_many.snapshot()).is_err());
        bytes.truncate(bytes.len() - 1);
        assert!(MetaState::restore(&bytes).is_err());
    }

    #[test]
    fn group_of_finds_a_queue_without_copying_the_topic() {
        let mut meta = MetaState::default();
        let command = MetaCommand::CreateTopic {
            topic: "orders".into(),
            queues: 3,
        };
        assert_eq!(meta.apply(command, &[1, 2]), Ok(TopicApplied::Created));
        assert_eq!(meta.group_of(&QueueId::new("orders", 1)), Some(2));
        assert_eq!(meta.group_of(&QueueId::new("orders", 3)), None);
        assert_eq!(meta.group_of(&QueueId::new("other", 0)), None);
    }
}
