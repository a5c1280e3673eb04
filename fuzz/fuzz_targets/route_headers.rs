#![no_main]
//! See `switchyard::fuzzing::route_headers`: a record and the headers a
//! route decision adds to it.
libfuzzer_sys::fuzz_target!(|input: (Vec<u8>, Vec<(String, Vec<u8>)>)| {
    switchyard::fuzzing::route_headers(&input.0, input.1)
});
