//! Speech recognition through the API on the tiny Whisper fixture
//! (`scripts/make_whisper_asr_fixture.py`: espeak-ng clips in an audiofolder zip and a
//! pairs zip): audio zips checked at upload, task/language/target checks at job creation,
//! a job with validation whose loss and WER arrive over SSE, the adapter download,
//! `POST /v1/audio/transcriptions` on the base and the fine-tune, `loraforge
//! transcribe`, and PEFT loading the download and transcribing the same clips to the
//! same tokens (`scripts/peft_transcribe.py`; skipped without the venv unless
//! `LORAFORGE_REQUIRE_REAL_MODELS=1`, as CI sets).

use crate::common;
use common::{copy_dir, create_job, get_json, read_sse, root, run, unzip, wait_status};
use common::{Backend, TestServer};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn refdir() -> PathBuf {
    root().join("tests/fixtures/tiny-whisper-asr-ref")
}

fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        for (name, bytes) in entries {
            z.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// One entry of the fixture's training zip.
fn clip(name: &str) -> Vec<u8> {
    let f = std::fs::File::open(refdir().join("train.zip")).unwrap();
    let mut z = zip::ZipArchive::new(f).unwrap();
    let mut out = Vec::new();
    z.by_name(name).unwrap().read_to_end(&mut out).unwrap();
    out
}

async fn upload(s: &TestServer, name: &str, body: Vec<u8>) -> Value {
    let (code, f) = common::upload_as(s, name, "application/zip", body).await;
    assert_eq!(code, 200, "{f}");
    f
}

/// `POST /v1/audio/transcriptions` with the form's fields (`None`: left out).
async fn transcribe_form(
    s: &TestServer,
    model: Option<&str>,
    wav: Option<Vec<u8>>,
    extra: &[(&str, &str)],
) -> (u16, String) {
    let mut form = reqwest::multipart::Form::new();
    if let Some(m) = model {
        form = form.text("model", m.to_string());
    }
    if let Some(w) = wav {
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(w).file_name("clip.wav"),
        );
    }
    for (k, v) in extra {
        form = form.text(k.to_string(), v.to_string());
    }
    let r = reqwest::Client::new()
        .post(s.url("/v1/audio/transcriptions"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn transcribe(
    s: &TestServer,
    model: &str,
    wav: Vec<u8>,
    format: Option<&str>,
) -> (u16, String) {
    let mut extra = vec![("language", "en")];
    extra.extend(format.map(|f| ("response_format", f)));
    transcribe_form(s, Some(model), Some(wav), &extra).await
}

#[tokio::test]
async fn a_tiny_whisper_trains_through_the_api_and_transcribes_as_peft_does() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    let fixtures = root().join("tests/fixtures");
    for m in ["tiny-whisper-asr", "tiny-llama"] {
        copy_dir(&fixtures.join(m), &s.models_dir().join(m));
    }
    let m = get_json(&s, "/v1/models/tiny-whisper-asr").await;
    assert_eq!(m["tasks"], json!(["speech_recognition"]), "{m}");

    // Uploads: the audiofolder zip and the pairs zip are audio_transcripts; broken ones
    // are stored with status error, naming the entry or the line.
    let train = upload(
        &s,
        "train.zip",
        std::fs::read(refdir().join("train.zip")).unwrap(),
    )
    .await;
    assert_eq!(train["status"], "processed", "{train}");
    assert_eq!(train["format"], "audio_transcripts");
    assert_eq!(train["examples"], 4);
    let details = train["status_details"].as_str().unwrap();
    assert!(details.contains("metadata.jsonl): 4 clip(s)"), "{details}");
    let valid = upload(
        &s,
        "valid.zip",
        std::fs::read(refdir().join("valid.zip")).unwrap(),
    )
    .await;
    assert_eq!(valid["format"], "audio_transcripts", "{valid}");
    let cases = [
        (
            zip_of(&[("a.wav", clip("clip0.wav")), ("a.txt", b"hi".to_vec()), ("b.wav", clip("clip1.wav"))]),
            "b.wav: no transcript",
        ),
        (
            zip_of(&[
                ("a.wav", clip("clip0.wav")),
                ("metadata.jsonl", b"{\"file_name\": \"a.wav\", \"text\": \"hi\"}\n{\"file_name\": \"c.wav\", \"text\": \"x\"}\n".to_vec()),
            ]),
            "metadata.jsonl line 2: file_name \"c.wav\" is not in the zip",
        ),
        (
            zip_of(&[("a.wav", b"RIFF....WAVEjunk".to_vec()), ("a.txt", b"hi".to_vec())]),
            "a.wav",
        ),
    ];
    for (body, want) in cases {
        let f = upload(&s, "bad.zip", body).await;
        assert_eq!(f["status"], "error", "{f}");
        let d = f["status_details"].as_str().unwrap();
        assert!(d.contains(want), "{want}: {d}");
    }

    // Job creation: what cannot train is refused, naming the field.
    let train = train["id"].as_str().unwrap().to_string();
    let valid = valid["id"].as_str().unwrap().to_string();
    let chat = common::upload_chat(&s).await;
    let cases = [
        (
            json!({"model": "tiny-whisper-asr", "training_file": train}),
            "task",
            "cannot be trained for task causal_lm",
        ),
        (
            json!({"model": "tiny-whisper-asr", "training_file": chat, "task": "speech_recognition"}),
            "training_file",
            "cannot train task speech_recognition",
        ),
        (
            json!({"model": "tiny-whisper-asr", "training_file": train, "task": "speech_recognition",
                   "language": "xx"}),
            "language",
            "\"xx\" is not one of the model's (de, en, fr)",
        ),
        (
            json!({"model": "tiny-llama", "training_file": chat, "language": "en"}),
            "language",
            "language applies to task speech_recognition only",
        ),
        (
            json!({"model": "tiny-whisper-asr", "training_file": train, "task": "speech_recognition",
                   "hyperparameters": {"lora_target_modules": ["q_proj", "query"]}}),
            "hyperparameters.lora_target_modules",
            "\"query\" is no module of tiny-whisper-asr",
        ),
    ];
    for (body, param, msg) in cases {
        let (st, e) = create_job(&s, body.clone()).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{body}: {m}");
    }

    let (st, job) = create_job(
        &s,
        json!({"model": "tiny-whisper-asr", "training_file": train, "validation_file": valid,
               "task": "speech_recognition", "language": "en", "seed": 3,
               "hyperparameters": {"n_epochs": 3, "batch_size": 2, "learning_rate": 1e-2,
                                   "eval_interval": 3, "checkpoint_interval": 3}}),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    assert_eq!(job["task"], "speech_recognition");
    assert_eq!(job["language"], "en");
    assert_eq!(
        job["hyperparameters"]["lora_target_modules"],
        json!(["q_proj", "v_proj"])
    );
    let id = job["id"].as_str().unwrap().to_string();
    let frames = read_sse(&s, &id, None, None).await;
    assert_eq!(frames.last().unwrap().1, "done", "{frames:?}");
    let metrics: Vec<Value> = frames
        .iter()
        .filter(|f| f.1 == "metrics")
        .map(|f| serde_json::from_str(&f.2).unwrap())
        .collect();
    let losses: Vec<f64> = metrics
        .iter()
        .filter_map(|m| m["data"]["train_loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 6, "one metrics event per step: {metrics:?}");
    let evals: Vec<&Value> = metrics
        .iter()
        .filter(|m| m["data"]["valid_wer"].is_number())
        .collect();
    assert_eq!(evals.len(), 2, "validation at steps 3 and 6: {metrics:?}");
    assert!(evals[0]["data"]["valid_loss"].is_number(), "{evals:?}");
    assert!(
        evals[0]["message"].as_str().unwrap().contains("WER="),
        "{evals:?}"
    );
    let done = wait_status(&s, &id, &["succeeded", "failed"], Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    let ft = done["fine_tuned_model"].as_str().unwrap().to_string();
    let ckpts = get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    let with_wer = ckpts["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["metrics"]["valid_wer"].is_number())
        .count();
    assert!(with_wer >= 1, "{ckpts}");

    let r = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let names = unzip(&r.bytes().await.unwrap(), dir.path());
    assert!(
        names.iter().any(|n| n == "adapter_model.safetensors"),
        "{names:?}"
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["target_modules"], json!(["q_proj", "v_proj"]), "{cfg}");

    // Transcriptions: base and fine-tune, OpenAI's three formats; errors name the field.
    let wav = clip("clip0.wav");
    let (mut texts, mut tokens) = (Vec::new(), Value::Null);
    for model in ["tiny-whisper-asr", ft.as_str()] {
        let (st, body) = transcribe(&s, model, wav.clone(), None).await;
        assert_eq!(st, 200, "{model}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let text = v["text"].as_str().unwrap().to_string();
        let (st, plain) = transcribe(&s, model, wav.clone(), Some("text")).await;
        assert_eq!((st, plain.as_str()), (200, text.as_str()));
        let (st, verbose) = transcribe(&s, model, wav.clone(), Some("verbose_json")).await;
        assert_eq!(st, 200, "{verbose}");
        let v: Value = serde_json::from_str(&verbose).unwrap();
        assert_eq!(v["text"], json!(text));
        assert_eq!(v["language"], "english");
        assert_eq!(v["segments"].as_array().unwrap().len(), 1, "{v}");
        let seg = &v["segments"][0];
        for k in [
            "avg_logprob",
            "compression_ratio",
            "no_speech_prob",
            "tokens",
        ] {
            assert!(!seg[k].is_null(), "{k}: {seg}");
        }
        assert!(seg["avg_logprob"].as_f64().unwrap() <= 0.0, "{seg}");
        let d = v["duration"].as_f64().unwrap();
        assert!((0.5..2.0).contains(&d), "{v}");
        texts.push(text);
        tokens = v["segments"][0]["tokens"].clone();
    }
    type Refused<'a> = (
        Option<&'a str>,
        Option<Vec<u8>>,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
        &'a str,
    );
    let refused: Vec<Refused> = vec![
        (
            Some("tiny-llama"),
            Some(wav.clone()),
            vec![],
            400,
            "model",
            "does not transcribe speech",
        ),
        (
            Some("no-such"),
            Some(wav.clone()),
            vec![],
            404,
            "model",
            "does not exist",
        ),
        (
            None,
            Some(wav.clone()),
            vec![],
            400,
            "model",
            "model is required",
        ),
        (
            Some("tiny-whisper-asr"),
            None,
            vec![],
            400,
            "file",
            "file is required",
        ),
        (
            Some("tiny-whisper-asr"),
            Some(b"not a wav".to_vec()),
            vec![],
            400,
            "file",
            "could not be read",
        ),
        (
            Some("tiny-whisper-asr"),
            Some(wav.clone()),
            vec![("response_format", "srt")],
            400,
            "response_format",
            "srt",
        ),
        (
            Some("tiny-whisper-asr"),
            Some(wav.clone()),
            vec![("language", "xx")],
            400,
            "language",
            "\"xx\" is not one of the model's (de, en, fr)",
        ),
    ];
    for (model, body, extra, code, param, msg) in refused {
        let (st, e) = transcribe_form(&s, model, body, &extra).await;
        assert_eq!(st, code, "{model:?} {extra:?}: {e}");
        let e: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(msg), "{e}");
    }
    // JSON is not the form OpenAI's endpoint takes.
    let (st, e) =
        common::post_json(&s, "/v1/audio/transcriptions", None, &json!({"model": ft})).await;
    assert_eq!(st, 415, "{e}");
    // Whisper does not chat.
    let e = common::chat_refused(&s, &json!(ft)).await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/audio/transcriptions"),
        "{e}"
    );

    // The CLI transcribes as the API does, and PEFT as both.
    let wav_path = dir.path().join("clip0.wav");
    std::fs::write(&wav_path, &wav).unwrap();
    let model = s.models_dir().join("tiny-whisper-asr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    cmd.args(["transcribe", "--json", "--language", "en", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(dir.path())
        .arg("--audio")
        .arg(&wav_path);
    let ours: Value = serde_json::from_str(run(&mut cmd).trim()).unwrap();
    assert_eq!(
        ours["text"],
        json!(texts[1]),
        "CLI {ours} vs API {}",
        texts[1]
    );
    let Some(python) = common::venv_python() else {
        return;
    };
    let mut cmd = Command::new(&python);
    cmd.arg(root().join("scripts/peft_transcribe.py"))
        .arg("--base")
        .arg(&model)
        .arg("--adapter")
        .arg(dir.path())
        .arg("--audio")
        .arg(&wav_path);
    let peft: Value = serde_json::from_str(run(&mut cmd).trim()).unwrap();
    // Token for token: the fine-tune's greedy decode is transformers' generate.
    assert_eq!(peft["ids"], tokens, "PEFT {peft} vs the API's {tokens}");
    assert_eq!(
        peft["text"], ours["text"],
        "PEFT {peft} vs loraforge {ours}"
    );
    println!("loraforge and PEFT transcribe clip0 as {tokens}");
}

/// whisper-base (converted from its CTranslate2 wheels by `scripts/fetch-models.sh`)
/// transcribes the fixture's espeak-ng clips exactly as transformers' `generate` does.
/// Without the model it skips, unless `LORAFORGE_REQUIRE_REAL_MODELS=1` (CI).
#[test]
fn whisper_base_transcribes_speech_as_transformers_does() {
    let model = root().join("models/whisper-base");
    if !model.join("model.safetensors").is_file() {
        if std::env::var("LORAFORGE_REQUIRE_REAL_MODELS").as_deref() == Ok("1") {
            panic!(
                "{} is missing: run scripts/fetch-models.sh",
                model.display()
            );
        }
        eprintln!(
            "skipped: {} is missing (scripts/fetch-models.sh)",
            model.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let clips: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = dir.path().join(format!("clip{i}.wav"));
            std::fs::write(&p, clip(&format!("clip{i}.wav"))).unwrap();
            p
        })
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    cmd.args(["transcribe", "--json", "--model"]).arg(&model);
    for c in &clips {
        cmd.arg("--audio").arg(c);
    }
    let ours: Vec<Value> = run(&mut cmd)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), 4);
    // "Hello world." is no test of vocabulary: any working Whisper hears it.
    assert_eq!(ours[0]["text"], "Hello world.", "{ours:?}");
    let Some(python) = common::venv_python() else {
        return;
    };
    let mut cmd = Command::new(&python);
    cmd.arg(root().join("scripts/peft_transcribe.py"))
        .arg("--base")
        .arg(&model);
    for c in &clips {
        cmd.arg("--audio").arg(c);
    }
    let theirs: Vec<Value> = run(&mut cmd)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o["text"], t["text"], "loraforge {o} vs transformers {t}");
        println!("whisper-base: {}", o["text"]);
    }
}
