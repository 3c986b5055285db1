//! Replays the checked-in seed corpora of the fuzz targets (fuzz/corpus/)
//! through their bodies in `agentd::fuzzing`, so `cargo test` on stable
//! exercises every seed, and any crash input saved into a corpus stays a
//! regression test.

mod support;

use std::path::PathBuf;

use support::util::corpus_files;

/// The seeds of `target`, sorted by name, with their bytes.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    corpus_files(target)
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

fn replay(target: &str, body: fn(&[u8])) -> usize {
    let files = corpus(target);
    for (path, data) in &files {
        let result = std::panic::catch_unwind(|| body(data));
        assert!(result.is_ok(), "{target}: {} fails", path.display());
    }
    files.len()
}

#[test]
fn frame_decoder_corpus() {
    let n = replay("frame_decoder", agentd::fuzzing::frame_decoder);
    assert!(n >= 10, "only {n} seeds");
}

#[test]
fn message_decode_corpus() {
    let n = replay("message_decode", agentd::fuzzing::message_decode);
    assert!(n >= 10, "only {n} seeds");
}

#[test]
fn message_decode_seeds_from_vectors_are_valid_messages() {
    // The seeds taken from the golden vectors must decode (otherwise they
    // would exercise only the error paths): first byte = index of the kind.
    use agentd::codec::Frame;
    use agentd::messages::{Kind, Message};
    let mut checked = 0;
    for (path, data) in corpus("message_decode") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("vector-") {
            continue;
        }
        let kind = Kind::ALL[usize::from(data[0]) % Kind::ALL.len()];
        let frame = Frame {
            kind: kind as u8,
            id: 1,
            payload: &data[1..],
        };
        Message::decode(frame).unwrap_or_else(|e| panic!("{name}: {e}"));
        checked += 1;
    }
    assert!(checked >= 18, "{checked}");
}
