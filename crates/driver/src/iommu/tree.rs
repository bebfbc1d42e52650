//! The mapping tree of a domain, one entry per *run*: mappings that touch
//! one another (a scatter-gather list laid out back to back) share one tree
//! node, so mapping or unmapping a 256-page list costs one insert or removal
//! instead of 256 rebalancing ones.
//!
//! Every question is still answered per mapping: overlap checks, exact
//! removal of one mapping (a failed MAP), removal of whole mappings in a
//! range (never splitting one), translation, and iteration in IOVA order
//! (for an attach's replay). A run is split when mappings leave its middle.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::Mapping;
use crate::Error;

/// Mappings in IOVA order, each touching the next. Never empty.
enum Run {
    One(Mapping),
    Many(Vec<Mapping>),
}

impl Run {
    fn maps(&self) -> &[Mapping] {
        match self {
            Self::One(m) => core::slice::from_ref(m),
            Self::Many(v) => v,
        }
    }

    fn last(&self) -> u64 {
        match self {
            Self::One(m) => m.last,
            Self::Many(v) => v[v.len() - 1].last,
        }
    }

    /// Indices `i..j` of the mappings that intersect `[start, last]`.
    fn span(&self, start: u64, last: u64) -> (usize, usize) {
        let maps = self.maps();
        (maps.partition_point(|m| m.last < start), maps.partition_point(|m| m.iova <= last))
    }
}

/// Runs by first IOVA: a sorted vector while there are few (a domain's
/// live mappings usually are: rings, headers and the I/Os in flight), where
/// an insert or removal is a short move instead of a B-tree rebalance, and
/// a B-tree once there are more than [`SMALL_RUNS`] (never back: no
/// flapping around the limit).
enum Runs {
    Small(Vec<(u64, Run)>),
    Big(BTreeMap<u64, Run>),
}

/// Most runs kept in a sorted vector.
const SMALL_RUNS: usize = 32;

impl Default for Runs {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

/// One of two iterators with the same items.
enum Either<A, B> {
    A(A),
    B(B),
}

impl<A: Iterator, B: Iterator<Item = A::Item>> Iterator for Either<A, B> {
    type Item = A::Item;
    fn next(&mut self) -> Option<A::Item> {
        match self {
            Self::A(a) => a.next(),
            Self::B(b) => b.next(),
        }
    }
}

fn pair(e: &(u64, Run)) -> (&u64, &Run) {
    (&e.0, &e.1)
}

impl Runs {
    /// Every run, in IOVA order.
    fn iter(&self) -> impl Iterator<Item = (&u64, &Run)> {
        match self {
            Self::Small(v) => Either::A(v.iter().map(pair as fn(&(u64, Run)) -> (&u64, &Run))),
            Self::Big(m) => Either::B(m.iter()),
        }
    }

    /// Runs whose key is at most `last`, highest first.
    fn down_from(&self, last: u64) -> impl Iterator<Item = (&u64, &Run)> {
        match self {
            Self::Small(v) => {
                let end = v.partition_point(|e| e.0 <= last);
                Either::A(v[..end].iter().rev().map(pair as fn(&(u64, Run)) -> (&u64, &Run)))
            }
            Self::Big(m) => Either::B(m.range(..=last).rev()),
        }
    }

    /// The run with the highest key at most `last`.
    fn highest_mut(&mut self, last: u64) -> Option<(u64, &mut Run)> {
        match self {
            Self::Small(v) => {
                let end = v.partition_point(|e| e.0 <= last);
                v[..end].last_mut().map(|e| (e.0, &mut e.1))
            }
            Self::Big(m) => m.range_mut(..=last).next_back().map(|(&k, r)| (k, r)),
        }
    }

    fn get_mut(&mut self, key: u64) -> Option<&mut Run> {
        match self {
            Self::Small(v) => match v.binary_search_by_key(&key, |e| e.0) {
                Ok(i) => Some(&mut v[i].1),
                Err(_) => None,
            },
            Self::Big(m) => m.get_mut(&key),
        }
    }

