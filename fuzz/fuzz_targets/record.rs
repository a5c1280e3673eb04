#![no_main]
//! See `switchyard::fuzzing::record`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::record(data));
