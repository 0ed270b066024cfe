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
//! A connection that waits for one thing at a time (an HTTP/1 connection
//! for its next head) keeps an [`Alarm`] instead: registered once, then
//! armed and disarmed for each wait with an atomic store, no lock and no
//! waker clone; the ticker reads it on each of its runs.
//!
//! A cut-off fires when the ticker runs at or after it, as soon as tokio's
//! timer would have (to its millisecond).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Alarms keep their instants as readings of this clock.
    clock: Clock,
    /// When the ticker runs next, as a [`Clock`] reading: never later,
    /// and [`Clock::NOT_TICKING`] while no ticker runs. An alarm armed
    /// for this or later needs no word with the ticker.
    ticks_at: AtomicU64,
    state: Mutex<State>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            clock: Clock {
                epoch: Instant::now(),
            },
            ticks_at: AtomicU64::new(Clock::NOT_TICKING),
            state: Mutex::new(State::default()),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    slots: Vec<Slot>,
    /// Indexes of empty slots.
    free: Vec<u32>,
    /// The alarms registered; the ticker lets go of those whose
    /// [`Alarm`] has gone.
    alarms: Vec<Arc<AlarmSlot>>,
    /// The ticker, if one runs: when its timer fires, and its waker (to
    /// set that timer earlier).
    ticker: Option<Ticker>,
}

#[derive(Debug)]
struct Ticker {
    wakes_at: Instant,
    waker: Option<Waker>,
}

/// Instants as nanoseconds after an epoch, so that an alarm's cut-off
/// fits an atomic. `0` and `u64::MAX` are not instants.
#[derive(Debug, Clone, Copy)]
struct Clock {
    epoch: Instant,
}

impl Clock {
    /// An alarm that is not armed.
    const DISARMED: u64 = 0;
    /// An alarm whose cut-off has passed.
    const FIRED: u64 = u64::MAX;
    /// The ticker's next run, when none runs.
    const NOT_TICKING: u64 = u64::MAX;
    /// The latest instant a reading holds.
    const LAST: u64 = u64::MAX - 1;

    fn instant(self, reading: u64) -> Instant {
        self.epoch + Duration::from_nanos(reading - 1)
    }

    fn reading(self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        // Instants before the epoch have passed: the first reading.
        u64::try_from(nanos).map_or(Self::LAST, |n| n.saturating_add(1).min(Self::LAST))
    }
}

/// An alarm's shared half: its cut-off ([`Clock`] reading) and the waker
/// it wakes.
#[derive(Debug)]
struct AlarmSlot {
    at: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl AlarmSlot {
    /// Makes `waker` the one woken, unless `kept` (the alarm's copy of
    /// the one held) wakes the same task: a lock only when it changes.
    fn keep(&self, kept: &mut Option<Waker>, waker: &Waker) {
        if !kept.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            *kept = Some(waker.clone());
        }
    }
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

