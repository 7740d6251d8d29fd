//! Uploaded image archives, read as hostile: every entry name and every size the central
//! directory declares is checked *before* anything is decompressed (no `..`, no absolute
//! paths or drive letters, no NUL; entry count, total and per-entry size, compression
//! ratio), and while decompressing, each entry is read through a reader that stops one
//! byte past its declared size, because the declared sizes are only claims: an entry that
//! inflates past them is rejected as soon as it does, so a zip bomb costs at most the
//! (already capped) declared sizes in memory. Nothing is ever written to disk.
//!
//! The families that train on images (captioned zips for Stable Diffusion, one folder per
//! class for image classification) read their layouts through [`Archive`].

use std::io::{Cursor, Read};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, RgbImage};

use crate::{Error, Result};

fn data(msg: String) -> Error {
    Error::Data(msg)
}

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

/// Why an entry name is unsafe, if it is.
pub(crate) fn unsafe_name(raw: &[u8], name: &str) -> Option<&'static str> {
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

pub(crate) fn is_image(name: &str) -> bool {
    matches!(ext(name).as_deref(), Some("png" | "jpg" | "jpeg"))
}

pub(crate) fn ext(name: &str) -> Option<String> {
    let file = name.rsplit('/').next().unwrap_or(name);
    file.rsplit_once('.')
        .filter(|(stem, _)| !stem.is_empty())
        .map(|(_, e)| e.to_ascii_lowercase())
}

/// `dir/stem` of `dir/stem.ext`.
pub(crate) fn stem_path(name: &str) -> &str {
    match name.rfind('.') {
        Some(i) if i > name.rfind('/').map_or(0, |s| s + 1) => &name[..i],
        _ => name,
    }
}

pub(crate) fn parent(name: &str) -> &str {
    name.rfind('/').map_or("", |i| &name[..i])
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

/// `(repeats, class tokens)` of a kohya folder name like `10_sks dog`: captioned SD
/// images to the text-to-image reader, and so never class folders to the classifier's.
pub fn kohya_folder(dir: &str) -> Option<(u32, String)> {
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

/// The error of an archive in which no image could be used: the first decoding failure,
/// or that there were no images at all.
pub fn no_images(zip_name: &str, undecodable: &[(String, String)]) -> Error {
    let why = match undecodable.first() {
        Some((_, err)) => format!("no image decodes (first failure: {err})"),
        None => "no png/jpg images found".to_string(),
    };
    data(format!("{zip_name}: {why}"))
}

/// A file entry of a vetted archive.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its path inside the archive.
    pub name: String,
    index: usize,
    size: u64,
}

/// A zip whose every entry name and declared size passed [`ZipLimits`]; entries are
/// decompressed only through [`Archive::read`], bounded as the module docs say.
pub struct Archive {
    /// The archive's file name, for messages.
    pub zip_name: String,
    zip: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    /// Its files (no directories, no `__MACOSX/` or dotfiles), in directory order.
    pub files: Vec<Entry>,
    /// The `__MACOSX/` entries and dotfiles that were passed over.
    pub hidden: Vec<String>,
    limits: ZipLimits,
    total_read: u64,
}

impl Archive {
    /// Opens `path` and checks its central directory; nothing is decompressed yet.
    pub fn open(path: &Path, limits: &ZipLimits) -> Result<Self> {
        let zip_name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| data(format!("{zip_name}: not a readable zip: {e}")))?;
        if zip.len() > limits.max_entries {
            return Err(data(format!(
                "{zip_name}: {} entries exceed max_entries ({})",
                zip.len(),
                limits.max_entries
            )));
        }
        // Names and declared sizes only (by_index_raw decompresses nothing).
        let mut files = Vec::new();
        let mut hidden = Vec::new();
        let mut declared_total: u64 = 0;
        for index in 0..zip.len() {
            let e = zip
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
            if size >= RATIO_CHECK_MIN_BYTES && size / packed.max(1) > limits.max_compression_ratio
            {
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
            if name
                .split('/')
                .any(|c| c == "__MACOSX" || c.starts_with('.'))
            {
                hidden.push(name);
                continue;
            }
            files.push(Entry { name, index, size });
        }
        Ok(Self {
            zip_name,
            zip,
            files,
            hidden,
            limits: limits.clone(),
            total_read: 0,
        })
    }

    /// Decompresses one entry, bounded by its declared size and the archive's total.
    pub fn read(&mut self, e: &Entry) -> Result<Vec<u8>> {
        let zip_name = &self.zip_name;
        let entry = self
            .zip
            .by_index(e.index)
            .map_err(|err| data(format!("{zip_name}: entry \"{}\": {err}", e.name)))?;
        read_bounded(
            entry,
            zip_name,
            &e.name,
            e.size,
            &mut self.total_read,
            &self.limits,
        )
    }

    /// Reads and decodes an image entry ([`decode_image`]), shrunk at once when the
    /// limits ask for it. A read error (a bomb, a corrupt entry) is `Err`; an image that
    /// does not decode is `Ok(Err(message))`, for the caller to report and skip.
    pub fn image(&mut self, e: &Entry) -> Result<std::result::Result<RgbImage, String>> {
        let bytes = self.read(e)?;
        Ok(match decode_image(&bytes, &e.name, &self.limits) {
            Ok(image) => Ok(match self.limits.shrink_to {
                Some(s) if image.width().min(image.height()) > s => {
                    let (nw, nh) = short_side_dims(image.width(), image.height(), s);
                    image::imageops::resize(&image, nw, nh, image::imageops::FilterType::Triangle)
                }
                _ => image,
            }),
            // decode_image's messages already name the entry; kept without the variant's
            // "data: " prefix.
            Err(Error::Data(msg)) => Err(msg),
            Err(err) => Err(err.to_string()),
        })
    }
}

/// The size of a `w`×`h` image resized so that its short side is `res` (the long side
/// truncated, as torchvision's `Resize(int)` does).
pub(crate) fn short_side_dims(w: u32, h: u32, res: u32) -> (u32, u32) {
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

/// Decodes a PNG or JPEG (format sniffed from the bytes, not the name), applies its EXIF
/// orientation and converts it to RGB8 with any alpha composited onto white, which is
/// what a transparent background looks like in every viewer (kohya drops alpha instead,
/// turning transparent areas into whatever colour the encoder left there, often black).
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
