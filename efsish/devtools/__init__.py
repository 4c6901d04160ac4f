"""Developer tools: test S3 servers and helpers shared by tests, scripts and benchmarks.

Nothing in the daemon imports this package.
"""
