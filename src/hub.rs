//! Files from the Hugging Face hub, or only from its local cache when
//! `HF_HUB_OFFLINE` is set.
//!
//! hf-hub reads `HF_HOME` (the cache lives in `$HF_HOME/hub`) and `HF_ENDPOINT`
//! but ignores `HF_HUB_OFFLINE`; [`HubOptions::from_env`] maps it to
//! local-files-only, as Python's `huggingface_hub` does, so an offline run
//! never touches the network and says which file it lacks.

use std::path::PathBuf;

use candle::Result;
use hf_hub::{Cache, Repo, RepoType};

/// Where to look for hub files.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Only use the local cache.
    pub offline: bool,
    /// The hub cache folder (`$HF_HOME/hub`, or `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
}

impl HubOptions {
    /// Reads `HF_HUB_OFFLINE` and `HF_HOME`.
    pub fn from_env() -> Self {
        Self {
            offline: offline_flag(std::env::var("HF_HUB_OFFLINE").ok().as_deref()),
            cache_dir: Cache::from_env().path().clone(),
        }
    }
}

/// `huggingface_hub`'s reading of `HF_HUB_OFFLINE`: `1`, `ON`, `YES` or `TRUE`
/// (any case) switch it on.
pub fn offline_flag(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

/// The local path of `filename` in repo `repo_id` (a model or dataset) at
/// `revision` (a branch, tag or commit; `main` when `None`), downloading it
/// unless offline.
pub fn fetch(
    options: &HubOptions,
    repo_id: &str,
    repo_type: RepoType,
    revision: Option<&str>,
    filename: &str,
) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main").to_string();
    let repo = Repo::with_revision(repo_id.to_string(), repo_type, revision.clone());
    if let Some(path) = cached(options, &repo, &revision, filename) {
        return Ok(path);
    }
    if options.offline {
        candle::bail!(
            "hub id {repo_id}: HF_HUB_OFFLINE is set and {repo_id}@{revision}/{filename} is not in the hub cache at {} \
             (for a local copy, give its folder as a path, e.g. ./{repo_id})",
            options.cache_dir.display()
        );
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_progress(true)
        .build()
        .map_err(|e| candle::Error::msg(format!("hub client: {e}")))?;
    api.repo(repo).get(filename).map_err(|e| {
        candle::Error::msg(format!(
            "hub id {repo_id}: {filename} (revision {revision}) is not in the hub cache at {} and downloading it failed ({e}); \
             offline, set HF_HUB_OFFLINE=1 and fill that cache, or give a local folder as a path, e.g. ./{repo_id}",
            options.cache_dir.display()
        ))
    })
}

/// The cached copy, resolving a branch through `refs/` or a commit hash
/// directly to its snapshot.
fn cached(options: &HubOptions, repo: &Repo, revision: &str, filename: &str) -> Option<PathBuf> {
    let cache = Cache::new(options.cache_dir.clone());
    if let Some(path) = cache.repo(repo.clone()).get(filename) {
        return Some(path);
    }
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let snapshot = options
        .cache_dir
        .join(repo.folder_name())
        .join("snapshots")
        .join(revision)
        .join(filename);
    (is_commit && snapshot.exists()).then_some(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_flag_follows_huggingface_hub() {
        for on in ["1", "ON", "yes", "True"] {
            assert!(offline_flag(Some(on)), "{on}");
        }
        for off in [None, Some("0"), Some(""), Some("off")] {
            assert!(!offline_flag(off), "{off:?}");
        }
    }

    #[test]
    fn offline_reads_the_cache_and_names_what_is_missing() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lora-mini-hub-{}", std::process::id()));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo_dir = dir.join("models--org--tiny");
        std::fs::create_dir_all(repo_dir.join("refs"))?;
        std::fs::create_dir_all(repo_dir.join("snapshots").join(commit))?;
        std::fs::write(repo_dir.join("refs/main"), commit)?;
        std::fs::write(
            repo_dir.join("snapshots").join(commit).join("config.json"),
            "{}",
        )?;
        let options = HubOptions {
            offline: true,
            cache_dir: dir.clone(),
        };

        let path = fetch(&options, "org/tiny", RepoType::Model, None, "config.json")?;
        assert_eq!(std::fs::read_to_string(path)?, "{}");
        let path = fetch(
            &options,
            "org/tiny",
            RepoType::Model,
            Some(commit),
            "config.json",
        )?;
        assert!(path.exists());

        let err = fetch(
            &options,
            "org/tiny",
            RepoType::Model,
            None,
            "model.safetensors",
        )
        .unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("org/tiny@main/model.safetensors"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
