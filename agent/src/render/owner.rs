//! Owner and group of rendered files: names resolved to numeric ids without libc.
//!
//! Why it exists: a rendered file may have to belong to the service that reads it (`owner =
//! "www-data"`). The agent has no libc binding (and no `unsafe`), so names are looked up by
//! reading `/etc/passwd` and `/etc/group` directly; numeric ids are accepted as they are.
//! Names served only by NSS modules (LDAP, sssd, systemd-homed) are not found this way: give
//! numeric ids for those. Resolution happens when the config is resolved, so an unknown name
//! is a config error; the ids are applied with [`std::os::unix::fs::chown`] on the staged file
//! before it is renamed into place.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// What is being resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    User,
    Group,
}

/// Resolve a user or group given as a name or a numeric id.
pub(super) fn resolve(name: &str, kind: Kind) -> Result<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let db = match kind {
        Kind::User => "/etc/passwd",
        Kind::Group => "/etc/group",
    };
    let text = std::fs::read_to_string(Path::new(db))
        .with_context(|| format!("cannot read {db} to look up `{name}` (give a numeric id)"))?;
    match lookup(&text, name) {
        Some(id) => Ok(id),
        None => bail!(
            "no {} named `{name}` in {db} (give a numeric id if it comes from a directory service)",
            match kind {
                Kind::User => "user",
                Kind::Group => "group",
            }
        ),
    }
}

/// Find `name` in passwd/group syntax (`name:x:id:...`): the id is the third field.
fn lookup(text: &str, name: &str) -> Option<u32> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then_some(())?;
            f.next()?;
            f.next()?.trim().parse().ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_group_lines() {
        let passwd = "# comment\nroot:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\nbad:line\n";
        assert_eq!(lookup(passwd, "root"), Some(0));
        assert_eq!(lookup(passwd, "www-data"), Some(33));
        assert_eq!(lookup(passwd, "bad"), None);
        assert_eq!(lookup(passwd, "nobody-here"), None);
        assert_eq!(lookup("adm:x:4:syslog\n", "adm"), Some(4));
        assert_eq!(resolve("1234", Kind::User).unwrap(), 1234);
        assert_eq!(resolve("root", Kind::User).unwrap(), 0);
    }
}
