//! The web dashboard: how its files are served (always), and the page itself driven in
//! Debian's Chromium by `tests/browser/dashboard.mjs` (Playwright) against the real
//! binary training the tiny-llama fixture.
//!
//! The browser test needs `node`, Chromium (`/usr/bin/chromium` or `$CHROMIUM`) and
//! `npm ci` in tests/browser. Without them it is skipped with a message, unless
//! `LORAFORGE_REQUIRE_BROWSER` is set (as `.ci/run` does), when it fails instead.

use crate::common;

use common::{copy_dir, root, Backend, TestServer};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_without_a_key() {
    let s = TestServer::start(Backend::Sqlite, &["--api-key", "k"]).await;
    let c = reqwest::Client::new();

    let r = c.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("connect-src 'self'"));
    let html = r.text().await.unwrap();
    assert!(html.contains("<script type=\"module\" src=\"/ui/app.js\">"));

    for (path, ty) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/api.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        (
            "/ui/vendor/uplot/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
        ),
        ("/ui/vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    ] {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], ty, "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        let on_disk = std::fs::read(
            root()
                .join("crates/server/assets")
                .join(&path["/ui/".len()..]),
        )
        .unwrap();
        assert_eq!(r.bytes().await.unwrap().to_vec(), on_disk, "{path}");
        // A browser revalidating an unchanged file gets a bodiless 304.
        let r = c
            .get(s.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{path}");
        assert!(r.bytes().await.unwrap().is_empty());
    }
    let r = c.get(s.url("/ui/nope.js")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // The API behind it still wants the key.
    assert_eq!(
        c.get(s.url("/v1/files")).send().await.unwrap().status(),
        401
    );
}

/// What the browser test needs, or why it cannot run.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let script = root().join("tests/browser/dashboard.mjs");
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_ok {
        return Err("`node` is not on PATH".into());
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        return Err(format!(
            "no Chromium at {} (apt-get install chromium, or set CHROMIUM)",
            chromium.display()
        ));
    }
    if !root()
        .join("tests/browser/node_modules/playwright-core")
        .is_dir()
    {
        return Err("playwright-core is not installed (cd tests/browser && npm ci)".into());
    }
    Ok((script, chromium))
}

/// Where screenshots go: beside the build (never committed), printed by the test.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/debug/deps/dashboard-<hash> -> target
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().to_path_buf()
        });
    target.join("dashboard-screenshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_trains_a_job_in_chromium() {
    let (script, chromium) = match browser_tools() {
        Ok(t) => t,
        Err(why) if std::env::var_os("LORAFORGE_REQUIRE_BROWSER").is_some() => {
            panic!("LORAFORGE_REQUIRE_BROWSER is set but the browser test cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED the_dashboard_trains_a_job_in_chromium: {why}");
            return;
        }
    };
    // A 3 s lease means a heartbeat every second: a pause takes effect within a second
    // instead of ten.
    let s = TestServer::start(Backend::Sqlite, &["--lease-seconds", "3"]).await;
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    copy_dir(
        &root().join("tests/fixtures/tiny-resnet"),
        &s.models_dir().join("tiny-resnet"),
    );
    copy_dir(
        &root().join("tests/fixtures/tiny-whisper-asr"),
        &s.models_dir().join("tiny-whisper-asr"),
    );
    let key = "dashboard-test-key";
    let keyed = TestServer::start(Backend::Sqlite, &["--api-key", key, "--devices", "none"]).await;
    let shots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&shots);

    let t0 = Instant::now();
    let mut child = Command::new("node")
        .arg(&script)
        .arg(&s.base)
        .arg(&shots)
        .arg(&keyed.base)
        .arg(key)
        .env("CHROMIUM", &chromium)
        .current_dir(root().join("tests/browser"))
        .spawn()
        .expect("spawn node");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser test ran over 240 s\n{}", s.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        status.success(),
        "the browser test failed ({status}); server log:\n{}",
        s.logs()
    );
    for name in ["job-running.png", "job-succeeded.png"] {
        let p = shots.join(name);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "{} is missing or empty", p.display());
    }
    println!(
        "browser test passed in {:.1} s; screenshots in {}",
        t0.elapsed().as_secs_f64(),
        shots.display()
    );
}
