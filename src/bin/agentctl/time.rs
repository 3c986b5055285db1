//! `agentctl time`: the guest's wall clock next to the host's (the skew a
//! restored snapshot leaves), and `--sync`/`--set` to step it. Its
//! connection does not sync the clock after READY as every other
//! command's does (the library's default), or it would never show a skew. Setting is
//! served only by an agent that is a VM's init (or runs with
//! `--allow-clock`), so a loopback agent never changes this machine's clock.

use agentd::client::{Client, ClockStep, Error, ErrorKind};
use clap::Args;

use crate::fail;
use crate::units::{parse_time, rfc3339};

#[derive(Args, Debug)]
pub(crate) struct TimeArgs {
    /// Set the guest's clock to the host's.
    #[arg(long, conflicts_with = "set")]
    sync: bool,
    /// Set the guest's clock to TIME: RFC 3339 in UTC (2026-12-02T15:04:05Z)
    /// or @EPOCH_SECONDS.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    set: Option<i64>,
}

/// `+1.234567s` / `-0.000120s`.
fn seconds(ns: i64) -> String {
    let sign = if ns < 0 { '-' } else { '+' };
    let a = ns.unsigned_abs();
    format!(
        "{sign}{}.{:06}s",
        a / 1_000_000_000,
        a % 1_000_000_000 / 1000
    )
}

fn refused(e: Error) -> ! {
    if e.error_kind() == Some(ErrorKind::NotPermitted) {
        fail(format!(
            "the agent does not set its clock: it is not a VM's init (start it with agentd --allow-clock to allow it): {e}"
        ))
    }
    fail(format!("cannot set the guest's clock: {e}"))
}

fn print_step(step: ClockStep) {
    println!(
        "guest clock stepped from {} to {} ({})",
        rfc3339(step.old_ns),
        rfc3339(step.new_ns),
        seconds(step.step_ns())
    );
}

pub(crate) fn run(client: &Client, args: &TimeArgs) -> i32 {
    if args.sync {
        print_step(client.sync_clock().unwrap_or_else(|e| refused(e)));
        return 0;
    }
    if let Some(ns) = args.set {
        print_step(client.set_clock_ns(ns).unwrap_or_else(|e| refused(e)));
        return 0;
    }
    let clock = client
        .clock()
        .unwrap_or_else(|e| fail(format!("cannot read the guest's clock: {e}")));
    let ready = client.ready();
    println!("guest:    {}", rfc3339(clock.realtime_ns));
    println!("host:     {}", rfc3339(clock.host_ns));
    println!(
        "offset:   {} (guest minus host, ±{})",
        seconds(clock.offset_ns()),
        seconds(i64::try_from(clock.round_trip.as_nanos() / 2).unwrap_or(i64::MAX))
            .trim_start_matches('+')
    );
    println!(
        "uptime:   {}",
        seconds(i64::try_from(clock.boottime_ns).unwrap_or(i64::MAX)).trim_start_matches('+')
    );
    println!("restores: {}", clock.restores);
    println!(
        "set:      {}",
        if ready.clock_set == Some(true) {
            "served (agentctl time --sync)"
        } else {
            "not served (not a VM's init; agentd --allow-clock)"
        }
    );
    0
}
