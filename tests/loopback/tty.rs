//! Terminal sessions: size, RESIZE, input, STDIN_CLOSE (end-of-file
//! character), no STDERR, and complete output before exit.

use std::time::Duration;

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::util::*;

/// Reads a tty session's STDOUT until `pred` holds for the text so far.
#[track_caller]
fn read_until(agent: &mut Agent, id: u32, pred: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    while !pred(&text) {
        let f = agent.recv_where(|f| f.id == id && f.kind == STDOUT, "terminal output");
        text.push_str(&String::from_utf8_lossy(&f.payload));
    }
    text
}

both! {
    /// `stty size` reports the `rows` and `cols` of EXEC (24 x 80 by
    /// default).
    fn stty_size_matches_rows_and_cols(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let out = agent.run(tty(cmd("stty", &["size"])));
        out.assert_success();
        assert_eq!(out.stdout_str(), "24 80\r\n");
        let mut e = tty(cmd("stty", &["size"]));
        e.rows = 40;
        e.cols = 132;
        assert_eq!(agent.run(e).stdout_str(), "40 132\r\n");
        let mut e = tty(cmd("stty", &["size"]));
        e.rows = 1000;
        e.cols = 65535;
        assert_eq!(agent.run(e).stdout_str(), "1000 65535\r\n");
    }

    /// Guarantee 2 on a terminal: what the child writes just before it
    /// exits all arrives, in order (here with the terminal's usual \n to
    /// \r\n translation, and raw).
    fn tty_output_written_before_exit_is_complete(opts: Opts) {
        let dir = TempDir::new("ttyout");
        let data = pseudo_random(200_000, 11);
        let file = dir.join("data");
        std::fs::write(&file, &data).unwrap();
        let seq: Vec<u8> = (1..=20_000)
            .map(|i| format!("{i}\r\n"))
            .collect::<String>()
            .into_bytes();
        let mut agent = Agent::start_with(opts);
        let rounds = 48u32;
        let in_flight = 8;
        let mut queue = Vec::new();
        let mut next = 0;
        let mut done = 0;
        while done < rounds {
            while next < rounds && queue.len() < in_flight {
                let id = 300 + next;
                let e = if next % 2 == 0 {
                    tty(cmd("seq", &["1", "20000"]))
                } else {
                    tty(sh(&format!("stty raw -echo; exec cat {}", file.display())))
                };
                agent.send_exec(id, &e);
                queue.push(id);
                next += 1;
            }
            let id = queue.remove(0);
            agent.exec_reply(id).expect("EXEC failed");
            let out = agent.collect(id);
            out.assert_success();
            assert!(out.stderr.is_empty());
            if (id - 300) % 2 == 0 {
                assert!(out.stdout == seq, "round {id}: {} of {} bytes", out.stdout.len(), seq.len());
            } else {
                assert!(out.stdout == data, "round {id}: {} of {} bytes", out.stdout.len(), data.len());
            }
            done += 1;
        }
    }
}

/// RESIZE sets the size (`stty size` after it reports it) and the kernel
/// signals the foreground process group (SIGWINCH).
#[test]
fn resize_changes_the_size_and_signals_the_foreground() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(
        id,
        &tty(sh(
            "trap 'echo winch' WINCH; stty -echo; stty size; until read x; do :; done; stty size",
        )),
    );
    let mut text = read_until(&mut agent, id, |t| t.contains("24 80\r\n"));
    agent.send_resize(id, 50, 132);
    text += &read_until(&mut agent, id, |t| t.contains("winch"));
    // A trap may end `read` early (dash); the loop reads again.
    agent.send_stdin(id, b"\n");
    let out = agent.collect(id);
    out.assert_success();
    text += &out.stdout_str();
    let after = &text[text.find("winch").unwrap()..];
    assert!(after.contains("50 132\r\n"), "{text:?}");
    agent.assert_no_errors();
}

/// STDIN_CLOSE on a terminal writes the end-of-file character (twice
/// after a partial line): `cat` sees end of file and exits 0.
#[test]
fn stdin_close_on_a_tty_ends_cat() {
    let mut agent = Agent::start();
    for input in [&b""[..], b"partial line", b"whole line\n", b"a\nb"] {
        let id = agent.new_id();
        agent.exec(id, &tty(sh("stty -echo; echo ready; exec cat")));
        // Input only once echo is off.
        read_until(&mut agent, id, |t| t.contains("ready\r\n"));
        if !input.is_empty() {
            agent.send_stdin(id, input);
        }
        agent.send_stdin_close(id);
        let out = agent
            .collect_within(id, Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!("cat on a tty did not exit after STDIN_CLOSE (input {input:?})")
            });
        out.assert_success();
        let text = out.stdout_str().replace("\r\n", "\n");
        assert_eq!(text, String::from_utf8_lossy(input), "input {input:?}");
        assert_eq!(out.acked, input.len() as u64);
    }
}