    /// Adds a run under a key that is not in use.
    pub(in crate::iommu) fn insert(&mut self, key: u64, run: Run) {
        match self {
            Self::Small(v) if v.len() < SMALL_RUNS => {
                let i = v.partition_point(|e| e.0 < key);
                v.insert(i, (key, run));
            }
            Self::Small(v) => {
                let mut m: BTreeMap<u64, Run> = core::mem::take(v).into_iter().collect();
                m.insert(key, run);
                *self = Self::Big(m);
            }
            Self::Big(m) => {
                m.insert(key, run);
            }
        }
    }

    pub(in crate::iommu) fn remove(&mut self, key: u64) {
        match self {
            Self::Small(v) => {
                if let Ok(i) = v.binary_search_by_key(&key, |e| e.0) {
                    v.remove(i);
                }
            }
            Self::Big(m) => {
                m.remove(&key);
            }
        }
    }
}

/// Non-overlapping mappings, grouped into runs keyed by their first IOVA.
#[derive(Default)]
pub(crate) struct MapTree {
    runs: Runs,
    len: usize,
}

impl MapTree {
    /// Number of mappings.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Number of runs.
    #[cfg(test)]
    pub(crate) fn runs(&self) -> usize {
        self.runs.iter().count()
    }

    /// Every mapping, in IOVA order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.runs.iter().flat_map(|(_, r)| r.maps())
    }

    /// Runs that intersect `[start, last]`, highest first (runs are
    /// disjoint, so they end as soon as one ends below `start`).
    fn runs_in(&self, start: u64, last: u64) -> impl Iterator<Item = (&u64, &Run)> {
        self.runs.down_from(last).take_while(move |(_, r)| r.last() >= start)
    }

    /// The first mapping (lowest IOVA) that intersects `[start, last]`.
    pub(crate) fn first_in(&self, start: u64, last: u64) -> Option<&Mapping> {
        let (_, run) = self.runs_in(start, last).last()?;
        run.maps().get(run.span(start, last).0)
    }

    /// The last mapping that intersects `[start, last]`.
    fn last_in(&self, start: u64, last: u64) -> Option<&Mapping> {
        let (_, run) = self.runs_in(start, last).next()?;
        run.maps()[..run.span(start, last).1].last()
    }

    /// The mapping that holds `iova`.
    pub(crate) fn get(&self, iova: u64) -> Option<&Mapping> {
        self.first_in(iova, iova)
    }

    /// Adds one mapping; the caller checked that it overlaps nothing.
    pub(crate) fn insert(&mut self, m: Mapping) {
        self.runs.insert(m.iova, Run::One(m));
        self.len += 1;
    }

    /// Adds mappings that touch one another, in IOVA order, as one run;
    /// the caller checked that they overlap nothing.
    pub(crate) fn insert_run(&mut self, maps: &[Mapping]) {
        debug_assert!(maps.windows(2).all(|w| w[0].last.checked_add(1) == Some(w[1].iova)));
        match maps {
            [] => {}
            [m] => self.insert(*m),
            _ => {
                self.runs.insert(maps[0].iova, Run::Many(maps.to_vec()));
                self.len += maps.len();
            }
        }
    }

    /// Removes mappings `i..j` of the run at `key`, splitting it if needed.
    fn cut(&mut self, key: u64, i: usize, j: usize) {
        let Some(run) = self.runs.get_mut(key) else { return };
        let n = run.maps().len();
        if i >= j || j > n {
            return;
        }
        self.len -= j - i;
        if i == 0 && j == n {
            self.runs.remove(key);
            return;
        }
        let Run::Many(v) = run else { return };
        let right = v.split_off(j);
        v.truncate(i);
        if v.is_empty() {
            self.runs.remove(key);
        }
        self.put_back(right);
    }

    /// Inserts what is left of a split run (nothing if empty).
    fn put_back(&mut self, rest: Vec<Mapping>) {
        match rest.len() {
            0 => {}
            1 => {
                self.runs.insert(rest[0].iova, Run::One(rest[0]));
            }
            _ => {
                self.runs.insert(rest[0].iova, Run::Many(rest));
            }
        }
    }

