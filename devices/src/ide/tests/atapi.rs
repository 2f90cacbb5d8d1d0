//! An ATAPI CD-ROM on the secondary master: signatures, IDENTIFY PACKET
//! DEVICE, and SCSI commands through PACKET with PIO and DMA.

use super::*;
use crate::scsi::sense::key;

const ISO_BLOCKS: u64 = 64;
const SECONDARY: usize = 1;
const CHECK: u8 = READY | status::ERR;

fn iso_byte(i: u64) -> u8 {
    (i / 2048) as u8 ^ (i as u8).wrapping_mul(7)
}

/// A disk on the primary master and a CD-ROM on the secondary master.
fn rig() -> Rig {
    let (f0, disk) = image(DISK_SIZE, false, None);
    let (f1, iso) = image(ISO_BLOCKS * 2048, true, Some(iso_byte));
    let hd = IdeDriveConfig::new(disk, Media::Disk, "PLATTER HARDDISK", "HD1");
    let cd = IdeDriveConfig::new(iso, Media::Cdrom, "PLATTER DVD-ROM", "CD1");
    Rig::with([[Some(hd), None], [Some(cd), None]], vec![f0, f1])
}

/// Issue PACKET with `cdb` by PIO; returns the data-in bytes, or the
/// status and error registers on CHECK CONDITION.
fn packet(rig: &mut Rig, cdb: &[u8], limit: u16) -> Result<Vec<u8>, (u8, u8)> {
    rig.outb(SECONDARY, DEVICE, 0xa0);
    rig.outb(SECONDARY, FEATURES, 0);
    rig.outb(SECONDARY, LBA_MID, limit as u8);
    rig.outb(SECONDARY, LBA_HIGH, (limit >> 8) as u8);
    rig.outb(SECONDARY, COMMAND, cmd::PACKET);
    assert_eq!(rig.alt_status(SECONDARY), status::DRDY | status::DRQ);
    assert_eq!(rig.inb(SECONDARY, COUNT) & 3, 1, "ireason: CoD");
    let mut c = [0u8; 12];
    c[..cdb.len()].copy_from_slice(cdb);
    rig.write_data(SECONDARY, &c, 2);
    let mut data = Vec::new();
    loop {
        let s = rig.inb(SECONDARY, STATUS);
        if s & status::DRQ == 0 {
            assert_eq!(rig.inb(SECONDARY, COUNT) & 3, 3, "ireason: status");
            if s & status::ERR != 0 {
                return Err((s, rig.inb(SECONDARY, ERROR)));
            }
            assert_eq!(s, READY);
            return Ok(data);
        }
        assert_eq!(rig.inb(SECONDARY, COUNT) & 3, 2, "ireason: data in");
        let n = usize::from(rig.inb(SECONDARY, LBA_MID))
            | usize::from(rig.inb(SECONDARY, LBA_HIGH)) << 8;
        assert!(n <= usize::from(limit & !1), "byte count within the limit");
        data.extend(rig.read_data(SECONDARY, n, 2));
    }
}

fn iso_bytes(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(iso_byte).collect()
}

