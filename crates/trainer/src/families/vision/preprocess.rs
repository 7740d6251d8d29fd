//! An image processor from the model folder's `preprocessor_config.json`: resize (and
//! crop), rescale, normalise, laid out CHW as `pixel_values`.
//!
//! Sizes follow transformers: `{"height", "width"}` resizes to exactly that;
//! `{"shortest_edge"}` with `crop_pct` (ConvNext's processor, which ResNet checkpoints
//! use) resizes the short side to `shortest_edge / crop_pct` and centre-crops
//! `shortest_edge` square (from 384 up it resizes to the square directly); with
//! `crop_size` and `do_center_crop` it resizes the short side and crops `crop_size`.
//! Resampling is the `image` crate's filter for PIL's `resample` code (nearest,
//! lanczos, bilinear, bicubic): close to PIL's, not bit-exact; an image already at the
//! target size is not resampled at all.

use crate::archive::short_side_dims;
use crate::{Error, Result};
use image::imageops::FilterType;
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

/// The processor's file in a model folder.
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

#[derive(Debug, Clone, PartialEq)]
enum Size {
    Exact {
        h: u32,
        w: u32,
    },
    /// Resize the short side to `resize`, then centre-crop `crop_h`×`crop_w`.
    ShortThenCrop {
        resize: u32,
        crop_h: u32,
        crop_w: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Preprocessor {
    size: Option<Size>,
    filter: FilterType,
    rescale: Option<f32>,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// 1 (luma) or 3 (RGB), the model's `num_channels`.
    pub channels: usize,
}

fn floats(v: &Value, key: &str, default: &[f32]) -> Result<Vec<f32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default.to_vec()),
        Some(Value::Number(n)) => Ok(vec![n.as_f64().unwrap_or(0.0) as f32]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Config(format!("{PREPROCESSOR_FILE}: \"{key}\" is not numbers"))),
        Some(_) => Err(Error::Config(format!(
            "{PREPROCESSOR_FILE}: \"{key}\" is not numbers"
        ))),
    }
}

fn side(v: &Value, key: &str) -> Option<u32> {
    v.get(key).and_then(|x| x.as_u64()).map(|x| x as u32)
}

impl Preprocessor {
    /// Reads `preprocessor_config.json` from a model folder, for a model of `channels`.
    pub fn load(dir: &Path, channels: usize) -> Result<Self> {
        let p = dir.join(PREPROCESSOR_FILE);
        if !p.is_file() {
            return Err(Error::Model(format!(
                "{}: no {PREPROCESSOR_FILE} (its resize and normalisation are needed to turn images into the model's input)",
                dir.display()
            )));
        }
        Self::from_json(&crate::io::read_json(&p)?, channels)
    }

