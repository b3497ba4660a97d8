//! IdleTimeoutLayer deadlines, driven with scripted bodies on a paused clock: exact virtual times of
//! the idle cut and the first-byte 504, exact forwarding of frames, ends and hints.

mod layers_support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use layers_support::{
    call_with, drain_and_keep, end_at, layer, request, response, run, t, texts, within, Item,
    ScriptedBody, KA, SSE,
};
use streamgate::idle_timeout::{IdleTimeoutError, IdleTimeoutKind, IdleTimeoutLayer};
use streamgate::EndReason;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

fn idle_error(item: &Item) -> &IdleTimeoutError {
    match item {
        Item::Error(e) => e
            .downcast_ref::<IdleTimeoutError>()
            .expect("an IdleTimeoutError"),
        other => panic!("expected an error, got {other:?}"),
    }
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
    let (items, mut body) = drain_and_keep(res.into_body(), start).await;
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
