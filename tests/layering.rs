//! The shape of `src/` (docs/design.md, "The shape of the code"): every `crate::<folder>`
//! a folder's code names is a folder earlier in [`ORDER`] or one of [`BESIDE`], and no
//! two modules use each other, directly or through others. Comments are not imports and
//! are left out (a doc link may point anywhere), as are `#[cfg(test)]` modules.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The folders from the bottom up: each may import the ones before it.
const ORDER: &[&str] = &[
    "model", "cpu", "pool", "shadow", "cuda", "pipeline", "engine", "server", "eval", "cli",
];

/// Modules any other may import; they import none of the others.
const BESIDE: &[&str] = &["topology", "telemetry", "panics"];

/// A module of `src/` (`cuda::shadow::decode`) and its code lines with their numbers:
/// up to its tests, comments cut.
struct Module {
    path: Vec<String>,
    file: String,
    code: Vec<(usize, String)>,
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A line without its comment (nothing after a `//`).
fn code_of(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// The crate's modules, but for `lib.rs` and `main.rs`.
fn modules() -> Vec<Module> {
    let src = common::repo_file("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().with_extension("");
        let mut path: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if path.last().is_some_and(|l| l == "mod") {
            path.pop();
        }
        if path == ["lib"] || path == ["main"] {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text
            .lines()
            .enumerate()
            .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
            .map(|(n, l)| (n + 1, code_of(l).to_string()))
            .collect();
        out.push(Module {
            path,
            file: format!("src/{}", f.strip_prefix(&src).unwrap().display()),
            code,
        });
    }
    out
}

/// The paths a line names from the crate's root, for a line of module `at`: each
/// `crate::a::b` and `super::…::a::b` (a `{…}` group gives one path per item), as
/// segments.
fn named_paths(line: &str, at: &[String]) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find(['c', 's']) {
        let tail = &rest[i..];
        let starts_word = !rest[..i].ends_with(ident) && !rest[..i].ends_with("::");
        let (mut base, mut after): (Vec<String>, &str) = if starts_word && tail.starts_with("crate::") {
            (Vec::new(), &tail["crate::".len()..])
        } else if starts_word && tail.starts_with("super::") {
            let mut up = 0;
            let mut t = tail;
            while let Some(r) = t.strip_prefix("super::") {
                up += 1;
                t = r;
            }
            (at[..at.len().saturating_sub(up)].to_vec(), t)
        } else {
            rest = &tail[1..];
            continue;
        };
        loop {
            let seg: String = after.chars().take_while(|&c| ident(c)).collect();
            if seg.is_empty() {
                if let Some(group) = after.strip_prefix('{') {
                    let inner = group.split('}').next().unwrap_or("");
                    for item in inner.split(',') {
                        let first: String = item.trim().chars().take_while(|&c| ident(c)).collect();
                        if !first.is_empty() {
                            out.push([base.clone(), vec![first]].concat());
                        }
                    }
                    base.clear();
                }
                break;
            }
            after = &after[seg.len()..];
            base.push(seg);
            match after.strip_prefix("::") {
                Some(r) => after = r,
                None => break,
            }
        }
        if !base.is_empty() {
            out.push(base);
        }
        rest = after;
    }
    out
}

/// For each module, the other modules it uses (neither its ancestors nor its
/// descendants), each with the file and line of its first use.
fn uses(mods: &[Module]) -> BTreeMap<String, BTreeMap<String, String>> {
    let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for m in mods {
        let me = m.path.join("::");
        let edges = out.entry(me.clone()).or_default();
        for (n, line) in &m.code {
            for p in named_paths(line, &m.path) {
                let Some(k) = (1..=p.len()).rev().find(|&k| known.contains(&p[..k])) else {
                    continue;
                };
                let to = &p[..k];
                if to.starts_with(&m.path) || m.path.starts_with(to) {
                    continue;
                }
                edges.entry(to.join("::")).or_insert_with(|| format!("{}:{n}", m.file));
            }
        }
    }
    out
}

/// A cycle of `graph`, as its modules in order, if it has one.
fn a_cycle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    // 0: unseen, 1: on the current path, 2: done.
    fn visit<'a>(
        v: &'a str,
        graph: &'a BTreeMap<String, BTreeMap<String, String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(v, 1);
        path.push(v);
        for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
            match state.get(w.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = path.iter().position(|p| *p == w).unwrap();
                    return Some(path[from..].iter().map(|s| s.to_string()).collect());
                }
                0 => {
                    if let Some(c) = visit(w, graph, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(v, 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in graph.keys() {
        if !state.contains_key(v.as_str()) {
            if let Some(c) = visit(v, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Why the top-level module `from` may not import `to`, if it may not.
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
        (_, None) => Some(format!("`{to}` is not a module of the order")),
    }
}

#[test]
fn every_folder_imports_only_the_folders_below_it() {
    let mods = modules();
    let graph = uses(&mods);
    let edges: usize = graph.values().map(|e| e.len()).sum();
    // The check sees the real tree.
    assert!(graph.contains_key("cuda::shadow::decode") && graph.contains_key("server::routes"));
    assert!(edges > 300, "only {edges} uses found");
    let mut bad = Vec::new();
    for (from, to_all) in &graph {
        let top = from.split("::").next().unwrap();
        for (to, at) in to_all {
            let to_top = to.split("::").next().unwrap();
            if to_top != top {
                if let Some(why) = refused(top, to_top) {
                    bad.push(format!("{at}: {why}"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "imports against the order:\n{}", bad.join("\n"));
    for m in &mods {
        let top = m.path[0].as_str();
        assert!(
            ORDER.contains(&top) || BESIDE.contains(&top),
            "{} is in neither list",
            m.file
        );
    }
}

#[test]
fn no_two_modules_use_each_other() {
    let graph = uses(&modules());
    if let Some(cycle) = a_cycle(&graph) {
        let steps: Vec<String> = cycle
            .iter()
            .zip(cycle.iter().cycle().skip(1))
            .map(|(a, b)| format!("{a} -> {b} ({})", graph[a][b]))
            .collect();
        panic!("modules that use each other:\n{}", steps.join("\n"));
    }
}

#[test]
fn the_rules_refuse_what_they_should() {
    let at: Vec<String> = ["cuda", "shadow", "decode"].map(String::from).to_vec();
    let names = |l: &str| -> Vec<String> { named_paths(code_of(l), &at).iter().map(|p| p.join("::")).collect() };
    assert_eq!(names("use crate::cpu::ops::Rope; // crate::server"), ["cpu::ops::Rope"]);
    assert_eq!(names("/// see [`crate::engine::x`]"), Vec::<String>::new());
    assert_eq!(names("let x = shadowkv_crate::pool; a::super::b"), Vec::<String>::new());
    assert_eq!(names("use super::stages::Stage;"), ["cuda::shadow::stages::Stage"]);
    assert_eq!(
        names("use super::super::ops::{f, CudaOps};"),
        ["cuda::ops::f", "cuda::ops::CudaOps"]
    );
    assert_eq!(names("use super::{a, b};"), ["cuda::shadow::a", "cuda::shadow::b"]);
    assert!(refused("shadow", "cpu").is_none());
    assert!(refused("cpu", "shadow").is_some());
    assert!(refused("cuda", "engine").is_some());
    assert!(refused("engine", "topology").is_none());
    assert!(refused("topology", "model").is_some());
    assert!(refused("cpu", "cpu2").is_some());
    let graph = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a.to_string()).or_default().insert(b.to_string(), String::new());
        }
        g
    };
    assert_eq!(a_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let c = a_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])).unwrap();
    assert_eq!(c.len(), 3, "{c:?}");
}
