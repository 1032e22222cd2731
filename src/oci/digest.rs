//! sha256 digests as OCI writes them (`sha256:` and 64 lowercase hex digits) and the chain IDs
//! of layer stacks (image-spec config.md: the bottom layer's diff ID, then
//! `sha256(parent chain ID + " " + diff ID)`), which containerd names layer snapshots by.

use sha2::{Digest as _, Sha256};

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// The `sha256:` digest of `data`.
pub(crate) fn digest_of(data: &[u8]) -> String {
    digest_of_hashed(Sha256::new_with_prefix(data))
}

/// The `sha256:` digest of what `hasher` has been fed.
pub(crate) fn digest_of_hashed(hasher: Sha256) -> String {
    format!("sha256:{}", hex(&hasher.finalize()))
}

/// Whether `d` is `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`: safe as a
/// file name and in a URL.
pub(crate) fn valid_digest(d: &str) -> bool {
    let Some((algo, hex)) = d.split_once(':') else {
        return false;
    };
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == want && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `d` is `sha256:` and 64 lowercase hex digits, the only form ovbd puts into labels.
pub(crate) fn is_sha256_digest(d: &str) -> bool {
    d.starts_with("sha256:") && valid_digest(d)
}

/// The chain ID of a layer with diff ID `diff_id` on a layer whose chain ID is `parent_chain`.
pub(crate) fn chain_id_above(parent_chain: &str, diff_id: &str) -> String {
    digest_of(format!("{parent_chain} {diff_id}").as_bytes())
}

/// The chain IDs of a stack of layers with diff IDs `diff_ids`, bottom first.
pub(crate) fn chain_ids<S: AsRef<str>>(diff_ids: &[S]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.as_ref().to_owned(),
            Some(parent) => chain_id_above(parent, d.as_ref()),
        };
        out.push(id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_of_known_inputs() {
        // FIPS 180-2's "abc" and the empty input.
        assert_eq!(
            digest_of(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = Sha256::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(digest_of_hashed(h), digest_of(b"abc"));
        // A blob of the fixture layout is named by its digest.
        let name = "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";
        let blob = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hello-world-oci/blobs/sha256")
                .join(name),
        )
        .unwrap();
        assert_eq!(digest_of(&blob), format!("sha256:{name}"));
        assert_eq!(hex(&[0x00, 0x0a, 0xff]), "000aff");
    }

    #[test]
    fn sha256_digest_form() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert!(is_sha256_digest(&good));
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "a".repeat(65)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "../".repeat(21) + "a"),
            "a".repeat(64),
        ] {
            assert!(!is_sha256_digest(&bad), "{bad}");
        }
    }

    #[test]
    fn chain_ids_of_real_images() {
        // hello-world (amd64, the fixture's docker manifest): one layer, its chain ID is its
        // diff ID, as `ctr snapshots ls` shows it.
        let hello = "sha256:01bb4fce3eb1b56b05adf99504dafd31907a5aadac736e36b27595c8b92f07f1";
        assert_eq!(chain_ids(&[hello]), vec![hello.to_string()]);
        // The diff IDs of image-spec config.md's example, with hello-world's on top. Expected
        // values made independently in a shell:
        //   c2=sha256:$(printf '%s %s' "$d1" "$d2" | sha256sum | cut -d' ' -f1)
        //   c3=sha256:$(printf '%s %s' "$c2" "$d3" | sha256sum | cut -d' ' -f1)
        let d1 = "sha256:c6f988f4874bb0add23a778f753c65efe992244e148a1d2ec2a8b664fb66bbd1";
        let d2 = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";
        let ids = chain_ids(&[d1, d2, hello]);
        assert_eq!(
            ids,
            vec![
                d1.to_string(),
                "sha256:c3191d32a37d7159b2e30830937d2e30268ad6c375a773a8994911a3aba9b93f".into(),
                "sha256:87ba4a7969f2e5901c6f629c7581587666c7593554b217db71e2999dd50b4fcb".into(),
            ]
        );
        assert_eq!(chain_id_above(&ids[1], hello), ids[2]);
        assert!(chain_ids::<String>(&[]).is_empty());
    }
}
