//! Whisper's audio front end against transformers' `WhisperFeatureExtractor` (fixtures
//! from `scripts/make_whisper_features_fixture.py`): the Slaney filter banks, the
//! log-mel features of a 16-bit 16 kHz clip at 80 and 128 bins (within 1e-4), a
//! 22.05 kHz float stereo clip downmixed and resampled to 16 kHz, and FLAC files decoding
//! to their WAV twins' samples.

mod common;

use candle_core::{Device, Tensor};
use common::fixtures;
use loraforge_trainer::families::speech::audio::{decode_wav, to_16k, MAX_SECONDS};
use loraforge_trainer::families::speech::features::{mel_filters, LogMel, N_FRAMES, N_FREQS};
use std::collections::HashMap;

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("whisper-features/ref.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn wav(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("whisper-features").join(name)).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn log_mel_features_match_transformers() {
    let r = reference();
    let clip = decode_wav(&wav("speech16k.wav"), "speech16k.wav", MAX_SECONDS).unwrap();
    assert_eq!((clip.rate, clip.channels), (16_000, 1));
    assert_eq!(clip.samples.len(), 20_800);
    for bins in [80usize, 128] {
        let want: Vec<f32> = r[&format!("mel_{bins}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = mel_filters(bins).iter().map(|&v| v as f32).collect();
        assert_eq!(got.len(), N_FREQS * bins);
        let e = max_diff(&got, &want);
        assert!(e < 1e-7, "{bins} bins: filter bank off by {e:.2e}");

        let feats = LogMel::new(bins).compute(&to_16k(clip.clone()).unwrap());
        assert_eq!(feats.len(), bins * N_FRAMES);
        let head = r[&format!("features_{bins}")].to_vec2::<f32>().unwrap();
        let last = r[&format!("last_{bins}")].to_vec1::<f32>().unwrap();
        let kept = head[0].len();
        let mut worst = 0f32;
        for m in 0..bins {
            let row = &feats[m * N_FRAMES..(m + 1) * N_FRAMES];
            worst = worst.max(max_diff(&row[..kept], &head[m]));
            let tail: Vec<f32> = vec![last[m]; N_FRAMES - kept];
            worst = worst.max(max_diff(&row[kept..], &tail));
        }
        println!("{bins} bins: features within {worst:.1e} of transformers'");
        assert!(worst < 1e-4, "{bins} bins: features off by {worst:.2e}");
    }
}

#[test]
fn float_stereo_clips_are_downmixed_and_resampled_to_16k() {
    let clip = decode_wav(&wav("speech22k.wav"), "speech22k.wav", MAX_SECONDS).unwrap();
    assert_eq!((clip.rate, clip.channels), (22_050, 2));
    let s = to_16k(clip.clone()).unwrap();
    assert!(
        (s.len() as i64 - 8000).abs() <= 1,
        "{} samples, 8000 expected",
        s.len()
    );
    // Two tones, 0.4 at 440 Hz and 0.2 at 3 kHz, averaged with their halves: 0.3 and
    // 0.15 once mono. Each tone's amplitude, whatever its phase (the resampler may sit
    // a fraction of a sample off), by projection on sine and cosine over whole cycles
    // (0.5 s), the ends' 20 ms of filter ringing left out; then what is left besides
    // the two tones.
    let n = 8000usize;
    let (lo, hi) = (320usize, n - 320);
    let fit = |f: f64| -> (f64, f64) {
        let (mut a, mut b) = (0f64, 0f64);
        for (i, &v) in s.iter().enumerate().take(n) {
            let w = std::f64::consts::TAU * f * i as f64 / 16_000.0;
            a += f64::from(v) * w.cos();
            b += f64::from(v) * w.sin();
        }
        (2.0 * a / n as f64, 2.0 * b / n as f64)
    };
    let mut residual = 0f64;
    let tones = [(440.0, 0.3), (3000.0, 0.15)].map(|(f, want)| {
        let (a, b) = fit(f);
        let amp = (a * a + b * b).sqrt();
        assert!(
            (amp - want).abs() < 0.01 * want,
            "{f} Hz: amplitude {amp}, {want} expected"
        );
        (f, a, b, amp)
    });
    for (i, &v) in s.iter().enumerate().take(hi).skip(lo) {
        let model: f64 = tones
            .iter()
            .map(|(f, a, b, _)| {
                let w = std::f64::consts::TAU * f * i as f64 / 16_000.0;
                a * w.cos() + b * w.sin()
            })
            .sum();
        residual = residual.max((f64::from(v) - model).abs());
    }
    println!(
        "22.05 kHz stereo -> 16 kHz mono: amplitudes {:.4} and {:.4} (0.3, 0.15), residual {residual:.1e}",
        tones[0].3, tones[1].3
    );
    assert!(residual < 5e-3, "resampled clip: residual {residual:.2e}");

    let e = decode_wav(&wav("speech16k.wav"), "a.wav", 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.wav: 1.3 s long"), "{e}");
    let e = decode_wav(b"RIFF\x04\x00\x00\x00WAVE", "b.wav", MAX_SECONDS)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("data: b.wav: "), "{e}");
}

/// FLAC (made from WAV twins by the `flac` CLI, lossless) decodes to exactly the WAV's
/// samples: a 16-bit mono espeak-ng clip, and 24-bit stereo tones at 22.05 kHz.
#[test]
fn flac_decodes_to_its_wav_twins_samples() {
    use loraforge_trainer::families::speech::audio::{decode, decode_flac};
    let zipped = std::fs::File::open(fixtures().join("tiny-whisper-asr-ref/train.zip")).unwrap();
    let mut z = zip::ZipArchive::new(zipped).unwrap();
    let mut clip1 = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("clip1.wav").unwrap(), &mut clip1).unwrap();
    for (flac, wav_bytes, rate, channels) in [
        ("clip1.flac", clip1, 16_000, 1),
        ("tone24.flac", wav("tone24.wav"), 22_050, 2),
    ] {
        let f = decode_flac(&wav(flac), flac, MAX_SECONDS).unwrap();
        let w = decode_wav(&wav_bytes, "twin", MAX_SECONDS).unwrap();
        assert_eq!((f.rate, f.channels), (rate, channels), "{flac}");
        assert!(!f.samples.is_empty());
        assert_eq!(f.samples, w.samples, "{flac}");
        // The dispatcher tells them apart by their first bytes.
        assert_eq!(
            decode(&wav(flac), flac, MAX_SECONDS).unwrap().samples,
            w.samples
        );
    }
    let e = decode_flac(&wav("tone24.flac"), "tone24.flac", 0.1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0.2 s long; at most 0.1 s is read"), "{e}");
    let e = decode(b"ID3\x04junk", "a.mp3", MAX_SECONDS)
        .unwrap_err()
        .to_string();
    assert!(e.contains("neither WAV nor FLAC"), "{e}");
}
