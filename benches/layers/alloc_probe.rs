//! The allocation probe: one request of `n` frames through one case of [`cases`](crate::cases), for a
//! heap profiler to count (see `alloc_probe.sh`).
//!
//! The crate forbids `unsafe`, and a counting `#[global_allocator]` needs an `unsafe impl GlobalAlloc`,
//! so the counting is done from outside by valgrind. Everything the probe sets up is independent of
//! `n` (the corpus is always built whole), so the difference between the allocation totals of two runs
//! with different `n`, divided by the difference in frames, is the allocations per frame.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use tower::util::MapResponseLayer;
use tower::{Layer, Service};

use crate::cases::{self, Visitor, CASES};
use crate::harness::{request_runner, FrameBody, Pace, Upstream};
use crate::{corpus, FRAMES};

/// `STREAMGATE_ALLOC_PROBE=<case>:<frames>` runs the probe instead of the benchmarks;
/// `STREAMGATE_ALLOC_PROBE=list` prints the case names.
pub(crate) const ENV: &str = "STREAMGATE_ALLOC_PROBE";

/// A positive control, not a benchmark case: a wrapper that makes exactly one heap allocation per
/// frame, so the counting method must report 1 for it.
pub(crate) const CONTROL: &str = "control_one_alloc_per_frame";

struct Probe {
    case: String,
    frames: Arc<[Bytes]>,
    ran: bool,
}

impl Visitor for Probe {
    fn wants(&self, name: &str) -> bool {
        name == self.case
    }

    fn layer<L, B>(&mut self, name: &str, pace: Pace, layer: L)
    where
        L: Layer<Upstream>,
        L::Service: Service<Request<Empty<Bytes>>, Response = Response<B>>,
        <L::Service as Service<Request<Empty<Bytes>>>>::Error: std::fmt::Debug,
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        if name != self.case {
            return;
        }
        let expected = corpus::total_bytes(&self.frames);
        let got = request_runner(&self.frames, pace, layer)();
        assert!(got >= expected, "{name}: {got} bytes out of {expected} in");
        self.ran = true;
    }
}

/// Run the probe described by `spec` (the value of [`ENV`]).
pub(crate) fn run(spec: &str) {
    if spec == "list" {
        for case in CASES {
            println!("{case}");
        }
        return;
    }
    let (case, n) = spec
        .rsplit_once(':')
        .and_then(|(case, n)| Some((case, n.parse::<usize>().ok()?)))
        .unwrap_or_else(|| panic!("{ENV} must be `<case>:<frames>` or `list`, not `{spec}`"));
    assert!(
        case == CONTROL || CASES.contains(&case),
        "unknown case `{case}`; one of {CONTROL}, {CASES:?}"
    );
    assert!(
        (1..=FRAMES).contains(&n),
        "frames must be in 1..={FRAMES}, not {n}"
    );
    // Always the whole corpus, so its allocations do not depend on `n`.
    let all = corpus::chat_events(FRAMES - 2, "\n", 0);
    // The first clone of a `Bytes` built from a `Vec` may allocate its shared header: do it now, not
    // during the measured request.
    for f in &all {
        drop(f.clone());
    }
    let frames: Arc<[Bytes]> = all[..n].to_vec().into();
    if case == CONTROL {
        let expected = corpus::total_bytes(&frames);
        let one_alloc_per_frame = MapResponseLayer::new(|res: Response<FrameBody>| {
            res.map(|body| {
                body.map_frame(|f| {
                    std::hint::black_box(Box::new(std::hint::black_box(0u64)));
                    f
                })
            })
        });
        let got = request_runner(&frames, Pace::Ready, one_alloc_per_frame)();
        assert_eq!(got, expected);
        println!("{case}: {n} frames drained");
        return;
    }
    let mut probe = Probe {
        case: case.to_owned(),
        frames,
        ran: false,
    };
    cases::visit(&mut probe);
    assert!(probe.ran, "case `{case}` was not visited");
    println!("{case}: {n} frames drained");
}
