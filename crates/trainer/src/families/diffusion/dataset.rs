//! Image datasets for Stable Diffusion LoRA: a captioned image zip, read safely, decoded
//! upright into RGB, and turned into the `[-1, 1]` CHW pixels the VAE encoder takes.
//!
//! An upload is an untrusted archive, so [`read_zip`] treats it as hostile: every entry
//! name and every size the central directory declares is checked *before* anything is
//! decompressed (no `..`, no absolute paths or drive letters, no NUL; entry count, total
//! and per-entry size, compression ratio), and while decompressing, each entry is read
//! through a reader that stops one byte past its declared size, because the declared
//! sizes are only claims: an entry that inflates past them is rejected as soon as it
//! does, so a zip bomb costs at most the (already capped) declared sizes in memory.
//! Nothing is ever written to disk.
//!
//! Three layouts are recognised, in this order (doc section 6.2):
//!
//! 1. **diffusers imagefolder**: a `metadata.jsonl` anywhere (usually `train/`), one
//!    `{"file_name": ..., "text": ...}` object per line, `file_name` relative to the
//!    jsonl's folder; `caption` is accepted for `text`.
//! 2. **kohya DreamBooth**: images in folders named `<repeats>_<class tokens>`, e.g.
//!    `10_sks dog/`; captions from a same-stem `.txt` (preferred) or `.caption`, falling
//!    back to the class tokens. Images in folders without the numeric prefix are skipped,
//!    as kohya does, and listed in the report's `ignored`.
//! 3. **flat**: images anywhere with same-stem `.txt` / `.caption` files.
//!
//! An image with no caption at all (flat, or imagefolder without a line or text for it)
//! is kept with an empty caption and listed in [`DatasetReport::missing_captions`]:
//! that is kohya's behaviour ("neither caption file nor class tokens are found. use
//! empty caption"); the server may then substitute a trigger word or refuse the upload.
//! Images that do not decode are reported rather than fatal, unless none decodes.
//!
//! For training, [`to_pixels`] gives diffusers' square resize-and-crop; kohya's
//! aspect-ratio buckets are [`make_bucket_resolutions`], [`select_bucket`] and
//! [`to_bucket_pixels`] (doc section 6.3).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Cursor, Read};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, RgbImage};
use serde::Serialize;

use crate::{Error, Result};

/// Caps on what an uploaded zip may declare and produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipLimits {
    /// Entries in the central directory, directories included.
    pub max_entries: usize,
    /// Sum of all entries' uncompressed sizes.
    pub max_total_uncompressed_bytes: u64,
    /// Uncompressed size of any one entry.
    pub max_entry_uncompressed_bytes: u64,
    /// Decoded width x height of any one image.
    pub max_image_pixels: u64,
    /// Uncompressed / compressed size of an entry; only checked for entries over
    /// [`RATIO_CHECK_MIN_BYTES`], since tiny files (an empty caption, a flat-colour PNG
    /// stored deflated) legitimately reach high ratios and cannot be bombs.
    pub max_compression_ratio: u64,
    /// Shrinks every decoded image right away so that its short side is at most this,
    /// as [`to_pixels`] would: a dataset of large photos (or of small files that decode
    /// to huge flat images) then holds only training-sized pictures. `None` keeps them.
    pub shrink_to: Option<u32>,
}

/// The most repeats a kohya folder may ask for. kohya's own examples use 1-100; a folder
/// named `4294967295_x` would make an epoch of four billion rows out of one image.
pub const MAX_REPEATS: u32 = 10_000;

/// The most rows (images times their repeats) one epoch of a zip may have.
pub const MAX_EPOCH_ROWS: u64 = 1_000_000;

/// Entries smaller than this are exempt from the compression-ratio check.
pub const RATIO_CHECK_MIN_BYTES: u64 = 1 << 20;

impl Default for ZipLimits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_total_uncompressed_bytes: 4 << 30,
            max_entry_uncompressed_bytes: 64 << 20,
            max_image_pixels: 64_000_000,
            max_compression_ratio: 200,
            shrink_to: None,
        }
    }
}

/// Which convention the archive follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `<repeats>_<class tokens>/image.ext` folders.
    Kohya,
    /// diffusers `imagefolder` with `metadata.jsonl`.
    ImageFolder,
    /// Images with same-stem caption files.
    Flat,
}

