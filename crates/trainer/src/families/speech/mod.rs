//! Speech recognition (Whisper), being built one piece at a time (issue 23). So far:
//! clips decoded and resampled to 16 kHz mono ([`audio`]), the log-mel features Whisper's
//! encoder reads, exactly as transformers' `WhisperFeatureExtractor` computes them
//! ([`features`]), and the model with PEFT's module names ([`whisper`]). No dataset,
//! objective or task yet: nothing here is reachable from a job.

pub mod audio;
pub mod features;
pub mod whisper;
