//! Generates bindings to e2fsprogs' libext2fs: the converter writes ext4 in user space through it
//! (as upstream's userspace converter does), so converting needs no block device, mount or root.
//! And the control API's gRPC code (proto/ovbd/control/v1/control.proto, `ovbd status`).

fn main() {
    println!("cargo:rerun-if-changed=proto/ovbd/control/v1/control.proto");
    tonic_build::configure()
        // `ovbd status --json` prints the answer as it came.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile(&["proto/ovbd/control/v1/control.proto"], &["proto"])
        .expect("compiling proto/ovbd/control/v1/control.proto (needs protoc: scripts/setup.sh)");
    println!("cargo:rerun-if-changed=src/extfs/ext2fs.h");
    println!("cargo:rustc-link-lib=ext2fs");
    println!("cargo:rustc-link-lib=com_err");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    bindgen::Builder::default()
        .header("src/extfs/ext2fs.h")
        .allowlist_function("ext2fs_.*|error_message")
        .allowlist_type("ext2_.*|ext2fs_.*|struct_io_.*|io_channel|io_manager|io_stats")
        .allowlist_var("EXT[234]_.*|EXT2FS_.*|LINUX_S_.*|IO_FLAG_.*|BLOCK_FLAG_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .expect("bindgen on libext2fs headers (install libext2fs-dev: scripts/setup.sh)")
        .write_to_file(out.join("ext2fs.rs"))
        .expect("write ext2fs bindings");
}
