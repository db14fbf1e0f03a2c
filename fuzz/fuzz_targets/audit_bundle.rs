//! Fuzz the audit bundle decoder and verifier: arbitrary bytes never panic; whatever
//! decodes re-encodes to the same bytes; verification (which ingests the bundle into an
//! in-memory store) only ever returns a verified bundle or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lichen_crdt::audit::{verify, Bundle};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Bundle::decode(data) {
        assert_eq!(b.encode().as_slice(), data);
        let _ = verify(data, &b.cluster);
    }
});
