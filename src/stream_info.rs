//! Per-request stream state shared by the streamgate layers.
//!
//! Several layers wrap the same response body and each sees a different part of the truth: the idle
//! timeout layer knows it cut the stream, the cancellation layer knows the client went away, the tracing
//! layer wants to report both. [`StreamInfo`] is the one small object they share. The outermost layer that
//! asks for it inserts it into the request extensions ([`StreamInfo::get_or_insert`]); inner layers find it
//! there. It is allocated once per request and updated with relaxed atomics, never per chunk allocation.
//!
//! The end reason is first-writer-wins: the layer that *causes* the end records it before the outer layers
//! observe the consequence (an error, or a drop), so an idle timeout is not later re-labelled as an upstream
//! error or a client disconnect.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Why a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndReason {
    /// The upstream body ended normally and the client received all of it.
    Complete,
    /// The client went away (closed, reset, or dropped the response) before the end.
    ClientDisconnect,
    /// The upstream failed mid-stream (reset, protocol error, connection closed early).
    UpstreamError,
    /// The upstream was silent for longer than the idle timeout.
    IdleTimeout,
    /// The proxy ended the stream while shutting down (drain timeout passed).
    Shutdown,
}

impl EndReason {
    /// All reasons, in declaration order.
    pub const ALL: [EndReason; 5] = [
        EndReason::Complete,
        EndReason::ClientDisconnect,
        EndReason::UpstreamError,
        EndReason::IdleTimeout,
        EndReason::Shutdown,
    ];

    /// The stable snake_case name used in logs, span attributes and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            EndReason::Complete => "complete",
            EndReason::ClientDisconnect => "client_disconnect",
            EndReason::UpstreamError => "upstream_error",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::Shutdown => "shutdown",
        }
    }

    /// Who caused this end: the client (downstream), the upstream, or the proxy itself.
    pub const fn source(self) -> ErrorSource {
        match self {
            EndReason::Complete => ErrorSource::None,
            EndReason::ClientDisconnect => ErrorSource::Downstream,
            EndReason::UpstreamError | EndReason::IdleTimeout => ErrorSource::Upstream,
            EndReason::Shutdown => ErrorSource::Internal,
        }
    }

    const fn to_u8(self) -> u8 {
        match self {
            EndReason::Complete => 1,
            EndReason::ClientDisconnect => 2,
            EndReason::UpstreamError => 3,
            EndReason::IdleTimeout => 4,
            EndReason::Shutdown => 5,
        }
    }

    const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(EndReason::Complete),
            2 => Some(EndReason::ClientDisconnect),
            3 => Some(EndReason::UpstreamError),
            4 => Some(EndReason::IdleTimeout),
            5 => Some(EndReason::Shutdown),
            _ => None,
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who caused an error or an early end, after pingora's `ErrorSource`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorSource {
    /// Nobody: the operation succeeded.
    None,
    /// The client side (downstream).
    Downstream,
    /// The upstream server.
    Upstream,
    /// The proxy itself (configuration, shutdown, internal limits).
    Internal,
}

impl ErrorSource {
    /// The stable name used in logs: `none`, `client`, `upstream`, `proxy`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorSource::None => "none",
            ErrorSource::Downstream => "client",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Internal => "proxy",
        }
    }
}

impl fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Default)]
struct Inner {
    end: AtomicU8,
    heartbeats: AtomicU64,
    heartbeat_bytes: AtomicU64,
    injected: AtomicBool,
    scan: Scan,
}

/// Counts published by a layer that scans the stream's lines anyway (the keepalive injector), so that
/// the tracing layer further out does not scan every frame a second time.
///
/// A frame counted here may not have reached the tracing layer yet (the flush layer between them
/// holds one back for a poll), so the counts as of the last two frames are kept, each with the number
/// of non-empty data frames they cover: the tracing layer takes the one that matches the frames it
/// handed out.
#[derive(Debug, Default)]
struct Scan {
    published: AtomicBool,
    /// `[frames, events, lines]` after the last frame, and after the one before.
    last: [AtomicU64; 3],
    before: [AtomicU64; 3],
}

/// Shared, cheaply clonable state of one streamed response. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct StreamInfo {
    inner: Arc<Inner>,
}

impl StreamInfo {
    /// A fresh state with no end reason and no heartbeats.
    pub fn new() -> Self {
        Self::default()
    }

    /// The [`StreamInfo`] in the request's extensions, inserting a new one if there is none.
    pub fn get_or_insert<B>(req: &mut http::Request<B>) -> Self {
        req.extensions_mut()
            .get_or_insert_with(StreamInfo::new)
            .clone()
    }

