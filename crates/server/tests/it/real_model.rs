//! Checks on the real SmolLM2-135M-Instruct (fetched by `scripts/fetch-models.sh`).
//!
//! Without the model they skip, unless `LORAFORGE_REQUIRE_REAL_MODELS=1` (CI sets it),
//! which turns a missing model into a failure. The PEFT check needs `LORAFORGE_VENV`
//! (a venv with transformers + peft + gguf, `scripts/setup-python.sh`).

use crate::common;
use common::run;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{peft_check, root};

fn smollm2() -> Option<PathBuf> {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("LORAFORGE_REQUIRE_REAL_MODELS").as_deref() == Ok("1") {
        panic!("{} is missing: run scripts/fetch-models.sh", p.display());
    }
    eprintln!(
        "skipped: {} is missing (scripts/fetch-models.sh)",
        p.display()
    );
    None
}

fn loraforge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loraforge"))
}

/// The tokenizer rebuilt from the GGUF's metadata tokenizes like HF's tokenizer.json
/// (references in tests/fixtures/smollm2-tokenization.json, from
/// scripts/make_smollm2_tokenization.py).
#[test]
fn smollm2_gguf_tokenizer_matches_tokenizer_json() {
    let Some(model) = smollm2() else { return };
    let base = loraforge_trainer::families::decoder::loader::load(
        &model,
        &loraforge_trainer::device::Device::Cpu,
    )
    .unwrap();
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/smollm2-tokenization.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let s = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = base.tokenizer.encode(s, true).unwrap();
        assert_eq!(got, want, "tokenization differs on {s:?}");
    }
    assert!(base.tokenizer.chat_template.is_some());
}

fn losses(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in [
                "step",
                "loss",
                "lr",
                "grad_norm",
                "tokens",
                "tokens_per_second",
            ] {
                assert!(v.get(k).is_some(), "metrics line lacks {k}: {l}");
            }
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

/// 30 steps on a small chat set lower the loss clearly, PEFT loads the adapter, and the
/// adapter changes what the model answers.
#[test]
fn smollm2_thirty_steps_learn_and_peft_loads_the_adapter() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let metrics = dir.path().join("metrics.jsonl");
    let data = root().join("tests/data/chat-small.jsonl");
    run(loraforge()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--max-steps",
            "30",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--scheduler",
            "constant",
            "--seed",
            "7",
            "--max-grad-norm",
            "1.0",
            // Thirty steps of four examples (packed, each would take the whole file).
            "--no-packing",
            "--metrics-jsonl",
        ])
        .arg(&metrics));
    let l = losses(&metrics);
    assert_eq!(l.len(), 30);
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[25..].iter().sum::<f64>() / 5.0;
    println!("SmolLM2 30 steps: mean loss of steps 1-5 {first:.4}, of steps 26-30 {last:.4}");
    assert!(
        last < 0.6 * first,
        "loss did not drop clearly: {first:.4} -> {last:.4}"
    );
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // A prompt from the data set: the base model answers plainly, the adapter in the trained style.
    let line = std::fs::read_to_string(&data).unwrap();
    let first_line: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let prompt = first_line["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let gen = |adapter: Option<&Path>| {
        let mut c = loraforge();
        c.args(["generate", "--model"]).arg(&model).args([
            "--prompt",
            &prompt,
            "--max-new-tokens",
            "24",
        ]);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        run(&mut c)
    };
    let plain = gen(None);
    let tuned = gen(Some(&out));
    println!("prompt: {prompt}\nbase:    {plain}\nadapter: {tuned}");
    assert_ne!(plain, tuned, "the adapter did not change the answer");

    peft_check(&model, &out);

    // Training wrote the LoRA GGUF llama.cpp loads beside the PEFT files; `loraforge
    // export` writes the same bytes, and llama.cpp generates what loraforge does with it.
    let gguf = out.join("adapter_model.gguf");
    assert!(gguf.is_file(), "training wrote no adapter_model.gguf");
    let exported = dir.path().join("exported.gguf");
    run(loraforge()
        .args(["export", "--format", "lora-gguf", "--adapter"])
        .arg(&out)
        .arg("--out")
        .arg(&exported));
    assert!(
        std::fs::read(&gguf).unwrap() == std::fs::read(&exported).unwrap(),
        "`loraforge export` and training wrote different LoRA GGUFs"
    );
    // The adapter merged into the base's GGUF, a model of its own, with an Ollama Modelfile.
    let merged = dir.path().join("merged.gguf");
    run(loraforge()
        .args([
            "export",
            "--format",
            "merged-gguf",
            "--dtype",
            "f16",
            "--adapter",
        ])
        .arg(&out)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&merged));
    let modelfile = std::fs::read_to_string(dir.path().join("merged.Modelfile")).unwrap();
    assert!(modelfile.starts_with("FROM ./merged.gguf\n"), "{modelfile}");
    assert!(
        modelfile.contains("PARAMETER stop \"<|im_end|>\""),
        "{modelfile}"
    );
    llama_cpp_check(&model, &out, &gguf, &merged);
}

