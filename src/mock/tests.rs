//! Unit tests of the mock's stream body, on a paused clock with exact virtual times.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::body::{MockAbortError, MockBody, Script, TokenStream};
use super::render::{Api, Renderer};
use super::stats::MockStats;
use super::{LineEnding, SilencePoint};
use crate::sse::SseTracker;

const MS: Duration = Duration::from_millis(1);

fn script(tokens: usize) -> Script {
    Script {
        ttft: 400 * MS,
        inter_token: 40 * MS,
        tokens,
        silence: None,
        silence_at: SilencePoint::Boundary,
        abort_after: None,
        split: false,
    }
}

fn renderer(api: Api, ndjson: bool, le: LineEnding) -> Renderer {
    Renderer::new(
        api,
        ndjson,
        le,
        "chatcmpl-test".into(),
        "test-model",
        1_700_000_000,
        true,
        false,
        0,
        3,
        "stop",
    )
}

fn body(script: Script, r: Renderer, stats: &MockStats) -> MockBody {
    MockBody::stream(TokenStream::new(script, r, stats.generation_started()))
}

fn plain(script: Script, stats: &MockStats) -> MockBody {
    body(script, renderer(Api::Plain, false, LineEnding::Lf), stats)
}

/// Every frame with the virtual time it arrived, until the end or an error.
async fn drain(mut b: MockBody) -> (Vec<(Duration, Bytes)>, Option<crate::BoxError>) {
    let start = Instant::now();
    let mut frames = Vec::new();
    while let Some(f) = b.frame().await {
        match f {
            Ok(f) => frames.push((start.elapsed(), f.into_data().unwrap())),
            Err(e) => return (frames, Some(e)),
        }
        if b.is_end_stream() {
            break;
        }
    }
    (frames, None)
}

fn times(frames: &[(Duration, Bytes)]) -> Vec<u64> {
    frames.iter().map(|(t, _)| t.as_millis() as u64).collect()
}

fn concat(frames: &[(Duration, Bytes)]) -> Vec<u8> {
    frames.iter().flat_map(|(_, b)| b.iter().copied()).collect()
}

fn poll_once(b: &mut MockBody) -> Poll<Option<Result<http_body::Frame<Bytes>, crate::BoxError>>> {
    Pin::new(b).poll_frame(&mut Context::from_waker(Waker::noop()))
}

#[tokio::test(start_paused = true)]
async fn tokens_follow_ttft_then_inter_token_and_trailer_follows_last_token() {
    let stats = MockStats::new();
    let (frames, err) = drain(plain(script(3), &stats)).await;
    assert!(err.is_none());
    assert_eq!(times(&frames), [400, 440, 480, 480]);
    let text = String::from_utf8(concat(&frames)).unwrap();
    assert_eq!(
        text,
        "id: 0\ndata: {\"index\":0,\"token\":\"Lorem\"}\n\n\
         id: 1\ndata: {\"index\":1,\"token\":\" ipsum\"}\n\n\
         id: 2\ndata: {\"index\":2,\"token\":\" dolor\"}\n\n\
         event: done\ndata: [DONE]\n\n"
    );
    let s = stats.snapshot();
    assert_eq!(
        (s.streams_completed, s.streams_cancelled, s.active_streams),
        (1, 0, 0)
    );
    assert_eq!(s.tokens_sent, 3);
}

