//! Fuzzing the file readers: arbitrary and structurally mutated COCO JSON and PNG bytes must give
//! `Ok` or `Err`, never a panic. `PROPTEST_CASES` sets the cases per property (default 500, a few
//! seconds in all in a debug build).

use std::path::Path;

use densekd::data::coco::{read_dataset, read_results, CocoDataset, InvalidPolicy};
use densekd::data::labelmap::read_label_map;
use densekd::eval::coco::evaluate_files;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Value};

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    Config {
        cases,
        // A failure is turned into a named regression test instead of a file under tests/.
        failure_persistence: None,
        ..Config::default()
    }
}

/// A small valid COCO instances file.
fn base_dataset() -> Value {
    json!({
        "info": {"description": "fuzz", "year": 2025},
        "licenses": [{"id": 1, "name": "x"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 32}
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 17, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1.5, 2, 10, 20], "area": 150,
             "iscrowd": 0, "segmentation": [[1, 2, 11, 2, 11, 22, 1, 22]]},
            {"id": 2, "image_id": 1, "category_id": 17, "bbox": [50, 40, 30, 30], "area": 10,
             "iscrowd": 1, "segmentation": {"size": [48, 64], "counts": [100, 20, 2952]}},
            {"id": 3, "image_id": 2, "category_id": 17, "bbox": [5, 5, 4, 4], "iscrowd": false}
        ]
    })
}

/// A small valid results file.
fn base_results() -> Value {
    json!([
        {"image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "score": 0.9},
        {"image_id": 2, "category_id": 17, "bbox": [5, 5, 4, 4], "score": 0.25},
        {"image_id": 1, "category_id": 17, "bbox": [0, 0, 64, 48], "score": 1}
    ])
}

/// Values that replace a node: wrong types, extreme and negative numbers, wrong lengths, ids
/// that collide.
fn evil(k: u8) -> Value {
    match k % 16 {
        0 => Value::Null,
        1 => json!(true),
        2 => json!("x"),
        3 => json!(-1),
        4 => json!(0),
        5 => json!(1),
        6 => json!(1e308),
        7 => json!(-1e308),
        8 => json!(u64::MAX),
        9 => json!(i64::MIN),
        10 => json!(0.5),
        11 => json!([]),
        12 => json!({}),
        13 => json!([1, 2, 3]),
        14 => json!([1, 2, 3, 4, 5]),
        _ => json!([[[]]]),
    }
}

/// Number tokens serde_json cannot hold, written into the text.
const TOKENS: [&str; 10] = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e-999",
    "18446744073709551616",
    "-0",
    "4294967296",
    "1E400",
];

/// The number of nodes of `v`, counted depth first.
fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// Applies mutation `op` to the `target`-th node (depth first) of `v`; `target` counts down.
fn mutate(v: &mut Value, target: &mut usize, op: u8, k: u8) -> bool {
    if *target == 0 {
        match op % 4 {
            0 | 1 => *v = evil(k),
            // Replace with a sibling-like copy of another evil value nested in an array.
            2 => *v = json!([v.clone(), evil(k)]),
            _ => {
                if let Value::Array(a) = v {
                    // Duplicate the first element (duplicate ids) or drop the last.
                    if k.is_multiple_of(2) {
                        if let Some(first) = a.first().cloned() {
                            a.push(first);
                        }
                    } else {
                        a.pop();
                    }
                } else {
                    *v = evil(k);
                }
            }
        }
        return true;
    }
    *target -= 1;
    match v {
        Value::Array(a) => {
            for item in a.iter_mut() {
                if mutate(item, target, op, k) {
                    return true;
                }
            }
        }
        Value::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for key in keys {
                if *target == 0 && op % 4 == 1 {
                    // Drop the key instead of replacing its value.
                    o.shift_remove(&key);
                    return true;
                }
                if let Some(item) = o.get_mut(&key) {
                    if mutate(item, target, op, k) {
                        return true;
                    }
                }
            }
        }
        _ => {}
    }
    false
}

