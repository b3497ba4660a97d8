//! The mock's response body: a whole buffer, or a token stream paced by one timer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::render::Renderer;
use super::stats::{GenerationGuard, Outcome};
use super::SilencePoint;
use crate::BoxError;

/// The error a mock stream ends with when [`abort_after`](super::MockConfig::abort_after) strikes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockAbortError {
    after_tokens: usize,
}

impl MockAbortError {
    pub(crate) fn new(after_tokens: usize) -> Self {
        Self { after_tokens }
    }

    /// How many token events were sent before the abort.
    pub fn after_tokens(&self) -> usize {
        self.after_tokens
    }
}

impl fmt::Display for MockAbortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mock upstream aborted the stream after {} tokens, as configured (abort_after / x-mock-abort-after)",
            self.after_tokens
        )
    }
}

impl std::error::Error for MockAbortError {}

/// The timing and failure script of one stream, resolved from the config and the request headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Script {
    pub(crate) ttft: Duration,
    pub(crate) inter_token: Duration,
    pub(crate) tokens: usize,
    pub(crate) silence: Option<(usize, Duration)>,
    pub(crate) silence_at: SilencePoint,
    pub(crate) abort_after: Option<usize>,
    pub(crate) split: bool,
}

/// What to wait for before the next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gap {
    /// Nothing: go on in the same poll.
    None,
    /// Return `Pending` once, waking at once, so hyper flushes what it has.
    Yield,
    /// Sleep this long, counted from the poll that starts the wait.
    Sleep(Duration),
}

impl Gap {
    fn of(d: Duration) -> Self {
        if d.is_zero() {
            Gap::Yield
        } else {
            Gap::Sleep(d)
        }
    }
}

/// The next step after the gap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Render event `index` (a token, or the trailer when `index == tokens`).
    Render,
    /// Hand out the next piece of the rendered event.
    Piece,
    /// Fail the stream.
    Abort,
    /// Return `Ready(None)`.
    End,
    /// Ended; nothing more.
    Done,
}

/// A token stream: see the [module docs](super) for its timing rules.
pub(crate) struct TokenStream {
    script: Script,
    renderer: Renderer,
    guard: GenerationGuard,
    /// The one timer of this stream, reset for every gap.
    sleep: Pin<Box<Sleep>>,
    /// Whether `sleep` is armed for the current gap.
    armed: bool,
    gap: Gap,
    next: Next,
    /// Index of the event being (or next to be) rendered.
    index: usize,
    /// The rendered event, handed out in pieces.
    event: Bytes,
    pos: usize,
    /// Cut offsets into `event` with the gap before the piece that starts there (unused slots `None`).
    cuts: [Option<(usize, Gap)>; 2],
    buf: BytesMut,
}

impl fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStream")
            .field("index", &self.index)
            .field("next", &self.next)
            .field("gap", &self.gap)
            .finish_non_exhaustive()
    }
}

impl TokenStream {
    pub(crate) fn new(script: Script, renderer: Renderer, guard: GenerationGuard) -> Self {
        let mut s = Self {
            script,
            renderer,
            guard,
            sleep: Box::pin(crate::timers::sleep_until(Instant::now())),
            armed: false,
            gap: Gap::None,
            next: Next::Render,
            index: 0,
            event: Bytes::new(),
            pos: 0,
            cuts: [None, None],
            buf: BytesMut::with_capacity(4096),
        };
        s.schedule(0);
        s
    }

    fn abort_at(&self) -> Option<usize> {
        self.script.abort_after.map(|n| n.min(self.script.tokens))
    }

    /// Set up the gap and step before event `index`.
    fn schedule(&mut self, index: usize) {
        self.index = index;
        let s = &self.script;
        if index > s.tokens {
            self.gap = Gap::None;
            self.next = Next::End;
            return;
        }
        let silence = match s.silence {
            Some((n, d)) if n == index && s.silence_at == SilencePoint::Boundary => Some(d),
            _ => None,
        };
        let mut gap = match silence {
            Some(d) => Gap::of(d),
            None if index == 0 => Gap::of(s.ttft),
            None if index < s.tokens => Gap::of(s.inter_token),
            // The trailer follows the last token at once.
            None => Gap::None,
        };
        if self.abort_at() == Some(index) {
            // Let hyper flush what was sent before failing.
            if gap == Gap::None {
                gap = Gap::Yield;
            }
            self.next = Next::Abort;
        } else {
            self.next = Next::Render;
        }
        self.gap = gap;
    }

