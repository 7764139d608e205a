"""The console commands, one module each: parse the command line, check it, call the library (no argparse below)."""
