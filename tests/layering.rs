//! The shape of `src/` (docs/design.md, "The shape of the code"): every `crate::<folder>`
//! a folder's code names is a folder on a lower level of [`LEVELS`] or one of
//! [`BESIDE`], and no two modules use each other, directly or through others.
//!
//! The check reads the sources as a compiler would see their paths: comments, string and
//! character literals and `#[cfg(test)]` modules are left out, a `use` may span lines and
//! nest groups, and a name a module re-exports (`pub use child::Name`) counts as a use of
//! the module that defines it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The folders from the bottom up, by level: each may import the levels below its own.
const LEVELS: &[&[&str]] = &[
    &["model"],
    &["cpu"],
    &["pool"],
    &["shadow"],
    &["cuda"],
    &["pipeline"],
    &["engine"],
    &["server", "eval"],
    &["cli"],
];

/// Modules any other may import; they import none of the others.
const BESIDE: &[&str] = &["topology", "telemetry", "panics"];

/// A module path, `["cuda", "shadow", "decode"]`.
type ModPath = Vec<String>;

/// `src` with its comments, string literals and character literals blanked (lines kept).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let blank = |s: &str, out: &mut String| out.extend(s.chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        let ident_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let end = if rest.starts_with("//") {
            rest.find('\n').unwrap_or(rest.len())
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            let mut j = 0;
            loop {
                if rest[j..].starts_with("/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with("*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break j;
                    }
                } else if j >= rest.len() {
                    break j;
                } else {
                    j += rest[j..].chars().next().unwrap().len_utf8();
                }
            }
        } else if !ident_before && (rest.starts_with("r#") || rest.starts_with("r\"") || rest.starts_with("br")) {
            // A raw string: r"…", r#"…"#, br#"…"#.
            let start = if rest.starts_with('b') { 2 } else { 1 };
            let hashes = rest[start..].chars().take_while(|&c| c == '#').count();
            if rest[start + hashes..].starts_with('"') {
                let close = format!("\"{}", "#".repeat(hashes));
                let body = start + hashes + 1;
                body + rest[body..].find(&close).map_or(rest.len() - body, |k| k + close.len())
            } else {
                0
            }
        } else if rest.starts_with('"') || (!ident_before && rest.starts_with("b\"")) {
            let open = rest.find('"').unwrap() + 1;
            let mut j = open;
            while j < rest.len() && !rest[j..].starts_with('"') {
                j += if rest[j..].starts_with('\\') { 2 } else { 1 };
                while !rest.is_char_boundary(j.min(rest.len())) {
                    j += 1;
                }
            }
            (j + 1).min(rest.len())
        } else if rest.starts_with('\'') {
            // A character literal ('a', '\n', '\''), not a lifetime ('a).
            let mut chars = rest.char_indices().skip(1);
            match (chars.next(), chars.next()) {
                (Some((_, '\\')), _) => rest[3..].find('\'').map_or(0, |k| k + 4),
                (Some(_), Some((k, '\''))) => k + 1,
                _ => 0,
            }
        } else {
            0
        };
        if end > 0 {
            blank(&rest[..end], &mut out);
            i += end;
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `code` (stripped) with each `#[cfg(test)]` module blanked.
fn drop_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(k) = out[from..].find("#[cfg(test)]") {
        let at = from + k;
        let after = out[at + "#[cfg(test)]".len()..].trim_start();
        let is_mod = after.starts_with("mod ") || after.starts_with("pub mod ");
        // `mod tests;` (a file of its own) has no block here.
        let open = out[at..]
            .find(['{', ';'])
            .map(|o| at + o)
            .filter(|&o| out[o..].starts_with('{'));
        match (is_mod, open) {
            (true, Some(open)) => {
                let mut depth = 0;
                let mut end = out.len();
                for (j, c) in out[open..].char_indices() {
                    depth += i32::from(c == '{') - i32::from(c == '}');
                    if depth == 0 {
                        end = open + j + 1;
                        break;
                    }
                }
                let blanked: String = out[at..end]
                    .chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' })
                    .collect();
                out.replace_range(at..end, &blanked);
                from = end;
            }
            _ => from = at + 1,
        }
    }
    out
}

