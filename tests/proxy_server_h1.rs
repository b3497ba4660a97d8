//! The proxy's own HTTP/1.1 server side, over raw sockets: keep-alive and pipelining, HTTP/1.0,
//! HEAD, what it hands to hyper (streamed, large and `Expect` bodies), malformed requests, and a
//! stream cut by the upstream.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;

/// An upstream that answers with `METHOD PATH BODY-LENGTH BODY-CHECKSUM`.
async fn echo() -> Upstream {
    Upstream::start(|req| async move {
        let line = format!("{} {}", req.method(), req.uri().path());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
        full(200, "text/plain", format!("{line} {} {sum}", body.len()))
    })
    .await
}

/// Split `raw` into consecutive responses, framed by `content-length` or chunked: (head, payload)
/// pairs.
fn responses(mut raw: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let (head, rest) = split_head(raw);
        let (payload, used) = if head.contains("transfer-encoding: chunked") {
            let end = rest.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
            (dechunk(&rest[..end]).0, end)
        } else {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap_or_else(|| panic!("no framing in {head}"))
                .trim()
                .parse()
                .unwrap();
            (rest[..len].to_vec(), len)
        };
        out.push((head, String::from_utf8_lossy(&payload).into_owned()));
        raw = &raw[raw.len() - rest.len() + used..];
    }
    out
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let up = echo().await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    // Three requests in one write; the second has a body; the last closes.
    c.send(
        "GET /a HTTP/1.1\r\nhost: x\r\n\r\n\
         POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc\
         GET /c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (raw, clean) = c.read_to_end().await;
    assert!(clean);
    let rs = responses(&raw);
    let bodies: Vec<&str> = rs.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(bodies, ["GET /a 0 0", "POST /b 3 294", "GET /c 0 0"]);
    assert!(rs[0].0.starts_with("HTTP/1.1 200 OK\r\n"), "{}", rs[0].0);
    assert!(rs[0].0.contains("\r\ndate: "), "{}", rs[0].0);
    assert!(!rs[0].0.contains("connection: close"), "{}", rs[0].0);
    assert!(rs[2].0.contains("connection: close"), "{}", rs[2].0);
}

#[test]
fn pipelined_requests_cut_into_any_writes_are_answered_in_order() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (up, proxy) = rt.block_on(async {
        let up = echo().await;
        let proxy = Proxy::start(&config(&[up.addr], "")).await;
        (up, proxy)
    });
    // Up to five requests: a GET or a POST with a body of up to 300 bytes (what the lean server
    // reads itself), in one stream of bytes cut into writes of 1 to 64 bytes, each flushed on its own.
    let request = (
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..300),
        "[a-z]{1,8}",
    );
    let case = (
        prop::collection::vec(request, 1..6),
        prop::collection::vec(1usize..64, 1..40),
    );
    let mut runner = TestRunner::new(RunnerConfig::with_cases(64));
    runner
        .run(&case, |(requests, cuts)| {
            let mut wire = Vec::new();
            let mut want = Vec::new();
            let last = requests.len() - 1;
            for (i, (post, body, path)) in requests.iter().enumerate() {
                let close = if i == last {
                    "connection: close\r\n"
                } else {
                    ""
                };
                if *post {
                    wire.extend_from_slice(
                        format!(
                            "POST /{path} HTTP/1.1\r\nhost: x\r\n{close}content-length: {}\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    );
                    wire.extend_from_slice(body);
                    let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
                    want.push(format!("POST /{path} {} {sum}", body.len()));
                } else {
                    wire.extend_from_slice(
                        format!("GET /{path} HTTP/1.1\r\nhost: x\r\n{close}\r\n").as_bytes(),
                    );
                    want.push(format!("GET /{path} 0 0"));
                }
            }
            let got = rt.block_on(async {
                let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                let mut rest = &wire[..];
                for &n in cuts.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (now, later) = rest.split_at(n.min(rest.len()));
                    s.write_all(now).await.unwrap();
                    s.flush().await.unwrap();
                    rest = later;
                }
                let mut raw = Vec::new();
                within(
                    "the answers",
                    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut raw),
                )
                .await
                .unwrap();
                raw
            });
            let answers: Vec<String> = responses(&got).into_iter().map(|(_, b)| b).collect();
            prop_assert_eq!(answers, want);
            Ok(())
        })
        .unwrap();
    rt.block_on(async move {
        drop(proxy);
        drop(up);
    });
}

