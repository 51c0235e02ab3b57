//! The Secrets Manager key store over the real wire protocol: a local moto server, started and stopped here.
//!
//! Each test starts its own `moto_server` on a free port (so one test can kill its server while others run) and
//! talks to it through the AWS SDK with explicit endpoint, region and credentials, never through the process
//! environment. Timing assertions are bounded loops with generous limits, not exact delays.

use aws_sdk_secretsmanager::Client;
use lambda_llm::keys::{
    generate_key, hash_key, KeyRecord, KeyStore, KeyStoreError, KeysDocument, SecretsManagerKeyStore,
};
use moto::{sdk_config, Moto};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/moto.rs"]
mod moto;

/// A store for secret `id` at `endpoint`, built the way the Lambda function builds its own.
async fn store(endpoint: &str, id: &str, ttl: Duration) -> SecretsManagerKeyStore {
    SecretsManagerKeyStore::new(SecretsManagerKeyStore::client(&sdk_config(endpoint).await), id, ttl)
}

/// An admin client (creates and rotates secrets) with the SDK's own defaults.
async fn admin(endpoint: &str) -> Client {
    Client::new(&sdk_config(endpoint).await)
}

/// A keys document with one record per `(id, key)`.
fn doc(keys: &[(&str, &str)]) -> String {
    let doc = KeysDocument {
        keys: keys
            .iter()
            .map(|(id, key)| KeyRecord::new(*id, "test", hash_key(key)))
            .collect(),
        ..Default::default()
    };
    doc.to_pretty_json().unwrap()
}

async fn create(admin: &Client, id: &str, value: &str) {
    admin
        .create_secret()
        .name(id)
        .secret_string(value)
        .send()
        .await
        .unwrap();
}

/// Rotation as operators do it: a new current version of the same secret.
async fn put(admin: &Client, id: &str, value: &str) {
    admin
        .put_secret_value()
        .secret_id(id)
        .secret_string(value)
        .send()
        .await
        .unwrap();
}

/// The id of the record found for `key`, `Ok(None)` if refused.
async fn who(store: &SecretsManagerKeyStore, key: &str) -> Result<Option<String>, KeyStoreError> {
    store.lookup(&hash_key(key)).await.map(|r| r.map(|r| r.id))
}