/// A token of stripped code: a word, `::`, or another character; with its line.
#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Sep,
    Punct(char),
}

fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut it = code.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\n' {
            line += 1;
        } else if c.is_whitespace() {
        } else if c.is_alphanumeric() || c == '_' {
            let mut w = c.to_string();
            while let Some(&n) = it.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                w.push(n);
                it.next();
            }
            out.push((Tok::Word(w), line));
        } else if c == ':' && it.peek() == Some(&':') {
            it.next();
            out.push((Tok::Sep, line));
        } else {
            out.push((Tok::Punct(c), line));
        }
    }
    out
}

/// Parses the path tree at `toks[i..]` below `prefix` (segments, `{…}` groups, `self`,
/// `*`, `as` renames) into `out` as (path, name it is known by); returns the index after it.
fn parse_tree(toks: &[(Tok, usize)], mut i: usize, mut prefix: ModPath, out: &mut Vec<(ModPath, String)>) -> usize {
    let at = |i: usize| toks.get(i).map(|t| &t.0);
    let alias = |i: usize, name: String| match (at(i), at(i + 1)) {
        (Some(Tok::Word(a)), Some(Tok::Word(n))) if a == "as" => (i + 2, n.clone()),
        _ => (i, name),
    };
    loop {
        match at(i) {
            Some(Tok::Punct('{')) => {
                i += 1;
                while let Some(t) = at(i) {
                    if *t == Tok::Punct('}') {
                        return i + 1;
                    }
                    i = parse_tree(toks, i, prefix.clone(), out);
                    if at(i) == Some(&Tok::Punct(',')) {
                        i += 1;
                    } else if at(i) != Some(&Tok::Punct('}')) {
                        return i;
                    }
                }
                return i;
            }
            Some(Tok::Word(w)) if w == "self" && !prefix.is_empty() => {
                let (next, name) = alias(i + 1, prefix.last().unwrap().clone());
                out.push((prefix, name));
                return next;
            }
            Some(Tok::Word(w)) => {
                prefix.push(w.clone());
                i += 1;
                if at(i) == Some(&Tok::Sep) && matches!(at(i + 1), Some(Tok::Word(_)) | Some(Tok::Punct('{' | '*'))) {
                    i += 1;
                    continue;
                }
                let (next, name) = alias(i, prefix.last().unwrap().clone());
                out.push((prefix, name));
                return next;
            }
            Some(Tok::Punct('*')) => {
                out.push((prefix, "*".into()));
                return i + 1;
            }
            _ => {
                if !prefix.is_empty() {
                    let name = prefix.last().unwrap().clone();
                    out.push((prefix, name));
                }
                return i;
            }
        }
    }
}

/// A module's uses and re-exports: the paths it names from `crate::` or `super::`, each
/// with its line, and what it re-exports (`pub use`), by the name it gives.
struct Source {
    uses: Vec<(ModPath, usize)>,
    reexports: Vec<(String, ModPath)>,
}

/// The paths of module `me`'s stripped code.
fn read_source(code: &str, me: &[String]) -> Source {
    let toks = tokens(code);
    let word = |i: usize, w: &str| matches!(toks.get(i), Some((Tok::Word(x), _)) if x == w);
    let mut uses = Vec::new();
    let mut reexports = Vec::new();
    // Root of a path starting at i: (its module, the index after `root::`).
    let root = |i: usize| -> Option<(ModPath, usize)> {
        if word(i, "crate") && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Sep) {
            return Some((Vec::new(), i + 2));
        }
        let mut up = 0;
        let mut j = i;
        while word(j, "super") && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::Sep) {
            up += 1;
            j += 2;
        }
        (up > 0).then(|| (me[..me.len().saturating_sub(up)].to_vec(), j))
    };
    let mut i = 0;
    while i < toks.len() {
        let after_sep = i > 0 && toks[i - 1].0 == Tok::Sep;
        // `pub use` / `pub(crate) use`: a re-export, its paths relative to `me` unless rooted.
        if word(i, "pub") {
            let mut j = i + 1;
            if toks.get(j).map(|t| &t.0) == Some(&Tok::Punct('(')) {
                while j < toks.len() && toks[j].0 != Tok::Punct(')') {
                    j += 1;
                }
                j += 1;
            }
            if word(j, "use") {
                let (base, start) = root(j + 1).unwrap_or((me.to_vec(), j + 1));
                let mut tree = Vec::new();
                parse_tree(&toks, start, base, &mut tree);
                reexports.extend(tree.into_iter().map(|(p, name)| (name, p)));
            }
        }
        if !after_sep {
            if let Some((base, start)) = root(i) {
                let mut tree = Vec::new();
                let end = parse_tree(&toks, start, base, &mut tree);
                uses.extend(tree.into_iter().map(|(p, _)| (p, toks[i].1)));
                i = end.max(i + 1);
                continue;
            }
        }
        i += 1;
    }
    Source { uses, reexports }
}

