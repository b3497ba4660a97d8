//! Streaming behaviour through the proxy over real sockets: per-event latency and no coalescing
//! (HTTP/1.1 and h2c), heartbeats and the idle cut, bounded memory with a slow reader, and no leaks after
//! many disconnects.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

/// Heavy tests in this file measure time and process-wide memory: run them one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// An upstream whose every stream carries the same events, sent at the same instants by one ticker:
/// `n` events `gap` apart, each with its index. A direct stream and a proxied stream open at the same
/// time then see each event emitted once, so their arrival times can be paired event by event and the
/// machine's scheduling noise cancels out.
async fn ticking(n: usize, gap: Duration, streams: usize) -> Upstream {
    epoch();
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(n + 1);
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    {
        let tx = tx.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            // Start only when every stream is subscribed.
            let _ = ready.acquire_many(streams as u32).await;
            let mut tick = tokio::time::interval(gap);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..n {
                tick.tick().await;
                let _ = tx.send(Bytes::from(format!("id: {i}\ndata: {i}\n\n")));
            }
        });
    }
    Upstream::start(move |_| {
        let mut rx = tx.subscribe();
        let ready = ready.clone();
        async move {
            let (out, resp) = streamed("text/event-stream");
            tokio::spawn(async move {
                ready.add_permits(1);
                while let Ok(ev) = rx.recv().await {
                    if out.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
            });
            resp
        }
    })
    .await
}

