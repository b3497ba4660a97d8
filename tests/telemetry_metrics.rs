//! Metrics over the wire: streams through a real hyper server with `StreamTraceLayer` + metrics, then
//! `/metrics` scraped from `serve_metrics` over a socket. Real sockets, real time, short durations,
//! one outer timeout around everything.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use streamgate::telemetry::{serve_metrics, Telemetry, TelemetryConfig};
use streamgate::trace::{StreamMetrics, StreamTraceLayer};
use streamgate::BoxError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tower::Layer;

type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Fires when dropped: the inner body is dropped right after the layer finished the request.
struct DropSignal(Option<mpsc::UnboundedSender<&'static str>>, &'static str);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(self.1);
        }
    }
}

enum Script {
    /// n events 20 ms apart, then the end.
    Events(u32),
    /// One event, then an upstream failure.
    FailAfterOne,
    /// An event every 20 ms, forever (the client will leave).
    Forever,
}

fn body(script: Script, signal: DropSignal) -> Body {
    let s = stream::unfold((0u32, script, signal), |(i, script, signal)| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let frame: Result<Frame<Bytes>, BoxError> = match script {
            Script::Events(n) if i >= n => return None,
            Script::FailAfterOne if i >= 1 => Err("upstream reset".into()),
            _ => Ok(Frame::data(Bytes::from(format!("data: {i}\n\n")))),
        };
        Some((frame, (i + 1, script, signal)))
    });
    StreamBody::new(s).boxed_unsync()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn scraped_metrics_show_large_buckets_gauge_and_end_reasons() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let telemetry = Arc::new(Telemetry::new(TelemetryConfig::default()).unwrap());
        let metrics = StreamMetrics::new(&telemetry.meter());

        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
        let layer = StreamTraceLayer::new()
            .access_log(false)
            .metrics(metrics.clone());
        tokio::spawn(serve_app(app, layer, metrics, dropped_tx));

        let prom = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let prom_addr = prom.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(prom, Arc::clone(&telemetry), async {
            let _ = stopped.await;
        }));

        // A complete stream and a failing one.
        let ok = http_get(app_addr, "/ok").await;
        assert!(ok.contains("data: 2\n\n"), "{ok}");
        assert_eq!(dropped.recv().await, Some("ok"));
        let fail = http_get(app_addr, "/fail").await;
        assert!(fail.contains("data: 0\n\n"), "{fail}");
        assert_eq!(dropped.recv().await, Some("fail"));

        // A client that leaves mid-stream: while it reads, the stream is active.
        let mut client = TcpStream::connect(app_addr).await.unwrap();
        client
            .write_all(b"GET /forever HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        while !seen.windows(8).any(|w| w == b"data: 1\n") {
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream closed early");
            seen.extend_from_slice(&buf[..n]);
        }
        let during = http_get(prom_addr, "/metrics").await;
        assert_eq!(
            sample(&during, "streamgate_streams_active"),
            Some(1.0),
            "{during}"
        );
        drop(client);
        assert_eq!(dropped.recv().await, Some("forever"));

        let resp = http_get(prom_addr, "/metrics").await;
        let (head, text) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert_eq!(
            sample(text, "streamgate_streams_active"),
            Some(0.0),
            "{text}"
        );
        for (reason, n) in [
            ("complete", 1.0),
            ("upstream_error", 1.0),
            ("client_disconnect", 1.0),
        ] {
            let series = format!("streamgate_streams_ended_total{{reason=\"{reason}\"}}");
            assert_eq!(sample(text, &series), Some(n), "{series} in\n{text}");
        }
        assert_eq!(
            sample(
                text,
                "streamgate_upstream_errors_total{endpoint=\"10.0.0.1:8000\"}"
            ),
            Some(1.0)
        );
        // Large buckets exist, and every stream's TTFB (20 ms here) fell in them cumulatively.
        assert_eq!(
            sample(
                text,
                "streamgate_time_to_first_byte_seconds_bucket{le=\"120\"}"
            ),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(
                text,
                "streamgate_time_to_first_byte_seconds_bucket{le=\"300\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(
                text,
                "streamgate_time_to_first_byte_seconds_bucket{le=\"0.005\"}"
            ),
            Some(0.0),
            "nothing answers its first byte in under 5 ms here"
        );
        assert_eq!(
            sample(
                text,
                "streamgate_stream_duration_seconds_bucket{le=\"3600\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(text, "streamgate_stream_duration_seconds_count"),
            Some(3.0)
        );
        let events = sample(text, "streamgate_stream_events_total").unwrap();
        assert!(events >= 3.0 + 1.0 + 2.0, "{events}");
        assert!(sample(text, "streamgate_stream_bytes_total").unwrap() > 0.0);
        assert!(text.contains("# TYPE streamgate_time_to_first_byte_seconds histogram"));
        assert!(text.contains("# TYPE streamgate_streams_ended_total counter"));
        assert!(text.contains("# TYPE streamgate_streams_active gauge"));
        assert!(text.contains("target_info{"), "{text}");

        let not_found = http_get(prom_addr, "/").await;
        assert!(not_found.starts_with("HTTP/1.1 404"), "{not_found}");

        stop.send(()).unwrap();
        server.await.unwrap();
    })
    .await
    .expect("test timed out");
}

async fn serve_app(
    listener: TcpListener,
    layer: StreamTraceLayer,
    metrics: StreamMetrics,
    dropped: mpsc::UnboundedSender<&'static str>,
) {
    let svc = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        let dropped = dropped.clone();
        let (script, name) = match req.uri().path() {
            "/ok" => (Script::Events(3), "ok"),
            "/fail" => {
                // What the proxy does when its upstream fails.
                metrics.upstream_error("10.0.0.1:8000");
                (Script::FailAfterOne, "fail")
            }
            _ => (Script::Forever, "forever"),
        };
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body(script, DropSignal(Some(dropped), name)))
                    .unwrap(),
            )
        }
    });
    let svc = layer.layer(svc);
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        spawn_connection(stream, svc.clone());
    }
}

/// Serve one connection. Generic on purpose: spawning the concrete future inline trips rustc's
/// "implementation of `From` is not general enough" (rust-lang/rust#64552) because the body error is
/// `Box<dyn Error + Send + Sync>`; behind type parameters the `Send` check goes through the bounds.
fn spawn_connection<S, B>(stream: TcpStream, svc: S)
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    tokio::spawn(async move {
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
            .await;
    });
}
