//! The scripted upstream: a raw HTTP/1.1 server that writes SSE events with their emit time inside.
//!
//! It is written on raw sockets (not hyper) so that what it costs is small and the same for every target,
//! and so that it can report exactly when it saw a connection close.
//!
//! Request target: `/s?id=ID&mode=MODE&n=N&gap_us=G&ttfb_us=T&pad=P`
//! - `stream`: wait `ttfb_us`, then the headers and the first event in one write, then `n - 1` more
//!   events `gap_us` apart (one chunk each), then the terminating chunk;
//! - `hold`: headers and one event at once, then silence until the client goes away;
//! - `blast`: headers, then `n` events as fast as the socket takes them, one write per event.
//!
//! Every event is `data: EMIT_NS PADDING\n\n`, EMIT_NS being nanoseconds since the harness's origin
//! (the same monotonic clock the client reads).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// What the upstream tells a watcher about one request id.
#[derive(Debug)]
pub struct Watch {
    /// Fires when the request reached the upstream, with the upstream connection's number.
    pub received: oneshot::Receiver<u64>,
    /// Fires when the upstream saw the connection serving this request close (EOF, reset or a
    /// failed write), with the time in ns since the origin.
    pub closed: oneshot::Receiver<u64>,
}

#[derive(Default)]
struct Watchers {
    received: HashMap<u64, oneshot::Sender<u64>>,
    closed: HashMap<u64, oneshot::Sender<u64>>,
}

struct State {
    origin: Instant,
    conns: AtomicU64,
    watchers: Mutex<Watchers>,
}

/// A running scripted upstream.
#[derive(Clone)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Upstream {
    /// Binds 127.0.0.1:0 and serves on the current runtime.
    pub async fn start(origin: Instant) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            origin,
            conns: AtomicU64::new(0),
            watchers: Mutex::new(Watchers::default()),
        });
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(serve(s, st.clone()));
                    }
                    Err(e) => {
                        // Out of descriptors, typically: say so and keep accepting.
                        eprintln!("upstream accept: {e}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        });
        Ok(Self { addr, state })
    }

    /// Registers interest in request `id` (before sending it).
    pub fn watch(&self, id: u64) -> Watch {
        let (rtx, received) = oneshot::channel();
        let (ctx, closed) = oneshot::channel();
        let mut w = self.state.watchers.lock().unwrap();
        w.received.insert(id, rtx);
        w.closed.insert(id, ctx);
        Watch { received, closed }
    }

    /// Forgets a watch that was not fulfilled.
    pub fn unwatch(&self, id: u64) {
        let mut w = self.state.watchers.lock().unwrap();
        w.received.remove(&id);
        w.closed.remove(&id);
    }
}

/// One request's script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Stream,
    Hold,
    Blast,
}

/// A parsed request target.
#[derive(Debug, Clone, Copy)]
pub struct Script {
    pub id: u64,
    pub mode: Mode,
    pub n: u64,
    pub gap_us: u64,
    pub ttfb_us: u64,
    pub pad: usize,
}

impl Script {
    /// The request target that asks for this script.
    pub fn path(&self) -> String {
        let mode = match self.mode {
            Mode::Stream => "stream",
            Mode::Hold => "hold",
            Mode::Blast => "blast",
        };
        format!(
            "/s?id={}&mode={mode}&n={}&gap_us={}&ttfb_us={}&pad={}",
            self.id, self.n, self.gap_us, self.ttfb_us, self.pad
        )
    }

    fn parse(target: &str) -> Option<Self> {
        let q = target.split_once('?')?.1;
        let mut s = Script {
            id: 0,
            mode: Mode::Stream,
            n: 1,
            gap_us: 0,
            ttfb_us: 0,
            pad: 0,
        };
        for kv in q.split('&') {
            let (k, v) = kv.split_once('=')?;
            match k {
                "id" => s.id = v.parse().ok()?,
                "mode" => {
                    s.mode = match v {
                        "stream" => Mode::Stream,
                        "hold" => Mode::Hold,
                        "blast" => Mode::Blast,
                        _ => return None,
                    }
                }
                "n" => s.n = v.parse().ok()?,
                "gap_us" => s.gap_us = v.parse().ok()?,
                "ttfb_us" => s.ttfb_us = v.parse().ok()?,
                "pad" => s.pad = v.parse().ok()?,
                _ => return None,
            }
        }
        Some(s)
    }
}

fn now_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

async fn serve(stream: TcpStream, st: Arc<State>) {
    let _ = stream.set_nodelay(true);
    let conn = st.conns.fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut tmp = [0u8; 2048];
    loop {
        // One request head.
        let end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            match rd.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let target = head.split(' ').nth(1).unwrap_or("");
        let Some(script) = Script::parse(target) else {
            let _ = wr
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            continue;
        };
        if let Some(tx) = st.watchers.lock().unwrap().received.remove(&script.id) {
            let _ = tx.send(conn);
        }
        // Respond while watching the read side: EOF or reset there is the client (or proxy) going away.
        let respond = respond(&mut wr, script, st.origin);
        tokio::pin!(respond);
        let finished = loop {
            tokio::select! {
                biased;
                r = rd.read(&mut tmp) => match r {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                },
                r = &mut respond => break r.is_ok(),
            }
        };
        if !finished {
            let at = now_ns(st.origin);
            if let Some(tx) = st.watchers.lock().unwrap().closed.remove(&script.id) {
                let _ = tx.send(at);
            }
            return;
        }
    }
}

const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

fn event(out: &mut Vec<u8>, origin: Instant, pad: usize) {
    use std::io::Write;
    let t = now_ns(origin);
    let mut ev = Vec::with_capacity(40 + pad);
    let _ = write!(ev, "data: {t} ");
    ev.resize(ev.len() + pad, b'x');
    ev.extend_from_slice(b"\n\n");
    let _ = write!(out, "{:x}\r\n", ev.len());
    out.extend_from_slice(&ev);
    out.extend_from_slice(b"\r\n");
}

async fn respond(wr: &mut OwnedWriteHalf, s: Script, origin: Instant) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(256 + s.pad);
    if s.ttfb_us > 0 {
        tokio::time::sleep(Duration::from_micros(s.ttfb_us)).await;
    }
    out.extend_from_slice(HEAD);
    event(&mut out, origin, s.pad);
    wr.write_all(&out).await?;
    match s.mode {
        Mode::Hold => std::future::pending::<()>().await,
        Mode::Stream => {
            let start = Instant::now();
            for i in 1..s.n {
                // Paced against the start, so that timer lateness does not accumulate.
                tokio::time::sleep_until((start + Duration::from_micros(s.gap_us * i)).into())
                    .await;
                out.clear();
                event(&mut out, origin, s.pad);
                wr.write_all(&out).await?;
            }
        }
        Mode::Blast => {
            for _ in 1..s.n {
                out.clear();
                event(&mut out, origin, s.pad);
                wr.write_all(&out).await?;
            }
        }
    }
    wr.write_all(b"0\r\n\r\n").await
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
