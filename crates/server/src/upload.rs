//! Receiving an upload: the body streams into a temp file while it is counted
//! against the cap, hashed (sha256) and validated line by line on a blocking thread
//! (the trainer's `data::validate`), so that nothing holds the whole file in memory
//! and the file is read only once. A zip (captioned images for text-to-image) cannot be
//! checked as a stream (its directory is at the end), so it is checked once written,
//! by the trainer's `sd::dataset` with its path and zip-bomb guards.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use loraforge_store::{BlobStore, Upload};
use loraforge_trainer::data::{self, ValidationReport};
use sha2::{Digest, Sha256};
use std::io::Read;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Longest accepted line. The validator buffers one line at a time, so this bounds
/// its memory; a longer line ends validation with an error naming it.
pub const MAX_LINE_BYTES: u64 = 16 << 20;

/// A received upload, still in its temp file.
pub struct Received {
    pub upload: Upload,
    pub bytes: u64,
    pub sha256: String,
    pub report: ValidationReport,
    /// A summary worth showing even when the file is fine (an image zip's layout,
    /// captions and undecodable images).
    pub details: Option<String>,
}

/// The start of a zip's local file header (or of an empty archive's directory end).
fn is_zip(first: &[u8]) -> bool {
    first.starts_with(b"PK\x03\x04") || first.starts_with(b"PK\x05\x06")
}

