//! Opening a disk: check the engine, open and lock the image, probe its format, and set up
//! the pipeline of [`Disk`].

use super::*;

fn open_file(path: &Path, readonly: bool, direct: bool) -> Result<File, BlockError> {
    crate::raw::open_image_file(path, readonly, direct).map_err(|source| {
        if direct && source.raw_os_error() == Some(libc::EINVAL) {
            BlockError::DirectUnsupported {
                path: path.to_path_buf(),
            }
        } else {
            BlockError::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Open a disk: check the engine, open and lock the image, detect its format by magic (when
/// `opts.format` is `None`) and set up the pipeline.
pub fn open_disk(opts: &DiskOptions) -> Result<Disk, BlockError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?;
    let engine = new_engine(opts, evt.try_clone().map_err(BlockError::EventFd)?)?;
    let format = match opts.format {
        Some(f) => f,
        None => {
            let f = crate::img::probe_format(&opts.path)?;
            if f == Format::Raw && !opts.readonly {
                log::warn!(
                    "{}: format not given, probed as raw; pass format=raw to be safe from guest-written headers",
                    opts.path.display()
                );
            }
            f
        }
    };
    if format == Format::Qcow2 {
        // Validate the header so users get the precise complaint before any lock conflict.
        crate::qcow2::Qcow2Header::read_path(&opts.path)?;
    }
    let direct = opts.cache.direct();
    let file = open_file(&opts.path, opts.readonly, direct)?;
    let lock = if opts.locking {
        Some(ImageLock::acquire(&file, &opts.path, opts.readonly)?)
    } else {
        None
    };
    let (req_align, mem_align) = if direct {
        direct_io_alignment(&file)
    } else {
        (1, 1)
    };
    let driver: Box<dyn FormatDriver> = match format {
        Format::Raw => {
            Box::new(
                RawDriver::new(file, req_align).map_err(|source| BlockError::Open {
                    path: opts.path.clone(),
                    source,
                })?,
            )
        }
        Format::Qcow2 => Box::new(Qcow2Driver::open(
            &opts.path,
            file,
            opts.readonly,
            opts.l2_cache_size,
            req_align,
            0,
        )?),
    };
    let throttle = match &opts.throttle {
        Some(group) => Some(DiskThrottle::new(
            group,
            evt.try_clone().map_err(BlockError::EventFd)?,
        )),
        None => None,
    };
    let mut disk = Disk {
        engine,
        inflight: Slab::default(),
        driver,
        _lock: lock,
        evt,
        cache: opts.cache,
        wce: opts.cache.initial_wce(),
        readonly: opts.readonly,
        discard: opts.discard,
        req_align: req_align as u64,
        mem_align,
        evt_unread: false,
        evt_raised: false,
        ranges: RangeLock::default(),
        done: VecDeque::new(),
        throttle,
        stats: Arc::default(),
        errors: super::error_log::ErrorLog::new(&opts.path),
        #[cfg(test)]
        sync_served: 0,
    };
    disk.driver.set_volatile_writes(!disk.dsync());
    Ok(disk)
}
