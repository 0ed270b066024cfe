//! Which stripe of a striped count the calling thread uses.
//!
//! State that every request updates (a bulkhead's free slots, a
//! gateway's request counters) is split into [`STRIPES`] cache lines, and
//! each thread keeps to one: threads are given stripes in turn as they
//! first ask, so a few worker threads get one each and never write the
//! same line on the request path.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Stripes per striped count.
pub const STRIPES: usize = 8;

/// The calling thread's stripe, below [`STRIPES`].
pub fn index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|stripe| {
        let mut index = stripe.get();
        if index == usize::MAX {
            index = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            stripe.set(index);
        }
        index
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_stripe_and_the_next_threads_get_others() {
        let mine = index();
        assert_eq!(index(), mine);
        let others: Vec<usize> = (0..STRIPES - 1)
            .map(|_| std::thread::spawn(index).join().unwrap())
            .collect();
        assert!(others.iter().all(|&s| s < STRIPES));
        let mut all = others.clone();
        all.push(mine);
        all.sort_unstable();
        all.dedup();
        // Threads of other tests may take stripes meanwhile; most differ.
        assert!(all.len() >= STRIPES / 2, "{all:?}");
    }
}
