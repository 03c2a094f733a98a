//! The core's recovery decisions over arbitrary directory listings: see
//! `holdfast_fuzz::run_plan_recovery`.
//! Seed corpus: `fuzz/corpus/plan_recovery` (pass it after a scratch directory, which
//! receives what the fuzzer finds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::plan_recovery(data);
});
