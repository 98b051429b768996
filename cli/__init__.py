"""The attnc command line: a thin typer app over the library."""
