//! Used by build scripts (`tests/build.rs`, `demo/build.rs`): compiles Stepwise plugins to
//! `wasm32-wasip2` components with a nested cargo, adding the target first when the toolchain
//! lacks it, so that `cargo test` and `cargo run -p stepwise-demo` work on a machine that only
//! has Rust installed.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// Builds `packages` (workspace package names) in release mode and returns each one's `.wasm`.
pub fn build_plugins(packages: &[&str]) -> Vec<(String, PathBuf)> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run from a build script"));
    let workspace = workspace_root(&manifest_dir);
    ensure_target();

    // Its own target dir: the outer cargo holds the lock on the outer one for the whole build.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("run from a build script"));
    let target_dir = out_dir.join("wasm-plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args(["build", "--release", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    for package in packages {
        command.args(["-p", package]);
    }
    // The outer build's flags are for the host target; they must not leak into the wasm build.
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
            "building plugins {packages:?} for {TARGET} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    println!("cargo:rerun-if-changed={}", workspace.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("plugins/sdk").display()
    );
    packages
        .iter()
        .map(|package| {
            let dir = package_dir(&workspace, package);
            println!("cargo:rerun-if-changed={}", dir.join("src").display());
            println!(
                "cargo:rerun-if-changed={}",
                dir.join("Cargo.toml").display()
            );
            let file = format!("{}.wasm", package.replace('-', "_"));
            let wasm = target_dir.join(TARGET).join("release").join(file);
            assert!(
                wasm.exists(),
                "cargo built {package} but {} is missing",
                wasm.display()
            );
            (package.to_string(), wasm)
        })
        .collect()
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
