//! The three layers over real sockets (real time, 127.0.0.1:0): a hyper-util auto server runs a handler
//! behind `CancelOnDisconnect -> Flush -> IdleTimeout`, and a raw TCP client timestamps each HTTP/1.1
//! chunk and hangs up when told to.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use streamgate::cancel::CancelOnDisconnectLayer;
use streamgate::flush::FlushLayer;
use streamgate::idle_timeout::IdleTimeoutLayer;
use streamgate::{EndReason, StreamInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{service_fn, ServiceBuilder};

/// Outer bound on every await.
const LIMIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("timed out: the awaited event never happened")
}

/// A response body fed by the test through a channel; the channel closes when the body is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// What the handler reports to the test.
enum Event {
    /// `/stream`: the response is out; send body bytes through `body`.
    Streaming {
        token: CancellationToken,
        info: StreamInfo,
        body: mpsc::Sender<Bytes>,
    },
    /// `/hold`: the handler is running and will never answer.
    Holding { info: StreamInfo },
    /// The handler's token was cancelled (seen by a task the handler spawned).
    Cancelled(Instant),
    /// The handler's future was dropped.
    HandlerDropped(Instant),
}

struct DropReport(mpsc::UnboundedSender<Event>);

impl Drop for DropReport {
    fn drop(&mut self) {
        let _ = self.0.send(Event::HandlerDropped(Instant::now()));
    }
}

/// Serve the three layers around the test handler; returns the address, the handler's reports, and
/// the accept loop's handle (aborted at the end of the test).
async fn serve(
    idle: IdleTimeoutLayer,
) -> (SocketAddr, mpsc::UnboundedReceiver<Event>, JoinHandle<()>) {
    let (events, rx) = mpsc::unbounded_channel();
    let handler = service_fn(move |req: Request<Incoming>| {
        let events = events.clone();
        async move {
            let token = req.extensions().get::<CancellationToken>().unwrap().clone();
            let info = req.extensions().get::<StreamInfo>().unwrap().clone();
            // The generation task: outlives the handler future, stops on the token.
            let watcher = events.clone();
            let watched = token.clone();
            tokio::spawn(async move {
                watched.cancelled().await;
                let _ = watcher.send(Event::Cancelled(Instant::now()));
            });
            if req.uri().path() == "/stream" {
                let (body, chan) = mpsc::channel(16);
                let _ = events.send(Event::Streaming { token, info, body });
                let res = Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(ChannelBody(chan))
                    .unwrap();
                Ok::<_, Infallible>(res)
            } else {
                let _guard = DropReport(events.clone());
                let _ = events.send(Event::Holding { info });
                std::future::pending().await
            }
        }
    });
    let svc = ServiceBuilder::new()
        .layer(CancelOnDisconnectLayer::new())
        .layer(FlushLayer::new())
        .layer(idle)
        .service(handler);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx, server)
}

/// How a read of the next chunk ended.
#[derive(Debug, PartialEq)]
enum Chunk {
    Data(Vec<u8>),
    /// The terminating `0\r\n\r\n`.
    Last,
    /// EOF or reset before a complete chunk; carries the unparsed bytes.
    Closed(Vec<u8>),
}

/// A raw HTTP/1.1 client that parses the chunked body itself.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn get(addr: SocketAddr, path: &str) -> Client {
        let mut stream = within(TcpStream::connect(addr)).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        within(stream.write_all(req.as_bytes())).await.unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 4096];
        match within(self.stream.read(&mut tmp)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    async fn head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(self.buf.drain(..i + 4).collect()).unwrap();
                return head.to_ascii_lowercase();
            }
            assert!(
                self.fill().await,
                "connection closed before the response head"
            );
        }
    }

    async fn chunk(&mut self) -> Chunk {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let size = std::str::from_utf8(&self.buf[..i]).unwrap();
                let size =
                    usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
                if self.buf.len() >= i + 2 + size + 2 {
                    let data: Vec<u8> = self
                        .buf
                        .drain(..i + 2 + size + 2)
                        .skip(i + 2)
                        .take(size)
                        .collect();
                    return if size == 0 {
                        Chunk::Last
                    } else {
                        Chunk::Data(data)
                    };
                }
            }
            if !self.fill().await {
                return Chunk::Closed(std::mem::take(&mut self.buf));
            }
        }
    }

    async fn data(&mut self) -> (Instant, Vec<u8>) {
        match self.chunk().await {
            Chunk::Data(d) => (Instant::now(), d),
            other => panic!("expected a data chunk, got {other:?}"),
        }
    }
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    within(rx.recv()).await.expect("the server is running")
}

