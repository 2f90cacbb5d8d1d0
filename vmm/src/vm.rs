//! The machine: a KVM VM with in-kernel irqchip and PIT, guest RAM, the
//! platform devices on the PIO bus, and one thread per vCPU.
//!
//! ```text
//!   vCPU threads --PIO/MMIO exits--> Bus --> devices --irqfd--> KVM
//!   event loop (stdin) --> serial      devices --PowerEvent--> main thread
//! ```

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use platter_devices::bus::Bus;
use platter_devices::interrupt::InterruptLine;
use platter_devices::legacy::{
    self, AcpiPm, PowerEvent, PowerSink, Rtc, Serial, SerialOutput, I8042,
};
use platter_devices::pci::PciRoot;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Config, SerialMode};
use crate::disks::{self, OpenedDisk};
use crate::irq::GsiTable;
use crate::layout::{
    ACPI_PM1A_EVT, COM1_IRQ, COM1_PORT, I8042_PORT, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, RTC_PORT,
};
use crate::pci::{Buses, PciSegment};
use crate::{boot, cpu, memory, stop};

/// Why starting or running the machine failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU setup.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// Host I/O (serial file, eventfds, threads).
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// Placing a device on a bus.
    #[error("wiring devices: {0}")]
    Bus(#[from] platter_devices::bus::BusError),
    /// Putting a disk on its controller.
    #[error(transparent)]
    Attach(#[from] disks::AttachError),
    /// Placing a PCI function.
    #[error(transparent)]
    Pci(#[from] crate::pci::PciWiringError),
    /// A vCPU stopped with an error the guest can't recover from.
    #[error("vCPU {cpu}: {reason}")]
    Vcpu { cpu: u8, reason: String },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (reboot, or a triple fault).
    Reset,
    /// Platter was asked to stop by this signal (`signals.rs`).
    Signal(libc::c_int),
}

/// vCPU exits counted by reason, over all vCPUs (issue: exits per I/O).
#[derive(Default, Debug)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Everything else that reached userspace.
    pub other: AtomicU64,
}

impl ExitCounts {
    /// One line for `--exit-stats`.
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "vcpu exits: io_in={} io_out={} mmio_read={} mmio_write={} other={}",
            g(&self.io_in),
            g(&self.io_out),
            g(&self.mmio_read),
            g(&self.mmio_write),
            g(&self.other)
        )
    }
}

enum Event {
    Power(PowerEvent),
    Failed(VmError),
    Signal(libc::c_int),
}

struct ChannelSink(Mutex<Sender<Event>>);

impl PowerSink for ChannelSink {
    fn power(&self, ev: PowerEvent) {
        let _ = self.0.lock().expect("sink lock").send(Event::Power(ev));
    }
}

/// An ISA interrupt line backed by an irqfd on its GSI.
struct IrqFd(EventFd);

impl InterruptLine for IrqFd {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<Arc<dyn InterruptLine>, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(Arc::new(IrqFd(evt)))
}

/// The shared serial device, for the input pump.
pub type SharedSerial = Arc<Mutex<Serial>>;

/// Everything that lives as long as the guest runs.
pub struct Machine {
    /// The VM, kept open while vCPU threads run (irqfds hang off it).
    _vm: Arc<VmFd>,
    /// Exit counters.
    pub exits: Arc<ExitCounts>,
    events: std::sync::mpsc::Receiver<Event>,
    vcpus: stop::Vcpus,
    pci: Arc<Mutex<PciRoot>>,
}

fn serial_output(cfg: &Config) -> Result<SerialOutput, VmError> {
    Ok(match cfg.serial.mode {
        // Unbuffered: the guest's prompt has no newline and must show at once.
        SerialMode::Stdio => Box::new(std::fs::File::from(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("dup stdout"))?,
        )),
        SerialMode::File => {
            let path = cfg.serial.path.as_ref().expect("validated");
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io_err("opening serial.path"))?,
            )
        }
        SerialMode::Off => Box::new(io::sink()),
    })
}

