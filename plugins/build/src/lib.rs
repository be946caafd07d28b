//! Used by build scripts (`tests/build.rs`, `demo/build.rs`): compiles Stepwise plugins to
//! `wasm32-wasip2` components with a nested cargo, adding the target first when the toolchain
//! lacks it, so that `cargo test` and `cargo run -p stepwise-demo` work on a machine that only
//! has Rust installed.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// Builds `packages` (workspace package names) in release mode and returns each one's `.wasm`.
pub fn build_plugins(packages: &[&str]) -> Vec<(String, PathBuf)> {
    let build = Build::new();
    build.cargo(packages, None);
    packages
        .iter()
        .map(|package| (package.to_string(), build.keep(package, package)))
        .collect()
}

/// Builds `package` once per `(features, name)` pair, with those cargo features, and returns
/// each build's `.wasm` under its `name`: several versions of one plugin, for tests of
/// uploads and swaps.
pub fn build_plugin_variants(package: &str, variants: &[(&str, &str)]) -> Vec<(String, PathBuf)> {
    let build = Build::new();
    variants
        .iter()
        .map(|(features, name)| {
            build.cargo(&[package], Some(features));
            (name.to_string(), build.keep(package, name))
        })
        .collect()
}

/// Writes `$OUT_DIR/plugins.rs` with one constant per built plugin, named after it
/// (`stepwise-plugin-http-status` → `HTTP_STATUS_WASM`), for `include!` in the crate.
pub fn write_path_constants(built: &[(String, PathBuf)]) {
    let mut constants = String::new();
    for (name, path) in built {
        let constant = name
            .trim_start_matches("stepwise-plugin-")
            .replace('-', "_")
            .to_uppercase();
        constants.push_str(&format!(
            "pub const {constant}_WASM: &str = {:?};\n",
            path.display().to_string()
        ));
    }
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    std::fs::write(format!("{out_dir}/plugins.rs"), constants).expect("writing plugins.rs");
}

struct Build {
    workspace: PathBuf,
    /// Its own target dir: the outer cargo holds the lock on the outer one for the whole build.
    target_dir: PathBuf,
}

impl Build {
    fn new() -> Build {
        let manifest_dir =
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run from a build script"));
        let workspace = workspace_root(&manifest_dir);
        ensure_target();
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("run from a build script"));
        println!("cargo:rerun-if-changed={}", workspace.join("wit").display());
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join("plugins/sdk").display()
        );
        Build {
            workspace,
            target_dir: out_dir.join("wasm-plugins"),
        }
    }

    fn cargo(&self, packages: &[&str], features: Option<&str>) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .current_dir(&self.workspace)
            .args(["build", "--release", "--target", TARGET])
            .arg("--target-dir")
            .arg(&self.target_dir);
        for package in packages {
            command.args(["-p", package]);
        }
        if let Some(features) = features {
            command.args(["--features", features]);
        }
        // The outer build's flags are for the host target; they must not leak into the wasm
        // build.
        for variable in [
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
        ] {
            command.env_remove(variable);
        }
        for (variable, _) in std::env::vars() {
            if variable.starts_with("CARGO_PROFILE_")
                || variable.starts_with("CARGO_CFG_")
                || variable.starts_with("DEP_")
            {
                command.env_remove(variable);
            }
        }
        let output = command
            .output()
            .expect("running cargo to build the plugins");
        if !output.status.success() {
            panic!(
                "building plugins {packages:?} (features {features:?}) for {TARGET} failed:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// Copies the package's freshly built `.wasm` to `<target dir>/plugins/<name>.wasm`: the
    /// next build of the same package (with other features) overwrites cargo's own output.
    fn keep(&self, package: &str, name: &str) -> PathBuf {
        let dir = package_dir(&self.workspace, package);
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
        let file = format!("{}.wasm", package.replace('-', "_"));
        let built = self.target_dir.join(TARGET).join("release").join(file);
        assert!(
            built.exists(),
            "cargo built {package} but {} is missing",
            built.display()
        );
        let kept_dir = self.target_dir.join("plugins");
        std::fs::create_dir_all(&kept_dir).expect("creating the plugins output dir");
        let kept = kept_dir.join(format!("{name}.wasm"));
        std::fs::copy(&built, &kept).expect("copying a built plugin");
        kept
    }
}

fn workspace_root(start: &Path) -> PathBuf {
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|manifest| manifest.contains("[workspace]"))
        })
        .expect("a Cargo.toml with [workspace] above the build script's crate")
        .to_path_buf()
}

fn package_dir(workspace: &Path, package: &str) -> PathBuf {
    let short = package.trim_start_matches("stepwise-plugin-");
    let candidates = [
        workspace.join("plugins").join(short),
        workspace.join("tests/plugins").join(short),
    ];
    candidates
        .into_iter()
        .find(|dir| dir.join("Cargo.toml").exists())
        .unwrap_or_else(|| panic!("no directory for plugin package {package}"))
}

/// Adds the wasm target when the active toolchain lacks it (a fresh rustup install does).
fn ensure_target() {
    if target_installed() {
        return;
    }
    println!(
        "cargo:warning=installing the {TARGET} target with rustup (needed to build the plugins)"
    );
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .expect("running rustup; install the target with `rustup target add wasm32-wasip2`");
    if added.success() {
        return;
    }
    // Several build scripts (tests, demo) may install it at once, and rustup fails all but one:
    // wait for whichever install is under way to finish.
    for _ in 0..120 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if target_installed() {
            return;
        }
    }
    panic!("`rustup target add {TARGET}` failed; run it by hand and build again");
}

fn target_installed() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .any(|line| line.trim() == TARGET)
        })
        .unwrap_or(false)
}
