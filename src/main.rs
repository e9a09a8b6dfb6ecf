//! The `routelm` command line. Only this binary (and `cli/`) prints, exits or parses argv.

mod cli;

use clap::Parser;

// Tensors are allocated and freed at a high rate; glibc returns large blocks to the OS on
// every free (mmap/munmap, page faults). mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ROUTELM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
