//! Data in and out: the built-in synthetic dataset, COCO and label-map readers and writers,
//! transforms, and the parallel loader.

pub mod coco;
pub mod config;
pub mod detection;
pub mod export;
pub mod images;
pub mod labelmap;
pub mod loader;
pub mod segmentation;
pub mod synth;
pub mod transforms;

/// Mixes several integers into one well-distributed seed (SplitMix64 steps), so that nearby
/// inputs such as consecutive sample indices give unrelated random streams.
pub fn derive_seed(parts: &[u64]) -> u64 {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        state ^= p;
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        state = z ^ (z >> 31);
    }
    state
}
