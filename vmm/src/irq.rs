//! KVM GSI routing for MSI and MSI-X.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the table lives here:
//! the default irqchip entries (GSI n -> IOAPIC pin n, and PIC pin n below
//! 16, as KVM sets up by itself) plus one MSI entry per device vector. Each
//! vector has an irqfd: raising it is one eventfd write from any thread.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use platter_devices::interrupt::{MsiMessage, MsiRouter};
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC pins; MSI GSIs are numbered after them.
pub const IOAPIC_PINS: u32 = 24;

/// The VM's routing table.
pub struct GsiTable {
    vm: Arc<VmFd>,
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

impl GsiTable {
    /// A table with only the default irqchip routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: BTreeMap::new(),
            next_gsi: IOAPIC_PINS,
        }
    }

    fn allocate(&mut self) -> u32 {
        let g = self.next_gsi;
        self.next_gsi += 1;
        g
    }

    fn irqchip_entries() -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = gsi;
            v.push(e);
            if gsi < 16 {
                let mut p = e;
                p.u.irqchip.irqchip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                p.u.irqchip.pin = gsi % 8;
                v.push(p);
            }
        }
        v
    }

    /// Build the full table and hand it to KVM.
    fn commit(&self) -> io::Result<()> {
        let mut entries = Self::irqchip_entries();
        for (&gsi, m) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// One PCI function's MSI/MSI-X vectors: a GSI and an irqfd each.
pub struct KvmMsiRouter {
    table: Arc<Mutex<GsiTable>>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiRouter {
    /// Allocate `count` vectors and register their irqfds.
    pub fn new(vm: &VmFd, table: Arc<Mutex<GsiTable>>, count: u16) -> io::Result<Self> {
        let mut vectors = Vec::with_capacity(count.into());
        for _ in 0..count {
            let gsi = table.lock().expect("GSI table lock").allocate();
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            vm.register_irqfd(&evt, gsi)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            vectors.push((gsi, evt));
        }
        Ok(Self { table, vectors })
    }
}

impl MsiRouter for KvmMsiRouter {
    fn route(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
        let Some(&(gsi, _)) = self.vectors.get(usize::from(vector)) else {
            return Err(io::Error::other(format!("no MSI vector {vector}")));
        };
        let mut t = self.table.lock().expect("GSI table lock");
        // A masked vector keeps no route: nothing can be delivered through it.
        if masked {
            if t.msi.remove(&gsi).is_none() {
                return Ok(());
            }
        } else if t.msi.insert(gsi, msg) == Some(msg) {
            return Ok(());
        }
        t.commit()
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some((_, evt)) => evt.write(1),
            None => Err(io::Error::other(format!("no MSI vector {vector}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_entries_match_kvm_defaults() {
        let e = GsiTable::irqchip_entries();
        // 24 IOAPIC pins + 16 PIC pins, as KVM's own default table.
        assert_eq!(e.len(), 24 + 16);
        // SAFETY: irqchip is the union member these entries were built with.
        let pins: Vec<(u32, u32, u32)> = e
            .iter()
            .map(|x| unsafe { (x.gsi, x.u.irqchip.irqchip, x.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(pins.contains(&(14, KVM_IRQCHIP_PIC_SLAVE, 6)));
    }
}
