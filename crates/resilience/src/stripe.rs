//! Which stripe of a striped count the calling thread uses.
//!
//! State that every request updates (a bulkhead's free slots, a
//! gateway's request counters) is split into [`STRIPES`] cache lines, and
//! each thread keeps to one: a few worker threads get one each and never
//! write the same line on the request path.
//!
//! A thread that asks first takes one of the stripes past the first
//! [`SHARED`] for itself alone, for as long as it lives: its counts there
//! are plain writes ([`Stripe::add`]), not atomic read-modify-writes, which
//! cost a few nanoseconds each even uncontended. Threads that come once
//! every such stripe is taken share the first [`SHARED`], in turn, and
//! write them atomically.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per striped count.
pub const STRIPES: usize = 16;
/// The stripes that threads share (the others are one thread's each).
pub const SHARED: usize = 4;

/// Set in a [`Stripe`] that only its thread writes.
const OWN: usize = 1 << (usize::BITS - 1);
/// The stripes that are one thread's own now, a bit each.
static OWNED: AtomicUsize = AtomicUsize::new(0);
/// The next shared stripe to give out.
static NEXT_SHARED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The thread's stripe, `usize::MAX` until it first asks.
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Gives the thread's own stripe back when it ends.
    static CLAIM: Claim = const { Claim(Cell::new(None)) };
}

/// The calling thread's stripe: its index, and whether the thread has it
/// to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stripe(usize);

/// The calling thread's stripe.
pub fn current() -> Stripe {
    STRIPE.with(|stripe| {
        let mut value = stripe.get();
        if value == usize::MAX {
            value = take();
            stripe.set(value);
        }
        Stripe(value)
    })
}

/// The calling thread's stripe's index, below [`STRIPES`].
pub fn index() -> usize {
    current().index()
}

/// A stripe for a thread asking first: one of its own if one is free.
fn take() -> usize {
    let mut owned = OWNED.load(Ordering::Relaxed);
    loop {
        let free = !owned & !((1 << SHARED) - 1) & ((1 << STRIPES) - 1);
        if free == 0 {
            return NEXT_SHARED.fetch_add(1, Ordering::Relaxed) % SHARED;
        }
        let index = free.trailing_zeros() as usize;
        // Acquire: what the stripe's last owner wrote is seen here.
        match OWNED.compare_exchange_weak(
            owned,
            owned | 1 << index,
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                // A thread ending as it asks (its slots already gone)
                // shares instead.
                if CLAIM.try_with(|claim| claim.0.set(Some(index))).is_err() {
                    OWNED.fetch_and(!(1 << index), Ordering::Release);
                    return index % SHARED;
                }
                return index | OWN;
            }
            Err(now) => owned = now,
        }
    }
}

/// A thread's own stripe, given back when the thread ends.
struct Claim(Cell<Option<usize>>);

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(index) = self.0.take() {
            // Counts made later in the thread's ending go to a shared
            // stripe, atomically.
            let _ = STRIPE.try_with(|stripe| stripe.set(index % SHARED));
            // Release: the next owner sees this thread's counts.
            OWNED.fetch_and(!(1 << index), Ordering::Release);
        }
    }
}

impl Stripe {
    /// Its index, below [`STRIPES`].
    pub fn index(self) -> usize {
        self.0 & !OWN
    }

    /// Whether only the calling thread writes this stripe.
    pub fn is_own(self) -> bool {
        self.0 & OWN != 0
    }

    /// Adds `n` to `cell`, one of this stripe's counts.
    pub fn add(self, cell: &AtomicU64, n: u64) {
        self.fetch_add(cell, n);
    }

    /// Adds `n` to `cell`, one of this stripe's counts, and returns what
    /// it held before.
    pub fn fetch_add(self, cell: &AtomicU64, n: u64) -> u64 {
        if self.is_own() {
            // No other thread writes it: readers see the old count or the new.
            let before = cell.load(Ordering::Relaxed);
            cell.store(before.wrapping_add(n), Ordering::Relaxed);
            before
        } else {
            cell.fetch_add(n, Ordering::Relaxed)
        }
    }

    /// Sets `cell`, one of this stripe's, to `f` of it (unchanged when `f`
    /// says `None`).
    pub fn update(self, cell: &AtomicU64, mut f: impl FnMut(u64) -> Option<u64>) {
        if self.is_own() {
            if let Some(next) = f(cell.load(Ordering::Relaxed)) {
                cell.store(next, Ordering::Relaxed);
            }
        } else {
            let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_stripe_and_the_next_threads_get_others() {
        let mine = current();
        assert_eq!(current(), mine);
        assert_eq!(index(), mine.index());
        let others: Vec<Stripe> = (0..STRIPES - SHARED - 1)
            .map(|_| std::thread::spawn(current).join().unwrap())
            .collect();
        assert!(others.iter().all(|s| s.index() < STRIPES));
        // Threads of other tests may take stripes meanwhile; most differ.
        let mut all: Vec<usize> = others.iter().map(|s| s.index()).collect();
        all.push(mine.index());
        all.sort_unstable();
        all.dedup();
        assert!(all.len() >= 2, "{all:?}");
    }

    #[test]
    fn own_stripes_are_one_live_thread_s_and_come_back_when_it_ends() {
        // Threads that live at once: each own stripe is one thread's.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let wait = std::sync::Arc::new(std::sync::Mutex::new(wait));
        let (tell, stripes) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..STRIPES + 4)
            .map(|_| {
                let (tell, wait) = (tell.clone(), wait.clone());
                std::thread::spawn(move || {
                    tell.send(current()).unwrap();
                    let _ = wait.lock().unwrap().recv();
                })
            })
            .collect();
        let stripes: Vec<Stripe> = stripes.iter().take(STRIPES + 4).collect();
        let mut own: Vec<usize> = stripes
            .iter()
            .filter(|s| s.is_own())
            .map(|s| s.index())
            .collect();
        let count = own.len();
        own.sort_unstable();
        own.dedup();
        assert_eq!(own.len(), count, "an own stripe given twice: {stripes:?}");
        assert!(own.iter().all(|&i| (SHARED..STRIPES).contains(&i)));
        assert!(stripes
            .iter()
            .filter(|s| !s.is_own())
            .all(|s| s.index() < SHARED));
        // More threads than stripes: some share.
        assert!(stripes.iter().any(|s| !s.is_own()));
        drop(go);
        for thread in threads {
            thread.join().unwrap();
        }
        // Their stripes came back: a new thread gets one of its own.
        let later = std::thread::spawn(current).join().unwrap();
        assert!(later.is_own(), "{later:?}");
    }

    #[test]
    fn counts_add_up_on_own_and_shared_stripes() {
        let cell = AtomicU64::new(0);
        Stripe(5 | OWN).add(&cell, 3);
        Stripe(1).add(&cell, 4);
        Stripe(5 | OWN).update(&cell, |n| Some(n * 2));
        Stripe(1).update(&cell, |_| None);
        assert_eq!(cell.load(Ordering::Relaxed), 14);
    }
}