    pub fn from_json(v: &Value, channels: usize) -> Result<Self> {
        let bad = |m: String| Error::Config(format!("{PREPROCESSOR_FILE}: {m}"));
        if channels != 1 && channels != 3 {
            return Err(bad(format!(
                "a model of {channels} channels (images are read as RGB or grey)"
            )));
        }
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(true);
        let size = if flag("do_resize") {
            let s = v.get("size").unwrap_or(&Value::Null);
            let size =
                match (
                    side(s, "height"),
                    side(s, "width"),
                    side(s, "shortest_edge"),
                ) {
                    (Some(h), Some(w), _) => Size::Exact { h, w },
                    (_, _, Some(edge)) => {
                        let crop_pct = v.get("crop_pct").and_then(|x| x.as_f64());
                        let crop = v.get("crop_size").unwrap_or(&Value::Null);
                        let center = v
                            .get("do_center_crop")
                            .and_then(|x| x.as_bool())
                            .unwrap_or(false);
                        match (crop_pct, side(crop, "height"), side(crop, "width")) {
                            (Some(pct), _, _) if edge < 384 && pct > 0.0 => Size::ShortThenCrop {
                                resize: (f64::from(edge) / pct) as u32,
                                crop_h: edge,
                                crop_w: edge,
                            },
                            (Some(_), _, _) => Size::Exact { h: edge, w: edge },
                            (None, Some(h), Some(w)) if center => Size::ShortThenCrop {
                                resize: edge,
                                crop_h: h,
                                crop_w: w,
                            },
                            _ => return Err(bad(
                                "size {\"shortest_edge\"} without crop_pct or a centre crop gives \
                                 images of different shapes, which do not batch"
                                    .into(),
                            )),
                        }
                    }
                    _ => {
                        return Err(bad(format!(
                            "size {s} has neither height/width nor shortest_edge"
                        )))
                    }
                };
            if matches!(size, Size::Exact { h: 0, .. } | Size::Exact { w: 0, .. })
                || matches!(
                    size,
                    Size::ShortThenCrop { crop_h: 0, .. } | Size::ShortThenCrop { crop_w: 0, .. }
                )
            {
                return Err(bad("a size of 0".into()));
            }
            Some(size)
        } else {
            None
        };
        let filter = match v.get("resample").and_then(|x| x.as_u64()).unwrap_or(2) {
            0 => FilterType::Nearest,
            1 => FilterType::Lanczos3,
            2 => FilterType::Triangle,
            3 => FilterType::CatmullRom,
            other => return Err(bad(format!("resample {other} (0, 1, 2 or 3)"))),
        };
        let rescale = flag("do_rescale").then(|| {
            v.get("rescale_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(1.0 / 255.0) as f32
        });
        let (mut mean, mut std) = if flag("do_normalize") {
            (
                floats(v, "image_mean", &[0.485, 0.456, 0.406])?,
                floats(v, "image_std", &[0.229, 0.224, 0.225])?,
            )
        } else {
            (vec![0.0], vec![1.0])
        };
        for (what, x) in [("image_mean", &mut mean), ("image_std", &mut std)] {
            if x.len() == 1 {
                *x = vec![x[0]; channels];
            }
            // transformers' grey models keep RGB statistics in their processor files.
            if x.len() == 3 && channels == 1 {
                x.truncate(1);
            }
            if x.len() != channels {
                return Err(bad(format!(
                    "{what} has {} values for a model of {channels} channels",
                    x.len()
                )));
            }
        }
        if std.contains(&0.0) {
            return Err(bad("image_std has a 0".into()));
        }
        Ok(Self {
            size,
            filter,
            rescale,
            mean,
            std,
            channels,
        })
    }

    /// The output's `(height, width)` for an input of `(w, h)`.
    pub fn out_size(&self, w: u32, h: u32) -> (u32, u32) {
        match &self.size {
            None => (h, w),
            Some(Size::Exact { h, w }) => (*h, *w),
            Some(Size::ShortThenCrop { crop_h, crop_w, .. }) => (*crop_h, *crop_w),
        }
    }

    /// `pixel_values` of one image: CHW, `channels × out_h × out_w`.
    pub fn pixels(&self, img: &RgbImage) -> Result<Vec<f32>> {
        Ok(self.normalize(&self.prepare(img)?))
    }

    /// The image resized and cropped to the model's input size, still 8-bit: what a
    /// dataset keeps per example (a quarter of its pixels' size as floats).
    pub fn prepare(&self, img: &RgbImage) -> Result<RgbImage> {
        let (w, h) = img.dimensions();
        let resized;
        let (src, x0, y0, ow, oh) = match &self.size {
            None => (img, 0, 0, w, h),
            Some(Size::Exact { h: th, w: tw }) => {
                let src = if (w, h) == (*tw, *th) {
                    img
                } else {
                    resized = image::imageops::resize(img, *tw, *th, self.filter);
                    &resized
                };
                (src, 0, 0, *tw, *th)
            }
            Some(Size::ShortThenCrop {
                resize,
                crop_h,
                crop_w,
            }) => {
                let (nw, nh) = short_side_dims(w, h, *resize);
                let src = if (nw, nh) == (w, h) {
                    img
                } else {
                    resized = image::imageops::resize(img, nw, nh, self.filter);
                    &resized
                };
                if nw < *crop_w || nh < *crop_h {
                    return Err(Error::Data(format!(
                        "a {w}x{h} image resized to {nw}x{nh} is smaller than the {crop_w}x{crop_h} crop"
                    )));
                }
                // transformers' centre crop: the offset rounds down.
                (src, (nw - crop_w) / 2, (nh - crop_h) / 2, *crop_w, *crop_h)
            }
        };
        if (x0, y0, ow, oh) == (0, 0, src.width(), src.height()) {
            return Ok(src.clone());
        }
        Ok(image::imageops::crop_imm(src, x0, y0, ow, oh).to_image())
    }

    /// Rescales and normalises a prepared image into CHW floats.
    pub fn normalize(&self, src: &RgbImage) -> Vec<f32> {
        let (ow, oh) = src.dimensions();
        let plane = (ow * oh) as usize;
        let mut out = vec![0f32; self.channels * plane];
        let scale = self.rescale.unwrap_or(1.0);
        for y in 0..oh {
            for x in 0..ow {
                let p = src.get_pixel(x, y);
                let i = (y * ow + x) as usize;
                if self.channels == 1 {
                    // PIL's convert("L"): ITU-R 601-2 luma.
                    let l = (f32::from(p[0]) * 299.0
                        + f32::from(p[1]) * 587.0
                        + f32::from(p[2]) * 114.0)
                        / 1000.0;
                    out[i] = (l * scale - self.mean[0]) / self.std[0];
                } else {
                    for c in 0..3 {
                        out[c * plane + i] = (f32::from(p[c]) * scale - self.mean[c]) / self.std[c];
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers_processors() {
        let convnext = serde_json::json!({"size": {"shortest_edge": 224}, "crop_pct": 0.875});
        let p = Preprocessor::from_json(&convnext, 3).unwrap();
        assert_eq!(
            p.size,
            Some(Size::ShortThenCrop {
                resize: 256,
                crop_h: 224,
                crop_w: 224
            })
        );
        assert_eq!(p.out_size(640, 480), (224, 224));
        let exact = serde_json::json!({"size": {"height": 8, "width": 6}, "image_mean": 0.5, "image_std": 0.5});
        let p = Preprocessor::from_json(&exact, 1).unwrap();
        let img = RgbImage::from_pixel(6, 8, image::Rgb([255, 255, 255]));
        let px = p.pixels(&img).unwrap();
        assert_eq!(px.len(), 48);
        assert!(px.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{px:?}");
        let bare = serde_json::json!({"size": {"shortest_edge": 224}});
        let e = Preprocessor::from_json(&bare, 3).unwrap_err().to_string();
        assert!(e.contains("shortest_edge"), "{e}");
        let wrong =
            serde_json::json!({"size": {"height": 8, "width": 8}, "image_mean": [0.1, 0.2]});
        let e = Preprocessor::from_json(&wrong, 3).unwrap_err().to_string();
        assert!(e.contains("image_mean has 2 values"), "{e}");
    }
}
