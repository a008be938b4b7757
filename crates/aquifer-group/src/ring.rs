//! Which member of a group owns a block: consistent hashing with virtual nodes.
//!
//! Every member places points on a 64-bit circle, as many as its cache holds units of
//! [`VNODE_BYTES`], and a block belongs to the member of the first point at or after the
//! block key's hash. Each member computes the same ring from the same member list (the
//! sessions the metadata engine holds), so no coordinator is needed; the hash is fixed
//! (FNV-1a with a 64-bit finaliser), never the standard library's, which may change between
//! builds and would split a group running two versions.
//!
//! Why points per cache unit rather than relative to the largest member: a member that
//! joins then leaves every other member's points where they were, so only the blocks it
//! takes over move (and when it leaves, only its own), whatever its size.

/// One member as the ring sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Stable identity of the member (its place on the ring derives from it).
    pub id: String,
    /// Bytes of cache it offers: its weight.
    pub weight: u64,
    /// False for a member that reads through the group but owns nothing (`--no-sharing`).
    pub owns: bool,
}

/// Cache bytes per virtual node.
pub const VNODE_BYTES: u64 = 64 << 20;
/// Virtual nodes of the smallest member: fewer would leave its share to chance.
pub const MIN_VNODES: u64 = 16;
/// Virtual nodes of the largest: caches above 512 GiB weigh the same.
pub const MAX_VNODES: u64 = 8192;

/// The virtual nodes of a member offering `weight` bytes of cache.
pub fn vnodes(weight: u64) -> u64 {
    weight.div_ceil(VNODE_BYTES).clamp(MIN_VNODES, MAX_VNODES)
}

/// The ring of one group at one moment.
#[derive(Clone, Debug)]
pub struct Ring {
    /// (position, index into `members`), sorted.
    points: Vec<(u64, usize)>,
    /// Sorted by id, one per id.
    members: Vec<Member>,
}

impl Ring {
    /// The ring of `members`; their order does not matter, and of two with one id the
    /// first is kept.
    pub fn new(mut members: Vec<Member>) -> Ring {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|later, first| later.id == first.id);
        let mut points = Vec::new();
        for (i, m) in members.iter().enumerate() {
            if !m.owns || m.weight == 0 {
                continue;
            }
            for v in 0..vnodes(m.weight) {
                points.push((hash(format!("{}#{v}", m.id).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { points, members }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member owning `key`; none when no member owns anything.
    pub fn owner(&self, key: &str) -> Option<&Member> {
        self.successors(key, 1).into_iter().next()
    }

    /// Up to `n` distinct owning members in the order `key` would fall to them: its owner,
    /// then who takes it over if the owner is gone, and so on.
    pub fn successors(&self, key: &str, n: usize) -> Vec<&Member> {
        let mut out: Vec<&Member> = Vec::new();
        if self.points.is_empty() {
            return out;
        }
        let h = hash(key.as_bytes());
        let start = self.points.partition_point(|(p, _)| *p < h);
        for k in 0..self.points.len() {
            if out.len() >= n {
                break;
            }
            let m = &self.members[self.points[(start + k) % self.points.len()].1];
            if !out.iter().any(|o| o.id == m.id) {
                out.push(m);
            }
        }
        out
    }
}

/// FNV-1a over `bytes`, then the SplitMix64 finaliser: FNV alone leaves keys that differ in
/// their last bytes close together on the circle.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn member(id: &str, weight: u64) -> Member {
        Member {
            id: id.to_string(),
            weight,
            owns: true,
        }
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("chunks/{i}/0_0_4194304")).collect()
    }

    fn owners(r: &Ring, keys: &[String]) -> Vec<Option<String>> {
        keys.iter()
            .map(|k| r.owner(k).map(|m| m.id.clone()))
            .collect()
    }

    #[test]
    fn the_hash_is_fixed() {
        // Members of one group built by different versions must agree on owners.
        assert_eq!(hash(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(hash(b"chunks/1/0_0_4194304"), 0x8570_d518_8beb_6aeb);
    }

    #[test]
    fn every_member_computes_the_same_owners_whatever_the_order() {
        let a = Ring::new(vec![
            member("n1", GIB),
            member("n2", 2 * GIB),
            member("n3", GIB),
        ]);
        let b = Ring::new(vec![
            member("n3", GIB),
            member("n1", GIB),
            member("n2", 2 * GIB),
        ]);
        let ks = keys(2000);
        assert_eq!(owners(&a, &ks), owners(&b, &ks));
    }

    #[test]
    fn shares_follow_cache_sizes() {
        let r = Ring::new(vec![member("small", 4 * GIB), member("large", 12 * GIB)]);
        let ks = keys(100_000);
        let small = owners(&r, &ks)
            .iter()
            .filter(|o| o.as_deref() == Some("small"))
            .count() as f64
            / ks.len() as f64;
        assert!(
            (0.18..0.32).contains(&small),
            "the quarter-sized cache owns {small}"
        );
    }

    #[test]
    fn readers_that_do_not_share_own_nothing() {
        let mut laptop = member("laptop", 100 * GIB);
        laptop.owns = false;
        let r = Ring::new(vec![laptop.clone(), member("n1", GIB)]);
        assert!(keys(1000).iter().all(|k| r.owner(k).unwrap().id == "n1"));
        assert!(Ring::new(vec![laptop]).owner("k").is_none());
    }

    #[test]
    fn successors_are_distinct_and_begin_with_the_owner() {
        let r = Ring::new(vec![
            member("n1", GIB),
            member("n2", GIB),
            member("n3", GIB),
        ]);
        for k in keys(200) {
            let s = r.successors(&k, 5);
            assert_eq!(s.len(), 3);
            assert_eq!(s[0].id, r.owner(&k).unwrap().id);
            let mut ids: Vec<_> = s.iter().map(|m| m.id.clone()).collect();
            ids.dedup();
            assert_eq!(ids.len(), 3);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// A member joining takes blocks only into itself; leaving, it gives back only its
        /// own: nobody else's blocks move.
        #[test]
        fn joining_or_leaving_moves_only_that_members_share(
            weights in prop::collection::vec(1u64..64, 1..6),
            newcomer in 1u64..64,
        ) {
            let before: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| member(&format!("node-{i}"), w * GIB / 4))
                .collect();
            let mut after = before.clone();
            after.push(member("joiner", newcomer * GIB / 4));
            let (old, new) = (Ring::new(before), Ring::new(after));
            let ks = keys(3000);
            for (o, n) in owners(&old, &ks).into_iter().zip(owners(&new, &ks)) {
                if o != n {
                    // Joining: moved blocks went to the joiner. Leaving (read the other way
                    // round): only the leaver's blocks move.
                    prop_assert_eq!(n.as_deref(), Some("joiner"));
                }
            }
        }
    }
}
