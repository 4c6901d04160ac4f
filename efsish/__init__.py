"""efsish: a self-hosted, EFS-like shared network filesystem on any S3-compatible store.

This package holds the daemon, the command line and the libraries they share. It must not
import pyfuse3 at package import time: only efsish.fuse_ops and efsish.mount may.
"""

__version__ = "0.1.0"
