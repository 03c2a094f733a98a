//! The exclusive-owner checker: a consumer group's queue is served to one member at a time.
//!
//! From what the members saw: member A holds a queue from a pull that brought it messages
//! until it sends a release or its lease can have expired. Member B being served messages of
//! that queue meanwhile is a violation, and so is two members being served one queue under the
//! same generation. Every bound is taken on the safe side so that a correct broker is never
//! accused: the broker renewed A's lease no earlier than A sent its pull (so A's lease lasts
//! at least until that send time plus the session timeout), and served B no later than B
//! received the answer; a release A sent before B's answer arrived may have been applied first.

use std::collections::BTreeMap;
use std::time::Duration;

use holdfast_core::broker::QueueId;
use holdfast_core::raft::GroupId;
use holdfast_core::time::Instant;

use crate::checker::{Violation, violation};

#[derive(Clone, Debug)]
struct Holder {
    consumer: u64,
    /// When it sent the latest pull that brought it messages.
    renewed: Instant,
    /// When it sent a release of this tenure, if it did.
    released: Option<Instant>,
}

#[derive(Default)]
struct QueueOwners {
    holder: Option<Holder>,
    /// Who was served under each generation.
    by_generation: BTreeMap<u64, u64>,
}

pub(crate) struct Ownership {
    session: Duration,
    queues: BTreeMap<(String, GroupId, QueueId), QueueOwners>,
}

impl Ownership {
    pub(crate) fn new(session_ms: u64) -> Ownership {
        Ownership {
            session: Duration::from_millis(session_ms),
            queues: BTreeMap::new(),
        }
    }

    /// `consumer` of `group` received, at `now`, messages from a pull it sent at `requested_at`
    /// under `generation`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn served(
        &mut self,
        now: Instant,
        group: &str,
        consumer: u64,
        broker: GroupId,
        queue: &QueueId,
        generation: u64,
        requested_at: Instant,
    ) -> Result<(), Violation> {
        let owners = self
            .queues
            .entry((group.to_string(), broker, queue.clone()))
            .or_default();
        let first = *owners.by_generation.entry(generation).or_insert(consumer);
        if first != consumer {
            return Err(violation(
                "exclusive-owner",
                format!(
                    "consumers {first} and {consumer} of {group} were both served {queue} of \
                     group {broker} under generation {generation}"
                ),
            ));
        }
        if let Some(holder) = &owners.holder
            && holder.consumer != consumer
        {
            let released = holder.released.is_some();
            let lease_ends = holder.renewed + self.session;
            if !released && now < lease_ends {
                return Err(violation(
                    "exclusive-owner",
                    format!(
                        "consumer {consumer} of {group} was served {queue} of group {broker} \
                         (generation {generation}) by {now}, while consumer {} held it without \
                         releasing it and its lease ran at least until {lease_ends}",
                        holder.consumer
                    ),
                ));
            }
        }
        match &mut owners.holder {
            Some(holder) if holder.consumer == consumer => {
                holder.renewed = holder.renewed.max(requested_at);
                holder.released = None;
            }
            slot => {
                *slot = Some(Holder {
                    consumer,
                    renewed: requested_at,
                    released: None,
                });
            }
        }
        Ok(())
    }

    /// `consumer` sent a release of the queue at `sent_at` (and heard it confirmed).
    pub(crate) fn released(
        &mut self,
        group: &str,
        consumer: u64,
        broker: GroupId,
        queue: &QueueId,
        sent_at: Instant,
    ) {
        if let Some(QueueOwners {
            holder: Some(holder),
            ..
        }) = self
            .queues
            .get_mut(&(group.to_string(), broker, queue.clone()))
            && holder.consumer == consumer
        {
            holder.released = Some(sent_at);
        }
    }
}
