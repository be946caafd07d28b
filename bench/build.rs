//! Compiles the plugins the benchmarks load.

fn main() {
    let built = stepwise_plugin_build::build_plugins(&["stepwise-plugin-misbehave"]);
    stepwise_plugin_build::write_path_constants(&built);
}
