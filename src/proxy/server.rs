//! Listeners, TLS, per-connection serving, routing, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::body::ClientBody;
use super::config::{Config, ListenerConfig, RouteConfig};
use super::downstream::{self, ClientTimeouts, Served};
use super::forward::{ConnInfo, Forward, RouteRuntime, Shared};
use super::idle::{Activity, SendTimeout, Tracked};
use super::pool::Pool;
use super::stack::{self, App, RouteStack};
use super::stream_timeout::StreamExecutor;

/// A failure to start or run the server (not a configuration error: those are found by
/// [`Config::load`]).
#[derive(Debug)]
pub struct ServeError {
    what: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ServeError {
    fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            source: Some(source.into()),
        }
    }
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// Routes a request to the most specific matching route's stack (host match first, then the longest
/// path prefix), or to a stack that answers 404.
#[derive(Clone, Debug)]
pub(crate) struct Router {
    routes: Arc<[(RouteConfig, RouteStack)]>,
    fallback: RouteStack,
}

impl Router {
    fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let mut best: Option<(usize, (bool, usize))> = None;
        for (i, (r, _)) in self.routes.iter().enumerate() {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(h)) => want.eq_ignore_ascii_case(h),
                (Some(_), None) => false,
            };
            if !host_ok || !path.starts_with(&r.path_prefix) {
                continue;
            }
            let score = (r.host.is_some(), r.path_prefix.len());
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// The request's host without port, from the URI (HTTP/2, absolute-form) or the Host header.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => req.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    // Strip a port, leaving IPv6 brackets intact, then a trailing dot (`example.com.` is the same
    // host as `example.com`, as nginx takes it).
    let host = match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => raw,
    };
    Some(host.strip_suffix('.').unwrap_or(host))
}

impl tower::Service<Request<ClientBody>> for Router {
    type Response = <RouteStack as tower::Service<Request<ClientBody>>>::Response;
    type Error = <RouteStack as tower::Service<Request<ClientBody>>>::Error;
    type Future = <RouteStack as tower::Service<Request<ClientBody>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let idx = self.find(request_host(&req), req.uri().path());
        match idx {
            Some(i) => {
                let (cfg, svc) = &self.routes[i];
                stack::on_route(cfg);
                svc.clone().call(req)
            }
            None => self.fallback.clone().call(req),
        }
    }
}

struct BoundListener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    addr: SocketAddr,
}

/// Options that are not part of the file configuration (wired by the binary).
#[derive(Debug, Default, Clone)]
pub struct ServerOptions {
    /// Stream metrics recorded by the tracing layer; none by default.
    pub metrics: Option<crate::trace::StreamMetrics>,
}

