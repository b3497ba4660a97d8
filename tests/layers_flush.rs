//! FlushLayer: one data frame per flush (a `Pending` between ready frames, none added otherwise), exact
//! forwarding of `is_end_stream`/`size_hint`, and the anti-buffering headers.

mod layers_support;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use layers_support::{call_with, request, response, within, ScriptedBody};
use streamgate::flush::{FlushBody, FlushLayer};
use tokio::time::Instant;

/// A waker that counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, PartialEq)]
enum P {
    Data(String),
    Err,
    Pending,
    End,
}

fn d(s: &str) -> P {
    P::Data(s.to_owned())
}

fn poll_once<B>(body: Pin<&mut B>, cx: &mut Context<'_>) -> P
where
    B: Body<Data = Bytes>,
{
    match body.poll_frame(cx) {
        Poll::Pending => P::Pending,
        Poll::Ready(None) => P::End,
        Poll::Ready(Some(Err(_))) => P::Err,
        Poll::Ready(Some(Ok(f))) => {
            let d = f.into_data().unwrap();
            P::Data(String::from_utf8(d.to_vec()).unwrap())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn returns_pending_once_between_ready_frames_and_wakes_itself() {
    let body = FlushBody::new(ScriptedBody::new().data("a").data("b").data("c"));
    let mut body = std::pin::pin!(body);
    let counter = Arc::new(CountingWaker::default());
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut seen = Vec::new();
    let mut wakes = Vec::new();
    for _ in 0..6 {
        seen.push(poll_once(body.as_mut(), &mut cx));
        wakes.push(counter.0.load(Ordering::SeqCst));
    }
    assert_eq!(
        seen,
        [d("a"), P::Pending, d("b"), P::Pending, d("c"), P::End]
    );
    // Each `Pending` woke the task at once, so hyper polls again right after flushing.
    assert_eq!(wakes, [0, 1, 1, 2, 2, 2]);
}

#[tokio::test(start_paused = true)]
async fn adds_no_pending_and_no_delay_when_the_upstream_pauses() {
    let inner = ScriptedBody::new()
        .data("a")
        .wait_ms(10)
        .data("b")
        .wait_ms(10)
        .data("c");
    let probe = inner.probe();
    let mut body = std::pin::pin!(FlushBody::new(inner));
    let start = Instant::now();
    let mut pendings = 0;
    let mut frames = Vec::new();
    within(
        Duration::from_secs(60),
        std::future::poll_fn(|cx| loop {
            match body.as_mut().poll_frame(cx) {
                Poll::Pending => {
                    pendings += 1;
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(f))) => {
                    frames.push((start.elapsed().as_millis(), f.into_data().unwrap()))
                }
                Poll::Ready(Some(Err(e))) => panic!("{e}"),
                Poll::Ready(None) => return Poll::Ready(()),
            }
        }),
    )
    .await;
    assert_eq!(
        frames,
        [(0, "a"), (10, "b"), (20, "c")].map(|(t, d)| (t, Bytes::from_static(d.as_bytes())))
    );
    // Only the upstream's own two pauses: the flush added none.
    assert_eq!(pendings, 2);
    assert_eq!(probe.polls(), 6);
}

#[tokio::test(start_paused = true)]
async fn an_error_right_behind_data_waits_for_the_flush() {
    let mut body = std::pin::pin!(FlushBody::new(ScriptedBody::new().data("a").error("cut")));
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let seen: Vec<_> = (0..3).map(|_| poll_once(body.as_mut(), &mut cx)).collect();
    assert_eq!(seen, [d("a"), P::Pending, P::Err]);
}

#[tokio::test(start_paused = true)]
async fn trailers_behind_data_are_held_too_and_the_end_is_not() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-done", "1".parse().unwrap());
    let mut body = std::pin::pin!(FlushBody::new(
        ScriptedBody::new().data("a").trailers(trailers)
    ));
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(poll_once(body.as_mut(), &mut cx), d("a"));
    assert_eq!(poll_once(body.as_mut(), &mut cx), P::Pending);
    assert!(
        matches!(body.as_mut().poll_frame(&mut cx), Poll::Ready(Some(Ok(f))) if f.is_trailers())
    );
    // After trailers (not data) nothing is held.
    assert_eq!(poll_once(body.as_mut(), &mut cx), P::End);

    let mut body = std::pin::pin!(FlushBody::new(ScriptedBody::new().data("a")));
    assert_eq!(poll_once(body.as_mut(), &mut cx), d("a"));
    assert_eq!(poll_once(body.as_mut(), &mut cx), P::End);
}

#[tokio::test(start_paused = true)]
async fn is_end_stream_and_size_hint_are_exact_even_while_holding_a_frame() {
    let inner = ScriptedBody::new()
        .data("hello")
        .data("world")
        .report_end()
        .exact_size();
    let mut body = std::pin::pin!(FlushBody::new(inner));
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(body.size_hint().exact(), Some(10));
    assert!(!body.is_end_stream());
    assert_eq!(poll_once(body.as_mut(), &mut cx), d("hello"));
    assert_eq!(body.size_hint().exact(), Some(5));
    assert_eq!(poll_once(body.as_mut(), &mut cx), P::Pending);
    // The inner body is finished, but "world" is held: still 5 bytes to come, not the end.
    assert_eq!(body.get_ref().size_hint().exact(), Some(0));
    assert!(body.get_ref().is_end_stream());
    assert_eq!(body.size_hint().exact(), Some(5));
    assert!(!body.is_end_stream());
    assert_eq!(poll_once(body.as_mut(), &mut cx), d("world"));
    assert_eq!(body.size_hint().exact(), Some(0));
    assert!(body.is_end_stream());

    // Inexact hints are forwarded as they are.
    let body = FlushBody::new(ScriptedBody::new().data("x"));
    assert_eq!(body.size_hint().lower(), 1);
    assert_eq!(body.size_hint().upper(), None);
}

async fn headers_for(
    layer: FlushLayer,
    req: Request<()>,
    res: Response<ScriptedBody>,
) -> http::HeaderMap {
    call_with(layer, req, Duration::ZERO, res)
        .await
        .headers()
        .clone()
}

fn get() -> Request<()> {
    request().0
}

fn res_with(ct: Option<&str>, extra: &[(&'static str, &'static str)]) -> Response<ScriptedBody> {
    let mut res = response(ct, ScriptedBody::new().data("data: a\n\n"));
    for (k, v) in extra {
        res.headers_mut().append(*k, v.parse().unwrap());
    }
    res
}

fn values(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn event_streams_get_anti_buffering_headers() {
    let h = headers_for(
        FlushLayer::new(),
        get(),
        res_with(
            Some("text/event-stream; charset=utf-8"),
            &[("cache-control", "private"), ("content-length", "9")],
        ),
    )
    .await;
    assert_eq!(values(&h, "x-accel-buffering"), ["no"]);
    assert_eq!(
        values(&h, "cache-control"),
        ["private, no-cache, no-transform"]
    );
    assert!(!h.contains_key(header::CONTENT_LENGTH));
}

#[tokio::test]
async fn ndjson_gets_them_but_keeps_its_length() {
    let h = headers_for(
        FlushLayer::new(),
        get(),
        res_with(Some("application/x-ndjson"), &[("content-length", "9")]),
    )
    .await;
    assert_eq!(values(&h, "x-accel-buffering"), ["no"]);
    assert_eq!(values(&h, "cache-control"), ["no-cache, no-transform"]);
    assert_eq!(values(&h, "content-length"), ["9"]);
}

#[tokio::test]
async fn upstream_choices_are_kept_and_not_duplicated() {
    let h = headers_for(
        FlushLayer::new(),
        get(),
        res_with(
            Some("text/event-stream"),
            &[
                ("x-accel-buffering", "yes"),
                ("cache-control", "no-cache"),
                ("cache-control", "no-transform"),
            ],
        ),
    )
    .await;
    assert_eq!(values(&h, "x-accel-buffering"), ["yes"]);
    assert_eq!(values(&h, "cache-control"), ["no-cache", "no-transform"]);
}

#[tokio::test]
async fn other_chunked_responses_only_turn_proxy_buffering_off() {
    let h = headers_for(FlushLayer::new(), get(), res_with(Some("text/plain"), &[])).await;
    assert_eq!(values(&h, "x-accel-buffering"), ["no"]);
    assert!(!h.contains_key(header::CACHE_CONTROL));
}

#[tokio::test]
async fn responses_of_known_length_and_bodiless_ones_are_untouched() {
    let cases = [
        (
            "content-length",
            get(),
            res_with(Some("application/json"), &[("content-length", "9")]),
        ),
        (
            "exact size",
            get(),
            response(
                Some("application/json"),
                ScriptedBody::new().data("{}").exact_size(),
            ),
        ),
        (
            "HEAD",
            Request::head("/").body(()).unwrap(),
            res_with(Some("text/plain"), &[]),
        ),
        ("204", get(), {
            let mut r = res_with(Some("text/event-stream"), &[]);
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }),
    ];
    for (name, req, res) in cases {
        let before = res.headers().clone();
        let h = headers_for(FlushLayer::new(), req, res).await;
        assert_eq!(h, before, "{name}");
    }
}

#[tokio::test]
async fn anti_buffering_headers_can_be_switched_off() {
    let layer = FlushLayer::new().anti_buffering_headers(false);
    let res = res_with(Some("text/event-stream"), &[("content-length", "9")]);
    let before = res.headers().clone();
    let h = headers_for(layer, get(), res).await;
    assert_eq!(h, before);
}

#[tokio::test]
async fn frames_pass_through_unchanged_behind_the_layer() {
    let res = response(
        Some("text/event-stream"),
        ScriptedBody::new().data("data: a\n\n").data("data: b\n\n"),
    );
    let res = call_with(FlushLayer::new(), get(), Duration::ZERO, res).await;
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "data: a\n\ndata: b\n\n");
}
