//! The mock LLM server over real sockets on 127.0.0.1:0, in real time, every await bounded.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use streamgate::mock::{MockConfig, MockHandle, MockServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(10);

/// Every await of these tests goes through here: a hang is a failure, not a stuck CI job.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

async fn start(cfg: MockConfig) -> MockHandle {
    let server = within(MockServer::bind("127.0.0.1:0".parse().unwrap(), cfg))
        .await
        .unwrap();
    server.spawn()
}

fn client(h2: bool) -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http()
}

fn chat(mock: &MockHandle, body: Value, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("{}/v1/chat/completions", mock.base_url()))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn stream_body(model: &str) -> Value {
    json!({
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "say something"}],
    })
}

async fn send(
    c: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Response<Incoming> {
    within(c.request(req)).await.unwrap()
}

/// Every data frame with its arrival time, and the error that ended the body, if one did.
async fn frames(res: Response<Incoming>) -> (Vec<(Instant, Bytes)>, Option<hyper::Error>) {
    let mut body = res.into_body();
    let mut out = Vec::new();
    while let Some(f) = within(body.frame()).await {
        match f {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    out.push((Instant::now(), d));
                }
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

fn concat(frames: &[(Instant, Bytes)]) -> Vec<u8> {
    frames.iter().flat_map(|(_, b)| b.iter().copied()).collect()
}

/// A WHATWG-style event-stream parser: the `data` of each dispatched event.
fn sse_events(bytes: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(bytes).unwrap();
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push(d);
            }
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            data = Some(match data {
                Some(d) => format!("{d}\n{v}"),
                None => v.to_owned(),
            });
        }
    }
    events
}

/// The generated text and the finish reason of a chat stream's events.
fn chat_content(events: &[String]) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (text, finish)
}

