//! The `clock` extension in loopback (docs/PROTOCOL.md, "Extension
//! `clock`"): CLOCK_GET reads the guest's clocks; CLOCK_SET and ENTROPY
//! are refused (`not_permitted`), even as PID 1 of a pid namespace, so no
//! test ever changes this machine's clock. The VM suite sets the clock.

use agentd::messages::{ClockMsg, ClockSet, Message};

use crate::support::agent::*;
use crate::support::host::*;
use crate::support::msgpack::Value;

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i128
}

fn int(v: &Value, key: &str) -> i128 {
    v.get(key)
        .and_then(Value::as_int)
        .unwrap_or_else(|| panic!("no {key} in {v:?}"))
}

both! {
    /// READY carries the wall clock, the restore counter and whether the
    /// clock may be set (never in loopback); `clock` is served.
    fn ready_has_the_clock(opts: Opts) {
        let before = now_ns();
        let agent = Agent::start_with(opts);
        let after = now_ns();
        let t = int(&agent.ready, "realtime_ns");
        assert!(before - 1_000_000_000 <= t && t <= after + 1_000_000_000, "{t} not in [{before}, {after}]");
        assert_eq!(int(&agent.ready, "restores"), 0);
        assert_eq!(agent.ready.get("clock_set").and_then(Value::as_bool), Some(false));
        let features = agent.ready.get("features").expect("features");
        assert!(format!("{features:?}").contains("clock"));
    }

    /// CLOCK_GET answers on the request's id with both clocks; any id will
    /// do, even a running session's, which is unaffected.
    fn clock_get_reads_both_clocks(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        agent.exec(1, &cmd("cat", &[]));
        for id in [0, 1, 77] {
            let before = now_ns();
            agent.send(&Message::Clock(ClockMsg::Get), id);
            let f = agent.recv_where(|f| f.kind == 0x71 && f.id == id, "CLOCK");
            let after = now_ns();
            let v = crate::support::msgpack::decode(&f.payload).expect("a map");
            let t = int(&v, "realtime_ns");
            assert!(before <= t && t <= after, "{t} not in [{before}, {after}]");
            assert!(int(&v, "boottime_ns") > 0);
            assert_eq!(int(&v, "restores"), 0);
        }
        agent.send_stdin(1, b"still here\n");
        agent.send_stdin_close(1);
        assert_eq!(agent.collect(1).stdout, b"still here\n");
    }

    /// CLOCK_SET and ENTROPY change the machine: refused here, the clock
    /// untouched.
    fn clock_set_and_entropy_are_not_permitted(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let far = ClockSet { realtime_ns: 946_684_800_000_000_000 };
        agent.send(&Message::Clock(ClockMsg::Set(far)), 5);
        agent.expect_error_kind(5, "not_permitted", Some(0x72));
        assert!(now_ns() > 1_700_000_000_000_000_000, "the clock moved");
        agent.send(&Message::Clock(ClockMsg::Entropy(&[1, 2, 3])), 6);
        agent.expect_error_kind(6, "not_permitted", Some(0x74));
        agent.ping();
    }
}
