//! Image-classification data: a zip in torchvision's ImageFolder layout, one folder per
//! class (`cat/001.png`, `dog/002.jpg`), read through [`Archive`] with the same checks
//! as any uploaded zip. An image's label is the name of the folder it sits in, so a zip
//! wrapped in one top folder (`pets/cat/001.png`) reads the same. Images outside any
//! folder are an error (they have no label); other files are ignored and listed.

use crate::archive::{
    ext, is_image, kohya_folder, no_images, parent, stem_path, Archive, ZipLimits,
};
use crate::{Error, Result};
use image::RgbImage;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// One decoded, labelled image.
#[derive(Debug, Clone)]
pub struct LabelledImage {
    /// Path inside the zip.
    pub name: String,
    pub label: String,
    pub image: RgbImage,
}

/// What the import found, for the upload's response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClassesReport {
    /// Images that decoded (the examples).
    pub images: usize,
    /// Images per label, labels in id order.
    pub per_label: Vec<(String, usize)>,
    /// `(entry, error)` for image entries that did not decode.
    pub undecodable: Vec<(String, String)>,
    /// Entries that were not read: other file types, `__MACOSX/`, dotfiles.
    pub ignored: Vec<String>,
}

/// A decoded labelled dataset.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// Sorted by entry name.
    pub examples: Vec<LabelledImage>,
    pub report: ClassesReport,
}

impl LabelledImages {
    /// The labels, in id order: integers by value when every label is one (so `0`..`9`
    /// keep their ids), else by name.
    pub fn labels(&self) -> Vec<String> {
        self.report
            .per_label
            .iter()
            .map(|(l, _)| l.clone())
            .collect()
    }
}

/// Orders labels as a label set numbers them.
pub fn order_labels(labels: &mut [String]) {
    labels.sort();
    if labels.iter().all(|n| n.parse::<i64>().is_ok()) {
        labels.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    }
}

/// Whether a zip is in the ImageFolder layout rather than a captioned one, by its names
/// alone: every image sits in a folder, at least two folder names, and nothing that
/// captions an image (no `metadata.jsonl`, no `.txt`/`.caption` beside an image, no
/// kohya `10_name` folder).
pub fn looks_labelled(path: &Path, limits: &ZipLimits) -> bool {
    let Ok(a) = Archive::open(path, limits) else {
        return false;
    };
    let images: Vec<&str> = a
        .files
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| is_image(n))
        .collect();
    let stems: HashSet<&str> = images.iter().map(|n| stem_path(n)).collect();
    let captioned = a.files.iter().any(|e| {
        let n = e.name.as_str();
        n.rsplit('/').next() == Some("metadata.jsonl")
            || matches!(ext(n).as_deref(), Some("txt" | "caption")) && stems.contains(stem_path(n))
    });
    // The SD reader's own rule for kohya folders, so that the two never disagree.
    let kohya = images.iter().any(|n| kohya_folder(parent(n)).is_some());
    let labels: HashSet<&str> = images.iter().map(|n| folder_label(n)).collect();
    !captioned && !kohya && !labels.contains("") && labels.len() >= 2
}

/// The last folder of an entry's path, trimmed ("" at the archive's root).
fn folder_label(name: &str) -> &str {
    parent(name).rsplit('/').next().unwrap_or("").trim()
}

/// Reads a labelled image zip (see the module docs). `prepare` turns each image into
/// what is kept of it (the model's input size) as soon as it is decoded, so that a zip
/// of large photos never holds more than one at full size; its error, which names
/// nothing, is reported with the entry.
pub fn read_labelled_zip(
    path: &Path,
    limits: &ZipLimits,
    prepare: &dyn Fn(&RgbImage) -> Result<RgbImage>,
) -> Result<LabelledImages> {
    let mut archive = Archive::open(path, limits)?;
    let zip_name = archive.zip_name.clone();
    let files = std::mem::take(&mut archive.files);
    let mut report = ClassesReport {
        ignored: std::mem::take(&mut archive.hidden),
        ..Default::default()
    };
    let mut examples = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &files {
        if !is_image(&e.name) {
            report.ignored.push(e.name.clone());
            continue;
        }
        let label = folder_label(&e.name);
        if label.is_empty() {
            return Err(Error::Data(format!(
                "{zip_name}: entry \"{}\" is in no folder: an image-classification zip has one \
                 folder per class, named for it (cat/001.png, dog/002.png)",
                e.name
            )));
        }
        let label = label.to_string();
        match archive.image(e)? {
            Ok(image) => {
                let image = prepare(&image).map_err(|err| {
                    let m = match err {
                        Error::Data(m) => m,
                        e => e.to_string(),
                    };
                    Error::Data(format!("{zip_name}: {}: {m}", e.name))
                })?;
                *counts.entry(label.clone()).or_default() += 1;
                examples.push(LabelledImage {
                    name: e.name.clone(),
                    label,
                    image,
                });
            }
            Err(msg) => report.undecodable.push((e.name.clone(), msg)),
        }
    }
    if examples.is_empty() {
        return Err(no_images(&zip_name, &report.undecodable));
    }
    let mut labels: Vec<String> = counts.keys().cloned().collect();
    order_labels(&mut labels);
    examples.sort_by(|a, b| a.name.cmp(&b.name));
    report.images = examples.len();
    report.per_label = labels
        .into_iter()
        .map(|l| {
            let n = counts[&l];
            (l, n)
        })
        .collect();
    report.undecodable.sort();
    report.ignored.sort();
    Ok(LabelledImages { examples, report })
}
