//! Text generation with a KV cache: greedy or sampled (temperature, top-p).

use super::tokenize::TokenizerBundle;
use crate::data::Message;
use crate::families::decoder::loader::BaseModel;
use crate::families::decoder::model::KvCache;
use crate::lora::ForwardCtx;
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Apply the chat template to the prompt (as a single user turn).
    pub chat: bool,
    /// Generation ends before any of these strings (OpenAI's `stop`).
    pub stop: Vec<String>,
    /// Go on past end-of-sequence tokens (llama.cpp's `--ignore-eos`): a fixed number of
    /// tokens, to compare with another engine or to time.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            chat: true,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    /// The prompt as token ids, and the tokens generated (an end-of-sequence token not
    /// included).
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `stop` (an end-of-sequence token or a stop string), `length`, or `cancelled`
    /// (the text callback asked to stop).
    pub finish_reason: &'static str,
}

/// The prompt of a chat: the template rendered with a generation prompt, as token ids.
pub fn chat_prompt_ids(tokenizer: &TokenizerBundle, messages: &[Message]) -> Result<Vec<u32>> {
    let prompt = tokenizer.render_chat(messages, None, true)?;
    tokenizer.encode(&prompt, false)
}

/// The prompt of a plain completion, through the chat template when `chat` and the
/// model has one (as a single user turn).
pub fn text_prompt_ids(tokenizer: &TokenizerBundle, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat && tokenizer.chat_template.is_some() {
        let m = [Message {
            role: "user".into(),
            content: prompt.to_string(),
            ..Default::default()
        }];
        return chat_prompt_ids(tokenizer, &m);
    }
    tokenizer.encode(prompt, true)
}

/// Generates a reply to `messages` (chat template) and returns the decoded text.
pub fn generate_chat(
    base: &BaseModel,
    messages: &[Message],
    opts: &GenerateOptions,
) -> Result<Generation> {
    generate_ids(
        base,
        chat_prompt_ids(&base.tokenizer, messages)?,
        opts,
        &mut |_| true,
    )
}

/// Generates from a plain prompt, through the chat template when `opts.chat` and the model has one.
pub fn generate_text(base: &BaseModel, prompt: &str, opts: &GenerateOptions) -> Result<Generation> {
    generate_ids(
        base,
        text_prompt_ids(&base.tokenizer, prompt, opts.chat)?,
        opts,
        &mut |_| true,
    )
}

/// Generates from prompt token ids. `on_text` receives each new piece of decoded text
/// as it is produced (never splitting a character); returning `false` stops generation.
pub fn generate_ids(
    base: &BaseModel,
    ids: Vec<u32>,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if ids.is_empty() {
        return Err(Error::Data("empty prompt".into()));
    }
    let dev = base.model.device();
    let ctx = ForwardCtx::eval();
    let mut cache = KvCache::default();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let prompt_tokens = ids.len();
    let mut out: Vec<u32> = Vec::new();
    let prompt_ids = ids.clone();
    let mut input = ids;
    let mut finish = "length";
    let mut sent = 0usize; // bytes of `text` already handed to `on_text`
    let mut text = String::new();
    let max_pos = base.model.cfg.max_position_embeddings;
    // Text that could still turn into a stop string is held back until it cannot.
    let hold = opts.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    for _ in 0..opts.max_new_tokens {
        if cache.len() + input.len() > max_pos {
            break;
        }
        let n = input.len();
        let x = Tensor::from_vec(input.clone(), (1, n), dev)?;
        let h = base
            .model
            .forward_hidden(&x, None, Some(&mut cache), &ctx)?;
        let last = h
            .narrow(1, n - 1, 1)?
            .reshape((1, base.model.cfg.hidden_size))?;
        let logits = base.model.head(&last)?.to_dtype(DType::F32)?.squeeze(0)?;
        let next = if opts.temperature <= 0.0 {
            logits.argmax(D::Minus1)?.to_scalar::<u32>()?
        } else {
            sample(&logits, opts.temperature, opts.top_p, &mut rng)?
        };
        if !opts.ignore_eos && base.tokenizer.eos_ids.contains(&next) {
            finish = "stop";
            break;
        }
        out.push(next);
        input = vec![next];
        text = base.tokenizer.decode(&out)?;
        if let Some(cut) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            finish = "stop";
            break;
        }
        // A partial UTF-8 sequence decodes to U+FFFD: wait for the rest of it.
        if text.ends_with('\u{FFFD}') {
            continue;
        }
        let mut upto = text.len().saturating_sub(hold);
        while !text.is_char_boundary(upto) {
            upto -= 1;
        }
        if upto > sent {
            if !on_text(&text[sent..upto]) {
                finish = "cancelled";
                break;
            }
            sent = upto;
        }
    }
    if finish != "cancelled" && text.len() > sent {
        // The whole text, so the pieces always add up to `Generation::text`.
        on_text(&text[sent..]);
    }
    Ok(Generation {
        text,
        prompt_ids,
        completion_tokens: out.len(),
        ids: out,
        prompt_tokens,
        finish_reason: finish,
    })
}

fn sample(logits: &Tensor, temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> Result<u32> {
    let probs = candle_nn::ops::softmax_last_dim(&(logits / temperature)?)?;
    let mut p: Vec<(u32, f32)> = probs
        .to_vec1::<f32>()?
        .into_iter()
        .enumerate()
        .map(|(i, x)| (i as u32, x))
        .collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut cum = 0f32;
    let mut cut = p.len();
    for (i, (_, x)) in p.iter().enumerate() {
        cum += x;
        if cum as f64 >= top_p {
            cut = i + 1;
            break;
        }
    }
    let p = &p[..cut];
    let total: f32 = p.iter().map(|x| x.1).sum();
    let mut r = rng.random::<f32>() * total;
    for (id, x) in p {
        if r < *x {
            return Ok(*id);
        }
        r -= x;
    }
    Ok(p.last().map(|x| x.0).unwrap_or(0))
}
