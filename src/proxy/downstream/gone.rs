//! [`GoneWatch`]: whether the client may have closed or reset its connection, known without polling
//! its socket every time the connection's task runs.
//!
//! While a response streams, the task runs once per upstream event, and each time it would poll the
//! client socket for reads (about 200 instructions: tokio's readiness check, its waiter lock, a
//! `ReadBuf`) only to hear that nothing came. Instead the socket's read readiness is registered with a
//! waker of our own, which marks the watch and wakes the task: until it is marked, there is nothing to
//! read and the socket is not polled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

/// See the [module docs](self).
#[derive(Debug)]
pub(super) struct GoneWatch {
    shared: Arc<Shared>,
    /// Our waker: every read of the client socket is polled with it.
    ours: Waker,
    /// The task waker last given to `shared`: compared with the task's (`will_wake`) at every poll,
    /// so that the lock is taken only when it changes.
    task: Option<Waker>,
    /// A read was pending with our waker, which has not been woken since.
    armed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    /// Our waker was woken: the socket has something to read (bytes, an end of stream, a reset).
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl GoneWatch {
    pub(super) fn new() -> Self {
        let shared = Arc::new(Shared::default());
        Self {
            ours: Waker::from(Arc::clone(&shared)),
            shared,
            task: None,
            armed: false,
        }
    }

    /// The waker to poll the socket with, after making sure it wakes the task polling now.
    pub(super) fn waker(&mut self, cx: &Context<'_>) -> &Waker {
        self.follow(cx);
        &self.ours
    }

    /// Make sure our waker wakes the task polling now.
    fn follow(&mut self, cx: &Context<'_>) {
        if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *self
                .shared
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            self.task = Some(task);
        }
    }

    /// Whether a read may find something: none was pending since our waker was last woken. When
    /// not, the task polling now is the one our waker wakes.
    pub(super) fn may_read(&mut self, cx: &Context<'_>) -> bool {
        self.follow(cx);
        // A load first: the common answer (armed, not woken) takes no locked instruction.
        if self.armed
            && !(self.shared.woken.load(Ordering::Acquire)
                && self.shared.woken.swap(false, Ordering::AcqRel))
        {
            return false;
        }
        self.armed = false;
        true
    }

    /// A read polled with [`waker`](Self::waker) was pending: tokio holds our waker and wakes it when
    /// the socket has something to read. (A read refused for want of coop budget registers nothing,
    /// but wakes the waker it was given at once, so the next [`may_read`](Self::may_read) says yes.)
    pub(super) fn pending(&mut self) {
        self.armed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_waker::Count;

    #[test]
    fn reads_until_pending_then_only_once_woken() {
        let count = Count::new();
        let task = Waker::from(Arc::clone(&count));
        let cx = Context::from_waker(&task);
        let mut g = GoneWatch::new();
        let ours = g.waker(&cx).clone();
        assert!(g.may_read(&cx), "never read");
        assert!(g.may_read(&cx), "no read was pending yet");
        g.pending();
        assert!(!g.may_read(&cx), "pending, not woken");
        assert!(!g.may_read(&cx));
        ours.wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(g.may_read(&cx), "woken");
        assert!(g.may_read(&cx), "until a read is pending again");
        g.pending();
        assert!(!g.may_read(&cx));
    }

    #[test]
    fn a_new_task_waker_is_the_one_woken() {
        let first = Count::new();
        let second = Count::new();
        let mut g = GoneWatch::new();
        let w1 = Waker::from(Arc::clone(&first));
        let ours = g.waker(&Context::from_waker(&w1)).clone();
        g.pending();
        let w2 = Waker::from(Arc::clone(&second));
        assert!(!g.may_read(&Context::from_waker(&w2)), "pending, not woken");
        ours.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
