"""testbed: compare virtualization techniques under VM load balancing (see README.md)."""

__version__ = "0.1.0"
