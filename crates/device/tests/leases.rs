//! The strict promise: a change that takes access away (UNMAP, DETACH, ATTACH that moves
//! the endpoint, `bypass` 1->0, reset) completes only after every lease taken before it is
//! dropped, and a write made under such a lease never lands after the guest saw the change
//! complete. Also the fault notifier, which runs outside every lock.

mod common;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::channel;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use viommu_device::{Access, Iommu, VirtioIommu};
use viommu_proto::*;
use vm_memory::{Bytes, GuestAddress};

/// The page the device thread writes and the guest reuses.
const PAGE: u64 = 0x90_0000;
const IOVA: u64 = 0x4000;
/// How long the device thread holds its lease before writing.
const HOLD: Duration = Duration::from_millis(100);

/// Runs `f` on its own thread; fails if it has not finished within `limit` (a deadlock).
fn watchdog<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(limit).expect("deadlock: the test did not finish in time")
}

/// A device thread that translates `iova` for writing, says so, holds the lease across
/// `HOLD`, writes 0xdd through it, notes the write and then drops the lease.
struct Holder {
    written: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Holder {
    fn start(iommu: Arc<Iommu>, mem: Mem, endpoint: u32, iova: u64) -> Self {
        let written = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let w = written.clone();
        let thread = thread::spawn(move || {
            let t = iommu.translate(endpoint, iova, 4096, Access::Write).unwrap();
            tx.send(()).unwrap();
            thread::sleep(HOLD);
            t.write_at(&mem, 0, &[0xdd; 4096]).unwrap();
            w.store(true, SeqCst);
            drop(t);
        });
        rx.recv().unwrap();
        Self { written, thread }
    }

    fn written(&self) -> bool {
        self.written.load(SeqCst)
    }

    /// The guest reuses the page as soon as it saw the change complete: what it wrote must
    /// survive the device thread.
    fn guest_reuses_page(self, mem: &Mem) {
        mem.write_slice(&[0x66; 4096], GuestAddress(PAGE)).unwrap();
        self.thread.join().unwrap();
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(PAGE)).unwrap();
        assert!(got.iter().all(|&b| b == 0x66), "a write under the lease landed after completion");
    }
}

/// Sends `req` through the queue while a watcher polls the used index; returns the status
/// and whether the device thread's write was done when the used entry appeared.
fn request_watched(
    d: &mut Driver<'_>,
    dev: &mut VirtioIommu,
    req: &Request,
    h: &Holder,
) -> (Status, bool) {
    let used_idx = d.rq.used_idx_addr();
    let before: u16 = d.mem.read_obj(GuestAddress(used_idx)).unwrap();
    let (mem, written) = (d.mem.clone(), h.written.clone());
    let watcher = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while mem.read_obj::<u16>(GuestAddress(used_idx)).unwrap() == before {
            assert!(Instant::now() < deadline, "no used entry");
            thread::yield_now();
        }
        written.load(SeqCst)
    });
    let status = d.request(dev, req);
    (status, watcher.join().unwrap())
}

