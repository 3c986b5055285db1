//! Flow control and bounded memory (guarantee 5): the STDIN window and
//! STDIN_ACK, the output window and OUTPUT_ACK, and a host that stops
//! reading.

use std::time::{Duration, Instant};

use agentd::messages::Message;

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::proc::*;
use crate::support::util::*;
use crate::support::*;

both! {
    /// 8 MiB through `sha256sum`, within READY's stdin_window: the hash
    /// matches, every byte is acknowledged, no window_exceeded.
    fn stdin_8_mib_within_the_window(opts: Opts) {
        let data = pseudo_random(8 << 20, 8);
        let expect = sha256sum(&data);
        let mut agent = Agent::start_with(opts);
        let id = agent.new_id();
        agent.exec(id, &cmd("sha256sum", &[]));
        let out = agent.pipe_stdin(id, &data, 60_000);
        out.assert_success();
        assert_eq!(out.stdout_str(), expect);
        assert_eq!(out.acked, data.len() as u64, "STDIN_ACK total");
        agent.assert_no_errors();
    }
}

/// 8 MiB round trip through `cat` with a small window: every byte comes
/// back in order, acks return exactly what was sent.
#[test]
fn stdin_round_trip_with_a_small_window() {
    let data = pseudo_random(8 << 20, 9);
    let mut agent = Agent::start_args(&["--stdin-window", "65536"]);
    assert_eq!(agent.stdin_window(), 65536);
    let id = agent.new_id();
    agent.exec(id, &cmd("cat", &[]));
    let out = agent.pipe_stdin(id, &data, 65536);
    out.assert_success();
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat returned different bytes");
    assert_eq!(out.acked, data.len() as u64);
    agent.assert_no_errors();
}

/// Fills session `id`'s stdin until the agent stops acknowledging (the
/// child does not read): returns (sent, acked).
fn fill_stdin(agent: &mut Agent, id: u32) -> (u64, u64) {
    let window = u64::from(agent.stdin_window());
    let (mut sent, mut acked) = (0u64, 0u64);
    loop {
        let room = window - (sent - acked);
        if room > 0 {
            let n = room.min(32 * 1024) as usize;
            agent.send_stdin(id, &vec![b's'; n]);
            sent += n as u64;
            continue;
        }
        match agent.recv_where_within(
            &|f| f.id == id && f.kind == STDIN_ACK,
            Duration::from_millis(300),
        ) {
            Some(f) => acked += ack_bytes(&f),
            None => return (sent, acked),
        }
        assert!(sent < 64 << 20, "a child that does not read took 64 MiB");
    }
}

/// A child that never reads its stdin, with the window full, stalls only
/// its own session.
#[test]
fn a_child_that_never_reads_stalls_only_its_own_session() {
    let mut agent = Agent::start();
    let stuck = agent.new_id();
    agent.exec(stuck, &cmd("sleep", &["100"]));
    let (sent, acked) = fill_stdin(&mut agent, stuck);
    assert_eq!(
        sent - acked,
        u64::from(agent.stdin_window()),
        "window not full"
    );
    // Another session moves 2 MiB each way meanwhile.
    let data = pseudo_random(2 << 20, 3);
    let t0 = Instant::now();
    let id = agent.new_id();
    agent.exec(id, &cmd("cat", &[]));
    let out = agent.pipe_stdin(id, &data, 64 * 1024);
    out.assert_success();
    assert!(out.stdout == data);
    assert!(t0.elapsed() < Duration::from_secs(10));
    agent.ping();
    // The stuck session is still there, and still owes its window.
    agent.send_signal(stuck, 9, true);
    let out = agent.collect(stuck);
    assert_eq!(out.exit, ExitInfo::signal(9));
    agent.assert_no_errors();
}

