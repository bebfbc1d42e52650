//! The `viommu` command (work in progress: see issue 5).
fn main() {
    eprintln!("viommu: not built yet");
    std::process::exit(2);
}
