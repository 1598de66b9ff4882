//! TOML errors told without giving a secret away. The toml crate quotes the
//! offending line and sometimes the value ("invalid type: integer `1234`");
//! on a line that names a pre-shared key, or one whose key cannot be told
//! (a typo may have eaten the `psk =`), neither is shown.

/// Where in the file, and what went wrong, safe to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line and column, when the parser knows them.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    /// The offending line, unless it may hold a secret.
    pub snippet: Option<String>,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "line {l}, column {c}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(s) = &self.snippet {
            write!(f, "\n  | {s}")?;
        }
        Ok(())
    }
}

/// The keys of `xesp.toml` that never hold a secret: a line with one of them
/// may be shown.
const PLAIN_KEYS: &[&str] = &[
    "public_address",
    "dmz_interface",
    "lan_interfaces",
    "datapath",
    "control_socket",
    "control_group",
    "metrics_listen",
    "mss_clamp",
    "tunnel_mtu",
    "bird_socket",
    "allow",
    "proposals",
    "esp_proposals",
    "allow_legacy",
    "lifetime",
    "child_lifetime",
    "child_lifetime_kb",
    "dpd",
    "interval",
    "retry",
    "tries",
    "on_demand",
    "initiator",
    "replay_window",
    "local_ts",
    "remote_ts",
    "name",
    "remote",
    "address",
    "bgp_peer",
    "asn",
    "peer_asn",
    "source",
    "networks",
    "multihop",
    "hold_time",
    "keepalive",
    "connect_retry",
    "device",
    "dmz",
    "ike",
    "bgp",
    "tunnel",
];

/// Whether `line` might carry a secret: it mentions a psk, or its key is
/// not one of xesp's plain keys (a typo such as `pks = "..."`, or a line
/// whose `psk =` was lost).
fn may_hold_secret(line: &str) -> bool {
    let t = line.trim();
    if t.to_ascii_lowercase().contains("psk") {
        return true;
    }
    if t.is_empty() || t.starts_with('#') || t.starts_with('[') {
        return false;
    }
    let Some((key, _)) = t.split_once('=') else {
        return true;
    };
    let key = key.trim().trim_matches('"');
    !PLAIN_KEYS.contains(&key)
}

/// Removes `quoted` and "quoted" parts of a message.
fn without_quotes(msg: &str) -> String {
    let mut out = String::new();
    let mut open: Option<char> = None;
    for c in msg.chars() {
        match open {
            Some(q) if c == q => {
                out.push_str("(not shown)");
                open = None;
            }
            Some(_) => {}
            None if c == '`' || c == '"' => open = Some(c),
            None => out.push(c),
        }
    }
    out
}

/// Turns a toml error on `text` into a message that never echoes a secret.
pub fn redact(text: &str, e: &toml::de::Error) -> SyntaxError {
    let message = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return SyntaxError {
            line: None,
            column: None,
            message: without_quotes(&message),
            snippet: None,
        };
    };
    let start = span.start.min(text.len());
    let before = &text[..text.floor_char_boundary(start)];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    // A multi-line value: every line it spans is checked, whole.
    let end = text.ceil_char_boundary(span.end.min(text.len()));
    let end = text[end..].find('\n').map_or(text.len(), |i| end + i);
    let spanned = &text[line_start..end.max(line_start)];
    let secret = spanned.lines().chain([line]).any(may_hold_secret);
    SyntaxError {
        line: Some(line_no),
        column: Some(column),
        message: if secret && !message.starts_with("unknown field") {
            format!(
                "{} (this line is not shown: it may hold the pre-shared key)",
                without_quotes(&message)
            )
        } else {
            message
        },
        snippet: (!secret).then(|| line.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> SyntaxError {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct F {
            ike: Option<I>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        #[serde(deny_unknown_fields)]
        struct I {
            psk: Option<String>,
            tries: Option<u32>,
        }
        let e = toml::from_str::<F>(text).unwrap_err();
        redact(text, &e)
    }

    #[test]
    fn a_secret_is_never_echoed() {
        let cases = [
            // A missing quote on the psk line.
            "[ike]\npsk = \"hunter2-secret\n",
            // No quotes at all.
            "[ike]\npsk = hunter2-secret\n",
            // A number where a string goes: serde quotes the value.
            "[ike]\npsk = 7777777777\n",
            // The "psk =" eaten by a typo: the key cannot be told.
            "[ike]\n\"hunter2-secret\"\n",
            // A typo in the key.
            "[ike]\npks = \"hunter2-secret\"\n",
            // In an inline table.
            "ike = { psk = \"hunter2-secret\", tries = x }\n",
            // A multi-line string.
            "[ike]\npsk = \"\"\"\nhunter2-secret\n\"\"\" x\n",
        ];
        for text in cases {
            let e = err(text);
            let shown = e.to_string();
            assert!(!shown.contains("hunter2"), "{text:?} -> {shown}");
            assert!(!shown.contains("7777777777"), "{text:?} -> {shown}");
            assert!(e.line.is_some(), "{text:?} -> {shown}");
        }
    }

    #[test]
    fn other_lines_are_shown_with_their_place() {
        let e = err("[ike]\ntries = \"many\"\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.snippet.as_deref(), Some("tries = \"many\""));
        assert!(e.to_string().contains("line 2, column"), "{e}");
        let e = err("[ike]\ntries = 3\nfoo = 1\n");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("foo"), "{e}");
        // An unknown key is named, its value is not shown.
        let e = err("[ike]\npks = \"hunter2\"\n");
        assert!(e.message.contains("`pks`") && e.snippet.is_none(), "{e}");
    }
}
