//! Load harness: streamgate side by side with a direct connection and nginx, in one run.
//!
//! ```sh
//! cargo build --release && ulimit -n 20000 && cargo run --release --example loadtest
//! cargo run --release --example loadtest -- --quick        # smaller, for a smoke run
//! ```
//!
//! The harness (scripted upstream and clients, raw sockets, one tokio thread) pins itself to core 1 and
//! the target to core 0 when the machine has two cores and `taskset`, so that the load generator is not
//! what is measured. For each target — the upstream directly, `target/release/streamgate`, and nginx
//! (`proxy_buffering off`, keep-alive upstream) when it is installed — it measures:
//! 1. time to first byte (p50, p99), and what the proxy adds to the direct figure;
//! 2. per-event delay, emit -> read on the same monotonic clock, with events 15 ms apart on 40
//!    concurrent streams (HdrHistogram: p50, p99, max) and how many spaced events arrived coalesced;
//! 3. resident memory per open idle stream (RSS slope over 1,000 … 8,000 held streams), errors while
//!    holding them, and a new request's time to first byte meanwhile;
//! 4. CPU time of the proxy per forwarded event, events as fast as the upstream writes them, and paced
//!    10 ms apart on 100 streams;
//! 5. client disconnect (FIN and RST) -> upstream sees its connection closed, before the first byte and
//!    mid-body with 15 ms and 5 s between events; and whether an aborted upstream connection is reused.
//!
//! It prints a markdown table (docs/BENCHMARKS.md carries the latest).

#![allow(missing_docs, unreachable_pub)]

mod client;
mod measure;
mod procs;
mod upstream;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use measure::{Cpu, Disconnect, EventDelay, Lat, Memory, Phase};
use procs::{Env, Kind, Target};

struct Opts {
    quick: bool,
    nginx: bool,
    out: Option<PathBuf>,
    /// Measurements to run (all when empty): latency, cpu, disconnect, memory.
    only: Vec<String>,
    /// Targets to run (all when empty): direct, streamgate, nginx.
    targets: Vec<String>,
    /// Rounds of the CPU measurement, when not the default.
    cpu_rounds: Option<usize>,
    /// Measure nothing: pool the per-round ratios that earlier runs printed to these files.
    pool: Vec<PathBuf>,
}

impl Opts {
    fn runs(&self, what: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == what)
    }

    fn targets(&self, k: Kind) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == k.name())
    }
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        nginx: true,
        out: None,
        only: Vec::new(),
        targets: Vec::new(),
        cpu_rounds: None,
        pool: Vec::new(),
    };
    let list = |v: Option<String>, what: &str, allowed: &[&str]| -> Result<Vec<String>, String> {
        let v = v.ok_or(format!("{what} needs a comma-separated list"))?;
        let items: Vec<String> = v.split(',').map(str::to_string).collect();
        match items.iter().find(|i| !allowed.contains(&i.as_str())) {
            Some(bad) => Err(format!("{what}: unknown {bad:?} (one of {allowed:?})")),
            None => Ok(items),
        }
    };
    let mut args = std::env::args().skip(1).peekable();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--no-nginx" => o.nginx = false,
            "--out" => o.out = Some(args.next().ok_or("--out needs a file")?.into()),
            "--only" => {
                o.only = list(
                    args.next(),
                    "--only",
                    &["latency", "cpu", "disconnect", "memory"],
                )?
            }
            "--targets" => {
                o.targets = list(args.next(), "--targets", &["direct", "streamgate", "nginx"])?
            }
            "--cpu-rounds" => {
                let v = args.next().unwrap_or_default();
                o.cpu_rounds = match v.parse::<usize>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => return Err(format!("--cpu-rounds: {v:?} is not a positive number")),
                }
            }
            "--pool" => {
                // The files, up to the next flag.
                while let Some(f) = args.next_if(|a| !a.starts_with("--")) {
                    o.pool.push(PathBuf::from(f));
                }
                if o.pool.is_empty() {
                    return Err("--pool needs the files that earlier runs' stderr went to".into());
                }
            }
            "-h" | "--help" => {
                println!(
                    "usage: loadtest [--quick] [--no-nginx] [--out FILE] \\
                     [--only latency,cpu,disconnect,memory] [--targets direct,streamgate,nginx] \\
                     [--cpu-rounds N]\n       loadtest --pool STDERR_FILE..."
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(o)
}

fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(2);
        }
    };
    if !o.pool.is_empty() {
        match pool(&o.pool) {
            Ok(s) => print!("{s}"),
            Err(e) => {
                eprintln!("loadtest: {e}");
                std::process::exit(2);
            }
        }
        return;
    }
    // Pin before the runtime starts threads: harness on core 1, targets on core 0.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cores >= 2
        && std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(o, pinned)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(1);
        }
    }
}

