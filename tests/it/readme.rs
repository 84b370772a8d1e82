//! The README's library snippet is the compiled `examples/readme_snippet.rs`.

#[test]
fn readme_snippet_is_the_compiled_example() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/readme_snippet.rs")).unwrap();
    let (_, shown) = example
        .split_once("// --- README snippet ---\n")
        .expect("the example marks where the README's code starts");
    let section = readme
        .split_once("## Use it in your own Candle model")
        .expect("the README has the section")
        .1;
    let block = section
        .split_once("```rust\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("the section has a rust block")
        .0;
    assert_eq!(
        block, shown,
        "README.md's snippet differs from examples/readme_snippet.rs"
    );
    assert!(
        !block.contains("\n# ") && !block.contains("candle::"),
        "{block}"
    );
}