/// Bytes for a child that closed its stdin are discarded and still
/// acknowledged: the host never stalls on them. In small frames, and in
/// large ones (which stream: see
/// `streamed_stdin_interleaved_with_other_frames_is_exact`).
#[test]
fn stdin_for_a_child_that_closed_it_is_acknowledged() {
    let mut agent = Agent::start();
    for chunk in [16 * 1024, 100_000] {
        let id = agent.new_id();
        agent.exec(id, &sh("exec 0<&-; echo closed; exec sleep 100"));
        agent.recv_where(|f| f.id == id && f.kind == STDOUT, "closed");
        let window = agent.stdin_window() as usize;
        let out = agent.feed_stdin(id, &vec![b'd'; 3 * window], chunk);
        let mut acked = out.acked;
        while acked < 3 * window as u64 {
            let f = agent.recv_where(|f| f.id == id && f.kind == STDIN_ACK, "STDIN_ACK");
            acked += ack_bytes(&f);
        }
        assert_eq!(acked, 3 * window as u64);
        agent.ping();
        agent.send_signal(id, 9, true);
        agent.collect(id);
    }
}

/// OUTPUT_ACK: with `output_window` 65536, a session printing 1 MiB stops
/// at the window (its child blocks in write), other sessions go on, and
/// acks let everything through, in order.
#[test]
fn output_window_stalls_and_resumes() {
    let dir = TempDir::new("ow");
    // More than the child's pipe holds once the agent has grown it to
    // 1 MiB (for a streaming child), so the child is still writing when
    // the window closes.
    let data = pseudo_random(4 << 20, 4);
    let file = dir.join("data");
    std::fs::write(&file, &data).unwrap();
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = cmd("cat", &[file.to_str().unwrap()]);
    e.output_window = 65536;
    e.stdin = false;
    let pid = agent.exec(id, &e);
    let mut got = Vec::new();
    while got.len() < 65536 {
        let f = agent.recv_where(
            |f| f.id == id && f.kind == STDOUT,
            "STDOUT within the window",
        );
        got.extend_from_slice(&f.payload);
        assert!(
            got.len() <= 65536,
            "{} bytes sent with a 65536 byte window",
            got.len()
        );
    }
    // Nothing more without an ack.
    let more = agent.recv_where_within(&|f| f.id == id, Duration::from_millis(500));
    assert!(
        more.is_none(),
        "output beyond the window: {:?}",
        more.map(|f| (f.kind, f.payload.len()))
    );
    // The child is blocked in write(), not finished.
    let state = status_field(pid as i32, "State").unwrap_or_default();
    assert!(
        state.starts_with('S'),
        "cat is {state:?}, expected blocked (S)"
    );
    // Other sessions are unaffected.
    assert_eq!(agent.sh("echo other").stdout_str(), "other\n");
    // Ack in pieces; never more than the window outstanding.
    let mut acked: u64 = 0;
    agent.send_output_ack(id, 1000);
    acked += 1000;
    loop {
        let f = agent.recv_where(
            |f| f.id == id && (f.kind == STDOUT || f.kind == EXITED),
            "output",
        );
        if f.kind == EXITED {
            assert_eq!(
                parse_exited(&payload_map(&f.payload).unwrap()).unwrap(),
                ExitInfo::code(0)
            );
            break;
        }
        got.extend_from_slice(&f.payload);
        let outstanding = got.len() as u64 - acked;
        assert!(
            outstanding <= 65536,
            "{outstanding} bytes outstanding with a 65536 byte window"
        );
        agent.send_output_ack(id, f.payload.len() as u32);
        acked += f.payload.len() as u64;
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "output differs");
}

