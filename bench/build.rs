//! Compiles the plugins the benchmarks load.

fn main() {
    let mut built = stepwise_plugin_build::build_plugins(&["stepwise-plugin-misbehave"]);
    // A second version of it, to shadow the first in `steps`.
    built.extend(stepwise_plugin_build::build_plugin_variants(
        "stepwise-plugin-misbehave",
        &[("variant-b", "misbehave-b")],
    ));
    stepwise_plugin_build::write_path_constants(&built);
}
