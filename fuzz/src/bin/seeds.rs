//! Writes the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --bin seeds`
//! (uninstrumented; `scripts/fuzz` builds only the targets).

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, name, bytes) in viommu_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(name), &bytes).expect("seed file");
        println!("{target}/{name}: {} bytes", bytes.len());
    }
}
