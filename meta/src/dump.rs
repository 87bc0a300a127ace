//! Portable dumps of a volume's metadata: JSON Lines, the same for every engine.
//!
//! A dump is a header line, then every inode reachable from the root (and the trash) with its
//! xattrs, symlink target and slices, each directory's entries in listing order, and last the
//! slices whose objects are still to delete. It is written and read one record at a time, so
//! neither side holds the volume in memory: a dump keeps only the inode numbers of files with
//! several links (to write each once) and one page of entries per directory level.
//!
//! Inode numbers and slice ids are kept, so a loaded volume uses the same objects. Files open
//! but unlinked on some mount, sessions and engine-private numbers (readdir cookies) are not
//! dumped; usage counters are recomputed on load. Loading into an empty engine and dumping
//! again gives the same bytes, whichever the engines.
//!
//! A dump walks the live volume: for a point-in-time copy, dump a volume no mount writes to.

use crate::types::*;
use crate::{Meta, MetaError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, Write};

/// The version written in a dump's header; loads refuse other versions.
pub const DUMP_VERSION: u32 = 1;

/// Entries read from a directory at a time while dumping.
const PAGE: usize = 1000;

/// Bytes that are shown as a JSON string when they are UTF-8, else as `{"hex": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("hex", &hex)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Hex { hex: String },
        }
        match Repr::deserialize(d)? {
            Repr::Text(t) => Ok(Bytes(t.into_bytes())),
            Repr::Hex { hex } => {
                if hex.len() % 2 != 0 {
                    return Err(serde::de::Error::custom("odd number of hex digits"));
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                    .collect::<std::result::Result<Vec<u8>, _>>()
                    .map(Bytes)
                    .map_err(serde::de::Error::custom)
            }
        }
    }
}

/// The first line of a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpHeader {
    /// [`DUMP_VERSION`].
    pub version: u32,
    /// The volume's format.
    pub format: Format,
    /// The next inode number the volume hands out.
    pub next_ino: u64,
    /// The next slice id the volume hands out.
    pub next_slice: u64,
}

/// The slices of one chunk of a file, in the order they apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpChunk {
    /// Chunk index in the file.
    pub index: u32,
    /// Its slices, oldest first.
    pub slices: Vec<Slice>,
}

/// An inode and everything it owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpInode {
    /// Attributes.
    pub attr: Attr,
    /// Symlink target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink: Option<Bytes>,
    /// Extended attributes, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(Bytes, Bytes)>,
    /// Chunks that have slices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<DumpChunk>,
}

/// A directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpEntry {
    /// The directory.
    pub parent: Ino,
    /// The name.
    pub name: Bytes,
    /// The inode it names.
    pub ino: Ino,
    /// That inode's kind.
    pub kind: FileKind,
}

/// One line of a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DumpRecord {
    /// The header, first and once.
    Header(DumpHeader),
    /// An inode, once however many names it has.
    Inode(DumpInode),
    /// A directory entry; a directory's entries come in listing order.
    Entry(DumpEntry),
    /// A slice whose objects are still to delete.
    Freed {
        /// Slice id.
        id: u64,
        /// Bytes stored for it.
        size: u32,
    },
}

/// What a dump or load went through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DumpStats {
    /// Inodes.
    pub inodes: u64,
    /// Directory entries.
    pub entries: u64,
    /// Slices referenced by files.
    pub slices: u64,
    /// Slices waiting for deletion.
    pub freed: u64,
}

impl DumpStats {
    fn count(&mut self, r: &DumpRecord) {
        match r {
            DumpRecord::Header(_) => {}
            DumpRecord::Inode(i) => {
                self.inodes += 1;
                self.slices += i.chunks.iter().map(|c| c.slices.len() as u64).sum::<u64>();
            }
            DumpRecord::Entry(_) => self.entries += 1,
            DumpRecord::Freed { .. } => self.freed += 1,
        }
    }
}

fn io_err(e: std::io::Error) -> MetaError {
    MetaError::Engine(format!("dump: {e}"))
}

/// Writes the metadata of the volume in `meta` to `out` as JSON Lines; `progress` is called
/// after each record with the counts so far.
pub fn dump(
    meta: &dyn Meta,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(&DumpStats),
) -> Result<DumpStats> {
    let (next_ino, next_slice) = meta.id_counters()?;
    let mut w = Writer {
        out,
        stats: DumpStats::default(),
        progress,
        linked: HashSet::new(),
    };
    w.put(&DumpRecord::Header(DumpHeader {
        version: DUMP_VERSION,
        format: meta.load_format()?,
        next_ino,
        next_slice,
    }))?;
    w.tree(meta, meta.getattr(ROOT_INO)?)?;
    match meta.getattr(TRASH_INO) {
        Ok(trash) => w.tree(meta, trash)?,
        Err(MetaError::NotFound) => {}
        Err(e) => return Err(e),
    }
    let mut after = 0;
    loop {
        let page = meta.pending_deletions(after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for f in page {
            w.put(&DumpRecord::Freed {
                id: f.id,
                size: f.size,
            })?;
        }
    }
    w.out.flush().map_err(io_err)?;
    Ok(w.stats)
}

struct Writer<'a> {
    out: &'a mut dyn Write,
    stats: DumpStats,
    progress: &'a mut dyn FnMut(&DumpStats),
    /// Files with several links already written.
    linked: HashSet<Ino>,
}

