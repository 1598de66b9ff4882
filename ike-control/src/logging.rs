//! Logs through `tracing`: plain text on a terminal, the journal's own
//! format under systemd (structured fields kept), or JSON lines on request.
//! `RUST_LOG` filters as before (`info` by default; `debug` shows every IKE
//! exchange). The libraries' `log` records are carried over. No secret is
//! ever a field or in a message (the PSK and keys have redacting Debug).

use std::str::FromStr;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal when standard error is systemd's journal stream,
    /// text otherwise.
    #[default]
    Auto,
    Text,
    /// One JSON object per line.
    Json,
    Journald,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

/// Whether standard error is the journal's stream: systemd sets
/// `JOURNAL_STREAM` to its device and inode (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the subscriber for the process; the chosen format is returned
/// (the journal falls back to text when it cannot be reached).
pub fn init(format: LogFormat) -> LogFormat {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let registry = tracing_subscriber::registry().with(filter());
    // Colours only on a terminal, never into a file or the journal.
    let text = || {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    };
    let done = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(j) => registry.with(j).try_init(),
            Err(e) => {
                let r = registry.with(text()).try_init();
                tracing::warn!("the journal is not reachable ({e}): logging text");
                return r.map_or(format, |()| LogFormat::Text);
            }
        },
        _ => registry.with(text()).try_init(),
    };
    if let Err(e) = done {
        eprintln!("xesp: logging: {e}");
    }
    format
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("JOURNALD".parse(), Ok(LogFormat::Journald));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn without_systemd_stderr_is_no_journal() {
        // The test runner's standard error is never the journal's stream
        // with this made-up identity.
        // SAFETY: no other thread of this test reads the variable.
        unsafe { std::env::set_var("JOURNAL_STREAM", "1:1") };
        assert!(!stderr_is_journal());
    }
}
