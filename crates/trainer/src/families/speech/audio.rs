//! Audio clips: WAV (PCM 8/16/24/32-bit or 32-bit float, any channel count) decoded by
//! `hound`, FLAC (its native container) by `symphonia`, averaged to mono (as librosa and the `datasets` audio loader do), and
//! resampled to Whisper's 16 kHz by `rubato`'s FFT resampler. Integer samples scale as
//! soundfile reads them (`x / 2^(bits-1)`), so a 16 kHz 16-bit clip gives the exact
//! floats transformers' recipe feeds its feature extractor.

use crate::{Error, Result};
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{
    Async, FixedAsync, Resampler, SincInterpolationParameters, SincInterpolationType,
    WindowFunction,
};
use std::io::Cursor;

/// Whisper's sampling rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// The longest clip Whisper reads in one window, in seconds.
pub const MAX_SECONDS: f64 = 30.0;

/// The longest file `loraforge transcribe` and the API read, in seconds: 30 minutes
/// (at most 29 M samples at 16 kHz, 115 MB).
pub const MAX_FILE_SECONDS: f64 = 1800.0;

/// The sample rates read: from narrow-band telephony to studio audio. A lower one would
/// let a few header bytes claim hours that resampling then makes real.
pub const RATES: std::ops::RangeInclusive<u32> = 4_000..=384_000;

/// A decoded clip, before resampling.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Mono samples in `[-1, 1]`.
    pub samples: Vec<f32>,
    pub rate: u32,
    /// Channels in the file (averaged into `samples`).
    pub channels: u16,
}

impl Clip {
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.rate.max(1))
    }
}

/// Decodes a WAV file's bytes; `name` is for messages. A clip longer than
/// `max_seconds` is refused from its header, before its samples are read.
pub fn decode_wav(bytes: &[u8], name: &str, max_seconds: f64) -> Result<Clip> {
    let fail = |why: String| Error::Data(format!("{name}: {why}"));
    let mut r = hound::WavReader::new(Cursor::new(bytes)).map_err(|e| fail(e.to_string()))?;
    let spec = r.spec();
    if spec.channels == 0 {
        return Err(fail("a WAV header with no channels".into()));
    }
    if !RATES.contains(&spec.sample_rate) {
        return Err(fail(format!(
            "a sample rate of {} Hz (read: {} to {} Hz)",
            spec.sample_rate,
            RATES.start(),
            RATES.end()
        )));
    }
    let frames = u64::from(r.duration());
    let seconds = frames as f64 / f64::from(spec.sample_rate);
    if seconds > max_seconds {
        let why = if max_seconds == MAX_SECONDS {
            " (Whisper's window)"
        } else {
            ""
        };
        return Err(fail(format!(
            "{seconds:.1} s long; at most {max_seconds} s is read{why}"
        )));
    }
    let ch = usize::from(spec.channels);
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float if spec.bits_per_sample == 32 => r
            .samples::<f32>()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| fail(e.to_string()))?,
        hound::SampleFormat::Int if (8..=32).contains(&spec.bits_per_sample) => {
            let scale = 1.0 / f64::from(1u32 << (spec.bits_per_sample - 1));
            r.samples::<i32>()
                .map(|s| s.map(|v| (f64::from(v) * scale) as f32))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| fail(e.to_string()))?
        }
        f => {
            return Err(fail(format!(
                "{f:?} samples of {} bits are not supported (PCM 8-32 bit or 32-bit float)",
                spec.bits_per_sample
            )))
        }
    };
    Ok(Clip {
        samples: to_mono(interleaved, ch),
        rate: spec.sample_rate,
        channels: spec.channels,
    })
}

/// Interleaved frames of `ch` channels averaged to one.
fn to_mono(interleaved: Vec<f32>, ch: usize) -> Vec<f32> {
    if ch == 1 {
        return interleaved;
    }
    interleaved
        .chunks(ch)
        .map(|f| f.iter().sum::<f32>() / ch as f32)
        .collect()
}

