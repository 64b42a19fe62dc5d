"""Python SDK and `smr` command-line client (arrives with the CLI issue)."""
