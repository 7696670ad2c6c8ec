//! Certificates for tests and the security walk-through: a throwaway CA and certificates it
//! signs, made with the `openssl` command in a temporary directory (deleted on drop). Every
//! certificate is valid for `127.0.0.1` and `localhost`, for servers and clients alike, so one
//! identity can serve as etcd's, a node's or push-manager's.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A CA and what it signed, as PEM files.
pub struct TestPki {
    dir: TempDir,
}

/// A certificate and its private key.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    /// Creates the CA `ca.crt`/`ca.key`. Panics (as an assertion would) if `openssl` fails.
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new().prefix("push-manager-pki-").tempdir().expect("a temp dir");
        let pki = TestPki { dir };
        pki.openssl(&["req", "-x509", "-new", "-nodes", "-days", "2", "-subj", "/CN=push-manager test CA"], "ca", None);
        pki
    }

    /// The CA certificate, to trust.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.crt")
    }

    /// A certificate signed by this CA for `name` (its common name, which etcd takes as the user
    /// name of a client certificate).
    pub fn issue(&self, name: &str) -> Identity {
        self.openssl(&["req", "-new", "-nodes", "-subj", &format!("/CN={name}")], name, Some("ca"))
    }

    /// A certificate for `name` signed by a CA nobody trusts: looks right, is not.
    pub fn issue_untrusted(&self, name: &str) -> Identity {
        let rogue = format!("rogue-ca-for-{name}");
        self.openssl(&["req", "-x509", "-new", "-nodes", "-days", "2", "-subj", "/CN=rogue CA"], &rogue, None);
        self.openssl(
            &["req", "-new", "-nodes", "-subj", &format!("/CN={name}")],
            &format!("rogue-{name}"),
            Some(&rogue),
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Runs `openssl <args>` making `<name>.key` (P-256) and `<name>.crt`, signed by
    /// `<signer>.crt` when given (else `args` make it self-signed).
    fn openssl(&self, args: &[&str], name: &str, signer: Option<&str>) -> Identity {
        let id = Identity { cert: self.path(&format!("{name}.crt")), key: self.path(&format!("{name}.key")) };
        let ext = self.path(&format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n",
        )
        .expect("write the extensions file");
        let csr = self.path(&format!("{name}.csr"));
        let key = id.key.to_str().expect("a UTF-8 temp path");
        let mut req = Command::new("openssl");
        req.args(args).args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", key]);
        match signer {
            None => req.args(["-out", id.cert.to_str().unwrap(), "-extensions", "v3_ca"]),
            Some(_) => req.args(["-out", csr.to_str().unwrap()]),
        };
        run(req);
        if let Some(signer) = signer {
            let mut sign = Command::new("openssl");
            sign.args(["x509", "-req", "-days", "2", "-in", csr.to_str().unwrap()])
                .args(["-CA", self.path(&format!("{signer}.crt")).to_str().unwrap()])
                .args(["-CAkey", self.path(&format!("{signer}.key")).to_str().unwrap()])
                .args(["-CAcreateserial", "-out", id.cert.to_str().unwrap()])
                .args(["-extfile", ext.to_str().unwrap()]);
            run(sign);
        }
        id
    }
}

impl Default for TestPki {
    fn default() -> TestPki {
        TestPki::new()
    }
}

#[track_caller]
fn run(mut command: Command) {
    let out = command.output().unwrap_or_else(|e| panic!("cannot run openssl (install it): {e}"));
    assert!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}
