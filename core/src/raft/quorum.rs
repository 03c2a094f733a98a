//! Majority arithmetic, kept apart so it can be read (and property-tested) on its own.

use super::types::Index;

/// The smallest number of voters that is a majority of `voters`.
pub(super) fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// The highest index that at least `quorum` of `match_indexes` have reached.
pub(super) fn quorum_index(match_indexes: &mut [Index], quorum: usize) -> Index {
    if quorum == 0 || quorum > match_indexes.len() {
        return 0;
    }
    match_indexes.sort_unstable_by(|a, b| b.cmp(a));
    match_indexes[quorum - 1]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn majority_of_small_groups() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(2), 2);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(majority(5), 3);
    }

    #[test]
    fn quorum_index_is_the_highest_index_a_majority_holds() {
        assert_eq!(quorum_index(&mut [5, 1, 3], 2), 3);
        assert_eq!(quorum_index(&mut [5, 5, 1], 2), 5);
        assert_eq!(quorum_index(&mut [9, 2, 7, 4, 0], 3), 4);
        assert_eq!(quorum_index(&mut [9], 1), 9);
        assert_eq!(quorum_index(&mut [9, 1], 3), 0);
    }

    /// How many of `match_indexes` have reached `index`.
    fn holders(match_indexes: &[Index], index: Index) -> usize {
        match_indexes.iter().filter(|&&m| m >= index).count()
    }

    /// The definition, by brute force: the largest index (0 if none) that at least `quorum`
    /// voters hold. Only indexes someone holds can be the answer, so those are the candidates.
    fn brute_force_quorum_index(match_indexes: &[Index], quorum: usize) -> Index {
        if quorum == 0 {
            return 0;
        }
        match_indexes
            .iter()
            .copied()
            .filter(|&i| holders(match_indexes, i) >= quorum)
            .max()
            .unwrap_or(0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn majority_is_the_smallest_count_that_two_of_cannot_both_miss(voters in 1..64usize) {
            let brute = (1..=voters).find(|k| 2 * k > voters);
            prop_assert_eq!(Some(majority(voters)), brute);
            // Two majorities always share a voter; a majority minus one is not a majority.
            prop_assert!(2 * majority(voters) > voters);
            prop_assert!(2 * (majority(voters) - 1) <= voters);
        }

        #[test]
        fn quorum_index_is_the_largest_index_a_quorum_holds(
            match_indexes in prop::collection::vec(0..20u64, 0..9),
            quorum in 0..10usize,
        ) {
            let mut sorted = match_indexes.clone();
            let index = quorum_index(&mut sorted, quorum);
            if quorum == 0 || quorum > match_indexes.len() {
                prop_assert_eq!(index, 0);
            } else {
                prop_assert_eq!(index, brute_force_quorum_index(&match_indexes, quorum));
                prop_assert!(holders(&match_indexes, index) >= quorum);
                prop_assert!(holders(&match_indexes, index + 1) < quorum);
            }
        }

        /// What the leader commits from: with a majority of the voters as the quorum, the
        /// index is held by a majority and is no higher than what any voter holds.
        #[test]
        fn the_majority_index_is_held_by_a_majority(
            match_indexes in prop::collection::vec(0..50u64, 1..8),
        ) {
            let voters = match_indexes.len();
            let index = quorum_index(&mut match_indexes.clone(), majority(voters));
            prop_assert!(holders(&match_indexes, index) >= majority(voters));
            prop_assert!(index <= *match_indexes.iter().max().unwrap_or(&0));
        }

        /// A follower's progress never lowers the index, and neither does the voters' order.
        #[test]
        fn quorum_index_is_monotonic_and_order_blind(
            match_indexes in prop::collection::vec(0..30u64, 1..8),
            raised in any::<prop::sample::Index>(),
            by in 0..10u64,
            rotate in any::<prop::sample::Index>(),
        ) {
            let quorum = majority(match_indexes.len());
            let before = quorum_index(&mut match_indexes.clone(), quorum);
            let mut higher = match_indexes.clone();
            higher[raised.index(match_indexes.len())] += by;
            prop_assert!(quorum_index(&mut higher, quorum) >= before);
            let mut rotated = match_indexes.clone();
            rotated.rotate_left(rotate.index(match_indexes.len()));
            prop_assert_eq!(quorum_index(&mut rotated, quorum), before);
        }
    }
}
