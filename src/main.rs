//! The `shadowkv` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Before any thread starts, and so before NCCL could ever read it.
    shadowkv::cuda::nccl::disable_nvlink_multicast();
    match shadowkv::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
