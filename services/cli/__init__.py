"""The ``postbus`` operator command line (docs/cli.md). Imports services/common only."""
