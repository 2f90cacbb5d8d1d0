//! A small logger for the `log` facade: `PLATTER_LOG=error|warn|info|debug|trace`
//! turns it on (warn by default), `PLATTER_LOG_FILE=PATH` sends it to a file
//! instead of stderr (the serial console owns stdout, and in raw mode stderr
//! lines would interleave with the guest's).

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use log::{LevelFilter, Metadata, Record};

struct Logger {
    start: Instant,
    out: Mutex<Box<dyn Write + Send>>,
}

impl log::Log for Logger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, r: &Record) {
        let t = self.start.elapsed();
        let thread = std::thread::current();
        let line = format!(
            "[{:>4}.{:06} {} {} {}] {}\n",
            t.as_secs(),
            t.subsec_micros(),
            r.level(),
            thread.name().unwrap_or("?"),
            r.target(),
            r.args()
        );
        if let Ok(mut o) = self.out.lock() {
            let _ = o.write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        if let Ok(mut o) = self.out.lock() {
            let _ = o.flush();
        }
    }
}

/// Install the logger from the environment; errors and warnings always go
/// somewhere, so nothing the devices report is silently dropped.
pub fn init() {
    let level = match std::env::var("PLATTER_LOG").as_deref() {
        Ok("error") => LevelFilter::Error,
        Ok("info") => LevelFilter::Info,
        Ok("debug") => LevelFilter::Debug,
        Ok("trace") => LevelFilter::Trace,
        Ok("off") => LevelFilter::Off,
        _ => LevelFilter::Warn,
    };
    let out: Box<dyn Write + Send> = match std::env::var_os("PLATTER_LOG_FILE") {
        Some(p) => match File::create(&p) {
            Ok(f) => Box::new(f),
            Err(_) => Box::new(std::io::stderr()),
        },
        None => Box::new(std::io::stderr()),
    };
    let logger = Logger {
        start: Instant::now(),
        out: Mutex::new(out),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