/// A bound, ready-to-run proxy.
pub struct Server {
    listeners: Vec<BoundListener>,
    app: App,
    shared: Arc<Shared>,
    pools: Vec<Arc<Pool>>,
    drain_timeout: Duration,
    client_idle_timeout: Duration,
    send_timeout: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Bind every listener and build the service stack.
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        Self::bind_with(config, ServerOptions::default()).await
    }

    /// [`bind`](Self::bind) with options.
    pub async fn bind_with(config: Config, opts: ServerOptions) -> Result<Self, ServeError> {
        let shared = Arc::new(Shared {
            streams: Arc::new(Semaphore::new(config.max_streams)),
            max_streams: config.max_streams,
            drain_deadline: Arc::default(),
            shutting_down: CancellationToken::new(),
            metrics: opts.metrics.clone(),
        });
        let mut pools = std::collections::BTreeMap::new();
        for (name, p) in &config.pools {
            let pool = Pool::new(p.clone()).map_err(|e| ServeError {
                what: e,
                source: None,
            })?;
            pools.insert(name.clone(), Arc::new(pool));
        }
        let routes: Vec<(RouteConfig, RouteStack)> = config
            .routes
            .iter()
            .map(|r| {
                let fwd = Forward {
                    shared: shared.clone(),
                    route: Some(Arc::new(RouteRuntime {
                        cfg: r.clone(),
                        pool: pools[&r.pool].clone(),
                    })),
                };
                (r.clone(), stack::route_stack(fwd, &r.stream))
            })
            .collect();
        let fallback = stack::route_stack(
            Forward {
                shared: shared.clone(),
                route: None,
            },
            &config.defaults,
        );
        let router = Router {
            routes: routes.into(),
            fallback,
        };
        let app = stack::app(router, &opts);

        let mut listeners = Vec::new();
        for l in &config.listeners {
            listeners.push(bind_listener(l).await?);
        }
        Ok(Self {
            listeners,
            app,
            shared,
            pools: pools.into_values().collect(),
            drain_timeout: config.drain_timeout,
            client_idle_timeout: config.client_idle_timeout,
            send_timeout: config.send_timeout,
        })
    }

    /// The bound addresses, in configuration order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// Serve until `shutdown` resolves, then drain: stop accepting, let open streams finish within the
    /// drain timeout, end the rest with `shutdown`, and return.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let stop_accepting = CancellationToken::new();
        let graceful = CancellationToken::new();
        let tracker = TaskTracker::new();
        let conns = Arc::new(Conns {
            http: http_builder(self.client_idle_timeout, self.send_timeout),
            timeouts: ClientTimeouts {
                idle: self.client_idle_timeout,
                send: self.send_timeout,
            },
        });
        let stop_health = CancellationToken::new();
        for p in &self.pools {
            tokio::spawn(p.clone().health_check_loop(stop_health.clone()));
        }
        for l in self.listeners {
            tracker.spawn(accept_loop(
                l,
                self.app.clone(),
                conns.clone(),
                graceful.clone(),
                tracker.clone(),
                stop_accepting.clone(),
            ));
        }
        shutdown.await;
        tracing::info!(
            drain_timeout_ms = self.drain_timeout.as_millis() as u64,
            "shutting down: no new connections; open streams get the drain timeout to finish"
        );
        stop_accepting.cancel();
        self.shared.shutting_down.cancel();
        stop_health.cancel();
        tracker.close();
        // HTTP/1.1 connections close after their current response; HTTP/2 ones get GOAWAY.
        graceful.cancel();
        if crate::timers::timeout(self.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            let open = self.shared.max_streams - self.shared.streams.available_permits();
            tracing::warn!(
                open_streams = open,
                "drain timeout passed: ending the open streams"
            );
            self.shared.drain_deadline.fire();
        }
        // Connections end as soon as their streams do; bound the wait anyway.
        if crate::timers::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within 5 s of the drain deadline");
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// The most an HTTP/2 stream queues for its client beyond the frame in hand: one frame of the
/// default maximum size. Bulk throughput over h2c is no lower than with hyper's 400 KB (930–970 MB/s
/// on loopback either way).
pub(crate) const H2_SEND_BUF: usize = 16 * 1024;

/// How client connections are served: hyper's builder, and the client timeouts
/// (`client_idle_timeout`, `send_timeout`).
/// One per server, shared by its connections, which hold it behind one pointer.
struct Conns {
    http: auto::Builder<StreamExecutor>,
    timeouts: ClientTimeouts,
}

