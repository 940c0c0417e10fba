use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    flowledger::cli::main().await
}