/// Polls `who(key)` until it gives `want`, for at most `limit`; the last answer otherwise.
async fn eventually(
    store: &SecretsManagerKeyStore,
    key: &str,
    want: Option<&str>,
    limit: Duration,
) -> Result<Option<String>, KeyStoreError> {
    let deadline = Instant::now() + limit;
    loop {
        let got = who(store, key).await;
        if got.as_ref().is_ok_and(|g| g.as_deref() == want) || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn some(id: &str) -> Result<Option<String>, KeyStoreError> {
    Ok(Some(id.to_owned()))
}

fn assert_unavailable(r: Result<Option<String>, KeyStoreError>) {
    assert!(
        matches!(r, Err(KeyStoreError::Unavailable(_))),
        "expected fail closed, got {r:?}"
    );
}

#[tokio::test]
async fn a_valid_key_is_accepted_an_unknown_one_refused_and_a_bad_secret_fails_closed() {
    let moto = Moto::start();
    let admin = admin(&moto.endpoint()).await;
    let (a, stranger) = (generate_key().unwrap(), generate_key().unwrap());
    create(&admin, "lambda-llm/keys", &doc(&[("key_a", &a)])).await;

    let s = store(&moto.endpoint(), "lambda-llm/keys", Duration::from_secs(60)).await;
    assert_eq!(s.secret_id(), "lambda-llm/keys");
    s.refresh().await.unwrap();
    assert_eq!(who(&s, &a).await, some("key_a"));
    assert_eq!(who(&s, &stranger).await, Ok(None));

    // Malformed from the start (a plain key pasted as the value): no document ever, so nothing is accepted, and
    // the error says what is wrong without repeating the value.
    create(&admin, "malformed", &a).await;
    let bad = store(&moto.endpoint(), "malformed", Duration::from_secs(60)).await;
    let Err(KeyStoreError::Unavailable(reason)) = bad.refresh().await else {
        panic!("a malformed secret must not load")
    };
    assert!(
        reason.contains("\"malformed\"") && reason.contains("not valid JSON"),
        "{reason}"
    );
    assert!(
        !reason.contains(&a[..12]),
        "the secret's value leaked into the error: {reason}"
    );
    assert_unavailable(who(&bad, &a).await);

    // A secret that does not exist: the same.
    let missing = store(&moto.endpoint(), "no-such-secret", Duration::from_secs(60)).await;
    let Err(KeyStoreError::Unavailable(reason)) = missing.refresh().await else {
        panic!("a missing secret must not load")
    };
    assert!(reason.contains("ResourceNotFound"), "{reason}");
    assert_unavailable(who(&missing, &a).await);
}

#[tokio::test]
async fn a_rotation_adds_a_key_at_once_and_removes_one_within_the_ttl() {
    let moto = Moto::start();
    let admin = admin(&moto.endpoint()).await;
    let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
    create(&admin, "keys", &doc(&[("key_a", &a)])).await;
    let ttl = Duration::from_secs(2);
    let s = store(&moto.endpoint(), "keys", ttl).await;
    assert_eq!(who(&s, &a).await, some("key_a"));

    // Step 1, add B: its first use refreshes the cache (an unknown key; none was looked up before), so B works
    // at once. That fetch starts no earlier than this instant.
    put(&admin, "keys", &doc(&[("key_a", &a), ("key_b", &b)])).await;
    let fetched_after = Instant::now();
    assert_eq!(who(&s, &b).await, some("key_b"));

    // Step 2, remove A: a known key is served from the cache until the TTL is up, then the re-read drops it.
    put(&admin, "keys", &doc(&[("key_b", &b)])).await;
    // (A margin for the instant between this check and the lookup's own clock reading.)
    let (before_ttl, a_now) = (
        fetched_after.elapsed() + Duration::from_millis(100) < ttl,
        who(&s, &a).await,
    );
    if before_ttl {
        // Only meaningful if this machine was fast enough to ask before the TTL ran out.
        assert_eq!(a_now, some("key_a"), "a removed key keeps working until the TTL is up");
    }
    let deadline = Instant::now() + ttl * 4;
    let mut a_result = who(&s, &a).await;
    while a_result != Ok(None) && Instant::now() < deadline {
        // No valid key fails during the change.
        assert_eq!(who(&s, &b).await, some("key_b"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        a_result = who(&s, &a).await;
    }
    assert_eq!(a_result, Ok(None), "a removed key must stop within the TTL");
    assert_eq!(who(&s, &b).await, some("key_b"));
}

#[tokio::test]
async fn a_malformed_value_after_a_good_one_keeps_the_last_good_document() {
    let moto = Moto::start();
    let admin = admin(&moto.endpoint()).await;
    let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
    create(&admin, "keys", &doc(&[("key_a", &a)])).await;
    let ttl = Duration::from_secs(1);
    let s = store(&moto.endpoint(), "keys", ttl).await;
    assert_eq!(who(&s, &a).await, some("key_a"));

    // A broken edit that would quote a key if errors echoed the value.
    put(&admin, "keys", &format!("{{\"keys\": \"{b}\"}}")).await;
    let Err(KeyStoreError::Unavailable(reason)) = s.refresh().await else {
        panic!("a malformed value must not load")
    };
    assert!(reason.contains("not a keys document"), "{reason}");
    assert!(
        !reason.contains(&b[..12]),
        "the secret's value leaked into the error: {reason}"
    );
    // The last good document serves, past the TTL too; an unknown key is refused, not an error.
    assert_eq!(who(&s, &a).await, some("key_a"));
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(who(&s, &a).await, some("key_a"));
    assert_eq!(who(&s, &b).await, Ok(None));

    // A fixed value is picked up (after the refresh interval that follows a failure).
    put(&admin, "keys", &doc(&[("key_b", &b)])).await;
    assert_eq!(eventually(&s, &b, Some("key_b"), ttl * 5).await, some("key_b"));
    assert_eq!(eventually(&s, &a, None, ttl * 5).await, Ok(None));
}

#[tokio::test]
async fn a_stopped_secrets_manager_keeps_warm_stores_serving_and_fresh_ones_closed() {
    let mut moto = Moto::start();
    let endpoint = moto.endpoint();
    let admin = admin(&endpoint).await;
    let a = generate_key().unwrap();
    create(&admin, "keys", &doc(&[("key_a", &a)])).await;
    let ttl = Duration::from_secs(1);
    let warm = store(&endpoint, "keys", ttl).await;
    assert_eq!(who(&warm, &a).await, some("key_a"));

    moto.stop();
    assert!(
        TcpStream::connect_timeout(&moto.addr, Duration::from_millis(500)).is_err(),
        "moto still listens after being killed"
    );
    // Within and past the TTL: the cached document serves; unknown keys are refused, not errors.
    assert_eq!(who(&warm, &a).await, some("key_a"));
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(who(&warm, &a).await, some("key_a"));
    assert_eq!(who(&warm, &generate_key().unwrap()).await, Ok(None));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a failed re-read must not hang lookups"
    );
    assert!(warm.refresh().await.is_err(), "a forced refresh reports the outage");
    assert_eq!(who(&warm, &a).await, some("key_a"));

    // A fresh instance (cold start during the outage) never loaded a document: it fails closed, quickly.
    let cold = store(&endpoint, "keys", ttl).await;
    let r = tokio::time::timeout(Duration::from_secs(20), who(&cold, &a)).await;
    assert_unavailable(r.expect("a fresh store must give up within its timeouts"));
}

#[tokio::test]
async fn an_endpoint_that_never_answers_fails_closed_within_the_timeouts() {
    // Accepts connections (the kernel's backlog) but never replies: only the SDK timeouts can end the call.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let s = store(&endpoint, "keys", Duration::from_secs(60)).await;
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), who(&s, &generate_key().unwrap())).await;
    assert_unavailable(r.expect("the SDK timeouts must end the call"));
    // The operation timeout (3 s) bounds the call; allow slack for a busy machine.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    drop(silent);
}

/// Set in the child process of the test below: the key it must find.
const CHILD_KEY_VAR: &str = "LAMBDA_LLM_TEST_FROM_ENV_KEY";

#[tokio::test]
async fn from_env_reads_the_standard_aws_variables() {
    const NAME: &str = "from_env_reads_the_standard_aws_variables";
    if let Ok(key) = std::env::var(CHILD_KEY_VAR) {
        // The child: configured only through AWS_* variables, as on Lambda.
        let s = SecretsManagerKeyStore::from_env("keys", Duration::from_secs(60)).await;
        assert_eq!(who(&s, &key).await, some("key_a"));
        return;
    }
    // The parent: this test's process environment stays untouched; a child gets the variables instead.
    let moto = Moto::start();
    let a = generate_key().unwrap();
    create(&admin(&moto.endpoint()).await, "keys", &doc(&[("key_a", &a)])).await;
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--test-threads=1"])
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL_SECRETS_MANAGER")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env(CHILD_KEY_VAR, &a)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_harness_finds_moto() {
    let exe = moto::moto_server_executable();
    assert!(Path::new(&exe).is_file(), "{}", exe.display());
}
