//! Reading Azure's JSON by field name, case-insensitively (PowerShell writes
//! `BgpSettings`, REST and the CLI `bgpSettings`), with every error naming
//! the file and the path of the field as the file spells it.

use std::net::Ipv4Addr;

use serde_json::Value;

use super::AzureError;

/// A value in a file, and where it is.
#[derive(Debug, Clone)]
pub struct Node<'a> {
    pub value: &'a Value,
    pub file: &'a str,
    path: String,
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Value, file: &'a str) -> Self {
        Self {
            value,
            file,
            path: String::new(),
        }
    }

    /// `bgpSettings.bgpPeeringAddresses[0].tunnelIpAddresses[0]`, as spelt in the file.
    pub fn path(&self) -> &str {
        if self.path.is_empty() {
            "(top level)"
        } else {
            &self.path
        }
    }

    /// `file: path`, for provenance notes.
    pub fn origin(&self) -> String {
        format!("{}: {}", self.file, self.path())
    }

    fn child(&self, value: &'a Value, step: &str) -> Self {
        let path = if self.path.is_empty() {
            step.to_string()
        } else if step.starts_with('[') {
            format!("{}{step}", self.path)
        } else {
            format!("{}.{step}", self.path)
        };
        Self {
            value,
            file: self.file,
            path,
        }
    }

    /// The field `key`, matched case-insensitively; `None` if absent or null.
    pub fn get(&self, key: &str) -> Option<Node<'a>> {
        let obj = self.value.as_object()?;
        obj.iter()
            .find(|(k, v)| k.eq_ignore_ascii_case(key) && !v.is_null())
            .map(|(k, v)| self.child(v, k))
    }

    /// The field `key`, or an error saying it is missing and what it is for.
    pub fn req(&self, key: &str, what: &str) -> Result<Node<'a>, AzureError> {
        self.get(key).ok_or_else(|| AzureError::Missing {
            file: self.file.into(),
            path: if self.path.is_empty() {
                key.to_string()
            } else {
                format!("{}.{key}", self.path)
            },
            what: what.into(),
        })
    }

    /// Where Azure's resource properties are: under `properties` (ARM) or
    /// at the top level (the CLI flattens them).
    pub fn properties(&self) -> Node<'a> {
        match self.get("properties") {
            Some(p) if p.value.is_object() => p,
            _ => self.clone(),
        }
    }

    pub fn invalid(&self, reason: impl Into<String>) -> AzureError {
        AzureError::Invalid {
            file: self.file.into(),
            path: self.path().into(),
            value: short(self.value),
            reason: reason.into(),
        }
    }

    pub fn str(&self) -> Result<&'a str, AzureError> {
        self.value
            .as_str()
            .ok_or_else(|| self.invalid("expected a string"))
    }

    pub fn bool(&self) -> Result<bool, AzureError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            // PowerShell's ConvertTo-Json of some objects writes "True".
            Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
            _ => Err(self.invalid("expected true or false")),
        }
    }

    /// A whole number (Azure writes them as numbers, sometimes as strings).
    pub fn u64(&self) -> Result<u64, AzureError> {
        match self.value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .ok_or_else(|| self.invalid("expected a whole number"))
    }

    pub fn ipv4(&self) -> Result<Ipv4Addr, AzureError> {
        self.str()?
            .trim()
            .parse()
            .map_err(|_| self.invalid("expected an IPv4 address"))
    }

    /// The elements of an array (a single value counts as one).
    pub fn items(&self) -> Result<Vec<Node<'a>>, AzureError> {
        match self.value {
            Value::Array(a) => Ok(a
                .iter()
                .enumerate()
                .map(|(i, v)| self.child(v, &format!("[{i}]")))
                .collect()),
            _ => Err(self.invalid("expected an array")),
        }
    }

    /// Refuses fields other than `known` (matched case-insensitively).
    pub fn only(&self, known: &[&str]) -> Result<(), AzureError> {
        let Some(obj) = self.value.as_object() else {
            return Err(self.invalid("expected an object"));
        };
        for k in obj.keys() {
            if !known.iter().any(|n| n.eq_ignore_ascii_case(k)) {
                return Err(AzureError::Unknown {
                    file: self.file.into(),
                    path: self.child(&Value::Null, k).path().into(),
                    known: known.join(", "),
                });
            }
        }
        Ok(())
    }
}

/// A value for a message, cut short.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

/// Parses `text` (named `file` in errors); a syntax error gives its line
/// and column only, never the text (a connection holds the shared key).
pub fn parse(text: &str, file: &str) -> Result<Value, AzureError> {
    // PowerShell's Out-File writes a byte order mark.
    let text = text.trim_start_matches('\u{feff}');
    serde_json::from_str(text).map_err(|e| AzureError::Json {
        file: file.into(),
        line: e.line(),
        column: e.column(),
        reason: match e.classify() {
            serde_json::error::Category::Eof => "the file ends too early",
            _ => "not valid JSON",
        },
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fields_are_found_whatever_their_case_and_named_as_spelt() {
        let v = json!({"Properties": {"BgpSettings": {"Asn": 65000, "BgpPeeringAddresses": [{"TunnelIpAddresses": ["203.0.113.11"]}]}}});
        let root = Node::root(&v, "gw.json");
        let p = root.properties();
        let b = p.req("bgpSettings", "BGP").unwrap();
        assert_eq!(b.req("asn", "ASN").unwrap().u64().unwrap(), 65000);
        let a = &b.req("bgpPeeringAddresses", "x").unwrap().items().unwrap()[0];
        let t = &a.req("tunnelIpAddresses", "x").unwrap().items().unwrap()[0];
        assert_eq!(
            t.path(),
            "Properties.BgpSettings.BgpPeeringAddresses[0].TunnelIpAddresses[0]"
        );
        assert_eq!(t.ipv4().unwrap(), Ipv4Addr::new(203, 0, 113, 11));
        let e = b.req("peerWeight", "the weight").unwrap_err().to_string();
        assert!(
            e.contains("gw.json") && e.contains("Properties.BgpSettings.peerWeight"),
            "{e}"
        );
        let e = b.only(&["asn"]).unwrap_err().to_string();
        assert!(
            e.contains("Properties.BgpSettings.BgpPeeringAddresses") && e.contains("asn"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_do_not_echo_the_text() {
        let e = parse("{\"sharedKey\": \"abc123secret\" x}", "c.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.json") && e.contains("line 1") && !e.contains("abc123"),
            "{e}"
        );
        assert!(parse("\u{feff}{}", "x").is_ok());
    }

    #[test]
    fn wrong_types_name_the_value_and_path() {
        let v = json!({"activeActive": "maybe", "asn": -1});
        let r = Node::root(&v, "g");
        let e = r
            .req("ActiveActive", "x")
            .unwrap()
            .bool()
            .unwrap_err()
            .to_string();
        assert!(e.contains("activeActive") && e.contains("maybe"), "{e}");
        assert!(r.req("asn", "x").unwrap().u64().is_err());
    }
}