#[test]
fn signature_identify_and_reset() {
    let mut rig = rig();
    rig.outb(SECONDARY, DEVICE, 0xa0);
    assert_eq!(rig.inb(SECONDARY, STATUS), 0, "no DRDY until identified");
    assert_eq!(
        (rig.inb(SECONDARY, LBA_MID), rig.inb(SECONDARY, LBA_HIGH)),
        (0x14, 0xeb)
    );
    // IDENTIFY DEVICE aborts and leaves the signature.
    rig.outb(SECONDARY, LBA_MID, 0);
    rig.outb(SECONDARY, COMMAND, cmd::IDENTIFY_DEVICE);
    assert_eq!(rig.inb(SECONDARY, STATUS), CHECK);
    assert_eq!(rig.inb(SECONDARY, ERROR), error::ABRT);
    assert_eq!(
        (rig.inb(SECONDARY, LBA_MID), rig.inb(SECONDARY, LBA_HIGH)),
        (0x14, 0xeb)
    );
    let before = rig.rises(SECONDARY);
    rig.outb(SECONDARY, COMMAND, cmd::IDENTIFY_PACKET_DEVICE);
    assert_eq!(rig.inb(SECONDARY, STATUS), READY | status::DRQ);
    let id = rig.read_data(SECONDARY, 512, 2);
    assert_eq!(
        rig.rises(SECONDARY),
        before + 1,
        "plain PIO data-in: one interrupt"
    );
    assert_eq!(rig.alt_status(SECONDARY), READY);
    assert_eq!(word(&id, 0), 0x85c0);
    assert_eq!(ata_string(&id, 27, 20), "PLATTER DVD-ROM");
    assert_ne!(word(&id, 49) & 1 << 8, 0, "DMA");

    rig.control(SECONDARY, CONTROL_SRST);
    rig.control(SECONDARY, 0);
    assert_eq!(rig.alt_status(SECONDARY), 0);
    assert_eq!(
        (
            rig.inb(SECONDARY, COUNT),
            rig.inb(SECONDARY, LBA_LOW),
            rig.inb(SECONDARY, LBA_MID),
            rig.inb(SECONDARY, LBA_HIGH)
        ),
        (1, 1, 0x14, 0xeb)
    );
    // DEVICE RESET works even mid-packet.
    rig.outb(SECONDARY, COMMAND, cmd::PACKET);
    assert_eq!(rig.alt_status(SECONDARY) & status::DRQ, status::DRQ);
    rig.outb(SECONDARY, COMMAND, cmd::DEVICE_RESET);
    assert_eq!(rig.alt_status(SECONDARY), 0);
    assert_eq!(rig.inb(SECONDARY, LBA_HIGH), 0xeb);
}

#[test]
fn inquiry_capacity_and_test_unit_ready() {
    let mut rig = rig();
    let inq = packet(&mut rig, &[0x12, 0, 0, 0, 36], 0xfffe).unwrap();
    assert_eq!(inq.len(), 36);
    assert_eq!(inq[0], 0x05);
    assert_eq!(&inq[16..31], b"PLATTER DVD-ROM");
    let cap = packet(&mut rig, &[0x25], 8).unwrap();
    assert_eq!(cap, [0, 0, 0, ISO_BLOCKS as u8 - 1, 0, 0, 0x08, 0]);
    assert_eq!(packet(&mut rig, &[0x00], 0), Ok(vec![]));
}

#[test]
fn read10_by_pio_matches_the_image() {
    let mut rig = rig();
    // 20 blocks: more than one 16-block chunk, in 6000-byte DRQ blocks.
    let got = packet(&mut rig, &[0x28, 0, 0, 0, 0, 3, 0, 0, 20], 6000).unwrap();
    assert_eq!(got, iso_bytes(3 * 2048, 20 * 2048));
    // READ(12), odd limit rounded down to even.
    let got = packet(&mut rig, &[0xa8, 0, 0, 0, 0, 62, 0, 0, 0, 2], 4097).unwrap();
    assert_eq!(got, iso_bytes(62 * 2048, 2 * 2048));
}

#[test]
fn read10_by_dma() {
    let mut rig = rig();
    rig.prd(SECONDARY, &[(BUF, 4096, false), (BUF2, 4096, true)]);
    rig.outb(SECONDARY, DEVICE, 0xa0);
    rig.outb(SECONDARY, FEATURES, 1); // DMA
    rig.outb(SECONDARY, COMMAND, cmd::PACKET);
    rig.write_data(SECONDARY, &[0x28, 0, 0, 0, 0, 10, 0, 0, 4, 0, 0, 0], 2);
    assert_eq!(rig.alt_status(SECONDARY) & status::BSY, status::BSY);
    rig.bm_start(SECONDARY, true);
    assert_eq!(rig.wait_not_busy(SECONDARY), READY);
    assert_eq!(rig.inb(SECONDARY, COUNT) & 3, 3);
    assert_eq!(rig.bm_status(SECONDARY), BM_STATUS_INTERRUPT);
    let mut got = vec![0u8; 8192];
    rig.mem
        .read_slice(&mut got[..4096], GuestAddress(BUF))
        .unwrap();
    rig.mem
        .read_slice(&mut got[4096..], GuestAddress(BUF2))
        .unwrap();
    assert_eq!(got, iso_bytes(10 * 2048, 8192));

    // Data-in from the device buffer by DMA (INQUIRY), PRD longer.
    rig.prd(SECONDARY, &[(BUF, 512, true)]);
    rig.outb(SECONDARY, FEATURES, 1);
    rig.outb(SECONDARY, COMMAND, cmd::PACKET);
    rig.write_data(SECONDARY, &[0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0], 2);
    rig.bm_start(SECONDARY, true);
    assert_eq!(rig.alt_status(SECONDARY), READY);
    assert_eq!(
        rig.bm_status(SECONDARY),
        BM_STATUS_INTERRUPT | BM_STATUS_ACTIVE
    );
    let mut inq = [0u8; 36];
    rig.mem.read_slice(&mut inq, GuestAddress(BUF)).unwrap();
    assert_eq!(inq[0], 0x05);
}

