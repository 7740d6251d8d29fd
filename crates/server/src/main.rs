//! The `loraforge` binary.
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loraforge", version, about = "LoRA fine-tuning job server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter from the command line.
    Train(train_cmd::TrainArgs),
    /// Merge an adapter into its base model.
    Merge(train_cmd::MergeArgs),
    /// Generate text with a base model, optionally with an adapter.
    Generate(train_cmd::GenerateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(a) => train_cmd::train(a),
        Command::Merge(a) => train_cmd::merge(a),
        Command::Generate(a) => train_cmd::generate(a),
    }
}
