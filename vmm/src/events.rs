//! The device event loop (event-manager): pumps the terminal into COM1 and
//! finishes the requests of controllers that have no I/O thread of their own
//! (IDE) when their disks signal completions. virtio-blk disks have their own
//! I/O threads and don't appear here.

use std::io::Read;
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::disks::CompletionWatch;
use crate::vm::SharedSerial;

/// Copies stdin into the guest's UART receive FIFO.
struct StdinPump {
    serial: SharedSerial,
}

impl MutEventSubscriber for StdinPump {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        let n = match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF (stdin is /dev/null or closed): stop watching it.
                let _ = ops.remove(events);
                return;
            }
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        // The FIFO holds 64 bytes; give the guest a moment to drain pastes.
        for _ in 0..1000 {
            let taken = self.serial.lock().expect("serial lock").enqueue_input(rest);
            rest = &rest[taken..];
            if rest.is_empty() {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null can't be polled: no input then.
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            log::info!("serial input disabled: {e:?}");
        }
    }
}

/// Calls a controller back when one of its disks completed requests.
struct Completions(CompletionWatch);

impl MutEventSubscriber for Completions {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.ide.lock().expect("IDE lock").process_completions();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in &self.0.fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                log::error!("cannot watch disk completions: {e:?}");
            }
        }
    }
}

/// Start the event loop thread: stdin into `serial` (when given) and the
/// controllers' completions.
pub fn spawn(serial: Option<SharedSerial>, watches: Vec<CompletionWatch>) -> std::io::Result<()> {
    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
        .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
    if let Some(serial) = serial {
        em.add_subscriber(Box::new(StdinPump { serial }));
    }
    for w in watches {
        em.add_subscriber(Box::new(Completions(w)));
    }
    thread::Builder::new()
        .name("events".into())
        .spawn(move || loop {
            if let Err(e) = em.run() {
                log::warn!("event loop: {e:?}");
                return;
            }
        })?;
    Ok(())
}
