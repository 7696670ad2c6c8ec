//! Who may call: bearer secrets (API keys for `PushServer`, the node token for `ConnectNode`)
//! read from a file, checked in constant time, and swapped whole when the file is re-read
//! (SIGHUP), so a rotation never drops a connection or a call in flight.
//!
//! A caller sends `authorization: Bearer <secret>` as gRPC metadata; [`bearer`] builds that.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use grpcio::{Metadata, MetadataBuilder};
use parking_lot::RwLock;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// The metadata key a bearer secret travels in (gRPC lower-cases keys).
pub const AUTHORIZATION: &str = "authorization";

/// Secrets from a file: one per line, blank lines and lines starting with `#` skipped.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
    /// Which flag named the file, for messages.
    flag: &'static str,
    /// The shortest key taken, and why, checked at every (re)load.
    min: MinLen,
    keys: RwLock<Arc<Vec<Secret>>>,
}

/// The shortest key a file may hold, in bytes, and the reason given when one is shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinLen {
    pub bytes: usize,
    pub why: &'static str,
}

/// Any non-empty key: bearer keys are compared whole, so their length is the operator's choice.
const ANY_LEN: MinLen = MinLen { bytes: 1, why: "" };

/// Why a call was refused. The message says how to authenticate, never which key was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `authorization` metadata, or not of the `Bearer` scheme.
    #[error("missing credentials: send `authorization: Bearer <key>` as gRPC metadata (the key is one line of the server's {0})")]
    Missing(&'static str),
    /// A bearer key that is none of the file's.
    #[error("the key sent as `authorization: Bearer <key>` is not one of the server's {0}")]
    Wrong(&'static str),
}

impl KeyFile {
    /// Reads `path` (given with `flag`); an unreadable file or one without a single key is an
    /// error naming both.
    pub fn load(flag: &'static str, path: &Path) -> Result<KeyFile, String> {
        KeyFile::load_min(flag, path, ANY_LEN)
    }

    /// Like [`KeyFile::load`], and every key (now and at each reload) must be at least
    /// `min.bytes` long.
    pub fn load_min(flag: &'static str, path: &Path, min: MinLen) -> Result<KeyFile, String> {
        let keys = read_keys(flag, path, min)?;
        Ok(KeyFile { path: path.to_path_buf(), flag, min, keys: RwLock::new(Arc::new(keys)) })
    }

    /// Reads the file again and swaps the keys in; on error the old keys stay. Returns how
    /// many keys there were and are (counts only: keys are never logged).
    pub fn reload(&self) -> Result<(usize, usize), String> {
        let keys = read_keys(self.flag, &self.path, self.min)?;
        let after = keys.len();
        let before = std::mem::replace(&mut *self.keys.write(), Arc::new(keys)).len();
        Ok((before, after))
    }

    pub fn len(&self) -> usize {
        self.keys.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.read().is_empty()
    }

    /// The first key, for the side that sends one (push-manager sending the node token).
    pub fn first(&self) -> Secret {
        self.keys.read()[0].clone()
    }

    /// Every key, first first, as they were when called (a reload swaps in a new list and
    /// leaves this one as it is).
    pub fn keys(&self) -> Arc<Vec<Secret>> {
        self.keys.read().clone()
    }

    /// Accepts the call if its metadata carries one of the keys as a bearer secret.
    pub fn check(&self, metadata: &Metadata) -> Result<(), Refusal> {
        let sent = metadata
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(AUTHORIZATION))
            .and_then(|(_, value)| value.strip_prefix(b"Bearer "))
            .ok_or(Refusal::Missing(self.flag))?;
        // Every key is compared, in constant time each, so neither the time taken nor an early
        // exit says which key (or how much of one) matched.
        let keys = self.keys.read().clone();
        let matched = keys.iter().fold(0u8, |found, key| found | key.expose().as_bytes().ct_eq(sent).unwrap_u8());
        if matched == 1 {
            Ok(())
        } else {
            Err(Refusal::Wrong(self.flag))
        }
    }
}

