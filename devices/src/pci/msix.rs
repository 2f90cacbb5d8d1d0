//! MSI-X: the capability, the vector table and the pending bit array (PCI
//! Express Base Specification §7.7.2; PCI Local Bus 3.0 §6.8.2).
//!
//! ```text
//!  capability (config space)           table (in a BAR), 16 bytes a vector
//!  +0x0 control | next | id 0x11        +0x0 message address [31:0]
//!  +0x4 table offset [31:3] | BIR       +0x4 message address [63:32]
//!  +0x8 PBA offset [31:3]   | BIR       +0x8 message data
//!                                       +0xc vector control (bit 0: mask)
//!  control: 10:0 table size - 1,
//!           14 function mask,          PBA (in a BAR): one pending bit per
//!           15 enable                  vector, in QWORDs, read-only
//! ```
//!
//! A vector is delivered only when MSI-X is enabled and neither the
//! function mask nor its own mask bit is set. A vector that fires while
//! masked sets its pending bit; unmasking delivers it and clears the bit.
//! The [`MsiRouter`] hears each vector's message and effective mask whenever
//! either changes. Table and PBA take naturally aligned 4- and 8-byte
//! accesses; anything else reads 0 and writes nothing.

use std::io;
use std::sync::Arc;

use super::{hi32, lo32, PciConfiguration, PciError, NUM_BARS};
use crate::interrupt::{MsiMessage, MsiRouter};

/// Capability id of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Largest table the 11-bit table size field describes.
pub const MSIX_MAX_VECTORS: u16 = 2048;

const CONTROL: usize = 0x02;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const CONTROL_ENABLE: u16 = 1 << 15;
const ENTRY_SIZE: u64 = 16;
const VECTOR_CONTROL_MASK: u32 = 1;

/// Where a structure (table or PBA) sits: a BAR and an offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLocation {
    pub bar: usize,
    pub offset: u64,
}

impl MsixLocation {
    /// The capability's offset/BIR register, after checking the location.
    fn register(self, what: &'static str) -> Result<u32, PciError> {
        let invalid = PciError::MsixLocationInvalid {
            what,
            bar: self.bar,
            offset: self.offset,
        };
        let offset = u32::try_from(self.offset).map_err(|_| invalid.clone())?;
        let bir = u32::try_from(self.bar)
            .ok()
            .filter(|_| self.bar < NUM_BARS && offset % 8 == 0)
            .ok_or(invalid)?;
        Ok(offset | bir)
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_CONTROL_MASK != 0
    }
}

/// Reset state: every vector masked (§7.7.2.4).
const RESET_ENTRY: Entry = Entry {
    address: 0,
    data: 0,
    control: VECTOR_CONTROL_MASK,
};

/// A function's MSI-X capability with its table and PBA.
pub struct MsixCapability {
    offset: usize,
    table: Vec<Entry>,
    pba: Vec<u64>,
    table_at: MsixLocation,
    pba_at: MsixLocation,
    enabled: bool,
    function_masked: bool,
    router: Arc<dyn MsiRouter>,
    /// What the router last heard for each vector; starts masked.
    routed: Vec<(MsiMessage, bool)>,
}