/// Build the machine from `cfg` and start its vCPUs.
pub fn start(kvm: &Kvm, cfg: &Config, disks: Vec<OpenedDisk>) -> Result<Machine, VmError> {
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let ram = cfg.machine.memory.0;
    let vcpus = u8::try_from(cfg.machine.vcpus).expect("validated to 1..=254");
    let mem = memory::create(&vm, ram)?;

    let (tx, rx) = channel();
    let sink: Arc<dyn PowerSink> = Arc::new(ChannelSink(Mutex::new(tx.clone())));
    let on_signal = tx.clone();
    crate::signals::spawn_waiter(move |sig| {
        let _ = on_signal.send(Event::Signal(sig));
    })
    .map_err(io_err("starting the signal thread"))?;
    let mut pio = Bus::new();
    let serial = Arc::new(Mutex::new(Serial::new(
        irq_line(&vm, COM1_IRQ)?,
        serial_output(cfg)?,
    )));
    pio.insert(serial.clone(), COM1_PORT, legacy::serial::LEN)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(sink.clone()))),
        I8042_PORT,
        legacy::i8042::LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(Rtc::default())),
        RTC_PORT,
        legacy::rtc::LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(boot::acpi::S5_SLP_TYP, sink))),
        ACPI_PM1A_EVT,
        legacy::acpi_pm::LEN,
    )?;
    let buses = Buses {
        pio: Arc::new(RwLock::new(pio)),
        mmio: Arc::new(RwLock::new(Bus::new())),
    };
    let gsi = Arc::new(Mutex::new(GsiTable::new(vm.clone())));
    let mut pci = PciSegment::new(vm.clone(), buses.clone(), ram)?;
    let watches = disks::attach_all(
        disks,
        &mut disks::Wiring {
            vm: &vm,
            mem: &mem,
            gsi: &gsi,
            pci: &mut pci,
            pio: &buses.pio,
            io_threads: disks::NamedThreads::new(&cfg.iothreads),
        },
    )?;
    let stdin_to_serial = (cfg.serial.mode == SerialMode::Stdio).then(|| serial.clone());
    crate::events::spawn(stdin_to_serial, watches).map_err(io_err("starting the event loop"))?;

    let boot = boot::load_linux(
        &mem,
        ram,
        vcpus,
        &cfg.kernel.path,
        cfg.kernel.initramfs.as_deref(),
        &cfg.kernel.cmdline,
    )?;
    cpu::regs::write_boot_tables(&mem)?;
    let base_cpuid = cpu::cpuid::supported(kvm)?;

    let exits = Arc::new(ExitCounts::default());
    stop::install_kick_handler().map_err(io_err("installing the vCPU kick signal handler"))?;
    let mut vcpu_threads = stop::Vcpus::default();
    let mut fds = Vec::new();
    for id in 0..vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpu::cpuid::for_vcpu(base_cpuid.clone(), id, vcpus))
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        cpu::regs::setup(&fd, boot.entry.0, id == 0)?;
        fds.push(fd);
    }
    for (id, fd) in fds.into_iter().enumerate() {
        let id = id as u8;
        let (buses, exits, tx) = (buses.clone(), exits.clone(), tx.clone());
        let stop = vcpu_threads.stop.clone();
        let t = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Err(e) = vcpu_loop(id, fd, &buses, &exits, &tx, &stop) {
                    let _ = tx.send(Event::Failed(e));
                }
            })
            .map_err(io_err("spawning vCPU thread"))?;
        vcpu_threads.threads.push(t);
    }
    // Guest memory must outlive the vCPUs and devices, which may use it until
    // the process exits (a vCPU that did not stop in time still runs).
    std::mem::forget(mem);
    Ok(Machine {
        _vm: vm,
        exits,
        events: rx,
        vcpus: vcpu_threads,
        pci: pci.root(),
    })
}

impl Machine {
    /// Stop the vCPUs, then drain and flush every disk (`stop.rs`). Call once
    /// the guest has powered off or reset, before the process ends.
    pub fn shutdown(&mut self) {
        let running = self.vcpus.stop(VCPU_STOP_TIMEOUT);
        if running > 0 {
            log::warn!("{running} vCPU threads did not stop; shutting the devices down anyway");
        }
        stop::shutdown_pci(&self.pci);
    }

    /// Wait for the guest to power off or reset.
    pub fn wait(&self) -> Result<Outcome, VmError> {
        match self.events.recv() {
            Ok(Event::Power(PowerEvent::PowerOff)) => Ok(Outcome::PowerOff),
            Ok(Event::Power(PowerEvent::Reset)) => Ok(Outcome::Reset),
            Ok(Event::Failed(e)) => Err(e),
            Ok(Event::Signal(sig)) => Ok(Outcome::Signal(sig)),
            Err(_) => Err(VmError::Vcpu {
                cpu: 0,
                reason: "all vCPU threads ended without a power event".into(),
            }),
        }
    }
}

/// How long stopping waits for the vCPU threads to leave KVM_RUN.
const VCPU_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Find the device under `addr` with the bus lock held only for the lookup,
/// so a device access may itself move BARs (PCI config writes do).
fn dispatch(
    bus: &RwLock<Bus>,
    addr: u64,
    access: impl FnOnce(&mut dyn platter_devices::bus::BusDevice, u64),
) -> bool {
    let found = bus.read().expect("bus lock").resolve(addr);
    match found {
        Some((dev, off)) => {
            access(&mut *dev.lock().expect("device lock"), off);
            true
        }
        None => false,
    }
}

fn vcpu_loop(
    id: u8,
    mut fd: VcpuFd,
    buses: &Buses,
    exits: &ExitCounts,
    tx: &Sender<Event>,
    stop: &AtomicBool,
) -> Result<(), VmError> {
    let count = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                count(&exits.io_in);
                if !dispatch(&buses.pio, u64::from(port), |d, off| d.read(off, data)) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count(&exits.io_out);
                dispatch(&buses.pio, u64::from(port), |d, off| d.write(off, data));
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(&exits.mmio_read);
                if !dispatch(&buses.mmio, addr, |d, off| d.read(off, data)) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(&exits.mmio_write);
                dispatch(&buses.mmio, addr, |d, off| d.write(off, data));
            }
            Ok(VcpuExit::Shutdown) => {
                count(&exits.other);
                eprintln!(
                    "platter: vCPU {id}: triple fault (CPU shutdown), treated as a reset; {}",
                    crate::cpu::state::summary(&fd)
                );
                let _ = tx.send(Event::Power(PowerEvent::Reset));
                return Ok(());
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                count(&exits.other);
                let ev = if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                    PowerEvent::PowerOff
                } else {
                    PowerEvent::Reset
                };
                let _ = tx.send(Event::Power(ev));
                return Ok(());
            }
            Ok(VcpuExit::Hlt) => {
                count(&exits.other);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(VmError::Vcpu {
                    cpu: id,
                    reason: format!("KVM_EXIT_FAIL_ENTRY: reason {reason:#x} on host cpu {cpu}"),
                })
            }
            Ok(VcpuExit::InternalError) => {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(VmError::Vcpu {
                    cpu: id,
                    reason: format!("KVM internal error (emulation failure?) at rip {rip:#x}"),
                });
            }
            Ok(other) => {
                count(&exits.other);
                log::debug!("vCPU {id}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return Err(VmError::Vcpu {
                    cpu: id,
                    reason: format!("KVM_RUN: {e}"),
                })
            }
        }
    }
}
