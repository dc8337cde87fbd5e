//! Time limits on a shard's futures.
//!
//! Every read that a client or an origin may stall has a limit, so this sits on the hot path
//! of every request. The timer is armed only when the future first has to wait: a read that
//! finds its bytes already in the socket never touches the executor's timer wheel.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use glommio::timer::Timer;

pin_project_lite::pin_project! {
    /// The future returned by [`with_timeout`].
    pub struct WithTimeout<F> {
        #[pin]
        future: F,
        limit: Duration,
        timer: Option<Timer>,
    }
}

/// Runs `future` for at most `limit`, counted from the first time it has to wait:
/// `Some(output)` if it finished in time, `None` if the limit passed first.
pub fn with_timeout<F: Future>(limit: Duration, future: F) -> WithTimeout<F> {
    WithTimeout {
        future,
        limit,
        timer: None,
    }
}

impl<F: Future> Future for WithTimeout<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }

        let limit = *this.limit;
        let timer = this.timer.get_or_insert_with(|| Timer::new(limit));
        match Pin::new(timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn ready_futures_finish_and_stalled_ones_time_out() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                assert_eq!(
                    with_timeout(Duration::from_millis(1), async { 7 }).await,
                    Some(7)
                );

                let quick = async {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                    "done"
                };
                assert_eq!(
                    with_timeout(Duration::from_secs(5), quick).await,
                    Some("done")
                );

                let started = Instant::now();
                let stalled = std::future::pending::<()>();
                assert_eq!(with_timeout(Duration::from_millis(30), stalled).await, None);
                let waited = started.elapsed();
                assert!(
                    waited >= Duration::from_millis(30),
                    "gave up after {waited:?}"
                );
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
