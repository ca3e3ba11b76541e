//! The import order of `src/`'s folders (docs/design.md, "The shape of the code"):
//! every `crate::<folder>` a folder's code names is a folder earlier in [`ORDER`] or
//! one of [`BESIDE`], so the folders form no cycle. Comments are not imports and are
//! left out (a doc link may point anywhere).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

/// The folders from the bottom up: each may import the ones before it.
const ORDER: &[&str] = &[
    "model", "cpu", "pool", "shadow", "cuda", "pipeline", "engine", "server", "eval", "cli",
];

/// Folders any other may import; they import none of the others.
const BESIDE: &[&str] = &["topology", "telemetry"];

/// The `crate::<name>` paths in a line of code (nothing after a `//`).
fn crate_refs(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .filter(|(i, _)| !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (from, to, file, line) of each folder-to-folder reference in `src/`.
fn references() -> Vec<(String, String, String, usize)> {
    let src = common::repo_file("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut refs = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let Some(folder) = rel.components().next().filter(|_| rel.components().count() > 1) else {
            continue; // lib.rs, main.rs
        };
        let from = folder.as_os_str().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            for to in crate_refs(line) {
                if to != from {
                    refs.push((from.clone(), to, rel.display().to_string(), n + 1));
                }
            }
        }
    }
    refs
}

/// Why `from` may not import `to`, if it may not.
fn refused(from: &str, to: &str) -> Option<String> {
    if BESIDE.contains(&from) {
        return Some(format!("`{from}` sits beside the others and imports none of them"));
    }
    if BESIDE.contains(&to) {
        return None;
    }
    let at = |m: &str| ORDER.iter().position(|o| *o == m);
    match (at(from), at(to)) {
        (Some(a), Some(b)) if b < a => None,
        (Some(_), Some(_)) => Some(format!("`{to}` comes after `{from}` in the order")),
        (None, _) => Some(format!("`{from}` is not in the order")),
        (_, None) => Some(format!("`{to}` is not a folder of the order")),
    }
}

#[test]
fn every_folder_imports_only_the_folders_below_it() {
    let refs = references();
    let folders: BTreeSet<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    // The check sees the real tree: the folders it knows and their references.
    assert!(folders.contains("cuda") && folders.contains("server"), "{folders:?}");
    assert!(refs.len() > 100, "only {} references found", refs.len());
    let bad: Vec<String> = refs
        .iter()
        .filter_map(|(from, to, file, line)| refused(from, to).map(|why| format!("src/{file}:{line}: {why}")))
        .collect();
    assert!(bad.is_empty(), "imports against the order:\n{}", bad.join("\n"));
    // Every folder of src/ is placed.
    for f in &folders {
        assert!(ORDER.contains(f) || BESIDE.contains(f), "src/{f}/ is in neither list");
    }
}

#[test]
fn the_rule_refuses_what_it_should() {
    assert_eq!(crate_refs("use crate::cpu::ops::Rope; // crate::server"), ["cpu"]);
    assert_eq!(crate_refs("/// see [`crate::engine::x`]"), Vec::<String>::new());
    assert_eq!(crate_refs("let x = shadowkv_crate::pool;"), Vec::<String>::new());
    assert!(refused("shadow", "cpu").is_none());
    assert!(refused("cpu", "shadow").is_some());
    assert!(refused("cuda", "engine").is_some());
    assert!(refused("engine", "topology").is_none());
    assert!(refused("topology", "model").is_some());
    assert!(refused("cpu", "cpu2").is_some());
}
