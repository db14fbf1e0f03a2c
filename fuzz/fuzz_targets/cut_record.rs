//! Fuzz the compaction cut-record decoder (`lichen_crdt::compaction::CutRecord::decode`):
//! arbitrary bytes never panic; whatever decodes re-encodes to the same bytes, with the stated
//! length; verification and the base check run on attacker bytes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lichen_crdt::compaction::{check_base, CutRecord};
use lichen_crdt::Membership;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = CutRecord::decode(data) {
        assert_eq!(r.encode().as_slice(), data);
        assert_eq!(r.encoded_len(), data.len());
        let _ = r.verify(&[0; 32], &Membership::default());
        let _ = check_base(&r, data);
        let _ = r.hash();
    }
});
