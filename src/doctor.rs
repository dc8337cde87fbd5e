//! `ferrule doctor`: reads the running host and reports what differs from the recommendations.
//!
//! This module owns the host checks and the parser for `tuning/sysctl.conf`, which is embedded
//! at build time so that the binary and the shipped recommendations cannot drift apart. It
//! only reads (/proc, /sys, getrlimit, CPUID flags, one io_uring_setup probe) and never
//! changes the host; every finding is printed and the exit code stays 0.

use std::path::Path;

/// The recommendations shipped in the repository.
const SYSCTL_CONF: &str = include_str!("../tuning/sysctl.conf");

/// How one whitespace-separated field of a live value is compared with the recommended one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The field must be equal.
    Equal,
    /// The field is a number that must be at least the recommended one.
    AtLeast,
}

/// One `key = value` line of sysctl.conf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recommendation {
    pub key: String,
    pub value: String,
    /// One rule per field of `value`.
    pub rules: Vec<Rule>,
    pub line: usize,
}

/// Parses sysctl.conf text. Malformed lines are returned as errors (with line numbers) beside
/// the good ones, so one typo does not hide every other check.
pub fn parse_sysctl_conf(text: &str) -> (Vec<Recommendation>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let (body, comment) = match raw.find('#') {
            Some(at) => (&raw[..at], &raw[at + 1..]),
            None => (raw, ""),
        };
        let body = body.trim();
        if body.is_empty() {
            continue;
        }
        let Some((key, value)) = body.split_once('=') else {
            errors.push(format!("sysctl.conf:{line}: expected `key = value`"));
            continue;
        };
        let key = key.trim();
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        if key.is_empty() || value.is_empty() || key.contains(char::is_whitespace) {
            errors.push(format!("sysctl.conf:{line}: expected `key = value`"));
            continue;
        }
        // A trailing "# doctor:" note gives one rule per field: `=` or `>=` (bigger is fine,
        // as for somaxconn or the ceiling of tcp_rmem). Without a note every field is `=`.
        let fields: Vec<&str> = value.split(' ').collect();
        let rules = match comment.trim().strip_prefix("doctor:") {
            None => Ok(vec![Rule::Equal; fields.len()]),
            Some(note) => parse_rules(note, &fields),
        };
        let rules = match rules {
            Ok(rules) => rules,
            Err(e) => {
                errors.push(format!("sysctl.conf:{line}: {e}"));
                continue;
            }
        };
        out.push(Recommendation {
            key: key.to_string(),
            value,
            rules,
            line,
        });
    }
    (out, errors)
}