    /// An alarm for one wait at a time, registered at its first use.
    pub fn alarm(&self) -> Alarm {
        Alarm {
            deadlines: self.clone(),
            slot: None,
            waker: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Registers a cut-off at `at` that wakes `waker`; starts the ticker,
    /// or sets it earlier, when it would not run by then.
    fn register(&self, at: Instant, waker: &Waker) -> Key {
        let mut state = self.lock();
        let key = state.insert(at, waker.clone());
        self.run_ticker_by(at, state);
        key
    }

    /// Sees that the ticker runs by `at`: starts it, or sets its timer
    /// earlier.
    fn run_ticker_by(&self, at: Instant, mut state: MutexGuard<'_, State>) {
        match &mut state.ticker {
            Some(ticker) if ticker.wakes_at <= at => {}
            Some(ticker) => {
                ticker.wakes_at = at;
                let reading = self.shared.clock.reading(at);
                self.shared.ticks_at.store(reading, Ordering::SeqCst);
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
                let reading = self.shared.clock.reading(at);
                self.shared.ticks_at.store(reading, Ordering::SeqCst);
                drop(state);
                tokio::spawn(tick(Arc::downgrade(&self.shared)));
            }
        }
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

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Fires the alarms whose cut-off is at or before `now` (a reading)
    /// and lets go of those whose [`Alarm`] is gone; returns the earliest
    /// cut-off still to come.
    fn fire_alarms(&mut self, now: u64, woken: &mut Vec<Waker>) -> Option<u64> {
        let mut earliest: Option<u64> = None;
        self.alarms.retain(|alarm| {
            if Arc::strong_count(alarm) == 1 {
                return false;
            }
            let at = alarm.at.load(Ordering::SeqCst);
            if at == Clock::DISARMED || at == Clock::FIRED {
                return true;
            }
            if at > now {
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
                return true;
            }
            // Not if the alarm was armed anew meanwhile.
            let fired = alarm
                .at
                .compare_exchange(at, Clock::FIRED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if fired {
                let waker = alarm.waker.lock().unwrap_or_else(|e| e.into_inner());
                woken.extend(waker.clone());
            }
            true
        });
        earliest
    }
}

/// The ticker: fires what has passed, sleeps until the earliest cut-off
/// (a [`HORIZON`] at most), again; it ends with the last [`Deadlines`]
/// clone, and says so when its runtime drops it, so that the next
/// cut-off starts another.
///
/// Alarms are armed without a lock, so each run first says it will run
/// again within a [`HORIZON`] and only then reads them: an alarm armed
/// while it reads either is read, or sees that promise (or an earlier
/// one) and is at or after it, or sets the timer earlier itself.
async fn tick(shared: Weak<Shared>) {
    struct Gone(Weak<Shared>);
    impl Drop for Gone {
        fn drop(&mut self) {
            if let Some(shared) = self.0.upgrade() {
                let mut state = shared.lock();
                state.ticker = None;
                shared.ticks_at.store(Clock::NOT_TICKING, Ordering::SeqCst);
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
            let clock = shared.clock;
            let mut state = shared.lock();
            let now = Instant::now();
            let latest = now + HORIZON;
            shared
                .ticks_at
                .store(clock.reading(latest), Ordering::SeqCst);
            let earliest = state.fire(now, &mut woken);
            let alarm = state
                .fire_alarms(clock.reading(now), &mut woken)
                .map(|reading| clock.instant(reading));
            let wakes_at = [earliest, alarm]
                .into_iter()
                .flatten()
                .fold(latest, Instant::min);
            shared
                .ticks_at
                .store(clock.reading(wakes_at), Ordering::SeqCst);
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
            let mut state = shared.lock();
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

/// A cut-off for one wait at a time, kept registered with its
/// [`Deadlines`] while it lives: [`Alarm::within`] arms it with one
/// atomic store (and a word with the ticker only when the ticker would
/// not run by then), and disarms it with another.
#[derive(Debug)]
pub struct Alarm {
    deadlines: Deadlines,
    /// Registered at the first wait.
    slot: Option<Arc<AlarmSlot>>,
    /// The waker the slot holds, to tell whether a poll's is another.
    waker: Option<Waker>,
}

impl Alarm {
    /// `future`, cut off at `at`.
    pub fn within<F: Future>(&mut self, at: Instant, future: F) -> AlarmWithin<'_, F> {
        AlarmWithin {
            alarm: self,
            at,
            armed: false,
            future,
        }
    }

    /// Arms the alarm for `at`, to wake `waker`.
    fn arm(&mut self, at: Instant, waker: &Waker) {
        let shared = &self.deadlines.shared;
        let reading = shared.clock.reading(at);
        let slot = match &self.slot {
            Some(slot) => slot,
            None => {
                let slot = Arc::new(AlarmSlot {
                    at: AtomicU64::new(Clock::DISARMED),
                    waker: Mutex::new(None),
                });
                shared.lock().alarms.push(slot.clone());
                self.slot.insert(slot)
            }
        };
        slot.keep(&mut self.waker, waker);
        slot.at.store(reading, Ordering::SeqCst);
        if reading < shared.ticks_at.load(Ordering::SeqCst) {
            self.deadlines.run_ticker_by(at, shared.lock());
        }
    }

    /// Whether the armed cut-off has passed; keeps `waker` as the one to
    /// wake if not.
    fn passed(&mut self, waker: &Waker) -> bool {
        let Some(slot) = &self.slot else {
            return false;
        };
        slot.keep(&mut self.waker, waker);
        slot.at.load(Ordering::SeqCst) == Clock::FIRED
    }

    fn disarm(&self) {
        if let Some(slot) = &self.slot {
            slot.at.store(Clock::DISARMED, Ordering::Relaxed);
        }
    }
}

pin_project_lite::pin_project! {
    /// A future cut off by an [`Alarm`]: [`Alarm::within`].
    pub struct AlarmWithin<'a, F> {
        alarm: &'a mut Alarm,
        at: Instant,
        armed: bool,
        #[pin]
        future: F,
    }

    impl<F> PinnedDrop for AlarmWithin<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.armed {
                this.alarm.disarm();
            }
        }
    }
}

impl<F: Future> Future for AlarmWithin<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            if std::mem::take(this.armed) {
                this.alarm.disarm();
            }
            return Poll::Ready(Ok(output));
        }
        if !*this.armed {
            *this.armed = true;
            this.alarm.arm(*this.at, cx.waker());
        } else if this.alarm.passed(cx.waker()) {
            *this.armed = false;
            this.alarm.disarm();
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
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

    /// A task waiting on a cut-off 30 s away, under way: the ticker
    /// sleeps its whole horizon.
    async fn waiting_long(deadlines: &Deadlines) -> tokio::task::JoinHandle<Result<(), Elapsed>> {
        let deadlines = deadlines.clone();
        let long = tokio::spawn(async move {
            let at = Instant::now() + Duration::from_secs(30);
            deadlines.within(at, std::future::pending::<()>()).await
        });
        tokio::task::yield_now().await;
        long
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_cut_off_moves_the_timer_forward() {
        let deadlines = Deadlines::default();
        let started = Instant::now();
        let long = waiting_long(&deadlines).await;
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

    /// Twenty cut-offs `step` apart, latest first, each made by `cut` (a
    /// future that never ends, cut off at the instant given): each must
    /// end at its own time.
    async fn each_fires_at_its_own_time<F, C>(step: Duration, cut: C)
    where
        C: Fn(Instant) -> F,
        F: Future<Output = Result<(), Elapsed>> + Send + 'static,
    {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in (1..=20u32).rev() {
            let cut_off = cut(started + step * i);
            tasks.spawn(async move { (i, cut_off.await, started.elapsed()) });
        }
        while let Some(done) = tasks.join_next().await {
            let (i, result, elapsed) = done.unwrap();
            assert_eq!(result, Err(Elapsed));
            assert_eq!(elapsed, step * i);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn many_cut_offs_each_fire_at_their_own_time() {
        let deadlines = Deadlines::default();
        each_fires_at_its_own_time(Duration::from_millis(70), |at| {
            let deadlines = deadlines.clone();
            async move { deadlines.within(at, std::future::pending::<()>()).await }
        })
        .await;
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

    #[tokio::test(start_paused = true)]
    async fn an_alarm_cuts_a_wait_off_at_its_deadline_to_the_millisecond() {
        let deadlines = Deadlines::default();
        let mut alarm = deadlines.alarm();
        let started = Instant::now();
        let at = started + Duration::from_millis(250);
        let result = alarm.within(at, std::future::pending::<()>()).await;
        assert_eq!(result, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn an_alarm_armed_again_fires_for_its_new_cut_off_only() {
        let deadlines = Deadlines::default();
        let mut alarm = deadlines.alarm();
        let started = Instant::now();
        for round in 1..=3u64 {
            // Answered before its cut-off: disarmed, and it stays quiet.
            let at = Instant::now() + Duration::from_millis(100);
            let quick = tokio::time::sleep(Duration::from_millis(10));
            assert_eq!(alarm.within(at, quick).await, Ok(()));
            // The next wait runs past where the last cut-off was.
            let at = Instant::now() + Duration::from_millis(500);
            let slow = tokio::time::sleep(Duration::from_millis(300));
            assert_eq!(alarm.within(at, slow).await, Ok(()));
            assert_eq!(started.elapsed(), Duration::from_millis(310 * round));
        }
        let at = Instant::now() + Duration::from_millis(700);
        let result = alarm.within(at, std::future::pending::<()>()).await;
        assert_eq!(result, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(930 + 700));
    }

    #[tokio::test(start_paused = true)]
    async fn an_alarm_due_before_the_ticker_runs_sets_it_earlier() {
        let deadlines = Deadlines::default();
        let started = Instant::now();
        let long = waiting_long(&deadlines).await;
        // The ticker sleeps a second; the alarm may not wait for it.
        let mut alarm = deadlines.alarm();
        let at = started + Duration::from_millis(40);
        let result = alarm.within(at, std::future::pending::<()>()).await;
        assert_eq!(result, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        long.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn many_alarms_each_fire_at_their_own_time() {
        let deadlines = Deadlines::default();
        each_fires_at_its_own_time(Duration::from_millis(170), |at| {
            let mut alarm = deadlines.alarm();
            async move { alarm.within(at, std::future::pending::<()>()).await }
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_alarm_is_let_go_and_wakes_nobody() {
        let deadlines = Deadlines::default();
        let mut alarm = deadlines.alarm();
        let at = Instant::now() + Duration::from_millis(100);
        let mut waiting = Box::pin(alarm.within(at, std::future::pending::<()>()));
        assert!(poll_once(waiting.as_mut()).is_pending());
        drop(waiting);
        assert_eq!(deadlines.lock().alarms.len(), 1);
        drop(alarm);
        // The ticker's next run lets it go.
        tokio::time::sleep(HORIZON * 2).await;
        assert!(deadlines.lock().alarms.is_empty());
    }

    #[test]
    fn a_clock_reading_keeps_an_instant_to_the_nanosecond() {
        let clock = Clock {
            epoch: Instant::now(),
        };
        let at = clock.epoch + Duration::from_nanos(1_234_567_891);
        assert_eq!(clock.instant(clock.reading(at)), at);
        // Before the epoch: passed, the earliest reading.
        let before = clock.reading(clock.epoch - Duration::from_secs(1).min(clock.epoch.elapsed()));
        assert_eq!(before, 1);
        assert_ne!(clock.reading(at), Clock::DISARMED);
        assert_ne!(clock.reading(at), Clock::FIRED);
    }
}