    /// Where to cut the freshly rendered event, and what to wait for at each cut.
    fn plan_cuts(&mut self) {
        self.pos = 0;
        self.cuts = [None, None];
        let s = &self.script;
        let silence_here = match s.silence {
            Some((n, d)) if n == self.index => Some((s.silence_at, d)),
            _ => None,
        };
        let (mid_gap, eol_gap) = match silence_here {
            Some((SilencePoint::MidLine, d)) => (Some(Gap::of(d)), s.split.then_some(Gap::Yield)),
            Some((SilencePoint::AfterCr, d)) => (s.split.then_some(Gap::Yield), Some(Gap::of(d))),
            _ if s.split => (Some(Gap::Yield), Some(Gap::Yield)),
            _ => (None, None),
        };
        let ev = &self.event[..];
        let Some(eol) = ev.iter().position(|&b| b == b'\r' || b == b'\n') else {
            return;
        };
        let mid = eol / 2;
        if let Some(g) = mid_gap.filter(|_| mid > 0) {
            self.cuts[0] = Some((mid, g));
        }
        if let Some(g) = eol_gap.filter(|_| eol + 1 < ev.len()) {
            self.cuts[1] = Some((eol + 1, g));
        }
    }

    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match self.gap {
                Gap::None => {}
                Gap::Yield => {
                    self.gap = Gap::None;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Gap::Sleep(d) => {
                    if !self.armed {
                        self.sleep.as_mut().reset(Instant::now() + d);
                        self.armed = true;
                    }
                    ready!(self.sleep.as_mut().poll(cx));
                    self.armed = false;
                    self.gap = Gap::None;
                }
            }
            match self.next {
                Next::Render => {
                    let now = std::time::Instant::now();
                    self.event = if self.index < self.script.tokens {
                        self.guard.stats().token_sent();
                        self.renderer.token(&mut self.buf, self.index, now)
                    } else {
                        self.renderer.trailer(&mut self.buf, self.index, now)
                    };
                    self.plan_cuts();
                    self.next = Next::Piece;
                }
                Next::Piece => {
                    let next_cut = self
                        .cuts
                        .iter()
                        .flatten()
                        .find(|(at, _)| *at > self.pos)
                        .copied();
                    let frame = match next_cut {
                        Some((at, gap)) => {
                            let piece = self.event.slice(self.pos..at);
                            self.pos = at;
                            self.gap = gap;
                            piece
                        }
                        None => {
                            let piece = self.event.slice(self.pos..);
                            self.event = Bytes::new();
                            self.schedule(self.index + 1);
                            if self.next == Next::End {
                                // The last byte is out: `is_end_stream` now says so, and hyper may never
                                // poll again.
                                self.guard.end(Outcome::Completed);
                            }
                            piece
                        }
                    };
                    return Poll::Ready(Some(Ok(Frame::data(frame))));
                }
                Next::Abort => {
                    self.next = Next::Done;
                    self.guard.end(Outcome::Aborted);
                    let err = MockAbortError::new(self.index);
                    return Poll::Ready(Some(Err(err.into())));
                }
                Next::End => {
                    self.next = Next::Done;
                    self.guard.end(Outcome::Completed);
                    return Poll::Ready(None);
                }
                Next::Done => return Poll::Ready(None),
            }
        }
    }
}

/// The response body of every mock endpoint.
#[derive(Debug)]
pub(crate) struct MockBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Stream(Box<TokenStream>),
}

impl MockBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        Self {
            kind: Kind::Full((!b.is_empty()).then_some(b)),
        }
    }

    pub(crate) fn stream(s: TokenStream) -> Self {
        Self {
            kind: Kind::Stream(Box::new(s)),
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => s.poll_step(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => matches!(s.next, Next::End | Next::Done) && s.gap == Gap::None,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s) if matches!(s.next, Next::End | Next::Done) => SizeHint::with_exact(0),
            Kind::Stream(_) => SizeHint::default(),
        }
    }
}
