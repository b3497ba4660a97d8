//! `GET /metrics` over HTTP/1.1 and HTTP/2.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::{Telemetry, PROMETHEUS_CONTENT_TYPE};

/// Serve `GET /metrics` (and `HEAD`) on `listener` in the Prometheus text format until `shutdown`
/// completes; every other request gets 404. Open connections get up to 5 s to finish after
/// `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let telemetry = Arc::clone(&telemetry);
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let response = metrics_response(&telemetry, req.method(), req.uri().path());
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(target: "streamgate::telemetry", error = %e, "metrics listener accept failed");
                    crate::timers::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    let _ = crate::timers::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

fn metrics_response(telemetry: &Telemetry, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if path != "/metrics" || (method != Method::GET && method != Method::HEAD) {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"not found; try GET /metrics\n",
        )));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let text = telemetry.render_prometheus();
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(text)
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::TelemetryConfig;

    #[test]
    fn metrics_endpoint_routes() {
        let t = Telemetry::new(TelemetryConfig::default()).unwrap();
        let ok = metrics_response(&t, &Method::GET, "/metrics");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()["content-type"], PROMETHEUS_CONTENT_TYPE);
        assert_eq!(
            metrics_response(&t, &Method::GET, "/").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            metrics_response(&t, &Method::POST, "/metrics").status(),
            StatusCode::NOT_FOUND
        );
        t.shutdown();
    }
}
