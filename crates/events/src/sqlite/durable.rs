//! Answers only once on disk, with the sync to disk off the writer's path.
//!
//! The writer commits with `synchronous = NORMAL`: a commit writes its
//! pages to the write-ahead log and returns without syncing it. Nothing
//! is answered yet. The group goes on to be synced: by the writer itself
//! when nothing else waits (one append alone pays what a `FULL` commit
//! costs), else by the syncer thread, while the writer runs the next
//! group. One sync of the log covers every commit written before it, so
//! under load a group's sync overlaps the next group's work instead of
//! holding it up: that is what takes 64 publishers past one sync per group.
//!
//! This is the sync a `FULL` commit would have made (SQLite syncs the log
//! at each commit and nothing else; checkpoints still sync the log before
//! copying it and the database after, as in `FULL`).
//!
//! Readers would see a commit before its sync: a read waits until every
//! commit it may have seen is synced ([`Durable::settled`]), so nothing
//! that a power loss could take back is ever read or answered. A failed
//! sync fails the store: what the log holds is no longer known to be on
//! disk, so every later write and read gets the error (as PostgreSQL
//! does after a failed fsync) until the store is opened again.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::watch;

use crate::store::StoreError;

/// Sends a job's answer, given whether its group was committed and synced.
pub(super) type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A group on its way to its answers: committed (or failed), not synced.
pub(super) struct Batch {
    /// The group's number (see [`Durable::begin`]).
    pub(super) seq: u64,
    /// Whether the group committed anything the log must hold.
    pub(super) outcome: Result<(), StoreError>,
    /// Its jobs' answers.
    pub(super) replies: Vec<Reply>,
}

/// What the writer, the syncer and readers share.
#[derive(Debug)]
pub(super) struct Durable {
    /// The write-ahead log, synced through this handle.
    wal: File,
    /// The number of the last group begun: a read sees at most the groups
    /// begun before it ended.
    begun: AtomicU64,
    /// The number of the last group synced (and answered), or why the
    /// store failed.
    synced: watch::Sender<Result<u64, StoreError>>,
    /// Batches handed to the syncer and not yet answered.
    pending: AtomicUsize,
}

impl Durable {
    pub(super) fn new(wal: File) -> Self {
        Durable {
            wal,
            begun: AtomicU64::new(0),
            synced: watch::channel(Ok(0)).0,
            pending: AtomicUsize::new(0),
        }
    }

