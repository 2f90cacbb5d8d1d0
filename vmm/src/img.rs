//! `platter img`: create and inspect disk images, with qemu-img's options.

use std::path::PathBuf;

use clap::Subcommand;
use platter_block::img::{self, CreateOptions};
use platter_block::Format;

/// Image subcommands.
#[derive(Subcommand)]
pub enum ImgCommand {
    /// Create an image (like `qemu-img create`); an existing file is overwritten.
    Create {
        /// Format: raw or qcow2.
        #[arg(short = 'f', default_value = "raw")]
        format: Format,
        /// Options: preallocation=off|metadata|falloc|full, cluster_size=N,
        /// backing_file=F, backing_fmt=FMT (comma-separated).
        #[arg(short = 'o', default_value = "")]
        options: String,
        /// The image file.
        file: PathBuf,
        /// Virtual size, e.g. 10G, 512M, 4096 (optional with a backing file).
        size: Option<String>,
    },
    /// Time I/O on an image through Platter's block layer (qemu-img bench's options).
    Bench(crate::img_bench::BenchArgs),
    /// Show format, virtual and allocated size and the backing chain.
    Info {
        /// human (qemu-img's text, backing chain included) or json (qemu-img's JSON keys).
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// With --output=json: an array of the whole backing chain, top image first,
        /// instead of the top image alone (the text always shows the chain).
        #[arg(long)]
        backing_chain: bool,
        /// The image file.
        file: PathBuf,
    },
}

/// How `img info` prints.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Output {
    /// qemu-img's text.
    Human,
    /// qemu-img's JSON.
    Json,
}

/// One image as `qemu-img info --output=json` shows it (same keys, so scripts written for
/// qemu-img read it).
fn json_one(i: &img::ImageInfo) -> serde_json::Value {
    let mut v = serde_json::json!({
        "filename": i.path.display().to_string(),
        "format": i.format.to_string(),
        "virtual-size": i.virtual_size,
        "actual-size": i.allocated_size,
        "dirty-flag": i.dirty,
    });
    let o = v.as_object_mut().expect("an object");
    if let Some(c) = i.cluster_size {
        o.insert("cluster-size".into(), c.into());
    }
    if let Some(b) = &i.backing_file {
        o.insert("backing-filename".into(), b.clone().into());
        let full = platter_block::qcow2::resolve_backing(&i.path, b);
        o.insert(
            "full-backing-filename".into(),
            full.display().to_string().into(),
        );
    }
    if let Some(f) = &i.backing_format {
        o.insert("backing-filename-format".into(), f.clone().into());
    }
    if let Some(ver) = i.qcow2_version {
        let mut data = serde_json::json!({
            "compat": img::compat(ver),
            "corrupt": i.corrupt,
        });
        if let Some(r) = i.refcount_bits {
            data["refcount-bits"] = r.into();
        }
        o.insert(
            "format-specific".into(),
            serde_json::json!({ "type": "qcow2", "data": data }),
        );
    }
    v
}

/// `img info --output=json`: the top image, or with `chain` every image of the chain.
fn json(info: &img::ImageInfo, chain: bool) -> String {
    let v = if chain {
        let mut all = vec![json_one(info)];
        all.extend(info.backing_chain.iter().map(json_one));
        serde_json::Value::Array(all)
    } else {
        json_one(info)
    };
    serde_json::to_string_pretty(&v).expect("JSON values always serialize")
}

/// Run an `img` subcommand; errors are one line.
pub fn run(cmd: ImgCommand) -> Result<(), String> {
    match cmd {
        ImgCommand::Create {
            format,
            options,
            file,
            size,
        } => {
            let opts = CreateOptions::parse(&options).map_err(|e| e.to_string())?;
            let size = match size {
                Some(s) => img::parse_size(&s).map_err(|e| e.to_string())?,
                None => match &opts.backing_file {
                    Some(b) => {
                        let base = file.parent().map(|p| p.join(b)).unwrap_or_else(|| b.into());
                        img::info(&base).map_err(|e| e.to_string())?.virtual_size
                    }
                    None => return Err("a size is required without backing_file".into()),
                },
            };
            img::create(&file, format, size, &opts).map_err(|e| e.to_string())?;
            println!("Formatting '{}', fmt={format} size={size}", file.display());
            Ok(())
        }
        ImgCommand::Bench(args) => crate::img_bench::run(args),
        ImgCommand::Info {
            output,
            backing_chain,
            file,
        } => {
            let info = img::info(&file).map_err(|e| e.to_string())?;
            match output {
                Output::Human => print!("{info}"),
                Output::Json => println!("{}", json(&info, backing_chain)),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON has qemu-img's keys with qemu-img's values, for a qcow2 over a raw image,
    /// alone and as a chain.
    #[test]
    fn json_info_reads_as_qemu_img_info() {
        let dir = std::env::temp_dir().join(format!("platter-img-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, top) = (dir.join("base.raw"), dir.join("top.qcow2"));
        img::create(&base, Format::Raw, 32 << 20, &CreateOptions::default()).unwrap();
        let opts = CreateOptions::parse("backing_file=base.raw,backing_fmt=raw").unwrap();
        img::create(&top, Format::Qcow2, 32 << 20, &opts).unwrap();
        let info = img::info(&top).unwrap();

        let ours: serde_json::Value = serde_json::from_str(&json(&info, false)).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&top)
            .output()
            .expect("qemu-img (apt-get install qemu-utils)");
        assert!(out.status.success());
        let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in [
            "format",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
            "dirty-flag",
        ] {
            assert_eq!(ours[key], theirs[key], "{key}");
        }
        for key in ["compat", "refcount-bits", "corrupt"] {
            assert_eq!(
                ours["format-specific"]["data"][key], theirs["format-specific"]["data"][key],
                "format-specific {key}"
            );
        }
        let chain: serde_json::Value = serde_json::from_str(&json(&info, true)).unwrap();
        let chain = chain.as_array().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1]["format"], "raw");
        assert_eq!(chain[1]["virtual-size"], 32 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
