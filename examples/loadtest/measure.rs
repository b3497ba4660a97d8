//! The five measurements. Each runs against one target and returns plain numbers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

use crate::client::{within, Conn, Error};
use crate::procs::{self, Target};
use crate::upstream::{Mode, Script, Upstream};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A script with a fresh id: `n` events `gap` apart after `ttfb`, each padded with `pad` bytes.
fn script(mode: Mode, n: u64, gap: Duration, ttfb: Duration, pad: usize) -> Script {
    Script {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        mode,
        n,
        gap_us: gap.as_micros() as u64,
        ttfb_us: ttfb.as_micros() as u64,
        pad,
    }
}

/// Runs `stream` `streams` times at once, their starts spread evenly over one `gap`.
fn staggered<T, F, Fut>(streams: u64, gap: Duration, stream: F) -> Vec<JoinHandle<Result<T, Error>>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    (0..streams)
        .map(|i| {
            let stagger = gap.mul_f64(i as f64 / streams as f64);
            let run = stream();
            tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                run.await
            })
        })
        .collect()
}

const T: Duration = Duration::from_secs(10);

/// Percentiles of a latency distribution, microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lat {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: u64,
}

impl Lat {
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.50) as f64 / 1000.0,
            p99: h.value_at_quantile(0.99) as f64 / 1000.0,
            max: h.max() as f64 / 1000.0,
            n: h.len(),
        }
    }
}

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap()
}

/// Measurement 1, time to first byte: request written -> first event read, one keep-alive connection.
pub async fn ttfb(
    addr: SocketAddr,
    origin: Instant,
    n: usize,
    h: &mut Histogram<u64>,
) -> Result<(), Error> {
    let mut c = Conn::connect(addr, origin).await?;
    for i in 0..n + n / 10 {
        let s = script(Mode::Stream, 1, Duration::ZERO, Duration::ZERO, 64);
        let (sent, first, _) = within(T, c.get(&s.path())).await?;
        if c.closes() {
            c = Conn::connect(addr, origin).await?;
        }
        // The first tenth warms up connections and caches.
        if i >= n / 10 {
            h.record(first.saturating_sub(sent).max(1)).unwrap();
        }
    }
    Ok(())
}

/// Measurement 2, per-event delay (emit -> read) with events `gap` apart on `streams` concurrent streams.
pub struct EventDelay {
    pub lat: Lat,
    /// Events that arrived in the same read as the previous event of their stream.
    pub coalesced: u64,
}

/// Records each event's delay into `h`; returns how many events arrived coalesced.
pub async fn event_delay(
    addr: SocketAddr,
    origin: Instant,
    streams: u64,
    events: u64,
    gap: Duration,
    h: &mut Histogram<u64>,
) -> Result<u64, Error> {
    let tasks = staggered(streams, gap, || async move {
        let mut c = Conn::connect(addr, origin).await?;
        let s = script(Mode::Stream, events, gap, Duration::ZERO, 64);
        c.send(&s.path()).await?;
        within(T, c.head()).await?;
        let mut samples = Vec::with_capacity(events as usize);
        let mut coalesced = 0;
        let mut ev = Vec::new();
        loop {
            ev.clear();
            let b = within(T, c.read_batch(&mut ev)).await?;
            // An event read together with the one before it, although it was emitted at least
            // half a gap later: held back and merged on the way. (Events the upstream itself
            // wrote late, back to back, are not spaced and do not count.)
            let half_gap = gap.as_nanos() as u64 / 2;
            coalesced += ev
                .windows(2)
                .filter(|w| w[1].saturating_sub(w[0]) >= half_gap)
                .count() as u64;
            samples.extend(ev.iter().map(|&emit| b.at.saturating_sub(emit).max(1)));
            if b.done {
                break;
            }
        }
        if samples.len() as u64 != events {
            return Err(format!("{} events of {events}", samples.len()));
        }
        Ok::<_, Error>((samples, coalesced))
    });
    let mut coalesced = 0;
    for t in tasks {
        let (samples, c) = t.await.map_err(|e| e.to_string())??;
        for s in samples {
            h.record(s).unwrap();
        }
        coalesced += c;
    }
    Ok(coalesced)
}

