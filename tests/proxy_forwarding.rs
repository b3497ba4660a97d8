//! The proxy over real sockets: pass-through, headers, protocols, balancing, failover, errors, shutdown.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;

/// A port with nothing listening on it.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

fn headers_json(req: &Request<hyper::body::Incoming>) -> String {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in req.headers() {
        m.entry(k.to_string())
            .or_default()
            .push(v.to_str().unwrap_or("").to_string());
    }
    m.insert("x-seen-path".into(), vec![req.uri().path().to_string()]);
    m.insert(
        "x-seen-version".into(),
        vec![format!("{:?}", req.version())],
    );
    serde_json::to_string(&m).unwrap()
}

#[tokio::test]
async fn sse_stream_passes_byte_for_byte_and_ends_cleanly() {
    // Events split mid-line, between CR and LF, with unicode and every line ending.
    let chunks: Vec<&'static [u8]> = vec![
        b"retry: 1000\r\n",
        b"data: {\"delta\":\"h\xc3",
        b"\xa9llo\"}\r",
        b"\n\r\n",
        b": comment\n\nid: 7\revent: tok\rdata: a\r\r",
        b"data: [DONE]\n\n",
    ];
    let expected: Vec<u8> = chunks.concat();
    let script = chunks.clone();
    let up = Upstream::start(move |_req| {
        let script = script.clone();
        async move {
            let (tx, resp) = streamed("text/event-stream");
            tokio::spawn(async move {
                for c in script {
                    if tx.send(Ok(Bytes::from_static(c))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            resp
        }
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET /v1/stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let (raw, clean_eof) = c.read_to_end().await;
    assert!(clean_eof);
    let (head, body) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let (payload, terminated) = dechunk(&body);
    assert!(
        terminated,
        "a complete stream ends with the terminating chunk"
    );
    assert_eq!(payload, expected, "payload must be relayed byte for byte");
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_added() {
    let up = Upstream::start(|req| async move {
        let mut r = full(200, "application/json", headers_json(&req));
        r.headers_mut()
            .insert("connection", "x-up-private".parse().unwrap());
        r.headers_mut().insert("x-up-private", "1".parse().unwrap());
        r.headers_mut()
            .insert("keep-alive", "timeout=5".parse().unwrap());
        r.headers_mut().insert("x-up-public", "1".parse().unwrap());
        r
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(
        "GET /h?q=1 HTTP/1.1\r\nhost: client.example:8080\r\nconnection: x-private, keep-alive\r\nx-private: s\r\n\
         keep-alive: 300\r\nte: trailers\r\nupgrade: websocket\r\nproxy-authorization: Basic eA==\r\n\
         x-forwarded-for: 10.1.1.1\r\nx-keep: yes\r\n\r\n",
    )
    .await;
    let raw = c.read_until(b"}").await;
    let (head, body) = split_head(&raw);
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("x-up-private"), "{head}");
    assert!(!lower.contains("keep-alive: timeout"), "{head}");
    assert!(lower.contains("x-up-public: 1"), "{head}");
    let body = if lower.contains("transfer-encoding: chunked") {
        dechunk(&body).0
    } else {
        body
    };
    let seen: HashMap<String, Vec<String>> = serde_json::from_slice(&body).unwrap();
    for gone in [
        "x-private",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(!seen.contains_key(gone), "{gone} leaked upstream: {seen:?}");
    }
    assert_eq!(seen["x-keep"], ["yes"]);
    assert_eq!(seen["x-forwarded-for"], ["10.1.1.1, 127.0.0.1"]);
    assert_eq!(seen["x-forwarded-proto"], ["http"]);
    assert_eq!(seen["x-forwarded-host"], ["client.example:8080"]);
    assert_eq!(seen["via"], ["1.1 streamgate"]);
    assert_eq!(
        seen["host"],
        [up.addr.to_string()],
        "default Host is the upstream's"
    );
    assert_eq!(seen["x-seen-path"], ["/h"]);
}

#[tokio::test]
async fn absolute_form_targets_never_reach_other_hosts() {
    let up =
        Upstream::start(|req| async move { full(200, "application/json", headers_json(&req)) })
            .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("GET http://evil.invalid:1/steal HTTP/1.1\r\nhost: evil.invalid:1\r\nconnection: close\r\n\r\n").await;
    let (raw, _) = c.read_to_end().await;
    let (head, _) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        up.total_connections(),
        1,
        "the configured upstream got the request"
    );
}

#[tokio::test]
async fn connect_is_rejected_with_405() {
    let up = Upstream::start(|_| async { full(200, "text/plain", "no") }).await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.send("CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
        .await;
    let raw = c.read_until(b"}}").await;
    let (head, _) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(String::from_utf8_lossy(&raw).contains("\"type\":\"method_not_allowed\""));
    assert_eq!(up.total_connections(), 0);
}

#[tokio::test]
async fn request_heads_over_8_kib_get_431_and_never_reach_the_upstream() {
    let up = Upstream::start(|_| async { full(200, "text/plain", "ok") }).await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    // 7 KiB of headers fit (the read buffer is capped at 8 KiB per connection, as nginx's
    // large_client_header_buffers default) ...
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(&format!(
        "GET /fits HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(7 * 1024)
    ))
    .await;
    let (raw, _) = c.read_to_end().await;
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(up.total_connections(), 1);
    // ... 9 KiB do not: 431, and the upstream never hears of it.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(&format!(
        "GET /too-big HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    ))
    .await;
    let (raw, _) = c.read_to_end().await;
    let (head, _) = split_head(&raw);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert_eq!(up.total_connections(), 1);
}

#[tokio::test]
async fn h2c_on_both_sides() {
    let up =
        Upstream::start(|req| async move { full(200, "application/json", headers_json(&req)) })
            .await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\nprotocol = \"http2\"\n[[routes]]\npool = \"up\"\n",
        up.addr
    );
    let proxy = Proxy::start(&toml).await;
    let resp = within(
        "h2c request",
        client(true).request(
            Request::get(format!("http://{}/x", proxy.addr))
                .header("te", "trailers")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen: HashMap<String, Vec<String>> =
        serde_json::from_str(&body_string(resp).await).unwrap();
    assert_eq!(seen["x-seen-version"], ["HTTP/2.0"]);
    assert_eq!(seen["via"], ["2 streamgate"]);
    assert_eq!(
        seen["te"],
        ["trailers"],
        "TE: trailers is kept for HTTP/2 upstreams"
    );
}

async fn id_upstream(id: &'static str, hits: Arc<AtomicUsize>) -> Upstream {
    Upstream::start(move |_| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            full(200, "text/plain", id)
        }
    })
    .await
}

async fn get_text(addr: SocketAddr, path: &str) -> (u16, http::HeaderMap, String) {
    let resp = within(
        "request",
        client(false).request(
            Request::get(format!("http://{addr}{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, body_string(resp).await)
}

#[tokio::test]
async fn round_robin_spreads_requests() {
    let (ha, hb) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = id_upstream("a", ha.clone()).await;
    let b = id_upstream("b", hb.clone()).await;
    let proxy = Proxy::start(&config(&[a.addr, b.addr], "")).await;
    for _ in 0..10 {
        let (s, _, _) = get_text(proxy.addr, "/").await;
        assert_eq!(s, 200);
    }
    assert_eq!(
        (ha.load(Ordering::SeqCst), hb.load(Ordering::SeqCst)),
        (5, 5)
    );
}

#[tokio::test]
async fn least_streams_avoids_the_busy_endpoint() {
    // Endpoint a holds a stream open; new requests must all go to b.
    let (hold_tx, hold_rx) =
        tokio::sync::mpsc::channel::<tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>>(1);
    let hold_rx = Arc::new(tokio::sync::Mutex::new(Some(hold_rx)));
    let hits_a = Arc::new(AtomicUsize::new(0));
    let ha = hits_a.clone();
    let a = Upstream::start(move |_| {
        let hold_tx = hold_tx.clone();
        let ha = ha.clone();
        async move {
            ha.fetch_add(1, Ordering::SeqCst);
            let (tx, resp) = streamed("text/event-stream");
            let _ = hold_tx.send(tx).await;
            resp
        }
    })
    .await;
    let hb = Arc::new(AtomicUsize::new(0));
    let b = id_upstream("b", hb.clone()).await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\", \"http://{}\"]\nbalance = \"least_streams\"\n[[routes]]\npool = \"up\"\n",
        a.addr, b.addr
    );
    let proxy = Proxy::start(&toml).await;
    // Open streams until one lands on a (the first pick may go either way).
    let mut held = Vec::new();
    let mut c = RawClient::connect(proxy.addr).await;
    c.get("/stream").await;
    let _ = c.read_until(b"\r\n\r\n").await;
    held.push(c);
    if hits_a.load(Ordering::SeqCst) == 0 {
        let mut c = RawClient::connect(proxy.addr).await;
        c.get("/stream").await;
        let _ = c.read_until(b"\r\n\r\n").await;
        held.push(c);
    }
    let senders = within("held stream", async {
        hold_rx.lock().await.as_mut().unwrap().recv().await
    })
    .await;
    assert!(senders.is_some());
    assert_eq!(hits_a.load(Ordering::SeqCst), 1);
    let before_b = hb.load(Ordering::SeqCst);
    for _ in 0..6 {
        let (s, _, body) = get_text(proxy.addr, "/").await;
        assert_eq!((s, body.as_str()), (200, "b"));
    }
    assert_eq!(hb.load(Ordering::SeqCst) - before_b, 6);
    assert_eq!(hits_a.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refused_endpoint_fails_over_even_for_post() {
    let dead = dead_port().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let good = id_upstream("good", hits.clone()).await;
    let proxy = Proxy::start(&config(&[dead, good.addr], "")).await;
    for _ in 0..4 {
        let resp = within(
            "post",
            client(false).request(
                Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
                    .unwrap(),
            ),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body_string(resp).await, "good");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

/// An upstream that accepts, reads the request, and closes without answering.
async fn slammer() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                drop(s);
            });
        }
    });
    (addr, n)
}

#[tokio::test]
async fn reset_before_headers_retries_only_idempotent_requests() {
    let (bad, bad_hits) = slammer().await;
    let good_hits = Arc::new(AtomicUsize::new(0));
    let good = id_upstream("good", good_hits.clone()).await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{bad}\", \"http://{}\"]\n[[routes]]\npool = \"up\"\n",
        good.addr
    );
    let proxy = Proxy::start(&toml).await;
    // Round robin starts at the bad endpoint: a GET is retried on the good one.
    let (s, _, body) = get_text(proxy.addr, "/").await;
    assert_eq!((s, body.as_str()), (200, "good"));
    assert_eq!(bad_hits.load(Ordering::SeqCst), 1);
    // Next pick is the good one; the one after is the bad one again, now with a POST: not retried.
    let (s, _, _) = get_text(proxy.addr, "/").await;
    assert_eq!(s, 200);
    let resp = within(
        "post",
        client(false).request(
            Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    let body = body_string(resp).await;
    assert!(body.contains("\"type\":\"upstream_error\""), "{body}");
    assert_eq!(
        good_hits.load(Ordering::SeqCst),
        2,
        "the POST was not replayed"
    );
}

/// A listening socket that takes no connection: its accept queue is full, so the kernel drops
/// further SYNs and a connect to it hangs. Returns the address and what keeps it full.
async fn blackhole() -> (
    SocketAddr,
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => panic!("connect to the filling listener: {e}"),
            Err(_) => return (addr, l, held),
        }
    }
    panic!("the accept queue never filled");
}

#[tokio::test]
async fn connect_timeout_bounds_each_attempt_on_both_clients() {
    // Connect timeouts are timers made on the timer thread (the serving runtime has no time
    // driver): hyper-util's own, made in its connect future, would panic there. Both upstream
    // clients, the lean HTTP/1.1 one and hyper's (HTTP/2 here), give up on an address that never
    // answers after `connect_timeout`, and the client gets a 502 naming it.
    let (hole, _l, _held) = blackhole().await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\
         [pools.lean]\nendpoints = [\"http://{hole}\"]\nconnect_timeout = \"300ms\"\n\
         [pools.h2]\nendpoints = [\"http://{hole}\"]\nconnect_timeout = \"300ms\"\nprotocol = \"http2\"\n\
         [[routes]]\npath_prefix = \"/h2/\"\npool = \"h2\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"lean\"\n"
    );
    let proxy = Proxy::start(&toml).await;
    for path in ["/lean", "/h2/x"] {
        let asked = std::time::Instant::now();
        let (s, _, body) = get_text(proxy.addr, path).await;
        let took = asked.elapsed();
        assert_eq!(s, 502, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "upstream_unreachable", "{path}: {body}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("{hole}: no connection within 300ms")),
            "{path}: {message}"
        );
        assert!(
            took >= Duration::from_millis(300),
            "{path}: gave up after {took:?}"
        );
        assert!(
            took < Duration::from_secs(3),
            "{path}: gave up after {took:?}"
        );
    }
}

#[tokio::test]
async fn a_name_is_tried_address_by_address() {
    // `localhost` resolves to 127.0.0.1, and on most machines to ::1 too. The upstream listens on
    // 127.0.0.1 only: wherever ::1 comes in the order, the request gets through on both clients.
    let up = Upstream::start(|_| async { full(200, "text/plain", "hello") }).await;
    let port = up.addr.port();
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\
         [pools.lean]\nendpoints = [\"http://localhost:{port}\"]\n\
         [pools.h2]\nendpoints = [\"http://localhost:{port}\"]\nprotocol = \"http2\"\n\
         [[routes]]\npath_prefix = \"/h2/\"\npool = \"h2\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"lean\"\n"
    );
    let proxy = Proxy::start(&toml).await;
    for path in ["/lean", "/h2/x"] {
        let (s, _, body) = get_text(proxy.addr, path).await;
        assert_eq!((s, body.as_str()), (200, "hello"), "{path}");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_then_ejected_503_with_retry_after() {
    let dead = dead_port().await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{dead}\"]\nmax_fails = 2\nejection_time = \"30s\"\n[[routes]]\npool = \"up\"\n"
    );
    let proxy = Proxy::start(&toml).await;
    for _ in 0..2 {
        let (s, h, body) = get_text(proxy.addr, "/").await;
        assert_eq!(s, 502);
        assert_eq!(h["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "upstream_unreachable");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&dead.to_string()));
    }
    let (s, h, body) = get_text(proxy.addr, "/").await;
    assert_eq!(s, 503, "{body}");
    let ra: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((29..=30).contains(&ra), "{ra}");
    assert!(body.contains("no_healthy_upstream"));
}

#[tokio::test]
async fn unmatched_route_is_404() {
    let up = Upstream::start(|_| async { full(200, "text/plain", "ok") }).await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"http://{}\"]\n[[routes]]\npath_prefix = \"/v1/\"\npool = \"up\"\n[[routes]]\npath_prefix = \"/\"\nhost = \"only.example\"\npool = \"up\"\n",
        up.addr
    );
    let proxy = Proxy::start(&toml).await;
    let (s, _, body) = get_text(proxy.addr, "/admin").await;
    assert_eq!(s, 404);
    assert!(body.contains("no_route"));
    let (s, _, _) = get_text(proxy.addr, "/v1/models").await;
    assert_eq!(s, 200);
    // Host routes match case-insensitively, without the port, and with a fully qualified name's
    // trailing dot.
    for host in ["ONLY.example:80", "only.example.:80"] {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(&format!(
            "GET /admin HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let (raw, _) = c.read_to_end().await;
        assert!(
            raw.starts_with(b"HTTP/1.1 200"),
            "{host}: {}",
            String::from_utf8_lossy(&raw)
        );
    }
}

#[tokio::test]
async fn over_capacity_is_503() {
    let up = one_event_then_silent(b"data: 1\n\n").await;
    let mut toml = config(&[up.addr], "");
    toml.push_str("[server]\nmax_streams = 1\n");
    let proxy = Proxy::start(&toml).await;
    let mut held = RawClient::connect(proxy.addr).await;
    held.get("/s").await;
    held.read_until(b"data: 1").await;
    let (s, h, body) = get_text(proxy.addr, "/s").await;
    assert_eq!(s, 503);
    assert_eq!(h["retry-after"], "1");
    assert!(body.contains("over_capacity"));
    // Capacity comes back when the stream ends.
    held.close_rst();
    let mut ok = false;
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send("GET /s HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let head = c.read_until(b"\r\n\r\n").await;
        if head.starts_with(b"HTTP/1.1 200") {
            ok = true;
            break;
        }
        // The permit is released when the proxy (on a thread of its own) notices the reset; poll
        // until it has.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(ok, "capacity was never released");
}

#[tokio::test]
async fn graceful_shutdown_lets_open_streams_finish() {
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let up = Upstream::start(move |_| {
        let mut go = go_rx.clone();
        async move {
            let (tx, resp) = streamed("text/event-stream");
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"data: first\n\n"))).await;
                let _ = go.wait_for(|g| *g).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: last\n\n"))).await;
            });
            resp
        }
    })
    .await;
    let mut toml = config(&[up.addr], "");
    toml.push_str("[server]\ndrain_timeout = \"10s\"\n");
    let mut proxy = Proxy::start(&toml).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.get("/s").await;
    c.read_until(b"data: first").await;
    let done = proxy.shutdown();
    // New connections are refused once the listener is closed.
    let mut refused = false;
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(proxy.addr).await.is_err() {
            refused = true;
            break;
        }
        // The proxy closes its listener on a thread of its own: poll until it has.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(refused, "listener still accepting after shutdown");
    assert!(!done.is_finished());
    go_tx.send(true).unwrap();
    let (raw, _) = c.read_to_end().await;
    let (_, body) = split_head(&raw);
    let (payload, terminated) = dechunk(&body);
    assert!(terminated);
    assert_eq!(payload, b"data: first\n\ndata: last\n\n");
    within("proxy exit", done).await.unwrap();
}

#[tokio::test]
async fn drain_timeout_ends_streams_without_a_clean_end() {
    let up = one_event_then_silent(b"data: first\n\n").await;
    let mut toml = config(&[up.addr], "");
    toml.push_str("[server]\ndrain_timeout = \"200ms\"\n");
    let mut proxy = Proxy::start(&toml).await;
    let mut c = RawClient::connect(proxy.addr).await;
    c.get("/s").await;
    c.read_until(b"data: first").await;
    let mut closed = up.on_close();
    let done = proxy.shutdown();
    let (raw, _) = c.read_to_end().await;
    let (_, body) = split_head(&raw);
    let (_, terminated) = dechunk(&body);
    assert!(
        !terminated,
        "a stream cut by shutdown must not look complete"
    );
    within("upstream closed", closed.recv()).await.unwrap();
    within("proxy exit", done).await.unwrap();
}

#[tokio::test]
async fn request_bodies_stream_upstream() {
    // 8 MiB upload, counted by the upstream as it arrives.
    let up = Upstream::start(|req| async move {
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.unwrap().into_data() {
                n += d.len();
            }
        }
        full(200, "text/plain", n.to_string())
    })
    .await;
    let proxy = Proxy::start(&config(&[up.addr], "")).await;
    let (tx, body) = {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(4);
        (
            tx,
            http_body_util::StreamBody::new(Box::pin(tokio_stream_shim(rx))),
        )
    };
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = Request::post(format!("http://{}/upload", proxy.addr))
        .body(body)
        .unwrap();
    let fut = tokio::spawn(c.request(req));
    for _ in 0..128 {
        tx.send(Ok(hyper::body::Frame::data(Bytes::from(vec![
            7u8;
            64 * 1024
        ]))))
        .await
        .unwrap();
    }
    drop(tx);
    let resp = within("upload", fut).await.unwrap().unwrap();
    assert_eq!(body_string(resp).await, (8 * 1024 * 1024).to_string());
}

fn tokio_stream_shim<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

#[tokio::test]
async fn active_health_check_takes_failing_endpoints_out_and_back() {
    use streamgate::mock::{MockConfig, MockHandle, MockServer};
    let a = MockServer::bind("127.0.0.1:0".parse().unwrap(), MockConfig::fast())
        .await
        .unwrap()
        .spawn();
    let b = MockServer::bind("127.0.0.1:0".parse().unwrap(), MockConfig::fast())
        .await
        .unwrap()
        .spawn();
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"{}\", \"{}\"]\n\
         health_check = {{ path = \"/healthz\", interval = \"20ms\", timeout = \"500ms\", unhealthy_threshold = 2 }}\n\
         [[routes]]\npool = \"up\"\n",
        a.base_url(),
        b.base_url()
    );
    let proxy = Proxy::start(&toml).await;
    // Six streamed completions; returns how many `a` served (health probes are not streams).
    async fn round(proxy: SocketAddr, a: &MockHandle) -> u64 {
        let before = a.stats().snapshot().streams_started;
        for _ in 0..6 {
            let resp = within(
                "completion",
                client(false).request(
                    Request::post(format!("http://{proxy}/v1/chat/completions"))
                        .body(Full::new(Bytes::from_static(
                            b"{\"stream\":true,\"messages\":[]}",
                        )))
                        .unwrap(),
                ),
            )
            .await
            .unwrap();
            assert_eq!(
                resp.status(),
                200,
                "a failing endpoint must not cause errors while another is healthy"
            );
            body_string(resp).await;
        }
        a.stats().snapshot().streams_started - before
    }
    assert!(
        round(proxy.addr, &a).await > 0,
        "both endpoints serve at first"
    );
    a.set_healthy(false);
    // Probes run every 20 ms; after two failures `a` leaves the rotation. Poll with requests.
    let deadline = std::time::Instant::now() + T;
    while round(proxy.addr, &a).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "unhealthy endpoint never left the rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(round(proxy.addr, &a).await, 0, "and stays out");
    a.set_healthy(true);
    while round(proxy.addr, &a).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "recovered endpoint never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
}

#[tokio::test]
async fn host_header_policies_and_several_listeners() {
    let up =
        Upstream::start(|req| async move { full(200, "application/json", headers_json(&req)) })
            .await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n\
         [pools.up]\nendpoints = [\"http://{}\"]\n\
         [[routes]]\npath_prefix = \"/keep/\"\npool = \"up\"\nhost_header = \"preserve\"\n\
         [[routes]]\npath_prefix = \"/fixed/\"\npool = \"up\"\nhost_header = \"llm.internal:8000\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"up\"\n",
        up.addr
    );
    let cfg = streamgate::proxy::Config::from_toml(&toml).unwrap();
    let server = streamgate::proxy::Server::bind(cfg).await.unwrap();
    let addrs = server.local_addrs();
    assert_eq!(addrs.len(), 2);
    assert_ne!(addrs[0], addrs[1]);
    tokio::spawn(server.run(std::future::pending::<()>()));
    let host_seen = |path: &'static str, listener: SocketAddr| async move {
        let mut c = RawClient::connect(listener).await;
        c.send(&format!(
            "GET {path} HTTP/1.1\r\nhost: client.example\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let (raw, _) = c.read_to_end().await;
        let (head, body) = split_head(&raw);
        let body = if head.to_ascii_lowercase().contains("chunked") {
            dechunk(&body).0
        } else {
            body
        };
        let seen: HashMap<String, Vec<String>> = serde_json::from_slice(&body).unwrap();
        seen["host"][0].clone()
    };
    assert_eq!(host_seen("/keep/x", addrs[0]).await, "client.example");
    assert_eq!(host_seen("/fixed/x", addrs[1]).await, "llm.internal:8000");
    assert_eq!(host_seen("/other", addrs[1]).await, up.addr.to_string());
}
