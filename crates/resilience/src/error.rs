//! The one error type every policy returns, and the rejections that feed it.

use std::fmt;
use std::time::Duration;

use crate::breaker::CircuitOpen;
use crate::bulkhead::BulkheadFull;
use crate::ratelimit::RateLimited;
use crate::throttle::Throttled;
use crate::timeout::Elapsed;

/// A boxed error, as tower layers use.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of a call made through one or more policies.
///
/// It either wraps the operation's own error (`E`) or says which policy
/// stopped the call. Ask it questions rather than matching on its text:
///
/// ```
/// use tidegate_resilience::{Error, breaker::CircuitOpen};
///
/// let err: Error<std::io::Error> = CircuitOpen::new(None).into();
/// assert!(err.is_circuit_open());
/// assert!(err.is_rejection());
/// assert!(err.inner().is_none());
/// ```
pub struct Error<E> {
    repr: Repr<E>,
}

enum Repr<E> {
    Inner(E),
    CircuitOpen(CircuitOpen),
    BulkheadFull,
    RateLimited(RateLimited),
    Throttled,
    Timeout(Duration),
    DeadlineExceeded(Duration),
    RetryExhausted { attempts: u32, last: Box<Error<E>> },
}

/// What kind of error an [`Error`] is.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The operation itself failed.
    Inner,
    /// The circuit breaker rejected the call.
    CircuitOpen,
    /// The bulkhead was full (or the wait for a slot ran out).
    BulkheadFull,
    /// A rate limiter rejected the call.
    RateLimited,
    /// Adaptive throttling rejected the call locally.
    Throttled,
    /// One attempt ran longer than its timeout.
    Timeout,
    /// The overall deadline passed.
    DeadlineExceeded,
    /// Retries ran out; the last error is kept.
    RetryExhausted,
}

impl ErrorKind {
    /// A stable snake_case name, for metric labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Inner => "inner",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::BulkheadFull => "bulkhead_full",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Timeout => "timeout",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::RetryExhausted => "retry_exhausted",
        }
    }
}

impl<E> Error<E> {
    /// Wraps the operation's own error.
    pub fn inner_error(err: E) -> Self {
        Error {
            repr: Repr::Inner(err),
        }
    }

    pub(crate) fn timeout(after: Duration) -> Self {
        Error {
            repr: Repr::Timeout(after),
        }
    }

    pub(crate) fn deadline_exceeded(after: Duration) -> Self {
        Error {
            repr: Repr::DeadlineExceeded(after),
        }
    }

    pub(crate) fn retry_exhausted(attempts: u32, last: Error<E>) -> Self {
        Error {
            repr: Repr::RetryExhausted {
                attempts,
                last: Box::new(last),
            },
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        match &self.repr {
            Repr::Inner(_) => ErrorKind::Inner,
            Repr::CircuitOpen(_) => ErrorKind::CircuitOpen,
            Repr::BulkheadFull => ErrorKind::BulkheadFull,
            Repr::RateLimited(_) => ErrorKind::RateLimited,
            Repr::Throttled => ErrorKind::Throttled,
            Repr::Timeout(_) => ErrorKind::Timeout,
            Repr::DeadlineExceeded(_) => ErrorKind::DeadlineExceeded,
            Repr::RetryExhausted { .. } => ErrorKind::RetryExhausted,
        }
    }

    /// The circuit breaker rejected the call.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self.repr, Repr::CircuitOpen(_))
    }

    /// The bulkhead had no free slot and no room in its queue, or the wait ran out.
    pub fn is_bulkhead_full(&self) -> bool {
        matches!(self.repr, Repr::BulkheadFull)
    }

    /// A rate limiter rejected the call; see [`Error::retry_after`].
    pub fn is_rate_limited(&self) -> bool {
        matches!(self.repr, Repr::RateLimited(_))
    }

    /// Adaptive throttling rejected the call locally.
    pub fn is_throttled(&self) -> bool {
        matches!(self.repr, Repr::Throttled)
    }

