//! Training and inference throughput of one model on random data; see
//! `model::bench` for the options.

use std::process::ExitCode;

/// Keeps the large buffers of a training step for the next one.
#[global_allocator]
static ALLOC: model::BlockCache = model::BlockCache;

fn main() -> ExitCode {
    match model::bench::main_with_args(std::env::args().skip(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
