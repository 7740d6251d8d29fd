//! An image processor from the model folder's `preprocessor_config.json`: resize (and
//! crop), rescale, normalise, laid out CHW as `pixel_values`.
//!
//! Sizes follow transformers: `{"height", "width"}` resizes to exactly that (then
//! centre-crops `crop_size` when `do_center_crop`); `{"shortest_edge"}` (or a plain
//! number) with ConvNext's processor, which ResNet checkpoints name, resizes the short
//! side to `shortest_edge / crop_pct` and centre-crops `shortest_edge` square (from 384
//! up it resizes to the square directly); with another processor, `shortest_edge` needs
//! `do_center_crop` and a `crop_size`. Missing keys take the processor type's defaults.
//! Resampling is the `image` crate's filter for PIL's `resample` code (nearest, lanczos,
//! bilinear, bicubic): close to PIL's, not bit-exact; an image already at the target
//! size is not resampled at all. Sizes are capped at [`MAX_SIDE`], so that no file can
//! make a resize allocate without bound.

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
    /// Resize to `h`×`w`, then centre-crop `crop_h`×`crop_w`.
    ExactThenCrop {
        h: u32,
        w: u32,
        crop_h: u32,
        crop_w: u32,
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

/// The largest side a processor may resize or crop to.
pub const MAX_SIDE: u32 = 4096;

/// `{"height", "width"}` of a size that is one, or a plain number (a square).
fn hw(v: Option<&Value>) -> Option<(u64, u64)> {
    match v? {
        Value::Number(n) => n.as_u64().map(|n| (n, n)),
        o => Some((o.get("height")?.as_u64()?, o.get("width")?.as_u64()?)),
    }
}

fn side_ok(n: u64, what: &str) -> Result<u32> {
    if n == 0 || n > u64::from(MAX_SIDE) {
        return Err(Error::Config(format!(
            "{PREPROCESSOR_FILE}: {what} {n} is outside 1..={MAX_SIDE}"
        )));
    }
    Ok(n as u32)
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

    /// A processor from the file's JSON. Keys it leaves out take the defaults of its
    /// `image_processor_type`: ConvNext's (what ResNet checkpoints name: bicubic,
    /// `shortest_edge` 384, `crop_pct` 224/256) or ViT's (bilinear, 224×224), mean and
    /// standard deviation 0.5 for both.
    pub fn from_json(v: &Value, channels: usize) -> Result<Self> {
        let bad = |m: String| Error::Config(format!("{PREPROCESSOR_FILE}: {m}"));
        if channels != 1 && channels != 3 {
            return Err(bad(format!(
                "a model of {channels} channels (images are read as RGB or grey)"
            )));
        }
        let kind = v
            .get("image_processor_type")
            .or_else(|| v.get("feature_extractor_type"))
            .and_then(|x| x.as_str())
            .unwrap_or("");
        let convnext = kind.starts_with("ConvNext");
        let flag = |k: &str, default: bool| v.get(k).and_then(|x| x.as_bool()).unwrap_or(default);
        let size = if flag("do_resize", true) {
            let default_size = if convnext {
                serde_json::json!({"shortest_edge": 384})
            } else {
                serde_json::json!({"height": 224, "width": 224})
            };
            let s = v
                .get("size")
                .filter(|s| !s.is_null())
                .unwrap_or(&default_size);
            // A plain number is the short side for ConvNext's processor, a square otherwise.
            let edge = s
                .get("shortest_edge")
                .or_else(|| s.as_u64().filter(|_| convnext).map(|_| s))
                .and_then(|x| x.as_u64());
            let crop = if flag("do_center_crop", false) {
                match hw(v.get("crop_size")) {
                    Some((h, w)) => Some((side_ok(h, "crop_size")?, side_ok(w, "crop_size")?)),
                    None => return Err(bad("do_center_crop without a crop_size".into())),
                }
            } else {
                None
            };
            let size = match (edge, hw(Some(s)), crop) {
                (Some(edge), _, _) if convnext => {
                    let edge = side_ok(edge, "shortest_edge")?;
                    let pct = v
                        .get("crop_pct")
                        .and_then(|x| x.as_f64())
                        .unwrap_or(224.0 / 256.0);
                    if !(pct > 0.0 && pct <= 1.0) {
                        return Err(bad(format!("crop_pct {pct} is outside (0, 1]")));
                    }
                    if edge < 384 {
                        Size::ShortThenCrop {
                            resize: side_ok(
                                (f64::from(edge) / pct) as u64,
                                "shortest_edge / crop_pct",
                            )?,
                            crop_h: edge,
                            crop_w: edge,
                        }
                    } else {
                        Size::Exact { h: edge, w: edge }
                    }
                }
                (Some(edge), _, Some((crop_h, crop_w))) => Size::ShortThenCrop {
                    resize: side_ok(edge, "shortest_edge")?,
                    crop_h,
                    crop_w,
                },
                (Some(_), _, None) => {
                    return Err(bad(
                        "size {\"shortest_edge\"} without crop_pct or a centre crop gives \
                         images of different shapes, which do not batch"
                            .into(),
                    ))
                }
                (None, Some((h, w)), crop) => {
                    let (h, w) = (side_ok(h, "size height")?, side_ok(w, "size width")?);
                    match crop {
                        Some((crop_h, crop_w)) => Size::ExactThenCrop {
                            h,
                            w,
                            crop_h,
                            crop_w,
                        },
                        None => Size::Exact { h, w },
                    }
                }
                (None, None, _) => {
                    return Err(bad(format!(
                        "size {s} has neither height/width nor shortest_edge"
                    )))
                }
            };
            match size {
                Size::ShortThenCrop {
                    resize,
                    crop_h,
                    crop_w,
                } if resize < crop_h.min(crop_w) => {
                    return Err(bad(format!(
                        "a short side of {resize} is smaller than the {crop_w}x{crop_h} crop"
                    )))
                }
                Size::ExactThenCrop {
                    h,
                    w,
                    crop_h,
                    crop_w,
                } if h < crop_h || w < crop_w => {
                    return Err(bad(format!(
                        "a {w}x{h} resize is smaller than the {crop_w}x{crop_h} crop"
                    )))
                }
                _ => {}
            }
            Some(size)
        } else {
            None
        };
        let default_resample = if convnext { 3 } else { 2 };
        let filter = match v
            .get("resample")
            .and_then(|x| x.as_u64())
            .unwrap_or(default_resample)
        {
            0 => FilterType::Nearest,
            1 => FilterType::Lanczos3,
            2 => FilterType::Triangle,
            3 => FilterType::CatmullRom,
            other => return Err(bad(format!("resample {other} (0, 1, 2 or 3)"))),
        };
        let rescale = flag("do_rescale", true).then(|| {
            v.get("rescale_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(1.0 / 255.0) as f32
        });
        let (mut mean, mut std) = if flag("do_normalize", true) {
            (
                floats(v, "image_mean", &[0.5, 0.5, 0.5])?,
                floats(v, "image_std", &[0.5, 0.5, 0.5])?,
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
            Some(Size::ExactThenCrop { crop_h, crop_w, .. })
            | Some(Size::ShortThenCrop { crop_h, crop_w, .. }) => (*crop_h, *crop_w),
        }
    }

    /// `pixel_values` of one image: CHW, `channels × out_h × out_w`.
    pub fn pixels(&self, img: &RgbImage) -> Result<Vec<f32>> {
        Ok(self.normalize(&self.prepare(img)?))
    }

    /// The image resized and cropped to the model's input size, still 8-bit: what a
    /// dataset keeps per example (a quarter of its pixels' size as floats). A grey
    /// model's image turns grey first, with PIL's `convert("L")` arithmetic, as
    /// transformers' users open them.
    pub fn prepare(&self, img: &RgbImage) -> Result<RgbImage> {
        let grey;
        let img = if self.channels == 1 {
            let mut g = img.clone();
            for p in g.pixels_mut() {
                let l = (u32::from(p[0]) * 19595
                    + u32::from(p[1]) * 38470
                    + u32::from(p[2]) * 7471
                    + 0x8000)
                    >> 16;
                *p = image::Rgb([l as u8; 3]);
            }
            grey = g;
            &grey
        } else {
            img
        };
        let (w, h) = img.dimensions();
        let resize = |tw: u32, th: u32| -> Result<Option<RgbImage>> {
            if (w, h) == (tw, th) {
                return Ok(None);
            }
            if tw > 16 * MAX_SIDE || th > 16 * MAX_SIDE {
                return Err(Error::Data(format!(
                    "a {w}x{h} image would resize to {tw}x{th}: its sides are too unequal"
                )));
            }
            Ok(Some(image::imageops::resize(img, tw, th, self.filter)))
        };
        let (resized, crop) = match &self.size {
            None => (None, None),
            Some(Size::Exact { h: th, w: tw }) => (resize(*tw, *th)?, None),
            Some(Size::ExactThenCrop {
                h: th,
                w: tw,
                crop_h,
                crop_w,
            }) => (resize(*tw, *th)?, Some((*crop_w, *crop_h))),
            Some(Size::ShortThenCrop {
                resize: edge,
                crop_h,
                crop_w,
            }) => {
                let (nw, nh) = short_side_dims(w, h, *edge);
                (resize(nw, nh)?, Some((*crop_w, *crop_h)))
            }
        };
        let src = resized.as_ref().unwrap_or(img);
        let Some((cw, ch)) = crop else {
            return Ok(src.clone());
        };
        let (sw, sh) = src.dimensions();
        if sw < cw || sh < ch {
            return Err(Error::Data(format!(
                "a {w}x{h} image resized to {sw}x{sh} is smaller than the {cw}x{ch} crop"
            )));
        }
        if (sw, sh) == (cw, ch) {
            return Ok(src.clone());
        }
        // transformers' centre crop: the offset rounds down.
        Ok(image::imageops::crop_imm(src, (sw - cw) / 2, (sh - ch) / 2, cw, ch).to_image())
    }

    /// Rescales and normalises a prepared image into CHW floats.
    pub fn normalize(&self, src: &RgbImage) -> Vec<f32> {
        let (ow, oh) = src.dimensions();
        let plane = ow as usize * oh as usize;
        let mut out = vec![0f32; self.channels * plane];
        let scale = self.rescale.unwrap_or(1.0);
        for y in 0..oh {
            for x in 0..ow {
                let p = src.get_pixel(x, y);
                let i = (y * ow + x) as usize;
                if self.channels == 1 {
                    // Prepared grey: the three channels are the luma.
                    out[i] = (f32::from(p[0]) * scale - self.mean[0]) / self.std[0];
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
        // microsoft/resnet-50's file: ConvNext's processor, its size a plain number.
        let convnext = serde_json::json!({"image_processor_type": "ConvNextImageProcessor",
            "size": 224, "crop_pct": 0.875, "resample": 3});
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
        // ConvNext's defaults: 384 and up is a square resize.
        let p = Preprocessor::from_json(
            &serde_json::json!({"image_processor_type": "ConvNextImageProcessor"}),
            3,
        )
        .unwrap();
        assert_eq!(p.out_size(640, 480), (384, 384));
        let cropped = serde_json::json!({"size": {"height": 40, "width": 40}, "do_center_crop": true, "crop_size": 32});
        let p = Preprocessor::from_json(&cropped, 3).unwrap();
        let img = RgbImage::from_pixel(50, 60, image::Rgb([10, 20, 30]));
        assert_eq!(p.prepare(&img).unwrap().dimensions(), (32, 32));
        for hostile in [
            serde_json::json!({"size": {"height": 100000, "width": 8}}),
            serde_json::json!({"image_processor_type": "ConvNextImageProcessor", "size": 224, "crop_pct": 1e-9}),
            serde_json::json!({"image_processor_type": "ConvNextImageProcessor", "size": 224, "crop_pct": 0.0}),
            serde_json::json!({"size": {"height": 0, "width": 8}}),
            serde_json::json!({"size": {"height": 16, "width": 16}, "do_center_crop": true, "crop_size": 32}),
        ] {
            assert!(Preprocessor::from_json(&hostile, 3).is_err(), "{hostile}");
        }
        let wrong =
            serde_json::json!({"size": {"height": 8, "width": 8}, "image_mean": [0.1, 0.2]});
        let e = Preprocessor::from_json(&wrong, 3).unwrap_err().to_string();
        assert!(e.contains("image_mean has 2 values"), "{e}");
    }
}
