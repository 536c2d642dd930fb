//! Parsing COCO JSON: errors name the record (`annotations[17].bbox`) and the annotation's id,
//! and non-finite numbers in a record's `bbox`, `area` or `score` are read as Python's `json`
//! (pycocotools' reader) reads them: `1e999` as infinity, `NaN` and `Infinity` as themselves.

use std::ops::Range;
use std::path::Path;

use hotcoco::Annotation;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use serde_path_to_error::Segment;

use crate::error::{Error, Result};

/// Where a file keeps its annotation records.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Records {
    /// Under the top-level `annotations` key.
    Annotations,
    /// As the top-level array (a results file).
    TopLevel,
}

/// A file shape that holds annotation records.
pub(super) trait HasRecords: DeserializeOwned {
    /// Where the records are.
    const RECORDS: Records;
    /// The records, for writing back the non-finite values serde_json cannot read.
    fn records(&mut self) -> &mut [Annotation];
}

impl HasRecords for Vec<Annotation> {
    const RECORDS: Records = Records::TopLevel;
    fn records(&mut self) -> &mut [Annotation] {
        self
    }
}

/// A non-finite number of a record that serde_json refused, to be written back after parsing.
struct Patch {
    record: usize,
    field: Field,
    value: f64,
}

enum Field {
    Bbox(usize),
    Area,
    Score,
}

/// Parses `bytes` (the contents of `path`) as `T`.
///
/// The first pass is serde_json alone, so a clean file costs nothing extra. Only when it fails are
/// non-finite tokens looked for; if there are any, they are replaced by placeholders, the file is
/// parsed into a `Value`, and the placeholders in a record's `bbox`, `area` or `score` are written
/// back as their values after the typed parse (anywhere else they are an error naming the field).
pub(super) fn parse<T: HasRecords>(path: &Path, bytes: &[u8]) -> Result<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let first = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        // Trailing characters after the value are an error, as in `serde_json::from_slice`.
        Ok(value) => {
            return de.end().map(|()| value).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(e) => e,
    };
    let tokens = non_finite_tokens(bytes);
    if tokens.is_empty() {
        return Err(located(path, first, T::RECORDS, |i| {
            record_id_lenient(bytes, T::RECORDS, i)
        }));
    }
    let mut value: Value = match serde_json::from_slice(&with_placeholders(bytes, &tokens)) {
        Ok(v) => v,
        // Malformed beyond the non-finite tokens: the first error is the one to report.
        Err(_) => {
            return Err(located(path, first, T::RECORDS, |i| {
                record_id_lenient(bytes, T::RECORDS, i)
            }))
        }
    };
    let mut found = Vec::new();
    take_placeholders(&mut value, &mut Vec::new(), &mut found);
    let mut patches = Vec::with_capacity(found.len());
    for (at, k) in found {
        let token = String::from_utf8_lossy(&bytes[tokens[k].0.clone()]);
        match patch_target(&at, T::RECORDS) {
            Some((record, field)) => patches.push(Patch {
                record,
                field,
                value: tokens[k].1,
            }),
            None => {
                return Err(Error::invalid(
                    path,
                    display(&at),
                    format!(
                        "{token} is not a finite number; densekd reads non-finite values only in \
                         an annotation's bbox, area or score"
                    ),
                ))
            }
        }
    }
    let mut parsed: T = serde_path_to_error::deserialize(&value)
        .map_err(|e| located(path, e, T::RECORDS, |i| record_id(&value, T::RECORDS, i)))?;
    let records = parsed.records();
    for p in patches {
        // The typed parse kept every record the `Value` had, at the same index.
        let Some(ann) = records.get_mut(p.record) else {
            continue;
        };
        match p.field {
            Field::Bbox(j) => {
                if let Some(b) = ann.bbox.as_mut() {
                    b[j] = p.value;
                }
            }
            Field::Area => ann.area = Some(p.value),
            Field::Score => ann.score = Some(p.value),
        }
    }
    Ok(parsed)
}

/// The error of a failed typed parse: the field path and, for a record, its id when it has one.
fn located(
    path: &Path,
    err: serde_path_to_error::Error<serde_json::Error>,
    records: Records,
    id_of: impl FnOnce(usize) -> Option<Value>,
) -> Error {
    let at = err.path().clone();
    let source = err.into_inner();
    if at.iter().all(|s| matches!(s, Segment::Unknown)) {
        return Error::Json {
            path: path.to_path_buf(),
            source,
        };
    }
    let segments: Vec<&Segment> = at.iter().collect();
    let index = match (records, segments.as_slice()) {
        (Records::Annotations, [Segment::Map { key }, Segment::Seq { index }, ..])
            if key == "annotations" =>
        {
            Some(*index)
        }
        (Records::TopLevel, [Segment::Seq { index }, ..]) => Some(*index),
        _ => None,
    };
    let mut message = source.to_string();
    if let Some(id) = index.and_then(id_of) {
        message.push_str(&format!(" (annotation id {id})"));
    }
    Error::invalid(path, at.to_string(), message)
}

/// The `id` of record `index` in a parsed file.
fn record_id(value: &Value, records: Records, index: usize) -> Option<Value> {
    let list = match records {
        Records::Annotations => value.get("annotations")?,
        Records::TopLevel => value,
    };
    list.get(index)?.get("id").cloned()
}

