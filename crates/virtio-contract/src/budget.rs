//! How many threads may poll at once, across processes: [`PollBudget`].
//!
//! A polling thread takes a CPU for as long as it polls. On a machine whose spare CPUs
//! are few (these have two, and QEMU's TCG vCPU needs one), the device host's poller
//! and every back-end's worker polling together would take the vCPU's CPU. So a poller
//! runs a pass over its rings only while it holds a *turn*: one of `cpus` slots in a
//! small table that every process sharing the budget maps from the same file. At most
//! `cpus` pollers run at any instant, whichever processes they belong to.
//!
//! The turns go round: a poller that wants one and finds every slot taken waits until
//! a turn is free or its own poll window ends; a holder that sees pollers waiting hands
//! its turn over after each pass and waits for one again ([`PollTurn::wanted`]). So
//! two pollers sharing one turn alternate pass by pass, as two yielding pollers on one
//! CPU would, but never run side by side on two. A poller whose window ends while it
//! waits stops waiting and sleeps until its next notification, which is always correct
//! (polling only saves the notification's wake-up).
//!
//! How it waits depends on where the holders run (each records its CPU on every
//! pass). On a holder's CPU it yields to it: the two then share that one CPU, as two
//! yielding pollers would, and the turn passes without a wake-up. Anywhere else it
//! sleeps on the table (a futex, which works across processes on a shared mapping),
//! since spinning there would take a CPU the budget does not give it; a wake-up costs
//! about what the doorbell polling saves on these machines (~65 µs).
//!
//! A slot holds the holder's process id; a process that died holding one (killed, say)
//! loses it to the next poller that finds every slot taken and checks the holders.
//!
//! The file is trusted as far as the user who owns it: it must be a regular file
//! owned by this process's user (so another user cannot hand us one), and any value in
//! it is only ever read as a process id. A process of the same user that truncates it
//! would fault every sharer on its next access, but such a process could equally stop
//! or ptrace them.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most slots a budget has (CPUs that may poll at once).
pub const MAX_POLL_CPUS: usize = 64;

/// "APB3": marks a file as a poll budget of this layout (bumped when it changes).
const MAGIC: u32 = u32::from_le_bytes(*b"APB3");

/// The most pollers that can say at once that they wait for a turn (more still wait,
/// unannounced: they get a turn when a holder's window ends).
const MAX_WAITERS: usize = 16;

/// The shared table: the file's first bytes.
#[repr(C)]
struct Table {
    magic: AtomicU32,
    /// Bumped whenever a turn is given back: the futex waiters sleep on.
    released: AtomicU32,
    /// The pollers waiting for a turn, each as the CLOCK_MONOTONIC time (ns) at which
    /// it stops waiting; 0 or a past time is a free entry. A time, not a count, so that
    /// a process killed while it waits leaves nothing behind once its window is over.
    waits: [AtomicU64; MAX_WAITERS],
    /// Process ids of the turns' holders; 0 = free.
    slots: [AtomicU32; MAX_POLL_CPUS],
    /// The CPU each holder last ran a pass on.
    slot_cpus: [AtomicU32; MAX_POLL_CPUS],
}

/// The mapping's length: one page holds the table.
const MAP_LEN: usize = 4096;
const _: () = assert!(std::mem::size_of::<Table>() <= MAP_LEN);

/// Why a budget file cannot be used. Nothing was changed in it.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// A slot count outside 1..=[`MAX_POLL_CPUS`].
    #[error("a poll budget needs 1 to {MAX_POLL_CPUS} CPUs, not {0}")]
    Cpus(usize),
    /// The file cannot be opened, sized or mapped.
    #[error("poll budget {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The file is not a regular file this user owns.
    #[error("poll budget {}: not a regular file owned by uid {uid}", path.display())]
    NotOurs {
        /// The file.
        path: PathBuf,
        /// This process's effective user.
        uid: u32,
    },
    /// The file holds something else.
    #[error("poll budget {}: not a poll budget (its first word is {found:#010x})", path.display())]
    NotABudget {
        /// The file.
        path: PathBuf,
        /// What its first word holds.
        found: u32,
    },
}