/// One decoded, captioned image.
#[derive(Debug, Clone)]
pub struct ImageExample {
    /// Path inside the zip.
    pub name: String,
    pub caption: String,
    /// Times the image is seen per epoch (kohya folder prefix; 1 otherwise).
    pub repeats: u32,
    /// Upright (EXIF applied), alpha flattened onto white.
    pub image: RgbImage,
}

/// What the import found, for the upload's response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DatasetReport {
    /// Images that decoded (the examples).
    pub images: usize,
    /// Of those, how many had a caption (file, metadata line or kohya class tokens).
    pub with_caption: usize,
    /// Decoded images that got an empty caption.
    pub missing_captions: Vec<String>,
    /// `(entry, error)` for image entries that did not decode.
    pub undecodable: Vec<(String, String)>,
    /// Entries that were not read: `__MACOSX/`, dotfiles, other file types, images
    /// outside the layout (kohya folders without a repeat count, files no
    /// `metadata.jsonl` covers).
    pub ignored: Vec<String>,
    /// Samples per epoch: the sum of the examples' repeats.
    pub total_repeats: u64,
}

/// A decoded dataset.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    pub layout: Layout,
    /// Sorted by entry name.
    pub examples: Vec<ImageExample>,
    pub report: DatasetReport,
}

fn data(msg: String) -> Error {
    Error::Data(msg)
}

/// Why an entry name is unsafe, if it is.
fn unsafe_name(raw: &[u8], name: &str) -> Option<&'static str> {
    if raw.contains(&0) || name.contains('\0') {
        return Some("name contains NUL");
    }
    if name.starts_with('/') || name.starts_with('\\') {
        return Some("absolute path");
    }
    let b = name.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return Some("absolute path (drive letter)");
    }
    // Both separators: a zip written on Windows may use `\`, and an extractor there would
    // honour it.
    if name.split(['/', '\\']).any(|c| c == "..") {
        return Some("path escapes the archive");
    }
    None
}

fn is_image(name: &str) -> bool {
    matches!(ext(name).as_deref(), Some("png" | "jpg" | "jpeg"))
}

fn ext(name: &str) -> Option<String> {
    let file = name.rsplit('/').next().unwrap_or(name);
    file.rsplit_once('.')
        .filter(|(stem, _)| !stem.is_empty())
        .map(|(_, e)| e.to_ascii_lowercase())
}

/// `dir/stem` of `dir/stem.ext`.
fn stem_path(name: &str) -> &str {
    match name.rfind('.') {
        Some(i) if i > name.rfind('/').map_or(0, |s| s + 1) => &name[..i],
        _ => name,
    }
}

fn parent(name: &str) -> &str {
    name.rfind('/').map_or("", |i| &name[..i])
}

/// `(repeats, class tokens)` of a kohya folder name like `10_sks dog`.
fn kohya_folder(dir: &str) -> Option<(u32, String)> {
    let last = dir.rsplit('/').next()?;
    let (n, tokens) = last.split_once('_')?;
    if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let repeats: u32 = n.parse().ok()?;
    // kohya treats `0_x` as an error; a zero-repeat folder would silently contribute
    // nothing, so it is not a kohya folder here either.
    (repeats > 0).then(|| (repeats, tokens.trim().to_string()))
}

/// Caption text: UTF-8 required, BOM stripped, trimmed (the fixtures end in newlines).
fn caption_text(zip_name: &str, entry: &str, bytes: &[u8]) -> Result<String> {
    let s = std::str::from_utf8(bytes).map_err(|_| {
        data(format!(
            "{zip_name}: entry \"{entry}\": caption is not UTF-8"
        ))
    })?;
    Ok(s.trim_start_matches('\u{feff}').trim().to_string())
}

/// Reads an entry, failing once it produces more than `declared` bytes or pushes the
/// archive's running total past the limit; memory is bounded by the declared size,
/// which was checked against the limits before any decompression.
fn read_bounded<R: Read>(
    mut entry: R,
    zip_name: &str,
    name: &str,
    declared: u64,
    total: &mut u64,
    limits: &ZipLimits,
) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(usize::try_from(declared).unwrap_or(0).min(1 << 20));
    let cap = declared.saturating_add(1);
    (&mut entry)
        .take(cap)
        .read_to_end(&mut buf)
        .map_err(|e| data(format!("{zip_name}: entry \"{name}\": {e}")))?;
    let got = buf.len() as u64;
    if got > declared {
        return Err(data(format!(
            "{zip_name}: entry \"{name}\": inflates past its declared size of {declared} bytes \
             (corrupt or a zip bomb)"
        )));
    }
    *total += got;
    if *total > limits.max_total_uncompressed_bytes {
        return Err(data(format!(
            "{zip_name}: entry \"{name}\": archive exceeds max_total_uncompressed_bytes ({})",
            limits.max_total_uncompressed_bytes
        )));
    }
    Ok(buf)
}

