//! A tiny OTLP/HTTP collector for the exporter benchmarks: answers `200` with an empty protobuf body
//! (a valid `ExportTraceServiceResponse`) to every request, after reading the request body whole.
//!
//! It runs on its own thread and current-thread runtime, so it never shares the benchmark's thread;
//! on the 2-core machine it competes for the second core with the telemetry export thread, as a local
//! collector agent would.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// A running sink; stopped (and its thread joined) on drop.
#[derive(Debug)]
pub(crate) struct OtlpSink {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpSink {
    /// Listen on `127.0.0.1:0` and serve until dropped.
    pub(crate) fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the OTLP sink");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the sink's address");
        let requests = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let counter = Arc::clone(&requests);
        let thread = std::thread::Builder::new()
            .name("otlp-sink".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the sink's runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    loop {
                        let stream = tokio::select! {
                            _ = &mut stopped => return,
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => stream,
                                Err(_) => continue,
                            },
                        };
                        let counter = Arc::clone(&counter);
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                                let counter = Arc::clone(&counter);
                                async move {
                                    // Read the export request whole, as a collector does.
                                    let _ = req.into_body().collect().await;
                                    counter.fetch_add(1, Ordering::Relaxed);
                                    let res = Response::builder()
                                        .header(header::CONTENT_TYPE, "application/x-protobuf")
                                        .body(Full::new(Bytes::new()))
                                        .expect("a valid response");
                                    Ok::<_, Infallible>(res)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                });
            })
            .expect("spawn the OTLP sink thread");
        Self {
            addr,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The base URL to give the exporter (`/v1/traces` is appended by the telemetry config).
    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Export requests answered so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