/// `clip`'s samples at 16 kHz.
pub fn to_16k(clip: Clip) -> Result<Vec<f32>> {
    if clip.rate == SAMPLE_RATE || clip.samples.is_empty() {
        return Ok(clip.samples);
    }
    let n = clip.samples.len();
    let input = InterleavedSlice::new(&clip.samples, 1, n)
        .map_err(|e| Error::Data(format!("resampling: {e}")))?;
    let params = SincInterpolationParameters {
        sinc_len: 256,
        f_cutoff: Some(0.95),
        oversampling_factor: 256,
        interpolation: SincInterpolationType::Cubic,
        window: WindowFunction::BlackmanHarris2,
    };
    let mut r = Async::<f32>::new_sinc(
        f64::from(SAMPLE_RATE) / f64::from(clip.rate),
        1.0,
        &params,
        1024,
        1,
        FixedAsync::Input,
    )
    .map_err(|e| Error::Data(format!("resampling from {} Hz: {e}", clip.rate)))?;
    let out = r
        .process_all(&input, n, None)
        .map_err(|e| Error::Data(format!("resampling from {} Hz: {e}", clip.rate)))?;
    Ok(out.take_data())
}

/// The file types read, by extension.
pub const EXTENSIONS: [&str; 2] = ["wav", "flac"];

/// Decodes WAV or FLAC bytes, told apart by their first bytes (`RIFF`, `fLaC`).
pub fn decode(bytes: &[u8], name: &str, max_seconds: f64) -> Result<Clip> {
    if bytes.starts_with(b"fLaC") {
        decode_flac(bytes, name, max_seconds)
    } else if bytes.starts_with(b"RIFF") || bytes.starts_with(b"RIFX") {
        decode_wav(bytes, name, max_seconds)
    } else {
        Err(Error::Data(format!(
            "{name}: neither WAV nor FLAC (MP3, OGG and others: convert them to WAV or FLAC)"
        )))
    }
}

/// Decodes a FLAC file's bytes; `name` is for messages. A clip longer than
/// `max_seconds` is refused from its header, and again while decoding if the header
/// does not say or says less than the frames hold.
pub fn decode_flac(bytes: &[u8], name: &str, max_seconds: f64) -> Result<Clip> {
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::DecoderOptions;
    use symphonia::core::errors::Error as FlacError;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let fail = |why: String| Error::Data(format!("{name}: {why}"));
    let source = MediaSourceStream::new(Box::new(Cursor::new(bytes.to_vec())), Default::default());
    let mut hint = Hint::new();
    hint.with_extension("flac");
    let mut format = symphonia::default::get_probe()
        .format(
            &hint,
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| fail(e.to_string()))?
        .format;
    let track = format
        .default_track()
        .ok_or_else(|| fail("no audio stream".into()))?;
    let (id, params) = (track.id, track.codec_params.clone());
    let rate = params.sample_rate.unwrap_or(0);
    let ch = params.channels.map_or(0, |c| c.count());
    if ch == 0 {
        return Err(fail("a FLAC stream with no channels".into()));
    }
    if !RATES.contains(&rate) {
        return Err(fail(format!(
            "a sample rate of {rate} Hz (read: {} to {} Hz)",
            RATES.start(),
            RATES.end()
        )));
    }
    let max_frames = (max_seconds * f64::from(rate)) as u64;
    let too_long = |frames: u64| {
        fail(format!(
            "{:.1} s long; at most {max_seconds} s is read",
            frames as f64 / f64::from(rate)
        ))
    };
    if let Some(n) = params.n_frames.filter(|&n| n > max_frames) {
        return Err(too_long(n));
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| fail(e.to_string()))?;
    let mut interleaved = Vec::new();
    let mut frames = 0u64;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(FlacError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(fail(e.to_string())),
        };
        if packet.track_id() != id {
            continue;
        }
        let decoded = decoder.decode(&packet).map_err(|e| fail(e.to_string()))?;
        frames += decoded.frames() as u64;
        if frames > max_frames {
            return Err(too_long(frames));
        }
        // Samples come left-aligned in 32 bits: / 2^31 is x / 2^(bits-1), as WAV's.
        let mut buf = SampleBuffer::<i32>::new(decoded.capacity() as u64, *decoded.spec());
        buf.copy_interleaved_ref(decoded);
        let scale = 1.0 / f64::from(1u32 << 31);
        interleaved.extend(buf.samples().iter().map(|&v| (f64::from(v) * scale) as f32));
    }
    Ok(Clip {
        samples: to_mono(interleaved, ch),
        rate,
        channels: ch as u16,
    })
}

/// A WAV or FLAC file's bytes as 16 kHz mono samples, refused past `max_seconds`.
pub fn decode_16k(bytes: &[u8], name: &str, max_seconds: f64) -> Result<Vec<f32>> {
    let clip = decode(bytes, name, max_seconds)?;
    if clip.samples.is_empty() {
        return Err(Error::Data(format!("{name}: the clip has no samples")));
    }
    to_16k(clip)
}
