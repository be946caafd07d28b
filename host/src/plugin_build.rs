//! `stepwise plugin build [DIR]`: builds a check in any of the three languages that
//! `stepwise plugin new` scaffolds, with that language's own component toolchain, and returns
//! the `.wasm` it wrote. The toolchain's output goes to stderr, so that the path is the last
//! line on stdout.
//!
//! A missing toolchain is installed into the project the way its own ecosystem would: a
//! `.venv` with the componentize-py that `pyproject.toml` names, `npm install` for the
//! componentize-js that `package.json` names, the `wasm32-wasip2` target through rustup. The
//! environment variables `STEPWISE_COMPONENTIZE_PY` and `STEPWISE_COMPONENTIZE_JS` point at an
//! installed one instead (the test suite's, under the cache directory).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::model::PluginName;

/// The componentize-py a Python project gets when its `pyproject.toml` names none.
const COMPONENTIZE_PY: &str = "0.25.1";
const WASM_TARGET: &str = "wasm32-wasip2";

/// What `DIR` holds, as far as building it goes. `name` is the plugin's, which names the
/// `.wasm` of a Python or JavaScript check.
#[derive(Debug)]
enum Project {
    Rust,
    Python {
        name: String,
        /// The version installed when none is found.
        componentize_py: String,
    },
    Javascript {
        name: String,
        /// The entry module, `package.json`'s `main`.
        entry: String,
    },
}

/// Builds the check in `dir` and returns the path of its component.
pub fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    // Absolute, because the toolchains run inside it: a relative `x/.venv/bin/…` would be
    // looked up from there.
    let dir = &std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    match detect(dir)? {
        Project::Rust => build_rust(dir),
        Project::Python {
            name,
            componentize_py,
        } => build_python(dir, &name, &componentize_py),
        Project::Javascript { name, entry } => build_javascript(dir, &name, &entry),
    }
}

fn detect(dir: &Path) -> anyhow::Result<Project> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    if dir.join("Cargo.toml").is_file() {
        return Ok(Project::Rust);
    }
    if dir.join("package.json").is_file() {
        let path = dir.join("package.json");
        let text = read(&path)?;
        let package: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let name = plugin_name(package["name"].as_str(), &path, "\"name\"")?;
        let entry = package["main"].as_str().unwrap_or("app.js").to_owned();
        anyhow::ensure!(
            dir.join(&entry).is_file(),
            "{} names {entry} as \"main\", which does not exist",
            path.display()
        );
        return Ok(Project::Javascript { name, entry });
    }
    if dir.join("pyproject.toml").is_file() {
        let path = dir.join("pyproject.toml");
        let text = read(&path)?;
        let project: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
        let name = project
            .get("project")
            .and_then(|project| project.get("name"))
            .and_then(toml::Value::as_str);
        let name = plugin_name(name, &path, "[project] name")?;
        let componentize_py = project
            .get("tool")
            .and_then(|tool| tool.get("stepwise"))
            .and_then(|stepwise| stepwise.get("componentize-py"))
            .and_then(toml::Value::as_str)
            .unwrap_or(COMPONENTIZE_PY)
            .to_owned();
        anyhow::ensure!(
            dir.join("app.py").is_file(),
            "{} has no app.py: the check's module must be app.py (class WitWorld)",
            dir.display()
        );
        return Ok(Project::Python {
            name,
            componentize_py,
        });
    }
    anyhow::bail!(
        "{} holds no Cargo.toml, pyproject.toml or package.json: start a check with \
         `stepwise plugin new NAME --lang rust|python|javascript`",
        dir.display()
    )
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn plugin_name(name: Option<&str>, file: &Path, key: &str) -> anyhow::Result<String> {
    let name = name.with_context(|| format!("{} has no {key}", file.display()))?;
    let name = PluginName::parse(name)
        .map_err(|error| anyhow::anyhow!("{}: {key}: {error}", file.display()))?;
    Ok(name.as_str().to_owned())
}

/// `cargo build --release`, reading the component's path from cargo's own report, so that any
/// target dir or profile the user configured is honoured.
fn build_rust(dir: &Path) -> anyhow::Result<PathBuf> {
    ensure_wasm_target();
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(dir)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    anyhow::ensure!(output.status.success(), "cargo build failed");
    let wasm = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .flat_map(|message| message["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|file| file.as_str().map(PathBuf::from))
        .rfind(|file| {
            file.extension()
                .is_some_and(|extension| extension == "wasm")
        });
    wasm.context(
        "cargo built no .wasm: a check's crate has crate-type = [\"cdylib\"] and builds for \
         wasm32-wasip2 (.cargo/config.toml: [build] target = \"wasm32-wasip2\")",
    )
}

/// Adds the wasm target when rustup manages the toolchain and lacks it (a fresh install does).
fn ensure_wasm_target() {
    let Ok(installed) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        return;
    };
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.trim() == WASM_TARGET)
    {
        return;
    }
    eprintln!("installing the {WASM_TARGET} target with rustup");
    // A failure shows in cargo's own error just after.
    let _ = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .stdout(Stdio::null())
        .status();
}