    /// Removes the mapping `[iova, last]` if it is in the tree exactly so.
    pub(crate) fn remove_exact(&mut self, iova: u64, last: u64) -> bool {
        let Some((&key, run)) = self.runs_in(iova, iova).next() else { return false };
        let maps = run.maps();
        let i = maps.partition_point(|m| m.iova < iova);
        if maps.get(i).is_none_or(|m| m.iova != iova || m.last != last) {
            return false;
        }
        self.cut(key, i, i + 1);
        true
    }

    /// Checks that `[start, last]` holds at least one mapping and cuts none
    /// in two: [`Error::NotMapped`] or [`Error::WouldSplit`]. One search.
    pub(crate) fn check_whole(&self, start: u64, last: u64) -> Result<(), Error> {
        let mut runs = self.runs_in(start, last);
        let Some((_, top)) = runs.next() else { return Err(Error::NotMapped { iova: start }) };
        let low = runs.last().map_or(top, |(_, r)| r);
        let first = &low.maps()[low.span(start, last).0];
        if first.iova < start {
            return Err(Error::WouldSplit { iova: first.iova });
        }
        let end = &top.maps()[top.span(start, last).1 - 1];
        if end.last > last {
            return Err(Error::WouldSplit { iova: end.iova });
        }
        Ok(())
    }

    /// Removes every mapping that intersects `[start, last]`; the caller
    /// checked that they all lie inside it ([`Self::check_whole`]). When
    /// one run holds them (the usual case), one search and one removal or
    /// insertion.
    pub(crate) fn remove_inside(&mut self, start: u64, last: u64) {
        loop {
            let Some((key, run)) = self.runs.highest_mut(last) else { return };
            if run.last() < start {
                return;
            }
            let (i, j) = run.span(start, last);
            let n = run.maps().len();
            self.len -= j - i;
            match run {
                Run::Many(v) if i > 0 || j < n => {
                    let right = v.split_off(j);
                    v.truncate(i);
                    if v.is_empty() {
                        self.runs.remove(key);
                    }
                    self.put_back(right);
                }
                _ => {
                    self.runs.remove(key);
                }
            }
            if key <= start {
                // Runs are disjoint: none below this one reaches `start`.
                return;
            }
        }
    }

