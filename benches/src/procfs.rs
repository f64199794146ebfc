//! CPU time and resident memory of processes, read from Linux's /proc.

use std::time::Duration;

/// Clock ticks per second in /proc/*/stat: USER_HZ, fixed at 100 in the
/// Linux ABI on the architectures we run on.
const USER_HZ: f64 = 100.0;

/// User plus system CPU time of process `pid` (all its threads) so far.
pub fn cpu(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("malformed /proc/pid/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks = |i: usize| -> std::io::Result<f64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| std::io::Error::other("malformed /proc/pid/stat"))
    };
    Ok(Duration::from_secs_f64((ticks(14)? + ticks(15)?) / USER_HZ))
}

/// Resident set size of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| std::io::Error::other("no VmRSS in /proc/pid/status"))
}

/// CPU time of the calling thread, in nanoseconds of /proc's scheduler
/// statistics (finer than the tick-based figures).
pub fn thread_cpu() -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    stat.split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .map(Duration::from_nanos)
        .ok_or_else(|| std::io::Error::other("malformed schedstat"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Burning CPU on this thread shows in both the thread's and the process's figures.
    #[test]
    fn reads_own_cpu_and_memory() {
        let me = std::process::id();
        let (p0, t0) = (cpu(me).unwrap(), thread_cpu().unwrap());
        let mut x = 0u64;
        while thread_cpu().unwrap() - t0 < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu(me).unwrap() - p0 >= Duration::from_millis(30));
        assert!(rss_bytes(me).unwrap() > 1 << 20);
    }
}
