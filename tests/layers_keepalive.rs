//! IdleTimeoutLayer keepalive injection, driven with scripted bodies on a paused clock: exact virtual
//! times of every keepalive, and where it may not go.

mod layers_support;

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use layers_support::{
    call_with, drain, end_at, layer, request, response, run, t, texts, within, Item, ScriptedBody,
    KA, SSE,
};
use streamgate::idle_timeout::IdleTimeoutLayer;
use streamgate::EndReason;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn heartbeats_at_exact_interval_during_silence() {
    let body = ScriptedBody::new()
        .data("data: a\n\n")
        .wait_s(50)
        .data("data: b\n\n");
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: a\n\n"),
            t(15_000, KA),
            t(30_000, KA),
            t(45_000, KA),
            t(50_000, "data: b\n\n"),
        ]
    );
    assert!(matches!(end_at(&items), (50_000, Item::End)));
    assert_eq!(info.heartbeats(), 3);
    assert_eq!(info.heartbeat_bytes(), 3 * KA.len() as u64);
    assert_eq!(info.end_reason(), Some(EndReason::Complete));
}

#[tokio::test(start_paused = true)]
async fn heartbeats_start_before_the_first_upstream_byte() {
    let body = ScriptedBody::new().wait_s(40).data("data: a\n\n");
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [t(15_000, KA), t(30_000, KA), t(40_000, "data: a\n\n")]
    );
}

#[tokio::test(start_paused = true)]
async fn no_heartbeats_while_upstream_talks_more_often_than_the_interval() {
    let mut body = ScriptedBody::new();
    for _ in 0..6 {
        body = body.data("data: x\n\n").wait_ms(14_999);
    }
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(texts(&items).len(), 6);
    assert!(texts(&items).iter().all(|(_, s)| s == "data: x\n\n"));
    assert_eq!(info.heartbeats(), 0);
}

#[tokio::test(start_paused = true)]
async fn upstream_frame_at_the_same_instant_as_the_interval_wins() {
    // Frames exactly one interval apart: data wins the tie, no keepalive is needed.
    let mut body = ScriptedBody::new();
    for _ in 0..4 {
        body = body.data("data: x\n\n").wait_s(15);
    }
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items).iter().map(|(at, _)| *at).collect::<Vec<_>>(),
        [0, 15_000, 30_000, 45_000]
    );
    assert_eq!(info.heartbeats(), 0);
    assert!(matches!(end_at(&items), (60_000, Item::End)));
}

#[tokio::test(start_paused = true)]
async fn no_injection_mid_line_then_at_once_when_a_boundary_is_reached() {
    let body = ScriptedBody::new()
        .data("data: hel")
        .wait_s(40)
        .data("lo\n")
        .wait_s(20)
        .data("\n");
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: hel"),
            t(40_000, "lo\n"),
            t(40_000, KA), // due since 15 s, sent as soon as the line ended
            t(55_000, KA), // then one interval after it
            t(60_000, "\n"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn due_keepalive_waits_through_frames_that_stay_mid_line() {
    let body = ScriptedBody::new()
        .data("data: a")
        .wait_s(20)
        .data("b")
        .wait_s(5)
        .data("c\n\n")
        .wait_s(1);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: a"),
            t(20_000, "b"),
            t(25_000, "c\n\n"),
            t(25_000, KA)
        ]
    );
    assert!(matches!(end_at(&items), (26_000, Item::End)));

    // A due keepalive is not sent after the end: the upstream's end right behind the frame wins.
    let body = ScriptedBody::new().data("data: a").wait_s(20).data("\n\n");
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(texts(&items), [t(0, "data: a"), t(20_000, "\n\n")]);
    assert_eq!(info.heartbeats(), 0);
}

