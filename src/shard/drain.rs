//! Graceful shutdown within one shard: stop accepting, let in-flight requests finish.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A shard-local, single-threaded "we are shutting down" signal plus a count of open
/// connections. Futures waiting on it are woken once, when draining starts.
#[derive(Default)]
pub struct DrainSignal {
    draining: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
    connections: Cell<usize>,
}

impl DrainSignal {
    pub fn start(&self) {
        if self.draining.replace(true) {
            return;
        }
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Resolves when draining starts (immediately if it already has).
    pub fn wait(&self) -> DrainWait<'_> {
        DrainWait { signal: self }
    }

    pub fn connection_started(&self) {
        self.connections.set(self.connections.get() + 1);
    }

    pub fn connection_finished(&self) {
        self.connections
            .set(self.connections.get().saturating_sub(1));
    }

    /// Waits until every connection of this shard has finished, or `limit` has passed.
    pub async fn wait_idle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.connections.get() > 0 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub struct DrainWait<'a> {
    signal: &'a DrainSignal,
}

impl Future for DrainWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.draining.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
