//! The `flowledger` binary: runs the command line (`flowledger::cli`:
//! `init`, `serve`, `audit`, `projections`, ...).

use std::process::ExitCode;

// The service allocates many small objects per command across threads;
// mimalloc costs less CPU there than glibc's malloc (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    flowledger::cli::main().await
}
