//! The metadata group's state machine: the topic table, and where each queue lives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::broker::QueueId;
use crate::raft::GroupId;

/// The Raft group that holds the topic table; broker groups are numbered from 1.
pub const METADATA_GROUP: GroupId = 0;
/// More queues than this in one topic is a mistake, not a plan.
pub use crate::limits::QUEUES_PER_TOPIC_MAX;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    CreateTopic { topic: String, queues: u32 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetaState {
    /// Topic to the broker group of each of its queues.
    topics: BTreeMap<String, Vec<GroupId>>,
}

/// The first byte of a metadata snapshot, for the day its encoding changes.
const META_SNAPSHOT_VERSION: u8 = 1;

impl MetaState {
    /// The topic table's encoding, for a Raft snapshot; equal tables give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![META_SNAPSHOT_VERSION];
        // A table of strings and numbers always encodes.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    pub fn restore(bytes: &[u8]) -> Result<MetaState, String> {
        match bytes.split_first() {
            Some((&META_SNAPSHOT_VERSION, body)) => {
                let (state, rest) = postcard::take_from_bytes::<MetaState>(body)
                    .map_err(|e| format!("metadata snapshot does not decode: {e}"))?;
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

    /// Places the topic's queues round-robin over `broker_groups`, starting after the
    /// previous topic's start so that topics spread too. Creating an existing topic keeps its
    /// placement; returns false if it asked for a different number of queues.
    pub fn apply(&mut self, command: MetaCommand, broker_groups: &[GroupId]) -> bool {
        match command {
            MetaCommand::CreateTopic { topic, queues } => {
                if let Some(existing) = self.topics.get(&topic) {
                    return existing.len() == queues as usize;
                }
                if broker_groups.is_empty() || queues == 0 || queues > QUEUES_PER_TOPIC_MAX {
                    return false;
                }
                let start = self.topics.len();
                let placement = (0..queues as usize)
                    .map(|q| broker_groups[(start + q) % broker_groups.len()])
                    .collect();
                self.topics.insert(topic, placement);
                true
            }
        }
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
