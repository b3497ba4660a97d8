//! A raw HTTP/1.1 client that timestamps every read and the events it completes.
//!
//! Raw sockets, not hyper: the load generator must cost little and the same whatever the target, and
//! a read is exactly one `recv` so that coalescing by a proxy shows (two events in one read).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::find;

/// Why a request failed.
pub type Error = String;

/// One keep-alive connection to a target.
pub struct Conn {
    sock: TcpStream,
    origin: Instant,
    buf: Vec<u8>,
    dec: Chunked,
    events: Events,
    closes: bool,
}

/// Events completed by one read.
pub struct Batch {
    /// When the read returned (ns since the origin).
    pub at: u64,
    /// True when the response ended with this read.
    pub done: bool,
}

impl Conn {
    /// Connects with TCP_NODELAY, as every streaming client should.
    pub async fn connect(addr: SocketAddr, origin: Instant) -> Result<Self, Error> {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = sock.set_nodelay(true);
        Ok(Self {
            sock,
            origin,
            buf: Vec::with_capacity(4096),
            dec: Chunked::default(),
            events: Events::default(),
            closes: false,
        })
    }

    /// Nanoseconds since the origin.
    pub fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Sends a GET for `target`; returns when it was written.
    pub async fn send(&mut self, target: &str) -> Result<u64, Error> {
        let req =
            format!("GET {target} HTTP/1.1\r\nhost: loadtest\r\naccept: text/event-stream\r\n\r\n");
        let at = self.now();
        self.sock
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        Ok(at)
    }

    /// Reads the response head; the status must be 200 and the body chunked.
    pub async fn head(&mut self) -> Result<(), Error> {
        let mut tmp = [0u8; 4096];
        let end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            let n = self
                .sock
                .read(&mut tmp)
                .await
                .map_err(|e| format!("read head: {e}"))?;
            if n == 0 {
                return Err("connection closed before the response head".into());
            }
            self.buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            let line = head.lines().next().unwrap_or("").to_string();
            return Err(format!("status: {line}"));
        }
        if !head.contains("transfer-encoding: chunked") {
            return Err("response not chunked".into());
        }
        // nginx closes a keep-alive connection after `keepalive_requests` (1000) responses.
        self.closes = head.contains("\r\nconnection: close\r\n");
        self.buf.drain(..end);
        self.dec = Chunked::default();
        self.events = Events::default();
        Ok(())
    }

    /// Reads once (or consumes what is already buffered) and pushes the emit times of the events it
    /// completed into `out`.
    pub async fn read_batch(&mut self, out: &mut Vec<u64>) -> Result<Batch, Error> {
        let at;
        if self.buf.is_empty() {
            let mut tmp = [0u8; 16384];
            let n = self
                .sock
                .read(&mut tmp)
                .await
                .map_err(|e| format!("read body: {e}"))?;
            at = self.now();
            if n == 0 {
                return Err("connection closed mid-body".into());
            }
            self.buf.extend_from_slice(&tmp[..n]);
        } else {
            at = self.now();
        }
        let data = std::mem::take(&mut self.buf);
        let events = &mut self.events;
        let used = self.dec.feed(&data, &mut |bytes| events.feed(bytes, out))?;
        // Bytes after the end of this response belong to the next one.
        self.buf = data[used..].to_vec();
        Ok(Batch {
            at,
            done: self.dec.done(),
        })
    }

    /// Sends `target` and reads the whole response, returning (sent at, first event at, events).
    pub async fn get(&mut self, target: &str) -> Result<(u64, u64, u64), Error> {
        let sent = self.send(target).await?;
        self.head().await?;
        let mut first = None;
        let mut count = 0;
        let mut ev = Vec::new();
        loop {
            ev.clear();
            let b = self.read_batch(&mut ev).await?;
            if first.is_none() && !ev.is_empty() {
                first = Some(b.at);
            }
            count += ev.len() as u64;
            if b.done {
                break;
            }
        }
        Ok((sent, first.ok_or("no event")?, count))
    }

    /// The server said it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.closes
    }

    /// Closes with FIN (`rst == false`) or RST (`SO_LINGER` 0); returns when.
    pub fn close(self, rst: bool) -> u64 {
        if rst {
            let _ = self.sock.set_zero_linger();
        }
        let at = self.now();
        drop(self.sock);
        at
    }
}

/// Awaits `f` at most `d`.
pub async fn within<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| format!("no answer within {d:?}"))?
}

/// Incremental chunked transfer-coding decoder.
#[derive(Default)]
struct Chunked {
    state: St,
    size: usize,
    line_len: usize,
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
enum St {
    #[default]
    Size,
    Ext,
    Data,
    DataCr,
    DataLf,
    Trailer,
    Done,
}

impl Chunked {
    fn done(&self) -> bool {
        self.state == St::Done
    }

    /// Decodes `input`, handing data to `sink`; returns how many bytes it consumed (it stops at the end
    /// of the message).
    fn feed(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Result<usize, Error> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                St::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.size = self.size * 16 + (b as char).to_digit(16).unwrap() as usize;
                    }
                    b';' | b'\r' => self.state = St::Ext,
                    b'\n' => self.end_size(),
                    _ => return Err(format!("bad chunk size byte {b:#x}")),
                },
                St::Ext => {
                    if b == b'\n' {
                        self.end_size();
                    }
                }
                St::Data => {
                    let n = self.size.min(input.len() - i);
                    sink(&input[i..i + n]);
                    self.size -= n;
                    i += n;
                    if self.size == 0 {
                        self.state = St::DataCr;
                    }
                    continue;
                }
                St::DataCr => match b {
                    b'\r' => self.state = St::DataLf,
                    b'\n' => self.state = St::Size,
                    _ => return Err("chunk data not followed by CRLF".into()),
                },
                St::DataLf => {
                    if b != b'\n' {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    self.state = St::Size;
                }
                St::Trailer => {
                    if b == b'\n' {
                        if self.line_len == 0 {
                            self.state = St::Done;
                            return Ok(i + 1);
                        }
                        self.line_len = 0;
                    } else if b != b'\r' {
                        self.line_len += 1;
                    }
                }
                St::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size(&mut self) {
        if self.size == 0 {
            self.state = St::Trailer;
            self.line_len = 0;
        } else {
            self.state = St::Data;
        }
    }
}

/// SSE event splitter that only understands what the upstream writes (`data: NS ...`), and skips
/// comments (a proxy's heartbeats).
#[derive(Default)]
struct Events {
    line: Vec<u8>,
    pending: Option<u64>,
}

impl Events {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u64>) {
        for &b in bytes {
            if b != b'\n' {
                // Only the start of a line matters; padding is skipped.
                if self.line.len() < 40 {
                    self.line.push(b);
                }
                continue;
            }
            if self.line.is_empty() || self.line == b"\r" {
                if let Some(t) = self.pending.take() {
                    out.push(t);
                }
            } else if let Some(rest) = self.line.strip_prefix(b"data: ") {
                let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
                self.pending = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|s| s.parse().ok());
            }
            self.line.clear();
        }
    }
}
