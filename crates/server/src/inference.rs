//! Serving base and fine-tuned models: which weights a model name means, and caches so
//! that one copy of a base model serves every adapter trained on it.
//!
//! A base model is loaded once and kept (least recently used first out); adapters are
//! small tensors switched into the base per request, never merged into it. Requests for
//! one base take turns on its lock; generation runs on a blocking thread.

use crate::app::AppState;
use crate::job::artifacts::{adapter_key, fine_tuned_name};
use crate::job::shown_status;
use loraforge_store::JobStatus;
use loraforge_trainer::data::Message;
use loraforge_trainer::device::Device;
use loraforge_trainer::families::decoder::generate::{chat_prompt_ids, text_prompt_ids};
use loraforge_trainer::families::decoder::loader::{self, BaseModel};
use loraforge_trainer::families::decoder::tokenize::TokenizerBundle;
use loraforge_trainer::families::speech::tokenize::WhisperText;
use loraforge_trainer::families::speech::transcribe::Transcriber;
use loraforge_trainer::lora::hotswap::{apply, AdapterWeights};
use loraforge_trainer::train::Task;
use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a request's `model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The base model's id in the models directory.
    pub base: String,
    pub base_path: PathBuf,
    /// Cache key and folder of the adapter, if any.
    pub adapter: Option<(String, AdapterSource)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterSource {
    /// A finished job's adapter, in the blob store.
    Job(String),
    /// A checkpoint, by its blob prefix.
    Checkpoint(String),
}

/// Why a model name cannot be served.
#[derive(Debug)]
pub enum ResolveError {
    NotFound,
    /// The job exists but has no adapter yet (or failed).
    NotReady(String),
    /// The model exists but is not for this endpoint (an encoder classifier asked to
    /// chat, a text model asked to transcribe).
    WrongTask(String),
    Store(loraforge_store::Error),
}

impl From<loraforge_store::Error> for ResolveError {
    fn from(e: loraforge_store::Error) -> Self {
        ResolveError::Store(e)
    }
}

/// Maps a model name to weights: a base id, `ft:<base>:<suffix>:<job>`, or
/// `ft:<base>:<suffix>:<job>:ckpt-step-N`. A fine-tuned model is found only when
/// `owner` (`None`: anyone) owns its job; another owner's reads as absent. The model
/// must generate text (a causal LM).
pub async fn resolve(
    state: &AppState,
    model: &str,
    owner: Option<&str>,
) -> Result<Resolved, ResolveError> {
    resolve_for(state, model, owner, Task::CausalLm).await
}

