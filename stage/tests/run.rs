//! The `offload-stage` binary as a container runtime drives it: `run` is the container's PID 1 and
//! gets the stop signal.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[test]
fn run_passes_the_stop_signal_on_and_exits_with_the_command_s_code() {
    let root = std::env::temp_dir().join(format!("offload-stage-test-{}", std::process::id()));
    std::fs::create_dir_all(root.join("outputs")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload-stage"))
        .args(["run", "--root"])
        .arg(&root)
        // A command that acts on SIGTERM at once (a shell's `wait` may notice it only when its
        // child ends).
        .args([
            "--",
            "python3",
            "-c",
            "import signal, sys, time\n\
             signal.signal(signal.SIGTERM, lambda *_: (print('got-term', flush=True), sys.exit(7)))\n\
             print('started', flush=True)\n\
             time.sleep(30)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command's handler is set once it printed.
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "offload-stage did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(7), "stdout {rest:?}, stderr {err:?}");
    assert!(
        rest.contains("got-term"),
        "the command did not get SIGTERM: {rest:?}"
    );
    assert!(err.contains("passing"), "{err:?}");
    let _ = std::fs::remove_dir_all(root);
}

/// A folder every user may write, for a run as another user.
fn shared_root(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = std::env::temp_dir().join(format!("offload-stage-{name}-{}", std::process::id()));
    std::fs::create_dir_all(root.join("outputs")).unwrap();
    for d in [root.clone(), root.join("outputs")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    root
}

#[test]
fn the_command_cannot_read_the_upload_credentials() {
    use std::os::unix::process::CommandExt;
    let root = shared_root("creds");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_offload-stage"));
    cmd.args(["run", "--root"])
        .arg(&root)
        .env("OFFLOAD_S3_OUT_RESULT_SECRET_ACCESS_KEY", "very-secret")
        .env("OFFLOAD_S3_OUT_RESULT_ACCESS_KEY_ID", "AKID")
        .env("UNRELATED", "kept")
        // The command looks for the credentials in its own environment and in the tool's (its
        // parent's) environment and memory, as a program running as the same user could.
        .args([
            "--",
            "python3",
            "-c",
            "import os\n\
             leaked = [k for k in os.environ if k.startswith('OFFLOAD_S3_')]\n\
             print('own:', leaked, os.environ.get('UNRELATED'))\n\
             for f in ('environ', 'mem'):\n\
             \ttry:\n\
             \t\topen('/proc/%d/%s' % (os.getppid(), f), 'rb').read(1)\n\
             \t\tprint(f, 'readable')\n\
             \texcept OSError as e:\n\
             \t\tprint(f, 'refused', e.errno)\n",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // As root the command could read anything; run both as an ordinary user, as at a site.
    if rustix::process::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout {stdout:?}, stderr {stderr:?}");
    assert!(stdout.contains("own: [] kept"), "{stdout:?}");
    assert!(stdout.contains("environ refused"), "{stdout:?}");
    assert!(stdout.contains("mem refused"), "{stdout:?}");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn temporary_credentials_send_their_session_token() {
    use std::{io::Write, net::TcpListener};
    // A store that records the first request's headers and answers 404.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    });
    let root = shared_root("token");
    let out = Command::new(env!("CARGO_BIN_EXE_offload-stage"))
        .args(["in", "--root"])
        .arg(&root)
        .arg("--input")
        .arg(format!("data={endpoint}/bucket/key"))
        .env("OFFLOAD_S3_IN_DATA_ACCESS_KEY_ID", "ASIATEMP")
        .env("OFFLOAD_S3_IN_DATA_SECRET_ACCESS_KEY", "temp-secret")
        .env("OFFLOAD_S3_IN_DATA_SESSION_TOKEN", "the-session-token")
        .output()
        .unwrap();
    let request = server.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "InputMissing expected: {stderr:?}");
    assert!(request.starts_with("get /bucket/key "), "{request:?}");
    assert!(
        request.contains("x-amz-security-token: the-session-token"),
        "{request:?}"
    );
    // The token is signed with the request.
    let signed = request
        .lines()
        .find(|l| l.starts_with("authorization:"))
        .unwrap_or_default();
    assert!(
        signed.contains("credential=asiatemp/") && signed.contains("x-amz-security-token"),
        "{signed:?}"
    );
    assert!(
        !stderr.contains("temp-secret") && !stderr.contains("the-session-token"),
        "{stderr:?}"
    );
    let _ = std::fs::remove_dir_all(root);
}