/// The builder of connections served by hyper. `send` is the send timeout of each HTTP/2 stream
/// ([`StreamExecutor`]); the connection's own is [`SendTimeout`], around its socket.
fn http_builder(idle: Duration, send: Duration) -> auto::Builder<StreamExecutor> {
    let mut b = auto::Builder::new(StreamExecutor::new(send));
    b.http1()
        .timer(crate::timers::HyperTimer)
        // Waiting for the next request's head counts as idle: the same timeout.
        .header_read_timeout(idle)
        .keep_alive(true)
        .half_close(false)
        // Request heads fit in 8 KiB (nginx's large_client_header_buffers default, larger ones get
        // 431); capping the read buffer there keeps hyper from growing it per idle stream.
        .max_buf_size(8 * 1024);
    b.http2()
        .timer(crate::timers::HyperTimer)
        .max_concurrent_streams(1024)
        // What a stream may queue for a client that reads slower than its upstream writes. hyper's
        // default, 400 KB, let one client that advertises large windows and then stops reading
        // hold 400 KB of the proxy's memory per stream: 400 MB over one connection's 1,024
        // streams. nginx holds one proxy buffer (4–8 KiB) per stream.
        .max_send_buf_size(H2_SEND_BUF)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

async fn bind_listener(l: &ListenerConfig) -> Result<BoundListener, ServeError> {
    let listener = TcpListener::bind(l.listen)
        .await
        .map_err(|e| ServeError::new(format!("cannot listen on {}", l.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::new("cannot read the bound address", e))?;
    let tls = match &l.tls {
        None => None,
        Some(t) => Some(
            super::tls::acceptor(&t.cert, &t.key).map_err(|e| ServeError {
                what: e,
                source: None,
            })?,
        ),
    };
    Ok(BoundListener {
        listener,
        tls,
        addr,
    })
}

async fn accept_loop(
    l: BoundListener,
    app: App,
    conns: Arc<Conns>,
    graceful: CancellationToken,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let tls = l.tls.is_some();
    tracing::info!(listen = %l.addr, tls, "listening");
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = l.listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    crate::timers::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            remote,
            local: l.addr,
            tls,
        };
        let app = app.clone();
        let conns = conns.clone();
        let graceful = graceful.clone();
        match l.tls.clone() {
            None => tracker.spawn(serve_plain(stream, info, app, conns, graceful)),
            Some(acc) => tracker.spawn(async move {
                match crate::timers::timeout(Duration::from_secs(10), acc.accept(stream)).await {
                    Ok(Ok(s)) => serve(s, info, app, &conns, graceful).await,
                    Ok(Err(e)) => tracing::debug!(client = %remote, error = %e, source = "client", "TLS handshake failed"),
                    Err(_) => tracing::debug!(client = %remote, source = "client", "TLS handshake timed out"),
                }
            }),
        };
    }
}

/// A plain-TCP connection: the lean HTTP/1.1 server, which hands hyper what it does not take (HTTP/2,
/// streamed request bodies) with the bytes it has read. hyper's connection future is boxed: inline, it
/// would size every connection's task for it, lean or not.
async fn serve_plain(
    stream: tokio::net::TcpStream,
    info: ConnInfo,
    app: App,
    conns: Arc<Conns>,
    graceful: CancellationToken,
) {
    let svc = stack::with_conn_info(app.clone(), info);
    if let Served::Handover(io, read) =
        downstream::serve(stream, svc, graceful.clone(), &conns.timeouts).await
    {
        Box::pin(serve(Rewind::new(io, read), info, app, &conns, graceful)).await;
    }
}

async fn serve<IO>(io: IO, info: ConnInfo, app: App, conns: &Conns, graceful: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let svc = TowerToHyperService::new(Tracked::new(
        stack::with_conn_info(app, info)
            .map_request(|r: Request<Incoming>| r.map(ClientBody::Left)),
        activity.clone(),
        info.remote,
    ));
    let io = SendTimeout::new(io, conns.timeouts.send);
    let conn = conns.http.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // Shutting down, or idle for `idle`: HTTP/2 clients get a GOAWAY, and the connection closes once
    // what is in flight is done.
    let res = tokio::select! {
        r = conn.as_mut() => r,
        () = async {
            tokio::select! {
                _ = graceful.cancelled() => {}
                () = activity.idle_for(conns.timeouts.idle) => {}
            }
        } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(client = %info.remote, error = %e, "connection ended with an error");
    }
}

/// A connection whose first bytes were already read: they are read again first.
struct Rewind {
    read: bytes::Bytes,
    io: tokio::net::TcpStream,
}

impl Rewind {
    fn new(io: tokio::net::TcpStream, read: bytes::Bytes) -> Self {
        Self { read, io }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let chunk = self.read.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
