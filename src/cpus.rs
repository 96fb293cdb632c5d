//! How many CPUs this process may use: the smaller of the cores it can run on and its
//! cgroup's CPU quota. It sizes the compute pool and the I/O threads by default.
//!
//! A container limited to 2 CPUs on a 64-core node still sees 64 cores: the limit is a CFS
//! bandwidth quota on its cgroup (`cpu.max` under cgroup v2, `cpu.cfs_quota_us` over
//! `cpu.cfs_period_us` under v1), not a smaller CPU set. A pool of 64 CPU-bound threads under
//! a 2-CPU quota spends the quota in the first few milliseconds of each period and is then
//! stopped for the rest of it, which shows up as latency spikes on every call. The standard
//! library's `available_parallelism` reads the quota too on Linux, as a best effort it does
//! not document the rules of; this module states them and tests them:
//!
//! - the quota in CPUs is `quota / period` rounded down, and at least 1 (a 1.5-CPU limit runs
//!   one thread that is never throttled rather than two that are);
//! - every cgroup from the process's own up to the root of its hierarchy is read, and the
//!   smallest quota wins, since a parent's limit binds its children (a pod's limit sits on the
//!   pod's cgroup, above the container's);
//! - the process's cgroup comes from `/proc/self/cgroup` and the hierarchy's mount point from
//!   `/proc/self/mountinfo`, with the mount's root taken off the path, so both a container with
//!   its own cgroup namespace (path `/`) and one without (path `/docker/ID`, mounted with that
//!   root) find their own files;
//! - cgroup v1 and v2 are both read where both are mounted, and the smaller quota wins.
//!
//! The parsing functions take file contents and are tested on them; [`quota_under`] reads a
//! file tree and is tested on one built in a temporary directory.

use std::path::{Path, PathBuf};

/// CPUs the process may use: `min(available_parallelism, cgroup quota)`, at least 1.
pub fn available() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    match quota_under(Path::new("/")) {
        Some(quota) => cores.min(quota),
        None => cores,
    }
    .max(1)
}

/// Bytes of memory the process may use: the machine's memory, or its cgroup's limit where
/// that is smaller (read where a container sees its own cgroup: `/sys/fs/cgroup/memory.max`
/// under v2, `memory/memory.limit_in_bytes` under v1). It sizes the transport's byte budget.
pub fn memory_limit() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    .min();
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// A CFS bandwidth limit: `quota` microseconds of CPU time in every `period` microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// CPU time allowed per period, in microseconds.
    pub quota_us: u64,
    /// Length of the period, in microseconds.
    pub period_us: u64,
}

impl Quota {
    /// Whole CPUs the quota allows, rounded down, at least 1.
    pub fn cpus(self) -> usize {
        usize::try_from(self.quota_us / self.period_us)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// The limit in a cgroup v2 `cpu.max` (`QUOTA PERIOD`, or `max PERIOD` for none).
pub fn parse_cpu_max(contents: &str) -> Option<Quota> {
    let mut fields = contents.split_whitespace();
    let quota = fields.next()?;
    let period = fields.next()?;
    if fields.next().is_some() || quota == "max" {
        return None;
    }
    quota_of(quota, period)
}

/// The limit in cgroup v1's `cpu.cfs_quota_us` and `cpu.cfs_period_us` (a quota of -1: none).
pub fn parse_cfs(quota: &str, period: &str) -> Option<Quota> {
    quota_of(quota.trim(), period.trim())
}

fn quota_of(quota: &str, period: &str) -> Option<Quota> {
    let quota_us = quota.parse::<u64>().ok()?;
    let period_us = period.parse::<u64>().ok()?;
    (quota_us > 0 && period_us > 0).then_some(Quota {
        quota_us,
        period_us,
    })
}

/// The process's cgroups, from `/proc/self/cgroup`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcCgroups {
    /// The cgroup v2 path (the `0::PATH` line).
    pub v2: Option<String>,
    /// The path in the cgroup v1 hierarchy that has the `cpu` controller.
    pub v1_cpu: Option<String>,
}

/// Reads `/proc/self/cgroup`: lines `ID:CONTROLLERS:PATH`.
pub fn parse_proc_cgroup(contents: &str) -> ProcCgroups {
    let mut found = ProcCgroups::default();
    for line in contents.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            found.v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "cpu") {
            found.v1_cpu = Some(path.to_string());
        }
    }
    found
}

