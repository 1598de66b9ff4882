//! `xesp azure allowlist`: `[dmz] allow` from Microsoft's published data,
//! either the output of `Get-AzBgpServiceCommunity` (the communities named,
//! e.g. `12076:51026`, give their `CommunityPrefixes`) or a Service Tags file
//! (`values[].properties.addressPrefixes` of the tags named).

use std::{collections::BTreeMap, str::FromStr};

use ipnet::IpNet;

use super::{AzureError, json::Node, refused};

/// A prefix and the community or tag it came from.
pub type Sourced = BTreeMap<IpNet, String>;

const COMMUNITY_FIELDS: [&str; 6] = [
    "serviceSupportedRegion",
    "communityName",
    "communityValue",
    "communityPrefixes",
    "isAuthorizedToUse",
    "serviceGroup",
];

fn prefixes(list: &Node<'_>, from: &str, out: &mut Sourced) -> Result<usize, AzureError> {
    let items = list.items()?;
    for p in &items {
        let s = p.str()?;
        let net = IpNet::from_str(s.trim())
            .map_err(|_| p.invalid("not a prefix like 13.66.0.0/17 or 2603:1030::/40"))?
            .trunc();
        out.entry(net).or_insert_with(|| from.to_string());
    }
    Ok(items.len())
}

/// Not found: say what the file has, a few of them.
fn not_found(file: &str, what: &str, wanted: &str, have: &[String]) -> AzureError {
    let shown: Vec<&str> = have.iter().take(8).map(String::as_str).collect();
    refused(
        format!("{what} {wanted}"),
        format!(
            "not in {file}, which lists {} ({}{})",
            have.len(),
            shown.join(", "),
            if have.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ),
    )
}

/// The services of a `Get-AzBgpServiceCommunity` dump: a list (PowerShell),
/// `{value: [...]}` (REST), or one service alone.
fn services<'a>(root: &Node<'a>) -> Result<Vec<Node<'a>>, AzureError> {
    if root.value.is_array() {
        return root.items();
    }
    if let Some(v) = root.get("value") {
        return v.items();
    }
    if root.properties().get("bgpCommunities").is_some() {
        return Ok(vec![root.clone()]);
    }
    Err(root.invalid(
        "not Get-AzBgpServiceCommunity's output: expected a list of services with BgpCommunities, or {value: [...]}",
    ))
}

/// The prefixes of the communities named (by value, `12076:51026`, or name,
/// `AzureWestUS2`), each with its community.
pub fn from_communities(
    root: &Node<'_>,
    wanted: &[String],
    warnings: &mut Vec<String>,
) -> Result<Sourced, AzureError> {
    let mut out = Sourced::new();
    let mut have = Vec::new();
    let mut found = vec![false; wanted.len()];
    for svc in services(root)? {
        let p = svc.properties();
        let Some(list) = p.get("bgpCommunities") else {
            return Err(p.invalid("a service without BgpCommunities"));
        };
        for c in list.items()? {
            c.only(&COMMUNITY_FIELDS)?;
            let value = c
                .req("communityValue", "the community, like 12076:51026")?
                .str()?;
            let name = c
                .get("communityName")
                .map(|n| n.str())
                .transpose()?
                .unwrap_or("");
            have.push(format!("{value} {name}").trim().to_string());
            for (i, w) in wanted.iter().enumerate() {
                let w = w.trim();
                if w == value.trim() || (!name.is_empty() && w.eq_ignore_ascii_case(name)) {
                    found[i] = true;
                    let from = format!("{value} ({name})");
                    let list = c.req("communityPrefixes", "the community's prefixes")?;
                    if prefixes(&list, &from, &mut out)? == 0 {
                        warnings.push(format!("{}: {} is empty", c.file, list.path()));
                    }
                    if let Some(a) = c.get("isAuthorizedToUse")
                        && a.bool().is_ok_and(|b| !b)
                    {
                        warnings.push(format!(
                            "community {value}: isAuthorizedToUse is false; the route filter may not be allowed to carry it"
                        ));
                    }
                }
            }
        }
    }
    if let Some(i) = found.iter().position(|f| !f) {
        return Err(not_found(root.file, "community", &wanted[i], &have));
    }
    Ok(out)
}

/// The prefixes of the service tags named (e.g. `AzureCloud.westus2`).
pub fn from_service_tags(root: &Node<'_>, wanted: &[String]) -> Result<Sourced, AzureError> {
    let values = root.req("values", "the service tags")?;
    let mut out = Sourced::new();
    let mut have = Vec::new();
    let mut found = vec![false; wanted.len()];
    for tag in values.items()? {
        tag.only(&["name", "id", "properties"])?;
        let name = tag.req("name", "the tag's name")?.str()?;
        have.push(name.to_string());
        for (i, w) in wanted.iter().enumerate() {
            if w.trim().eq_ignore_ascii_case(name) {
                found[i] = true;
                let p = tag.req("properties", "the tag's properties")?;
                p.only(&[
                    "changeNumber",
                    "region",
                    "regionId",
                    "platform",
                    "systemService",
                    "addressPrefixes",
                    "networkFeatures",
                ])?;
                let list = p.req("addressPrefixes", "the tag's prefixes")?;
                prefixes(&list, name, &mut out)?;
            }
        }
    }
    if let Some(i) = found.iter().position(|f| !f) {
        return Err(not_found(root.file, "service tag", &wanted[i], &have));
    }
    Ok(out)
}

/// How the list changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<(IpNet, String)>,
    pub removed: Vec<IpNet>,
    pub kept: usize,
}

