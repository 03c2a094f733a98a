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
}