    /// An attempt timed out, or the overall deadline passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self.repr, Repr::Timeout(_) | Repr::DeadlineExceeded(_))
    }

    /// The overall deadline passed (a kind of timeout).
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self.repr, Repr::DeadlineExceeded(_))
    }

    /// Retries ran out; see [`Error::attempts`] and [`Error::last_error`].
    pub fn is_retry_exhausted(&self) -> bool {
        matches!(self.repr, Repr::RetryExhausted { .. })
    }

    /// The call was refused locally by a policy and never reached the
    /// upstream: never an upstream failure, and not retried by default.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self.repr,
            Repr::CircuitOpen(_) | Repr::BulkheadFull | Repr::RateLimited(_) | Repr::Throttled
        )
    }

    /// When to try again, if the policy that rejected the call knows:
    /// the rate limiter's retry-after, or the time until the breaker probes.
    /// For exhausted retries, the hint of the last error.
    pub fn retry_after(&self) -> Option<Duration> {
        match &self.repr {
            Repr::CircuitOpen(open) => open.retry_after(),
            Repr::RateLimited(limited) => limited.retry_after(),
            Repr::RetryExhausted { last, .. } => last.retry_after(),
            _ => None,
        }
    }

    /// The rate-limit decision behind a rejection, for `X-RateLimit-*` headers.
    pub fn rate_limited(&self) -> Option<&RateLimited> {
        match &self.repr {
            Repr::RateLimited(limited) => Some(limited),
            _ => None,
        }
    }

    /// How many attempts were made, for exhausted retries.
    pub fn attempts(&self) -> Option<u32> {
        match &self.repr {
            Repr::RetryExhausted { attempts, .. } => Some(*attempts),
            _ => None,
        }
    }

    /// The error of the last attempt, for exhausted retries.
    pub fn last_error(&self) -> Option<&Error<E>> {
        match &self.repr {
            Repr::RetryExhausted { last, .. } => Some(last),
            _ => None,
        }
    }

    /// The operation's own error, looking through exhausted retries.
    pub fn inner(&self) -> Option<&E> {
        match &self.repr {
            Repr::Inner(e) => Some(e),
            Repr::RetryExhausted { last, .. } => last.inner(),
            _ => None,
        }
    }

    /// Takes the operation's own error, looking through exhausted retries.
    pub fn into_inner(self) -> Option<E> {
        match self.repr {
            Repr::Inner(e) => Some(e),
            Repr::RetryExhausted { last, .. } => last.into_inner(),
            _ => None,
        }
    }

    /// Maps the operation's error, keeping what the policies said.
    pub fn map_inner<F, E2>(self, f: F) -> Error<E2>
    where
        F: FnOnce(E) -> E2,
    {
        let repr = match self.repr {
            Repr::Inner(e) => Repr::Inner(f(e)),
            Repr::CircuitOpen(o) => Repr::CircuitOpen(o),
            Repr::BulkheadFull => Repr::BulkheadFull,
            Repr::RateLimited(r) => Repr::RateLimited(r),
            Repr::Throttled => Repr::Throttled,
            Repr::Timeout(d) => Repr::Timeout(d),
            Repr::DeadlineExceeded(d) => Repr::DeadlineExceeded(d),
            Repr::RetryExhausted { attempts, last } => Repr::RetryExhausted {
                attempts,
                last: Box::new(last.map_inner(f)),
            },
        };
        Error { repr }
    }
}

impl Error<BoxError> {
    /// Turns a tower layer's boxed error back into an [`Error`], recognising
    /// the rejections of this crate's layers, so the same questions work.
    pub fn from_box(err: BoxError) -> Self {
        let err = match err.downcast::<CircuitOpen>() {
            Ok(open) => return (*open).into(),
            Err(err) => err,
        };
        let err = match err.downcast::<RateLimited>() {
            Ok(limited) => return (*limited).into(),
            Err(err) => err,
        };
        let err = match err.downcast::<Elapsed>() {
            Ok(elapsed) => return (*elapsed).into(),
            Err(err) => err,
        };
        if err.is::<BulkheadFull>() {
            return BulkheadFull.into();
        }
        if err.is::<Throttled>() {
            return Throttled.into();
        }
        Error::inner_error(err)
    }
}