/// A module of `src/`: its path, file and what its code names.
struct Module {
    path: ModPath,
    file: String,
    source: Source,
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

/// The crate's modules, but for `lib.rs` and `main.rs`.
fn modules() -> Vec<Module> {
    let src = common::repo_file("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().with_extension("");
        let mut path: ModPath = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if path.last().is_some_and(|l| l == "mod") {
            path.pop();
        }
        if path == ["lib"] || path == ["main"] {
            continue;
        }
        let code = drop_test_modules(&strip(&std::fs::read_to_string(&f).unwrap()));
        let source = read_source(&code, &path);
        out.push(Module {
            file: format!("src/{}", f.strip_prefix(&src).unwrap().display()),
            path,
            source,
        });
    }
    out
}

/// Which module `path` names: the longest module prefix, following re-exports (a name
/// a module re-exports is its definer's).
fn resolve(
    path: &[String],
    known: &BTreeSet<ModPath>,
    reexports: &BTreeMap<(ModPath, String), ModPath>,
) -> Option<ModPath> {
    let mut p = path.to_vec();
    for _ in 0..8 {
        let k = (1..=p.len()).rev().find(|&k| known.contains(&p[..k]))?;
        match p
            .get(k)
            .and_then(|name| reexports.get(&(p[..k].to_vec(), name.clone())))
        {
            Some(target) if target.as_slice() != p.as_slice() => {
                p = [target.clone(), p[k + 1..].to_vec()].concat();
            }
            _ => return Some(p[..k].to_vec()),
        }
    }
    None
}

/// For each module, the other modules it uses (neither its ancestors nor its
/// descendants), each with the file and line of its first use.
fn uses(mods: &[Module]) -> BTreeMap<String, BTreeMap<String, String>> {
    let known: BTreeSet<ModPath> = mods.iter().map(|m| m.path.clone()).collect();
    let reexports: BTreeMap<(ModPath, String), ModPath> = mods
        .iter()
        .flat_map(|m| {
            m.source
                .reexports
                .iter()
                .map(|(name, p)| ((m.path.clone(), name.clone()), p.clone()))
        })
        .collect();
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for m in mods {
        let edges = out.entry(m.path.join("::")).or_default();
        for (p, line) in &m.source.uses {
            let Some(to) = resolve(p, &known, &reexports) else {
                continue;
            };
            if to.starts_with(&m.path) || m.path.starts_with(&to) {
                continue;
            }
            edges
                .entry(to.join("::"))
                .or_insert_with(|| format!("{}:{line}", m.file));
        }
    }
    out
}

/// A cycle of `graph`, as its modules in order, if it has one.
fn a_cycle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    // 1: on the current path, 2: done.
    fn visit<'a>(
        v: &'a str,
        graph: &'a BTreeMap<String, BTreeMap<String, String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(v, 1);
        path.push(v);
        for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
            match state.get(w.as_str()) {
                Some(1) => {
                    let from = path.iter().position(|p| *p == w).unwrap();
                    return Some(path[from..].iter().map(|s| s.to_string()).collect());
                }
                None => {
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
    let level = |m: &str| LEVELS.iter().position(|l| l.contains(&m));
    match (level(from), level(to)) {
        (Some(a), Some(b)) if b < a => None,
        (Some(_), Some(_)) => Some(format!("`{to}` is not on a level below `{from}`'s")),
        (None, _) => Some(format!("`{from}` is on no level")),
        (_, None) => Some(format!("`{to}` is on no level")),
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
            LEVELS.iter().any(|l| l.contains(&top)) || BESIDE.contains(&top),
            "{} is on no level and not beside them",
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

/// The paths a piece of code names, as `a::b` strings, for code of module
/// `cuda::shadow::decode`.
fn named(code: &str) -> Vec<String> {
    let me: ModPath = ["cuda", "shadow", "decode"].map(String::from).to_vec();
    read_source(&drop_test_modules(&strip(code)), &me)
        .uses
        .iter()
        .map(|(p, _)| p.join("::"))
        .collect()
}

#[test]
fn the_reader_sees_paths_as_the_compiler_does() {
    assert_eq!(named("use crate::cpu::ops::Rope; // crate::server"), ["cpu::ops::Rope"]);
    assert_eq!(
        named("/// see [`crate::engine::x`]\n/* crate::pool /* nested */ crate::eval */"),
        Vec::<String>::new()
    );
    assert_eq!(
        named("let x = shadowkv_crate::pool; a::super::b;"),
        Vec::<String>::new()
    );
    assert_eq!(
        named(r##"let s = "crate::server"; let r = r#"crate::cli "x""#; let c = '"'; let q = '\''; crate::x"##),
        ["x"]
    );
    assert_eq!(named("fn f<'a>(x: &'a crate::pool::Pool) {}"), ["pool::Pool"]);
    assert_eq!(named("use super::stages::Stage;"), ["cuda::shadow::stages::Stage"]);
    assert_eq!(
        named("use super::super::ops::{\n    f,\n    CudaOps as Ops,\n};"),
        ["cuda::ops::f", "cuda::ops::CudaOps"]
    );
    assert_eq!(
        named("use crate::a::{b::{X, Y}, c::Z, self};"),
        ["a::b::X", "a::b::Y", "a::c::Z", "a"]
    );
    assert_eq!(
        named("let m = super::CudaModel::new();"),
        ["cuda::shadow::CudaModel::new"]
    );
    assert_eq!(
        named("use crate::cpu::X;\n#[cfg(test)]\nmod tests {\n    use crate::server::Y;\n}\nuse crate::pool::Z;"),
        ["cpu::X", "pool::Z"]
    );
    assert_eq!(
        named("#[cfg(test)]\nmod helpers;\nfn f() { crate::pool::g() }"),
        ["pool::g"]
    );
    // A re-export counts as its definer.
    let me: ModPath = vec!["cuda".into()];
    let src = read_source(
        &strip("pub use model::{CudaModel, GpuSeq as Seq};\npub(crate) use crate::cpu::X;"),
        &me,
    );
    let names: Vec<(String, String)> = src.reexports.iter().map(|(n, p)| (n.clone(), p.join("::"))).collect();
    assert_eq!(
        names,
        [
            ("CudaModel".into(), "cuda::model::CudaModel".into()),
            ("Seq".into(), "cuda::model::GpuSeq".into()),
            ("X".into(), "cpu::X".into())
        ]
    );
    let known: BTreeSet<ModPath> = [vec!["cuda".to_string()], vec!["cuda".into(), "model".into()]].into();
    let reexports: BTreeMap<(ModPath, String), ModPath> = src
        .reexports
        .iter()
        .map(|(n, p)| ((me.clone(), n.clone()), p.clone()))
        .collect();
    let p: ModPath = ["cuda", "CudaModel", "new"].map(String::from).to_vec();
    assert_eq!(
        resolve(&p, &known, &reexports),
        Some(vec!["cuda".into(), "model".into()])
    );
}

#[test]
fn the_rules_refuse_what_they_should() {
    assert!(refused("shadow", "cpu").is_none());
    assert!(refused("cpu", "shadow").is_some());
    assert!(refused("cuda", "engine").is_some());
    assert!(refused("engine", "topology").is_none());
    assert!(refused("topology", "model").is_some());
    assert!(refused("eval", "server").is_some() && refused("server", "eval").is_some());
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
