//! Sense data (SPC-4 §4.5): sense key, additional sense code (ASC) and its
//! qualifier (ASCQ), returned in fixed format (§4.5.3):
//!
//! ```text
//!  0  70h (current error, fixed format)   7  additional length (10)
//!  2  sense key (3:0)                     12 ASC
//!                                         13 ASCQ
//! ```

/// Sense keys (SPC-4 Table 27).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const ABORTED_COMMAND: u8 = 0xb;
}

/// One sense condition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// Bytes of fixed-format sense data this layer returns.
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const MEDIUM_REMOVAL_PREVENTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02);
    pub const MEDIUM_NOT_PRESENT: Sense = Sense::new(key::NOT_READY, 0x3a, 0x00);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const MEDIUM_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x28, 0x00);
    /// A transfer the transport could not carry out (e.g. a bad DMA table).
    pub const ABORTED_COMMAND: Sense = Sense::new(key::ABORTED_COMMAND, 0x00, 0x00);

    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq }
    }

    /// Fixed-format sense data, current error.
    pub fn fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        b[2] = self.key & 0xf;
        // Additional length: bytes 8 to 17 follow.
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}
