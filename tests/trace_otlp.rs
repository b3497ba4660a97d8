//! End to end over real sockets: client -> the streamgate proxy (`proxy::Server`)
//! -> scripted SSE upstream, with spans exported by the real `Telemetry::init` over OTLP/HTTP to an
//! in-process receiver that decodes `ExportTraceServiceRequest` with prost.
//!
//! One test in this file: it installs the global subscriber.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use streamgate::telemetry::{OtlpProtocol, Telemetry, TelemetryConfig};
use streamgate::BoxError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::Service;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

fn duration(span: &Span) -> Duration {
    Duration::from_nanos(span.end_time_unix_nano - span.start_time_unix_nano)
}

#[track_caller]
fn assert_within_20pct(actual: Duration, expected_ms: u64, what: &str) {
    let expected = expected_ms as f64 / 1e3;
    let got = actual.as_secs_f64();
    assert!(
        (got - expected).abs() <= expected * 0.2,
        "{what}: expected {expected_ms} ms ±20%, got {actual:?}"
    );
}

/// Serve one connection (generic: see rust-lang/rust#64552 in tests/telemetry_metrics.rs).
fn spawn_connection<S, B>(stream: TcpStream, svc: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
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

/// OTLP/HTTP receiver: decodes every export and forwards the spans (with the resource's service name).
async fn otlp_receiver(listener: TcpListener, spans: mpsc::UnboundedSender<(String, Span)>) {
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let spans = spans.clone();
        async move {
            assert_eq!(req.uri().path(), "/v1/traces");
            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
            let body = req.into_body().collect().await?.to_bytes();
            let export = ExportTraceServiceRequest::decode(body)?;
            for rs in export.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        any_value::Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        let _ = spans.send((service.clone(), span));
                    }
                }
            }
            let reply = ExportTraceServiceResponse::default().encode_to_vec();
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::from(reply)))
                    .unwrap(),
            )
        }
    });
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        spawn_connection(stream, svc.clone());
    }
}

