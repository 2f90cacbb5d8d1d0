//! Handing a run to the nested rig (`guests/rig`) when this host's KVM can't
//! boot a stock guest: the rig runs a TCG QEMU with nested SVM whose Debian
//! kernel offers a real KVM, and runs the same Platter command line in it.

use std::path::{Path, PathBuf};

/// Find `guests/rig`: `$PLATTER_RIG`, else above the binary, else above the config.
pub fn find(config: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PLATTER_RIG") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok();
    let starts = [exe.as_deref(), config.canonicalize().ok().as_deref()]
        .into_iter()
        .flatten()
        .map(Path::to_path_buf)
        .collect::<Vec<_>>();
    starts.iter().find_map(|s| {
        s.ancestors()
            .map(|a| a.join("guests/rig"))
            .find(|c| c.is_file())
    })
}

/// The command line that runs `args` (a `platter run` invocation) in the rig.
pub fn command(rig: &Path, args: &[String]) -> Vec<String> {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "platter".into());
    let mut v = vec![rig.display().to_string(), "--".into(), exe];
    v.extend(args.iter().cloned());
    v.push("--rig=never".into());
    v
}

/// Replace this process with the rig running `cmd`; returns only on failure.
pub fn exec(cmd: &[String]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec()
}
