//! I/O threads: where virtio devices serve their queues, off the vCPU
//! threads. One thread can serve many devices (disks that name the same
//! `iothread` in the config share it, like QEMU's `-object iothread`); a
//! device without a name gets a thread of its own.
//!
//! ```text
//!          epoll (one per thread)
//!  token CONTROL                 commands from device threads: attach, detach, quit
//!  token (slot << 8) | local     an fd of the work in `slot` (queue notify, completion)
//!  after each wakeup: `after_batch` of every work that had an event (interrupts)
//!  before each sleep: poll every work for up to the adaptive window (io_poll.rs)
//! ```
//!
//! A device hands its queues over as an [`IoWork`] when the driver sets
//! DRIVER_OK (`attach`) and takes them back at reset (`detach`). Detaching
//! does not block the other devices of the thread: the work stops taking
//! requests at once and keeps only its completion fds in the set until
//! nothing is in flight, then goes back to the device.

use std::any::Any;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::io_poll::{PollWindow, DEFAULT_POLL_MAX_NS};

/// The queues of one device, as an I/O thread serves them.
pub trait IoWork: Send {
    /// Fds to watch while serving, each with a local token (< 255).
    fn serve_fds(&self) -> Vec<(RawFd, u8)>;
    /// Fds to keep watching while draining (completions), a subset of `serve_fds`.
    fn drain_fds(&self) -> Vec<(RawFd, u8)>;
    /// Before the first event: serve what the driver queued before DRIVER_OK.
    fn start(&mut self);
    /// The fd with token `local` is readable.
    fn on_event(&mut self, local: u8);
    /// End of a batch of events: send the interrupts that are due.
    fn after_batch(&mut self);
    /// The thread starts polling: the driver need not notify for a while.
    fn poll_begin(&mut self) {}
    /// While polling: serve what is there without waiting for an fd (new
    /// requests in a ring, completions already posted); true if there was
    /// anything.
    fn poll(&mut self) -> bool {
        false
    }
    /// Polling ends: ask the driver for notifications again (serving what
    /// came in meanwhile, so none is missed).
    fn poll_end(&mut self) {}
    /// Whether this is the only work the thread serves (told on every attach and detach):
    /// a work alone on its thread may block it for a moment with nobody else waiting.
    fn set_alone(&mut self, _alone: bool) {}
    /// Stop taking requests; the driver has forgotten the rings.
    fn begin_drain(&mut self);
    /// Collect completions while draining; true once nothing is in flight.
    fn poll_drained(&mut self) -> bool;
    /// For the device to take its own type back after `detach`.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// Local token that is never used by a work: marks the control eventfd.
const CONTROL: u64 = u64::MAX;

/// What `attach` answers: the slot, or the work back with the reason.
type AttachReply = Result<usize, (io::Error, Box<dyn IoWork>)>;

enum Command {
    Attach(Box<dyn IoWork>, Sender<AttachReply>),
    Detach(usize, Sender<Box<dyn IoWork>>),
}

/// A running I/O thread; dropping the last handle stops it.
pub struct IoThread {
    name: String,
    commands: Mutex<Sender<Command>>,
    wake: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.name)
            .finish()
    }
}

/// Why work could not be attached, with the work unless it was lost.
pub type AttachError = Box<(io::Error, Option<Box<dyn IoWork>>)>;

impl IoThread {
    /// Start an idle thread named `name` (shown in `top -H` / `ps -L`) with
    /// the default polling (none: it sleeps in epoll when idle).
    pub fn new(name: &str) -> io::Result<Self> {
        Self::with_poll_max(name, DEFAULT_POLL_MAX_NS)
    }