/// Endpoint 1 attached to domain 1 with `IOVA` mapped to `PAGE`.
fn mapped_device(d: &mut Driver<'_>) -> VirtioIommu {
    let mut dev = d.device(cfg(&[1, 2]));
    assert_eq!(d.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(d.request(&mut dev, &map(1, IOVA, IOVA + 0xfff, PAGE, RW)), Status::Ok);
    dev
}

/// One change through the queue, held up by an older lease.
fn queue_change_waits_for_the_lease(req: Request) {
    watchdog(Duration::from_secs(120), move || {
        let mem = new_mem();
        let mut d = Driver::new(&mem);
        let mut dev = mapped_device(&mut d);
        let grace = dev.iommu().counters().grace_periods;
        let h = Holder::start(dev.iommu(), mem.clone(), 1, IOVA);
        let (status, written_first) = request_watched(&mut d, &mut dev, &req, &h);
        assert_eq!(status, Status::Ok);
        assert!(written_first, "the used entry appeared while an older lease was held");
        // Leases taken now see the new state.
        assert!(dev.iommu().translate(1, IOVA, 4, Access::Write).is_err());
        assert_eq!(dev.iommu().counters().grace_periods, grace + 1);
        h.guest_reuses_page(&mem);
    });
}

#[test]
fn unmap_completes_after_an_older_lease() {
    queue_change_waits_for_the_lease(unmap(1, IOVA, IOVA + 0xfff));
}

#[test]
fn detach_completes_after_an_older_lease() {
    queue_change_waits_for_the_lease(detach(1, 1));
}

#[test]
fn moving_the_endpoint_completes_after_an_older_lease() {
    queue_change_waits_for_the_lease(attach(2, 1));
}

/// `bypass` 1->0 with the endpoint unattached: the config write returns after the lease.
#[test]
fn bypass_off_returns_after_an_older_lease() {
    watchdog(Duration::from_secs(120), || {
        let mem = new_mem();
        let d = Driver::new(&mem);
        let mut dev = d.device(cfg(&[1]));
        assert!(dev.write_config(36, &[1]));
        let h = Holder::start(dev.iommu(), mem.clone(), 1, PAGE);
        assert!(dev.write_config(36, &[0]));
        assert!(h.written(), "bypass 1->0 returned while an older lease was held");
        assert!(dev.iommu().translate(1, PAGE, 4, Access::Write).is_err());
        h.guest_reuses_page(&mem);
    });
}

#[test]
fn reset_returns_after_an_older_lease() {
    watchdog(Duration::from_secs(120), || {
        let mem = new_mem();
        let mut d = Driver::new(&mem);
        let mut dev = mapped_device(&mut d);
        let h = Holder::start(dev.iommu(), mem.clone(), 1, IOVA);
        dev.reset();
        assert!(h.written(), "reset returned while an older lease was held");
        assert!(dev.iommu().translate(1, IOVA, 4, Access::Write).is_err());
        h.guest_reuses_page(&mem);
    });
}

/// The request thread does not wait for a lease taken after the change: a lease on another
/// page, taken once the UNMAP is visible and held until the end, does not hold it up.
#[test]
fn a_lease_taken_after_the_change_is_not_waited_for() {
    watchdog(Duration::from_secs(120), || {
        let mem = new_mem();
        let mut d = Driver::new(&mem);
        let mut dev = mapped_device(&mut d);
        assert_eq!(d.request(&mut dev, &map(1, 0x8000, 0x8fff, PAGE + 0x1000, RW)), Status::Ok);
        let h = Holder::start(dev.iommu(), mem.clone(), 1, IOVA);
        let (late_tx, late_rx) = channel();
        let (done_tx, done_rx) = channel::<()>();
        let iommu = dev.iommu();
        let late = thread::spawn(move || {
            // Once the UNMAP is visible (and its grace period has begun), take a new lease.
            while iommu.translate(1, IOVA, 4, Access::Read).is_ok() {
                thread::yield_now();
            }
            thread::sleep(Duration::from_millis(50));
            let t = iommu.translate(1, 0x8000, 4, Access::Read).unwrap();
            late_tx.send(()).unwrap();
            // Held until the UNMAP has completed; a timeout means the UNMAP waited for it.
            let waited_for_me = done_rx.recv_timeout(Duration::from_secs(20)).is_err();
            drop(t);
            waited_for_me
        });
        let (status, written_first) =
            request_watched(&mut d, &mut dev, &unmap(1, IOVA, IOVA + 0xfff), &h);
        assert_eq!(status, Status::Ok);
        assert!(written_first);
        late_rx.recv().unwrap();
        let _ = done_tx.send(());
        assert!(!late.join().unwrap(), "the UNMAP waited for a lease taken after it");
        h.guest_reuses_page(&mem);
    });
}

/// A translation made for reading cannot write, and no access reaches past its range.
#[test]
fn a_translation_permits_only_its_access_and_range() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let dev = mapped_device(&mut d);
    let iommu = dev.iommu();
    let t = iommu.translate(1, IOVA + 0x10, 0x20, Access::Read).unwrap();
    assert!(matches!(t.write_at(&mem, 0, &[1]), Err(viommu_device::AccessError::NotPermitted)));
    let mut b = [0u8; 0x20];
    t.read_at(&mem, 0, &mut b).unwrap();
    assert!(matches!(t.read_at(&mem, 1, &mut b), Err(viommu_device::AccessError::OutOfRange)));
    drop(t);
    let t = iommu.translate(1, IOVA, 0x10, Access::Write).unwrap();
    t.write_at(&mem, 8, &[7; 8]).unwrap();
    assert!(matches!(
        t.read_at(&mem, 0, &mut b[..1]),
        Err(viommu_device::AccessError::NotPermitted)
    ));
    assert_eq!(d.read(PAGE + 8, 8), vec![7; 8]);
}

