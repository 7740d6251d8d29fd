//! Benchmarks, run by scripts only (nothing in the test suite times anything).
//!
//! Causal LM: trains on the token batches PEFT's baseline dumps, from PEFT's initial
//! adapter, with PEFT's recipe (file order, constant lr, no weight decay, no clipping,
//! dropout 0), and writes one JSON line per step. `scripts/bench-vs-peft.sh` runs it
//! against PEFT.
//!
//!   loraforge-bench --model DIR --data batches.jsonl --init-adapter DIR --out DIR
//!       [--steps 20] [--batch 4] [--seq 256] [--lr 2e-4] [--threads 2] [--metrics-jsonl F]
//!       [--dtype f32|bf16|f16]
//!
//! Stable Diffusion (`sd`): LoRA training steps of a diffusers UNet on random inputs (see
//! `run_sd`). `scripts/bench-sd-vs-pytorch.sh` runs it against diffusers + PEFT.
//!
//!   loraforge-bench sd --unet DIR [--res 256] [--steps 3] [--threads 2] [--seed 0]
//!       [--max-rss-mib 18432] [--device cpu|cuda:N]
//!
//! Matrix products (`gemm`): f32 `x · Wᵀ` and `g · W` at the shapes of a decoder step,
//! through the function the ops call, by candle's gemm and by each BLAS library named
//! (alternating), GFLOP/s per shape and engine as JSON lines, with each result's relative
//! error against gemm's. `scripts/bench-gemm.sh` runs it beside `torch.matmul`.
//!
//!   loraforge-bench gemm [--rows 1024] [--shapes 576x576,576x192,576x1536,1536x576,576x49152]
//!       [--reps 10] [--threads 2] [--blas libopenblas.so.0,/path/libscipy_openblas.so,...]
//!
//! Attention (`attention`): one forward and backward pass of causal, rotated attention at
//! SmolLM2's geometry through the fused CPU op (`--impl fused`) or the device-generic
//! blocked op (`--impl blocked`), printing the process's peak RSS above what it held
//! before the pass; `--impl both` runs the two and prints their largest gradient
//! difference. `scripts/bench-attention-memory.sh` runs each in its own process.
//!
//!   loraforge-bench attention --impl fused|blocked|both|timed [--seq 2048] [--batch 1]
//!       [--heads 9] [--kv-heads 3] [--dim 64] [--threads 2] [--plain 0|1] [--reps 3]
//!
//! `--impl timed` times the fused op's forward and backward apart (median of `--reps`);
//! `--plain 1` drops the rotation and the mask, as an SD UNet's attention has neither
//! (`--seq 4096 --heads 8 --kv-heads 8 --dim 40` is SD 1.5's at 512 px).
//!
//! Model sizes (`gguf`): writes a llama-shaped GGUF with random weights (Llama 3.2 1B,
//! 3B or Llama 3.1 8B shapes) in one quant type, with a byte-level tokenizer of the same
//! vocabulary size, for `scripts/bench-model-sizes.sh` to train with `loraforge train`.
//!
//!   loraforge-bench gguf --shape 1b|3b|8b --quant q4_k|q8_0|... --out FILE

use candle_core::{Device, Tensor};
use loraforge_trainer::families::diffusion::unet::{mse, UNet};
use loraforge_trainer::lora::{self, ForwardCtx, LoraConfig, Targets};
use loraforge_trainer::train::optim::{AdamW, AdamWConfig, Scheduler};
use loraforge_trainer::{train, TrainEvent, TrainSpec};
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

fn main() {
    if let Err(e) = run() {
        eprintln!("loraforge-bench: {e}");
        std::process::exit(1);
    }
}

type Opts = HashMap<String, String>;

fn opt_str(opt: &Opts, k: &str) -> Result<String, String> {
    opt.get(k).cloned().ok_or(format!("--{k} is required"))
}

