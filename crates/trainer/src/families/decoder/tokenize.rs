//! Tokenizers, chat templates, and turning examples into `(input_ids, labels)`.

use crate::data::{Example, Json, Message, PreferencePair};
use crate::families::decoder::config::DecoderConfig;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A byte range `[start, end)` of a rendered text.
type Span = (usize, usize);

/// Ignored label, as in transformers.
pub const IGNORE: i64 = -100;

/// A tokenizer with what the model's files say about its special tokens and chat format.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
}

/// One tokenized example; `labels[i] == IGNORE` means "not trained on".
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Options that change which tokens are trained on.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeOptions {
    pub train_on_inputs: bool,
    pub max_seq_len: Option<usize>,
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl TokenizerBundle {
    pub fn new(
        tokenizer: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        cfg: &DecoderConfig,
    ) -> Self {
        let mut eos_ids = cfg.eos_token_ids.clone();
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let pad_id = cfg
            .pad_token_id
            .or_else(|| eos_ids.first().copied())
            .unwrap_or(0);
        Self {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
            pad_id,
        }
    }

    /// `tokenizer.json`, `tokenizer_config.json` (chat template, special tokens) and
    /// `generation_config.json` (stop tokens) of an HF folder.
    pub fn from_hf_dir(dir: &Path, cfg: &DecoderConfig) -> Result<Self> {
        let tp = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tp)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tp.display())))?;
        let tc: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(t) => serde_json::from_str(&t)?,
            Err(_) => Value::Null,
        };
        let mut chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
        if chat_template.is_none() {
            chat_template = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        }
        let mut cfg = cfg.clone();
        if let Ok(t) = std::fs::read_to_string(dir.join("generation_config.json")) {
            let g: Value = serde_json::from_str(&t)?;
            for id in match g.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().into_iter().collect::<Vec<_>>(),
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).collect(),
                _ => vec![],
            } {
                if !cfg.eos_token_ids.contains(&(id as u32)) {
                    cfg.eos_token_ids.push(id as u32);
                }
            }
        }
        let pad_token = token_text(tc.get("pad_token"));
        if cfg.pad_token_id.is_none() {
            cfg.pad_token_id = pad_token.and_then(|t| tokenizer.token_to_id(&t));
        }
        Ok(Self::new(
            tokenizer,
            chat_template,
            token_text(tc.get("bos_token")),
            token_text(tc.get("eos_token")),
            &cfg,
        ))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Encodes text; `special` adds the tokenizer's own BOS/EOS (post-processor).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Ids with their byte offsets into `text`.
    fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Renders the chat template as transformers' `apply_chat_template(messages,
    /// tools=tools)` does (see [`super::template`]).
    pub fn render_chat(
        &self,
        messages: &[Message],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template(
                "the model has no chat_template; use prompt/completion or text data".into(),
            )
        })?;
        let msgs: Vec<minijinja::Value> = messages.iter().map(message_value).collect();
        super::template::render(
            tpl,
            minijinja::context! {
                messages => msgs,
                tools => tools.cloned().unwrap_or(minijinja::Value::from(())),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            },
        )
        .map_err(|e| Error::Template(e.to_string()))
    }

    /// Turns one example into token ids and labels.
    ///
    /// Chat and prompt/completion go through the chat template; the loss covers the
    /// assistant turns (what the template renders for them, end-of-turn token
    /// included), or every token with `train_on_inputs`. Text trains on everything.
    pub fn encode_example(&self, ex: &Example, opts: EncodeOptions) -> Result<Encoded> {
        let mut enc = match ex {
            Example::Classification(_) => {
                return Err(Error::Data(
                    "a labelled example trains a classifier: use task sequence_classification with an encoder model".into(),
                ))
            }
            Example::Preference(_) => {
                return Err(Error::Data(
                    "a preference pair trains with method dpo, not supervised".into(),
                ))
            }
            Example::Tokenized { input_ids, labels } => Encoded {
                input_ids: input_ids.clone(),
                labels: match labels {
                    Some(l) => l.clone(),
                    None => input_ids.iter().map(|&x| x as i64).collect(),
                },
            },
            Example::Text(t) => {
                let mut ids = self.encode(t, true)?;
                if let Some(&eos) = self.eos_ids.first() {
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                    }
                }
                Encoded {
                    labels: ids.iter().map(|&x| x as i64).collect(),
                    input_ids: ids,
                }
            }
            Example::PromptCompletion { prompt, completion } if self.chat_template.is_none() => {
                let p = self.encode(prompt, true)?;
                let mut c = self.encode(completion, false)?;
                c.extend(self.eos_ids.first());
                let mut labels: Vec<i64> = vec![IGNORE; p.len()];
                labels.extend(c.iter().map(|&x| x as i64));
                let mut ids = p;
                ids.extend(c);
                Encoded {
                    input_ids: ids,
                    labels,
                }
            }
            Example::PromptCompletion { prompt, completion } => {
                let msgs = [
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
                ];
                self.encode_chat(&msgs, None)?
            }
            Example::Chat { messages, tools } => self.encode_chat(messages, tools.as_ref())?,
        };
        if opts.train_on_inputs {
            enc.labels = enc.input_ids.iter().map(|&x| x as i64).collect();
        }
        if let Some(max) = opts.max_seq_len {
            enc.input_ids.truncate(max);
            enc.labels.truncate(max);
        }
        if let Some(&bad) = enc
            .input_ids
            .iter()
            .find(|&&x| x as usize >= self.vocab_size().max(1))
        {
            return Err(Error::Data(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.vocab_size()
            )));
        }
        Ok(enc)
    }

    /// A preference pair as two sequences, the conversation followed by the chosen and by
    /// the rejected reply. Only the reply is scored: what the template renders for it
    /// after the generation prompt, end of turn included (the supervised chat rule);
    /// earlier assistant turns are context. `max_seq_len` cuts the end of a sequence; a
    /// reply cut away entirely is an error, since its pair would carry no preference.
    pub fn encode_preference(
        &self,
        pair: &PreferencePair,
        max_seq_len: Option<usize>,
    ) -> Result<(Encoded, Encoded)> {
        let side = |reply: &Message| -> Result<Encoded> {
            let mut msgs: Vec<Message> = pair
                .messages
                .iter()
                .map(|m| Message {
                    weight: (m.role == "assistant").then_some(0),
                    ..m.clone()
                })
                .collect();
            msgs.push(Message {
                weight: None,
                ..reply.clone()
            });
            let mut enc = self.encode_chat(&msgs, pair.tools.as_ref())?;
            if let Some(max) = max_seq_len {
                enc.input_ids.truncate(max);
                enc.labels.truncate(max);
            }
            if !enc.labels.iter().skip(1).any(|&l| l != IGNORE) {
                return Err(Error::Data(format!(
                    "the prompt takes all of max_seq_len ({} tokens): no token of the reply is left to score",
                    enc.input_ids.len()
                )));
            }
            Ok(enc)
        };
        Ok((side(&pair.chosen)?, side(&pair.rejected)?))
    }

    /// Whether the chat template renders the example's tool definitions and calls (the
    /// check a job gets at creation; other problems surface when it trains).
    pub fn check_tools(&self, ex: &Example) -> Result<()> {
        let (msgs, tools): (Vec<Message>, Option<&Json>) = match ex {
            Example::Chat { messages, tools } => (messages.clone(), tools.as_ref()),
            Example::Preference(p) => {
                let mut m = p.messages.clone();
                m.push(p.chosen.clone());
                (m, p.tools.as_ref())
            }
            _ => return Ok(()),
        };
        if tools.is_none() && msgs.iter().all(|m| m.tool_calls.is_none()) {
            return Ok(());
        }
        let full = self.render_chat(&msgs, tools, false)?;
        self.check_tools_rendered(&msgs, tools, &full)
    }

    /// A template that ignores `tools` or `tool_calls` would train on a conversation
    /// other than the one written: refused, naming what it leaves out.
    fn check_tools_rendered(
        &self,
        msgs: &[Message],
        tools: Option<&Json>,
        full: &str,
    ) -> Result<()> {
        if tools.is_some() && self.render_chat(msgs, None, false)? == full {
            return Err(Error::Template(
                "the model's chat template does not render tool definitions (\"tools\")".into(),
            ));
        }
        if msgs.iter().any(|m| m.tool_calls.is_some()) {
            let bare: Vec<Message> = msgs
                .iter()
                .map(|m| Message {
                    tool_calls: None,
                    ..m.clone()
                })
                .collect();
            if self.render_chat(&bare, tools, false)? == full {
                return Err(Error::Template(
                    "the model's chat template does not render assistant tool calls (\"tool_calls\")"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Byte spans of the assistant turns, found by rendering growing prefixes of the
    /// conversation: turn k spans from the render of `messages[..k]` with a generation
    /// prompt to the render of `messages[..=k]`.
    fn encode_chat(&self, msgs: &[Message], tools: Option<&Json>) -> Result<Encoded> {
        let full = self.render_chat(msgs, tools, false)?;
        self.check_tools_rendered(msgs, tools, &full)?;
        let mut spans = Vec::new();
        for (k, m) in msgs.iter().enumerate() {
            if m.role != "assistant" || m.weight == Some(0) {
                continue;
            }
            let start = self.render_chat(&msgs[..k], tools, true)?;
            let end = self.render_chat(&msgs[..=k], tools, false)?;
            if !end.starts_with(&start) || !full.starts_with(&end) {
                return Err(Error::Template(
                    "the chat template does not render conversations prefix by prefix; cannot locate assistant turns"
                        .into(),
                ));
            }
            spans.push((start.len(), end.len()));
        }
        let (ids, offsets) = self.encode_with_offsets(&full)?;
        let labels = ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(s, _))| {
                if spans.iter().any(|&(a, b)| s >= a && s < b) {
                    id as i64
                } else {
                    IGNORE
                }
            })
            .collect();
        Ok(Encoded {
            input_ids: ids,
            labels,
        })
    }
}

/// A message as the template sees it, in OpenAI's keys: `content` is none for a turn
/// that only calls tools (as the file's `null` reaches transformers), and the tool keys
/// are present only when the message has them.
fn message_value(m: &Message) -> minijinja::Value {
    let content = if m.content.is_empty() && m.tool_calls.is_some() {
        minijinja::Value::from(())
    } else {
        minijinja::Value::from(m.content.as_str())
    };
    let mut fields: Vec<(&str, minijinja::Value)> = vec![
        ("role", minijinja::Value::from(m.role.as_str())),
        ("content", content),
    ];
    if let Some(c) = &m.tool_calls {
        fields.push(("tool_calls", c.clone()));
    }
    if let Some(id) = &m.tool_call_id {
        fields.push(("tool_call_id", minijinja::Value::from(id.as_str())));
    }
    if let Some(n) = &m.name {
        fields.push(("name", minijinja::Value::from(n.as_str())));
    }
    fields.into_iter().collect()
}
