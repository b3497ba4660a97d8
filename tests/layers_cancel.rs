//! CancelOnDisconnectLayer: the token fires on a drop before the end and never after it, and the end
//! reason is recorded as specified (first writer wins).

mod layers_support;

use std::convert::Infallible;
use std::time::Duration;

use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use layers_support::{request, response, within, ScriptedBody};
use streamgate::cancel::{CancelBody, CancelOnDisconnectLayer};
use streamgate::idle_timeout::IdleTimeoutLayer;
use streamgate::{EndReason, StreamInfo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

const LIMIT: Duration = Duration::from_secs(3600);

/// A service behind the cancel layer that answers `res` (after `delay`) and hands its request's token
/// to the test.
fn service(
    res: Response<ScriptedBody>,
    delay: Duration,
) -> (
    impl Service<Request<()>, Response = Response<CancelBody<ScriptedBody>>, Error = Infallible>,
    mpsc::UnboundedReceiver<CancellationToken>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut slot = Some(res);
    let handler = service_fn(move |req: Request<()>| {
        let token = req
            .extensions()
            .get::<CancellationToken>()
            .expect("the layer puts a token in the request")
            .clone();
        tx.send(token).unwrap();
        let res = slot.take().expect("one request");
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(res)
        }
    });
    (CancelOnDisconnectLayer::new().layer(handler), rx)
}

async fn handler_token(rx: &mut mpsc::UnboundedReceiver<CancellationToken>) -> CancellationToken {
    within(LIMIT, rx.recv()).await.expect("the handler ran")
}

#[tokio::test(start_paused = true)]
async fn body_dropped_mid_stream_cancels_and_records_client_disconnect() {
    let body = ScriptedBody::new().data("data: a\n\n").hang();
    let probe = body.probe();
    let (svc, mut rx) = service(response(Some("text/event-stream"), body), Duration::ZERO);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    assert!(!token.is_cancelled());
    drop(body);
    assert!(probe.dropped());
    assert!(token.is_cancelled());
    within(LIMIT, token.cancelled()).await;
    assert_eq!(info.end_reason(), Some(EndReason::ClientDisconnect));
}

#[tokio::test(start_paused = true)]
async fn response_future_dropped_before_it_resolves_cancels() {
    let (mut svc, mut rx) = service(response(None, ScriptedBody::new()), Duration::from_secs(10));
    let (req, info) = request();
    within(LIMIT, svc.ready()).await.unwrap();
    let mut fut = Box::pin(svc.call(req));
    // Poll once: the handler runs and waits.
    assert!(futures_util::poll!(fut.as_mut()).is_pending());
    let token = handler_token(&mut rx).await;
    assert!(!token.is_cancelled());
    drop(fut);
    assert!(token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::ClientDisconnect));
}

#[tokio::test(start_paused = true)]
async fn clean_end_never_cancels() {
    let body = ScriptedBody::new()
        .data("data: a\n\n")
        .wait_s(1)
        .data("data: b\n\n");
    let (svc, mut rx) = service(response(Some("text/event-stream"), body), Duration::ZERO);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    assert!(body.is_watching());
    let all = within(LIMIT, body.as_mut().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(all, "data: a\n\ndata: b\n\n");
    assert!(!body.is_watching());
    drop(body);
    assert!(!token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::Complete));
}

#[tokio::test(start_paused = true)]
async fn end_signalled_by_is_end_stream_after_the_last_frame_is_clean() {
    // Like `Full`: hyper sees is_end_stream() after the frame and never polls again.
    let body = ScriptedBody::new().data("{}").report_end();
    let (svc, mut rx) = service(response(Some("application/json"), body), Duration::ZERO);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    assert!(body.is_end_stream());
    drop(body);
    assert!(!token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::Complete));
}

#[tokio::test(start_paused = true)]
async fn body_of_known_length_is_complete_at_its_last_byte() {
    // hyper stops polling once Content-Length bytes are written, even if the body never says "end".
    let body = ScriptedBody::new().data("hello").hang();
    let mut res = response(Some("text/plain"), body);
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, "5".parse().unwrap());
    let (svc, mut rx) = service(res, Duration::ZERO);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    drop(body);
    assert!(!token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::Complete));

    // The same body dropped before its last byte is a disconnect.
    let body = ScriptedBody::new().data("hel").hang();
    let mut res = response(Some("text/plain"), body);
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, "5".parse().unwrap());
    let (svc, mut rx) = service(res, Duration::ZERO);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    drop(body);
    assert!(token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::ClientDisconnect));
}

