//! Whisper's log-mel spectrogram, as transformers' `WhisperFeatureExtractor` computes it:
//! the 16 kHz clip zero-padded (or cut) to 30 s, a centred STFT (400-point periodic Hann
//! window, hop 160, reflect padding), power spectrum, a Slaney-scale, Slaney-normalised
//! triangular mel filter bank from 0 to 8 kHz (80 or 128 bins), `log10` of the mel
//! energies floored at 1e-10, values below the clip's maximum minus 8 raised to it, then
//! `(x + 4) / 4`; the STFT's last frame is dropped, leaving 3000 frames. Computed in f64
//! (transformers runs torch's f32 STFT; the two agree within 1e-5 here).

use super::audio::SAMPLE_RATE;
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;
use std::sync::Arc;

/// STFT window and FFT length.
pub const N_FFT: usize = 400;
/// Samples between frames (10 ms).
pub const HOP: usize = 160;
/// 30 s at 16 kHz: every clip is padded or cut to this.
pub const N_SAMPLES: usize = 480_000;
/// Frames of the features: one per hop.
pub const N_FRAMES: usize = N_SAMPLES / HOP;
/// Frequency bins of the one-sided spectrum.
pub const N_FREQS: usize = N_FFT / 2 + 1;

const MIN_LOG_HZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = 15.0;

/// Slaney's mel scale: linear below 1 kHz, logarithmic above.
fn hz_to_mel(f: f64) -> f64 {
    if f >= MIN_LOG_HZ {
        MIN_LOG_MEL + (f / MIN_LOG_HZ).ln() * 27.0 / 6.4f64.ln()
    } else {
        3.0 * f / 200.0
    }
}

fn mel_to_hz(m: f64) -> f64 {
    if m >= MIN_LOG_MEL {
        MIN_LOG_HZ * ((m - MIN_LOG_MEL) * 6.4f64.ln() / 27.0).exp()
    } else {
        200.0 * m / 3.0
    }
}

/// The filter bank, `N_FREQS × bins` row-major: triangles between mel-spaced edges over
/// 0-8 kHz, each scaled by `2 / (its upper edge - its lower edge)` (Slaney's
/// normalisation, equal area).
pub fn mel_filters(bins: usize) -> Vec<f64> {
    let nyquist = f64::from(SAMPLE_RATE / 2);
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(nyquist));
    let edges: Vec<f64> = (0..bins + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (bins + 1) as f64))
        .collect();
    let mut w = vec![0f64; N_FREQS * bins];
    for k in 0..N_FREQS {
        let f = nyquist * k as f64 / (N_FREQS - 1) as f64;
        for m in 0..bins {
            let down = (f - edges[m]) / (edges[m + 1] - edges[m]);
            let up = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1]);
            let v = down.min(up).max(0.0);
            w[k * bins + m] = v * 2.0 / (edges[m + 2] - edges[m]);
        }
    }
    w
}

/// A feature extractor for `bins` mel bins (80 for most Whisper models, 128 for
/// large-v3).
pub struct LogMel {
    pub bins: usize,
    filters: Vec<f64>,
    window: Vec<f64>,
    fft: Arc<dyn rustfft::Fft<f64>>,
}

impl LogMel {
    pub fn new(bins: usize) -> Self {
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (std::f64::consts::TAU * n as f64 / N_FFT as f64).cos())
            .collect();
        Self {
            bins,
            filters: mel_filters(bins),
            window,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
        }
    }

    /// The features of a 16 kHz mono clip: `bins × N_FRAMES`, row-major (a mel bin's
    /// frames together, transformers' `input_features[0]`).
    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        let n = samples.len().min(N_SAMPLES);
        let x = |i: usize| -> f64 {
            if i < n {
                f64::from(samples[i])
            } else {
                0.0
            }
        };
        // torch.stft(center=True): reflect-pad N_FFT/2 on both sides of the padded clip.
        let half = N_FFT / 2;
        let padded = |j: usize| -> f64 {
            if j < half {
                x(half - j)
            } else if j - half < N_SAMPLES {
                x(j - half)
            } else {
                x(2 * N_SAMPLES - 2 - (j - half))
            }
        };
        let floor = 1e-10f64.log10();
        let mut logmel = vec![floor; self.bins * N_FRAMES];
        let mut buf = vec![Complex::new(0f64, 0f64); N_FFT];
        let mut power = vec![0f64; N_FREQS];
        for t in 0..N_FRAMES {
            let start = t * HOP;
            // A frame wholly inside the zero padding has no energy: the floor.
            if start >= n + half {
                continue;
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = Complex::new(padded(start + i) * self.window[i], 0.0);
            }
            self.fft.process(&mut buf);
            for (p, b) in power.iter_mut().zip(&buf) {
                *p = b.norm_sqr();
            }
            for m in 0..self.bins {
                let e: f64 = (0..N_FREQS)
                    .map(|k| self.filters[k * self.bins + m] * power[k])
                    .sum();
                logmel[m * N_FRAMES + t] = e.max(1e-10).log10();
            }
        }
        let max = logmel.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        logmel
            .into_iter()
            .map(|v| ((v.max(max - 8.0) + 4.0) / 4.0) as f32)
            .collect()
    }
}
