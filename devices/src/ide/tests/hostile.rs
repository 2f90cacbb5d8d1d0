//! Guests that break the rules: bad PRD tables, DMA without a command,
//! commands while busy, data port accesses with no transfer.

use super::*;

fn dma_read(rig: &mut Rig, sectors: u8) {
    rig.issue(0, 0, cmd::READ_DMA, sectors, 0);
    rig.bm_start(0, true);
}

#[test]
fn prd_table_outside_ram_is_a_master_abort() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.bm_write(0, BM_PRDT, &(OUTSIDE_RAM as u32).to_le_bytes());
    let before = rig.rises(0);
    dma_read(&mut rig, 1);
    assert_eq!(rig.alt_status(0), READY | status::ERR);
    assert_eq!(rig.inb(0, ERROR), error::ABRT);
    assert_eq!(rig.bm_status(0), BM_STATUS_ERROR | BM_STATUS_INTERRUPT);
    assert_eq!(rig.rises(0), before + 1);
}

#[test]
fn prd_region_outside_ram_is_a_master_abort() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.prd(0, &[(BUF, 512, false), (OUTSIDE_RAM, 512, true)]);
    dma_read(&mut rig, 2);
    assert_eq!(rig.alt_status(0), READY | status::ERR);
    assert_eq!(rig.bm_status(0) & BM_STATUS_ERROR, BM_STATUS_ERROR);
    assert_eq!(rig.bm_status(0) & BM_STATUS_ACTIVE, 0);
    // A region straddling the end of RAM too.
    rig.prd(0, &[(MEM_SIZE as u64 - 256, 512, true)]);
    dma_read(&mut rig, 1);
    assert_eq!(rig.bm_status(0) & BM_STATUS_ERROR, BM_STATUS_ERROR);
}

#[test]
fn prd_table_shorter_than_the_transfer() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.mem
        .write_slice(&[0xaa; 1024], GuestAddress(BUF))
        .unwrap();
    rig.prd(0, &[(BUF, 512, true)]);
    let before = rig.rises(0);
    dma_read(&mut rig, 2);
    // SFF-8038i: interrupt and active both clear is the error combination.
    assert_eq!(rig.bm_status(0), 0);
    assert_eq!(rig.rises(0), before, "no interrupt");
    assert_eq!(rig.alt_status(0), READY | status::ERR);
    assert_eq!(rig.inb(0, ERROR), error::ABRT);
    let mut b = [0u8; 1024];
    rig.mem.read_slice(&mut b, GuestAddress(BUF)).unwrap();
    assert_eq!(b, [0xaa; 1024], "nothing moved");
}

#[test]
fn prd_table_without_eot_stops_at_64k() {
    let mut rig = Rig::disk(DISK_SIZE);
    // 16 entries of 2 bytes each and no EOT, at the end of a 64 KiB page.
    let table = 0xff80u64;
    for i in 0..16u64 {
        rig.mem
            .write_slice(
                &prd_entry(BUF as u32, 2, false),
                GuestAddress(table + 8 * i),
            )
            .unwrap();
    }
    rig.bm_write(0, BM_PRDT, &(table as u32).to_le_bytes());
    dma_read(&mut rig, 1);
    assert_eq!(rig.bm_status(0), 0);
    assert_eq!(rig.alt_status(0), READY | status::ERR);
}

#[test]
fn prd_table_longer_than_the_transfer_keeps_active() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.prd(0, &[(BUF, 0, true)]); // 64 KiB
    dma_read(&mut rig, 1);
    assert_eq!(rig.wait_not_busy(0), READY);
    assert_eq!(
        rig.bm_status(0),
        BM_STATUS_INTERRUPT | BM_STATUS_ACTIVE,
        "SFF-8038i: interrupt with active still set"
    );
    rig.bm_write(0, BM_COMMAND, &[0]);
    assert_eq!(rig.bm_status(0), BM_STATUS_INTERRUPT);
}

