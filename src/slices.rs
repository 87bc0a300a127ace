//! Resolving a chunk's overlapping slices into what a read sees.

use tidefs_meta::Slice;

/// Where the bytes of one span come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A hole or a zeroed range: reads as zeros.
    Zero,
    /// Bytes of a slice's data, starting at `data_off` within the slice.
    Data {
        /// The slice.
        slice: Slice,
        /// Offset within the slice's stored data.
        data_off: u32,
    },
}

/// A run of a chunk with one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Offset within the chunk.
    pub pos: u32,
    /// Length in bytes.
    pub len: u32,
    /// Where the bytes come from.
    pub source: Source,
}

/// The spans covering `[start, end)` of a chunk, in order, given its slices in the order they
/// apply: a later slice hides earlier ones, anything no slice covers reads as zeros.
pub fn resolve(slices: &[Slice], start: u32, end: u32) -> Vec<Span> {
    // (start, end, index of the visible slice)
    let mut spans: Vec<(u32, u32, Option<usize>)> = vec![(start, end, None)];
    for (i, s) in slices.iter().enumerate() {
        let (a, b) = (s.pos.max(start), (s.pos + s.len).min(end));
        if a >= b {
            continue;
        }
        let mut out = Vec::with_capacity(spans.len() + 2);
        let mut inserted = false;
        for (sa, sb, src) in spans {
            if sb <= a || sa >= b {
                if !inserted && sa >= b {
                    out.push((a, b, Some(i)));
                    inserted = true;
                }
                out.push((sa, sb, src));
                continue;
            }
            if sa < a {
                out.push((sa, a, src));
            }
            if !inserted {
                out.push((a, b, Some(i)));
                inserted = true;
            }
            if sb > b {
                out.push((b, sb, src));
            }
        }
        if !inserted {
            out.push((a, b, Some(i)));
        }
        spans = out;
    }
    spans
        .into_iter()
        .map(|(a, b, src)| Span {
            pos: a,
            len: b - a,
            source: match src.map(|i| slices[i]) {
                Some(s) if !s.is_zero() => Source::Data {
                    slice: s,
                    data_off: s.off + (a - s.pos),
                },
                _ => Source::Zero,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn slice(id: u64, pos: u32, len: u32) -> Slice {
        Slice {
            id,
            size: len + 10,
            off: 5,
            len,
            pos,
        }
    }

    /// What byte i of the chunk shows: (slice id, offset in slice data), or None for zero.
    fn paint(slices: &[Slice], size: u32) -> Vec<Option<(u64, u32)>> {
        let mut out = vec![None; size as usize];
        for s in slices {
            for i in s.pos..(s.pos + s.len).min(size) {
                out[i as usize] = if s.is_zero() {
                    None
                } else {
                    Some((s.id, s.off + i - s.pos))
                };
            }
        }
        out
    }

    #[test]
    fn newest_slice_wins_and_gaps_are_zero() {
        let spans = resolve(&[slice(1, 0, 100), slice(2, 50, 10)], 0, 200);
        let shape: Vec<_> = spans.iter().map(|s| (s.pos, s.len)).collect();
        assert_eq!(shape, [(0, 50), (50, 10), (60, 40), (100, 100)]);
        assert_eq!(spans[3].source, Source::Zero);
        assert_eq!(
            spans[2].source,
            Source::Data {
                slice: slice(1, 0, 100),
                data_off: 65
            }
        );
    }

    #[test]
    fn matches_a_byte_by_byte_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let size = rng.gen_range(1..300u32);
            let n = rng.gen_range(0..12);
            let slices: Vec<Slice> = (0..n)
                .map(|id| {
                    let pos = rng.gen_range(0..size);
                    let len = rng.gen_range(1..=size - pos);
                    let mut s = slice(id + 1, pos, len);
                    if rng.gen_bool(0.2) {
                        s.size = 0;
                    }
                    s
                })
                .collect();
            let (start, end) = {
                let a = rng.gen_range(0..size);
                (a, rng.gen_range(a + 1..=size))
            };
            let model = paint(&slices, size);
            let spans = resolve(&slices, start, end);
            let mut at = start;
            for sp in &spans {
                assert_eq!(sp.pos, at);
                assert!(sp.len > 0);
                for k in 0..sp.len {
                    let want = model[(sp.pos + k) as usize];
                    let got = match sp.source {
                        Source::Zero => None,
                        Source::Data { slice, data_off } => Some((slice.id, data_off + k)),
                    };
                    assert_eq!(got, want);
                }
                at += sp.len;
            }
            assert_eq!(at, end);
        }
    }
}
