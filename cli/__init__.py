"""The Typer command-line application (thin commands over the tinydeploy library)."""
