//! IdleTimeoutLayer driven directly with scripted bodies on a paused clock: exact virtual times.

mod layers_support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use layers_support::{call_with, drain, request, response, texts, within, Item, ScriptedBody};
use streamgate::idle_timeout::{IdleTimeoutError, IdleTimeoutKind, IdleTimeoutLayer};
use streamgate::EndReason;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

const KA: &str = ": keepalive\n";
const SSE: Option<&str> = Some("text/event-stream");

fn layer(ka_s: u64, idle_s: u64) -> IdleTimeoutLayer {
    IdleTimeoutLayer::new()
        .keepalive_interval(Some(Duration::from_secs(ka_s)))
        .idle_timeout(Duration::from_secs(idle_s))
}

fn t(ms: u128, s: &str) -> (u128, String) {
    (ms, s.to_owned())
}

/// Run `layer` around one response with `body`, returning the drained items and the request's info.
async fn run(
    layer: IdleTimeoutLayer,
    ct: Option<&str>,
    body: ScriptedBody,
) -> (Vec<(Duration, Item)>, streamgate::StreamInfo) {
    let (req, info) = request();
    let start = Instant::now();
    let res = call_with(layer, req, Duration::ZERO, response(ct, body)).await;
    (drain(res.into_body(), start).await, info)
}

fn end_at(items: &[(Duration, Item)]) -> (u128, &Item) {
    let (at, item) = items.last().expect("drained at least the end");
    (at.as_millis(), item)
}

fn idle_error(item: &Item) -> &IdleTimeoutError {
    match item {
        Item::Error(e) => e
            .downcast_ref::<IdleTimeoutError>()
            .expect("an IdleTimeoutError"),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_at_exact_interval_during_silence() {
    let body = ScriptedBody::new()
        .data("data: a\n\n")
        .wait_s(50)
        .data("data: b\n\n");
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: a\n\n"),
            t(15_000, KA),
            t(30_000, KA),
            t(45_000, KA),
            t(50_000, "data: b\n\n"),
        ]
    );
    assert!(matches!(end_at(&items), (50_000, Item::End)));
    assert_eq!(info.heartbeats(), 3);
    assert_eq!(info.heartbeat_bytes(), 3 * KA.len() as u64);
    assert_eq!(info.end_reason(), Some(EndReason::Complete));
}

#[tokio::test(start_paused = true)]
async fn heartbeats_start_before_the_first_upstream_byte() {
    let body = ScriptedBody::new().wait_s(40).data("data: a\n\n");
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [t(15_000, KA), t(30_000, KA), t(40_000, "data: a\n\n")]
    );
}

#[tokio::test(start_paused = true)]
async fn no_heartbeats_while_upstream_talks_more_often_than_the_interval() {
    let mut body = ScriptedBody::new();
    for _ in 0..6 {
        body = body.data("data: x\n\n").wait_ms(14_999);
    }
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(texts(&items).len(), 6);
    assert!(texts(&items).iter().all(|(_, s)| s == "data: x\n\n"));
    assert_eq!(info.heartbeats(), 0);
}

#[tokio::test(start_paused = true)]
async fn upstream_frame_at_the_same_instant_as_the_interval_wins() {
    // Frames exactly one interval apart: data wins the tie, no keepalive is needed.
    let mut body = ScriptedBody::new();
    for _ in 0..4 {
        body = body.data("data: x\n\n").wait_s(15);
    }
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items).iter().map(|(at, _)| *at).collect::<Vec<_>>(),
        [0, 15_000, 30_000, 45_000]
    );
    assert_eq!(info.heartbeats(), 0);
    assert!(matches!(end_at(&items), (60_000, Item::End)));
}

