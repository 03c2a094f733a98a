//! The metadata group's state machine: the topic table, and where each queue lives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::broker::QueueId;
use crate::limits::{QUEUES_MAX, TOPICS_MAX, check_name};
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
    /// Queues over all topics (derived from `topics`, so not in the snapshot).
    #[serde(skip)]
    queues_total: usize,
}

/// What applying a `CreateTopic` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicApplied {
    Created,
    /// The topic already existed with the same queue count; nothing changed.
    Existed,
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
                let (mut state, rest) = postcard::take_from_bytes::<MetaState>(body)
                    .map_err(|e| format!("metadata snapshot does not decode: {e}"))?;
                state.queues_total = state.topics.values().map(Vec::len).sum();
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
        if broker_groups.is_empty() {
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
                let placement = (0..queues as usize)
                    .map(|q| broker_groups[(start + q) % broker_groups.len()])
                    .collect();
                self.topics.insert(topic, placement);
                self.queues_total += queues as usize;
                Ok(applied)
            }
        }
    }

    /// The broker group that holds `queue`, if the table has it.
    pub fn group_of(&self, queue: &QueueId) -> Option<GroupId> {
        self.topics
            .get(&queue.topic)?
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
