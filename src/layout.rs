//! Where a file's bytes live: chunk and block arithmetic and object key names.
//!
//! A file is cut into chunks of [`CHUNK_SIZE`] bytes. Each write becomes a slice within one
//! chunk; a slice's bytes are stored as blocks of at most `block_size` bytes, each an immutable
//! object named
//!
//! ```text
//! <volume>/chunks/<id / 1_000_000>/<id / 1_000>/<id>_<block index>_<block length>
//! ```
//!
//! The two directory levels keep listings and local directories small; the block length in the
//! name lets readers and gc check an object's size without metadata.

pub use tidefs_meta::CHUNK_SIZE;

/// Naming and sizing of the blocks of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    volume: String,
    block_size: u32,
}

impl Layout {
    /// The layout of volume `volume` with blocks of `block_size` bytes.
    pub fn new(volume: &str, block_size: u32) -> Self {
        assert!(block_size > 0 && CHUNK_SIZE % block_size as u64 == 0);
        Layout {
            volume: volume.to_string(),
            block_size,
        }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The key of block `index` (of length `len`) of slice `id`.
    pub fn block_key(&self, id: u64, index: u32, len: u32) -> String {
        format!(
            "{}/chunks/{}/{}/{}_{}_{}",
            self.volume,
            id / 1_000_000,
            id / 1_000,
            id,
            index,
            len
        )
    }

    /// Length of block `index` of a slice holding `size` bytes.
    pub fn block_len(&self, size: u32, index: u32) -> u32 {
        let start = index as u64 * self.block_size as u64;
        (size as u64 - start).min(self.block_size as u64) as u32
    }

    /// The keys of every block of slice `id` holding `size` bytes.
    pub fn slice_keys(&self, id: u64, size: u32) -> Vec<String> {
        let blocks = size.div_ceil(self.block_size);
        (0..blocks)
            .map(|i| self.block_key(id, i, self.block_len(size, i)))
            .collect()
    }

    /// The prefix of every block key of this volume.
    pub fn prefix(&self) -> String {
        format!("{}/chunks/", self.volume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_scheme() {
        let l = Layout::new("vol", 4 << 20);
        assert_eq!(
            l.block_key(1_234_567, 3, 100),
            "vol/chunks/1/1234/1234567_3_100"
        );
        assert_eq!(l.block_key(7, 0, 4 << 20), "vol/chunks/0/0/7_0_4194304");
        assert!(l.block_key(7, 0, 1).starts_with(&l.prefix()));
    }

    #[test]
    fn slices_split_into_full_blocks_and_a_tail() {
        let l = Layout::new("v", 1024);
        assert_eq!(
            l.slice_keys(5, 2500),
            [
                "v/chunks/0/0/5_0_1024",
                "v/chunks/0/0/5_1_1024",
                "v/chunks/0/0/5_2_452"
            ]
        );
        assert_eq!(l.slice_keys(5, 2048).len(), 2);
        assert!(l.slice_keys(5, 0).is_empty());
        assert_eq!(l.block_len(2500, 2), 452);
    }
}
