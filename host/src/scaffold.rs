//! `stepwise plugin new NAME [--lang rust|python|javascript]`: a check that builds as is,
//! outside this repository, with `stepwise plugin build` (see [`crate::plugin_build`]).
//! Each carries its own copy of the WIT. A Rust crate uses `wit-bindgen` directly (the guest SDK
//! is not published) and builds for `wasm32-wasip2` with a plain `cargo build --release`; a
//! Python or JavaScript check carries the helper module that `plugins/event-pipeline-py` and
//! `plugins/event-pipeline-js` are written with, so the scaffold and the demo share one copy.

use std::path::Path;

use anyhow::Context;

use crate::model::PluginName;

/// The contract, as this host speaks it.
const WIT_FILES: [(&str, &str); 8] = [
    ("wit/world.wit", include_str!("../../wit/world.wit")),
    ("wit/deps/cli.wit", include_str!("../../wit/deps/cli.wit")),
    (
        "wit/deps/clocks.wit",
        include_str!("../../wit/deps/clocks.wit"),
    ),
    (
        "wit/deps/filesystem.wit",
        include_str!("../../wit/deps/filesystem.wit"),
    ),
    ("wit/deps/http.wit", include_str!("../../wit/deps/http.wit")),
    ("wit/deps/io.wit", include_str!("../../wit/deps/io.wit")),
    (
        "wit/deps/random.wit",
        include_str!("../../wit/deps/random.wit"),
    ),
    (
        "wit/deps/sockets.wit",
        include_str!("../../wit/deps/sockets.wit"),
    ),
];

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
serde_json = "1"
wit-bindgen = "0.61"

[profile.release]
opt-level = "s"
strip = true

# A crate of its own, even inside another workspace.
[workspace]
"#;

const CARGO_CONFIG: &str = r#"# Plugins are WebAssembly components: `cargo build --release` builds one.
[build]
target = "wasm32-wasip2"
"#;

const LIB_RS: &str = r##"//! `{name}`: a Stepwise check.
//!
//! Build: `cargo build --release` (needs `rustup target add wasm32-wasip2`), then try it:
//! `stepwise dev target/wasm32-wasip2/release/{crate}.wasm --params '{"expect": "hello"}'`
//! and upload it: `curl -X PUT http://127.0.0.1:8080/v1/plugins/{name} --data-binary @...`.
//!
//! Each step is called once per tick until it passes or fails; return `Pending` to be asked
//! again. Calls may repeat after a host crash: keep them idempotent.

wit_bindgen::generate!({ world: "check", path: "wit", generate_all });

use stepwise::plugin::log::{self, Level};
use stepwise::plugin::types::StepInfo;

struct Plugin;

impl Guest for Plugin {
    fn describe() -> CheckInfo {
        CheckInfo {
            name: "{name}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Passes once params.expect is a non-empty string.".into(),
            steps: vec![StepInfo {
                name: "expect".into(),
                description: "checks params.expect".into(),
                timeout_ms: Some(60_000),
                max_attempts: None,
            }],
            params_schema: Some(
                r#"{"type": "object", "properties": {"expect": {"type": "string"}}}"#.into(),
            ),
        }
    }

    fn run_step(input: StepInput) -> StepOutcome {
        let params: serde_json::Value = match serde_json::from_str(&input.params) {
            Ok(params) => params,
            Err(error) => return StepOutcome::Failed(format!("invalid params: {error}")),
        };
        log::log(Level::Info, &format!("step {} attempt {}", input.step, input.attempt));
        match params["expect"].as_str() {
            Some(expected) if !expected.is_empty() => {
                StepOutcome::Passed(serde_json::json!({"expect": expected}).to_string())
            }
            _ => StepOutcome::Pending("params.expect is not set yet".into()),
        }
    }
}

export!(Plugin);
"##;

/// The languages a check can be scaffolded and built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Javascript,
}

/// Writes the check `name` in `lang` into `dir`, which must not exist yet.
pub fn new_plugin(dir: &Path, name: &PluginName, lang: Lang) -> anyhow::Result<()> {
    anyhow::ensure!(!dir.exists(), "{} already exists", dir.display());
    let crate_name = name.as_str().replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{name}", name.as_str())
            .replace("{crate}", &crate_name)
    };
    let mut files: Vec<(&str, String)> = match lang {
        Lang::Rust => vec![
            ("Cargo.toml", fill(CARGO_TOML)),
            (".cargo/config.toml", CARGO_CONFIG.to_owned()),
            ("src/lib.rs", fill(LIB_RS)),
            (".gitignore", "/target\n".to_owned()),
        ],
        Lang::Python => vec![
            ("app.py", fill(include_str!("scaffold/python/app.py"))),
            (
                "stepwise.py",
                include_str!("../../plugins/event-pipeline-py/stepwise.py").to_owned(),
            ),
            (
                "pyproject.toml",
                fill(include_str!("scaffold/python/pyproject.toml")),
            ),
            ("README.md", fill(include_str!("scaffold/python/README.md"))),
            (
                ".gitignore",
                include_str!("scaffold/python/gitignore").to_owned(),
            ),
        ],
        Lang::Javascript => vec![
            ("app.js", fill(include_str!("scaffold/javascript/app.js"))),
            (
                "stepwise.js",
                include_str!("../../plugins/event-pipeline-js/stepwise.js").to_owned(),
            ),
            (
                "package.json",
                fill(include_str!("scaffold/javascript/package.json")),
            ),
            (
                "README.md",
                fill(include_str!("scaffold/javascript/README.md")),
            ),
            (
                ".gitignore",
                include_str!("scaffold/javascript/gitignore").to_owned(),
            ),
        ],
    };
    files.extend(
        WIT_FILES
            .iter()
            .map(|(path, text)| (*path, (*text).to_owned())),
    );
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
