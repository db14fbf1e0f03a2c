//! Fuzz the document path parser (CLI, API and config input): never panics, and whatever
//! parses formats back to a string that parses to the same path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = lichen_crdt::parse_path(s) {
        let text = lichen_crdt::format_path(&p);
        assert_eq!(lichen_crdt::parse_path(&text).as_ref(), Ok(&p));
    }
});
