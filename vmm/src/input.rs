//! The device event loop (event-manager). Today it pumps the terminal into
//! COM1; device I/O threads of later controllers register here too.

use std::io::Read;
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

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
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            log::warn!("serial input disabled: {e:?}");
        }
    }
}

/// Start the event loop thread feeding `serial` from stdin.
pub fn spawn(serial: SharedSerial) -> std::io::Result<()> {
    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
        .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
    em.add_subscriber(Box::new(StdinPump { serial }));
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