#[tokio::test(start_paused = true)]
async fn bodiless_responses_are_complete_when_they_resolve() {
    let head = Request::head("/").body(()).unwrap();
    let mut no_content = response(None, ScriptedBody::new().data("ignored").hang());
    *no_content.status_mut() = StatusCode::NO_CONTENT;
    let cases = [
        (
            "HEAD",
            head,
            response(Some("text/event-stream"), ScriptedBody::new().hang()),
        ),
        ("204", Request::new(()), no_content),
        (
            "empty",
            Request::new(()),
            response(None, ScriptedBody::new().report_end()),
        ),
    ];
    for (name, mut req, res) in cases {
        let info = StreamInfo::get_or_insert(&mut req);
        let (svc, mut rx) = service(res, Duration::ZERO);
        let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
        let token = handler_token(&mut rx).await;
        drop(res);
        assert!(!token.is_cancelled(), "{name}");
        assert_eq!(info.end_reason(), Some(EndReason::Complete), "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn trailers_end_the_body() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-usage", "1".parse().unwrap());
    let body = ScriptedBody::new().data("a").trailers(trailers).hang();
    let (svc, mut rx) = service(response(None, body), Duration::ZERO);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    let frame = within(LIMIT, body.frame()).await.unwrap().unwrap();
    assert!(frame.is_trailers());
    drop(body);
    assert!(!token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::Complete));
}

#[tokio::test(start_paused = true)]
async fn upstream_error_is_recorded_and_does_not_cancel() {
    let body = ScriptedBody::new().data("data: a\n").error("reset");
    let (svc, mut rx) = service(response(Some("text/event-stream"), body), Duration::ZERO);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    assert!(within(LIMIT, body.frame()).await.unwrap().is_err());
    drop(body);
    assert!(!token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::UpstreamError));
}

#[tokio::test(start_paused = true)]
async fn an_idle_timeout_recorded_further_in_stands() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut slot = Some(response(
        Some("text/event-stream"),
        ScriptedBody::new().data("data: a\n\n").hang(),
    ));
    let handler = service_fn(move |req: Request<()>| {
        tx.send(req.extensions().get::<CancellationToken>().unwrap().clone())
            .unwrap();
        let res = slot.take().unwrap();
        async move { Ok::<_, Infallible>(res) }
    });
    let svc = ServiceBuilder::new()
        .layer(CancelOnDisconnectLayer::new())
        .layer(IdleTimeoutLayer::new().idle_timeout(Duration::from_secs(5)))
        .service(handler);
    let (req, info) = request();
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let token = handler_token(&mut rx).await;
    let mut body = Box::pin(res.into_body());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    let err = within(LIMIT, body.frame()).await.unwrap().unwrap_err();
    assert!(err.is::<streamgate::idle_timeout::IdleTimeoutError>());
    drop(body);
    assert!(!token.is_cancelled());
    assert_eq!(info.end_reason(), Some(EndReason::IdleTimeout));
}

#[tokio::test(start_paused = true)]
async fn an_existing_token_becomes_the_parent() {
    let parent = CancellationToken::new();
    let body = ScriptedBody::new().data("data: a\n\n").hang();
    let (svc, mut rx) = service(response(Some("text/event-stream"), body), Duration::ZERO);
    let (mut req, _) = request();
    req.extensions_mut().insert(parent.clone());
    let res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let child = handler_token(&mut rx).await;
    drop(res);
    assert!(child.is_cancelled(), "the request's own token fires");
    assert!(
        !parent.is_cancelled(),
        "a disconnect never cancels the shared parent"
    );

    // And cancelling the parent reaches the handler.
    let parent = CancellationToken::new();
    let (svc, mut rx) = service(response(None, ScriptedBody::new().hang()), Duration::ZERO);
    let (mut req, _) = request();
    req.extensions_mut().insert(parent.clone());
    let _res = within(LIMIT, svc.oneshot(req)).await.unwrap();
    let child = handler_token(&mut rx).await;
    parent.cancel();
    within(LIMIT, child.cancelled()).await;
}

#[tokio::test(start_paused = true)]
async fn is_end_stream_and_size_hint_are_forwarded() {
    let body = ScriptedBody::new()
        .data("hello")
        .data("world")
        .report_end()
        .exact_size();
    let (svc, _rx) = service(response(None, body), Duration::ZERO);
    let res = within(LIMIT, svc.oneshot(request().0)).await.unwrap();
    let mut body = Box::pin(res.into_body());
    assert_eq!(body.size_hint().exact(), Some(10));
    assert!(!body.is_end_stream());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    assert_eq!(body.size_hint().exact(), Some(5));
    assert!(!body.is_end_stream());
    within(LIMIT, body.frame()).await.unwrap().unwrap();
    assert_eq!(body.size_hint().exact(), Some(0));
    assert!(body.is_end_stream());

    let (svc, _rx) = service(
        response(None, ScriptedBody::new().data("x")),
        Duration::ZERO,
    );
    let res = within(LIMIT, svc.oneshot(request().0)).await.unwrap();
    assert_eq!(res.body().size_hint().lower(), 1);
    assert_eq!(res.body().size_hint().upper(), None);
}
