//! Exponential backoff for every retry loop: reconnecting to the broker,
//! republishing what it refused, redelivering to a peer, retrying an insert.

use std::time::Duration;

/// Waits that double from `first` up to `max`, and start over on
/// [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

/// From [`Backoff::FIRST`] to 10 s.
impl Default for Backoff {
    fn default() -> Self {
        let first = Self::FIRST;
        Self {
            first,
            max: Duration::from_secs(10),
            next: first,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    #[error("the first wait must be longer than zero")]
    ZeroFirst,
    #[error("the longest wait ({max:?}) must not be shorter than the first ({first:?})")]
    MaxBelowFirst { first: Duration, max: Duration },
}

impl Backoff {
    /// The first retries of every loop come quickly: most outages are a
    /// restart or a dropped connection.
    pub const FIRST: Duration = Duration::from_millis(100);

    pub fn try_new(first: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if first.is_zero() {
            return Err(InvalidBackoff::ZeroFirst);
        }
        if max < first {
            return Err(InvalidBackoff::MaxBelowFirst { first, max });
        }
        Ok(Self {
            first,
            max,
            next: first,
        })
    }

    /// The wait before the next attempt; the one after it is twice as long,
    /// at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.max);
        delay
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Waits double up to the maximum and stay there; a reset starts over.
    #[test]
    fn doubles_up_to_the_maximum() {
        let mut b = Backoff::try_new(100 * MS, 1000 * MS).unwrap();
        let waits: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
    }

    /// A zero first wait (a busy loop) or a maximum below the first wait is refused.
    #[test]
    fn refuses_what_cannot_back_off() {
        assert_eq!(
            Backoff::try_new(Duration::ZERO, MS).unwrap_err(),
            InvalidBackoff::ZeroFirst
        );
        assert!(matches!(
            Backoff::try_new(2 * MS, MS),
            Err(InvalidBackoff::MaxBelowFirst { .. })
        ));
        assert!(Backoff::try_new(MS, MS).is_ok());
    }

    /// `wait` sleeps exactly the current delay, on tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_the_current_delay() {
        let mut b = Backoff::try_new(100 * MS, 150 * MS).unwrap();
        let start = tokio::time::Instant::now();
        b.wait().await;
        assert_eq!(start.elapsed(), 100 * MS);
        b.wait().await;
        assert_eq!(start.elapsed(), 250 * MS);
    }
}
