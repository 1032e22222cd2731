//! Sorted segment indexes: lookup, range resolution and the multi-layer merge (spec §1.8).

use crate::lsmt::Segment;

/// What backs one piece of a requested range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// First logical sector of the piece.
    pub offset: u64,
    pub length: u64,
    /// The covering mapping cut to this piece, or `None` for a hole (unmapped in this index).
    pub seg: Option<Segment>,
}

/// Splits `[start, end)` into pieces from `overlapping`, segments sorted by offset that overlap
/// the range, filling gaps with holes.
pub fn resolve(
    overlapping: impl Iterator<Item = Segment>,
    start: u64,
    end: u64,
    out: &mut Vec<Piece>,
) {
    let mut cur = start;
    for s in overlapping {
        let s = s.slice(start, end);
        if s.offset > cur {
            out.push(Piece {
                offset: cur,
                length: s.offset - cur,
                seg: None,
            });
        }
        out.push(Piece {
            offset: s.offset,
            length: s.length as u64,
            seg: Some(s),
        });
        cur = s.end();
    }
    if cur < end {
        out.push(Piece {
            offset: cur,
            length: end - cur,
            seg: None,
        });
    }
}

/// An immutable sorted, non-overlapping index with fast lookup of the first segment ending
/// after a sector.
#[derive(Clone, Debug, Default)]
pub struct SegmentIndex {
    segs: Vec<Segment>,
    search: EndSearch,
}

impl SegmentIndex {
    /// `segs` must be sorted by offset and non-overlapping.
    pub fn new(segs: Vec<Segment>) -> Self {
        debug_assert!(segs.windows(2).all(|w| w[0].end() <= w[1].offset));
        let search = EndSearch::new(segs.iter().map(|s| s.end()));
        SegmentIndex { segs, search }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }

    pub fn len(&self) -> usize {
        self.segs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Position of the first segment whose end is greater than `sector`.
    #[inline]
    pub fn first_ending_after(&self, sector: u64) -> usize {
        self.search.first_greater(sector)
    }

    /// The segment covering `sector`, if any.
    #[inline]
    pub fn lookup(&self, sector: u64) -> Option<&Segment> {
        let i = self.first_ending_after(sector);
        self.segs.get(i).filter(|s| s.offset <= sector)
    }

    /// Segments overlapping `[start, end)`, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = Segment> + '_ {
        let i = self.first_ending_after(start);
        self.segs[i..]
            .iter()
            .take_while(move |s| s.offset < end)
            .copied()
    }
}

/// Static search tree over the segment ends: a B-tree of 16-key nodes laid out level by level,
/// so a lookup touches two cache lines per level instead of one per binary-search step. Nodes
/// are ranked with AVX-512 or AVX2 where the CPU has them; elsewhere a branch-free binary
/// search over the dense keys is used.
#[derive(Clone, Debug, Default)]
struct EndSearch {
    /// Upper levels top first, then the sorted keys (segment ends); each level padded to a
    /// multiple of `B` with `PAD`. Entry `i` of an upper level is the largest key under its
    /// child node `i`.
    tree: Vec<u64>,
    /// Per level (top first, keys last): start in `tree`, and number of real nodes.
    levels: Vec<(usize, usize)>,
    n: usize,
    simd: Simd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Simd {
    #[default]
    None,
    Avx2,
    Avx512,
}

const B: usize = 16;
/// Padding key: larger than any sector number (< 2^51) and positive as an i64, so the signed
/// 64-bit SIMD compare orders it correctly.
const PAD: u64 = i64::MAX as u64;

impl EndSearch {
    fn new(ends: impl Iterator<Item = u64>) -> Self {
        let mut keys: Vec<u64> = ends.collect();
        let n = keys.len();
        let key_nodes = n.div_ceil(B).max(1);
        pad(&mut keys);
        let mut built: Vec<(Vec<u64>, usize)> = vec![(keys, key_nodes)];
        loop {
            let below = &built[built.len() - 1].0;
            if below.len() <= B {
                break;
            }
            let mut up: Vec<u64> = below.chunks(B).map(|c| c[B - 1]).collect();
            let nodes = up.len().div_ceil(B);
            pad(&mut up);
            built.push((up, nodes));
        }
        // Top first. A level's node count is the number of children its parent may pick.
        built.reverse();
        let mut tree = Vec::with_capacity(built.iter().map(|l| l.0.len()).sum());
        let mut levels = Vec::with_capacity(built.len());
        for (level, nodes) in &built {
            levels.push((tree.len(), *nodes));
            tree.extend_from_slice(level);
        }
        EndSearch {
            tree,
            levels,
            n,
            simd: detect_simd(),
        }
    }

