//! A `moto_server` started by a test: the real AWS wire protocol (Secrets Manager, S3, SQS) on 127.0.0.1.
//!
//! Include it with `#[path = "support/moto.rs"] mod moto;`. The executable comes from `MOTO_SERVER` (the Makefile
//! sets it), else the project's infra venv, else `PATH`; without one the test fails and says to run `make setup`.

// Each test crate that includes this file uses only part of it.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `moto_server` child process, killed on drop.
pub struct Moto {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
}

/// The moto executable: `MOTO_SERVER`, else the project's infra venv, else `moto_server` on `PATH`.
pub fn moto_server_executable() -> PathBuf {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "MOTO_SERVER={} does not exist: run `make setup`",
            p.display()
        );
        return p;
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let cache = home.join(".cache/lambda-llm");
    let mut venvs: Vec<PathBuf> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("infra-venv"))
        .map(|e| e.path().join("bin/moto_server"))
        .filter(|p| p.is_file())
        .collect();
    venvs.sort();
    if let Some(p) = venvs.pop() {
        return p;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "moto_server not found (not in MOTO_SERVER, {}/infra-venv*/bin, nor on PATH): run `make setup`, \
             which installs the pinned moto[server] these tests need",
            cache.display()
        )
    })
}

/// The port in moto's (werkzeug's) start-up line ` * Running on http://127.0.0.1:PORT`.
fn announced_port(log: &str) -> Option<u16> {
    let rest = &log[log.find("Running on http://127.0.0.1:")? + "Running on http://127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether an HTTP server answers at `addr` (moto's own API page).
fn answers_http(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 8];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

impl Moto {
    /// Starts a server and waits until it answers.
    ///
    /// Port 0 lets the kernel choose, and the port is read back from the server's log: a port picked here and
    /// passed on could be taken by another test's server in between (then two tests would share one server).
    pub fn start() -> Self {
        let exe = moto_server_executable();
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "lambda-llm-moto-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (run `make setup`)", exe.display()));
        let mut moto = Self {
            child: Some(child),
            addr: ([127, 0, 0, 1], 0).into(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = moto.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before answering:\n{}",
                    exe.display(),
                    moto.log_text()
                );
            }
            if let Some(port) = announced_port(&moto.log_text()) {
                moto.addr.set_port(port);
                if answers_http(moto.addr) {
                    return moto;
                }
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within 60 s:\n{}",
                moto.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT`, for the SDK's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server and reaps it: from then on its port refuses connections (a stopped AWS service).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn the_port_is_read_from_the_start_up_line() {
    let log = "\u{1b}[31mWARNING: development server\u{1b}[0m\n * Running on http://127.0.0.1:33465\nPress CTRL+C";
    assert_eq!(announced_port(log), Some(33465));
    assert_eq!(announced_port(" * Running on http://127.0.0.1:"), None);
    assert_eq!(announced_port(""), None);
}

/// SDK configuration for a moto `endpoint`, with fixed region and fake credentials (moto accepts any).
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
            "testing", "testing", None, None, "moto",
        ))
        .load()
        .await
}
