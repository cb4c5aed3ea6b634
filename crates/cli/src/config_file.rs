//! `qlora train --config FILE.toml`: the file's `key = value` entries become the flags of the
//! same name (placed before the command line's own flags, which therefore override them).
//!
//! The file is TOML (read by the `toml` crate) with top-level keys only: strings, integers,
//! floats, booleans (`true` → the flag, `false` → nothing) and arrays of strings (joined with
//! commas, for `targets`); keys use `_` or `-`. Tables are not used by `qlora train`.

use std::path::Path;

/// The flags a config file stands for, e.g. `rank = 16` → `--rank 16`, `rslora = true` →
/// `--rslora`. Errors name the file and line.
pub fn config_args(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(s.start));
        format!("{}:{line}: {}", path.display(), e.message())
    })?;
    // The line a key is on, for messages about its value.
    let key_line = |key: &str| {
        text.lines()
            .position(|l| {
                let l = l.trim_start().trim_start_matches('[');
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with(['=', ']']))
            })
            .map_or(1, |i| i + 1)
    };
    let mut out = Vec::new();
    for (key, value) in &table {
        let at = |msg: String| format!("{}:{}: {msg}", path.display(), key_line(key));
        let name = key.replace('_', "-");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(at(format!("invalid key {key:?}")));
        }
        let flag = format!("--{name}");
        match value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => out.extend([flag, s.clone()]),
            toml::Value::Integer(i) => out.extend([flag, i.to_string()]),
            toml::Value::Float(f) => out.extend([flag, f.to_string()]),
            toml::Value::Array(items) => {
                let strings: Option<Vec<&str>> = items.iter().map(|v| v.as_str()).collect();
                let strings =
                    strings.ok_or_else(|| at(format!("{key}: arrays hold strings only")))?;
                out.extend([flag, strings.join(",")]);
            }
            toml::Value::Table(_) => {
                return Err(at(format!(
                    "[{key}]: tables are not used; write top-level `key = value` entries"
                )))
            }
            toml::Value::Datetime(_) => {
                return Err(at(format!("{key}: dates are not an option value")))
            }
        }
    }
    Ok(out)
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
                "0.0002",
                "--rslora",
                "--targets",
                "q_proj,v_proj",
                "--max-len",
                "512"
            ]
        );
        std::fs::write(&p, "rank = sixteen\n").unwrap();
        assert!(config_args(&p).unwrap_err().contains(":1:"));
        std::fs::write(&p, "rank = 4\n[lora]\nalpha = 8\n").unwrap();
        assert!(config_args(&p)
            .unwrap_err()
            .contains(":2: [lora]: tables are not used"));
        std::fs::write(&p, "rank = 4\ntargets = [1, 2]\n").unwrap();
        assert!(config_args(&p)
            .unwrap_err()
            .contains(":2: targets: arrays hold strings only"));
        std::fs::write(&p, "rank = 4\nrank = 5\n").unwrap();
        assert!(
            config_args(&p).unwrap_err().contains(":2:"),
            "a duplicate key is an error"
        );
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
