//! SHA-256 digests as lower-case hexadecimal, for the checkpoint manifest, the pretrained-weight
//! check and the teacher cache's file names. A leaf module: it depends on nothing in the crate.

use sha2::{Digest, Sha256};

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes`, in lower-case hexadecimal.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}
