//! Graceful shutdown within one shard: stop accepting, let in-flight requests finish.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A shard-local, single-threaded "we are shutting down" signal plus a count of open
/// connections. Futures waiting on it are woken once, when draining starts.
///
/// Every idle keep-alive connection waits on it between requests, so a waiter must cost
/// O(1) to register and must leave when its future is dropped: a waker that stayed behind
/// would keep its finished connection task allocated for the life of the process.
#[derive(Default)]
pub struct DrainSignal {
    draining: Cell<bool>,
    waiters: RefCell<Waiters>,
    connections: Cell<usize>,
}

/// Registered wakers by slot; freed slots are reused.
#[derive(Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Waiters {
    fn insert(&mut self, waker: Waker) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(waker);
                slot
            }
            None => {
                self.slots.push(Some(waker));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(entry) = self.slots.get_mut(slot) {
            if entry.take().is_some() {
                self.free.push(slot);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl DrainSignal {
    pub fn start(&self) {
        if self.draining.replace(true) {
            return;
        }

        // Take the wakers out before waking: a woken future is dropped later, and its
        // `remove` must find the slot already empty rather than a borrowed list.
        let woken: Vec<Waker> = {
            let mut waiters = self.waiters.borrow_mut();
            waiters.free.clear();
            waiters.slots.drain(..).flatten().collect()
        };
        for waker in woken {
            waker.wake();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Resolves when draining starts (immediately if it already has).
    pub fn wait(&self) -> DrainWait<'_> {
        DrainWait {
            signal: self,
            slot: None,
        }
    }

    /// Futures currently registered to be woken by `start`.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiters.borrow().len()
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
    /// This future's slot among the waiters, once it has been polled.
    slot: Option<usize>,
}

impl Future for DrainWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let signal = self.signal;
        if signal.draining.get() {
            return Poll::Ready(());
        }

        let mut waiters = signal.waiters.borrow_mut();
        match self.slot {
            Some(slot) => match &mut waiters.slots[slot] {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                entry => *entry = Some(cx.waker().clone()),
            },
            None => self.slot = Some(waiters.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for DrainWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.signal.waiters.borrow_mut().remove(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_once(future: &mut Pin<Box<DrainWait<'_>>>, waker: &Waker) -> Poll<()> {
        future.as_mut().poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn dropped_waiters_leave_and_their_slots_are_reused() {
        let signal = DrainSignal::default();
        let counter = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());

        // One keep-alive connection (a task with its own waker) after another waits between
        // requests and goes away.
        for _ in 0..10_000 {
            let task = Waker::from(Arc::new(CountWakes(AtomicUsize::new(0))));
            let mut wait = Box::pin(signal.wait());
            assert!(poll_once(&mut wait, &task).is_pending());
            assert!(poll_once(&mut wait, &task).is_pending());
            assert_eq!(signal.waiting(), 1);
        }
        assert_eq!(signal.waiting(), 0);
        assert_eq!(signal.waiters.borrow().slots.len(), 1);

        // The ones still waiting are woken once when draining starts, and then resolve.
        let mut a = Box::pin(signal.wait());
        let mut b = Box::pin(signal.wait());
        assert!(poll_once(&mut a, &waker).is_pending());
        assert!(poll_once(&mut b, &waker).is_pending());
        signal.start();
        signal.start();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert!(poll_once(&mut a, &waker).is_ready());
        drop(a);
        drop(b);
        assert_eq!(signal.waiting(), 0);
    }
}