fn event_ids(chunk: &[u8]) -> Vec<usize> {
    String::from_utf8_lossy(chunk)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Arrival time of each event by index, and the count of reads that held more than one event.
async fn arrivals_h1(addr: std::net::SocketAddr, n: usize) -> (Vec<Instant>, usize) {
    let mut c = RawClient::connect(addr).await;
    c.get("/events").await;
    let mut at = vec![None; n];
    let mut seen = 0;
    let mut coalesced = 0;
    while seen < n {
        let b = c.read_some().await.unwrap();
        assert!(!b.is_empty(), "EOF after {seen} events");
        let now = Instant::now();
        let ids = event_ids(&b);
        if ids.len() > 1 {
            coalesced += 1;
        }
        for i in ids {
            at[i] = Some(now);
            seen += 1;
        }
    }
    (at.into_iter().map(|t| t.unwrap()).collect(), coalesced)
}

async fn arrivals_h2(addr: std::net::SocketAddr, n: usize) -> (Vec<Instant>, usize) {
    let resp = within(
        "h2 headers",
        client(true).request(
            Request::get(format!("http://{addr}/events"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let mut body = resp.into_body();
    let mut at = vec![None; n];
    let mut seen = 0;
    let mut coalesced = 0;
    while seen < n {
        let f = within("frame", body.frame())
            .await
            .expect("stream ended")
            .unwrap();
        let now = Instant::now();
        if let Ok(d) = f.into_data() {
            let ids = event_ids(&d);
            if ids.len() > 1 {
                coalesced += 1;
            }
            for i in ids {
                at[i] = Some(now);
                seen += 1;
            }
        }
    }
    (at.into_iter().map(|t| t.unwrap()).collect(), coalesced)
}

/// p50, p99 and max of the per-event added delay: proxied arrival minus direct arrival of the same event.
fn added(direct: &[Instant], proxied: &[Instant]) -> (Duration, Duration, Duration) {
    let mut d: Vec<Duration> = direct
        .iter()
        .zip(proxied)
        .map(|(a, b)| b.saturating_duration_since(*a))
        .collect();
    d.sort();
    (
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        *d.last().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_15ms_apart_arrive_alone_and_promptly_h1_and_h2c() {
    let _serial = serial().await;
    const N: usize = 200;
    let up = ticking(N, Duration::from_millis(15), 3).await;
    let toml = format!(
        "[defaults]\nkeepalive_interval = \"off\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\n[[routes]]\npool = \"up\"\n",
        up.addr
    );
    let proxy = Proxy::start(&toml).await;
    // The same events, at the same instants: straight to the upstream, via HTTP/1.1, via h2c.
    let (direct, h1, h2) = tokio::join!(
        arrivals_h1(up.addr, N),
        arrivals_h1(proxy.addr, N),
        arrivals_h2(proxy.addr, N)
    );
    let (direct, _) = direct;
    let (h1, h1_coalesced) = h1;
    let (h2, h2_coalesced) = h2;
    let (a50, a99, amax) = added(&direct, &h1);
    let (b50, b99, bmax) = added(&direct, &h2);
    eprintln!("added per-event delay, HTTP/1.1: p50 {a50:?} p99 {a99:?} max {amax:?}; coalesced {h1_coalesced}/{N}");
    eprintln!("added per-event delay, h2c:      p50 {b50:?} p99 {b99:?} max {bmax:?}; coalesced {h2_coalesced}/{N}");
    assert_eq!(
        h1_coalesced, 0,
        "spaced events were coalesced over HTTP/1.1"
    );
    assert_eq!(h2_coalesced, 0, "spaced events were coalesced over h2c");
    // The typical event is not delayed either: a flush on a timer or a slow path per event would move
    // the median, which a shared machine's scheduling noise does not (85-130 µs on a noisy day).
    assert!(a50 < Duration::from_millis(1), "HTTP/1.1 added p50 {a50:?}");
    assert!(b50 < Duration::from_millis(1), "h2c added p50 {b50:?}");
    // No event is held back: one that waited for a flush would wait for the next event (15 ms later),
    // one held by Nagle's algorithm against a delayed ACK 40 ms. The bound is below both and far above
    // what a shared 2-core machine's scheduling adds (1-2 ms at p99 on a noisy day, with a build
    // running); how much the proxy adds per event is measured by the load harness, not here.
    assert!(
        a99 < Duration::from_millis(10),
        "HTTP/1.1 added p99 {a99:?}"
    );
    assert!(b99 < Duration::from_millis(10), "h2c added p99 {b99:?}");
}

/// Resident set size of a process, from /proc.
fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The proxy binary as a child process, killed on drop.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_proxy_binary(upstream: std::net::SocketAddr) -> (Child, std::net::SocketAddr) {
    spawn_proxy_binary_with(upstream, &[])
}

fn spawn_proxy_binary_with(
    upstream: std::net::SocketAddr,
    extra: &[&str],
) -> (Child, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
        .args([
            "--listen",
            &addr.to_string(),
            "--upstream",
            &format!("http://{upstream}"),
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "proxy never listened");
        std::thread::yield_now();
    }
    (Child(child), addr)
}

/// Threads of the proxy process named as its multi-threaded runtime names its workers (and blocking
/// threads, which a fresh process has none of).
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.trim() == "streamgate-rt")
        .count()
}

/// `--workers 1` runs the proxy on a single-threaded runtime (no worker threads at all), and it still
/// streams, cancels the upstream when the client goes, and drains on SIGTERM; `--workers 3` starts three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_threaded_runtime_streams_cancels_and_drains() {
    let _serial = serial().await;
    let up = Upstream::start(|req| async move {
        let (tx, resp) = streamed("text/event-stream");
        let endless = req.uri().path() == "/endless";
        tokio::spawn(async move {
            for i in 0.. {
                if !endless && i == 3 {
                    return;
                }
                let ev = Bytes::from(format!("data: {i}\n\n"));
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        resp
    })
    .await;

    let (child, _) = spawn_proxy_binary_with(up.addr, &["--workers", "3"]);
    // A thread names itself once it runs: the count may lag the listening socket by a moment.
    let deadline = Instant::now() + T;
    while runtime_workers(child.0.id()) < 3 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(runtime_workers(child.0.id()), 3);
    drop(child);

    let (child, addr) =
        spawn_proxy_binary_with(up.addr, &["--workers", "1", "--drain-timeout", "200ms"]);
    assert_eq!(
        runtime_workers(child.0.id()),
        0,
        "--workers 1 started worker threads"
    );
    // A whole stream, every event in order, ended by the terminating chunk.
    let mut c = RawClient::connect(addr).await;
    c.get("/three").await;
    let raw = c.read_until(b"0\r\n\r\n").await;
    let (head, body) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (data, terminated) = dechunk(&body);
    assert!(terminated, "stream did not end with the terminating chunk");
    assert_eq!(data, b"data: 0\n\ndata: 1\n\ndata: 2\n\n");
    // The client goes mid-stream: the upstream connection is closed, not left generating.
    let mut closed = up.on_close();
    let mut c = RawClient::connect(addr).await;
    c.get("/endless").await;
    c.read_until(b"data: 1").await;
    c.close_rst();
    within("upstream close after the client left", closed.recv())
        .await
        .unwrap();
    // SIGTERM with a stream open: it is cut at the drain deadline, not ended cleanly, and the process
    // exits 0.
    let mut c = RawClient::connect(addr).await;
    c.get("/endless").await;
    c.read_until(b"data: 0").await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (raw, _) = c.read_to_end().await;
    let (_, body) = split_head(&raw);
    let (_, terminated) = dechunk(&body);
    assert!(
        !terminated,
        "a stream cut by the drain deadline ended cleanly"
    );
    let status = within(
        "exit after SIGTERM",
        tokio::task::spawn_blocking(move || {
            let mut child = child;
            child.0.wait()
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// An upstream that answers every request with `total` bytes in `chunk`-sized frames, as fast as the
/// proxy takes them, and no content type (so that nothing treats it as an event stream).
async fn bulk_upstream(chunk: usize, total: usize) -> Upstream {
    Upstream::start(move |_| async move {
        let (tx, mut resp) = streamed("application/octet-stream");
        resp.headers_mut().remove("content-type");
        tokio::spawn(async move {
            let frame = Bytes::from(vec![b'x'; chunk]);
            for _ in 0..total / chunk {
                if tx.send(Ok(frame.clone())).await.is_err() {
                    return;
                }
            }
        });
        resp
    })
    .await
}

/// The proxy's RSS after one small request through it: a baseline that includes the runtime, the
/// pools and their buffers.
async fn warmed_rss(addr: std::net::SocketAddr, pid: u32) -> u64 {
    let mut w = RawClient::connect(addr).await;
    w.send("GET /warm HTTP/1.1\r\nhost: x\r\nrange: bytes=0-0\r\n\r\n")
        .await;
    w.read_some().await.unwrap();
    drop(w);
    rss_kib(pid, "VmRSS:")
}

/// The proxy's high-water RSS above `base`, in KiB, printed with what was measured.
fn rss_growth(what: &str, pid: u32, base: u64, peak: u64, start: Instant) -> u64 {
    let hwm = rss_kib(pid, "VmHWM:");
    let growth = hwm.saturating_sub(base);
    eprintln!(
        "{what} in {:?}: proxy RSS base {base} KiB, peak sampled {peak} KiB, high-water {hwm} KiB, growth {growth} KiB",
        start.elapsed()
    );
    growth
}

/// Waits until `done(open, total)` holds for the upstream's open and total connections, checking
/// every 5 ms, and fails with `what` and the counts if `deadline` passes first.
async fn upstream_settles(
    up: &Upstream,
    deadline: Instant,
    what: &str,
    done: impl Fn(usize, usize) -> bool,
) {
    while !done(up.open_connections(), up.total_connections()) {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} upstream connections still open",
            up.open_connections(),
            up.total_connections()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A proxy configuration: `server` (the `[server]` table's lines), one listener, one pool at `up`.
fn proxy_config(server: &str, up: std::net::SocketAddr) -> String {
    format!(
        "[server]\n{server}\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{up}\"]\n[[routes]]\npool = \"up\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_bounds_proxy_memory() {
    let _serial = serial().await;
    const TOTAL: usize = 256 << 20;
    const CHUNK: usize = 64 << 10;
    let up = bulk_upstream(CHUNK, TOTAL).await;
    let (child, addr) = spawn_proxy_binary(up.addr);
    let pid = child.0.id();
    let base = warmed_rss(addr, pid).await;

    let mut c = RawClient::connect(addr).await;
    c.get("/big").await;
    // Read slowly: 16 KiB reads with a pause every 1 MiB, far slower than the upstream can send.
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 << 10];
    let mut got = 0usize;
    let mut peak = base;
    let start = Instant::now();
    while got < TOTAL {
        let n = within("slow read", c.stream.read(&mut buf)).await.unwrap();
        assert!(n > 0, "EOF after {got} bytes");
        got += n;
        if got % (1 << 20) < n {
            peak = peak.max(rss_kib(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let growth = rss_growth("256 MiB through a slow reader", pid, base, peak, start);
    assert!(growth < 16 * 1024, "proxy memory grew by {growth} KiB");
}

/// An HTTP/2 client written frame by frame, for what hyper's client will not do: open its windows to
/// 2^31 - 1 and then read slowly, or watch the connection for a `GOAWAY`.
struct H2Client {
    stream: tokio::net::TcpStream,
    pending: Vec<u8>,
}

/// A frame: type, flags, stream id, payload.
type H2Frame = (u8, u8, u32, Vec<u8>);

impl H2Client {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The preface and SETTINGS; with `open_windows`, every window 2^31 - 1 and a 4 KiB socket
    /// receive buffer, so that the kernel holds little on the client's side.
    async fn connect(addr: std::net::SocketAddr, open_windows: bool) -> H2Client {
        use tokio::io::AsyncWriteExt;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if open_windows {
            sock.set_recv_buffer_size(4096).unwrap();
        }
        let mut stream = within("connect", sock.connect(addr)).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        if open_windows {
            // SETTINGS_INITIAL_WINDOW_SIZE, then the connection's window opened as wide.
            let mut settings = 4u16.to_be_bytes().to_vec();
            settings.extend_from_slice(&(u32::MAX >> 1).to_be_bytes());
            out.extend(Self::frame(4, 0, 0, &settings));
            out.extend(Self::frame(
                8,
                0,
                0,
                &((u32::MAX >> 1) - 65_535).to_be_bytes(),
            ));
        } else {
            out.extend(Self::frame(4, 0, 0, &[]));
        }
        stream.write_all(&out).await.unwrap();
        H2Client {
            stream,
            pending: Vec::new(),
        }
    }

    /// `WINDOW_UPDATE`: `n` more bytes may be sent on stream `id` (0: the connection).
    async fn window_update(&mut self, id: u32, n: u32) {
        use tokio::io::AsyncWriteExt;
        let update = Self::frame(8, 0, id, &n.to_be_bytes());
        self.stream.write_all(&update).await.unwrap();
    }

    /// GET `path` on stream `id` (odd, rising), with no body.
    async fn get(&mut self, id: u32, path: &str) {
        use tokio::io::AsyncWriteExt;
        // HPACK: static :method GET and :scheme http, then :path and :authority as literals.
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x41, 1, b'x']);
        let headers = Self::frame(1, 0x5, id, &block); // END_STREAM | END_HEADERS
        self.stream.write_all(&headers).await.unwrap();
    }

    /// The next frame (SETTINGS and PINGs answered on the way), or `None` once the proxy closed.
    async fn next(&mut self) -> Option<H2Frame> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            if self.pending.len() >= 9 {
                let p = &self.pending;
                let len = u32::from_be_bytes([0, p[0], p[1], p[2]]) as usize;
                if p.len() >= 9 + len {
                    let (kind, flags) = (p[3], p[4]);
                    let id = u32::from_be_bytes([p[5], p[6], p[7], p[8]]) & 0x7fff_ffff;
                    let payload = p[9..9 + len].to_vec();
                    self.pending.drain(..9 + len);
                    let ack = match kind {
                        4 if flags & 1 == 0 => Some(Self::frame(4, 1, 0, &[])),
                        6 if flags & 1 == 0 => Some(Self::frame(6, 1, 0, &payload)),
                        _ => None,
                    };
                    if let Some(ack) = ack {
                        // The proxy may be closing: a failed acknowledgement is not this test's concern.
                        let _ = self.stream.write_all(&ack).await;
                    }
                    return Some((kind, flags, id, payload));
                }
            }
            let mut buf = [0u8; 16 << 10];
            match within("an HTTP/2 frame", self.stream.read(&mut buf)).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_h2_reader_with_open_windows_bounds_proxy_memory() {
    // An HTTP/2 client may open its flow-control windows wide (2^31 - 1 bytes) and then read
    // slowly: flow control no longer holds the proxy back, only what it chooses to queue per stream
    // does. With hyper's default (400 KB per stream) this client made the proxy hold about 31 MiB.
    let _serial = serial().await;
    const STREAMS: u32 = 64;
    const PER_STREAM: usize = 1 << 20;
    const CHUNK: usize = 16 << 10;
    let up = bulk_upstream(CHUNK, PER_STREAM).await;
    let (child, addr) = spawn_proxy_binary(up.addr);
    let pid = child.0.id();
    let base = warmed_rss(addr, pid).await;

    let mut c = H2Client::connect(addr, true).await;
    for i in 0..STREAMS {
        c.get(1 + 2 * i, "/big").await;
    }
    // Read slowly: a pause every 1 MiB.
    let (mut data, mut ended, mut since_pause) = (0usize, 0u32, 0usize);
    let mut peak = base;
    let start = Instant::now();
    while ended < STREAMS {
        let Some((kind, flags, _, payload)) = c.next().await else {
            panic!("the proxy closed after {data} bytes of data, {ended} streams ended");
        };
        match kind {
            0 => data += payload.len(), // DATA (hyper does not pad)
            3 | 7 => panic!("the proxy reset the stream or the connection (frame type {kind})"),
            _ => {}
        }
        if matches!(kind, 0 | 1) && flags & 1 != 0 {
            ended += 1;
        }
        since_pause += 9 + payload.len();
        if since_pause >= 1 << 20 {
            since_pause = 0;
            peak = peak.max(rss_kib(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(data, STREAMS as usize * PER_STREAM);
    let what = format!("{STREAMS} h2 streams of 1 MiB through a slow reader");
    let growth = rss_growth(&what, pid, base, peak, start);
    // Measured: 5.8–6.2 MiB with 16 KiB queued per stream (90–100 KiB per stream in all: the queue,
    // the frame in hand, the stream's state and its upstream connection), 31 MiB with hyper's
    // default of 400 KB.
    assert!(growth < 12 * 1024, "proxy memory grew by {growth} KiB");
}

#[tokio::test]
async fn client_connections_close_once_idle_and_never_while_a_stream_is_open() {
    // HTTP/2 had no idle timeout at all: an idle connection stayed open, holding about 18 KB of the
    // proxy, for as long as the client liked. Now both protocols close after
    // `server.client_idle_timeout` with nothing in flight, and a stream longer than it is not cut.
    let idle = Duration::from_millis(300);
    let up = Upstream::start(|req| async move {
        if req.uri().path() == "/quick" {
            return full(200, "text/plain", "quick");
        }
        // Eight events 100 ms apart: the stream outlasts the idle timeout.
        let (tx, resp) = streamed("text/event-stream");
        tokio::spawn(async move {
            for i in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if tx
                    .send(Ok(Bytes::from(format!("data: {i}\n\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        resp
    })
    .await;
    let toml = format!(
        "[server]\nclient_idle_timeout = \"300ms\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\n[[routes]]\npool = \"up\"\n",
        up.addr
    );
    let proxy = Proxy::start(&toml).await;

    let mut h2 = H2Client::connect(proxy.addr, false).await;
    let opened = Instant::now();
    h2.get(1, "/tick").await;
    let mut body = Vec::new();
    let ended = loop {
        let Some((kind, flags, id, payload)) = h2.next().await else {
            panic!("closed mid-stream after {:?}", opened.elapsed());
        };
        assert!(!matches!(kind, 3 | 7), "frame type {kind} mid-stream");
        if kind == 0 && id == 1 {
            body.extend_from_slice(&payload);
        }
        if matches!(kind, 0 | 1) && id == 1 && flags & 1 != 0 {
            break Instant::now();
        }
    };
    assert!(
        opened.elapsed() > idle * 2,
        "the stream outlasts the timeout"
    );
    let events = String::from_utf8(body).unwrap();
    assert_eq!(events.matches("data: ").count(), 8, "{events}");
    // Then a GOAWAY with NO_ERROR, and the close.
    let goaway = loop {
        match h2.next().await {
            Some((7, _, _, payload)) => break payload,
            Some(_) => {}
            None => panic!("closed without a GOAWAY"),
        }
    };
    assert_eq!(goaway[4..8], [0, 0, 0, 0], "GOAWAY error code");
    while h2.next().await.is_some() {}
    // The timer starts when the proxy drops the stream, a moment before the client reads its end:
    // 100 ms of slack, still far from the 800 ms a timer counted from the stream's start would show.
    assert!(
        ended.elapsed() >= idle - Duration::from_millis(100),
        "closed {:?} after the stream",
        ended.elapsed()
    );

    // HTTP/1.1 keep-alive: the lean server closes as it waits for a next request.
    let mut c = RawClient::connect(proxy.addr).await;
    let asked = Instant::now(); // before the proxy's timer can start: a strict lower bound
    c.send("GET /quick HTTP/1.1\r\nhost: x\r\n\r\n").await;
    c.read_until(b"quick").await;
    let (_, clean) = within("the idle close", c.read_to_end()).await;
    assert!(clean);
    assert!(
        asked.elapsed() >= idle,
        "closed {:?} after",
        asked.elapsed()
    );
}

/// An HTTP/1.1 client of `GET /big` with a 4 KiB socket receive buffer (so that the kernel holds
/// little on its side), returned once it has read the response head and nothing more.
async fn big_download_read_to_its_head(addr: std::net::SocketAddr) -> RawClient {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = within("connect", sock.connect(addr)).await.unwrap();
    let mut c = RawClient {
        stream,
        received: Vec::new(),
    };
    c.get("/big").await;
    c.read_until(b"\r\n\r\n").await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_do_not_stall_others_on_a_shared_h2_upstream() {
    // Every stream to an HTTP/2 upstream shares one connection, and its flow-control window. What a
    // client has not read yet counts against both the stream's window and the connection's until
    // the proxy reads it, so a few clients that stop reading must not use up the connection's
    // window, or every other stream on it stalls.
    let _serial = serial().await;
    const SLOW: usize = 4;
    const BIG: usize = 64 << 20;
    const CHUNK: usize = 64 << 10;
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let up = Upstream::start(move |req| {
        let sent = counter.clone();
        async move {
            if req.uri().path() == "/small" {
                return full(200, "text/plain", "small");
            }
            let (tx, resp) = streamed("application/octet-stream");
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; CHUNK]);
                for _ in 0..BIG / CHUNK {
                    if tx.send(Ok(chunk.clone())).await.is_err() {
                        return;
                    }
                    sent.fetch_add(CHUNK, std::sync::atomic::Ordering::SeqCst);
                }
            });
            resp
        }
    })
    .await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\nprotocol = \"http2\"\n[[routes]]\npool = \"up\"\n",
        up.addr
    );
    let proxy = Proxy::start(&toml).await;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        slow.push(big_download_read_to_its_head(proxy.addr).await); // ... and never read again.
    }
    // Until the upstream can send no more: nothing sent for 200 ms. (Before the fix the four
    // slow streams then hold the whole connection window.)
    let deadline = Instant::now() + T;
    let (mut last, mut still) = (usize::MAX, 0);
    while still < 20 {
        let now = sent.load(std::sync::atomic::Ordering::SeqCst);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        assert!(
            Instant::now() < deadline,
            "the upstream never stopped sending"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let (raw, _) = within(
        "the small answer beside the stalled streams",
        c.read_to_end(),
    )
    .await;
    let (head, body) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("small"));
    // Most of what the upstream sent sits in the kernel's socket buffers between the proxy and the
    // four clients (up to `tcp_wmem`'s maximum each), not in the proxy.
    eprintln!(
        "{SLOW} clients stopped reading after the upstream sent {} KiB in all; a fifth was answered",
        last >> 10
    );
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_send_timeout_and_a_slow_one_is_not() {
    // A client that stays connected but takes nothing would otherwise hold its upstream request
    // (a GPU slot) for good: backpressure stops the upstream's frames, so the idle timeout, which
    // counts upstream silence, never sees them stop.
    let _serial = serial().await;
    let up = bulk_upstream(64 << 10, 256 << 20).await;
    let proxy = Proxy::start(&proxy_config("send_timeout = \"500ms\"", up.addr)).await;
    use tokio::io::AsyncReadExt;

    // A slow reader: 16 KiB every 100 ms, for three times the timeout. It is never cut.
    let mut slow = big_download_read_to_its_head(proxy.addr).await;
    let mut buf = vec![0u8; 16 << 10];
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        let n = within("a slow read", slow.stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "the slow reader was cut");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(slow);
    upstream_settles(
        &up,
        Instant::now() + T,
        "the slow reader's upstream",
        |open, _| open == 0,
    )
    .await;

    // A client that stops reading: its upstream request is cancelled once nothing has gone out
    // for the send timeout.
    // Before the request: the proxy cannot start its timer earlier.
    let stopped = Instant::now();
    let stalled = big_download_read_to_its_head(proxy.addr).await;
    upstream_settles(
        &up,
        stopped + T,
        "a client that reads nothing",
        |open, _| open == 0,
    )
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(500),
        "cut after {:?}, before the send timeout",
        stopped.elapsed()
    );
    // And the client's stream is cut, not ended: no terminating chunk.
    let mut stalled = stalled;
    let (raw, _) = within("the cut", stalled.read_to_end()).await;
    assert!(!raw.ends_with(b"0\r\n\r\n"), "the cut stream ended cleanly");
    eprintln!(
        "a client that read nothing was cut {:?} after it stopped",
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_stops_reading_is_closed_after_send_timeout() {
    // The same over HTTP/2, where hyper serves the connection: a client that opened its windows
    // and then reads nothing blocks the proxy's writes; after the send timeout the connection is
    // closed and every stream's upstream request cancelled.
    let _serial = serial().await;
    let up = bulk_upstream(64 << 10, 256 << 20).await;
    let proxy = Proxy::start(&proxy_config("send_timeout = \"500ms\"", up.addr)).await;
    let stopped = Instant::now(); // before the requests: a strict lower bound
    let mut c = H2Client::connect(proxy.addr, true).await;
    for i in 0..4 {
        c.get(1 + 2 * i, "/big").await;
    }
    upstream_settles(&up, stopped + T, "four streams, all cut", |open, total| {
        total >= 4 && open == 0
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(500),
        "closed after {:?}, before the send timeout",
        stopped.elapsed()
    );
    eprintln!(
        "an HTTP/2 client that read nothing was closed {:?} after it stopped",
        stopped.elapsed()
    );
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_whose_window_stays_shut_is_reset_after_send_timeout_and_the_rest_go_on() {
    // A client that reads its connection and opens one stream's window as it reads, but never the
    // other's. hyper waits for that window and polls the stream's body no more, so no timer in the
    // body fires, and the connection's writes go on. After the send timeout, as nginx does, that
    // stream is reset and its upstream request cancelled; the other stream and the connection go on.
    let _serial = serial().await;
    let up = bulk_upstream(64 << 10, 256 << 20).await;
    let proxy = Proxy::start(&proxy_config("send_timeout = \"500ms\"", up.addr)).await;
    let mut c = H2Client::connect(proxy.addr, false).await;
    // The connection's window wide open; each stream's stays at the default 65,535 bytes.
    c.window_update(0, (u32::MAX >> 1) - 65_535).await;
    let start = Instant::now(); // before the requests: a strict lower bound
    c.get(1, "/big").await;
    c.get(3, "/big").await;
    let (mut shut, mut read, mut owed) = (0usize, 0usize, 0u32);
    // Stream 3 is read slowly: its window reopened 32 KiB at a time, 100 ms after the 32 KiB came.
    // It waits for its window again and again, never for the send timeout, and is never reset.
    async fn take(c: &mut H2Client, read: &mut usize, owed: &mut u32, len: usize) {
        *read += len;
        *owed += len as u32;
        if *owed >= 32 << 10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.window_update(3, *owed).await;
            *owed = 0;
        }
    }
    let reset = loop {
        let Some((kind, _, id, payload)) = c.next().await else {
            panic!("the proxy closed the connection");
        };
        match (kind, id) {
            (0, 1) => shut += payload.len(),
            (0, 3) => take(&mut c, &mut read, &mut owed, payload.len()).await,
            (3, 1) => break payload,
            (3 | 7, _) => panic!("frame type {kind} on stream {id}"),
            _ => {}
        }
        assert!(start.elapsed() < T, "the shut stream was never reset");
    };
    let after = start.elapsed();
    assert!(
        after >= Duration::from_millis(500),
        "reset after {after:?}, before the send timeout"
    );
    assert_eq!(shut, 65_535, "the shut stream's window, filled");
    assert_eq!(reset, 8u32.to_be_bytes(), "RST_STREAM with CANCEL");
    // Its upstream request is cancelled; the other stream's is not.
    upstream_settles(&up, Instant::now() + T, "one of two cut", |open, total| {
        open == 1 && total == 2
    })
    .await;
    // Stream 3 goes on over the same connection, for twice the send timeout more.
    let before = read;
    let reset_at = Instant::now();
    while reset_at.elapsed() < Duration::from_millis(1000) {
        let Some((kind, _, id, payload)) = c.next().await else {
            panic!("the proxy closed the connection after the reset");
        };
        match (kind, id) {
            (0, 3) => take(&mut c, &mut read, &mut owed, payload.len()).await,
            (3 | 7, _) => panic!("frame type {kind} on stream {id} after the reset"),
            (0, _) => panic!("data on stream {id} after its reset"),
            _ => {}
        }
    }
    assert!(
        read > before,
        "the open stream made no progress after the reset"
    );
    assert_eq!(up.open_connections(), 1, "the open stream's upstream");
    eprintln!(
        "a stream whose window stayed shut was reset {after:?} after it was requested; \
         its slow neighbour read {} KiB in all, {} KiB of them after the reset",
        read >> 10,
        (read - before) >> 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_disconnects_leak_nothing() {
    let _serial = serial().await;
    const N: usize = 10_000;
    let up = Upstream::start(|req| async move {
        let (tx, resp) = streamed("text/event-stream");
        if req.uri().path() == "/mid" {
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"data: x\n\n"))).await;
                tx.closed().await;
            });
            resp
        } else {
            // Before headers: never answer.
            std::future::pending::<()>().await;
            unreachable!()
        }
    })
    .await;
    let toml = format!(
        "[defaults]\nkeepalive_interval = \"off\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\n[[routes]]\npool = \"up\"\n",
        up.addr
    );
    let proxy = Proxy::start(&toml).await;
    // Tasks of the test's runtime (upstream, clients) and of the proxy's, which runs on its own.
    let metrics = [
        tokio::runtime::Handle::current().metrics(),
        proxy.runtime.metrics(),
    ];
    let alive = |m: &[tokio::runtime::RuntimeMetrics]| -> usize {
        m.iter().map(|m| m.num_alive_tasks()).sum()
    };

    async fn one(addr: std::net::SocketAddr, i: usize, up: &Upstream) {
        let before = up.total_connections();
        let mut c = RawClient::connect(addr).await;
        let mid = i % 2 == 0;
        c.get(if mid { "/mid" } else { "/pre" }).await;
        if mid {
            c.read_until(b"data: x").await;
        } else {
            // Wait until the upstream has a connection for it, so the cancellation really is in flight.
            let deadline = Instant::now() + T;
            while up.total_connections() == before {
                assert!(
                    Instant::now() < deadline,
                    "the request never reached the upstream"
                );
                tokio::task::yield_now().await;
            }
        }
        if i % 4 < 2 {
            c.close_fin().await
        } else {
            c.close_rst()
        }
    }

    async fn settle(
        up: &Upstream,
        metrics: &[tokio::runtime::RuntimeMetrics],
        tasks: usize,
    ) -> usize {
        let deadline = Instant::now() + T;
        loop {
            let alive: usize = metrics.iter().map(|m| m.num_alive_tasks()).sum();
            if up.open_connections() == 0 && alive <= tasks {
                return alive;
            }
            assert!(
                Instant::now() < deadline,
                "did not settle: {} upstream connections open, {alive} tasks alive (baseline {tasks})",
                up.open_connections()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Warm up, then take the baseline.
    for i in 0..500 {
        one(proxy.addr, i, &up).await;
    }
    let base_tasks = {
        upstream_settles(&up, Instant::now() + T, "the warm-up", |open, _| open == 0).await;
        alive(&metrics)
    };
    let base_rss = rss_kib(std::process::id(), "VmRSS:");
    let t0 = Instant::now();
    for i in 0..N {
        one(proxy.addr, i, &up).await;
    }
    let tasks = settle(&up, &metrics, base_tasks).await;
    let rss = rss_kib(std::process::id(), "VmRSS:");
    eprintln!(
        "{N} disconnects in {:?}: tasks {base_tasks} -> {tasks}, upstream connections open {}, test-process RSS {base_rss} -> {rss} KiB",
        t0.elapsed(),
        up.open_connections()
    );
    // Every aborted upstream connection was closed, not pooled.
    assert_eq!(up.open_connections(), 0);
    // Proxy, upstream and client share this process: a leak of even 1 KiB per disconnect would be 10 MiB.
    assert!(
        rss.saturating_sub(base_rss) < 4 * 1024,
        "RSS grew {base_rss} -> {rss} KiB"
    );
}

fn stream_config(up: std::net::SocketAddr, defaults: &str) -> String {
    format!(
        "[defaults]\n{defaults}\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{up}\"]\n[[routes]]\npool = \"up\"\n"
    )
}

/// Arrival times of the keepalive lines in what a raw client received.
fn heartbeat_times(c: &RawClient) -> Vec<Instant> {
    c.received
        .iter()
        .filter(|(_, b)| b.windows(12).any(|w| w == b": keepalive\n"))
        .map(|(t, _)| *t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_fill_silence_only_and_never_count_as_upstream_activity() {
    let _serial = serial().await;
    // Talks every 20 ms for 10 events (no heartbeat due), then is silent 350 ms (three due at 100 ms
    // intervals), then ends.
    let up = Upstream::start(|_| async {
        let (tx, resp) = streamed("text/event-stream");
        tokio::spawn(async move {
            for i in 0..10 {
                let _ = tx.send(Ok(Bytes::from(format!("data: {i}\n\n")))).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(350)).await;
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        });
        resp
    })
    .await;
    let proxy = Proxy::start(&stream_config(
        up.addr,
        "keepalive_interval = \"100ms\"\nidle_timeout = \"2s\"",
    ))
    .await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let (raw, _) = c.read_to_end().await;
    let (head, body) = split_head(&raw);
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-accel-buffering: no"), "{head}");
    assert!(lower.contains("no-transform"), "{head}");
    let (payload, terminated) = dechunk(&body);
    assert!(terminated);
    let text = String::from_utf8(payload).unwrap();
    // Heartbeats only during the silence: three, each a lone comment line between events.
    assert_eq!(text.matches(": keepalive\n").count(), 3, "{text:?}");
    assert!(text.starts_with("data: 0\n\n"), "{text:?}");
    assert!(
        text.ends_with("data: 9\n\n: keepalive\n: keepalive\n: keepalive\ndata: [DONE]\n\n"),
        "{text:?}"
    );
    let beats = heartbeat_times(&c);
    let gaps: Vec<Duration> = beats.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("heartbeat gaps: {gaps:?}");
    for g in gaps {
        assert!(
            g > Duration::from_millis(70) && g < Duration::from_millis(140),
            "heartbeat gap {g:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_cut_at_deadline_despite_heartbeats_closes_upstream() {
    let _serial = serial().await;
    let up = one_event_then_silent(b"data: hello\n\n").await;
    let proxy = Proxy::start(&stream_config(
        up.addr,
        "keepalive_interval = \"100ms\"\nidle_timeout = \"350ms\"",
    ))
    .await;
    let mut closed = up.on_close();
    let mut c = RawClient::connect(proxy.addr).await;
    c.get("/s").await;
    c.read_until(b"data: hello").await;
    let last_upstream_frame = c.received.last().unwrap().0;
    let (raw, _) = c.read_to_end().await;
    let cut = Instant::now();
    let upstream_closed = within("upstream close", closed.recv()).await.unwrap();
    let (_, body) = split_head(&raw);
    let (payload, terminated) = dechunk(&body);
    assert!(
        !terminated,
        "an idle cut must not end like a complete stream"
    );
    let text = String::from_utf8(payload).unwrap();
    assert_eq!(text.matches(": keepalive\n").count(), 3, "{text:?}");
    let after = cut - last_upstream_frame;
    eprintln!(
        "idle cut {after:?} after the last upstream frame; upstream closed {:?} after the cut",
        upstream_closed.saturating_duration_since(cut)
    );
    assert!(
        after >= Duration::from_millis(340) && after < Duration::from_millis(450),
        "cut after {after:?}"
    );
    assert!(upstream_closed <= cut + Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_timeout_is_504_and_cancels_the_upstream() {
    let _serial = serial().await;
    let up = Upstream::start(|_| async {
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let proxy = Proxy::start(&stream_config(up.addr, "first_byte_timeout = \"200ms\"")).await;
    let mut closed = up.on_close();
    let t0 = Instant::now();
    let resp = within(
        "504",
        client(false).request(
            Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = body_string(resp).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "first_byte_timeout");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(400),
        "{took:?}"
    );
    within("upstream closed", closed.recv()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_cut_resets_the_h2_stream() {
    let _serial = serial().await;
    let up = one_event_then_silent(b"data: hello\n\n").await;
    let proxy = Proxy::start(&stream_config(
        up.addr,
        "keepalive_interval = \"50ms\"\nidle_timeout = \"200ms\"",
    ))
    .await;
    let mut closed = up.on_close();
    let resp = within(
        "h2 headers",
        client(true).request(
            Request::get(format!("http://{}/s", proxy.addr))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut body = resp.into_body();
    let mut text = Vec::new();
    let end = loop {
        match within("frame", body.frame()).await {
            Some(Ok(f)) => text.extend_from_slice(&f.into_data().unwrap_or_default()),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    let text = String::from_utf8(text).unwrap();
    assert!(text.starts_with("data: hello\n\n: keepalive\n"), "{text:?}");
    let err = end.expect("an idle cut must reset the h2 stream, not end it cleanly");
    eprintln!("h2 idle cut: {err}");
    within("upstream closed", closed.recv()).await.unwrap();
}
