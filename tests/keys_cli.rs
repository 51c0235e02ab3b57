//! `lambda-llm keys new|list|revoke` run as a user would, on a temporary keys file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lambda_llm(keys_file: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lambda-llm"))
        .arg("keys")
        .args(args)
        .arg("--keys-file")
        .arg(keys_file)
        .env_remove("API_KEYS_FILE")
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh directory, removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lambda-llm-keys-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_key(s: &str) -> bool {
    s.strip_prefix("sk-llm-")
        .is_some_and(|r| r.len() == 40 && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn sha256_hex(s: &str) -> String {
    // The binary's hash, checked independently with coreutils' sha256sum.
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils) is installed");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), s.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    text(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

#[test]
fn new_list_revoke_on_a_keys_file() {
    let dir = TempDir::new("flow");
    let file = dir.0.join("keys.json");

    let out = lambda_llm(
        &file,
        &[
            "new",
            "--name",
            "alice",
            "--models",
            "smollm2-135m-instruct",
            "--rpm",
            "60",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.ends_with('\n') && stdout.lines().count() == 1, "{stdout:?}");
    let key = stdout.trim_end().to_owned();
    assert!(is_key(&key), "{key:?}");
    assert!(!text(&out.stderr).contains(&key), "the key is printed once, on stdout");

    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(stored.contains(&format!("\"sha256:{}\"", sha256_hex(&key))), "{stored}");
    assert!(!stored.contains(&key) && !stored.contains("sk-llm-"), "{stored}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    let second = lambda_llm(&file, &["new", "--name", "bob"]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    let key2 = text(&second.stdout).trim_end().to_owned();
    assert!(is_key(&key2) && key2 != key);

    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let entries = doc["keys"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let alice_id = entries[0]["id"].as_str().unwrap().to_owned();
    assert!(alice_id.starts_with("key_"));
    assert_eq!(entries[0]["models"], serde_json::json!(["smollm2-135m-instruct"]));
    assert_eq!(entries[0]["rpm"], 60);
    assert_eq!(entries[1]["models"], serde_json::json!(["*"]));

    let list = lambda_llm(&file, &["list"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let listing = text(&list.stdout);
    assert!(
        listing.contains(&alice_id) && listing.contains("alice") && listing.contains("bob"),
        "{listing}"
    );
    assert!(listing.contains("active") && !listing.contains("disabled"), "{listing}");
    assert!(!listing.contains(&sha256_hex(&key)), "never a whole hash: {listing}");

    let revoke = lambda_llm(&file, &["revoke", &alice_id]);
    assert!(revoke.status.success(), "{}", text(&revoke.stderr));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(doc["keys"][0]["disabled"], true);
    assert_eq!(doc["keys"][1]["disabled"], false);
    let listing = text(&lambda_llm(&file, &["list"]).stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&alice_id) && l.contains("disabled")),
        "{listing}"
    );

    let unknown = lambda_llm(&file, &["revoke", "key_nope"]);
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("key_nope"), "{}", text(&unknown.stderr));

    let delete = lambda_llm(&file, &["revoke", &alice_id, "--delete"]);
    assert!(delete.status.success(), "{}", text(&delete.stderr));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(doc["keys"].as_array().unwrap().len(), 1);
}

#[test]
fn print_entry_writes_no_file_and_keeps_stdout_json() {
    let dir = TempDir::new("entry");
    let file = dir.0.join("keys.json");
    let out = lambda_llm(&file, &["new", "--name", "lambda", "--tpm", "1000", "--print-entry"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!file.exists());
    let entry: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let stderr = text(&out.stderr);
    let key = stderr
        .lines()
        .find_map(|l| l.strip_prefix("API key: "))
        .expect("labelled key on stderr");
    assert!(is_key(key), "{key}");
    assert_eq!(entry["hash"], format!("sha256:{}", sha256_hex(key)));
    assert_eq!(entry["name"], "lambda");
    assert_eq!(entry["tpm"], 1000);
    assert!(entry["id"].as_str().unwrap().starts_with("key_"));
    assert!(!text(&out.stdout).contains("sk-llm-"));
}

#[test]
fn errors_are_clear_and_non_zero() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("none.json");
    let out = lambda_llm(&missing, &["list"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no keys file"), "{}", text(&out.stderr));

    let broken = dir.0.join("broken.json");
    std::fs::write(&broken, "{\"keys\": 3}").unwrap();
    let out = lambda_llm(&broken, &["new", "--name", "x"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no key is printed when it could not be stored");
    assert_eq!(
        std::fs::read_to_string(&broken).unwrap(),
        "{\"keys\": 3}",
        "a broken file is left alone"
    );

    let out = lambda_llm(&missing, &["new", "--name", "x", "--expires", "2001-01-01T00:00:00Z"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("past"), "{}", text(&out.stderr));
    assert!(!missing.exists());
    assert!(!text(&out.stderr).contains("panicked"));
}
