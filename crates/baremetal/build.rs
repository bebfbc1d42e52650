//! Link flags of the freestanding kernel binary, for that binary only: the
//! library and its tests link as usual. Our linker script, no C start
//! files or libraries, static and not position-independent (the 32-bit
//! entry stub uses absolute addresses). With these,
//! `cargo build --profile baremetal -p viommu-baremetal --features kernel`
//! links a bootable binary by itself; scripts/baremetal-build adds
//! `-C relocation-model=static` (no GOT).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    if std::env::var_os("CARGO_FEATURE_KERNEL").is_some() {
        let bin = "viommu-baremetal";
        for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"] {
            println!("cargo:rustc-link-arg-bin={bin}={arg}");
        }
        println!("cargo:rustc-link-arg-bin={bin}=-T{dir}/link.ld");
    }
}
