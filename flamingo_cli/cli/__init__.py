"""The Typer shell: each subcommand parses, calls a library function, and renders."""
