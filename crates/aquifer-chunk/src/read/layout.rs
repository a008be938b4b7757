//! How a chunk's slice list becomes its content.

use aquifer_meta::Slice;

/// The visible pieces of a chunk, sorted by position and not overlapping: slices are applied
/// oldest to newest and a newer slice hides what it covers. Gaps read as zeros.
pub fn visible(slices: &[Slice]) -> Vec<Slice> {
    let mut out: Vec<Slice> = Vec::with_capacity(slices.len());
    for s in slices.iter().filter(|s| s.len > 0) {
        let mut next = Vec::with_capacity(out.len() + 2);
        for e in out.drain(..) {
            if e.end() <= s.pos || e.pos >= s.end() {
                next.push(e);
                continue;
            }
            if e.pos < s.pos {
                next.push(Slice {
                    len: s.pos - e.pos,
                    ..e
                });
            }
            if e.end() > s.end() {
                let cut = s.end() - e.pos;
                next.push(Slice {
                    pos: s.end(),
                    off: e.off + cut,
                    len: e.len - cut,
                    ..e
                });
            }
        }
        next.push(*s);
        out = next;
    }
    out.sort_by_key(|s| s.pos);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sl(pos: u32, id: u64, len: u32) -> Slice {
        Slice {
            pos,
            id,
            size: len,
            off: 0,
            len,
        }
    }

    #[test]
    fn newer_slices_win() {
        let v = visible(&[sl(0, 1, 100), sl(10, 2, 10), sl(90, 3, 20)]);
        assert_eq!(
            v,
            vec![
                Slice {
                    pos: 0,
                    id: 1,
                    size: 100,
                    off: 0,
                    len: 10
                },
                sl(10, 2, 10),
                Slice {
                    pos: 20,
                    id: 1,
                    size: 100,
                    off: 20,
                    len: 70
                },
                sl(90, 3, 20),
            ]
        );
    }

    proptest! {
        // Reference model: paint every byte with the id of the last slice covering it.
        #[test]
        fn matches_byte_painting(ops in prop::collection::vec((0u32..200, 1u32..80), 0..30)) {
            let slices: Vec<Slice> = ops.iter().enumerate()
                .map(|(i, (p, l))| sl(*p, i as u64 + 1, *l)).collect();
            let mut model = vec![(0u64, 0u32); 300];
            for s in &slices {
                for b in s.pos..s.end() { model[b as usize] = (s.id, b - s.pos + s.off); }
            }
            let mut got = vec![(0u64, 0u32); 300];
            let v = visible(&slices);
            for w in v.windows(2) { prop_assert!(w[0].end() <= w[1].pos); }
            for s in v {
                for b in s.pos..s.end() { got[b as usize] = (s.id, s.off + b - s.pos); }
            }
            prop_assert_eq!(got, model);
        }
    }
}