impl Writer<'_> {
    fn put(&mut self, r: &DumpRecord) -> Result<()> {
        serde_json::to_writer(&mut *self.out, r)
            .map_err(|e| MetaError::Engine(format!("dump: {e}")))?;
        self.out.write_all(b"\n").map_err(io_err)?;
        self.stats.count(r);
        (self.progress)(&self.stats);
        Ok(())
    }

    /// Writes `attr`'s inode, then, for a directory, its entries and what they name.
    fn tree(&mut self, meta: &dyn Meta, attr: Attr) -> Result<()> {
        let dir = attr.kind == FileKind::Dir;
        let ino = attr.ino;
        self.inode(meta, attr)?;
        if !dir {
            return Ok(());
        }
        let mut cookie = 0;
        loop {
            let page = meta.readdir(ino, cookie, PAGE)?;
            let Some(last) = page.last() else { break };
            cookie = last.cookie;
            for e in page {
                self.put(&DumpRecord::Entry(DumpEntry {
                    parent: ino,
                    name: Bytes(e.name),
                    ino: e.ino,
                    kind: e.kind,
                }))?;
                let child = meta.getattr(e.ino)?;
                if child.kind != FileKind::Dir && child.nlink > 1 && !self.linked.insert(e.ino) {
                    continue;
                }
                self.tree(meta, child)?;
            }
        }
        Ok(())
    }

    fn inode(&mut self, meta: &dyn Meta, attr: Attr) -> Result<()> {
        let ino = attr.ino;
        let symlink = match attr.kind {
            FileKind::Symlink => Some(Bytes(meta.readlink(ino)?)),
            _ => None,
        };
        let mut xattrs = Vec::new();
        for name in meta.listxattr(ino)? {
            let value = meta.getxattr(ino, &name)?;
            xattrs.push((Bytes(name), Bytes(value)));
        }
        let mut chunks = Vec::new();
        if attr.kind == FileKind::File && attr.length > 0 {
            for index in 0..=((attr.length - 1) / CHUNK_SIZE) as u32 {
                let slices = meta.read_chunk(ino, index)?;
                if !slices.is_empty() {
                    chunks.push(DumpChunk { index, slices });
                }
            }
        }
        self.put(&DumpRecord::Inode(DumpInode {
            attr,
            symlink,
            xattrs,
            chunks,
        }))
    }
}

/// Reads a dump written by [`dump`] into `meta`, which must hold no volume; `progress` is
/// called after each record. The format is written last, so a load that fails part way
/// leaves a volume that is not formatted (clear it and load again).
pub fn load(
    meta: &dyn Meta,
    input: &mut dyn BufRead,
    progress: &mut dyn FnMut(&DumpStats),
) -> Result<DumpStats> {
    match meta.load_format() {
        Err(MetaError::NotFormatted) => {}
        Ok(f) => {
            return Err(MetaError::Engine(format!(
                "the target already holds volume {:?}: load into an empty database",
                f.name
            )))
        }
        Err(e) => return Err(e),
    }
    let mut stats = DumpStats::default();
    let mut lines = input.lines().enumerate();
    let header = match read(&mut lines) {
        Some(Ok(DumpRecord::Header(h))) => h,
        Some(Err(e)) => return Err(e),
        _ => {
            return Err(MetaError::Engine(
                "not a tidefs dump: no header line".into(),
            ))
        }
    };
    if header.version != DUMP_VERSION {
        return Err(MetaError::Engine(format!(
            "dump version {} is not supported (this tidefs reads version {DUMP_VERSION})",
            header.version
        )));
    }
    let mut records = std::iter::from_fn(|| {
        let r = read(&mut lines);
        if let Some(Ok(r)) = &r {
            if matches!(r, DumpRecord::Header(_)) {
                return Some(Err(MetaError::Engine("a second header in the dump".into())));
            }
            stats.count(r);
            progress(&stats);
        }
        r
    });
    meta.load_records(&header, &mut records)?;
    Ok(stats)
}

/// The next record of a dump's numbered lines, if any.
fn read(
    lines: &mut dyn Iterator<Item = (usize, std::io::Result<String>)>,
) -> Option<Result<DumpRecord>> {
    lines.next().map(|(n, line)| {
        let line = line.map_err(io_err)?;
        serde_json::from_str::<DumpRecord>(&line)
            .map_err(|e| MetaError::Engine(format!("dump line {}: {e}", n + 1)))
    })
}