#[tokio::test(start_paused = true)]
async fn returns_pending_between_tokens() {
    let stats = MockStats::new();
    let mut b = plain(script(3), &stats);
    assert!(
        poll_once(&mut b).is_pending(),
        "nothing before the time to first token"
    );
    b.frame().await.unwrap().unwrap();
    assert!(poll_once(&mut b).is_pending(), "Pending between tokens");
    assert_eq!(stats.tokens_sent(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_slows_the_stream_and_nothing_is_produced_ahead() {
    let stats = MockStats::new();
    let mut b = plain(script(3), &stats);
    let start = Instant::now();
    b.frame().await.unwrap().unwrap();
    // The reader takes a second before it asks again (as hyper does when the socket is full).
    crate::timers::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stats.tokens_sent(),
        1,
        "nothing generated while nobody polls"
    );
    assert!(
        poll_once(&mut b).is_pending(),
        "the gap starts when the reader asks"
    );
    let asked = Instant::now();
    b.frame().await.unwrap().unwrap();
    assert_eq!(asked.elapsed(), 40 * MS);
    assert_eq!(start.elapsed(), 400 * MS + Duration::from_secs(1) + 40 * MS);
    assert_eq!(stats.tokens_sent(), 2);
}

#[tokio::test(start_paused = true)]
async fn zero_gaps_yield_instead_of_bursting() {
    let stats = MockStats::new();
    let mut s = script(2);
    s.ttft = Duration::ZERO;
    s.inter_token = Duration::ZERO;
    let mut b = plain(s, &stats);
    assert!(
        poll_once(&mut b).is_pending(),
        "a yield before the first token"
    );
    assert!(matches!(poll_once(&mut b), Poll::Ready(Some(Ok(_)))));
    assert!(poll_once(&mut b).is_pending(), "a yield between tokens");
    assert!(matches!(poll_once(&mut b), Poll::Ready(Some(Ok(_)))));
    // The trailer follows the last token without a yield and ends the stream.
    assert!(matches!(poll_once(&mut b), Poll::Ready(Some(Ok(_)))));
    assert!(b.is_end_stream());
}

#[tokio::test(start_paused = true)]
async fn end_stream_and_size_hint_tell_the_truth() {
    let stats = MockStats::new();
    let mut b = plain(script(1), &stats);
    assert!(!b.is_end_stream());
    assert_eq!(b.size_hint().exact(), None);
    b.frame().await.unwrap().unwrap();
    assert!(!b.is_end_stream(), "the trailer is still to come");
    b.frame().await.unwrap().unwrap();
    assert!(
        b.is_end_stream(),
        "end of stream right after the last frame"
    );
    assert_eq!(b.size_hint().exact(), Some(0));
    assert_eq!(
        stats.streams_completed(),
        1,
        "counted when the last frame is handed out"
    );
    assert!(b.frame().await.is_none());
    drop(b);
    assert_eq!(stats.streams_cancelled(), 0);

    let full = MockBody::full("{}");
    assert_eq!(full.size_hint().exact(), Some(2));
    assert!(!full.is_end_stream());
    assert!(MockBody::full("").is_end_stream());
}

#[tokio::test(start_paused = true)]
async fn drop_before_the_end_counts_a_cancellation() {
    let stats = MockStats::new();
    let mut b = plain(script(5), &stats);
    b.frame().await.unwrap().unwrap();
    assert_eq!(stats.active_streams(), 1);
    drop(b);
    let s = stats.snapshot();
    assert_eq!(
        (s.streams_cancelled, s.streams_completed, s.active_streams),
        (1, 0, 0)
    );
    assert!(s.last_cancelled_at.is_some());
}

#[tokio::test(start_paused = true)]
async fn silence_at_a_boundary_replaces_one_gap() {
    let stats = MockStats::new();
    let mut s = script(4);
    s.silence = Some((2, Duration::from_secs(2)));
    let (frames, _) = drain(plain(s, &stats)).await;
    assert_eq!(times(&frames), [400, 440, 2440, 2480, 2480]);
}

#[tokio::test(start_paused = true)]
async fn silence_mid_line_cuts_the_next_event_inside_its_first_line() {
    let stats = MockStats::new();
    let mut s = script(3);
    s.silence = Some((1, Duration::from_secs(2)));
    s.silence_at = SilencePoint::MidLine;
    let (frames, _) = drain(plain(s, &stats)).await;
    assert_eq!(times(&frames), [400, 440, 2440, 2480, 2480]);
    let cut = &frames[1].1;
    assert!(
        !cut.contains(&b'\n') && !cut.is_empty(),
        "{cut:?} ends mid-line"
    );
    let mut t = SseTracker::new();
    t.observe(&frames[0].1);
    t.observe(cut);
    assert!(!t.at_boundary());
}

#[tokio::test(start_paused = true)]
async fn silence_after_cr_leaves_the_lf_for_later() {
    let stats = MockStats::new();
    let mut s = script(2);
    s.silence = Some((1, Duration::from_secs(1)));
    s.silence_at = SilencePoint::AfterCr;
    let (frames, _) = drain(body(
        s,
        renderer(Api::Plain, false, LineEnding::CrLf),
        &stats,
    ))
    .await;
    assert_eq!(times(&frames), [400, 440, 1440, 1440]);
    assert_eq!(frames[1].1.last(), Some(&b'\r'));
    assert_eq!(frames[2].1.first(), Some(&b'\n'));
}

#[tokio::test(start_paused = true)]
async fn split_events_parse_to_the_same_events_for_every_line_ending() {
    for le in [LineEnding::Lf, LineEnding::CrLf, LineEnding::Cr] {
        let stats = MockStats::new();
        let whole = concat(
            &drain(body(script(4), renderer(Api::Chat, false, le), &stats))
                .await
                .0,
        );
        let mut s = script(4);
        s.split = true;
        let (frames, _) = drain(body(s, renderer(Api::Chat, false, le), &stats)).await;
        assert_eq!(concat(&frames), whole, "{le:?}: same bytes");
        // 4 tokens and the trailer, three frames each, with the same timing per event.
        assert_eq!(frames.len(), 15, "{le:?}");
        assert_eq!(times(&frames)[..3], [400, 400, 400]);
        let mut t = SseTracker::new();
        let mut mid_line = 0;
        let mut after_cr = 0;
        for (_, f) in &frames {
            t.observe(f);
            if !t.at_boundary() {
                if f.last() == Some(&b'\r') {
                    after_cr += 1;
                } else {
                    mid_line += 1;
                }
            }
        }
        assert_eq!(mid_line, 5, "{le:?}: one mid-line cut per event");
        // Frames ending in a CR that may be half of a CRLF: the cut after each event's first CR, and
        // with lone-CR endings also the end of every event.
        let crs = match le {
            LineEnding::Lf => 0,
            LineEnding::CrLf => 5,
            LineEnding::Cr => 10,
        };
        assert_eq!(after_cr, crs, "{le:?}: a cut right after each first CR");
        let mut w = SseTracker::new();
        w.observe(&whole);
        assert_eq!(t.events(), w.events());
        assert_eq!(w.events(), 7, "4 tokens, finish, usage, [DONE]");
    }
}

#[tokio::test(start_paused = true)]
async fn abort_after_fails_the_body_where_the_next_token_was_due() {
    let stats = MockStats::new();
    let mut s = script(5);
    s.abort_after = Some(2);
    let (frames, err) = drain(plain(s, &stats)).await;
    assert_eq!(times(&frames), [400, 440]);
    let err = err.expect("an error ends the stream");
    assert_eq!(
        err.downcast_ref::<MockAbortError>().unwrap().after_tokens(),
        2
    );
    let st = stats.snapshot();
    assert_eq!(
        (
            st.streams_aborted,
            st.streams_cancelled,
            st.streams_completed
        ),
        (1, 0, 0)
    );

    // Past the last token, the abort takes the trailer's place: all tokens, no [DONE].
    let mut s = script(2);
    s.abort_after = Some(9);
    let (frames, err) = drain(plain(s, &stats)).await;
    assert_eq!(frames.len(), 2);
    assert!(err.unwrap().is::<MockAbortError>());
}

#[tokio::test(start_paused = true)]
async fn chat_chunks_are_openai_shaped_json() {
    let stats = MockStats::new();
    let (frames, _) = drain(body(
        script(3),
        renderer(Api::Chat, false, LineEnding::Lf),
        &stats,
    ))
    .await;
    let text = String::from_utf8(concat(&frames)).unwrap();
    let datas: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("one data line per event"))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<serde_json::Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 5);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks[..3]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "Lorem ipsum dolor");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "test-model");
        assert_eq!(c["id"], "chatcmpl-test");
    }
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["usage"], serde_json::Value::Null);
    assert_eq!(chunks[4]["choices"], serde_json::json!([]));
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);
    assert_eq!(chunks[4]["usage"]["total_tokens"], 6);
}

