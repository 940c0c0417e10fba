//! `flowledger completions <shell>` and `flowledger man`: both rendered
//! from the clap command tree, so they always match the parser.

use clap::CommandFactory;

use super::{write_out, Cli};

/// The shell completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell) -> String {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "flowledger", &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The man page (roff) of `flowledger`: its options and subcommands.
pub(crate) fn man() -> std::io::Result<String> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Prints `text` (a completion script, a man page) to stdout.
pub(crate) fn print(text: &str) {
    write_out(format_args!("{}", text.trim_end_matches('\n')));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every subcommand, with its command path, that has
    /// no help text.
    fn without_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let builtin = matches!(a.get_id().as_str(), "help" | "version");
            if !builtin && a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                out.push(format!("{path} {} (the subcommand)", sub.get_name()));
            }
            without_help(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_argument_of_every_subcommand_has_help_text() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        without_help(&cmd, "flowledger", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }

    #[test]
    fn completions_and_the_man_page_render_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = completions(shell);
            for word in ["jobs", "approvals", "workflows", "api-url", "output"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
        let page = man().expect("the man page renders");
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        for word in ["flowledger", "jobs", "approvals", "completions"] {
            assert!(page.contains(word), "the man page has no {word}");
        }
    }
}
