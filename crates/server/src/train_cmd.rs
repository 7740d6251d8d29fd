//! `loraforge train | merge | generate`: the engine from the command line.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model: a HuggingFace folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder for the PEFT adapter.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
}

pub fn train(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("train: being built")
}
pub fn merge(_args: MergeArgs) -> anyhow::Result<()> {
    anyhow::bail!("merge: being built")
}
pub fn generate(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("generate: being built")
}
