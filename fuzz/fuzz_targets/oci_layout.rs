//! An OCI image layout built from arbitrary bytes, resolved as `ovbd convert oci:DIR:t`
//! resolves it: index.json, nested indexes, the manifest and the config (sizes and digests
//! checked), then the config's diff_ids and creation time.
//!
//! Input: NUL-separated parts, index.json first, then blobs 1..9; `@N` / `#N` in a part
//! stand for blob N's digest / length (see `ovbd_fuzz::write_layout`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layout = ovbd_fuzz::scratch_dir("oci").join("layout");
    let _ = std::fs::remove_dir_all(&layout);
    ovbd_fuzz::write_layout(&layout, &ovbd_fuzz::layout_parts(data)).expect("writing the layout");
    match ovbd::fuzzing::oci_layout(&layout) {
        Ok(layers) => assert!(layers > 0, "an image without layers is refused"),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(!msg.is_empty());
        }
    }
});