impl MsixCapability {
    /// Add an MSI-X capability with `vectors` (1 to 2048) to `config`, its
    /// table and PBA at `table` and `pba`. The BARs holding them must be
    /// registered by the caller and be at least [`Self::table_len`] and
    /// [`Self::pba_len`] past the offsets.
    pub fn add_to(
        config: &mut PciConfiguration,
        vectors: u16,
        table: MsixLocation,
        pba: MsixLocation,
        router: Arc<dyn MsiRouter>,
    ) -> Result<Self, PciError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(PciError::MsixVectorsInvalid(vectors));
        }
        let table_register = table.register("table")?;
        let pba_register = pba.register("PBA")?;
        let count = usize::from(vectors);
        let mut msix = Self {
            offset: 0,
            table: vec![RESET_ENTRY; count],
            pba: vec![0; count.div_ceil(64)],
            table_at: table,
            pba_at: pba,
            enabled: false,
            function_masked: false,
            router,
            routed: vec![(MsiMessage::default(), true); count],
        };
        let overlap = table.bar == pba.bar
            && table.offset < pba.offset + msix.pba_len()
            && pba.offset < table.offset + msix.table_len();
        if overlap {
            return Err(PciError::MsixOverlap(table.bar));
        }

        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&table_register.to_le_bytes());
        body.extend_from_slice(&pba_register.to_le_bytes());
        msix.offset = config.add_capability(MSIX_CAPABILITY_ID, &body)?;
        let writable = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        config.set_write_mask(msix.offset + CONTROL, &writable.to_le_bytes())?;
        Ok(msix)
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes the table takes in its BAR.
    pub fn table_len(&self) -> u64 {
        ENTRY_SIZE * self.table.len() as u64
    }

    /// Bytes the PBA takes in its BAR (whole QWORDs).
    pub fn pba_len(&self) -> u64 {
        8 * self.pba.len() as u64
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Vector `vector` must not be delivered now.
    pub fn masked(&self, vector: u16) -> bool {
        match self.entry(vector) {
            Some(e) => !self.enabled || self.function_masked || e.masked(),
            None => true,
        }
    }

    /// The message table entry `vector` holds.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entry(vector).map(|e| MsiMessage {
            address: e.address,
            data: e.data,
        })
    }

    /// Vector `vector` fired while masked and waits for its unmask.
    pub fn pending(&self, vector: u16) -> bool {
        let (word, bit) = pba_bit(vector);
        self.pba.get(word).is_some_and(|w| w & bit != 0)
    }

    fn entry(&self, vector: u16) -> Option<&Entry> {
        self.table.get(usize::from(vector))
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let (word, bit) = pba_bit(vector);
        if let Some(w) = self.pba.get_mut(word) {
            if pending {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    /// Call after every guest write to `config` at `offset..offset + len`:
    /// picks up enable and function mask changes.
    pub fn config_written(&mut self, config: &PciConfiguration, offset: usize, len: usize) {
        let control = self.offset + CONTROL;
        if offset >= control + 2 || offset.saturating_add(len) <= control {
            return;
        }
        let bits = config.u16_at(control);
        let enabled = bits & CONTROL_ENABLE != 0;
        let function_masked = bits & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for vector in 0..self.vectors() {
            self.update(vector);
        }
    }

    fn vectors(&self) -> u16 {
        u16::try_from(self.table.len()).unwrap_or(MSIX_MAX_VECTORS)
    }

    /// Tell the router about a changed vector and deliver it if it is pending
    /// and now unmasked.
    fn update(&mut self, vector: u16) {
        let (Some(msg), Some(routed)) =
            (self.message(vector), self.routed.get(usize::from(vector)))
        else {
            return;
        };
        let masked = self.masked(vector);
        if *routed != (msg, masked) {
            match self.router.route(vector, msg, masked) {
                Ok(()) => self.routed[usize::from(vector)] = (msg, masked),
                Err(e) => log::warn!("MSI-X vector {vector} route failed: {e}"),
            }
        }
        if !masked && self.pending(vector) {
            self.set_pending(vector, false);
            if let Err(e) = self.router.trigger(vector) {
                log::warn!("MSI-X vector {vector} delivery failed: {e}");
            }
        }
    }

    /// Signal vector `vector`: delivered now, or latched in the PBA if
    /// masked. Dropped if MSI-X is off (the function should use INTx then)
    /// or the vector does not exist.
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        if !self.enabled || self.entry(vector).is_none() {
            return Ok(());
        }
        if self.masked(vector) {
            self.set_pending(vector, true);
            return Ok(());
        }
        self.router.trigger(vector)
    }

    /// Serve a read of BAR `bar` at `offset` if it hits the table or PBA;
    /// returns whether it did.
    pub fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) -> bool {
        if let Some(o) = within(self.table_at, self.table_len(), bar, offset) {
            self.read_table(o, data);
        } else if let Some(o) = within(self.pba_at, self.pba_len(), bar, offset) {
            self.read_pba(o, data);
        } else {
            return false;
        }
        true
    }

    /// Serve a write of BAR `bar` at `offset` if it hits the table or PBA;
    /// returns whether it did.
    pub fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) -> bool {
        if let Some(o) = within(self.table_at, self.table_len(), bar, offset) {
            self.write_table(o, data);
        } else if within(self.pba_at, self.pba_len(), bar, offset).is_none() {
            return false;
        }
        // PBA writes are ignored: the bits are read-only.
        true
    }

    /// Guest read of the table at `offset` from its start.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((entry, field)) = self.table_access(offset, data.len()) else {
            return;
        };
        let e = &self.table[entry];
        let dwords = [lo32(e.address), hi32(e.address), e.data, e.control];
        for (chunk, value) in data.chunks_exact_mut(4).zip(&dwords[field..]) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Guest write of the table at `offset` from its start.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((entry, field)) = self.table_access(offset, data.len()) else {
            return;
        };
        let e = &mut self.table[entry];
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let mut b = [0; 4];
            b.copy_from_slice(chunk);
            let value = u32::from_le_bytes(b);
            match field + i {
                0 => e.address = e.address & !0xffff_ffff | u64::from(value & !3),
                1 => e.address = e.address & 0xffff_ffff | u64::from(value) << 32,
                2 => e.data = value,
                // Bits other than the mask are reserved.
                _ => e.control = value & VECTOR_CONTROL_MASK,
            }
        }
        if let Ok(vector) = u16::try_from(entry) {
            self.update(vector);
        }
    }

    /// Guest read of the PBA at `offset` from its start.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            return;
        }
        let Some(word) = usize::try_from(offset / 8)
            .ok()
            .and_then(|w| self.pba.get(w))
        else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = if offset % 8 == 4 { 4 } else { 0 };
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// Entry index and first dword of a valid table access.
    fn table_access(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !aligned(offset, len) {
            return None;
        }
        let entry = usize::try_from(offset / ENTRY_SIZE).ok()?;
        let field = usize::try_from(offset % ENTRY_SIZE / 4).ok()?;
        (entry < self.table.len()).then_some((entry, field))
    }
}

