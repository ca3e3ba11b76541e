//! What the benchmarks report with: a line of a results table, medians, and the HBM
//! rate the GPU bounds use.

/// Prints a line of the results' table: to stdout, or to stderr where `--json` without a
/// file writes the JSON to stdout (which then holds nothing else, so that it parses).
macro_rules! table_line {
    ($to_stderr:expr) => {
        if $to_stderr { eprintln!() } else { println!() }
    };
    ($to_stderr:expr, $($arg:tt)*) => {
        if $to_stderr { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}
pub(crate) use table_line;

/// The H200's HBM bandwidth the design measured (device-to-device copy).
pub const HBM_BYTES_PER_S: f64 = 4.3e12;

/// The median of `xs` (sorted in place).
pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}