/// The `id` of record `index`, read by a second parse that accepts any record shape (the typed
/// parse failed on one); `None` when the file is not even valid JSON.
fn record_id_lenient(bytes: &[u8], records: Records, index: usize) -> Option<Value> {
    /// A record's `id`, whatever the record is.
    struct Id(Option<Value>);
    impl<'de> Deserialize<'de> for Id {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            Ok(Id(Value::deserialize(d)?.get_mut("id").map(Value::take)))
        }
    }
    #[derive(Deserialize)]
    struct Keyed {
        annotations: Vec<Id>,
    }
    let ids = match records {
        Records::Annotations => serde_json::from_slice::<Keyed>(bytes).ok()?.annotations,
        Records::TopLevel => serde_json::from_slice::<Vec<Id>>(bytes).ok()?,
    };
    ids.into_iter().nth(index)?.0
}

/// Non-finite number tokens outside strings, with their values: `NaN`, `Infinity`, `-Infinity`
/// (which Python's `json` writes and reads) and numbers beyond `f64`'s range such as `1e999`.
fn non_finite_tokens(bytes: &[u8]) -> Vec<(Range<usize>, f64)> {
    let mut found = Vec::new();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                i += 1;
            }
            b'-' | b'0'..=b'9' | b'N' | b'I' => {
                let len = bytes[i..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')))
                    .unwrap_or(bytes.len() - i);
                let token = &bytes[i..i + len];
                let value = match token {
                    b"NaN" => Some(f64::NAN),
                    b"Infinity" => Some(f64::INFINITY),
                    b"-Infinity" => Some(f64::NEG_INFINITY),
                    _ if is_json_number(token) => std::str::from_utf8(token)
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok())
                        .filter(|v| v.is_infinite()),
                    _ => None,
                };
                if let Some(v) = value {
                    found.push((i..i + len, v));
                }
                i += len;
            }
            _ => i += 1,
        }
    }
    found
}

/// Whether `t` is a number in JSON's grammar (Rust's float parser also takes `1.`, `inf`, ...).
fn is_json_number(t: &[u8]) -> bool {
    fn digits(t: &[u8], i: &mut usize) -> usize {
        let start = *i;
        while t.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    }
    let mut i = usize::from(t.first() == Some(&b'-'));
    match t.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(t, &mut i);
        }
        _ => return false,
    }
    if t.get(i) == Some(&b'.') {
        i += 1;
        if digits(t, &mut i) == 0 {
            return false;
        }
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(t, &mut i) == 0 {
            return false;
        }
    }
    i == t.len()
}

/// The prefix of a placeholder string; a NUL, which no COCO field name or file name holds, keeps
/// it apart from real strings.
const PLACEHOLDER: &str = "\u{0}densekd-non-finite:";

/// `bytes` with each token replaced by a placeholder string holding its position in `tokens`.
fn with_placeholders(bytes: &[u8], tokens: &[(Range<usize>, f64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + tokens.len() * 32);
    let mut last = 0;
    for (k, (range, _)) in tokens.iter().enumerate() {
        out.extend_from_slice(&bytes[last..range.start]);
        out.extend_from_slice(format!("\"\\u0000densekd-non-finite:{k}\"").as_bytes());
        last = range.end;
    }
    out.extend_from_slice(&bytes[last..]);
    out
}

/// One step of a path into a JSON value.
#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// Replaces each placeholder in `value` by 0 and records its path and token index.
fn take_placeholders(value: &mut Value, at: &mut Vec<Step>, found: &mut Vec<(Vec<Step>, usize)>) {
    match value {
        Value::String(s) => {
            if let Some(k) = s
                .strip_prefix(PLACEHOLDER)
                .and_then(|k| k.parse::<usize>().ok())
            {
                found.push((at.clone(), k));
                *value = Value::from(0);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                at.push(Step::Index(i));
                take_placeholders(item, at, found);
                at.pop();
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                at.push(Step::Key(key.clone()));
                take_placeholders(item, at, found);
                at.pop();
            }
        }
        _ => {}
    }
}

/// The record and field a non-finite value at `at` belongs to, if it is one that may hold it.
fn patch_target(at: &[Step], records: Records) -> Option<(usize, Field)> {
    let rest = match (records, at) {
        (Records::Annotations, [Step::Key(k), rest @ ..]) if k == "annotations" => rest,
        (Records::TopLevel, rest) => rest,
        _ => return None,
    };
    match rest {
        [Step::Index(i), Step::Key(k), Step::Index(j)] if k == "bbox" && *j < 4 => {
            Some((*i, Field::Bbox(*j)))
        }
        [Step::Index(i), Step::Key(k)] if k == "area" => Some((*i, Field::Area)),
        [Step::Index(i), Step::Key(k)] if k == "score" => Some((*i, Field::Score)),
        _ => None,
    }
}

/// A path as serde_path_to_error writes it: `annotations[3].bbox[0]`.
fn display(at: &[Step]) -> String {
    let mut out = String::new();
    for step in at {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_outside_strings_only() {
        let text =
            br#"{"a": [1e999, -1E+400, 1e308, NaN, "NaN 1e999 \" Infinity", -Infinity, 1.e999]}"#;
        let found: Vec<_> = non_finite_tokens(text)
            .into_iter()
            .map(|(r, v)| (String::from_utf8_lossy(&text[r]).into_owned(), v))
            .collect();
        let names: Vec<&str> = found.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["1e999", "-1E+400", "NaN", "-Infinity"]);
        assert_eq!(found[0].1, f64::INFINITY);
        assert_eq!(found[1].1, f64::NEG_INFINITY);
        assert!(found[2].1.is_nan());
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-0", "12", "1.5", "1e5", "-1.5E-7", "1e999"] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "-", "01", "1.", ".5", "1e", "1e+", "inf", "+1", "1.5.5"] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }
}
