"""Small CLI subcommands (the larger ones live beside the code they drive)."""
