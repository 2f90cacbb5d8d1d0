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
        /// The image file.
        file: PathBuf,
    },
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
        ImgCommand::Info { file } => {
            let info = img::info(&file).map_err(|e| e.to_string())?;
            print!("{info}");
            Ok(())
        }
    }
}
