//! The VMM thread's event queue: what vCPU threads and devices report.
//!
//! A std channel plus an eventfd: senders never block, and the event
//! loop wakes on the eventfd and drains the channel.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Events a vCPU thread reports to the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot, triple fault).
    Reset,
    /// A vCPU cannot continue.
    Failed {
        /// Which vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
    /// The guest ejected a vCPU through ACPI (`_EJ0`).
    Ejected(u32),
    /// The guest tried to eject a present vCPU with no removal pending.
    EjectRefused(u32),
    /// The guest's ACPI scan acknowledged the insertion of a vCPU.
    InsertAcked(u32),
    /// A line from the guest agent (`None`: an oversized line was dropped).
    AgentLine(Option<Vec<u8>>),
}

/// The sending side of the VMM thread's event queue: a channel plus an
/// eventfd that wakes the event loop.
#[derive(Clone, Debug)]
pub struct EventSender {
    tx: Sender<VmEvent>,
    wake: Arc<EventFd>,
}

impl EventSender {
    /// A queue; the receiver is drained after `wake` becomes readable.
    pub fn new() -> std::io::Result<(Self, Receiver<VmEvent>, Arc<EventFd>)> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok((
            Self {
                tx,
                wake: wake.clone(),
            },
            rx,
            wake,
        ))
    }

    /// Sends an event and wakes the event loop. Never blocks.
    pub fn send(&self, event: VmEvent) {
        if self.tx.send(event).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_sender_wakes_the_loop() {
        let (tx, rx, wake) = EventSender::new().unwrap();
        tx.send(VmEvent::Ejected(3));
        tx.send(VmEvent::PowerOff);
        assert_eq!(wake.read().unwrap(), 2);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Ejected(3));
        assert_eq!(rx.try_recv().unwrap(), VmEvent::PowerOff);
    }
}
