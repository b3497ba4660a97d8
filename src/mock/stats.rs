//! Counters of the mock server and events tests can await.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The future returned by the `wait_*` helpers of [`MockStats`]: the instant the awaited event
/// happened, or a timeout.
pub trait WaitInstant: Future<Output = Result<Instant, MockWaitTimeout>> + Send + 'static {}

impl<F> WaitInstant for F where F: Future<Output = Result<Instant, MockWaitTimeout>> + Send + 'static
{}

/// A point-in-time copy of the mock's counters. See [`MockStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MockSnapshot {
    /// Requests received, on any path.
    pub requests_total: u64,
    /// Connections accepted.
    pub connections_total: u64,
    /// Connections being served now.
    pub open_connections: u64,
    /// Connections whose serving ended (closed by either side, or failed).
    pub connections_closed: u64,
    /// Generations (streaming bodies, and non-streaming requests waiting for their answer) in progress.
    pub active_streams: u64,
    /// Generations started.
    pub streams_started: u64,
    /// Generations that produced their last byte.
    pub streams_completed: u64,
    /// Generations dropped before their end: the client went away (or the connection was torn down).
    pub streams_cancelled: u64,
    /// Generations failed on purpose by [`abort_after`](super::MockConfig::abort_after).
    pub streams_aborted: u64,
    /// Token events produced so far. Read when the snapshot is taken; a change of this counter alone
    /// does not wake [`MockStats::wait_for`].
    pub tokens_sent: u64,
    /// When the last generation was cancelled.
    pub last_cancelled_at: Option<Instant>,
    /// When the last generation completed.
    pub last_completed_at: Option<Instant>,
    /// When the last generation was aborted.
    pub last_aborted_at: Option<Instant>,
    /// When the last connection closed.
    pub last_connection_closed_at: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    tx: watch::Sender<MockSnapshot>,
    tokens_sent: AtomicU64,
    last_headers: Mutex<Option<http::HeaderMap>>,
}

/// Counters and awaitable events of one [`MockServer`](super::MockServer); a cheap clone handle.
///
/// Tests await conditions instead of sleeping:
///
/// ```no_run
/// # async fn t(stats: streamgate::mock::MockStats) {
/// use std::time::{Duration, Instant};
/// let hung_up = Instant::now();
/// // ... drop the client's response ...
/// let seen = stats.wait_cancelled(1, Duration::from_secs(2)).await.unwrap();
/// assert!(seen.duration_since(hung_up) < Duration::from_millis(50));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MockStats {
    inner: Arc<Inner>,
}

impl Default for MockStats {
    fn default() -> Self {
        Self::new()
    }
}