/// [`resolve`] for an endpoint that serves `task` (`CausalLm` for completions,
/// `SpeechRecognition` for transcriptions): a model trained for another task is
/// `WrongTask`, with a message saying what it is for.
pub async fn resolve_for(
    state: &AppState,
    model: &str,
    owner: Option<&str>,
    task: Task,
) -> Result<Resolved, ResolveError> {
    let dir = state.settings.models_dir.clone();
    let bases = tokio::task::spawn_blocking(move || loraforge_trainer::families::scan(&dir))
        .await
        .map_err(|e| ResolveError::Store(loraforge_store::Error::Io(std::io::Error::other(e))))?;
    let base_of = |id: &str| {
        bases
            .iter()
            .find(|b| b.id == id && b.trainable)
            .map(|b| b.path.clone())
    };
    let tasks_of = |id: &str| -> Option<Vec<String>> {
        bases.iter().find(|b| b.id == id).map(|b| b.tasks.clone())
    };
    // An unknown base reads as missing later, not as the wrong kind.
    let generative = |id: &str| tasks_of(id).is_none_or(|t| t.iter().any(|t| t == task.as_str()));
    let not_generative = |id: &str| {
        let tasks = tasks_of(id).unwrap_or_default();
        let has = |t: Task| tasks.iter().any(|x| x == t.as_str());
        ResolveError::WrongTask(if task == Task::SpeechRecognition {
            format!(
                "The model `{model}` ({id}) does not transcribe speech (it trains {}); \
                 transcriptions need a Whisper model or one of its fine-tunes.",
                if tasks.is_empty() {
                    "nothing".to_string()
                } else {
                    tasks.join(", ")
                }
            )
        } else if has(Task::SpeechRecognition) {
            format!(
                "The model `{model}` ({id}) is a speech-recognition model and does not \
                 generate text from text; use POST /v1/audio/transcriptions."
            )
        } else if has(Task::TextToImage) {
            format!(
                "The model `{model}` ({id}) is a Stable Diffusion pipeline and does not generate text; \
                 its adapters are for image UIs (GET /v1/fine_tuning/jobs/{{id}}/adapter gives the kohya file)."
            )
        } else {
            format!(
                "The model `{model}` ({id}) is a classification model and does not generate text; \
                 use `loraforge classify` with its adapter (`--text` or `--image`)."
            )
        })
    };
    let Some(rest) = model.strip_prefix("ft:") else {
        if !generative(model) {
            return Err(not_generative(model));
        }
        return base_of(model)
            .map(|p| Resolved {
                base: model.to_string(),
                base_path: p,
                adapter: None,
            })
            .ok_or(ResolveError::NotFound);
    };
    // The job id is the last `ftjob-` component; a checkpoint adds `:ckpt-step-N`.
    let (head, step) = match rest.rsplit_once(":ckpt-step-") {
        Some((h, n)) => (
            h,
            Some(n.parse::<i64>().map_err(|_| ResolveError::NotFound)?),
        ),
        None => (rest, None),
    };
    let job_id = head
        .rsplit(':')
        .next()
        .filter(|j| j.starts_with("ftjob-"))
        .ok_or(ResolveError::NotFound)?;
    let job = state
        .store
        .get_job_of(job_id, owner)
        .await?
        .ok_or(ResolveError::NotFound)?;
    let name = fine_tuned_name(&job);
    if format!("ft:{head}") != name {
        return Err(ResolveError::NotFound);
    }
    if !generative(&job.model) {
        return Err(not_generative(&job.model));
    }
    let base_path = base_of(&job.model).ok_or(ResolveError::NotFound)?;
    let adapter = match step {
        None => {
            if job.model_deleted_at.is_some() {
                return Err(ResolveError::NotFound);
            }
            if job.status() != Some(JobStatus::Succeeded) {
                return Err(ResolveError::NotReady(format!(
                    "The model `{model}` is not ready: its job is {}.",
                    shown_status(&job)
                )));
            }
            (
                format!("job:{}", job.id),
                AdapterSource::Job(job.id.clone()),
            )
        }
        Some(n) => {
            let c = state
                .store
                .list_checkpoints(&job.id)
                .await?
                .into_iter()
                .find(|c| c.step == n)
                .ok_or(ResolveError::NotFound)?;
            (
                format!("ckpt:{}:{n}", job.id),
                AdapterSource::Checkpoint(c.storage_key),
            )
        }
    };
    Ok(Resolved {
        base: job.model.clone(),
        base_path,
        adapter: Some(adapter),
    })
}

/// A small least-recently-used list.
struct Lru<T> {
    cap: usize,
    items: VecDeque<(String, Arc<T>)>,
}

impl<T> Lru<T> {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            items: VecDeque::new(),
        }
    }
    fn get(&mut self, key: &str) -> Option<Arc<T>> {
        let i = self.items.iter().position(|(k, _)| k == key)?;
        let item = self.items.remove(i)?;
        let v = item.1.clone();
        self.items.push_front(item);
        Some(v)
    }
    fn put(&mut self, key: String, v: Arc<T>) {
        self.items.retain(|(k, _)| *k != key);
        self.items.push_front((key, v));
        self.items.truncate(self.cap);
    }
}

