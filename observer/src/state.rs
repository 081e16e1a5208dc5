//! What the agent remembers across its own restarts: which open connections proved WebSocket by
//! their handshake.
//!
//! A restarted agent finds every open connection in the kernel's socket table, but a WebSocket
//! off the watched ports is recognised only by its handshake, long gone, or by frames, which a
//! frozen or silent connection never sends. So the agent keeps, in a small file, the socket
//! cookies of the connections whose upgrade it saw, with the path (never the query string), the
//! subprotocol and the extensions. Socket cookies are unique until the host reboots, so the file
//! carries the boot ID and is ignored after a reboot. It is rewritten (to a temporary file, then
//! renamed) only at refreshes where that set changed.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::handshake::Upgrade;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Saved {
    boot_id: String,
    websockets: Vec<SavedUpgrade>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SavedUpgrade {
    cookie: u64,
    path: String,
    subprotocol: Option<String>,
    extensions: Option<String>,
}

/// The state file, and what was last written to it.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    boot_id: String,
    /// Fingerprint of the set last written; `None` before the first write.
    written: Option<(usize, u64)>,
    /// The last write error, logged once until a write succeeds.
    failing: Option<String>,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        let boot_id = fs::read_to_string(BOOT_ID).unwrap_or_default().trim().to_owned();
        Self { path, boot_id, written: None, failing: None }
    }

    /// The upgrades saved by an earlier run on this boot, by socket cookie. A missing file is
    /// an empty one; an unreadable one is logged and ignored.
    pub fn load(&self) -> HashMap<u64, Upgrade> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return HashMap::new(),
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "state file ignored");
                return HashMap::new();
            }
        };
        let saved: Saved = match serde_json::from_slice(&bytes) {
            Ok(saved) => saved,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "state file ignored");
                return HashMap::new();
            }
        };
        if saved.boot_id != self.boot_id || self.boot_id.is_empty() {
            info!(path = %self.path.display(), "state file from an earlier boot ignored");
            return HashMap::new();
        }
        info!(path = %self.path.display(), websockets = saved.websockets.len(), "state file read");
        saved
            .websockets
            .into_iter()
            .map(|s| {
                let upgrade =
                    Upgrade { path: s.path, subprotocol: s.subprotocol, extensions: s.extensions };
                (s.cookie, upgrade)
            })
            .collect()
    }

    /// Writes `upgrades` when the set of cookies differs from the last one written.
    pub fn save<'a>(&mut self, upgrades: impl Iterator<Item = (u64, &'a Upgrade)> + Clone) {
        // Compared by cookies alone, before anything is copied: most refreshes change nothing.
        let fingerprint = upgrades.clone().fold((0, 0u64), |(n, acc), (cookie, _)| {
            (n + 1, acc ^ cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        });
        if self.written == Some(fingerprint) {
            return;
        }
        let mut websockets: Vec<SavedUpgrade> = upgrades
            .map(|(cookie, u)| SavedUpgrade {
                cookie,
                path: u.path.split('?').next().unwrap_or_default().to_owned(),
                subprotocol: u.subprotocol.clone(),
                extensions: u.extensions.clone(),
            })
            .collect();
        websockets.sort_unstable_by_key(|s| s.cookie);
        let saved = Saved { boot_id: self.boot_id.clone(), websockets };
        match write_atomically(&self.path, &saved) {
            Ok(()) => {
                self.written = Some(fingerprint);
                self.failing = None;
            }
            Err(error) => {
                let error = error.to_string();
                if self.failing.as_ref() != Some(&error) {
                    warn!(
                        path = %self.path.display(),
                        %error,
                        "cannot write the state file: after a restart, silent WebSockets off the watched ports are not recognised"
                    );
                    self.failing = Some(error);
                }
            }
        }
    }
}

fn write_atomically(path: &Path, saved: &Saved) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    fs::write(&temporary, serde_json::to_vec(saved).map_err(io::Error::other)?)?;
    fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(path: &str) -> Upgrade {
        Upgrade { path: path.into(), subprotocol: Some("chat".into()), extensions: None }
    }

    #[test]
    fn saved_upgrades_come_back_without_query_strings() {
        let dir = std::env::temp_dir().join(format!("observer-state-{}", std::process::id()));
        let path = dir.join("nested").join("state.json");
        let mut file = StateFile::new(path.clone());
        assert!(file.load().is_empty(), "no file yet");
        let (a, b) = (upgrade("/feed?token=secret"), upgrade("/chat"));
        file.save([(7, &a), (9, &b)].into_iter());
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("secret"), "{text}");
        let loaded = StateFile::new(path.clone()).load();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[&7].path, "/feed");
        assert_eq!(loaded[&9], b);

        // The same set is not written again; a changed one is.
        fs::remove_file(&path).unwrap();
        file.save([(9, &b), (7, &a)].into_iter());
        assert!(!path.exists());
        file.save([(9, &b)].into_iter());
        assert_eq!(StateFile::new(path.clone()).load().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_from_another_boot_or_garbage_is_ignored() {
        let dir = std::env::temp_dir().join(format!("observer-state-boot-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let other = Saved {
            boot_id: "not-this-boot".into(),
            websockets: vec![SavedUpgrade {
                cookie: 1,
                path: "/".into(),
                subprotocol: None,
                extensions: None,
            }],
        };
        fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        assert!(StateFile::new(path.clone()).load().is_empty());
        fs::write(&path, b"{not json").unwrap();
        assert!(StateFile::new(path.clone()).load().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