/// llama.cpp (llama-cpp-python, `scripts/setup-llama-cpp.sh`) loads `gguf` over the base
/// GGUF, and the merged GGUF `merged` alone, and generates with each, greedily from the
/// same prompt ids, the tokens `loraforge generate` does with the PEFT adapter `adapter`
/// (`scripts/llama-cpp-check.py`). Skipped when the
/// venv has no llama_cpp, unless `LORAFORGE_REQUIRE_LLAMA_CPP=1` (CI).
fn llama_cpp_check(model: &Path, adapter: &Path, gguf: &Path, merged: &Path) {
    let required = std::env::var("LORAFORGE_REQUIRE_LLAMA_CPP").as_deref() == Ok("1");
    let python = match std::env::var("LORAFORGE_VENV") {
        Ok(v) => Path::new(&v).join("bin/python"),
        Err(_) => PathBuf::from("python3"),
    };
    let has = Command::new(&python)
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        assert!(
            !required,
            "{} cannot import llama_cpp (scripts/setup-llama-cpp.sh)",
            python.display()
        );
        eprintln!(
            "llama.cpp check skipped: no llama_cpp in {}",
            python.display()
        );
        return;
    }
    // A training prompt and two the data set does not hold.
    let prompts = [
        "What is the capital of France?",
        "What is the capital of Spain?",
        "Name the capital of Canada.",
    ];
    let generate = |prompt: &str, adapter: Option<&Path>| -> serde_json::Value {
        let mut c = loraforge();
        c.args([
            "generate",
            "--json",
            "--ignore-eos",
            "--max-new-tokens",
            "24",
            "--model",
        ])
        .arg(model)
        .args(["--prompt", prompt]);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        serde_json::from_str(run(&mut c).trim()).unwrap()
    };
    let cases: Vec<serde_json::Value> = prompts
        .iter()
        .map(|p| {
            let base = generate(p, None);
            let tuned = generate(p, Some(adapter));
            assert_eq!(base["prompt_ids"], tuned["prompt_ids"]);
            serde_json::json!({"prompt_ids": base["prompt_ids"], "base": base["ids"], "adapter": tuned["ids"]})
        })
        .collect();
    let expect = adapter.with_file_name("llama-cpp-cases.json");
    std::fs::write(&expect, serde_json::to_string(&cases).unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(root().join("scripts/llama-cpp-check.py"))
        .arg("--model")
        .arg(model)
        .arg("--lora")
        .arg(gguf)
        .arg("--merged")
        .arg(merged)
        .arg("--expect")
        .arg(&expect)
        .output()
        .expect("spawn python");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(out.status.success(), "llama-cpp-check.py failed:\n{report}");
}

