//! `lambda-llm keys new|list|revoke`: manage the local keys file (or print an entry for Secrets Manager).

use crate::config::Config;
use crate::keys::{self, KeyRecord, KeysDocument};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `keys …`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Keys file (default: `API_KEYS_FILE`, else ./lambda-llm-keys.json).
    #[arg(long, global = true, value_name = "PATH")]
    pub keys_file: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// The `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key: prints the key alone on stdout and stores only its SHA-256 in the keys file.
    #[command(long_about = "Create a key.\n\n\
        Prints the new key alone on stdout (so `KEY=$(lambda-llm keys new --name x)` works) and stores only its \
        SHA-256 in the keys file, which is created (mode 0600) if missing. The key cannot be shown again.\n\n\
        With --print-entry no file is read or written: stdout gets the JSON entry to add to the `keys` array of \
        the Secrets Manager document, and the key goes to stderr after the label `API key:`.")]
    New(NewArgs),
    /// List the keys: id, name, models, limits, expiry, status and a hash prefix (never a key).
    List,
    /// Revoke a key by id: marks it disabled (kept for the record; --delete removes it). Running servers stop
    /// accepting it within KEYS_CACHE_TTL_SECONDS.
    Revoke(RevokeArgs),
}

/// `keys new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// Who or what the key is for.
    #[arg(long)]
    pub name: String,
    /// Model ids the key may use, comma-separated (default: all, `*`).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub models: Vec<String>,
    /// Requests per minute (default: unlimited).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rpm: Option<u32>,
    /// Tokens per minute (default: unlimited).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub tpm: Option<u64>,
    /// Expiry time, RFC 3339 (e.g. 2027-01-01T00:00:00Z; default: never).
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339)]
    pub expires: Option<OffsetDateTime>,
    /// Print the JSON entry for a Secrets Manager document on stdout (key on stderr) instead of writing a file.
    #[arg(long)]
    pub print_entry: bool,
}

/// `keys revoke ID`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The key's id (`key_…`, see `keys list`).
    pub id: String,
    /// Remove the entry instead of marking it disabled.
    #[arg(long)]
    pub delete: bool,
}

fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|e| format!("expected RFC 3339, e.g. 2027-01-01T00:00:00Z ({e})"))
}

/// Runs a `keys` subcommand.
pub fn run(a: &KeysArgs, config: &Config) -> Result<()> {
    let path = a
        .keys_file
        .clone()
        .or_else(|| config.api_keys_file.clone())
        .unwrap_or_else(|| PathBuf::from(keys::DEFAULT_KEYS_FILE));
    match &a.command {
        KeysCommand::New(n) => new(n, &path),
        KeysCommand::List => list(&path),
        KeysCommand::Revoke(r) => revoke(r, &path),
    }
}

/// Builds the record for a new key (everything but the id).
fn new_record(n: &NewArgs, id: String, hash: String) -> Result<KeyRecord> {
    if n.name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    if let Some(at) = n.expires.filter(|at| *at <= OffsetDateTime::now_utc()) {
        bail!("--expires {} is in the past", at.format(&Rfc3339).unwrap_or_default());
    }
    let mut record = KeyRecord::new(id, n.name.trim(), hash);
    if !n.models.is_empty() {
        record.models = n.models.iter().map(|m| m.trim().to_owned()).collect();
        if record.models.iter().any(String::is_empty) {
            bail!("--models has an empty entry");
        }
    }
    (record.rpm, record.tpm, record.expires_at) = (n.rpm, n.tpm, n.expires);
    Ok(record)
}

fn new(n: &NewArgs, path: &Path) -> Result<()> {
    let key = keys::generate_key()?;
    if n.print_entry {
        let record = new_record(n, keys::generate_id()?, keys::hash_key(&key))?;
        println!("{}", serde_json::to_string(&record)?);
        eprintln!("API key: {key}");
        return Ok(());
    }
    let mut doc = keys::load_or_empty(path)?;
    let id = unique_id(&doc)?;
    let record = new_record(n, id.clone(), keys::hash_key(&key))?;
    doc.keys.push(record);
    keys::save_file(path, &doc)?;
    eprintln!(
        "created {id} ({}) in {}; the key below is shown only once",
        n.name.trim(),
        path.display()
    );
    // The key is printed last, once it is safely stored: a failed save never hands out a key that does not work.
    let mut out = std::io::stdout().lock();
    writeln!(out, "{key}")
        .and_then(|()| out.flush())
        .context("writing the key to stdout")?;
    Ok(())
}

fn unique_id(doc: &KeysDocument) -> Result<String> {
    loop {
        let id = keys::generate_id()?;
        if doc.find(&id).is_none() {
            return Ok(id);
        }
    }
}

