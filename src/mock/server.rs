//! The mock's listener, connection loop and lifecycle handles.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::handler::{handle, Shared};
use super::stats::MockStats;
use super::MockConfig;

/// A bound, not yet serving, mock LLM server. See the [module docs](super).
#[derive(Debug)]
pub struct MockServer {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl MockServer {
    /// Bind `addr` (use port 0 for any free port) with `cfg` as the default behaviour.
    pub async fn bind(addr: SocketAddr, cfg: MockConfig) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        Self::from_listener(listener, cfg)
    }

    /// Serve on an already bound listener.
    pub fn from_listener(listener: TcpListener, cfg: MockConfig) -> std::io::Result<MockServer> {
        let addr = listener.local_addr()?;
        // Fix the emit-timestamp epoch now, not at the first event.
        let _ = super::monotonic_epoch();
        Ok(MockServer {
            listener,
            addr,
            shared: Arc::new(Shared::new(cfg)),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base of every endpoint.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's counters (a cheap clone handle that outlives the server).
    pub fn stats(&self) -> MockStats {
        self.shared.stats.clone()
    }

    /// Make `GET /healthz` answer `200` (true) or `503` (false). Default: healthy.
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Serve on the current tokio runtime until [`MockHandle::shutdown`], or until the handle is dropped.
    pub fn spawn(self) -> MockHandle {
        let (tx, rx) = oneshot::channel::<()>();
        let addr = self.addr;
        let shared = self.shared.clone();
        let task = tokio::spawn(self.run(async move {
            // A dropped sender also means stop (the handle's Drop aborts the task anyway).
            let _ = rx.await;
        }));
        MockHandle {
            addr,
            shared,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Serve until `shutdown` completes, then shut down gracefully: stop accepting, let every
    /// in-flight response finish (HTTP/1.1 connections close after it, HTTP/2 ones get `GOAWAY`), and
    /// return once every connection is closed.
    ///
    /// Dropping this future instead closes every connection at once.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let MockServer {
            listener, shared, ..
        } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(crate::timers::HyperTimer);
        builder.http2().timer(crate::timers::HyperTimer);
        let graceful = GracefulShutdown::new();
        // Owning the connection tasks here means dropping this future aborts them all.
        let mut conns = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);

        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _peer)) => stream,
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "mock server: accept failed");
                            crate::timers::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    // Each token is one small write; do not let Nagle hold it back.
                    let _ = stream.set_nodelay(true);
                    let guard = shared.stats.connection_opened();
                    let svc_shared = shared.clone();
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        handle(svc_shared.clone(), req)
                    });
                    let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                    let conn = graceful.watch(conn);
                    conns.spawn(async move {
                        let _guard = guard;
                        if let Err(e) = conn.await {
                            // Client resets and aborted streams land here; they are expected.
                            tracing::debug!(error = %e, "mock server: connection ended with an error");
                        }
                    });
                }
            }
        }

        drop(listener);
        graceful.shutdown().await;
        while conns.join_next().await.is_some() {}
    }
}

/// A running mock server. [`shutdown`](Self::shutdown) stops it gracefully; dropping the handle stops
/// it at once, closing every connection.
#[derive(Debug)]
pub struct MockHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base of every endpoint.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's counters.
    pub fn stats(&self) -> MockStats {
        self.shared.stats.clone()
    }

    /// Make `GET /healthz` answer `200` (true) or `503` (false). Default: healthy.
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Stop accepting, let in-flight responses finish, and return when every connection is closed.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Close every connection now (in-flight streams are cut) and return when they are closed.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        // Dropping the connection set asks each connection task to stop; wait until they have.
        let _ = self
            .shared
            .stats
            .wait_for(|s| s.open_connections == 0, Duration::from_secs(5))
            .await;
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