/// The real model trains through the HTTP API (upload, job, poll) and the downloaded
/// adapter zip loads in PEFT.
#[tokio::test]
async fn smollm2_trains_through_the_api_and_peft_loads_the_download() {
    let Some(model) = smollm2() else { return };
    let s = server_with(&model).await;
    // The server closes a keep-alive connection idle for --header-timeout-seconds (30 s:
    // hyper's header timer also runs between requests), and the PEFT check below can sit
    // that long; a client must retire idle connections sooner, or a request sent as the
    // server closes one fails with IncompleteMessage (README, "Limits").
    let c = reqwest::Client::builder()
        .pool_idle_timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let file = common::upload_chat(&s).await;
    let job: serde_json::Value = c
        .post(s.url("/v1/fine_tuning/jobs"))
        .json(&serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "training_file": file,
            // Unpacked: eight steps of four examples each keep this test short (packed,
            // each step would take the whole file; the fidelity suite checks packing).
            "hyperparameters": {"max_steps": 8, "batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "constant",
                                "packing": false}
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{job}"))
        .to_string();
    let done = common::wait_status(
        &s,
        &id,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(600),
    )
    .await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    println!(
        "SmolLM2 through the API: 8 steps, last train_loss {}",
        done["progress"]["train_loss"]
    );
    let dir = common::download_adapter(&s, &id).await;
    peft_check(&model, dir.path());

    // Try it: the same server answers a training-set prompt with the base and the adapter.
    let ask = |m: String| {
        let c = c.clone();
        let url = s.url("/v1/chat/completions");
        async move {
            let r: serde_json::Value = c
                .post(url)
                .json(
                    &serde_json::json!({"model": m, "temperature": 0, "max_tokens": 24,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
                )
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_else(|| panic!("{r}"))
                .to_string()
        }
    };
    let base = ask("SmolLM2-135M-Instruct.Q4_1.gguf".into()).await;
    let tuned = ask(done["fine_tuned_model"].as_str().unwrap().into()).await;
    println!("chat, base:    {base}\nchat, adapter: {tuned}");
    assert_ne!(base, tuned);
}

/// `loraforge train` over SmolLM2's Q4_1 GGUF kept packed (`--base-dtype auto`, the
/// default) gives the losses and the adapter of the same run over the dequantized base
/// (`--base-dtype f32`), bit for bit: a packed matrix expands to exactly the values that
/// loading it as f32 produces, and the products are the same.
#[test]
fn smollm2_packed_base_trains_exactly_as_the_dequantized_one() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let train = |base: &str| -> (Vec<f64>, Vec<u8>) {
        let out = dir.path().join(base);
        let metrics = dir.path().join(format!("{base}.jsonl"));
        run(loraforge()
            .arg("train")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(root().join("tests/data/chat-small.jsonl"))
            .arg("--out")
            .arg(&out)
            .args([
                "--max-steps",
                "3",
                "--batch-size",
                "2",
                "--max-seq-len",
                "128",
            ])
            .args(["--target-modules", "all-linear", "--threads", "2"])
            .args(["--base-dtype", base])
            .arg("--metrics-jsonl")
            .arg(&metrics));
        let losses = std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
            .collect();
        (
            losses,
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        )
    };
    let (packed, packed_adapter) = train("auto");
    let (dense, dense_adapter) = train("f32");
    assert_eq!(packed.len(), 3, "{packed:?}");
    assert_eq!(
        packed, dense,
        "losses over the packed and the dequantized base"
    );
    assert!(
        packed_adapter == dense_adapter,
        "the adapters differ between the packed and the dequantized base"
    );
}

/// A server (two training threads) whose models directory holds SmolLM2.
async fn server_with(model: &Path) -> common::TestServer {
    let s = common::TestServer::start(common::Backend::Sqlite, &["--train-threads", "2"]).await;
    std::os::unix::fs::symlink(
        model,
        s.models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    s
}

/// `loraforge train --method dpo` on SmolLM2 against the torch + PEFT reference
/// (`scripts/dpo_reference.py`) from the same fresh PEFT adapter: step 1's loss is ln 2,
/// every step's loss is within 1% of the reference's and its reward accuracy the same,
/// and PEFT loads the adapter.
#[test]
fn smollm2_dpo_follows_the_peft_reference() {
    let Some(model) = smollm2() else { return };
    let Some(python) = common::venv_python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (init, reference) = (dir.path().join("init"), dir.path().join("ref.json"));
    let data = root().join("tests/data/preference.jsonl");
    let (steps, lr) = ("10", "2e-4");
    println!(
        "{}",
        run(Command::new(&python)
            .arg(root().join("scripts/dpo_reference.py"))
            .arg("--base")
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--adapter-out")
            .arg(&init)
            .arg("--out")
            .arg(&reference)
            .args(["--steps", steps, "--batch", "2", "--lr", lr, "--beta", "0.1"]))
    );
    let (out, metrics) = (dir.path().join("adapter"), dir.path().join("metrics.jsonl"));
    run(loraforge()
        .args(["train", "--method", "dpo", "--beta", "0.1", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--init-adapter")
        .arg(&init)
        .args([
            "--max-steps",
            steps,
            "--batch-size",
            "2",
            "--lr",
            lr,
            "--scheduler",
            "constant",
            "--no-shuffle",
            "--max-grad-norm",
            "1.0",
            "--metrics-jsonl",
        ])
        .arg(&metrics));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let ours: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), 10);
    let l0 = ours[0]["loss"].as_f64().unwrap();
    assert!(
        (l0 - std::f64::consts::LN_2).abs() < 1e-6,
        "step 1 loss {l0}"
    );
    for (i, m) in ours.iter().enumerate() {
        let (loss, want) = (
            m["loss"].as_f64().unwrap(),
            r["losses"][i].as_f64().unwrap(),
        );
        let (acc, want_acc) = (
            m["reward_accuracy"].as_f64().unwrap(),
            r["reward_accuracies"][i].as_f64().unwrap(),
        );
        println!(
            "SmolLM2 DPO step {}: loss {loss:.6} (PEFT {want:.6}), reward accuracy {acc} (PEFT {want_acc}), margin {}",
            i + 1,
            m["reward_margin"]
        );
        assert!(
            ((loss - want) / want).abs() < 0.01,
            "step {}: loss {loss} vs PEFT {want}",
            i + 1
        );
        assert_eq!(acc, want_acc, "step {} reward accuracy", i + 1);
    }
    peft_check(&model, &out);
}

/// A DPO job through the API on SmolLM2 (OpenAI's `method` shape, a preference file):
/// its reward accuracy on its own training pairs goes from 0 at step 1 to at least 0.9,
/// the events and checkpoints carry the rewards, and the adapter loads in PEFT.
#[tokio::test]
async fn smollm2_dpo_job_through_the_api_learns_its_pairs() {
    let Some(model) = smollm2() else { return };
    let s = server_with(&model).await;
    let body = std::fs::read(root().join("tests/data/preference.jsonl")).unwrap();
    let (_, f) = common::upload_raw(&s, "preference.jsonl", body).await;
    assert_eq!(
        (f["status"].as_str(), f["format"].as_str()),
        (Some("processed"), Some("preference")),
        "{f}"
    );
    let file = f["id"].as_str().unwrap();
    let (st, job) = common::create_job(
        &s,
        serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "training_file": file,
            "validation_file": file,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {
                "beta": 0.1, "max_steps": 8, "batch_size": 4, "learning_rate": 1e-3,
                "lr_scheduler": "constant", "checkpoint_interval": 4}}}
        }),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    assert_eq!(job["method"]["type"], "dpo", "{job}");
    assert_eq!(
        job["method"]["dpo"]["hyperparameters"]["beta"], 0.1,
        "{job}"
    );
    let id = job["id"].as_str().unwrap().to_string();
    let done = common::wait_status(
        &s,
        &id,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(600),
    )
    .await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    let events = common::get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await;
    let data: Vec<&serde_json::Value> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| &e["data"])
        .collect();
    let step = |n: u64| {
        data.iter()
            .find(|d| d["step"] == n && d["train_loss"].is_number())
            .unwrap_or_else(|| panic!("no metrics for step {n}: {events}"))
    };
    assert_eq!(step(1)["reward_accuracy"], 0.0, "{}", step(1));
    let valid = data
        .iter()
        .rev()
        .find(|d| d["valid_reward_accuracy"].is_number())
        .unwrap_or_else(|| panic!("no validation rewards: {events}"));
    let acc = valid["valid_reward_accuracy"].as_f64().unwrap();
    println!(
        "SmolLM2 DPO job: step 1 {}; step 8 {}; on its training pairs {valid}",
        step(1),
        step(8)
    );
    assert!(acc >= 0.9, "reward accuracy on the training pairs {acc}");
    let ck = common::get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    let m = &ck["data"][0]["metrics"];
    assert!(
        m["train_loss"].is_number()
            && m.get("full_valid_loss").is_some()
            && m["train_reward_accuracy"].is_number(),
        "checkpoint metrics: {ck}"
    );
    let csv = reqwest::get(s.url(&format!(
        "/v1/files/{}/content",
        done["result_files"][0].as_str().unwrap()
    )))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("step,train_loss,valid_loss,learning_rate,tokens_per_second,reward_margin,reward_accuracy"),
        "{csv}"
    );
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("1,") && l.ends_with(",0.0,0.0")),
        "{csv}"
    );
    let dir = common::download_adapter(&s, &id).await;
    peft_check(&model, dir.path());
}

