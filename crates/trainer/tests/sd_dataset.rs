//! The SD image-dataset import: the three zip layouts in tests/data/sd, the archive
//! safety checks (traversal, absolute paths, zip bombs declared and undeclared), EXIF
//! orientation, and the VAE pixel layout.

use std::io::Write;
use std::path::{Path, PathBuf};

use loraforge_trainer::families::diffusion::dataset::{
    decode_image, make_bucket_resolutions, read_zip, select_bucket, to_bucket_pixels, to_pixels,
    ImageDataset, Layout, ZipLimits,
};
use loraforge_trainer::Error;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/sd")
}

fn read(name: &str) -> loraforge_trainer::Result<ImageDataset> {
    read_zip(&fixtures().join(name), &ZipLimits::default())
}

fn captions(ds: &ImageDataset) -> Vec<(&str, &str, u32)> {
    ds.examples
        .iter()
        .map(|e| (e.name.as_str(), e.caption.as_str(), e.repeats))
        .collect()
}

/// A fresh scratch directory for zips built at test time.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loraforge-sd-ds-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap();
}

/// A zip with `name` holding `mib` MiB of zeros, streamed so the test itself stays small.
fn write_zeros_zip(path: &Path, name: &str, mib: usize) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(false);
    w.start_file(name, opts).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        w.write_all(&chunk).unwrap();
    }
    w.start_file("bomb.txt", opts).unwrap();
    w.write_all(b"a caption").unwrap();
    w.finish().unwrap();
}

/// Peak resident memory of this test process, from /proc (Linux only).
fn peak_rss_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

fn data_err(r: loraforge_trainer::Result<ImageDataset>) -> String {
    match r {
        Err(Error::Data(m)) => m,
        Err(e) => panic!("expected a data error, got {e}"),
        Ok(ds) => panic!("expected an error, got {} examples", ds.examples.len()),
    }
}

#[test]
fn kohya_zip_gives_repeats_and_captions_with_class_token_fallback() {
    let ds = read("kohya.zip").unwrap();
    println!(
        "{:?}\n{}",
        captions(&ds),
        serde_json::to_string(&ds.report).unwrap()
    );
    assert_eq!(ds.layout, Layout::Kohya);
    assert_eq!(
        captions(&ds),
        vec![
            ("10_sks dog/dog1.png", "sks dog, on grass", 10),
            ("10_sks dog/dog2.jpg", "sks dog sitting", 10),
            ("2_red ball/ball.png", "red ball", 2),
        ]
    );
    assert_eq!(ds.report.images, 3);
    assert_eq!(ds.report.with_caption, 3);
    assert_eq!(ds.report.total_repeats, 22);
    assert!(ds.report.missing_captions.is_empty());
    assert!(ds.report.undecodable.is_empty());
    assert!(ds.report.ignored.is_empty(), "{:?}", ds.report.ignored);
    let dims: Vec<_> = ds.examples.iter().map(|e| e.image.dimensions()).collect();
    assert_eq!(dims, vec![(32, 32), (48, 40), (48, 40)]);
    // ball.png is RGBA, transparent outside the triangle: flattened onto white.
    assert_eq!(ds.examples[2].image.get_pixel(0, 0).0, [255, 255, 255]);
}

#[test]
fn flat_zip_keeps_an_uncaptioned_image_with_an_empty_caption_and_reports_it() {
    let ds = read("flat.zip").unwrap();
    println!(
        "{:?}\n{}",
        captions(&ds),
        serde_json::to_string(&ds.report).unwrap()
    );
    assert_eq!(ds.layout, Layout::Flat);
    assert_eq!(
        captions(&ds),
        vec![
            ("blue_circle.jpg", "a blue circle on a yellow background", 1),
            ("gray_stripes.jpg", "", 1),
            ("red_square.png", "a red square on a white background", 1),
        ]
    );
    assert_eq!(ds.report.images, 3);
    assert_eq!(ds.report.with_caption, 2);
    assert_eq!(
        ds.report.missing_captions,
        vec!["gray_stripes.jpg".to_string()]
    );
    assert_eq!(ds.report.total_repeats, 3);
    // Greyscale JPEG comes out as RGB.
    assert_eq!(ds.examples[1].image.dimensions(), (32, 32));
}

