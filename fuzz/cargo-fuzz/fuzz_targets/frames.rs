//! Frame decoding of an arbitrary byte stream in arbitrary pieces: see `holdfast_fuzz::run_frames`.
//! Seed corpus: `fuzz/corpus/frames` (pass it after a scratch directory, which
//! receives what the fuzzer finds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::frames(data);
});
