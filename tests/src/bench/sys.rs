//! Process and machine facts from `/proc` (CPU seconds, peak and current RSS, cores, memory) and
//! the small statistics every benchmark reports (median, percentiles).

use anyhow::{Context, Result};

/// Clock ticks per second for `/proc/PID/stat` times.
#[allow(unsafe_code)] // sysconf: no std API
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The fields of `/proc/PID/stat` we read.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    ppid: u32,
    /// utime + stime, in clock ticks.
    own: u64,
    /// cutime + cstime: children that exited and were waited for, in clock ticks.
    reaped: u64,
}

impl Stat {
    fn read(pid: u32) -> Result<Stat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        Stat::parse(&stat).with_context(|| format!("malformed /proc/{pid}/stat"))
    }

    fn parse(stat: &str) -> Option<Stat> {
        // The command name may contain spaces; fields after the closing parenthesis are plain.
        let (_, after) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // After ')': state (field 3 of the full line) is at 0, so ppid (4) is at 1, utime (14),
        // stime (15), cutime (16) and cstime (17) at 11 to 14.
        let n = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
        Some(Stat {
            ppid: u32::try_from(n(1)?).ok()?,
            own: n(11)? + n(12)?,
            reaped: n(13)? + n(14)?,
        })
    }
}

/// utime + stime of `pid` (children not included), in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(Stat::read(pid)?.own as f64 / ticks_per_second())
}

/// CPU seconds of `pid` and its children (a server and its worker processes): its own utime +
/// stime, its reaped children's (cutime + cstime), and the utime + stime of its children alive
/// now. The difference of two readings counts a child that exited in between whole, including
/// what it had used before the first reading (at most a few ticks for a short-lived backend).
pub(crate) fn tree_cpu_seconds(pid: u32) -> Result<f64> {
    let root = Stat::read(pid)?;
    let mut ticks = root.own + root.reaped;
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let Some(child) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read: it is counted by its parent's
        // cutime from now on.
        if let Ok(s) = Stat::read(child) {
            if s.ppid == pid {
                ticks += s.own;
            }
        }
    }
    Ok(ticks as f64 / ticks_per_second())
}

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`), in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// Peak resident set size (VmHWM) in MiB.
pub(crate) fn peak_rss_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmHWM")? as f64 / 1024.0)
}

/// Current resident set size (VmRSS) in MiB.
pub(crate) fn rss_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmRSS")? as f64 / 1024.0)
}

/// Online cores.
pub(crate) fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `MemTotal` in GiB.
pub(crate) fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

/// The first `model name` of `/proc/cpuinfo`.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The 1-minute load average.
pub(crate) fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

pub(crate) use mxscope_proto::time::now_us;

/// The `q` quantile (0..=1, nearest rank) of `values`; `None` when empty.
pub(crate) fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v.get(rank - 1).copied()
}

/// Median (for an even count, the mean of the two middle values).
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `value` formatted with `digits` decimals, or `n/a`.
pub(crate) fn fmt(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) => format!("{v:.digits$}"),
        None => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
    }

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and a parenthesis, as postgres's process titles have.
        let line = "4242 (postgres: mxscope one_1 (x) 127.0.0.1) S 4200 4200 4200 0 -1 4194560 \
                    600 0 0 0 150 25 7 3 20 0 1 0 1234 123456789 1500 18446744073709551615";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                ppid: 4200,
                own: 175,
                reaped: 10
            })
        );
        assert_eq!(Stat::parse("4242 (truncated) S 1"), None);
    }

    #[test]
    fn own_process_counters_are_readable() {
        let pid = std::process::id();
        let own = cpu_seconds(pid).expect("cpu");
        assert!(own >= 0.0);
        // Read later, and with the children on top: never less.
        assert!(tree_cpu_seconds(pid).expect("tree cpu") >= own);
        assert!(peak_rss_mib(pid).expect("hwm") > 0.0);
        assert!(rss_mib(pid).expect("rss") > 0.0);
    }
}
