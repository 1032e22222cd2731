//! The daemon's small text parsers on arbitrary bytes: `WWW-Authenticate` challenges,
//! `Content-Range`, `Retry-After`, a docker `config.json` (its credentials for
//! `localhost:5000`) and image references (checked against oci-spec's parser).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd::fuzzing;

fuzz_target!(|data: &[u8]| {
    let headers = fuzzing::registry_headers(data);
    if let Some((a, b, total)) = headers.content_range {
        // Parsed as written; the caller checks the range against its request.
        let text = String::from_utf8_lossy(data);
        assert!(text.contains(&a.to_string()) && text.contains(&b.to_string()));
        if let Some(t) = total {
            assert!(text.contains(&t.to_string()));
        }
    }
    if let Some(d) = headers.retry_after {
        assert!(d.as_secs() <= 3600, "Retry-After is capped");
    }
    if let Err(e) = fuzzing::docker_config(data, "localhost:5000") {
        assert!(format!("{e:#}").contains("config.json"), "{e:#}");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(printed) = fuzzing::image_ref(s) {
            // What parses prints back to a reference that parses to the same thing.
            let again = fuzzing::image_ref(&printed).expect("a printed reference parses");
            assert_eq!(again, printed);
        }
        // ovbd's reference parser takes what oci-spec's does (whose tags may be Unicode `\w`).
        if s.is_ascii() {
            let (ours, theirs) = fuzzing::registry_ref_both(s);
            assert_eq!(ours, theirs, "{s:?}");
        }
    }
});
