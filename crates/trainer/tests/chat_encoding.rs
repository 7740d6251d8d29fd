//! Chat encoding (`TokenizerBundle::encode_example`) against transformers.
//!
//! `tests/fixtures/chat-encoding.json` comes from `scripts/make_fixtures.py
//! --only-chat-encoding`: for each case, the chat template rendered by
//! `apply_chat_template`, the fast tokenizer's ids for it, and labels that keep the
//! tokens starting inside a trained assistant turn (the turn found by rendering
//! growing prefixes, as the trainer does). Each case's example is a JSONL line as the
//! data loader reads it, so parsing is part of what is checked.

mod common;

use candle_core::Device;
use common::fixtures;
use loraforge_trainer::data::{parse_line, Example, Message};
use loraforge_trainer::families::decoder::config::DecoderConfig;
use loraforge_trainer::families::decoder::loader;
use loraforge_trainer::families::decoder::tokenize::{EncodeOptions, TokenizerBundle};
use serde_json::Value;
use std::collections::BTreeMap;

struct Case {
    name: String,
    tokenizer: String,
    example: String,
    opts: EncodeOptions,
    text: String,
    input_ids: Vec<u32>,
    labels: Vec<i64>,
}

fn str_field(v: &Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("fixture case has no string {k:?}: {v}"))
        .to_string()
}

fn int_list(v: &Value, k: &str) -> Vec<i64> {
    v[k].as_array()
        .unwrap_or_else(|| panic!("fixture case has no list {k:?}"))
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn cases() -> Vec<Case> {
    let p = fixtures().join("chat-encoding.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<Case> = v["cases"]
        .as_array()
        .expect("\"cases\"")
        .iter()
        .map(|c| Case {
            name: str_field(c, "name"),
            tokenizer: str_field(c, "tokenizer"),
            example: str_field(c, "example"),
            opts: EncodeOptions {
                train_on_inputs: c["options"]["train_on_inputs"].as_bool().unwrap(),
                max_seq_len: c["options"]["max_seq_len"].as_u64().map(|x| x as usize),
            },
            text: str_field(c, "text"),
            input_ids: int_list(c, "input_ids")
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            labels: int_list(c, "labels"),
        })
        .collect();
    assert!(
        cases.len() >= 5,
        "only {} cases in {}",
        cases.len(),
        p.display()
    );
    cases
}

/// The tokenizer as the trainer gets it: a model folder or GGUF goes through
/// `loader::load`; a tokenizer-only folder (no `config.json`) through
/// `TokenizerBundle::from_hf_dir` with a minimal config (which only supplies stop and
/// pad ids, neither of which chat encoding uses).
fn load_tokenizer(rel: &str) -> TokenizerBundle {
    let path = fixtures().join(rel);
    if path.is_file() || path.join("config.json").is_file() {
        return loader::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .tokenizer;
    }
    let cfg = DecoderConfig::from_hf_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": 1, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 1,
    }))
    .unwrap();
    TokenizerBundle::from_hf_dir(&path, &cfg).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The messages the template is rendered with for this example.
fn messages(ex: &Example) -> Vec<Message> {
    match ex {
        Example::Chat { messages, .. } => messages.clone(),
        Example::PromptCompletion { prompt, completion } => vec![
            Message {
                role: "user".into(),
                content: prompt.clone(),
                ..Default::default()
            },
            Message {
                role: "assistant".into(),
                content: completion.clone(),
                ..Default::default()
            },
        ],
        other => panic!("not a chat example: {other:?}"),
    }
}

/// The tool definitions the example was written with.
fn tools(ex: &Example) -> Option<&loraforge_trainer::data::Json> {
    match ex {
        Example::Chat { tools, .. } => tools.as_ref(),
        _ => None,
    }
}

/// `None` if equal, else a description of the first differing position.
fn first_diff<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Option<String> {
    let n = got.len().min(want.len());
    let i = (0..n).find(|&i| got[i] != want[i]);
    match i {
        Some(i) => Some(format!(
            "{what}[{i}]: got {:?}, want {:?} (lengths {} / {}; got[{i}..] = {:?}, want[{i}..] = {:?})",
            got[i],
            want[i],
            got.len(),
            want.len(),
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())],
        )),
        None if got.len() != want.len() => Some(format!(
            "{what}: same first {n} entries, but got {} and want {}",
            got.len(),
            want.len()
        )),
        None => None,
    }
}