/// A thread that holds a lease and then processes requests would wait for itself: that is
/// refused loudly, not a hang.
#[test]
fn processing_requests_while_holding_a_lease_panics() {
    let r = watchdog(Duration::from_secs(60), || {
        thread::spawn(|| {
            let mem = new_mem();
            let mut d = Driver::new(&mem);
            let mut dev = mapped_device(&mut d);
            let iommu = dev.iommu();
            let _t = iommu.translate(1, IOVA, 4, Access::Read).unwrap();
            d.request(&mut dev, &unmap(1, IOVA, IOVA + 0xfff));
        })
        .join()
    });
    assert!(r.is_err());
}

// ---- stress ------------------------------------------------------------------------

const READERS: usize = 4;
const ROUNDS: usize = 120;
/// Generation k maps two pages, at `GEN_BASE + k * 8 KiB`; a reader tells k from the address.
const GEN_BASE: u64 = 0x90_0000;
const SPAN: u64 = 0x2000;

struct Shared {
    /// Generation k's removal (UNMAP, DETACH or a move) has completed.
    removed: Vec<AtomicBool>,
    /// Readers inside a lease on generation k.
    live: Vec<AtomicUsize>,
    progress: Vec<AtomicU64>,
    hits: AtomicU64,
    stop: AtomicBool,
}

fn reader(iommu: Arc<Iommu>, mem: Mem, s: Arc<Shared>, me: usize, start: Arc<Barrier>) {
    start.wait();
    let mut b = [0u8; 8];
    while !s.stop.load(SeqCst) {
        if let Ok(t) = iommu.translate(1, IOVA, SPAN, Access::Read) {
            // Never torn: both pages of one generation, which are physically contiguous.
            let seg = t.contiguous().expect("a translation mixing two generations");
            assert_eq!(seg.len, SPAN);
            let k = ((seg.addr - GEN_BASE) / SPAN) as usize;
            assert_eq!(seg.addr, GEN_BASE + k as u64 * SPAN);
            s.live[k].fetch_add(1, SeqCst);
            t.read_at(&mem, SPAN - 8, &mut b).unwrap();
            thread::yield_now();
            assert!(!s.removed[k].load(SeqCst), "generation {k} removed under a live lease");
            s.live[k].fetch_sub(1, SeqCst);
            drop(t);
            s.hits.fetch_add(1, SeqCst);
        }
        s.progress[me].fetch_add(1, SeqCst);
    }
}

/// Waits until every reader has gone round at least twice since now.
fn readers_progress(s: &Shared) {
    let marks: Vec<u64> = s.progress.iter().map(|p| p.load(SeqCst)).collect();
    for (p, m) in s.progress.iter().zip(marks) {
        while p.load(SeqCst) < m + 2 {
            thread::yield_now();
        }
    }
}

