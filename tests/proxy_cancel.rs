//! Disconnect cancellation through the proxy: the client goes away (FIN, RST, HTTP/2 RST_STREAM), before
//! the response headers or mid-body, and the upstream sees its connection closed (HTTP/1.1) or its stream
//! reset (HTTP/2) within 50 ms on loopback.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};

const LIMIT: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug)]
enum Phase {
    BeforeHeaders,
    MidBody,
}

#[derive(Clone, Copy, Debug)]
enum Hangup {
    Fin,
    Rst,
}

/// An upstream that, per request, either never answers (before headers) or streams one event then stays
/// silent (mid-body). It reports when the proxy dropped the response (stream ended early).
struct Silent {
    up: Upstream,
    started: Arc<tokio::sync::Notify>,
    dropped: Arc<tokio::sync::broadcast::Sender<Instant>>,
    requests: Arc<AtomicUsize>,
}

struct DropSignal(Arc<tokio::sync::broadcast::Sender<Instant>>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(Instant::now());
    }
}

async fn silent(phase: Phase) -> Silent {
    let started = Arc::new(tokio::sync::Notify::new());
    let (tx, _) = tokio::sync::broadcast::channel(16);
    let dropped = Arc::new(tx);
    let requests = Arc::new(AtomicUsize::new(0));
    let (s2, d2, r2) = (started.clone(), dropped.clone(), requests.clone());
    let up = Upstream::start(move |_req| {
        let (started, dropped, requests) = (s2.clone(), d2.clone(), r2.clone());
        async move {
            requests.fetch_add(1, Ordering::SeqCst);
            let guard = DropSignal(dropped);
            match phase {
                Phase::BeforeHeaders => {
                    started.notify_one();
                    // Dropped by hyper when the proxy goes away: never resolves otherwise.
                    let _g = guard;
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                Phase::MidBody => {
                    let (tx, resp) = streamed("text/event-stream");
                    tokio::spawn(async move {
                        let _g = guard;
                        let _ = tx.send(Ok(Bytes::from_static(b"data: first\n\n"))).await;
                        tx.closed().await;
                    });
                    started.notify_one();
                    resp
                }
            }
        }
    })
    .await;
    Silent {
        up,
        started,
        dropped,
        requests,
    }
}

async fn h1_case(phase: Phase, hangup: Hangup, upstream_h2: bool) {
    let s = silent(phase).await;
    let mut toml = format!(
        "[defaults]\nkeepalive_interval = \"off\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\n",
        s.up.addr
    );
    if upstream_h2 {
        toml.push_str("protocol = \"http2\"\n");
    }
    toml.push_str("[[routes]]\npool = \"up\"\n");
    let proxy = Proxy::start(&toml).await;
    let mut c = RawClient::connect(proxy.addr).await;
    let mut closed = s.up.on_close();
    let mut dropped = s.dropped.subscribe();
    c.send("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        .await;
    within("upstream got the request", s.started.notified()).await;
    if let Phase::MidBody = phase {
        c.read_until(b"data: first").await;
    }
    let t0 = Instant::now();
    match hangup {
        Hangup::Fin => c.close_fin().await,
        Hangup::Rst => c.close_rst(),
    }
    let seen = if upstream_h2 {
        // HTTP/2 upstream: the stream is reset; the connection stays for other streams.
        within("upstream stream reset", dropped.recv())
            .await
            .unwrap()
    } else {
        within("upstream connection closed", closed.recv())
            .await
            .unwrap()
    };
    let took = seen.saturating_duration_since(t0);
    eprintln!("{phase:?} {hangup:?} upstream_h2={upstream_h2}: upstream saw the disconnect after {took:?}");
    assert!(
        took < LIMIT,
        "{phase:?} {hangup:?}: upstream saw the disconnect after {took:?}"
    );
    assert_eq!(s.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn h1_fin_before_headers() {
    h1_case(Phase::BeforeHeaders, Hangup::Fin, false).await;
}

#[tokio::test]
async fn h1_rst_before_headers() {
    h1_case(Phase::BeforeHeaders, Hangup::Rst, false).await;
}

#[tokio::test]
async fn h1_fin_mid_body() {
    h1_case(Phase::MidBody, Hangup::Fin, false).await;
}

#[tokio::test]
async fn h1_rst_mid_body() {
    h1_case(Phase::MidBody, Hangup::Rst, false).await;
}

#[tokio::test]
async fn h1_client_h2_upstream_before_headers() {
    h1_case(Phase::BeforeHeaders, Hangup::Fin, true).await;
}

#[tokio::test]
async fn h1_client_h2_upstream_mid_body() {
    h1_case(Phase::MidBody, Hangup::Rst, true).await;
}

/// HTTP/2 client: dropping the response future / body makes hyper send RST_STREAM(CANCEL).
async fn h2_case(phase: Phase) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let s = silent(phase).await;
    let toml = format!(
        "[defaults]\nkeepalive_interval = \"off\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\n[[routes]]\npool = \"up\"\n",
        s.up.addr
    );
    let proxy = Proxy::start(&toml).await;
    let client = client(true);
    let mut closed = s.up.on_close();
    let req = Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let fut = client.request(req);
    let t0;
    match phase {
        Phase::BeforeHeaders => {
            let fut = tokio::spawn(fut);
            within("upstream got the request", s.started.notified()).await;
            t0 = Instant::now();
            fut.abort();
        }
        Phase::MidBody => {
            let resp = within("headers", fut).await.unwrap();
            let mut body = resp.into_body();
            let first = within("first frame", body.frame()).await.unwrap().unwrap();
            assert_eq!(first.into_data().unwrap(), "data: first\n\n");
            t0 = Instant::now();
            drop(body);
        }
    }
    let seen = within("upstream connection closed", closed.recv())
        .await
        .unwrap();
    let took = seen.saturating_duration_since(t0);
    eprintln!("h2 client {phase:?}: upstream saw the disconnect after {took:?}");
    assert!(
        took < LIMIT,
        "h2 {phase:?}: upstream saw the disconnect after {took:?}"
    );
    // The HTTP/2 client connection to the proxy survives its reset stream.
    assert_eq!(s.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn h2_rst_stream_before_headers() {
    h2_case(Phase::BeforeHeaders).await;
}

#[tokio::test]
async fn h2_rst_stream_mid_body() {
    h2_case(Phase::MidBody).await;
}