/// Scripted upstream: records the traceparent it receives, answers SSE with the first event after
/// 300 ms, then 9 more 50 ms apart (10 events, 450 ms from first to last).
async fn upstream(listener: TcpListener, traceparents: mpsc::UnboundedSender<Option<String>>) {
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let tp = req
            .headers()
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_owned());
        let _ = traceparents.send(tp);
        async move {
            let events = stream::unfold(0u32, |i| async move {
                if i == 10 {
                    return None;
                }
                let wait = if i == 0 { 300 } else { 50 };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let frame = Frame::data(Bytes::from(format!("data: {{\"token\":{i}}}\n\n")));
                Some((Ok::<_, Infallible>(frame), i + 1))
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(StreamBody::new(events))
                    .unwrap(),
            )
        }
    });
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        spawn_connection(stream, svc.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_with_ttfb_and_stream_durations() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let receiver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver_addr = receiver.local_addr().unwrap();
        let (spans_tx, mut spans_rx) = mpsc::unbounded_channel();
        tokio::spawn(otlp_receiver(receiver, spans_tx));

        // Logs quiet (`warn`): spans are exported regardless, through the OTel layer's own filter.
        let telemetry = Arc::new(
            Telemetry::init(TelemetryConfig {
                otlp_endpoint: Some(format!("http://{receiver_addr}")),
                otlp_protocol: OtlpProtocol::HttpProtobuf,
                service_name: Some("streamgate-test".into()),
                log_filter: Some("warn".into()),
            })
            .unwrap(),
        );
        assert_eq!(
            telemetry.otlp_endpoint(),
            Some(format!("http://{receiver_addr}/v1/traces").as_str())
        );

        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        let (tp_tx, mut tp_rx) = mpsc::unbounded_channel();
        tokio::spawn(upstream(up, tp_tx));
        // The real proxy, with the route the span names come from.
        let cfg = streamgate::proxy::Config::from_toml(&format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.llm]\nendpoints = [\"http://{up_addr}\"]\n\
             [[routes]]\npath_prefix = \"/v1/\"\npool = \"llm\"\n"
        ))
        .unwrap();
        let server = streamgate::proxy::Server::bind_with(
            cfg,
            streamgate::proxy::ServerOptions {
                metrics: Some(streamgate::trace::StreamMetrics::new(&telemetry.meter())),
            },
        )
        .await
        .unwrap();
        let px_addr = server.local_addrs()[0];
        tokio::spawn(server.run(std::future::pending::<()>()));

        // The client, continuing its own trace.
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::get(format!("http://{px_addr}/v1/stream"))
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .header("user-agent", "otlp-test")
            .body(Empty::new())
            .unwrap();
        let t0 = Instant::now();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut first_at = None;
        let mut events = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                first_at.get_or_insert_with(|| t0.elapsed());
                events += data.windows(2).filter(|w| w == b"\n\n").count();
            }
        }
        let total = t0.elapsed();
        assert_eq!(events, 10);
        let first_at = first_at.unwrap();
        assert!(first_at >= Duration::from_millis(300), "{first_at:?}");

        let upstream_tp = tp_rx
            .recv()
            .await
            .unwrap()
            .expect("upstream got a traceparent");

        // Flush off the runtime's workers: the receiver runs on this runtime.
        let t = Arc::clone(&telemetry);
        tokio::task::spawn_blocking(move || t.force_flush())
            .await
            .unwrap()
            .unwrap();

        let mut request_span = None;
        let mut stream_span = None;
        while request_span.is_none() || stream_span.is_none() {
            let (service, span) = spans_rx.recv().await.unwrap();
            assert_eq!(service, "streamgate-test");
            match span.name.as_str() {
                "GET /v1/" => request_span = Some(span),
                "GET /v1/ stream" => stream_span = Some(span),
                other => panic!("unexpected span {other:?}"),
            }
        }
        let (req_span, stream_span) = (request_span.unwrap(), stream_span.unwrap());

        // Same trace as the client; the request span is the client's child, the stream span the
        // request span's child.
        assert_eq!(hex(&req_span.trace_id), CLIENT_TRACE);
        assert_eq!(hex(&req_span.parent_span_id), CLIENT_SPAN);
        assert_eq!(req_span.kind, SpanKind::Server as i32);
        assert_eq!(hex(&stream_span.trace_id), CLIENT_TRACE);
        assert_eq!(stream_span.parent_span_id, req_span.span_id);
        assert_eq!(stream_span.kind, SpanKind::Internal as i32);

        // Request span = time to first byte (300 ms upstream think time); stream span = first to
        // last event (9 x 50 ms).
        eprintln!(
            "request span {:?} (script: 300 ms to first token), stream span {:?} (script: 9 x 50 ms)",
            duration(&req_span),
            duration(&stream_span)
        );
        assert_within_20pct(duration(&req_span), 300, "request span");
        assert_within_20pct(duration(&stream_span), 450, "stream span");
        assert!(duration(&req_span) + duration(&stream_span) <= total + Duration::from_millis(5));
        assert!(stream_span.start_time_unix_nano >= req_span.end_time_unix_nano - 1_000_000);

        // The upstream was called in the same trace, with the request span as parent.
        let parts: Vec<&str> = upstream_tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{upstream_tp}");
        assert_eq!(parts[1], CLIENT_TRACE);
        assert_eq!(parts[2], hex(&req_span.span_id));
        assert_eq!(parts[3], "01");

        use any_value::Value::{IntValue, StringValue};
        let s = |v: &str| Some(StringValue(v.to_owned()));
        assert_eq!(attr(&req_span, "http.request.method").cloned(), s("GET"));
        assert_eq!(attr(&req_span, "http.route").cloned(), s("/v1/"));
        assert_eq!(
            attr(&req_span, "http.response.status_code").cloned(),
            Some(IntValue(200))
        );
        assert_eq!(
            attr(&req_span, "upstream.address").cloned(),
            s(&format!("http://{up_addr}"))
        );
        assert_eq!(attr(&req_span, "client.address").cloned(), s("127.0.0.1"));
        assert_eq!(
            attr(&req_span, "user_agent.original").cloned(),
            s("otlp-test")
        );
        assert_eq!(
            attr(&stream_span, "streamgate.events").cloned(),
            Some(IntValue(10))
        );
        assert_eq!(
            attr(&stream_span, "streamgate.chunks").cloned(),
            Some(IntValue(10))
        );
        assert_eq!(
            attr(&stream_span, "streamgate.end_reason").cloned(),
            s("complete")
        );

        assert_eq!(telemetry.spans_dropped(), 0);
        assert!(telemetry.spans_exported() >= 2);
        tokio::task::spawn_blocking(move || telemetry.shutdown())
            .await
            .unwrap();
    })
    .await
    .expect("test timed out");
}
