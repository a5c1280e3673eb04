//! `switchyard tune`: the host settings that decide wake-up latency, and
//! the socket buffer limits that decide whether a busy router drops
//! datagrams.
//!
//! Every message crosses several threads, and on a virtual machine a thread
//! woken on an idle virtual CPU waits for the hypervisor to resume that CPU:
//! 35-50 µs per hop here, more than the journal's fsync. Two kernel settings
//! decide it. This command shows them beside the value we recommend and,
//! with `--apply`, writes them (as root; until the next boot). See
//! `docs/performance.md`, "The host".

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub(super) struct TuneArgs {
    /// Write the recommended values (needs root; lasts until reboot).
    #[arg(long)]
    apply: bool,
    /// Root of the system's files (for testing against a copy of /sys).
    #[arg(long, default_value = "/", hide = true)]
    root: PathBuf,
}

/// How long an idle virtual CPU polls before it halts, with the guest
/// `haltpoll` idle driver. 200 µs is the driver's own default and covers
/// the gap between messages at a few thousand a second.
const HALT_POLL_NS: &str = "200000";

/// One setting: where it lives, its value, what we recommend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    pub(crate) path: PathBuf,
    pub(crate) current: String,
    pub(crate) recommended: String,
    /// Kernel command-line parameter that sets it at boot.
    pub(crate) boot: &'static str,
    pub(crate) why: &'static str,
    /// A number that is tuned at the recommended value or above (a limit),
    /// rather than only at it.
    pub(crate) at_least: bool,
}

impl Setting {
    pub(crate) fn is_tuned(&self) -> bool {
        if self.at_least
            && let (Ok(current), Ok(recommended)) =
                (self.current.parse::<u64>(), self.recommended.parse::<u64>())
        {
            return current >= recommended;
        }
        self.current == self.recommended
    }

    /// The kernel command-line word that keeps the recommended value.
    fn boot_word(&self) -> String {
        format!("{}={}", self.boot, self.recommended)
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The settings that apply to the system under `root`.
pub(crate) fn check(root: &Path) -> Vec<Setting> {
    let mut out = Vec::new();
    let cpu = root.join("sys/devices/system/cpu");
    if read(&cpu.join("cpuidle/current_driver")).as_deref() == Some("haltpoll") {
        let path = root.join("sys/module/haltpoll/parameters/guest_halt_poll_ns");
        if let Some(current) = read(&path) {
            out.push(Setting {
                path,
                current,
                recommended: HALT_POLL_NS.into(),
                boot: "haltpoll.guest_halt_poll_ns",
                why: "an idle virtual CPU polls before it halts, so a woken thread runs without a trip through the hypervisor",
                at_least: false,
            });
        }
    }
    let mut governors: Vec<PathBuf> = std::fs::read_dir(&cpu)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.strip_prefix("cpu").is_some_and(is_number))
        })
        .map(|p| p.join("cpufreq"))
        .collect();
    governors.sort();
    for dir in governors {
        let Some(current) = read(&dir.join("scaling_governor")) else {
            continue;
        };
        let available = read(&dir.join("scaling_available_governors")).unwrap_or_default();
        if !available.split_whitespace().any(|g| g == "performance") {
            continue;
        }
        out.push(Setting {
            path: dir.join("scaling_governor"),
            current,
            recommended: "performance".into(),
            boot: "cpufreq.default_governor",
            why: "the core stays at full clock between bursts instead of ramping up for each one",
            at_least: false,
        });
    }
    // Every QUIC socket asks for this much buffer; the kernel grants at
    // most these limits.
    let buffer = crate::client::socket::UDP_BUFFER.to_string();
    for (file, boot) in [
        ("rmem_max", "sysctl.net.core.rmem_max"),
        ("wmem_max", "sysctl.net.core.wmem_max"),
    ] {
        let path = root.join("proc/sys/net/core").join(file);
        if let Some(current) = read(&path) {
            out.push(Setting {
                path,
                current,
                recommended: buffer.clone(),
                boot,
                why: "the most buffer the kernel grants a socket: the router asks for 8 MiB per QUIC socket, and below it a burst of datagrams can overflow and be dropped (switchyard_udp_receive_buffer_errors_total)",
                at_least: true,
            });
        }
    }
    out
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The report `switchyard tune` prints.
pub(crate) fn report(settings: &[Setting], root: &Path) -> String {
    let mut s = String::new();
    if settings.is_empty() {
        s.push_str(
            "nothing to tune: no haltpoll idle driver, no CPU frequency governor and no socket buffer limits on this system\n",
        );
        return s;
    }
    for st in settings {
        let shown = Path::new("/").join(st.path.strip_prefix(root).unwrap_or(&st.path));
        let state = match (st.is_tuned(), st.at_least) {
            (true, _) => "ok".to_string(),
            (false, true) => format!("recommended at least {}", st.recommended),
            (false, false) => format!("recommended {}", st.recommended),
        };
        let _ = writeln!(s, "{}: {} ({state})", shown.display(), st.current);
        let _ = writeln!(s, "    {}", st.why);
    }
    let todo: Vec<&Setting> = settings.iter().filter(|st| !st.is_tuned()).collect();
    if todo.is_empty() {
        s.push_str("all tuned\n");
    } else {
        let mut boot: Vec<String> = todo.iter().map(|st| st.boot_word()).collect();
        boot.dedup();
        let _ = writeln!(
            s,
            "apply now with `sudo switchyard tune --apply`; to keep across reboots, add to the kernel command line: {}",
            boot.join(" ")
        );
    }
    s
}

