//! The broker state machine against a reference model: see `holdfast_fuzz::run_broker`.
//! Seed corpus: `fuzz/corpus/broker` (pass it after a scratch directory, which
//! receives what the fuzzer finds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::broker(data);
});