fn read_keys(flag: &'static str, path: &Path, min: MinLen) -> Result<Vec<Secret>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .map(str::trim)
        .enumerate()
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .collect();
    if lines.is_empty() {
        return Err(format!("{flag} {}: no key in the file (one per line; # starts a comment)", path.display()));
    }
    if lines.iter().any(|(_, k)| k.chars().any(|c| c.is_whitespace() || c.is_control())) {
        return Err(format!("{flag} {}: a key contains whitespace or a control character", path.display()));
    }
    // The line number, never the key, says which one is short.
    if let Some((i, key)) = lines.iter().find(|(_, k)| k.len() < min.bytes) {
        return Err(format!(
            "{flag} {}: the key on line {} is {} bytes, shorter than {}: {}",
            path.display(),
            i + 1,
            key.len(),
            min.bytes,
            min.why
        ));
    }
    Ok(lines.into_iter().map(|(_, k)| Secret::new(k)).collect())
}

/// `authorization: Bearer <secret>`, for a call's `CallOption::headers`.
pub fn bearer(secret: &Secret) -> Metadata {
    let mut builder = MetadataBuilder::with_capacity(1);
    add_bearer(&mut builder, secret);
    builder.build()
}

/// Adds `authorization: Bearer <secret>` to metadata that carries more.
pub fn add_bearer(metadata: &mut MetadataBuilder, secret: &Secret) {
    // Keys are checked for whitespace and control characters when read, so this cannot fail.
    let _ = metadata.add_str(AUTHORIZATION, &format!("Bearer {}", secret.expose()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn accepts_any_key_of_the_file_and_refuses_others() {
        let (_dir, path) = file("# business servers\nalpha\n\n  beta  \n");
        let keys = KeyFile::load("--api-key-file", &path).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.check(&bearer(&Secret::new("alpha"))), Ok(()));
        assert_eq!(keys.check(&bearer(&Secret::new("beta"))), Ok(()));
        assert_eq!(keys.check(&bearer(&Secret::new("alph"))), Err(Refusal::Wrong("--api-key-file")));
        assert_eq!(keys.check(&bearer(&Secret::new("alphax"))), Err(Refusal::Wrong("--api-key-file")));
        assert_eq!(keys.check(&MetadataBuilder::new().build()), Err(Refusal::Missing("--api-key-file")));
        let mut basic = MetadataBuilder::new();
        basic.add_str("authorization", "Basic alpha").unwrap();
        assert_eq!(keys.check(&basic.build()), Err(Refusal::Missing("--api-key-file")));
        for refusal in [Refusal::Missing("--api-key-file"), Refusal::Wrong("--api-key-file")] {
            assert!(refusal.to_string().contains("authorization: Bearer <key>"), "{refusal}");
        }
    }

    #[test]
    fn reload_swaps_keys_and_keeps_the_old_ones_on_error() {
        let (_dir, path) = file("old\n");
        let keys = KeyFile::load("--node-token-file", &path).unwrap();
        std::fs::write(&path, "new\nnewer\n").unwrap();
        assert_eq!(keys.reload(), Ok((1, 2)));
        assert!(keys.check(&bearer(&Secret::new("old"))).is_err());
        assert!(keys.check(&bearer(&Secret::new("newer"))).is_ok());
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(keys.reload().unwrap_err().contains("no key"));
        assert!(keys.check(&bearer(&Secret::new("new"))).is_ok(), "the old keys stay");
    }

    #[test]
    fn bad_files_are_refused_naming_the_flag() {
        let (_dir, path) = file("has space\n");
        assert!(KeyFile::load("--api-key-file", &path).unwrap_err().contains("--api-key-file"));
        assert!(KeyFile::load("--api-key-file", Path::new("/nonexistent/keys"))
            .unwrap_err()
            .contains("/nonexistent/keys"));
    }
}
