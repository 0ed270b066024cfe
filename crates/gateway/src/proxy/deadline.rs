//! The attempts' cut-offs on one timer per worker.
//!
//! A `tokio::time::timeout` per attempt costs a timer-wheel entry under
//! the time driver's lock, twice (in and out), and, whenever the driver
//! parked with no earlier timer, a write to its eventfd to wake it: one
//! system call per request on a worker that goes idle between requests.
//! [`Deadlines`] keeps the cut-offs of a worker's attempts in a slab and
//! runs one tokio timer for all of them, which a ticking task keeps set to
//! the earliest cut-off or, at the latest, a second away. A new attempt's
//! cut-off is almost never earlier than that, so registering it touches
//! no timer at all; the timer moves only for a cut-off earlier than every
//! other one (the first after a quiet second, a shorter timeout).
//!
//! A cut-off fires when the ticker runs at or after it, as soon as tokio's
//! timer would have (to its millisecond).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// The longest the ticker sleeps, cut-offs or not: it keeps one timer in
/// the driver's wheel, so that timers of a second or more never find it
/// parked without one.
const HORIZON: Duration = Duration::from_secs(1);

/// The cut-offs of one worker's attempts. Clones share them.
#[derive(Debug, Clone, Default)]
pub struct Deadlines {
    shared: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    slots: Vec<Slot>,
    /// Indexes of empty slots.
    free: Vec<u32>,
    /// The ticker, if one runs: when its timer fires, and its waker (to
    /// set that timer earlier).
    ticker: Option<Ticker>,
}

#[derive(Debug)]
struct Ticker {
    wakes_at: Instant,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct Slot {
    at: Instant,
    /// Bumped each time the slot is let go, so that a stale key finds
    /// nothing.
    generation: u32,
    state: SlotState,
}

#[derive(Debug)]
enum SlotState {
    Empty,
    Waiting(Waker),
    Passed,
}

/// A registered cut-off: its slot and the slot's generation.
#[derive(Debug, Clone, Copy)]
struct Key {
    index: u32,
    generation: u32,
}

/// The cut-off passed before the future was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl Deadlines {
    /// `future`, cut off at `at`.
    pub fn within<F: Future>(&self, at: Instant, future: F) -> Within<'_, F> {
        Within {
            deadlines: self,
            at,
            key: None,
            future,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a cut-off at `at` that wakes `waker`; starts the ticker,
    /// or sets it earlier, when it would not run by then.
    fn register(&self, at: Instant, waker: &Waker) -> Key {
        let mut state = self.lock();
        let key = state.insert(at, waker.clone());
        match &mut state.ticker {
            Some(ticker) if ticker.wakes_at <= at => {}
            Some(ticker) => {
                ticker.wakes_at = at;
                if let Some(waker) = ticker.waker.take() {
                    drop(state);
                    waker.wake();
                }
            }
            None => {
                state.ticker = Some(Ticker {
                    wakes_at: at,
                    waker: None,
                });
                drop(state);
                tokio::spawn(tick(Arc::downgrade(&self.shared)));
            }
        }
        key
    }

    /// Whether the cut-off of `key` has passed; if not, it wakes `waker`
    /// when it does.
    fn passed(&self, key: Key, waker: &Waker) -> bool {
        let mut state = self.lock();
        let slot = &mut state.slots[key.index as usize];
        debug_assert_eq!(slot.generation, key.generation);
        match &mut slot.state {
            SlotState::Passed => true,
            SlotState::Waiting(registered) => {
                if !registered.will_wake(waker) {
                    *registered = waker.clone();
                }
                false
            }
            SlotState::Empty => unreachable!("a registered cut-off's slot is not empty"),
        }
    }

    fn remove(&self, key: Key) {
        self.lock().remove(key);
    }

    /// Cut-offs registered now.
    #[cfg(test)]
    fn live(&self) -> usize {
        let state = self.lock();
        state.slots.len() - state.free.len()
    }
}

impl State {
    fn insert(&mut self, at: Instant, waker: Waker) -> Key {
        let state = SlotState::Waiting(waker);
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.at = at;
            slot.state = state;
            return Key {
                index,
                generation: slot.generation,
            };
        }
        let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 attempts at once");
        self.slots.push(Slot {
            at,
            generation: 0,
            state,
        });
        Key {
            index,
            generation: 0,
        }
    }

    fn remove(&mut self, key: Key) {
        let slot = &mut self.slots[key.index as usize];
        if slot.generation != key.generation || matches!(slot.state, SlotState::Empty) {
            return;
        }
        slot.state = SlotState::Empty;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
    }

    /// Marks the cut-offs at or before `now` as passed and takes their
    /// wakers; returns the earliest one still to come.
    fn fire(&mut self, now: Instant, woken: &mut Vec<Waker>) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for slot in &mut self.slots {
            if !matches!(slot.state, SlotState::Waiting(_)) {
                continue;
            }
            if slot.at <= now {
                if let SlotState::Waiting(waker) =
                    std::mem::replace(&mut slot.state, SlotState::Passed)
                {
                    woken.push(waker);
                }
            } else if earliest.is_none_or(|e| slot.at < e) {
                earliest = Some(slot.at);
            }
        }
        earliest
    }
}

