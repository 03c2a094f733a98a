//! Structure-aware fuzzing of one Raft group: see `holdfast_fuzz::run_raft_messages`.
//! Seed corpus: `fuzz/corpus/raft_messages` (pass it after a scratch directory, which
//! receives what the fuzzer finds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::raft_messages(data);
});
