"""The `treeffn` command line (also reachable as `optimum-cli treeffn`). One module per subcommand."""
