//! What a model family is to the rest of the engine.

use crate::lora::Targets;
use crate::train::{FamilyOptions, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::Result;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// A family of models the engine trains (llama-style decoders, BERT-style encoders,
/// Stable Diffusion). The loop, the server and the CLI reach a family through
/// [`super::ALL`]; a new family is a folder and a line there.
pub trait Family: Sync {
    /// Short name, for messages.
    fn name(&self) -> &'static str;
    /// What its objective trains the model for.
    fn task(&self) -> Task;
    /// The modules a LoRA goes on when a job names none (the family's usual PEFT set).
    fn default_targets(&self) -> Targets;
    /// The family's own settings from a JSON object (a job's spec, the CLI's flags as
    /// JSON); keys that belong to other families are ignored.
    fn options(&self, v: &serde_json::Value) -> Result<FamilyOptions>;
    /// Builds the objective from `spec` and runs the training loop on it, from the
    /// checkpoint `resume` when given.
    fn train(
        &self,
        spec: &TrainSpec,
        resume: Option<&Path>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome>;
}
