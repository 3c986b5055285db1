//! Arbitrary bytes, arbitrarily chunked, through the frame decoder; see
//! `agentd::fuzzing::frame_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| agentd::fuzzing::frame_decoder(data));