/// Measurement 4, CPU time of the target per forwarded event: `streams` streams of `events` events
/// each, `gap` apart (zero: as fast as the upstream writes).
#[derive(Clone)]
pub struct Cpu {
    pub ns_per_event: f64,
    /// Write system calls per event.
    pub writes_per_event: f64,
    /// Times the target was scheduled onto a CPU, per event.
    pub runs_per_event: f64,
    /// Share of the wall time the target was on a CPU.
    pub busy: f64,
    /// Share of the wall time the harness itself was on a CPU. Near 1 (back-to-back), the harness
    /// sets the pace, and the target's CPU per event moves with how many events each of its reads
    /// happens to find.
    pub harness_busy: f64,
}

pub async fn cpu(
    target: &Target,
    origin: Instant,
    streams: u64,
    events: u64,
    gap: Duration,
) -> Result<Cpu, Error> {
    let addr = target.addr;
    let before = target.cpu_ns();
    let own_before = procs::own_cpu_ns();
    let started = Instant::now();
    let w0 = target.writes();
    let r0 = target.runs();
    let tasks = staggered(streams, gap, || async move {
        let mut c = Conn::connect(addr, origin).await?;
        let s = script(
            if gap.is_zero() {
                Mode::Blast
            } else {
                Mode::Stream
            },
            events,
            gap,
            Duration::ZERO,
            32,
        );
        let (_, _, got) = within(Duration::from_secs(120), c.get(&s.path())).await?;
        if got != events {
            return Err(format!("{got} events of {events}"));
        }
        Ok::<_, Error>(got)
    });
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    let used = target.cpu_ns().saturating_sub(before);
    let own = procs::own_cpu_ns().saturating_sub(own_before);
    let wall = started.elapsed().as_nanos().max(1) as f64;
    let w1 = target.writes();
    let r1 = target.runs();
    Ok(Cpu {
        ns_per_event: used as f64 / total as f64,
        writes_per_event: w1.saturating_sub(w0) as f64 / total as f64,
        runs_per_event: r1.saturating_sub(r0) as f64 / total as f64,
        busy: used as f64 / wall,
        harness_busy: own as f64 / wall,
    })
}

/// Measurement 5, client disconnect -> upstream sees its connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    BeforeFirstByte,
    MidBody,
}

pub struct Disconnect {
    pub lat: Lat,
    /// Aborted upstream connections that served a later request (must be 0).
    pub reused: u64,
    /// Disconnects the upstream never saw within 10 s.
    pub missed: u64,
}

pub async fn disconnect(
    addr: SocketAddr,
    up: &Upstream,
    origin: Instant,
    phase: Phase,
    rst: bool,
    gap: Duration,
    reps: u64,
) -> Result<Disconnect, Error> {
    let mut h = hist();
    let mut reused = 0;
    let mut missed = 0;
    for _ in 0..reps {
        let s = script(
            Mode::Stream,
            1_000,
            gap,
            match phase {
                Phase::BeforeFirstByte => Duration::from_secs(60),
                Phase::MidBody => Duration::ZERO,
            },
            64,
        );
        let w = up.watch(s.id);
        let mut c = Conn::connect(addr, origin).await?;
        c.send(&s.path()).await?;
        let aborted = within(T, async { w.received.await.map_err(|e| e.to_string()) }).await?;
        if phase == Phase::MidBody {
            within(T, c.head()).await?;
            let mut ev = Vec::new();
            while ev.is_empty() {
                within(T, c.read_batch(&mut ev)).await?;
            }
        }
        let t0 = c.close(rst);
        match tokio::time::timeout(T, w.closed).await {
            Ok(Ok(at)) => h.record(at.saturating_sub(t0).max(1)).unwrap(),
            _ => {
                missed += 1;
                up.unwatch(s.id);
            }
        }
        // The next request must not land on the aborted upstream connection.
        let next = script(Mode::Stream, 1, Duration::ZERO, Duration::ZERO, 8);
        let w = up.watch(next.id);
        let mut c = Conn::connect(addr, origin).await?;
        within(T, c.get(&next.path())).await?;
        let conn = within(T, async { w.received.await.map_err(|e| e.to_string()) }).await?;
        if conn == aborted {
            reused += 1;
        }
        up.unwatch(next.id);
    }
    Ok(Disconnect {
        lat: Lat::of(&h),
        reused,
        missed,
    })
}

