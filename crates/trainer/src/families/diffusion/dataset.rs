//! Image datasets for Stable Diffusion LoRA: a captioned image zip, read safely, decoded
//! upright into RGB, and turned into the `[-1, 1]` CHW pixels the VAE encoder takes.
//!
//! An upload is an untrusted archive: [`read_zip`] reads it through
//! [`crate::archive::Archive`], which checks every entry before and while it is
//! decompressed and never writes anything to disk.
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
use std::path::Path;

use image::RgbImage;
use serde::Serialize;

pub use crate::archive::{decode_image, ZipLimits, RATIO_CHECK_MIN_BYTES};
use crate::archive::{
    ext, is_image, kohya_folder, no_images, parent, short_side_dims, stem_path, unsafe_name,
    Archive, Entry,
};
use crate::{Error, Result};

/// The most repeats a kohya folder may ask for. kohya's own examples use 1-100; a folder
/// named `4294967295_x` would make an epoch of four billion rows out of one image.
pub const MAX_REPEATS: u32 = 10_000;

/// The most rows (images times their repeats) one epoch of a zip may have.
pub const MAX_EPOCH_ROWS: u64 = 1_000_000;

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

/// Caption text: UTF-8 required, BOM stripped, trimmed (the fixtures end in newlines).
fn caption_text(zip_name: &str, entry: &str, bytes: &[u8]) -> Result<String> {
    let s = std::str::from_utf8(bytes).map_err(|_| {
        data(format!(
            "{zip_name}: entry \"{entry}\": caption is not UTF-8"
        ))
    })?;
    Ok(s.trim_start_matches('\u{feff}').trim().to_string())
}

/// Reads a captioned image zip (see the module docs for the layouts and the checks).
pub fn read_zip(path: &Path, limits: &ZipLimits) -> Result<ImageDataset> {
    let mut archive = Archive::open(path, limits)?;
    let zip_name = archive.zip_name.clone();
    let files = std::mem::take(&mut archive.files);
    let mut ignored = std::mem::take(&mut archive.hidden);
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

    // (image entry, caption or None, repeats)
    let mut plan: Vec<(&Entry, Option<String>, u32)> = Vec::new();
    match layout {
        Layout::ImageFolder => {
            let mut listed: BTreeMap<String, Option<String>> = BTreeMap::new();
            for m in &metadata {
                let bytes = archive.read(m)?;
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
                        let bytes = archive.read(c)?;
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
        let is_meta = layout == Layout::ImageFolder && metadata.iter().any(|m| m.name == e.name);
        if !is_image(&e.name) && !is_caption && !is_meta {
            ignored.push(e.name.clone());
        }
    }

    let mut report = DatasetReport::default();
    let mut examples = Vec::new();
    for (e, caption, repeats) in plan {
        match archive.image(e)? {
            Ok(image) => {
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
            Err(msg) => report.undecodable.push((e.name.clone(), msg)),
        }
    }
    if examples.is_empty() {
        return Err(no_images(&zip_name, &report.undecodable));
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
