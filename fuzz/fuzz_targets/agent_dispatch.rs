//! Scripts of frames — structured EXEC/STDIN/SIGNAL/… and raw garbage —
//! through a real in-process agent that spawns harmless programs; see
//! `agentd::fuzzing::agent_dispatch`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| agentd::fuzzing::agent_dispatch(data));
