//! The device's answers: replies by ticket, the set of tickets that
//! succeeded, and what a failure means.

use alloc::vec::Vec;

use viommu_proto::Status;

use crate::iommu::{Counters, Ticket};
use crate::{Error, Result};

/// The device's answer to one request.
pub(crate) struct Reply {
    pub(crate) result: Result<()>,
    pub(crate) props: Vec<u8>,
}

/// The replies of a list of tickets, by position in that list. Plain
/// successes take no room: only failures and PROBE properties are kept.
#[derive(Default)]
pub(crate) struct Replies {
    pub(in crate::iommu) len: usize,
    /// Replies that are not a plain success, by ascending position.
    pub(in crate::iommu) others: Vec<(usize, Reply)>,
}

impl Replies {
    /// Replies in order, one per ticket.
    #[cfg(test)]
    pub(crate) fn from_vec(replies: Vec<Reply>) -> Self {
        let len = replies.len();
        Self { len, others: replies.into_iter().enumerate().collect() }
    }

    /// Number of replies.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn other(&self, i: usize) -> Option<&Reply> {
        self.others.binary_search_by_key(&i, |r| r.0).ok().map(|k| &self.others[k].1)
    }

    /// The result of the `i`th ticket's request.
    pub(crate) fn result(&self, i: usize) -> Result<()> {
        match self.other(i) {
            Some(r) => r.result.clone(),
            None => Ok(()),
        }
    }

    /// Whether every request succeeded.
    pub(crate) fn all_ok(&self) -> bool {
        self.others.iter().all(|(_, r)| r.result.is_ok())
    }

    /// The first error among the replies at positions `from..`.
    pub(crate) fn error_from(&self, from: usize) -> Option<Error> {
        self.others.iter().filter(|(i, _)| *i >= from).find_map(|(_, r)| r.result.clone().err())
    }

    /// Takes the PROBE properties of the `i`th reply.
    pub(crate) fn take_props(&mut self, i: usize) -> Vec<u8> {
        match self.others.binary_search_by_key(&i, |r| r.0) {
            Ok(k) => core::mem::take(&mut self.others[k].1.props),
            Err(_) => Vec::new(),
        }
    }
}

/// Tickets as sorted, disjoint half-open ranges. Requests complete mostly
/// in ticket order, so a whole batch of successes is one range.
#[derive(Default)]
pub(in crate::iommu) struct TicketSet(Vec<(u64, u64)>);

impl TicketSet {
    #[inline]
    pub(in crate::iommu) fn insert(&mut self, t: Ticket) {
        let s = t.0;
        match self.0.last_mut() {
            Some(r) if r.1 == s => r.1 += 1,
            _ => self.insert_slow(s),
        }
    }

    #[cold]
    fn insert_slow(&mut self, s: u64) {
        match self.0.last() {
            Some(r) if r.1 < s => return self.0.push((s, s + 1)),
            None => return self.0.push((s, s + 1)),
            _ => {}
        }
        // Out of order: the first range that ends at or after `s`.
        let i = self.0.partition_point(|r| r.1 < s);
        let r = self.0[i];
        if r.1 == s {
            self.0[i].1 += 1;
            if self.0.get(i + 1).is_some_and(|n| n.0 == s + 1) {
                self.0[i].1 = self.0[i + 1].1;
                self.0.remove(i + 1);
            }
        } else if r.0 == s + 1 {
            self.0[i].0 = s;
        } else if r.0 > s {
            self.0.insert(i, (s, s + 1));
        }
    }

    /// Whether `t` is in the set.
    pub(in crate::iommu) fn contains(&self, t: Ticket) -> bool {
        self.end_of(t.0).is_some()
    }

    /// The end of the range that holds `s`, if one does.
    fn end_of(&self, s: u64) -> Option<u64> {
        let i = self.0.partition_point(|r| r.1 <= s);
        self.0.get(i).filter(|r| r.0 <= s).map(|r| r.1)
    }

