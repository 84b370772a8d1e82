//! The `lora-mini` command line: one module per subcommand in `cli/`, on
//! the library's public API.

mod cli;

use clap::Parser;

fn main() {
    lora_mini::alloc::keep_freed_buffers();
    lora_mini::threads::shorten_idle_spinning();
    let cli = cli::Cli::parse();
    if let Err(message) = cli::run(cli) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