#[tokio::test(start_paused = true)]
async fn ndjson_is_one_json_object_per_line_without_done() {
    let stats = MockStats::new();
    let r = renderer(Api::Completions, true, LineEnding::CrLf);
    let (frames, _) = drain(body(script(2), r, &stats)).await;
    let text = String::from_utf8(concat(&frames)).unwrap();
    let lines: Vec<&str> = text.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 4, "2 tokens, finish, usage: {text:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["object"], "text_completion");
    }
    assert!(!text.contains("[DONE]"));
}

#[tokio::test(start_paused = true)]
async fn chunk_bytes_pads_token_events_and_keeps_them_valid() {
    let stats = MockStats::new();
    let mut r = renderer(Api::Chat, false, LineEnding::Lf);
    r.chunk_bytes = 1000;
    let (frames, _) = drain(body(script(3), r, &stats)).await;
    for (_, f) in &frames[..3] {
        assert_eq!(f.len(), 1000);
        let line = std::str::from_utf8(&f[6..f.len() - 2]).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .ends_with("..."));
    }
}

#[tokio::test(start_paused = true)]
async fn emit_time_stamps_every_event() {
    let stats = MockStats::new();
    let mut r = renderer(Api::Plain, true, LineEnding::Lf);
    r.emit_time = true;
    let before = super::monotonic_nanos();
    let (frames, _) = drain(body(script(3), r, &stats)).await;
    let mut last = before;
    for (_, f) in &frames {
        let v: serde_json::Value = serde_json::from_slice(f).unwrap();
        let mono = v["emit_mono_ns"].as_u64().unwrap();
        assert!(mono >= last);
        last = mono;
        assert!(v["emit_unix_ns"].as_u64().unwrap() > 1_600_000_000_000_000_000);
    }
    assert!(last <= super::monotonic_nanos());
}
