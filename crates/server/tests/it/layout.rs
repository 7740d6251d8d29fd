//! The server's rooms: the job domain (`src/job/`) knows no HTTP, and the background
//! worker and inference reach jobs through it, never through the HTTP handlers.

use crate::common::root;

fn source(rel: &str) -> String {
    let p = root().join("crates/server/src").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Lines of code (no comments) that mention `needle`.
fn mentions(text: &str, needle: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .filter(|l| l.contains(needle))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn the_worker_and_inference_do_not_import_the_http_layer() {
    for f in ["worker.rs", "inference.rs"] {
        let hits = mentions(&source(f), "crate::api");
        assert!(hits.is_empty(), "{f} imports the HTTP layer: {hits:?}");
        assert!(
            !mentions(&source(f), "crate::job").is_empty(),
            "{f} no longer goes through the job domain; is this check still looking at the right file?"
        );
    }
}

#[test]
fn the_job_domain_knows_no_http() {
    let dir = root().join("crates/server/src/job");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        for needle in ["axum", "crate::api", "StatusCode"] {
            let hits = mentions(&text, needle);
            assert!(hits.is_empty(), "{}: {hits:?}", e.path().display());
        }
        seen += 1;
    }
    assert!(seen >= 3, "job/ has {seen} files");
}
