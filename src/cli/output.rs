//! Checks on a file a command will write its results to, made before the run (which may
//! take hours) rather than when it ends.

use anyhow::{bail, Result};
use std::path::Path;

/// Refuses `path` (given by `flag`) if it is a folder or its folder does not exist.
pub fn check_output_file(flag: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{flag}: {} is a folder; give a file name", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("{flag}: the folder {} does not exist", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_output_file;
    use std::path::Path;

    #[test]
    fn folders_and_missing_folders_are_refused() {
        let dir = std::env::temp_dir();
        assert!(check_output_file("--json", &dir.join("results.json")).is_ok());
        assert!(check_output_file("--json", Path::new("results.json")).is_ok());
        let e = check_output_file("--json", &dir).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        let e = check_output_file("--json", &dir.join("no-such-folder-42/r.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--json: the folder") && e.contains("does not exist"),
            "{e}"
        );
    }
}
