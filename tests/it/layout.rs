//! The library's layout rule: no import cycles between its modules (each
//! file is a module; `crate::`, `super::` and `self::` paths are its
//! imports, tests and comments aside). The binary's `cli/` is left out: it
//! sits on top and only imports the library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/adapter/lora.rs` → `["adapter", "lora"]`; `mod.rs` and `lib.rs`
/// name their folder.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The module a path such as `super::low_rank::LowRankUpdate` names: the
/// longest prefix that is a known module.
fn target(from: &Module, path: &str, modules: &BTreeSet<Module>) -> Option<Module> {
    let mut parts = path.split("::");
    let mut base = match parts.next()? {
        "crate" => Vec::new(),
        "self" => from.clone(),
        "super" => from[..from.len().saturating_sub(1)].to_vec(),
        _ => return None,
    };
    let mut found = None;
    for part in parts {
        if part == "super" {
            base.pop();
            continue;
        }
        base.push(part.to_string());
        if modules.contains(&base) {
            found = Some(base.clone());
        }
    }
    found
}

/// Every module's imports, by the paths in its non-test, non-comment code.
fn imports(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.retain(|f| !f.starts_with(src.join("cli")) && !f.ends_with("main.rs"));
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let from = module_of(src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let mut to = BTreeSet::new();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (start, _) in line.match_indices("::") {
                let begin = line[..start]
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .map_or(0, |i| i + 1);
                let end = line[start..]
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .map_or(line.len(), |i| start + i);
                if let Some(t) = target(&from, &line[begin..end], &modules) {
                    if t != from {
                        to.insert(t);
                    }
                }
            }
        }
        graph.insert(from, to);
    }
    graph
}

/// A cycle through `node`, if the graph has one reachable from it.
fn find_cycle(
    graph: &BTreeMap<Module, BTreeSet<Module>>,
    node: &Module,
    stack: &mut Vec<Module>,
    done: &mut BTreeSet<Module>,
) -> Option<Vec<Module>> {
    if let Some(i) = stack.iter().position(|m| m == node) {
        return Some(stack[i..].to_vec());
    }
    if done.contains(node) {
        return None;
    }
    stack.push(node.clone());
    for next in &graph[node] {
        if let Some(cycle) = find_cycle(graph, next, stack, done) {
            return Some(cycle);
        }
    }
    stack.pop();
    done.insert(node.clone());
    None
}

#[test]
fn library_modules_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = imports(&src);
    // The scan sees real imports: run.rs uses the dataset and the optimizer.
    let run = &graph[&vec!["train".to_string(), "run".to_string()]];
    assert!(run.contains(&vec!["train".to_string(), "dataset".to_string()]));
    assert!(run.contains(&vec!["train".to_string(), "optim".to_string()]));
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = find_cycle(&graph, node, &mut Vec::new(), &mut done) {
            let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
            panic!("import cycle: {} -> back", names.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle() {
    let m = |s: &str| vec![s.to_string()];
    let graph = BTreeMap::from([
        (m("a"), BTreeSet::from([m("b")])),
        (m("b"), BTreeSet::from([m("c")])),
        (m("c"), BTreeSet::from([m("a")])),
    ]);
    let cycle = find_cycle(&graph, &m("a"), &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(cycle, Some(vec![m("a"), m("b"), m("c")]));
}
