//! Fuzz the document path parser (CLI, API and config input): never panics, and whatever
//! parses formats back to a string that parses to the same path (or, if quoting made it longer
//! than the input limit, is refused).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = lichen_crdt::parse_path(s) {
        let text = lichen_crdt::format_path(&p);
        // Quoting can lengthen a path past the 1,024-byte input limit (first fuzz finding:
        // a key full of backslashes); then re-parsing must refuse it, not misread it.
        match lichen_crdt::parse_path(&text) {
            Ok(q) => assert_eq!(q, p),
            Err(e) => assert!(text.len() > 1024, "{e}"),
        }
    }
});