    /// Record why the stream ended. Only the first call takes effect; returns whether this one did.
    pub fn record_end(&self, reason: EndReason) -> bool {
        self.inner
            .end
            .compare_exchange(0, reason.to_u8(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The recorded end reason, if any.
    pub fn end_reason(&self) -> Option<EndReason> {
        EndReason::from_u8(self.inner.end.load(Ordering::Acquire))
    }

    /// Note that a keepalive of `bytes` bytes is about to be handed to the next layer out.
    ///
    /// Outer layers call [`take_injected`](Self::take_injected) on the next data frame they see to tell
    /// injected bytes from upstream bytes (an injected keepalive is never a "first byte").
    pub fn note_heartbeat(&self, bytes: usize) {
        self.inner.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.inner
            .heartbeat_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.inner.injected.store(true, Ordering::Release);
    }

    /// Whether the data frame being handed out now was injected by a layer further in; clears the mark.
    pub fn take_injected(&self) -> bool {
        // Cheap load first: in the common case nothing was injected and we avoid a write.
        self.inner.injected.load(Ordering::Acquire)
            && self.inner.injected.swap(false, Ordering::AcqRel)
    }

    /// Announce that an inner layer publishes [`publish_scan`](Self::publish_scan) for every data frame.
    pub(crate) fn will_publish_scan(&self) {
        self.inner.scan.published.store(true, Ordering::Relaxed);
    }

    /// Whether an inner layer publishes its scan of the stream.
    pub(crate) fn scan_published(&self) -> bool {
        self.inner.scan.published.load(Ordering::Relaxed)
    }

    /// The counts after `frames` non-empty upstream data frames: SSE events and lines.
    pub(crate) fn publish_scan(&self, frames: u64, events: u64, lines: u64) {
        let scan = &self.inner.scan;
        for (before, last) in scan.before.iter().zip(&scan.last) {
            before.store(last.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for (slot, v) in scan.last.iter().zip([frames, events, lines]) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// The published `(events, lines)` as of `frames` frames, or the latest if neither snapshot is
    /// of that many (which the layers' order rules out).
    pub(crate) fn scan_for(&self, frames: u64) -> (u64, u64) {
        let scan = &self.inner.scan;
        let s = if scan.before[0].load(Ordering::Relaxed) == frames
            && scan.last[0].load(Ordering::Relaxed) != frames
        {
            &scan.before
        } else {
            &scan.last
        };
        (s[1].load(Ordering::Relaxed), s[2].load(Ordering::Relaxed))
    }

    /// How many keepalives were injected so far.
    pub fn heartbeats(&self) -> u64 {
        self.inner.heartbeats.load(Ordering::Relaxed)
    }

    /// How many keepalive bytes were injected so far.
    pub fn heartbeat_bytes(&self) -> u64 {
        self.inner.heartbeat_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_matching_the_frames_seen_is_found() {
        let info = StreamInfo::new();
        assert!(!info.scan_published());
        info.will_publish_scan();
        assert!(info.scan_published());
        assert_eq!(info.scan_for(0), (0, 0));
        info.publish_scan(1, 1, 2);
        info.publish_scan(2, 3, 5);
        assert_eq!(info.scan_for(2), (3, 5));
        assert_eq!(
            info.scan_for(1),
            (1, 2),
            "one frame held between the layers"
        );
        assert_eq!(
            info.scan_for(0),
            (3, 5),
            "no snapshot of 0 frames: the latest"
        );
    }

    #[test]
    fn first_end_reason_wins() {
        let info = StreamInfo::new();
        assert_eq!(info.end_reason(), None);
        assert!(info.record_end(EndReason::IdleTimeout));
        assert!(!info.record_end(EndReason::UpstreamError));
        assert!(!info.clone().record_end(EndReason::ClientDisconnect));
        assert_eq!(info.end_reason(), Some(EndReason::IdleTimeout));
    }

    #[test]
    fn reasons_round_trip_and_are_named() {
        for r in EndReason::ALL {
            assert_eq!(EndReason::from_u8(r.to_u8()), Some(r));
        }
        let names: Vec<_> = EndReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "complete",
                "client_disconnect",
                "upstream_error",
                "idle_timeout",
                "shutdown"
            ]
        );
    }

    #[test]
    fn injected_mark_is_taken_once() {
        let info = StreamInfo::new();
        assert!(!info.take_injected());
        info.note_heartbeat(12);
        assert!(info.take_injected());
        assert!(!info.take_injected());
        assert_eq!(info.heartbeats(), 1);
        assert_eq!(info.heartbeat_bytes(), 12);
    }

    #[test]
    fn get_or_insert_shares_one_state_per_request() {
        let mut req = http::Request::new(());
        let a = StreamInfo::get_or_insert(&mut req);
        let b = StreamInfo::get_or_insert(&mut req);
        a.record_end(EndReason::Shutdown);
        assert_eq!(b.end_reason(), Some(EndReason::Shutdown));
    }
}