#[tokio::test(start_paused = true)]
async fn idle_cut_at_exact_deadline_heartbeats_do_not_count() {
    let body = ScriptedBody::new().data("data: a\n\n").hang();
    let probe = body.probe();
    let (req, info) = request();
    let start = Instant::now();
    let res = call_with(layer(15, 60), req, Duration::ZERO, response(SSE, body)).await;
    let mut body = std::pin::pin!(res.into_body());
    let mut items = Vec::new();
    loop {
        let frame = within(Duration::from_secs(3600), body.frame()).await;
        let at = start.elapsed().as_millis();
        match frame {
            Some(Ok(f)) => items.push((
                at,
                String::from_utf8(f.into_data().unwrap().to_vec()).unwrap(),
            )),
            Some(Err(e)) => {
                assert_eq!(at, 60_000, "cut at the idle deadline");
                let e = e
                    .downcast_ref::<IdleTimeoutError>()
                    .expect("IdleTimeoutError");
                assert_eq!(e.kind(), IdleTimeoutKind::Idle);
                assert_eq!(e.after(), Duration::from_secs(60));
                break;
            }
            None => panic!("stream ended without the idle error"),
        }
    }
    assert_eq!(
        items,
        [
            t(0, "data: a\n\n"),
            t(15_000, KA),
            t(30_000, KA),
            t(45_000, KA)
        ]
    );
    // The upstream body is dropped at the cut, while the outer body is still alive.
    assert!(probe.dropped());
    assert_eq!(info.end_reason(), Some(EndReason::IdleTimeout));
    assert!(body.is_end_stream());
    // Later polls end the stream without touching the upstream.
    assert!(within(Duration::from_secs(1), body.frame()).await.is_none());
    assert_eq!(probe.polls_after_end(), 0);
}

#[tokio::test(start_paused = true)]
async fn idle_deadline_restarts_on_every_upstream_frame() {
    let body = ScriptedBody::new()
        .data("a")
        .wait_s(15)
        .data("b")
        .wait_s(15)
        .data("c")
        .hang();
    let layer = IdleTimeoutLayer::new()
        .keepalive_interval(None)
        .idle_timeout(Duration::from_secs(20));
    let (items, info) = run(layer, SSE, body).await;
    assert_eq!(texts(&items), [t(0, "a"), t(15_000, "b"), t(30_000, "c")]);
    let (at, item) = end_at(&items);
    assert_eq!(at, 50_000);
    assert_eq!(idle_error(item).kind(), IdleTimeoutKind::Idle);
    assert_eq!(info.heartbeats(), 0);
    assert_eq!(info.end_reason(), Some(EndReason::IdleTimeout));
}

#[tokio::test(start_paused = true)]
async fn idle_deadline_starts_at_the_headers() {
    let body = ScriptedBody::new().hang();
    let (items, _) = run(layer(15, 20), Some("text/plain"), body).await;
    assert_eq!(items.len(), 1);
    let (at, item) = end_at(&items);
    assert_eq!(at, 20_000);
    idle_error(item);
}

/// A future that never resolves and raises a flag when dropped.
struct Forever(Arc<AtomicBool>);

impl Future for Forever {
    type Output = Result<Response<ScriptedBody>, std::convert::Infallible>;
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Pending
    }
}

impl Drop for Forever {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn first_byte_timeout_answers_504_json_at_the_deadline() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    let svc = IdleTimeoutLayer::new()
        .first_byte_timeout(Some(Duration::from_secs(30)))
        .layer(service_fn(move |_req: Request<()>| Forever(flag.clone())));
    let (req, info) = request();
    let start = Instant::now();
    let res = within(Duration::from_secs(3600), svc.oneshot(req))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert!(
        dropped.load(Ordering::SeqCst),
        "the upstream future is dropped at the deadline"
    );
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
    let err = res
        .extensions()
        .get::<IdleTimeoutError>()
        .expect("error in extensions");
    assert_eq!(err.kind(), IdleTimeoutKind::FirstByte);
    assert_eq!(info.end_reason(), Some(EndReason::IdleTimeout));
    let body = res.into_body();
    assert!(!body.is_end_stream());
    let expected = r#"{"error":{"type":"first_byte_timeout","message":"upstream sent no response headers within 30s"}}"#;
    assert_eq!(body.size_hint().exact(), Some(expected.len() as u64));
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(bytes, expected);
}