struct Inner {
    /// `MAP_LEN` bytes mapped read-write, starting with a [`Table`].
    table: NonNull<Table>,
    cpus: usize,
    /// Times a poller of this process waited for a turn until its window ended.
    refused: AtomicU64,
    /// Times a poller of this process slept (on the futex) waiting for a turn.
    slept: AtomicU64,
}

// SAFETY: the table is only ever accessed through atomics, from any thread; the
// mapping lives until `Inner` drops.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

impl Inner {
    fn new(table: NonNull<Table>, cpus: usize) -> Self {
        Self {
            table,
            cpus,
            refused: AtomicU64::new(0),
            slept: AtomicU64::new(0),
        }
    }

    fn table(&self) -> &Table {
        // SAFETY: `table` points at `MAP_LEN` mapped bytes (checked by mmap's result),
        // page-aligned, which hold a `Table` (assert above): atomics of any bit pattern
        // are valid, and the mapping outlives `&self`.
        unsafe { self.table.as_ref() }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: the mapping was made with this address and length, and no reference
        // into it outlives `self` (turns hold an `Arc<Inner>`).
        unsafe { libc::munmap(self.table.as_ptr().cast(), MAP_LEN) };
    }
}

/// The CPUs' worth of polling that the pollers sharing it may use at once (see the
/// module documentation). Cloning shares it; [`PollBudget::unlimited`] (the default)
/// lets every poller poll.
#[derive(Clone, Default)]
pub struct PollBudget(Option<Arc<Inner>>);

impl std::fmt::Debug for PollBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("PollBudget(unlimited)"),
            Some(i) => write!(f, "PollBudget({} CPUs)", i.cpus),
        }
    }
}

/// One poller's turn: its slot is free again when this drops.
pub struct PollTurn(Option<Held>);

struct Held {
    inner: Arc<Inner>,
    slot: usize,
}

impl PollTurn {
    /// Whether another poller (of any process sharing the budget) waits for a turn:
    /// the holder should then give this one back after its pass. Called once per
    /// pass, it also records the CPU the holder runs on, which waiters look at.
    pub fn wanted(&self) -> bool {
        self.0.as_ref().is_some_and(|h| {
            let t = h.inner.table();
            t.slot_cpus[h.slot].store(this_cpu(), Ordering::Release);
            t.wanted()
        })
    }
}

impl Drop for PollTurn {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            let t = h.inner.table();
            t.slots[h.slot].store(0, Ordering::Release);
            t.released.fetch_add(1, Ordering::AcqRel);
            if t.wanted() {
                futex_wake(&t.released);
            }
        }
    }
}

/// CLOCK_MONOTONIC now, in ns: the one clock every process reads alike.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let ns = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(ns)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The CPU this thread runs on now (`u32::MAX` if unknown).
fn this_cpu() -> u32 {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).unwrap_or(u32::MAX)
}

impl Table {
    /// Whether a holder of one of the first `cpus` slots last ran a pass on `cpu`.
    fn holder_on(&self, cpus: usize, cpu: u32) -> bool {
        cpu != u32::MAX
            && self.slots[..cpus]
                .iter()
                .zip(&self.slot_cpus)
                .any(|(s, c)| s.load(Ordering::Acquire) != 0 && c.load(Ordering::Acquire) == cpu)
    }

    /// Whether a poller waits for a turn now.
    fn wanted(&self) -> bool {
        let now = mono_ns();
        self.waits.iter().any(|w| w.load(Ordering::Acquire) > now)
    }