    /// Removes the whole mappings inside `[start, last]` and returns them,
    /// in order; refuses ([`Error::WouldSplit`]) if one sticks out.
    pub(crate) fn remove_range(&mut self, start: u64, last: u64) -> Result<Vec<Mapping>, Error> {
        let Some(first) = self.first_in(start, last) else { return Ok(Vec::new()) };
        if first.iova < start {
            return Err(Error::WouldSplit { iova: first.iova });
        }
        if let Some(m) = self.last_in(start, last).filter(|m| m.last > last) {
            return Err(Error::WouldSplit { iova: m.iova });
        }
        let mut hits = Vec::new();
        let runs: Vec<&Run> = self.runs_in(start, last).map(|(_, r)| r).collect();
        for run in runs.into_iter().rev() {
            let (i, j) = run.span(start, last);
            hits.extend_from_slice(&run.maps()[i..j]);
        }
        self.remove_inside(start, last);
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::Prot;
    use alloc::collections::BTreeMap;

    const P: u64 = 0x1000;

    fn map(page: u64, pages: u64) -> Mapping {
        Mapping {
            iova: page * P,
            last: (page + pages) * P - 1,
            paddr: page * 7 * P,
            prot: Prot::READ,
        }
    }

    /// The same operations on a plain map of mappings (the old tree).
    #[derive(Default)]
    struct Model(BTreeMap<u64, Mapping>);

    impl Model {
        fn hits(&self, s: u64, e: u64) -> Vec<Mapping> {
            self.0.values().filter(|m| m.iova <= e && s <= m.last).copied().collect()
        }
        fn check_whole(&self, s: u64, e: u64) -> Result<(), Error> {
            let hits = self.hits(s, e);
            match (hits.first(), hits.last()) {
                (None, _) => Err(Error::NotMapped { iova: s }),
                (Some(m), _) if m.iova < s => Err(Error::WouldSplit { iova: m.iova }),
                (_, Some(m)) if m.last > e => Err(Error::WouldSplit { iova: m.iova }),
                _ => Ok(()),
            }
        }
    }

    fn rng(mut x: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    /// Random runs, single inserts, exact removals, range removals (with
    /// their refusals) and lookups give the same answers as a map with one
    /// node per mapping, and the runs stay sorted, touching and disjoint.
    #[test]
    fn runs_behave_like_one_node_per_mapping() {
        let mut went_big = 0;
        for seed in 1..=40u64 {
            let mut r = rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut t = MapTree::default();
            let mut model = Model::default();
            for _ in 0..300 {
                let page = r(200);
                match r(6) {
                    0 | 1 => {
                        // A run of 1..8 mappings of 1..3 pages each, if free.
                        let mut maps = Vec::new();
                        let mut at = page;
                        for _ in 0..=r(8) {
                            let n = r(3) + 1;
                            maps.push(map(at, n));
                            at += n;
                        }
                        let (s, e) = (maps[0].iova, maps[maps.len() - 1].last);
                        assert_eq!(t.first_in(s, e).copied(), model.hits(s, e).first().copied());
                        if model.hits(s, e).is_empty() {
                            t.insert_run(&maps);
                            model.0.extend(maps.iter().map(|m| (m.iova, *m)));
                        }
                    }
                    2 => {
                        let victim = model.0.values().nth(r(model.0.len() as u64 + 1) as usize);
                        let (iova, last) =
                            victim.map_or((page * P, page * P), |m| (m.iova, m.last));
                        let want = model.0.get(&iova).is_some_and(|m| m.last == last);
                        assert_eq!(t.remove_exact(iova, last), want);
                        if want {
                            model.0.remove(&iova);
                        }
                        // A wrong `last` removes nothing.
                        assert!(!t.remove_exact(iova, last + P));
                    }
                    3 => {
                        let (s, e) = (page * P, (page + r(20)) * P + r(2) * (P - 1));
                        let want = model.check_whole(s, e);
                        assert_eq!(t.check_whole(s, e), want);
                        if want.is_ok() {
                            t.remove_inside(s, e);
                            for m in model.hits(s, e) {
                                model.0.remove(&m.iova);
                            }
                        }
                    }
                    4 => {
                        let (s, e) = (page * P + r(2) * 0x800, (page + r(12) + 1) * P - 1);
                        let hits = model.hits(s, e);
                        match t.remove_range(s, e) {
                            Ok(got) => {
                                assert_eq!(got, hits);
                                for m in hits {
                                    model.0.remove(&m.iova);
                                }
                            }
                            Err(Error::WouldSplit { iova }) => {
                                let bad = hits.iter().find(|m| m.iova < s || m.last > e);
                                assert_eq!(bad.map(|m| m.iova), Some(iova));
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    _ => {
                        let iova = page * P + r(P);
                        let want = model.0.values().find(|m| m.iova <= iova && iova <= m.last);
                        assert_eq!(t.get(iova), want);
                        let m = map(page, 1);
                        if model.hits(m.iova, m.last).is_empty() {
                            t.insert(m);
                            model.0.insert(m.iova, m);
                        }
                    }
                }
                let all: Vec<Mapping> = t.iter().copied().collect();
                assert_eq!(all, model.0.values().copied().collect::<Vec<_>>());
                assert_eq!(t.len(), model.0.len());
                for (&k, run) in t.runs.iter() {
                    let maps = run.maps();
                    assert!(!maps.is_empty() && maps[0].iova == k);
                    assert!(maps.windows(2).all(|w| w[0].last + 1 == w[1].iova));
                }
                let runs: Vec<(u64, u64)> = t.runs.iter().map(|(&k, r)| (k, r.last())).collect();
                assert!(runs.windows(2).all(|w| w[0].1 < w[1].0));
            }
            went_big += matches!(t.runs, Runs::Big(_)) as u32;
        }
        // Both stores were exercised: some seeds outgrew the vector, some did not.
        assert!((1..40).contains(&went_big), "{went_big} of 40 seeds went to the B-tree");
    }
}
