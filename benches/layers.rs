//! Criterion benchmarks of streamgate's per-chunk hot paths.
//!
//! ```text
//! cargo bench --bench layers                 # everything
//! cargo bench --bench layers -- sse_tracker  # one group
//! cargo bench --bench layers -- --quick      # a quick pass on a shared machine
//! ```
//!
//! Groups:
//! - `sse_tracker`: [`SseTracker::observe`] throughput (bytes/s) over realistic LLM SSE streams, in
//!   small chunks (one event per chunk, or events cut mid-line and between CR and LF) and in large
//!   chunks (16 KiB and 64 KiB reads).
//! - `body_10k_frames`: draining 10,000 small frames (OpenAI chunk events) through a body, as hyper
//!   does; frames/s, so time per iteration / 10,000 is the per-frame cost. The bare in-memory body is
//!   the baseline every layer is compared with.

#[path = "layers/corpus.rs"]
mod corpus;
#[path = "layers/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::BodyExt;
use streamgate::sse::SseTracker;

use harness::{bench_body, FrameBody};

/// Frames per body benchmark.
const FRAMES: usize = 10_000;

fn sse_tracker(c: &mut Criterion) {
    let tokens = 2_000;
    let lf = corpus::chat_events(tokens, "\n", 0);
    let crlf = corpus::chat_events(tokens, "\r\n", 0);
    let padded = corpus::chat_events(tokens / 10, "\n", 4096);
    let inputs: [(&str, Vec<Bytes>); 6] = [
        ("event_per_chunk_lf", lf.clone()),
        ("event_per_chunk_crlf", crlf.clone()),
        (
            "split_mid_line_and_cr_lf_crlf",
            corpus::split_three_ways(&crlf),
        ),
        ("large_16k_chunks_lf", corpus::rechunk(&lf, 16 * 1024)),
        ("large_64k_chunks_lf", corpus::rechunk(&lf, 64 * 1024)),
        ("padded_4k_events_lf", padded),
    ];
    let mut g = c.benchmark_group("sse_tracker");
    for (name, chunks) in &inputs {
        // Every corpus is the whole stream: the token events, the finish event and [DONE].
        let mut check = SseTracker::new();
        for ch in chunks {
            check.observe(ch);
        }
        let events = if *name == "padded_4k_events_lf" {
            tokens / 10
        } else {
            tokens
        } + 2;
        assert_eq!(check.events(), events as u64, "{name}");
        assert!(check.between_events(), "{name}");

        g.throughput(Throughput::Bytes(corpus::total_bytes(chunks)));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut t = SseTracker::new();
                for ch in chunks {
                    t.observe(std::hint::black_box(ch));
                }
                std::hint::black_box(t.events())
            })
        });
    }
    g.finish();
}

fn body_10k_frames(c: &mut Criterion) {
    // 10,000 frames: 9,998 token events, the finish event and [DONE], ~230 bytes each.
    let frames: Arc<[Bytes]> = corpus::chat_events(FRAMES - 2, "\n", 0).into();
    assert_eq!(frames.len(), FRAMES);
    let mut g = c.benchmark_group("body_10k_frames");

    // Baseline: the in-memory body alone.
    bench_body(&mut g, "bare", &frames, |inner| inner);
    // Reference points built from http-body-util, not streamgate layers: the cost of one trivial
    // generic wrapper, and of one wrapper that feeds every data frame to an SSE tracker (the
    // per-frame work of the idle-timeout and trace bodies).
    bench_body(&mut g, "ref_map_frame_identity", &frames, |inner| {
        inner.map_frame(|f| f)
    });
    bench_body(
        &mut g,
        "ref_map_frame_sse_observe",
        &frames,
        |inner: FrameBody| {
            let mut t = SseTracker::new();
            inner.map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    t.observe(d);
                }
                f
            })
        },
    );

    // ---- streamgate layers: one line each, once they are merged into this branch. ----
    // Use `harness::bench_layer` (a whole request through the tower Layer, then the body) so no body
    // constructor needs to be public; adjust constructor names if they differ. Exactly:
    //
    // harness::bench_layer(&mut g, "idle_timeout", &frames, streamgate::idle_timeout::IdleTimeoutLayer::new(Duration::from_secs(15)));
    // harness::bench_layer(&mut g, "flush", &frames, streamgate::flush::FlushLayer::new());
    // harness::bench_layer(&mut g, "cancel", &frames, streamgate::cancel::CancelOnDisconnectLayer::new());
    // harness::bench_layer(&mut g, "trace", &frames, streamgate::trace::StreamTraceLayer::new());
    // harness::bench_layer(&mut g, "all_four", &frames, tower::ServiceBuilder::new()
    //     .layer(streamgate::trace::StreamTraceLayer::new())
    //     .layer(streamgate::cancel::CancelOnDisconnectLayer::new())
    //     .layer(streamgate::flush::FlushLayer::new())
    //     .layer(streamgate::idle_timeout::IdleTimeoutLayer::new(Duration::from_secs(15))));
    //
    // The layer's body must have `Data = Bytes` and a `Debug` error (BoxError is), and the service
    // must accept `Request<http_body_util::Empty<Bytes>>`. Until then, the request path of the harness
    // is exercised with an identity layer so it keeps compiling and working:
    harness::bench_layer(
        &mut g,
        "ref_identity_layer",
        &frames,
        tower::layer::util::Identity::new(),
    );

    g.finish();
}

criterion_group! {
    name = benches;
    // Modest defaults for a shared 2-core machine; command-line flags override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = sse_tracker, body_10k_frames
}
criterion_main!(benches);