async fn streaming(
    rx: &mut mpsc::UnboundedReceiver<Event>,
) -> (CancellationToken, StreamInfo, mpsc::Sender<Bytes>) {
    match next_event(rx).await {
        Event::Streaming { token, info, body } => (token, info, body),
        _ => panic!("expected the streaming handler"),
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test]
async fn heartbeats_arrive_at_the_interval_during_handler_silence() {
    let interval = Duration::from_millis(100);
    let idle = IdleTimeoutLayer::new()
        .keepalive_interval(Some(interval))
        .idle_timeout(Duration::from_secs(5));
    let (addr, mut rx, server) = serve(idle).await;
    let mut client = Client::get(addr, "/stream").await;
    let (token, info, body) = streaming(&mut rx).await;
    let head = client.head().await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("x-accel-buffering: no"), "{head}");
    assert!(
        head.contains("cache-control: no-cache, no-transform"),
        "{head}"
    );

    within(body.send(Bytes::from("data: first\n\n")))
        .await
        .unwrap();
    let (first_at, first) = client.data().await;
    assert_eq!(first, b"data: first\n\n");
    let mut beats = vec![first_at];
    for _ in 0..4 {
        let (at, d) = client.data().await;
        assert_eq!(d, b": keepalive\n", "each keepalive is its own chunk");
        beats.push(at);
    }
    let gaps: Vec<u128> = beats.windows(2).map(|w| ms(w[1] - w[0])).collect();
    eprintln!("heartbeat gaps (ms) at a 100 ms interval: {gaps:?}");
    for gap in &gaps {
        assert!((80..=600).contains(gap), "gaps {gaps:?}");
    }
    assert!(ms(beats[4] - beats[0]) >= 390, "gaps {gaps:?}");

    // The handler speaks again, then ends: the body ends cleanly.
    within(body.send(Bytes::from("data: second\n\n")))
        .await
        .unwrap();
    assert_eq!(client.data().await.1, b"data: second\n\n");
    drop(body);
    assert_eq!(within(client.chunk()).await, Chunk::Last);
    assert!(info.heartbeats() >= 4);
    // Recorded when the body yielded its end, before hyper wrote the last chunk.
    assert_eq!(info.end_reason(), Some(EndReason::Complete));
    assert!(!token.is_cancelled());
    server.abort();
}

#[tokio::test]
async fn idle_cut_drops_the_upstream_and_aborts_without_a_terminating_chunk() {
    let idle = IdleTimeoutLayer::new()
        .keepalive_interval(Some(Duration::from_millis(100)))
        .idle_timeout(Duration::from_millis(300));
    let (addr, mut rx, server) = serve(idle).await;
    let mut client = Client::get(addr, "/stream").await;
    let (token, info, body) = streaming(&mut rx).await;
    client.head().await;
    within(body.send(Bytes::from("data: a\n\n"))).await.unwrap();
    let (sent_at, _) = client.data().await;

    // The upstream body is dropped at the cut, while the client still holds its socket open.
    within(body.closed()).await;
    let cut_after = ms(sent_at.elapsed());
    eprintln!("idle cut after {cut_after} ms (idle timeout 300 ms)");
    assert!((280..=1500).contains(&cut_after), "{cut_after}");

    let mut keepalives = 0;
    let tail = loop {
        match within(client.chunk()).await {
            Chunk::Data(d) => {
                assert_eq!(d, b": keepalive\n");
                keepalives += 1;
            }
            Chunk::Last => panic!("an idle cut must not look like a complete body"),
            Chunk::Closed(tail) => break tail,
        }
    };
    assert!(tail.is_empty(), "no terminating chunk: {tail:?}");
    assert!((1..=3).contains(&keepalives), "{keepalives}");
    assert_eq!(info.end_reason(), Some(EndReason::IdleTimeout));
    assert!(
        !token.is_cancelled(),
        "an idle cut is not a client disconnect"
    );
    server.abort();
}

