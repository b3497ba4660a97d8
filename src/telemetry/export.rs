//! The span export path: a private tokio runtime thread, a bounded span queue, and an
//! `opentelemetry_http::HttpClient` on hyper-util.
//!
//! Design: ending a span never blocks and never touches the application's runtime. `on_end` does a
//! `try_send` into a bounded queue (a full queue drops the span and counts it). One task on a
//! dedicated current-thread runtime (thread `streamgate-telemetry`) batches and exports, with a
//! timeout per export. A collector that is down or slow therefore costs at most the queue's memory.
//! Flush and shutdown wait on that thread with a timeout, so they are safe from any thread, including
//! a tokio worker of a current-thread runtime (the work they wait for runs elsewhere).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::Context;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

/// Largest collector response body read (the OTLP response is a few bytes; this bounds a bad one).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// A current-thread tokio runtime on its own OS thread, for telemetry export only.
pub(crate) struct ExportRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for ExportRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportRuntime")
            .field("running", &self.stop.is_some())
            .finish()
    }
}

impl ExportRuntime {
    pub(crate) fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("streamgate-telemetry".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
                // Tasks still running (an export stuck on a dead collector) are dropped.
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stop the runtime and join its thread (bounded: tasks are dropped, not awaited).
    pub(crate) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Counters of the span queue, readable at any time.
#[derive(Debug, Default)]
pub(crate) struct QueueStats {
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_export_failed: AtomicU64,
    pub(crate) exported: AtomicU64,
}

impl QueueStats {
    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Queue and batch settings; the standard `OTEL_BSP_*` variables override the defaults.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueConfig {
    pub(crate) max_queue_size: usize,
    pub(crate) max_export_batch_size: usize,
    pub(crate) scheduled_delay: Duration,
    pub(crate) export_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(5),
            export_timeout: Duration::from_secs(30),
        }
    }
}

impl QueueConfig {
    /// Defaults overridden by `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
    /// `OTEL_BSP_SCHEDULE_DELAY` and `OTEL_BSP_EXPORT_TIMEOUT` (milliseconds), like the SDK's.
    pub(crate) fn from_env() -> Self {
        fn var(name: &str) -> Option<u64> {
            std::env::var(name).ok()?.trim().parse().ok()
        }
        let mut c = Self::default();
        if let Some(v) = var("OTEL_BSP_MAX_QUEUE_SIZE").filter(|&v| v > 0) {
            c.max_queue_size = v as usize;
        }
        if let Some(v) = var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").filter(|&v| v > 0) {
            c.max_export_batch_size = v as usize;
        }
        if let Some(v) = var("OTEL_BSP_SCHEDULE_DELAY").filter(|&v| v > 0) {
            c.scheduled_delay = Duration::from_millis(v);
        }
        if let Some(v) = var("OTEL_BSP_EXPORT_TIMEOUT").filter(|&v| v > 0) {
            c.export_timeout = Duration::from_millis(v);
        }
        c.max_export_batch_size = c.max_export_batch_size.min(c.max_queue_size);
        c
    }
}

enum Control {
    Flush(std::sync::mpsc::SyncSender<OTelSdkResult>),
    Shutdown(std::sync::mpsc::SyncSender<OTelSdkResult>),
}

/// A batching span processor whose `on_end` never blocks. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct QueueSpanProcessor {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    stats: Arc<QueueStats>,
    flush_timeout: Duration,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Control::Flush(_) => "Flush",
            Control::Shutdown(_) => "Shutdown",
        })
    }
}

impl QueueSpanProcessor {
    /// Start the export task on `handle` and return the processor feeding it.
    pub(crate) fn spawn<E>(exporter: E, config: QueueConfig, handle: &Handle) -> Self
    where
        E: SpanExporter + 'static,
    {
        let (spans, spans_rx) = mpsc::channel(config.max_queue_size.max(1));
        let (control, control_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(QueueStats::default());
        let worker = Worker {
            exporter,
            config,
            stats: Arc::clone(&stats),
            batch: Vec::with_capacity(config.max_export_batch_size),
        };
        handle.spawn(worker.run(spans_rx, control_rx));
        Self {
            spans,
            control,
            stats,
            flush_timeout: Duration::from_secs(5),
        }
    }

    pub(crate) fn stats(&self) -> Arc<QueueStats> {
        Arc::clone(&self.stats)
    }

    fn request(
        &self,
        make: impl FnOnce(std::sync::mpsc::SyncSender<OTelSdkResult>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.control
            .send(make(tx))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(OTelSdkError::AlreadyShutdown)
            }
        }
    }
}

impl SpanProcessor for QueueSpanProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.spans.try_send(span).is_err() {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.request(Control::Flush, self.flush_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.request(Control::Shutdown, timeout)
    }
}

struct Worker<E> {
    exporter: E,
    config: QueueConfig,
    stats: Arc<QueueStats>,
    batch: Vec<SpanData>,
}

impl<E: SpanExporter> Worker<E> {
    async fn run(
        mut self,
        mut spans: mpsc::Receiver<SpanData>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut tick = tokio::time::interval(self.config.scheduled_delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                ctl = control.recv() => match ctl {
                    Some(Control::Flush(reply)) => {
                        let result = self.drain(&mut spans).await;
                        let _ = reply.send(result);
                    }
                    Some(Control::Shutdown(reply)) => {
                        let result = self.drain(&mut spans).await;
                        let _ = self.exporter.shutdown();
                        let _ = reply.send(result);
                        return;
                    }
                    None => {
                        let _ = self.drain(&mut spans).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    let _ = self.export().await;
                }
                span = spans.recv() => match span {
                    Some(span) => {
                        self.batch.push(span);
                        if self.batch.len() >= self.config.max_export_batch_size {
                            let _ = self.export().await;
                        }
                    }
                    None => {
                        let _ = self.export().await;
                        return;
                    }
                },
            }
        }
    }