/// Which cgroup hierarchy a mount holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified cgroup v2 hierarchy.
    V2,
    /// The cgroup v1 hierarchy with the `cpu` controller.
    V1Cpu,
}

/// A cgroup file system mount, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    /// Which hierarchy.
    pub hierarchy: Hierarchy,
    /// The cgroup path of the hierarchy mounted there (`/` unless only a subtree is mounted).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

/// The cgroup v2 mounts and the cgroup v1 mounts of the `cpu` controller in
/// `/proc/self/mountinfo` (`ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE
/// SOURCE SUPER_OPTIONS`).
pub fn parse_mountinfo(contents: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in contents.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let before: Vec<&str> = before.split(' ').collect();
        let mut after = after.split(' ');
        let (Some(fstype), Some(_source), Some(super_options)) =
            (after.next(), after.next(), after.next())
        else {
            continue;
        };
        if before.len() < 6 {
            continue;
        }
        let hierarchy = match fstype {
            "cgroup2" => Hierarchy::V2,
            "cgroup" if super_options.split(',').any(|o| o == "cpu") => Hierarchy::V1Cpu,
            _ => continue,
        };
        mounts.push(CgroupMount {
            hierarchy,
            root: unescape(before[3]),
            mount_point: PathBuf::from(unescape(before[4])),
        });
    }
    mounts
}

/// mountinfo writes space, tab, newline and backslash in paths as three-digit octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The smallest CPU quota, in whole CPUs, on the path from this process's cgroups to their
/// hierarchies' roots, reading `/proc` and the cgroup file systems under `root` (`/` in
/// production). `None` when no quota applies or nothing can be read.
pub fn quota_under(root: &Path) -> Option<usize> {
    let read = |path: &Path| std::fs::read_to_string(under(root, path)).ok();
    let cgroups = parse_proc_cgroup(&read(Path::new("/proc/self/cgroup"))?);
    let mounts = parse_mountinfo(&read(Path::new("/proc/self/mountinfo"))?);
    let mut smallest: Option<usize> = None;
    for mount in &mounts {
        let path = match mount.hierarchy {
            Hierarchy::V2 => &cgroups.v2,
            Hierarchy::V1Cpu => &cgroups.v1_cpu,
        };
        let Some(dir) = path.as_deref().and_then(|p| cgroup_dir(mount, p)) else {
            continue;
        };
        for level in dir.ancestors() {
            if let Some(q) = limit_at(mount.hierarchy, level, &read) {
                smallest = Some(smallest.map_or(q.cpus(), |s| s.min(q.cpus())));
            }
            if level == mount.mount_point {
                break;
            }
        }
    }
    smallest
}

/// The quota set on the cgroup directory `dir` of a hierarchy, if any.
fn limit_at(
    hierarchy: Hierarchy,
    dir: &Path,
    read: &impl Fn(&Path) -> Option<String>,
) -> Option<Quota> {
    match hierarchy {
        Hierarchy::V2 => parse_cpu_max(&read(&dir.join("cpu.max"))?),
        Hierarchy::V1Cpu => parse_cfs(
            &read(&dir.join("cpu.cfs_quota_us"))?,
            &read(&dir.join("cpu.cfs_period_us"))?,
        ),
    }
}