/// A naturally aligned DWORD or QWORD access (§7.7.2: other accesses are
/// undefined, so they are dropped).
fn aligned(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset & (len as u64 - 1) == 0
}

/// `offset` from the start of a structure at `at`, `len` bytes long, if a
/// BAR access to `bar` at `offset` falls in it.
fn within(at: MsixLocation, len: u64, bar: usize, offset: u64) -> Option<u64> {
    let o = offset.checked_sub(at.offset)?;
    (bar == at.bar && o < len).then_some(o)
}

fn pba_bit(vector: u16) -> (usize, u64) {
    (usize::from(vector / 64), 1 << (vector % 64))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pci::PciHeader;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum RouterCall {
        Route(u16, MsiMessage, bool),
        Trigger(u16),
    }
    use RouterCall::{Route, Trigger};

    /// Records what a device tells the VMM about its vectors.
    #[derive(Default)]
    pub(crate) struct MockRouter {
        calls: Mutex<Vec<RouterCall>>,
    }

    impl MockRouter {
        pub(crate) fn take(&self) -> Vec<RouterCall> {
            std::mem::take(&mut self.calls.lock().unwrap())
        }
    }

    impl MsiRouter for MockRouter {
        fn route(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
            self.calls.lock().unwrap().push(Route(vector, msg, masked));
            Ok(())
        }
        fn trigger(&self, vector: u16) -> io::Result<()> {
            self.calls.lock().unwrap().push(Trigger(vector));
            Ok(())
        }
    }

    const TABLE: MsixLocation = MsixLocation {
        bar: 1,
        offset: 0x2000,
    };
    const PBA: MsixLocation = MsixLocation {
        bar: 1,
        offset: 0x3000,
    };

    struct Fixture {
        config: PciConfiguration,
        msix: MsixCapability,
        router: Arc<MockRouter>,
    }

    impl Fixture {
        fn new(vectors: u16) -> Self {
            let mut config = PciConfiguration::new(&PciHeader::default());
            let router = Arc::new(MockRouter::default());
            let msix =
                MsixCapability::add_to(&mut config, vectors, TABLE, PBA, router.clone()).unwrap();
            Self {
                config,
                msix,
                router,
            }
        }

        fn control(&mut self, bits: u16) {
            let at = self.msix.offset() + CONTROL;
            self.config.write(at, &bits.to_le_bytes());
            self.msix.config_written(&self.config, at, 2);
        }

        fn write32(&mut self, offset: u64, v: u32) {
            assert!(self.msix.write_bar(1, offset, &v.to_le_bytes()));
        }

        fn read32(&self, offset: u64) -> u32 {
            let mut b = [0; 4];
            assert!(self.msix.read_bar(1, offset, &mut b));
            u32::from_le_bytes(b)
        }

        /// Program entry `n` as Linux does: address, data, then unmask.
        fn program(&mut self, n: u16, address: u64, data: u32) {
            let base = TABLE.offset + u64::from(n) * ENTRY_SIZE;
            assert!(self.msix.write_bar(1, base, &address.to_le_bytes()));
            self.write32(base + 8, data);
            self.write32(base + 12, 0);
        }
    }

    fn msg(address: u64, data: u32) -> MsiMessage {
        MsiMessage { address, data }
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let f = Fixture::new(100);
        let o = f.msix.offset();
        assert_eq!(f.config.find_capability(MSIX_CAPABILITY_ID), Some(o));
        assert_eq!(f.config.u16_at(o + 2), 99);
        assert_eq!(f.config.u32_at(o + 4), 0x2001);
        assert_eq!(f.config.u32_at(o + 8), 0x3001);
        assert_eq!((f.msix.table_len(), f.msix.pba_len()), (1600, 16));
        // Table size is read-only; only enable and function mask are writable.
        let mut c = f.config.clone();
        c.write(o + 2, &[0xff, 0xff]);
        assert_eq!(c.u16_at(o + 2), 0xc000 | 99);
    }

    #[test]
    fn table_reads_back_writes_of_both_widths() {
        let mut f = Fixture::new(4);
        // Entries reset masked.
        assert_eq!(f.read32(0x2000 + 12), 1);
        f.write32(0x2010, 0xfee0_1003);
        f.write32(0x2014, 0x1);
        f.write32(0x2018, 0x4041);
        f.write32(0x201c, 0xffff_fffe);
        assert_eq!(f.read32(0x2010), 0xfee0_1000);
        assert_eq!(f.read32(0x2014), 0x1);
        assert_eq!(f.read32(0x2018), 0x4041);
        assert_eq!(f.read32(0x201c), 0);
        let mut q = [0; 8];
        assert!(f.msix.read_bar(1, 0x2010, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        assert!(f
            .msix
            .write_bar(1, 0x2038, &(1u64 << 32 | 0x55).to_le_bytes()));
        assert_eq!((f.read32(0x2038), f.read32(0x203c)), (0x55, 1));
        assert_eq!(f.msix.message(1), Some(msg(0x1_fee0_1000, 0x4041)));
    }

    #[test]
    fn hostile_accesses_are_dropped() {
        let mut f = Fixture::new(4);
        let mut b = [0xaa; 4];
        // Past the table, misaligned, odd sizes, another BAR, below the table.
        assert!(!f.msix.read_bar(1, 0x2040, &mut b));
        assert!(!f.msix.read_bar(0, 0x2000, &mut b));
        assert!(!f.msix.read_bar(1, 0x1ffc, &mut b));
        assert!(!f.msix.read_bar(1, u64::MAX, &mut b));
        assert!(f.msix.read_bar(1, 0x2002, &mut b));
        assert_eq!(b, [0; 4]);
        let mut odd = [0xaa; 2];
        assert!(f.msix.read_bar(1, 0x200c, &mut odd));
        assert_eq!(odd, [0; 2]);
        let mut q = [0xaa; 8];
        assert!(f.msix.read_bar(1, 0x2004, &mut q));
        assert_eq!(q, [0; 8]);
        assert!(f.msix.write_bar(1, 0x200c, &[0]));
        assert!(f.msix.write_bar(1, 0x200e, &[0; 4]));
        f.msix.write_table(u64::MAX - 3, &[0; 4]);
        f.msix.read_table(u64::MAX - 7, &mut q);
        f.msix.read_pba(u64::MAX - 7, &mut q);
        assert_eq!(f.read32(0x200c), 1, "still masked");
        // PBA is read-only.
        f.msix.set_pending(0, true);
        f.write32(0x3000, 0);
        assert_eq!(f.read32(0x3000), 1);
        assert_eq!(f.read32(0x3004), 0);
        assert!(f.router.take().is_empty());
        assert!(MsixCapability::add_to(
            &mut f.config.clone(),
            MSIX_MAX_VECTORS + 1,
            TABLE,
            PBA,
            f.router.clone()
        )
        .is_err());
    }

    #[test]
    fn largest_table_is_served() {
        let mut config = PciConfiguration::new(&PciHeader::default());
        let router = Arc::new(MockRouter::default());
        let pba = MsixLocation { bar: 2, offset: 0 };
        let mut m =
            MsixCapability::add_to(&mut config, MSIX_MAX_VECTORS, TABLE, pba, router).unwrap();
        assert_eq!(config.u16_at(m.offset() + 2), 0x7ff);
        let last = TABLE.offset + m.table_len() - 4;
        assert!(m.write_bar(1, last, &0u32.to_le_bytes()));
        m.trigger(2047).unwrap();
        assert_eq!(m.pba_len(), 256);
        let mut q = [0; 8];
        assert!(m.read_bar(2, 248, &mut q));
        assert_eq!(q, [0; 8], "MSI-X is disabled: nothing pending");
    }

    #[test]
    fn masked_vector_sets_pending_and_unmask_delivers() {
        let mut f = Fixture::new(4);
        f.control(CONTROL_ENABLE);
        f.router.take();
        f.program(2, 0xfee0_0000, 0x30);
        assert_eq!(
            f.router.take(),
            [
                Route(2, msg(0xfee0_0000, 0), true),
                Route(2, msg(0xfee0_0000, 0x30), true),
                Route(2, msg(0xfee0_0000, 0x30), false)
            ]
        );
        f.msix.trigger(2).unwrap();
        assert_eq!(f.router.take(), [Trigger(2)]);

        // Per-vector mask: latched, then delivered on unmask.
        f.write32(0x2000 + 2 * 16 + 12, 1);
        f.msix.trigger(2).unwrap();
        assert!(f.msix.pending(2));
        assert_eq!(f.read32(0x3000), 0b100);
        assert_eq!(f.router.take(), [Route(2, msg(0xfee0_0000, 0x30), true)]);
        f.write32(0x2000 + 2 * 16 + 12, 0);
        assert_eq!(f.read32(0x3000), 0);
        assert_eq!(
            f.router.take(),
            [Route(2, msg(0xfee0_0000, 0x30), false), Trigger(2)]
        );
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let mut f = Fixture::new(4);
        f.control(CONTROL_ENABLE);
        f.program(0, 0xfee0_0000, 0x20);
        f.program(1, 0xfee0_0000, 0x21);
        f.router.take();

        f.control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(f.msix.function_masked() && f.msix.masked(0));
        assert_eq!(
            f.router.take(),
            [
                Route(0, msg(0xfee0_0000, 0x20), true),
                Route(1, msg(0xfee0_0000, 0x21), true)
            ]
        );
        f.msix.trigger(1).unwrap();
        f.msix.trigger(3).unwrap();
        assert!(f.router.take().is_empty());
        assert_eq!(f.read32(0x3000), 0b1010);

        // Vector 3 stays masked by its own bit, so stays pending.
        f.control(CONTROL_ENABLE);
        assert_eq!(
            f.router.take(),
            [
                Route(0, msg(0xfee0_0000, 0x20), false),
                Route(1, msg(0xfee0_0000, 0x21), false),
                Trigger(1)
            ]
        );
        assert_eq!(f.read32(0x3000), 0b1000);

        // Disabling masks everything; triggers are then dropped.
        f.control(0);
        assert!(!f.msix.enabled() && f.msix.masked(0));
        f.router.take();
        f.msix.trigger(0).unwrap();
        assert!(f.router.take().is_empty());
        assert!(!f.msix.pending(0));
    }

    #[test]
    fn locations_are_checked() {
        let mut c = PciConfiguration::new(&PciHeader::default());
        let r: Arc<MockRouter> = Arc::default();
        let at = |bar, offset| MsixLocation { bar, offset };
        let add = |c: &mut PciConfiguration, t, p| MsixCapability::add_to(c, 64, t, p, r.clone());
        assert!(add(&mut c, at(0, 4), at(1, 0)).is_err());
        assert!(add(&mut c, at(6, 0), at(1, 0)).is_err());
        assert!(add(&mut c, at(0, 0), at(0, 1 << 32)).is_err());
        assert_eq!(
            add(&mut c, at(0, 0), at(0, 0x3f8)).err(),
            Some(PciError::MsixOverlap(0))
        );
        assert!(add(&mut c, at(0, 0), at(0, 0x400)).is_ok());
        assert_eq!(add(&mut c, at(0, 0), at(0, 0x400)).unwrap().offset(), 0x4c);
    }
}
