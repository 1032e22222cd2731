//! trace::parse_trace and parse_priority_list (upstream's prefetch inputs) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::trace::{encode_trace, parse_priority_list, parse_trace, TraceError};

fuzz_target!(|data: &[u8]| {
    match parse_trace(data, "trace") {
        Ok(records) => {
            assert_eq!(data.len(), 24 + 24 * records.len());
            // What parses encodes to the same records (padding aside).
            let again = parse_trace(&encode_trace(&records), "trace").expect("re-encoded");
            assert_eq!(again, records);
        }
        Err(TraceError::Corrupt { offset, .. }) => assert!(offset <= data.len() as u64),
        Err(e) => panic!("unexpected error {e}"),
    }
    match parse_priority_list(data, "list") {
        Ok(entries) => assert!(entries.len() <= data.len()),
        Err(TraceError::ListTooLarge { size, .. }) => assert_eq!(size, data.len()),
        Err(e) => panic!("unexpected error {e}"),
    }
});