    /// Removes the `n` consecutive tickets from `first` on, which lie in one range.
    pub(in crate::iommu) fn remove_run(&mut self, first: Ticket, n: usize) {
        self.remove(first.0, first.0 + n as u64);
    }

    /// Removes `[start, end)`, which lies inside one range.
    fn remove(&mut self, start: u64, end: u64) {
        let i = self.0.partition_point(|r| r.1 <= start);
        let Some(&(s, e)) = self.0.get(i).filter(|r| r.0 <= start && end <= r.1) else { return };
        match (s == start, e == end) {
            (true, true) => {
                self.0.remove(i);
            }
            (true, false) => self.0[i].0 = end,
            (false, true) => self.0[i].1 = start,
            (false, false) => {
                self.0[i].1 = start;
                self.0.insert(i + 1, (end, e));
            }
        }
    }

    /// Length of the run of consecutive tickets at the start of `tickets`
    /// that lie in one range (0 if `tickets[0]` is not in the set).
    pub(in crate::iommu) fn run_len(&self, tickets: &[Ticket]) -> usize {
        let Some(&Ticket(first)) = tickets.first() else { return 0 };
        let Some(end) = self.end_of(first) else { return 0 };
        let max = (end - first) as usize;
        let mut n = 1;
        while n < tickets.len() && n < max && tickets[n].0 == first + n as u64 {
            n += 1;
        }
        n
    }
}

/// Whether a request that failed with `e` may still have taken effect: the
/// device reported a transport or internal error, a status the spec does not
/// define, or returned the buffers unwritten. A refusal (RANGE, INVAL, NOENT,
/// NOMEM, UNSUPP, FAULT) means it did nothing.
pub(in crate::iommu) fn may_have_applied(e: &Error) -> bool {
    matches!(
        e,
        Error::Device { status: Status::IoErr | Status::DevErr, .. }
            | Error::BadStatus { .. }
            | Error::NoResponse { .. }
    )
}

/// The first error of replies `from..`; counts a sync error when there is one.
pub(in crate::iommu) fn first_error(
    counters: &Counters,
    replies: &Replies,
    from: usize,
) -> Result<()> {
    match replies.error_from(from) {
        Some(e) => {
            counters.sync_error();
            Err(e)
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;

    fn ranges(s: &TicketSet) -> Vec<(u64, u64)> {
        s.0.clone()
    }

    /// The set of completed tickets against a plain model, with tickets
    /// arriving out of order and taken in runs.
    #[test]
    fn ticket_set_matches_a_model() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..200 {
            let mut set = TicketSet::default();
            let mut model = BTreeSet::new();
            for _ in 0..60 {
                let s = next() % 40;
                if next() % 3 == 0 {
                    // Take a run starting at s, as long as it is in the set.
                    let seqs: Vec<u64> = (s..s + next() % 6 + 1).collect();
                    let tickets: Vec<Ticket> = seqs.iter().map(|&x| Ticket(x)).collect();
                    let n = set.run_len(&tickets);
                    let want = seqs.iter().take_while(|x| model.contains(*x)).count();
                    assert_eq!(n, want, "{seqs:?} in {:?}", ranges(&set));
                    if n > 0 {
                        set.remove_run(Ticket(s), n);
                        for x in &seqs[..n] {
                            model.remove(x);
                        }
                    }
                } else if !model.contains(&s) {
                    set.insert(Ticket(s));
                    model.insert(s);
                }
                // Disjoint, sorted, non-touching, and holding exactly the model.
                let r = ranges(&set);
                assert!(r.windows(2).all(|w| w[0].1 < w[1].0), "{r:?}");
                assert!(r.iter().all(|x| x.0 < x.1));
                let flat: Vec<u64> = r.iter().flat_map(|&(a, b)| a..b).collect();
                assert_eq!(flat, model.iter().copied().collect::<Vec<_>>());
                for x in 0..45 {
                    assert_eq!(set.contains(Ticket(x)), model.contains(&x));
                }
            }
        }
    }
}