impl<E> From<CircuitOpen> for Error<E> {
    fn from(open: CircuitOpen) -> Self {
        Error {
            repr: Repr::CircuitOpen(open),
        }
    }
}

impl<E> From<BulkheadFull> for Error<E> {
    fn from(_: BulkheadFull) -> Self {
        Error {
            repr: Repr::BulkheadFull,
        }
    }
}

impl<E> From<RateLimited> for Error<E> {
    fn from(limited: RateLimited) -> Self {
        Error {
            repr: Repr::RateLimited(limited),
        }
    }
}

impl<E> From<Throttled> for Error<E> {
    fn from(_: Throttled) -> Self {
        Error {
            repr: Repr::Throttled,
        }
    }
}

impl<E> From<Elapsed> for Error<E> {
    fn from(elapsed: Elapsed) -> Self {
        if elapsed.is_deadline() {
            Error::deadline_exceeded(elapsed.after())
        } else {
            Error::timeout(elapsed.after())
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Inner(e) => f.debug_tuple("Inner").field(e).finish(),
            Repr::CircuitOpen(o) => f.debug_tuple("CircuitOpen").field(o).finish(),
            Repr::BulkheadFull => f.write_str("BulkheadFull"),
            Repr::RateLimited(r) => f.debug_tuple("RateLimited").field(r).finish(),
            Repr::Throttled => f.write_str("Throttled"),
            Repr::Timeout(d) => f.debug_tuple("Timeout").field(d).finish(),
            Repr::DeadlineExceeded(d) => f.debug_tuple("DeadlineExceeded").field(d).finish(),
            Repr::RetryExhausted { attempts, last } => f
                .debug_struct("RetryExhausted")
                .field("attempts", attempts)
                .field("last", last)
                .finish(),
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Inner(e) => e.fmt(f),
            Repr::CircuitOpen(o) => o.fmt(f),
            Repr::BulkheadFull => BulkheadFull.fmt(f),
            Repr::RateLimited(r) => r.fmt(f),
            Repr::Throttled => Throttled.fmt(f),
            Repr::Timeout(d) => write!(f, "attempt timed out after {d:?}"),
            Repr::DeadlineExceeded(d) => write!(f, "deadline of {d:?} exceeded"),
            Repr::RetryExhausted { attempts, last } => {
                write!(f, "gave up after {attempts} attempts: {last}")
            }
        }
    }
}

impl<E> std::error::Error for Error<E>
where
    E: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.repr {
            Repr::Inner(e) => Some(e),
            Repr::RetryExhausted { last, .. } => Some(&**last),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn exhausted_retries_keep_the_last_error() {
        let last = Error::inner_error(io::Error::other("boom"));
        let err = Error::retry_exhausted(3, last);
        assert!(err.is_retry_exhausted());
        assert_eq!(err.attempts(), Some(3));
        assert_eq!(err.last_error().map(Error::kind), Some(ErrorKind::Inner));
        assert_eq!(err.inner().map(|e| e.to_string()), Some("boom".into()));
        assert_eq!(err.to_string(), "gave up after 3 attempts: boom");
    }

    #[test]
    fn boxed_rejections_are_recognised() {
        let boxed: BoxError = Box::new(CircuitOpen::new(Some(Duration::from_secs(7))));
        let err = Error::from_box(boxed);
        assert!(err.is_circuit_open());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));

        let boxed: BoxError = Box::new(BulkheadFull);
        assert!(Error::from_box(boxed).is_bulkhead_full());

        let boxed: BoxError = Box::new(io::Error::other("x"));
        assert_eq!(Error::from_box(boxed).kind(), ErrorKind::Inner);
    }
}