/// The base models and adapters in memory.
pub struct Engine {
    bases: Mutex<Lru<Base>>,
    /// Whisper models: requests on one take turns on its lock.
    speech: Mutex<Lru<SpeechBase>>,
    adapters: Mutex<Lru<AdapterWeights>>,
    cache_dir: PathBuf,
}

impl Engine {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            // One base in memory by default: base weights are the large part (f32).
            bases: Mutex::new(Lru::new(1)),
            speech: Mutex::new(Lru::new(1)),
            adapters: Mutex::new(Lru::new(16)),
            cache_dir: data_dir.join("adapters"),
        }
    }
}

/// A loaded base model: the model behind its lock (generation takes turns), and a copy
/// of its tokenizer and context length that requests use without waiting for the lock.
pub struct Base {
    model: Mutex<BaseModel>,
    tokenizer: TokenizerBundle,
    pub context_length: usize,
}

impl Base {
    pub fn new(model: BaseModel) -> Base {
        Base {
            tokenizer: model.tokenizer.clone(),
            context_length: model.model.cfg.max_position_embeddings,
            model: Mutex::new(model),
        }
    }

    /// A chat's prompt ids (template applied, generation prompt added). Uses the
    /// tokenizer's own copy: a long prompt is encoded while others generate.
    pub fn chat_ids(&self, messages: &[Message]) -> loraforge_trainer::Result<Vec<u32>> {
        chat_prompt_ids(&self.tokenizer, messages)
    }

    /// A raw completion prompt's ids; like [`Base::chat_ids`], off the model's lock.
    pub fn text_ids(&self, prompt: &str) -> loraforge_trainer::Result<Vec<u32>> {
        text_prompt_ids(&self.tokenizer, prompt, false)
    }
}

pub type Loaded = (Arc<Base>, Option<Arc<AdapterWeights>>);

/// `key`'s entry of `cache`, loaded by `load` when it is not there. The lock is not
/// held while loading: two first requests may both load, and the last one is kept.
fn cached<T>(
    cache: &Mutex<Lru<T>>,
    key: &str,
    load: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<Arc<T>> {
    if let Some(v) = cache.lock().expect("cache lock").get(key) {
        return Ok(v);
    }
    let v = Arc::new(load()?);
    cache
        .lock()
        .expect("cache lock")
        .put(key.to_string(), v.clone());
    Ok(v)
}

/// Loads what `r` names (from cache when it can). Blocking: call off the runtime.
pub fn load(engine: &Engine, r: &Resolved, adapter_dir: Option<&Path>) -> anyhow::Result<Loaded> {
    let base = cached(&engine.bases, &r.base, || {
        Ok(Base::new(loader::load(&r.base_path, &Device::Cpu)?))
    })?;
    Ok((base, load_adapter(engine, r, adapter_dir)?))
}

/// The adapter `r` names, from the cache when it is there.
fn load_adapter(
    engine: &Engine,
    r: &Resolved,
    adapter_dir: Option<&Path>,
) -> anyhow::Result<Option<Arc<AdapterWeights>>> {
    match (&r.adapter, adapter_dir) {
        (Some((key, _)), Some(dir)) => Ok(Some(cached(&engine.adapters, key, || {
            Ok(AdapterWeights::load(dir, &Device::Cpu)?)
        })?)),
        _ => Ok(None),
    }
}

/// A loaded Whisper: the model behind its lock (transcriptions take turns), and a copy
/// of its tokenizer that requests check their language with without waiting for it.
pub struct SpeechBase {
    model: Mutex<Transcriber>,
    pub text: WhisperText,
}

/// A Whisper model, and the adapter a request switches in.
pub type LoadedSpeech = (Arc<SpeechBase>, Option<Arc<AdapterWeights>>);

/// Loads the Whisper model and adapter `r` names (from cache when it can). Blocking.
pub fn load_speech(
    engine: &Engine,
    r: &Resolved,
    adapter_dir: Option<&Path>,
) -> anyhow::Result<LoadedSpeech> {
    let model = cached(&engine.speech, &r.base, || {
        let t = Transcriber::load(&r.base_path, &Device::Cpu)?;
        Ok(SpeechBase {
            text: t.text.clone(),
            model: Mutex::new(t),
        })
    })?;
    Ok((model, load_adapter(engine, r, adapter_dir)?))
}

/// The local folder of a resolved adapter: a checkpoint folder as is, a job's adapter
/// unpacked once from its zip in the blob store.
pub async fn adapter_dir(
    state: &AppState,
    engine: &Engine,
    r: &Resolved,
) -> anyhow::Result<Option<PathBuf>> {
    match &r.adapter {
        None => Ok(None),
        Some((key, AdapterSource::Checkpoint(prefix))) => {
            let dir = engine.cache_dir.join(key.replace(':', "-"));
            crate::worker::fetch_checkpoint(state, prefix, &dir).await?;
            Ok(Some(dir))
        }
        Some((_, AdapterSource::Job(job))) => {
            let dir = engine.cache_dir.join(job);
            if dir.join("adapter_model.safetensors").is_file() {
                return Ok(Some(dir));
            }
            let zip = state.blobs.read(&adapter_key(job, "zip")).await?;
            let tmp = engine.cache_dir.join(format!(".{job}.tmp"));
            let dir2 = dir.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp)?;
                let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip))?;
                for name in ["adapter_config.json", "adapter_model.safetensors"] {
                    let mut f = z.by_name(name)?;
                    let mut buf = Vec::new();
                    f.read_to_end(&mut buf)?;
                    std::fs::write(tmp.join(name), buf)?;
                }
                let _ = std::fs::remove_dir_all(&dir2);
                std::fs::rename(&tmp, &dir2)?;
                Ok(())
            })
            .await??;
            Ok(Some(dir))
        }
    }
}