/// Send a raw HTTP/1.1 request and read the response until the server closes the connection.
async fn raw_exchange(mock: &MockHandle, head: &str) -> Vec<u8> {
    let mut s = within(TcpStream::connect(mock.local_addr())).await.unwrap();
    within(s.write_all(head.as_bytes())).await.unwrap();
    let mut out = Vec::new();
    // A reset after the last bytes is a valid way for the server to abort.
    let _ = within(s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn streaming_chat_is_openai_shaped_and_ends_with_usage_and_done() {
    let mock = start(MockConfig::fast()).await;
    let res = send(
        &client(false),
        chat(
            &mock,
            stream_body("my-model"),
            &[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(res.headers()["transfer-encoding"], "chunked");
    let (fr, err) = frames(res).await;
    assert!(err.is_none());
    let events = sse_events(&concat(&fr));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("every event but [DONE] is JSON"))
        .collect();
    assert_eq!(
        chunks.len(),
        8 + 2,
        "8 tokens, the finish chunk, the usage chunk"
    );
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "my-model");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (text, finish) = chat_content(&events);
    assert_eq!(text.split(' ').count(), 8);
    assert_eq!(finish, "stop");
    let usage = &chunks[9]["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(usage["prompt_tokens"], 2);
    assert_eq!(usage["total_tokens"], 10);

    let stats = mock.stats();
    let s = within(stats.wait_for(|s| s.streams_completed == 1, LIMIT))
        .await
        .unwrap();
    assert_eq!(
        (s.streams_cancelled, s.streams_aborted, s.active_streams),
        (0, 0, 0)
    );
    assert_eq!(s.tokens_sent, 8);
    assert_eq!(
        stats.last_request_headers()["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
}

#[tokio::test]
async fn non_streaming_chat_is_one_completion_after_the_generation_time() {
    let cfg = MockConfig::fast()
        .time_to_first_token(Duration::from_millis(30))
        .inter_token(Duration::from_millis(5))
        .tokens(4);
    let mock = start(cfg).await;
    let started = Instant::now();
    let body =
        json!({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]});
    let res = send(&client(false), chat(&mock, body, &[])).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(30 + 3 * 5));
    assert_eq!(res.headers()["content-type"], "application/json");
    let v: Value =
        serde_json::from_slice(&within(res.collect()).await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "m");
    assert_eq!(v["choices"][0]["message"]["content"], "Lorem ipsum dolor");
    assert_eq!(
        v["choices"][0]["finish_reason"], "length",
        "capped by max_tokens"
    );
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(mock.stats().streams_completed(), 1);
}

#[tokio::test]
async fn models_health_and_errors_are_answered_openai_style() {
    let mock = start(MockConfig::fast().model("served-model")).await;
    let c = client(false);
    let get = |path: &str| {
        Request::get(format!("{}{path}", mock.base_url()))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let json_of = |res: Response<Incoming>| async move {
        serde_json::from_slice::<Value>(&within(res.collect()).await.unwrap().to_bytes()).unwrap()
    };

    let res = send(&c, get("/v1/models")).await;
    assert_eq!(json_of(res).await["data"][0]["id"], "served-model");

    assert_eq!(send(&c, get("/healthz")).await.status(), StatusCode::OK);
    mock.set_healthy(false);
    assert_eq!(
        send(&c, get("/healthz")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    let res = send(&c, get("/nope")).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(res).await["error"]["type"], "not_found_error");

    let res = send(&c, get("/v1/chat/completions")).await;
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "POST");

    let bad = Request::post(format!("{}/v1/chat/completions", mock.base_url()))
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let res = send(&c, bad).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let e = json_of(res).await;
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a valid"));

    let res = send(
        &c,
        chat(&mock, stream_body("m"), &[("x-mock-tokens", "lots")]),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(json_of(res).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-mock-tokens"));

    let res = send(
        &c,
        chat(&mock, stream_body("m"), &[("x-mock-status", "429")]),
    )
    .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(json_of(res).await["error"]["type"], "rate_limit_error");

    // Health checks are counted but do not replace the headers of the request under test.
    assert_eq!(mock.stats().requests_total(), 8);
    assert_eq!(mock.stats().last_request_headers()["x-mock-status"], "429");
}

#[tokio::test]
async fn header_overrides_pace_and_shape_the_stream() {
    let mock = start(MockConfig::default()).await;
    let sent = Instant::now();
    let headers = [
        ("x-mock-ttft-ms", "60"),
        ("x-mock-inter-token-ms", "25"),
        ("x-mock-tokens", "4"),
        ("x-mock-format", "ndjson"),
        ("x-mock-line-ending", "crlf"),
        ("x-mock-chunk-bytes", "512"),
        ("x-mock-emit-time", "1"),
    ];
    let res = send(&client(false), chat(&mock, stream_body("m"), &headers)).await;
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    let (fr, _) = frames(res).await;
    let before = streamgate::mock::monotonic_nanos();
    let token_frames = &fr[..4];
    assert!(token_frames[0].0 - sent >= Duration::from_millis(60));
    // Arrival gaps can shrink when one token is delayed on a busy machine; arrival times can only
    // be late, so bound them from below, and check the pacing itself on the emit timestamps.
    let last = token_frames[3].0 - sent;
    assert!(
        last >= Duration::from_millis(60 + 3 * 25),
        "paced: last token after {last:?}"
    );
    let mut emits = Vec::new();
    for (_, f) in token_frames {
        assert_eq!(f.len(), 512, "padded to x-mock-chunk-bytes");
        assert!(f.ends_with(b"}\r\n"));
        let v: Value = serde_json::from_slice(f).unwrap();
        emits.push(v["emit_mono_ns"].as_u64().unwrap());
    }
    assert!(
        emits.windows(2).all(|w| w[1] - w[0] >= 20_000_000),
        "{emits:?}"
    );
    assert!(*emits.last().unwrap() <= before);
    assert!(!String::from_utf8(concat(&fr)).unwrap().contains("[DONE]"));
}

#[tokio::test]
async fn abort_mid_stream_is_a_truncated_chunked_body_on_http1() {
    let mock = start(MockConfig::fast()).await;
    let body = stream_body("m").to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n\
         x-mock-abort-after: 2\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = raw_exchange(&mock, &head).await;
    let text = String::from_utf8(raw).unwrap();
    let (headers, chunked) = text.split_once("\r\n\r\n").unwrap();
    assert!(headers.starts_with("HTTP/1.1 200"));
    assert!(headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked"));
    assert_eq!(
        chunked.matches("chat.completion.chunk").count(),
        2,
        "two tokens got out"
    );
    assert!(
        !chunked.ends_with("0\r\n\r\n"),
        "no terminating chunk: the client can tell"
    );
    assert!(!chunked.contains("[DONE]"));

    // A hyper client sees the same truncation as a body error.
    let res = send(
        &client(false),
        chat(&mock, stream_body("m"), &[("x-mock-abort-after", "2")]),
    )
    .await;
    let (fr, err) = frames(res).await;
    assert!(err.is_some(), "a truncated body is an error, not an end");
    assert_eq!(sse_events(&concat(&fr)).len(), 2);

    // A non-streaming request that aborts gets no response at all.
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let req = chat(&mock, body, &[("x-mock-abort-after", "1")]);
    let err = within(client(false).request(req)).await.unwrap_err();
    assert!(format!("{err:?}").contains("IncompleteMessage"), "{err:?}");

    let s = within(mock.stats().wait_for(|s| s.streams_aborted == 3, LIMIT))
        .await
        .unwrap();
    assert_eq!((s.streams_completed, s.streams_cancelled), (0, 0));
}

#[tokio::test]
async fn abort_on_h2_resets_the_stream_and_keeps_the_connection() {
    let mock = start(MockConfig::fast()).await;
    let c = client(true);
    let res = send(
        &c,
        chat(&mock, stream_body("m"), &[("x-mock-abort-after", "3")]),
    )
    .await;
    assert_eq!(res.version(), http::Version::HTTP_2);
    let (fr, err) = frames(res).await;
    assert!(err.is_some());
    assert_eq!(sse_events(&concat(&fr)).len(), 3);
    // Only the stream was reset: the next request rides the same connection.
    let res = send(&c, chat(&mock, stream_body("m"), &[])).await;
    let (fr, err) = frames(res).await;
    assert!(err.is_none());
    assert_eq!(sse_events(&concat(&fr)).last().unwrap(), "[DONE]");
    assert_eq!(mock.stats().snapshot().connections_total, 1);
}

#[tokio::test]
async fn a_client_hanging_up_is_counted_as_a_cancellation_at_once() {
    let cfg = MockConfig::fast()
        .inter_token(Duration::from_millis(20))
        .tokens(10_000);
    let mock = start(cfg).await;
    let stats = mock.stats();

    // HTTP/1.1 over a raw socket: read the first bytes, then close (FIN).
    let mut s = within(TcpStream::connect(mock.local_addr())).await.unwrap();
    within(s.write_all(b"GET /stream HTTP/1.1\r\nhost: mock\r\n\r\n"))
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = within(s.read(&mut buf)).await.unwrap();
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    let hung_up = Instant::now();
    drop(s);
    let seen = within(stats.wait_cancelled(1, LIMIT)).await.unwrap();
    let lag = seen.saturating_duration_since(hung_up);
    assert!(
        lag < Duration::from_millis(50),
        "upstream saw the disconnect after {lag:?}"
    );
    let closed = within(stats.wait_connections_closed(1, LIMIT))
        .await
        .unwrap();
    assert!(closed.saturating_duration_since(hung_up) < Duration::from_millis(50));

    // HTTP/2: dropping the response body resets the stream; the connection stays open.
    let c = client(true);
    let res = send(&c, chat(&mock, stream_body("m"), &[])).await;
    let mut body = res.into_body();
    within(body.frame()).await.unwrap().unwrap();
    let dropped = Instant::now();
    drop(body);
    let seen = within(stats.wait_cancelled(2, LIMIT)).await.unwrap();
    let lag = seen.saturating_duration_since(dropped);
    assert!(
        lag < Duration::from_millis(50),
        "h2 reset seen after {lag:?}"
    );
    let s = stats.snapshot();
    assert_eq!(
        (s.active_streams, s.open_connections, s.streams_completed),
        (0, 1, 0)
    );
}

#[tokio::test]
async fn split_events_reach_the_client_in_pieces_and_parse_the_same() {
    let mock = start(MockConfig::fast()).await;
    let c = client(false);
    let mut parsed = Vec::new();
    for split in ["0", "1"] {
        let headers = [("x-mock-split", split), ("x-mock-line-ending", "crlf")];
        let res = send(&c, chat(&mock, stream_body("m"), &headers)).await;
        let (fr, err) = frames(res).await;
        assert!(err.is_none());
        let bytes = concat(&fr);
        let events = sse_events(&bytes);
        if split == "1" {
            assert_eq!(
                fr.len(),
                3 * 9,
                "three frames per event, flushed one by one"
            );
            assert!(
                fr.iter().any(|(_, f)| f.ends_with(b"\r")),
                "a cut between CR and LF"
            );
        }
        parsed.push((chat_content(&events), events.len()));
    }
    assert_eq!(parsed[0], parsed[1]);
}

#[tokio::test]
async fn h2c_prior_knowledge_streams_the_same_events() {
    let mock = start(MockConfig::fast()).await;
    let res = send(&client(true), chat(&mock, stream_body("m"), &[])).await;
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), StatusCode::OK);
    let (fr, err) = frames(res).await;
    assert!(err.is_none());
    let events = sse_events(&concat(&fr));
    assert_eq!(events.len(), 8 + 3);
    assert_eq!(chat_content(&events).1, "stop");
}

#[tokio::test]
async fn a_reader_that_stops_reading_stops_the_mock() {
    // 2,000 tokens of 32 KiB: 64 MiB, far more than socket buffers hold.
    let cfg = MockConfig::fast().tokens(2_000).chunk_bytes(32 * 1024);
    let mock = start(cfg).await;
    let stats = mock.stats();
    let mut s = within(TcpStream::connect(mock.local_addr())).await.unwrap();
    within(s.write_all(b"GET /stream HTTP/1.1\r\nhost: mock\r\n\r\n"))
        .await
        .unwrap();
    // Read nothing, and watch production stall once the buffers are full. This loop measures a
    // plateau; it waits for nothing that could be signalled.
    let plateau = within(async {
        let mut last = stats.tokens_sent();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = stats.tokens_sent();
            if now == last && now > 0 {
                return now;
            }
            last = now;
        }
    })
    .await;
    assert!(
        plateau < 2_000 / 4,
        "the mock ran ahead of its reader: {plateau} tokens"
    );
    // Reading drains it to the end.
    let mut sink = Vec::new();
    within(async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            sink.extend_from_slice(&buf[..n]);
            if n == 0 || sink.ends_with(b"0\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert_eq!(stats.tokens_sent(), 2_000);
    within(stats.wait_completed(1, LIMIT)).await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_streams_finish_and_drop_cuts_them() {
    let cfg = MockConfig::fast()
        .inter_token(Duration::from_millis(5))
        .tokens(20);
    let mock = start(cfg).await;
    let stats = mock.stats();
    let addr = mock.local_addr();
    let res = send(&client(false), chat(&mock, stream_body("m"), &[])).await;
    let reader = tokio::spawn(frames(res));
    within(stats.wait_for(|s| s.tokens_sent >= 1, LIMIT))
        .await
        .unwrap();
    within(mock.shutdown()).await;
    let (fr, err) = within(reader).await.unwrap();
    assert!(err.is_none(), "the in-flight stream finished");
    assert_eq!(sse_events(&concat(&fr)).last().unwrap(), "[DONE]");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    assert_eq!(stats.snapshot().open_connections, 0);

    let cfg = MockConfig::fast()
        .inter_token(Duration::from_millis(5))
        .tokens(10_000);
    let mock = start(cfg).await;
    let stats = mock.stats();
    let res = send(&client(false), chat(&mock, stream_body("m"), &[])).await;
    let reader = tokio::spawn(frames(res));
    within(stats.wait_for(|s| s.tokens_sent >= 1, LIMIT))
        .await
        .unwrap();
    within(mock.abort()).await;
    let (_, err) = within(reader).await.unwrap();
    assert!(err.is_some(), "an aborted server truncates the stream");
    let s = stats.snapshot();
    assert_eq!((s.streams_cancelled, s.open_connections), (1, 0));
}
