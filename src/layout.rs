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
//!
//! A volume formatted with `--shards N` (N > 1) spreads its blocks over N key prefixes, so that
//! an S3 bucket can split its request-rate partitions among them:
//!
//! ```text
//! <volume>/chunks/s<shard>/<id / 1_000_000>/<id / 1_000>/<id>_<block index>_<block length>
//! ```
//!
//! where `shard` is a fixed hash of the slice id and block index modulo N ([`shard_of`]), so
//! the blocks of one file land on every prefix. Every block key still starts with
//! `<volume>/chunks/`.

use tidefs_meta::Format;
pub use tidefs_meta::CHUNK_SIZE;

/// Naming and sizing of the blocks of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    volume: String,
    block_size: u32,
    shards: u32,
}

/// The shard (of `shards`) holding block `index` of slice `id`. Part of the on-disk format:
/// it must never change.
pub fn shard_of(id: u64, index: u32, shards: u32) -> u32 {
    const MIX: u64 = 0x9E37_79B9_7F4A_7C15;
    let h = (id.wrapping_mul(MIX) ^ index as u64).wrapping_mul(MIX);
    ((h >> 32) % shards.max(1) as u64) as u32
}

impl Layout {
    /// The layout of volume `volume` with blocks of `block_size` bytes, on one prefix.
    pub fn new(volume: &str, block_size: u32) -> Self {
        assert!(block_size > 0 && CHUNK_SIZE % block_size as u64 == 0);
        Layout {
            volume: volume.to_string(),
            block_size,
            shards: 1,
        }
    }

    /// The layout a volume was formatted with.
    pub fn of(format: &Format) -> Self {
        Layout {
            shards: format.shards.max(1),
            ..Layout::new(&format.name, format.block_size)
        }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The key of block `index` (of length `len`) of slice `id`.
    pub fn block_key(&self, id: u64, index: u32, len: u32) -> String {
        let (vol, hi, lo) = (&self.volume, id / 1_000_000, id / 1_000);
        if self.shards > 1 {
            let shard = shard_of(id, index, self.shards);
            format!("{vol}/chunks/s{shard}/{hi}/{lo}/{id}_{index}_{len}")
        } else {
            format!("{vol}/chunks/{hi}/{lo}/{id}_{index}_{len}")
        }
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

    /// The (slice id, block index, block length) that a block key of this volume names; None
    /// for any other key.
    pub fn parse_key(&self, key: &str) -> Option<(u64, u32, u32)> {
        let name = key.strip_prefix(&self.prefix())?.rsplit('/').next()?;
        let mut parts = name.split('_');
        let id = parts.next()?.parse().ok()?;
        let index = parts.next()?.parse().ok()?;
        let len = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        (self.block_key(id, index, len) == key).then_some((id, index, len))
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
    fn shards_spread_blocks_and_never_move() {
        let format = Format {
            name: "vol".into(),
            block_size: 4 << 20,
            shards: 16,
            ..tidefs_meta::conformance::sample_format()
        };
        let l = Layout::of(&format);
        // Pinned: a change here would lose every sharded volume's data.
        assert_eq!(
            l.block_key(1_234_567, 3, 100),
            format!(
                "vol/chunks/s{}/1/1234/1234567_3_100",
                shard_of(1_234_567, 3, 16)
            )
        );
        assert_eq!(
            [
                shard_of(1, 0, 16),
                shard_of(1, 1, 16),
                shard_of(2, 0, 16),
                shard_of(1000, 7, 16)
            ],
            [2, 9, 5, 8]
        );
        // Consecutive slices and the blocks of one slice both spread evenly.
        let mut per_shard = [0u32; 16];
        for id in 1..=1000u64 {
            for index in 0..16 {
                per_shard[shard_of(id, index, 16) as usize] += 1;
            }
        }
        assert!(
            per_shard.iter().all(|&n| (800..1200).contains(&n)),
            "{per_shard:?}"
        );
        let one_file: std::collections::HashSet<u32> =
            (0..16).map(|i| shard_of(42, i, 16)).collect();
        assert!(one_file.len() >= 8, "{one_file:?}");
        assert!(l.block_key(9, 0, 1).starts_with(&l.prefix()));
        // Unsharded volumes keep the original keys.
        let plain = Layout::of(&Format {
            shards: 1,
            ..format
        });
        assert_eq!(plain.block_key(7, 0, 1), "vol/chunks/0/0/7_0_1");
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
        assert_eq!(l.parse_key("v/chunks/0/0/5_2_452"), Some((5, 2, 452)));
        for foreign in [
            "v/chunks/0/0/5_2",
            "v/chunks/0/0/5_2_452_1",
            "v/chunks/0/9/5_2_452",
            "v/chunks/0/0/x_2_452",
            "w/chunks/0/0/5_2_452",
            "v/.probe-1",
        ] {
            assert_eq!(l.parse_key(foreign), None, "{foreign}");
        }
        let sharded = Layout {
            shards: 8,
            ..l.clone()
        };
        let key = sharded.block_key(123_456, 1, 1024);
        assert_eq!(sharded.parse_key(&key), Some((123_456, 1, 1024)));
        assert_eq!(
            l.parse_key(&key),
            None,
            "a sharded key is foreign to an unsharded layout"
        );
        assert!(l.slice_keys(5, 0).is_empty());
        assert_eq!(l.block_len(2500, 2), 452);
    }
}
