//! Chat and text completions on base and fine-tuned models, through the real binary.

use crate::common;

use common::{check_response, copy_dir, root, spec, upload_chat, wait_status, Backend, TestServer};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

async fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(s.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn finished_job(s: &TestServer, hp: Value) -> Value {
    let file = upload_chat(s).await;
    let (_, job) = post(
        s,
        "/v1/fine_tuning/jobs",
        json!({"model": "tiny-llama", "training_file": file, "hyperparameters": hp}),
    )
    .await;
    wait_status(
        s,
        job["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(120),
    )
    .await
}

/// Chat on the base and on the fine-tuned model; greedy output equals
/// `loraforge generate` with the downloaded adapter; streaming; completions; errors.
#[tokio::test]
async fn chat_completions_on_base_and_fine_tuned_models() {
    let spec = spec();
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let job = finished_job(
        &s,
        json!({"max_steps": 30, "learning_rate": 1e-2, "batch_size": 4, "checkpoint_interval": 10}),
    )
    .await;
    let ft = job["fine_tuned_model"].as_str().unwrap().to_string();
    let prompt = "What is the capital of France?";
    let ask = |model: String| {
        let s = &s;
        async move {
            post(
                s,
                "/v1/chat/completions",
                json!({"model": model, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": prompt}]}),
            )
            .await
        }
    };
    let (st, base) = ask("tiny-llama".into()).await;
    assert_eq!(st, 200, "{base}");
    let (st, tuned) = ask(ft.clone()).await;
    assert_eq!(st, 200, "{tuned}");
    let mut errs = check_response(&spec, "/v1/chat/completions", "post", 200, &tuned);
    assert_eq!(tuned["model"], ft.as_str());
    assert_eq!(
        tuned["usage"]["completion_tokens"].as_u64().unwrap()
            + tuned["usage"]["prompt_tokens"].as_u64().unwrap(),
        tuned["usage"]["total_tokens"].as_u64().unwrap()
    );
    let a = base["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let b = tuned["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(a, b, "the adapter did not change the answer");

    // The same, token for token, as `loraforge generate` with the downloaded adapter.
    let dir = common::download_adapter(&s, job["id"].as_str().unwrap()).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .args(["generate", "--model"])
        .arg(root().join("tests/fixtures/tiny-llama"))
        .arg("--adapter")
        .arg(dir.path())
        .args(["--prompt", prompt, "--max-new-tokens", "16"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        b
    );

    // A checkpoint is a model too.
    let (st, ck) = ask(format!("{ft}:ckpt-step-10")).await;
    assert_eq!(st, 200, "{ck}");

    // Streaming: a role chunk, content chunks, a finish chunk with usage, then [DONE].
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(
            &json!({"model": ft, "temperature": 0, "max_tokens": 16, "stream": true,
                      "messages": [{"role": "user", "content": prompt}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, b,
        "the stream's text differs from the non-streamed answer"
    );
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string());
    assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Text completions.
    let (st, c) = post(
        &s,
        "/v1/completions",
        json!({"model": ft, "prompt": "The capital of", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{c}");
    errs.extend(check_response(&spec, "/v1/completions", "post", 200, &c));
    assert!(c["choices"][0]["text"].is_string());
    // stop strings end the text before them.
    let (_, full) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny-llama", "prompt": "a", "max_tokens": 12, "temperature": 0}),
    )
    .await;
    let full = full["choices"][0]["text"].as_str().unwrap().to_string();
    if let Some(ch) = full.chars().nth(3).filter(|c| !c.is_whitespace()) {
        let (_, cut) = post(&s, "/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "max_tokens": 12, "temperature": 0, "stop": ch.to_string()})).await;
        let want: String = full.split(ch).next().unwrap().to_string();
        assert_eq!(cut["choices"][0]["text"], want.as_str());
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    }

    // An empty raw prompt encodes to no tokens here (no BOS): a 400, not a 500.
    let (st, e) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny-llama", "prompt": "", "max_tokens": 4}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["param"], "prompt", "{e}");

    // Errors: unknown model 404, a model still training 409, an over-long prompt 400.
    let (st, e) = ask("no-such-model".into()).await;
    assert_eq!(st, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    errs.extend(check_response(
        &spec,
        "/v1/chat/completions",
        "post",
        404,
        &e,
    ));
    let (st, e) = ask("ft:tiny-llama:lora:ftjob-00000000000000000000000000000000".into()).await;
    assert_eq!(st, 404, "{e}");
    let file = upload_chat(&s).await;
    let (_, long) = post(&s, "/v1/fine_tuning/jobs", json!({"model": "tiny-llama", "training_file": file, "hyperparameters": {"max_steps": 100000}})).await;
    let (st, e) = ask(long["fine_tuned_model"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| format!("ft:tiny-llama:lora:{}", long["id"].as_str().unwrap())))
    .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "model_not_ready");
    let huge = "word ".repeat(2000);
    let (st, e) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny-llama", "messages": [{"role": "user", "content": huge}]}),
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context of 256 tokens"),
        "{e}"
    );
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    // Hostile-client finding 7: a prompt of megabytes is refused by its size, without
    // being tokenized (the message counts bytes, not tokens).
    let (st, e) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "word ".repeat(600_000)}]}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3000000 bytes"),
        "{e}"
    );

    // A client that leaves mid-stream frees the model: the next request is answered.
    // (No max_tokens: the default fills what the context leaves, the longest run there is.)
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(
            &json!({"model": "tiny-llama", "temperature": 1.0, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the streamed chat was refused");
    let mut stream = r.bytes_stream();
    let _ = stream.next().await;
    drop(stream);
    let (st, _) = tokio::time::timeout(Duration::from_secs(60), ask("tiny-llama".into()))
        .await
        .expect("the model stayed busy");
    assert_eq!(st, 200);
    // And the generation itself stopped when the client left, before the context was
    // full: the server logs how far each generation went and why it ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let line = loop {
        let logs = s.logs();
        if let Some(l) = logs
            .lines()
            .find(|l| l.contains("generation ended") && l.contains("cancelled"))
        {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no generation was cancelled by the disconnect:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let generated: usize = line
        .split("completion_tokens=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {line:?}"));
    assert!(
        generated < 200,
        "generation ran on after the disconnect: {line}"
    );
    // The run it cut short would have gone on: without a disconnect the same request
    // generates to the end of the context.
    let (st, full) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny-llama", "temperature": 1.0,
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(st, 200, "{full}");
    let full_tokens = full["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(
        generated < full_tokens,
        "the cancelled run ({generated} tokens) went as far as an uninterrupted one ({full_tokens})"
    );
    let _ = reqwest::Client::new()
        .post(s.url(&format!(
            "/v1/fine_tuning/jobs/{}/cancel",
            long["id"].as_str().unwrap()
        )))
        .send()
        .await;
    assert!(
        errs.is_empty(),
        "responses differ from openapi.yaml:\n{}",
        errs.join("\n")
    );
}

/// A chat file with tool definitions and calls: refused at creation for a model whose
/// template would not print them (naming the model and the line), trained on a model
/// whose template does.
#[tokio::test]
async fn tool_calling_data_trains_only_where_the_template_renders_it() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    for m in ["tiny-llama", "tiny-qwen3"] {
        copy_dir(
            &root().join("tests/fixtures").join(m),
            &s.models_dir().join(m),
        );
    }
    let cases = std::fs::read_to_string(root().join("tests/fixtures/chat-encoding.json")).unwrap();
    let cases: Value = serde_json::from_str(&cases).unwrap();
    let case: Value = serde_json::from_str(
        cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "tiny-qwen3/tools_call_and_answer")
            .unwrap()["example"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let mut ex = case.clone();
    // Words with the call, so that a template that ignores calls renders it at all.
    ex["messages"][2]["content"] = json!("Let me check.");
    let line = ex.to_string();
    let plain = common::chat_line(0);
    let body = format!("{plain}{line}\n{line}\n");
    let (_, f) = common::upload_raw(&s, "tools.jsonl", body).await;
    assert_eq!(f["status"], "processed", "{f}");
    let file = f["id"].as_str().unwrap();
    // The tiny model has 256 positions; the tool prompt is longer in its small vocabulary.
    let hp = json!({"max_steps": 2, "batch_size": 2, "max_seq_len": 256});
    let (st, e) = common::create_job(
        &s,
        json!({"model": "tiny-llama", "training_file": file, "hyperparameters": hp}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["param"], "training_file", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("line 2") && msg.contains("tiny-llama") && msg.contains("tool definitions"),
        "{msg}"
    );
    let (st, job) = common::create_job(
        &s,
        json!({"model": "tiny-qwen3", "training_file": file, "hyperparameters": hp}),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    let done = wait_status(
        &s,
        job["id"].as_str().unwrap(),
        &["succeeded", "failed"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
}
