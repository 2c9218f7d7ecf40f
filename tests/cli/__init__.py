"""Tests of the otfuse command line (otfuse/cli/), one module per concern."""