    /// Numbers a group about to run: before anything of it can be seen.
    pub(super) fn begin(&self) -> u64 {
        self.begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Why the store failed, if a sync did.
    pub(super) fn failed(&self) -> Option<StoreError> {
        self.synced.borrow().as_ref().err().cloned()
    }

    /// The group a read that ends now may have seen the last of.
    pub(super) fn seen(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }

    /// Waits until group `seen` is synced; the store's failure if a sync
    /// failed.
    pub(super) async fn settled(&self, seen: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.subscribe();
        let result = synced
            .wait_for(|synced| synced.as_ref().map_or(true, |&n| n >= seen))
            .await
            .map_err(|_| StoreError("the event store's writer has stopped".into()))?;
        match &*result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Whether the syncer has nothing in hand: the writer may then sync
    /// a group itself, after every group before it.
    pub(super) fn idle(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0
    }

    /// Syncs the log once for `batches` (in the order they were begun,
    /// every batch begun before them written), then answers each.
    pub(super) fn settle(&self, batches: Vec<Batch>) {
        let Some(last) = batches.last().map(|b| b.seq) else {
            return;
        };
        let synced = if batches.iter().any(|b| b.outcome.is_ok()) {
            self.wal.sync_data().map_err(|e| {
                StoreError(format!(
                    "the event store could not sync its log to disk ({e}); \
                     it takes no more writes until it is opened again"
                ))
            })
        } else {
            Ok(())
        };
        match &synced {
            Ok(()) => self.synced.send_modify(|synced| {
                if let Ok(n) = synced {
                    *n = (*n).max(last);
                }
            }),
            Err(e) => {
                let _was = self.synced.send_replace(Err(e.clone()));
            }
        }
        for batch in batches {
            let outcome = batch.outcome.and_then(|()| synced.clone());
            for reply in batch.replies {
                reply(outcome.clone());
            }
        }
    }
}

/// The syncer threads: each takes every batch the writer has handed over
/// and settles them with one sync. While one syncs, the next takes what
/// the writer hands over meanwhile and syncs too: a group waits for one
/// sync begun after it was written, not for the end of one begun before.
/// A sync covers every group written before it began, so the first to end
/// makes all of those durable, whichever thread answers them.
pub(super) struct Syncer {
    batches: Option<mpsc::Sender<Batch>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    durable: Arc<Durable>,
}

impl Syncer {
    pub(super) fn start(durable: Arc<Durable>, threads: usize) -> std::io::Result<Self> {
        let (batches, queue) = mpsc::channel::<Batch>();
        let queue = Arc::new(Mutex::new(queue));
        let mut syncer = Syncer {
            batches: Some(batches),
            threads: Vec::with_capacity(threads),
            durable,
        };
        for _ in 0..threads {
            let (queue, shared) = (queue.clone(), syncer.durable.clone());
            let thread = std::thread::Builder::new()
                .name("events-syncer".into())
                .spawn(move || loop {
                    let batches = {
                        let queue = queue.lock().unwrap_or_else(|e| e.into_inner());
                        let Ok(first) = queue.recv() else { return };
                        let mut batches = vec![first];
                        batches.extend(queue.try_iter());
                        batches
                    };
                    let count = batches.len();
                    shared.settle(batches);
                    shared.pending.fetch_sub(count, Ordering::SeqCst);
                })?;
            syncer.threads.push(thread);
        }
        Ok(syncer)
    }

    /// Settles `batch` here if nothing waits (neither `more` work nor an
    /// earlier batch), else hands it to the syncer thread.
    pub(super) fn settle(&self, batch: Batch, more: bool) {
        if !more && self.durable.idle() {
            self.durable.settle(vec![batch]);
            return;
        }
        self.durable.pending.fetch_add(1, Ordering::SeqCst);
        let sender = self
            .batches
            .as_ref()
            .expect("the syncer runs until dropped");
        if let Err(mpsc::SendError(batch)) = sender.send(batch) {
            // The threads are gone (they cannot panic short of a bug):
            // answer here rather than never.
            self.durable.pending.fetch_sub(1, Ordering::SeqCst);
            self.durable.settle(vec![batch]);
        }
    }
}

impl Drop for Syncer {
    /// Answers what is in hand, then stops the threads.
    fn drop(&mut self) {
        drop(self.batches.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A log file of its own, removed when the test ends.
    struct Log(std::path::PathBuf);

    impl Log {
        fn new(name: &str) -> (Self, File) {
            let path = std::env::temp_dir()
                .join(format!("tidegate-durable-{name}-{}", std::process::id()));
            let file = File::create(&path).unwrap();
            (Log(path), file)
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A batch of one job whose answer lands in the receiver.
    fn batch(
        seq: u64,
        outcome: Result<(), StoreError>,
    ) -> (Batch, std::sync::mpsc::Receiver<Result<(), StoreError>>) {
        let (answer, answered) = std::sync::mpsc::channel();
        let reply: Reply = Box::new(move |result| answer.send(result).unwrap());
        (
            Batch {
                seq,
                outcome,
                replies: vec![reply],
            },
            answered,
        )
    }

    #[test]
    fn a_read_waits_until_what_it_may_have_seen_is_synced() {
        let (_log, file) = Log::new("read");
        let durable = Durable::new(file);
        let first = durable.begin();
        let second = durable.begin();
        assert_eq!(durable.seen(), second);
        let (one, one_answered) = batch(first, Ok(()));
        durable.settle(vec![one]);
        assert_eq!(one_answered.try_recv().unwrap(), Ok(()));
        assert!(durable.settled(first).now_or_never().is_some());
        // Group two is begun, not synced: a read that may have seen it waits.
        assert!(durable.settled(second).now_or_never().is_none());
        let (two, two_answered) = batch(second, Ok(()));
        durable.settle(vec![two]);
        assert_eq!(two_answered.try_recv().unwrap(), Ok(()));
        assert_eq!(durable.settled(second).now_or_never(), Some(Ok(())));
    }

    #[test]
    fn a_failed_sync_fails_its_answers_and_the_store() {
        // fsync of /dev/null fails (EINVAL): a disk that lost the log.
        let durable = Durable::new(File::open("/dev/null").unwrap());
        let seq = durable.begin();
        let (committed, answered) = batch(seq, Ok(()));
        durable.settle(vec![committed]);
        let error = answered.try_recv().unwrap().unwrap_err();
        assert!(error.0.contains("could not sync"), "{error}");
        assert_eq!(durable.failed(), Some(error.clone()));
        assert_eq!(durable.settled(seq).now_or_never(), Some(Err(error)));
    }

    #[test]
    fn groups_handed_to_the_syncers_are_all_answered_by_the_time_it_stops() {
        let (_log, file) = Log::new("syncer");
        let durable = Arc::new(Durable::new(file));
        let syncer = Syncer::start(durable.clone(), 2).unwrap();
        let mut answers = Vec::new();
        for _ in 0..100 {
            let (batch, answered) = batch(durable.begin(), Ok(()));
            syncer.settle(batch, true);
            answers.push(answered);
        }
        drop(syncer);
        for answered in answers {
            assert_eq!(answered.try_recv().unwrap(), Ok(()));
        }
        assert!(durable.idle());
        assert_eq!(durable.settled(100).now_or_never(), Some(Ok(())));
    }
}
