//! Counters and histograms that several threads update at once without
//! sharing a cache line: each thread adds to a stripe of its own, and a
//! scrape adds the stripes up.
//!
//! prometheus-client's `Counter` is one atomic and its `Histogram` one
//! lock: every worker answering a request of the same route writes the
//! same cache line, which then moves between cores on every request. Here
//! a thread keeps to one of [`STRIPES`] lines (see
//! [`tidegate_resilience::stripe`]), most often one of its own that it
//! writes without an atomic read-modify-write, and the sum is read only
//! when `/metrics` is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

pub use tidegate_resilience::stripe::{current as stripe, STRIPES};

/// A histogram's buckets at most (its bounds, and one past the last).
const MAX_BUCKETS: usize = 24;

/// One cache line (two, for adjacent-line prefetch) per stripe.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Line(pub(crate) AtomicU64);

/// A counter, striped. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct StripedCounter {
    stripes: Arc<[Line; STRIPES]>,
}

impl StripedCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        let stripe = stripe();
        stripe.add(&self.stripes[stripe.index()].0, n);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|line| line.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl TypedMetric for StripedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for StripedCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge that goes up and down, striped: a thread may take it down on
/// another stripe than the one it went up on; the sum is right all the same.
#[derive(Debug, Default)]
pub struct StripedGauge {
    stripes: [Line; STRIPES],
}

impl StripedGauge {
    /// Adds one.
    pub fn inc(&self) {
        let stripe = stripe();
        stripe.add(&self.stripes[stripe.index()].0, 1);
    }

    /// Takes one away.
    pub fn dec(&self) {
        let stripe = stripe();
        stripe.add(&self.stripes[stripe.index()].0, 1u64.wrapping_neg());
    }

    /// The value.
    pub fn get(&self) -> i64 {
        let sum = self
            .stripes
            .iter()
            .map(|line| line.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add);
        sum as i64
    }
}

/// One stripe of a histogram: its buckets' counts and its sum.
#[derive(Debug)]
#[repr(align(128))]
struct Cells {
    buckets: [AtomicU64; MAX_BUCKETS],
    /// The sum's `f64` bits.
    sum: AtomicU64,
}

impl Default for Cells {
    fn default() -> Self {
        Cells {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

/// A histogram, striped: the same buckets as prometheus-client's (each
/// observation counted in the first bound at or above it, one more
/// bucket past the last bound). Clones share it.
#[derive(Debug, Clone)]
pub struct StripedHistogram {
    bounds: Arc<[f64]>,
    stripes: Arc<[Cells; STRIPES]>,
}

impl StripedHistogram {
    /// A histogram with these upper bounds (ascending; at most 23).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Arc<[f64]> = bounds.into_iter().collect();
        assert!(
            bounds.len() < MAX_BUCKETS,
            "at most {} bounds",
            MAX_BUCKETS - 1
        );
        StripedHistogram {
            bounds,
            stripes: Arc::new(std::array::from_fn(|_| Cells::default())),
        }
    }

    /// Counts `value`.
    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        let stripe = stripe();
        let cells = &self.stripes[stripe.index()];
        stripe.add(&cells.buckets[bucket], 1);
        stripe.update(&cells.sum, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    /// The sum, the count and each bucket's own count.
    pub fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .map(|bound| (bound, 0))
            .collect();
        let mut sum = 0.0;
        for cells in self.stripes.iter() {
            sum += f64::from_bits(cells.sum.load(Ordering::Relaxed));
            for (bucket, cell) in buckets.iter_mut().zip(&cells.buckets) {
                bucket.1 += cell.load(Ordering::Relaxed);
            }
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (sum, count, buckets)
    }
}

impl TypedMetric for StripedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for StripedHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.get();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn text(
        name: &str,
        metric: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static,
    ) -> String {
        let mut registry = Registry::default();
        registry.register(name, "help", metric);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let counter = StripedCounter::default();
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.inc();
                    }
                    counter.inc_by(5);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(counter.get(), 12 * 1005);
    }

    #[test]
    fn a_gauge_taken_down_on_other_threads_adds_up() {
        let gauge = Arc::new(StripedGauge::default());
        let up: Vec<_> = (0..6)
            .map(|_| {
                let gauge = gauge.clone();
                std::thread::spawn(move || (0..100).for_each(|_| gauge.inc()))
            })
            .collect();
        up.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(gauge.get(), 600);
        let down: Vec<_> = (0..4)
            .map(|_| {
                let gauge = gauge.clone();
                std::thread::spawn(move || (0..150).for_each(|_| gauge.dec()))
            })
            .collect();
        down.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn a_striped_histogram_reads_as_prometheus_clients_does() {
        // Powers of two, so that the sum is exact in any order.
        let bounds = || [0.0009765625, 0.001953125, 0.00390625, 0.0078125];
        let striped = StripedHistogram::new(bounds());
        let reference = Histogram::new(bounds());
        let values = [
            0.0,
            0.00048828125,
            0.0009765625,
            0.001953125,
            0.0078125,
            0.5,
            16.0,
        ];
        let threads: Vec<_> = values
            .iter()
            .map(|&v| {
                let striped = striped.clone();
                std::thread::spawn(move || striped.observe(v))
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        for v in values {
            reference.observe(v);
        }
        assert_eq!(text("d", striped), text("d", reference));
        let counter = StripedCounter::default();
        counter.inc_by(3);
        let reference = prometheus_client::metrics::counter::Counter::<u64>::default();
        reference.inc_by(3);
        assert_eq!(text("c", counter), text("c", reference));
    }
}