fn opt_num(opt: &Opts, k: &str, d: &str) -> Result<f64, String> {
    opt.get(k)
        .map(String::as_str)
        .unwrap_or(d)
        .parse::<f64>()
        .map_err(|e| format!("--{k}: {e}"))
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    let sub = match args.peek().map(String::as_str) {
        Some(s @ ("sd" | "gemm" | "attention" | "gguf")) => Some(s.to_string()),
        _ => None,
    };
    if sub.is_some() {
        args.next();
    }
    let mut opt = Opts::new();
    while let Some(k) = args.next() {
        let v = args.next().ok_or(format!("{k} needs a value"))?;
        opt.insert(k.trim_start_matches("--").to_string(), v);
    }
    match sub.as_deref() {
        Some("sd") => return run_sd(&opt),
        Some("gemm") => return run_gemm(&opt),
        Some("attention") => return run_attention(&opt),
        Some("gguf") => return run_gguf(&opt),
        _ => {}
    }
    let get = |k: &str| opt_str(&opt, k);
    let num = |k: &str, d: &str| opt_num(&opt, k, d);
    // Before any candle op: both of candle's thread pools read this once.
    loraforge_trainer::device::set_cpu_threads(num("threads", "2")? as usize);
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
    if let Some(d) = opt.get("dtype") {
        spec.dtype = Some(loraforge_trainer::device::parse_dtype(d)?);
    }
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

/// LoRA training steps of a diffusers UNet (`DIR` holds `config.json` and
/// `diffusion_pytorch_model.safetensors`) at batch 1 on random inputs: latents
/// `(1, 4, res/8, res/8)` and a target from N(0, 1), a context `(1, 77, cross_attention_dim)`
/// from N(0, 1), one timestep drawn from 0..1000; LoRA r 4, alpha 4 on `to_q`, `to_k`,
/// `to_v`, `to_out.0`; MSE, backward, then AdamW (lr 1e-4, weight decay 1e-2, as
/// `torch.optim.AdamW`'s defaults). Time and memory do not depend on the weights' values, so
/// a random-weight model of the right shape (`scripts/make_sd15_shaped.py`) measures the
/// same as the real one. Prints one JSON line per step on stdout (seconds for forward,
/// backward and the optimizer; current and peak RSS) and exits with status 3 as soon as the
/// resident set passes `--max-rss-mib`, so that a run too big for the machine stops before
/// the kernel's OOM killer picks a victim.
fn run_sd(opt: &Opts) -> Result<(), Box<dyn std::error::Error>> {
    let threads = opt_num(opt, "threads", "2")? as usize;
    // Before any candle op: both of candle's thread pools read this once.
    loraforge_trainer::device::set_cpu_threads(threads);
    loraforge_trainer::device::tune_allocator_for_training();
    let dir = PathBuf::from(opt_str(opt, "unet")?);
    let res = opt_num(opt, "res", "256")? as usize;
    let steps = opt_num(opt, "steps", "3")? as usize;
    let seed = opt_num(opt, "seed", "0")? as u64;
    let max_rss = opt_num(opt, "max-rss-mib", "18432")? as u64;
    if res == 0 || !res.is_multiple_of(8) {
        return Err(format!("--res {res}: must be a positive multiple of 8").into());
    }
    std::thread::spawn(move || loop {
        let rss = proc_status_mib("VmRSS:");
        if rss > max_rss {
            eprintln!("loraforge-bench sd: RSS {rss} MiB passed --max-rss-mib {max_rss}; aborting");
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    let dev = loraforge_trainer::device::parse(opt.get("device").map_or("cpu", String::as_str))?;
    let t = Instant::now();
    let mut unet = UNet::load(&dir, &dev)?;
    let cfg = LoraConfig {
        r: 4,
        alpha: 4.0,
        dropout: 0.0,
        targets: Targets::parse("to_q,to_k,to_v,to_out.0")?,
        use_rslora: false,
        ..LoraConfig::default()
    };
    let adapted = lora::attach(&mut unet, &cfg, seed)?;
    let params = lora::params(&unet);
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "{}",
        serde_json::json!({
            "event": "loaded", "load_s": t.elapsed().as_secs_f64(), "adapted_modules": adapted.len(),
            "lora_parameters": n_params, "res": res, "threads": threads,
            "rss_mib": proc_status_mib("VmRSS:"),
        })
    );
    let mut optim = AdamW::new(
        params,
        AdamWConfig {
            weight_decay: 1e-2,
            ..AdamWConfig::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lat = res / 8;
    let ctx_dim = unet.cfg.cross_attention_dim;
    for step in 1..=steps {
        let sample = randn(&mut rng, (1, 4, lat, lat), &dev)?;
        let target = randn(&mut rng, (1, 4, lat, lat), &dev)?;
        let context = randn(&mut rng, (1, 77, ctx_dim), &dev)?;
        let timestep = rng.random_range(0..1000u32) as f32;
        let fctx = ForwardCtx::train(ChaCha8Rng::seed_from_u64(seed + step as u64));
        let t0 = Instant::now();
        let pred = unet.forward(&sample, &[timestep], &context, &fctx)?;
        let loss = mse(&pred, &target)?;
        let loss_v: f32 = loss.to_scalar()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        // What the backward leaves behind: candle keeps a gradient for every leaf it
        // reaches, the frozen convolutions' and norms' weights included, not only LoRA's.
        let (mut held, mut held_n) = (0usize, 0usize);
        for id in grads.get_ids() {
            if let Some(g) = grads.get_id(*id) {
                held += g.elem_count() * g.dtype().size_in_bytes();
                held_n += 1;
            }
        }
        optim.step(&grads, 1e-4)?;
        // A GPU runs the step asynchronously: the clock stops when it is done.
        dev.synchronize()?;
        let t3 = Instant::now();
        drop(grads);
        println!(
            "{}",
            serde_json::json!({
                "event": "step", "step": step, "loss": loss_v, "timestep": timestep,
                "forward_s": (t1 - t0).as_secs_f64(), "backward_s": (t2 - t1).as_secs_f64(),
                "optim_s": (t3 - t2).as_secs_f64(), "step_s": (t3 - t0).as_secs_f64(),
                "grads_held": held_n, "grads_held_mib": held >> 20,
                "rss_mib": proc_status_mib("VmRSS:"), "peak_rss_mib": proc_status_mib("VmHWM:"),
            })
        );
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// A tensor of draws from N(0, 1) (Box-Muller on the seeded generator).
/// Times `x · Wᵀ` (forward) and `g · W` (the input gradient) for `(rows, in)` inputs and
/// `(out, in)` weights: the median of `reps` after one warm-up, as GFLOP/s.
fn run_attention(opt: &Opts) -> Result<(), Box<dyn std::error::Error>> {
    use loraforge_trainer::ops::{
        blocked_attention, multi_head_attention, AttnMask, Heads, RopeTables, RopeTensors, MASKED,
    };
    let threads = opt_num(opt, "threads", "2")? as usize;
    loraforge_trainer::device::set_cpu_threads(threads);
    let which = opt_str(opt, "impl")?;
    let (t, b) = (
        opt_num(opt, "seq", "2048")? as usize,
        opt_num(opt, "batch", "1")? as usize,
    );
    let g = Heads {
        b,
        t,
        tk: t,
        q: opt_num(opt, "heads", "9")? as usize,
        kv: opt_num(opt, "kv-heads", "3")? as usize,
        dim: opt_num(opt, "dim", "64")? as usize,
    };
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = b * t;
    let q = candle_core::Var::from_tensor(&randn(&mut rng, (n, g.q * g.dim), &dev)?)?;
    let k = candle_core::Var::from_tensor(&randn(&mut rng, (n, g.kv * g.dim), &dev)?)?;
    let v = candle_core::Var::from_tensor(&randn(&mut rng, (n, g.kv * g.dim), &dev)?)?;
    let r = randn(&mut rng, (n, g.q * g.dim), &dev)?;
    let half = g.dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / g.dim as f32))
        .collect();
    let pos = Tensor::arange(0u32, t as u32, &dev)?
        .to_dtype(candle_core::DType::F32)?
        .reshape((t, 1))?;
    let ang = pos.broadcast_mul(&Tensor::from_vec(inv, (1, half), &dev)?)?;
    let rot = RopeTensors {
        cos: ang.cos()?,
        sin: ang.sin()?,
    };
    let tables = RopeTables::new(&rot.cos, &rot.sin)?;
    let mut m = vec![0f32; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            m[(bi * t + i) * t + i + 1..(bi * t + i + 1) * t].fill(MASKED);
        }
    }
    let mask = AttnMask::new(m, b, t, t, &dev)?;
    let scale = 1.0 / (g.dim as f64).sqrt();
    // `--plain 1`: no rotation and no mask, as in an SD UNet's attention.
    let plain = opt_num(opt, "plain", "0")? != 0.0;
    let fused_out = || {
        multi_head_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            g,
            scale,
            (!plain).then_some(&tables),
            (!plain).then_some(&mask),
        )
    };
    let pass = |fused: bool| -> candle_core::Result<Vec<Tensor>> {
        let out = if fused {
            fused_out()?
        } else {
            blocked_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                g,
                scale,
                Some(&rot),
                Some(&mask.tensor),
            )?
        };
        let grads = (out * &r)?.sum_all()?.backward()?;
        [&q, &k, &v]
            .iter()
            .map(|x| {
                grads
                    .get(x.as_tensor())
                    .cloned()
                    .ok_or(candle_core::Error::Msg("no gradient".into()))
            })
            .collect()
    };
    let report = |name: &str, before: u64, secs: f64| {
        let peak = proc_status_mib("VmHWM:");
        println!(
            "{}",
            serde_json::json!({"impl": name, "seq": t, "batch": b, "seconds": secs,
                "rss_before_mib": before, "peak_rss_mib": peak, "pass_peak_mib": peak.saturating_sub(before)})
        );
    };
    match which.as_str() {
        "timed" => {
            // The fused op's forward and backward, timed apart: the median of `--reps`.
            let reps = opt_num(opt, "reps", "3")? as usize;
            let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
            for _ in 0..reps.max(1) {
                let t0 = Instant::now();
                let out = fused_out()?;
                let loss = (out * &r)?.sum_all()?;
                let t1 = Instant::now();
                let grads = loss.backward()?;
                fwd.push((t1 - t0).as_secs_f64());
                bwd.push(t1.elapsed().as_secs_f64());
                drop(grads);
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "{}",
                serde_json::json!({"impl": "fused", "seq": t, "batch": b, "heads": g.q,
                    "dim": g.dim, "plain": plain, "forward_s": median(fwd), "backward_s": median(bwd)})
            );
        }
        "fused" | "blocked" => {
            let before = rss_mib();
            let t0 = Instant::now();
            pass(which == "fused")?;
            report(&which, before, t0.elapsed().as_secs_f64());
        }
        "both" => {
            let a = pass(true)?;
            let c = pass(false)?;
            for ((name, x), y) in ["q", "k", "v"].iter().zip(&a).zip(&c) {
                let scale = x.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                println!(
                    "{}",
                    serde_json::json!({"gradient": name, "seq": t, "max_abs_diff": diff,
                        "max_abs": scale, "relative": diff / scale})
                );
            }
        }
        other => return Err(format!("--impl {other}: expected fused, blocked or both").into()),
    }
    Ok(())
}

fn run_gemm(opt: &Opts) -> Result<(), Box<dyn std::error::Error>> {
    use loraforge_trainer::ops::matmul::{matmul_with, Blas};
    let threads = opt_num(opt, "threads", "2")? as usize;
    loraforge_trainer::device::set_cpu_threads(threads);
    let rows = opt_num(opt, "rows", "1024")? as usize;
    let reps = (opt_num(opt, "reps", "10")? as usize).max(1);
    let shapes = opt
        .get("shapes")
        .cloned()
        .unwrap_or("576x576,576x192,576x1536,1536x576,576x49152".into());
    // candle's gemm, then each BLAS named, through the function the ops call.
    let mut engines: Vec<(String, String, Option<Blas>)> =
        vec![("gemm".into(), "candle's gemm 0.19".into(), None)];
    for name in opt.get("blas").map(String::as_str).unwrap_or("").split(',') {
        if !name.is_empty() {
            let b = Blas::open(name)?;
            engines.push((name.to_string(), b.about().to_string(), Some(b)));
        }
    }
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // One pass over every shape first: the first products of a process run slower (the
    // CPU's clock, page faults), and would otherwise count against the first shape.
    for pass in ["warm-up", "measure"] {
        for shape in shapes.split(',') {
            let (i, o) = shape
                .split_once('x')
                .and_then(|(i, o)| Some((i.parse::<usize>().ok()?, o.parse::<usize>().ok()?)))
                .ok_or(format!("--shapes: {shape:?} is not INxOUT"))?;
            let x = randn(&mut rng, (rows, i), &dev)?;
            let g = randn(&mut rng, (rows, o), &dev)?;
            let w = randn(&mut rng, (o, i), &dev)?;
            let wt = w.t()?;
            let flops = 2.0 * (rows * i * o) as f64;
            for (op, a, b, n, k) in [("x.Wt", &x, &wt, o, i), ("g.W", &g, &w, i, o)] {
                let (sa, la) = a.storage_and_layout();
                let (sb, lb) = b.storage_and_layout();
                let (candle_core::Storage::Cpu(sa), candle_core::Storage::Cpu(sb)) = (&*sa, &*sb)
                else {
                    return Err("gemm bench: CPU tensors expected".into());
                };
                let mut secs = vec![Vec::new(); engines.len()];
                let mut results = Vec::new();
                // Alternating, one product each in turn, after one warm-up each.
                for rep in 0..=reps {
                    for (e, (_, _, blas)) in engines.iter().enumerate() {
                        let t = Instant::now();
                        let c = matmul_with(blas.as_ref(), sa, sb, (1, rows, n, k), la, lb)?;
                        if rep > 0 {
                            secs[e].push(t.elapsed().as_secs_f64());
                        } else {
                            results.push(c.as_slice::<f32>()?.to_vec());
                        }
                    }
                }
                if pass == "warm-up" {
                    continue;
                }
                let norm = results[0].iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
                for (e, (engine, about, _)) in engines.iter().enumerate() {
                    let err = results[e]
                        .iter()
                        .zip(&results[0])
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum::<f64>();
                    secs[e].sort_by(f64::total_cmp);
                    let med = secs[e][secs[e].len() / 2];
                    println!(
                        "{}",
                        serde_json::json!({"engine": engine, "about": about, "op": op,
                        "rows": rows, "in": i, "out": o, "seconds": med,
                        "gflops": flops / med / 1e9,
                        "rel_err_vs_gemm": (err / norm).sqrt()})
                    );
                }
            }
        }
    }
    Ok(())
}

fn randn(
    rng: &mut ChaCha8Rng,
    shape: impl Into<candle_core::Shape>,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, dev)
}

/// Current resident set, to see whether memory grows from step to step.
fn rss_mib() -> u64 {
    proc_status_mib("VmRSS:")
}

/// A `/proc/self/status` field in MiB (`VmRSS:` now, `VmHWM:` the peak); 0 where unreadable.
fn proc_status_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// GPT-2's byte-level alphabet: the printable bytes stand for themselves, the others for
/// the code points from 256 up, in byte order.
fn byte_level_alphabet() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("a valid code point").to_string()
        })
        .collect()
}

