//! Arbitrary payloads for every kind through the typed decoders; see
//! `agentd::fuzzing::message_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| agentd::fuzzing::message_decode(data));
