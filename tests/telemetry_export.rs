//! A collector that is down or hung never slows traffic: spans are dropped and counted, flush and
//! shutdown are bounded. Real collector sockets on 127.0.0.1 (one that accepts and never answers,
//! one that refuses), requests through the layer in-process.
//!
//! One test in this file: it sets `OTEL_*` environment variables before building the exporters.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use streamgate::telemetry::{OtlpProtocol, Telemetry, TelemetryConfig};
use streamgate::trace::StreamTraceLayer;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tracing_subscriber::layer::SubscriberExt;

/// Run `n` requests with a streamed body through the layer; each produces two spans.
async fn traffic(n: usize) -> Duration {
    let svc = StreamTraceLayer::new()
        .access_log(false)
        .layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Full::new(Bytes::from_static(b"data: x\n\n")))
                    .unwrap(),
            )
        }));
    let t0 = Instant::now();
    for _ in 0..n {
        let resp = svc
            .clone()
            .oneshot(Request::get("/v1/x").body(()).unwrap())
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
    }
    t0.elapsed()
}

fn with_exporter(telemetry: &Telemetry) -> tracing::subscriber::DefaultGuard {
    let subscriber = tracing_subscriber::registry().with(telemetry.otel_layer());
    tracing::subscriber::set_default(subscriber)
}

#[tokio::test]
async fn a_dead_or_hung_collector_costs_dropped_spans_not_latency() {
    // SAFETY of set_var: this is the only test in this binary, and no other thread reads the
    // environment concurrently before the exporters are built.
    std::env::set_var("OTEL_BSP_MAX_QUEUE_SIZE", "16");
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "20");
    std::env::set_var("OTEL_EXPORTER_OTLP_TIMEOUT", "300");

    tokio::time::timeout(Duration::from_secs(30), async {
        // A collector that accepts connections and never answers.
        let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_addr = hung.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hung.accept().await {
                held.push(s);
            }
        });
        let telemetry = Telemetry::new(TelemetryConfig {
            otlp_endpoint: Some(format!("http://{hung_addr}")),
            ..Default::default()
        })
        .unwrap();
        {
            let _g = with_exporter(&telemetry);
            let took = traffic(500).await;
            assert!(
                took < Duration::from_secs(5),
                "traffic was slowed: {took:?}"
            );
        }
        assert!(telemetry.spans_dropped() > 0, "a full queue drops spans");
        assert_eq!(telemetry.spans_exported(), 0);
        let metrics = telemetry.render_prometheus();
        assert!(
            metrics.contains("streamgate_telemetry_spans_dropped_total{reason=\"queue_full\"}"),
            "{metrics}"
        );
        // Shutdown from async code on a current-thread runtime: no deadlock, and bounded by the
        // 300 ms OTLP timeout per export rather than by the 5 s shutdown cap.
        let t0 = Instant::now();
        telemetry.shutdown();
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

        // A gRPC collector that refuses connections.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let telemetry = Telemetry::new(TelemetryConfig {
            otlp_endpoint: Some(format!("http://{closed_addr}")),
            otlp_protocol: OtlpProtocol::Grpc,
            ..Default::default()
        })
        .unwrap();
        {
            let _g = with_exporter(&telemetry);
            let took = traffic(50).await;
            assert!(
                took < Duration::from_secs(5),
                "traffic was slowed: {took:?}"
            );
        }
        let t0 = Instant::now();
        assert!(
            telemetry.force_flush().is_err(),
            "the export cannot succeed"
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert!(telemetry.spans_dropped() > 0);
        assert_eq!(telemetry.spans_exported(), 0);
        telemetry.shutdown();
    })
    .await
    .expect("test timed out");
}
