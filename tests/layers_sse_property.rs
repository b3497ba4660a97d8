//! Property: keepalives injected by `IdleTimeoutBody` never change what an SSE client parses.
//!
//! Random event streams (data/event/id/retry/unknown fields, comments, empty data lines, unicode,
//! LF/CRLF/CR endings, an optional BOM, an optional unterminated last line) are cut into random chunks
//! with random silences between them and played through the layer on a paused clock. The output must
//! be the upstream bytes plus whole keepalive lines inserted at line starts, and a WHATWG parser must
//! read the same events from it as from the upstream bytes.

mod layers_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use layers_support::{call_with, request, response, within, ScriptedBody};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use streamgate::idle_timeout::IdleTimeoutLayer;

const INTERVAL_MS: u64 = 1000;
const KEEPALIVE: &[u8] = b": keepalive\n";

/// What an `EventSource` reports: dispatched events and reconnection-time changes, in order.
#[derive(Clone, Debug, PartialEq)]
enum Parsed {
    Event {
        ty: String,
        data: String,
        last_id: String,
    },
    Retry(u64),
}

/// The WHATWG "interpret an event stream" algorithm, over a whole stream.
fn parse_sse(bytes: &[u8]) -> (Vec<Parsed>, String) {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    let mut out = Vec::new();
    let (mut data, mut ty, mut id_buf, mut last_id) =
        (String::new(), String::new(), String::new(), String::new());
    let mut process = |line: &str, out: &mut Vec<Parsed>| {
        if line.is_empty() {
            // Dispatch.
            last_id = id_buf.clone();
            if data.is_empty() {
                ty.clear();
                return;
            }
            if data.ends_with('\n') {
                data.pop();
            }
            let ty_out = if ty.is_empty() {
                "message".to_owned()
            } else {
                ty.clone()
            };
            out.push(Parsed::Event {
                ty: ty_out,
                data: std::mem::take(&mut data),
                last_id: last_id.clone(),
            });
            ty.clear();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "event" => ty = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => id_buf = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse() {
                    out.push(Parsed::Retry(ms));
                }
            }
            _ => {}
        }
    };
    let mut line = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                process(&line, &mut out);
                line.clear();
            }
            '\n' => {
                process(&line, &mut out);
                line.clear();
            }
            c => line.push(c),
        }
    }
    // An unterminated last line and an undispatched event are discarded at the end of the stream.
    (out, id_buf)
}

#[test]
fn parser_follows_the_spec_examples() {
    let (events, _) = parse_sse(b"data: YHOO\ndata: +2\ndata: 10\n\n");
    assert_eq!(
        events,
        [Parsed::Event {
            ty: "message".into(),
            data: "YHOO\n+2\n10".into(),
            last_id: String::new()
        }]
    );
    let (events, _) = parse_sse(b"\xEF\xBB\xBF: c\r\nid: 1\rretry: 7\nevent: x\ndata\n\ndata:z\n");
    assert_eq!(
        events,
        [
            Parsed::Retry(7),
            Parsed::Event {
                ty: "x".into(),
                data: String::new(),
                last_id: "1".into()
            }
        ]
    );
    // An event with only an empty data line still has data "" only if a data field was present:
    // "data\n\n" appends "\n" then strips it, dispatching an empty event (checked above);
    // a blank line alone dispatches nothing.
    assert!(parse_sse(b"\n\n").0.is_empty());
}