#[test]
fn upstream_responses_cut_into_any_writes_reach_the_client_whole() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Each request is answered with the next script: its response cut into writes.
    let scripts: Arc<Mutex<VecDeque<Vec<Vec<u8>>>>> = Arc::default();
    let queue = scripts.clone();
    let proxy = rt.block_on(async {
        let up = RawUpstream::start(move |_| {
            let parts = queue.lock().unwrap().pop_front().expect("a script");
            parts.into_iter().map(Step::Write).collect()
        })
        .await;
        Proxy::start(&config(&[up.addr], "")).await
    });
    // SSE events of 1 to 200 bytes of data, one chunk each or several to a chunk, in chunks of any
    // size-line shape; the whole response cut into writes of 1 to 80 bytes.
    let case = (
        prop::collection::vec(("[ -~]{1,200}", 1usize..4), 1..12),
        prop::collection::vec(1usize..80, 1..30),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(RunnerConfig::with_cases(48));
    runner
        .run(&case, |(events, cuts, upper)| {
            let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            let mut want = Vec::new();
            let mut chunk = Vec::new();
            for (i, (data, per_chunk)) in events.iter().enumerate() {
                chunk.extend_from_slice(format!("data: {data}\n\n").as_bytes());
                if (i + 1) % per_chunk == 0 || i + 1 == events.len() {
                    let size = if upper { format!("{:X}", chunk.len()) } else { format!("{:x}", chunk.len()) };
                    wire.extend_from_slice(format!("{size}\r\n").as_bytes());
                    wire.extend_from_slice(&chunk);
                    wire.extend_from_slice(b"\r\n");
                    want.extend_from_slice(&chunk);
                    chunk.clear();
                }
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut parts = Vec::new();
            let mut rest = &wire[..];
            for &n in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at(n.min(rest.len()));
                parts.push(now.to_vec());
                rest = later;
            }
            scripts.lock().unwrap().push_back(parts);
            let raw = rt.block_on(async {
                let mut c = RawClient::connect(proxy.addr).await;
                c.send("GET /s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
                within("the stream", c.read_to_end()).await.0
            });
            let (head, body) = split_head(&raw);
            prop_assert!(head.starts_with("HTTP/1.1 200 OK"), "{}", head);
            let (payload, terminated) = dechunk(&body);
            prop_assert!(terminated);
            prop_assert_eq!(String::from_utf8_lossy(&payload), String::from_utf8_lossy(&want));
            Ok(())
        })
        .unwrap();
    rt.block_on(async move { drop(proxy) });
}

#[tokio::test]
async fn a_body_arriving_after_its_head_is_waited_for() {
    let up = echo().await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("POST /late HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n01234")
        .await;
    c.send("56789").await;
    c.send("GET /next HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let (raw, _) = c.read_to_end().await;
    let rs = responses(&raw);
    assert_eq!(rs[0].1, "POST /late 10 525");
    assert_eq!(rs[1].1, "GET /next 0 0");
}

#[tokio::test]
async fn http_1_0_clients_get_a_close_delimited_stream() {
    let up = Upstream::start(|_| async move {
        let (tx, resp) = streamed("text/event-stream");
        tokio::spawn(async move {
            for e in ["data: 1\n\n", "data: 2\n\n"] {
                let _ = tx.send(Ok(Bytes::from_static(e.as_bytes()))).await;
            }
        });
        resp
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /s HTTP/1.0\r\n\r\n").await;
    let (raw, clean) = c.read_to_end().await;
    assert!(clean);
    let (head, body) = split_head(&raw);
    assert!(head.contains("connection: close"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(body, b"data: 1\n\ndata: 2\n\n");
}

#[tokio::test]
async fn head_requests_get_the_length_and_no_body() {
    let up = Upstream::start(|_| async move { full(200, "text/plain", "hello") }).await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n").await;
    c.send("GET /h HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let (raw, _) = c.read_to_end().await;
    let (first, rest) = split_head(&raw);
    assert!(first.contains("content-length: 5"), "{first}");
    // The next response starts right after the HEAD response's head: no body bytes in between.
    assert!(rest.starts_with(b"HTTP/1.1 200 OK\r\n"));
    let (_, body) = split_head(&rest);
    assert_eq!(body, b"hello");
}

#[tokio::test]
async fn bodies_the_lean_server_does_not_read_go_through_hyper_intact() {
    let up = echo().await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;

    // Chunked, then a second request on the same connection (now hyper's).
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(
        "POST /chunked HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
         3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
         GET /after HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (raw, _) = c.read_to_end().await;
    let rs = responses(&raw);
    let bodies: Vec<&str> = rs.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(bodies, ["POST /chunked 5 495", "GET /after 0 0"]);

    // Larger than the lean server reads whole (64 KiB).
    let big = vec![b'z'; 100_000];
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(&format!(
        "POST /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        big.len()
    ))
    .await;
    c.send(std::str::from_utf8(&big).unwrap()).await;
    let (raw, _) = c.read_to_end().await;
    let (_, body) = split_head(&raw);
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(body.contains("POST /big 100000 12200000"), "{body}");

    // Expect: 100-continue gets its interim response, then the answer.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("POST /ask HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
        .await;
    c.read_until(b"100 Continue\r\n\r\n").await;
    c.send("ok").await;
    let (raw, _) = c.read_to_end().await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.contains("POST /ask 2 218"), "{text}");
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_reason_and_never_reach_the_upstream() {
    let up = echo().await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    for bad in [
        "GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1, 2\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
        "GET /\x7f HTTP/1.1\r\nhost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nbad header: x\r\n\r\n",
        "NOT HTTP AT ALL\r\n\r\n",
    ] {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(bad).await;
        let (raw, _) = c.read_to_end().await;
        let (head, body) = split_head(&raw);
        assert!(
            head.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{bad:?}: {head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "bad_request");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(up.total_connections(), 0);
}

#[tokio::test]
async fn requests_with_a_missing_doubled_or_invalid_host_get_400() {
    let up = echo().await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let ask = |req: &'static str| async move {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(req).await;
        let (raw, _) = within(req, c.read_to_end()).await;
        split_head(&raw)
    };
    for bad in [
        "GET /a HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: user@a\r\nconnection: close\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: a:port\r\nconnection: close\r\n\r\n",
    ] {
        let (head, body) = ask(bad).await;
        assert!(
            head.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{bad:?}: {head}"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "bad_request", "{bad:?}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("Host"),
            "{bad:?}: {v}"
        );
    }
    assert_eq!(up.total_connections(), 0);
    for good in [
        "GET /a HTTP/1.0\r\n\r\n",
        "GET http://a/a HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: [::1]:8080\r\nconnection: close\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: \r\nconnection: close\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: example.com:443\r\nconnection: close\r\n\r\n",
    ] {
        let (head, body) = ask(good).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{good:?}: {head}");
        assert_eq!(String::from_utf8_lossy(&body), "GET /a 0 0", "{good:?}");
    }
}

#[tokio::test]
async fn a_stream_the_upstream_cuts_does_not_end_cleanly() {
    // The upstream fails once the client has its first event (hyper would drop a frame it had not
    // flushed yet when the error came right behind it).
    let (cut_tx, cut_rx) = tokio::sync::mpsc::channel::<()>(1);
    let cut_rx = std::sync::Arc::new(tokio::sync::Mutex::new(cut_rx));
    let up = Upstream::start(move |_| {
        let cut_rx = cut_rx.clone();
        async move {
            let (tx, resp) = streamed("text/event-stream");
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"data: 1\n\n"))).await;
                cut_rx.lock().await.recv().await;
                let _ = tx.send(Err(std::io::Error::other("model crashed"))).await;
            });
            resp
        }
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /s HTTP/1.1\r\nhost: x\r\n\r\n").await;
    c.read_until(b"data: 1\n\n").await;
    cut_tx.send(()).await.unwrap();
    let (raw, _) = within("the cut", c.read_to_end()).await;
    let (head, body) = split_head(&raw);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let (payload, terminated) = dechunk(&body);
    assert_eq!(payload, b"data: 1\n\n");
    assert!(
        !terminated,
        "a cut stream must not end with the terminating chunk"
    );
}

#[tokio::test]
async fn a_stream_with_broken_chunked_framing_is_cut_and_its_connection_not_reused() {
    // A raw upstream: one event, then, once the client has it, a size line with no digits (a
    // decoder that read it as the last chunk would end the answer cleanly and pool the connection).
    // Later connections get a plain answer.
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = go.clone();
    let mut up = RawUpstream::start(move |nth| match nth {
        0 => vec![
            Step::Write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n".to_vec()),
            Step::Wait(gate.clone()),
            Step::Write(b"\r\n\r\n".to_vec()),
        ],
        _ => vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())],
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /s HTTP/1.1\r\nhost: x\r\n\r\n").await;
    c.read_until(b"data: 1\n\n").await;
    go.notify_one();
    let (raw, _) = within("the cut", c.read_to_end()).await;
    let (head, body) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let (payload, terminated) = dechunk(&body);
    assert_eq!(payload, b"data: 1\n\n");
    assert!(
        !terminated,
        "a body with broken framing must not end cleanly"
    );
    // The upstream connection is closed, not pooled: the next request gets a connection of its own.
    assert_eq!(
        within("the upstream close", up.closed.recv()).await,
        Some(0)
    );
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /next HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let (raw, _) = within("the next answer", c.read_to_end()).await;
    let (head, body) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(body, b"ok");
    assert_eq!(up.accepted(), 2);
}

/// What a raw upstream does for one request.
enum Step {
    /// Write these bytes and flush them, on their own.
    Write(Vec<u8>),
    /// Wait until the test lets it go on.
    Wait(std::sync::Arc<tokio::sync::Notify>),
    /// Close the connection.
    Close,
}

/// A raw upstream, for framings no HTTP library sends: `script(n)` says what it does for each
/// request (a head without a body) on its `n`-th connection, counted from 0. Connections stay open
/// between requests, as the proxy pools them.
struct RawUpstream {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The number of each connection the proxy closed, as it closes it.
    closed: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

impl RawUpstream {
    async fn start(script: impl Fn(usize) -> Vec<Step> + Send + Sync + 'static) -> RawUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let (n, script) = (accepted.clone(), std::sync::Arc::new(script));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                s.set_nodelay(true).unwrap();
                let nth = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (script, closed_tx) = (script.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            for step in script(nth) {
                                match step {
                                    Step::Write(b) => {
                                        if s.write_all(&b).await.is_err()
                                            || s.flush().await.is_err()
                                        {
                                            return;
                                        }
                                        tokio::task::yield_now().await;
                                    }
                                    Step::Wait(go) => go.notified().await,
                                    Step::Close => return,
                                }
                            }
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = closed_tx.send(nth);
                                return;
                            }
                            Ok(got) => pending.extend_from_slice(&buf[..got]),
                        }
                    }
                });
            }
        });
        RawUpstream {
            addr,
            accepted,
            closed,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The `error` object of a proxy's JSON error answer in `raw`, after checking its status line.
fn error_answer(what: &str, raw: &[u8], status_line: &str) -> serde_json::Value {
    let (head, body) = split_head(raw);
    assert!(
        head.starts_with(&format!("{status_line}\r\n")),
        "{what}: {head}"
    );
    let v: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{what}: {e}: {:?}", String::from_utf8_lossy(&body)));
    v["error"].clone()
}

#[tokio::test]
async fn malformed_upstream_responses_are_502_with_a_json_body() {
    let mut big = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70_000));
    big.extend_from_slice(b"\r\n\r\n");
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "a status of four digits",
            b"HTTP/1.1 2000 OK\r\n\r\n".to_vec(),
        ),
        ("a status under 100", b"HTTP/1.1 099 Low\r\n\r\n".to_vec()),
        ("an unknown version", b"HTTP/9.9 200 OK\r\n\r\n".to_vec()),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()),
        (
            "a header line without a colon",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n".to_vec(),
        ),
        (
            "a NUL in a header value",
            b"HTTP/1.1 200 OK\r\nx-a: a\0b\r\n\r\n".to_vec(),
        ),
        (
            "a protocol switch",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n".to_vec(),
        ),
        ("a head over 64 KiB", big),
        (
            "two different lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nab".to_vec(),
        ),
        (
            "a length that is not a number",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nab".to_vec(),
        ),
        (
            "a signed length",
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nab".to_vec(),
        ),
        (
            "a close before the head ends",
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n".to_vec(),
        ),
    ];
    for (what, answer) in bad {
        let close = what.starts_with("a close");
        let up = RawUpstream::start(move |_| {
            let mut steps = vec![Step::Write(answer.clone())];
            if close {
                steps.push(Step::Close);
            }
            steps
        })
        .await;
        let proxy = Proxy::start(&config(&[up.addr], "")).await;
        let mut c = RawClient::connect(proxy.addr).await;
        c.send("GET /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let (raw, _) = within(what, c.read_to_end()).await;
        let error = error_answer(what, &raw, "HTTP/1.1 502 Bad Gateway");
        assert_eq!(error["type"], "upstream_error", "{what}");
        assert_eq!(up.accepted(), 1, "{what}");
    }
}

