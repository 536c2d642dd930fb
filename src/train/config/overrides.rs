//! Editing a config as a TOML table: `--set key=value` overrides, `base` inheritance (a config
//! that names another and changes some keys), and the keys in which two configs differ.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::train::config::TrainConfig;

/// How many `base` files a config may chain through (a guard against cycles).
const MAX_BASES: usize = 8;

/// The files a config was read from with their text, the config's own first, then its bases.
pub type Sources = Vec<(PathBuf, String)>;

/// Reads `path` as a TOML table, merged over the table of its `base` file (a path relative to
/// `path`'s folder) when it names one: tables merge key by key, other values replace.
pub fn read_with_bases(path: &Path) -> Result<(toml::Table, Sources)> {
    let mut chain = vec![path.to_path_buf()];
    let mut tables = Vec::new();
    let mut sources = Vec::new();
    while let Some(file) = chain.last().cloned() {
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
            Error::invalid(
                &file,
                "toml",
                e.to_string().trim_end().replace('\n', "\n  "),
            )
        })?;
        let base = match table.remove("base") {
            None => None,
            Some(toml::Value::String(b)) => Some(b),
            Some(_) => return Err(Error::invalid(&file, "base", "must be a file name")),
        };
        tables.push(table);
        sources.push((file.clone(), text));
        let Some(base) = base else { break };
        if chain.len() > MAX_BASES {
            return Err(Error::invalid(
                path,
                "base",
                format!("more than {MAX_BASES} base files chained (a cycle?)"),
            ));
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        chain.push(dir.join(base));
    }
    let mut merged = toml::Table::new();
    for table in tables.into_iter().rev() {
        merge(&mut merged, table);
    }
    Ok((merged, sources))
}

/// The 1-based line of `text` where the dotted `key` is defined, if it is.
pub fn key_line(text: &str, key: &[&str]) -> Option<usize> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let (last, parents) = key.split_last()?;
    for part in parents {
        match table.get(*part).map(|v| v.get_ref()) {
            Some(toml::de::DeValue::Table(t)) => table = t,
            _ => return None,
        }
    }
    let (name, _) = table.get_key_value(*last)?;
    Some(text[..name.span().start].matches('\n').count() + 1)
}

/// Merges `over` into `into`: tables key by key, everything else replaced.
fn merge(into: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Parses a `--set` value as TOML (number, bool, array, quoted string); a bare word such as
/// `cosine` or a path is taken as a string, but text that starts like a number, array or
/// quoted string and does not parse (`1e-3x`, `[1,`) is an error naming the key.
fn parse_value(key: &str, text: &str) -> Result<toml::Value> {
    // `backbone_weights=` means "no pretrained weights"; elsewhere an empty value is a mistake
    // (a path or name left out) that would surface later without its key.
    if text.is_empty() && key != "backbone_weights" {
        return Err(Error::config(
            format!("--set {key}"),
            "has no value after `=` (write a number, true/false, \"text\" or a path)",
        ));
    }
    if let Some(v) = toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
    {
        return Ok(v);
    }
    let starts_like_toml = text
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || "+-.[{\"'".contains(c));
    if starts_like_toml {
        return Err(Error::config(
            format!("--set {key}"),
            format!("`{text}` is not a TOML value (a number, true/false, \"text\" or [a, list])"),
        ));
    }
    Ok(toml::Value::String(text.to_string()))
}

/// Sets `dotted.key = value` in `table`, creating intermediate tables.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| Error::config("--set", format!("`{assignment}` is not key=value")))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::config(
            "--set",
            format!("`{key}` is not a dotted key"),
        ));
    }
    let mut node = table;
    for (depth, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| {
            Error::config(
                parts[..=depth].join("."),
                format!("is a value, so `{key}` cannot be set"),
            )
        })?;
    }
    node.insert(
        parts[parts.len() - 1].to_string(),
        parse_value(key, value.trim())?,
    );
    Ok(())
}

/// Dotted keys whose values differ between two configs (e.g. a run folder's and a new one).
pub fn differing_keys(a: &TrainConfig, b: &TrainConfig) -> Result<Vec<String>> {
    fn table(c: &TrainConfig) -> Result<toml::Table> {
        toml::Table::try_from(c).map_err(|e| Error::config("config", e.to_string()))
    }
    fn walk(a: &toml::Table, b: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (a.get(k), b.get(k)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    walk(x, y, &path, out)
                }
                (x, y) if x != y => out.push(path),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&table(a)?, &table(b)?, "", &mut out);
    Ok(out)
}
