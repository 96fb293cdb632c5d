//! The process metrics every Prometheus client exports (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), read from `/proc/self` when scraped, under the names
//! and meanings of Prometheus' own clients, so the dashboards and alerts written for any
//! process work on xentd unchanged.
//!
//! Read by hand, not through a crate: five small files, parsed by functions unit-tested on
//! sample text. On other systems there are none of these series.

use std::fmt::Write as _;

/// Clock ticks per second of `/proc/<pid>/stat`'s times: the kernel's `USER_HZ`, which is
/// 100 on every Linux architecture (it is part of the userspace ABI, whatever `HZ` the
/// kernel runs at; Prometheus' own procfs library makes the same assumption).
const USER_HZ: f64 = 100.0;

/// What `/proc/self/stat` says (`man 5 proc`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    /// User and system CPU time, in seconds.
    cpu_seconds: f64,
    /// Threads.
    threads: u64,
    /// Start, in seconds after boot.
    start_after_boot: f64,
    /// Virtual memory size, in bytes.
    virtual_bytes: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // Field 3 (state) is index 0.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| -> Option<u64> { f.get(field - 3)?.parse().ok() };
    Some(Stat {
        cpu_seconds: (num(14)? + num(15)?) as f64 / USER_HZ,
        threads: num(20)?,
        start_after_boot: num(22)? as f64 / USER_HZ,
        virtual_bytes: num(23)?,
    })
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn parse_resident(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit on open files in `/proc/<pid>/limits` (`None` when unlimited).
fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The soft limit on this process's open files, if it has one.
pub fn max_fds() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .as_deref()
        .and_then(parse_max_fds)
}

/// The boot time in `/proc/stat`, in seconds since the Unix epoch.
fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Appends one sample, with its help and type lines, to `out`.
fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    );
}

/// Appends the process metrics, in Prometheus' text format, to `out`; each one that cannot
/// be read is left out.
pub fn render(out: &mut String) {
    use super::{
        PROCESS_CPU, PROCESS_MAX_FDS, PROCESS_OPEN_FDS, PROCESS_RESIDENT, PROCESS_START,
        PROCESS_THREADS, PROCESS_VIRTUAL,
    };
    if !cfg!(target_os = "linux") {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let stat = read("/proc/self/stat").as_deref().and_then(parse_stat);
    if let Some(s) = stat {
        let help = "Total user and system CPU time spent in seconds.";
        sample(out, PROCESS_CPU, "counter", help, s.cpu_seconds);
    }
    if let Some(fds) = std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count) {
        let help = "Number of open file descriptors.";
        sample(out, PROCESS_OPEN_FDS, "gauge", help, fds as f64);
    }
    if let Some(max) = max_fds() {
        let help = "Maximum number of open file descriptors.";
        sample(out, PROCESS_MAX_FDS, "gauge", help, max as f64);
    }
    if let Some(s) = stat {
        let help = "Virtual memory size in bytes.";
        sample(out, PROCESS_VIRTUAL, "gauge", help, s.virtual_bytes as f64);
    }
    if let Some(rss) = read("/proc/self/status")
        .as_deref()
        .and_then(parse_resident)
    {
        let help = "Resident memory size in bytes.";
        sample(out, PROCESS_RESIDENT, "gauge", help, rss as f64);
    }
    if let (Some(s), Some(boot)) = (
        stat,
        read("/proc/stat").as_deref().and_then(parse_boot_time),
    ) {
        let help = "Start time of the process since unix epoch in seconds.";
        sample(
            out,
            PROCESS_START,
            "gauge",
            help,
            boot as f64 + s.start_after_boot,
        );
    }
    if let Some(s) = stat {
        let help = "Number of OS threads in the process.";
        sample(out, PROCESS_THREADS, "gauge", help, s.threads as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Laid out as `man 5 proc` gives it, with a command name holding spaces and parentheses.
    const STAT: &str = "4242 (xent (io) 1) S 1 4242 4242 0 -1 4194560 2975 0 0 0 \
        153 47 0 0 20 0 12 0 98765 1234567168 5000 18446744073709551615 1 1 0 0 0 0 0 \
        4096 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.cpu_seconds, 2.0, "(153 + 47) ticks");
        assert_eq!(s.threads, 12);
        assert_eq!(s.start_after_boot, 987.65);
        assert_eq!(s.virtual_bytes, 1_234_567_168);
        assert_eq!(parse_stat("4242 (xentd) S 1 2"), None, "truncated");
    }

    #[test]
    fn status_limits_and_boot_time() {
        let status = "Name:\txentd\nVmSize:\t 1205632 kB\nVmRSS:\t   20480 kB\nThreads:\t12\n";
        assert_eq!(parse_resident(status), Some(20480 * 1024));
        assert_eq!(parse_resident("Name:\txentd\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
            Max processes             63422                63422                processes \n\
            Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(parse_max_fds(unlimited), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nintr 5\nbtime 1764800000\nprocesses 9\n"),
            Some(1_764_800_000)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_sanely() {
        let mut out = String::new();
        render(&mut out);
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} in {out}"))
                .parse()
                .unwrap()
        };
        assert!(value(super::super::PROCESS_RESIDENT) > 1e6);
        assert!(value(super::super::PROCESS_VIRTUAL) >= value(super::super::PROCESS_RESIDENT));
        assert!(value(super::super::PROCESS_OPEN_FDS) >= 3.0);
        assert!(value(super::super::PROCESS_THREADS) >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value(super::super::PROCESS_START);
        assert!(
            start <= now + 1.0 && start > now - 86400.0,
            "{start} vs {now}"
        );
    }
}
