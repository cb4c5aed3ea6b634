//! `qlora train --config FILE.toml`: the file's `key = value` lines become the flags of the same
//! name (placed before the command line's own flags, which therefore override them).
//!
//! The file is flat TOML: `key = value` per line with strings ("…"), integers, floats, booleans
//! and arrays of strings (joined with commas, for `targets`); `#` starts a comment; keys use `_`
//! or `-`. Tables are not used by `qlora train` and are rejected.

use std::path::Path;

/// The flags a config file stands for, e.g. `rank = 16` → `--rank 16`, `rslora = true` →
/// `--rslora`. Errors name the file and line.
pub fn config_args(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let at = |msg: String| format!("{}:{}: {msg}", path.display(), n + 1);
        let line = strip_comment(raw).trim().to_string();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            return Err(at("tables are not used; write `key = value` lines".into()));
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| at(format!("expected `key = value`, found {line:?}")))?;
        let key = key.trim().replace('_', "-");
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(at(format!("invalid key {key:?}")));
        }
        let flag = format!("--{key}");
        let v = value.trim();
        match v {
            "true" => out.push(flag),
            "false" => {}
            _ if v.starts_with('"') => {
                let s = parse_string(v).map_err(at)?;
                out.push(flag);
                out.push(s);
            }
            _ if v.starts_with('[') => {
                let inner = v
                    .strip_prefix('[')
                    .and_then(|x| x.strip_suffix(']'))
                    .ok_or_else(|| at("unclosed array".into()))?;
                let items: Result<Vec<String>, String> = inner
                    .split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(parse_string)
                    .collect();
                out.push(flag);
                out.push(items.map_err(at)?.join(","));
            }
            _ if v.parse::<f64>().is_ok() => {
                out.push(flag);
                out.push(v.replace('_', ""));
            }
            _ => {
                return Err(at(format!(
                    "value {v:?} is not a string, number, boolean or array"
                )))
            }
        }
    }
    Ok(out)
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

fn parse_string(v: &str) -> Result<String, String> {
    let inner = v
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .ok_or(format!("unterminated string {v:?}"))?;
    Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
}

/// Inserts the flags of `--config FILE` (or `--config=FILE`) right after the `train`
/// subcommand, so flags given on the command line override the file's.
pub fn expand(args: Vec<String>) -> Result<Vec<String>, String> {
    let is_config = |a: &str| a == "--config" || a.starts_with("--config=");
    let Some(sub) = args.iter().position(|a| a == "train") else {
        return Ok(args);
    };
    let found: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| is_config(a))
        .map(|(i, _)| i)
        .collect();
    let Some(&ci) = found.first() else {
        return Ok(args);
    };
    if ci < sub {
        return Err("--config is an option of train: qlora train --config FILE.toml ...".into());
    }
    if found.len() > 1 {
        return Err("--config is given more than once; pass one file".into());
    }
    let (path, n) = match args[ci].strip_prefix("--config=") {
        Some(p) => (p.to_string(), 1),
        None => (args.get(ci + 1).ok_or("--config needs a file")?.clone(), 2),
    };
    if path.is_empty() {
        return Err("--config needs a file".into());
    }
    let mut rest: Vec<String> = args.clone();
    rest.drain(ci..ci + n);
    let mut out: Vec<String> = rest[..=sub].to_vec();
    out.extend(config_args(Path::new(&path))?);
    out.extend(rest[sub + 1..].iter().cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_forms_and_misplacements() {
        let dir = std::env::temp_dir().join(format!("qlora-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("run.toml");
        std::fs::write(&p, "rank = 16\n").unwrap();
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let ps = p.to_str().unwrap();
        let eq = format!("--config={ps}");
        for args in [
            v(&["qlora", "train", "--config", ps, "--lr", "1"]),
            v(&["qlora", "train", &eq, "--lr", "1"]),
        ] {
            assert_eq!(
                expand(args).unwrap(),
                v(&["qlora", "train", "--rank", "16", "--lr", "1"])
            );
        }
        assert!(expand(v(&["qlora", "--config", ps, "train"]))
            .unwrap_err()
            .contains("option of train"));
        assert!(
            expand(v(&["qlora", "train", "--config", ps, "--config", ps]))
                .unwrap_err()
                .contains("more than once")
        );
        assert!(expand(v(&["qlora", "train", "--config="]))
            .unwrap_err()
            .contains("needs a file"));
        assert!(expand(v(&["qlora", "train", "--config"]))
            .unwrap_err()
            .contains("needs a file"));
    }

    #[test]
    fn flat_toml_becomes_flags() {
        let p = std::env::temp_dir().join(format!("qlora-cfg-{}.toml", std::process::id()));
        std::fs::write(
            &p,
            "# run\nmodel = \"./m\"\nrank = 16\nlr = 2e-4\nrslora = true\ndora = false\ntargets = [\"q_proj\", \"v_proj\"] # two\nmax_len = 512\n",
        )
        .unwrap();
        assert_eq!(
            config_args(&p).unwrap(),
            [
                "--model",
                "./m",
                "--rank",
                "16",
                "--lr",
                "2e-4",
                "--rslora",
                "--targets",
                "q_proj,v_proj",
                "--max-len",
                "512"
            ]
        );
        std::fs::write(&p, "rank = sixteen\n").unwrap();
        assert!(config_args(&p).unwrap_err().contains(":1:"));
        let args: Vec<String> = [
            "qlora",
            "train",
            "--config",
            p.to_str().unwrap(),
            "--rank",
            "4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        std::fs::write(&p, "rank = 16\n").unwrap();
        assert_eq!(
            expand(args).unwrap(),
            ["qlora", "train", "--rank", "16", "--rank", "4"]
        );
    }
}
