//! Log and hard-state recovery over arbitrary and damaged bytes: see
//! `holdfast_fuzz::run_log_recovery`.
//! Seed corpus: `fuzz/corpus/log_recovery` (pass it after a scratch directory, which
//! receives what the fuzzer finds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::log_recovery(data);
});
