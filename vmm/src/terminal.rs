//! Raw mode for the terminal while the guest owns it, restored on every way
//! out: normal exit, error exit, panic and SIGTERM/SIGHUP/SIGINT.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Put stdin in raw mode if it is a terminal.
pub fn enter_raw() {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return;
    }
    // SAFETY: termios is plain old data; zeroed is a valid value to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into; stdin is open.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        return;
    }
    *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    let mut raw = t;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    // Keep output post-processing so host-side messages stay readable.
    raw.c_oflag |= libc::OPOST;
    // SAFETY: `raw` is a valid termios derived from the current one.
    unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
    install_handlers();
}

/// Put the terminal back as it was (idempotent).
pub fn restore() {
    let saved = SAVED.try_lock().ok().and_then(|mut s| s.take());
    if let Some(t) = saved {
        // SAFETY: `t` is the termios read from this terminal earlier.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    restore();
    // SAFETY: restoring the default action and re-raising is async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_handlers() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: `on_signal` is an extern "C" fn with the handler signature.
        unsafe { libc::signal(sig, on_signal as *const () as usize) };
    }
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        prev(info);
    }));
}
