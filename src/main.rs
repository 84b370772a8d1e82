use clap::Parser;

fn main() {
    lora_mini::alloc::keep_freed_buffers();
    let cli = lora_mini::cli::Cli::parse();
    if let Err(message) = lora_mini::cli::run(cli) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
