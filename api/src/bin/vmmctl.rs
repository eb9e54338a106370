//! `vmmctl`: control a running VMM through its API socket.
//! See `api::cli` for the commands and exit statuses.
#![forbid(unsafe_code)]

fn main() {
    let code = api::cli::run(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