/// Runs `f` with the base model, the adapter switched in (or out). Blocking.
pub fn with_model<T>(
    base: &Base,
    adapter: Option<&AdapterWeights>,
    f: impl FnOnce(&BaseModel) -> T,
) -> anyhow::Result<T> {
    let mut b = base
        .model
        .lock()
        .map_err(|_| anyhow::anyhow!("a generation panicked"))?;
    apply(&mut b.model, adapter)?;
    Ok(f(&b))
}

/// Runs `f` with the Whisper model, the adapter switched in (or out). Blocking. A
/// panic in an earlier request leaves the model whole (the adapter is switched here on
/// every request), so its poisoned lock is taken over rather than failing every later
/// request on that base.
pub fn with_speech<T>(
    base: &SpeechBase,
    adapter: Option<&AdapterWeights>,
    f: impl FnOnce(&Transcriber) -> T,
) -> anyhow::Result<T> {
    let mut t = base.model.lock().unwrap_or_else(|p| p.into_inner());
    t.use_adapter(adapter)?;
    Ok(f(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16 #7: a prompt is tokenized while another request holds the model (as a
    /// generation does); before, tokenizing waited for the model's lock, so one huge
    /// prompt stalled every chat on that base.
    #[test]
    fn prompts_are_tokenized_while_the_model_is_busy() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
        let base = Arc::new(Base::new(loader::load(&dir, &Device::Cpu).unwrap()));
        let busy = base.model.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let b = base.clone();
        std::thread::spawn(move || {
            let m = [Message {
                role: "user".into(),
                content: "word ".repeat(2_000),
                ..Default::default()
            }];
            let _ = tx.send((
                b.chat_ids(&m).map(|v| v.len()),
                b.text_ids("hello").map(|v| v.len()),
            ));
        });
        // Not a timing bound: a tokenizer that waited for the lock would wait forever.
        let (chat, text) = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("tokenizing waited for the model's lock");
        assert!(chat.unwrap() >= 2_000);
        assert!(text.unwrap() >= 1);
        drop(busy);
    }
}
