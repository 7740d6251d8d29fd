//! Speech data: a zip of clips and their transcripts, read through [`Archive`] with the
//! checks every uploaded zip gets. Two layouts:
//!
//! - HF `datasets`' `audiofolder`: a `metadata.jsonl` (`{"file_name": "a.wav",
//!   "transcription": "...", "language"?: "en"}` a line; `text` or `sentence` also name
//!   the transcript) or a `metadata.csv` with those columns; `file_name` is relative to
//!   the metadata file's folder. Clips the metadata does not name are listed, not read.
//! - flat pairs: `a.wav` beside `a.txt`, the text file holding the transcript.
//!
//! Clips are WAV or FLAC (see [`super::audio`]), at most 30 s (Whisper's window); each is
//! resampled to 16 kHz mono as it is decoded. Errors name the entry, or the metadata
//! line.

use super::audio::{decode, to_16k, MAX_SECONDS};
use crate::archive::{ext, parent, stem_path, Archive, Entry, ZipLimits};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The columns that may hold a transcript, in the order they are looked for.
pub const TEXT_COLUMNS: [&str; 3] = ["transcription", "text", "sentence"];

/// One clip and what is said in it.
#[derive(Debug, Clone)]
pub struct Utterance {
    /// The clip's path inside the zip.
    pub name: String,
    /// Mono samples at 16 kHz (none when only checked).
    pub samples: Vec<f32>,
    pub text: String,
    /// The metadata's `language`, when it gives one (a code such as `en`).
    pub language: Option<String>,
}

/// What the import found, for the upload's response.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AudioReport {
    /// `metadata.jsonl`, `metadata.csv` or `pairs`.
    pub layout: String,
    pub clips: usize,
    /// Total audio, in seconds.
    pub seconds: f64,
    /// Entries that were not read: clips no transcript names, other files, dotfiles.
    pub ignored: Vec<String>,
}

/// A decoded speech dataset, in the metadata's order (pairs: by entry name).
#[derive(Debug, Clone)]
pub struct Utterances {
    pub examples: Vec<Utterance>,
    pub report: AudioReport,
}

pub(crate) fn is_audio(name: &str) -> bool {
    ext(name).is_some_and(|e| super::audio::EXTENSIONS.contains(&e.as_str()))
}

fn file_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn is_metadata(name: &str) -> bool {
    matches!(file_name(name), "metadata.jsonl" | "metadata.csv")
}

/// Whether a zip holds speech by its names alone: WAV or FLAC clips, and a metadata file or a
/// `.txt` beside a clip; no images.
pub fn looks_like_speech(path: &Path, limits: &ZipLimits) -> bool {
    let Ok(a) = Archive::open(path, limits) else {
        return false;
    };
    let names: Vec<&str> = a.files.iter().map(|e| e.name.as_str()).collect();
    if !names.iter().any(|n| is_audio(n)) || names.iter().any(|n| crate::archive::is_image(n)) {
        return false;
    }
    let texts: HashSet<&str> = names
        .iter()
        .filter(|n| ext(n).as_deref() == Some("txt"))
        .map(|n| stem_path(n))
        .collect();
    names.iter().any(|n| is_metadata(n))
        || names
            .iter()
            .any(|n| is_audio(n) && texts.contains(&stem_path(n)))
}

/// One metadata row: its line (1-based, for messages) and its fields.
struct Row {
    line: usize,
    fields: HashMap<String, String>,
}

fn jsonl_rows(text: &str, what: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, l) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(l)
            .map_err(|e| Error::Data(format!("{what} line {}: not JSON: {e}", i + 1)))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Data(format!("{what} line {}: expected a JSON object", i + 1)))?;
        let fields = obj
            .iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k.clone(), s.clone())),
                serde_json::Value::Null => None,
                other => Some((k.clone(), other.to_string())),
            })
            .collect();
        rows.push(Row {
            line: i + 1,
            fields,
        });
    }
    Ok(rows)
}

/// RFC 4180 records: fields split on commas, double-quoted fields may hold commas,
/// newlines and `""` for a quote. Returns each record with the line it starts on.
fn csv_records(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let (mut rec, mut field) = (Vec::new(), String::new());
    let (mut quoted, mut line, mut start) = (false, 1usize, 1usize);
    let mut chars = text.trim_start_matches('\u{feff}').chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => rec.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                rec.push(std::mem::take(&mut field));
                if !(rec.len() == 1 && rec[0].is_empty()) {
                    out.push((start, std::mem::take(&mut rec)));
                }
                rec.clear();
                line += 1;
                start = line;
            }
            (_, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
        }
    }
    if !field.is_empty() || !rec.is_empty() {
        rec.push(field);
        out.push((start, rec));
    }
    out
}