/// `base` with the structural `edits`, serialized, then the textual `tokens` edits (a number
/// token replaced by one of [`TOKENS`]) and an optional truncation.
fn mutated(
    base: Value,
    edits: &[(u32, u8, u8)],
    tokens: &[(u32, u8)],
    cut: Option<u32>,
) -> Vec<u8> {
    let mut v = base;
    for &(at, op, k) in edits {
        let mut target = at as usize % count(&v);
        mutate(&mut v, &mut target, op, k);
    }
    let mut text = serde_json::to_string(&v).expect("serializes");
    for &(at, k) in tokens {
        let numbers: Vec<(usize, usize)> = number_spans(text.as_bytes());
        if numbers.is_empty() {
            break;
        }
        let (start, end) = numbers[at as usize % numbers.len()];
        text.replace_range(start..end, TOKENS[k as usize % TOKENS.len()]);
    }
    let mut bytes = text.into_bytes();
    if let Some(cut) = cut {
        bytes.truncate(cut as usize % (bytes.len() + 1));
    }
    bytes
}

/// Byte ranges of number tokens outside strings in compact JSON.
fn number_spans(b: &[u8]) -> Vec<(usize, usize)> {
    let (mut spans, mut i, mut in_string) = (Vec::new(), 0, false);
    while i < b.len() {
        match (in_string, b[i]) {
            (true, b'\\') => i += 1,
            (_, b'"') => in_string = !in_string,
            (false, b'-' | b'0'..=b'9') => {
                let start = i;
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                spans.push((start, i));
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    spans
}

/// Every COCO reader on `bytes` as a ground-truth file, and as a results file; any outcome but a
/// panic passes.
fn read_all_json(dir: &Path, bytes: &[u8]) {
    let path = dir.join("fuzz.json");
    std::fs::write(&path, bytes).expect("write");
    let _ = read_dataset(&path);
    let _ = read_results(&path);
    let _ = CocoDataset::load(&path, InvalidPolicy::Skip);
    let _ = CocoDataset::load(&path, InvalidPolicy::Reject);
}

/// `eval coco` with the mutated file as ground truth against valid detections, and as
/// detections against a valid ground truth.
fn evaluate_both_ways(dir: &Path, bytes: &[u8]) {
    let fuzz = dir.join("fuzz.json");
    let (gt, dt) = (dir.join("gt.json"), dir.join("dt.json"));
    std::fs::write(&fuzz, bytes).expect("write");
    std::fs::write(&gt, base_dataset().to_string()).expect("write");
    std::fs::write(&dt, base_results().to_string()).expect("write");
    let _ = evaluate_files(&fuzz, &dt, InvalidPolicy::Skip);
    let _ = evaluate_files(&gt, &fuzz, InvalidPolicy::Skip);
}

/// Bytes drawn mostly from JSON's alphabet, so some of them get past the first character.
fn json_ish() -> impl Strategy<Value = Vec<u8>> {
    let alphabet: Vec<u8> = br#"{}[]"",:0123456789.eE+-NaInfityrulsbox_idmgcegorybb "#.to_vec();
    proptest::collection::vec(proptest::sample::select(alphabet), 0..200)
}

fn edits() -> impl Strategy<Value = Vec<(u32, u8, u8)>> {
    proptest::collection::vec((any::<u32>(), any::<u8>(), any::<u8>()), 0..5)
}

fn token_edits() -> impl Strategy<Value = Vec<(u32, u8)>> {
    proptest::collection::vec((any::<u32>(), any::<u8>()), 0..3)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn coco_readers_survive_arbitrary_bytes(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), json_ish()]
    ) {
        let tmp = tempfile::tempdir().expect("tmp");
        read_all_json(tmp.path(), &bytes);
    }

    #[test]
    fn coco_readers_survive_mutated_datasets(
        edits in edits(),
        tokens in token_edits(),
        cut in proptest::option::weighted(0.15, any::<u32>()),
    ) {
        let tmp = tempfile::tempdir().expect("tmp");
        let bytes = mutated(base_dataset(), &edits, &tokens, cut);
        read_all_json(tmp.path(), &bytes);
        evaluate_both_ways(tmp.path(), &bytes);
    }

    #[test]
    fn coco_readers_survive_mutated_results(
        edits in edits(),
        tokens in token_edits(),
        cut in proptest::option::weighted(0.15, any::<u32>()),
        wrapped in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().expect("tmp");
        let base = if wrapped { json!({"annotations": base_results()}) } else { base_results() };
        let bytes = mutated(base, &edits, &tokens, cut);
        read_all_json(tmp.path(), &bytes);
        evaluate_both_ways(tmp.path(), &bytes);
    }

    #[test]
    fn label_map_reader_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        png_signature in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("fuzz.png");
        let mut data = if png_signature { b"\x89PNG\r\n\x1a\n".to_vec() } else { Vec::new() };
        data.extend_from_slice(&bytes);
        std::fs::write(&path, data).expect("write");
        let _ = read_label_map(&path);
    }

    #[test]
    fn label_map_reader_survives_mutated_pngs(
        width in prop_oneof![
            3 => 1u32..40,
            1 => proptest::sample::select(vec![16_385u32, 100_000, u32::MAX >> 1]),
        ],
        height in prop_oneof![3 => 1u32..40, 1 => proptest::sample::select(vec![16_384u32, 1 << 30])],
        color in 0u8..5,
        depth in 0u8..5,
        pixels in proptest::collection::vec(any::<u8>(), 0..2000),
        flips in proptest::collection::vec((any::<u32>(), any::<u8>()), 0..4),
        cut in proptest::option::weighted(0.3, any::<u32>()),
    ) {
        let color = [
            png::ColorType::Grayscale,
            png::ColorType::Indexed,
            png::ColorType::Rgb,
            png::ColorType::GrayscaleAlpha,
            png::ColorType::Rgba,
        ][color as usize];
        let depth = [
            png::BitDepth::One,
            png::BitDepth::Two,
            png::BitDepth::Four,
            png::BitDepth::Eight,
            png::BitDepth::Sixteen,
        ][depth as usize];
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, width, height);
            enc.set_color(color);
            enc.set_depth(depth);
            if color == png::ColorType::Indexed {
                enc.set_palette(vec![0u8; (1usize << (depth as u8).min(8)) * 3]);
            }
            // Combinations PNG forbids fail here; the header is then all there is.
            if let Ok(mut writer) = enc.write_header() {
                // Pixel data of the right length when it is small, random IDAT bytes otherwise.
                let len = raw_len(width, height, color, depth);
                let written = len <= 40 * 40 * 8
                    && writer
                        .write_image_data(&pixels.iter().cycle().take(len).copied().collect::<Vec<_>>())
                        .is_ok();
                if !written {
                    let _ = writer.write_chunk(png::chunk::IDAT, &pixels);
                }
                let _ = writer.finish();
            }
        }
        let intact = flips.is_empty()
            && cut.is_none()
            && width < 40
            && height < 40
            && !pixels.is_empty()
            && matches!(color, png::ColorType::Grayscale | png::ColorType::Indexed)
            && depth != png::BitDepth::Sixteen;
        for (at, x) in flips {
            let n = bytes.len();
            if n > 0 {
                bytes[at as usize % n] ^= x;
            }
        }
        if let Some(cut) = cut {
            let n = bytes.len();
            bytes.truncate(cut as usize % (n + 1));
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("fuzz.png");
        std::fs::write(&path, &bytes).expect("write");
        let read = read_label_map(&path);
        // The generator also makes valid label maps, which must read back at their size.
        if intact {
            let map = read.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!((map.width, map.height), (width, height));
            prop_assert_eq!(map.data.len(), (width * height) as usize);
        }
    }
}