#[test]
fn errors_report_sense() {
    let mut rig = rig();
    let (s, e) = packet(&mut rig, &[0xff], 0xfffe).unwrap_err();
    assert_eq!(s, CHECK);
    assert_eq!(e, key::ILLEGAL_REQUEST << 4 | error::ABRT);
    let sense = packet(&mut rig, &[0x03, 0, 0, 0, 18], 0xfffe).unwrap();
    assert_eq!(sense[0], 0x70);
    assert_eq!(sense[2], key::ILLEGAL_REQUEST);
    assert_eq!((sense[12], sense[13]), (0x20, 0x00), "invalid opcode");

    let (_, e) = packet(&mut rig, &[0x28, 0, 0, 0, 0, 64, 0, 0, 1], 0xfffe).unwrap_err();
    assert_eq!(e >> 4, key::ILLEGAL_REQUEST);
    let sense = packet(&mut rig, &[0x03, 0, 0, 0, 18], 0xfffe).unwrap();
    assert_eq!((sense[12], sense[13]), (0x21, 0x00), "LBA out of range");

    // A short PRD for a DMA read: aborted command, no interrupt.
    rig.prd(SECONDARY, &[(BUF, 2048, true)]);
    rig.outb(SECONDARY, FEATURES, 1);
    rig.outb(SECONDARY, COMMAND, cmd::PACKET);
    rig.write_data(SECONDARY, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0], 2);
    rig.bm_start(SECONDARY, true);
    assert_eq!(rig.alt_status(SECONDARY), CHECK);
    assert_eq!(rig.bm_status(SECONDARY), 0);
    let sense = packet(&mut rig, &[0x03, 0, 0, 0, 18], 0xfffe).unwrap();
    assert_eq!(sense[2], key::ABORTED_COMMAND);
}

#[test]
fn mmc_probe_commands() {
    let mut rig = rig();
    let cfg = packet(&mut rig, &[0x46, 0, 0, 0, 0, 0, 0, 0, 64], 0xfffe).unwrap();
    assert_eq!(&cfg[6..8], &[0, 0x08], "CD-ROM profile");
    let toc = packet(&mut rig, &[0x43, 0, 0, 0, 0, 0, 0, 0, 32], 0xfffe).unwrap();
    assert_eq!(&toc[..4], &[0, 18, 1, 1]);
    let ev = packet(&mut rig, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8], 0xfffe).unwrap();
    assert_eq!(ev[2], 4);
    let ms = packet(&mut rig, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 64], 0xfffe).unwrap();
    assert_eq!(ms[8], 0x2a);
    assert_eq!(packet(&mut rig, &[0x1b, 0, 0, 0, 2], 0), Ok(vec![]));
    let (_, e) = packet(&mut rig, &[0x00], 0).unwrap_err();
    assert_eq!(e >> 4, key::NOT_READY);
}

#[test]
fn a_writable_cdrom_image_is_refused() {
    let (_f, iso) = image(2048, false, None);
    let cd = IdeDriveConfig::new(iso, Media::Cdrom, "CD", "CD1");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let irq: Arc<dyn IrqLevel> = Arc::new(MockIrq::default());
    let r = PiixIde::new(
        PiixVariant::Piix4,
        mem,
        [[Some(cd), None], [None, None]],
        [irq.clone(), irq],
    );
    assert!(matches!(r, Err(IdeError::CdromWritable)));
}