fn csv_rows(text: &str, what: &str) -> Result<Vec<Row>> {
    let mut records = csv_records(text).into_iter();
    let Some((_, header)) = records.next() else {
        return Ok(Vec::new());
    };
    let header: Vec<String> = header.iter().map(|h| h.trim().to_string()).collect();
    records
        .map(|(line, r)| {
            if r.len() != header.len() {
                return Err(Error::Data(format!(
                    "{what} line {line}: {} fields, the header has {}",
                    r.len(),
                    header.len()
                )));
            }
            Ok(Row {
                line,
                fields: header.iter().cloned().zip(r).collect(),
            })
        })
        .collect()
}

/// Decodes one clip entry: its seconds, and (when kept) its samples at 16 kHz mono.
fn clip(archive: &mut Archive, e: &Entry, keep: bool) -> Result<(f64, Vec<f32>)> {
    let bytes = archive.read(e)?;
    let what = format!("{}: {}", archive.zip_name, e.name);
    let c = decode(&bytes, &what, MAX_SECONDS)?;
    if c.samples.is_empty() {
        return Err(Error::Data(format!("{what}: the clip has no samples")));
    }
    let seconds = c.seconds();
    Ok((seconds, if keep { to_16k(c)? } else { Vec::new() }))
}

/// Reads a speech zip (see the module docs).
pub fn read_speech_zip(path: &Path, limits: &ZipLimits) -> Result<Utterances> {
    read(path, limits, true)
}

/// Checks a speech zip as [`read_speech_zip`] reads it (every clip decoded), keeping
/// no samples: what an upload's check needs, in one clip's memory.
pub fn check_speech_zip(path: &Path, limits: &ZipLimits) -> Result<AudioReport> {
    read(path, limits, false).map(|u| u.report)
}