fn text_diff(got: &str, want: &str) -> Option<String> {
    if got == want {
        return None;
    }
    let i = got
        .char_indices()
        .zip(want.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(got.len().min(want.len()));
    let ctx = |s: &str| {
        let b = s.as_bytes();
        String::from_utf8_lossy(&b[i.saturating_sub(20)..(i + 20).min(b.len())]).into_owned()
    };
    Some(format!(
        "rendered template differs at byte {i}: got ..{:?}.., want ..{:?}..",
        ctx(got),
        ctx(want)
    ))
}

/// Runs every case (with `tokenizer` replacing each case's own when given) and
/// returns one line per failing case.
fn check(cases: &[Case], tokenizer: Option<&str>) -> Vec<String> {
    let mut bundles: BTreeMap<String, TokenizerBundle> = BTreeMap::new();
    let mut failures = Vec::new();
    for c in cases {
        let tok = tokenizer.unwrap_or(&c.tokenizer);
        let bundle = bundles
            .entry(tok.to_string())
            .or_insert_with(|| load_tokenizer(tok));
        let ex = parse_line(&c.example)
            .unwrap_or_else(|e| panic!("{}: the data loader rejects the example: {e}", c.name));
        let mut problems = Vec::new();
        match bundle.render_chat(&messages(&ex), tools(&ex), false) {
            Ok(t) => problems.extend(text_diff(&t, &c.text)),
            Err(e) => problems.push(format!("render_chat: {e}")),
        }
        match bundle.encode_example(&ex, c.opts) {
            Ok(enc) => {
                problems.extend(first_diff("input_ids", &enc.input_ids, &c.input_ids));
                problems.extend(first_diff("labels", &enc.labels, &c.labels));
            }
            Err(e) => problems.push(format!("encode_example: {e}")),
        }
        let trained = c.labels.iter().filter(|&&l| l != -100).count();
        if problems.is_empty() {
            println!(
                "ok   {} [{tok}]: {} tokens, {trained} labelled",
                c.name,
                c.input_ids.len()
            );
        } else {
            println!("FAIL {} [{tok}]: {}", c.name, problems.join("; "));
            failures.push(format!("{} [{tok}]: {}", c.name, problems.join("; ")));
        }
    }
    failures
}

#[test]
fn chat_encoding_matches_transformers() {
    let cases = cases();
    let failures = check(&cases, None);
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The GGUF of tiny-llama carries the same vocabulary and chat template as its HF
/// folder; the tokenizer the loader rebuilds from it must encode chats the same way.
#[test]
fn gguf_tokenizer_encodes_chats_like_the_hf_folder() {
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.tokenizer == "tiny-llama")
        .collect();
    assert!(!cases.is_empty(), "no tiny-llama cases in the fixture");
    let failures = check(&cases, Some("tiny-llama-gguf/tiny-llama.gguf"));
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers with the GGUF tokenizer:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A template that prints neither tool definitions nor tool calls (the ChatML one of
/// the tiny llama) would train on a conversation other than the one written: the
/// example is refused, naming what the template leaves out.
#[test]
fn a_template_that_ignores_tools_is_refused() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "tiny-qwen3/tools_call_and_answer")
        .expect("the tools case");
    let chatml = load_tokenizer("tokenizer");
    let tools_aware = load_tokenizer("tiny-qwen3");
    let line: Value = serde_json::from_str(&case.example).unwrap();
    let encode = |b: &TokenizerBundle, v: &Value| {
        let ex = parse_line(&v.to_string()).unwrap();
        b.encode_example(&ex, case.opts).map(|_| ())
    };
    // Tools offered, none called.
    let offered = serde_json::json!({"tools": line["tools"], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "I could look it up."}]});
    let e = encode(&chatml, &offered).unwrap_err();
    assert!(
        e.to_string().contains("does not render tool definitions"),
        "{e}"
    );
    assert!(encode(&tools_aware, &offered).is_ok());
    // A call with words around it, no definitions.
    let called = serde_json::json!({"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": line["messages"][2]["tool_calls"]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
        {"role": "assistant", "content": "-3 C."}]});
    let e = encode(&chatml, &called).unwrap_err();
    assert!(
        e.to_string()
            .contains("does not render assistant tool calls"),
        "{e}"
    );
    assert!(encode(&tools_aware, &called).is_ok());
    // A call without content: this template fails on it, as it does in transformers.
    assert!(encode(&chatml, &line).is_err());
}

/// A GGUF with a SentencePiece vocabulary (`tokenizer.ggml.model = llama`, as Llama 2,
/// Mistral and Gemma files carry it), rebuilt as a BPE with byte fallback: the ids and
/// decoded text of transformers' tokenizer converted from the same model
/// (`make_fixtures.py --only-sentencepiece`), and the BOS the file asks for.
#[test]
fn sentencepiece_gguf_tokenizes_as_transformers() {
    let dir = fixtures().join("tiny-sp");
    let bundle = loader::load_tokenizer(&dir.join("tiny-sp.gguf")).unwrap();
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenization.json")).unwrap())
            .unwrap();
    assert_eq!(
        bundle.vocab_size() as u64,
        v["vocab_size"].as_u64().unwrap()
    );
    let bos = v["bos_id"].as_u64().unwrap() as u32;
    let mut failures = Vec::new();
    for c in v["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        let got = bundle.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: ids {got:?}, transformers {want:?}"));
            continue;
        }
        let with_bos = bundle.encode(text, true).unwrap();
        if with_bos.first() != Some(&bos) || with_bos[1..] != want[..] {
            failures.push(format!("{text:?}: with specials {with_bos:?}"));
        }
        let decoded = bundle.decode(&got).unwrap();
        if decoded != c["decoded"].as_str().unwrap() {
            failures.push(format!(
                "{text:?}: decodes to {decoded:?}, transformers {}",
                c["decoded"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
