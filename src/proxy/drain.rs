//! The drain deadline: one signal at shutdown that every open stream watches on every poll.
//!
//! A `CancellationToken` would do, but asking it costs a mutex per poll (its `is_cancelled`) plus the
//! `Notify` waiter lock, on each `Pending` of every stream. Here a stream pays one atomic load per poll;
//! it registers its waker with the `Notify` only on its first poll and whenever the waker changes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// Fired once, when the drain timeout passes during shutdown.
#[derive(Debug, Default)]
pub(crate) struct DrainDeadline {
    fired: AtomicBool,
    notify: Arc<Notify>,
}

impl DrainDeadline {
    /// End every open stream: they see the flag at their next poll, and the wake makes that poll happen.
    pub(crate) fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// A watch for one stream. Created before `fire`, it sees the fire even if never polled before.
    pub(crate) fn watch(self: &Arc<Self>) -> DrainWatch {
        DrainWatch {
            notified: Box::pin(self.notify.clone().notified_owned()),
            deadline: self.clone(),
            waker: None,
        }
    }
}

/// See [`DrainDeadline::watch`].
pub(crate) struct DrainWatch {
    deadline: Arc<DrainDeadline>,
    notified: Pin<Box<OwnedNotified>>,
    /// The waker last registered with the `Notify`.
    waker: Option<Waker>,
}

impl std::fmt::Debug for DrainWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainWatch")
            .field("fired", &self.deadline.fired.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl DrainWatch {
    /// `Ready` once the deadline fired; otherwise `cx`'s task is woken when it does.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deadline.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        // Registered with this very waker: `fire` wakes it, and the load above sees the flag then.
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        if self.notified.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_waker::Count;

    #[test]
    fn a_registered_watch_is_woken_and_sees_the_fire() {
        let d = Arc::new(DrainDeadline::default());
        let mut w = d.watch();
        let count = Count::new();
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(w.poll(&mut cx).is_pending());
        // The cheap path: same waker, nothing fired.
        assert!(w.poll(&mut cx).is_pending());
        d.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "fire wakes the stream");
        assert!(w.poll(&mut cx).is_ready());
    }

    #[test]
    fn a_watch_never_polled_before_the_fire_is_ready() {
        let d = Arc::new(DrainDeadline::default());
        let mut w = d.watch();
        d.fire();
        let waker = Waker::from(Count::new());
        assert!(w.poll(&mut Context::from_waker(&waker)).is_ready());
        // And one made after the fire.
        assert!(d.watch().poll(&mut Context::from_waker(&waker)).is_ready());
    }

    #[test]
    fn a_new_waker_is_registered_and_the_old_one_is_not_woken() {
        let d = Arc::new(DrainDeadline::default());
        let mut w = d.watch();
        let old = Count::new();
        let new = Count::new();
        let old_waker = Waker::from(old.clone());
        let new_waker = Waker::from(new.clone());
        assert!(w.poll(&mut Context::from_waker(&old_waker)).is_pending());
        assert!(w.poll(&mut Context::from_waker(&new_waker)).is_pending());
        d.fire();
        assert_eq!(new.0.load(Ordering::SeqCst), 1);
        assert_eq!(old.0.load(Ordering::SeqCst), 0);
    }
}