#[tokio::test]
async fn a_response_with_both_lengths_is_framed_by_its_transfer_encoding_only() {
    // RFC 9112 §6.1: Transfer-Encoding overrides Content-Length, and an intermediary removes the
    // Content-Length before forwarding: a client framing by it would take the rest of the body for
    // the next response.
    let up = RawUpstream::start(|_| vec![Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec())]).await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(
        "GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (raw, _) = within("both answers", c.read_to_end()).await;
    let answers = responses(&raw);
    assert_eq!(answers.len(), 2, "{:?}", String::from_utf8_lossy(&raw));
    for (head, payload) in answers {
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        assert_eq!(payload, "hello world");
    }
}

#[tokio::test]
async fn a_request_with_both_lengths_reaches_the_upstream_framed_once() {
    // The other direction of RFC 9112 §6.1: the chunked body goes on without the Content-Length
    // it overrides, or the upstream could frame it by the length and read the rest as a request.
    // (Such a request goes to hyper, which drops the length already; `strip_hop_by_hop` would too.)
    let up = Upstream::start(|req| async move {
        let lengths = req.headers().get_all("content-length").iter().count();
        let te = req.headers().contains_key("transfer-encoding");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        full(
            200,
            "text/plain",
            format!(
                "lengths={lengths} te={te} body={}",
                String::from_utf8_lossy(&body)
            ),
        )
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await;
    let (raw, _) = within("the answer", c.read_to_end()).await;
    let (head, body) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let body = String::from_utf8_lossy(&body);
    assert!(body.ends_with("body=hello"), "{body}");
    assert!(
        body.starts_with("lengths=0 "),
        "the overridden length reached the upstream: {body}"
    );
}

#[tokio::test]
async fn a_request_body_with_bad_chunk_framing_is_the_clients_400_not_a_502() {
    // nginx answers these 400 too. Blamed on the upstream (502, an upstream error in the metrics),
    // they would page the wrong team.
    for (what, body) in [
        ("a size that is not hex", "0x3\r\nabc\r\n0\r\n\r\n"),
        ("more data than its size", "3\r\nabcdef\r\n0\r\n\r\n"),
        (
            "a size that overflows",
            "10000000000000003\r\nabc\r\n0\r\n\r\n",
        ),
        ("bare line feeds", "3\nabc\n0\n\n"),
    ] {
        // The upstream reads the request and never answers: only the body can end the attempt.
        let mut up = RawUpstream::start(|_| vec![]).await;
        let proxy = Proxy::start(&config(&[up.addr], "")).await;
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(&format!(
            "POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{body}"
        ))
        .await;
        // The client connection closes after the answer: its framing is lost.
        let (raw, _) = within(what, c.read_to_end()).await;
        let error = error_answer(what, &raw, "HTTP/1.1 400 Bad Request");
        assert_eq!(error["type"], "bad_request", "{what}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("request body"), "{what}: {message}");
        // The upstream connection, with half a request on it, is closed, not pooled.
        assert_eq!(within(what, up.closed.recv()).await, Some(0), "{what}");
        assert_eq!(up.accepted(), 1, "{what}");
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_close_at_shutdown() {
    let up = echo().await;
    let mut toml = config(&[up.addr], "");
    toml.push_str("[server]\ndrain_timeout = \"5s\"\n");
    let mut proxy = Proxy::start(&toml).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /one HTTP/1.1\r\nhost: x\r\n\r\n").await;
    c.read_until(b"GET /one 0 0").await;
    let task = proxy.shutdown();
    // The idle connection is closed by the proxy, not left to the drain timeout.
    let (_, clean) = within("close", c.read_to_end()).await;
    assert!(clean);
    within("shutdown", task).await.unwrap();
}

#[tokio::test]
async fn a_client_gone_is_seen_after_it_pipelined_a_large_request() {
    // While `/a` is answered the proxy reads 10 KiB of the pipelined `/b` and stops reading past
    // 8 KiB; once `/b` is in, the connection must be watched again, or the client leaving while the
    // upstream thinks about `/b` goes unseen.
    let (got_b, mut b_arrived) = tokio::sync::mpsc::channel::<()>(1);
    let up = Upstream::start(move |req| {
        let got_b = got_b.clone();
        async move {
            if req.uri().path() == "/a" {
                return full(200, "text/plain", "a");
            }
            let _ = req.into_body().collect().await;
            let _ = got_b.send(()).await;
            std::future::pending::<()>().await;
            unreachable!()
        }
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut closed = up.on_close();
    let mut c = RawClient::connect(proxy.addr).await;
    let body = "b".repeat(10 * 1024);
    c.send(&format!(
        "GET /a HTTP/1.1\r\nhost: x\r\n\r\nPOST /b HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    c.read_until(b"\r\n\r\na").await;
    within("the upstream to get /b", b_arrived.recv()).await;
    c.close_rst();
    within("the upstream connection to close", closed.recv())
        .await
        .unwrap();
}

#[tokio::test]
async fn trailers_reach_only_clients_that_accept_them() {
    let up = Upstream::start(|_| async move {
        let mut t = http::HeaderMap::new();
        t.insert("x-usage", "42".parse().unwrap());
        t.insert("content-length", "999".parse().unwrap());
        let frames = vec![
            Ok(hyper::body::Frame::data(Bytes::from_static(b"data: 1\n\n"))),
            Ok(hyper::body::Frame::trailers(t)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(body))
            .unwrap()
    })
    .await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\nprotocol = \"http2\"\n[[routes]]\npool = \"up\"\n",
        up.addr
    );
    let proxy = Proxy::start(&toml).await;
    for (te, want) in [("te: trailers\r\n", true), ("", false)] {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(&format!(
            "GET /t HTTP/1.1\r\nhost: x\r\n{te}connection: close\r\n\r\n"
        ))
        .await;
        let (raw, clean) = c.read_to_end().await;
        assert!(clean);
        let (_, body) = split_head(&raw);
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.starts_with("9\r\ndata: 1\n\n\r\n0\r\n"), "{body:?}");
        assert!(body.ends_with("\r\n\r\n"), "{body:?}");
        assert_eq!(body.contains("x-usage: 42\r\n"), want, "{body:?}");
        assert!(
            !body.contains("999"),
            "framing fields never go out as trailers: {body:?}"
        );
    }
}
