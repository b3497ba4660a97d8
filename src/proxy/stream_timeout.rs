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
//! the upstream request is cancelled as for any client that went away.
//!
//! hyper holds the body's next frame until h2 gives the stream room to send, and h2 gives room only
//! once what the stream has queued has gone out and the client's window has space beyond it. So the
//! body is polled again once the previous frame has gone out. On HTTP/2 the body hands out frames of
//! at most [`super::server::H2_SEND_BUF`] (16 KiB, what h2 lets a stream queue), and a stream counts
//! as moving while its client opens its window far enough for the next frame within the send
//! timeout. The byte rate that takes depends on the frames' sizes (an LLM stream's are small) and on
//! how the client sends its window updates. A client that opens no window at all, not even its
//! connection's, has each stream reset in turn.
//!
//! The timer is made the first time a stream waits, and only re-armed when it fires: progress in
//! between costs a clock read, not a trip to the timer thread.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
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
    /// The client, for the log line, once the stream's request reached the service.
    client: OnceLock<SocketAddr>,
}

impl Progress {
    /// Note a poll of the body, and whether it handed out a data frame.
    pub(crate) fn polled(&self, handed: bool) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.handed.store(handed, Ordering::Relaxed);
    }

    /// Name the stream's client.
    pub(crate) fn set_client(&self, client: SocketAddr) {
        let _ = self.client.set(client);
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
        // Made the first time the stream waits for room to send; it fires `limit` after `moved`,
        // or earlier, and is then re-armed for the rest.
        waiting: Option<Pin<Box<Sleep>>>,
        // The body's poll count when the stream was last seen to move, and when that was.
        since: u32,
        moved: Instant,
    }
}

/// `CURRENT` holds a stream's progress while the stream is polled, and gets back what it held
/// before when dropped, even if the poll panicked.
struct Lent<'a> {
    slot: &'a mut Option<Arc<Progress>>,
    outer: Option<Arc<Progress>>,
}

impl<'a> Lent<'a> {
    fn new(slot: &'a mut Option<Arc<Progress>>) -> Self {
        let outer = CURRENT.with(|c| c.replace(slot.take()));
        Self { slot, outer }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        *self.slot = CURRENT.with(|c| c.replace(self.outer.take()));
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
            moved: Instant::now(),
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
        let polled = {
            let _lent = Lent::new(this.progress);
            stream.poll(cx)
        };
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
        if *this.since != polls {
            *this.since = polls;
            *this.moved = Instant::now();
        }
        let deadline = *this.moved + *this.limit;
        let timer = this
            .waiting
            .get_or_insert_with(|| Box::pin(crate::timers::sleep_until(deadline)));
        loop {
            std::task::ready!(timer.as_mut().poll(cx));
            if deadline <= Instant::now() {
                break;
            }
            // The stream moved after the timer was armed: wait for the rest.
            timer.as_mut().reset(deadline);
        }
        let client = progress.client.get().copied();
        tracing::info!(
            source = "client",
            client = client.map(tracing::field::display),
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
