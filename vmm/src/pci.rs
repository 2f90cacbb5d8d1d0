//! Putting PCI functions on the machine: the root at 0xCF8, BARs on the
//! PIO/MMIO buses, ioeventfds at their BAR offsets, and all of it following
//! the guest when it moves a BAR.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use platter_devices::bus::Bus;
use platter_devices::pci::{
    BarAllocator, BarMove, DevFn, PciBarWindow, PciError, PciRoot, SharedPciDevice, CONFIG_IO_BASE,
    CONFIG_IO_LEN, PCI_IO_WINDOW,
};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{pci_mmio64_start, PCI_HOLE_START, PCI_MMIO32_END, PCI_MMIO64_SIZE};

/// Failures while adding a PCI function.
#[derive(Debug, thiserror::Error)]
pub enum PciWiringError {
    /// The PCI layer refused (BAR space, bus full).
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    /// A BAR overlapped something on a bus.
    #[error("PCI BAR: {0}")]
    Bus(#[from] platter_devices::bus::BusError),
    /// KVM refused an ioeventfd.
    #[error("KVM_IOEVENTFD at {addr:#x}: {source}")]
    IoEvent {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A doorbell a device wants as an ioeventfd: a write to `offset` in BAR
/// `bar` signals `fd` inside KVM, without a userspace exit.
pub struct IoEvent {
    /// BAR index.
    pub bar: usize,
    /// Offset of the doorbell in the BAR.
    pub offset: u64,
    /// The eventfd the device's I/O thread waits on.
    pub fd: EventFd,
}

struct Slot {
    device: SharedPciDevice,
    ioevents: Vec<IoEvent>,
}

/// Address space shared by vCPUs (dispatch) and the BAR-move handler.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Arc<RwLock<Bus>>,
    /// Memory-mapped I/O.
    pub mmio: Arc<RwLock<Bus>>,
}

/// The PCI segment: root, BAR allocator and the functions on it.
pub struct PciSegment {
    vm: Arc<VmFd>,
    buses: Buses,
    root: Arc<Mutex<PciRoot>>,
    alloc: BarAllocator,
    slots: Arc<Mutex<HashMap<u8, Slot>>>,
}

fn ioevent_addr(kind_io: bool, addr: u64) -> IoEventAddress {
    if kind_io {
        IoEventAddress::Pio(addr)
    } else {
        IoEventAddress::Mmio(addr)
    }
}

impl PciSegment {
    /// The root, for shutting its functions down when the machine stops.
    pub fn root(&self) -> Arc<Mutex<PciRoot>> {
        self.root.clone()
    }

    /// Put the root on the PIO bus and follow BAR moves.
    pub fn new(vm: Arc<VmFd>, buses: Buses, ram: u64) -> Result<Self, PciWiringError> {
        let mmio64 = pci_mmio64_start(ram);
        let alloc = BarAllocator::new(
            PCI_IO_WINDOW,
            PCI_HOLE_START..PCI_MMIO32_END,
            mmio64..mmio64 + PCI_MMIO64_SIZE,
        )?;
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let slots: Arc<Mutex<HashMap<u8, Slot>>> = Arc::default();
        {
            let (vm, buses, slots) = (vm.clone(), buses.clone(), slots.clone());
            root.lock()
                .expect("root lock")
                .set_bar_move_handler(Box::new(move |mv, devfn| {
                    if let Err(e) = move_bar(&vm, &buses, &slots, mv, devfn) {
                        log::warn!("PCI {devfn}: moving BAR {}: {e}", mv.bar);
                    }
                }));
        }
        buses
            .pio
            .write()
            .expect("bus lock")
            .insert(root.clone(), CONFIG_IO_BASE, CONFIG_IO_LEN)?;
        Ok(Self {
            vm,
            buses,
            root,
            alloc,
            slots,
        })
    }

    /// Place `device`'s BARs, put them on the buses, register its doorbells.
    pub fn add(
        &mut self,
        device: SharedPciDevice,
        ioevents: Vec<IoEvent>,
    ) -> Result<DevFn, PciWiringError> {
        let bars: Vec<_> = {
            let mut d = device.lock().expect("device lock");
            self.alloc.place_bars(d.config_mut())?;
            d.config().bars().collect()
        };
        for (index, bar) in &bars {
            let bus = if bar.kind.is_io() {
                &self.buses.pio
            } else {
                &self.buses.mmio
            };
            bus.write().expect("bus lock").insert(
                Arc::new(Mutex::new(PciBarWindow::new(device.clone(), *index))),
                bar.address,
                bar.size,
            )?;
        }
        for ev in &ioevents {
            let bar = bars
                .iter()
                .find(|(i, _)| *i == ev.bar)
                .map(|(_, b)| *b)
                .ok_or(PciError::BarNotRegistered(ev.bar))?;
            let addr = bar.address + ev.offset;
            self.vm
                .register_ioevent(&ev.fd, &ioevent_addr(bar.kind.is_io(), addr), NoDatamatch)
                .map_err(|source| PciWiringError::IoEvent { addr, source })?;
        }
        let devfn = self
            .root
            .lock()
            .expect("root lock")
            .add_device(device.clone())?;
        self.slots
            .lock()
            .expect("slots lock")
            .insert(devfn.raw(), Slot { device, ioevents });
        Ok(devfn)
    }
}

/// Follow a guest BAR move: window and doorbells go to the new address.
fn move_bar(
    vm: &VmFd,
    buses: &Buses,
    slots: &Mutex<HashMap<u8, Slot>>,
    mv: BarMove,
    devfn: DevFn,
) -> Result<(), PciWiringError> {
    let slots = slots.lock().expect("slots lock");
    let Some(slot) = slots.get(&devfn.raw()) else {
        return Ok(());
    };
    let io = mv.kind.is_io();
    let bus = if io { &buses.pio } else { &buses.mmio };
    {
        let mut bus = bus.write().expect("bus lock");
        let window = bus.remove(mv.old).unwrap_or_else(|_| {
            Arc::new(Mutex::new(PciBarWindow::new(slot.device.clone(), mv.bar)))
        });
        if let Err(e) = bus.insert(window.clone(), mv.new, mv.len) {
            // Keep the BAR reachable where it was rather than losing it.
            let _ = bus.insert(window, mv.old, mv.len);
            return Err(e.into());
        }
    }
    for ev in slot.ioevents.iter().filter(|e| e.bar == mv.bar) {
        let _ = vm.unregister_ioevent(&ev.fd, &ioevent_addr(io, mv.old + ev.offset), NoDatamatch);
        let addr = mv.new + ev.offset;
        vm.register_ioevent(&ev.fd, &ioevent_addr(io, addr), NoDatamatch)
            .map_err(|source| PciWiringError::IoEvent { addr, source })?;
    }
    Ok(())
}
