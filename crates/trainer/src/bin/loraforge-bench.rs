//! Trains on the token batches PEFT's baseline dumps, from PEFT's initial adapter, with
//! PEFT's recipe (file order, constant lr, no weight decay, no clipping, dropout 0), and
//! writes one JSON line per step. `scripts/bench-vs-peft.sh` runs it against PEFT.
//!
//!   loraforge-bench --model DIR --data batches.jsonl --init-adapter DIR --out DIR
//!       [--steps 20] [--batch 4] [--seq 256] [--lr 2e-4] [--threads 2] [--metrics-jsonl F]

use loraforge_trainer::optim::{AdamWConfig, Scheduler};
use loraforge_trainer::train::{train, TrainEvent, TrainSpec};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn main() {
    if let Err(e) = run() {
        eprintln!("loraforge-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut opt = std::collections::HashMap::new();
    while let Some(k) = args.next() {
        let v = args.next().ok_or(format!("{k} needs a value"))?;
        opt.insert(k.trim_start_matches("--").to_string(), v);
    }
    let get = |k: &str| opt.get(k).cloned().ok_or(format!("--{k} is required"));
    let num = |k: &str, d: &str| -> Result<f64, String> {
        opt.get(k)
            .map(String::as_str)
            .unwrap_or(d)
            .parse::<f64>()
            .map_err(|e| format!("--{k}: {e}"))
    };
    // Before any candle op: both of candle's thread pools read this once.
    std::env::set_var(
        "RAYON_NUM_THREADS",
        format!("{}", num("threads", "2")? as usize),
    );
    let mut spec = TrainSpec::new(
        PathBuf::from(get("model")?),
        PathBuf::from(get("data")?),
        PathBuf::from(get("out")?),
    );
    spec.init_adapter = Some(PathBuf::from(get("init-adapter")?));
    spec.max_steps = Some(num("steps", "20")? as u64);
    spec.batch_size = num("batch", "4")? as usize;
    spec.max_seq_len = num("seq", "256")? as usize;
    spec.lr = num("lr", "2e-4")?;
    spec.scheduler = Scheduler::Constant;
    spec.adamw = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    spec.max_grad_norm = 0.0;
    spec.lora.dropout = 0.0;
    spec.shuffle = false;
    let mut metrics = match opt.get("metrics-jsonl") {
        Some(p) => Some(std::fs::File::create(p)?),
        None => None,
    };
    let cancel = AtomicBool::new(false);
    train(&spec, &cancel, &mut |ev| {
        if let TrainEvent::Step(m) = ev {
            eprintln!(
                "step {}/{} loss {:.4} tok/s {:.1} rss {} MiB",
                m.step,
                m.total_steps,
                m.loss,
                m.tokens_per_second,
                rss_mib()
            );
            if let Some(f) = metrics.as_mut() {
                let line = serde_json::to_string(m).unwrap_or_default();
                let _ = writeln!(f, "{line}");
            }
        }
    })?;
    Ok(())
}

/// Current resident set, to see whether memory grows from step to step.
fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
