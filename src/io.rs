//! Files written so that an interruption never leaves half of one: every
//! writer goes to a temporary sibling and renames it over the target.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle::{Result, Tensor};

/// Writes `bytes` to a temporary sibling and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = |e: std::io::Error| candle::Error::msg(format!("writing {}: {e}", path.display()));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(ctx)?;
    }
    let tmp = tmp_sibling(path);
    let mut f = std::fs::File::create(&tmp).map_err(ctx)?;
    f.write_all(bytes).map_err(ctx)?;
    f.sync_all().map_err(ctx)?;
    std::fs::rename(&tmp, path).map_err(ctx)
}

/// A safetensors file with `metadata` in its header, keys sorted, so the
/// same tensors and metadata always give the same bytes.
pub(crate) fn write_safetensors_atomic(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let tensors: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n, t.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| candle::Error::msg(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, &sorted_header(bytes)?)
}

fn tmp_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// safetensors serialises its metadata from a `HashMap`, in an order that
/// changes from run to run; this rewrites the header with every key sorted
/// (offsets are explicit, so the data section is untouched).
fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let len = u64::from_le_bytes(bytes[..8].try_into().map_err(candle::Error::wrap)?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + len]).map_err(candle::Error::wrap)?;
    let mut text = serde_json::to_string(&sort_keys(header)).map_err(candle::Error::wrap)?;
    while text.len() % 8 != 0 {
        text.push(' '); // safetensors pads the header with spaces
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// Objects rebuilt with their keys inserted in sorted order (sorted whether
/// or not serde_json keeps insertion order).
fn sort_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<String, serde_json::Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_metadata_is_written_sorted_and_reads_back() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lora-mini-io-{}", std::process::id()));
        let path = dir.join("t.safetensors");
        let tensors = BTreeMap::from([(
            "w".to_string(),
            Tensor::new(&[1f32, 2., 3.], &candle::Device::Cpu)?,
        )]);
        let metadata: HashMap<String, String> = (0..20)
            .map(|i| (format!("key{i:02}"), format!("v{i}")))
            .collect();
        write_safetensors_atomic(&path, &tensors, metadata.clone())?;
        let bytes = std::fs::read(&path)?;
        let text = String::from_utf8_lossy(&bytes);
        let positions: Vec<usize> = (0..20)
            .map(|i| text.find(&format!("\"key{i:02}\"")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().clone().unwrap(), metadata);
        let back = candle::safetensors::load(&path, &candle::Device::Cpu)?;
        assert_eq!(back["w"].to_vec1::<f32>()?, vec![1., 2., 3.]);
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }
}