impl MockStats {
    /// Fresh counters, all zero.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(MockSnapshot::default());
        Self {
            inner: Arc::new(Inner {
                tx,
                tokens_sent: AtomicU64::new(0),
                last_headers: Mutex::new(None),
            }),
        }
    }

    /// A copy of all counters now.
    pub fn snapshot(&self) -> MockSnapshot {
        let mut s = *self.inner.tx.borrow();
        s.tokens_sent = self.inner.tokens_sent.load(Ordering::Relaxed);
        s
    }

    /// Requests received, on any path.
    pub fn requests_total(&self) -> u64 {
        self.snapshot().requests_total
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> u64 {
        self.snapshot().open_connections
    }

    /// Connections whose serving ended.
    pub fn connections_closed(&self) -> u64 {
        self.snapshot().connections_closed
    }

    /// Generations in progress.
    pub fn active_streams(&self) -> u64 {
        self.snapshot().active_streams
    }

    /// Generations that produced their last byte.
    pub fn streams_completed(&self) -> u64 {
        self.snapshot().streams_completed
    }

    /// Generations dropped before their end.
    pub fn streams_cancelled(&self) -> u64 {
        self.snapshot().streams_cancelled
    }

    /// Generations failed on purpose by `abort_after`.
    pub fn streams_aborted(&self) -> u64 {
        self.snapshot().streams_aborted
    }

    /// Token events produced so far.
    pub fn tokens_sent(&self) -> u64 {
        self.inner.tokens_sent.load(Ordering::Relaxed)
    }

    /// The headers of the last request on any path but `/healthz` (so active health checks do not hide
    /// the request under test); empty before the first one.
    pub fn last_request_headers(&self) -> http::HeaderMap {
        self.inner
            .last_headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Wait until `pred` holds for the counters, and return them; fail after `timeout`.
    ///
    /// `pred` is checked at once and after every counter change.
    pub fn wait_for<F>(
        &self,
        mut pred: F,
        timeout: Duration,
    ) -> impl Future<Output = Result<MockSnapshot, MockWaitTimeout>> + Send + 'static
    where
        F: FnMut(&MockSnapshot) -> bool + Send + 'static,
    {
        let stats = self.clone();
        let mut rx = self.inner.tx.subscribe();
        async move {
            let wait = async {
                loop {
                    rx.borrow_and_update();
                    let snap = stats.snapshot();
                    if pred(&snap) {
                        return snap;
                    }
                    // The sender lives as long as `stats`, which this future holds.
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            crate::timers::timeout(timeout, wait)
                .await
                .map_err(|_| MockWaitTimeout {
                    timeout,
                    last: stats.snapshot(),
                })
        }
    }

    /// Wait until at least `n` generations were cancelled; returns when the last one was.
    ///
    /// Like [`wait_for`](Self::wait_for), the returned future owns what it needs (it can be spawned)
    /// and sees every change made after this call.
    pub fn wait_cancelled(&self, n: u64, timeout: Duration) -> impl WaitInstant {
        let w = self.wait_for(move |s| s.streams_cancelled >= n, timeout);
        async move { Ok(w.await?.last_cancelled_at.expect("set with the counter")) }
    }

    /// Wait until at least `n` generations completed; returns when the last one did.
    pub fn wait_completed(&self, n: u64, timeout: Duration) -> impl WaitInstant {
        let w = self.wait_for(move |s| s.streams_completed >= n, timeout);
        async move { Ok(w.await?.last_completed_at.expect("set with the counter")) }
    }

    /// Wait until at least `n` connections closed; returns when the last one did.
    pub fn wait_connections_closed(&self, n: u64, timeout: Duration) -> impl WaitInstant {
        let w = self.wait_for(move |s| s.connections_closed >= n, timeout);
        async move {
            Ok(w.await?
                .last_connection_closed_at
                .expect("set with the counter"))
        }
    }

    pub(crate) fn request_received(&self, headers: Option<&http::HeaderMap>) {
        if let Some(h) = headers {
            *self
                .inner
                .last_headers
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(h.clone());
        }
        self.inner.tx.send_modify(|s| s.requests_total += 1);
    }

    pub(crate) fn token_sent(&self) {
        self.inner.tokens_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_opened(&self) -> ConnectionGuard {
        self.inner.tx.send_modify(|s| {
            s.connections_total += 1;
            s.open_connections += 1;
        });
        ConnectionGuard {
            stats: self.clone(),
        }
    }

    pub(crate) fn generation_started(&self) -> GenerationGuard {
        self.inner.tx.send_modify(|s| {
            s.streams_started += 1;
            s.active_streams += 1;
        });
        GenerationGuard {
            stats: self.clone(),
            ended: false,
        }
    }
}

/// Counts one served connection; dropping it records the close.
#[derive(Debug)]
pub(crate) struct ConnectionGuard {
    stats: MockStats,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        self.stats.inner.tx.send_modify(|s| {
            s.open_connections -= 1;
            s.connections_closed += 1;
            s.last_connection_closed_at = Some(now);
        });
    }
}

/// How a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed,
    Cancelled,
    Aborted,
}

/// Counts one generation; dropping it before [`end`](Self::end) records a cancellation.
#[derive(Debug)]
pub(crate) struct GenerationGuard {
    stats: MockStats,
    ended: bool,
}

impl GenerationGuard {
    /// Record how the generation ended; only the first call counts.
    pub(crate) fn end(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let now = Instant::now();
        self.stats.inner.tx.send_modify(|s| {
            s.active_streams -= 1;
            match outcome {
                Outcome::Completed => {
                    s.streams_completed += 1;
                    s.last_completed_at = Some(now);
                }
                Outcome::Cancelled => {
                    s.streams_cancelled += 1;
                    s.last_cancelled_at = Some(now);
                }
                Outcome::Aborted => {
                    s.streams_aborted += 1;
                    s.last_aborted_at = Some(now);
                }
            }
        });
    }

    pub(crate) fn stats(&self) -> &MockStats {
        &self.stats
    }
}

impl Drop for GenerationGuard {
    fn drop(&mut self) {
        self.end(Outcome::Cancelled);
    }
}

/// [`MockStats::wait_for`] gave up: the condition did not hold within the timeout.
#[derive(Clone, Debug)]
pub struct MockWaitTimeout {
    timeout: Duration,
    last: MockSnapshot,
}

impl MockWaitTimeout {
    /// How long it waited.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The counters when it gave up.
    pub fn last(&self) -> &MockSnapshot {
        &self.last
    }
}

impl fmt::Display for MockWaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mock server condition not reached within {:?}; counters were {:?}",
            self.timeout, self.last
        )
    }
}

impl std::error::Error for MockWaitTimeout {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_for_wakes_on_change_and_reports_instant() {
        let stats = MockStats::new();
        let waiter = tokio::spawn(stats.wait_cancelled(1, Duration::from_secs(5)));
        let guard = stats.generation_started();
        assert_eq!(stats.active_streams(), 1);
        drop(guard);
        let at = waiter.await.unwrap().unwrap();
        let s = stats.snapshot();
        assert_eq!(s.streams_cancelled, 1);
        assert_eq!(s.active_streams, 0);
        assert_eq!(s.last_cancelled_at, Some(at));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_times_out_with_last_counters() {
        let stats = MockStats::new();
        let start = tokio::time::Instant::now();
        let err = stats
            .wait_for(|s| s.requests_total >= 1, Duration::from_millis(250))
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        assert_eq!(err.last().requests_total, 0);
        assert!(err.to_string().contains("250ms"), "{err}");
    }

    #[test]
    fn an_ended_generation_is_not_cancelled_on_drop() {
        let stats = MockStats::new();
        let mut g = stats.generation_started();
        g.end(Outcome::Completed);
        g.end(Outcome::Aborted);
        drop(g);
        let s = stats.snapshot();
        assert_eq!(
            (s.streams_completed, s.streams_cancelled, s.streams_aborted),
            (1, 0, 0)
        );
        assert_eq!(s.active_streams, 0);
    }

    #[test]
    fn connections_and_headers_are_recorded() {
        let stats = MockStats::new();
        let c = stats.connection_opened();
        assert_eq!(stats.open_connections(), 1);
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            http::HeaderValue::from_static("00-abc-def-01"),
        );
        stats.request_received(Some(&h));
        stats.request_received(None);
        assert_eq!(stats.requests_total(), 2);
        assert_eq!(stats.last_request_headers()["traceparent"], "00-abc-def-01");
        drop(c);
        let s = stats.snapshot();
        assert_eq!((s.open_connections, s.connections_closed), (0, 1));
        assert!(s.last_connection_closed_at.is_some());
    }
}
