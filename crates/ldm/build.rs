//! Builds the demo model's weights into the library when `assets/demo/model.safetensors` exists
//! (`cargo xtask train-demo` writes it; the repository ships it). Without the file, `ldm::demo`
//! reports that no demo model is built in.

fn main() {
    let weights = std::path::Path::new("assets/demo/model.safetensors");
    println!("cargo::rerun-if-changed=assets/demo/model.safetensors");
    println!("cargo::rustc-check-cfg=cfg(ldm_demo_weights)");
    if weights.is_file() {
        println!("cargo::rustc-cfg=ldm_demo_weights");
    }
}