/// Reads the rules of a `# doctor:` note, one per field of the recommended value.
fn parse_rules(note: &str, fields: &[&str]) -> Result<Vec<Rule>, String> {
    let rules = note
        .split_whitespace()
        .map(|word| match word {
            "=" => Ok(Rule::Equal),
            ">=" => Ok(Rule::AtLeast),
            other => Err(format!(
                "unknown doctor rule `{other}` (expected `=` or `>=`)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if rules.len() != fields.len() {
        return Err(format!(
            "the doctor note has {} rule(s) for {} field(s)",
            rules.len(),
            fields.len()
        ));
    }
    for (rule, field) in rules.iter().zip(fields) {
        if *rule == Rule::AtLeast && field.parse::<u64>().is_err() {
            return Err(format!("`>=` needs a number, not `{field}`"));
        }
    }
    Ok(rules)
}

impl Recommendation {
    /// The recommendation as the report prints it: `4096 87380 >= 16777216`.
    pub fn wanted(&self) -> String {
        self.rules
            .iter()
            .zip(self.value.split(' '))
            .map(|(rule, field)| match rule {
                Rule::Equal => field.to_string(),
                Rule::AtLeast => format!(">= {field}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Outcome of comparing one live value with its recommendation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    Ok,
    Differs { live: String },
    Missing,
}

/// Compares a live value (as read from /proc/sys, any whitespace) with a recommendation.
pub fn compare(rec: &Recommendation, live: Option<&str>) -> Finding {
    let Some(live) = live else {
        return Finding::Missing;
    };
    let fields: Vec<&str> = live.split_whitespace().collect();
    let wanted: Vec<&str> = rec.value.split(' ').collect();
    let ok = fields.len() == wanted.len()
        && rec.rules.iter().zip(fields.iter().zip(&wanted)).all(
            |(rule, (have, want))| match rule {
                Rule::Equal => have == want,
                Rule::AtLeast => match (have.parse::<u64>(), want.parse::<u64>()) {
                    (Ok(have), Ok(want)) => have >= want,
                    _ => false,
                },
            },
        );
    let live = fields.join(" ");
    if ok {
        Finding::Ok
    } else {
        Finding::Differs { live }
    }
}

/// /proc/sys path of a dotted sysctl key (`net.core.somaxconn` -> net/core/somaxconn).
fn proc_path(key: &str) -> Option<std::path::PathBuf> {
    // Keys come from our own file, but refuse anything that could walk out of /proc/sys.
    if key.split('.').any(|part| part.is_empty() || part == "..") || key.contains('/') {
        return None;
    }
    Some(Path::new("/proc/sys").join(key.replace('.', "/")))
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Prints the host report. Never fails on a host that lacks a file: that is a finding.
pub fn run() -> anyhow::Result<()> {
    let mut differ = 0usize;
    println!("ferrule doctor: reading this host; nothing is changed.\n");

    println!("sysctl (recommendations: tuning/sysctl.conf, embedded)");
    let (recs, errors) = parse_sysctl_conf(SYSCTL_CONF);
    for e in errors {
        println!("  ! {e}");
    }
    for rec in &recs {
        let live = proc_path(&rec.key).and_then(read_trimmed);
        let want = rec.wanted();
        match compare(rec, live.as_deref()) {
            Finding::Ok => println!("  ok   {} = {}", rec.key, live.unwrap_or_default()),
            Finding::Differs { live } => {
                differ += 1;
                println!("  DIFF {} = {live} (recommended {want})", rec.key);
            }
            Finding::Missing => {
                differ += 1;
                println!("  DIFF {} not readable here (recommended {want})", rec.key);
            }
        }
    }

    println!("\nfile descriptors");
    differ += check_nofile();

    println!("\nTCP Fast Open");
    match read_trimmed("/proc/sys/net/ipv4/tcp_fastopen").and_then(|v| v.parse::<u32>().ok()) {
        Some(v) if v & 2 != 0 => println!("  ok   server bit set (tcp_fastopen = {v})"),
        Some(v) => {
            differ += 1;
            println!(
                "  DIFF tcp_fastopen = {v}: server bit (2) unset, so ferrule's \
                 fastopen_queue is unused; set 3"
            );
        }
        None => println!("  ?    /proc/sys/net/ipv4/tcp_fastopen unreadable"),
    }

    println!("\nCPU features (AES-GCM and GHASH speed of every TLS record)");
    let flags = cpu_flags();
    for (flag, why) in [
        ("aes", "AES-NI: AES-GCM in hardware"),
        ("pclmulqdq", "carry-less multiply: fast GHASH"),
        ("vaes", "vector AES: wider AES-GCM"),
        ("vpclmulqdq", "vector carry-less multiply: wider GHASH"),
    ] {
        if flags.iter().any(|f| f == flag) {
            println!("  ok   {flag} ({why})");
        } else {
            // Only the first two matter for throughput; the vector ones are a bonus.
            if flag == "aes" || flag == "pclmulqdq" {
                differ += 1;
            }
            println!("  MISS {flag} ({why})");
        }
    }

    println!("\nio_uring");
    differ += check_io_uring();

    println!("\nNUMA");
    print_numa();

    println!(
        "\n{differ} finding(s) differ from the recommendations{}",
        if differ > 0 {
            "; see tuning/README.md"
        } else {
            ""
        }
    );
    Ok(())
}

fn check_nofile() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit struct for the duration of the call;
    // getrlimit only writes into it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 {
        println!("  ?    getrlimit(RLIMIT_NOFILE) failed");
        return 0;
    }
    // Two descriptors per proxied connection; the unit file asks for 1,048,576.
    const WANT: u64 = 1 << 20;
    let soft = limit.rlim_cur;
    if soft >= WANT {
        println!("  ok   RLIMIT_NOFILE soft {soft} (hard {})", limit.rlim_max);
        0
    } else {
        println!(
            "  DIFF RLIMIT_NOFILE soft {soft} (hard {}); recommended >= {WANT} \
             (LimitNOFILE= in tuning/ferrule.service)",
            limit.rlim_max
        );
        1
    }
}

fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn check_io_uring() -> usize {
    // 0 = allowed, 1 = only for a group, 2 = disabled (kernel 6.6+; absent before).
    match read_trimmed("/proc/sys/kernel/io_uring_disabled").as_deref() {
        Some("0") | None => {}
        Some(v) => {
            println!("  DIFF kernel.io_uring_disabled = {v}: ferrule's shards need io_uring");
            return 1;
        }
    }
    let mut params = [0u8; std::mem::size_of::<IoUringParams>()];
    // SAFETY: io_uring_setup reads and writes exactly one struct io_uring_params (120 bytes),
    // which `params` provides, zeroed as the ABI requires. On success it returns a new fd that
    // this function owns and closes; nothing else refers to it.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 2u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by the kernel and is closed exactly once here.
        unsafe { libc::close(fd as libc::c_int) };
        println!("  ok   io_uring_setup works");
        0
    } else {
        let err = std::io::Error::last_os_error();
        println!("  DIFF io_uring_setup failed: {err} (seccomp, container or old kernel?)");
        1
    }
}

/// Size stand-in for the kernel's struct io_uring_params (120 bytes on every architecture).
#[allow(dead_code)]
#[repr(C)]
struct IoUringParams([u32; 30]);

fn print_numa() {
    let Ok(entries) = std::fs::read_dir("/sys/devices/system/node") else {
        println!("  ?    /sys/devices/system/node unreadable (no NUMA information)");
        return;
    };
    let mut nodes: Vec<(u32, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix("node")?.parse::<u32>().ok()?;
            let cpus = read_trimmed(e.path().join("cpulist")).unwrap_or_else(|| "?".into());
            Some((id, cpus))
        })
        .collect();
    nodes.sort();
    for (id, cpus) in &nodes {
        println!("  node{id}: CPUs {cpus}  (ferrule serve --cores numa:{id})");
    }
    if nodes.len() > 1 {
        println!(
            "  more than one node: run one ferrule per node with --cores numa:N and pin the \
             NIC's IRQs to the same node (tuning/irq-affinity.sh)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_file_parses_cleanly() {
        let (recs, errors) = parse_sysctl_conf(SYSCTL_CONF);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(recs
            .iter()
            .any(|r| r.key == "net.ipv4.tcp_fastopen" && r.value == "3"));
        let somaxconn = recs.iter().find(|r| r.key == "net.core.somaxconn").unwrap();
        assert_eq!(somaxconn.rules, [Rule::AtLeast]);
        let rmem = recs.iter().find(|r| r.key == "net.ipv4.tcp_rmem").unwrap();
        assert_eq!(rmem.rules, [Rule::Equal, Rule::Equal, Rule::AtLeast]);
    }

    #[test]
    fn parses_comments_minimums_and_multi_field_values() {
        let text = "# c\n\n a.b = 1 # why\nc.d=4096   87380\t16777216\ne.f = 10 # doctor: >=\n";
        let (recs, errors) = parse_sysctl_conf(text);
        assert!(errors.is_empty());
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].key, "a.b");
        assert_eq!(recs[0].rules, [Rule::Equal]);
        assert_eq!(recs[1].value, "4096 87380 16777216");
        assert_eq!(recs[1].rules, [Rule::Equal; 3]);
        assert_eq!(recs[2].rules, [Rule::AtLeast]);
        assert_eq!(recs[2].line, 5);
    }

    #[test]
    fn bad_lines_are_errors_not_panics() {
        let text = "no equals sign\n= 3\nkey =\na b = 1\nx = y # doctor: >=\nok = 1\n\
                    t = 1 2 # doctor: >=\nu = 1 # doctor: <=\n";
        let (recs, errors) = parse_sysctl_conf(text);
        assert_eq!(errors.len(), 7, "{errors:?}");
        assert!(errors[5].contains("1 rule(s) for 2 field(s)"), "{errors:?}");
        assert!(errors[6].contains("unknown doctor rule `<=`"), "{errors:?}");
        assert_eq!(recs.len(), 1);
        assert!(errors[0].starts_with("sysctl.conf:1:"));
    }

    fn rec(value: &str, rules: &[Rule]) -> Recommendation {
        Recommendation {
            key: "k".into(),
            value: value.into(),
            rules: rules.to_vec(),
            line: 1,
        }
    }

    #[test]
    fn exact_comparison_ignores_whitespace_differences() {
        let r = rec("4096 87380 16777216", &[Rule::Equal; 3]);
        assert_eq!(compare(&r, Some("4096\t87380\t16777216\n")), Finding::Ok);
        assert_eq!(
            compare(&r, Some("4096 131072 6291456")),
            Finding::Differs {
                live: "4096 131072 6291456".into()
            }
        );
        assert_eq!(compare(&r, None), Finding::Missing);
    }

    #[test]
    fn minimum_comparison_accepts_bigger_values() {
        let r = rec("4096", &[Rule::AtLeast]);
        assert_eq!(compare(&r, Some("65535")), Finding::Ok);
        assert_eq!(compare(&r, Some("4096")), Finding::Ok);
        assert!(matches!(compare(&r, Some("128")), Finding::Differs { .. }));
        assert!(matches!(compare(&r, Some("junk")), Finding::Differs { .. }));
    }

    #[test]
    fn per_field_rules_accept_a_bigger_ceiling_but_not_a_bigger_default() {
        let r = rec(
            "4096 87380 16777216",
            &[Rule::Equal, Rule::Equal, Rule::AtLeast],
        );
        assert_eq!(r.wanted(), "4096 87380 >= 16777216");
        assert_eq!(compare(&r, Some("4096\t87380\t33554432")), Finding::Ok);
        assert_eq!(
            compare(&r, Some("4096 131072 33554432")),
            Finding::Differs {
                live: "4096 131072 33554432".into()
            }
        );
        assert!(matches!(
            compare(&r, Some("4096 87380 4194304")),
            Finding::Differs { .. }
        ));
        assert!(matches!(
            compare(&r, Some("4096 87380")),
            Finding::Differs { .. }
        ));
    }

    #[test]
    fn proc_path_refuses_escapes() {
        assert_eq!(
            proc_path("net.core.somaxconn").unwrap(),
            Path::new("/proc/sys/net/core/somaxconn")
        );
        assert!(proc_path("net..x").is_none());
        assert!(proc_path("net/../../etc").is_none());
    }
}