/// The output window counts STDOUT and STDERR together.
#[test]
fn output_window_covers_stdout_and_stderr_together() {
    let dir = TempDir::new("ow2");
    let out_data = pseudo_random(200_000, 5);
    let err_data = pseudo_random(150_000, 6);
    std::fs::write(dir.join("o"), &out_data).unwrap();
    std::fs::write(dir.join("e"), &err_data).unwrap();
    let mut agent = Agent::start();
    let id = agent.new_id();
    let window = 3000u32;
    let mut e = sh(&format!(
        "cat {o} & cat {e} >&2; wait",
        o = dir.join("o").display(),
        e = dir.join("e").display()
    ));
    e.output_window = window;
    e.stdin = false;
    agent.exec(id, &e);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut received, mut acked) = (0u64, 0u64);
    loop {
        // Ack at once when the window is full; otherwise only when
        // nothing more comes for a moment, so the window really fills.
        let full = received - acked == u64::from(window);
        let f = if full {
            None
        } else {
            agent.recv_where_within(
                &|f| f.id == id && matches!(f.kind, STDOUT | STDERR | EXITED),
                Duration::from_millis(20),
            )
        };
        let Some(f) = f else {
            if received > acked {
                agent.send_output_ack(id, (received - acked) as u32);
                acked = received;
            }
            continue;
        };
        match f.kind {
            STDOUT => stdout.extend_from_slice(&f.payload),
            STDERR => stderr.extend_from_slice(&f.payload),
            _ => {
                let e = parse_exited(&payload_map(&f.payload).unwrap()).unwrap();
                assert_eq!(e, ExitInfo::code(0));
                break;
            }
        }
        received += f.payload.len() as u64;
        assert!(
            received - acked <= u64::from(window),
            "{} bytes outstanding with window {window}",
            received - acked
        );
    }
    assert!(
        stdout == out_data,
        "stdout differs ({} bytes)",
        stdout.len()
    );
    assert!(
        stderr == err_data,
        "stderr differs ({} bytes)",
        stderr.len()
    );
}

/// Waits until the process `pid` uses no CPU for 300 ms (three samples
/// 100 ms apart), so a measurement is taken once it has done all it will,
/// however slow the machine is today. Fails the test after the timeout.
fn wait_agent_idle(pid: i32) {
    let mut last = cpu_ticks(pid);
    let mut still = 0;
    assert!(
        wait_until(timeout(), || {
            std::thread::sleep(Duration::from_millis(100));
            let now = cpu_ticks(pid);
            still = if now == last { still + 1 } else { 0 };
            last = now;
            still >= 3
        }),
        "the agent (pid {pid}) never went idle"
    );
}