/// An export deleted while a worker builds it (SmolLM2: seconds of merging and writing)
/// stops that build, leaves no zip and no work folder, and the worker goes on; one
/// being built when the server shuts down is handed back to the queue and built by the
/// next process. A lease of 3 s has the worker renew (and learn of the delete) each second.
#[tokio::test]
async fn smollm2_exports_stop_when_deleted_and_go_back_to_the_queue_at_shutdown() {
    let Some(model) = smollm2() else { return };
    let args = ["--train-threads", "2", "--lease-seconds", "3"];
    let mut s = common::TestServer::start(common::Backend::Sqlite, &args).await;
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    std::os::unix::fs::symlink(&model, s.models_dir().join(name)).unwrap();
    let file = common::upload_chat(&s).await;
    let (code, job) = common::create_job(
        &s,
        serde_json::json!({"model": name, "training_file": file,
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "packing": false}}),
    )
    .await;
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done =
        common::wait_status(&s, &id, &["succeeded", "failed"], Duration::from_secs(600)).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    let exports = format!("/v1/fine_tuning/jobs/{id}/exports");
    let ask = |dtype: &str| serde_json::json!({"format": "merged_gguf", "dtype": dtype});
    // Deleted while it is built (f32: the largest file, the longest build, so that the
    // next renewal, a second later, finds it gone before the build ends).
    let (code, e) = common::post_json(&s, &exports, None, &ask("f32")).await;
    assert_eq!(code, 201, "{e}");
    let dropped = e["id"].as_str().unwrap().to_string();
    export_reaches(&s, &format!("{exports}/{dropped}"), "running").await;
    let r = reqwest::Client::new()
        .delete(s.url(&format!("{exports}/{dropped}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, e) = common::post_json(&s, &exports, None, &ask("q8_0")).await;
    assert_eq!(code, 201, "{e}");
    let next = e["id"].as_str().unwrap().to_string();
    export_reaches(&s, &format!("{exports}/{next}"), "succeeded").await;
    let logs = s.logs();
    assert!(
        logs.contains("export lost while it was built"),
        "the build was not stopped:\n{logs}"
    );
    let blobs = s.data_dir().join(format!("blobs/exports/{id}"));
    let zips: Vec<String> = common::files_under(&blobs);
    assert_eq!(zips.len(), 1, "{zips:?}");
    assert!(zips[0].contains(&next), "{zips:?}");
    let work = s.data_dir().join("exports");
    assert_eq!(common::files_under(&work), Vec::<String>::new());

    // Shut down while it is built: handed back, then built by the next process.
    let (code, e) = common::post_json(&s, &exports, None, &ask("f16")).await;
    assert_eq!(code, 201, "{e}");
    let back = e["id"].as_str().unwrap().to_string();
    export_reaches(&s, &format!("{exports}/{back}"), "running").await;
    assert!(s.terminate().success(), "{}", s.logs());
    let row = s.store().await.get_export(&back).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.worker_id.as_deref()),
        ("queued", None),
        "{}",
        s.logs()
    );
    s.crash_and_restart(&args).await;
    export_reaches(&s, &format!("{exports}/{back}"), "succeeded").await;
}

/// Polls an export until its status is `want` (failing on `failed`, or after 5 minutes).
async fn export_reaches(s: &common::TestServer, path: &str, want: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let v = common::get_json(s, path).await;
        if v["status"] == want {
            return;
        }
        assert!(
            v["status"] != "failed" && t0.elapsed() < Duration::from_secs(300),
            "waiting for {want}: {v}\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
