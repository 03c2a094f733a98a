//! A whole node: replicas of the metadata group and of every broker group, the state machines
//! applied from their logs, and the client protocol on top. The shell and the simulator both
//! drive exactly this.

mod balance;
mod broker_node;
mod membership;
mod metadata;
pub mod protocol;
mod seen_requests;
mod stats;

pub use broker_node::{
    BrokerNode, NodeConfig, NodeEvent, NodeFault, SEND_BYTES_MAX, SnapshotJob, StoreRead,
    TransferJob, decode_entry,
};
pub use metadata::{
    METADATA_GROUP, MetaCommand, MetaState, NodeApplied, NodeRecord, QUEUES_PER_TOPIC_MAX,
    TopicApplied,
};
pub use stats::{
    CONSUMER_COUNTERS_MAX, ConsumerCounters, ConsumerStats, GroupCounters, GroupStats, LagStats,
    NodeStats, QueueStats, STATS_QUEUES_MAX, TopicCounters,
};

#[cfg(test)]
mod tests;
