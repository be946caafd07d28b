//! Compiles the plugins the benchmarks load.

fn main() {
    let built = stepwise_plugin_build::build_plugins(&["stepwise-plugin-misbehave"]);
    let mut constants = String::new();
    for (package, path) in built {
        let constant = package
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