    /// Says that a poller waits for a turn until `until` (CLOCK_MONOTONIC ns): the
    /// entry taken and the value written, to clear when done; `None` if every entry
    /// is taken.
    fn announce(&self, until: u64) -> Option<(&AtomicU64, u64)> {
        let now = mono_ns();
        self.waits.iter().find_map(|w| {
            let v = w.load(Ordering::Acquire);
            (v <= now
                && w.compare_exchange(v, until, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok())
            .then_some((w, until))
        })
    }
}

/// Sleeps while `word` holds `seen`, at most `timeout` (or until a wake-up or signal).
fn futex_wait(word: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `word` is a live, aligned u32 (an atomic in the table's mapping, which
    // the caller's `&` keeps mapped); the kernel only reads it and `ts` for the call.
    // Not FUTEX_PRIVATE: the mapping may be shared with other processes.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

/// Wakes one poller asleep in [`futex_wait`] on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE only reads the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1u32,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

/// Whether process `pid` exists (a value that cannot be a process id does not).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing, only checks that `pid` (positive: one process,
    // never a group) exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn map(fd: libc::c_int, shared: bool) -> io::Result<NonNull<Table>> {
    let flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
    };
    // SAFETY: a fresh mapping chosen by the kernel; nothing else is touched. `fd` is an
    // open file at least `MAP_LEN` long, or -1 with MAP_ANONYMOUS.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MAP_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl PollBudget {
    /// Every poller may poll.
    pub fn unlimited() -> Self {
        Self(None)
    }

    /// A budget of `cpus` shared only by the pollers of this process.
    ///
    /// # Errors
    /// [`BudgetError::Cpus`], or the memory cannot be mapped.
    pub fn local(cpus: usize) -> Result<Self, BudgetError> {
        Self::check(cpus)?;
        let table = map(-1, false).map_err(|source| BudgetError::Io {
            path: PathBuf::from("(anonymous)"),
            source,
        })?;
        Ok(Self(Some(Arc::new(Inner::new(table, cpus)))))
    }

    /// A budget of `cpus` shared with every process that opens `path` (created, mode
    /// 0600, if missing). Processes that give different `cpus` each use at most their
    /// own: the slots are the same table.
    ///
    /// # Errors
    /// [`BudgetError`]: `cpus` out of range, or `path` unusable.
    pub fn open(path: &Path, cpus: usize) -> Result<Self, BudgetError> {
        Self::check(cpus)?;
        let io_err = |source| BudgetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != uid {
            return Err(BudgetError::NotOurs {
                path: path.to_path_buf(),
                uid,
            });
        }
        let not_a_budget = |found| BudgetError::NotABudget {
            path: path.to_path_buf(),
            found,
        };
        // Looked at before the file is sized, so that something else is left as it was.
        let mut first = [0u8; 4];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut first, 0).map_err(io_err)?;
        let found = u32::from_le_bytes(first);
        if n > 0 && found != MAGIC {
            return Err(not_a_budget(found));
        }
        if meta.len() < MAP_LEN as u64 {
            // Two processes creating it at once both extend it with zeros: harmless.
            file.set_len(MAP_LEN as u64).map_err(io_err)?;
        }
        let table = map(std::os::fd::AsRawFd::as_raw_fd(&file), true).map_err(io_err)?;
        let inner = Inner::new(table, cpus);
        match inner
            .table()
            .magic
            .compare_exchange(0, MAGIC, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(found) if found == MAGIC => {}
            Err(found) => return Err(not_a_budget(found)),
        }
        Ok(Self(Some(Arc::new(inner))))
    }

    fn check(cpus: usize) -> Result<(), BudgetError> {
        if (1..=MAX_POLL_CPUS).contains(&cpus) {
            Ok(())
        } else {
            Err(BudgetError::Cpus(cpus))
        }
    }

