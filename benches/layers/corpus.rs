//! Realistic LLM event streams to benchmark with: OpenAI `chat.completion.chunk` SSE events, cut
//! into chunks the way they reach a proxy.

use std::fmt::Write as _;

use bytes::Bytes;

const WORDS: &[&str] = &[
    "Lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet,",
    "consectetur",
    "adipiscing",
    "elit,",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua.",
];

/// One SSE event per token, as an inference server writes them: `data: {chunk JSON}` and a blank
/// line, `line_ending` between lines (`"\n"` or `"\r\n"`); `pad` extra bytes of content per token.
pub(crate) fn chat_events(tokens: usize, line_ending: &str, pad: usize) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(tokens + 2);
    let padding = ".".repeat(pad);
    for i in 0..tokens {
        let sep = if i == 0 { "" } else { " " };
        let word = WORDS[i % WORDS.len()];
        let mut e = String::with_capacity(256 + pad);
        let _ = write!(
            e,
            r#"data: {{"id":"chatcmpl-bench-0001","object":"chat.completion.chunk","created":1700000000,"model":"bench-model","system_fingerprint":"fp_bench","choices":[{{"index":0,"delta":{{"content":"{sep}{word}{padding}"}},"logprobs":null,"finish_reason":null}}]}}{line_ending}{line_ending}"#
        );
        out.push(Bytes::from(e));
    }
    out.push(Bytes::from(format!(
        r#"data: {{"id":"chatcmpl-bench-0001","object":"chat.completion.chunk","created":1700000000,"model":"bench-model","system_fingerprint":"fp_bench","choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}{line_ending}{line_ending}"#
    )));
    out.push(Bytes::from(format!(
        "data: [DONE]{line_ending}{line_ending}"
    )));
    out
}

/// The events cut into three pieces each: in the middle of the data line, and right after the first
/// byte of its line ending (between CR and LF for CRLF), the awkward framings a proxy must handle.
pub(crate) fn split_three_ways(events: &[Bytes]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(events.len() * 3);
    for e in events {
        let eol = e
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .expect("every event has a line ending");
        let mid = eol / 2;
        out.push(e.slice(..mid));
        out.push(e.slice(mid..eol + 1));
        out.push(e.slice(eol + 1..));
    }
    out
}

/// The same bytes re-cut into chunks of `size` bytes, ignoring event boundaries (large reads).
pub(crate) fn rechunk(events: &[Bytes], size: usize) -> Vec<Bytes> {
    let all: Vec<u8> = events.iter().flat_map(|e| e.iter().copied()).collect();
    let all = Bytes::from(all);
    (0..all.len())
        .step_by(size)
        .map(|at| all.slice(at..(at + size).min(all.len())))
        .collect()
}

/// Total bytes of a chunk list.
pub(crate) fn total_bytes(chunks: &[Bytes]) -> u64 {
    chunks.iter().map(|c| c.len() as u64).sum()
}
