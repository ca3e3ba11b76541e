//! The `shadowkv` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    match shadowkv::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