/// Writes every recommended value that differs; returns how many.
pub(crate) fn apply(settings: &[Setting]) -> anyhow::Result<usize> {
    let mut n = 0;
    for st in settings.iter().filter(|st| !st.is_tuned()) {
        std::fs::write(&st.path, &st.recommended).with_context(|| {
            format!(
                "cannot write {} to {} (run as root, or add `{}` to the kernel command line)",
                st.recommended,
                st.path.display(),
                st.boot_word()
            )
        })?;
        n += 1;
    }
    Ok(n)
}

/// The settings of this machine that `switchyard tune` would change.
pub(crate) fn untuned() -> Vec<Setting> {
    let mut all = check(Path::new("/"));
    all.retain(|s| !s.is_tuned());
    all
}

/// Logs, once at startup, the settings of this machine that slow thread
/// wake-ups or limit socket buffers. Never changes them: that is
/// `switchyard tune --apply`'s job.
pub(crate) fn hint() {
    for s in untuned() {
        tracing::info!(
            setting = %s.path.display(),
            current = %s.current,
            recommended = %s.recommended,
            "this machine is not tuned for Switchyard; `switchyard tune` shows why and how to set it"
        );
    }
}

pub(crate) fn run(args: TuneArgs) -> anyhow::Result<()> {
    let mut settings = check(&args.root);
    if args.apply {
        let n = apply(&settings)?;
        settings = check(&args.root);
        println!("changed {n} setting(s); they last until the next boot");
    }
    print!("{}", report(&settings, &args.root));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, value: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{value}\n")).unwrap();
    }

    const POLL: &str = "sys/module/haltpoll/parameters/guest_halt_poll_ns";

    /// A system tree of a virtual machine with the haltpoll idle driver.
    fn haltpoll_vm(poll_ns: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let driver = "sys/devices/system/cpu/cpuidle/current_driver";
        put(dir.path(), driver, "haltpoll");
        put(dir.path(), POLL, poll_ns);
        dir
    }

    #[test]
    fn finds_untuned_settings_and_applies_them() {
        let dir = haltpoll_vm("0");
        let root = dir.path();
        for cpu in ["cpu0", "cpu1"] {
            let d = format!("sys/devices/system/cpu/{cpu}/cpufreq");
            put(root, &format!("{d}/scaling_governor"), "powersave");
            put(
                root,
                &format!("{d}/scaling_available_governors"),
                "performance powersave",
            );
        }
        // Not a CPU, and a CPU whose driver offers no performance governor.
        put(root, "sys/devices/system/cpu/cpufreq/boost", "1");
        put(
            root,
            "sys/devices/system/cpu/cpu2/cpufreq/scaling_governor",
            "schedutil",
        );
        put(
            root,
            "sys/devices/system/cpu/cpu2/cpufreq/scaling_available_governors",
            "schedutil",
        );

        let found = check(root);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|s| !s.is_tuned()));
        let text = report(&found, root);
        assert!(
            text.contains(
                "/sys/module/haltpoll/parameters/guest_halt_poll_ns: 0 (recommended 200000)"
            ),
            "{text}"
        );
        assert!(
            text.contains("haltpoll.guest_halt_poll_ns=200000"),
            "{text}"
        );
        assert!(
            text.contains("cpufreq.default_governor=performance"),
            "{text}"
        );

        assert_eq!(apply(&found).unwrap(), 3);
        assert_eq!(read(&root.join(POLL)).unwrap(), "200000");
        let again = check(root);
        assert!(again.iter().all(Setting::is_tuned), "{again:?}");
        assert!(report(&again, root).contains("all tuned"));
        assert_eq!(apply(&again).unwrap(), 0, "nothing left to write");
    }

    /// A socket buffer limit below what the router asks for is raised to
    /// it; one above is left alone.
    #[test]
    fn socket_buffer_limits_are_raised_to_what_the_router_asks_for() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        put(root, "proc/sys/net/core/rmem_max", "212992");
        put(root, "proc/sys/net/core/wmem_max", "33554432");
        let found = check(root);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(!found[0].is_tuned() && found[1].is_tuned(), "{found:?}");
        let text = report(&found, root);
        assert!(
            text.contains("/proc/sys/net/core/rmem_max: 212992 (recommended at least 8388608)"),
            "{text}"
        );
        assert!(text.contains("wmem_max: 33554432 (ok)"), "{text}");
        assert!(text.contains("sysctl.net.core.rmem_max=8388608"), "{text}");
        assert_eq!(apply(&found).unwrap(), 1);
        assert_eq!(
            read(&root.join("proc/sys/net/core/rmem_max")).unwrap(),
            "8388608"
        );
        assert_eq!(
            read(&root.join("proc/sys/net/core/wmem_max")).unwrap(),
            "33554432"
        );
        assert!(check(root).iter().all(Setting::is_tuned));
    }

    #[test]
    fn other_idle_drivers_and_bare_systems_have_nothing_to_tune() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(check(root).is_empty());
        put(
            root,
            "sys/devices/system/cpu/cpuidle/current_driver",
            "intel_idle",
        );
        put(root, POLL, "0");
        let found = check(root);
        assert!(found.is_empty(), "{found:?}");
        assert!(report(&found, root).starts_with("nothing to tune"));
    }

    #[test]
    fn a_setting_that_cannot_be_written_is_a_clear_error() {
        let dir = haltpoll_vm("0");
        let root = dir.path();
        let mut found = check(root);
        // A directory cannot be written as a file, even by root.
        found[0].path = root.join("sys/module");
        let e = format!("{:#}", apply(&found).unwrap_err());
        assert!(e.contains("cannot write 200000"), "{e}");
        assert!(e.contains("haltpoll.guest_halt_poll_ns=200000"), "{e}");
    }
}