fn run_gguf(opt: &Opts) -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::QTensor;
    use loraforge_trainer::device::BaseDtype;
    // (hidden, intermediate, layers, heads, kv heads, tied): Llama 3.2 1B and 3B, 3.1 8B.
    let (h, i, l, nh, nkv, tied) = match opt_str(opt, "shape")?.as_str() {
        "1b" => (2048usize, 8192usize, 16usize, 32usize, 8usize, true),
        "3b" => (3072, 8192, 28, 24, 8, true),
        "8b" => (4096, 14336, 32, 32, 8, false),
        other => return Err(format!("--shape {other}: expected 1b, 3b or 8b").into()),
    };
    let kind = match BaseDtype::parse(&opt_str(opt, "quant")?)? {
        BaseDtype::Packed(k) => k,
        _ => return Err("--quant: a packed type (q4_k, q8_0, ...)".into()),
    };
    let vocab = 128_256usize;
    let hd = h / nh;
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |name: String, rows: usize, cols: usize| -> candle_core::Result<()> {
        let t = Tensor::randn(0f32, 0.02, (rows, cols), &dev)?;
        tensors.push((name, QTensor::quantize(&t, kind)?));
        Ok(())
    };
    matrix("token_embd.weight".into(), vocab, h)?;
    if !tied {
        matrix("output.weight".into(), vocab, h)?;
    }
    for b in 0..l {
        let p = format!("blk.{b}");
        matrix(format!("{p}.attn_q.weight"), nh * hd, h)?;
        matrix(format!("{p}.attn_k.weight"), nkv * hd, h)?;
        matrix(format!("{p}.attn_v.weight"), nkv * hd, h)?;
        matrix(format!("{p}.attn_output.weight"), h, nh * hd)?;
        matrix(format!("{p}.ffn_gate.weight"), i, h)?;
        matrix(format!("{p}.ffn_up.weight"), i, h)?;
        matrix(format!("{p}.ffn_down.weight"), h, i)?;
        eprintln!("layer {b} of {l}");
    }
    let ones = Tensor::ones(h, candle_core::DType::F32, &dev)?;
    let norm = || QTensor::quantize(&ones, candle_core::quantized::GgmlDType::F32);
    tensors.push(("output_norm.weight".into(), norm()?));
    for b in 0..l {
        tensors.push((format!("blk.{b}.attn_norm.weight"), norm()?));
        tensors.push((format!("blk.{b}.ffn_norm.weight"), norm()?));
    }
    // Bytes, one merge (a GGUF array is typed by its first element), two specials, and
    // filler up to Llama 3's vocabulary: the output head is as wide as the real one's.
    let mut tokens = byte_level_alphabet();
    tokens.push("\u{120}t".into());
    let bos = tokens.len() as u32;
    tokens.push("<|begin_of_text|>".into());
    tokens.push("<|end_of_text|>".into());
    while tokens.len() < vocab {
        tokens.push(format!("<|filler_{}|>", tokens.len()));
    }
    let types: Vec<Value> = (0..vocab)
        .map(|t| {
            Value::I32(if t as u32 == bos || t as u32 == bos + 1 {
                3
            } else {
                1
            })
        })
        .collect();
    let u = |x: usize| Value::U32(x as u32);
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(h)),
        ("llama.feed_forward_length", u(i)),
        ("llama.block_count", u(l)),
        ("llama.attention.head_count", u(nh)),
        ("llama.attention.head_count_kv", u(nkv)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(500_000.0)),
        ("llama.context_length", u(8192)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("llama-bpe".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("\u{120} t".into())]),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(bos)),
        ("tokenizer.ggml.eos_token_id", Value::U32(bos + 1)),
    ];
    let out = PathBuf::from(opt_str(opt, "out")?);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out)?);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    f.flush()?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