fn read(path: &Path, limits: &ZipLimits, keep: bool) -> Result<Utterances> {
    let mut archive = Archive::open(path, limits)?;
    let zip_name = archive.zip_name.clone();
    let files = std::mem::take(&mut archive.files);
    let mut ignored = std::mem::take(&mut archive.hidden);
    let by_name: HashMap<&str, &Entry> = files.iter().map(|e| (e.name.as_str(), e)).collect();
    let metadata: Vec<&Entry> = files.iter().filter(|e| is_metadata(&e.name)).collect();
    let mut examples = Vec::new();
    let mut seconds = 0f64;
    let layout;
    if let Some(meta) = metadata.first() {
        if metadata.len() > 1 {
            return Err(Error::Data(format!(
                "{zip_name}: {} metadata files ({}); a speech zip has one",
                metadata.len(),
                metadata
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let what = format!("{zip_name}: {}", meta.name);
        let bytes = archive.read(meta)?;
        let text =
            String::from_utf8(bytes).map_err(|_| Error::Data(format!("{what}: not UTF-8 text")))?;
        let csv = meta.name.ends_with(".csv");
        layout = file_name(&meta.name).to_string();
        let rows = if csv {
            csv_rows(&text, &what)?
        } else {
            jsonl_rows(&text, &what)?
        };
        let dir = parent(&meta.name);
        let mut used = HashSet::new();
        for row in rows {
            let at = format!("{what} line {}", row.line);
            let file = row.fields.get("file_name").ok_or_else(|| {
                Error::Data(format!(
                    "{at}: no \"file_name\" (the clip's path in the zip)"
                ))
            })?;
            let text = TEXT_COLUMNS
                .iter()
                .find_map(|c| row.fields.get(*c))
                .ok_or_else(|| {
                    Error::Data(format!(
                        "{at}: no transcript (a \"transcription\", \"text\" or \"sentence\" field)"
                    ))
                })?;
            let full = if dir.is_empty() {
                file.trim_start_matches("./").to_string()
            } else {
                format!("{dir}/{}", file.trim_start_matches("./"))
            };
            let entry = by_name.get(full.as_str()).copied().ok_or_else(|| {
                Error::Data(format!("{at}: file_name \"{file}\" is not in the zip"))
            })?;
            if !is_audio(&entry.name) {
                return Err(Error::Data(format!(
                    "{at}: \"{file}\" is not a WAV or FLAC clip (.wav, .flac)"
                )));
            }
            if !used.insert(entry.name.clone()) {
                return Err(Error::Data(format!(
                    "{at}: \"{file}\" is named a second time"
                )));
            }
            let (secs, samples) = clip(&mut archive, entry, keep)?;
            seconds += secs;
            examples.push(Utterance {
                name: entry.name.clone(),
                samples,
                text: text.trim().to_string(),
                language: row
                    .fields
                    .get("language")
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            });
        }
        for e in &files {
            if e.name != meta.name && !used.contains(&e.name) {
                ignored.push(e.name.clone());
            }
        }
    } else {
        layout = "pairs".to_string();
        let texts: HashMap<&str, &Entry> = files
            .iter()
            .filter(|e| ext(&e.name).as_deref() == Some("txt"))
            .map(|e| (stem_path(&e.name), e))
            .collect();
        let mut clips: Vec<&Entry> = files.iter().filter(|e| is_audio(&e.name)).collect();
        clips.sort_by(|a, b| a.name.cmp(&b.name));
        for e in &files {
            let paired = is_audio(&e.name) && texts.contains_key(stem_path(&e.name))
                || ext(&e.name).as_deref() == Some("txt")
                    && clips
                        .iter()
                        .any(|c| stem_path(&c.name) == stem_path(&e.name));
            if !paired && !is_audio(&e.name) {
                ignored.push(e.name.clone());
            }
        }
        for c in clips {
            let Some(t) = texts.get(stem_path(&c.name)) else {
                return Err(Error::Data(format!(
                    "{zip_name}: {}: no transcript: put it in {}.txt beside the clip, or list \
                     every clip in a metadata.jsonl (file_name, transcription)",
                    c.name,
                    stem_path(&c.name)
                )));
            };
            let bytes = archive.read(t)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::Data(format!("{zip_name}: {}: not UTF-8 text", t.name)))?;
            let (secs, samples) = clip(&mut archive, c, keep)?;
            seconds += secs;
            examples.push(Utterance {
                name: c.name.clone(),
                samples,
                text: text.trim().to_string(),
                language: None,
            });
        }
    }
    if examples.is_empty() {
        return Err(Error::Data(format!(
            "{zip_name}: no clips: a speech zip holds WAV or FLAC clips with a metadata.jsonl \
             (file_name, transcription) or a .txt transcript beside each clip"
        )));
    }
    if let Some(u) = examples.iter().find(|u| u.text.is_empty()) {
        return Err(Error::Data(format!(
            "{zip_name}: {}: the transcript is empty",
            u.name
        )));
    }
    ignored.sort();
    Ok(Utterances {
        report: AudioReport {
            layout,
            clips: examples.len(),
            seconds,
            ignored,
        },
        examples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A 16 kHz mono 16-bit WAV of `n` samples of a quiet ramp.
    pub(crate) fn wav(n: usize, rate: u32) -> Vec<u8> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut c = std::io::Cursor::new(Vec::new());
        let mut w = hound::WavWriter::new(&mut c, spec).unwrap();
        for i in 0..n {
            w.write_sample((i % 200) as i16 * 10).unwrap();
        }
        w.finalize().unwrap();
        c.into_inner()
    }

    fn zip(name: &str, entries: &[(&str, Vec<u8>)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lf-speech-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{name}.zip"));
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        for (n, b) in entries {
            z.start_file(*n, zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(b).unwrap();
        }
        z.finish().unwrap();
        p
    }

    fn read(p: &Path) -> Result<Utterances> {
        read_speech_zip(p, &ZipLimits::default())
    }

    #[test]
    fn audiofolder_jsonl_keeps_the_metadata_order_and_languages() {
        let meta = "{\"file_name\": \"b.wav\", \"transcription\": \" Second one. \"}\n\
                    {\"file_name\": \"a.wav\", \"text\": \"First\", \"language\": \"de\"}\n";
        let p = zip(
            "jsonl",
            &[
                ("data/a.wav", wav(1600, 16000)),
                ("data/b.wav", wav(3200, 16000)),
                ("data/c.wav", wav(100, 16000)),
                ("data/metadata.jsonl", meta.as_bytes().to_vec()),
            ],
        );
        assert!(looks_like_speech(&p, &ZipLimits::default()));
        let u = read(&p).unwrap();
        let names: Vec<&str> = u.examples.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["data/b.wav", "data/a.wav"]);
        assert_eq!(u.examples[0].text, "Second one.");
        assert_eq!(u.examples[1].language.as_deref(), Some("de"));
        assert_eq!(u.examples[0].samples.len(), 3200);
        assert_eq!(u.report.layout, "metadata.jsonl");
        assert_eq!(u.report.ignored, ["data/c.wav"]);
        assert!((u.report.seconds - 0.3).abs() < 1e-9);
        // The upload's check reads the same and keeps no samples.
        assert_eq!(
            check_speech_zip(&p, &ZipLimits::default()).unwrap(),
            u.report
        );
    }

    #[test]
    fn audiofolder_csv_takes_quoted_commas_and_resamples() {
        let meta = "file_name,transcription\n\"a.wav\",\"Left, then \"\"right\"\".\"\nb.wav,Stop\n";
        let p = zip(
            "csv",
            &[
                ("a.wav", wav(8000, 8000)),
                ("b.wav", wav(1600, 16000)),
                ("metadata.csv", meta.as_bytes().to_vec()),
            ],
        );
        let u = read(&p).unwrap();
        assert_eq!(u.examples[0].text, "Left, then \"right\".");
        assert_eq!(u.examples[1].text, "Stop");
        // One second at 8 kHz is one second at 16 kHz.
        let n = u.examples[0].samples.len();
        assert!((15_900..=16_100).contains(&n), "{n}");
    }

    #[test]
    fn flat_pairs_read_by_name_and_a_clip_without_text_is_named() {
        let flac = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/whisper-features/tone24.flac");
        let p = zip(
            "pairs",
            &[
                ("b.wav", wav(1600, 16000)),
                ("b.txt", b"bee\n".to_vec()),
                ("a.wav", wav(1600, 16000)),
                ("a.txt", b"ay".to_vec()),
                ("c.flac", std::fs::read(flac).unwrap()),
                ("c.txt", b"sea".to_vec()),
                ("notes.md", b"x".to_vec()),
            ],
        );
        assert!(looks_like_speech(&p, &ZipLimits::default()));
        let u = read(&p).unwrap();
        let texts: Vec<&str> = u.examples.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts, ["ay", "bee", "sea"]);
        // 0.25 s of 22.05 kHz stereo FLAC, mono at 16 kHz.
        assert!(
            (3_990..=4_010).contains(&u.examples[2].samples.len()),
            "{}",
            u.examples[2].samples.len()
        );
        assert_eq!(u.report.layout, "pairs");
        assert_eq!(u.report.ignored, ["notes.md"]);
        let p = zip(
            "unpaired",
            &[
                ("a.wav", wav(1600, 16000)),
                ("a.txt", b"ay".to_vec()),
                ("z.wav", wav(10, 16000)),
            ],
        );
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("z.wav: no transcript"), "{e}");
    }

    #[test]
    fn bad_metadata_and_clips_are_named() {
        let long = wav(16000 * 31, 16000);
        type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                "missing",
                vec![
                    ("a.wav", wav(10, 16000)),
                    (
                        "metadata.jsonl",
                        b"{\"file_name\": \"x.wav\", \"text\": \"t\"}\n".to_vec(),
                    ),
                ],
                "metadata.jsonl line 1: file_name \"x.wav\" is not in the zip",
            ),
            (
                "notext",
                vec![
                    ("a.wav", wav(10, 16000)),
                    ("metadata.jsonl", b"\n{\"file_name\": \"a.wav\"}\n".to_vec()),
                ],
                "metadata.jsonl line 2: no transcript",
            ),
            (
                "notjson",
                vec![
                    ("a.wav", wav(10, 16000)),
                    ("metadata.jsonl", b"{oops\n".to_vec()),
                ],
                "metadata.jsonl line 1: not JSON",
            ),
            (
                "long",
                vec![
                    ("a.wav", long),
                    (
                        "metadata.jsonl",
                        b"{\"file_name\": \"a.wav\", \"text\": \"t\"}\n".to_vec(),
                    ),
                ],
                "a.wav: 31.0 s long; at most 30 s is read (Whisper's window)",
            ),
            (
                "broken",
                vec![
                    ("a.wav", b"RIFF nonsense".to_vec()),
                    (
                        "metadata.jsonl",
                        b"{\"file_name\": \"a.wav\", \"text\": \"t\"}\n".to_vec(),
                    ),
                ],
                "a.wav:",
            ),
            (
                "empty",
                vec![("a.wav", wav(10, 16000)), ("a.txt", b"  ".to_vec())],
                "a.wav: the transcript is empty",
            ),
            (
                "lowrate",
                vec![("a.wav", wav(10, 1)), ("a.txt", b"hi".to_vec())],
                "a.wav: a sample rate of 1 Hz (read: 4000 to 384000 Hz)",
            ),
            (
                "csvwidth",
                vec![
                    ("a.wav", wav(10, 16000)),
                    ("metadata.csv", b"file_name,text\na.wav,x,y\n".to_vec()),
                ],
                "metadata.csv line 2: 3 fields, the header has 2",
            ),
        ];
        for (name, entries, want) in cases {
            let e = read(&zip(name, &entries)).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
    }

    #[test]
    fn csv_records_span_quoted_newlines() {
        let r = csv_records("a,b\n\"x\ny\",z\n\n1,2");
        assert_eq!(
            r,
            vec![
                (1, vec!["a".to_string(), "b".to_string()]),
                (2, vec!["x\ny".to_string(), "z".to_string()]),
                (5, vec!["1".to_string(), "2".to_string()]),
            ]
        );
    }
}