#[test]
fn imagefolder_zip_reads_captions_from_metadata_jsonl() {
    let ds = read("imagefolder.zip").unwrap();
    println!(
        "{:?}\n{}",
        captions(&ds),
        serde_json::to_string(&ds.report).unwrap()
    );
    assert_eq!(ds.layout, Layout::ImageFolder);
    assert_eq!(
        captions(&ds),
        vec![
            (
                "train/blue_circle.jpg",
                "a blue circle on a yellow background",
                1
            ),
            ("train/gray_stripes.jpg", "grey vertical stripes", 1),
            (
                "train/green_triangle.png",
                "a green triangle, transparent background",
                1
            ),
            (
                "train/red_square.png",
                "a red square on a white background",
                1
            ),
        ]
    );
    assert_eq!(ds.report.with_caption, 4);
    assert!(ds.report.missing_captions.is_empty());
    assert!(ds.report.ignored.is_empty(), "{:?}", ds.report.ignored);
}

#[test]
fn traversal_and_absolute_entries_are_rejected_naming_the_entry() {
    let t = data_err(read("traversal.zip"));
    println!("{t}");
    assert_eq!(
        t,
        "traversal.zip: entry \"../evil.png\": path escapes the archive"
    );
    let a = data_err(read("absolute.zip"));
    println!("{a}");
    assert_eq!(a, "absolute.zip: entry \"/abs.png\": absolute path");
}