#[derive(Default)]
struct Row {
    ttfb: Option<Lat>,
    events: Option<EventDelay>,
    cpu_blast: Option<Cpu>,
    cpu_paced: Option<Cpu>,
    disconnect: Vec<(String, Disconnect)>,
    memory: Option<Memory>,
}

async fn run(o: Opts, pinned: bool) -> Result<(), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let streamgate = std::env::var_os("STREAMGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/streamgate"));
    if !streamgate.exists() {
        return Err(format!(
            "{} not found: run `cargo build --release` first (or set STREAMGATE_BIN)",
            streamgate.display()
        ));
    }
    let nginx = if o.nginx { which("nginx") } else { None };
    let dir = std::env::temp_dir().join(format!("streamgate-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let env = Env {
        dir: dir.clone(),
        streamgate,
        nginx: nginx.clone(),
        pin: pinned.then(|| "taskset -c 0".to_string()),
    };

    let (ttfb_n, streams, events, blast, paced_streams, paced_events, reps, rounds, cpu_rounds) =
        if o.quick {
            (200, 10, 40, 20_000, 20, 30, 3, 1, 1)
        } else {
            (3_000, 40, 45, 100_000, 100, 100, 10, 10, 9)
        };
    let cpu_rounds = o.cpu_rounds.unwrap_or(cpu_rounds);
    let mut steps: Vec<u64> = if o.quick {
        vec![250, 500, 1_000]
    } else {
        vec![1_000, 2_000, 4_000, 8_000]
    };
    // Each held stream costs the harness two descriptors (client and upstream side).
    let limit = fd_limit();
    let fits = limit.saturating_sub(500) / 2;
    if steps.iter().any(|&s| s > fits) {
        eprintln!(
            "loadtest: open files limit is {limit}; holding at most {fits} streams (run `ulimit -n 20000` first for 8,000)"
        );
        steps.retain(|&s| s <= fits);
    }

    let origin = Instant::now();
    let up = upstream::Upstream::start(origin)
        .await
        .map_err(|e| format!("upstream: {e}"))?;
    let kinds: Vec<Kind> = [Kind::Direct, Kind::Streamgate, Kind::Nginx]
        .into_iter()
        .filter(|&k| o.targets(k) && (k != Kind::Nginx || nginx.is_some()))
        .collect();
    let mut rows: Vec<(Kind, Row)> = kinds.iter().map(|&k| (k, Row::default())).collect();
    let mut lat_ratio: Option<(Ratio, Ratio)> = None;
    if o.runs("latency") {
        // Every target runs at once and the rounds alternate between them, so that whatever else the
        // machine does in the meantime lands on all of them alike.
        eprintln!("== latency: {rounds} rounds over {}", names(&kinds));
        let targets = kinds
            .iter()
            .map(|&k| Target::start(k, up.addr, &env))
            .collect::<Result<Vec<_>, _>>()?;
        let mut first = vec![measure::hist(); targets.len()];
        let mut each = vec![measure::hist(); targets.len()];
        let mut coalesced = vec![0; targets.len()];
        // Each round's p99s (time to first byte, per-event delay) per target, for the paired ratios.
        let mut round_p99: Vec<Vec<(f64, f64)>> = vec![Vec::new(); targets.len()];
        for j in 0..rounds {
            // Every other round runs the targets after the first in reverse order, so that neither
            // proxy always runs in the same place of a round (right after the direct baseline, say).
            let mut order: Vec<usize> = (0..targets.len()).collect();
            if j % 2 == 1 {
                // The direct baseline (when measured) stays first; the proxies after it swap.
                let first = usize::from(kinds.first() == Some(&Kind::Direct));
                order[first..].reverse();
            }
            for i in order {
                let t = &targets[i];
                let (mut f, mut e) = (measure::hist(), measure::hist());
                measure::ttfb(t.addr, origin, ttfb_n / rounds, &mut f).await?;
                coalesced[i] += measure::event_delay(
                    t.addr,
                    origin,
                    streams,
                    events,
                    Duration::from_millis(15),
                    &mut e,
                )
                .await?;
                round_p99[i].push((Lat::of(&f).p99, Lat::of(&e).p99));
                first[i].add(&f).map_err(|e| format!("histogram: {e}"))?;
                each[i].add(&e).map_err(|e| format!("histogram: {e}"))?;
            }
        }
        // As for CPU: the p99 of one target over all rounds moves with whatever else the machine did
        // during its rounds. Paired per round (streamgate's added p99 over nginx's, each against the
        // direct round run just before), the median ratio shows what is systematic.
        let at = |k: Kind| kinds.iter().position(|&x| x == k);
        if let (Some(d), Some(a), Some(b)) =
            (at(Kind::Direct), at(Kind::Streamgate), at(Kind::Nginx))
        {
            let ratio = |pick: fn(&(f64, f64)) -> f64| {
                let mut r: Vec<f64> = (0..rounds)
                    .map(|j| {
                        let base = pick(&round_p99[d][j]);
                        let added = |t: usize| (pick(&round_p99[t][j]) - base).max(1.0);
                        added(a) / added(b)
                    })
                    .collect();
                Ratio::of(&mut r)
            };
            if let (Some(t), Some(e)) = (ratio(|x| x.0), ratio(|x| x.1)) {
                eprintln!(
                    "  median of per-round ratios of added p99 (interval for it, confidence), streamgate, nginx: time to first byte {t}, per-event delay {e}"
                );
                eprintln!("{}", t.rounds_line("time to first byte"));
                eprintln!("{}", e.rounds_line("per-event delay"));
                lat_ratio = Some((t, e));
            }
        }
        for (i, (k, r)) in rows.iter_mut().enumerate() {
            let l = Lat::of(&first[i]);
            let e = Lat::of(&each[i]);
            eprintln!(
                "  {}: ttfb p50 {:.1} µs p99 {:.1} µs; event delay p50 {:.1} p99 {:.1} max {:.1} µs, coalesced {}/{}",
                k.name(),
                l.p50,
                l.p99,
                e.p50,
                e.p99,
                e.max,
                coalesced[i],
                e.n
            );
            r.ttfb = Some(l);
            r.events = Some(EventDelay {
                lat: e,
                coalesced: coalesced[i],
            });
        }
    }
    let mut cpu_ratio: Option<(Ratio, Ratio)> = None;
    if o.runs("cpu") {
        // As for latency: both proxies run at once and the rounds alternate, and each figure is the
        // median over the rounds, so that a burst of other work on the machine moves one round, not
        // the result.
        let cpu_kinds: Vec<Kind> = kinds
            .iter()
            .copied()
            .filter(|&k| k != Kind::Direct)
            .collect();
        eprintln!("== cpu: {cpu_rounds} rounds over {}", names(&cpu_kinds));
        let targets = cpu_kinds
            .iter()
            .map(|&k| Target::start(k, up.addr, &env))
            .collect::<Result<Vec<_>, _>>()?;
        let mut blasts: Vec<Vec<Cpu>> = targets.iter().map(|_| Vec::new()).collect();
        let mut paceds: Vec<Vec<Cpu>> = targets.iter().map(|_| Vec::new()).collect();
        for j in 0..cpu_rounds {
            // Every other round in reverse order, as for latency.
            let mut order: Vec<usize> = (0..targets.len()).collect();
            if j % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let t = &targets[i];
                blasts[i].push(measure::cpu(t, origin, 1, blast, Duration::ZERO).await?);
                paceds[i].push(
                    measure::cpu(
                        t,
                        origin,
                        paced_streams,
                        paced_events,
                        Duration::from_millis(10),
                    )
                    .await?,
                );
            }
        }
        // Rounds of the two proxies run back to back, so each pair shares the machine's state: the
        // median of the per-round ratios is steadier than the ratio of the medians.
        let paired = |v: &[Vec<Cpu>], cost: fn(&Cpu) -> f64| -> Option<Ratio> {
            let [a, b] = v else { return None };
            let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| cost(x) / cost(y)).collect();
            Ratio::of(&mut r)
        };
        let per_event: fn(&Cpu) -> f64 = |c| c.ns_per_event;
        cpu_ratio = paired(&blasts, per_event).zip(paired(&paceds, per_event));
        if let Some((b, p)) = &cpu_ratio {
            eprintln!(
                "  median of per-round ratios (interval for it, confidence), {}: back-to-back {b}, paced {p}",
                names(&cpu_kinds)
            );
            eprintln!("{}", b.rounds_line("back-to-back"));
            eprintln!("{}", p.rounds_line("paced"));
        }
        // Back-to-back, CPU per event follows how many events each read-and-write finds, which the
        // harness's timing sets: CPU per client write (one such cycle) separates the two.
        if let Some(w) = paired(&blasts, |c| c.ns_per_event / c.writes_per_event.max(1e-9)) {
            eprintln!(
                "  back-to-back, CPU per client write instead of per event: median of per-round ratios {w}"
            );
        }
        for ((k, mut b), mut p) in cpu_kinds.iter().zip(blasts).zip(paceds) {
            let (b_lo, b_hi) = spread(&b);
            let (p_lo, p_hi) = spread(&p);
            let b = median(&mut b);
            let p = median(&mut p);
            eprintln!(
                "  {}: cpu back-to-back median {:.2} µs/event (rounds {b_lo:.2}–{b_hi:.2}), {:.2} writes, {:.2} wake-ups, busy {:.2} (harness {:.2}); paced median {:.2} µs/event (rounds {p_lo:.2}–{p_hi:.2}), {:.2} writes, {:.2} wake-ups, busy {:.2} (harness {:.2})",
                k.name(),
                b.ns_per_event / 1000.0,
                b.writes_per_event,
                b.runs_per_event,
                b.busy,
                b.harness_busy,
                p.ns_per_event / 1000.0,
                p.writes_per_event,
                p.runs_per_event,
                p.busy,
                p.harness_busy,
            );
            if let Some((_, r)) = rows.iter_mut().find(|(rk, _)| rk == k) {
                r.cpu_blast = Some(b);
                r.cpu_paced = Some(p);
            }
        }
    }
    for (k, r) in rows.iter_mut().filter(|_| o.runs("disconnect")) {
        let k = *k;
        eprintln!("== {}", k.name());
        let mut t = Target::start(k, up.addr, &env)?;
        let cases = [
            ("before first byte, FIN", Phase::BeforeFirstByte, false, 15),
            ("before first byte, RST", Phase::BeforeFirstByte, true, 15),
            ("mid-body 15 ms gaps, FIN", Phase::MidBody, false, 15),
            ("mid-body 15 ms gaps, RST", Phase::MidBody, true, 15),
            ("mid-body 5 s gaps, FIN", Phase::MidBody, false, 5_000),
            ("mid-body 5 s gaps, RST", Phase::MidBody, true, 5_000),
        ];
        for (name, phase, rst, gap_ms) in cases {
            let d = measure::disconnect(
                t.addr,
                &up,
                origin,
                phase,
                rst,
                Duration::from_millis(gap_ms),
                reps,
            )
            .await?;
            eprintln!(
                "  disconnect {name}: p50 {:.3} ms max {:.3} ms, missed {}, reused {}",
                d.lat.p50 / 1000.0,
                d.lat.max / 1000.0,
                d.missed,
                d.reused
            );
            r.disconnect.push((name.to_string(), d));
        }
        t.stop();
    }
    for (k, r) in rows.iter_mut() {
        if *k == Kind::Direct || steps.is_empty() || !o.runs("memory") {
            continue;
        }
        eprintln!("== {} memory", k.name());
        let t = Target::start(*k, up.addr, &env)?;
        let m = measure::memory(&t, origin, &steps).await?;
        eprintln!(
            "  {:.0} B per idle stream, errors {}, new request max {:.2} ms",
            m.per_stream,
            m.errors,
            m.new_request_max_us / 1000.0
        );
        r.memory = Some(m);
    }
    let table = report(
        &rows,
        pinned,
        o.quick,
        nginx.is_some(),
        lat_ratio,
        cpu_ratio,
    );
    println!("{table}");
    if let Some(out) = o.out {
        std::fs::write(&out, &table).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The median of `v` (the mean of the two middle values when their number is even).
fn mid(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 0 {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// A median of per-round ratios, with a distribution-free confidence interval for it.
#[derive(Clone, Debug, PartialEq)]
struct Ratio {
    median: f64,
    /// The interval `[x(k), x(n+1-k)]` of the sorted ratios: it holds the true median with
    /// probability `confidence`, whatever the ratios' distribution (rounds independent).
    lo: f64,
    hi: f64,
    confidence: f64,
    /// The per-round ratios, sorted: printed so that several runs can be pooled.
    rounds: Vec<f64>,
}

impl Ratio {
    /// The median of `v` and the narrowest interval of order statistics that holds the median with
    /// at least 95% confidence: the number of ratios below the true median is binomial (n, ½), so
    /// `[x(k), x(n+1-k)]` misses it with probability `2·P(B ≤ k−1)`. With fewer than six rounds no
    /// such interval reaches 95%, and the widest one (lowest to highest) is given with its own
    /// confidence (5 rounds: 93.8%). `None` for no rounds.
    fn of(v: &mut [f64]) -> Option<Ratio> {
        if v.is_empty() {
            return None;
        }
        let median = mid(v);
        let n = v.len();
        let coverage = |k: usize| {
            // 1 − 2·Σ_{i<k} C(n, i) / 2^n, each term from its logarithm: 2^n and C(n, i) overflow an
            // f64 from n = 1,024 on (pooled runs can reach that), their ratio does not.
            let mut ln_c = 0.0f64; // ln C(n, i)
            let mut tail = 0.0f64;
            for i in 0..k {
                tail += (ln_c - n as f64 * std::f64::consts::LN_2).exp();
                ln_c += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
            }
            1.0 - 2.0 * tail
        };
        let mut k = 1;
        while 2 * (k + 1) <= n + 1 && coverage(k + 1) >= 0.95 {
            k += 1;
        }
        Some(Ratio {
            median,
            lo: v[k - 1],
            hi: v[n - k],
            confidence: coverage(k),
            rounds: v.to_vec(),
        })
    }

    /// The line that carries this ratio's rounds on stderr, as [`pool`] reads it back.
    fn rounds_line(&self, name: &str) -> String {
        let rounds: Vec<String> = self.rounds.iter().map(|x| format!("{x:.3}")).collect();
        format!("    {ROUNDS}{name}: {}", rounds.join(" "))
    }
}

/// What starts a line of per-round ratios (after its indent).
const ROUNDS: &str = "rounds, ";

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2}× ({:.2}–{:.2}, {:.0}%)",
            self.median,
            self.lo,
            self.hi,
            self.confidence * 100.0
        )
    }
}