    /// Export everything queued so far.
    async fn drain(&mut self, spans: &mut mpsc::Receiver<SpanData>) -> OTelSdkResult {
        let mut result = Ok(());
        loop {
            while self.batch.len() < self.config.max_export_batch_size {
                match spans.try_recv() {
                    Ok(span) => self.batch.push(span),
                    Err(_) => break,
                }
            }
            if self.batch.is_empty() {
                return result;
            }
            if let Err(e) = self.export().await {
                result = Err(e);
            }
        }
    }

    async fn export(&mut self) -> OTelSdkResult {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(
            &mut self.batch,
            Vec::with_capacity(self.config.max_export_batch_size),
        );
        let n = batch.len() as u64;
        let outcome = tokio::time::timeout(self.config.export_timeout, self.exporter.export(batch));
        let result = match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(OTelSdkError::Timeout(self.config.export_timeout)),
        };
        let counter = match result {
            Ok(()) => &self.stats.exported,
            Err(_) => &self.stats.dropped_export_failed,
        };
        counter.fetch_add(n, Ordering::Relaxed);
        result
    }
}

/// `opentelemetry_http::HttpClient` on the hyper-util legacy client (HTTP/1.1, plain or rustls TLS).
///
/// Each request runs as a task on the telemetry runtime and is awaited through its `JoinHandle`,
/// so the future works from any executor (including `futures::executor::block_on`).
#[derive(Clone, Debug)]
pub(crate) struct HyperHttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    handle: Handle,
    timeout: Duration,
}

impl HyperHttpClient {
    pub(crate) fn new(handle: Handle, timeout: Duration) -> Result<Self, rustls::Error> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            handle,
            timeout,
        })
    }
}

async fn send(
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    request: Request<Bytes>,
) -> Result<Response<Bytes>, HttpError> {
    let (parts, body) = request.into_parts();
    let response = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}

impl HttpClient for HyperHttpClient {
    // The trait is declared with `#[async_trait]`; this is its desugared signature.
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.handle.spawn(async move {
            match tokio::time::timeout(timeout, send(client, request)).await {
                Ok(result) => result,
                Err(_) => Err(format!("OTLP export timed out after {timeout:?}").into()),
            }
        });
        Box::pin(async move { task.await.map_err(|e| Box::new(e) as HttpError)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanKind, Status};
    use opentelemetry::InstrumentationScope;
    use std::time::{Instant, SystemTime};

    fn span_data() -> SpanData {
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "s".into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("t").build(),
        }
    }

    /// An exporter whose exports never finish: a collector that accepted the connection and hung.
    #[derive(Debug)]
    struct Hung;

    impl SpanExporter for Hung {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            std::future::pending().await
        }
    }

    /// An exporter that records what it got.
    #[derive(Debug, Clone, Default)]
    struct Recording(Arc<std::sync::Mutex<Vec<usize>>>);

    impl SpanExporter for Recording {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().push(batch.len());
            Ok(())
        }
    }

    #[test]
    fn a_hung_collector_never_blocks_on_end_and_drops_are_counted() {
        let mut rt = ExportRuntime::start().unwrap();
        let config = QueueConfig {
            max_queue_size: 8,
            max_export_batch_size: 4,
            scheduled_delay: Duration::from_secs(3600),
            export_timeout: Duration::from_secs(3600),
        };
        let p = QueueSpanProcessor::spawn(Hung, config, rt.handle());
        let t0 = Instant::now();
        for _ in 0..1000 {
            p.on_end(span_data());
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "on_end must not wait for the exporter: {:?}",
            t0.elapsed()
        );
        let stats = p.stats();
        let dropped = QueueStats::get(&stats.dropped_queue_full);
        // At most the queue plus one batch taken by the hung export are held; the rest is dropped.
        assert!(dropped >= 1000 - 8 - 4, "dropped {dropped}");
        assert!(dropped <= 1000 - 8, "dropped {dropped}");
        // Shutdown is bounded even though the export never returns.
        let t0 = Instant::now();
        let r = p.shutdown_with_timeout(Duration::from_millis(200));
        assert!(matches!(r, Err(OTelSdkError::Timeout(_))), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        rt.stop();
        // After the runtime is gone, flush fails at once instead of hanging.
        let t0 = Instant::now();
        assert!(p.force_flush().is_err());
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn flush_exports_in_batches_and_shutdown_drains() {
        let rt = ExportRuntime::start().unwrap();
        let exporter = Recording::default();
        let config = QueueConfig {
            max_queue_size: 100,
            max_export_batch_size: 4,
            scheduled_delay: Duration::from_secs(3600),
            export_timeout: Duration::from_secs(5),
        };
        let p = QueueSpanProcessor::spawn(exporter.clone(), config, rt.handle());
        for _ in 0..10 {
            p.on_end(span_data());
        }
        p.force_flush().unwrap();
        let batches = exporter.0.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 10);
        assert!(batches.iter().all(|&n| n <= 4), "{batches:?}");
        p.on_end(span_data());
        p.shutdown_with_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(exporter.0.lock().unwrap().iter().sum::<usize>(), 11);
        assert_eq!(QueueStats::get(&p.stats().exported), 11);
        assert!(p.force_flush().is_err(), "flush after shutdown is refused");
    }
}