/// A terminal is stdin, stdout and stderr, and the controlling terminal:
/// there are no STDERR frames, stderr goes to STDOUT.
#[test]
fn tty_is_stdin_stdout_stderr_and_controlling_terminal() {
    let mut agent = Agent::start();
    let out = agent.run(tty(sh(
        "test -t 0 && test -t 1 && test -t 2 && echo all-tty; echo to-err >&2; echo via-dev-tty > /dev/tty",
    )));
    out.assert_success();
    assert!(out.stderr.is_empty());
    assert!(!out.frames.iter().any(|f| f.kind == STDERR));
    assert_eq!(out.stdout_str(), "all-tty\r\nto-err\r\nvia-dev-tty\r\n");
}

/// STDIN on a terminal is the terminal's input (echoed by default).
#[test]
fn tty_stdin_is_terminal_input() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &tty(sh("read line; echo \"got:$line\"")));
    agent.send_stdin(id, b"hello tty\n");
    let out = agent.collect(id);
    out.assert_success();
    // The echo of the input, then the reply.
    assert_eq!(out.stdout_str(), "hello tty\r\ngot:hello tty\r\n");
    assert_eq!(out.acked, 10);
}

/// Ctrl-C typed on the terminal reaches the foreground group as SIGINT.
#[test]
fn tty_interrupt_character_signals_the_foreground() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &tty(cmd("sleep", &["100"])));
    std::thread::sleep(Duration::from_millis(100));
    agent.send_stdin(id, b"\x03");
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(2));
}

/// Guarantee 3 on a terminal: a background process keeping the terminal
/// open does not hold EXITED.
#[test]
fn tty_grandchild_holding_the_terminal_does_not_delay_exited() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = tty(sh("sleep 30 & echo hi"));
    e.linger_ms = 100;
    agent.exec(id, &e);
    read_until(&mut agent, id, |t| t.contains("hi"));
    let t0 = std::time::Instant::now();
    let out = agent.collect(id);
    out.assert_success();
    assert!(
        // linger_ms plus slack for a loaded machine; the sleep holds
        // the terminal for 30 s.
        t0.elapsed() < Duration::from_millis(2100),
        "EXITED after {:?}",
        t0.elapsed()
    );
}

/// The output window applies to terminal output too.
#[test]
fn tty_output_window() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = tty(cmd("seq", &["1", "50000"]));
    e.output_window = 4096;
    agent.exec(id, &e);
    let expect: Vec<u8> = (1..=50_000)
        .map(|i| format!("{i}\r\n"))
        .collect::<String>()
        .into_bytes();
    let mut got = Vec::new();
    while got.len() < 4096 {
        let f = agent.recv_where(|f| f.id == id && f.kind == STDOUT, "output");
        got.extend_from_slice(&f.payload);
        assert!(got.len() <= 4096);
    }
    let more = agent.recv_where_within(&|f| f.id == id, Duration::from_millis(300));
    assert!(more.is_none(), "output beyond the window");
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
            break;
        }
        got.extend_from_slice(&f.payload);
        assert!(got.len() as u64 - acked <= 4096);
    }
    assert!(got == expect, "{} of {} bytes", got.len(), expect.len());
}

/// EXEC `stdin: false` gives the child /dev/null as stdin; the contract
/// makes no exception for a terminal session (its output still goes to the
/// terminal).
#[test]
fn tty_with_stdin_false_reads_dev_null() {
    let mut agent = Agent::start();
    let mut e = tty(sh("readlink /proc/self/fd/0; cat; echo done"));
    e.stdin = false;
    let id = agent.new_id();
    agent.exec(id, &e);
    let out = agent
        .collect_within(id, Duration::from_secs(5))
        .unwrap_or_else(|| {
            // cat is waiting on the terminal: stdin is not /dev/null.
            agent.send_signal(id, 9, true);
            let out = agent.collect(id);
            panic!(
                "stdin: false on a tty: cat did not see end of file; output {:?}",
                out.stdout_str()
            )
        });
    assert_eq!(out.stdout_str(), "/dev/null\r\ndone\r\n");
}

/// The end-of-file character STDIN_CLOSE writes is the terminal's current
/// VEOF, also when the child changed it.
#[test]
fn stdin_close_on_a_tty_uses_the_terminals_eof_character() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &tty(sh("stty -echo eof '^B'; echo ready; exec cat")));
    read_until(&mut agent, id, |t| t.contains("ready\r\n"));
    agent.send_stdin(id, b"x\x04y");
    agent.send_stdin_close(id);
    let out = agent
        .collect_within(id, Duration::from_secs(10))
        .expect("cat did not see end of file with VEOF changed to ^B");
    out.assert_success();
    // ^D is an ordinary character now.
    assert_eq!(out.stdout_str(), "x\x04y");
}
