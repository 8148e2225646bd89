//! Test PKI made with openssl (a CA, a site certificate, a client certificate).

// Test support: a failing openssl fails the test.
#![allow(clippy::expect_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::sitesim::Tls;

/// A CA, a server certificate for 127.0.0.1 (`site.crt`, `site.key`) and a client certificate
/// (`client.crt`, `client.key`) in `dir`, made with openssl; returns the CA file and the server
/// side of the simulator's TLS (no client certificate asked for yet).
pub fn make_tls(dir: &Path) -> (PathBuf, Tls) {
    std::fs::create_dir_all(dir).expect("dir");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=sitesim-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "site.key",
        "-out",
        "site.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("site.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "site.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "site.crt",
        "-days",
        "2",
        "-extfile",
        "site.ext",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=offload-operator",
    ]);
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.crt",
        "-days",
        "2",
        "-extfile",
        "client.ext",
    ]);
    let tls = Tls {
        cert: dir.join("site.crt"),
        key: dir.join("site.key"),
        client_ca: None,
    };
    (dir.join("ca.crt"), tls)
}