#[tokio::test(start_paused = true)]
async fn response_ready_at_the_first_byte_deadline_wins() {
    let layer = layer(15, 300).first_byte_timeout(Some(Duration::from_secs(30)));
    let (req, _) = request();
    let body = ScriptedBody::new().data("data: a\n\n");
    let res = call_with(
        layer.clone(),
        req,
        Duration::from_secs(30),
        response(SSE, body),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let (req, _) = request();
    let body = ScriptedBody::new().data("data: a\n\n");
    let res = call_with(
        layer,
        req,
        Duration::from_millis(30_001),
        response(SSE, body),
    )
    .await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn first_byte_timeout_disabled_waits() {
    let layer = layer(15, 300).first_byte_timeout(None);
    let (req, _) = request();
    let start = Instant::now();
    let res = call_with(
        layer,
        req,
        Duration::from_secs(1000),
        response(SSE, ScriptedBody::new()),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(1000));
}

#[tokio::test(start_paused = true)]
async fn no_injection_mid_line_then_at_once_when_a_boundary_is_reached() {
    let body = ScriptedBody::new()
        .data("data: hel")
        .wait_s(40)
        .data("lo\n")
        .wait_s(20)
        .data("\n");
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: hel"),
            t(40_000, "lo\n"),
            t(40_000, KA), // due since 15 s, sent as soon as the line ended
            t(55_000, KA), // then one interval after it
            t(60_000, "\n"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn due_keepalive_waits_through_frames_that_stay_mid_line() {
    let body = ScriptedBody::new()
        .data("data: a")
        .wait_s(20)
        .data("b")
        .wait_s(5)
        .data("c\n\n")
        .wait_s(1);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: a"),
            t(20_000, "b"),
            t(25_000, "c\n\n"),
            t(25_000, KA)
        ]
    );
    assert!(matches!(end_at(&items), (26_000, Item::End)));

    // A due keepalive is not sent after the end: the upstream's end right behind the frame wins.
    let body = ScriptedBody::new().data("data: a").wait_s(20).data("\n\n");
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(texts(&items), [t(0, "data: a"), t(20_000, "\n\n")]);
    assert_eq!(info.heartbeats(), 0);
}

#[tokio::test(start_paused = true)]
async fn no_injection_after_a_bare_cr_until_the_next_byte() {
    // "\r" at the end of a chunk: its LF may follow, so no keepalive until it does.
    let body = ScriptedBody::new()
        .data("data: a\r")
        .wait_s(40)
        .data("\n")
        .wait_s(20)
        .data("\r\n");
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: a\r"),
            t(40_000, "\n"),
            t(40_000, KA),
            t(55_000, KA),
            t(60_000, "\r\n"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn cr_only_stream_gets_no_keepalive_after_its_final_cr() {
    let body = ScriptedBody::new()
        .data("data: a\r\r")
        .wait_s(40)
        .data("data: b\r\r");
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [t(0, "data: a\r\r"), t(40_000, "data: b\r\r")]
    );
    assert_eq!(info.heartbeats(), 0);
}

#[tokio::test(start_paused = true)]
async fn ndjson_keepalive_only_when_configured() {
    let script = || {
        ScriptedBody::new()
            .data("{\"a\":1}\n")
            .wait_s(40)
            .data("{\"b\":2}\n")
    };
    let ct = Some("application/x-ndjson");
    let (items, info) = run(layer(15, 300), ct, script()).await;
    assert_eq!(texts(&items).len(), 2);
    assert_eq!(info.heartbeats(), 0);

    let configured = layer(15, 300).ndjson_keepalive(Some(Bytes::from_static(b"{}\n")));
    let (items, info) = run(
        configured,
        Some("application/jsonl; charset=utf-8"),
        script(),
    )
    .await;
    assert_eq!(
        texts(&items),
        [
            t(0, "{\"a\":1}\n"),
            t(15_000, "{}\n"),
            t(30_000, "{}\n"),
            t(40_000, "{\"b\":2}\n"),
        ]
    );
    assert_eq!(info.heartbeats(), 2);
    // The SSE comment never goes into NDJSON, nor the NDJSON line into SSE.
    let configured = layer(15, 300).ndjson_keepalive(Some(Bytes::from_static(b"{}\n")));
    let (items, _) = run(configured, SSE, script()).await;
    assert_eq!(texts(&items)[1], t(15_000, KA));
}

#[tokio::test(start_paused = true)]
async fn no_injection_into_responses_that_are_not_open_streams() {
    let script = || {
        ScriptedBody::new()
            .data("data: a\n\n")
            .wait_s(40)
            .data("data: b\n\n")
    };
    let cases: Vec<(&str, Request<()>, Response<ScriptedBody>)> = vec![
        (
            "text/plain",
            Request::new(()),
            response(Some("text/plain"), script()),
        ),
        (
            "no content-type",
            Request::new(()),
            response(None, script()),
        ),
        ("content-length", Request::new(()), {
            let mut r = response(SSE, script());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, "18".parse().unwrap());
            r
        }),
        ("gzip", Request::new(()), {
            let mut r = response(SSE, script());
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
            r
        }),
        (
            "exact size",
            Request::new(()),
            response(SSE, script().exact_size()),
        ),
        ("204", Request::new(()), {
            let mut r = response(SSE, script());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }),
        (
            "HEAD",
            Request::head("/").body(()).unwrap(),
            response(SSE, script()),
        ),
    ];
    for (name, req, res) in cases {
        let mut req = req;
        let info = streamgate::StreamInfo::get_or_insert(&mut req);
        let start = Instant::now();
        let res = call_with(layer(15, 300), req, Duration::ZERO, res).await;
        assert!(!res.body().injects_keepalives(), "{name}");
        let items = drain(res.into_body(), start).await;
        assert_eq!(
            texts(&items),
            [t(0, "data: a\n\n"), t(40_000, "data: b\n\n")],
            "{name}"
        );
        assert_eq!(info.heartbeats(), 0, "{name}");
    }
    // And a GET of the same event stream does get them.
    let (req, _) = request();
    let res = call_with(layer(15, 300), req, Duration::ZERO, response(SSE, script())).await;
    assert!(res.body().injects_keepalives());
    assert_eq!(Method::GET, Method::default());
}

#[tokio::test(start_paused = true)]
async fn is_end_stream_and_size_hint_are_forwarded() {
    // Not a stream: the inner hint and end are forwarded exactly.
    let (req, _) = request();
    let body = ScriptedBody::new().data("hello").report_end().exact_size();
    let res = call_with(
        layer(15, 300),
        req,
        Duration::ZERO,
        response(Some("text/plain"), body),
    )
    .await;
    let mut body = std::pin::pin!(res.into_body());
    assert_eq!(body.size_hint().exact(), Some(5));
    assert!(!body.is_end_stream());
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "hello");
    assert!(body.is_end_stream());
    assert_eq!(body.size_hint().exact(), Some(0));

    // A keepalive stream adds bytes: lower bound kept, no upper bound.
    let (req, _) = request();
    let body = ScriptedBody::new().data("data: a\n\n").report_end();
    let res = call_with(layer(15, 300), req, Duration::ZERO, response(SSE, body)).await;
    let mut body = std::pin::pin!(res.into_body());
    assert_eq!(body.size_hint().lower(), 1);
    assert_eq!(body.size_hint().upper(), None);
    assert!(!body.is_end_stream());
    body.frame().await.unwrap().unwrap();
    assert!(body.is_end_stream());

    // An empty body is finished from the start and never armed.
    let (req, _) = request();
    let res = call_with(
        layer(15, 300),
        req,
        Duration::ZERO,
        response(SSE, ScriptedBody::new().report_end()),
    )
    .await;
    assert!(res.body().is_end_stream());
    assert!(!res.body().injects_keepalives());
}

#[tokio::test(start_paused = true)]
async fn upstream_error_passes_through_and_the_upstream_is_not_polled_again() {
    let body = ScriptedBody::new()
        .data("data: a\n")
        .wait_s(5)
        .error("reset");
    let probe = body.probe();
    let (req, info) = request();
    let start = Instant::now();
    let res = call_with(layer(15, 300), req, Duration::ZERO, response(SSE, body)).await;
    let mut body = std::pin::pin!(res.into_body());
    let items = drain(body.as_mut(), start).await;
    let (at, item) = end_at(&items);
    assert_eq!(at, 5_000);
    match item {
        Item::Error(e) => assert!(e.to_string().contains("reset"), "{e}"),
        other => panic!("expected the upstream error, got {other:?}"),
    }
    assert!(probe.dropped());
    assert_eq!(info.end_reason(), Some(EndReason::UpstreamError));
    assert!(body.frame().await.is_none());
    assert_eq!(probe.polls_after_end(), 0);
}

#[tokio::test(start_paused = true)]
async fn trailers_pass_through_and_restart_the_idle_deadline() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-usage", "7".parse().unwrap());
    let body = ScriptedBody::new()
        .data("data: a\n\n")
        .wait_s(10)
        .trailers(trailers);
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert!(
        matches!(&items[1], (at, Item::Trailers(t)) if at.as_secs() == 10 && t["x-usage"] == "7")
    );
    assert!(matches!(end_at(&items), (10_000, Item::End)));
    assert_eq!(info.end_reason(), Some(EndReason::Complete));
}