pub fn diff(current: &[IpNet], new: &Sourced) -> Diff {
    let mut d = Diff::default();
    for (n, from) in new {
        if current.contains(n) {
            d.kept += 1;
        } else {
            d.added.push((*n, from.clone()));
        }
    }
    d.removed = current
        .iter()
        .filter(|n| !new.contains_key(n))
        .copied()
        .collect();
    d
}

impl Diff {
    /// `+ prefix  from` and `- prefix` lines.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (n, from) in &self.added {
            s.push_str(&format!("+ {:<24} {from}\n", n.to_string()));
        }
        for n in &self.removed {
            s.push_str(&format!("- {n}\n"));
        }
        s.push_str(&format!(
            "{} added, {} removed, {} unchanged\n",
            self.added.len(),
            self.removed.len(),
            self.kept
        ));
        s
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What `[dmz] allow` holds in a configuration's text.
pub fn current(doc: &toml_edit::DocumentMut) -> Result<Vec<IpNet>, AzureError> {
    let Some(allow) = doc.get("dmz").and_then(|d| d.get("allow")) else {
        return Ok(vec![]);
    };
    let Some(arr) = allow.as_array() else {
        return Err(refused("dmz.allow", "not a list of prefixes"));
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .and_then(|s| IpNet::from_str(s.trim()).ok())
                .ok_or_else(|| {
                    refused(
                        format!("dmz.allow[{i}]"),
                        "not a prefix like 203.0.113.0/24",
                    )
                })
        })
        .collect()
}

/// Sets `[dmz] allow` to `new`, one prefix a line, under a comment saying
/// where it came from (`note`), keeping the rest of the document (comments
/// included) as it was.
pub fn set(doc: &mut toml_edit::DocumentMut, new: &Sourced, note: &str) {
    let mut arr = toml_edit::Array::new();
    for n in new.keys() {
        let mut v = toml_edit::Value::from(n.to_string());
        v.decor_mut().set_prefix("\n    ");
        arr.push_formatted(v);
    }
    arr.set_trailing("\n");
    arr.set_trailing_comma(true);
    if !doc.contains_key("dmz") {
        doc["dmz"] = toml_edit::table();
    }
    doc["dmz"]["allow"] = toml_edit::value(arr);
    if let Some(t) = doc["dmz"].as_table_mut()
        && let Some(mut k) = t.key_mut("allow")
    {
        k.leaf_decor_mut().set_prefix(format!("# {note}\n"));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn communities_by_value_or_name_in_either_spelling() {
        let ps = json!([{"Name": "Azure", "BgpCommunities": [
            {"CommunityValue": "12076:51026", "CommunityName": "AzureWestUS2", "CommunityPrefixes": ["13.66.0.0/17", "2603:1030::/40"]},
            {"CommunityValue": "12076:51004", "CommunityName": "AzureEastUS", "CommunityPrefixes": ["13.68.0.0/17"]}]}]);
        let rest = json!({"value": [{"name": "Azure", "properties": {"serviceName": "Azure", "bgpCommunities": [
            {"communityValue": "12076:51026", "communityName": "AzureWestUS2", "communityPrefixes": ["13.66.0.0/17", "2603:1030::/40"]}]}}]});
        let mut w = vec![];
        let a =
            from_communities(&Node::root(&ps, "ps.json"), &["12076:51026".into()], &mut w).unwrap();
        let b = from_communities(
            &Node::root(&rest, "rest.json"),
            &["azurewestus2".into()],
            &mut w,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.keys().copied().collect::<Vec<_>>(),
            vec![n("13.66.0.0/17"), n("2603:1030::/40")]
        );
        assert_eq!(a[&n("13.66.0.0/17")], "12076:51026 (AzureWestUS2)");
        let e = from_communities(&Node::root(&ps, "ps.json"), &["12076:9".into()], &mut w)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("12076:9") && e.contains("ps.json") && e.contains("12076:51004 AzureEastUS"),
            "{e}"
        );
    }

    #[test]
    fn diffs_and_rewrites_keep_the_rest() {
        let text = "# mine\n[device]\npublic_address = \"192.0.2.1\" # the DMZ\n\n[dmz]\n# filtered\nallow = [\"52.175.0.0/16\", \"13.66.0.0/17\"]\n";
        let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
        let cur = current(&doc).unwrap();
        let mut new = Sourced::new();
        new.insert(n("13.66.0.0/17"), "c".into());
        new.insert(n("20.0.0.0/8"), "c".into());
        let d = diff(&cur, &new);
        assert_eq!(d.added, vec![(n("20.0.0.0/8"), "c".to_string())]);
        assert_eq!(d.removed, vec![n("52.175.0.0/16")]);
        assert_eq!(d.kept, 1);
        set(&mut doc, &new, "from test");
        let out = doc.to_string();
        assert!(out.contains("# mine") && out.contains("# the DMZ"), "{out}");
        // The list's comment says where it came from now.
        assert!(
            out.contains("# from test\nallow = [") && !out.contains("# filtered"),
            "{out}"
        );
        assert!(
            out.contains("allow = [\n    \"13.66.0.0/17\",\n    \"20.0.0.0/8\",\n]"),
            "{out}"
        );
        let doc2: toml_edit::DocumentMut = out.parse().unwrap();
        assert!(diff(&current(&doc2).unwrap(), &new).is_empty());
        // A file without [dmz] gets one.
        let mut bare: toml_edit::DocumentMut = "[device]\n".parse().unwrap();
        set(&mut bare, &new, "x");
        assert_eq!(current(&bare).unwrap().len(), 2);
    }
}