fn line_strategy() -> impl Strategy<Value = String> {
    let value = r"[a-z0-9 :é日🎉\x00]{0,10}";
    let name = prop_oneof![
        4 => Just("data"),
        1 => Just("event"),
        1 => Just("id"),
        1 => Just("retry"),
        1 => Just("foo"),
        1 => Just("data "),
    ];
    let sep = prop_oneof![Just(": "), Just(":"), Just("")];
    prop_oneof![
        6 => (name, sep, value).prop_map(|(n, s, v)| {
            if s.is_empty() { n.to_owned() } else { format!("{n}{s}{v}") }
        }),
        1 => r"[0-9]{1,4}".prop_map(|d| format!("retry: {d}")),
        1 => value.prop_map(|v| format!(":{v}")),
        3 => Just(String::new()),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    stream: Vec<u8>,
    cuts: Vec<usize>,
    silences: Vec<u64>,
    tail_silence: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let ending = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
    let silence = prop_oneof![
        3 => Just(0u64),
        2 => 1..INTERVAL_MS / 2,
        1 => INTERVAL_MS - 100..INTERVAL_MS + 100,
        2 => INTERVAL_MS + 1..4 * INTERVAL_MS,
    ];
    (
        any::<bool>(),
        prop::collection::vec((line_strategy(), ending), 0..24),
        prop::option::of(r"data: [a-z]{1,5}"),
        prop::collection::vec(any::<Index>(), 0..10),
        prop::collection::vec(any::<Index>(), 0..6),
        prop::collection::vec(silence.clone(), 16),
        silence,
    )
        .prop_map(
            |(bom, lines, unterminated, cuts, line_cuts, silences, tail_silence)| {
                let mut stream = Vec::new();
                if bom {
                    stream.extend_from_slice("\u{FEFF}".as_bytes());
                }
                for (line, ending) in &lines {
                    stream.extend_from_slice(line.as_bytes());
                    stream.extend_from_slice(ending.as_bytes());
                }
                if let Some(last) = unterminated {
                    stream.extend_from_slice(last.as_bytes());
                }
                // Cut anywhere (inside UTF-8 sequences, between CR and LF, inside the BOM) and, to reach
                // boundaries often, right after some line feeds.
                let lfs: Vec<usize> = (0..stream.len())
                    .filter(|&i| stream[i] == b'\n')
                    .map(|i| i + 1)
                    .collect();
                let mut all: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
                if !lfs.is_empty() {
                    all.extend(line_cuts.iter().map(|i| lfs[i.index(lfs.len())]));
                }
                all.retain(|&c| c > 0 && c < stream.len());
                all.sort_unstable();
                all.dedup();
                Case {
                    stream,
                    cuts: all,
                    silences,
                    tail_silence,
                }
            },
        )
}

/// Plays `case` through the layer; returns the output frames, each marked as injected or not.
fn play(case: &Case) -> Vec<(Bytes, bool)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut body = ScriptedBody::new();
        let mut start = 0;
        for (i, end) in case
            .cuts
            .iter()
            .copied()
            .chain([case.stream.len()])
            .enumerate()
        {
            body = body
                .wait_ms(case.silences[i % case.silences.len()])
                .data(Bytes::copy_from_slice(&case.stream[start..end]));
            start = end;
        }
        body = body.wait_ms(case.tail_silence);
        let layer = IdleTimeoutLayer::new()
            .keepalive_interval(Some(Duration::from_millis(INTERVAL_MS)))
            .idle_timeout(Duration::from_secs(3600));
        let (req, info) = request();
        let res = call_with(
            layer,
            req,
            Duration::ZERO,
            response(Some("text/event-stream"), body),
        )
        .await;
        let mut body = std::pin::pin!(res.into_body());
        let mut out = Vec::new();
        while let Some(frame) = within(
            Duration::from_secs(3600),
            std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)),
        )
        .await
        {
            let data = frame
                .expect("no error")
                .into_data()
                .expect("data frames only");
            out.push((data, info.take_injected()));
        }
        assert_eq!(
            info.heartbeats() as usize,
            out.iter().filter(|(_, inj)| *inj).count()
        );
        out
    })
}

fn check(case: &Case, injected_cases: &AtomicUsize) -> Result<(), TestCaseError> {
    let out = play(case);
    let mut all = Vec::new();
    let mut upstream = Vec::new();
    let mut injected = 0;
    for (data, was_injected) in &out {
        if *was_injected {
            prop_assert_eq!(&data[..], KEEPALIVE);
            // Only at a line start: the stream start or right after a LF (never after a bare CR).
            prop_assert!(
                all.last().is_none_or(|&b| b == b'\n'),
                "injected mid-line: {:?}",
                String::from_utf8_lossy(&all)
            );
            injected += 1;
        } else {
            upstream.extend_from_slice(data);
        }
        all.extend_from_slice(data);
    }
    // Upstream bytes pass through unchanged, except a BOM dropped after an early keepalive.
    let early = out.first().is_some_and(|(_, inj)| *inj);
    let expected: &[u8] = if early {
        case.stream
            .strip_prefix("\u{FEFF}".as_bytes())
            .unwrap_or(&case.stream)
    } else {
        &case.stream
    };
    prop_assert_eq!(&upstream[..], expected);
    prop_assert_eq!(parse_sse(&all), parse_sse(&case.stream));
    if injected > 0 {
        injected_cases.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[test]
fn keepalives_never_change_the_parsed_events() {
    let cases = 512;
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let injected_cases = AtomicUsize::new(0);
    runner
        .run(&case_strategy(), |case| check(&case, &injected_cases))
        .unwrap();
    let injected = injected_cases.load(Ordering::Relaxed);
    // The property is only meaningful if keepalives were actually injected, often.
    assert!(
        injected * 4 >= cases as usize,
        "only {injected} of {cases} cases injected a keepalive"
    );
}

#[test]
fn injection_next_to_a_bom_and_a_split_crlf_is_exercised() {
    // Deterministic spot checks of the hardest spots, through the same harness.
    let counter = AtomicUsize::new(0);
    let cases = [
        Case {
            stream: b"\xEF\xBB\xBFdata: a\r\n\r\n".to_vec(),
            cuts: vec![1, 2, 10],
            silences: vec![1500, 0, 0, 1500],
            tail_silence: 1500,
        },
        Case {
            stream: b"data: a\r\n\r\n".to_vec(),
            cuts: vec![8, 9, 10],
            silences: vec![0, 2500, 2500, 2500],
            tail_silence: 0,
        },
        Case {
            stream: b"id: 1\ndata: x\n\n".to_vec(),
            cuts: vec![6],
            silences: vec![0, 2500],
            tail_silence: 2500,
        },
    ];
    for case in &cases {
        check(case, &counter).unwrap();
    }
    assert_eq!(counter.load(Ordering::Relaxed), 3);
}