/// Where the cgroup at `path` of `mount`'s hierarchy is: its path less the mount's root,
/// under the mount point. `None` when the cgroup lies outside the mounted subtree.
fn cgroup_dir(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let rest = rest.trim_start_matches('/');
    if rest.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if rest.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rest)
    })
}

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_gives_the_quota_or_none() {
        let q = |quota_us, period_us| {
            Some(Quota {
                quota_us,
                period_us,
            })
        };
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), q(200_000, 100_000));
        assert_eq!(parse_cpu_max("50000 100000"), q(50_000, 100_000));
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("100000"), None);
        assert_eq!(parse_cpu_max("0 100000"), None);
        assert_eq!(parse_cpu_max("100000 0"), None);
        assert_eq!(parse_cpu_max("1 2 3"), None);
        assert_eq!(parse_cpu_max("lots 100000"), None);
    }

    #[test]
    fn cfs_files_give_the_quota_or_none() {
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(
            parse_cfs("150000\n", "100000\n"),
            Some(Quota {
                quota_us: 150_000,
                period_us: 100_000
            })
        );
        assert_eq!(parse_cfs("", "100000"), None);
        assert_eq!(parse_cfs("100000", "garbage"), None);
    }

    #[test]
    fn a_quota_rounds_down_to_whole_cpus_and_never_to_zero() {
        let cpus = |quota_us, period_us| {
            Quota {
                quota_us,
                period_us,
            }
            .cpus()
        };
        assert_eq!(cpus(200_000, 100_000), 2);
        assert_eq!(cpus(150_000, 100_000), 1);
        assert_eq!(cpus(50_000, 100_000), 1);
        assert_eq!(cpus(1, 100_000), 1);
        assert_eq!(cpus(1_600_000, 100_000), 16);
    }

    #[test]
    fn proc_cgroup_names_the_v2_path_and_the_v1_cpu_path() {
        let v2 = parse_proc_cgroup("0::/kubepods.slice/pod1/cri-abc.scope\n");
        assert_eq!(v2.v2.as_deref(), Some("/kubepods.slice/pod1/cri-abc.scope"));
        assert_eq!(v2.v1_cpu, None);
        let v1 = parse_proc_cgroup(
            "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n1:name=systemd:/docker/abc\n",
        );
        assert_eq!(v1.v1_cpu.as_deref(), Some("/docker/abc"));
        assert_eq!(v1.v2, None);
        // cpuacct and cpuset are other controllers.
        let other = parse_proc_cgroup("2:cpuacct:/a\n3:cpuset:/b\n");
        assert_eq!(other, ProcCgroups::default());
        // Paths may hold colons.
        let colon = parse_proc_cgroup("0::/a:b\n");
        assert_eq!(colon.v2.as_deref(), Some("/a:b"));
    }

    #[test]
    fn mountinfo_finds_cgroup2_and_the_v1_cpu_mount() {
        let text = "\
22 28 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid master:12 - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
34 31 0:31 / /with\\040space rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mountinfo(text),
            vec![
                CgroupMount {
                    hierarchy: Hierarchy::V2,
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup".into(),
                },
                CgroupMount {
                    hierarchy: Hierarchy::V1Cpu,
                    root: "/docker/abc".into(),
                    mount_point: "/sys/fs/cgroup/cpu,cpuacct".into(),
                },
                CgroupMount {
                    hierarchy: Hierarchy::V2,
                    root: "/".into(),
                    mount_point: "/with space".into(),
                },
            ]
        );
        assert_eq!(parse_mountinfo("garbage\n1 2 - cgroup2\n"), vec![]);
    }

    #[test]
    fn the_cgroup_dir_is_the_path_less_the_mount_root() {
        let mount = |root: &str| CgroupMount {
            hierarchy: Hierarchy::V2,
            root: root.into(),
            mount_point: "/sys/fs/cgroup".into(),
        };
        let dir = |root, path| cgroup_dir(&mount(root), path);
        assert_eq!(dir("/", "/"), Some("/sys/fs/cgroup".into()));
        assert_eq!(dir("/", "/a/b"), Some("/sys/fs/cgroup/a/b".into()));
        assert_eq!(
            dir("/docker/abc", "/docker/abc"),
            Some("/sys/fs/cgroup".into())
        );
        assert_eq!(
            dir("/docker/abc", "/docker/abc/x"),
            Some("/sys/fs/cgroup/x".into())
        );
        assert_eq!(dir("/docker/abc", "/docker/abcd"), None);
        assert_eq!(dir("/docker/abc", "/other"), None);
        assert_eq!(dir("/", "/a/../../etc"), None);
    }

    /// A file tree standing for `/`, with `files` (absolute paths) written into it.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, contents) in files {
            let p = under(dir.path(), Path::new(path));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, contents).unwrap();
        }
        dir
    }

    const V2_MOUNT: &str = "30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";

    #[test]
    fn v2_takes_the_smallest_quota_from_the_cgroup_up_to_the_root() {
        let t = tree(&[
            ("/proc/self/cgroup", "0::/kubepods/pod1/ctr\n"),
            ("/proc/self/mountinfo", V2_MOUNT),
            ("/sys/fs/cgroup/kubepods/cpu.max", "max 100000\n"),
            ("/sys/fs/cgroup/kubepods/pod1/cpu.max", "300000 100000\n"),
            ("/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "max 100000\n"),
        ]);
        assert_eq!(quota_under(t.path()), Some(3));
        let t = tree(&[
            ("/proc/self/cgroup", "0::/a/b\n"),
            ("/proc/self/mountinfo", V2_MOUNT),
            ("/sys/fs/cgroup/a/cpu.max", "200000 100000\n"),
            ("/sys/fs/cgroup/a/b/cpu.max", "400000 100000\n"),
        ]);
        assert_eq!(quota_under(t.path()), Some(2));
    }

    #[test]
    fn v2_in_a_cgroup_namespace_reads_the_mount_point_itself() {
        let t = tree(&[
            ("/proc/self/cgroup", "0::/\n"),
            ("/proc/self/mountinfo", V2_MOUNT),
            ("/sys/fs/cgroup/cpu.max", "150000 100000\n"),
        ]);
        assert_eq!(quota_under(t.path()), Some(1));
    }

    #[test]
    fn v1_reads_the_cfs_files_under_a_mounted_subtree() {
        let t = tree(&[
            (
                "/proc/self/cgroup",
                "4:cpu,cpuacct:/docker/abc\n0::/\n1:name=systemd:/docker/abc\n",
            ),
            (
                "/proc/self/mountinfo",
                "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n",
            ),
            ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "200000\n"),
            ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(quota_under(t.path()), Some(2));
    }

    #[test]
    fn v1_and_v2_both_mounted_take_the_smaller() {
        let t = tree(&[
            ("/proc/self/cgroup", "0::/s\n3:cpu:/s\n"),
            (
                "/proc/self/mountinfo",
                "30 22 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                 32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
            ),
            ("/sys/fs/cgroup/unified/s/cpu.max", "400000 100000\n"),
            ("/sys/fs/cgroup/cpu/s/cpu.cfs_quota_us", "100000\n"),
            ("/sys/fs/cgroup/cpu/s/cpu.cfs_period_us", "50000\n"),
        ]);
        assert_eq!(quota_under(t.path()), Some(2));
    }

    #[test]
    fn no_limit_or_nothing_readable_is_none() {
        let unlimited = tree(&[
            ("/proc/self/cgroup", "0::/a\n"),
            ("/proc/self/mountinfo", V2_MOUNT),
            ("/sys/fs/cgroup/a/cpu.max", "max 100000\n"),
        ]);
        assert_eq!(quota_under(unlimited.path()), None);
        let v1_unlimited = tree(&[
            ("/proc/self/cgroup", "1:cpu:/\n"),
            (
                "/proc/self/mountinfo",
                "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
            ),
            ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n"),
            ("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(quota_under(v1_unlimited.path()), None);
        assert_eq!(quota_under(tree(&[]).path()), None);
        let no_files = tree(&[
            ("/proc/self/cgroup", "0::/a\n"),
            ("/proc/self/mountinfo", V2_MOUNT),
        ]);
        assert_eq!(quota_under(no_files.path()), None);
    }

    #[test]
    fn available_is_at_least_one_and_at_most_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let n = available();
        assert!((1..=cores).contains(&n), "{n} of {cores}");
    }
}
