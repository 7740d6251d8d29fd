//! The trainer's rooms and the direction of their doors, checked from the source: no
//! import cycle between rooms, the training loop names no family, and each family
//! reaches the others only through the registry.
//!
//! A room is a top-level module (`io`, `ops`, `nn`, `lora`, `train`, `data`, `device`,
//! `archive`, `classes`),
//! one family folder (`families/decoder`, ...), the registry (`families/mod.rs`) or the
//! `Family` trait (`families/family.rs`). `lib.rs` is the public surface and is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under src/ (`families/decoder/model.rs` -> [families,
/// decoder, model]; `mod.rs` names its folder).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// The room a module path lives in; `None` for the crate root, its items (`Error`,
/// `Result`) and the binaries.
fn room(path: &[String]) -> Option<String> {
    let top = |name: &str| {
        let s = src();
        s.join(name).is_dir() || s.join(format!("{name}.rs")).is_file()
    };
    match path {
        [] => None,
        [f, ..] if f == "bin" || !top(f) => None,
        [f, x, ..]
            if f == "families"
                && (src().join(f).join(x).is_dir()
                    || src().join(f).join(format!("{x}.rs")).is_file()) =>
        {
            Some(format!("families/{x}"))
        }
        [f, ..] if f == "families" => Some("families".into()),
        [top, ..] => Some(top.clone()),
    }
}

/// Code without comments (doc links name modules without depending on them) and
/// without the unit tests at the end of a file (whose `super` is the file itself).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b` and `super::...::a` path in the code, resolved to a module path.
fn references(code: &str, me: &[String], is_mod_file: bool) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let at_word = i == 0 || !ident(bytes[i - 1]);
        let (base, skip): (Vec<String>, usize) = if at_word && rest.starts_with("crate::") {
            (Vec::new(), 7)
        } else if at_word && rest.starts_with("super::") {
            // `super` of a mod.rs file is its folder's parent; of a file, its folder.
            let mut b = me.to_vec();
            if !is_mod_file || !b.is_empty() {
                b.pop();
            }
            let mut j = i + 7;
            while bytes[j..].iter().collect::<String>().starts_with("super::") {
                b.pop();
                j += 7;
            }
            (b, j - i)
        } else {
            i += 1;
            continue;
        };
        let mut j = i + skip;
        let mut path = base;
        loop {
            let start = j;
            while j < bytes.len() && ident(bytes[j]) {
                j += 1;
            }
            if j > start {
                path.push(bytes[start..j].iter().collect());
            }
            if bytes[j..].iter().take(2).collect::<String>() == "::"
                && bytes.get(j + 2).is_some_and(|&c| ident(c))
            {
                j += 2;
            } else {
                break;
            }
        }
        out.push(path);
        i = j.max(i + 1);
    }
    out
}

/// Room -> rooms it refers to.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap();
        let me = module_path(rel);
        let Some(from) = room(&me) else { continue };
        let is_mod = rel.file_name().is_some_and(|n| n == "mod.rs");
        let text = std::fs::read_to_string(&f).unwrap();
        let entry = g.entry(from.clone()).or_default();
        let code = code(&text);
        // A folder's mod.rs (or lib.rs) reaches its children by declaring them.
        let children = code.lines().filter_map(|l| {
            let l = l.trim();
            let name = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))?
                .strip_suffix(';')?;
            let mut p = me.clone();
            p.push(name.to_string());
            Some(p)
        });
        let mut targets = references(&code, &me, is_mod);
        targets.extend(children);
        for target in targets {
            if let Some(to) = room(&target) {
                if to != from {
                    entry.insert(to);
                }
            }
        }
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut c = stack[at..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_import_cycle_between_rooms() {
    let g = graph();
    // The scanner sees what it must: the families depend on the loop, the registry on
    // the families.
    assert!(g["families/decoder"].contains("train"), "{g:#?}");
    assert!(g["families"].contains("families/decoder"), "{g:#?}");
    if let Some(c) = find_cycle(&g) {
        panic!("import cycle: {}\n{g:#?}", c.join(" -> "));
    }
}

#[test]
fn the_loop_and_the_shared_rooms_name_no_family() {
    let g = graph();
    for shared in [
        "train", "lora", "io", "ops", "nn", "data", "device", "archive", "classes",
    ] {
        let families: Vec<_> = g
            .get(shared)
            .into_iter()
            .flatten()
            .filter(|r| r.starts_with("families"))
            .collect();
        assert!(families.is_empty(), "{shared} refers to {families:?}");
    }
}

#[test]
fn families_meet_only_through_the_registry_and_the_trait() {
    let g = graph();
    for (from, tos) in &g {
        if !from.starts_with("families/") || from == "families/family" {
            continue;
        }
        for to in tos {
            assert!(
                !to.starts_with("families") || to == "families/family",
                "{from} refers to {to}: a family reaches another only through the registry"
            );
        }
    }
}

#[test]
fn the_scanner_sees_a_cycle_when_there_is_one() {
    let mut g = graph();
    g.get_mut("train")
        .unwrap()
        .insert("families/decoder".into());
    let c = find_cycle(&g).expect("a cycle through train and the decoder");
    assert!(c.contains(&"train".to_string()), "{c:?}");
}