#[test]
fn unsafe_names_built_at_test_time_are_rejected() {
    let dir = scratch("names");
    for (name, why) in [
        ("a/../../x.png", "path escapes the archive"),
        ("a\\..\\x.png", "path escapes the archive"),
        ("C:/x.png", "drive letter"),
        ("\\x.png", "absolute path"),
    ] {
        let p = dir.join("n.zip");
        write_zip(&p, &[("ok.png", b"x"), (name, b"x")]);
        let m = data_err(read_zip(&p, &ZipLimits::default()));
        println!("{m}");
        assert!(m.contains(&format!("\"{name}\"")) && m.contains(why), "{m}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn declared_oversize_and_high_ratio_entries_are_rejected_before_decompressing() {
    let dir = scratch("bomb");
    let p = dir.join("bomb.zip");
    write_zeros_zip(&p, "bomb.png", 100);
    let small = ZipLimits {
        max_entry_uncompressed_bytes: 1 << 20,
        ..ZipLimits::default()
    };
    let m = data_err(read_zip(&p, &small));
    println!("{m}");
    assert!(
        m.contains("\"bomb.png\"") && m.contains("max_entry_uncompressed_bytes"),
        "{m}"
    );

    let total = ZipLimits {
        max_total_uncompressed_bytes: 50 << 20,
        max_entry_uncompressed_bytes: 1 << 30,
        max_compression_ratio: u64::MAX,
        ..ZipLimits::default()
    };
    let m = data_err(read_zip(&p, &total));
    println!("{m}");
    assert!(m.contains("max_total_uncompressed_bytes"), "{m}");

    // 100 MiB is over the default 64 MiB entry cap; raise that to see the ratio check fire
    // on its own (zeros deflate about 1000:1).
    let ratio = ZipLimits {
        max_entry_uncompressed_bytes: 1 << 30,
        ..ZipLimits::default()
    };
    let m = data_err(read_zip(&p, &ratio));
    println!("{m}");
    assert!(
        m.contains("\"bomb.png\"") && m.contains("max_compression_ratio"),
        "{m}"
    );
    let rss = peak_rss_mib();
    println!("peak RSS {rss:?} MiB");
    if let Some(rss) = rss {
        assert!(rss < 100, "peak RSS {rss} MiB: something inflated the bomb");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Overwrites the uncompressed-size fields of every local and central header.
fn lie_about_sizes(bytes: &mut [u8], claimed: u32) {
    let mut i = 0;
    while i + 30 <= bytes.len() {
        let off = match &bytes[i..i + 4] {
            b"PK\x03\x04" => Some(22),
            b"PK\x01\x02" => Some(24),
            _ => None,
        };
        if let Some(off) = off {
            bytes[i + off..i + off + 4].copy_from_slice(&claimed.to_le_bytes());
        }
        i += 1;
    }
}

#[test]
fn an_entry_inflating_past_its_declared_size_is_stopped_while_decompressing() {
    let dir = scratch("liar");
    let p = dir.join("liar.zip");
    write_zeros_zip(&p, "liar.png", 256);
    let mut bytes = std::fs::read(&p).unwrap();
    lie_about_sizes(&mut bytes, 1000);
    std::fs::write(&p, &bytes).unwrap();
    drop(bytes);
    let m = data_err(read_zip(&p, &ZipLimits::default()));
    println!("{m}");
    assert!(m.contains("\"liar.png\""), "{m}");
    let rss = peak_rss_mib();
    println!("peak RSS {rss:?} MiB");
    if let Some(rss) = rss {
        assert!(
            rss < 200,
            "peak RSS {rss} MiB: the 256 MiB entry was inflated"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn exif_rotated_jpeg_decodes_upright() {
    let bytes = std::fs::read(fixtures().join("exif-rotated.jpg")).unwrap();
    let img = decode_image(&bytes, "exif-rotated.jpg", &ZipLimits::default()).unwrap();
    println!("{:?}", img.dimensions());
    assert_eq!(img.dimensions(), (24, 40));
    let close = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 8);
    for (x, y, want) in [
        (12, 5, [254, 0, 0]),
        (12, 15, [254, 0, 0]),
        (12, 25, [0, 0, 254]),
        (12, 34, [0, 0, 254]),
        (2, 2, [254, 0, 0]),
        (21, 37, [0, 0, 254]),
    ] {
        let got = img.get_pixel(x, y).0;
        println!("({x},{y}): {got:?}");
        assert!(close(got, want), "({x},{y}): {got:?}, want {want:?}");
    }
}

#[test]
fn decode_image_names_the_file_and_enforces_the_pixel_limit() {
    let e = decode_image(b"not an image", "junk.png", &ZipLimits::default()).unwrap_err();
    println!("{e}");
    assert!(e.to_string().contains("junk.png"), "{e}");
    let bytes = std::fs::read(fixtures().join("red_square.png")).unwrap();
    let tiny = ZipLimits {
        max_image_pixels: 1000,
        ..ZipLimits::default()
    };
    let e = decode_image(&bytes, "red_square.png", &tiny).unwrap_err();
    println!("{e}");
    assert!(e.to_string().contains("red_square.png") && e.to_string().contains("32x32"));
}

#[test]
fn a_non_image_is_reported_undecodable_and_an_archive_with_none_is_an_error() {
    let dir = scratch("junk");
    let good = std::fs::read(fixtures().join("red_square.png")).unwrap();
    let p = dir.join("junk.zip");
    write_zip(
        &p,
        &[
            ("red.png", good.as_slice()),
            ("red.txt", b"\xef\xbb\xbfred\n"),
            ("notes.png", b"this is not an image"),
            ("notes.txt", b"notes"),
            ("__MACOSX/._red.png", b"x"),
            (".DS_Store", b"x"),
            ("readme.md", b"x"),
        ],
    );
    let ds = read_zip(&p, &ZipLimits::default()).unwrap();
    println!("{}", serde_json::to_string(&ds.report).unwrap());
    assert_eq!(ds.examples.len(), 1);
    assert_eq!(ds.examples[0].caption, "red");
    assert_eq!(ds.report.undecodable.len(), 1);
    assert_eq!(ds.report.undecodable[0].0, "notes.png");
    assert!(
        ds.report.undecodable[0].1.starts_with("notes.png: "),
        "{:?}",
        ds.report.undecodable
    );
    assert_eq!(
        ds.report.ignored,
        vec![".DS_Store", "__MACOSX/._red.png", "readme.md"]
    );

    write_zip(&p, &[("notes.png", b"this is not an image")]);
    let m = data_err(read_zip(&p, &ZipLimits::default()));
    println!("{m}");
    assert!(
        m.contains("no image decodes") && m.contains("notes.png"),
        "{m}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_bad_metadata_line_is_an_error_naming_the_line() {
    let dir = scratch("meta");
    let good = std::fs::read(fixtures().join("red_square.png")).unwrap();
    let p = dir.join("meta.zip");
    write_zip(
        &p,
        &[
            (
                "train/metadata.jsonl",
                b"{\"file_name\": \"a.png\", \"caption\": \"a\"}\n{\"file_name\": \n",
            ),
            ("train/a.png", good.as_slice()),
        ],
    );
    let m = data_err(read_zip(&p, &ZipLimits::default()));
    println!("{m}");
    assert!(m.contains("train/metadata.jsonl line 2"), "{m}");

    // `caption` is accepted for `text`; an unlisted image under train/ is kept uncaptioned.
    write_zip(
        &p,
        &[
            (
                "train/metadata.jsonl",
                b"{\"file_name\": \"a.png\", \"caption\": \"a\"}\n",
            ),
            ("train/a.png", good.as_slice()),
            ("train/b.png", good.as_slice()),
        ],
    );
    let ds = read_zip(&p, &ZipLimits::default()).unwrap();
    println!("{}", serde_json::to_string(&ds.report).unwrap());
    assert_eq!(ds.examples[0].caption, "a");
    assert_eq!(ds.examples[1].caption, "");
    assert_eq!(ds.report.missing_captions, vec!["train/b.png".to_string()]);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn to_pixels_is_chw_in_minus_one_to_one() {
    let solid = image::RgbImage::from_pixel(40, 24, image::Rgb([51, 102, 204]));
    let px = to_pixels(&solid, 16, true);
    assert_eq!(px.len(), 3 * 16 * 16);
    let want = [-0.6f32, -0.2, 0.6];
    for (c, w) in want.iter().enumerate() {
        let plane = &px[c * 256..(c + 1) * 256];
        let worst = plane.iter().map(|v| (v - w).abs()).fold(0f32, f32::max);
        println!("channel {c}: want {w}, worst error {worst}");
        assert!(worst < 1e-5, "channel {c}: worst error {worst}");
    }

    // 40x24, red left half / blue right: at resolution 24 no resize happens and the
    // centre crop keeps columns 8..32.
    let mut img = image::RgbImage::from_pixel(40, 24, image::Rgb([255, 0, 0]));
    for y in 0..24 {
        for x in 20..40 {
            img.put_pixel(x, y, image::Rgb([0, 0, 255]));
        }
    }
    let px = to_pixels(&img, 24, true);
    assert_eq!(px.len(), 3 * 24 * 24);
    assert!(px.iter().all(|v| (-1.0..=1.0).contains(v)));
    let n = 24 * 24;
    assert_eq!((px[0], px[2 * n]), (1.0, -1.0), "left edge is red");
    assert_eq!((px[23], px[2 * n + 23]), (-1.0, 1.0), "right edge is blue");
    assert_eq!((px[11], px[12]), (1.0, -1.0), "the edge sits in the middle");
    let top_left = to_pixels(&img, 24, false);
    assert_eq!(top_left[20], -1.0, "uncentred crop keeps columns 0..24");
    assert_eq!(top_left[19], 1.0);

    // Downscaling keeps the shape and range.
    let px = to_pixels(&img, 8, true);
    assert_eq!(px.len(), 3 * 64);
    assert!(px.iter().all(|v| (-1.0..=1.0).contains(v)));
}

/// Expected values from kohya's `make_bucket_resolutions` and `select_bucket`, run in
/// Python on the same inputs.
#[test]
fn buckets_match_kohya() {
    let b = make_bucket_resolutions((512, 512), 256, 1024, 64);
    println!("{b:?}");
    assert_eq!(
        b,
        vec![
            (256, 832),
            (256, 896),
            (256, 960),
            (256, 1024),
            (320, 704),
            (320, 768),
            (384, 640),
            (448, 576),
            (512, 512),
            (576, 448),
            (640, 384),
            (704, 320),
            (768, 320),
            (832, 256),
            (896, 256),
            (960, 256),
            (1024, 256),
        ]
    );
    let big = make_bucket_resolutions((1024, 1024), 256, 1024, 64);
    assert_eq!(big.len(), 25);
    assert_eq!(big[0], (256, 1024));
    assert_eq!(big[24], (1024, 1024));
    for ((w, h), want) in [
        ((48, 40), ((576, 448), (576, 480))),
        ((40, 48), ((448, 576), (480, 576))),
        ((1920, 1080), ((640, 384), (683, 384))),
        ((32, 32), ((512, 512), (512, 512))),
        ((100, 300), ((256, 832), (277, 832))),
    ] {
        let got = select_bucket(&b, w, h).unwrap();
        println!("{w}x{h} -> {got:?}");
        assert_eq!(got, want, "{w}x{h}");
    }
    assert_eq!(select_bucket(&[], 10, 10), None);

    let solid = image::RgbImage::from_pixel(48, 40, image::Rgb([255, 255, 255]));
    let (bucket, resized) = select_bucket(&b, 48, 40).unwrap();
    let px = to_bucket_pixels(&solid, bucket, resized);
    assert_eq!(px.len(), 3 * 576 * 448);
    assert!(px.iter().all(|&v| (v - 1.0).abs() < 1e-6));
}

/// A small file that decodes to a large picture is held at training size only, and the
/// early shrink changes nothing of what training sees.
#[test]
fn images_are_shrunk_to_the_training_size_as_they_are_decoded() {
    let mut big = image::RgbImage::new(3000, 2000);
    for (x, y, p) in big.enumerate_pixels_mut() {
        *p = image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8]);
    }
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(big.clone())
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let dir = scratch("shrink");
    let zip = dir.join("big.zip");
    write_zip(&zip, &[("big.png", &png), ("big.txt", b"a big picture")]);
    let limits = ZipLimits {
        shrink_to: Some(32),
        ..ZipLimits::default()
    };
    let ds = read_zip(&zip, &limits).unwrap();
    let img = &ds.examples[0].image;
    assert_eq!(img.dimensions(), (48, 32));
    assert_eq!(to_pixels(img, 32, true), to_pixels(&big, 32, true));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hostile-client finding 2: a kohya folder asking for billions of repeats (or many
/// folders adding up to too many rows) is refused by name when the zip is read, before
/// any training could expand it.
#[test]
fn absurd_repeats_are_refused_naming_the_folder() {
    let png = std::fs::read(fixtures().join("red_square.png")).unwrap();
    let dir = scratch("repeats");
    let huge = dir.join("huge.zip");
    write_zip(&huge, &[("4294967295_sks dog/a.png", &png)]);
    let m = data_err(read_zip(&huge, &ZipLimits::default()));
    assert!(
        m.contains("4294967295_sks dog") && m.contains("at most 10000"),
        "{m}"
    );
    // Each folder under the cap, together over the rows an epoch may have.
    let many = dir.join("many.zip");
    let names: Vec<String> = (0..101).map(|i| format!("10000_dog{i}/a.png")).collect();
    let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &png[..])).collect();
    write_zip(&many, &entries);
    let m = data_err(read_zip(&many, &ZipLimits::default()));
    assert!(m.contains("1000000 rows per epoch"), "{m}");
    // At the cap is fine.
    let ok = dir.join("ok.zip");
    write_zip(&ok, &[("10000_sks dog/a.png", &png)]);
    let ds = read_zip(&ok, &ZipLimits::default()).unwrap();
    assert_eq!(ds.report.total_repeats, 10_000);
}
