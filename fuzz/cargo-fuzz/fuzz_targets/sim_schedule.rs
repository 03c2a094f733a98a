//! Whole simulated clusters with fuzzer-chosen options: see `holdfast_fuzz::run_sim_schedule`.
//! Seed corpus: `fuzz/corpus/sim_schedule` (pass it after a scratch directory, which
//! receives what the fuzzer finds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::sim_schedule(data);
});