/// Many threads translate under leases while MAP, UNMAP, ATTACH (moves) and DETACH run
/// through the queue: every translation is one generation's, no removal completes while a
/// lease on what it removed is live, and nothing deadlocks (watchdog).
#[test]
fn stress_leases_against_the_request_queue() {
    watchdog(Duration::from_secs(300), || {
        let mem = new_mem();
        let mut d = Driver::new(&mem);
        let mut dev = d.device(cfg(&[1]));
        let s = Arc::new(Shared {
            removed: (0..ROUNDS).map(|_| AtomicBool::new(false)).collect(),
            live: (0..ROUNDS).map(|_| AtomicUsize::new(0)).collect(),
            progress: (0..READERS).map(|_| AtomicU64::new(0)).collect(),
            hits: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let start = Arc::new(Barrier::new(READERS + 1));
        let readers: Vec<_> = (0..READERS)
            .map(|me| {
                let (i, m, s, b) = (dev.iommu(), mem.clone(), s.clone(), start.clone());
                thread::spawn(move || reader(i, m, s, me, b))
            })
            .collect();
        start.wait();
        let mut domain = 1;
        assert_eq!(d.request(&mut dev, &attach(domain, 1)), Status::Ok);
        for k in 0..ROUNDS {
            let phys = GEN_BASE + k as u64 * SPAN;
            for page in [0, 0x1000] {
                let m = map(domain, IOVA + page, IOVA + page + 0xfff, phys + page, RW);
                assert_eq!(d.request(&mut dev, &m), Status::Ok);
            }
            readers_progress(&s);
            let removal = match k % 4 {
                // One request removes both pages: readers see both or none.
                0 | 1 => unmap(domain, IOVA, IOVA + SPAN - 1),
                // The domain (and its mappings) goes with its only endpoint.
                2 => detach(domain, 1),
                _ => {
                    domain = 3 - domain;
                    attach(domain, 1)
                }
            };
            assert_eq!(d.request(&mut dev, &removal), Status::Ok);
            s.removed[k].store(true, SeqCst);
            assert_eq!(s.live[k].load(SeqCst), 0, "round {k}: completed under a live lease");
            if k % 4 == 2 {
                assert_eq!(d.request(&mut dev, &attach(domain, 1)), Status::Ok);
            }
        }
        s.stop.store(true, SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert!(s.hits.load(SeqCst) > 0, "no reader ever translated");
    });
}

// ---- fault notifier ----------------------------------------------------------------

/// A notifier that takes the VMM's device lock (held around `process_request_queue`) to
/// deliver the event, while the request thread holds that lock and runs an UNMAP. It
/// deadlocked while translate called the notifier under its read locks.
#[test]
fn a_notifier_may_take_the_lock_held_around_request_processing() {
    watchdog(Duration::from_secs(60), || {
        let mem = new_mem();
        let mut d = Driver::new(&mem);
        let dev = mapped_device(&mut d);
        let ev = d.add_event_buffer(64);
        let iommu = dev.iommu();
        let dev = Arc::new(Mutex::new(dev));
        let (entered_tx, entered_rx) = channel();
        let (holding_tx, holding_rx) = channel::<()>();
        let holding_rx = Mutex::new(holding_rx);
        let (dev2, mem2) = (dev.clone(), mem.clone());
        iommu.set_fault_notifier(Some(Arc::new(move || {
            entered_tx.send(()).unwrap();
            holding_rx.lock().unwrap().recv().unwrap();
            dev2.lock().unwrap().process_event_queue(&mem2).unwrap();
        })));
        let i2 = iommu.clone();
        let faulting =
            thread::spawn(move || i2.translate(1, 0x7000_0000, 4, Access::Read).is_err());
        entered_rx.recv().unwrap();
        {
            let mut guard = dev.lock().unwrap();
            holding_tx.send(()).unwrap();
            let status = d.request(&mut guard, &unmap(1, IOVA, IOVA + 0xfff));
            assert_eq!(status, Status::Ok);
        }
        assert!(faulting.join().unwrap());
        assert_eq!(d.take_used(1).len(), 1, "the notifier delivered the event");
        assert_eq!(d.read(ev + 8, 4), 1u32.to_le_bytes());
    });
}

/// A notifier that unregisters itself: it hung translate, which held the notifier's read
/// lock while calling it.
#[test]
fn a_notifier_may_unregister_itself() {
    watchdog(Duration::from_secs(60), || {
        let iommu = Arc::new(Iommu::new(cfg(&[1])).unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let (weak, c) = (Arc::downgrade(&iommu), calls.clone());
        iommu.set_fault_notifier(Some(Arc::new(move || {
            c.fetch_add(1, SeqCst);
            weak.upgrade().unwrap().set_fault_notifier(None);
        })));
        assert!(iommu.translate(1, 0, 4, Access::Read).is_err());
        // A fault of another kind would be queued (not coalesced), but nobody is told now.
        assert!(iommu.translate(1, 0, 4, Access::Write).is_err());
        assert_eq!(iommu.pending_faults(), 2);
        assert_eq!(calls.load(SeqCst), 1);
    });
}