/// The per-round ratios of several runs (the `rounds, NAME: ...` lines of their stderr), pooled per
/// measure: the median over all rounds, with its interval, and the median of the runs' medians, with
/// its interval over runs. The first treats rounds as independent; rounds of one run share its
/// processes and the machine's state of the moment, so the second, with runs as the unit, is the
/// more cautious. Runs of one build on one day only: rounds of different builds or machines are not
/// one distribution.
fn pool(files: &[PathBuf]) -> Result<String, String> {
    // Per measure: every round, and each run's median.
    let mut by: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for line in text.lines() {
            let Some((name, values)) = line
                .trim()
                .strip_prefix(ROUNDS)
                .and_then(|l| l.split_once(": "))
            else {
                continue;
            };
            let mut values = values
                .split_whitespace()
                .map(|v| {
                    v.parse::<f64>()
                        .map_err(|e| format!("{}: {v:?} in {line:?}: {e}", f.display()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if values.is_empty() {
                continue;
            }
            let run = mid(&mut values);
            match by.iter_mut().find(|(n, _, _)| n == name) {
                Some((_, all, runs)) => {
                    all.extend(values);
                    runs.push(run);
                }
                None => by.push((name.to_string(), values, vec![run])),
            }
        }
    }
    if by.is_empty() {
        return Err(
            "no `rounds, ...` lines in those files (they are what the harness prints to stderr)"
                .into(),
        );
    }
    let mut s = String::from(
        "| streamgate / nginx, pooled | runs | rounds | median of all rounds (interval, confidence) | median of the runs' medians (interval over runs) |\n|---|---:|---:|---:|---:|\n",
    );
    for (name, mut all, mut runs) in by {
        let (n, r) = (all.len(), runs.len());
        if let (Some(a), Some(m)) = (Ratio::of(&mut all), Ratio::of(&mut runs)) {
            let _ = writeln!(s, "| {name} | {r} | {n} | {a} | {m} |");
        }
    }
    Ok(s)
}

/// The median round (by CPU per event).
fn median(v: &mut [Cpu]) -> Cpu {
    v.sort_by(|a, b| a.ns_per_event.total_cmp(&b.ns_per_event));
    v[v.len() / 2].clone()
}

/// The lowest and highest CPU per event over the rounds, in µs.
fn spread(v: &[Cpu]) -> (f64, f64) {
    let it = v.iter().map(|c| c.ns_per_event / 1000.0);
    (
        it.clone().fold(f64::INFINITY, f64::min),
        it.fold(0.0, f64::max),
    )
}

fn names(kinds: &[Kind]) -> String {
    kinds
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    // Counted from cpuinfo: the harness's own affinity is one core once pinned.
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(1);
    format!("{cores} × {cpu}, Linux {kernel}")
}

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a >= 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn report(
    rows: &[(Kind, Row)],
    pinned: bool,
    quick: bool,
    nginx: bool,
    lat_ratio: Option<(Ratio, Ratio)>,
    cpu_ratio: Option<(Ratio, Ratio)>,
) -> String {
    let mut s = String::new();
    let direct = rows
        .iter()
        .find(|(k, _)| *k == Kind::Direct)
        .map(|(_, r)| r);
    let get = |k: Kind| rows.iter().find(|(kk, _)| *kk == k).map(|(_, r)| r);
    let sg = get(Kind::Streamgate);
    let ng = get(Kind::Nginx);
    let _ = writeln!(
        s,
        "Machine: {}; {}; loopback{}.\n",
        machine(),
        if pinned {
            "target pinned to core 0, harness to core 1"
        } else {
            "not pinned"
        },
        if quick { "; --quick run" } else { "" }
    );
    let _ = writeln!(
        s,
        "| measure | direct | streamgate | nginx | streamgate / nginx |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    let mut line = |name: &str,
                    f: &dyn Fn(&Row) -> Option<f64>,
                    fmt: &dyn Fn(f64) -> String,
                    with_ratio: bool| {
        let d = direct.and_then(f);
        let a = sg.and_then(f);
        let b = ng.and_then(f);
        let show = |v: Option<f64>| v.map_or("–".to_string(), fmt);
        let r = match (a, b) {
            (Some(a), Some(b)) if with_ratio => ratio(a, b),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {r} |",
            show(d),
            show(a),
            show(b)
        );
    };
    let d_ttfb = direct.and_then(|d| d.ttfb);
    let d_ev = direct.and_then(|d| d.events.as_ref().map(|e| e.lat));
    line(
        "time to first byte p50 (µs)",
        &|r| Some(r.ttfb?.p50),
        &f1,
        false,
    );
    line(
        "time to first byte p99 (µs)",
        &|r| Some(r.ttfb?.p99),
        &f1,
        false,
    );
    line(
        "**added** time to first byte p50 (µs)",
        &|r| Some(r.ttfb?.p50 - d_ttfb?.p50),
        &f1,
        true,
    );
    line(
        "**added** time to first byte p99 (µs)",
        &|r| Some(r.ttfb?.p99 - d_ttfb?.p99),
        &f1,
        true,
    );
    line(
        "per-event delay p50 (µs), 15 ms apart",
        &|r| Some(r.events.as_ref()?.lat.p50),
        &f1,
        false,
    );
    line(
        "per-event delay p99 (µs)",
        &|r| Some(r.events.as_ref()?.lat.p99),
        &f1,
        false,
    );
    line(
        "per-event delay max (µs)",
        &|r| Some(r.events.as_ref()?.lat.max),
        &f1,
        false,
    );
    line(
        "**added** per-event delay p50 (µs)",
        &|r| Some(r.events.as_ref()?.lat.p50 - d_ev?.p50),
        &f1,
        true,
    );
    line(
        "**added** per-event delay p99 (µs)",
        &|r| Some(r.events.as_ref()?.lat.p99 - d_ev?.p99),
        &f1,
        true,
    );
    line(
        "spaced events arrived coalesced (%)",
        &|r| {
            let e = r.events.as_ref()?;
            Some(100.0 * e.coalesced as f64 / e.lat.n.max(1) as f64)
        },
        &|v| format!("{v:.2}"),
        false,
    );
    line(
        "**RSS per open idle stream (bytes)**",
        &|r| Some(r.memory.as_ref()?.per_stream),
        &|v| format!("{v:.0}"),
        true,
    );
    line(
        "RSS with the most streams held (MiB)",
        &|r| Some(r.memory.as_ref()?.points.last()?.1 as f64 / 1048576.0),
        &f1,
        true,
    );
    line(
        "streams held",
        &|r| Some(r.memory.as_ref()?.points.last()?.0 as f64),
        &|v| format!("{v:.0}"),
        false,
    );
    line(
        "errors opening held streams",
        &|r| Some(r.memory.as_ref()?.errors as f64),
        &|v| format!("{v:.0}"),
        false,
    );
    line(
        "new request time to first byte while held, max (ms)",
        &|r| Some(r.memory.as_ref()?.new_request_max_us / 1000.0),
        &|v| format!("{v:.2}"),
        false,
    );
    line(
        "**CPU per event**, back-to-back (µs)",
        &|r| Some(r.cpu_blast.as_ref()?.ns_per_event / 1000.0),
        &|v| format!("{v:.2}"),
        true,
    );
    line(
        "CPU per event, 10 ms apart on 100 streams (µs)",
        &|r| Some(r.cpu_paced.as_ref()?.ns_per_event / 1000.0),
        &|v| format!("{v:.2}"),
        true,
    );

    let cases: Vec<String> = sg
        .or(direct)
        .map(|r| r.disconnect.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    for (i, name) in cases.iter().enumerate() {
        line(
            &format!("disconnect → upstream closed, {name}: p50 (ms)"),
            &|r| Some(r.disconnect.get(i)?.1.lat.p50 / 1000.0),
            &|v| format!("{v:.3}"),
            false,
        );
        line(
            &format!("disconnect → upstream closed, {name}: max (ms)"),
            &|r| {
                let d = &r.disconnect.get(i)?.1;
                Some(if d.missed > 0 {
                    f64::INFINITY
                } else {
                    d.lat.max / 1000.0
                })
            },
            &|v| {
                if v.is_finite() {
                    format!("{v:.3}")
                } else {
                    "missed".into()
                }
            },
            false,
        );
    }
    line(
        "aborted upstream connections reused",
        &|r| {
            (!r.disconnect.is_empty())
                .then(|| r.disconnect.iter().map(|(_, d)| d.reused).sum::<u64>() as f64)
        },
        &|v| format!("{v:.0}"),
        false,
    );
    if let Some((t, e)) = lat_ratio {
        let _ = writeln!(
            s,
            "| added p99, median of per-round ratios (interval for it, confidence), time to first byte / per-event delay | – | – | – | {t} / {e} |"
        );
    }
    if let Some((b, p)) = cpu_ratio {
        let _ = writeln!(
            s,
            "| CPU per event, median of per-round ratios (interval for it, confidence), back-to-back / paced | – | – | – | {b} / {p} |"
        );
    }
    if !nginx {
        let _ = writeln!(
            s,
            "\nnginx is not installed: its column is empty (`apt-get install -y nginx-light`)."
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{pool, Ratio};

    #[test]
    fn ratio_interval_is_the_order_statistics_of_the_binomial_tables() {
        // n = 10: [x(2), x(9)] holds the median with 1 − 2·11/1024 = 97.9%; [x(3), x(8)] only
        // with 1 − 2·56/1024 = 89.1%, under 95%.
        let mut v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let r = Ratio::of(&mut v).unwrap();
        assert_eq!((r.median, r.lo, r.hi), (5.5, 2.0, 9.0));
        assert!((r.confidence - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        // n = 9: [x(2), x(8)], 1 − 2·10/512 = 96.1%.
        let mut v: Vec<f64> = (1..=9).map(f64::from).collect();
        let r = Ratio::of(&mut v).unwrap();
        assert_eq!((r.median, r.lo, r.hi), (5.0, 2.0, 8.0));
        assert!((r.confidence - (1.0 - 20.0 / 512.0)).abs() < 1e-12);
        // n = 21: [x(6), x(16)], 1 − 2·(1 + 21 + 210 + 1330 + 5985 + 20349)/2^21 = 97.3%.
        let mut v: Vec<f64> = (1..=21).map(f64::from).collect();
        let r = Ratio::of(&mut v).unwrap();
        assert_eq!((r.median, r.lo, r.hi), (11.0, 6.0, 16.0));
        assert!((r.confidence - (1.0 - 2.0 * 27896.0 / 2097152.0)).abs() < 1e-12);
        // n = 3,000, beyond what 2^n in an f64 holds: the interval is about ±1.96·√n/2 = ±54 ranks
        // around the median, at 95–96%.
        let mut v: Vec<f64> = (1..=3000).map(f64::from).collect();
        let r = Ratio::of(&mut v).unwrap();
        assert!((1440.0..=1450.0).contains(&r.lo), "{r:?}");
        assert_eq!(r.lo + r.hi, 3001.0);
        assert!((0.95..0.96).contains(&r.confidence), "{}", r.confidence);
        // n = 5: no interval reaches 95%; the widest, lowest to highest, holds it with 93.75%.
        let mut v = vec![1.1, 0.9, 1.0, 1.3, 0.8];
        let r = Ratio::of(&mut v).unwrap();
        assert_eq!((r.median, r.lo, r.hi), (1.0, 0.8, 1.3));
        assert_eq!(r.rounds, [0.8, 0.9, 1.0, 1.1, 1.3]);
        assert!((r.confidence - 0.9375).abs() < 1e-12);
        // One round: the interval is the round itself, with no confidence to speak of.
        let r = Ratio::of(&mut [1.2]).unwrap();
        assert_eq!((r.median, r.lo, r.hi, r.confidence), (1.2, 1.2, 1.2, 0.0));
        assert_eq!(r.rounds, [1.2]);
        assert_eq!(Ratio::of(&mut []), None);
        assert_eq!(
            Ratio::of(&mut [1.0, 2.0, 3.0, 4.0, 5.0])
                .unwrap()
                .to_string(),
            "3.00× (1.00–5.00, 94%)"
        );
    }

    #[test]
    fn pool_gathers_each_measures_rounds_over_runs_and_names_bad_input() {
        let dir = std::env::temp_dir().join(format!("loadtest-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, bad) = (dir.join("a.err"), dir.join("b.err"), dir.join("bad.err"));
        std::fs::write(
            &a,
            "== cpu: 3 rounds\n    rounds, paced: 0.900 1.000 1.100\n    rounds, back-to-back: 2.000\n",
        )
        .unwrap();
        std::fs::write(&b, "noise\n    rounds, paced: 1.200 0.800\n").unwrap();
        std::fs::write(&bad, "    rounds, paced: 1.0 x\n").unwrap();
        // What the harness prints is what pool reads.
        let line = Ratio::of(&mut [1.1, 0.7]).unwrap().rounds_line("paced");
        assert_eq!(line, "    rounds, paced: 0.700 1.100");
        let table = pool(&[a.clone(), b]).unwrap();
        // Paced: rounds 0.9 1.0 1.1 and 1.2 0.8; the runs' medians 1.0 and 1.0.
        assert!(
            table.contains("| paced | 2 | 5 | 1.00× (0.80–1.20, 94%) | 1.00× (1.00–1.00, 50%) |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| back-to-back | 1 | 1 | 2.00× (2.00–2.00, 0%) | 2.00× (2.00–2.00, 0%) |"
            ),
            "{table}"
        );
        let e = pool(&[bad]).unwrap_err();
        assert!(e.contains("bad.err") && e.contains("\"x\""), "{e}");
        let e = pool(&[dir.join("absent.err")]).unwrap_err();
        assert!(e.contains("absent.err"), "{e}");
        std::fs::write(&a, "nothing here\n").unwrap();
        assert!(pool(&[a]).unwrap_err().contains("no `rounds, ...` lines"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
