//! `qlora`: the command line. One file per command under `cmd/`; this file only parses
//! arguments and maps the outcome to an exit code (0 ok, 1 failure, 2 bad usage).

mod cmd;
mod config_file;
mod device;
mod load;
#[cfg(feature = "cuda")]
mod serve_gpu;

use clap::Parser;

fn main() {
    let args = match config_file::expand(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let cli = match cmd::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = cmd::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
