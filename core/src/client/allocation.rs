//! How a consumer group's queues are shared out among its members. The metadata leader
//! computes it once per generation; members only follow what it says.

use serde::{Deserialize, Serialize};

/// A named, swappable way to share queues among members. Topic queues and retry queues are
/// allocated separately (each with the strategy), so N members of a topic with at least N
/// queues each get topic queues whatever the retry queues do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocationStrategy {
    /// Contiguous shares, the first `queues % members` members one queue more (RocketMQ's
    /// `AllocateMessageQueueAveragely`).
    #[default]
    Averagely,
    /// Queue `i` to member `i % members` (RocketMQ's `AllocateMessageQueueAveragelyByCircle`).
    Circle,
}

impl AllocationStrategy {
    pub fn name(self) -> &'static str {
        match self {
            AllocationStrategy::Averagely => "averagely",
            AllocationStrategy::Circle => "circle",
        }
    }

    pub fn from_name(name: &str) -> Option<AllocationStrategy> {
        [AllocationStrategy::Averagely, AllocationStrategy::Circle]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// The queues member number `me` of `members` owns, from `queues` (sorted the same way
    /// for every member). Every queue has exactly one owner when `members > 0`.
    pub fn share<Q: Clone>(self, queues: &[Q], members: usize, me: usize) -> Vec<Q> {
        if me >= members {
            return Vec::new();
        }
        match self {
            AllocationStrategy::Averagely => {
                let (n, m) = (queues.len(), members);
                let base = n / m;
                let extra = n % m;
                let start = me * base + me.min(extra);
                let len = base + usize::from(me < extra);
                queues.get(start..start + len).unwrap_or(&[]).to_vec()
            }
            AllocationStrategy::Circle => {
                queues.iter().skip(me).step_by(members).cloned().collect()
            }
        }
    }
}

/// The contiguous share of `queues` that `member` owns among `members` (both sorted the same
/// way by every member). A member not in the list owns nothing.
pub fn allocate<'a, Q>(queues: &'a [Q], members: &[String], member: &str) -> &'a [Q] {
    let Some(me) = members.iter().position(|m| m == member) else {
        return &[];
    };
    let (n, m) = (queues.len(), members.len());
    let base = n / m;
    let extra = n % m;
    let start = me * base + me.min(extra);
    let len = base + usize::from(me < extra);
    queues.get(start..start + len).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_has_exactly_one_owner() {
        let queues: Vec<u32> = (0..11).collect();
        for strategy in [AllocationStrategy::Averagely, AllocationStrategy::Circle] {
            for size in 1..6 {
                let mut owned: Vec<u32> = (0..size)
                    .flat_map(|me| strategy.share(&queues, size, me))
                    .collect();
                owned.sort();
                assert_eq!(owned, queues, "{} with {size} members", strategy.name());
                let fewest = (0..size)
                    .map(|me| strategy.share(&queues, size, me).len())
                    .min();
                assert_eq!(fewest, Some(11 / size), "{}", strategy.name());
            }
            assert!(strategy.share(&queues, 3, 3).is_empty());
            assert_eq!(
                AllocationStrategy::from_name(strategy.name()),
                Some(strategy)
            );
        }
        let members: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
        assert_eq!(allocate(&queues, &members, "m1"), &[4, 5, 6, 7]);
        assert!(allocate(&queues, &["a".into()], "stranger").is_empty());
    }

    /// `allocate` shares out as `Averagely` does: contiguous, one owner per queue, the first
    /// `queues % members` members one queue more, whatever the remainder (11 queues among 3
    /// members leave 2 over; among 4, 3; among 5, 1).
    #[test]
    fn allocate_gives_every_queue_one_owner_and_the_remainder_to_the_first_members() {
        let queues: Vec<u32> = (0..11).collect();
        for size in 1..8 {
            let members: Vec<String> = (0..size).map(|i| format!("m{i}")).collect();
            let shares: Vec<&[u32]> = members
                .iter()
                .map(|m| allocate(&queues, &members, m))
                .collect();
            assert_eq!(shares.concat(), queues, "{size} members: {shares:?}");
            for (me, share) in shares.iter().enumerate() {
                let expected = AllocationStrategy::Averagely.share(&queues, size, me);
                assert_eq!(share.to_vec(), expected, "member {me} of {size}");
                let extra = usize::from(me < queues.len() % size);
                assert_eq!(
                    share.len(),
                    queues.len() / size + extra,
                    "member {me} of {size}"
                );
            }
        }
    }
}
