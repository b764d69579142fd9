"""The `tidegate` command, the dev stack and the demo: the one package that knows all the others."""
