use std::process::ExitCode;

use clap::Parser;
use homeserver::cli::{Cli, run};

fn main() -> ExitCode {
    return_large_allocations_to_the_os();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

/// Every password hash (argon2id) allocates 19 MiB. glibc's malloc serves such blocks with
/// mmap, but after the first free it raises its mmap threshold and keeps later ones in the
/// heap, so an idle server that has hashed a few passwords sits on hundreds of MiB. Fixing
/// the threshold at 1 MiB hands large blocks back to the OS when they are freed (measured:
/// idle RSS 14-16 MiB instead of 280 MiB after 20 logins; see docs/benchmarks.md).
fn return_large_allocations_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
}