/// The ticker: fires what has passed, sleeps until the earliest cut-off
/// (a [`HORIZON`] at most), again; it ends with the last [`Deadlines`]
/// clone, and says so when its runtime drops it, so that the next
/// cut-off starts another.
async fn tick(shared: Weak<Mutex<State>>) {
    struct Gone(Weak<Mutex<State>>);
    impl Drop for Gone {
        fn drop(&mut self) {
            if let Some(shared) = self.0.upgrade() {
                shared.lock().unwrap_or_else(|e| e.into_inner()).ticker = None;
            }
        }
    }
    let _gone = Gone(shared.clone());
    let mut woken = Vec::new();
    let sleep = tokio::time::sleep(HORIZON);
    tokio::pin!(sleep);
    loop {
        let wakes_at = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let earliest = state.fire(now, &mut woken);
            let wakes_at = earliest.map_or(now + HORIZON, |e| e.min(now + HORIZON));
            if let Some(ticker) = &mut state.ticker {
                ticker.wakes_at = wakes_at;
            }
            wakes_at
        };
        for waker in woken.drain(..) {
            waker.wake();
        }
        if sleep.deadline() != wakes_at {
            sleep.as_mut().reset(wakes_at);
        }
        // Until the timer fires or a cut-off earlier than it comes.
        std::future::poll_fn(|cx| {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let Some(shared) = shared.upgrade() else {
                return Poll::Ready(());
            };
            let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
            match &mut state.ticker {
                Some(ticker) if ticker.wakes_at < wakes_at => Poll::Ready(()),
                Some(ticker) => {
                    ticker.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                None => Poll::Ready(()),
            }
        })
        .await;
    }
}

pin_project_lite::pin_project! {
    /// A future cut off at a deadline: [`Deadlines::within`].
    pub struct Within<'a, F> {
        deadlines: &'a Deadlines,
        at: Instant,
        key: Option<Key>,
        #[pin]
        future: F,
    }

    impl<F> PinnedDrop for Within<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(key) = this.key.take() {
                this.deadlines.remove(key);
            }
        }
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            if let Some(key) = this.key.take() {
                this.deadlines.remove(key);
            }
            return Poll::Ready(Ok(output));
        }
        match *this.key {
            None => *this.key = Some(this.deadlines.register(*this.at, cx.waker())),
            Some(key) => {
                if this.deadlines.passed(key, cx.waker()) {
                    this.deadlines.remove(key);
                    *this.key = None;
                    return Poll::Ready(Err(Elapsed));
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_future_is_cut_off_at_its_deadline_to_the_millisecond() {
        let deadlines = Deadlines::default();
        let started = Instant::now();
        let at = started + Duration::from_millis(250);
        let result = deadlines.within(at, std::future::pending::<()>()).await;
        assert_eq!(result, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(deadlines.live(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_future_passes_and_lets_its_slot_go() {
        let deadlines = Deadlines::default();
        let at = Instant::now() + Duration::from_secs(10);
        let slow = tokio::time::sleep(Duration::from_millis(5));
        assert_eq!(deadlines.within(at, slow).await, Ok(()));
        assert_eq!(deadlines.live(), 0);
        // Nothing fires later for it.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(deadlines.lock().slots.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_cut_off_moves_the_timer_forward() {
        let deadlines = Deadlines::default();
        let started = Instant::now();
        let long = tokio::spawn({
            let deadlines = deadlines.clone();
            async move {
                let at = Instant::now() + Duration::from_secs(30);
                deadlines.within(at, std::future::pending::<()>()).await
            }
        });
        tokio::task::yield_now().await;
        // The ticker sleeps a second at most; this one is due sooner.
        let at = started + Duration::from_millis(40);
        assert_eq!(
            deadlines.within(at, std::future::pending::<()>()).await,
            Err(Elapsed)
        );
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        assert_eq!(long.await.unwrap(), Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn many_cut_offs_each_fire_at_their_own_time() {
        let deadlines = Deadlines::default();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in (1..=20u64).rev() {
            let deadlines = deadlines.clone();
            tasks.spawn(async move {
                let at = started + Duration::from_millis(i * 70);
                let result = deadlines.within(at, std::future::pending::<()>()).await;
                (i, result, started.elapsed())
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (i, result, elapsed) = done.unwrap();
            assert_eq!(result, Err(Elapsed));
            assert_eq!(elapsed, Duration::from_millis(i * 70));
        }
        assert_eq!(deadlines.live(), 0);
    }

    #[test]
    fn a_ticker_dropped_with_its_runtime_is_started_again_on_the_next() {
        let deadlines = Deadlines::default();
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let at = Instant::now() + Duration::from_millis(10);
                let result = deadlines.within(at, std::future::pending::<()>()).await;
                assert_eq!(result, Err(Elapsed));
            });
        }
    }

    fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        future.poll(&mut cx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_future_frees_its_slot_for_the_next() {
        let deadlines = Deadlines::default();
        let at = Instant::now() + Duration::from_secs(1);
        let mut first = Box::pin(deadlines.within(at, std::future::pending::<()>()));
        assert!(poll_once(first.as_mut()).is_pending());
        assert_eq!(deadlines.live(), 1);
        drop(first);
        assert_eq!(deadlines.live(), 0);
        let mut second = Box::pin(deadlines.within(at, std::future::pending::<()>()));
        assert!(poll_once(second.as_mut()).is_pending());
        assert_eq!(deadlines.lock().slots.len(), 1);
    }
}
