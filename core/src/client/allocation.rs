//! Which queues a consumer owns: every member computes the same answer from the same sorted
//! member and queue lists (RocketMQ's AllocateMessageQueueAveragely).

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
        for size in 1..6 {
            let members: Vec<String> = (0..size).map(|i| format!("m{i}")).collect();
            let mut owned: Vec<u32> = members
                .iter()
                .flat_map(|m| allocate(&queues, &members, m).iter().copied())
                .collect();
            owned.sort();
            assert_eq!(owned, queues, "{size} members");
        }
        assert!(allocate(&queues, &["a".into()], "stranger").is_empty());
    }
}
