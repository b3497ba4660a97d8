//! The send timeout of one HTTP/2 stream: a client that reads its connection but never opens one
//! stream's flow-control window takes nothing of that stream, while the connection's writes go on.
//! hyper then waits for the window and polls the stream's body no more, so neither the connection's
//! send timeout ([`super::idle::SendTimeout`]) nor the layers' timers, which run in the body, would
//! ever see it: the upstream request (a GPU slot) would be held for as long as the connection lives.
//! nginx resets such a stream after `send_timeout`; so does streamgate.
//!
//! hyper runs each HTTP/2 stream in a task of its own, through the server's executor. The executor
//! here ([`StreamExecutor`]) runs it inside a [`StreamTask`], which knows, through a [`Progress`]
//! shared with the stream's response body ([`super::idle::TrackedBody`]), whether the body's last
//! poll handed out a data frame. hyper polls again at once after a frame unless the stream has no
//! room to send (its window, or what it may queue, is used up), so a task left waiting right after
//! a frame is a stream that cannot send. If the body is not polled again within the send timeout,
//! the task drops the stream: hyper's stream ends there, h2 resets it (`RST_STREAM`, `CANCEL`), and
//! the upstream request is cancelled as for any client that went away. The timer exists only while
//! a stream waits, and any poll of the body (progress) restarts it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// What the response body of one HTTP/2 stream did last, for the stream's task.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Polls of the body so far (wrapping): a change means the stream moved.
    polls: AtomicU32,
    /// Whether the last poll handed out a data frame.
    handed: AtomicBool,
}

impl Progress {
    /// Note a poll of the body, and whether it handed out a data frame.
    pub(crate) fn polled(&self, handed: bool) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.handed.store(handed, Ordering::Relaxed);
    }
}

thread_local! {
    /// The progress of the HTTP/2 stream whose task is being polled on this thread, if any.
    static CURRENT: Cell<Option<Arc<Progress>>> = const { Cell::new(None) };
}

/// The progress of the HTTP/2 stream being polled on this thread: `None` outside a [`StreamTask`]
/// (HTTP/1 connections, tests driving a body directly).
pub(crate) fn current() -> Option<Arc<Progress>> {
    CURRENT.with(|c| {
        let p = c.take();
        let out = p.clone();
        c.set(p);
        out
    })
}

/// hyper's executor for the tasks of HTTP/2 streams: each is spawned on the current runtime inside a
/// [`StreamTask`] with the server's send timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamExecutor {
    limit: Duration,
}

impl StreamExecutor {
    /// Streams that can send nothing for `limit` are reset.
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(StreamTask::new(fut, self.limit));
    }
}

pin_project_lite::pin_project! {
    /// One HTTP/2 stream's task: hyper's stream future, dropped once the stream has waited for room
    /// to send for the send timeout.
    pub(crate) struct StreamTask<F> {
        #[pin]
        stream: Option<F>,
        // Lent to `CURRENT` while the stream is polled.
        progress: Option<Arc<Progress>>,
        limit: Duration,
        // Armed while the stream waits for room to send, since the body's poll number `since`.
        waiting: Option<Pin<Box<Sleep>>>,
        since: u32,
    }
}

impl<F> StreamTask<F> {
    fn new(stream: F, limit: Duration) -> Self {
        Self {
            stream: Some(stream),
            progress: Some(Arc::default()),
            limit,
            waiting: None,
            since: 0,
        }
    }
}

impl<F: Future<Output = ()>> Future for StreamTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(stream) = this.stream.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        let outer = CURRENT.with(|c| c.replace(this.progress.take()));
        let polled = stream.poll(cx);
        *this.progress = CURRENT.with(|c| c.replace(outer));
        if polled.is_ready() {
            return Poll::Ready(());
        }
        let Some(progress) = this.progress.as_deref() else {
            return Poll::Pending;
        };
        if !progress.handed.load(Ordering::Relaxed) {
            // Waiting on its upstream, or done sending: not this timer's business.
            return Poll::Pending;
        }
        let polls = progress.polls.load(Ordering::Relaxed);
        match this.waiting.as_mut() {
            Some(_) if *this.since == polls => {}
            Some(timer) => {
                // Progress since the timer was armed: the wait starts again now.
                timer.as_mut().reset(Instant::now() + *this.limit);
                *this.since = polls;
            }
            None => {
                *this.waiting = Some(Box::pin(crate::timers::sleep(*this.limit)));
                *this.since = polls;
            }
        }
        let Some(timer) = this.waiting.as_mut() else {
            return Poll::Pending;
        };
        std::task::ready!(timer.as_mut().poll(cx));
        tracing::info!(
            source = "client",
            "the client took nothing of an HTTP/2 stream for {:?} (send_timeout): stream reset",
            this.limit
        );
        // Dropping hyper's stream future resets the stream and drops its body: the upstream request
        // is cancelled.
        this.stream.set(None);
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Set when dropped: whether the task dropped its stream.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_cannot_send_is_dropped_after_the_limit_and_progress_restarts_it() {
        let limit = Duration::from_secs(60);
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Dropped(dropped.clone());
        let start = Instant::now();
        // A frame handed out every 50 s (the body polled again each time), then none.
        StreamTask::new(
            async move {
                let _flag = flag;
                let progress = current().expect("polled inside its task");
                for _ in 0..5 {
                    progress.polled(true);
                    crate::timers::sleep(Duration::from_secs(50)).await;
                }
                progress.polled(true);
                std::future::pending::<()>().await;
            },
            limit,
        )
        .await;
        assert_eq!(start.elapsed(), Duration::from_secs(5 * 50 + 60));
        assert!(dropped.load(Ordering::SeqCst), "the stream was not dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_its_upstream_is_left_alone() {
        assert!(current().is_none(), "no stream outside a stream task");
        let start = Instant::now();
        // The body's last poll was `Pending`: waiting on the upstream is the idle timeout's business.
        StreamTask::new(
            async {
                let progress = current().expect("polled inside its task");
                progress.polled(true);
                progress.polled(false);
                crate::timers::sleep(Duration::from_secs(600)).await;
            },
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(start.elapsed(), Duration::from_secs(600));
        assert!(
            current().is_none(),
            "the stream's progress stays with its task"
        );
    }
}