#[tokio::test(start_paused = true)]
async fn upstream_bom_is_dropped_after_an_early_keepalive() {
    // Split inside the BOM, after a keepalive went out: the BOM would otherwise start line two.
    let body = ScriptedBody::new()
        .wait_s(20)
        .data(&b"\xEF\xBB"[..])
        .data(&b"\xBFdata: x\n\n"[..]);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(texts(&items), [t(15_000, KA), t(20_000, "data: x\n\n")]);

    // Without an early keepalive the BOM is the first byte of the stream and goes through untouched.
    let body = ScriptedBody::new().data(&b"\xEF\xBB\xBFdata: x\n\n"[..]);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(items[0].1.data(), Some(&b"\xEF\xBB\xBFdata: x\n\n"[..]));

    // A withheld prefix that turns out not to be a BOM is given back.
    let body = ScriptedBody::new()
        .wait_s(20)
        .data(&b"\xEF"[..])
        .data(&b"\xBB\x80\n"[..]);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    let data: Vec<_> = items.iter().filter_map(|(_, i)| i.data()).collect();
    assert_eq!(data, [KA.as_bytes(), &b"\xEF\xBB\x80\n"[..]]);
}

#[test]
fn keepalive_lines_are_validated_without_panicking() {
    let l = IdleTimeoutLayer::new();
    assert!(l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b"no colon\n"))
        .is_err());
    assert!(l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b": two\n: lines\n"))
        .is_err());
    assert!(l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b": ping\n"))
        .is_ok());
    assert!(l
        .clone()
        .try_ndjson_keepalive(Some(Bytes::from_static(b"{}")))
        .is_err());
    assert!(l
        .clone()
        .try_ndjson_keepalive(Some(Bytes::from_static(b"{}\r\n")))
        .is_ok());
    let err = l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b"x\n"))
        .unwrap_err();
    assert!(err.reason().contains("':'"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn invalid_keepalive_line_keeps_the_previous_one() {
    let layer = layer(15, 300)
        .keepalive_comment(Bytes::from_static(b": ping\n"))
        .keepalive_comment(Bytes::from_static(b"data: oops\n\n"));
    let body = ScriptedBody::new().wait_s(20).data("data: a\n\n");
    let (items, _) = run(layer, SSE, body).await;
    assert_eq!(
        texts(&items),
        [t(15_000, ": ping\n"), t(20_000, "data: a\n\n")]
    );
}

#[tokio::test(start_paused = true)]
async fn injected_frames_are_marked_for_outer_layers() {
    let body = ScriptedBody::new()
        .data("data: a\n\n")
        .wait_s(20)
        .data("data: b\n\n");
    let (req, info) = request();
    let res = call_with(layer(15, 300), req, Duration::ZERO, response(SSE, body)).await;
    let mut body = std::pin::pin!(res.into_body());
    let mut marks = Vec::new();
    while let Some(frame) = within(Duration::from_secs(3600), body.frame()).await {
        let data = frame.unwrap().into_data().unwrap();
        marks.push((
            String::from_utf8(data.to_vec()).unwrap(),
            info.take_injected(),
        ));
    }
    assert_eq!(
        marks,
        [
            ("data: a\n\n".to_owned(), false),
            (KA.to_owned(), true),
            ("data: b\n\n".to_owned(), false),
        ]
    );
}