/// Checks a received image zip, as one folder per class (image classification) when
/// its names say so, else as captioned images (text to image); its problems become the
/// report's errors.
fn check_image_zip(
    path: &std::path::Path,
    min_examples: u64,
) -> (ValidationReport, Option<String>) {
    use loraforge_trainer::families::diffusion::dataset::{read_zip, ZipLimits};
    use loraforge_trainer::families::speech::dataset::looks_like_speech;
    use loraforge_trainer::families::vision::dataset::looks_labelled;
    if looks_like_speech(path, &ZipLimits::default()) {
        return check_speech_zip(path, min_examples);
    }
    if looks_labelled(path, &ZipLimits::default()) {
        return check_class_zip(path, min_examples);
    }
    let mut report = ValidationReport {
        format: Some(data::DataFormat::ImageZip),
        ..Default::default()
    };
    // The report needs no pixels: each image is shrunk as soon as it is decoded, so a
    // zip of huge (or huge-decoding) images costs one image's memory at a time.
    let limits = ZipLimits {
        shrink_to: Some(8),
        ..ZipLimits::default()
    };
    match read_zip(path, &limits) {
        Ok(ds) => {
            let r = &ds.report;
            report.examples = r.images as u64;
            let mut d = format!(
                "{} layout: {} image(s), {} with a caption, {} with repeats",
                serde_json::to_value(ds.layout)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                r.images,
                r.with_caption,
                r.total_repeats
            );
            if !r.missing_captions.is_empty() {
                d.push_str(&format!("; no caption: {}", r.missing_captions.join(", ")));
            }
            d.push_str(&undecodable_note(&r.undecodable));
            // Without any caption the LoRA learns nothing it could be prompted with.
            let problem = if r.with_caption == 0 {
                Some(
                    "no image has a caption: put one in a .txt or .caption file next to it, \
                     in a kohya folder name (10_sks dog/), or in metadata.jsonl's text; for \
                     image classification, put every image in a folder named for its class \
                     (cat/001.png), with at least two classes"
                        .to_string(),
                )
            } else if (r.images as u64) < min_examples {
                Some(format!(
                    "the archive has {} image(s); at least {min_examples} are required",
                    r.images
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                report.errors.push(p);
                report.error_count = 1;
                return (report, None);
            }
            (report, Some(d))
        }
        Err(e) => {
            report.errors.push(without_temp_name(path, e.to_string()));
            report.error_count = 1;
            (report, None)
        }
    }
}

/// "; skipped, not decodable: a.png (why), ..." for a summary, or nothing.
fn undecodable_note(undecodable: &[(String, String)]) -> String {
    if undecodable.is_empty() {
        return String::new();
    }
    let u: Vec<String> = undecodable
        .iter()
        .map(|(n, e)| format!("{n} ({e})"))
        .collect();
    format!("; skipped, not decodable: {}", u.join(", "))
}

/// The temp file's name stripped from a trainer message: the entry and the problem are
/// what the client needs.
fn without_temp_name(path: &std::path::Path, msg: String) -> String {
    let msg = match path.file_name() {
        Some(n) => msg.replace(&format!("{}: ", n.to_string_lossy()), ""),
        None => msg,
    };
    msg.trim_start_matches("data: ").to_string()
}

/// Checks a zip of clips and transcripts (an `audiofolder` metadata file, or `.txt`
/// beside each clip): every clip listed decodes, is at most 30 s, and has a transcript.
fn check_speech_zip(
    path: &std::path::Path,
    min_examples: u64,
) -> (ValidationReport, Option<String>) {
    use loraforge_trainer::archive::ZipLimits;
    use loraforge_trainer::families::speech::dataset::check_speech_zip as check;
    let mut report = ValidationReport {
        format: Some(data::DataFormat::AudioTranscripts),
        ..Default::default()
    };
    let fail = |mut report: ValidationReport, m: String| {
        report.errors.push(m);
        report.error_count = 1;
        (report, None)
    };
    match check(path, &ZipLimits::default()) {
        Ok(r) => {
            report.examples = r.clips as u64;
            if (r.clips as u64) < min_examples {
                let m = format!(
                    "the archive has {} clip(s); at least {min_examples} are required",
                    r.clips
                );
                return fail(report, m);
            }
            let mut d = format!(
                "audio_transcripts ({}): {} clip(s), {:.1} s of audio",
                r.layout, r.clips, r.seconds
            );
            if !r.ignored.is_empty() {
                let shown: Vec<&str> = r.ignored.iter().take(10).map(String::as_str).collect();
                d.push_str(&format!("; not read: {}", shown.join(", ")));
                if r.ignored.len() > shown.len() {
                    d.push_str(&format!(" and {} more", r.ignored.len() - shown.len()));
                }
            }
            (report, Some(d))
        }
        Err(e) => fail(report, without_temp_name(path, e.to_string())),
    }
}

/// Checks an ImageFolder zip (`label/name.png`): every image decodes or is listed, at
/// least two classes.
fn check_class_zip(
    path: &std::path::Path,
    min_examples: u64,
) -> (ValidationReport, Option<String>) {
    use loraforge_trainer::families::diffusion::dataset::ZipLimits;
    use loraforge_trainer::families::vision::dataset::read_labelled_zip;
    let mut report = ValidationReport {
        format: Some(data::DataFormat::ImageClasses),
        ..Default::default()
    };
    let limits = ZipLimits {
        shrink_to: Some(8),
        ..ZipLimits::default()
    };
    let fail = |mut report: ValidationReport, m: String| {
        report.errors.push(m);
        report.error_count = 1;
        (report, None)
    };
    // The report needs no pixels beyond the shrunk ones the limits keep.
    match read_labelled_zip(path, &limits, &|img| Ok(img.clone())) {
        Ok(ds) => {
            let r = &ds.report;
            report.examples = r.images as u64;
            if r.per_label.len() < 2 {
                return fail(
                    report,
                    "the archive has one class folder; image classification needs at least two"
                        .into(),
                );
            }
            if (r.images as u64) < min_examples {
                let m = format!(
                    "the archive has {} image(s); at least {min_examples} are required",
                    r.images
                );
                return fail(report, m);
            }
            let classes: Vec<String> = r
                .per_label
                .iter()
                .map(|(l, n)| format!("{l} {n}"))
                .collect();
            let mut d = format!(
                "image_classes: {} image(s) in {} classes: {}",
                r.images,
                r.per_label.len(),
                classes.join(", ")
            );
            d.push_str(&undecodable_note(&r.undecodable));
            (report, Some(d))
        }
        Err(e) => fail(report, without_temp_name(path, e.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the upload exceeds {0} bytes")]
    TooLarge(u64),
    /// The client's body failed (disconnect, malformed multipart).
    #[error("reading the upload: {0}")]
    Body(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] loraforge_store::Error),
}

/// Feeds the validator from a channel of chunks; end of channel = end of file.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Tracks line numbers and the length of the current line across chunks.
#[derive(Default)]
struct LineTracker {
    /// Newlines seen so far.
    newlines: u64,
    /// Bytes of the current, unfinished line.
    current: u64,
}

impl LineTracker {
    /// Returns the number of the first line that grows past the limit, if any.
    fn feed(&mut self, chunk: &[u8]) -> Option<u64> {
        match memchr::memchr(b'\n', chunk) {
            None => {
                self.current += chunk.len() as u64;
                (self.current > MAX_LINE_BYTES).then_some(self.newlines + 1)
            }
            Some(first) => {
                if self.current + first as u64 > MAX_LINE_BYTES {
                    return Some(self.newlines + 1);
                }
                // Lines wholly inside one chunk are shorter than the chunk, which
                // hyper and multer keep far below the limit.
                self.newlines += memchr::memchr_iter(b'\n', chunk).count() as u64;
                let last = memchr::memrchr(b'\n', chunk).unwrap_or(first);
                self.current = (chunk.len() - last - 1) as u64;
                None
            }
        }
    }
}

/// How much of an over-cap body is read and discarded before answering 413, and for how
/// long at most: enough for the client to get the answer instead of a reset, bounded so
/// that a refused upload costs little.
const LINGER_BYTES: u64 = 64 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards what is left of a multipart body, within [`LINGER_BYTES`] and
/// [`LINGER_TIME`], so that an early answer reaches a client that is still sending.
pub async fn linger(multipart: &mut axum::extract::Multipart) {
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut discarded = 0u64;
    while discarded < LINGER_BYTES {
        let Ok(Ok(Some(mut field))) =
            tokio::time::timeout_at(deadline, multipart.next_field()).await
        else {
            return;
        };
        while discarded < LINGER_BYTES {
            match tokio::time::timeout_at(deadline, field.chunk()).await {
                Ok(Ok(Some(c))) => discarded += c.len() as u64,
                _ => break,
            }
        }
    }
}

/// A request body cut off at `cap` bytes: past it, `over` is set and the stream ends with
/// a `TooLarge` error. Closing the connection on a client that is still sending would
/// hand it a reset instead of the 413, so the rest of the body is first read and
/// discarded, within [`LINGER_BYTES`] and [`LINGER_TIME`].
///
/// A body that sends nothing for `idle` (a stalled or slowloris upload) ends with an
/// error, so its handler returns and its temp file goes (zero: no limit).
pub fn capped<S>(
    body: S,
    cap: u64,
    over: std::sync::Arc<std::sync::atomic::AtomicBool>,
    idle: std::time::Duration,
) -> impl Stream<Item = Result<Bytes, axum::Error>> + Send
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Send + 'static,
{
    futures::stream::unfold((Box::pin(body), 0u64, false), move |(mut b, seen, done)| {
        let over = over.clone();
        async move {
            if done {
                return None;
            }
            let next = if idle.is_zero() {
                b.next().await
            } else {
                match tokio::time::timeout(idle, b.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        let e = axum::Error::new(ReceiveError::Body(format!(
                            "no data for {} s; the upload was dropped",
                            idle.as_secs()
                        )));
                        return Some((Err(e), (b, seen, true)));
                    }
                }
            };
            match next? {
                Err(e) => Some((Err(e), (b, seen, true))),
                Ok(c) if seen + c.len() as u64 > cap => {
                    over.store(true, std::sync::atomic::Ordering::SeqCst);
                    let deadline = tokio::time::Instant::now() + LINGER_TIME;
                    let mut discarded = 0u64;
                    while discarded < LINGER_BYTES {
                        match tokio::time::timeout_at(deadline, b.next()).await {
                            Ok(Some(Ok(c))) => discarded += c.len() as u64,
                            _ => break,
                        }
                    }
                    let e = axum::Error::new(ReceiveError::TooLarge(cap));
                    Some((Err(e), (b, seen, true)))
                }
                Ok(c) => {
                    let n = seen + c.len() as u64;
                    Some((Ok(c), (b, n, false)))
                }
            }
        }
    })
}

/// Streams `body` into a new temp upload, enforcing `cap`, hashing and validating.
pub async fn receive<S, E>(
    blobs: &BlobStore,
    body: S,
    cap: u64,
    min_examples: u64,
) -> Result<Received, ReceiveError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let upload = blobs.new_upload()?;
    let file = tokio::fs::File::from_std(upload.handle()?);
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut lines = LineTracker::default();
    let mut overlong: Option<u64> = None;
    let mut zip: Option<bool> = None;

    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let mut tx = Some(tx);
    let validator = tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::with_capacity(
            256 << 10,
            ChannelReader {
                rx,
                cur: Bytes::new(),
            },
        );
        data::validate(reader, min_examples)
    });

    futures::pin_mut!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ReceiveError::Body(e.to_string()))?;
        total += chunk.len() as u64;
        if total > cap {
            // Dropping `upload` on return removes the temp file.
            return Err(ReceiveError::TooLarge(cap));
        }
        hasher.update(&chunk);
        if zip.is_none() && !chunk.is_empty() {
            let z = is_zip(&chunk);
            zip = Some(z);
            if z {
                tx = None; // not JSONL: the line validator is not fed
            }
        }
        if zip != Some(true) && overlong.is_none() {
            overlong = lines.feed(&chunk);
            if overlong.is_some() {
                tx = None; // the validator sees the end and stops
            }
        }
        if let Some(t) = &tx {
            // A closed channel means the validator is gone; its result says why.
            if t.send(chunk.clone()).await.is_err() {
                tx = None;
            }
        }
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    drop(tx);
    let mut report = validator
        .await
        .map_err(|e| ReceiveError::Io(std::io::Error::other(e)))??;
    if zip == Some(true) {
        out.into_inner().sync_all().await?;
        let path = upload.path().to_path_buf();
        let (report, details) =
            tokio::task::spawn_blocking(move || check_image_zip(&path, min_examples))
                .await
                .map_err(|e| ReceiveError::Io(std::io::Error::other(e)))?;
        return Ok(Received {
            upload,
            bytes: total,
            sha256: hex::encode(hasher.finalize()),
            report,
            details,
        });
    }
    if let Some(line) = overlong {
        // What the validator saw of the long line is a truncated fragment: drop
        // whatever it made of it and name the real problem.
        report
            .errors
            .retain(|e| line_number(e).is_some_and(|n| n < line));
        report.errors.push(format!(
            "line {line}: longer than {MAX_LINE_BYTES} bytes; validation stopped here"
        ));
        report.error_count = report.errors.len() as u64;
    }
    Ok(Received {
        upload,
        bytes: total,
        sha256: hex::encode(hasher.finalize()),
        report,
        details: None,
    })
}

fn line_number(msg: &str) -> Option<u64> {
    msg.strip_prefix("line ")?.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_tracker_finds_overlong_lines_across_chunks() {
        let mut t = LineTracker::default();
        assert_eq!(t.feed(b"{}\n{}\n{"), None);
        assert_eq!((t.newlines, t.current), (2, 1));
        let big = vec![b'x'; MAX_LINE_BYTES as usize];
        assert_eq!(t.feed(&big), Some(3));
        let mut t = LineTracker::default();
        assert_eq!(t.feed(&big), None);
        assert_eq!(t.feed(b"\n"), None);
        assert_eq!(t.feed(b"ab"), None);
        assert_eq!(t.current, 2);
    }

    #[test]
    fn parses_line_numbers() {
        assert_eq!(line_number("line 7: bad"), Some(7));
        assert_eq!(line_number("the file has 0 example(s)"), None);
    }
}
