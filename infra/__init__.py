"""Local run and test infrastructure of Postbus (not part of the installed package)."""