async fn cancelled_after(rx: &mut mpsc::UnboundedReceiver<Event>, closed_at: Instant) -> u128 {
    loop {
        if let Event::Cancelled(at) = next_event(rx).await {
            return ms(at - closed_at);
        }
    }
}

#[tokio::test]
async fn client_closing_mid_stream_fires_the_handlers_token() {
    for (how, rst) in [("FIN", false), ("RST", true)] {
        let idle = IdleTimeoutLayer::new().keepalive_interval(Some(Duration::from_secs(30)));
        let (addr, mut rx, server) = serve(idle).await;
        let mut client = Client::get(addr, "/stream").await;
        let (token, info, body) = streaming(&mut rx).await;
        client.head().await;
        within(body.send(Bytes::from("data: a\n\n"))).await.unwrap();
        client.data().await;
        let closed_at = Instant::now();
        if rst {
            #[allow(deprecated)] // zero linger does not block: the close sends RST at once
            client.stream.set_linger(Some(Duration::ZERO)).unwrap();
            drop(client);
        } else {
            within(client.stream.shutdown()).await.unwrap();
        }
        let after = cancelled_after(&mut rx, closed_at).await;
        eprintln!("{how} mid-stream: token cancelled {after} ms after the client closed");
        assert!(after < 1000, "{how}: {after}");
        assert!(token.is_cancelled());
        assert_eq!(
            info.end_reason(),
            Some(EndReason::ClientDisconnect),
            "{how}"
        );
        // The handler's body is gone too.
        within(body.closed()).await;
        server.abort();
    }
}

#[tokio::test]
async fn client_closing_before_the_headers_drops_the_handler_and_fires_the_token() {
    let (addr, mut rx, server) = serve(IdleTimeoutLayer::new()).await;
    let mut client = Client::get(addr, "/hold").await;
    let info = match next_event(&mut rx).await {
        Event::Holding { info } => info,
        _ => panic!("expected the holding handler"),
    };
    let closed_at = Instant::now();
    within(client.stream.shutdown()).await.unwrap();
    let (mut dropped, mut cancelled) = (None, None);
    while dropped.is_none() || cancelled.is_none() {
        match next_event(&mut rx).await {
            Event::HandlerDropped(at) => dropped = Some(ms(at - closed_at)),
            Event::Cancelled(at) => cancelled = Some(ms(at - closed_at)),
            _ => {}
        }
    }
    eprintln!("FIN before headers: handler future dropped after {dropped:?} ms, token cancelled after {cancelled:?} ms");
    assert!(dropped.unwrap() < 1000 && cancelled.unwrap() < 1000);
    assert_eq!(info.end_reason(), Some(EndReason::ClientDisconnect));
    server.abort();
}

/// Characterises hyper (1.x, HTTP/1.1): it notices a client's FIN while the handler has not answered
/// only once the request body has been read to its end. A body still unread (or not fully sent) hides
/// the EOF, and the handler keeps running until a write fails.
#[tokio::test]
async fn fin_before_headers_is_seen_only_once_the_request_body_is_read() {
    let (addr, mut rx, server) = serve(IdleTimeoutLayer::new()).await;
    let cases: [(&[u8], bool); 3] = [
        (b"POST /hold HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello", true),
        (b"POST /hold HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nhello", false),
        (
            b"POST /hold HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        ),
    ];
    for (req, detected) in cases {
        let mut stream = within(TcpStream::connect(addr)).await.unwrap();
        within(stream.write_all(req)).await.unwrap();
        let info = loop {
            if let Event::Holding { info } = next_event(&mut rx).await {
                break info;
            }
        };
        let closed_at = Instant::now();
        within(stream.shutdown()).await.unwrap();
        // A negative result needs a window; 300 ms is far beyond the 0-1 ms a detection takes here.
        let dropped = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                if let Event::HandlerDropped(at) = next_event(&mut rx).await {
                    return ms(at - closed_at);
                }
            }
        })
        .await;
        let head = String::from_utf8_lossy(&req[..req.len().min(60)]).into_owned();
        eprintln!("FIN before headers, {head:?}: handler dropped after {dropped:?} ms");
        assert_eq!(dropped.is_ok(), detected, "{head}");
        let expected = detected.then_some(EndReason::ClientDisconnect);
        assert_eq!(info.end_reason(), expected, "{head}");
    }
    server.abort();
}