fn build_python(dir: &Path, name: &str, version: &str) -> anyhow::Result<PathBuf> {
    let componentize = componentize_py(dir, version)?;
    let out = output_path(dir, name)?;
    let status = Command::new(&componentize)
        .current_dir(dir)
        .args([
            "-d",
            "wit",
            "-w",
            "check",
            "componentize",
            "-p",
            ".",
            "app",
            "-o",
        ])
        .arg(&out)
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("running {}", componentize.display()))?;
    anyhow::ensure!(status.success(), "componentize-py failed");
    Ok(out)
}

fn componentize_py(dir: &Path, version: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("STEPWISE_COMPONENTIZE_PY") {
        return Ok(PathBuf::from(path));
    }
    let venv = dir.join(".venv");
    let local = venv.join("bin/componentize-py");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(found) = on_path("componentize-py") {
        return Ok(found);
    }
    eprintln!(
        "installing componentize-py {version} into {}",
        venv.display()
    );
    let python = on_path("python3").context(
        "componentize-py is not installed and there is no python3 to install it with: \
         install Python 3.11 or later, or set STEPWISE_COMPONENTIZE_PY",
    )?;
    run(Command::new(python).arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("componentize-py=={version}"),
    ]))?;
    Ok(local)
}

fn build_javascript(dir: &Path, name: &str, entry: &str) -> anyhow::Result<PathBuf> {
    let componentize = componentize_js(dir)?;
    let out = output_path(dir, name)?;
    let status = Command::new(&componentize)
        .current_dir(dir)
        .arg(entry)
        .args(["--wit", "wit", "--world-name", "check", "-o"])
        .arg(&out)
        .stdout(std::io::stderr())
        .status()
        .with_context(|| {
            format!(
                "running {} (it needs Node.js 20 or later)",
                componentize.display()
            )
        })?;
    anyhow::ensure!(status.success(), "componentize-js failed");
    Ok(out)
}

fn componentize_js(dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("STEPWISE_COMPONENTIZE_JS") {
        return Ok(PathBuf::from(path));
    }
    let local = dir.join("node_modules/.bin/componentize-js");
    if !local.is_file() {
        eprintln!("installing componentize-js with npm install");
        let npm = on_path("npm").context(
            "componentize-js is not installed and there is no npm to install it with: \
             install Node.js 20 or later, or set STEPWISE_COMPONENTIZE_JS",
        )?;
        run(Command::new(npm)
            .current_dir(dir)
            .args(["install", "--no-audit", "--no-fund"]))?;
        anyhow::ensure!(
            local.is_file(),
            "npm install did not install componentize-js: package.json's devDependencies \
             must list @bytecodealliance/componentize-js"
        );
    }
    Ok(local)
}

/// `DIR/dist/NAME.wasm`, with `dist/` created.
fn output_path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dist = dir.join("dist");
    std::fs::create_dir_all(&dist).with_context(|| format!("creating {}", dist.display()))?;
    Ok(dist.join(format!("{name}.wasm")))
}

/// Runs a set-up command with its output on stderr.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    anyhow::ensure!(
        status.success(),
        "{:?} failed ({status})",
        command.get_program()
    );
    Ok(())
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaffold::Lang;

    impl Project {
        fn lang(&self) -> Lang {
            match self {
                Project::Rust => Lang::Rust,
                Project::Python { .. } => Lang::Python,
                Project::Javascript { .. } => Lang::Javascript,
            }
        }

        fn name(&self) -> &str {
            match self {
                Project::Rust => "",
                Project::Python { name, .. } | Project::Javascript { name, .. } => name,
            }
        }
    }

    #[test]
    fn a_directory_is_built_in_the_language_its_manifest_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = PluginName::parse("probe").expect("a valid name");
        for (lang, sub) in [
            (Lang::Rust, "rust"),
            (Lang::Python, "python"),
            (Lang::Javascript, "javascript"),
        ] {
            let project_dir = dir.path().join(sub);
            crate::scaffold::new_plugin(&project_dir, &name, lang).expect("scaffolding");
            let project = detect(&project_dir).expect("detected");
            assert_eq!(project.lang(), lang);
            if lang != Lang::Rust {
                assert_eq!(project.name(), "probe");
            }
        }
        let error = detect(dir.path())
            .expect_err("nothing to build")
            .to_string();
        assert!(error.contains("stepwise plugin new"), "{error}");
    }

    #[test]
    fn a_manifest_without_a_valid_plugin_name_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("package.json"), r#"{"name": "Bad Name"}"#).unwrap();
        std::fs::write(dir.path().join("app.js"), "").unwrap();
        let error = detect(dir.path()).expect_err("a bad name").to_string();
        assert!(error.contains("\"name\""), "{error}");
    }
}