/// The raw (unfiltered) image data length of a PNG.
fn raw_len(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth) -> usize {
    let bits = color.samples() * depth as usize;
    (width as usize * bits).div_ceil(8) * height as usize
}

#[test]
fn mutations_produce_the_inputs_they_are_meant_to() {
    // The fuzzer is only as good as its mutations: check each kind does something.
    let base = base_dataset();
    let dropped = mutated(base.clone(), &[(1, 1, 0)], &[], None);
    assert_ne!(dropped, base.to_string().into_bytes());
    let tokened = String::from_utf8(mutated(base.clone(), &[], &[(0, 0)], None)).expect("utf8");
    assert!(tokened.contains("1e999"), "{tokened}");
    let cut = mutated(base.clone(), &[], &[], Some(10));
    assert_eq!(cut.len(), 10);
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("base.json");
    std::fs::write(&path, base.to_string()).expect("write");
    let ds = CocoDataset::load(&path, InvalidPolicy::Reject).expect("the base file is valid");
    assert_eq!(ds.images.len(), 2);
    std::fs::write(&path, base_results().to_string()).expect("write");
    assert_eq!(read_results(&path).expect("valid results").len(), 3);
    let duplicated = mutated(json!([{"id": 1}]), &[(0, 3, 0)], &[], None);
    assert_eq!(duplicated, br#"[{"id":1},{"id":1}]"#.to_vec());
}