    /// Start a thread whose polling window grows to at most `poll_max_ns`
    /// (0: it never polls, it sleeps in epoll as soon as it is idle).
    pub fn with_poll_max(name: &str, poll_max_ns: u64) -> io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CONTROL),
        )?;
        let thread_wake = wake.try_clone()?;
        let (tx, rx) = channel();
        // Linux thread names are at most 15 bytes.
        let short: String = name.chars().take(15).collect();
        let handle = std::thread::Builder::new()
            .name(short)
            .spawn(move || Serving::new(epoll, thread_wake, rx, poll_max_ns).run())?;
        Ok(Self {
            name: name.to_string(),
            commands: Mutex::new(tx),
            wake,
            handle: Some(handle),
        })
    }

    /// The name it was created with.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn send(&self, cmd: Command) -> bool {
        let sent = match self.commands.lock() {
            Ok(tx) => tx.send(cmd).is_ok(),
            Err(_) => false,
        };
        sent && self.wake.write(1).is_ok()
    }

    /// Serve `work` from now on; returns its slot for [`IoThread::detach`].
    pub fn attach(&self, work: Box<dyn IoWork>) -> Result<usize, AttachError> {
        let (tx, rx) = channel();
        if !self.send(Command::Attach(work, tx)) {
            return Err(Box::new((io::Error::other("the I/O thread is gone"), None)));
        }
        match rx.recv() {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err((e, work))) => Err(Box::new((e, Some(work)))),
            Err(_) => Err(Box::new((io::Error::other("the I/O thread died"), None))),
        }
    }

    /// Stop serving the work in `slot` once nothing of it is in flight, and
    /// give it back; `None` if the thread died with it, or if `within` is
    /// given and passes first (the work stays with the thread, draining).
    pub fn detach(
        &self,
        slot: usize,
        within: Option<std::time::Duration>,
    ) -> Option<Box<dyn IoWork>> {
        let (tx, rx) = channel();
        if !self.send(Command::Detach(slot, tx)) {
            return None;
        }
        match within {
            Some(t) => rx.recv_timeout(t).ok(),
            None => rx.recv().ok(),
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Closing the channel tells the thread to finish.
        if let Ok(tx) = self.commands.get_mut() {
            *tx = channel().0;
        }
        let _ = self.wake.write(1);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                log::error!("I/O thread {}: panicked", self.name);
            }
        }
    }
}

enum SlotState {
    Serving,
    Draining(Sender<Box<dyn IoWork>>),
}

struct Slot {
    work: Box<dyn IoWork>,
    state: SlotState,
    /// Fds currently in the epoll set, to take out on detach.
    fds: Vec<RawFd>,
}

/// The thread's side.
struct Serving {
    epoll: Epoll,
    wake: EventFd,
    commands: Receiver<Command>,
    slots: Vec<Option<Slot>>,
    poll: PollWindow,
}

fn token(slot: usize, local: u8) -> u64 {
    ((slot as u64) << 8) | u64::from(local)
}

impl Serving {
    fn new(epoll: Epoll, wake: EventFd, commands: Receiver<Command>, poll_max_ns: u64) -> Self {
        Self {
            epoll,
            wake,
            commands,
            slots: Vec::new(),
            poll: PollWindow::new(poll_max_ns),
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut touched: Vec<usize> = Vec::new();
        loop {
            let idle_since = Instant::now();
            // Work found by polling: look at the fds without sleeping, then poll again.
            let polled = self.poll_serving();
            let count = match self.epoll.wait(if polled { 0 } else { -1 }, &mut events) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("I/O thread: epoll failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            if !polled {
                self.poll.waited(idle_since.elapsed());
            }
            touched.clear();
            for ev in &events[..count] {
                let t = ev.data();
                if t == CONTROL {
                    if !self.commands() {
                        return self.finish();
                    }
                    continue;
                }
                let slot = usize::try_from(t >> 8).unwrap_or(usize::MAX);
                let local = (t & 0xff) as u8;
                let Some(Some(s)) = self.slots.get_mut(slot) else {
                    continue;
                };
                match s.state {
                    SlotState::Serving => {
                        s.work.on_event(local);
                        if !touched.contains(&slot) {
                            touched.push(slot);
                        }
                    }
                    SlotState::Draining(_) => self.poll_drain(slot),
                }
            }
            for &slot in &touched {
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    if matches!(s.state, SlotState::Serving) {
                        s.work.after_batch();
                    }
                }
            }
        }
    }

    /// Spin for the polling window, serving what the works find themselves;
    /// true if any found something (it has been served and signalled).
    fn poll_serving(&mut self) -> bool {
        let window = self.poll.window();
        if window.is_zero() {
            return false;
        }
        let start = Instant::now();
        let mut serving: Vec<&mut Box<dyn IoWork>> = self
            .slots
            .iter_mut()
            .flatten()
            .filter(|s| matches!(s.state, SlotState::Serving))
            .map(|s| &mut s.work)
            .collect();
        if serving.is_empty() {
            return false;
        }
        serving.iter_mut().for_each(|w| w.poll_begin());
        let mut found = false;
        while !found {
            for w in serving.iter_mut() {
                if w.poll() {
                    found = true;
                }
            }
            if start.elapsed() >= window {
                break;
            }
            std::hint::spin_loop();
        }
        for w in serving.iter_mut() {
            w.poll_end();
            w.after_batch();
        }
        found
    }

