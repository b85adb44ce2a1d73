"""Pruning methods. Importing the package registers the built-in ones in `PRUNERS`."""
