//! Criterion benchmarks of streamgate's per-chunk hot paths.
//!
//! ```text
//! cargo bench --bench layers                 # everything
//! cargo bench --bench layers -- sse_tracker  # one group
//! cargo bench --bench layers -- --quick      # a quick pass on a shared machine
//! benches/layers/summary.sh                  # per-frame overhead and ratio of each case vs bare
//! benches/layers/alloc_probe.sh              # allocations per frame of each case (valgrind)
//! ```
//!
//! Groups:
//! - `sse_tracker`: [`SseTracker::observe`] throughput (bytes/s) over realistic LLM SSE streams, in
//!   small chunks (one event per chunk, or events cut mid-line and between CR and LF) and in large
//!   chunks (16 KiB and 64 KiB reads).
//! - `body_10k_frames`: draining 10,000 small frames (OpenAI chunk events) through a body, as hyper
//!   does; frames/s, so time per iteration / 10,000 is the per-frame cost. The bare in-memory body is
//!   the baseline every layer is compared with; per-frame overhead = (case - bare) / 10,000. The cases
//!   (listed in `layers/cases.rs`): each layer alone, the trace layer with no subscriber, with the
//!   binary's log subscriber and with OTLP export to an in-bench collector (metrics on and off), and
//!   the proxy's whole stack. `paced_*` cases use an upstream that is `Pending` before every frame
//!   (compare them with `paced_bare`), the usual shape of a token stream.
//!
//! Allocation probe: `STREAMGATE_ALLOC_PROBE=<case>:<frames>` makes this binary run one request of one
//! case instead of benchmarking, for valgrind to count its allocations; `benches/layers/alloc_probe.sh`
//! does it for every case and prints allocations per frame.

#[path = "layers/alloc_probe.rs"]
mod alloc_probe;
#[path = "layers/cases.rs"]
mod cases;
#[path = "layers/corpus.rs"]
mod corpus;
#[path = "layers/harness.rs"]
mod harness;
#[path = "layers/sink.rs"]
mod sink;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use streamgate::sse::SseTracker;
use tower::{Layer, Service};

use harness::{bench_body, FrameBody, Pace, Upstream};

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

/// Runs every case of [`cases::visit`] as a benchmark of the group.
struct BenchVisitor<'a, 'g> {
    group: &'a mut BenchmarkGroup<'g, WallTime>,
    frames: &'a Arc<[Bytes]>,
    visited: Vec<String>,
}

impl cases::Visitor for BenchVisitor<'_, '_> {
    fn wants(&self, _name: &str) -> bool {
        true
    }

    fn layer<L, B>(&mut self, name: &str, pace: Pace, layer: L)
    where
        L: Layer<Upstream>,
        L::Service: Service<Request<Empty<Bytes>>, Response = Response<B>>,
        <L::Service as Service<Request<Empty<Bytes>>>>::Error: std::fmt::Debug,
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        harness::bench_layer(self.group, name, self.frames, pace, layer);
        self.visited.push(name.to_owned());
    }
}

fn body_10k_frames(c: &mut Criterion) {
    // 10,000 frames: 9,998 token events, the finish event and [DONE], ~230 bytes each.
    let frames: Arc<[Bytes]> = corpus::chat_events(FRAMES - 2, "\n", 0).into();
    assert_eq!(frames.len(), FRAMES);
    let mut g = c.benchmark_group("body_10k_frames");

    // Baselines: the in-memory body alone, always ready and `Pending` before every frame.
    bench_body(&mut g, "bare", &frames, Pace::Ready, |inner| inner);
    bench_body(
        &mut g,
        "paced_bare",
        &frames,
        Pace::PendingBeforeEach,
        |inner| inner,
    );
    // Reference points built from http-body-util, not streamgate layers: the cost of one trivial
    // generic wrapper, and of one wrapper that feeds every data frame to an SSE tracker (the
    // per-frame work of the idle-timeout and trace bodies).
    bench_body(
        &mut g,
        "ref_map_frame_identity",
        &frames,
        Pace::Ready,
        |inner| inner.map_frame(|f| f),
    );
    bench_body(
        &mut g,
        "ref_map_frame_sse_observe",
        &frames,
        Pace::Ready,
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

    // The streamgate layers, through their tower `Layer`s: one request, then the whole body.
    let mut visitor = BenchVisitor {
        group: &mut g,
        frames: &frames,
        visited: Vec::new(),
    };
    cases::visit(&mut visitor);
    assert_eq!(visitor.visited, cases::CASES, "cases::CASES is out of date");

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
fn main() {
    // What `criterion_main!(benches)` expands to, plus the allocation probe.
    if let Ok(spec) = std::env::var(alloc_probe::ENV) {
        alloc_probe::run(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