    /// Take every queued command; false when the handle is gone.
    fn commands(&mut self) -> bool {
        let _ = self.wake.read();
        loop {
            match self.commands.try_recv() {
                Ok(Command::Attach(work, reply)) => {
                    let _ = reply.send(self.attach(work));
                }
                Ok(Command::Detach(slot, reply)) => self.detach(slot, reply),
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn watch(&self, slot: usize, fds: &[(RawFd, u8)]) -> io::Result<Vec<RawFd>> {
        let mut added = Vec::new();
        for &(fd, local) in fds {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token(slot, local)),
            ) {
                self.unwatch(&added);
                return Err(e);
            }
            added.push(fd);
        }
        Ok(added)
    }

    fn unwatch(&self, fds: &[RawFd]) {
        for &fd in fds {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn attach(&mut self, mut work: Box<dyn IoWork>) -> AttachReply {
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let fds = match self.watch(slot, &work.serve_fds()) {
            Ok(f) => f,
            Err(e) => return Err((e, work)),
        };
        work.start();
        work.after_batch();
        self.slots[slot] = Some(Slot {
            work,
            state: SlotState::Serving,
            fds,
        });
        self.tell_alone();
        Ok(slot)
    }

    /// Tell every work whether it is the only one here.
    fn tell_alone(&mut self) {
        let alone = self.slots.iter().flatten().count() == 1;
        for s in self.slots.iter_mut().flatten() {
            s.work.set_alone(alone);
        }
    }

    fn detach(&mut self, slot: usize, reply: Sender<Box<dyn IoWork>>) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            log::error!("I/O thread: detach of an empty slot {slot}");
            return;
        };
        let fds = std::mem::take(&mut s.fds);
        s.work.begin_drain();
        s.state = SlotState::Draining(reply);
        let drain = s.work.drain_fds();
        self.unwatch(&fds);
        match self.watch(slot, &drain) {
            Ok(f) => {
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    s.fds = f;
                }
            }
            Err(e) => log::error!("I/O thread: cannot watch completions while draining: {e}"),
        }
        self.poll_drain(slot);
    }

    /// Hand a draining work back once it has nothing in flight.
    fn poll_drain(&mut self, slot: usize) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        if !s.work.poll_drained() {
            return;
        }
        let Some(mut s) = self.slots[slot].take() else {
            return;
        };
        self.unwatch(&s.fds);
        s.work.set_alone(false);
        self.tell_alone();
        if let SlotState::Draining(reply) = s.state {
            let _ = reply.send(s.work);
        }
    }

    /// The last handle is gone: drain everything still attached.
    fn finish(mut self) {
        for slot in 0..self.slots.len() {
            if let Some(s) = self.slots[slot].as_mut() {
                s.work.begin_drain();
                while !s.work.poll_drained() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;

    /// A work with nothing to watch that records what it was last told about being alone
    /// (0: nothing yet, 1: not alone, 2: alone).
    struct Probe(Arc<AtomicU8>);

    impl IoWork for Probe {
        fn serve_fds(&self) -> Vec<(RawFd, u8)> {
            Vec::new()
        }
        fn drain_fds(&self) -> Vec<(RawFd, u8)> {
            Vec::new()
        }
        fn start(&mut self) {}
        fn on_event(&mut self, _local: u8) {}
        fn after_batch(&mut self) {}
        fn set_alone(&mut self, alone: bool) {
            self.0.store(if alone { 2 } else { 1 }, Ordering::SeqCst);
        }
        fn begin_drain(&mut self) {}
        fn poll_drained(&mut self) -> bool {
            true
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
            self
        }
    }

    /// The only work on a thread is told it is alone; a second one makes neither alone; a
    /// detached work is told it is no longer, and the one left is alone again.
    #[test]
    fn works_learn_whether_they_are_alone() {
        let t = IoThread::new("alone-test").unwrap();
        let (a, b) = (Arc::new(AtomicU8::new(0)), Arc::new(AtomicU8::new(0)));
        let slot_a = t
            .attach(Box::new(Probe(a.clone())))
            .map_err(|_| ())
            .unwrap();
        assert_eq!(a.load(Ordering::SeqCst), 2);
        let slot_b = t
            .attach(Box::new(Probe(b.clone())))
            .map_err(|_| ())
            .unwrap();
        assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (1, 1));
        assert!(t.detach(slot_b, None).is_some());
        assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (2, 1));
        assert!(t.detach(slot_a, None).is_some());
        assert_eq!(a.load(Ordering::SeqCst), 1);
    }
}
