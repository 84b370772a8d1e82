//! Where a task's data is read from: a folder, the hub, or (`auto`) the
//! first local copy found, else the hub.

use std::path::PathBuf;

use super::tasks::{Task, TaskKind};

/// Folders searched for local copies of a task's data, in order, each
/// holding `glue/<GLUE folder>` or `wmt16_en_ro`: those in the
/// `LORA_MINI_DATA` variable (`:`-separated), then `../shared/data`, where
/// this project's checkouts keep the official files.
pub fn data_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::var_os("LORA_MINI_DATA")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    roots.push(PathBuf::from("../shared/data"));
    roots
}

/// Where `task.data` points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// GLUE's `<TASK>/` (train.tsv, dev.tsv) or the WMT16 folder.
    Folder(PathBuf),
    /// The task's Hugging Face dataset (downloaded once, then cached).
    Hub,
}

/// Resolves `task.data`: `hub`; `auto`, the first of [`data_roots`] that
/// holds the task, else the hub; anything else is a folder.
pub fn locate_data(task: &Task, spec: &str) -> DataSource {
    locate_data_in(task, spec, data_roots())
}

fn locate_data_in(task: &Task, spec: &str, roots: Vec<PathBuf>) -> DataSource {
    match spec {
        "hub" => DataSource::Hub,
        "auto" => roots
            .into_iter()
            .map(|root| match task.kind {
                TaskKind::Translation => root.join("wmt16_en_ro"),
                _ => root.join("glue").join(task.glue_dir),
            })
            .find(|dir| dir.is_dir())
            .map_or(DataSource::Hub, DataSource::Folder),
        folder => DataSource::Folder(PathBuf::from(folder)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::task;

    #[test]
    fn auto_prefers_a_local_copy_and_falls_back_to_the_hub() {
        let sst2 = task("sst2").unwrap();
        let root = std::env::temp_dir().join(format!("lora-mini-locate-{}", std::process::id()));
        std::fs::create_dir_all(root.join("glue/SST-2")).unwrap();
        let roots = || vec![root.join("missing"), root.clone()];
        assert_eq!(
            locate_data_in(sst2, "auto", roots()),
            DataSource::Folder(root.join("glue/SST-2"))
        );
        let cola = task("cola").unwrap();
        assert_eq!(locate_data_in(cola, "auto", roots()), DataSource::Hub);
        assert_eq!(locate_data_in(sst2, "hub", roots()), DataSource::Hub);
        assert_eq!(
            locate_data_in(sst2, "x/y", roots()),
            DataSource::Folder(PathBuf::from("x/y"))
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