struct Entry {
    name: String,
    index: usize,
    size: u64,
}

/// Reads a captioned image zip (see the module docs for the layouts and the checks).
pub fn read_zip(path: &Path, limits: &ZipLimits) -> Result<ImageDataset> {
    let zip_name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| data(format!("{zip_name}: not a readable zip: {e}")))?;
    if archive.len() > limits.max_entries {
        return Err(data(format!(
            "{zip_name}: {} entries exceed max_entries ({})",
            archive.len(),
            limits.max_entries
        )));
    }

    // Pass 1: names and declared sizes only (by_index_raw decompresses nothing).
    let mut files: Vec<Entry> = Vec::new();
    let mut ignored = Vec::new();
    let mut declared_total: u64 = 0;
    for index in 0..archive.len() {
        let e = archive
            .by_index_raw(index)
            .map_err(|e| data(format!("{zip_name}: entry #{index}: {e}")))?;
        let name = e.name().to_string();
        if let Some(why) = unsafe_name(e.name_raw(), &name) {
            return Err(data(format!("{zip_name}: entry \"{name}\": {why}")));
        }
        let (size, packed) = (e.size(), e.compressed_size());
        if size > limits.max_entry_uncompressed_bytes {
            return Err(data(format!(
                "{zip_name}: entry \"{name}\": declared size {size} exceeds \
                 max_entry_uncompressed_bytes ({})",
                limits.max_entry_uncompressed_bytes
            )));
        }
        if size >= RATIO_CHECK_MIN_BYTES && size / packed.max(1) > limits.max_compression_ratio {
            return Err(data(format!(
                "{zip_name}: entry \"{name}\": compression ratio {} exceeds \
                 max_compression_ratio ({})",
                size / packed.max(1),
                limits.max_compression_ratio
            )));
        }
        declared_total = declared_total.saturating_add(size);
        if declared_total > limits.max_total_uncompressed_bytes {
            return Err(data(format!(
                "{zip_name}: entry \"{name}\": declared sizes exceed \
                 max_total_uncompressed_bytes ({})",
                limits.max_total_uncompressed_bytes
            )));
        }
        if e.is_dir() || name.ends_with('/') || name.ends_with('\\') {
            continue;
        }
        let hidden = name
            .split('/')
            .any(|c| c == "__MACOSX" || c.starts_with('.'));
        if hidden {
            ignored.push(name);
            continue;
        }
        files.push(Entry { name, index, size });
    }
    let by_name: BTreeMap<&str, &Entry> = files.iter().map(|e| (e.name.as_str(), e)).collect();

    // Pass 2: decide the layout and which entries to read, still without decompressing.
    let metadata: Vec<&Entry> = files
        .iter()
        .filter(|e| e.name.rsplit('/').next() == Some("metadata.jsonl"))
        .collect();
    let images: Vec<&Entry> = files.iter().filter(|e| is_image(&e.name)).collect();
    let layout = if !metadata.is_empty() {
        Layout::ImageFolder
    } else if images
        .iter()
        .any(|e| kohya_folder(parent(&e.name)).is_some())
    {
        Layout::Kohya
    } else {
        Layout::Flat
    };

    let mut total_read: u64 = 0;
    let read = |archive: &mut zip::ZipArchive<_>, e: &Entry, total: &mut u64| {
        let entry = archive
            .by_index(e.index)
            .map_err(|err| data(format!("{zip_name}: entry \"{}\": {err}", e.name)))?;
        read_bounded(entry, &zip_name, &e.name, e.size, total, limits)
    };

    // (image entry, caption or None, repeats)
    let mut plan: Vec<(&Entry, Option<String>, u32)> = Vec::new();
    match layout {
        Layout::ImageFolder => {
            let mut listed: BTreeMap<String, Option<String>> = BTreeMap::new();
            for m in &metadata {
                let bytes = read(&mut archive, m, &mut total_read)?;
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| data(format!("{zip_name}: entry \"{}\": not UTF-8", m.name)))?;
                let dir = parent(&m.name);
                for (i, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
                    let at =
                        |why: String| data(format!("{zip_name}: {} line {}: {why}", m.name, i + 1));
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: serde_json::Value =
                        serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
                    let file_name = v
                        .get("file_name")
                        .and_then(|f| f.as_str())
                        .ok_or_else(|| at("no string \"file_name\"".into()))?;
                    if let Some(why) = unsafe_name(file_name.as_bytes(), file_name) {
                        return Err(at(format!("file_name \"{file_name}\": {why}")));
                    }
                    let full = if dir.is_empty() {
                        file_name.to_string()
                    } else {
                        format!("{dir}/{file_name}")
                    };
                    if !by_name.contains_key(full.as_str()) {
                        return Err(at(format!(
                            "file_name \"{file_name}\" is not in the archive"
                        )));
                    }
                    let caption = v
                        .get("text")
                        .or_else(|| v.get("caption"))
                        .and_then(|t| t.as_str())
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty());
                    listed.insert(full, caption);
                }
            }
            let dirs: Vec<&str> = metadata.iter().map(|m| parent(&m.name)).collect();
            let covered = |name: &str| {
                dirs.iter()
                    .any(|d| d.is_empty() || name.starts_with(&format!("{d}/")))
            };
            for e in &images {
                match listed.get(&e.name) {
                    Some(c) => plan.push((e, c.clone(), 1)),
                    // Under a metadata folder but without a line: kept, caption missing.
                    None if covered(&e.name) => plan.push((e, None, 1)),
                    None => ignored.push(e.name.clone()),
                }
            }
        }
        Layout::Kohya | Layout::Flat => {
            for e in &images {
                let folder = kohya_folder(parent(&e.name));
                if layout == Layout::Kohya && folder.is_none() {
                    ignored.push(e.name.clone());
                    continue;
                }
                let stem = stem_path(&e.name);
                let cap_entry = [".txt", ".caption"]
                    .iter()
                    .find_map(|x| by_name.get(format!("{stem}{x}").as_str()).copied());
                let mut caption = match cap_entry {
                    Some(c) => {
                        let bytes = read(&mut archive, c, &mut total_read)?;
                        Some(caption_text(&zip_name, &c.name, &bytes)?).filter(|t| !t.is_empty())
                    }
                    None => None,
                };
                let mut repeats = 1;
                if let Some((n, tokens)) = folder.filter(|_| layout == Layout::Kohya) {
                    if n > MAX_REPEATS {
                        return Err(data(format!(
                            "{zip_name}: {}: {n} repeats; a folder may ask for at most {MAX_REPEATS}",
                            parent(&e.name)
                        )));
                    }
                    repeats = n;
                    if caption.is_none() && !tokens.is_empty() {
                        caption = Some(tokens);
                    }
                }
                plan.push((e, caption, repeats));
            }
        }
    }

    let used: BTreeSet<&str> = plan.iter().map(|(e, _, _)| stem_path(&e.name)).collect();
    for e in &files {
        let is_caption = matches!(ext(&e.name).as_deref(), Some("txt" | "caption"))
            && used.contains(stem_path(&e.name));
        let is_meta = layout == Layout::ImageFolder && metadata.iter().any(|m| m.index == e.index);
        if !is_image(&e.name) && !is_caption && !is_meta {
            ignored.push(e.name.clone());
        }
    }

    let mut report = DatasetReport::default();
    let mut examples = Vec::new();
    for (e, caption, repeats) in plan {
        let bytes = read(&mut archive, e, &mut total_read)?;
        match decode_image(&bytes, &e.name, limits) {
            Ok(image) => {
                let image = match limits.shrink_to {
                    Some(s) if image.width().min(image.height()) > s => {
                        let (nw, nh) = short_side_dims(image.width(), image.height(), s);
                        image::imageops::resize(
                            &image,
                            nw,
                            nh,
                            image::imageops::FilterType::Triangle,
                        )
                    }
                    _ => image,
                };
                match &caption {
                    Some(_) => report.with_caption += 1,
                    None => report.missing_captions.push(e.name.clone()),
                }
                report.total_repeats += u64::from(repeats);
                if report.total_repeats > MAX_EPOCH_ROWS {
                    return Err(data(format!(
                        "{zip_name}: the images' repeats add up to more than {MAX_EPOCH_ROWS} rows per epoch (at {})",
                        e.name
                    )));
                }
                examples.push(ImageExample {
                    name: e.name.clone(),
                    caption: caption.unwrap_or_default(),
                    repeats,
                    image,
                });
            }
            // decode_image's messages already name the entry; keep them without the
            // variant's "data: " prefix.
            Err(Error::Data(msg)) => report.undecodable.push((e.name.clone(), msg)),
            Err(err) => report.undecodable.push((e.name.clone(), err.to_string())),
        }
    }
    if examples.is_empty() {
        let why = match report.undecodable.first() {
            Some((_, err)) => format!("no image decodes (first failure: {err})"),
            None => "no png/jpg images found".to_string(),
        };
        return Err(data(format!("{zip_name}: {why}")));
    }
    examples.sort_by(|a, b| a.name.cmp(&b.name));
    report.images = examples.len();
    report.missing_captions.sort();
    report.undecodable.sort();
    ignored.sort();
    report.ignored = ignored;
    Ok(ImageDataset {
        layout,
        examples,
        report,
    })
}