    /// Index of the first key greater than `x` (`n` if none).
    #[inline]
    fn first_greater(&self, x: u64) -> usize {
        if x >= PAD {
            return self.n;
        }
        #[cfg(target_arch = "x86_64")]
        match self.simd {
            // SAFETY: the CPU has the features (checked at construction).
            Simd::Avx512 => return unsafe { self.first_greater_avx512(x) },
            Simd::Avx2 => return unsafe { self.first_greater_avx2(x) },
            Simd::None => {}
        }
        let (start, _) = self.levels[self.levels.len() - 1];
        self.tree[start..start + self.n].partition_point(|&k| k <= x)
    }

    /// Walks the levels; `rank(ptr)` counts the keys `<= x` among the 16 at `ptr`.
    #[inline(always)]
    unsafe fn descend(&self, rank: impl Fn(*const u64) -> usize) -> usize {
        let base = self.tree.as_ptr();
        let mut node = 0usize;
        let last = self.levels.len() - 1;
        for (i, &(start, _)) in self.levels.iter().enumerate() {
            // SAFETY: `node` is below the level's node count (clamped below), and every node
            // holds B keys inside `tree`.
            let r = rank(unsafe { base.add(start + node * B) });
            if i == last {
                return (node * B + r).min(self.n);
            }
            // Past the largest key every rank saturates: stay on the last real child.
            node = (node * B + r).min(self.levels[i + 1].1 - 1);
        }
        self.n
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,popcnt")]
    unsafe fn first_greater_avx512(&self, x: u64) -> usize {
        use std::arch::x86_64::*;
        let xv = _mm512_set1_epi64(x as i64);
        // SAFETY: 16 readable u64s at `p` (2 x 512 bits).
        unsafe {
            self.descend(|p| {
                let a = _mm512_loadu_si512(p.cast());
                let b = _mm512_loadu_si512(p.add(8).cast());
                let gt = (_mm512_cmpgt_epi64_mask(a, xv) as u32)
                    | (_mm512_cmpgt_epi64_mask(b, xv) as u32) << 8;
                B - gt.count_ones() as usize
            })
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,popcnt")]
    unsafe fn first_greater_avx2(&self, x: u64) -> usize {
        use std::arch::x86_64::*;
        let xv = _mm256_set1_epi64x(x as i64);
        // SAFETY: 16 readable u64s at `p` (4 x 256 bits).
        unsafe {
            self.descend(|p| {
                let p = p as *const __m256i;
                let gt =
                    |v| _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(v, xv))) as u32;
                let m = gt(_mm256_loadu_si256(p))
                    | gt(_mm256_loadu_si256(p.add(1))) << 4
                    | gt(_mm256_loadu_si256(p.add(2))) << 8
                    | gt(_mm256_loadu_si256(p.add(3))) << 12;
                B - m.count_ones() as usize
            })
        }
    }
}

fn detect_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("popcnt")
        {
            return Simd::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("popcnt")
        {
            return Simd::Avx2;
        }
    }
    Simd::None
}

fn pad(v: &mut Vec<u64>) {
    let r = v.len().div_ceil(B).max(1) * B;
    v.resize(r, PAD);
}

/// Merges `top` over `bottom` (each sorted, non-overlapping): the result holds all of `top`
/// plus the parts of `bottom` that `top` does not cover.
pub fn merge_over(top: &[Segment], bottom: &[Segment]) -> Vec<Segment> {
    merge_over_limited(top, bottom, usize::MAX).unwrap_or_default()
}

/// As [`merge_over`], but `None` as soon as the result would pass `limit` entries.
fn merge_over_limited(top: &[Segment], bottom: &[Segment], limit: usize) -> Option<Vec<Segment>> {
    if top.len() > limit {
        return None;
    }
    let room = limit - top.len();
    let mut uncovered = Vec::with_capacity(bottom.len().min(room));
    let mut j = 0usize;
    for b in bottom {
        // Checked per bottom segment: each adds at most one piece more than the top ones in it.
        if uncovered.len() > room {
            return None;
        }
        while j < top.len() && top[j].end() <= b.offset {
            j += 1;
        }
        let mut cur = b.offset;
        let mut k = j;
        while cur < b.end() {
            match top.get(k) {
                Some(t) if t.offset < b.end() => {
                    if t.offset > cur {
                        uncovered.push(b.slice(cur, t.offset));
                    }
                    cur = cur.max(t.end());
                    k += 1;
                }
                _ => {
                    uncovered.push(b.slice(cur, b.end()));
                    cur = b.end();
                }
            }
        }
    }
    if uncovered.len() > room {
        return None;
    }
    let mut out = Vec::with_capacity(top.len() + uncovered.len());
    let (mut i, mut k) = (0usize, 0usize);
    while i < top.len() && k < uncovered.len() {
        if top[i].offset <= uncovered[k].offset {
            out.push(top[i]);
            i += 1;
        } else {
            out.push(uncovered[k]);
            k += 1;
        }
    }
    out.extend_from_slice(&top[i..]);
    out.extend_from_slice(&uncovered[k..]);
    Some(out)
}

/// Merges whole layers, `layers[0]` the top. Each layer's segments get `tag` = its position.
/// Pairwise reduction keeps the work at O(total · log layers).
pub fn merge_layers(layers: Vec<Vec<Segment>>) -> Vec<Segment> {
    merge_layers_limited(layers, usize::MAX).unwrap_or_default()
}

/// As [`merge_layers`], but stops as soon as the merged index passes `limit` entries, with the
/// position of the topmost layer whose entries were being added. Only merges that include the
/// top layer are checked: their counts only grow toward the final one, while a merge of lower
/// layers alone may exceed it (layers above can hide it) yet holds at most twice their entries.
pub fn merge_layers_limited(
    layers: Vec<Vec<Segment>>,
    limit: usize,
) -> Result<Vec<Segment>, usize> {
    // (position of the group's top layer, its merged segments)
    let mut parts: Vec<(usize, Vec<Segment>)> = layers
        .into_iter()
        .enumerate()
        .map(|(i, mut segs)| {
            for s in &mut segs {
                s.tag = i as u8;
            }
            (i, segs)
        })
        .collect();
    if parts.first().is_some_and(|(_, segs)| segs.len() > limit) {
        return Err(0);
    }
    while parts.len() > 1 {
        let mut next = Vec::with_capacity(parts.len().div_ceil(2));
        let mut it = parts.into_iter();
        while let Some((top, upper)) = it.next() {
            match it.next() {
                Some((below, lower)) => {
                    let cap = if top == 0 { limit } else { usize::MAX };
                    next.push((top, merge_over_limited(&upper, &lower, cap).ok_or(below)?))
                }
                None => next.push((top, upper)),
            }
        }
        parts = next;
    }
    Ok(parts.pop().map(|(_, segs)| segs).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, length: u32, moffset: u64) -> Segment {
        Segment {
            offset,
            length,
            moffset,
            zeroed: false,
            tag: 0,
        }
    }

    #[test]
    fn search_matches_partition_point() {
        for n in [0usize, 1, 15, 16, 17, 255, 256, 257, 4097, 70_000] {
            let segs: Vec<Segment> = (0..n).map(|i| seg(i as u64 * 10, 5, 8)).collect();
            let idx = SegmentIndex::new(segs.clone());
            let with = |simd| {
                let mut i = idx.clone();
                i.search.simd = simd;
                i
            };
            let (scalar, avx2) = (with(Simd::None), with(Simd::Avx2));
            for x in (0..n as u64 * 10 + 20)
                .step_by(3)
                .chain([u64::MAX - 1, u64::MAX])
            {
                let want = segs.partition_point(|s| s.end() <= x);
                assert_eq!(idx.first_ending_after(x), want, "n={n} x={x}");
                assert_eq!(scalar.first_ending_after(x), want, "scalar n={n} x={x}");
                if detect_simd() != Simd::None {
                    assert_eq!(avx2.first_ending_after(x), want, "avx2 n={n} x={x}");
                }
            }
        }
    }

    #[test]
    fn merge_cuts_lower_layers() {
        let top = vec![seg(10, 10, 100)];
        let bottom = vec![seg(0, 30, 8)];
        let m = merge_layers(vec![top, bottom]);
        assert_eq!(
            m,
            vec![
                Segment {
                    offset: 0,
                    length: 10,
                    moffset: 8,
                    zeroed: false,
                    tag: 1
                },
                Segment {
                    offset: 10,
                    length: 10,
                    moffset: 100,
                    zeroed: false,
                    tag: 0
                },
                Segment {
                    offset: 20,
                    length: 10,
                    moffset: 28,
                    zeroed: false,
                    tag: 1
                },
            ]
        );
    }
}
