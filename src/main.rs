//! The `routelm` command line. Only this binary (and `cli/`) prints, exits or parses argv.

mod cli;

use clap::Parser;

// Tensors are allocated and freed at a high rate; glibc returns large blocks to the OS on
// every free (mmap/munmap, page faults). mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (same index in its v2 and v3 option tables).
pub(crate) const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Exit quietly when the reader of our output goes away (`routelm route ... | head`),
    // as command-line tools do, instead of panicking on a broken pipe.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Never hand freed pages back to the OS: training reallocates the same activation sizes
    // every step, and re-faulting them cost ~13% of a train-small step (bench train).
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // candle runs large elementwise ops on a pool of its own, a third set of threads on top
    // of ours. Training computes a batch's shards on our threads concurrently, and there
    // that pool only waits and competes (shakespeare recipe 66 -> 50 ms/step, train-small
    // 753 -> 616 ms/step); elementwise ops run on the calling thread instead.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    // candle sizes each matmul's parallelism from RAYON_NUM_THREADS, and when it is unset
    // counts the physical cores by parsing /proc/cpuinfo, on every matmul (a training step
    // makes hundreds). Setting it to the pool's own default thread count makes that a
    // variable lookup.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: no other thread exists yet
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    tracing_subscriber::fmt()
        // warnings (skipped parts of a checkpoint, non-finite weights) show unless
        // ROUTELM_LOG says otherwise
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROUTELM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    // Run on a worker of the thread pool: a parallel loop started from outside the pool
    // hands its whole job to a worker and sleeps until it is done (two thread wake-ups per
    // loop); from inside, small loops run inline and large ones split with the other
    // worker. Decoding runs a few dozen parallel products per token, so this matters.
    if let Err(e) = rayon::scope(|_| cli::run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