/// Decodes a PNG or JPEG (format sniffed from the bytes, not the name), applies its EXIF
/// orientation and converts it to RGB8 with any alpha composited onto white, which is
/// what a transparent background looks like in every viewer (kohya drops alpha instead,
/// turning transparent areas into whatever colour the encoder left there, often black).
/// The size of a `w`×`h` image resized so that its short side is `res` (the long side
/// truncated, as torchvision's `Resize(int)` does).
fn short_side_dims(w: u32, h: u32, res: u32) -> (u32, u32) {
    let (nw, nh) = if w <= h {
        (
            res,
            ((u64::from(res) * u64::from(h)) / u64::from(w.max(1))) as u32,
        )
    } else {
        (
            ((u64::from(res) * u64::from(w)) / u64::from(h.max(1))) as u32,
            res,
        )
    };
    (nw.max(res), nh.max(res))
}

pub fn decode_image(bytes: &[u8], name: &str, limits: &ZipLimits) -> Result<RgbImage> {
    let fail = |why: String| data(format!("{name}: {why}"));
    let side = u32::try_from(limits.max_image_pixels).unwrap_or(u32::MAX);
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(side);
    lim.max_image_height = Some(side);
    // 8 bytes a pixel covers 16-bit RGBA output; never below image's own 512 MiB default.
    lim.max_alloc = Some(limits.max_image_pixels.saturating_mul(8).max(512 << 20));
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    reader.limits(lim);
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > limits.max_image_pixels {
        return Err(fail(format!(
            "{w}x{h} exceeds max_image_pixels ({})",
            limits.max_image_pixels
        )));
    }
    let orientation = decoder.orientation().map_err(|e| fail(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    img.apply_orientation(orientation);
    if !img.color().has_alpha() {
        return Ok(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            let v = (u32::from(p[c]) * a + 255 * (255 - a) + 127) / 255;
            o[c] = v as u8;
        }
    }
    Ok(out)
}

/// The VAE input for one image, as diffusers' `train_text_to_image.py` builds it:
/// resize so the short side is `resolution` (bilinear: image's Triangle filter; the
/// long side is truncated like torchvision's `Resize`), crop to `resolution` square,
/// and scale to `[-1, 1]` as `(x / 255 - 0.5) / 0.5`, laid out CHW (3 x res x res).
///
/// The crop is always centred, matching `--center_crop`; diffusers' default is a random
/// crop, which belongs in the training loop's augmentation, not here. `center_crop =
/// false` takes the top-left crop instead, a deterministic stand-in for "not centred".
pub fn to_pixels(img: &RgbImage, resolution: u32, center_crop: bool) -> Vec<f32> {
    let res = resolution.max(1);
    let (w, h) = img.dimensions();
    let (nw, nh) = short_side_dims(w, h, res);
    let resized;
    let src = if (nw, nh) == (w, h) {
        img
    } else {
        resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
        &resized
    };
    // torchvision CenterCrop: offset = round((size - crop) / 2).
    let (x0, y0) = if center_crop {
        (center_offset(nw, res), center_offset(nh, res))
    } else {
        (0, 0)
    };
    crop_normalize(src, x0, y0, res, res)
}

fn center_offset(size: u32, crop: u32) -> u32 {
    // Python's round(), as torchvision's centre crop uses: ties to even.
    (f64::from(size.saturating_sub(crop)) / 2.0).round_ties_even() as u32
}

/// The `w` x `h` window at `(x0, y0)` as CHW f32 in `[-1, 1]`; the caller guarantees
/// the window lies inside `src`.
fn crop_normalize(src: &RgbImage, x0: u32, y0: u32, w: u32, h: u32) -> Vec<f32> {
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for y in 0..h {
        for x in 0..w {
            let p = src.get_pixel(x0 + x, y0 + y);
            let i = (y * w + x) as usize;
            for c in 0..3 {
                out[c * n + i] = (f32::from(p[c]) / 255.0 - 0.5) / 0.5;
            }
        }
    }
    out
}

/// kohya's aspect-ratio buckets (`model_util.make_bucket_resolutions`): the square
/// bucket of `max_reso`'s area, then for every width from `min_size` to `max_size` in
/// `divisible` steps the tallest height (multiple of `divisible`, at most `max_size`)
/// within that area, and its transpose. Sorted `(width, height)`, no duplicates.
/// kohya's defaults are `min_size` 256, `max_size` 1024, `divisible` 64.
pub fn make_bucket_resolutions(
    max_reso: (u32, u32),
    min_size: u32,
    max_size: u32,
    divisible: u32,
) -> Vec<(u32, u32)> {
    let d = u64::from(divisible.max(1));
    let area = u64::from(max_reso.0) * u64::from(max_reso.1);
    let mut out = BTreeSet::new();
    let side = ((area as f64).sqrt() as u64 / d * d) as u32;
    out.insert((side, side));
    let mut width = u64::from(min_size);
    while width <= u64::from(max_size) {
        let height = (area / width.max(1) / d * d).min(u64::from(max_size)) as u32;
        if height >= min_size {
            out.insert((width as u32, height));
            out.insert((height, width as u32));
        }
        width += d;
    }
    out.into_iter().collect()
}

/// kohya's `BucketManager.select_bucket` (without `bucket_no_upscale`): the bucket whose
/// aspect ratio is closest to the image's (the first on ties), and the size to resize
/// the image to so that it covers the bucket, each side rounded half up. Returns
/// `(bucket, resized)`; `None` only when `buckets` is empty or the image has no pixels.
pub fn select_bucket(
    buckets: &[(u32, u32)],
    width: u32,
    height: u32,
) -> Option<((u32, u32), (u32, u32))> {
    if width == 0 || height == 0 {
        return None;
    }
    let ar = f64::from(width) / f64::from(height);
    let mut best: Option<((u32, u32), f64)> = None;
    for &(bw, bh) in buckets {
        let err = (f64::from(bw) / f64::from(bh.max(1)) - ar).abs();
        if best.is_none_or(|(_, e)| err < e) {
            best = Some(((bw, bh), err));
        }
    }
    let ((bw, bh), _) = best?;
    let scale = if ar > f64::from(bw) / f64::from(bh.max(1)) {
        f64::from(bh) / f64::from(height)
    } else {
        f64::from(bw) / f64::from(width)
    };
    let resized = (
        ((f64::from(width) * scale + 0.5) as u32).max(bw),
        ((f64::from(height) * scale + 0.5) as u32).max(bh),
    );
    Some(((bw, bh), resized))
}

/// The VAE input for one image in its bucket: resize to `resized` (from
/// [`select_bucket`]), centre-crop to `bucket`, CHW in `[-1, 1]` (`3 x bh x bw`).
/// kohya resizes with OpenCV AREA / LANCZOS4; this uses Triangle either way, since
/// bit-exactness with Python is not a goal (doc 6.3).
pub fn to_bucket_pixels(img: &RgbImage, bucket: (u32, u32), resized: (u32, u32)) -> Vec<f32> {
    let (bw, bh) = (bucket.0.max(1), bucket.1.max(1));
    // Never smaller than the bucket, so the crop window always fits.
    let (rw, rh) = (resized.0.max(bw), resized.1.max(bh));
    let owned;
    let src = if img.dimensions() == (rw, rh) {
        img
    } else {
        owned = image::imageops::resize(img, rw, rh, image::imageops::FilterType::Triangle);
        &owned
    };
    // kohya trims `excess // 2` from the left/top (floor, unlike torchvision's round).
    crop_normalize(src, (rw - bw) / 2, (rh - bh) / 2, bw, bh)
}