fn list(path: &Path) -> Result<()> {
    let doc = keys::load_file(path)?;
    if doc.keys.is_empty() {
        eprintln!("no keys in {}", path.display());
        return Ok(());
    }
    let now = SystemTime::now();
    let header = ["ID", "NAME", "MODELS", "RPM", "TPM", "EXPIRES", "STATUS", "HASH"].map(String::from);
    let rows: Vec<[String; 8]> = doc.keys.iter().map(|k| row(k, now)).collect();
    let mut widths = [0usize; 8];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

/// One `keys list` row; the hash is cut to a prefix (enough to match an entry, too short to be worth anything).
fn row(k: &KeyRecord, now: SystemTime) -> [String; 8] {
    let limit = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let status = if k.disabled {
        "disabled"
    } else if k.is_expired(now) {
        "expired"
    } else {
        "active"
    };
    [
        k.id.clone(),
        k.name.clone(),
        k.models.join(","),
        limit(k.rpm.map(|v| v.to_string())),
        limit(k.tpm.map(|v| v.to_string())),
        k.expires_at
            .map_or_else(|| "never".into(), |t| t.format(&Rfc3339).unwrap_or_default()),
        status.into(),
        format!(
            "{}…",
            k.hash
                .chars()
                .take(keys::key::HASH_PREFIX.len() + 8)
                .collect::<String>()
        ),
    ]
}

fn revoke(r: &RevokeArgs, path: &Path) -> Result<()> {
    let mut doc = keys::load_file(path)?;
    let Some(pos) = doc.keys.iter().position(|k| k.id == r.id) else {
        bail!(
            "no key with id {:?} in {} (see `lambda-llm keys list`)",
            r.id,
            path.display()
        );
    };
    if r.delete {
        let k = doc.keys.remove(pos);
        keys::save_file(path, &doc)?;
        println!("deleted {} ({})", k.id, k.name);
    } else if doc.keys[pos].disabled {
        println!("{} ({}) was already revoked", r.id, doc.keys[pos].name);
    } else {
        doc.keys[pos].disabled = true;
        keys::save_file(path, &doc)?;
        println!("revoked {} ({})", r.id, doc.keys[pos].name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Top {
        #[command(flatten)]
        keys: KeysArgs,
    }

    fn parse(args: &[&str]) -> Result<KeysArgs, clap::Error> {
        Top::try_parse_from(std::iter::once("keys").chain(args.iter().copied())).map(|t| t.keys)
    }

    #[test]
    fn new_parses_its_options() {
        let a = parse(&[
            "new",
            "--name",
            "x",
            "--models",
            "a,b",
            "--rpm",
            "5",
            "--expires",
            "2099-01-01T00:00:00Z",
        ])
        .unwrap();
        let KeysCommand::New(n) = a.command else { panic!() };
        assert_eq!(n.models, vec!["a", "b"]);
        let r = new_record(&n, "key_1".into(), "sha256:x".into()).unwrap();
        assert_eq!((r.rpm, r.tpm, r.models.len()), (Some(5), None, 2));
        assert_eq!(r.expires_at.unwrap().year(), 2099);
        assert!(parse(&["new", "--name", "x", "--rpm", "0"]).is_err());
        assert!(parse(&["new", "--name", "x", "--expires", "tomorrow"]).is_err());
        assert!(parse(&["new"]).is_err(), "--name is required");
        let a = parse(&["new", "--name", "x", "--keys-file", "/k.json"]).unwrap();
        assert_eq!(a.keys_file, Some(PathBuf::from("/k.json")));
    }

    #[test]
    fn bad_new_values_are_refused() {
        let n = |args: &[&str]| match parse(args).unwrap().command {
            KeysCommand::New(n) => n,
            _ => panic!(),
        };
        let past = n(&["new", "--name", "x", "--expires", "2001-01-01T00:00:00Z"]);
        assert!(new_record(&past, "k".into(), "h".into())
            .unwrap_err()
            .to_string()
            .contains("past"));
        assert!(new_record(&n(&["new", "--name", " "]), "k".into(), "h".into()).is_err());
        assert!(new_record(&n(&["new", "--name", "x", "--models", "a,,b"]), "k".into(), "h".into()).is_err());
        let all = new_record(&n(&["new", "--name", "x"]), "k".into(), "h".into()).unwrap();
        assert_eq!(all.models, vec!["*"]);
    }

    #[test]
    fn list_rows_never_show_a_whole_hash() {
        let mut k = KeyRecord::new("key_1", "alice", keys::hash_key("sk-llm-x"));
        k.rpm = Some(60);
        let r = row(&k, SystemTime::now());
        assert_eq!(r[3], "60");
        assert_eq!(r[4], "-");
        assert_eq!(r[5], "never");
        assert_eq!(r[6], "active");
        assert_eq!(r[7].chars().count(), 7 + 8 + 1);
        k.disabled = true;
        assert_eq!(row(&k, SystemTime::now())[6], "disabled");
    }
}