/// Guarantee 5: a host that stops reading does not grow the agent's
/// memory. Three sessions flood output (two on pipes, whose output the
/// agent splices and otherwise leaves in the child's pipe; one on a
/// terminal, whose output the agent reads into its own queue) and the
/// host sends 8 MiB of PINGs while reading nothing; the agent's RSS grows
/// by no more than its caps, it does not spin, and once the host reads
/// again everything is answered.
#[test]
fn a_host_that_stops_reading_does_not_grow_the_agents_memory() {
    let mut agent = Agent::start();
    agent.ping();
    let baseline = agent.rss_kib();
    let zero = agent.new_id();
    let zero_pid = agent.exec(zero, &cmd("cat", &["/dev/zero"]));
    let yes = agent.new_id();
    let yes_pid = agent.exec(yes, &cmd("yes", &[]));
    let tty = agent.new_id();
    let mut tty_flood = cmd("cat", &["/dev/zero"]);
    tty_flood.tty = true;
    let tty_pid = agent.exec(tty, &tty_flood);
    agent.pause_reading();
    // PINGs from another thread: the agent may stop reading its
    // transport, so these writes may block until the host reads again.
    let host = agent.host();
    let pings = 2000u32;
    let sender = std::thread::spawn(move || {
        for i in 0..pings {
            let mut p = vec![(i % 251) as u8; 4096];
            p[..4].copy_from_slice(&i.to_be_bytes());
            host.try_send_raw(&Message::Ping(&p).to_bytes(i + 1), Duration::from_secs(60))
                .unwrap();
        }
    });
    // Measure once the agent has stopped (it has nothing it may do).
    wait_agent_idle(agent.host_pid);
    let ticks0 = cpu_ticks(agent.host_pid);
    let mut peak = 0;
    for _ in 0..25 {
        peak = peak.max(agent.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    let ticks = cpu_ticks(agent.host_pid) - ticks0;
    eprintln!("agent RSS: baseline {baseline} KiB, peak {peak} KiB while the host did not read; {ticks} ticks of CPU in 2.5 s");
    // Queued output is capped at 2 MiB (up to twice that in memory before
    // the queue is compacted).
    assert!(
        peak.saturating_sub(baseline) < 6 * 1024,
        "agent RSS grew by {} KiB (baseline {baseline} KiB, peak {peak} KiB)",
        peak - baseline
    );
    // 2.5 s at 100 Hz is 250 ticks; a loop that spins would use most.
    assert!(
        ticks < 50,
        "the agent used {ticks} ticks of CPU while the host did not read"
    );
    // The flooders are blocked in write(), not running.
    for pid in [zero_pid, yes_pid, tty_pid] {
        let pid = agent.host_pid_of(pid).expect("flooder");
        let state = status_field(pid, "State").unwrap_or_default();
        assert!(
            state.starts_with('S'),
            "flooder {pid} is {state:?}, expected blocked (S)"
        );
    }
    agent.resume_reading();
    // Read again: stop the floods, then every PING is answered in order.
    agent.send_signal(zero, 9, true);
    agent.send_signal(yes, 9, true);
    agent.send_signal(tty, 9, true);
    let mut next_pong = 0u32;
    let mut exited = 0;
    while exited < 3 || next_pong < pings {
        let f = agent.recv_where(
            |f| matches!(f.kind, PONG | EXITED) || f.kind == ERROR,
            "PONG or EXITED",
        );
        match f.kind {
            PONG => {
                assert_eq!(f.id, next_pong + 1, "PONGs out of order");
                assert_eq!(&f.payload[..4], &next_pong.to_be_bytes());
                assert_eq!(f.payload.len(), 4096);
                next_pong += 1;
            }
            EXITED => {
                exited += 1;
                let e = parse_exited(&payload_map(&f.payload).unwrap()).unwrap();
                assert_eq!(e, ExitInfo::signal(9));
            }
            _ => panic!("ERROR: {:?}", error_info(&f)),
        }
        // Drop the flood output as it arrives.
        agent.take_stashed(|f| f.kind == STDOUT);
    }
    sender.join().unwrap();
    agent.ping();
    let after = agent.rss_kib();
    eprintln!("agent RSS after draining: {after} KiB");
}

/// Guarantee 5 against the cheapest amplification a host has: a frame
/// whose length is 0 is four bytes of input and earns an ERROR
/// (`malformed_frame`) of about a hundred bytes. A host that sends zeros
/// and reads nothing must not grow the agent much past its output cap
/// (2 MiB queued): the agent checks the cap before each frame it
/// dispatches, not just before each read, and then stops reading the
/// transport. The zeros follow a large frame (of an unknown kind), which
/// grows the decoder's buffer so that one read takes in a megabyte of
/// zeros: a quarter of a million frames, 25 MiB of replies, were they all
/// answered before the next check. Once the host reads again, every ERROR
/// comes, in order, and the agent still answers.
#[test]
fn replies_to_a_host_that_does_not_read_stay_under_the_cap() {
    let mut agent = Agent::start();
    agent.ping();
    let baseline = agent.rss_kib();
    agent.pause_reading();
    let host = agent.host();
    let big = 900 * 1024;
    let zeros = 1usize << 20;
    let sender = std::thread::spawn(move || {
        let mut input = Vec::with_capacity(9 + big + zeros);
        agentd::codec::append_raw(&mut input, 0x7f, 0, &vec![1u8; big])
            .expect("the test's frames fit");
        input.resize(input.len() + zeros, 0);
        host.try_send_raw(&input, Duration::from_secs(60)).unwrap();
    });
    // Measure once the agent has taken all it will and stopped.
    wait_agent_idle(agent.host_pid);
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(agent.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("agent RSS: baseline {baseline} KiB, peak {peak} KiB");
    // The queue under its cap (2 MiB, up to twice that before it is
    // compacted) and the decoder's buffer (about 2 MiB here).
    assert!(
        peak.saturating_sub(baseline) < 8 * 1024,
        "the agent grew by {} KiB (baseline {baseline} KiB, peak {peak} KiB)",
        peak - baseline
    );
    agent.resume_reading();
    let unknown = agent.recv_where(|f| f.kind == ERROR, "ERROR");
    assert_eq!(error_info(&unknown).kind, "unknown_kind");
    let mut malformed = 0usize;
    while malformed < zeros / 4 {
        let f = agent.recv_where(|f| f.kind == ERROR, "ERROR");
        assert_eq!(error_info(&f).kind, "malformed_frame");
        malformed += 1;
    }
    sender.join().unwrap();
    agent.ping();
}

/// An idle agent sleeps in poll: no wake-ups (the design's "zero wake-ups
/// while idle"), seen as no context switches over half a second.
#[test]
fn an_idle_agent_does_not_wake_up() {
    let mut agent = Agent::start();
    agent.sh("echo warm").assert_success();
    let id = agent.new_id();
    agent.exec(id, &cmd("sleep", &["100"]));
    agent.ping();
    std::thread::sleep(Duration::from_millis(100));
    let switches = |pid| {
        status_field(pid, "voluntary_ctxt_switches")
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = switches(agent.host_pid);
    std::thread::sleep(Duration::from_millis(500));
    let after = switches(agent.host_pid);
    assert!(
        after - before <= 1,
        "the idle agent woke up {} times in 500 ms",
        after - before
    );
    agent.send_signal(id, 9, true);
    agent.collect(id);
}

/// Output the process wrote before exiting is owed before EXITED even
/// when the output window holds it back past `linger_ms`: EXITED waits
/// for the acks (guarantee 2).
#[test]
fn output_window_holds_exited_until_the_output_is_acknowledged() {
    let mut agent = Agent::start();
    for tty in [false, true] {
        window_holds_exited(&mut agent, tty);
    }
}

fn window_holds_exited(agent: &mut Agent, tty: bool) {
    let id = agent.new_id();
    let mut e = sh("i=0; while [ $i -lt 1000 ]; do echo 0123456789abcdef; i=$((i+1)); done");
    e.output_window = 1000;
    e.linger_ms = 50;
    e.stdin = false;
    e.tty = tty;
    agent.exec(id, &e);
    let mut got = Vec::new();
    while got.len() < 1000 {
        let f = agent.recv_where(|f| f.id == id && f.kind == STDOUT, "output");
        got.extend_from_slice(&f.payload);
    }
    // 17000 bytes fit in the pipe (or terminal): the shell has exited by now. EXITED
    // must not come while 16000 bytes are still unsent.
    std::thread::sleep(Duration::from_millis(500));
    let early = agent.recv_where_within(&|f| f.id == id, Duration::from_millis(100));
    assert!(
        early.is_none(),
        "sent with the window used up: {:?}",
        early.map(|f| f.kind)
    );
    let mut acked = 0u64;
    loop {
        if got.len() as u64 > acked {
            agent.send_output_ack(id, (got.len() as u64 - acked) as u32);
            acked = got.len() as u64;
        }
        let f = agent.recv_where(
            |f| f.id == id && (f.kind == STDOUT || f.kind == EXITED),
            "output",
        );
        if f.kind == EXITED {
            let e = parse_exited(&payload_map(&f.payload).unwrap()).unwrap();
            assert_eq!(e, ExitInfo::code(0));
            break;
        }
        got.extend_from_slice(&f.payload);
        assert!(got.len() as u64 - acked <= 1000);
    }
    let line = if tty {
        "0123456789abcdef\r\n"
    } else {
        "0123456789abcdef\n"
    };
    assert!(
        got == line.repeat(1000).into_bytes(),
        "tty {tty}: {} bytes",
        got.len()
    );
}

/// Large output from concurrent sessions, on stdout and stderr at once,
/// arrives complete and in order. Over a pipe transport most of it is
/// moved with splice(2) and some goes through the queue (when another
/// session's frames are waiting, or the transport fills mid-frame); the
/// host must not be able to tell.
#[test]
fn concurrent_large_output_is_exact() {
    let dir = std::env::temp_dir().join(format!("agentd-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| {
            let data = pseudo_random(6 << 20, 100 + i);
            let path = dir.join(format!("f{i}"));
            std::fs::write(&path, &data).unwrap();
            (path.to_string_lossy().into_owned(), data)
        })
        .collect();
    let mut agent = Agent::start();
    let (a, b, c) = (&files[0], &files[1], &files[2]);
    let plans = [
        (format!("cat {}", a.0), a.1.clone(), Vec::new()),
        (
            format!("cat {} & cat {} >&2; wait", b.0, c.0),
            b.1.clone(),
            c.1.clone(),
        ),
        (
            format!("cat {} >&2; cat {}", a.0, c.0),
            c.1.clone(),
            a.1.clone(),
        ),
    ];
    let mut ids = Vec::new();
    for (script, _, _) in &plans {
        let id = agent.new_id();
        let mut e = sh(script);
        e.stdin = false;
        agent.exec(id, &e);
        ids.push(id);
    }
    for (id, (script, stdout, stderr)) in ids.into_iter().zip(&plans) {
        let out = agent.collect(id);
        out.assert_success();
        assert!(
            out.stdout == *stdout,
            "{script}: stdout differs ({} of {} bytes)",
            out.stdout.len(),
            stdout.len()
        );
        assert!(
            out.stderr == *stderr,
            "{script}: stderr differs ({} of {} bytes)",
            out.stderr.len(),
            stderr.len()
        );
    }
    agent.assert_no_errors();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a host streaming STDIN to several sessions at once keeps per
/// session.
struct Feed {
    id: u32,
    data: Vec<u8>,
    sent: usize,
    acked: u64,
    out: Vec<u8>,
}

/// Takes one STDOUT or STDIN_ACK frame of any of `feeds`.
fn take_one(agent: &mut Agent, feeds: &mut [Feed]) {
    let ids: Vec<u32> = feeds.iter().map(|f| f.id).collect();
    let f = agent.recv_where(
        |f| ids.contains(&f.id) && matches!(f.kind, STDOUT | STDIN_ACK),
        "STDOUT or STDIN_ACK",
    );
    let feed = feeds.iter_mut().find(|x| x.id == f.id).unwrap();
    if f.kind == STDOUT {
        feed.out.extend_from_slice(&f.payload);
    } else {
        feed.acked += ack_bytes(&f);
    }
}

/// A pipe transport moves large STDIN payloads by splice(2), straight from
/// the transport into the child's pipe, and the frame after such a payload
/// is read from the transport again. Two `cat` sessions (one that starts
/// reading late, so its pipe fills and the agent's queue takes over in the
/// middle of a payload) get frames of many sizes in turns, a PING between
/// some of them: each gets back exactly its bytes, every byte is
/// acknowledged, every PING answered, no ERROR.
#[test]
fn streamed_stdin_interleaved_with_other_frames_is_exact() {
    let mut agent = Agent::start();
    let window = agent.stdin_window() as usize;
    let mut feeds = Vec::new();
    for (k, script) in ["exec cat", "sleep 0.3; exec cat"].into_iter().enumerate() {
        let id = agent.new_id();
        agent.exec(id, &sh(script));
        feeds.push(Feed {
            id,
            data: pseudo_random((5 << 20) + k * 77_777, 40 + k as u64),
            sent: 0,
            acked: 0,
            out: Vec::new(),
        });
    }
    let sizes = [65_536, 100_000, 16_385, 250_000, 1, 40_000, 262_144, 20_000];
    let mut step = 0;
    while feeds.iter().any(|f| f.sent < f.data.len()) {
        let k = step % feeds.len();
        let n = sizes[step % sizes.len()].min(window);
        step += 1;
        if feeds[k].sent == feeds[k].data.len() {
            continue;
        }
        let n = n.min(feeds[k].data.len() - feeds[k].sent);
        while feeds[k].sent as u64 + n as u64 - feeds[k].acked > window as u64 {
            take_one(&mut agent, &mut feeds);
        }
        let f = &mut feeds[k];
        agent.send_stdin(f.id, &f.data[f.sent..f.sent + n]);
        f.sent += n;
        if step % 7 == 0 {
            agent.ping();
        }
    }
    for f in &feeds {
        agent.send_stdin_close(f.id);
    }
    while feeds.iter().any(|f| f.out.len() < f.data.len()) {
        take_one(&mut agent, &mut feeds);
    }
    for f in &mut feeds {
        let rest = agent.collect(f.id);
        f.out.extend_from_slice(&rest.stdout);
        f.acked += rest.acked;
        rest.assert_success();
        assert_eq!(f.out.len(), f.data.len(), "session {}: byte count", f.id);
        assert!(
            f.out == f.data,
            "session {}: different bytes came back",
            f.id
        );
        assert_eq!(
            f.acked,
            f.data.len() as u64,
            "session {}: STDIN_ACK total",
            f.id
        );
    }
    agent.assert_no_errors();
}

/// A large STDIN frame that reaches the agent in pieces, with pauses (the
/// header and a few bytes, then the rest in three parts): the streamed
/// payload waits for the transport and goes on, and the frames after it
/// decode.
#[test]
fn streamed_stdin_arriving_in_pieces_is_exact() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &cmd("cat", &[]));
    let data = pseudo_random(200_000, 50);
    let mut frame = Vec::new();
    agentd::codec::append_raw(&mut frame, STDIN, id, &data).expect("the test's frames fit");
    for piece in [
        &frame[..20],
        &frame[20..70_000],
        &frame[70_000..150_000],
        &frame[150_000..],
    ] {
        agent.send_raw(piece);
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each frame takes most of the window: the next is sent once it is
    // acknowledged.
    let mut acked = 0;
    let mut wait_acked = |agent: &mut Agent, total: u64| {
        while acked < total {
            let f = agent.recv_where(|f| f.id == id && f.kind == STDIN_ACK, "STDIN_ACK");
            acked += ack_bytes(&f);
        }
    };
    wait_acked(&mut agent, data.len() as u64);
    // The same again, twice, now that the agent reads a header first.
    for k in 2..4u64 {
        agent.send_raw(&frame[..9]);
        std::thread::sleep(Duration::from_millis(30));
        agent.send_raw(&frame[9..]);
        wait_acked(&mut agent, k * data.len() as u64);
    }
    agent.ping();
    agent.send_stdin_close(id);
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout.len(), 3 * data.len());
    for part in out.stdout.chunks(data.len()) {
        assert!(part == &data[..], "different bytes came back");
    }
    agent.assert_no_errors();
}

/// The session ends while its STDIN payload is still streaming: a child
/// that reads one line and exits, then the rest of the payload. Before it
/// ended, what it did not read is discarded and acknowledged; after its
/// EXITED, the rest of the payload is skipped (nothing follows EXITED);
/// either way the frames after the payload decode and are served.
#[test]
fn a_session_that_ends_while_its_stdin_streams() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &sh("read line; echo \"got $line\""));
    let mut data = b"first line\n".to_vec();
    data.extend(pseudo_random(250_000, 51));
    let mut frame = Vec::new();
    agentd::codec::append_raw(&mut frame, STDIN, id, &data).expect("the test's frames fit");
    // Header and 100 KB: the child reads its line and exits.
    agent.send_raw(&frame[..100_000]);
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str(), "got first line\n");
    // The rest of the payload arrives after EXITED, then a PING and a
    // session that works.
    agent.send_raw(&frame[100_000..]);
    agent.ping();
    let out = agent.sh("echo after");
    assert_eq!(out.stdout_str(), "after\n");
    assert!(
        agent.take_stashed(|f| f.id == id).is_empty(),
        "a frame for the session after its EXITED"
    );

    // A child that closes its stdin while the payload streams, and lives
    // on: the rest of the payload is read and discarded, and every byte of
    // the frame is acknowledged.
    let id = agent.new_id();
    agent.exec(
        id,
        &sh("head -c 1000 >/dev/null; exec 0<&-; echo closed; exec sleep 100"),
    );
    let data = pseudo_random(250_000, 52);
    let mut frame = Vec::new();
    agentd::codec::append_raw(&mut frame, STDIN, id, &data).expect("the test's frames fit");
    agent.send_raw(&frame[..30_000]);
    agent.recv_where(|f| f.id == id && f.kind == STDOUT, "closed");
    agent.send_raw(&frame[30_000..]);
    agent.ping();
    let mut acked = 0;
    while acked < data.len() as u64 {
        let f = agent.recv_where(|f| f.id == id && f.kind == STDIN_ACK, "STDIN_ACK");
        acked += ack_bytes(&f);
    }
    assert_eq!(acked, data.len() as u64, "STDIN_ACK total");
    agent.send_signal(id, 9, true);
    assert_eq!(agent.collect(id).exit, ExitInfo::signal(9));
    agent.assert_no_errors();
}
