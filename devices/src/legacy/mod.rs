//! Legacy platform devices: the 16550 UART, the i8042 (for its reset line),
//! the CMOS RTC (wall clock) and the ACPI PM1 blocks (for `poweroff`).

pub mod acpi_pm;
pub mod i8042;
pub mod rtc;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use i8042::I8042;
pub use rtc::Rtc;
pub use serial::{Serial, SerialOutput};

/// What the guest asked of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// ACPI S5: the guest is done.
    PowerOff,
    /// CPU reset (i8042 pulse or ACPI reset register).
    Reset,
}

/// Where power events go (the VMM's main loop).
pub trait PowerSink: Send + Sync {
    /// Deliver `ev`; called from a vCPU thread.
    fn power(&self, ev: PowerEvent);
}