#[tokio::test(start_paused = true)]
async fn no_injection_after_a_bare_cr_until_the_next_byte() {
    // "\r" at the end of a chunk: its LF may follow, so no keepalive until it does.
    let body = ScriptedBody::new()
        .data("data: a\r")
        .wait_s(40)
        .data("\n")
        .wait_s(20)
        .data("\r\n");
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [
            t(0, "data: a\r"),
            t(40_000, "\n"),
            t(40_000, KA),
            t(55_000, KA),
            t(60_000, "\r\n"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn cr_only_stream_gets_no_keepalive_after_its_final_cr() {
    let body = ScriptedBody::new()
        .data("data: a\r\r")
        .wait_s(40)
        .data("data: b\r\r");
    let (items, info) = run(layer(15, 300), SSE, body).await;
    assert_eq!(
        texts(&items),
        [t(0, "data: a\r\r"), t(40_000, "data: b\r\r")]
    );
    assert_eq!(info.heartbeats(), 0);
}

#[tokio::test(start_paused = true)]
async fn ndjson_keepalive_only_when_configured() {
    let script = || {
        ScriptedBody::new()
            .data("{\"a\":1}\n")
            .wait_s(40)
            .data("{\"b\":2}\n")
    };
    let ct = Some("application/x-ndjson");
    let (items, info) = run(layer(15, 300), ct, script()).await;
    assert_eq!(texts(&items).len(), 2);
    assert_eq!(info.heartbeats(), 0);

    let configured = layer(15, 300).ndjson_keepalive(Some(Bytes::from_static(b"{}\n")));
    let (items, info) = run(
        configured,
        Some("application/jsonl; charset=utf-8"),
        script(),
    )
    .await;
    assert_eq!(
        texts(&items),
        [
            t(0, "{\"a\":1}\n"),
            t(15_000, "{}\n"),
            t(30_000, "{}\n"),
            t(40_000, "{\"b\":2}\n"),
        ]
    );
    assert_eq!(info.heartbeats(), 2);
    // The SSE comment never goes into NDJSON, nor the NDJSON line into SSE.
    let configured = layer(15, 300).ndjson_keepalive(Some(Bytes::from_static(b"{}\n")));
    let (items, _) = run(configured, SSE, script()).await;
    assert_eq!(texts(&items)[1], t(15_000, KA));
}

#[tokio::test(start_paused = true)]
async fn no_injection_into_responses_that_are_not_open_streams() {
    let script = || {
        ScriptedBody::new()
            .data("data: a\n\n")
            .wait_s(40)
            .data("data: b\n\n")
    };
    let cases: Vec<(&str, Request<()>, Response<ScriptedBody>)> = vec![
        (
            "text/plain",
            Request::new(()),
            response(Some("text/plain"), script()),
        ),
        (
            "no content-type",
            Request::new(()),
            response(None, script()),
        ),
        ("content-length", Request::new(()), {
            let mut r = response(SSE, script());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, "18".parse().unwrap());
            r
        }),
        ("gzip", Request::new(()), {
            let mut r = response(SSE, script());
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
            r
        }),
        (
            "exact size",
            Request::new(()),
            response(SSE, script().exact_size()),
        ),
        ("204", Request::new(()), {
            let mut r = response(SSE, script());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }),
        (
            "HEAD",
            Request::head("/").body(()).unwrap(),
            response(SSE, script()),
        ),
    ];
    for (name, req, res) in cases {
        let mut req = req;
        let info = streamgate::StreamInfo::get_or_insert(&mut req);
        let start = Instant::now();
        let res = call_with(layer(15, 300), req, Duration::ZERO, res).await;
        assert!(!res.body().injects_keepalives(), "{name}");
        let items = drain(res.into_body(), start).await;
        assert_eq!(
            texts(&items),
            [t(0, "data: a\n\n"), t(40_000, "data: b\n\n")],
            "{name}"
        );
        assert_eq!(info.heartbeats(), 0, "{name}");
    }
    // And a GET of the same event stream does get them.
    let (req, _) = request();
    let res = call_with(layer(15, 300), req, Duration::ZERO, response(SSE, script())).await;
    assert!(res.body().injects_keepalives());
}

#[tokio::test(start_paused = true)]
async fn upstream_bom_is_dropped_after_an_early_keepalive() {
    // Split inside the BOM, after a keepalive went out: the BOM would otherwise start line two.
    let body = ScriptedBody::new()
        .wait_s(20)
        .data(&b"\xEF\xBB"[..])
        .data(&b"\xBFdata: x\n\n"[..]);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(texts(&items), [t(15_000, KA), t(20_000, "data: x\n\n")]);

    // Without an early keepalive the BOM is the first byte of the stream and goes through untouched.
    let body = ScriptedBody::new().data(&b"\xEF\xBB\xBFdata: x\n\n"[..]);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    assert_eq!(items[0].1.data(), Some(&b"\xEF\xBB\xBFdata: x\n\n"[..]));

    // A withheld prefix that turns out not to be a BOM is given back.
    let body = ScriptedBody::new()
        .wait_s(20)
        .data(&b"\xEF"[..])
        .data(&b"\xBB\x80\n"[..]);
    let (items, _) = run(layer(15, 300), SSE, body).await;
    let data: Vec<_> = items.iter().filter_map(|(_, i)| i.data()).collect();
    assert_eq!(data, [KA.as_bytes(), &b"\xEF\xBB\x80\n"[..]]);
}

#[test]
fn keepalive_lines_are_validated_without_panicking() {
    let l = IdleTimeoutLayer::new();
    assert!(l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b"no colon\n"))
        .is_err());
    assert!(l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b": two\n: lines\n"))
        .is_err());
    assert!(l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b": ping\n"))
        .is_ok());
    assert!(l
        .clone()
        .try_ndjson_keepalive(Some(Bytes::from_static(b"{}")))
        .is_err());
    assert!(l
        .clone()
        .try_ndjson_keepalive(Some(Bytes::from_static(b"{}\r\n")))
        .is_ok());
    let err = l
        .clone()
        .try_keepalive_comment(Bytes::from_static(b"x\n"))
        .unwrap_err();
    assert!(err.reason().contains("':'"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn invalid_keepalive_line_keeps_the_previous_one() {
    let layer = layer(15, 300)
        .keepalive_comment(Bytes::from_static(b": ping\n"))
        .keepalive_comment(Bytes::from_static(b"data: oops\n\n"));
    let body = ScriptedBody::new().wait_s(20).data("data: a\n\n");
    let (items, _) = run(layer, SSE, body).await;
    assert_eq!(
        texts(&items),
        [t(15_000, ": ping\n"), t(20_000, "data: a\n\n")]
    );
}

#[tokio::test(start_paused = true)]
async fn injected_frames_are_marked_for_outer_layers() {
    let body = ScriptedBody::new()
        .data("data: a\n\n")
        .wait_s(20)
        .data("data: b\n\n");
    let (req, info) = request();
    let res = call_with(layer(15, 300), req, Duration::ZERO, response(SSE, body)).await;
    let mut body = std::pin::pin!(res.into_body());
    let mut marks = Vec::new();
    while let Some(frame) = within(Duration::from_secs(3600), body.frame()).await {
        let data = frame.unwrap().into_data().unwrap();
        marks.push((
            String::from_utf8(data.to_vec()).unwrap(),
            info.take_injected(),
        ));
    }
    assert_eq!(
        marks,
        [
            ("data: a\n\n".to_owned(), false),
            (KA.to_owned(), true),
            ("data: b\n\n".to_owned(), false),
        ]
    );
}
