//! CPU time and resident memory of processes, read from Linux's /proc.

use std::time::Duration;

/// Clock ticks per second in /proc/*/stat: USER_HZ, fixed at 100 in the
/// Linux ABI on the architectures we run on.
const USER_HZ: f64 = 100.0;

/// Numeric fields of `/proc/<pid>/stat`, by their number in proc(5) (from 1).
fn stat_fields(pid: u32, numbers: &[usize]) -> std::io::Result<Vec<f64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("malformed /proc/pid/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    numbers
        .iter()
        .map(|&i| {
            fields
                .get(i - 3)
                .and_then(|f| f.parse::<f64>().ok())
                .ok_or_else(|| std::io::Error::other("malformed /proc/pid/stat"))
        })
        .collect()
}

/// User plus system CPU time of process `pid` (all its threads) so far.
pub fn cpu(pid: u32) -> std::io::Result<Duration> {
    // utime and stime are fields 14 and 15.
    let ticks = stat_fields(pid, &[14, 15])?;
    Ok(Duration::from_secs_f64(ticks.iter().sum::<f64>() / USER_HZ))
}

/// The nice value (CPU priority) of process `pid`'s main thread.
pub fn nice(pid: u32) -> std::io::Result<i32> {
    Ok(stat_fields(pid, &[19])?[0] as i32)
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

    /// A child started through `nice -n 7` reports 7 more than this process.
    #[test]
    fn reads_nice_values() {
        let mut child = std::process::Command::new("nice")
            .args(["-n", "7", "sleep", "30"])
            .spawn()
            .unwrap();
        // `nice` sets the priority and then becomes `sleep`: wait for the exec.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap() != "sleep\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "nice did not exec sleep"
            );
            std::thread::yield_now();
        }
        let niced = nice(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        let own = nice(std::process::id()).unwrap();
        assert_eq!(niced.unwrap(), (own + 7).min(19));
    }
}
