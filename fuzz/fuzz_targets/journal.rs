#![no_main]
//! See `switchyard::fuzzing::journal`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::journal(data));
