//! Keeping the thread pool's other workers awake through a decode loop.
//!
//! A decoded token runs a few dozen short parallel regions with a little serial work
//! between them. An idle rayon worker yields a few dozen times and then sleeps; waking it
//! for the next region takes about as long as its share of that region, so the worker
//! driving the loop did 55% of the products and the other one spent 7% of its time in
//! the scheduler (moe-8x Q8_0, 2 threads).

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

thread_local! {
    /// How many [`KeepWarm`]s this thread holds. A worker that holds one never polls for
    /// another's: it could be polling while one of its own regions waits below, and two
    /// such workers would each wait for the other to let go.
    static HOLDING: Cell<usize> = const { Cell::new(0) };
}

#[derive(Default)]
struct State {
    stop: AtomicBool,
    /// Workers in the polling loop now.
    polling: AtomicUsize,
}

/// While held, every worker of the current pool but the caller's polls for work instead
/// of sleeping, running whatever the caller's parallel regions hand out as it would once
/// woken. Dropping it lets them sleep again. Outside a pool worker, or in a pool of one
/// thread, it does nothing.
pub struct KeepWarm {
    state: Option<Arc<State>>,
    /// Held and dropped on one thread (it counts in that thread's [`HOLDING`]).
    _here: PhantomData<*const ()>,
}

impl KeepWarm {
    pub fn start() -> Self {
        if rayon::current_thread_index().is_none() || rayon::current_num_threads() < 2 {
            return Self {
                state: None,
                _here: PhantomData,
            };
        }
        HOLDING.with(|h| h.set(h.get() + 1));
        let state = Arc::new(State::default());
        let shared = state.clone();
        rayon::spawn_broadcast(move |_| {
            // the caller's own worker (or any holding one) returns at once: it may run this
            // job while it waits in one of its own regions, which must not then wait on
            // this loop
            if HOLDING.with(Cell::get) > 0 {
                return;
            }
            shared.polling.fetch_add(1, Ordering::AcqRel);
            while !shared.stop.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
            shared.polling.fetch_sub(1, Ordering::AcqRel);
        });
        Self {
            state: Some(state),
            _here: PhantomData,
        }
    }

    /// Whether this keeps workers polling (it was started on a worker of a pool of two or
    /// more threads).
    pub fn is_active(&self) -> bool {
        self.state.is_some()
    }
}

impl Drop for KeepWarm {
    fn drop(&mut self) {
        if let Some(s) = &self.state {
            s.stop.store(true, Ordering::Release);
            HOLDING.with(|h| h.set(h.get() - 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::time::{Duration, Instant};

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Many short regions, as a decode loop runs: their sums, and which workers ran them.
    fn regions() -> (Vec<u64>, Vec<bool>) {
        let mut ran = vec![false; rayon::current_num_threads()];
        let sums = (0..300)
            .map(|r| {
                let (sum, who): (u64, Vec<usize>) = (0..64usize)
                    .into_par_iter()
                    .with_max_len(1)
                    .map(|x| {
                        let spin: usize = (0..2000).map(|i| (i ^ x) % 7).sum();
                        // some work per part, so that every worker gets some
                        std::hint::black_box(spin);
                        (x as u64 * r, rayon::current_thread_index().unwrap())
                    })
                    .fold(
                        || (0u64, Vec::new()),
                        |(s, mut w), (v, i)| {
                            w.push(i);
                            (s + v, w)
                        },
                    )
                    .reduce(
                        || (0, Vec::new()),
                        |(a, mut w), (b, v)| {
                            w.extend(v);
                            (a + b, w)
                        },
                    );
                who.into_iter().for_each(|i| ran[i] = true);
                sum
            })
            .collect();
        (sums, ran)
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_other_workers_run_the_callers_regions_and_stop_polling_when_dropped() {
        let p = pool(3);
        let want: Vec<u64> = (0..300u64).map(|r| r * (0..64).sum::<u64>()).collect();
        let state = p.install(|| {
            let warm = KeepWarm::start();
            assert!(warm.is_active());
            let state = warm.state.clone().unwrap();
            wait_until("both other workers polling", || {
                state.polling.load(Ordering::Acquire) == 2
            });
            let (sums, ran) = regions();
            assert_eq!(sums, want);
            assert!(ran.iter().all(|&r| r), "workers that ran a part: {ran:?}");
            state
        });
        wait_until("the workers leaving the loop", || {
            state.polling.load(Ordering::Acquire) == 0
        });
    }

    #[test]
    fn nothing_starts_outside_a_pool_worker_or_in_a_pool_of_one() {
        assert!(!KeepWarm::start().is_active());
        assert!(!pool(1).install(|| KeepWarm::start().is_active()));
    }

    /// Callers on two workers of one pool, each holding one while running regions: both
    /// finish (neither waits on the other's polling loop).
    #[test]
    fn callers_on_two_workers_of_one_pool_both_finish() {
        let p = pool(2);
        let want: Vec<u64> = (0..300u64).map(|r| r * (0..64).sum::<u64>()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        p.spawn_broadcast(move |_| {
            let warm = KeepWarm::start();
            let (sums, _) = regions();
            drop(warm);
            tx.send(sums).unwrap();
        });
        for _ in 0..2 {
            let sums = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a caller hung");
            assert_eq!(sums, want);
        }
    }
}
