//! Hostile guests: chains that break the rules get IOERR / UNSUPP when a
//! status byte can be written, come back with used length 0 when not, and
//! broken rings ask for a reset; nothing panics and no queue gets stuck.

use super::*;

#[test]
fn hostile_chains_get_a_status_or_come_back_empty() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    let ioerr = (IOERR, 1);
    // (what, header type, sector, descriptors, expected status and used length)
    let cases: Vec<(&str, u32, u64, Vec<D>, (u8, u32))> = vec![
        (
            "data outside RAM",
            req_type::IN,
            0,
            vec![(HEADER, 16, 0), (OUTSIDE_RAM, 512, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "data straddling the end of RAM",
            req_type::OUT,
            0,
            vec![
                (HEADER, 16, 0),
                (MEM_SIZE as u64 - 512, 1024, 0),
                status_desc(),
            ],
            ioerr,
        ),
        (
            "header too short",
            req_type::IN,
            0,
            vec![(HEADER, 8, 0), (DATA, 512, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "header outside RAM",
            req_type::IN,
            0,
            vec![(OUTSIDE_RAM, 16, 0), (DATA, 512, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "read into device-readable buffer",
            req_type::IN,
            0,
            vec![(HEADER, 16, 0), (DATA, 512, 0), status_desc()],
            ioerr,
        ),
        (
            "write from device-writable buffer",
            req_type::OUT,
            0,
            vec![(HEADER, 16, 0), (DATA, 512, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "readable after writable",
            req_type::OUT,
            0,
            vec![
                (HEADER, 16, 0),
                (DATA2, 1, F_WRITE),
                (DATA, 512, 0),
                status_desc(),
            ],
            ioerr,
        ),
        (
            "zero-length read",
            req_type::IN,
            0,
            vec![(HEADER, 16, 0), (DATA, 0, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "partial sector",
            req_type::IN,
            0,
            vec![(HEADER, 16, 0), (DATA, 100, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "descriptor above size_max (1 MiB)",
            req_type::IN,
            0,
            vec![
                (HEADER, 16, 0),
                (0x20_0000, 0x10_0200, F_WRITE),
                status_desc(),
            ],
            ioerr,
        ),
        (
            "sector beyond capacity",
            req_type::IN,
            CAPACITY,
            vec![(HEADER, 16, 0), (DATA, 512, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "last sectors overrun",
            req_type::OUT,
            CAPACITY - 1,
            vec![(HEADER, 16, 0), (DATA, 1024, 0), status_desc()],
            ioerr,
        ),
        (
            "sector overflows bytes",
            req_type::IN,
            u64::MAX / 2,
            vec![(HEADER, 16, 0), (DATA, 512, F_WRITE), status_desc()],
            ioerr,
        ),
        (
            "GET_ID without buffer",
            req_type::GET_ID,
            0,
            vec![(HEADER, 16, 0), status_desc()],
            ioerr,
        ),
        (
            "unknown type",
            0x99,
            0,
            vec![(HEADER, 16, 0), (DATA, 512, F_WRITE), status_desc()],
            (UNSUPP, 1),
        ),
        (
            "SCSI passthrough",
            2,
            0,
            vec![(HEADER, 16, 0), status_desc()],
            (UNSUPP, 1),
        ),
        (
            "status not writable",
            req_type::IN,
            0,
            vec![(HEADER, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, 0)],
            (UNTOUCHED, 0),
        ),
        (
            "status of zero length",
            req_type::IN,
            0,
            vec![(HEADER, 16, 0), (DATA, 512, F_WRITE), (STATUS, 0, F_WRITE)],
            (UNTOUCHED, 0),
        ),
        (
            "status outside RAM",
            req_type::FLUSH,
            0,
            vec![(HEADER, 16, 0), (OUTSIDE_RAM, 1, F_WRITE)],
            (UNTOUCHED, 0),
        ),
        (
            "indirect table outside RAM",
            req_type::FLUSH,
            0,
            vec![(OUTSIDE_RAM, 48, F_INDIRECT)],
            (UNTOUCHED, 0),
        ),
        (
            "indirect table of odd length",
            req_type::FLUSH,
            0,
            vec![(INDIRECT, 47, F_INDIRECT)],
            (UNTOUCHED, 0),
        ),
    ];
    for (what, kind, sector, descs, want) in cases {
        header(&mem, kind, sector);
        assert_eq!(rig.request(&descs), want, "{what}");
    }
    assert!(!rig.irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn indirect_chains_work() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    header(&mem, req_type::GET_ID, 0);
    let table = [
        SplitDescriptor::new(HEADER, 16, F_NEXT, 1),
        SplitDescriptor::new(DATA, 20, F_WRITE | F_NEXT, 2),
        SplitDescriptor::new(STATUS, 1, F_WRITE, 0),
    ];
    for (i, d) in (0u64..).zip(table) {
        mem.write_obj(RawDescriptor::from(d), GuestAddress(INDIRECT + 16 * i))
            .unwrap();
    }
    assert_eq!(rig.request(&[(INDIRECT, 48, F_INDIRECT)]), (OK, 21));
    assert_eq!(read_mem(&mem, DATA, 20), b"platter-disk-serial0");

    // An indirect descriptor inside an indirect table is refused.
    mem.write_obj(
        RawDescriptor::from(SplitDescriptor::new(INDIRECT, 48, F_INDIRECT, 0)),
        GuestAddress(INDIRECT + 16),
    )
    .unwrap();
    assert_eq!(rig.request(&[(INDIRECT, 48, F_INDIRECT)]), (UNTOUCHED, 0));

    // More data descriptors than seg_max (queue size - 2) is IOERR.
    let seg_max = QUEUE_SIZE - 2;
    header(&mem, req_type::IN, 0);
    let mut table = vec![SplitDescriptor::new(HEADER, 16, F_NEXT, 1)];
    for i in 0..=seg_max {
        table.push(SplitDescriptor::new(
            DATA + 512 * u64::from(i),
            512,
            F_WRITE | F_NEXT,
            i + 2,
        ));
    }
    table.push(SplitDescriptor::new(STATUS, 1, F_WRITE, 0));
    for (i, d) in (0u64..).zip(&table) {
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(INDIRECT + 16 * i))
            .unwrap();
    }
    let len = u32::try_from(16 * table.len()).unwrap();
    assert_eq!(rig.request(&[(INDIRECT, len, F_INDIRECT)]), (IOERR, 1));
    // One fewer fits.
    table.remove(1);
    table[0] = SplitDescriptor::new(HEADER, 16, F_NEXT, 2);
    for (i, d) in (0u64..).zip(&table) {
        let mut d = *d;
        if d.has_next() {
            d.set_next(u16::try_from(i).unwrap() + 1);
        }
        mem.write_obj(RawDescriptor::from(d), GuestAddress(INDIRECT + 16 * i))
            .unwrap();
    }
    let len = u32::try_from(16 * table.len()).unwrap();
    assert_eq!(
        rig.request(&[(INDIRECT, len, F_INDIRECT)]),
        (OK, 512 * 62 + 1)
    );
}

#[test]
fn descriptor_loop_comes_back_empty() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    header(&mem, req_type::IN, 0);
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after a queue's worth.
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HEADER, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_WRITE | F_NEXT, 0)),
    ];
    rig.mock.add_desc_chains(&raw, 0).unwrap();
    rig.next_desc = 2;
    rig.run();
    assert_eq!(rig.used_idx(), 1);
    assert_eq!(rig.used(0), (0, 0));
    assert_eq!(rig.status(), UNTOUCHED);
    // The queue still works afterwards.
    header(&mem, req_type::FLUSH, 0);
    assert_eq!(rig.request(&[(HEADER, 16, 0), status_desc()]), (OK, 1));
}

#[test]
fn broken_rings_ask_for_a_reset() {
    // Avail index more than a queue ahead.
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    mem.write_obj(QUEUE_SIZE + 1, rig.mock.avail_addr().unchecked_add(2))
        .unwrap();
    rig.run();
    assert!(rig.irq.needs_reset.load(Ordering::SeqCst));
    assert_eq!(rig.used_idx(), 0);

    // A head index outside the descriptor table.
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    let avail = rig.mock.avail_addr();
    mem.write_obj(500u16, avail.unchecked_add(4)).unwrap();
    mem.write_obj(1u16, avail.unchecked_add(2)).unwrap();
    rig.run();
    assert!(rig.irq.needs_reset.load(Ordering::SeqCst));
    // Later kicks are ignored rather than spinning.
    rig.run();
    assert_eq!(rig.used_idx(), 0);
}