    /// A turn to poll, or `None` when every slot is taken by a live process.
    pub fn try_take(&self) -> Option<PollTurn> {
        let Some(inner) = &self.0 else {
            return Some(PollTurn(None));
        };
        let slots = &inner.table().slots[..inner.cpus];
        let me = std::process::id();
        let turn = |slot: usize| {
            inner.table().slot_cpus[slot].store(this_cpu(), Ordering::Release);
            Some(PollTurn(Some(Held {
                inner: Arc::clone(inner),
                slot,
            })))
        };
        for (i, s) in slots.iter().enumerate() {
            if s.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return turn(i);
            }
        }
        // All taken: reclaim a slot whose holder died holding it.
        for (i, s) in slots.iter().enumerate() {
            let pid = s.load(Ordering::Acquire);
            if pid != me
                && !alive(pid)
                && s.compare_exchange(pid, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                return turn(i);
            }
        }
        None
    }

    /// A turn to poll, waiting for one until `deadline` if every slot is taken:
    /// yielding to a holder that runs on this CPU, asleep otherwise (see the module
    /// documentation); `None` if none came by then.
    pub fn take_by(&self, deadline: Instant) -> Option<PollTurn> {
        let Some(inner) = &self.0 else {
            return Some(PollTurn(None));
        };
        let t = inner.table();
        // This poller's entry among the waiters, taken when it first has to wait.
        let mut wait = None;
        let got = loop {
            // Read before trying, so that a turn given back after the try wakes us.
            let seen = t.released.load(Ordering::Acquire);
            if let Some(turn) = self.try_take() {
                break Some(turn);
            }
            let now = Instant::now();
            if now >= deadline {
                inner.refused.fetch_add(1, Ordering::Relaxed);
                break None;
            }
            if wait.is_none() {
                wait = t.announce(mono_ns().saturating_add(nanos(deadline - now)));
            }
            if t.holder_on(inner.cpus, this_cpu()) {
                // A holder runs on this CPU: waiting here by yielding to it takes no
                // CPU the two do not already share, and costs no wake-up.
                std::thread::yield_now();
            } else {
                inner.slept.fetch_add(1, Ordering::Relaxed);
                futex_wait(&t.released, seen, deadline - now);
            }
        };
        if let Some((entry, until)) = wait {
            let _ = entry.compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
        got
    }

    /// Times a poller of this process slept waiting for a turn (rather than yielding
    /// to a holder on its own CPU).
    pub fn slept(&self) -> u64 {
        self.0
            .as_ref()
            .map_or(0, |i| i.slept.load(Ordering::Relaxed))
    }

    /// Times a poller of this process wanted a turn and its window ended before one
    /// came.
    pub fn refused(&self) -> u64 {
        self.0
            .as_ref()
            .map_or(0, |i| i.refused.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking
    use super::*;

    /// A directory of this test's own, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("aperture-budget-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_budget_of_one_gives_one_turn_at_a_time() {
        let b = PollBudget::local(1).unwrap();
        let t = b.try_take().expect("a free slot");
        assert!(b.try_take().is_none(), "the only slot is held");
        let start = Instant::now();
        assert!(b.take_by(start + Duration::from_millis(20)).is_none());
        assert!(start.elapsed() >= Duration::from_millis(20), "it waited");
        assert_eq!(b.refused(), 1);
        drop(t);
        assert!(b.try_take().is_some(), "free again once the turn ends");
    }

    #[test]
    fn a_waiting_poller_is_woken_when_the_turn_is_given_back() {
        let b = PollBudget::local(1).unwrap();
        let t = b.try_take().unwrap();
        assert!(!t.wanted());
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let start = Instant::now();
                let got = b.take_by(start + Duration::from_secs(10)).is_some();
                (got, start.elapsed())
            });
            // The holder learns that a poller waits...
            let deadline = Instant::now() + Duration::from_secs(10);
            while !t.wanted() && Instant::now() < deadline {
                std::thread::yield_now();
            }
            assert!(t.wanted(), "the holder sees the waiter");
            // ...and giving the turn back wakes it long before its deadline.
            drop(t);
            let (got, waited) = waiter.join().unwrap();
            assert!(got);
            assert!(waited < Duration::from_secs(5), "{waited:?}");
        });
        assert_eq!(b.refused(), 0);
    }

    #[test]
    fn a_waiter_that_dies_waiting_stops_counting_when_its_window_would_have_ended() {
        let b = PollBudget::local(1).unwrap();
        let t = b.try_take().unwrap();
        let table = b.0.as_ref().unwrap().table();
        // What a poller killed inside `take_by` leaves: its entry, never cleared.
        assert!(table.announce(mono_ns() + 20_000_000).is_some());
        assert!(t.wanted());
        std::thread::sleep(Duration::from_millis(25));
        assert!(!t.wanted(), "a dead waiter's entry expires");
        // Its entry is free for the next waiter.
        let n = (0..MAX_WAITERS + 1)
            .filter(|_| table.announce(mono_ns() + 1_000_000_000).is_some())
            .count();
        assert_eq!(n, MAX_WAITERS);
    }

    #[test]
    fn unlimited_never_refuses() {
        let b = PollBudget::unlimited();
        let _turns: Vec<_> = (0..100).map(|_| b.try_take().unwrap()).collect();
        assert_eq!(b.refused(), 0);
    }

    #[test]
    fn budgets_opened_from_one_file_share_their_slots() {
        let dir = Dir::new("budgets_opened_from_one_file_share_their_slots");
        let path = dir.path().join("budget");
        let a = PollBudget::open(&path, 2).unwrap();
        let b = PollBudget::open(&path, 2).unwrap();
        let _t1 = a.try_take().unwrap();
        let _t2 = b.try_take().unwrap();
        assert!(a.try_take().is_none());
        assert!(b.try_take().is_none());
        // One asking for fewer CPUs uses fewer slots of the same table.
        let c = PollBudget::open(&path, 1).unwrap();
        assert!(c.try_take().is_none());
    }

    #[test]
    fn a_slot_held_by_a_dead_process_is_reclaimed() {
        let dir = Dir::new("a_slot_held_by_a_dead_process_is_reclaimed");
        let path = dir.path().join("budget");
        let b = PollBudget::open(&path, 1).unwrap();
        // A child that exits: its pid is then no process (it is reaped below).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        b.0.as_ref().unwrap().table().slots[0].store(dead, Ordering::Release);
        assert!(b.try_take().is_some(), "a dead holder's slot is taken over");
        // A live holder's (ours, from a turn the other handle holds) is not.
        let other = PollBudget::open(&path, 1).unwrap();
        let _held = other.try_take().unwrap();
        assert!(b.try_take().is_none());
        // Nor is a value that cannot be a pid mistaken for a process group.
        assert!(!alive(u32::MAX));
        assert!(!alive(0));
    }

    #[test]
    fn a_file_that_is_not_a_budget_is_refused_unchanged() {
        let dir = Dir::new("a_file_that_is_not_a_budget_is_refused_unchanged");
        let path = dir.path().join("other");
        std::fs::write(&path, b"not a budget, just text").unwrap();
        let e = PollBudget::open(&path, 1).unwrap_err();
        assert!(matches!(e, BudgetError::NotABudget { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a budget, just text");
        assert!(matches!(
            PollBudget::local(0).unwrap_err(),
            BudgetError::Cpus(0)
        ));
        assert!(matches!(
            PollBudget::local(MAX_POLL_CPUS + 1).unwrap_err(),
            BudgetError::Cpus(_)
        ));
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = Dir::new("a_symlink_is_not_followed");
        let target = dir.path().join("target");
        std::fs::write(&target, b"").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            PollBudget::open(&link, 1).unwrap_err(),
            BudgetError::Io { .. }
        ));
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 0);
    }

    /// Pins the calling thread to `cpu`.
    fn pin(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it; the
        // call only reads it (pid 0: this thread).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
    }

    /// A holder on CPU `holder` that hands its turn over to a waiter on CPU `waiter`
    /// after 20 ms of "passes"; how many times the waiter slept.
    fn hand_over(holder: usize, waiter: usize) -> u64 {
        let b = PollBudget::local(1).unwrap();
        std::thread::scope(|s| {
            let t = s
                .spawn(|| {
                    pin(holder);
                    b.try_take().unwrap()
                })
                .join()
                .unwrap();
            let w = s.spawn(|| {
                pin(waiter);
                b.take_by(Instant::now() + Duration::from_secs(10))
                    .is_some()
            });
            s.spawn(move || {
                pin(holder);
                let end = Instant::now() + Duration::from_millis(20);
                while Instant::now() < end || !t.wanted() {
                    std::thread::yield_now();
                }
                drop(t);
            });
            assert!(w.join().unwrap(), "the waiter got the turn");
        });
        b.slept()
    }

    #[test]
    fn a_waiter_yields_to_a_holder_on_its_own_cpu_and_sleeps_beside_one_on_another() {
        assert_eq!(hand_over(0, 0), 0, "on the holder's CPU it never slept");
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            assert!(hand_over(0, 1) > 0, "on another CPU it slept");
        }
    }
}