/// Measurement 3, resident memory per open idle stream, and service while they are held.
pub struct Memory {
    /// (streams, RSS bytes).
    pub points: Vec<(u64, u64)>,
    /// Least-squares slope over the points, bytes per stream.
    pub per_stream: f64,
    /// Streams that failed to open (any step).
    pub errors: u64,
    /// New requests answered while the most streams were held: max time to first byte, µs.
    pub new_request_max_us: f64,
}

pub async fn memory(target: &Target, origin: Instant, steps: &[u64]) -> Result<Memory, Error> {
    let addr = target.addr;
    // Warm up: the first requests allocate what every later one reuses.
    let mut c = Conn::connect(addr, origin).await?;
    for _ in 0..50 {
        let s = script(Mode::Stream, 2, Duration::ZERO, Duration::ZERO, 8);
        within(T, c.get(&s.path())).await?;
    }
    drop(c);
    let mut held: Vec<Conn> = Vec::new();
    let mut points = Vec::new();
    let mut errors = 0;
    for &n in steps {
        while (held.len() as u64) < n {
            let batch = (n - held.len() as u64).min(200);
            let mut tasks = Vec::new();
            for _ in 0..batch {
                tasks.push(tokio::spawn(async move {
                    let mut c = Conn::connect(addr, origin).await?;
                    let s = script(Mode::Hold, 1, Duration::ZERO, Duration::ZERO, 64);
                    c.send(&s.path()).await?;
                    within(T, c.head()).await?;
                    let mut ev = Vec::new();
                    while ev.is_empty() {
                        within(T, c.read_batch(&mut ev)).await?;
                    }
                    Ok::<_, Error>(c)
                }));
            }
            let mut failed = 0;
            for t in tasks {
                match t.await.map_err(|e| e.to_string())? {
                    Ok(c) => held.push(c),
                    Err(e) => {
                        if errors + failed < 3 {
                            eprintln!("  hold stream failed: {e}");
                        }
                        failed += 1;
                    }
                }
            }
            errors += failed;
            if failed == batch {
                return Err(format!("no stream opens at {} held", held.len()));
            }
        }
        points.push((held.len() as u64, target.rss()));
    }
    // A new request while every stream is held.
    let mut worst: f64 = 0.0;
    for _ in 0..20 {
        let mut c = Conn::connect(addr, origin).await?;
        let s = script(Mode::Stream, 1, Duration::ZERO, Duration::ZERO, 8);
        let start = c.now();
        let (_, first, _) = within(T, c.get(&s.path())).await?;
        worst = worst.max(first.saturating_sub(start) as f64 / 1000.0);
    }
    drop(held);
    Ok(Memory {
        per_stream: slope(&points),
        points,
        errors,
        new_request_max_us: worst,
    })
}

fn slope(p: &[(u64, u64)]) -> f64 {
    let n = p.len() as f64;
    let mx = p.iter().map(|&(x, _)| x as f64).sum::<f64>() / n;
    let my = p.iter().map(|&(_, y)| y as f64).sum::<f64>() / n;
    let sxy: f64 = p
        .iter()
        .map(|&(x, y)| (x as f64 - mx) * (y as f64 - my))
        .sum();
    let sxx: f64 = p.iter().map(|&(x, _)| (x as f64 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}
