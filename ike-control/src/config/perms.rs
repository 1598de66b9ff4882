//! Files that hold a secret should be readable by their owner only, the way
//! ssh insists on for private keys.

use std::{os::unix::fs::PermissionsExt, path::Path};

/// A warning if `path` (holding `what`) can be read or written by users
/// other than its owner; `None` if it cannot or the mode cannot be read.
pub fn secret_file_warning(path: &Path, what: &str) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{}: holds {what} but its mode is {mode:04o}, open to other users; \
             run chmod 600 {}",
            path.display(),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn modes_open_to_others_are_flagged() {
        let dir = std::env::temp_dir().join(format!("xesp-perms-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("psk");
        fs::write(&f, "k").unwrap();
        for (mode, warned) in [
            (0o600, false),
            (0o400, false),
            (0o644, true),
            (0o640, true),
            (0o604, true),
            (0o620, true),
        ] {
            fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            let w = secret_file_warning(&f, "the pre-shared key");
            assert_eq!(w.is_some(), warned, "{mode:o}: {w:?}");
            if let Some(w) = w {
                assert!(w.contains(&format!("{mode:04o}")) && w.contains("chmod 600"));
            }
        }
        assert!(secret_file_warning(&dir.join("absent"), "x").is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
