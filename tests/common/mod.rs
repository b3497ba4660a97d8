//! Test support: a proxy on 127.0.0.1:0, scripted upstreams, and a raw HTTP/1.1 client that timestamps
//! every read and can hang up with FIN or RST.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use streamgate::proxy::{Config, Server};

/// Outer bound on every await in the tests.
pub const T: Duration = Duration::from_secs(10);

pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The proxy's own runtime (its tasks, for leak checks).
    pub runtime: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(toml: &str) -> Proxy {
        let cfg =
            Config::from_toml(toml).unwrap_or_else(|e| panic!("bad test config: {e}\n{toml}"));
        Self::start_cfg(cfg).await
    }

    /// The proxy runs as the binary runs it: on a runtime of its own, in a thread of its own, with
    /// no time driver (timers on [`streamgate::timers`]' thread). A stray `tokio::time` call in
    /// the proxy panics there, as it would in production. The thread is left detached: a proxy
    /// that does not exit fails the test that waits for it, without holding up the test's runtime.
    pub async fn start_cfg(cfg: Config) -> Proxy {
        streamgate::timers::spawn_thread().expect("timer thread");
        let (bound_tx, bound_rx) = oneshot::channel::<(SocketAddr, tokio::runtime::Handle)>();
        let (tx, rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<std::thread::Result<()>>();
        std::thread::Builder::new()
            .name("proxy".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .build()
                        .expect("proxy runtime");
                    let handle = rt.handle().clone();
                    rt.block_on(async move {
                        let server = Server::bind(cfg).await.expect("bind proxy");
                        let _ = bound_tx.send((server.local_addrs()[0], handle));
                        server
                            .run(async {
                                let _ = rx.await;
                            })
                            .await
                            .expect("proxy run");
                    });
                }));
                let _ = done_tx.send(ran);
            })
            .expect("proxy thread");
        let (addr, runtime) = bound_rx.await.expect("the proxy did not start");
        let task = tokio::spawn(async move {
            if let Ok(Err(panic)) = done_rx.await {
                std::panic::resume_unwind(panic);
            }
        });
        Proxy {
            addr,
            runtime,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Start shutdown; returns the task to await.
    pub fn shutdown(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("already shut down")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A config with one listener on port 0 and one pool of these upstreams, plus extra TOML.
pub fn config(upstreams: &[SocketAddr], extra_defaults: &str) -> String {
    let eps: Vec<String> = upstreams
        .iter()
        .map(|a| format!("\"http://{a}\""))
        .collect();
    format!(
        "[defaults]\n{extra_defaults}\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [{}]\n[[routes]]\npool = \"up\"\n",
        eps.join(", ")
    )
}

/// A test response body.
pub type TestBody = BoxBody<Bytes, std::io::Error>;
/// The sending half of a [`streamed`] response.
pub type ChunkSender = mpsc::Sender<Result<Bytes, std::io::Error>>;

pub type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        )
            -> Pin<Box<dyn Future<Output = Response<BoxBody<Bytes, std::io::Error>>> + Send>>
        + Send
        + Sync,
>;

/// A scripted upstream: a hyper server (HTTP/1.1 and h2c) running `handler`, counting connections.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<Mutex<Vec<ConnEvent>>>,
    closed_tx: tokio::sync::broadcast::Sender<Instant>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct ConnEvent {
    pub opened: Instant,
    pub closed: Option<Instant>,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<BoxBody<Bytes, std::io::Error>>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, _) = tokio::sync::broadcast::channel(1024);
        let conns = connections.clone();
        let ctx = closed_tx.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let idx = {
                    let mut c = conns.lock().unwrap();
                    c.push(ConnEvent {
                        opened: Instant::now(),
                        closed: None,
                    });
                    c.len() - 1
                };
                let conns = conns.clone();
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let h = handler.clone();
                        async move { Ok::<_, Infallible>(h(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    let now = Instant::now();
                    conns.lock().unwrap()[idx].closed = Some(now);
                    let _ = ctx.send(now);
                });
            }
        });
        Upstream {
            addr,
            connections,
            closed_tx,
            task,
        }
    }

    /// Subscribe to connection-closed events (subscribe before triggering the close).
    pub fn on_close(&self) -> tokio::sync::broadcast::Receiver<Instant> {
        self.closed_tx.subscribe()
    }

    pub fn open_connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.closed.is_none())
            .count()
    }

    pub fn total_connections(&self) -> usize {
        self.connections.lock().unwrap().len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(
    status: u16,
    ctype: &str,
    body: impl Into<Bytes>,
) -> Response<BoxBody<Bytes, std::io::Error>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// A streamed response fed through the returned sender: `Ok(bytes)` is a chunk, `Err` aborts the body.
pub fn streamed(ctype: &str) -> (ChunkSender, Response<TestBody>) {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    let resp = Response::builder()
        .status(200)
        .header("content-type", ctype)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    (tx, resp)
}

/// An SSE upstream that sends `event` and then stays silent until the proxy goes away.
pub async fn one_event_then_silent(event: &'static [u8]) -> Upstream {
    Upstream::start(move |_| async move {
        let (tx, resp) = streamed("text/event-stream");
        tokio::spawn(async move {
            let _ = tx.send(Ok(Bytes::from_static(event))).await;
            tx.closed().await;
        });
        resp
    })
    .await
}

/// A raw HTTP/1.1 client over one TCP connection, recording when each read returned.
pub struct RawClient {
    pub stream: TcpStream,
    pub received: Vec<(Instant, Bytes)>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            received: Vec::new(),
        }
    }

    pub async fn send(&mut self, req: &str) {
        self.stream.write_all(req.as_bytes()).await.unwrap();
    }

    pub async fn get(&mut self, path: &str) {
        self.send(&format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n"))
            .await;
    }

    /// Read once (bounded by `T`); returns the bytes, empty on EOF.
    pub async fn read_some(&mut self) -> std::io::Result<Bytes> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = within("read", self.stream.read(&mut buf)).await?;
        buf.truncate(n);
        let b = Bytes::from(buf);
        if n > 0 {
            self.received.push((Instant::now(), b.clone()));
        }
        Ok(b)
    }

    /// Read until `pat` appears in everything received so far.
    pub async fn read_until(&mut self, pat: &[u8]) -> Vec<u8> {
        loop {
            let all = self.all();
            if all.windows(pat.len()).any(|w| w == pat) {
                return all;
            }
            let b = self.read_some().await.expect("read");
            assert!(
                !b.is_empty(),
                "EOF before {:?}; got {:?}",
                String::from_utf8_lossy(pat),
                String::from_utf8_lossy(&all)
            );
        }
    }

    /// Read until EOF or a reset; returns everything and whether the end was a clean EOF.
    pub async fn read_to_end(&mut self) -> (Vec<u8>, bool) {
        loop {
            match self.read_some().await {
                Ok(b) if b.is_empty() => return (self.all(), true),
                Ok(_) => {}
                Err(_) => return (self.all(), false),
            }
        }
    }

    pub fn all(&self) -> Vec<u8> {
        self.received
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }

    /// Close with FIN.
    pub async fn close_fin(mut self) {
        let _ = self.stream.shutdown().await;
        drop(self);
    }

    /// Close with RST (SO_LINGER 0).
    pub fn close_rst(self) {
        let _ = self.stream.set_zero_linger();
        drop(self);
    }
}

/// Decode a chunked body (after the headers) into its payload; `None` if it was not terminated by `0\r\n\r\n`.
pub fn dechunk(mut body: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_str = std::str::from_utf8(&body[..eol]).unwrap();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap();
        body = &body[eol + 2..];
        if size == 0 {
            return (out, body.starts_with(b"\r\n"));
        }
        if body.len() < size + 2 {
            out.extend_from_slice(&body[..body.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Split a raw HTTP/1.1 response into (head, body).
pub fn split_head(raw: &[u8]) -> (String, Vec<u8>) {
    let i = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end")
        + 4;
    (
        String::from_utf8_lossy(&raw[..i]).into_owned(),
        raw[i..].to_vec(),
    )
}

/// A hyper client (HTTP/1.1, or h2c prior knowledge).
pub fn client(
    h2: bool,
) -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    if h2 {
        b.http2_only(true);
    }
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    b.build(http)
}

pub async fn body_string(resp: Response<Incoming>) -> String {
    let b = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}
