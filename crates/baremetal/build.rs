//! Link flags of the freestanding kernel binary, for that binary only: the
//! library and its tests link as usual.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    if std::env::var_os("CARGO_FEATURE_KERNEL").is_some() {
        let bin = "viommu-baremetal";
        for arg in ["-nostartfiles", "-nostdlib", "-static", "-Wl,--build-id=none"] {
            println!("cargo:rustc-link-arg-bin={bin}={arg}");
        }
        println!("cargo:rustc-link-arg-bin={bin}=-T{dir}/link.ld");
    }
}