#[test]
fn bus_master_started_without_a_command_waits() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.prd(0, &[(BUF, 512, true)]);
    let before = rig.rises(0);
    rig.bm_start(0, true);
    assert_eq!(rig.bm_status(0), BM_STATUS_ACTIVE);
    assert_eq!(rig.rises(0), before);
    assert_eq!(rig.alt_status(0), READY);
    rig.bm_write(0, BM_COMMAND, &[BM_CMD_WRITE_MEMORY]);
    assert_eq!(rig.bm_status(0), 0);
    // A PIO command meanwhile is unaffected by the engine.
    rig.issue(0, 0, cmd::READ_SECTORS, 1, 0);
    assert_eq!(rig.read_data(0, 512, 2).len(), 512);
    assert_eq!(rig.inb(0, STATUS), READY);
}

#[test]
fn commands_and_registers_while_busy_are_ignored() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.issue(0, 0, cmd::READ_DMA, 1, 0);
    assert_eq!(rig.alt_status(0), status::BSY | status::DRDY);
    rig.outb(0, COMMAND, cmd::IDENTIFY_DEVICE);
    assert_eq!(rig.alt_status(0), status::BSY | status::DRDY);
    rig.outb(0, COUNT, 0x33);
    rig.control(0, CONTROL_HOB);
    rig.control(0, 0);
    assert_eq!(rig.inb(0, COUNT), 1, "count register kept");
    // The queued DMA still runs when the engine starts.
    rig.prd(0, &[(BUF, 512, true)]);
    rig.bm_start(0, true);
    assert_eq!(rig.wait_not_busy(0), READY);

    // During PIO data-in (DRQ) too.
    rig.issue(0, 0, cmd::READ_SECTORS, 1, 0);
    rig.outb(0, COMMAND, cmd::WRITE_SECTORS);
    assert_eq!(rig.alt_status(0), READY | status::DRQ);
    rig.read_data(0, 512, 2);
    assert_eq!(rig.inb(0, STATUS), READY);
}

#[test]
fn srst_during_dma_drops_the_command() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.prd(0, &[(BUF, 512, true)]);
    dma_read(&mut rig, 1);
    rig.control(0, CONTROL_SRST);
    rig.control(0, 0);
    assert_eq!(rig.alt_status(0), READY);
    // The completion arrives for nobody; a new command works.
    std::thread::sleep(Duration::from_millis(20));
    rig.ide.process_completions();
    assert_eq!(rig.alt_status(0), READY);
    rig.issue(0, 0, cmd::CHECK_POWER_MODE, 0, 0);
    assert_eq!(rig.inb(0, COUNT), 0xff);
}

#[test]
fn data_port_without_a_transfer_and_odd_widths() {
    let mut rig = Rig::disk(DISK_SIZE);
    assert_eq!(rig.read_data(0, 8, 4), vec![0; 8]);
    rig.write_data(0, &[1, 2, 3, 4], 4);
    assert_eq!(rig.alt_status(0), READY);
    // Byte-wide and 3-byte reads still drain the buffer in order.
    rig.issue(0, 0, cmd::IDENTIFY_DEVICE, 0, 0);
    let id = rig.read_data(0, 512, 3);
    assert_eq!(word(&id, 0), 0x0040);
    assert_eq!(rig.inb(0, STATUS), READY);
}

#[test]
fn bus_mastering_disabled_holds_dma_until_enabled() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.ide.write_config(0x04, &[0x01, 0x00]);
    rig.prd(0, &[(BUF, 512, true)]);
    dma_read(&mut rig, 1);
    std::thread::sleep(Duration::from_millis(20));
    rig.ide.process_completions();
    assert_eq!(rig.alt_status(0) & status::BSY, status::BSY);
    rig.ide.write_config(0x04, &[0x05, 0x00]);
    assert_eq!(rig.wait_not_busy(0), READY);
}

#[test]
fn writes_to_a_readonly_disk_abort() {
    let (f, disk) = image(DISK_SIZE, true, None);
    let cfg = IdeDriveConfig::new(disk, Media::Disk, "RO", "RO1");
    let mut rig = Rig::with([[Some(cfg), None], [None, None]], vec![f]);
    rig.issue(0, 0, cmd::WRITE_SECTORS, 1, 0);
    assert_eq!(rig.inb(0, STATUS), READY | status::ERR);
    assert_eq!(rig.inb(0, ERROR), error::ABRT);
    rig.issue(0, 0, cmd::WRITE_DMA, 1, 0);
    assert_eq!(rig.inb(0, ERROR), error::ABRT);
}
